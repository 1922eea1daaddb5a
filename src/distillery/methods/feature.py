"""Feature-level methods: the student imitates intermediate teacher features captured by
forward hooks (:mod:`distillery.taps`), through automatic projectors when shapes differ."""
from __future__ import annotations

from typing import Annotated

import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from torch import nn

from distillery.losses import features as FL
from distillery.losses import logits as L
from distillery.methods import register
from distillery.methods.align import Align, PAIRS_HELP, check_pairs_text, resolve_pairs
from distillery.methods.base import Method, ModelOutput, Params


class LayerPair(BaseModel):
    model_config = ConfigDict(extra="forbid")
    student: str = Field(description="Student module path, e.g. layer3 or blocks.2 (':input' taps the input).")
    teacher: str = Field(description="Teacher module path.")


# A ``pairs`` parameter: a list of pairs, or text read off a CKA map (``auto-cka`` / ``cka:PATH``).
PairsField = Annotated[list[LayerPair] | str | None, AfterValidator(check_pairs_text)]


class FeatureParams(Params):
    pairs: PairsField = Field(None, description=PAIRS_HELP)
    n_pairs: int = Field(1, ge=1, description="With automatic pairing: how many of the deepest stages to pair.")
    feature_weight: float = Field(100.0, ge=0, description="Weight of the feature loss.")
    ce_weight: float = Field(1.0, ge=0)
    kd_weight: float = Field(0.0, ge=0, description="Optional Hinton KD term on logits.")
    temperature: float = Field(4.0, gt=0)


class _FeatureMethod(Method):
    """Shared wiring: resolve layer pairs, tap them, sum a per-pair feature loss."""

    learnable_projector = True
    term = "feat"

    def __init__(self, params, *, student, teacher_layers, num_classes):
        super().__init__(params, student=student, teacher_layers=teacher_layers, num_classes=num_classes)
        self.pairs = resolve_pairs(params, student, teacher_layers)
        self.student_taps = [s for s, _ in self.pairs]
        self.teacher_taps = [t for _, t in self.pairs]
        self.aligners = nn.ModuleList()

    def setup(self, student_out: ModelOutput, teacher_out: ModelOutput | None) -> None:
        for s, t in self.pairs:
            self.aligners.append(Align(student_out.features[s].shape, teacher_out.features[t].shape,
                                       learnable=self.learnable_projector))

    def feature_loss(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, student_out, teacher_out, targets, progress):
        p = self.params
        feat = sum(
            self.feature_loss(*align(student_out.features[s], teacher_out.features[t]))
            for align, (s, t) in zip(self.aligners, self.pairs)
        ) / len(self.pairs)
        terms = {self.term: p.feature_weight * feat, "ce": p.ce_weight * L.cross_entropy(student_out.logits, None, targets)}
        if p.kd_weight > 0:
            terms["kd"] = p.kd_weight * L.kd(student_out.logits, teacher_out.logits, temperature=p.temperature)
        return terms


@register("fitnets", params=FeatureParams, paper="Romero et al. 2015, FitNets: Hints for Thin Deep Nets")
class FitNets(_FeatureMethod):
    """FitNets hints: MSE between projected student features and teacher features."""

    term = "hint"

    def feature_loss(self, s, t):
        return FL.hint_mse(s, t)


class ATParams(FeatureParams):
    feature_weight: float = Field(1000.0, ge=0, description="beta of the paper (1e3 in its CIFAR experiments).")
    n_pairs: int = Field(3, ge=1)
    p: float = Field(2.0, gt=0, description="Exponent of the attention map sum_c |F_c|^p.")


@register("at", params=ATParams, paper="Zagoruyko & Komodakis 2017, Paying More Attention to Attention")
class AttentionTransfer(_FeatureMethod):
    """Attention transfer: match normalised spatial attention maps of paired stages."""

    term = "at"
    learnable_projector = False  # attention maps are channel-free: only spatial pooling is needed

    def setup(self, student_out, teacher_out):
        for s, t in self.pairs:  # AT compares maps, so both sides must be spatial (or tokens)
            for side, shape in (("student", student_out.features[s].shape), ("teacher", teacher_out.features[t].shape)):
                if len(shape) not in (3, 4):
                    raise ValueError(f"attention transfer needs spatial features; {side} layer gives shape {tuple(shape)}")
            self.aligners.append(nn.Identity())

    def forward(self, student_out, teacher_out, targets, progress):
        p = self.params
        at = sum(FL.attention_transfer(student_out.features[s], teacher_out.features[t], p=p.p) for s, t in self.pairs)
        terms = {"at": p.feature_weight / 2 * at / len(self.pairs),
                 "ce": p.ce_weight * L.cross_entropy(student_out.logits, None, targets)}
        if p.kd_weight > 0:
            terms["kd"] = p.kd_weight * L.kd(student_out.logits, teacher_out.logits, temperature=p.temperature)
        return terms
