"""Mixup / CutMix KD (Choi et al. 2023): mixing against its definition (lambda = 1 is the identity,
CutMix box area = 1 - lambda), mixed labels, the std-adapted temperature (hand formula, scale
invariance, gradcheck), partial mixup, the teacher called on exactly the mixed input, the cache
refused, and a short run on digits that resumes to the same weights."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import interrupt_then_resume, same_weights, tiny_cfg
from distillery import methods
from distillery.config import AugmentConfig, DataConfig, ModelSpec, config_from_dict
from distillery.data import load_data
from distillery.engine.teacher import OnlineTeacher
from distillery.errors import ConfigError
from distillery.losses import logits as L
from distillery.losses.mixup import (
    box_mask,
    cutmix,
    cutmix_boxes,
    mixed_targets,
    mixup,
    soft_cross_entropy,
    standardized_kd,
)
from distillery.methods.base import ModelOutput, Progress
from distillery.models import build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------- mixing


def test_mixup_by_hand_and_lambda_one_is_the_identity():
    x = torch.tensor([[1.0, 2.0], [3.0, 5.0], [-1.0, 0.0]])
    perm = torch.tensor([1, 2, 0])
    assert torch.equal(mixup(x, perm, torch.ones(3)), x)
    out = mixup(x, perm, torch.tensor([0.25, 1.0, 0.5]))
    torch.testing.assert_close(out, torch.tensor([[0.25 * 1 + 0.75 * 3, 0.25 * 2 + 0.75 * 5], [3.0, 5.0], [0.0, 1.0]]))
    images = torch.randn(3, 2, 4, 4)
    torch.testing.assert_close(mixup(images, perm, torch.zeros(3)), images[perm])  # lambda 0: the partner
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        mixup(x, perm, torch.tensor([1.5, 1.0, 1.0]))


def test_cutmix_box_area_is_one_minus_lambda():
    # A box that fits: 8x8 image, lambda 0.75 -> sides 4, area 16/64 = 1 - lambda exactly.
    boxes, lam = cutmix_boxes(torch.tensor([0.75]), torch.tensor([[0.5, 0.5]]), 8, 8)
    assert boxes.tolist() == [[2, 6, 2, 6]] and lam.item() == 0.75
    # Random boxes, clipped at the border: the returned lambda is 1 - (pasted area) / (H W).
    g = torch.Generator().manual_seed(0)
    lam0 = torch.rand(64, generator=g)
    centres = torch.rand(64, 2, generator=g)
    boxes, lam = cutmix_boxes(lam0, centres, 10, 12)
    mask = box_mask(boxes, 10, 12)
    torch.testing.assert_close(1 - mask.float().mean((1, 2, 3)), lam)
    assert bool((lam >= lam0 - 0.2).all())  # clipping only shrinks a box (plus rounding)
    # The pixels inside the box come from the partner, all others from the sample itself.
    x = torch.randn(64, 3, 10, 12, generator=g)
    perm = torch.randperm(64, generator=g)
    out = cutmix(x, perm, boxes)
    m = mask.expand_as(x)
    assert torch.equal(out[m], x[perm][m]) and torch.equal(out[~m], x[~m])
    # lambda = 1: no box at all
    b1, l1 = cutmix_boxes(torch.ones(2), torch.rand(2, 2, generator=g), 8, 8)
    assert l1.tolist() == [1.0, 1.0] and not box_mask(b1, 8, 8).any()


def test_mixed_targets_and_soft_cross_entropy_is_the_mixed_ce():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(5, 4, generator=g)
    y = torch.tensor([0, 1, 2, 3, 1])
    perm = torch.tensor([4, 3, 2, 1, 0])
    lam = torch.tensor([0.3, 1.0, 0.5, 0.0, 0.9])
    q = mixed_targets(y, perm, lam, 4)
    assert q[0].tolist() == pytest.approx([0.3, 0.7, 0.0, 0.0]) and torch.allclose(q.sum(1), torch.ones(5))
    # CE with mixed labels = lam CE(y) + (1 - lam) CE(y_perm), per sample (linearity of CE in the target)
    per = lam * F.cross_entropy(z, y, reduction="none") + (1 - lam) * F.cross_entropy(z, y[perm], reduction="none")
    torch.testing.assert_close(soft_cross_entropy(z, q), per.mean())
    with pytest.raises(ValueError, match="-100"):
        mixed_targets(torch.tensor([0, -100]), torch.tensor([1, 0]), torch.ones(2), 4)


# ----------------------------------------------------------------------------- temperature


def test_standardized_kd_by_hand_and_scale_invariant():
    s = np.array([[1.0, 2.0, 4.0], [0.0, -1.0, 3.0]])
    t = np.array([[3.0, 0.0, 1.0], [2.0, 2.0, -2.0]])

    def softmax(v):
        e = np.exp(v - v.max())
        return e / e.sum()

    expected = 0.0
    for si, ti in zip(s, t):
        p = softmax(ti / ti.std(ddof=1))
        q = softmax(si / si.std(ddof=1))
        expected += float((p * np.log(p / q)).sum())
    value = standardized_kd(torch.tensor(s), torch.tensor(t))
    assert value.item() == pytest.approx(expected / 2, rel=1e-10)
    # The point of the rule: each network's own logit scale no longer matters.
    assert standardized_kd(torch.tensor(s) * 7.0, torch.tensor(t) * 0.3).item() == pytest.approx(expected / 2, rel=1e-10)
    # scale = 2 is the same as halving every logit first
    torch.testing.assert_close(standardized_kd(torch.tensor(s), torch.tensor(t), scale=2.0),
                               L.kd(torch.tensor(s) / (2 * torch.tensor(s).std(1, keepdim=True)),
                                    torch.tensor(t) / (2 * torch.tensor(t).std(1, keepdim=True)), temperature=1.0))


def test_standardized_kd_gradcheck():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randn(3, 5, dtype=torch.float64, generator=g)
    assert torch.autograd.gradcheck(lambda a: standardized_kd(a, t, scale=1.5), (s,))
    q = torch.softmax(torch.randn(3, 5, dtype=torch.float64, generator=g), -1)
    assert torch.autograd.gradcheck(lambda a: soft_cross_entropy(a, q, standardize=True), (s,))


# ----------------------------------------------------------------------------- the method


def _digits_teacher():
    """A small MLP teacher trained in-process on digits (a second): ~95 % test accuracy."""
    data = load_data(DataConfig(name="digits"))
    torch.manual_seed(0)
    teacher = build_model(ModelSpec(arch="mlp", kwargs={"hidden": [64]}), in_channels=1, num_classes=10, input_size=(8, 8))
    opt = torch.optim.Adam(teacher.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(teacher(data.train.inputs), data.train.labels).backward()
        opt.step()
    return teacher.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def teacher():
    return _digits_teacher()


def _method(teacher, **params):
    torch.manual_seed(1)
    student = build_model(ModelSpec(arch="mlp", kwargs={"hidden": [16]}), in_channels=1, num_classes=10, input_size=(8, 8))
    spec = methods.get_spec("mixup_kd")
    m = spec.cls(spec.validate_params(params), student=student, teacher_layers=None, num_classes=10)
    calls = []
    live = OnlineTeacher(teacher, [], AugmentConfig(), 0, True)

    def spy(x, grad=False):
        calls.append(x.detach().clone())
        return live.outputs(x, grad=grad)

    object.__setattr__(m, "_teacher_fn", spy)
    return m, student, calls


def test_partial_mixup_mixes_exactly_the_asked_share():
    m, _, _ = _method(None, mix_fraction=0.25)
    x = torch.randn(20, 1, 8, 8)
    mixed, perm, lam, boxes = m._draw(20, x, step=3)
    assert int(mixed.sum()) == 5 and boxes is None
    assert bool((lam[~mixed] == 1).all()) and bool((lam[mixed] < 1).all())
    again = m._draw(20, x, step=3)
    assert torch.equal(again[2], lam) and torch.equal(again[1], perm)  # seeded by (seed, step)
    assert not torch.equal(m._draw(20, x, step=4)[2], lam)
    full, *_ = _method(None, mix_fraction=1.0)[0]._draw(20, x, step=3)
    assert bool(full.all())


@pytest.mark.parametrize("mode", ["mixup", "cutmix"])
def test_teacher_is_called_on_the_mixed_input(teacher, mode):
    m, student, calls = _method(teacher, mode=mode, mix_fraction=0.5)
    x = torch.randn(8, 1, 8, 8)
    y = torch.arange(8)
    t_clean = ModelOutput(teacher(x))
    terms = m(ModelOutput(student(x), {}, x), t_clean, y, Progress(0.0, 7, 10))
    mixed, perm, lam, boxes = m._draw(8, x, 7)
    x_mix = cutmix(x, perm, boxes) if mode == "cutmix" else mixup(x, perm, lam)
    assert len(calls) == 1 and torch.equal(calls[0], x_mix[mixed])  # only the mixed rows are sent
    assert not torch.equal(calls[0], x[mixed])
    # Reusing the clean answer for unmixed rows equals running the teacher on the whole mixed batch.
    with torch.no_grad():
        s_mix, t_mix = student(x_mix), teacher(x_mix)
    torch.testing.assert_close(terms["kd"], 0.9 * standardized_kd(s_mix, t_mix))
    q = mixed_targets(y, perm, lam, 10)
    torch.testing.assert_close(terms["ce"], 0.1 * soft_cross_entropy(s_mix, q, standardize=True))


def test_fixed_temperature_rule_is_hinton_kd_on_the_mixed_input(teacher):
    m, student, calls = _method(teacher, temperature_rule="fixed", temperature=2.0, mix_fraction=1.0, ce_weight=0.0)
    x = torch.randn(6, 1, 8, 8)
    terms = m(ModelOutput(student(x), {}, x), ModelOutput(teacher(x)), torch.arange(6), Progress(0.0, 0, 10))
    assert set(terms) == {"kd"} and torch.equal(calls[0], mixup(x, *m._draw(6, x, 0)[1:3]))
    with torch.no_grad():
        expected = 0.9 * L.kd(student(calls[0]), teacher(calls[0]), temperature=2.0)
    torch.testing.assert_close(terms["kd"], expected)


def test_bad_input_and_params_are_named():
    spec = methods.get_spec("mixup_kd")
    with pytest.raises(ValueError, match="mix_fraction"):
        spec.validate_params({"mix_fraction": 0.0})
    m, student, _ = _method(None, mode="cutmix")
    x = torch.randn(4, 64)
    with pytest.raises(ValueError, match="cutmix needs image batches"):
        m(ModelOutput(torch.randn(4, 10), {}, x), ModelOutput(torch.randn(4, 10)), torch.arange(4), Progress(0.0, 0, 1))


def test_a_teacher_cache_is_refused():
    assert methods.get_spec("mixup_kd").live_teacher
    with pytest.raises(ConfigError, match="no cache"):
        config_from_dict({"student": {"arch": "mlp"}, "method": {"name": "mixup_kd"},
                          "teacher": {"run": "runs/t", "cache": True}})


def test_mixup_kd_on_digits_learns_and_resumes_to_the_same_weights(tmp_path, monkeypatch, teacher):
    from distillery.engine import fit

    common = dict(teacher={"model": {"arch": "mlp", "kwargs": {"hidden": [64]}}},
                  method={"name": "mixup_kd", "params": {"mix_fraction": 0.5}},
                  train={"epochs": 2, "progress": False, "report": False, "checkpoint_every": 15})
    full = fit(tiny_cfg(tmp_path / "a", **common), teacher=teacher)
    s = full.summary
    assert s["method"] == "mixup_kd" and s["teacher_test_accuracy"] > 0.9
    assert s["test_accuracy"] > 0.5  # chance is 0.1
    row = json.loads((full.run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert math.isfinite(row["train_kd"]) and row["train_ce"] > 0

    # mixes are drawn from (seed, step): a run interrupted mid-epoch ends with the same weights
    import distillery.engine.trainer as trainer

    monkeypatch.setattr(trainer, "load_teacher", lambda *a, **k: teacher)
    resumed = interrupt_then_resume(tiny_cfg(tmp_path / "b", **common), monkeypatch, at_step=30)
    assert same_weights(full, resumed)
