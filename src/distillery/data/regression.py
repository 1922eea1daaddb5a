"""Regression data: continuous targets ``(N, K)`` instead of class ids.

Two real sources (``data.name``):

* ``diabetes`` -- scikit-learn's bundled diabetes table (Efron et al. 2004): 442 patients,
  10 baseline features, one target (disease progression after a year).  Offline.
* ``fmnist_landmarks`` -- a landmark task built from the real Fashion-MNIST IDX files (the ones
  ``fashion_mnist`` reads): each 28 x 28 garment is drawn at a random scale and offset on a
  larger empty canvas (``data.image_size``, default 40 x 40) and the targets are the landmarks
  of the ink actually drawn: its bounding box (left, top, right, bottom) and its
  intensity-weighted centroid, as pixel-centre coordinates divided by the canvas size (in
  [0, 1]).  Scale and offset are drawn per sample from a generator seeded by
  ``(split_seed, source split)``, so a sample's placement never depends on subsetting.

:func:`load_regression` is what :func:`distillery.data.load_data` calls for these names.  It
differs from the classification path in three ways: held-out splits and ``train_subset`` are
uniform random picks (there is no class to stratify by); the targets are standardised with the
mean and standard deviation of the training split *before* ``train_subset`` -- so a teacher
trained on every training row and a student trained on a subset predict in the same units --
and those statistics travel with every split (``Split.target_mean`` / ``target_std``) so that
metrics are reported in the data's own units; ``data.soft_targets`` replaces the training
targets (only those) with their Active Shape Model smoothing, the soft landmarks of the
tolerant teacher in Fard & Mahoor's two-teacher distillation.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch
import torch.nn.functional as F

from distillery.config import DataConfig
from distillery.data import DataBundle, Split, _fingerprint, _generator, _normalise
from distillery.data.sources import RawData, RawSplit, fashion_mnist
from distillery.errors import DataError

__all__ = ["REGRESSION_SOURCES", "LANDMARK_NAMES", "load_regression", "diabetes", "fmnist_landmarks", "place_on_canvas",
           "ink_landmarks"]

#: The six targets of ``fmnist_landmarks``, in order.
LANDMARK_NAMES = ["left", "top", "right", "bottom", "centroid_x", "centroid_y"]
#: Side of the drawn garment as a share of the canvas side: from 0.45 to 0.9.
SCALE_RANGE = (0.45, 0.9)
#: A pixel counts as ink from this value on (of 255): the faint anti-aliased fringe does not.
INK_THRESHOLD = 26


def diabetes(cfg: DataConfig) -> RawData:
    """scikit-learn's diabetes table, unscaled features (age, sex, bmi, bp, s1..s6)."""
    try:
        from sklearn.datasets import load_diabetes
    except ImportError:
        raise DataError("data.name: diabetes needs scikit-learn: pip install scikit-learn") from None
    bunch = load_diabetes(scaled=False)
    x = torch.from_numpy(np.ascontiguousarray(bunch.data, dtype=np.float64))
    y = torch.from_numpy(np.ascontiguousarray(bunch.target, dtype=np.float64)).unsqueeze(1)
    return RawData(kind="table", class_names=["disease_progression"], source="scikit-learn diabetes (bundled, 442 x 10)",
                   train=RawSplit(x, y), feature_names=list(bunch.feature_names))


