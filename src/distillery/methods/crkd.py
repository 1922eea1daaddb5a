"""Class-relation KD for novel class discovery (Gu et al. 2023), on UNO's objective.

The data holds ``C`` classes; ids ``0..K-1`` are the *known* classes, whose labels are used,
and ids ``K..C-1`` the *novel* ones, whose labels are never used: a label only says whether a
sample is novel (id >= K), as the NCD setting gives the known/novel split of the data.  To put
other classes first, reorder them with ``data.classes``.

The student is the ordinary ``C``-way model the config builds: its first ``K`` logits are the
known head, the other ``C - K`` the novel head (whose slot order is the clustering it finds;
the benchmark matches it to classes with the Hungarian algorithm).  Keeping both heads in one
output keeps the saved model a plain classifier, and it is exactly UNO's "unified" head: one
softmax over the concatenated known and novel logits.  The teacher is the known-class model
(``K`` outputs, e.g. trained with ``data.classes: [0, ..., K-1]``).

Per batch:

* ``cluster`` -- UNO's swapped prediction (:func:`~distillery.losses.ncd.swapped_prediction`)
  between the engine's view and a second view the method draws itself (pad-crop / flip /
  noise of the engine's view), with one-hot targets for known samples and Sinkhorn-Knopp
  pseudo-labels for novel ones;
* ``crkd`` -- ``kd_weight`` times the class-relation distillation
  (:func:`~distillery.losses.ncd.crkd`) on the novel samples of the engine's view (the only
  view the teacher saw), with the learnable sample weight.  ``kd_weight: 0`` is the UNO
  baseline.

Differences from the papers' setups: one head instead of UNO's several heads and
over-clustering heads; a linear head instead of L2-normalised prototypes (so the defaults of
``temperature`` and ``sk_epsilon`` suit unbounded logits rather than UNO's cosine logits);
two views instead of multi-crop; the student is not initialised from the known-class model
unless the caller does it (the engine has no partial weight loading; ``benchmarks/ncd_crkd.py``
does it for both arms).
"""
from __future__ import annotations

import hashlib
from typing import Literal

import torch
from pydantic import Field

from distillery.config import AugmentConfig
from distillery.data.augment import apply_params, sample_params
from distillery.losses import ncd as L
from distillery.methods import register
from distillery.methods.base import Method, ModelOutput, Params, Progress


class CRKDParams(Params):
    # Defaults.  KD: the paper's alpha 0.1 and T 4; on a linear head at temperature 1 this keeps the
    # paper's ratio of KD to clustering gradient (its cosine logits are divided by 0.1).  Clustering:
    # UNO's epsilon 0.05 on logits divided by 0.1 would be 0.5 here, but 0.1 clustered far better on
    # digits (74% vs 41% novel accuracy, 4 seeds).  Second view: noise suits any input; shifts and
    # flips can change what a small image shows and clustered worse on digits (60-64%).
    known_classes: int | None = Field(None, ge=1, description="K: class ids 0..K-1 are known, the rest novel. Default: the teacher's class count.")
    kd_weight: float = Field(0.1, ge=0, description="Weight of the class-relation KD term; 0 gives the UNO baseline.")
    kd_temperature: float = Field(4.0, gt=0, description="Softmax temperature of the KD term and of its sample weight (the loss is scaled by T^2).")
    weighting: Literal["learnable", "uniform"] = Field("learnable", description="The paper's learnable sample weight, or 1 for every sample.")
    temperature: float = Field(1.0, gt=0, description="Temperature of the swapped-prediction cross-entropy.")
    sk_epsilon: float = Field(0.1, gt=0, description="Sinkhorn-Knopp entropy regularisation (smaller: harder pseudo-labels).")
    sk_iterations: int = Field(3, ge=1, description="Sinkhorn-Knopp iterations.")
    view_pad_crop: int = Field(0, ge=0, description="Second view, images: random shift by up to this many pixels.")
    view_flip: bool = Field(False, description="Second view, images: random horizontal flip.")
    view_noise: float = Field(0.3, ge=0, description="Second view: add Gaussian noise of this std (inputs are standardised).")
    view_seed: int = Field(0, description="Seed of the second view's draws (with the step: resumable and repeatable).")


@register("crkd", params=CRKDParams, teacher_same_classes=False,
          paper="Gu et al. 2023, Class-relation Knowledge Distillation for Novel Class Discovery (on UNO, Fini et al. 2021)")
class CRKD(Method):
    """Class-relation KD for novel class discovery: UNO swapped prediction + weighted KL to the known-class model."""

    def __init__(self, params: CRKDParams, *, student, teacher_layers, num_classes):
        super().__init__(params, student=student, teacher_layers=teacher_layers, num_classes=num_classes)
        self.known = params.known_classes

    def setup(self, student_out: ModelOutput, teacher_out: ModelOutput | None) -> None:
        teacher_k = teacher_out.logits.shape[-1]
        if self.known is None:
            self.known = teacher_k
        if self.known != teacher_k:
            raise ValueError(f"known_classes={self.known} but the teacher predicts {teacher_k} classes; "
                             "the teacher must be the model of the known classes 0..K-1")
        if not self.known < self.num_classes:
            raise ValueError(
                f"the teacher predicts {teacher_k} classes and the data has {self.num_classes}: crkd needs novel "
                f"classes, so the teacher must know only the first K < {self.num_classes} (train it with data.classes)")
        if isinstance(student_out.inputs, dict):
            raise ValueError("crkd draws a second view of each input; token (dict) inputs are not supported")

    def second_view(self, x: torch.Tensor, step: int) -> torch.Tensor:
        p = self.params
        g = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(f"{p.view_seed}:{step}".encode()).digest()[:7], "little"))
        if x.dim() == 4 and (p.view_pad_crop or p.view_flip):
            aug = AugmentConfig(pad_crop=p.view_pad_crop, flip=p.view_flip)
            x = apply_params(x, sample_params(x.shape[0], aug, g), aug)
        if p.view_noise > 0:
            x = x + p.view_noise * torch.randn(x.shape, generator=g).to(device=x.device, dtype=x.dtype)
        return x

    def forward(self, student_out, teacher_out, targets, progress: Progress):
        p, k = self.params, self.known
        novel = targets >= k  # the only use of a novel sample's label
        logits_a = student_out.logits
        logits_b = self.student_forward(self.second_view(student_out.inputs, progress.step))
        t_a = L.ncd_targets(logits_a.detach(), targets, novel, k, epsilon=p.sk_epsilon, iterations=p.sk_iterations)
        t_b = L.ncd_targets(logits_b.detach(), targets, novel, k, epsilon=p.sk_epsilon, iterations=p.sk_iterations)
        terms = {"cluster": L.swapped_prediction(logits_a, logits_b, t_a, t_b, temperature=p.temperature)}
        if p.kd_weight > 0:
            terms["crkd"] = p.kd_weight * L.crkd(logits_a[novel], teacher_out.logits[novel],
                                                 temperature=p.kd_temperature, weighting=p.weighting)
        return terms
