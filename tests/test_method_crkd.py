"""Class-relation KD for novel class discovery: losses, metric, data class filter, method, end to end."""
import itertools
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from conftest import tiny_cfg
from distillery.config import DataConfig, config_from_dict
from distillery.data import load_data
from distillery.errors import ConfigError, DataError, DistilleryError
from distillery.losses.ncd import crkd, ncd_targets, sinkhorn_knopp, swapped_prediction
from distillery.methods import get_spec
from distillery.methods.base import ModelOutput, Progress
from distillery.report.clustering import cluster_accuracy

pytestmark = pytest.mark.usefixtures("one_torch_thread")
D = torch.float64


# ---------------------------------------------------------------------------------------- crkd loss

# Sample 1: teacher p = (1/4, 3/4); student softmax over 3 slots (1/4, 1/4, 1/2), so its known head
# q = (1/2, 1/2) and weight w = 1/2.  Sample 2: p = (1/2, 1/2); student (1/5, 3/5, 1/5), q = (1/4, 3/4),
# w = 4/5.  Normalised weights: w / mean(w) = (10/13, 16/13).
TEACHER = torch.tensor([[0.0, math.log(3)], [0.0, 0.0]], dtype=D)
STUDENT = torch.tensor([[0.0, 0.0, math.log(2)], [0.0, math.log(3), 0.0]], dtype=D)
KL1 = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
KL2 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)


def test_crkd_hand_computed_learnable_weight():
    got = crkd(STUDENT, TEACHER, temperature=1.0)
    assert got.item() == pytest.approx(0.5 * (10 / 13 * KL1 + 16 / 13 * KL2), rel=1e-12)


def test_crkd_hand_computed_uniform_weight():
    got = crkd(STUDENT, TEACHER, temperature=1.0, weighting="uniform")
    assert got.item() == pytest.approx(0.5 * (KL1 + KL2), rel=1e-12)


def test_crkd_temperature_scales_by_t_squared():
    # Dividing logits twice as large by T = 2 gives the same distributions; the loss carries T^2.
    t1 = crkd(STUDENT, TEACHER, temperature=1.0)
    t2 = crkd(2 * STUDENT, 2 * TEACHER, temperature=2.0)
    assert t2.item() == pytest.approx(4 * t1.item(), rel=1e-12)


def test_crkd_weight_carries_gradient_but_not_when_all_kls_agree():
    s = STUDENT.clone().requires_grad_(True)
    crkd(s, TEACHER, temperature=1.0).backward()
    g_learnable = s.grad.clone()
    s.grad = None
    crkd(s, TEACHER, temperature=1.0, weighting="uniform").backward()
    assert not torch.allclose(g_learnable, s.grad)  # the weight is part of the graph
    assert g_learnable[:, 2].abs().sum() > 0  # novel slots only enter through the weight
    # Equal KL for every sample: the weights average to 1, so the loss equals the unweighted one.
    same = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 3.0]], dtype=D)
    teacher = torch.tensor([[0.5, 0.0], [0.5, 0.0]], dtype=D)
    assert crkd(same, teacher, temperature=1.0).item() == pytest.approx(
        crkd(same, teacher, temperature=1.0, weighting="uniform").item(), rel=1e-12)


def test_crkd_empty_batch_and_bad_shapes():
    s = torch.zeros(0, 5, requires_grad=True)
    out = crkd(s, torch.zeros(0, 3))
    assert out.item() == 0.0
    out.backward()
    with pytest.raises(ValueError, match="K <= C"):
        crkd(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="weighting"):
        crkd(STUDENT, TEACHER, weighting="fixed")


# ---------------------------------------------------------------------------------------- UNO pieces


def _sinkhorn_reference(logits, epsilon, iterations):
    """The textbook algorithm in probability space (fine for moderate logits)."""
    q = torch.exp(logits / epsilon)
    q = q / q.sum()
    n, k = q.shape
    for _ in range(iterations):
        q = q / q.sum(0, keepdim=True) / k
        q = q / q.sum(1, keepdim=True) / n
    return q * n


def test_sinkhorn_knopp_matches_reference_and_marginals():
    logits = torch.randn(12, 3, generator=torch.Generator().manual_seed(0), dtype=D) * 3
    for iterations in (1, 3, 10):
        q = sinkhorn_knopp(logits, epsilon=0.5, iterations=iterations)
        torch.testing.assert_close(q, _sinkhorn_reference(logits, 0.5, iterations))
        torch.testing.assert_close(q.sum(1), torch.ones(12, dtype=D))  # each sample: a distribution exactly
    # Cluster sizes reach N/K = 4 as the iterations go on (3 iterations, UNO's choice, only approach it).
    converged = sinkhorn_knopp(logits, epsilon=0.5, iterations=500)
    torch.testing.assert_close(converged.sum(0), torch.full((3,), 4.0, dtype=D), atol=1e-6, rtol=0)
    torch.testing.assert_close(converged.sum(1), torch.ones(12, dtype=D))
    # Uniform scores give the uniform assignment; a permutation of samples permutes the rows.
    torch.testing.assert_close(sinkhorn_knopp(torch.zeros(4, 2, dtype=D)), torch.full((4, 2), 0.5, dtype=D))
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(sinkhorn_knopp(logits[perm], epsilon=0.5), sinkhorn_knopp(logits, epsilon=0.5)[perm])


