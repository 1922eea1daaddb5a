"""Data sources: each turns a :class:`~distillery.config.DataConfig` into :class:`RawData`.

A source only *reads* data.  It returns the inputs in their raw, un-normalised form
(``uint8`` images, ``float64`` table features, tokenized text as ``int64`` tensors) and
integer labels ``0..num_classes-1``, plus the official test/validation splits when the
source has them.  Splitting, normalisation and fingerprinting happen once, for every
source alike, in :func:`distillery.data.load_data`.

Sources (``data.name``):

* :func:`fashion_mnist` -- the IDX files, found on disk or downloaded.
* :func:`digits` -- scikit-learn's bundled 8x8 digits (always offline).
* :func:`image_folder` -- ``path/<class>/*.png`` (optionally under ``train/`` and ``test/``).
* :func:`table` -- a CSV or Parquet file.
* :func:`hf` -- a Hugging Face ``datasets`` dataset (Hub id or local directory/file).

Optional dependencies (pandas, Pillow, datasets, transformers) are imported only by the
source that needs them; a missing one is a :class:`~distillery.errors.DataError` naming
the ``pip install`` that fixes it.
"""
from __future__ import annotations

import gzip
import os
import struct
import tempfile
import urllib.request
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch

from distillery.config import DataConfig
from distillery.errors import DataError

__all__ = [
    "RawData",
    "RawSplit",
    "LOADERS",
    "load_source",
    "fashion_mnist",
    "digits",
    "image_folder",
    "table",
    "hf",
    "read_idx",
    "FASHION_MNIST_CLASSES",
]


@dataclass
class RawSplit:
    """One split as read from the source: raw inputs and int64 labels."""

    inputs: torch.Tensor | dict[str, torch.Tensor]
    labels: torch.Tensor


@dataclass
class RawData:
    """What a source hands to :func:`distillery.data.load_data`.

    ``test`` and ``val`` are the source's official splits, or ``None`` when it has none
    (they are then carved out of ``train``).  Images are ``uint8`` tensors ``(N, C, H, W)``
    whose brightest possible value is ``pixel_max``; tables are ``float64`` ``(N, F)``;
    text is a dict of ``int64`` token tensors ``(N, L)``.
    """

    kind: Literal["image", "table", "text"]
    class_names: list[str]
    source: str
    train: RawSplit
    test: RawSplit | None = None
    val: RawSplit | None = None
    pixel_max: float = 255.0
    feature_names: list[str] | None = None


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")

# ---------------------------------------------------------------------------------------------
# Shared helpers


def _require_path(cfg: DataConfig, what: str) -> Path:
    """``cfg.path`` as an existing :class:`Path`, or a DataError saying what it should be."""
    if not cfg.path:
        raise DataError(f"data.path is required for {cfg.name}: point it at {what}")
    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise DataError(f"data.path '{cfg.path}' does not exist (data.name: {cfg.name} expects {what})")
    return path


def _labels_tensor(values: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64))


def _encode_labels(columns: Sequence[np.ndarray], what: str) -> tuple[list[np.ndarray], list[str]]:
    """Map raw label values (ints, strings, bools ...) of several splits to ``0..C-1``.

    The classes are the sorted unique values over all splits (numeric order for numbers,
    lexicographic for strings); their names are the values as strings.
    """
    cleaned = []
    for col in columns:
        arr = np.asarray(col)
        if arr.dtype == object:
            if any(v is None or (isinstance(v, float) and np.isnan(v)) for v in arr):
                raise DataError(f"{what} has missing values; every row needs a label")
            if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in arr):
                arr = arr.astype(np.int64)
            else:
                arr = arr.astype(str)
        if arr.dtype.kind == "f":
            if np.isnan(arr).any():
                raise DataError(f"{what} has missing values; every row needs a label")
            if not np.all(arr == np.round(arr)):
                raise DataError(
                    f"{what} holds non-integer numbers: distillery does classification, "
                    "so labels must be class ids or class names"
                )
            arr = arr.astype(np.int64)
        cleaned.append(arr)
    kinds = {a.dtype.kind for a in cleaned if a.size}
    if len(kinds) > 1:  # e.g. ints in one split, strings in another: compare as strings
        cleaned = [a.astype(str) for a in cleaned]
    values = np.unique(np.concatenate([a.ravel() for a in cleaned])) if cleaned else np.array([])
    codes = [np.searchsorted(values, a).astype(np.int64) for a in cleaned]
    return codes, [str(v) for v in values.tolist()]


