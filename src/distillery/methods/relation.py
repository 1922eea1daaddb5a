"""Relation-based methods: the student matches how the teacher relates the samples of a batch
(distances and angles, similarity matrices, conditional distributions), not the features.

Only N x N relations are compared, so teacher and student layers may have any widths and
shapes -- no projector, and cross-family pairs (CNN -> MLP, CNN -> ViT) work as they are.  By
default the deepest stage of each model is paired; its output is reduced to one embedding per
sample by global average pooling (``embedding: pool``) or flattening (``embedding: flatten``).
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from distillery.losses import logits as L
from distillery.losses import relations as R
from distillery.methods import register
from distillery.methods.align import PAIRS_HELP, resolve_pairs
from distillery.methods.base import Method, Params
from distillery.methods.feature import PairsField


def embedding(x: torch.Tensor, how: str) -> torch.Tensor:
    """One vector per sample: ``pool`` averages (N, C, H, W) over space and (N, L, D) over tokens;
    ``flatten`` keeps every element.  (N, D) is returned as it is."""
    if how == "pool" and x.dim() == 4:
        return x.mean(dim=(2, 3))
    if how == "pool" and x.dim() == 3:
        return x.mean(dim=1)
    return x.flatten(1)


class RelationParams(Params):
    pairs: PairsField = Field(None, description=PAIRS_HELP)
    n_pairs: int = Field(1, ge=1, description="With automatic pairing: how many of the deepest stages to pair.")
    embedding: Literal["pool", "flatten"] = Field("pool", description="Features -> one vector per sample: pool over space/tokens, or flatten.")
    ce_weight: float = Field(1.0, ge=0)
    kd_weight: float = Field(0.0, ge=0, description="Optional Hinton KD term on logits.")
    temperature: float = Field(4.0, gt=0, description="Temperature of the optional KD term.")


class _RelationMethod(Method):
    """Shared wiring: resolve layer pairs, tap them, average the relation terms over pairs."""

    def __init__(self, params, *, student, teacher_layers, num_classes):
        super().__init__(params, student=student, teacher_layers=teacher_layers, num_classes=num_classes)
        self.pairs = resolve_pairs(params, student, teacher_layers)
        self.student_taps = [s for s, _ in self.pairs]
        self.teacher_taps = [t for _, t in self.pairs]

    def relation_terms(self, s: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward(self, student_out, teacher_out, targets, progress):
        p = self.params
        terms: dict[str, torch.Tensor] = {}
        for s, t in self.pairs:
            pair = self.relation_terms(embedding(student_out.features[s], p.embedding),
                                       embedding(teacher_out.features[t], p.embedding))
            for name, value in pair.items():
                terms[name] = terms.get(name, 0) + value / len(self.pairs)
        terms["ce"] = p.ce_weight * L.cross_entropy(student_out.logits, None, targets)
        if p.kd_weight > 0:
            terms["kd"] = p.kd_weight * L.kd(student_out.logits, teacher_out.logits, temperature=p.temperature)
        return terms


class RKDParams(RelationParams):
    distance_weight: float = Field(25.0, ge=0, description="lambda of the distance-wise loss (25 in the paper).")
    angle_weight: float = Field(50.0, ge=0, description="lambda of the angle-wise loss (50 in the paper).")


@register("rkd", params=RKDParams, paper="Park et al. 2019, Relational Knowledge Distillation")
class RKD(_RelationMethod):
    """Relational KD: match the batch's normalised pairwise distances and triplet angles."""

    def relation_terms(self, s, t):
        p, terms = self.params, {}
        if p.distance_weight > 0:
            terms["rkd_distance"] = p.distance_weight * R.rkd_distance(s, t)
        if p.angle_weight > 0:
            terms["rkd_angle"] = p.angle_weight * R.rkd_angle(s, t)
        return terms


class SPParams(RelationParams):
    embedding: Literal["pool", "flatten"] = Field("flatten", description="The paper flattens the activation map (b x chw).")
    sp_weight: float = Field(3000.0, ge=0, description="gamma of the paper (3000 in its CIFAR experiments).")


@register("sp", params=SPParams, paper="Tung & Mori 2019, Similarity-Preserving Knowledge Distillation")
class SimilarityPreserving(_RelationMethod):
    """Similarity-preserving KD: match the row-normalised batch similarity matrices."""

    def relation_terms(self, s, t):
        return {"sp": self.params.sp_weight * R.similarity_preserving(s, t)}


class PKTParams(RelationParams):
    pkt_weight: float = Field(30000.0, ge=0, description="Weight of the PKT term (3e4, as in the CRD benchmark code).")


@register("pkt", params=PKTParams, paper="Passalis & Tefas 2018, Learning Deep Representations with Probabilistic Knowledge Transfer")
class PKT(_RelationMethod):
    """Probabilistic knowledge transfer: match cosine-kernel conditional distributions over the batch."""

    def relation_terms(self, s, t):
        return {"pkt": self.params.pkt_weight * R.pkt(s, t)}
