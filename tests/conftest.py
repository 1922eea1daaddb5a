import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")
FMNIST = Path("/usr/share/datasets/fashion-mnist")
ROOT = Path(__file__).resolve().parents[1]


def has_fmnist() -> bool:
    return (FMNIST / "train-images-idx3-ubyte.gz").is_file() or bool(os.environ.get("DISTILLERY_DATA"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of tiny tensors: one intra-op thread is faster than two fighting over a busy
    2-core machine (each op can stall for milliseconds; gradcheck makes thousands).  Use with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``; restores the count after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


needs_fmnist = pytest.mark.skipif(not has_fmnist(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


def tiny_cfg(tmp_path, **over):
    """A digits run small enough for a unit test (a few seconds)."""
    from distillery.config import config_from_dict

    raw = {
        "name": "run",
        "output_dir": str(tmp_path / "runs"),
        "data": {"name": "digits", "batch_size": 32},
        "student": {"arch": "mlp", "kwargs": {"hidden": [32]}},
        "method": {"name": "ce"},
        "train": {"epochs": 2, "progress": False, "report": False},
    }
    for key, value in over.items():
        raw[key] = {**raw[key], **value} if isinstance(raw.get(key), dict) and isinstance(value, dict) else value
    return config_from_dict(raw)