def _resize_uint8(images: torch.Tensor, size: int | None) -> torch.Tensor:
    """Resize a uint8 ``(N, C, H, W)`` batch to ``size x size`` (antialiased bilinear)."""
    if size is None or tuple(images.shape[-2:]) == (size, size):
        return images
    out = torch.nn.functional.interpolate(
        images.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True
    )
    return out.round_().clamp_(0, 255).to(torch.uint8)


# ---------------------------------------------------------------------------------------------
# Pillow images (image_folder and hf)

_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def _import_pil():
    try:
        from PIL import Image
    except ImportError:
        raise DataError("reading image files needs Pillow: pip install pillow (or pip install 'distillery[hf]')") from None
    return Image


def _stack_images(
    items: Sequence[Any],
    open_image: Callable[[Any], Any],
    name_of: Callable[[int], str],
    image_size: int | None,
    like: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode images into one uint8 ``(N, C, H, W)`` tensor.

    Gray (C=1) or RGB (C=3) is decided by the majority of the images (ties go to RGB);
    all are converted to it.  Every image is resized to ``image_size`` (square) if given,
    else to the size of the first image.  With ``like`` (an already decoded batch, e.g. the
    train split) its channel count and size are used instead, so all splits match.
    ``open_image(item)`` returns a PIL image; ``name_of(i)`` names item ``i`` in errors.
    """
    Image = _import_pil()
    if not items:
        if like is not None:
            return like[:0].clone()
        raise DataError("no images to load")

    def _open(i: int):
        try:
            return open_image(items[i])
        except DataError:
            raise
        except Exception as err:  # PIL raises many types (UnidentifiedImageError, OSError, ...)
            raise DataError(f"cannot read image {name_of(i)}: {err}") from None

    def _release(i: int, im) -> None:
        if im is not items[i]:  # opened here (from a path or bytes): close the file now
            im.close()

    # Pass 1: headers only (cheap for files) -> majority mode and target size.
    modes = []
    first_size = None
    for i in range(len(items)):
        im = _open(i)
        modes.append("L" if im.mode in _GRAY_MODES else "RGB")
        if first_size is None:
            first_size = im.size  # (W, H)
        _release(i, im)
    counts = Counter(modes)
    mode = "L" if counts["L"] > counts["RGB"] else "RGB"
    width, height = (image_size, image_size) if image_size else first_size
    if like is not None:
        mode = "L" if like.shape[1] == 1 else "RGB"
        height, width = like.shape[-2:]
    channels = 1 if mode == "L" else 3

    # Pass 2: decode, convert, resize.
    out = np.empty((len(items), height, width, channels), dtype=np.uint8)
    for i in range(len(items)):
        im = _open(i)
        try:
            converted = im.convert(mode)
            if converted.size != (width, height):
                converted = converted.resize((width, height), Image.Resampling.BILINEAR)
            arr = np.asarray(converted, dtype=np.uint8)
        except Exception as err:  # truncated or corrupt pixel data shows up only here
            raise DataError(f"cannot read image {name_of(i)}: {err}") from None
        finally:
            _release(i, im)
        out[i] = arr.reshape(height, width, channels)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
#: Where the four ``.gz`` files are downloaded from (``data.download: true``).
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
#: Where the Debian package ``dataset-fashion-mnist`` installs the files.
FASHION_MNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"
_FMNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_IDX_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
_IDX_LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension
_REINSTALL_HINT = (
    "Reinstall it (`apt-get install --reinstall dataset-fashion-mnist`) "
    "or delete it and re-download (data.download: true)."
)


def read_idx(path: str | Path, expected_magic: int) -> np.ndarray:
    """Read an IDX file of unsigned bytes (gzip-compressed or raw) into a numpy array.

    The magic number (``0x00000803`` for images, ``0x00000801`` for labels) and the data
    length are checked against the header; a truncated or corrupt file is a DataError
    naming the file.
    """
    path = Path(path)

    def corrupt(detail: str) -> DataError:
        return DataError(f"{path} is truncated or corrupt: {detail}. {_REINSTALL_HINT}")

    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read {path}: {err}") from None
    if data[:2] == b"\x1f\x8b":  # gzip magic
        try:
            data = gzip.decompress(data)
        except (EOFError, OSError, zlib.error) as err:
            raise corrupt(f"damaged gzip stream ({err})") from None
    if len(data) < 4:
        raise corrupt(f"only {len(data)} bytes, shorter than an IDX header")
    magic = int.from_bytes(data[:4], "big")
    if magic != expected_magic:
        raise corrupt(f"magic number {magic:#010x}, expected {expected_magic:#010x}")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise corrupt("header cut short")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(dims, dtype=np.int64))
    if len(data) - header != expected:
        raise corrupt(f"{len(data) - header} data bytes where the header promises {expected} for shape {dims}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()


def _fmnist_file(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def _fmnist_candidates(cfg: DataConfig) -> tuple[list[Path], list[str]]:
    """Directories to search, in order, and how to describe them in the not-found message."""
    dirs: list[Path] = []
    described: list[str] = []
    if cfg.path:
        p = Path(cfg.path).expanduser()
        dirs += [p, p / "fashion-mnist"]
        described.append(f"data.path={p}" + ("" if p.exists() else " (does not exist)"))
    env = os.environ.get("DISTILLERY_DATA")
    if env:
        p = Path(env).expanduser()
        dirs += [p, p / "fashion-mnist"]
        described.append(f"$DISTILLERY_DATA={p}")
    else:
        described.append("$DISTILLERY_DATA (not set)")
    dirs.append(Path(FASHION_MNIST_SYSTEM_DIR))
    described.append(FASHION_MNIST_SYSTEM_DIR)
    dirs.append(_fmnist_cache_dir())
    described.append(str(_fmnist_cache_dir()))
    return dirs, described


def _fmnist_cache_dir() -> Path:
    return Path.home() / ".cache" / "distillery" / "fashion-mnist"


def _fmnist_not_found(described: list[str], extra: str = "") -> DataError:
    return DataError(
        f"Fashion-MNIST not found in {', '.join(described)}.{extra} "
        "Install it with `apt-get install dataset-fashion-mnist`, "
        "set DISTILLERY_DATA=<dir with the 4 .gz files>, "
        "or set data.download: true (needs internet). "
        "Fully offline alternative: data.name: digits"
    )


def _download_fmnist(dest: Path, described: list[str]) -> None:
    """Fetch the four files into ``dest``; each is written to a temp file, then renamed."""
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"cannot create {dest} for the Fashion-MNIST download: {err}") from None
    for stem in _FMNIST_FILES.values():
        target = dest / (stem + ".gz")
        if target.is_file():
            continue
        url = FASHION_MNIST_URL + stem + ".gz"
        fd, tmp_name = tempfile.mkstemp(dir=dest, prefix=f".{stem}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
            os.replace(tmp_name, target)
        except OSError as err:  # URLError, timeouts and disk errors are all OSErrors
            Path(tmp_name).unlink(missing_ok=True)
            raise _fmnist_not_found(described, f" Downloading {url} into {dest} failed: {err}.") from None


def fashion_mnist(cfg: DataConfig) -> RawData:
    """Fashion-MNIST from IDX files.

    Looks in ``cfg.path``, ``$DISTILLERY_DATA`` (and its ``fashion-mnist/`` sub-folder),
    ``/usr/share/datasets/fashion-mnist`` and ``~/.cache/distillery/fashion-mnist``;
    downloads into ``$DISTILLERY_DATA`` (or the cache folder) when ``cfg.download`` is set.
    The official 10k test set is the test split.  ``cfg.image_size`` resizes if given.
    """
    dirs, described = _fmnist_candidates(cfg)
    if cfg.path and not Path(cfg.path).expanduser().exists():
        raise _fmnist_not_found(described)
    found = None
    incomplete = ""
    for d in dirs:
        files = {key: _fmnist_file(d, stem) for key, stem in _FMNIST_FILES.items()}
        if all(files.values()):
            found = d, files
            break
        if any(files.values()):  # a partial set is worth pointing out
            missing = [_FMNIST_FILES[k] + ".gz" for k in files if not files[k]]
            incomplete += f" {d} is incomplete: it lacks {', '.join(missing)}."
    if found is None:
        if not cfg.download:
            raise _fmnist_not_found(described, incomplete)
        env = os.environ.get("DISTILLERY_DATA")
        dest = Path(env).expanduser() if env else _fmnist_cache_dir()
        _download_fmnist(dest, described)
        found = dest, {key: dest / (stem + ".gz") for key, stem in _FMNIST_FILES.items()}
    directory, files = found

    arrays = {
        key: read_idx(path, _IDX_IMAGES_MAGIC if key.endswith("images") else _IDX_LABELS_MAGIC)
        for key, path in files.items()
    }
    for part in ("train", "test"):
        n_img, n_lab = len(arrays[f"{part}_images"]), len(arrays[f"{part}_labels"])
        if n_img != n_lab:
            raise DataError(
                f"Fashion-MNIST {part} files in {directory} disagree: {n_img} images but {n_lab} labels. "
                + _REINSTALL_HINT
            )

    def split(part: str) -> RawSplit:
        images = torch.from_numpy(arrays[f"{part}_images"]).unsqueeze(1)  # (N, 1, 28, 28)
        return RawSplit(_resize_uint8(images, cfg.image_size), _labels_tensor(arrays[f"{part}_labels"]))

    return RawData(
        kind="image",
        class_names=list(FASHION_MNIST_CLASSES),
        source=f"Fashion-MNIST (IDX files in {directory})",
        train=split("train"),
        test=split("test"),
    )


# ---------------------------------------------------------------------------------------------
# scikit-learn digits


def digits(cfg: DataConfig) -> RawData:
    """scikit-learn's 8x8 handwritten digits (1797 images, values 0..16), fully offline.

    There is no official test split: it is carved out with ``cfg.test_fraction``.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("data.name: digits needs scikit-learn: pip install scikit-learn") from None
    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.uint8)).unsqueeze(1)  # (1797, 1, 8, 8)
    return RawData(
        kind="image",
        class_names=[str(int(t)) for t in bunch.target_names],
        source="scikit-learn digits (bundled, 8x8)",
        train=RawSplit(_resize_uint8(images, cfg.image_size), _labels_tensor(bunch.target)),
        pixel_max=16.0,
    )


