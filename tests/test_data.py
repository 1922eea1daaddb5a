"""Tests for distillery.data: sources, splits, fingerprint, normalisation, augmentation."""
from __future__ import annotations

import gzip
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from distillery.config import AugmentConfig, DataConfig
from distillery.data import DataBundle, Split, augment_batch, load_data, sources
from distillery.errors import DataError

FMNIST_SYSTEM = Path(sources.FASHION_MNIST_SYSTEM_DIR)
needs_fmnist = pytest.mark.skipif(
    not all((FMNIST_SYSTEM / (f + ".gz")).is_file() for f in sources._FMNIST_FILES.values()),
    reason="Debian package dataset-fashion-mnist is not installed",
)


# ---------------------------------------------------------------------------------------------
# Helpers


def write_idx(path: Path, array: np.ndarray, *, compress: bool = True) -> Path:
    """Write a uint8 array as an IDX file (gzip-compressed unless ``compress`` is False)."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


def make_fake_fmnist(directory: Path, *, n_train: int = 100, n_test: int = 30, compress: bool = True) -> Path:
    """A miniature Fashion-MNIST (10 classes, 6x6 images) in the official file layout."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(0)
    suffix = ".gz" if compress else ""
    for part, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        images = rng.randint(0, 256, size=(n, 6, 6))
        write_idx(directory / f"{part}-images-idx3-ubyte{suffix}", images, compress=compress)
        write_idx(directory / f"{part}-labels-idx1-ubyte{suffix}", labels, compress=compress)
    return directory


