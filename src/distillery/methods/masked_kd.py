"""Masked-input feature distillation: DMAE.

Bai, Wang, Xiao, Wei, Wang, Yuille, Zhou & Xie (2023), "Masked Autoencoders Enable Efficient
Knowledge Distillers", CVPR (arXiv 2208.12256).  Per step, on the training batch x:

1. a random mask hides ``mask_ratio`` of the patches of each sample (MAE's per-sample shuffle);
   teacher and student see the *same* visible patches;
2. the teacher runs on the visible patches only, and only up to its tapped intermediate layer
   (``teacher_forward(until_taps=True)``: the later layers never run) -- the paper's saving;
3. the student runs on the same visible patches; its feature at ``student_layer`` on each
   visible patch is projected (a learned linear map, part of this method) to the teacher's width
   and pulled to the teacher's feature on that patch (``feature`` term, weight alpha);
4. optionally (``recon_weight`` > 0) a light MAE decoder -- part of this method, trained with the
   student, never exported -- reconstructs the masked patches' pixels from the student's visible
   tokens at ``recon_layer`` (``reconstruction`` term, MAE's loss on masked patches).

Task loss: the paper pre-trains with (3) + (4) and fine-tunes afterwards; here the student is
trained for the task at the same time, with ordinary cross-entropy on the *unmasked* batch (the
engine's main student forward; ``ce`` term, ``ce_weight``).  The engine does not run the teacher
on that batch (``teacher_on_batch=False``): the teacher's only cost is the masked, truncated pass.

How each model is masked:

- a ViT (zoo ``vit_tiny``, or any model with ``patch_embed`` and ``blocks``) drops the masked
  tokens before ``blocks.0`` (``keep=("blocks.0", [0, 1 + visible])``: class token kept, position
  embeddings already added), so every block runs on 1 + K tokens -- the true compute saving;
- a CNN or an MLP cannot drop pixels: the masked patches of its input are set to zero (same
  patch grid, same mask) and it runs on the whole image.

How features of different families meet: a ViT feature (B, 1+K, D) gives its K visible tokens;
a CNN map (B, C, h, w) is pooled (or upsampled) to the patch grid and its visible cells taken
(B, K, C); then a per-token linear projector maps the student's width to the teacher's.  If
either side is a vector (an MLP layer, no spatial layout), both sides are averaged to one vector
over their visible tokens and projected as vectors.

The saving is measured, not assumed: ``setup`` counts the teacher's FLOPs on the probe batch
(``torch.utils.flop_counter.FlopCounterMode``) for the full unmasked pass to the logits and for
the masked pass up to the tap; ``log_values()["teacher_flops_fraction"]`` is their ratio.

Differences from the paper, and why:
- The teachers here are supervised (trained with CE), not MAE-pretrained; the method itself does
  not depend on how the teacher was trained.
- CE on the unmasked batch is added (see above) instead of a separate fine-tuning stage.
- The paper's text was read only as far as its abstract here: the distance (``distance``,
  smooth L1 by default; L1 and MSE available) and the decoder size are our choices.
- CNN/MLP models get zeroed patches instead of dropped tokens (no compute saving for a CNN
  teacher beyond stopping at the tap).  An MLP student has no per-patch features: its vector is
  repeated at every visible position as the decoder's input.
- The student's masked pass leaves BatchNorm running statistics untouched (see
  ``_running_stats_frozen``); a ViT has none.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Literal

import torch
from pydantic import Field
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from distillery.losses import logits as L
from distillery.losses.masked_kd import (feature_distance, grid_tokens, masked_reconstruction,
                                          random_visible_patches, take_tokens, zero_masked_patches)
from distillery.methods import register
from distillery.methods.base import Method, Params

_PAPER = "Bai et al. 2023, Masked Autoencoders Enable Efficient Knowledge Distillers (CVPR)"


class MaskedKDParams(Params):
    mask_ratio: float = Field(0.75, ge=0, lt=1, description="Fraction of patches hidden from teacher and student.")
    patch_size: int | None = Field(None, ge=1, description="Side of a mask patch in pixels; None: the ViT's patch size "
                                                           "(student's, else teacher's), or 4 for CNN/MLP pairs.")
    teacher_layer: str | None = Field(None, description="Teacher tap (intermediate layer); None: its second-deepest "
                                                        "default stage.")
    student_layer: str | None = Field(None, description="Student tap aligned to it; None: its second-deepest default stage.")
    teacher_tokens: Literal["auto", "drop", "zero"] = Field(
        "auto", description="How the teacher is masked: drop tokens before blocks.0 (a ViT), zero the masked patches "
                            "(CNN/MLP); auto: drop when its stages are named blocks.N.")
    feature_weight: float = Field(1.0, ge=0, description="alpha: weight of the feature distillation term.")
    distance: Literal["smooth_l1", "l1", "mse"] = Field("smooth_l1", description="Distance between projected student "
                                                                                 "and teacher features.")
    recon_weight: float = Field(1.0, ge=0, description="Weight of MAE pixel reconstruction (0: no decoder).")
    recon_layer: str | None = Field(None, description="Student tap the decoder reads; None: its deepest default stage.")
    decoder_dim: int = Field(64, ge=8, description="Width of the light MAE decoder.")
    decoder_depth: int = Field(1, ge=1, description="Transformer layers of the decoder.")
    norm_pix: bool = Field(True, description="MAE's per-patch normalised pixel targets.")
    ce_weight: float = Field(1.0, ge=0, description="Weight of label cross-entropy on the unmasked batch.")


def _is_vit(model: nn.Module) -> bool:
    return hasattr(model, "patch_embed") and hasattr(model, "blocks")


@contextmanager
def _running_stats_frozen(model: nn.Module):
    """The masked pass must not move BatchNorm's running statistics: those normalise the unmasked
    test images, and zeroed patches would drag them off (a CNN student's test accuracy swung by
    10 points from epoch to epoch without this).  Momentum 0 keeps them; the pass itself still
    normalises with its batch statistics."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(bns, saved):
            m.momentum = momentum