# ---------------------------------------------------------------------------------------------
# Image folder

_SPLIT_DIRS = {"train": "train", "test": "test", "val": "val", "validation": "val"}


def _image_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _class_dirs(root: Path) -> dict[str, list[Path]]:
    """``{class_name: [image files]}`` for the non-hidden sub-folders of ``root`` that hold images."""
    out = {}
    for sub in sorted(root.iterdir()):
        if sub.is_dir() and not sub.name.startswith("."):
            files = _image_files(sub)
            if files:
                out[sub.name] = files
    return out


def image_folder(cfg: DataConfig) -> RawData:
    """Images laid out as ``path/<class>/*.{png,jpg,jpeg,bmp}``.

    When ``path/train/<class>/...`` exists, ``train/`` and (if present) ``test/`` and
    ``val/`` or ``validation/`` are the official splits.  Class names are the sorted folder
    names; gray vs RGB and the size follow :func:`_stack_images`.
    """
    root = _require_path(cfg, "a directory laid out as <class>/<image files> (optionally under train/ and test/)")
    if not root.is_dir():
        raise DataError(f"data.path '{root}' is a file; image_folder expects a directory of <class>/<image files>")
    layout = "path/<class>/*.png|jpg|jpeg|bmp (optionally path/train/<class>/... and path/test/<class>/...)"

    train_dir = root / "train"
    parts: dict[str, dict[str, list[Path]]] = {}
    if train_dir.is_dir() and _class_dirs(train_dir):
        for folder, part in _SPLIT_DIRS.items():
            if (root / folder).is_dir() and part not in parts:
                parts[part] = _class_dirs(root / folder)
        if "test" in parts and not parts["test"]:
            raise DataError(f"{root / 'test'} holds no <class>/<image> folders; expected {layout}")
    else:
        parts["train"] = _class_dirs(root)
    if not parts["train"]:
        raise DataError(f"no images found under {root}; expected {layout}")

    class_names = sorted(set().union(*(p.keys() for p in parts.values())))
    index = {name: i for i, name in enumerate(class_names)}
    files: list[Path] = []
    labels: list[int] = []
    bounds: dict[str, tuple[int, int]] = {}
    for part, classes in parts.items():
        start = len(files)
        for name, paths in classes.items():
            files += paths
            labels += [index[name]] * len(paths)
        bounds[part] = (start, len(files))

    Image = _import_pil()
    images = _stack_images(files, Image.open, lambda i: str(files[i]), cfg.image_size)
    labels_t = torch.tensor(labels, dtype=torch.int64)

    def split(part: str) -> RawSplit | None:
        if part not in bounds:
            return None
        lo, hi = bounds[part]
        return RawSplit(images[lo:hi].clone(), labels_t[lo:hi].clone())

    official = [p for p in ("train", "val", "test") if p in bounds]
    return RawData(
        kind="image",
        class_names=class_names,
        source=f"image folder {root} ({len(files)} images"
        + (f", official {'/'.join(official)} split)" if len(official) > 1 else ")"),
        train=split("train"),
        test=split("test"),
        val=split("val"),
    )


