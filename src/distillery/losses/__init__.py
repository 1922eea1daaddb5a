"""Distillation losses: pure functions of tensors, plus a small registry of the logit losses.

    from distillery import losses
    loss_fn = losses.get("kd", temperature=2.0)      # params checked here, not at step 1000
    value = loss_fn(student_logits, teacher_logits)  # targets=... for ce / dkd / nkd

Every registered loss is called as ``loss_fn(student_logits, teacher_logits, targets=None)``
and returns a scalar tensor; see ``distillery.losses.logits`` for the shared conventions.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch
from torch import Tensor

from distillery.errors import ConfigError
from distillery.losses.dhkd import binary_kl, binary_kl_norm
from distillery.losses.lm import chunked_token_loss, skew_kl, skew_reverse_kl, uld
from distillery.losses.multilabel import binary_cross_entropy, binary_kd
from distillery.losses.sinkhorn import sinkhorn_distance, sinkhorn_kd
from distillery.losses.swing import swing_kd
from distillery.losses.taid import TAIDSchedule, taid_loss
from distillery.losses.features import attention_map, attention_transfer, hint_mse
from distillery.losses.logits import (
    IGNORE_INDEX,
    bdkd,
    cross_entropy,
    dkd,
    forward_kl,
    jsd,
    kd,
    nckd_per_position,
    nkd,
    reverse_kl,
    tckd_per_position,
    total_variation,
)

__all__ = [
    "binary_cross_entropy",
    "binary_kd",
    "binary_kl",
    "binary_kl_norm",
    "chunked_token_loss",
    "skew_kl",
    "skew_reverse_kl",
    "uld",
    "swing_kd",
    "TAIDSchedule",
    "sinkhorn_distance",
    "sinkhorn_kd",
    "taid_loss",
    "IGNORE_INDEX",
    "LossConfigError",
    "attention_map",
    "attention_transfer",
    "available",
    "bdkd",
    "cross_entropy",
    "dkd",
    "forward_kl",
    "get",
    "hint_mse",
    "jsd",
    "kd",
    "nckd_per_position",
    "needs_targets",
    "nkd",
    "reverse_kl",
    "tckd_per_position",
    "total_variation",
]

LossFn = Callable[..., Tensor]


class LossConfigError(ConfigError, ValueError):
    """Unknown loss name or bad loss parameter (a ValueError, shown by the CLI as one message)."""


# name -> (function, needs targets)
_REGISTRY: dict[str, tuple[LossFn, bool]] = {
    "ce": (cross_entropy, True),
    "kd": (kd, False),
    "forward_kl": (forward_kl, False),
    "reverse_kl": (reverse_kl, False),
    "jsd": (jsd, False),
    "dkd": (dkd, True),
    "nkd": (nkd, True),
    "bdkd": (bdkd, False),
    "tv": (total_variation, False),
    "taid": (taid_loss, False),
    "sinkhorn": (sinkhorn_kd, False),
    "skew_kl": (skew_kl, False),
    "skew_reverse_kl": (skew_reverse_kl, False),
    "uld": (uld, False),
    "swing": (swing_kd, False),
    "binary_kd": (binary_kd, False),
    "binary_kl": (binary_kl, False),
    "binary_kl_norm": (binary_kl_norm, False),
}


def _lookup(name: str) -> tuple[LossFn, bool]:
    if name not in _REGISTRY:
        raise LossConfigError(f"unknown loss {name!r}; available: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def _params_with_defaults(fn: LossFn) -> dict[str, object]:
    """The keyword-only hyper-parameters of a loss and their defaults."""
    return {
        p.name: p.default
        for p in inspect.signature(fn).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }


def available() -> dict[str, str]:
    """Registered logit losses: name -> first line of the function's docstring."""
    return {name: (fn.__doc__ or "").strip().splitlines()[0] for name, (fn, _) in _REGISTRY.items()}


def needs_targets(name: str) -> bool:
    """Whether the loss needs ground-truth class ids (ce, dkd, nkd)."""
    return _lookup(name)[1]


def get(name: str, **params: object) -> LossFn:
    """Return ``loss_fn(student_logits, teacher_logits, targets=None) -> scalar`` with params bound.

    Raises LossConfigError (a ValueError) for an unknown name, an unknown parameter (the
    message lists the allowed ones with defaults) or a bad parameter value.
    """
    fn, _ = _lookup(name)
    allowed = _params_with_defaults(fn)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        listing = ", ".join(f"{k}={v!r}" for k, v in allowed.items()) or "none"
        raise LossConfigError(
            f"loss {name!r} got unknown parameter(s) {', '.join(unknown)}; allowed: {listing}"
        )
    # Value checks live in the loss functions themselves; running the loss once on a tiny input
    # reuses them, so a bad value (temperature=0, beta=2, ...) fails here instead of mid-training.
    probe_logits = torch.zeros(1, 3, dtype=torch.float64)
    probe_targets = torch.zeros(1, dtype=torch.long)
    try:
        fn(probe_logits, probe_logits, probe_targets, **params)
    except ValueError as err:
        raise LossConfigError(f"loss {name!r}: {err}") from err

    def loss_fn(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor | None = None) -> Tensor:
        # losses that need targets raise a ValueError themselves when targets is None
        return fn(student_logits, teacher_logits, targets, **params)

    loss_fn.__name__ = name
    loss_fn.__qualname__ = f"get({name!r})"
    loss_fn.__doc__ = fn.__doc__
    return loss_fn
