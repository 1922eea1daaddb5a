"""Datasets for distillation: load, split, normalise, fingerprint.

:func:`load_data` is the one entry point::

    bundle = load_data(cfg.data)          # DataBundle with train / val / test Splits
    bundle.train.inputs, bundle.train.labels

It works the same for every source (see :mod:`distillery.data.sources`):

1. the source reads raw inputs, labels ``0..C-1`` and any official test/validation split;
2. a missing test split is carved out of train (``test_fraction``), then a missing
   validation split (``val_fraction`` of what is left), both stratified by class;
   ``classes`` then keeps only the listed classes in every split, relabelled ``0..k-1``
   in the listed order (after the split, so a class's test rows are the same with or without it);
3. ``train_subset`` keeps a stratified subset of the remaining training rows
   (validation and test are unaffected);
4. the fingerprint hashes the raw content of the three splits plus the config fields
   that shape them;
5. images are scaled to ``[0, 1]`` and normalised per channel, tables standardised per
   feature, both with statistics of the final train split applied to every split.

Every random choice uses a ``torch.Generator`` seeded from ``split_seed`` (never the
global RNG), so the splits are identical across runs and processes.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from distillery.config import DataConfig
from distillery.data.augment import augment_batch
from distillery.data.sources import RawData, load_source
from distillery.errors import DataError

__all__ = ["Split", "DataBundle", "load_data", "augment_batch"]

#: Bumped when the splitting or hashing scheme changes, so old fingerprints stop matching.
_FINGERPRINT_VERSION = "distillery-data-v1"
#: DataConfig fields that decide what ends up in the splits (batch sizes and augmentation don't).
_SHAPING_FIELDS = (
    "name", "label_column", "input_column", "feature_columns", "image_size", "tokenizer",
    "max_length", "val_fraction", "test_fraction", "train_subset", "split_seed",
)


@dataclass
class Split:
    """Inputs and labels of one split.

    ``inputs`` is a float32 tensor (images ``(N, C, H, W)``, tables ``(N, F)``) or, for
    text, a dict of ``(N, L)`` token tensors (``input_ids``, ``attention_mask`` ...).
    ``labels`` is int64 ``(N,)``, float multi-hot ``(N, C)`` for a multi-label task, or
    standardised float targets ``(N, K)`` for a regression task.  ``index`` holds each row's position in the source split
    it was drawn from (the official train or test set), which makes splits easy to audit.
    """

    inputs: torch.Tensor | dict[str, torch.Tensor]
    labels: torch.Tensor
    index: torch.Tensor | None = None
    # Regression only: labels are standardised float targets (N, K); a prediction ``p`` is
    # ``p * target_std + target_mean`` in the data's own units (metrics are reported in those).
    target_mean: torch.Tensor | None = None
    target_std: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def take(self, index: torch.Tensor) -> "Split":
        """A new Split with the rows ``index`` (a LongTensor of positions or a bool mask)."""
        if isinstance(self.inputs, dict):
            inputs = {k: v[index] for k, v in self.inputs.items()}
        else:
            inputs = self.inputs[index]
        return Split(inputs, self.labels[index], None if self.index is None else self.index[index],
                     self.target_mean, self.target_std)


@dataclass
class DataBundle:
    """The three splits plus what a model needs to know about them.

    ``input_size`` is ``(H, W)`` for images, ``(F,)`` for tables, ``None`` for text.
    ``mean``/``std`` are the normalisation statistics taken from the train split
    (per channel for images, per feature for tables; ``None`` for text): a raw image
    ``x`` in ``[0, 1]`` was turned into ``(x - mean) / std``.
    ``fingerprint`` is a sha256 hex digest of the split contents and the shaping config
    fields; it is stable across runs and processes.
    """

    train: Split
    val: Split
    test: Split
    num_classes: int
    class_names: list[str]
    kind: Literal["image", "table", "text"]
    in_channels: int | None
    input_size: tuple[int, ...] | None
    fingerprint: str
    source: str
    mean: list[float] | None = None
    std: list[float] | None = None
    feature_names: list[str] | None = field(default=None, repr=False)
    # "multilabel": labels are float multi-hot (N, num_classes) rather than class ids (N,);
    # "regression": labels are standardised float targets (N, num_classes), num_classes is the
    # output dimension K and class_names name the targets (see distillery.data.regression)
    task: Literal["multiclass", "multilabel", "regression"] = "multiclass"

    def describe(self) -> str:
        """One line for logs, e.g. ``image 1x28x28, 10 classes: 54000 train / 6000 val / 10000 test``."""
        if self.kind == "image":
            shape = f"{self.in_channels}x" + "x".join(map(str, self.input_size or ()))
        elif self.kind == "table":
            shape = f"{self.input_size[0]} features" if self.input_size else ""
        else:
            shape = f"{self.train.inputs['input_ids'].shape[1]} tokens" if isinstance(self.train.inputs, dict) else ""
        outputs = f"{self.num_classes} regression targets" if self.task == "regression" else f"{self.num_classes} classes"
        return (
            f"{self.kind} {shape}, {outputs}: {len(self.train)} train / "
            f"{len(self.val)} val / {len(self.test)} test from {self.source}"
        )


# ---------------------------------------------------------------------------------------------
# Stratified splitting


def _generator(seed: int, stage: str) -> torch.Generator:
    """An independent generator per stage, derived from ``split_seed`` (so e.g. changing
    ``val_fraction`` leaves the test carve-out alone)."""
    digest = hashlib.sha256(f"{seed}:{stage}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _allocate(counts: np.ndarray, k: int, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Split ``k`` picks over classes in proportion to ``counts`` (largest remainder),
    keeping each class's pick within ``[lo, hi]``.  Gives fewer than ``k`` only when the
    bounds make ``k`` impossible."""
    ideal = counts * (k / max(int(counts.sum()), 1))
    alloc = np.clip(np.floor(ideal).astype(np.int64), lo, hi)
    diff = k - int(alloc.sum())
    while diff != 0:
        step = 1 if diff > 0 else -1
        room = alloc < hi if step > 0 else alloc > lo
        if not room.any():
            break
        # Classes furthest from their ideal share move first; ties by class id (stable sort).
        order = np.argsort(-(ideal - alloc) * step, kind="stable")
        order = order[room[order]][: abs(diff)]
        alloc[order] += step
        diff -= step * len(order)
    return alloc


