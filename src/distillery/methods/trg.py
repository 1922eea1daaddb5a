"""TRG: distillation via a token-level relationship graph, plus label CE and KD.

Zhang, Liu, He (2023), "Knowledge Distillation via Token-level Relationship Graph" (arXiv
2306.12442): L = L_logit + alpha L_inner + beta L_local + gamma L_global (the three token terms
are in :mod:`distillery.losses.trg`), L_logit = CE + KD.  One layer of each model is tapped (by
default the deepest stage of zoo models) and turned into tokens:

* a CNN map (B, C, H, W): its H*W spatial positions, C-dim each (the paper cuts the map into
  patches; a position of a map pooled to the token grid below is the average of such a patch);
* a token sequence (B, L, D), e.g. a ViT block: its tokens; the class token (first) is dropped by
  default (``class_token: drop``) -- it summarises the image rather than standing at a place, so
  it has no partner in a CNN's grid;
* a vector (B, D): a single token per image.  The graph then degenerates to an instance-level
  graph (nodes = images, as in IRG/LSP): L_local and L_global still work, L_inner is a constant
  (the context of one token) and is refused unless its weight is 0.

Teacher and student must agree on the token places: when their token counts differ, both grids
are adaptively average-pooled to the smaller grid (per axis) -- pooling, never upsampling, so no
token is invented; a ViT's patch tokens form a square grid for this.  Widths may differ: L_inner
and L_local compare relations inside each model (any widths), and for L_global a learnable linear
map (method-owned, checkpointed, not exported) projects the student's tokens to the teacher's
width, as the paper's linear projection does.

From each image ``tokens_per_image`` places are sampled at random (the same places for both
models), as the paper does to keep the B*n-node graph affordable.  The global temperature falls
linearly from ``global_temperature_start`` to ``global_temperature_end`` over training (the
paper's dynamic temperature: coarse structure first, then fine).  Deviations, and why: tokens are
L2-normalised before the Gaussian k-NN kernel (``normalize_tokens``; without it the kernel's scale
would depend on each model's feature norm, and a single sigma could not serve both models); every
default weight, temperature, k, sigma and sample size is ours -- the paper's values could not be
read offline.  A batch whose graph has fewer than 2 nodes (a ragged last batch of one image with
vector features) gives 0 for the graph terms.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from distillery.losses import logits as L
from distillery.losses.trg import global_relation_loss, inner_contextual_loss, local_preserving_loss
from distillery.methods import register
from distillery.methods.align import default_pairs
from distillery.methods.base import Method, Params
from distillery.methods.feature import LayerPair


def token_grid(x: torch.Tensor, *, drop_class_token: bool) -> torch.Tensor:
    """Tokens of a feature as a (B, D, h, w) grid.  A sequence (B, L, D) whose L is not a square
    becomes a (B, D, 1, L) row (it can then only pair with an equal number of tokens)."""
    if x.dim() == 4:
        return x
    if x.dim() == 3:
        if drop_class_token:
            if x.shape[1] < 2:
                raise ValueError(f"cannot drop the class token of a sequence of {x.shape[1]} token; set class_token: keep")
            x = x[:, 1:]
        side = math.isqrt(x.shape[1])
        h, w = (side, side) if side * side == x.shape[1] else (1, x.shape[1])
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)
    if x.dim() == 2:
        return x[:, :, None, None]
    raise ValueError(f"TRG takes a map (B, C, H, W), tokens (B, L, D) or vectors (B, D), got shape {tuple(x.shape)}")


def matched_tokens(student: torch.Tensor, teacher: torch.Tensor, *, drop_class_token: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher tokens at the same places: (B, N, Ds) and (B, N, Dt).  Grids of
    different sizes are average-pooled to the smaller one, per axis."""
    s, t = token_grid(student, drop_class_token=drop_class_token), token_grid(teacher, drop_class_token=drop_class_token)
    if s.shape[0] != t.shape[0]:
        raise ValueError(f"student and teacher features hold different batch sizes ({s.shape[0]} vs {t.shape[0]})")
    n_s, n_t = s.shape[2] * s.shape[3], t.shape[2] * t.shape[3]
    if n_s != n_t:
        if (s.shape[2] == 1 and s.shape[3] > 1) or (t.shape[2] == 1 and t.shape[3] > 1):
            raise ValueError(f"token counts differ ({n_s} student vs {n_t} teacher) and a sequence that is not a square "
                             "grid cannot be resampled to the other's places; tap layers with equal token counts or "
                             "square token grids")
        size = (min(s.shape[2], t.shape[2]), min(s.shape[3], t.shape[3]))
        s, t = F.adaptive_avg_pool2d(s, size), F.adaptive_avg_pool2d(t, size)
    return s.flatten(2).transpose(1, 2), t.flatten(2).transpose(1, 2)


