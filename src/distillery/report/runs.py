"""Reading finished run directories back: config, summary, per-epoch metrics, the student.

A finished run (written by :func:`distillery.engine.fit`) holds ``config.yaml``,
``summary.json``, ``model.safetensors`` and ``metrics.jsonl``.  Everything in
:mod:`distillery.report` and :mod:`distillery.export` starts from :func:`load_run`, so a
directory that is not a finished run fails here, once, with a message that says what is
missing and how to produce it.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from distillery.config import RunConfig, load_config
from distillery.data import DataBundle
from distillery.errors import DistilleryError, ModelError

#: Files without which a directory is not a finished run (metrics.jsonl is optional: the
#: report notes its absence instead of failing).
REQUIRED_FILES = ("config.yaml", "summary.json", "model.safetensors")


@dataclass
class Run:
    """A finished run directory, read back."""

    dir: Path
    config: RunConfig
    summary: dict[str, Any]
    metrics: list[dict[str, Any]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def weights(self) -> Path:
        return self.dir / "model.safetensors"

    @property
    def test_accuracy(self) -> float | None:
        return finite(self.summary.get("test_accuracy"))


def finite(value: Any) -> float | None:
    """``value`` as a float, or ``None`` when it is missing, NaN or infinite (JSON has no NaN
    in the strict sense, and a run without a validation split records NaN)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def is_run_dir(path: Path) -> bool:
    """True for a directory that holds every file of a finished run."""
    return path.is_dir() and all((path / f).is_file() for f in REQUIRED_FILES)


def load_run(run_dir: str | Path) -> Run:
    """Read a finished run directory; raise :class:`DistilleryError` naming what is missing."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DistilleryError(
            f"{run_dir} is not a directory; give a run directory written by `distillery train` or "
            f"`distillery distill` (output_dir/name, e.g. runs/kd-cnn8)"
        )
    missing = [f for f in REQUIRED_FILES if not (run_dir / f).is_file()]
    if missing:
        if (run_dir / "checkpoints").is_dir():
            how = "it looks interrupted (it has checkpoints/): finish it with the same command plus --resume"
        elif (run_dir / "config.yaml").is_file():
            how = "it has not finished training: wait for it, or rerun it with `distillery train|distill CONFIG`"
        else:
            how = "produce one with `distillery train CONFIG` or `distillery distill CONFIG`"
        raise DistilleryError(f"{run_dir} is not a finished run: missing {', '.join(missing)}; {how}")
    cfg = load_config(run_dir / "config.yaml")
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except json.JSONDecodeError as err:
        raise DistilleryError(f"{run_dir / 'summary.json'} is not valid JSON ({err}); rerun the run with --overwrite") from None
    metrics = []
    metrics_path = run_dir / "metrics.jsonl"
    if metrics_path.is_file():
        for line in metrics_path.read_text().splitlines():
            if line.strip():
                try:
                    metrics.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash: keep the epochs that were written
    return Run(run_dir, cfg, summary, metrics)


def find_runs(paths: list[str | Path] | tuple[str | Path, ...]) -> list[Run]:
    """Runs named by ``paths``: each is a run directory, or a directory whose sub-directories
    are runs (unfinished ones there are skipped).  A path that is neither is an error."""
    runs: list[Run] = []
    for p in map(Path, paths):
        if is_run_dir(p) or (p / "config.yaml").is_file():
            runs.append(load_run(p))  # a single run: unfinished is an error worth reporting
            continue
        children = sorted(c for c in p.iterdir() if is_run_dir(c)) if p.is_dir() else []
        if not children:
            raise DistilleryError(
                f"{p} is neither a finished run nor a directory of runs (no sub-directory holds "
                f"{', '.join(REQUIRED_FILES)}); train some with `distillery train|distill CONFIG`"
            )
        runs.extend(load_run(c) for c in children)
    return runs


def build_student(run: Run, data: DataBundle) -> nn.Module:
    """The run's trained student, rebuilt from its config and ``model.safetensors``, in eval mode."""
    from distillery.models import build_model

    if run.config.student.arch.startswith("python:"):
        raise ModelError(
            f"{run.dir}: the student was a Python nn.Module ({run.config.student.arch[7:]}) passed to the API, "
            "which config.yaml cannot rebuild; register it (distillery.models.register_model) or give an "
            "import path 'pkg.module:factory' as the model"
        )
    spec = run.config.student.model_copy(update={"weights": str(run.weights)})
    model = build_model(spec, in_channels=data.in_channels, num_classes=data.num_classes, input_size=data.input_size)
    return model.eval()


def describe_model(spec) -> str:
    """A short label for a model spec: ``cnn(width=8)``, ``mlp(hidden=[32])``, ``hf:dir``."""
    if not spec.kwargs:
        return spec.arch
    args = ", ".join(f"{k}={v}" for k, v in spec.kwargs.items())
    return f"{spec.arch}({args})"
