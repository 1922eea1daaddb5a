"""USKD: the customised soft labels and loss terms against hand-computed values (including the
released code's ranking details), gradients, the weak head's wiring, and a teacher-free run."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_cfg
from distillery import methods
from distillery.engine import fit
from distillery.losses.uskd import (
    uskd,
    uskd_non_target_loss,
    uskd_target_label,
    uskd_target_loss,
    uskd_weak_loss,
    zipf_non_target_labels,
)
from distillery.methods.base import ModelOutput, Progress
from distillery.models.zoo import cnn
from distillery.taps import Taps

pytestmark = pytest.mark.usefixtures("one_torch_thread")

D = torch.float64


def _t(rows):
    return torch.tensor(rows, dtype=D)


# --------------------------------------------------------------------------- soft target label


def test_target_label_hand_value_and_batch_mean_one():
    # S_t = 0.5 and 0.9: squares 0.25, 0.81 (mean 0.53) -> labels 0.72, 1.28; -100 rows get 0.
    logits = _t([[0.0, 0.0], [math.log(9.0), 0.0], [5.0, -5.0]])
    targets = torch.tensor([0, 0, -100])
    label = uskd_target_label(logits, targets)
    torch.testing.assert_close(label, _t([0.72, 1.28, 0.0]))
    assert not label.requires_grad
    assert label[:2].mean().item() == pytest.approx(1.0, abs=1e-12)


def test_target_loss_hand_value_and_gradient_is_weighted_ce():
    logits = _t([[0.0, 0.0], [math.log(9.0), 0.0]]).requires_grad_()
    targets = torch.tensor([0, 0])
    loss = uskd_target_loss(logits, targets)
    assert loss.item() == pytest.approx((0.72 * math.log(2.0) + 1.28 * -math.log(0.9)) / 2, rel=1e-12)
    # P_t is a constant label: the gradient is that of a P_t-weighted cross-entropy
    (grad,) = torch.autograd.grad(loss, logits)
    weights = _t([0.72, 1.28])
    (expected,) = torch.autograd.grad((weights * F.cross_entropy(logits, targets, reduction="none")).mean(), logits)
    torch.testing.assert_close(grad, expected)


# --------------------------------------------------------------------------- Zipf non-target labels


def test_zipf_labels_for_a_consistent_ranking():
    z = _t([[3.0, 2.0, 1.0, 0.0]])  # student and weak agree: ranks 1, 2, 3, 4; target 0 first
    y = torch.tensor([0])
    torch.testing.assert_close(zipf_non_target_labels(z, z, y), _t([[0.0, 6 / 13, 4 / 13, 3 / 13]]))
    torch.testing.assert_close(zipf_non_target_labels(z, z, y, power=2.0), _t([[0.0, 36 / 61, 16 / 61, 9 / 61]]))


def test_zipf_labels_keep_the_target_rank():
    # The student puts class 1 first; class 0 (the target) and class 2 tie in the student and
    # the weak logits break the tie for the target: ranks are class1=1, class0=2, class2=3, so
    # the non-target labels are 1 : 1/3 (not 1 : 1/2 as if the target had been removed first).
    student, weak = _t([[0.0, 5.0, 0.0]]), _t([[1.0, 5.0, 0.0]])
    torch.testing.assert_close(zipf_non_target_labels(student, weak, torch.tensor([0])), _t([[0.0, 0.75, 0.25]]))


def test_zipf_ranking_uses_student_log_probabilities_like_the_released_code():
    # Student S = (0.1, 0.5, 0.4), target 0; weak non-target share (0.455, 0.545).
    # Released score: w_c/(1-w_t) + log S_c/(1-log S_t): class 1: 0.455-0.210, class 2: 0.545-0.277
    # -> class 2 ranks first. (In probability space, S_c/(1-S_t), class 1 would win: 1.011 vs 0.989.)
    student = torch.log(_t([[0.1, 0.5, 0.4]]))
    weak = _t([[0.0, 0.0, math.log(0.545 / 0.455)]])
    torch.testing.assert_close(zipf_non_target_labels(student, weak, torch.tensor([0])), _t([[0.0, 1 / 3, 2 / 3]]))


def test_zipf_labels_are_a_distribution_and_permutation_equivariant():
    g = torch.Generator().manual_seed(0)
    s, w = torch.randn(5, 7, generator=g, dtype=D) * 2, torch.randn(5, 7, generator=g, dtype=D) * 2
    y = torch.randint(0, 7, (5,), generator=g)
    labels = zipf_non_target_labels(s, w, y)
    torch.testing.assert_close(labels.sum(-1), torch.ones(5, dtype=D))
    assert (labels.gather(1, y[:, None]) == 0).all() and (labels >= 0).all()
    perm = torch.randperm(7, generator=g)
    inverse = torch.argsort(perm)
    permuted = zipf_non_target_labels(s[:, perm], w[:, perm], inverse[y])
    torch.testing.assert_close(permuted, labels[:, perm])


def test_non_target_loss_hand_value_and_gradcheck():
    z = _t([[3.0, 2.0, 1.0, 0.0]])
    # labels (6, 4, 3)/13 against the softmax of the non-target logits (2, 1, 0)
    log_q = [v - math.log(math.exp(2) + math.exp(1) + 1) for v in (2.0, 1.0, 0.0)]
    expected = -sum(w * lq for w, lq in zip((6 / 13, 4 / 13, 3 / 13), log_q))
    assert uskd_non_target_loss(z, z, torch.tensor([0])).item() == pytest.approx(expected, rel=1e-12)
    g = torch.Generator().manual_seed(1)
    s = (torch.randn(3, 5, generator=g, dtype=D) * 2).requires_grad_()
    w = torch.randn(3, 5, generator=g, dtype=D) * 2
    y = torch.tensor([0, 3, 4])
    # the labels are piecewise constant in the logits: the loss is smooth between rank changes
    assert torch.autograd.gradcheck(lambda a: uskd_non_target_loss(a, w, y), (s,))
    (grad_w,) = torch.autograd.grad(uskd_non_target_loss(s, w.requires_grad_(), y), w, allow_unused=True)
    assert grad_w is None


# --------------------------------------------------------------------------- weak supervision, total


def test_weak_loss_is_label_smoothed_ce():
    w = _t([[1.0, 0.0, -1.0]])
    log_p = torch.log_softmax(w, -1)[0].tolist()
    expected = -(0.9 + 0.1 / 3) * log_p[0] - 0.1 / 3 * (log_p[1] + log_p[2])
    assert uskd_weak_loss(w, torch.tensor([0])).item() == pytest.approx(expected, rel=1e-12)
    g = torch.Generator().manual_seed(2)
    w = (torch.randn(4, 6, generator=g, dtype=D)).requires_grad_()
    y = torch.tensor([1, 0, 5, -100])
    assert uskd_weak_loss(w, y).item() == pytest.approx(
        F.cross_entropy(w, y, label_smoothing=0.1, ignore_index=-100).item(), rel=1e-12)
    assert torch.autograd.gradcheck(lambda a: uskd_weak_loss(a, y, smoothing=0.2), (w,))


def test_uskd_combines_the_three_terms_and_handles_leading_dims():
    g = torch.Generator().manual_seed(3)
    s, w = torch.randn(2, 3, 5, generator=g, dtype=D), torch.randn(2, 3, 5, generator=g, dtype=D)
    y = torch.tensor([[0, 1, -100], [4, -100, 2]])
    total = uskd(s, w, y, alpha=1.0, beta=0.1, mu=0.005)
    parts = 1.0 * uskd_target_loss(s, y) + 0.1 * uskd_non_target_loss(s, w, y) + 0.005 * uskd_weak_loss(w, y)
    assert total.item() == pytest.approx(parts.item(), rel=1e-12)
    keep = y != -100
    assert total.item() == pytest.approx(uskd(s[keep], w[keep], y[keep], alpha=1.0, beta=0.1, mu=0.005).item(), rel=1e-12)
    with pytest.raises(ValueError, match="needs targets"):
        uskd_target_loss(s)
    with pytest.raises(ValueError, match="power"):
        zipf_non_target_labels(s, w, y, power=0.0)


# --------------------------------------------------------------------------- the method


def _method(**params):
    spec = methods.get_spec("uskd")
    assert spec.needs_teacher is False
    student = cnn(1, 10, (8, 8), width=4)
    return student, spec.cls(spec.validate_params(params), student=student, teacher_layers=None, num_classes=10)


def _out(student, method, x):
    with Taps(student, method.student_taps) as taps:
        logits = student(x)
        return ModelOutput(logits, taps.collect(), x)


def test_method_wires_weak_head_on_the_stage_before_last():
    torch.manual_seed(0)
    student, method = _method()
    assert student.default_feature_layers == ["features.0", "features.1", "features.3"]
    assert method.student_taps == ["features.1"]
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    with torch.no_grad():
        method.setup(_out(student, method, x), None)
    assert method.weak_head.in_features == 8  # features.1 has 2 * width channels
    assert any(k.startswith("weak_head.") for k in method.state_dict())
    terms = method(_out(student, method, x), None, y, Progress(0.0, 0, 10))
    assert set(terms) == {"ce", "uskd_target", "uskd_non_target", "uskd_weak"}
    watched = [student.features[1][0].weight, student.features[3][0].weight, student.head.weight, method.weak_head.weight]
    reach = {name: [g is not None and g.abs().sum() > 0
                    for g in torch.autograd.grad(v, watched, retain_graph=True, allow_unused=True)]
             for name, v in terms.items()}
    assert reach["uskd_weak"] == [True, False, False, True]  # early backbone + weak head only
    for name in ("ce", "uskd_target", "uskd_non_target"):
        assert reach[name] == [True, True, True, False]
    p = method.params
    assert terms["uskd_weak"].item() == pytest.approx(
        p.mu * F.cross_entropy(method.weak_head(_out(student, method, x).features["features.1"].mean((2, 3))), y,
                               label_smoothing=0.1).item(), rel=1e-5)


def test_feature_layer_choice_and_errors():
    _, method = _method(feature_layer="features.0")
    assert method.student_taps == ["features.0"]
    spec = methods.get_spec("uskd")
    with pytest.raises(ValueError, match="default_feature_layers"):
        spec.cls(spec.validate_params({}), student=torch.nn.Linear(3, 2), teacher_layers=None, num_classes=2)
    with pytest.raises(ValueError, match="zipf_power"):
        spec.validate_params({"zipf_power": 0})


def test_teacher_free_run_logs_every_term(tmp_path):
    cfg = tiny_cfg(tmp_path, student={"arch": "cnn", "kwargs": {"width": 4}}, method={"name": "uskd"},
                   train={"epochs": 2, "progress": False})
    res = fit(cfg)
    rows = [json.loads(line) for line in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        assert {"train_ce", "train_uskd_target", "train_uskd_non_target", "train_uskd_weak"} <= set(row)
        assert row["train_loss"] == pytest.approx(
            sum(v for k, v in row.items() if k.startswith("train_") and k != "train_loss"), rel=1e-5)
    assert rows[-1]["train_ce"] < rows[0]["train_ce"]
    assert res.summary["test_accuracy"] > 0.3
    assert "teacher_test_accuracy" not in res.summary
