"""Teacher-output cache: pay for the teacher's forward pass once.

``distillery cache build CONFIG`` (or ``teacher.cache: true`` in a config) runs the teacher
over the training split -- ``views`` seeded augmentation draws per sample when
``data.augment`` is on -- and stores its outputs (see :mod:`distillery.cache.store` for the
format and the integrity rules).  Training then reads the outputs and replays exactly the
stored views; the teacher is never constructed.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

import distillery
from distillery.cache.store import (
    CacheError,
    CacheLayout,
    StaleCacheError,
    TeacherStore,
    build_store,
    finalize_store,
    sha256_file,
)
from distillery.config import RunConfig
from distillery.data import DataBundle
from distillery.data.augment import apply_params, sample_params
from distillery.errors import ModelError

__all__ = ["CacheError", "StaleCacheError", "TeacherStore", "build", "fingerprint", "store_path", "try_open"]


def store_path(cfg: RunConfig) -> Path:
    c = cfg.teacher.cache
    if c is not None and c.dir:
        return Path(c.dir)
    names = [Path(t.run).name if t.run else Path(t.model.weights or "teacher").stem for t in cfg.teacher.sources]
    return Path(cfg.output_dir) / "teacher-cache" / "+".join(names)


def _teacher_weights(t) -> tuple[Path, dict]:
    if t.run is not None:
        return Path(t.run) / "model.safetensors", {"run_config": (Path(t.run) / "config.yaml").read_text()
                                                   if (Path(t.run) / "config.yaml").is_file() else None}
    w = Path(t.model.weights or "")
    if w.is_dir():
        w = w / "model.safetensors"
    return w, {"arch": t.model.arch, "kwargs": t.model.kwargs}


def fingerprint(cfg: RunConfig, data: DataBundle) -> dict[str, Any]:
    """What the stored outputs depend on.  Hashes the teacher's weight FILE, so checking a
    cache never builds the teacher."""
    import hashlib
    import json

    parts = []
    for source in cfg.teacher.sources:
        weights, spec = _teacher_weights(source)
        if not weights.is_file():
            raise ModelError(f"teacher weights not found at {weights}; train the teacher first (`distillery train ...`)")
        parts.append(sha256_file(weights) + json.dumps(spec, sort_keys=True, default=str))
    if cfg.teacher.ensemble is not None:
        parts.append(f"ensemble:{cfg.teacher.combine}")
    c = cfg.teacher.cache
    teacher = hashlib.sha256("".join(parts).encode()).hexdigest()
    return {
        "teacher": teacher,
        "data": data.fingerprint,
        "augment": cfg.data.augment.model_dump() if c.views > 1 or _augmenting(cfg) else None,
        "views": c.views,
        "topk": c.topk,
        "dtype": c.dtype,
        "seed": c.seed,
        "version": f"distillery-{distillery.__version__}/cache-v1",
    }


def _augmenting(cfg: RunConfig) -> bool:
    a = cfg.data.augment
    return bool(a.pad_crop or a.flip)


def try_open(cfg: RunConfig, data: DataBundle) -> TeacherStore | None:
    """The complete store for this config, ``None`` if there is none; raises
    :class:`StaleCacheError` (naming what changed) if one exists for something else."""
    path = store_path(cfg)
    if not (path / "manifest.json").is_file() and not (path.with_name(path.name + ".old") / "manifest.json").is_file():
        return None
    return TeacherStore(path, expected=fingerprint(cfg, data), in_memory=cfg.teacher.cache.load == "ram")


SHARD_BYTES = 128 * 2**20


def _auto_shard_size(run_teacher, c, n: int) -> int:
    """Rows per shard so that a shard holds about SHARD_BYTES: every batch gathers from each
    shard it touches, so a small store should be one shard (it is deterministic, as a
    resumed build must cut the same shards)."""
    _, logits, feats = run_teacher(torch.arange(1), 0)
    item = 2 if c.dtype == "float16" else 4
    per_view = 6 + (logits.shape[-1] * item if not c.topk else c.topk * (item + 4))
    per_view += sum(f[0].numel() * item for f in feats.values())
    return int(max(256, min(n, SHARD_BYTES // (per_view * c.views))))


def build(cfg: RunConfig, data: DataBundle, teacher: torch.nn.Module, taps: list[str], *,
          accelerator=None, teacher_test_accuracy: float | None = None, show_progress: bool = True) -> TeacherStore:
    """Run ``teacher`` over the training split and write the store (resumable; sharded
    across processes when run under ``accelerate launch``)."""
    from distillery.engine.progress import ProgressBar
    from distillery.models import count_parameters, forward_logits
    from distillery.taps import Taps

    c = cfg.teacher.cache
    if c.views > 1 and not _augmenting(cfg):
        raise CacheError("teacher.cache.views > 1 stores several augmented views, but data.augment is off; "
                         "turn on data.augment (pad_crop / flip) or set views: 1")
    if data.kind != "image" and _augmenting(cfg):
        raise CacheError("augmented views can only be cached for image data")
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    device = accelerator.device if accelerator else torch.device("cpu")
    fp = fingerprint(cfg, data)
    path = store_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    teacher.to(device).eval()
    batch = cfg.data.eval_batch_size

    def run_teacher(rows: torch.Tensor, view: int):
        aug = torch.zeros(len(rows), 3, dtype=torch.int16)
        if _augmenting(cfg):
            g = torch.Generator().manual_seed(hash((c.seed, view, int(rows[0]))) & 0x7FFF_FFFF)
            aug = sample_params(len(rows), cfg.data.augment, g)
        logits, feats = [], {t: [] for t in taps}
        with Taps(teacher, taps) as tp, torch.inference_mode():
            for i in range(0, len(rows), batch):
                part = data.train.take(rows[i:i + batch])
                x = part.inputs
                if _augmenting(cfg):
                    x = apply_params(x, aug[i:i + batch], cfg.data.augment)
                x = {k: v.to(device) for k, v in x.items()} if isinstance(x, dict) else x.to(device)
                logits.append(forward_logits(teacher, x).float().cpu())
                for t, f in tp.collect().items():
                    feats[t].append(f.float().cpu())
        return aug, torch.cat(logits), {t: torch.cat(v) for t, v in feats.items()}

    t0 = time.perf_counter()
    n = len(data.train)
    shard_size = c.shard_size or _auto_shard_size(run_teacher, c, n)
    layout = CacheLayout(views=c.views, topk=c.topk, dtype=c.dtype, taps=list(taps), shard_size=shard_size)
    n_mine = sum(min(shard_size, n - s * shard_size) for s in range(rank, (n + shard_size - 1) // shard_size, world))
    bar = ProgressBar(max(1, n_mine * c.views), enabled=show_progress and rank == 0, title="teacher cache")
    with bar:
        build_store(path, fp, layout, n, data.num_classes, run_teacher, rank=rank, world=world,
                    progress=lambda k: bar.step(loss=float("nan"), samples=k, advance=k))
    if accelerator:
        accelerator.wait_for_everyone()
    if rank == 0:
        finalize_store(path, fp, layout, n, data.num_classes, extra={
            "teacher_test_accuracy": teacher_test_accuracy,
            "teacher_params": count_parameters(teacher),
            "teacher_layers": list(getattr(teacher, "default_feature_layers", []) or []),
            "build_seconds": time.perf_counter() - t0,
            "processes": world,
        })
    if accelerator:
        accelerator.wait_for_everyone()
    return TeacherStore(path, expected=fp, in_memory=c.load == "ram")
