"""MI-alpha: maximise a variational lower bound on the mutual information between the student's
and the teacher's intermediate representations, plus label CE and KD.

He, Shi, Mueller, Zha, Li, Karypis (2021), "Distiller: A Systematic Study of Model Distillation
Methods in Natural Language Processing" (arXiv 2109.11105).  The bound is the alpha-interpolated
bound of Poole et al. (2019) (:func:`distillery.losses.mi_alpha.interpolated_mi_bound`): alpha = 1
is InfoNCE, alpha = 0 is NWJ/TUBA.  The critic is separable, as the MLP critic of Distiller's code
and Poole et al.'s ``SeparableCritic``: ``f(s, t) = g(s) . h(t)``, two MLPs that embed the
student's and the teacher's features into a shared space of ``embed_dim`` (they are also the
width projectors, so any two widths pair).  The single-sample baseline a(t) is learned by a third
MLP on the teacher's feature (``baseline: learned``, as Distiller's ``baseline_fn``) or is the
constant e (``baseline: constant``; alpha = 0 is then exactly NWJ).  Critic and baseline belong to
the method: trained with the student and checkpointed, never exported.

Features: by default the penultimate feature of each model (``head:input`` of zoo models); a map
or a token sequence is reduced to one vector per sample by averaging over space / tokens.  The
paper taps transformer layers; any module path works here.

Deviations, and why:
* A batch of fewer than 2 samples (a ragged last batch) has no negatives: the MI term is 0 for it.
* Defaults (alpha 0.9, embed 64, hidden 256) are ours: the paper's search ranges could not be read
  offline; Poole et al.'s demo critic uses hidden 256 and embedding 32.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from distillery.losses import logits as L
from distillery.losses.mi_alpha import interpolated_mi_bound
from distillery.methods import register
from distillery.methods.base import Method, Params
from distillery.methods.relation import embedding


class MIAlphaParams(Params):
    student_feature: str = Field("head:input", description="Student tap (module path; ':input' taps a module's input).")
    teacher_feature: str = Field("head:input", description="Teacher tap.")
    alpha: float = Field(0.9, ge=0, le=1, description="Interpolation of the bound: 1 = InfoNCE, 0 = NWJ/TUBA.")
    baseline: Literal["learned", "constant"] = Field(
        "learned", description="Single-sample baseline a(t): an MLP on the teacher feature, or the constant e (log a = 1).")
    embed_dim: int = Field(64, ge=1, description="Width of the critic's shared embedding.")
    hidden_dim: int = Field(256, ge=1, description="Hidden width of the critic and baseline MLPs.")
    mi_weight: float = Field(1.0, ge=0, description="Weight of -I_alpha in the loss.")
    ce_weight: float = Field(1.0, ge=0, description="Weight of the label cross-entropy.")
    kd_weight: float = Field(1.0, ge=0, description="Weight of the Hinton KD term (0 = off).")
    temperature: float = Field(4.0, gt=0, description="KD temperature.")


def _mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out))


@register("mi_alpha", params=MIAlphaParams,
          paper="He et al. 2021, Distiller: A Systematic Study of Model Distillation Methods in NLP (MI-alpha)")
class MIAlpha(Method):
    """MI-alpha: maximise the alpha-interpolated MI lower bound between student and teacher features (learned critic)."""

    def __init__(self, params: MIAlphaParams, *, student, teacher_layers, num_classes):
        super().__init__(params, student=student, teacher_layers=teacher_layers, num_classes=num_classes)
        self.student_taps = [params.student_feature]
        self.teacher_taps = [params.teacher_feature]
        # Built in setup, once the widths are known.
        self.critic_s: nn.Module = nn.Identity()
        self.critic_t: nn.Module = nn.Identity()
        self.baseline_fn: nn.Module | None = None

    def _vectors(self, student_out, teacher_out) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.params
        s = embedding(student_out.features[p.student_feature], "pool")
        t = embedding(teacher_out.features[p.teacher_feature], "pool").to(s.dtype)
        if s.shape[0] != t.shape[0]:
            raise ValueError(f"student and teacher features hold different batch sizes ({s.shape[0]} vs {t.shape[0]}); "
                             "tap layers whose first dimension is the batch")
        return s, t

    def setup(self, student_out, teacher_out):
        p = self.params
        s, t = self._vectors(student_out, teacher_out)
        self.critic_s = _mlp(s.shape[1], p.hidden_dim, p.embed_dim)
        self.critic_t = _mlp(t.shape[1], p.hidden_dim, p.embed_dim)
        if p.baseline == "learned":
            self.baseline_fn = _mlp(t.shape[1], p.hidden_dim, 1)

    def scores(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """(B, B) critic matrix, ``[i, j] = f(s_j, t_i)``: rows are the teacher side (the variable
        the baseline depends on), positives on the diagonal."""
        return self.critic_t(t) @ self.critic_s(s).T

    def mi_bound(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        log_baseline = self.baseline_fn(t).squeeze(1) if self.baseline_fn is not None else 1.0
        return interpolated_mi_bound(self.scores(s, t), alpha=self.params.alpha, log_baseline=log_baseline)

    def forward(self, student_out, teacher_out, targets, progress):
        p = self.params
        s, t = self._vectors(student_out, teacher_out)
        mi = self.mi_bound(s, t) if s.shape[0] >= 2 else s.new_zeros(())
        terms = {"mi": -p.mi_weight * mi,
                 "ce": p.ce_weight * L.cross_entropy(student_out.logits, None, targets)}
        if p.kd_weight > 0:
            terms["kd"] = p.kd_weight * L.kd(student_out.logits, teacher_out.logits, temperature=p.temperature)
        return terms
