"""TAID: Temporally Adaptive Interpolated Distillation, as a pure loss function plus its t schedule.

Shing, Misaki, Bao, Yokoi, Akiba (2025), "TAID: Temporally Adaptive Interpolated Distillation
for Efficient Knowledge Transfer in Language Models", ICLR 2025 (arXiv:2501.16937). Official
code: SakanaAI/TAID, ``src/distil_losses/taid.py``.

The loss follows the conventions of ``distillery.losses.logits`` (class dim last, any leading
dims, half inputs upcast to float32, mean over positions, ``-100`` targets left out).

Equations implemented (symbols as in the paper; z = logits, sg = stop-gradient):

* Interpolated target (the paper's time-dependent intermediate distribution p_t, defined by
  interpolating LOGITS, not probabilities or log-probabilities; the official code does
  ``softmax((1 - t) * logits.detach() + t * teacher_logits)``)::

      p_t = softmax((1 - t) * sg(z_s) + t * z_t)

* TAID objective: J_TAID^(t) = KL(p_t || q_theta) with q_theta = softmax(z_s).

* Adaptive update of t (the paper's Algorithm 1; identical to ``TAID.update_t`` in the official
  code), applied once per training step n with the current loss value J_n::

      delta_n  = (J_{n-1} - J_n) / (J_{n-1} + 1e-15)           relative loss decrease
      m_n      = beta * m_{n-1} + (1 - beta) * delta_n          momentum
      dt_n     = alpha * sigmoid(m_n) * (1 - t_n)               adaptive increment
      t_lin    = t_start + (t_end - t_start) * progress         linear lower bound
      t_{n+1}  = min(t_end, max(t_lin, t_n + dt_n))

  with progress = step / total_steps in [0, 1] and m_0 = 0. The first call only records J_0.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

from distillery.losses.logits import (
    _check_number,
    _check_pair,
    _check_targets,
    _kl,
    _mean_over_positions,
    _upcast,
)

__all__ = ["TAIDSchedule", "taid_loss"]


def taid_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor | None = None,
    *,
    t: float,
) -> Tensor:
    """TAID loss KL(p_t || q_theta), p_t = softmax((1 - t) * sg(z_s) + t * z_t).

    Shing et al. (2025), "TAID: Temporally Adaptive Interpolated Distillation for Efficient
    Knowledge Transfer in Language Models", ICLR 2025: the intermediate distribution p_t
    interpolates the detached student logits and the teacher logits (logit space, as in the
    paper's definition and the official SakanaAI/TAID code), and the student q_theta =
    softmax(z_s) is trained with forward KL towards it.

    * t = 1: p_t = softmax(z_t), so the value equals ``forward_kl`` (temperature 1) exactly.
    * t = 0: p_t = softmax(sg(z_s)) = q_theta, so the value is 0 (and so is the student
      gradient q_theta - p_t).
    * Gradients reach the student only through q_theta (the student's copy inside p_t is
      detached). The teacher logits are NOT detached (repo convention): at t > 0 a gradient
      reaches them through p_t, scaled by t; detach the teacher yourself for offline KD.

    Difference from the official code: the official loss value is the cross-entropy
    -sum p_t log q_theta (its ``forward_kl`` helper), which differs from this KL by the
    entropy H(p_t); H(p_t) does not depend on the student's gradient path (sg), so the student
    gradients are identical. ``t`` is a plain float from ``TAIDSchedule.t``; no temperature is
    used (the paper uses none).
    """
    _check_pair(student_logits, teacher_logits)
    _check_targets(targets, student_logits, "taid", required=False)
    _check_number("t", t)
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"t must be in [0, 1], got {t}")
    z_s = _upcast(student_logits)
    z_t = _upcast(teacher_logits)
    if t == 1.0:
        interpolated = z_t  # skip 0 * z_s: exact forward KL, and no 0 * inf if z_s has inf
    else:
        interpolated = (1.0 - t) * z_s.detach() + t * z_t
    log_p_t = F.log_softmax(interpolated, dim=-1)
    log_q = F.log_softmax(z_s, dim=-1)
    return _mean_over_positions(_kl(log_p_t, log_q), targets)


class TAIDSchedule:
    """The adaptive interpolation parameter t of TAID (the paper's Algorithm 1).

    ``TAIDSchedule(t_start=0.4, t_end=1.0, alpha=5e-4, beta=0.99)`` (the paper's / official
    code's defaults). Call ``update(loss_value, progress)`` once per optimisation step with the
    TAID loss value of that step (a float, e.g. ``loss.item()``) and the training progress
    ``step / total_steps`` in [0, 1]; it returns the new ``t`` for the next step::

        delta_n  = (J_{n-1} - J_n) / (J_{n-1} + 1e-15)
        m_n      = beta * m_{n-1} + (1 - beta) * delta_n
        t_{n+1}  = min(t_end, max(t_start + (t_end - t_start) * progress,
                                  t_n + alpha * sigmoid(m_n) * (1 - t_n)))

    The first call has no previous loss: it only records J_0 (as the official code does) and,
    our addition, applies the same [linear lower bound, t_end] clamp to t (a no-op at
    progress 0). Since alpha * sigmoid(m) * (1 - t) >= 0, t never decreases while progress
    does not decrease, whatever the losses do; falling losses (delta > 0) raise m and so the
    increment. ``state_dict()`` / ``load_state_dict()`` hold plain floats (``prev_loss`` is
    None before the first update) so the schedule can be checkpointed with the trainer.
    """

    def __init__(
        self, t_start: float = 0.4, t_end: float = 1.0, alpha: float = 5e-4, beta: float = 0.99
    ) -> None:
        for name, value in (("t_start", t_start), ("t_end", t_end), ("alpha", alpha), ("beta", beta)):
            _check_number(name, value)
        if not 0.0 <= t_start <= t_end <= 1.0:
            raise ValueError(f"need 0 <= t_start <= t_end <= 1, got t_start={t_start}, t_end={t_end}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        self.t_start = float(t_start)
        self.t_end = float(t_end)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.t = float(t_start)
        self.momentum = 0.0
        self.prev_loss: float | None = None

    def lower_bound(self, progress: float) -> float:
        """The linear schedule t_start + (t_end - t_start) * progress."""
        return self.t_start + (self.t_end - self.t_start) * progress

    def update(self, loss_value: float, progress: float) -> float:
        loss_value = float(loss_value.item() if isinstance(loss_value, Tensor) else loss_value)
        _check_number("loss_value", loss_value)
        _check_number("progress", progress)
        if not 0.0 <= progress <= 1.0:
            raise ValueError(f"progress must be in [0, 1] (step / total_steps), got {progress}")
        t_linear = self.lower_bound(progress)
        if self.prev_loss is None:
            self.prev_loss = loss_value
            self.t = min(self.t_end, max(t_linear, self.t))
            return self.t
        relative_change = (self.prev_loss - loss_value) / (self.prev_loss + 1e-15)
        self.momentum = self.beta * self.momentum + (1.0 - self.beta) * relative_change
        sigmoid = 1.0 / (1.0 + math.exp(-self.momentum)) if self.momentum > -700 else 0.0
        delta_t = self.alpha * sigmoid * (1.0 - self.t)
        self.t = min(self.t_end, max(t_linear, self.t + delta_t))
        self.prev_loss = loss_value
        return self.t

    def state_dict(self) -> dict[str, float | None]:
        return {
            "t_start": self.t_start,
            "t_end": self.t_end,
            "alpha": self.alpha,
            "beta": self.beta,
            "t": self.t,
            "momentum": self.momentum,
            "prev_loss": self.prev_loss,
        }

    def load_state_dict(self, state: dict[str, float | None]) -> None:
        missing = {"t_start", "t_end", "alpha", "beta", "t", "momentum", "prev_loss"} - set(state)
        if missing:
            raise ValueError(f"TAIDSchedule state is missing {sorted(missing)}")
        self.t_start = float(state["t_start"])
        self.t_end = float(state["t_end"])
        self.alpha = float(state["alpha"])
        self.beta = float(state["beta"])
        self.t = float(state["t"])
        self.momentum = float(state["momentum"])
        prev = state["prev_loss"]
        self.prev_loss = None if prev is None else float(prev)

    def __repr__(self) -> str:
        return (
            f"TAIDSchedule(t_start={self.t_start}, t_end={self.t_end}, alpha={self.alpha}, "
            f"beta={self.beta}; t={self.t:.6g})"
        )
