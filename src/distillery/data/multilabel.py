"""A real multi-label image task built from a single-label one: g x g mosaics.

Each sample of a split becomes a mosaic of ``g * g`` images: its own image in the top-left
tile and ``g * g - 1`` others drawn (seeded) from the same split; its label is the multi-hot
vector of the classes that appear.  Mosaics are built after the train/val/test split and any
``train_subset``, from each split's own images only, so no test image leaks into training.
With Fashion-MNIST and g = 2 a sample shows 4 garments (56 x 56) and has 1-4 positive labels.
"""
from __future__ import annotations

import torch

from distillery.data import Split


def mosaic(split: Split, grid: int, num_classes: int, generator: torch.Generator) -> Split:
    """``(N, C, H, W)`` images with int labels -> ``(N, C, grid*H, grid*W)`` mosaics with float
    multi-hot labels ``(N, num_classes)``.  Row ``i`` keeps ``split.index[i]``."""
    x, y = split.inputs, split.labels
    n, c, h, w = x.shape
    tiles = grid * grid
    others = torch.randint(n, (n, tiles - 1), generator=generator) if n else torch.zeros(0, tiles - 1, dtype=torch.long)
    idx = torch.cat([torch.arange(n).unsqueeze(1), others], 1)  # (N, g*g)
    grid_x = x[idx].view(n, grid, grid, c, h, w).permute(0, 3, 1, 4, 2, 5).reshape(n, c, grid * h, grid * w)
    labels = torch.zeros(n, num_classes).scatter_(1, y[idx], 1.0)
    return Split(grid_x.contiguous(), labels, split.index)
