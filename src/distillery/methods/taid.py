"""TAID: distil towards an interpolation of student and teacher that moves with an adaptive t.

Shing et al. (2025), "TAID: Temporally Adaptive Interpolated Distillation for Efficient
Knowledge Transfer in Language Models", ICLR. The loss KL(p_t || q) with
p_t = softmax((1 - t) sg(z_s) + t z_t) is :func:`distillery.losses.taid.taid_loss`; t follows
the paper's adaptive rule (Algorithm 1, :class:`distillery.losses.taid.TAIDSchedule`),
updated once per training step with that step's TAID loss.

The schedule's state (t, the momentum m and the previous loss J_{n-1}) lives in buffers of this
module, so it is saved in checkpoints with the student and a resumed run continues with the
same t. Each call reads the state from the buffers, runs one ``TAIDSchedule.update`` and writes
it back; the update happens only in training mode. Under data-parallel training the buffers are
broadcast from the first process, so its losses drive t.

Labels: TAID itself has no label term (the paper distils language models); with labels at hand
we mix ``(1 - weight) * CE``, as for KD. ``weight = 1`` is the paper's objective.
"""
from __future__ import annotations

import math

import torch
from pydantic import Field, model_validator

from distillery.losses import logits as L
from distillery.losses.taid import TAIDSchedule, taid_loss
from distillery.methods import register
from distillery.methods.base import Method, Params, Progress


class TAIDParams(Params):
    t_start: float = Field(0.4, ge=0, le=1, description="Initial interpolation t (and start of the linear lower bound); paper: 0.4.")
    t_end: float = Field(1.0, ge=0, le=1, description="Final t, reached at the latest at the end of training; paper: 1.0.")
    alpha: float = Field(5e-3, ge=0, le=1, description="Step size of the adaptive increment alpha*sigmoid(m)*(1-t). The paper uses 5e-4 "
                                                      "for runs of thousands of steps; 5e-3 lets the adaptive part matter in ~300-step runs.")
    beta: float = Field(0.99, ge=0, le=1, description="Momentum of the relative loss change (paper: 0.99).")
    weight: float = Field(0.9, ge=0, le=1, description="Weight of the TAID term; labels get 1 - weight (1 = the paper's objective).")

    @model_validator(mode="after")
    def _order(self) -> "TAIDParams":
        if self.t_start > self.t_end:
            raise ValueError(f"t_start ({self.t_start}) must be <= t_end ({self.t_end})")
        return self


@register("taid", params=TAIDParams,
          paper="Shing et al. 2025, TAID: Temporally Adaptive Interpolated Distillation for Efficient Knowledge Transfer in Language Models")
class TAID(Method):
    """TAID: KL towards softmax((1-t) sg(z_s) + t z_t), with t raised adaptively from t_start to t_end."""

    def __init__(self, params: TAIDParams, *, student, teacher_layers, num_classes):
        super().__init__(params, student=student, teacher_layers=teacher_layers, num_classes=num_classes)
        # float64 so the schedule's Python-float arithmetic round-trips exactly through a checkpoint
        self.register_buffer("t", torch.tensor(params.t_start, dtype=torch.float64))
        self.register_buffer("momentum", torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("prev_loss", torch.tensor(math.nan, dtype=torch.float64))  # NaN: no step yet

    def schedule(self) -> TAIDSchedule:
        """The schedule with the state held in the buffers."""
        p = self.params
        sched = TAIDSchedule(t_start=p.t_start, t_end=p.t_end, alpha=p.alpha, beta=p.beta)
        prev = float(self.prev_loss)
        sched.load_state_dict({**sched.state_dict(), "t": float(self.t), "momentum": float(self.momentum),
                               "prev_loss": None if math.isnan(prev) else prev})
        return sched

    def forward(self, student_out, teacher_out, targets, progress: Progress):
        p = self.params
        sched = self.schedule()
        value = taid_loss(student_out.logits, teacher_out.logits, targets, t=sched.t)
        if self.training:
            sched.update(float(value.detach()), min(max(progress.fraction, 0.0), 1.0))
            self.t.fill_(sched.t)
            self.momentum.fill_(sched.momentum)
            self.prev_loss.fill_(sched.prev_loss)
        terms = {"taid": p.weight * value}
        if p.weight < 1:
            terms["ce"] = (1 - p.weight) * L.cross_entropy(student_out.logits, None, targets)
        return terms

    def log_values(self) -> dict[str, float]:
        return {"t": float(self.t)}