def test_sinkhorn_knopp_equipartitions_a_collapsed_batch_and_never_overflows():
    # Every sample prefers cluster 0 equally: UNO's point is that the targets still spread them.
    q = sinkhorn_knopp(torch.tensor([[5.0, 0.0, 0.0]]).repeat(6, 1), epsilon=0.05, iterations=3)
    torch.testing.assert_close(q.sum(0), torch.full((3,), 2.0), atol=1e-4, rtol=0)
    huge = sinkhorn_knopp(torch.tensor([[1e4, -1e4], [3e4, 0.0]]), epsilon=0.05)
    assert torch.isfinite(huge).all()


def test_swapped_prediction_hand_computed():
    a = torch.zeros(1, 2, dtype=D)  # log-softmax (ln 1/2, ln 1/2)
    b = torch.tensor([[0.0, math.log(3)]], dtype=D)  # log-softmax (ln 1/4, ln 3/4)
    t_a = torch.tensor([[0.0, 1.0]], dtype=D)
    t_b = torch.tensor([[1.0, 0.0]], dtype=D)
    # view b learns view a's targets: -ln 3/4; view a learns view b's: -ln 1/2.
    got = swapped_prediction(a, b, t_a, t_b, temperature=1.0)
    assert got.item() == pytest.approx(0.5 * (-math.log(0.75) + math.log(2)), rel=1e-12)
    assert swapped_prediction(a, b, t_a, t_b, temperature=0.5).item() == pytest.approx(
        0.5 * (-math.log(9 / 10) + math.log(2)), rel=1e-12)  # b / 0.5 -> (1/10, 9/10)


def test_ncd_targets_one_hot_for_known_sinkhorn_for_novel_and_novel_labels_unread():
    logits = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    novel = torch.tensor([False, True, False, True])
    labels = torch.tensor([1, 99, 0, -1])  # novel rows carry junk: it must not matter
    t = ncd_targets(logits, labels, novel, 2, epsilon=0.1)
    torch.testing.assert_close(t[0], torch.tensor([0.0, 1, 0, 0, 0]))
    torch.testing.assert_close(t[2], torch.tensor([1.0, 0, 0, 0, 0]))
    assert (t[novel, :2] == 0).all()
    torch.testing.assert_close(t[novel].sum(1), torch.ones(2))
    torch.testing.assert_close(t[novel, 2:], sinkhorn_knopp(logits[novel, 2:], epsilon=0.1))
    with pytest.raises(ValueError, match="labels in"):
        ncd_targets(logits, torch.tensor([3, 0, 0, 0]), novel, 2)  # a "known" sample with a novel id


# ---------------------------------------------------------------------------------------- metric


def test_cluster_accuracy_known_permutation_errors_and_extra_clusters():
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    assert cluster_accuracy(y, torch.tensor([2, 2, 0, 0, 1, 1])) == 1.0
    assert cluster_accuracy(y, torch.tensor([2, 2, 0, 1, 1, 1])) == pytest.approx(5 / 6)
    assert cluster_accuracy(y, torch.arange(6)) == pytest.approx(0.5)  # one cluster per sample
    assert cluster_accuracy([5, 5, 9], [100, 100, 7]) == 1.0  # ids need not be 0..K-1
    assert cluster_accuracy([], []) == 0.0
    with pytest.raises(ValueError, match="same length"):
        cluster_accuracy([0, 1], [0])


def test_cluster_accuracy_matches_brute_force():
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 4, 200), rng.integers(0, 4, 200)
    best = max(np.mean(np.array(perm)[p] == y) for perm in itertools.permutations(range(4)))
    assert cluster_accuracy(y, p) == pytest.approx(best)


# ---------------------------------------------------------------------------------------- data.classes


def test_data_classes_keeps_relabels_and_names_in_order():
    full = load_data(DataConfig(name="digits"))
    sub = load_data(DataConfig(name="digits", classes=[7, 2, 5]))
    assert sub.num_classes == 3 and sub.class_names == ["7", "2", "5"]
    for name in ("train", "val", "test"):
        whole, part = getattr(full, name), getattr(sub, name)
        keep = torch.isin(whole.labels, torch.tensor([7, 2, 5]))
        # Filtered after the split: exactly the same rows of those classes, in the same order.
        assert torch.equal(part.index, whole.index[keep])
        assert torch.equal(part.labels, torch.tensor([{7: 0, 2: 1, 5: 2}[int(c)] for c in whole.labels[keep]]))
    assert sub.fingerprint != full.fingerprint
    assert load_data(DataConfig(name="digits", classes=[2, 7, 5])).fingerprint != sub.fingerprint
    assert load_data(DataConfig(name="digits", classes=None)).fingerprint == full.fingerprint


