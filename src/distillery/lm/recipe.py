"""Multi-stage LM distillation recipes: a list of stages, each an LM config, each student
starting where the previous one ended (``distillery lm recipe CONFIG``).

    base: {...}                      # fields every stage shares (an LM config, partial)
    stages:
      - name: general                # one LM config's overrides per stage
        hidden: {weight: 1.0}
        loss: {weight: 0.0}
      - name: task
        student: {path: "{stage:general}"}     # the previous stages' exported students
        data: {source: "stdlib:json/*.py"}

``{stage:NAME}`` in any string is replaced by the directory of that (earlier) stage's exported
student, so a stage can start from -- or use as its teacher -- what an earlier stage produced.
Each stage is a normal run (``output_dir/NAME``): checkpointed, resumable, skipped when it has
finished with the same config, so an interrupted recipe resumes at the stage it stopped.

The shipped example, ``configs/lm/ernie_tiny.yaml``, is the progressive schedule of ERNIE-Tiny
(Su et al., 2021, "ERNIE-Tiny: A Progressive Distillation Framework for Pretrained Transformer
Compression"): the teacher moves from pretrained to fine-tuned, the data from general to task,
and the objective from latent (hidden states) to soft labels plus hard labels -- one factor at a
time (General Distillation, General-Enhanced Distillation, Task-Adaptive Distillation,
Task-Specific Distillation).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from distillery.config import apply_overrides
from distillery.errors import ConfigError

_REF = re.compile(r"\{stage:([A-Za-z0-9_.-]+)\}")


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _substitute(node: Any, done: dict[str, Path], stage: str) -> Any:
    if isinstance(node, dict):
        return {k: _substitute(v, done, stage) for k, v in node.items()}
    if isinstance(node, list):
        return [_substitute(v, done, stage) for v in node]
    if isinstance(node, str):
        def repl(m: re.Match) -> str:
            if m.group(1) not in done:
                raise ConfigError(f"stage '{stage}' refers to {{stage:{m.group(1)}}}, which is not an earlier stage "
                                  f"(earlier: {sorted(done) or 'none'})")
            return str(done[m.group(1)])
        return _REF.sub(repl, node)
    return node


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> tuple[dict, list[dict]]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe file not found: {path} (example: configs/lm/ernie_tiny.yaml)")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict) or not isinstance(raw.get("stages"), list) or not raw["stages"]:
        raise ConfigError(f"{path}: a recipe needs `stages:`, a non-empty list of LM config overrides (and optional `base:`)")
    unknown = set(raw) - {"base", "stages"}
    if unknown:
        raise ConfigError(f"{path}: unknown top-level keys {sorted(unknown)}; a recipe has `base` and `stages`")
    names = [s.get("name") for s in raw["stages"] if isinstance(s, dict)]
    if len(names) != len(raw["stages"]) or None in names or len(set(names)) != len(names):
        raise ConfigError(f"{path}: every stage must be a mapping with a unique `name` (got {names})")
    return apply_overrides(raw.get("base") or {}, overrides), raw["stages"]


def stage_configs(base: dict, stages: list[dict], source: str = "") -> list:
    """Validate every stage up front (a typo in stage 4 fails before stage 1 trains)."""
    from distillery.lm.config import lm_config_from_dict

    done: dict[str, Path] = {}
    out = []
    for stage in stages:
        raw = _substitute(_merge(base, stage), done, stage["name"])
        cfg = lm_config_from_dict(raw, source=f"{source} stage '{stage['name']}'")
        out.append(cfg)
        done[stage["name"]] = Path(cfg.output_dir) / cfg.name / "student"
    return out


def run_recipe(path: str | Path, overrides: list[str] | None = None, *, overwrite: bool = False) -> dict[str, dict]:
    from distillery.lm.config import dump_lm_config
    from distillery.lm.trainer import distill_lm

    base, stages = load_recipe(path, overrides)
    summaries = {}
    for cfg in stage_configs(base, stages, str(path)):
        run_dir = Path(cfg.output_dir) / cfg.name
        same = (run_dir / "config.yaml").is_file() and (run_dir / "config.yaml").read_text() == dump_lm_config(cfg)
        if same and (run_dir / "summary.json").is_file() and not overwrite:
            summaries[cfg.name] = json.loads((run_dir / "summary.json").read_text())  # finished earlier
            continue
        resume = same and (run_dir / "checkpoints").is_dir() and not overwrite
        # a directory left by another config is never replaced silently: distill_lm refuses without overwrite
        summaries[cfg.name] = distill_lm(cfg, resume=resume, overwrite=overwrite).summary
    return summaries