@pytest.fixture
def no_default_fmnist(tmp_path, monkeypatch):
    """Hide every default Fashion-MNIST location (system dir, $DISTILLERY_DATA, ~/.cache)."""
    monkeypatch.setattr(sources, "FASHION_MNIST_SYSTEM_DIR", str(tmp_path / "no-system-copy"))
    monkeypatch.delenv("DISTILLERY_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def split_indices(bundle: DataBundle) -> tuple[list[int], list[int], list[int]]:
    return bundle.train.index.tolist(), bundle.val.index.tolist(), bundle.test.index.tolist()


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST (the real files, when installed)


@pytest.fixture(scope="module")
def fmnist() -> DataBundle:
    return load_data(DataConfig(name="fashion_mnist"))


@needs_fmnist
def test_fashion_mnist_shapes_and_normalisation(fmnist):
    assert len(fmnist.train) + len(fmnist.val) == 60000
    assert len(fmnist.val) == 6000 and len(fmnist.test) == 10000
    assert fmnist.kind == "image" and fmnist.in_channels == 1 and fmnist.input_size == (28, 28)
    assert fmnist.num_classes == 10 and fmnist.class_names[0] == "T-shirt/top"
    assert fmnist.class_names[-1] == "Ankle boot"
    assert fmnist.train.inputs.shape == (54000, 1, 28, 28) and fmnist.train.inputs.dtype == torch.float32
    assert fmnist.train.labels.dtype == torch.int64
    # stratified val carve-out: Fashion-MNIST train is balanced, so val is too
    assert torch.bincount(fmnist.val.labels).tolist() == [600] * 10
    # train statistics normalise train to mean 0 / std 1; the same stats are applied to test
    assert abs(fmnist.train.inputs.mean().item()) < 1e-3
    assert abs(fmnist.train.inputs.std().item() - 1) < 1e-3
    assert abs(fmnist.test.inputs.mean().item()) < 0.05
    assert fmnist.mean[0] == pytest.approx(0.286, abs=1e-3)
    # train and val are disjoint and together cover the official train set
    assert sorted(fmnist.train.index.tolist() + fmnist.val.index.tolist()) == list(range(60000))
    assert fmnist.test.index.tolist() == list(range(10000))


@needs_fmnist
def test_fashion_mnist_fingerprint_and_subset(fmnist):
    again = load_data(DataConfig(name="fashion_mnist"))
    assert again.fingerprint == fmnist.fingerprint
    assert len(fmnist.fingerprint) == 64 and int(fmnist.fingerprint, 16) >= 0
    assert torch.equal(again.val.index, fmnist.val.index)

    subset = load_data(DataConfig(name="fashion_mnist", train_subset=50))
    assert subset.fingerprint != fmnist.fingerprint
    assert len(subset.train) == 50
    assert torch.bincount(subset.train.labels, minlength=10).tolist() == [5] * 10
    assert set(subset.train.index.tolist()) <= set(fmnist.train.index.tolist())
    # val and test do not depend on train_subset
    assert torch.equal(subset.val.index, fmnist.val.index)
    assert torch.equal(subset.test.labels, fmnist.test.labels)


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST reader on miniature files


def test_fake_fmnist_from_path_gzip_and_raw(tmp_path, no_default_fmnist):
    for compress in (True, False):
        d = make_fake_fmnist(tmp_path / f"fm-{compress}", compress=compress)
        b = load_data(DataConfig(name="fashion_mnist", path=str(d)))
        assert len(b.train) + len(b.val) == 100 and len(b.test) == 30
        assert b.input_size == (6, 6) and b.in_channels == 1
        assert b.source.endswith(f"{d})")


def test_fmnist_from_distillery_data_subfolder(tmp_path, no_default_fmnist, monkeypatch):
    make_fake_fmnist(tmp_path / "data" / "fashion-mnist")
    monkeypatch.setenv("DISTILLERY_DATA", str(tmp_path / "data"))
    b = load_data(DataConfig(name="fashion_mnist"))
    assert len(b.test) == 30


def test_fmnist_image_size_resizes(tmp_path, no_default_fmnist):
    d = make_fake_fmnist(tmp_path / "fm")
    b = load_data(DataConfig(name="fashion_mnist", path=str(d), image_size=12))
    assert b.input_size == (12, 12) and b.test.inputs.shape[1:] == (1, 12, 12)


def test_corrupt_idx_is_a_data_error(tmp_path, no_default_fmnist):
    d = make_fake_fmnist(tmp_path / "fm")
    victim = d / "train-images-idx3-ubyte.gz"
    victim.write_bytes(victim.read_bytes()[:-40])  # truncated gzip stream
    with pytest.raises(DataError) as err:
        load_data(DataConfig(name="fashion_mnist", path=str(d)))
    assert str(victim) in str(err.value)
    assert "re-download" in str(err.value) and "reinstall" in str(err.value)


def test_idx_size_and_magic_checks(tmp_path):
    good = write_idx(tmp_path / "images", np.zeros((4, 3, 3), dtype=np.uint8), compress=False)
    assert sources.read_idx(good, 0x803).shape == (4, 3, 3)
    short = tmp_path / "short"
    short.write_bytes(good.read_bytes()[:-1])  # one data byte missing, valid raw header
    with pytest.raises(DataError, match="short.*truncated or corrupt"):
        sources.read_idx(short, 0x803)
    with pytest.raises(DataError, match="magic number"):  # an image file read as labels
        sources.read_idx(good, 0x801)


def test_fmnist_missing_everywhere(no_default_fmnist):
    with pytest.raises(DataError) as err:
        load_data(DataConfig(name="fashion_mnist"))
    msg = str(err.value)
    assert msg.startswith("Fashion-MNIST not found in")
    assert "apt-get install dataset-fashion-mnist" in msg and "data.name: digits" in msg
    assert "DISTILLERY_DATA" in msg and "data.download: true" in msg


def test_fmnist_explicit_path_missing(tmp_path, no_default_fmnist):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="apt-get") as err:
        load_data(DataConfig(name="fashion_mnist", path=str(missing)))
    assert f"{missing} (does not exist)" in str(err.value)


def test_fmnist_download(tmp_path, no_default_fmnist, monkeypatch):
    mirror = make_fake_fmnist(tmp_path / "mirror")
    monkeypatch.setattr(sources, "FASHION_MNIST_URL", mirror.as_uri() + "/")
    target = tmp_path / "datadir"
    monkeypatch.setenv("DISTILLERY_DATA", str(target))
    b = load_data(DataConfig(name="fashion_mnist", download=True))
    assert len(b.test) == 30
    assert sorted(p.name for p in target.iterdir()) == sorted(p.name for p in mirror.iterdir())  # no temp files left
    # without a mirror the failure names the URL and the offline alternatives
    monkeypatch.setattr(sources, "FASHION_MNIST_URL", (tmp_path / "empty").as_uri() + "/")
    monkeypatch.setenv("DISTILLERY_DATA", str(tmp_path / "other"))
    with pytest.raises(DataError, match="failed.*data.name: digits"):
        load_data(DataConfig(name="fashion_mnist", download=True))
    assert [p.name for p in (tmp_path / "other").iterdir()] == []


