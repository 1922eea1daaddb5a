"""The Python API: the same runs as the CLI, one call each.

    import distillery
    teacher = distillery.train(model="cnn", data="fashion_mnist", epochs=2, name="teacher")
    result = distillery.distill(teacher="runs/teacher", student="mlp", method="kd", epochs=5)
    print(result.summary["test_accuracy"])

Models may be zoo names, ``{"arch": ..., "kwargs": ...}`` dicts, or ``nn.Module`` instances;
data may be a source name, a ``DataConfig``-shaped dict, or a loaded ``DataBundle``.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from distillery.config import RunConfig, config_from_dict
from distillery.data import DataBundle
from distillery.engine import RunResult, fit


def _model_entry(model) -> tuple[dict, nn.Module | None]:
    if isinstance(model, nn.Module):
        return {"arch": f"python:{type(model).__name__}"}, model
    if isinstance(model, str):
        return {"arch": model}, None
    return dict(model), None


def _build(student, data, method, params, teacher, name, output_dir, train, data_options) -> tuple[RunConfig, dict]:
    s_entry, s_module = _model_entry(student)
    raw: dict[str, Any] = {"name": name, "output_dir": output_dir, "student": s_entry,
                           "method": {"name": method, "params": params or {}}, "train": train}
    bundle = data if isinstance(data, DataBundle) else None
    if bundle is None:
        raw["data"] = {"name": data, **data_options} if isinstance(data, str) else {**dict(data), **data_options}
    elif data_options:
        raw["data"] = data_options
    t_module = None
    if teacher is not None:
        if isinstance(teacher, str):
            raw["teacher"] = {"run": teacher}
        else:
            t_entry, t_module = _model_entry(teacher)
            raw["teacher"] = {"model": t_entry}
    cfg = config_from_dict(raw, source="(python call)")
    return cfg, {"data": bundle, "student": s_module, "teacher": t_module}


def distill(*, teacher, student, data="fashion_mnist", method: str = "kd", params: dict | None = None,
            name: str = "distill", output_dir: str = "runs", overwrite: bool = False, resume: bool = False,
            data_options: dict | None = None, **train) -> RunResult:
    """Distil ``teacher`` into ``student``; keyword arguments beyond these go to ``train`` config
    (``epochs=5``, ``seed=1``, ``optimizer={"lr": 3e-3}``, ...)."""
    cfg, objs = _build(student, data, method, params, teacher, name, output_dir, train, data_options or {})
    return fit(cfg, overwrite=overwrite, resume=resume, **objs)


def train(*, model, data="fashion_mnist", name: str = "train", output_dir: str = "runs", overwrite: bool = False,
          resume: bool = False, params: dict | None = None, data_options: dict | None = None, **train) -> RunResult:
    """Train a model from scratch on labels (a teacher, or the baseline a student is compared with)."""
    cfg, objs = _build(model, data, "ce", params, None, name, output_dir, train, data_options or {})
    return fit(cfg, overwrite=overwrite, resume=resume, **objs)
