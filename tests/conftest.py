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


def interrupt_then_resume(cfg, monkeypatch, at_step: int):
    """Run ``cfg`` with a hard interrupt (KeyboardInterrupt inside the optimiser step) at Adam
    step ``at_step``, check the engine reports it, then resume; returns the resumed RunResult."""
    import torch

    from distillery.engine import Interrupted, fit

    real_step, calls = torch.optim.Adam.step, {"n": 0}

    def flaky_step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == at_step:
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", flaky_step)
    with pytest.raises(Interrupted):
        fit(cfg)
    monkeypatch.setattr(torch.optim.Adam, "step", real_step)
    return fit(cfg, resume=True)


def same_weights(run_a, run_b) -> bool:
    """Bit-identical saved weights of two finished runs."""
    import torch
    from safetensors.torch import load_file

    a, b = (load_file(str(r.run_dir / "model.safetensors")) for r in (run_a, run_b))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="session")
def lm_tiny(tmp_path_factory):
    """Tiny real causal LMs shared by the LM tests: a byte-level BPE (300 tokens) trained on a few
    standard-library files, a 2-layer GPT-2 teacher and a 1-layer student (random weights,
    context 64).  Built once per session (tokenizer training is the slow part)."""
    from lm_helpers import make_model, make_tokenizer

    root = tmp_path_factory.mktemp("lm-tiny")
    tok = make_tokenizer(root / "tok")
    return {"root": root, "tok": tok,
            "teacher": make_model(root / "teacher", tok, n_layer=2, n_embd=48, n_positions=64, seed=0),
            "student": make_model(root / "student", tok, n_layer=1, n_embd=32, n_positions=64, seed=1)}
