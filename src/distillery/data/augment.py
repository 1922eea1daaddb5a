"""Batch-level image augmentation: random pad-and-crop and horizontal flip.

Both operate on a whole ``(N, C, H, W)`` batch with tensor indexing (no Python loop over
samples) and draw their randomness only from the generator passed in, so the same
generator state gives the same augmented batch, on any device.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from distillery.config import AugmentConfig
from distillery.errors import DataError

__all__ = ["augment_batch", "apply_params", "sample_params", "random_pad_crop", "random_flip"]


def _check_images(x: torch.Tensor) -> None:
    if x.dim() != 4:
        raise DataError(
            f"augmentation applies to image batches of shape (N, C, H, W), got {tuple(x.shape)}; "
            "turn data.augment off for table and text data"
        )


def _crop_at(x: torch.Tensor, pad: int, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # (N, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # (N, 1, 1, W)
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chan, rows, cols]


def sample_params(n: int, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Draw the augmentation parameters of ``n`` samples: an int16 tensor ``(n, 3)`` of
    ``(dy, dx, flip)``.  Storing these few bytes instead of pixels is what lets a teacher
    cache replay exactly the view the teacher saw (Faghri et al. 2023; Shen & Xing 2022)."""
    params = torch.zeros(n, 3, dtype=torch.int16)
    if cfg.pad_crop > 0:
        params[:, :2] = torch.randint(0, 2 * cfg.pad_crop + 1, (n, 2), generator=generator).to(torch.int16)
    else:
        params[:, :2] = 0
    if cfg.flip:
        params[:, 2] = (torch.rand(n, generator=generator) < 0.5).to(torch.int16)
    return params


def apply_params(x: torch.Tensor, params: torch.Tensor, cfg: AugmentConfig) -> torch.Tensor:
    """Apply parameters from :func:`sample_params` to an image batch (deterministic)."""
    _check_images(x)
    params = params.to(device=x.device, dtype=torch.long)
    if cfg.pad_crop > 0:
        x = _crop_at(x, cfg.pad_crop, params[:, 0], params[:, 1])
    if cfg.flip:
        x = torch.where(params[:, 2].bool()[:, None, None, None], x.flip(-1), x)
    return x


def random_pad_crop(x: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Zero-pad every image by ``pad`` pixels on each side, then crop a random ``H x W`` window.

    Each sample gets its own offsets ``(dy, dx)`` in ``[0, 2*pad]``, so output ``n`` is
    ``F.pad(x, (pad,)*4)[n, :, dy:dy+H, dx:dx+W]``.  The windows are gathered in one
    advanced-indexing operation.
    """
    _check_images(x)
    if pad <= 0:
        return x
    n, c, h, w = x.shape
    offsets = torch.randint(0, 2 * pad + 1, (2, n), generator=generator, device=generator.device).to(x.device)
    return _crop_at(x, pad, offsets[0], offsets[1])


def random_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flip each image left-right with probability 0.5 (one coin per sample)."""
    _check_images(x)
    flip = torch.rand(x.shape[0], generator=generator, device=generator.device).to(x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def augment_batch(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Augment a training batch of images ``(N, C, H, W)`` as ``cfg`` says.

    Pad-crop (if ``cfg.pad_crop > 0``) runs first, then the flip (if ``cfg.flip``); the
    random numbers come from ``generator`` in that order, so results are reproducible
    given its state.  With both off the input is returned unchanged (the same tensor).
    The input is never modified in place.
    """
    if cfg.pad_crop <= 0 and not cfg.flip:
        return x
    _check_images(x)
    return apply_params(x, sample_params(x.shape[0], cfg, generator), cfg)
