"""Where the teacher's outputs come from: the model run online, or a teacher-output cache.

Both give the engine the same thing per training batch -- the (possibly augmented) inputs the
student must see and the teacher's outputs on exactly those inputs -- so the loop and the
methods cannot tell them apart.  Augmentation lives here because the view and the teacher's
answer must match: online, the view is drawn and the teacher runs on it; from a cache, the
stored view parameters are replayed and the stored answer read.
"""
from __future__ import annotations

from contextlib import ExitStack

import torch
from torch import nn

from distillery.config import AugmentConfig
from distillery.data.augment import apply_params, sample_params
from distillery.methods.base import ModelOutput
from distillery.models import forward_logits
from distillery.taps import StopForward, Taps, edits


def _seeded(*parts: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(hash(tuple(parts)) & 0x7FFF_FFFF_FFFF_FFFF)
    return g


def _augmenting(aug: AugmentConfig) -> bool:
    return bool(aug.pad_crop or aug.flip)


class OnlineTeacher:
    """No teacher (``model is None``: baselines) or a frozen teacher run under inference mode."""

    def __init__(self, model: nn.Module | None, taps: list[str], augment: AugmentConfig, seed: int, image_data: bool,
                 on_batch: bool = True):
        # on_batch=False: the method runs the teacher itself (``teacher_forward``) on inputs it
        # makes, so the teacher is not run on the plain batch at all -- its cost is only what the
        # method asks for.
        self.model, self.augment, self.seed, self.on_batch = model, augment, seed, on_batch
        self.augmenting = image_data and _augmenting(augment)
        self._taps = Taps(model, taps) if model is not None and taps else None

    def __enter__(self):
        if self._taps:
            self._taps.__enter__()
        return self

    def __exit__(self, *exc):
        if self._taps:
            self._taps.__exit__(*exc)

    def outputs(self, x, grad: bool = False, *, until_taps: bool = False,
                keep: tuple[str, torch.Tensor] | None = None, replace: dict | None = None) -> ModelOutput | None:
        """The teacher on ``x``; ``until_taps``: stop once every tap has fired (no logits);
        ``keep`` / ``replace``: token selection and output substitution, see :func:`distillery.taps.edits`."""
        if self.model is None:
            return None
        if until_taps and not self._taps:
            raise ValueError("teacher_forward(until_taps=True) needs teacher taps: the method declares none")
        with ExitStack() as stack:
            for edit in edits(self.model, keep, replace):
                stack.enter_context(edit)
            if not grad:  # the weights have requires_grad=False: with grad, only x receives gradients
                stack.enter_context(torch.inference_mode())
            if self._taps:
                self._taps.clear()
                self._taps.stop_when_complete = until_taps
            try:
                logits = forward_logits(self.model, x)
            except StopForward:
                logits = None
            finally:
                if self._taps:
                    self._taps.stop_when_complete = False
            feats = self._taps.collect() if self._taps else {}
        if grad:
            return ModelOutput(logits, feats)
        # Inference tensors cannot be saved for backward: clone them out of inference mode.
        return ModelOutput(None if logits is None else logits.clone(), {k: v.clone() for k, v in feats.items()})

    def batch(self, x, rows: torch.Tensor, step: int, device) -> tuple[object, ModelOutput | None]:
        if self.augmenting:
            x = apply_params(x, sample_params(len(rows), self.augment, _seeded(self.seed, step, 1)), self.augment)
        x = {k: v.to(device) for k, v in x.items()} if isinstance(x, dict) else x.to(device)
        return x, (self.outputs(x) if self.on_batch else None)


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
