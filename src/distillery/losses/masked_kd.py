"""Masked-input feature distillation (DMAE), written as pure functions of tensors.

Bai, Wang, Xiao, Wei, Wang, Yuille, Zhou & Xie (2023), "Masked Autoencoders Enable Efficient
Knowledge Distillers", CVPR (arXiv 2208.12256).  The student sees only a small visible subset of
patches; its objective is MAE's pixel reconstruction of the masked patches plus the distance
between its (projected) intermediate features and the teacher's on the same visible patches:

    L = L_rec(decoder(student(x_vis)), x_masked) + alpha * D(P(f_s(x_vis)), f_t(x_vis))

The mask, the patch grid and the distances live here; projectors, decoders and which layer is
tapped belong to the method (:mod:`distillery.methods.masked_kd`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _up(x: Tensor) -> Tensor:
    """Half precision is upcast to float32; float32 / float64 are kept (gradchecks run in float64)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def random_visible_patches(batch: int, n_patches: int, mask_ratio: float, *,
                           generator: torch.Generator | None = None, device=None) -> Tensor:
    """MAE's per-sample random masking (He et al. 2022, Sec. 3): shuffle the patches of each sample
    and keep the first ``n - round(n * mask_ratio)`` (at least one).  Returns the visible patch
    indices (B, K), sorted so that kept tokens stay in raster order; every sample keeps exactly K."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}: at least one patch must stay visible")
    keep = max(1, n_patches - round(n_patches * mask_ratio))
    noise = torch.rand(batch, n_patches, generator=generator)
    return noise.argsort(dim=1)[:, :keep].sort(dim=1).values.to(device)


def patchify(images: Tensor, patch: int) -> Tensor:
    """(B, C, H, W) -> (B, N, patch*patch*C), patches in raster order (the ViT's token order)."""
    b, c, h, w = images.shape
    if h % patch or w % patch:
        raise ValueError(f"patch size {patch} does not divide the image size {h}x{w}")
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def visible_mask(visible: Tensor, n_patches: int) -> Tensor:
    """Boolean (B, N): True at the visible patches."""
    mask = torch.zeros(visible.shape[0], n_patches, dtype=torch.bool, device=visible.device)
    return mask.scatter_(1, visible, True)


def zero_masked_patches(images: Tensor, visible: Tensor, patch: int) -> Tensor:
    """The input a CNN or MLP sees: masked patches set to zero, visible ones untouched (a model
    without tokens cannot drop them, so it runs on the whole, partly blank image)."""
    b, _, h, w = images.shape
    keep = visible_mask(visible, (h // patch) * (w // patch)).to(images.dtype)
    keep = keep.reshape(b, 1, h // patch, w // patch)
    return images * keep.repeat_interleave(patch, 2).repeat_interleave(patch, 3)


def grid_tokens(feature_map: Tensor, grid: tuple[int, int]) -> Tensor:
    """A CNN feature map (B, C, h, w) as one token per input patch: average-pooled (or, if
    coarser, bilinearly upsampled) to the patch grid, then (B, gh*gw, C) in raster order."""
    if feature_map.shape[-2:] != torch.Size(grid):
        if feature_map.shape[-1] >= grid[1]:
            feature_map = F.adaptive_avg_pool2d(feature_map, grid)
        else:
            feature_map = F.interpolate(feature_map, size=grid, mode="bilinear", align_corners=False)
    return feature_map.flatten(2).transpose(1, 2)


def take_tokens(tokens: Tensor, index: Tensor) -> Tensor:
    """Rows of ``tokens`` (B, N, D) at ``index`` (B, K)."""
    return tokens.gather(1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def feature_distance(student: Tensor, teacher: Tensor, *, distance: str = "smooth_l1") -> Tensor:
    """DMAE's distillation term D(P(f_s), f_t) on the visible patches, averaged over every element
    (so the scale does not grow with the number of tokens or the width).  ``student`` is the
    already projected student feature, same shape as ``teacher``."""
    if student.shape != teacher.shape:
        raise ValueError(f"feature_distance needs equal shapes: student {tuple(student.shape)} vs teacher "
                         f"{tuple(teacher.shape)}; project the student features to the teacher's width first")
    s, t = _up(student), _up(teacher)
    if distance == "l1":
        return F.l1_loss(s, t)
    if distance == "smooth_l1":
        return F.smooth_l1_loss(s, t)
    if distance == "mse":
        return F.mse_loss(s, t)
    raise ValueError(f"unknown distance '{distance}'; use one of: l1, smooth_l1, mse")


def masked_reconstruction(pred: Tensor, images: Tensor, visible: Tensor, patch: int, *,
                          norm_pix: bool = True, eps: float = 1e-6) -> Tensor:
    """MAE's reconstruction loss (He et al. 2022, Sec. 3): mean squared error between the decoder's
    pixels ``pred`` (B, N, patch*patch*C) and the target patches, computed on the *masked* patches
    only.  ``norm_pix``: each target patch normalised by its own mean and variance (MAE's
    better-performing target, Table 1c)."""
    pred = _up(pred)
    target = patchify(images, patch).to(pred.dtype)
    if pred.shape != target.shape:
        raise ValueError(f"decoder output {tuple(pred.shape)} does not match the patches {tuple(target.shape)}")
    if norm_pix:
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        target = (target - mean) / (var + eps).sqrt()
    per_patch = (pred - target).pow(2).mean(-1)  # (B, N)
    masked = (~visible_mask(visible, target.shape[1])).float()
    return (per_patch * masked).sum() / masked.sum().clamp_min(1.0)