# ---------------------------------------------------------------------------------------------
# digits, splitting, fingerprint


def test_digits_offline():
    b = load_data(DataConfig(name="digits"))
    assert b.kind == "image" and b.in_channels == 1 and b.input_size == (8, 8)
    assert len(b.train) + len(b.val) + len(b.test) == 1797
    assert len(b.test) == round(1797 * 0.2)
    assert b.class_names == [str(i) for i in range(10)]
    assert torch.bincount(b.test.labels, minlength=10).min() >= 35  # stratified
    assert not set(b.train.index.tolist()) & set(b.test.index.tolist())
    assert not set(b.val.index.tolist()) & set(b.test.index.tolist())


def test_split_determinism():
    a = load_data(DataConfig(name="digits", split_seed=1))
    b = load_data(DataConfig(name="digits", split_seed=1))
    c = load_data(DataConfig(name="digits", split_seed=2))
    assert split_indices(a) == split_indices(b)
    assert torch.equal(a.train.inputs, b.train.inputs)
    assert a.fingerprint == b.fingerprint
    assert split_indices(a)[2] != split_indices(c)[2] and split_indices(a)[1] != split_indices(c)[1]
    assert a.fingerprint != c.fingerprint


def test_train_subset_is_stratified_and_leaves_val_test_alone():
    full = load_data(DataConfig(name="digits"))
    sub = load_data(DataConfig(name="digits", train_subset=30))
    assert len(sub.train) == 30
    assert torch.bincount(sub.train.labels, minlength=10).tolist() == [3] * 10
    assert split_indices(sub)[1:] == split_indices(full)[1:]
    assert sub.fingerprint != full.fingerprint
    with pytest.raises(DataError, match="train_subset=5"):
        load_data(DataConfig(name="digits", train_subset=5))


def test_no_val_fraction_gives_empty_val():
    b = load_data(DataConfig(name="digits", val_fraction=0.0))
    assert len(b.val) == 0 and b.val.inputs.shape == (0, 1, 8, 8)


def test_fingerprint_stable_across_processes():
    code = (
        "from distillery.config import DataConfig; from distillery.data import load_data; "
        "print(load_data(DataConfig(name='digits', train_subset=100)).fingerprint)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == load_data(DataConfig(name="digits", train_subset=100)).fingerprint


def test_split_take_with_dict_inputs():
    s = Split({"input_ids": torch.arange(12).view(4, 3), "attention_mask": torch.ones(4, 3)}, torch.arange(4))
    t = s.take(torch.tensor([3, 1]))
    assert len(t) == 2 and t.inputs["input_ids"].tolist() == [[9, 10, 11], [3, 4, 5]]
    assert t.labels.tolist() == [3, 1]


# ---------------------------------------------------------------------------------------------
# image_folder


def _png(path: Path, value: int, size=(5, 4), mode="L"):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    color = value if mode == "L" else (value, 255 - value, 0)
    Image.new(mode, size, color).save(path)


def test_image_folder(tmp_path):
    for ci, cls in enumerate(["cat", "dog", "emu"]):
        for i in range(6):
            _png(tmp_path / "imgs" / cls / f"{i}.png", 40 * ci + i)
    _png(tmp_path / "imgs" / "dog" / "odd.png", 9, size=(7, 7), mode="RGB")  # minority: RGB, other size
    (tmp_path / "imgs" / "dog" / "notes.txt").write_text("not an image")
    b = load_data(DataConfig(name="image_folder", path=str(tmp_path / "imgs"), val_fraction=0.2, test_fraction=0.2))
    assert b.class_names == ["cat", "dog", "emu"]
    assert b.in_channels == 1 and b.input_size == (4, 5)  # majority gray; size of the first image (W=5, H=4)
    assert len(b.train) + len(b.val) + len(b.test) == 19
    assert set(b.train.labels.tolist()) == {0, 1, 2}


def test_image_folder_official_split_and_resize(tmp_path):
    for part, n in (("train", 4), ("test", 2)):
        for cls in ("a", "b"):
            for i in range(n):
                _png(tmp_path / part / cls / f"{i}.jpg", 10 * i, mode="RGB")
    b = load_data(DataConfig(name="image_folder", path=str(tmp_path), image_size=3, val_fraction=0.25))
    assert b.in_channels == 3 and b.input_size == (3, 3)
    assert (len(b.train), len(b.val), len(b.test)) == (6, 2, 4)
    assert "official train/test split" in b.source


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="data.path is required for image_folder"):
        load_data(DataConfig(name="image_folder"))
    with pytest.raises(DataError, match="does not exist"):
        load_data(DataConfig(name="image_folder", path=str(tmp_path / "missing")))
    _png(tmp_path / "x" / "a" / "0.png", 1)
    bad = tmp_path / "x" / "b" / "0.png"
    bad.parent.mkdir()
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match="cannot read image .*b/0.png"):
        load_data(DataConfig(name="image_folder", path=str(tmp_path / "x")))