# ---------------------------------------------------------------------------------------------
# Tables


def table(cfg: DataConfig) -> RawData:
    """A CSV (``.csv``, ``.tsv``) or Parquet (``.parquet``, ``.pq``) file.

    ``cfg.label_column`` holds the class (ints or strings; classes are the sorted unique
    values); ``cfg.feature_columns`` (default: every other column) must be numeric.
    Features are returned raw (float64); standardisation happens in ``load_data``.
    """
    path = _require_path(cfg, "a .csv or .parquet file")
    try:
        import pandas as pd
    except ImportError:
        raise DataError("data.name: table needs pandas: pip install 'distillery[tables]'") from None
    suffix = path.suffix.lower()
    try:
        if suffix in (".csv", ".tsv", ".txt"):
            df = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",")
        elif suffix in (".parquet", ".pq"):
            df = pd.read_parquet(path)
        else:
            raise DataError(f"{path}: unsupported table format '{suffix}'; use .csv, .tsv or .parquet")
    except ImportError as err:
        raise DataError(f"reading {path} needs pyarrow: pip install 'distillery[tables]' ({err})") from None
    except DataError:
        raise
    except Exception as err:
        raise DataError(f"cannot read table {path}: {err}") from None

    columns = [str(c) for c in df.columns]
    df.columns = columns
    if cfg.label_column not in columns:
        raise DataError(
            f"{path} has no label column '{cfg.label_column}' (columns: {', '.join(columns)}); "
            "set data.label_column"
        )
    features = cfg.feature_columns or [c for c in columns if c != cfg.label_column]
    missing = [c for c in features if c not in columns]
    if missing:
        raise DataError(f"data.feature_columns not in {path}: {', '.join(missing)} (columns: {', '.join(columns)})")
    if cfg.label_column in features:
        raise DataError(f"the label column '{cfg.label_column}' cannot also be a feature column")
    if not features:
        raise DataError(f"{path} has no feature columns besides the label '{cfg.label_column}'")
    non_numeric = [
        c for c in features
        if not (pd.api.types.is_numeric_dtype(df[c]) or pd.api.types.is_bool_dtype(df[c]))
    ]
    if non_numeric:
        raise DataError(
            f"non-numeric feature columns in {path}: {', '.join(non_numeric)}. "
            "Encode them as numbers, or leave them out with data.feature_columns"
        )
    x = np.array(df[features].to_numpy(dtype=np.float64), copy=True)  # writable, owned
    bad = [c for c, ok in zip(features, np.isfinite(x).all(axis=0)) if not ok]
    if bad:
        raise DataError(f"feature columns with missing or infinite values in {path}: {', '.join(bad)}")
    (codes,), class_names = _encode_labels([df[cfg.label_column].to_numpy()], f"label column '{cfg.label_column}'")
    return RawData(
        kind="table",
        class_names=class_names,
        source=f"table {path} ({len(df)} rows, {len(features)} features)",
        train=RawSplit(torch.from_numpy(x), _labels_tensor(codes)),
        feature_names=list(features),
    )


