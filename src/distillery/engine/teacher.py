"""Where the teacher's outputs come from: the model run online, or a teacher-output cache.

Both give the engine the same thing per training batch -- the (possibly augmented) inputs the
student must see and the teacher's outputs on exactly those inputs -- so the loop and the
methods cannot tell them apart.  Augmentation lives here because the view and the teacher's
answer must match: online, the view is drawn and the teacher runs on it; from a cache, the
stored view parameters are replayed and the stored answer read.
"""
from __future__ import annotations

import torch
from torch import nn

from distillery.config import AugmentConfig
from distillery.data.augment import apply_params, sample_params
from distillery.methods.base import ModelOutput
from distillery.models import forward_logits
from distillery.taps import Taps


def _seeded(*parts: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(hash(tuple(parts)) & 0x7FFF_FFFF_FFFF_FFFF)
    return g


def _augmenting(aug: AugmentConfig) -> bool:
    return bool(aug.pad_crop or aug.flip)


class OnlineTeacher:
    """No teacher (``model is None``: baselines) or a frozen teacher run under inference mode."""

    def __init__(self, model: nn.Module | None, taps: list[str], augment: AugmentConfig, seed: int, image_data: bool):
        self.model, self.augment, self.seed = model, augment, seed
        self.augmenting = image_data and _augmenting(augment)
        self._taps = Taps(model, taps) if model is not None and taps else None

    def __enter__(self):
        if self._taps:
            self._taps.__enter__()
        return self

    def __exit__(self, *exc):
        if self._taps:
            self._taps.__exit__(*exc)

    def outputs(self, x, grad: bool = False) -> ModelOutput | None:
        if self.model is None:
            return None
        if grad:  # the weights have requires_grad=False: only x receives gradients
            logits = forward_logits(self.model, x)
            return ModelOutput(logits, self._taps.collect() if self._taps else {})
        with torch.inference_mode():
            logits = forward_logits(self.model, x)
            feats = self._taps.collect() if self._taps else {}
        # Inference tensors cannot be saved for backward: clone them out of inference mode.
        return ModelOutput(logits.clone(), {k: v.clone() for k, v in feats.items()})

    def batch(self, x, rows: torch.Tensor, step: int, device) -> tuple[object, ModelOutput | None]:
        if self.augmenting:
            x = apply_params(x, sample_params(len(rows), self.augment, _seeded(self.seed, step, 1)), self.augment)
        x = {k: v.to(device) for k, v in x.items()} if isinstance(x, dict) else x.to(device)
        return x, self.outputs(x)


class CachedTeacher:
    """Reads a :class:`~distillery.cache.TeacherStore`; picks one of its ``views`` per sample
    (seeded by step) and replays that view's augmentation on the inputs."""

    def __init__(self, store, augment: AugmentConfig, seed: int, image_data: bool):
        self.store, self.augment, self.seed = store, augment, seed
        self.augmenting = image_data and _augmenting(augment)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def batch(self, x, rows: torch.Tensor, step: int, device) -> tuple[object, ModelOutput]:
        views = torch.randint(self.store.views, (len(rows),), generator=_seeded(self.seed, step, 2))
        if self.augmenting:
            x = apply_params(x, self.store.aug(rows, views), self.augment)
        x = {k: v.to(device) for k, v in x.items()} if isinstance(x, dict) else x.to(device)
        feats = {k: v.to(device) for k, v in self.store.features(rows, views).items()}
        return x, ModelOutput(self.store.logits(rows, views).to(device), feats)