# ---------------------------------------------------------------------------------------------
# tables


def _frame(n=60, string_labels=False):
    import pandas as pd

    rng = np.random.RandomState(0)
    y = np.arange(n) % 3
    df = pd.DataFrame({"a": rng.normal(5, 2, n) + y, "b": rng.randint(0, 100, n), "flag": y == 1})
    df["target"] = np.array(["setosa", "virginica", "versicolor"])[y] if string_labels else y * 10
    return df


def test_table_csv_int_labels(tmp_path):
    path = tmp_path / "t.csv"
    _frame().to_csv(path, index=False)
    b = load_data(DataConfig(name="table", path=str(path), label_column="target"))
    assert b.kind == "table" and b.input_size == (3,) and b.in_channels is None
    assert b.class_names == ["0", "10", "20"]
    assert b.train.inputs.dtype == torch.float32
    assert torch.allclose(b.train.inputs.mean(0), torch.zeros(3), atol=1e-5)
    assert torch.allclose(b.train.inputs.std(0, unbiased=False), torch.ones(3), atol=1e-4)
    assert len(b.train) + len(b.val) + len(b.test) == 60


def test_table_parquet_string_labels_and_feature_columns(tmp_path):
    path = tmp_path / "t.parquet"
    _frame(string_labels=True).to_parquet(path)
    b = load_data(DataConfig(name="table", path=str(path), label_column="target", feature_columns=["b", "a"]))
    assert b.class_names == ["setosa", "versicolor", "virginica"]
    assert b.input_size == (2,) and b.feature_names == ["b", "a"]


def test_table_errors(tmp_path):
    with pytest.raises(DataError, match="data.path is required for table: point it at a .csv or .parquet file"):
        load_data(DataConfig(name="table"))
    with pytest.raises(DataError, match="nope.csv"):
        load_data(DataConfig(name="table", path=str(tmp_path / "nope.csv")))
    df = _frame()
    df["colour"] = "red"
    path = tmp_path / "t.csv"
    df.to_csv(path, index=False)
    with pytest.raises(DataError, match="non-numeric feature columns .*: colour"):
        load_data(DataConfig(name="table", path=str(path), label_column="target"))
    with pytest.raises(DataError, match="no label column 'label'"):
        load_data(DataConfig(name="table", path=str(path)))
    with pytest.raises(DataError, match="images only"):
        load_data(DataConfig(name="table", path=str(path), label_column="target",
                             feature_columns=["a"], augment=AugmentConfig(flip=True)))


# ---------------------------------------------------------------------------------------------
# Hugging Face datasets (local only)


def _tiny_tokenizer(directory: Path) -> str:
    """A word-level BERT tokenizer built offline from a handful of words."""
    transformers = pytest.importorskip("transformers")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "great", "awful", "movie", "plot", "a"]
    try:
        tok = transformers.BertTokenizer(vocab={w: i for i, w in enumerate(words)})  # transformers >= 5
    except TypeError:
        (directory / "vocab.txt").write_text("\n".join(words) + "\n")
        tok = transformers.BertTokenizerFast(vocab_file=str(directory / "vocab.txt"))
    tok.save_pretrained(str(directory))
    return str(directory)