def place_on_canvas(images: torch.Tensor, canvas: int, generator: torch.Generator,
                    chunk: int = 2048) -> torch.Tensor:
    """Draw each uint8 ``(N, 1, h, w)`` image at a random scale (``SCALE_RANGE`` of the canvas
    side) and offset on an empty ``canvas x canvas`` uint8 image (bilinear resampling).

    The map from canvas to image is an axis-aligned scale and shift: with pixel-edge
    coordinates and ``align_corners=False``, canvas edge ``e`` samples the image at
    ``(e - offset) * h / size``, which in grid_sample's [-1, 1] coordinates is
    ``x_in = (canvas / size) * x_out + (canvas - 2 offset) / size - 1`` (the grid is built from
    that directly: separable, so far cheaper than ``affine_grid``)."""
    n = images.shape[0]
    lo, hi = SCALE_RANGE
    size = canvas * (lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64))
    room = canvas - size
    ox = room * torch.rand(n, generator=generator, dtype=torch.float64)
    oy = room * torch.rand(n, generator=generator, dtype=torch.float64)
    centres = (2 * torch.arange(canvas, dtype=torch.float64) + 1) / canvas - 1  # pixel centres in [-1, 1]
    gx = (canvas / size)[:, None] * centres + ((canvas - 2 * ox) / size - 1)[:, None]  # (N, canvas)
    gy = (canvas / size)[:, None] * centres + ((canvas - 2 * oy) / size - 1)[:, None]
    out = torch.empty(n, images.shape[1], canvas, canvas, dtype=torch.uint8)
    for start in range(0, n, chunk):
        part = slice(start, start + chunk)
        m = gx[part].shape[0]
        grid = torch.stack([gx[part, None, :].expand(m, canvas, canvas), gy[part, :, None].expand(m, canvas, canvas)], -1)
        drawn = F.grid_sample(images[part].float(), grid.float(), mode="bilinear", padding_mode="zeros", align_corners=False)
        out[part] = drawn.clamp_(0, 255).add_(0.5).to(torch.uint8)  # +0.5 then truncation: rounding
    return out


def ink_landmarks(canvas: torch.Tensor) -> torch.Tensor:
    """Landmarks of the ink on uint8 ``(N, 1, S, S)`` images: ``(N, 6)`` float64 targets
    ``left, top, right, bottom`` (centres of the outermost ink pixels) and the intensity-weighted
    centroid, each as ``(pixel + 0.5) / S``."""
    n, _, s, _ = canvas.shape
    ink = canvas[:, 0] >= INK_THRESHOLD
    empty = ~ink.flatten(1).any(1)
    if empty.any():
        raise DataError(f"fmnist_landmarks: {int(empty.sum())} image(s) have no ink pixel >= {INK_THRESHOLD}; "
                        "the IDX files look corrupt (reinstall dataset-fashion-mnist)")
    pos = torch.arange(s, dtype=torch.float64)
    cols, rows = ink.any(1), ink.any(2)  # (N, S): some ink in column x / row y
    # argmax of a bool row is its first True: the first ink column from the left, or from the right when flipped
    left, right = cols.byte().argmax(1), s - 1 - cols.flip(1).byte().argmax(1)
    top, bottom = rows.byte().argmax(1), s - 1 - rows.flip(1).byte().argmax(1)
    img = canvas[:, 0]
    col_mass = img.sum(1, dtype=torch.int64).to(torch.float64)  # (N, S), exact integer sums
    row_mass = img.sum(2, dtype=torch.int64).to(torch.float64)
    mass = col_mass.sum(1)
    cx = (col_mass @ pos) / mass
    cy = (row_mass @ pos) / mass
    left, right, top, bottom = (v.to(torch.float64) for v in (left, right, top, bottom))
    return (torch.stack([left, top, right, bottom, cx, cy], 1) + 0.5) / s


def fmnist_landmarks(cfg: DataConfig) -> RawData:
    """Fashion-MNIST garments on a ``cfg.image_size`` canvas (default 40); targets: ink landmarks."""
    canvas = cfg.image_size or 40
    if canvas < 16:
        raise DataError(f"data.image_size={canvas} is too small a canvas for fmnist_landmarks; use 16 or more (default 40)")
    raw = fashion_mnist(cfg.model_copy(update={"image_size": None}))  # the canvas is drawn here, not resized

    def build(part: RawSplit, name: str) -> RawSplit:
        drawn = place_on_canvas(part.inputs, canvas, _generator(cfg.split_seed, f"landmarks:{name}"))
        return RawSplit(drawn, ink_landmarks(drawn))

    return RawData(kind="image", class_names=list(LANDMARK_NAMES),
                   source=f"{raw.source}, drawn on a {canvas}x{canvas} canvas (ink landmarks)",
                   train=build(raw.train, "train"), test=build(raw.test, "test"))


REGRESSION_SOURCES = {"diabetes": diabetes, "fmnist_landmarks": fmnist_landmarks}


# ---------------------------------------------------------------------------------------------