def _stage(layers: list[str] | None, given: str | None, who: str) -> str:
    if given:
        return given
    if not layers:
        raise ValueError(f"cannot choose the {who} layer automatically: give method.params.{who}_layer (a module path)")
    return layers[-2] if len(layers) >= 2 else layers[-1]


class MAEDecoder(nn.Module):
    """MAE's light decoder (He et al. 2022, Sec. 3): embed the visible tokens, put a shared learned
    mask token at every masked position, add learned position embeddings, a few transformer layers,
    then a linear map to each patch's pixels."""

    def __init__(self, in_dim: int, n_patches: int, patch_pixels: int, dim: int, depth: int):
        super().__init__()
        self.embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, n_patches, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, nhead=4 if dim % 4 == 0 else 1, dim_feedforward=2 * dim,
                                           dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, patch_pixels)

    def forward(self, visible_tokens: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        b, n = visible.shape[0], self.pos.shape[1]
        x = self.mask_token.expand(b, n, -1).clone()
        x = x.scatter(1, visible.unsqueeze(-1).expand(-1, -1, x.shape[-1]), self.embed(visible_tokens))
        return self.out(self.norm(self.blocks(x + self.pos)))


@register("masked_kd", params=MaskedKDParams, paper=_PAPER, live_teacher=True, teacher_on_batch=False)
class MaskedKD(Method):
    """DMAE: student and teacher on the same heavily masked input; intermediate features of the visible patches aligned."""

    def __init__(self, params: MaskedKDParams, *, student, teacher_layers, num_classes):
        super().__init__(params, student=student, teacher_layers=teacher_layers, num_classes=num_classes)
        s_layers = list(getattr(student, "default_feature_layers", []) or [])
        self.t_layer = _stage(teacher_layers, params.teacher_layer, "teacher")
        self.s_layer = _stage(s_layers, params.student_layer, "student")
        self.r_layer = None
        if params.recon_weight > 0:
            self.r_layer = params.recon_layer or (s_layers[-1] if s_layers else self.s_layer)
        self.teacher_taps = [self.t_layer]
        self.student_taps = list(dict.fromkeys([self.s_layer] + ([self.r_layer] if self.r_layer else [])))
        self.s_drop = _is_vit(student)
        names = teacher_layers or []
        self.t_drop = (params.teacher_tokens == "drop" or
                       (params.teacher_tokens == "auto" and any(n.startswith("blocks.") for n in names)))
        self.patch = params.patch_size or (int(student.patch_embed.kernel_size[0]) if self.s_drop else None)
        self.teacher_flops_fraction = float("nan")

    # -- masking ---------------------------------------------------------------------------

    def _grid(self, x: torch.Tensor) -> tuple[int, int]:
        return x.shape[-2] // self.patch, x.shape[-1] // self.patch

    def sample_mask(self, x: torch.Tensor) -> torch.Tensor:
        gh, gw = self._grid(x)
        return random_visible_patches(x.shape[0], gh * gw, self.params.mask_ratio, device=x.device)

    def _pass_args(self, x, visible, drop: bool) -> dict:
        """The masked input of one model: its visible tokens (class token first), or zeroed patches."""
        if drop:
            cls = torch.zeros(visible.shape[0], 1, dtype=visible.dtype, device=visible.device)
            return {"inputs": x, "keep": ("blocks.0", torch.cat([cls, visible + 1], 1))}
        return {"inputs": zero_masked_patches(x, visible, self.patch)}

    def teacher_masked(self, x, visible):
        a = self._pass_args(x, visible, self.t_drop)
        return self.teacher_forward(a.pop("inputs"), until_taps=True, **a)

    def student_masked(self, x, visible):
        a = self._pass_args(x, visible, self.s_drop)
        with _running_stats_frozen(self._student):
            return self.student_forward(a.pop("inputs"), features=True, **a)

    def _visible(self, feat: torch.Tensor, visible: torch.Tensor, dropped: bool, grid) -> torch.Tensor:
        """(B, K, D) features of the visible patches, or (B, D) for a vector feature."""
        n = grid[0] * grid[1]
        if feat.dim() == 4:
            return take_tokens(grid_tokens(feat, grid), visible)
        if feat.dim() == 3 and dropped:
            return feat[:, 1:]  # the class token first, then the visible patches in mask order
        if feat.dim() == 3 and feat.shape[1] in (n, n + 1):  # a ViT run on zeroed patches
            return take_tokens(feat[:, -n:], visible)
        if feat.dim() == 2:
            return feat
        raise ValueError(f"feature of shape {tuple(feat.shape)} does not match the {grid[0]}x{grid[1]} patch grid; "
                         "set method.params.patch_size to the ViT's patch size")

    def _decoder_tokens(self, feat, visible, grid) -> torch.Tensor:
        """The decoder's input, one token per visible patch; a vector feature (an MLP student) is
        repeated at every visible position -- the decoder's position embeddings and mask tokens
        still say which patches it must fill in."""
        r = self._visible(feat, visible, self.s_drop, grid)
        return r.unsqueeze(1).expand(-1, visible.shape[1], -1) if r.dim() == 2 else r

    # -- setup -----------------------------------------------------------------------------

    def setup(self, student_out, teacher_out):
        x = student_out.inputs
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError("masked_kd masks image patches: the data must be images (B, C, H, W)")
        if self.patch is None:
            self.patch = self._teacher_patch(x) if self.t_drop else 4
        if x.shape[-2] % self.patch or x.shape[-1] % self.patch:
            raise ValueError(f"patch_size {self.patch} does not divide the image size {tuple(x.shape[-2:])}")
        grid = self._grid(x)
        if self.s_drop and int(self._student.patch_embed.kernel_size[0]) != self.patch:
            raise ValueError(f"the student ViT's patches are {self._student.patch_embed.kernel_size[0]} px but the mask "
                             f"uses {self.patch} px: set method.params.patch_size to the student's patch size")
        visible = self.sample_mask(x)
        self.teacher_flops_fraction = self._flops_fraction(x, visible)
        with torch.no_grad():
            t = self._visible(self.teacher_masked(x, visible).features[self.t_layer], visible, self.t_drop, grid)
            s_out = self.student_masked(x, visible)
            s = self._visible(s_out.features[self.s_layer], visible, self.s_drop, grid)
        if t.dim() == 3 and s.dim() == 3 and t.shape[1] != s.shape[1]:
            raise ValueError(f"teacher keeps {t.shape[1]} visible tokens, student {s.shape[1]}: a token-dropping "
                             "teacher must share the student's patch grid (set method.params.patch_size)")
        self.token_mode = t.dim() == 3 and s.dim() == 3
        self.projector = nn.Linear(s.shape[-1], t.shape[-1], device=s.device)
        if self.r_layer:
            r = self._decoder_tokens(s_out.features[self.r_layer], visible, grid)
            self.decoder = MAEDecoder(r.shape[-1], grid[0] * grid[1], self.patch ** 2 * x.shape[1],
                                      self.params.decoder_dim, self.params.decoder_depth).to(x.device)

    def _teacher_patch(self, x) -> int:
        tokens = self.teacher_forward(x, until_taps=True).features[self.t_layer]
        n = tokens.shape[1] - 1 if tokens.dim() == 3 else 0
        side = int(round((x.shape[-2] * x.shape[-1] / max(n, 1)) ** 0.5))
        if tokens.dim() != 3 or side * side * n != x.shape[-2] * x.shape[-1]:
            raise ValueError(f"cannot read the teacher's patch size from its feature {tuple(tokens.shape)}: "
                             "set method.params.patch_size")
        return side

    def _flops_fraction(self, x, visible) -> float:
        """Teacher FLOPs of the masked pass up to the tap / of the full pass to the logits (probe batch)."""
        with FlopCounterMode(display=False) as full:
            self.teacher_forward(x)
        with FlopCounterMode(display=False) as masked:
            self.teacher_masked(x, visible)
        return masked.get_total_flops() / max(1, full.get_total_flops())

    # -- training --------------------------------------------------------------------------

    def forward(self, student_out, teacher_out, targets, progress):
        x = student_out.inputs
        grid, visible = self._grid(x), self.sample_mask(x)
        t = self._visible(self.teacher_masked(x, visible).features[self.t_layer], visible, self.t_drop, grid)
        s_out = self.student_masked(x, visible)
        s = self._visible(s_out.features[self.s_layer], visible, self.s_drop, grid)
        if not self.token_mode:  # a vector on either side: compare one vector per sample
            s = s.mean(1) if s.dim() == 3 else s
            t = t.mean(1) if t.dim() == 3 else t
        terms = {"ce": self.params.ce_weight * L.cross_entropy(student_out.logits, targets=targets),
                 "feature": self.params.feature_weight * feature_distance(self.projector(s), t,
                                                                          distance=self.params.distance)}
        if self.r_layer:
            r = self._decoder_tokens(s_out.features[self.r_layer], visible, grid)
            pred = self.decoder(r, visible)
            terms["reconstruction"] = self.params.recon_weight * masked_reconstruction(
                pred, x, visible, self.patch, norm_pix=self.params.norm_pix)
        return terms

    def log_values(self) -> dict[str, float]:
        return {"teacher_flops_fraction": self.teacher_flops_fraction}