def test_data_classes_bad_ids_are_clear_errors():
    with pytest.raises(DataError, match=r"data.classes: \[10\].*allowed ids: 0 \(0\), 1 \(1\).*9 \(9\)"):
        load_data(DataConfig(name="digits", classes=[0, 10]))
    for bad, msg in (([1, 1], "distinct"), ([-1, 2], ">= 0"), ([3], "at least 2")):
        with pytest.raises(ConfigError, match=msg):
            config_from_dict({"data": {"name": "digits", "classes": bad}, "student": {"arch": "mlp"}})


# ---------------------------------------------------------------------------------------- the method


def _method(k: int = 3, c: int = 6, **params):
    torch.manual_seed(0)
    student = nn.Sequential(nn.Flatten(), nn.Linear(16, c))
    spec = get_spec("crkd")
    m = spec.cls(spec.validate_params({"kd_weight": 1.0, **params}), student=student, teacher_layers=None, num_classes=c)
    x = torch.randn(10, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    teacher = torch.randn(10, k, generator=torch.Generator().manual_seed(2))
    m.setup(ModelOutput(student(x), {}, x), ModelOutput(teacher))
    return m, student, x, teacher


def _terms(m, student, x, teacher, labels):
    return m(ModelOutput(student(x), {}, x), ModelOutput(teacher), labels, Progress(epoch=0.0, step=7, total_steps=10))


def test_method_loss_is_invariant_to_novel_labels():
    m, student, x, teacher = _method(view_pad_crop=1, view_flip=True)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 3, 4, 1, 5])  # known 0-2, novel 3-5
    base = _terms(m, student, x, teacher, labels)
    assert set(base) == {"cluster", "crkd"} and all(torch.isfinite(v) for v in base.values())
    permuted = labels.clone()
    novel = labels >= 3
    permuted[novel] = torch.tensor([5, 3, 4])[labels[novel] - 3]  # 3->5, 4->3, 5->4
    lumped = torch.where(novel, torch.tensor(3), labels)  # every novel sample in one class
    for other in (permuted, lumped):
        got = _terms(m, student, x, teacher, other)
        assert all(torch.equal(got[k], base[k]) for k in base)
    # ...while the labels of known samples do matter (the check above is not vacuous).
    changed = labels.clone()
    changed[0] = 1
    assert not torch.equal(_terms(m, student, x, teacher, changed)["cluster"], base["cluster"])


def test_method_baseline_has_no_kd_term_and_checks_the_teacher():
    m, student, x, teacher = _method(kd_weight=0.0)
    assert set(_terms(m, student, x, teacher, torch.tensor([0, 1, 2, 3, 4, 5, 3, 4, 1, 5]))) == {"cluster"}
    with pytest.raises(ValueError, match="novel classes"):
        _method(k=6)
    with pytest.raises(ValueError, match="known_classes=2"):
        _method(known_classes=2)


# ---------------------------------------------------------------------------------------- end to end


def test_end_to_end_known_teacher_then_crkd_on_digits(tmp_path):
    from distillery.engine import fit

    cnn = {"arch": "cnn", "kwargs": {"width": 8}}
    teacher = fit(tiny_cfg(tmp_path, name="known", student=cnn, data={"name": "digits", "batch_size": 32, "classes": [0, 1, 2, 3, 4]},
                           train={"epochs": 3, "progress": False, "report": False}))
    assert teacher.summary["test_accuracy"] > 0.9
    res = fit(tiny_cfg(tmp_path, name="crkd", student=cnn, teacher={"run": str(teacher.run_dir)},
                       method={"name": "crkd", "params": {"kd_weight": 0.5}},
                       train={"epochs": 3, "progress": False, "report": False}))
    row = json.loads((res.run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["train_crkd"] > 0 and row["train_cluster"] > 0
    assert res.summary["teacher_test_accuracy"] is None  # another label set: not comparable
    data = load_data(DataConfig(name="digits"))
    with torch.inference_mode():
        logits = res.student.eval()(data.test.inputs)
    y = data.test.labels
    known = y < 5
    assert (logits[known, :5].argmax(-1) == y[known]).float().mean() > 0.8
    assert cluster_accuracy(y[~known], logits[~known, 5:].argmax(-1)) > 0.5  # chance is about 0.2; measured 0.72
    # A teacher of all ten classes leaves nothing to discover: a clear error, not a silent run.
    with pytest.raises(DistilleryError, match="data.classes"):
        fit(tiny_cfg(tmp_path, name="bad", teacher={"run": str(teacher.run_dir)}, method={"name": "crkd"}),
            teacher=nn.Sequential(nn.Flatten(), nn.Linear(64, 10)))