def test_hf_text_from_local_csv(tmp_path):
    pytest.importorskip("datasets")
    import pandas as pd

    texts = ["good movie", "bad plot", "great movie", "awful plot", "a good plot", "a bad movie"] * 4
    labels = ["pos", "neg", "pos", "neg", "pos", "neg"] * 4
    pd.DataFrame({"text": texts, "label": labels}).to_csv(tmp_path / "reviews.csv", index=False)
    tok = _tiny_tokenizer(tmp_path / "tok")
    cfg = DataConfig(name="hf", path=str(tmp_path / "reviews.csv"), tokenizer=tok, max_length=8)
    b = load_data(cfg)
    assert b.kind == "text" and b.input_size is None and b.in_channels is None
    assert b.class_names == ["neg", "pos"]
    assert b.train.inputs["input_ids"].shape[1] == 8 and b.train.inputs["input_ids"].dtype == torch.int64
    assert len(b.train) + len(b.val) + len(b.test) == 24
    row = b.train.inputs["input_ids"][0].tolist()
    assert row[0] == 2 and 0 in row  # [CLS] first, padded with [PAD]=0
    assert load_data(cfg).fingerprint == b.fingerprint
    with pytest.raises(DataError, match="data.tokenizer"):
        load_data(DataConfig(name="hf", path=str(tmp_path / "reviews.csv")))


def test_hf_images_from_save_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    def part(n, mode="L", size=(4, 4)):
        images = [Image.new(mode, size, 20 * i if mode == "L" else (20 * i, 0, 0)) for i in range(n)]
        return datasets.Dataset.from_dict(
            {"img": images, "label": [i % 2 for i in range(n)]},
            features=datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["off", "on"])}),
        )

    datasets.DatasetDict({"train": part(10), "test": part(4, "RGB", (5, 3))}).save_to_disk(str(tmp_path / "ds"))
    b = load_data(DataConfig(name="hf", path=str(tmp_path / "ds"), image_size=6, val_fraction=0.2))
    assert b.kind == "image" and b.class_names == ["off", "on"]
    assert b.in_channels == 1 and b.input_size == (6, 6)
    assert (len(b.train), len(b.val), len(b.test)) == (8, 2, 4)
    # without image_size the test split takes the train split's channels and size
    b = load_data(DataConfig(name="hf", path=str(tmp_path / "ds")))
    assert b.input_size == (4, 4) and b.test.inputs.shape == (4, 1, 4, 4)
    with pytest.raises(DataError, match="no column 'target'"):
        load_data(DataConfig(name="hf", path=str(tmp_path / "ds"), label_column="target"))


def test_hf_missing_local_path(tmp_path):
    pytest.importorskip("datasets")
    with pytest.raises(DataError, match="does not exist"):
        load_data(DataConfig(name="hf", path=str(tmp_path / "absent")))


# ---------------------------------------------------------------------------------------------
# augment_batch


def _batch(n=16, c=2, h=5, w=6):
    return torch.arange(n * c * h * w, dtype=torch.float32).view(n, c, h, w) + 1  # no zeros inside


def test_augment_noop_and_determinism():
    x = _batch()
    assert augment_batch(x, AugmentConfig(), torch.Generator().manual_seed(0)) is x
    cfg = AugmentConfig(pad_crop=2, flip=True)
    a = augment_batch(x, cfg, torch.Generator().manual_seed(7))
    b = augment_batch(x, cfg, torch.Generator().manual_seed(7))
    c = augment_batch(x, cfg, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(x, _batch())  # input untouched


def test_augment_flip_matches_torch_flip():
    image = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])[None, None]  # asymmetric left-right
    x = image.repeat(64, 3, 1, 1)
    out = augment_batch(x, AugmentConfig(flip=True), torch.Generator().manual_seed(0))
    flipped = torch.flip(x, dims=[-1])
    is_flipped = (out == flipped).flatten(1).all(1)
    is_same = (out == x).flatten(1).all(1)
    assert bool((is_flipped ^ is_same).all())  # each sample is exactly one of the two
    assert 10 < int(is_flipped.sum()) < 54  # roughly half


def test_augment_pad_crop_windows():
    pad = 2
    x = _batch()
    out = augment_batch(x, AugmentConfig(pad_crop=pad), torch.Generator().manual_seed(3))
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (pad,) * 4)
    h, w = x.shape[-2:]
    offsets = set()
    for n in range(x.shape[0]):
        matches = [
            (dy, dx)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            if torch.equal(out[n], padded[n, :, dy:dy + h, dx:dx + w])
        ]
        assert len(matches) == 1, f"sample {n} is not a window of the padded input"
        offsets.add(matches[0])
    assert len(offsets) > 1  # offsets really vary per sample


def test_augment_rejects_non_images():
    with pytest.raises(DataError, match=r"\(N, C, H, W\)"):
        augment_batch(torch.zeros(4, 3), AugmentConfig(flip=True), torch.Generator())
