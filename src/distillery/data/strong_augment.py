"""A strong, tensor-level image augmentation for consistency methods (e.g. MDCS's strong view).

MDCS (Zhao et al. 2023) makes its strong view with AutoAugment-style policies on
PIL images (following NCL and PaCo).  Distillery's inputs are already normalised tensors, so
this is a tensor-only stand-in of comparable strength: a wider random pad-crop, a horizontal
flip, cutout (DeVries & Taylor 2017, one zeroed square per image -- zero is the channel mean
after normalisation) and additive Gaussian noise.  Like :mod:`distillery.data.augment` it
works on a whole ``(N, C, H, W)`` batch and draws every random number from the generator
passed in, in a fixed order, so the same generator state gives the same batch on any device.
"""
from __future__ import annotations

import torch

from distillery.data.augment import _check_images, random_flip, random_pad_crop

__all__ = ["cutout", "strong_augment"]


def cutout(x: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Zero one ``size x size`` square per image, centred uniformly on the image (the square may
    hang over the border, as in the original cutout)."""
    _check_images(x)
    if size <= 0:
        return x
    n, _, h, w = x.shape
    cy = torch.randint(0, h, (n,), generator=generator, device=generator.device).to(x.device)
    cx = torch.randint(0, w, (n,), generator=generator, device=generator.device).to(x.device)
    top, left = cy - size // 2, cx - size // 2
    rows = torch.arange(h, device=x.device)[None, :]
    cols = torch.arange(w, device=x.device)[None, :]
    in_rows = (rows >= top[:, None]) & (rows < top[:, None] + size)  # (N, H)
    in_cols = (cols >= left[:, None]) & (cols < left[:, None] + size)  # (N, W)
    hole = in_rows[:, None, :, None] & in_cols[:, None, None, :]  # (N, 1, H, W)
    return x.masked_fill(hole, 0.0)


def strong_augment(
    x: torch.Tensor,
    generator: torch.Generator,
    *,
    crop: float = 0.125,
    flip: bool = True,
    cutout_size: float = 0.5,
    noise_std: float = 0.1,
) -> torch.Tensor:
    """Pad-crop by ``crop`` of the image side, flip, cutout of side ``cutout_size`` of the shorter
    side, then add ``N(0, noise_std^2)`` noise; in that order (and that order of random draws).

    Sizes are fractions so the same setting suits 8x8 digits (pad 1, hole 4) and 28x28
    Fashion-MNIST (pad 4, hole 14).  The input is never modified in place.
    """
    _check_images(x)
    _, _, h, w = x.shape
    pad = int(round(crop * min(h, w)))
    if crop > 0:
        pad = max(pad, 1)
    x = random_pad_crop(x, pad, generator)
    if flip:
        x = random_flip(x, generator)
    x = cutout(x, int(round(cutout_size * min(h, w))), generator)
    if noise_std > 0:
        noise = torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype)
        x = x + noise_std * noise.to(x.device)
    return x