class TRGParams(Params):
    pairs: list[LayerPair] | None = Field(None, max_length=1, description="One layer pair; default: the deepest stage of zoo models.")
    class_token: Literal["drop", "keep"] = Field("drop", description="Token sequences (B, L, D): drop the first (class) token, or keep it.")
    inner_weight: float = Field(100.0, ge=0, description="alpha of the paper: weight of L_inner (an MSE of probabilities, hence large).")
    local_weight: float = Field(100.0, ge=0, description="beta of the paper: weight of L_local (KL between near-uniform neighbour distributions, hence large).")
    global_weight: float = Field(1.0, ge=0, description="gamma of the paper: weight of L_global (InfoNCE over the graph's nodes).")
    tokens_per_image: int = Field(16, ge=1, description="Token places sampled per image as graph nodes (all when an image has fewer).")
    k_neighbours: int = Field(8, ge=1, description="k of the teacher's k-NN graph for L_local (capped at nodes - 1).")
    sigma: float = Field(1.0, gt=0, description="Width of the Gaussian edge kernel exp(-d^2 / (2 sigma)).")
    normalize_tokens: bool = Field(True, description="L2-normalise tokens before the k-NN kernel (one sigma for both models).")
    global_temperature_start: float = Field(1.0, gt=0, description="tau_g at the start of training.")
    global_temperature_end: float = Field(0.1, gt=0, description="tau_g at the end (linear in between).")
    ce_weight: float = Field(1.0, ge=0, description="Weight of the label cross-entropy.")
    kd_weight: float = Field(1.0, ge=0, description="Weight of the Hinton KD term (0 = off).")
    temperature: float = Field(4.0, gt=0, description="KD temperature.")


@register("trg", params=TRGParams, paper="Zhang et al. 2023, Knowledge Distillation via Token-level Relationship Graph")
class TRG(Method):
    """TRG: match the teacher's token-level relationship graph (inner context, local k-NN structure, global InfoNCE)."""

    def __init__(self, params: TRGParams, *, student, teacher_layers, num_classes):
        super().__init__(params, student=student, teacher_layers=teacher_layers, num_classes=num_classes)
        self.pair = (params.pairs[0].student, params.pairs[0].teacher) if params.pairs else default_pairs(student, teacher_layers, 1)[0]
        self.student_taps, self.teacher_taps = [self.pair[0]], [self.pair[1]]
        self.projector: nn.Module = nn.Identity()  # replaced in setup when the widths differ
        self.global_temperature = params.global_temperature_start

    def _tokens(self, student_out, teacher_out) -> tuple[torch.Tensor, torch.Tensor]:
        s, t = matched_tokens(student_out.features[self.pair[0]], teacher_out.features[self.pair[1]],
                              drop_class_token=self.params.class_token == "drop")
        return s, t.to(s.dtype)

    def setup(self, student_out, teacher_out):
        s, t = self._tokens(student_out, teacher_out)
        if s.shape[1] == 1 and self.params.inner_weight > 0:
            raise ValueError(f"TRG: the tapped layers {self.pair} give one token per image (a vector feature, or grids "
                             "pooled to 1x1), whose inner-instance context is constant; set method.params.inner_weight: 0 "
                             "(the graph is then instance-level) or tap layers with spatial maps / token sequences")
        if s.shape[2] != t.shape[2]:
            self.projector = nn.Linear(s.shape[2], t.shape[2])

    def log_values(self):
        return {"trg_global_temperature": float(self.global_temperature)}

    def forward(self, student_out, teacher_out, targets, progress):
        p = self.params
        s, t = self._tokens(student_out, teacher_out)
        terms: dict[str, torch.Tensor] = {}
        if p.inner_weight > 0:
            terms["trg_inner"] = p.inner_weight * inner_contextual_loss(s, t)
        if p.local_weight > 0 or p.global_weight > 0:
            b, n = s.shape[:2]
            pick = torch.rand(b, n, device=s.device).argsort(dim=1)[:, :min(p.tokens_per_image, n)]
            s_nodes = s.gather(1, pick[..., None].expand(-1, -1, s.shape[2])).flatten(0, 1)
            t_nodes = t.gather(1, pick[..., None].expand(-1, -1, t.shape[2])).flatten(0, 1)
            enough = s_nodes.shape[0] >= 2
            frac = min(1.0, max(0.0, progress.fraction))
            self.global_temperature = p.global_temperature_start + (p.global_temperature_end - p.global_temperature_start) * frac
            if p.local_weight > 0:
                s_loc, t_loc = (F.normalize(s_nodes, dim=1), F.normalize(t_nodes, dim=1)) if p.normalize_tokens else (s_nodes, t_nodes)
                terms["trg_local"] = p.local_weight * local_preserving_loss(
                    s_loc, t_loc, k=p.k_neighbours, sigma=p.sigma) if enough else s.new_zeros(())
            if p.global_weight > 0:
                terms["trg_global"] = p.global_weight * global_relation_loss(
                    self.projector(s_nodes), t_nodes, temperature=self.global_temperature) if enough else s.new_zeros(())
        terms["ce"] = p.ce_weight * L.cross_entropy(student_out.logits, None, targets)
        if p.kd_weight > 0:
            terms["kd"] = p.kd_weight * L.kd(student_out.logits, teacher_out.logits, temperature=p.temperature)
        return terms