def _check(cfg: DataConfig) -> None:
    """Options of the classification path that mean nothing (or something wrong) here."""
    if cfg.classes is not None:
        raise DataError(f"data.classes keeps class ids, but {cfg.name} is a regression source (no classes); remove data.classes")
    if cfg.mosaic is not None:
        raise DataError(f"data.mosaic builds multi-label images from classes; {cfg.name} is a regression source: remove it")
    if cfg.augment.pad_crop > 0 or cfg.augment.flip:
        raise DataError(f"data.augment would move the image but not its targets ({cfg.name} is a regression source); "
                        "set data.augment.pad_crop: 0 and data.augment.flip: false")
    if cfg.name == "diabetes" and cfg.image_size is not None:
        raise DataError("data.image_size has no meaning for the diabetes table; remove it")


def _random_pick(n: int, k: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``k`` of ``n`` rows uniformly at random: ``(picked, rest)``, both sorted."""
    perm = torch.randperm(n, generator=generator)
    return perm[:k].sort().values, perm[k:].sort().values


def _carve(pool: Split, fraction: float, generator: torch.Generator) -> tuple[Split, Split]:
    k = int(round(len(pool) * fraction))
    if fraction > 0 and len(pool) > 1:
        k = max(k, 1)
    held, rest = _random_pick(len(pool), k, generator)
    return pool.take(rest), pool.take(held)


def load_regression(cfg: DataConfig) -> DataBundle:
    """Load a regression source: random splits, inputs normalised as for classification, targets
    standardised (see the module docstring)."""
    from distillery.losses.regression import asm_project, fit_shape_model

    _check(cfg)
    raw = REGRESSION_SOURCES[cfg.name](cfg)
    dims = raw.train.labels.shape[1]
    if cfg.soft_targets is not None and cfg.soft_targets.pca_components > dims:
        raise DataError(f"data.soft_targets.pca_components={cfg.soft_targets.pca_components} exceeds the {dims} "
                        f"target(s) of {cfg.name}; use 1..{dims}")

    def as_split(part: RawSplit | None) -> Split | None:
        return None if part is None else Split(part.inputs, part.labels, torch.arange(len(part.labels)))

    train, val, test = as_split(raw.train), as_split(raw.val), as_split(raw.test)
    if test is None:
        train, test = _carve(train, cfg.test_fraction, _generator(cfg.split_seed, "test"))
    if val is None:
        train, val = _carve(train, cfg.val_fraction, _generator(cfg.split_seed, "val"))
    # Target statistics of the whole training split, before train_subset: see the module docstring.
    y = train.labels
    target_mean = y.mean(0)
    target_std = y.std(0, unbiased=False)
    target_std = torch.where(target_std > 1e-12, target_std, torch.ones_like(target_std))
    if cfg.train_subset is not None and cfg.train_subset < len(train):
        if cfg.train_subset < 2:
            raise DataError(f"data.train_subset={cfg.train_subset}: a regression needs at least 2 training samples")
        keep, _ = _random_pick(len(train), cfg.train_subset, _generator(cfg.split_seed, "subset"))
        train = train.take(keep)

    splits = {"train": train, "val": val, "test": test}
    fingerprint = _fingerprint(cfg, raw, splits)
    splits, mean, std = _normalise(splits, raw)
    if cfg.soft_targets is not None:
        st = cfg.soft_targets
        shape = fit_shape_model(splits["train"].labels, st.pca_components)
        soft = asm_project(splits["train"].labels, *shape, clip=st.clip)
        splits["train"] = Split(splits["train"].inputs, soft, splits["train"].index)
        fingerprint = hashlib.sha256(f"{fingerprint}:soft{st.pca_components},{st.clip}".encode()).hexdigest()

    t_mean, t_std = target_mean.to(torch.float32), target_std.to(torch.float32)
    splits = {name: Split(s.inputs, ((s.labels - target_mean) / target_std).to(torch.float32), s.index, t_mean, t_std)
              for name, s in splits.items()}
    x = splits["train"].inputs
    image = raw.kind == "image"
    return DataBundle(
        train=splits["train"], val=splits["val"], test=splits["test"],
        num_classes=dims, class_names=list(raw.class_names), kind=raw.kind,
        in_channels=int(x.shape[1]) if image else None,
        input_size=(int(x.shape[2]), int(x.shape[3])) if image else (int(x.shape[1]),),
        fingerprint=fingerprint, source=raw.source, mean=mean, std=std,
        feature_names=raw.feature_names, task="regression",
    )
