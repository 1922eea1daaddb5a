"""SinKD method: the existing batch-wise loss checked against an independent probability-space
re-derivation of the authors' row/column normalisation, its batch-wise invariances, the
method's term mix, and a short distillation run."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_cfg
from distillery import methods
from distillery.engine import fit
from distillery.losses.logits import cross_entropy, kd
from distillery.losses.sinkhorn import sinkhorn_kd
from distillery.methods.base import ModelOutput, Progress
from distillery.methods.sinkhorn import SinKD

pytestmark = pytest.mark.usefixtures("one_torch_thread")

D = torch.float64


def _logits(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D) * scale


def _row_column_sinkhorn(s, t, temperature, epsilon, iterations, dtype=D):
    """The SinKD computation in probability space, as the paper describes it: cost = L1 distance
    between every student and every teacher sample's distribution (n x n), Gibbs kernel
    exp(-C/eps), then alternately make each row and each column sum to 1; value = sum(P * C).
    Written with an explicit double loop for the cost so it shares no code with the library."""
    q, p = torch.softmax(s / temperature, -1), torch.softmax(t / temperature, -1)
    n = q.shape[0]
    cost = torch.empty(n, n, dtype=dtype)
    for i in range(n):
        for j in range(n):
            cost[i, j] = (q[i] - p[j]).abs().sum()
    plan = torch.exp(-cost / epsilon)
    for _ in range(iterations):
        plan = plan / plan.sum(1, keepdim=True)
        plan = plan / plan.sum(0, keepdim=True)
    return (plan * cost).sum()


# --------------------------------------------------------------------------- the loss as the paper defines it


@pytest.mark.parametrize("temperature,epsilon,iterations", [(1.0, 0.1, 20), (2.0, 0.1, 20), (2.0, 0.5, 3), (1.0, 0.05, 1)])
def test_loss_is_the_row_column_normalised_plan_divided_by_n(temperature, epsilon, iterations):
    """Uniform marginals 1/n make the library's plan the row/column-normalised one divided by n."""
    s, t = _logits(7, 4, seed=1, scale=2.0), _logits(7, 4, seed=2, scale=2.0)
    ref = _row_column_sinkhorn(s, t, temperature, epsilon, iterations) / 7
    got = sinkhorn_kd(s, t, temperature=temperature, epsilon=epsilon, iterations=iterations)
    assert got.item() == pytest.approx(ref.item(), rel=1e-10)


def test_iterations_and_epsilon_matter():
    """The parameters are really used: one iteration differs from twenty (the plan's rows are
    not yet balanced), and a larger epsilon spreads the plan, raising the transport cost."""
    s, t = _logits(8, 5, seed=3, scale=2.0), _logits(8, 5, seed=4, scale=2.0)
    one, twenty = (sinkhorn_kd(s, t, iterations=k).item() for k in (1, 20))
    assert abs(one - twenty) > 1e-4
    costs = [sinkhorn_kd(s, t, epsilon=e, iterations=200).item() for e in (0.02, 0.1, 1.0)]
    assert costs[0] < costs[1] < costs[2]


def test_batch_wise_invariance_to_the_sample_order():
    """Batch-wise, not sample-wise: the two batches are compared as sets, so shuffling the
    student's samples alone leaves the value unchanged, while a sample-wise loss (KD) changes."""
    s, t = _logits(6, 5, seed=5, scale=2.0), _logits(6, 5, seed=6, scale=2.0)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    base = sinkhorn_kd(s, t, iterations=50)
    assert sinkhorn_kd(s[perm], t, iterations=50).item() == pytest.approx(base.item(), rel=1e-9)
    assert abs(kd(s[perm], t).item() - kd(s, t).item()) > 1e-3


def test_teacher_batch_shuffled_is_near_zero_for_small_epsilon():
    t = _logits(6, 5, seed=7, scale=3.0)
    s = t[torch.tensor([2, 5, 0, 1, 4, 3])]
    assert sinkhorn_kd(s, t, epsilon=1e-3, iterations=20).item() < 1e-6  # finds the zero-cost matching
    assert sinkhorn_kd(s, t, epsilon=0.1, iterations=20).item() > 1e-3  # entropic smoothing costs something


