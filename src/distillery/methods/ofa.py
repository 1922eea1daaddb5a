"""OFA-KD: branch heads project intermediate student features into the logit space, where the
teacher's predictions are matched with the OFA loss (Hao et al. 2023).

Hao, Guo, Han, Tang, Hu, Wang, Xu (2023), "One-for-All: Bridge the Gap Between Heterogeneous
Architectures in Knowledge Distillation", NeurIPS.  Features of a CNN, an MLP and a ViT have
little in common (the paper measures it with CKA), so instead of matching features, every
student stage gets a small branch -- projector, pooling, linear classifier -- whose logits learn
from the teacher's final predictions; the logit space is the same for every architecture.  The
branches and the student's own logits are trained with :func:`distillery.losses.ofa.ofa_loss`.

The branches belong to this method (trained and checkpointed with the student, not exported):
only the student's own head predicts at inference, as in the paper.  Branch per feature shape:

* maps (N, C, H, W): stride-2 separable-conv blocks (depthwise-pointwise-BN-ReLU, twice; the
  released code's ``SepConv``) doubling the channels until the map reaches the size of the
  deepest tapped stage, the last block (or a 1x1 conv when none is needed) giving
  ``branch_width`` channels; then global average pooling and a linear layer;
* tokens (N, L, D): a linear map to ``branch_width``, one pre-norm transformer block, LayerNorm,
  the mean over tokens and a linear layer (the released code merges patches to a 7x7 grid and
  uses ``4 - stage`` timm blocks; one block suits the small token grids of this zoo);
* vectors (N, D): Linear-BN-ReLU-Linear.

Differences from the released code (Hao840/OFAKD): ``branch_width`` defaults to the widest
tapped student stage, where the code takes max(student, teacher) final width -- a method never
sees the teacher model; ``form: paper`` (default) uses the loss as the paper writes it, label
term included, while ``form: code`` reproduces the code's loss with its separate label CE.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from distillery.losses import logits as L
from distillery.losses.ofa import ofa_loss
from distillery.methods import register
from distillery.methods.base import Method, ModelOutput, Params
from distillery.models.zoo import TransformerBlock


class OFAParams(Params):
    stages: list[str] | None = Field(None, description="Student module paths that get a branch head; default: every "
                                                       "stage in the student's default_feature_layers (the paper: all stages).")
    gamma: float = Field(1.5, gt=0, description="Target-enhancement exponent (the paper's modulating parameter, "
                                                "--ofa-eps in the released code: 1 by default, 1.5 in its ImageNet example).")
    temperature: float = Field(1.0, gt=0, description="Softmax temperature of the OFA loss (1 in the paper and code).")
    form: Literal["paper", "code"] = Field("paper", description="paper: L_OFA with its label term; code: the released "
                                                                "code's weights (p_t + onehot)^gamma - onehot plus a separate CE.")
    branch_weight: float = Field(1.0, ge=0, description="Weight of the summed branch losses (--ofa-loss-weight).")
    logit_weight: float = Field(1.0, ge=0, description="Weight of the OFA loss on the student's own logits (--kd-loss-weight).")
    ce_weight: float | None = Field(None, ge=0, description="Label CE on the student's logits; default 0 with form paper "
                                                            "(its loss holds the label term), 1 with form code.")
    branch_width: int | None = Field(None, ge=1, description="Width of the branch projectors; default: the widest tapped stage.")


def _sep_conv(c_in: int, c_out: int) -> nn.Sequential:
    """The released code's SepConv: halves H and W, maps c_in -> c_out channels."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_in, 3, stride=2, padding=1, groups=c_in, bias=False), nn.Conv2d(c_in, c_in, 1, bias=False),
        nn.BatchNorm2d(c_in), nn.ReLU(inplace=True),
        nn.Conv2d(c_in, c_in, 3, padding=1, groups=c_in, bias=False), nn.Conv2d(c_in, c_out, 1, bias=False),
        nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
    )


class _TokenMean(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1)


def branch_head(shape: torch.Size, num_classes: int, width: int, target_size: int | None) -> nn.Module:
    """The OFA branch for a student feature of ``shape`` (batch first): features -> logits."""
    if len(shape) == 4:
        c, h = shape[1], shape[2]
        blocks: list[nn.Module] = []
        downs = max(0, round(math.log2(h / target_size))) if target_size else 0
        for i in range(downs):
            out = width if i == downs - 1 else c * 2
            blocks.append(_sep_conv(c, out))
            c = out
        if not blocks:
            blocks.append(nn.Conv2d(c, width, 1))
        head = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))
    elif len(shape) == 3:
        heads = next(h for h in (4, 2, 1) if width % h == 0)
        head = nn.Sequential(nn.Linear(shape[2], width), TransformerBlock(width, heads, 4.0), nn.LayerNorm(width),
                             _TokenMean(), nn.Linear(width, num_classes))
    elif len(shape) == 2:
        head = nn.Sequential(nn.Linear(shape[1], width), nn.BatchNorm1d(width), nn.ReLU(inplace=True),
                             nn.Linear(width, num_classes))
    else:
        raise ValueError(f"OFA branches take (N, C, H, W) maps, (N, L, D) tokens or (N, D) vectors; got shape {tuple(shape)}")
    for m in head.modules():  # the released code's init_weights
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
    return head


def _width(shape: torch.Size) -> int:
    return shape[1] if len(shape) == 4 else shape[-1]


@register("ofa", params=OFAParams,
          paper="Hao et al. 2023, One-for-All: Bridge the Gap Between Heterogeneous Architectures in Knowledge Distillation")
class OFA(Method):
    """OFA-KD: logit-space branch heads on student stages, trained with the target-enhanced OFA loss."""

    def __init__(self, params: OFAParams, *, student, teacher_layers, num_classes):
        super().__init__(params, student=student, teacher_layers=teacher_layers, num_classes=num_classes)
        stages = params.stages or list(getattr(student, "default_feature_layers", []) or [])
        if not stages:
            raise ValueError("cannot choose OFA stages for a student without `default_feature_layers`; give "
                             "method.params.stages, e.g. [layer1, layer2, layer3] (module paths)")
        self.stages = list(dict.fromkeys(stages))
        self.student_taps = list(self.stages)
        self.branches = nn.ModuleList()  # built in setup, once the stage shapes are known

    def setup(self, student_out: ModelOutput, teacher_out: ModelOutput | None) -> None:
        shapes = [student_out.features[s].shape for s in self.stages]
        maps = [s[2] for s in shapes if len(s) == 4]
        width = self.params.branch_width or max(_width(s) for s in shapes)
        for shape in shapes:
            self.branches.append(branch_head(shape, self.num_classes, width, min(maps) if maps else None))

    def branch_logits(self, student_out: ModelOutput) -> list[torch.Tensor]:
        return [head(student_out.features[s]) for s, head in zip(self.stages, self.branches)]

    def forward(self, student_out, teacher_out, targets, progress):
        p = self.params

        def loss(logits):
            return ofa_loss(logits, teacher_out.logits, targets, gamma=p.gamma, temperature=p.temperature, form=p.form)

        terms = {"ofa_branches": p.branch_weight * sum(loss(z) for z in self.branch_logits(student_out)),
                 "ofa": p.logit_weight * loss(student_out.logits)}
        ce_weight = p.ce_weight if p.ce_weight is not None else (1.0 if p.form == "code" else 0.0)
        if ce_weight > 0:
            terms["ce"] = ce_weight * L.cross_entropy(student_out.logits, None, targets)
        return terms
