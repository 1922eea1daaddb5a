"""Prototype-guided cross-task KD (ProC-KD; Li, Wu, Han & Tian 2022, arXiv 2212.13180).

Cross-task: the teacher was trained on another label set (e.g. Fashion-MNIST classes 0-4) than
the student (classes 5-9), so its logits mean nothing here and are never used.  What transfers
is *local* knowledge: the part-level patterns of the teacher's spatial features.

What could be read: the paper's abstract only (prototype learning module on the teacher's local
representations; task-adaptive feature augmentation of the student's features with the learned
prototypes, guiding the student's training).  The PDF and code were not reachable, so the exact
equations, the prototype count, the architecture of both modules and the loss weights are this
library's choices, stated here and in :mod:`distillery.losses.prototype`:

* local features: one vector per position of a spatial map ``(B, C, H, W)`` or per patch token
  ``(B, L, D)`` (a leading class token is dropped when ``L - 1`` is a square); the student's grid
  is average-pooled (or bilinearly resized) to the teacher's and mapped to the teacher's width by
  a learned linear map (a 1x1 conv), as in FitNets' regressor;
* ``proto`` -- prototype learning: ``K`` prototypes, initialised from teacher local features of
  the probe batch, learn a soft cosine k-means of the teacher's local features
  (:func:`~distillery.losses.prototype.prototype_reconstruction`); only this term moves them;
* ``assign`` -- the student's projected local features must be assigned to the prototypes as
  the teacher's are at the same position
  (:func:`~distillery.losses.prototype.prototype_assignment_kd`);
* ``aug`` -- task-adaptive feature augmentation: each student position gets the prototype
  read-out of its own assignment, scaled by a per-channel sigmoid gate computed from the pooled
  student feature; an auxiliary linear classifier on the pooled augmented feature is trained
  with the student's labels, and its gradient reaches the student's layers.  Simplification:
  in the paper the augmented features serve the student's task directly; here the engine owns
  the student's forward pass, so the augmentation is a training-time branch and the saved
  student is the unmodified architecture (no prototypes needed at test time);
* ``ce`` -- cross-entropy of the student's own head.

An MLP has no local features (its hidden vector has no positions: slicing it into chunks would
invent a spatial layout that is not there), so a vector-valued tap is refused with a clear
error; use a spatial student (cnn, resnet*, wrn*, mobilenetv2, vit_tiny).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from distillery.losses import logits as LL
from distillery.losses import prototype as P
from distillery.methods import register
from distillery.methods.base import Method, ModelOutput, Params, Progress


class PrototypeKDParams(Params):
    student_layer: str | None = Field(None, description="Student module path of the local features; default: its deepest stage.")
    teacher_layer: str | None = Field(None, description="Teacher module path of the local features; default: its deepest stage.")
    num_prototypes: int = Field(16, ge=2, description="K: prototypes learned from the teacher's local features.")
    temperature: float = Field(0.1, gt=0, description="tau of the cosine soft assignment to the prototypes.")
    proto_weight: float = Field(1.0, ge=0, description="Weight of the prototype-learning term (moves only the prototypes).")
    assign_weight: float = Field(1.0, ge=0, description="Weight of the local prototype-assignment KD term.")
    aug_weight: float = Field(0.5, ge=0, description="Weight of the auxiliary CE on prototype-augmented student features.")
    ce_weight: float = Field(1.0, ge=0, description="Weight of the student's cross-entropy.")
    init_seed: int = Field(0, description="Seed of the choice of teacher local features that initialise the prototypes.")


def local_grid(x: torch.Tensor, role: str, layer: str) -> torch.Tensor:
    """A tapped feature as a spatial grid ``(B, C, H, W)``: maps as they are, patch tokens
    ``(B, L, D)`` laid back on their square grid (a leading class token dropped)."""
    if x.dim() == 4:
        return x
    if x.dim() == 3:
        n = x.shape[1]
        for drop in (0, 1):  # all tokens are patches, or a class token comes first (the zoo's ViT)
            side = math.isqrt(n - drop)
            if side * side == n - drop and side > 0:
                return x[:, drop:].transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)
        raise ValueError(f"the {role} layer '{layer}' gives {n} tokens, neither a square grid of patches nor one "
                         "plus a class token; tap a layer with a square patch grid")
    raise ValueError(
        f"prototype_kd transfers local (per-position) features, but the {role} layer '{layer}' gives a vector "
        f"of shape {tuple(x.shape)} (an MLP has no spatial positions); use a spatial {role} (cnn, resnet*, "
        f"vit_tiny, ...) or set method.params.{role}_layer to a convolutional or token layer")


def _tokens(grid: torch.Tensor) -> torch.Tensor:
    return grid.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, H*W, C)


@register("prototype_kd", params=PrototypeKDParams, teacher_same_classes=False,
          paper="Li, Wu, Han & Tian 2022, Prototype-guided Cross-task Knowledge Distillation for Large-scale Models")
class PrototypeKD(Method):
    """ProC-KD: cross-task KD of the teacher's local features through learned prototypes + task-adaptive augmentation."""

    def __init__(self, params: PrototypeKDParams, *, student, teacher_layers, num_classes):
        super().__init__(params, student=student, teacher_layers=teacher_layers, num_classes=num_classes)
        s_layers = list(getattr(student, "default_feature_layers", []) or [])
        s_layer = params.student_layer or (s_layers[-1] if s_layers else None)
        t_layer = params.teacher_layer or (teacher_layers[-1] if teacher_layers else None)
        if s_layer is None or t_layer is None:
            raise ValueError("cannot choose the local-feature layers automatically for a model without "
                             "`default_feature_layers`; set method.params.student_layer and teacher_layer (module paths)")
        self.s_layer, self.t_layer = s_layer, t_layer
        self.student_taps, self.teacher_taps = [s_layer], [t_layer]

    def setup(self, student_out: ModelOutput, teacher_out: ModelOutput | None) -> None:
        p = self.params
        if teacher_out is None:
            raise ValueError("prototype_kd needs a teacher")
        s = local_grid(student_out.features[self.s_layer], "student", self.s_layer)
        t = local_grid(teacher_out.features[self.t_layer], "teacher", self.t_layer)
        self.grid = tuple(t.shape[-2:])
        c_s, c_t = s.shape[1], t.shape[1]
        self.proj = nn.Linear(c_s, c_t)  # per position: a 1x1 conv into the teacher's feature space
        self.gate = nn.Linear(c_t, c_t)  # task-adaptive: learned from the student's labels only
        self.aux_head = nn.Linear(c_t, self.num_classes)
        # Prototypes start on real teacher local patterns (k-means++-like seeding without the
        # distance weighting): random vectors could sit where no feature ever is and never move.
        pool = _tokens(t).reshape(-1, c_t).float()
        g = torch.Generator().manual_seed(p.init_seed)
        rows = torch.randperm(pool.shape[0], generator=g)[: p.num_prototypes]
        if rows.numel() < p.num_prototypes:
            raise ValueError(f"num_prototypes={p.num_prototypes} exceeds the {pool.shape[0]} teacher local features "
                             "of the first batch; use fewer prototypes or a larger batch")
        self.prototypes = nn.Parameter(pool[rows].cpu().clone() + 1e-3 * torch.randn(p.num_prototypes, c_t, generator=g))

    def student_local(self, feat: torch.Tensor) -> torch.Tensor:
        """The student's tapped feature as ``(B, N, C_teacher)`` on the teacher's grid."""
        s = local_grid(feat, "student", self.s_layer)
        if tuple(s.shape[-2:]) != self.grid:
            s = (F.adaptive_avg_pool2d(s, self.grid) if s.shape[-1] >= self.grid[-1]
                 else F.interpolate(s, size=self.grid, mode="bilinear", align_corners=False))
        return self.proj(_tokens(s))

    def forward(self, student_out, teacher_out, targets, progress: Progress):
        p = self.params
        s = self.student_local(student_out.features[self.s_layer])
        t = _tokens(local_grid(teacher_out.features[self.t_layer], "teacher", self.t_layer)).to(s.dtype)
        protos = self.prototypes
        fixed = protos.detach()  # the prototypes are the teacher's knowledge: only `proto` moves them
        terms = {"ce": p.ce_weight * LL.cross_entropy(student_out.logits, None, targets)}
        if p.proto_weight > 0:
            terms["proto"] = p.proto_weight * P.prototype_reconstruction(t, protos, temperature=p.temperature)
        if p.assign_weight > 0:
            terms["assign"] = p.assign_weight * P.prototype_assignment_kd(s, t, fixed, temperature=p.temperature)
        if p.aug_weight > 0:
            gate = torch.sigmoid(self.gate(s.mean(1)))
            z = P.prototype_augment(s, P.soft_assign(s, fixed, temperature=p.temperature), fixed, gate)
            terms["aug"] = p.aug_weight * LL.cross_entropy(self.aux_head(z.mean(1)), None, targets)
        return terms