def test_log_space_iteration_survives_where_probability_space_divides_zero_by_zero():
    """Student sure of class 0, teacher sure of class 1: every L1 cost is ~2, exp(-2 / 0.01)
    underflows to 0 in float32 and the row/column normalisation gives 0/0; the log-space
    iteration returns the cost ~2 with finite gradients."""
    s = torch.tensor([[12.0, 0.0, 0.0]]).repeat(4, 1) + _logits(4, 3, seed=12).float() * 0.1
    t = torch.tensor([[0.0, 12.0, 0.0]]).repeat(4, 1)
    ref = _row_column_sinkhorn(s.double(), t.double(), 1.0, 0.01, 20)  # float64: still representable
    ref32 = _row_column_sinkhorn(s, t, 1.0, 0.01, 20, dtype=torch.float32)
    assert torch.isnan(ref32)
    s.requires_grad_()
    value = sinkhorn_kd(s, t, epsilon=0.01, iterations=20)
    value.backward()
    assert value.item() == pytest.approx(ref.item() / 4, rel=1e-4) and value.item() > 1.9
    assert torch.isfinite(s.grad).all()


# --------------------------------------------------------------------------- the method


def _method(**params):
    spec = methods.get_spec("sinkhorn")
    return SinKD(spec.validate_params(params), student=torch.nn.Identity(), teacher_layers=None, num_classes=5)


def test_method_mixes_ce_kd_and_sinkhorn_with_the_given_weights():
    s, t, y = _logits(6, 5, seed=8, scale=2.0), _logits(6, 5, seed=9, scale=2.0), torch.tensor([0, 1, 2, 3, 4, 1])
    m = _method(alpha=0.7, beta=0.3, temperature=3.0, sinkhorn_temperature=2.0, epsilon=0.2, iterations=5)
    terms = m(ModelOutput(s), ModelOutput(t), y, Progress(0.0, 0, 10))
    assert terms["sinkhorn"].item() == pytest.approx(0.3 * sinkhorn_kd(s, t, temperature=2.0, epsilon=0.2, iterations=5).item(), rel=1e-12)
    assert terms["kd"].item() == pytest.approx(0.7 * kd(s, t, temperature=3.0).item(), rel=1e-12)
    assert terms["ce"].item() == pytest.approx(0.3 * cross_entropy(s, None, y).item(), rel=1e-12)
    assert set(_method(alpha=1.0)(ModelOutput(s), ModelOutput(t), y, Progress(0.0, 0, 10))) == {"sinkhorn", "kd"}
    assert set(_method(alpha=0.0)(ModelOutput(s), ModelOutput(t), y, Progress(0.0, 0, 10))) == {"sinkhorn", "ce"}


def test_method_gradcheck_float64():
    t, y = _logits(4, 3, seed=10), torch.tensor([0, 2, 1, 1])
    m = _method(iterations=5, epsilon=0.3)

    def total(s):
        return sum(m(ModelOutput(s), ModelOutput(t), y, Progress(0.0, 0, 10)).values())

    assert torch.autograd.gradcheck(total, (_logits(4, 3, seed=11).requires_grad_(),))


def test_params_defaults_and_validation():
    spec = methods.get_spec("sinkhorn")
    p = spec.validate_params({})
    assert (p.epsilon, p.iterations, p.sinkhorn_temperature) == (0.1, 20, 2.0)  # the authors' values
    with pytest.raises(ValueError, match="epsilon"):
        spec.validate_params({"epsilon": 0})
    with pytest.raises(ValueError, match="iterations"):
        spec.validate_params({"iterations": 0})


def test_distillation_run_on_digits_logs_every_term(tmp_path):
    teacher = fit(tiny_cfg(tmp_path / "t", name="teacher", student={"arch": "cnn", "kwargs": {"width": 8}},
                           train={"epochs": 2, "progress": False, "report": False}))
    res = fit(tiny_cfg(tmp_path, teacher={"run": str(teacher.run_dir)}, student={"arch": "cnn", "kwargs": {"width": 4}},
                       method={"name": "sinkhorn"}, train={"epochs": 2, "progress": False, "report": False}))
    rows = [json.loads(line) for line in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["train_sinkhorn"] > 0 and r["train_kd"] > 0 and r["train_ce"] > 0 for r in rows)
    assert rows[-1]["train_sinkhorn"] < rows[0]["train_sinkhorn"]  # the student's batch moves towards the teacher's
    assert res.summary["test_accuracy"] > 0.3
