"""MCMI (maximum-CMI teacher training): the CMI estimator against information-theoretic
identities and hand values, the centroid moving average, the method's buffers and warm-up, and
a short teacher-training run followed by distillation from it."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_cfg
from distillery import methods
from distillery.engine import fit
from distillery.losses.cmi import class_centroids, cmi, empirical_cmi, update_centroids
from distillery.methods.base import ModelOutput, Progress
from distillery.methods.cmi import MCMI

pytestmark = pytest.mark.usefixtures("one_torch_thread")

D = torch.float64


def _logits(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D) * scale


def _entropy(p):
    return -(p * p.clamp(min=1e-300).log()).sum(-1)


# --------------------------------------------------------------------------- the estimator


def test_hard_predictions_give_the_conditional_entropy_of_predictions_given_labels():
    # class 0: predictions 0, 0, 1, 1 -> H = log 2; class 1: predictions 2, 2, 2, 2 -> H = 0
    pred = torch.tensor([0, 0, 1, 1, 2, 2, 2, 2])
    y = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    logits = F.one_hot(pred, 3).to(D) * 80.0  # softmax is one-hot to ~1e-35
    assert empirical_cmi(logits, y).item() == pytest.approx(0.5 * math.log(2), rel=1e-9)


def test_cmi_equals_entropy_of_centroid_minus_mean_entropy():
    """I(X; Y_hat | Y) = H(Y_hat | Y) - H(Y_hat | X, Y) = sum_y P(y) [H(Q_y) - mean_{x|y} H(P_x)]."""
    z = _logits(30, 4, seed=1, scale=2.0)
    y = torch.arange(30) % 3
    p = torch.softmax(z, -1)
    expected = 0.0
    for c in range(3):
        rows = p[y == c]
        expected += len(rows) / 30 * (_entropy(rows.mean(0)) - _entropy(rows).mean()).item()
    assert empirical_cmi(z, y).item() == pytest.approx(expected, rel=1e-10)


def test_zero_when_each_class_has_one_output_and_positive_otherwise():
    z = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 1.0]], dtype=D)
    y = torch.tensor([0, 1, 0, 1, 1])
    assert empirical_cmi(z[y], y).item() == pytest.approx(0.0, abs=1e-14)
    assert empirical_cmi(_logits(5, 3, seed=2), y).item() > 1e-3


def test_invariant_to_sample_order_and_to_renaming_the_classes():
    z, y = _logits(12, 5, seed=3, scale=2.0), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2])
    base = empirical_cmi(z, y).item()
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    assert empirical_cmi(z[perm], y[perm]).item() == pytest.approx(base, rel=1e-12)
    rename = torch.tensor([2, 0, 1])  # label ids permuted; the output classes untouched
    assert empirical_cmi(z, rename[y]).item() == pytest.approx(base, rel=1e-12)


def test_cmi_against_given_centroids_by_hand_and_ignore_index():
    z = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [5.0, 1.0]], dtype=D)
    q = torch.tensor([[0.5, 0.5], [0.25, 0.75]], dtype=D)
    y = torch.tensor([1, 0, -100])
    kl0 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)  # KL((1/2,1/2) || (1/4,3/4))
    kl1 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)  # KL((3/4,1/4) || (1/2,1/2))
    assert cmi(z, y, q).item() == pytest.approx((kl0 + kl1) / 2, rel=1e-12)
    with pytest.raises(ValueError, match="centroids"):
        cmi(z, y, q[:, :1])
    with pytest.raises(ValueError, match="targets"):
        cmi(z, torch.tensor([0, 2, 1]), q)  # class 2 has no centroid


def test_gradcheck_float64_and_no_gradient_into_the_centroids():
    z = _logits(5, 3, seed=4).requires_grad_()
    q = torch.softmax(_logits(2, 3, seed=5), -1).requires_grad_()
    y = torch.tensor([0, 1, 1, 0, 1])
    assert torch.autograd.gradcheck(lambda a: cmi(a, y, q.detach()), (z,))
    _, grad_q = torch.autograd.grad(cmi(z, y, q), [z, q], allow_unused=True)
    assert grad_q is None


def test_class_centroids_and_moving_average_by_hand():
    p = torch.tensor([[0.2, 0.8], [0.6, 0.4], [1.0, 0.0], [0.5, 0.5]], dtype=D)
    y = torch.tensor([0, 0, 2, -100])
    cents, counts = class_centroids(p, y, 3)
    torch.testing.assert_close(cents, torch.tensor([[0.4, 0.6], [0.0, 0.0], [1.0, 0.0]], dtype=D))
    torch.testing.assert_close(counts, torch.tensor([2.0, 0.0, 1.0], dtype=D))

    old = torch.tensor([[0.5, 0.5], [0.9, 0.1], [0.3, 0.7]], dtype=D)
    seen = torch.tensor([1.0, 1.0, 0.0], dtype=D)
    new, seen2 = update_centroids(old, seen, p, y, decay=0.75)
    # class 0 seen before: 0.75 old + 0.25 batch; class 1 absent: unchanged; class 2 first seen: batch
    torch.testing.assert_close(new, torch.tensor([[0.475, 0.525], [0.9, 0.1], [1.0, 0.0]], dtype=D))
    torch.testing.assert_close(seen2, torch.tensor([2.0, 1.0, 1.0], dtype=D))
    with pytest.raises(ValueError, match="decay"):
        update_centroids(old, seen, p, y, decay=1.0)


# --------------------------------------------------------------------------- the method


def _method(**params):
    spec = methods.get_spec("cmi")
    return MCMI(spec.validate_params(params), student=torch.nn.Identity(), teacher_layers=None, num_classes=3)


def test_method_is_ce_minus_lambda_cmi_after_the_warmup_and_tracks_centroids():
    m = _method(cmi_weight=0.5, decay=0.5, warmup_epochs=1.0)
    z, y = _logits(6, 3, seed=6, scale=2.0).float(), torch.tensor([0, 1, 2, 0, 1, 2])
    warm = m(ModelOutput(z), None, y, Progress(0.5, 5, 100))
    assert warm["cmi"].item() == 0.0 and warm["ce"].item() == pytest.approx(F.cross_entropy(z, y).item(), rel=1e-6)
    # the first batch set every centroid to its class mean
    torch.testing.assert_close(m.centroids, class_centroids(torch.softmax(z, -1), y, 3)[0].float())
    z2 = _logits(6, 3, seed=7, scale=2.0).float()
    terms = m(ModelOutput(z2), None, y, Progress(1.0, 10, 100))
    expected_q = 0.5 * class_centroids(torch.softmax(z, -1), y, 3)[0] + 0.5 * class_centroids(torch.softmax(z2, -1), y, 3)[0]
    torch.testing.assert_close(m.centroids, expected_q.float())
    assert terms["cmi"].item() == pytest.approx(-0.5 * cmi(z2, y, expected_q.float()).item(), rel=1e-6)
    assert {"centroids", "seen"} <= set(m.state_dict())
    m.eval()
    before = m.centroids.clone()
    m(ModelOutput(z), None, y, Progress(2.0, 20, 100))
    assert torch.equal(m.centroids, before)  # evaluation does not move the centroids


def test_maximising_cmi_spreads_a_class_and_the_gradient_points_that_way():
    """One gradient step on -CMI (weight only) moves the outputs away from their class centroid."""
    m = _method(cmi_weight=1.0, warmup_epochs=0.0)
    y = torch.tensor([0, 0, 0, 1, 1, 1])
    z = (_logits(6, 3, seed=8) * 0.3).float().requires_grad_()
    m(ModelOutput(z.detach()), None, y, Progress(0.0, 0, 10))  # set the centroids
    before = empirical_cmi(z.detach(), y).item()
    (grad,) = torch.autograd.grad(m(ModelOutput(z), None, y, Progress(0.0, 1, 10))["cmi"], [z])
    after = empirical_cmi(z.detach() - 0.5 * grad, y).item()
    assert after > before


def test_teacher_training_run_then_kd_from_it(tmp_path):
    teacher = fit(tiny_cfg(tmp_path / "t", name="cmi-teacher", student={"arch": "cnn", "kwargs": {"width": 8}},
                           method={"name": "cmi", "params": {"cmi_weight": 0.2, "warmup_epochs": 1.0}},
                           train={"epochs": 2, "progress": False, "report": False}))
    rows = [json.loads(line) for line in (teacher.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["train_cmi"] == 0.0 and rows[1]["train_cmi"] < 0 and all(r["train_ce"] > 0 for r in rows)
    assert teacher.summary["method"] == "cmi" and teacher.summary["test_accuracy"] > 0.5
    student = fit(tiny_cfg(tmp_path / "s", teacher={"run": str(teacher.run_dir)}, method={"name": "kd"},
                           train={"epochs": 1, "progress": False, "report": False}))
    assert student.summary["teacher_test_accuracy"] == pytest.approx(teacher.summary["test_accuracy"])