# ---------------------------------------------------------------------------------------------
# Hugging Face datasets

_HF_HINT = "pip install 'distillery[hf]'"
_IMAGE_COLUMNS = ("image", "img", "pixel_values")
_TEXT_COLUMNS = ("text", "sentence")
_DATA_FILE_BUILDERS = {
    ".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json",
    ".parquet": "parquet", ".arrow": "arrow",
}
_VAL_SPLITS = ("validation", "valid", "val", "dev")


def _import_datasets():
    try:
        import datasets
    except ImportError:
        raise DataError(f"data.name: hf needs the Hugging Face `datasets` package: {_HF_HINT}") from None
    return datasets


def _builder_kwargs(builder: str, files: Sequence[Path]) -> dict:
    return {"delimiter": "\t"} if builder == "csv" and all(f.suffix.lower() == ".tsv" for f in files) else {}


def _split_of_file(stem: str) -> str:
    stem = stem.lower()
    if "train" in stem:
        return "train"
    if "test" in stem:
        return "test"
    if any(v in stem for v in _VAL_SPLITS):
        return "validation"
    return "train"


def _hf_load_local(datasets, path: Path):
    """Load a local dataset: a ``save_to_disk`` folder, a data file, or a folder of them."""
    if path.is_file():
        builder = _DATA_FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise DataError(
                f"{path}: cannot tell the dataset format from '{path.suffix}'; "
                f"use one of {', '.join(sorted(_DATA_FILE_BUILDERS))} or a save_to_disk folder"
            )
        return datasets.load_dataset(builder, data_files=str(path), **_builder_kwargs(builder, [path]))
    if any((path / marker).is_file() for marker in ("dataset_dict.json", "dataset_info.json", "state.json")):
        return datasets.load_from_disk(str(path))
    all_files = [p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")]
    if any(p.suffix.lower() in IMAGE_EXTENSIONS for p in all_files):
        return datasets.load_dataset("imagefolder", data_dir=str(path))
    data_files = [p for p in all_files if p.suffix.lower() in _DATA_FILE_BUILDERS]
    builders = {_DATA_FILE_BUILDERS[p.suffix.lower()] for p in data_files}
    if len(builders) != 1:
        found = "no data files" if not builders else f"mixed formats ({', '.join(sorted(builders))})"
        raise DataError(
            f"{path}: {found}; expected a save_to_disk folder, image files, "
            "or .csv/.json/.jsonl/.parquet files of one format"
        )
    builder = builders.pop()
    by_split: dict[str, list[str]] = {}
    for f in sorted(data_files):
        by_split.setdefault(_split_of_file(f.stem), []).append(str(f))
    return datasets.load_dataset(builder, data_files=by_split, **_builder_kwargs(builder, data_files))


def _hf_open(cfg: DataConfig):
    """Load ``cfg.path`` (local path or ``hub_id[:config]``) as a DatasetDict."""
    datasets = _import_datasets()
    if not cfg.path:
        raise DataError(
            "data.path is required for hf: point it at a Hub dataset id (e.g. 'zalando-datasets/fashion_mnist', "
            "optionally 'id:config') or a local dataset folder/file"
        )
    local = Path(cfg.path).expanduser()
    looks_local = cfg.path.startswith(("/", "./", "../", "~")) or local.suffix.lower() in _DATA_FILE_BUILDERS
    try:
        if local.exists():
            ds, where = _hf_load_local(datasets, local), str(local)
        elif looks_local:
            raise DataError(f"data.path '{cfg.path}' does not exist")
        else:
            repo, _, config_name = cfg.path.partition(":")
            ds = datasets.load_dataset(repo, config_name or None)
            where = f"Hub '{cfg.path}'"
    except DataError:
        raise
    except Exception as err:
        raise DataError(
            f"could not load Hugging Face dataset '{cfg.path}': {type(err).__name__}: {err}. "
            "Offline? Point data.path at a local dataset folder or file"
        ) from None
    if isinstance(ds, datasets.Dataset):
        ds = datasets.DatasetDict({"train": ds})
    return datasets, ds, where


def _hf_input_kind(datasets, features, column: str) -> str:
    feature = features[column]
    if isinstance(feature, datasets.Image):
        return "image"
    if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        return "text"
    if column in _IMAGE_COLUMNS:
        return "image"
    raise DataError(
        f"cannot tell whether column '{column}' ({feature}) holds images or text; "
        "image columns need the datasets Image feature and text columns strings"
    )


def _hf_images(split, column: str, cfg: DataConfig, split_name: str, like: torch.Tensor | None = None) -> torch.Tensor:
    Image = _import_pil()
    values = list(split[column])

    def open_image(v):
        if isinstance(v, Image.Image):
            return v
        if isinstance(v, dict) and (v.get("bytes") or v.get("path")):  # undecoded Image feature
            import io

            return Image.open(io.BytesIO(v["bytes"]) if v.get("bytes") else v["path"])
        arr = np.asarray(v)
        if arr.dtype != np.uint8:
            raise DataError(
                f"column '{column}' holds {arr.dtype} arrays; only images or uint8 pixel arrays are supported"
            )
        if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
            arr = arr.transpose(1, 2, 0)  # CHW -> HWC
        return Image.fromarray(arr.squeeze(-1) if arr.ndim == 3 and arr.shape[-1] == 1 else arr)

    return _stack_images(values, open_image, lambda i: f"{split_name}[{i}].{column}", cfg.image_size, like)


def _hf_tokenize(texts_by_split: dict[str, list], cfg: DataConfig, column: str) -> dict[str, dict[str, torch.Tensor]]:
    if not cfg.tokenizer:
        raise DataError(
            f"column '{column}' holds text: set data.tokenizer to a tokenizer folder or Hub id "
            "(usually the teacher's, e.g. bert-base-uncased)"
        )
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise DataError(f"tokenizing text needs `transformers`: {_HF_HINT}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer, trust_remote_code=cfg.trust_remote_code)
    except Exception as err:
        raise DataError(f"cannot load tokenizer '{cfg.tokenizer}': {type(err).__name__}: {err}") from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # e.g. GPT-2 style tokenizers
    out = {}
    for name, texts in texts_by_split.items():
        bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
        if bad is not None:
            raise DataError(f"{name}[{bad}].{column} is {texts[bad]!r}, not a string")
        try:
            enc = tokenizer(
                texts, padding="max_length", truncation=True, max_length=cfg.max_length, return_tensors="np"
            )
        except Exception as err:
            raise DataError(f"tokenizing column '{column}' with '{cfg.tokenizer}' failed: {err}") from None
        out[name] = {k: torch.from_numpy(np.asarray(v, dtype=np.int64)) for k, v in enc.items()}
    return out


def _unlabelled(labels: np.ndarray) -> bool:
    """True when every label of a split is missing (-1 or None)."""
    if labels.size == 0:
        return False
    if labels.dtype.kind in "iu":
        return bool((labels < 0).all())
    if labels.dtype == object:
        return all(v is None for v in labels)
    return False


def hf(cfg: DataConfig) -> RawData:
    """A Hugging Face ``datasets`` dataset.

    ``cfg.path`` is a Hub id (``id`` or ``id:config``), a ``save_to_disk`` folder, a
    ``.csv/.tsv/.json/.jsonl/.parquet`` file, or a folder of such files (split by file name)
    or of images (``imagefolder``).  The ``train``, ``test`` and ``validation`` splits are
    used when present.  ``cfg.input_column`` (auto-detected when unset) holds images, which
    become uint8 tensors, or text, which is tokenized with ``cfg.tokenizer`` to
    ``cfg.max_length``.  Labels come from ``cfg.label_column`` (ClassLabel names when the
    dataset has them).  Splits whose labels are all missing (-1), like GLUE's test sets,
    are treated as absent.
    """
    datasets, ds, where = _hf_open(cfg)
    names = list(ds.keys())
    if "train" in ds:
        train_key = "train"
    elif len(names) == 1:
        train_key = names[0]
    else:
        raise DataError(f"dataset {where} has no 'train' split (splits: {', '.join(names)})")
    keys = {"train": train_key}
    if "test" in ds and train_key != "test":
        keys["test"] = "test"
    val_key = next((v for v in _VAL_SPLITS if v in ds and v != train_key), None)
    if val_key:
        keys["val"] = val_key

    features = ds[train_key].features
    columns = list(features)
    column = cfg.input_column
    if column is None:
        column = next((c for c in (*_IMAGE_COLUMNS, *_TEXT_COLUMNS) if c in columns), None)
        if column is None:
            column = next((c for c in columns if isinstance(features[c], datasets.Image)), None)
        if column is None:
            raise DataError(
                f"cannot find the input column of {where} (columns: {', '.join(columns)}); set data.input_column"
            )
    for part, key in keys.items():
        for needed, field in ((column, "data.input_column"), (cfg.label_column, "data.label_column")):
            if needed not in ds[key].column_names:
                raise DataError(
                    f"split '{key}' of {where} has no column '{needed}' "
                    f"(columns: {', '.join(ds[key].column_names)}); set {field}"
                )
    kind = _hf_input_kind(datasets, features, column)

    label_feature = features[cfg.label_column]
    raw_labels = {part: np.asarray(list(ds[key][cfg.label_column])) for part, key in keys.items()}
    for part in [p for p in raw_labels if p != "train"]:
        if _unlabelled(raw_labels[part]):  # e.g. GLUE's test sets carry label -1 throughout
            del keys[part], raw_labels[part]
    if isinstance(label_feature, datasets.ClassLabel):
        class_names = list(label_feature.names)
        labels = {p: v.astype(np.int64) for p, v in raw_labels.items()}
    else:
        codes, class_names = _encode_labels(list(raw_labels.values()), f"label column '{cfg.label_column}'")
        labels = dict(zip(raw_labels, codes))

    if kind == "image":  # train first: the other splits take its channels and size
        inputs = {"train": _hf_images(ds[train_key], column, cfg, train_key)}
        for part, key in keys.items():
            if part != "train":
                inputs[part] = _hf_images(ds[key], column, cfg, key, like=inputs["train"])
    else:
        texts = {part: list(ds[key][column]) for part, key in keys.items()}
        inputs = _hf_tokenize(texts, cfg, column)

    splits = {part: RawSplit(inputs[part], _labels_tensor(labels[part])) for part in keys}
    return RawData(
        kind=kind,
        class_names=class_names,
        source=f"Hugging Face dataset {where} (column '{column}', splits {', '.join(keys.values())})",
        train=splits["train"],
        test=splits.get("test"),
        val=splits.get("val"),
    )


# ---------------------------------------------------------------------------------------------

LOADERS: dict[str, Callable[[DataConfig], RawData]] = {
    "fashion_mnist": fashion_mnist,
    "digits": digits,
    "image_folder": image_folder,
    "table": table,
    "hf": hf,
}


def load_source(cfg: DataConfig) -> RawData:
    """Run the loader that ``cfg.name`` selects."""
    try:
        loader = LOADERS[cfg.name]
    except KeyError:
        raise DataError(f"unknown data.name '{cfg.name}'; choose one of {', '.join(LOADERS)}") from None
    return loader(cfg)
