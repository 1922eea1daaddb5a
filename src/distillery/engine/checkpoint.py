"""Atomic checkpoints that can be resumed to bit-identical results on CPU.

Layout of ``RUN_DIR/checkpoints/step-00000120/``:

* ``trainable.safetensors`` -- student + method weights and buffers (schedules live in buffers)
* ``optimizer.pt``          -- optimiser state, read back with ``torch.load(weights_only=True)``
* ``state.json``            -- step, epoch, position in the epoch, running sums, LR-scheduler state
* ``rng.pt``                -- torch CPU RNG state (dropout etc.)

A checkpoint is written into ``step-N.tmp`` and renamed into place, then ``latest`` (a text
file naming it) is replaced atomically -- so a crash at any moment leaves the previous
checkpoint intact and never one that reads as complete but is not.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from distillery.errors import CheckpointError


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(run_dir: Path, step: int, trainable: torch.nn.Module, optimizer, state: dict[str, Any], keep: int = 2) -> Path:
    ckpt_root = run_dir / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{step:08d}"
    tmp = ckpt_root / f"step-{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(trainable, str(tmp / "trainable.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save({"torch": torch.get_rng_state()}, tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps(state))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(ckpt_root / "latest", final.name)
    for old in sorted(p for p in ckpt_root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = run_dir / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = run_dir / "checkpoints" / pointer.read_text().strip()
    return path if path.is_dir() else None


def load_checkpoint(path: Path, trainable: torch.nn.Module, optimizer) -> dict[str, Any]:
    try:
        missing, unexpected = load_model(trainable, str(path / "trainable.safetensors"), strict=False)
        if missing or unexpected:
            raise CheckpointError(
                f"checkpoint {path} does not match this run's models (missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}); was the config changed? Start a new run or use --overwrite"
            )
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        torch.set_rng_state(torch.load(path / "rng.pt", weights_only=True)["torch"])
        return json.loads((path / "state.json").read_text())
    except (OSError, SafetensorError, RuntimeError, ValueError, json.JSONDecodeError) as err:
        raise CheckpointError(f"checkpoint {path} is unreadable or corrupt ({err}); delete it to resume from the one before") from None


def finished_summary(cfg) -> dict | None:
    """The summary of a *finished* run of exactly this config, or None: ``summary.json`` exists and
    the saved ``config.yaml`` (re-read with today's defaults for any newer fields) is the same.
    Lets a sweep or a benchmark resume without retraining what is already done."""
    from distillery.config import dump_config, load_config

    done = cfg.run_dir / "summary.json"
    saved = cfg.run_dir / "config.yaml"
    if not (done.is_file() and saved.is_file()):
        return None
    try:
        same = dump_config(load_config(saved)) == dump_config(cfg)
    except Exception:  # a config from an incompatible version: not the same run
        return None
    return json.loads(done.read_text()) if same else None
