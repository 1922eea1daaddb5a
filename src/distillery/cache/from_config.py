"""``distillery cache build CONFIG``: build (or check) the store a distil config will use.

(Not named ``build.py``: a submodule called ``build`` would shadow :func:`distillery.cache.build`.)
"""
from __future__ import annotations

from pathlib import Path

import torch

from distillery.cache import build, store_path, try_open
from distillery.config import load_config
from distillery.errors import ConfigError


def build_from_config(config: Path, overrides: list[str] | None = None, *, rebuild: bool = False) -> dict:
    """Build the teacher cache for ``config`` (taps chosen by its method).  An existing
    complete store for the same fingerprint is reused; a stale one needs ``rebuild``."""
    from accelerate import Accelerator

    from distillery import methods
    from distillery.data import load_data
    from distillery.engine.trainer import evaluate, load_teacher
    from distillery.models import build_model

    overrides = list(overrides or [])
    cfg = load_config(config, overrides)
    if cfg.teacher is None:
        raise ConfigError(f"{config} has no `teacher:` section: there is nothing to cache")
    if cfg.teacher.cache is None:
        cfg = load_config(config, overrides + ["teacher.cache={}"])
    data = load_data(cfg.data)
    if not rebuild:
        store = try_open(cfg, data)  # a stale store raises, naming what changed
        if store is not None:
            return store.manifest
    accelerator = Accelerator(cpu=cfg.train.cpu or not torch.cuda.is_available())
    teacher = load_teacher(cfg, data).to(accelerator.device)
    spec = methods.get_spec(cfg.method.name)
    student = build_model(cfg.student, in_channels=data.in_channels, num_classes=data.num_classes, input_size=data.input_size)
    method = spec.cls(spec.validate_params(cfg.method.params), student=student,
                      teacher_layers=list(getattr(teacher, "default_feature_layers", []) or []), num_classes=data.num_classes)
    acc = evaluate(teacher, data.test, accelerator.device, cfg.data.eval_batch_size)["accuracy"]
    store = build(cfg, data, teacher, method.teacher_taps, accelerator=accelerator, teacher_test_accuracy=acc,
                  show_progress=cfg.train.progress)
    return store.manifest


__all__ = ["build_from_config", "store_path"]