def _stratified_pick(
    labels: torch.Tensor, k: int, num_classes: int, generator: torch.Generator, *, carve: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick ``k`` rows stratified by label; return ``(picked, rest)`` as sorted indices.

    ``carve=True`` (holding rows out for val/test) leaves at least one row of each class
    behind; ``carve=False`` (choosing a training subset) takes at least one of each class
    when ``k`` allows.  Vectorised: one random permutation, then a stable sort by label
    groups the rows per class in random order, and the first ``alloc[c]`` of class ``c``
    are picked.
    """
    n = labels.shape[0]
    labels_np = labels.numpy()
    perm = torch.randperm(n, generator=generator).numpy()
    grouped = perm[np.argsort(labels_np[perm], kind="stable")]  # numpy: far faster than torch here
    counts = np.bincount(labels_np, minlength=num_classes)
    if carve:
        lo, hi = np.zeros_like(counts), np.maximum(counts - 1, 0)
    else:
        lo = np.minimum(counts, 1) if k >= int((counts > 0).sum()) else np.zeros_like(counts)
        hi = counts
    alloc = _allocate(counts, k, lo, hi)
    starts = np.cumsum(counts) - counts
    grouped_labels = labels_np[grouped]
    rank = np.arange(n) - starts[grouped_labels]
    chosen = rank < alloc[grouped_labels]
    return torch.from_numpy(np.sort(grouped[chosen])), torch.from_numpy(np.sort(grouped[~chosen]))


def _carve(pool: Split, fraction: float, num_classes: int, generator: torch.Generator) -> tuple[Split, Split]:
    """Hold out ``fraction`` of ``pool`` (at least one row if the fraction is positive);
    return ``(rest, held_out)``."""
    k = int(round(len(pool) * fraction))
    if fraction > 0 and len(pool) > 1:
        k = max(k, 1)
    held, rest = _stratified_pick(pool.labels, k, num_classes, generator, carve=True)
    return pool.take(rest), pool.take(held)


# ---------------------------------------------------------------------------------------------
# Checks, fingerprint, normalisation


def _check_labels(raw: RawData) -> None:
    num_classes = len(raw.class_names)
    if num_classes < 2:
        raise DataError(f"{raw.source}: found {num_classes} class(es); classification needs at least 2")
    for name, part in (("train", raw.train), ("val", raw.val), ("test", raw.test)):
        if part is None or part.labels.numel() == 0:
            continue
        lo, hi = int(part.labels.min()), int(part.labels.max())
        if lo < 0 or hi >= num_classes:
            raise DataError(
                f"{raw.source}: {name} labels range over {lo}..{hi} but must be 0..{num_classes - 1} "
                f"for the {num_classes} classes {raw.class_names}"
            )
    if raw.train.labels.numel() == 0:
        raise DataError(f"{raw.source}: the training split is empty")


def _keep_classes(classes: list[int], raw: RawData, splits: tuple[Split, ...]) -> tuple[RawData, tuple[Split, ...]]:
    """Keep the rows of ``classes`` (source ids) in each split, relabelled to their position in
    ``classes``; the class names follow.  ``raw`` comes back with the kept names."""
    from dataclasses import replace

    names = raw.class_names
    bad = [c for c in classes if c >= len(names)]
    if bad:
        allowed = ", ".join(f"{i} ({n})" for i, n in enumerate(names))
        raise DataError(f"data.classes: {bad} not class ids of {raw.source}; allowed ids: {allowed}")
    relabel = torch.full((len(names),), -1, dtype=torch.long)
    relabel[torch.tensor(classes)] = torch.arange(len(classes))
    kept = []
    for split in splits:
        part = split.take(relabel[split.labels] >= 0)
        kept.append(Split(part.inputs, relabel[part.labels], part.index))
    return replace(raw, class_names=[names[c] for c in classes]), tuple(kept)


def _hash_tensor(h, name: str, t: torch.Tensor) -> None:
    arr = np.ascontiguousarray(t.detach().cpu().numpy())
    h.update(f"{name}:{arr.dtype.str}:{arr.shape};".encode())
    h.update(arr.reshape(-1).view(np.uint8))


def _fingerprint(cfg: DataConfig, raw: RawData, splits: dict[str, Split]) -> str:
    """sha256 over the shaping config, class names and the raw content of each split."""
    h = hashlib.sha256(_FINGERPRINT_VERSION.encode())
    meta = {f: getattr(cfg, f) for f in _SHAPING_FIELDS}
    meta.update(kind=raw.kind, class_names=raw.class_names, pixel_max=raw.pixel_max)
    if cfg.classes is not None:  # only when set: fingerprints of unfiltered data keep their value
        meta["classes"] = list(cfg.classes)
    h.update(json.dumps(meta, sort_keys=True).encode())
    for name, split in splits.items():
        h.update(f"[{name}:{len(split)}]".encode())
        if isinstance(split.inputs, dict):
            for key in sorted(split.inputs):
                _hash_tensor(h, f"inputs.{key}", split.inputs[key])
        else:
            _hash_tensor(h, "inputs", split.inputs)
        _hash_tensor(h, "labels", split.labels)
    return h.hexdigest()


def _image_stats(train: torch.Tensor, pixel_max: float) -> tuple[np.ndarray, np.ndarray]:
    """Exact per-channel mean/std (of pixel / pixel_max) from a uint8 image tensor, computed
    from value histograms in float64 so they are bit-identical on every run."""
    values = np.arange(256, dtype=np.float64) / pixel_max
    mean, std = [], []
    for c in range(train.shape[1]):
        hist = torch.bincount(train[:, c].reshape(-1), minlength=256).numpy().astype(np.float64)
        total = max(hist.sum(), 1.0)
        m = (hist * values).sum() / total
        var = (hist * (values - m) ** 2).sum() / total
        mean.append(m)
        std.append(np.sqrt(var))
    return np.array(mean), np.array(std)


def _normalise(splits: dict[str, Split], raw: RawData) -> tuple[dict[str, Split], list[float] | None, list[float] | None]:
    """Scale/standardise inputs with statistics of the train split; return float32 splits."""
    if raw.kind == "text":
        return splits, None, None
    train = splits["train"].inputs
    if raw.kind == "image":
        if train.dtype != torch.uint8:
            raise DataError(f"{raw.source}: internal error, images must be uint8 before normalisation")
        mean, std = _image_stats(train, raw.pixel_max)
        shape = (1, -1, 1, 1)
        scale = raw.pixel_max
    else:
        x = train.numpy()
        mean = x.mean(axis=0) if len(x) else np.zeros(x.shape[1])
        std = x.std(axis=0) if len(x) else np.ones(x.shape[1])
        shape = (1, -1)
        scale = 1.0
    std = np.where(std > 1e-12, std, 1.0)  # a constant channel/feature is centred, not scaled
    # (x / scale - mean) / std, folded into one subtraction and one division
    shift = torch.from_numpy((mean * scale).astype(np.float32)).view(shape)
    divisor = torch.from_numpy((std * scale).astype(np.float32)).view(shape)
    out = {}
    for name, split in splits.items():
        x = split.inputs.to(torch.float32)
        x.sub_(shift).div_(divisor)
        out[name] = Split(x, split.labels, split.index)
    return out, [float(v) for v in mean], [float(v) for v in std]


# ---------------------------------------------------------------------------------------------


def load_data(cfg: DataConfig) -> DataBundle:
    """Load the dataset ``cfg`` describes and return its train/val/test splits.

    Raises :class:`~distillery.errors.DataError` with a one-line fix for every problem
    the user can cause: a missing path or file, a corrupt file, a wrong column, labels
    that don't fit, a class left without training samples, augmentation on non-images.
    """
    from distillery.data.regression import REGRESSION_SOURCES, load_regression

    if cfg.name in REGRESSION_SOURCES:  # float targets: no classes to check or stratify by
        return load_regression(cfg)
    if cfg.soft_targets is not None:
        raise DataError(f"data.soft_targets smooths regression targets, but {cfg.name} is a classification source; "
                        f"remove data.soft_targets or use one of {', '.join(REGRESSION_SOURCES)}")
    raw = load_source(cfg)
    if raw.kind != "image" and (cfg.augment.pad_crop > 0 or cfg.augment.flip):
        raise DataError(
            f"data.augment (pad_crop/flip) works on images only, but {cfg.name} gave {raw.kind} data; "
            "set data.augment.pad_crop: 0 and data.augment.flip: false"
        )
    _check_labels(raw)
    num_classes = len(raw.class_names)

    def as_split(part) -> Split | None:
        if part is None:
            return None
        return Split(part.inputs, part.labels, torch.arange(len(part.labels)))

    train, val, test = as_split(raw.train), as_split(raw.val), as_split(raw.test)
    if test is None:
        train, test = _carve(train, cfg.test_fraction, num_classes, _generator(cfg.split_seed, "test"))
    if val is None:
        train, val = _carve(train, cfg.val_fraction, num_classes, _generator(cfg.split_seed, "val"))
    if cfg.classes is not None:
        raw, (train, val, test) = _keep_classes(cfg.classes, raw, (train, val, test))
        num_classes = len(raw.class_names)
    if cfg.train_subset is not None and cfg.train_subset < len(train):
        if cfg.train_subset < num_classes:
            raise DataError(
                f"data.train_subset={cfg.train_subset} is smaller than the number of classes ({num_classes}); "
                "every class needs at least one training sample"
            )
        keep, _ = _stratified_pick(
            train.labels, cfg.train_subset, num_classes, _generator(cfg.split_seed, "subset"), carve=False
        )
        train = train.take(keep)

    counts = torch.bincount(train.labels, minlength=num_classes)
    missing = [raw.class_names[i] for i in range(num_classes) if counts[i] == 0]
    if missing:
        raise DataError(
            f"{raw.source}: no training samples of class(es) {', '.join(map(repr, missing))}; "
            "add some, raise data.train_subset, or lower data.val_fraction / data.test_fraction"
        )

    splits = {"train": train, "val": val, "test": test}
    fingerprint = _fingerprint(cfg, raw, splits)
    splits, mean, std = _normalise(splits, raw)
    task = "multiclass"
    if cfg.mosaic is not None:
        if raw.kind != "image":
            raise DataError(f"data.mosaic builds multi-label images, but {cfg.name} gave {raw.kind} data; remove data.mosaic")
        from distillery.data.multilabel import mosaic

        splits = {name: mosaic(split, cfg.mosaic, num_classes, _generator(cfg.split_seed, f"mosaic:{name}"))
                  for name, split in splits.items()}
        fingerprint = hashlib.sha256(f"{fingerprint}:mosaic{cfg.mosaic}".encode()).hexdigest()
        task = "multilabel"

    x = splits["train"].inputs
    if raw.kind == "image":
        in_channels, input_size = int(x.shape[1]), (int(x.shape[2]), int(x.shape[3]))
    elif raw.kind == "table":
        in_channels, input_size = None, (int(x.shape[1]),)
    else:
        in_channels, input_size = None, None
    return DataBundle(
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        num_classes=num_classes,
        class_names=list(raw.class_names),
        kind=raw.kind,
        in_channels=in_channels,
        input_size=input_size,
        fingerprint=fingerprint,
        source=raw.source,
        mean=mean,
        std=std,
        feature_names=raw.feature_names,
        task=task,
    )
