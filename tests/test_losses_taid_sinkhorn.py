"""Tests for the TAID loss / schedule and the SinKD Sinkhorn loss (tiny CPU tensors)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from distillery.losses.sinkhorn import sinkhorn_distance, sinkhorn_kd, sinkhorn_plan
from distillery.losses.taid import TAIDSchedule, taid_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _logits(*shape, seed=0, scale=1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _forward_kl_reference(student, teacher):
    """KL(softmax(t) || softmax(s)) per position, written independently in numpy (float64)."""
    s = student.detach().double().numpy()
    t = teacher.detach().double().numpy()

    def log_softmax(x):
        m = x.max(axis=-1, keepdims=True)
        return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))

    lp, lq = log_softmax(t), log_softmax(s)
    return (np.exp(lp) * (lp - lq)).sum(axis=-1)


# --------------------------------------------------------------------------- TAID loss


def test_taid_t1_equals_forward_kl():
    s, t = _logits(2, 3, 7, seed=1), _logits(2, 3, 7, seed=2, scale=3.0)
    expected = _forward_kl_reference(s, t).mean()
    got = taid_loss(s, t, t=1.0)
    assert got.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert got.item() > 0.1  # non-trivial


def test_taid_t1_respects_ignore_index():
    s, t = _logits(2, 3, 5, seed=3), _logits(2, 3, 5, seed=4, scale=2.0)
    targets = torch.tensor([[0, -100, 2], [-100, 1, 4]])
    per_pos = _forward_kl_reference(s, t)
    expected = per_pos[targets.numpy() != -100].mean()
    assert taid_loss(s, t, targets, t=1.0).item() == pytest.approx(expected, rel=1e-5)


def test_taid_t0_is_zero_and_teacher_gets_no_gradient():
    s = _logits(4, 6, seed=5).requires_grad_()
    t = _logits(4, 6, seed=6, scale=4.0).requires_grad_()
    loss = taid_loss(s, t, t=0.0)
    assert abs(loss.item()) < 1e-6
    grad_s, grad_t = torch.autograd.grad(loss, [s, t], allow_unused=True)
    assert grad_t is None or torch.count_nonzero(grad_t) == 0
    assert torch.allclose(grad_s, torch.zeros_like(grad_s), atol=1e-6)


def test_taid_student_gradient_only_through_q():
    """d loss / d z_s must equal (q - p_t) / N: no gradient through the student's copy in p_t."""
    s = _logits(3, 5, seed=7, dtype=torch.float64).requires_grad_()
    t = _logits(3, 5, seed=8, scale=2.0, dtype=torch.float64)
    tt = 0.3
    (grad,) = torch.autograd.grad(taid_loss(s, t, t=tt), [s])
    p_t = torch.softmax((1 - tt) * s.detach() + tt * t, dim=-1)
    q = torch.softmax(s.detach(), dim=-1)
    assert torch.allclose(grad, (q - p_t) / 3, atol=1e-10)


def test_taid_interpolates_logits_not_probabilities():
    s, t = _logits(2, 5, seed=9), _logits(2, 5, seed=10, scale=3.0)
    tt = 0.5
    p_t = torch.softmax(0.5 * s + 0.5 * t, dim=-1)
    q = torch.softmax(s, dim=-1)
    expected = (p_t * (p_t.log() - q.log())).sum(-1).mean()
    assert taid_loss(s, t, t=tt).item() == pytest.approx(expected.item(), rel=1e-5)


def test_taid_gradcheck_student_float64():
    s = _logits(2, 4, seed=11, dtype=torch.float64).requires_grad_()
    t = _logits(2, 4, seed=12, dtype=torch.float64).requires_grad_()
    # t = 1: no stop-gradient path, so autograd must match finite differences exactly.
    assert torch.autograd.gradcheck(lambda x: taid_loss(x, t.detach(), t=1.0), (s,))
    # 0 < t < 1: gradient w.r.t. the student with the (stop-gradient) target p_t held fixed,
    # i.e. finite differences of KL(p_t(s0) || softmax(x)) must match autograd at x = s0.
    s0 = s.detach()

    def surrogate(x):
        p_t = torch.softmax(0.4 * s0 + 0.6 * t.detach(), dim=-1)
        return (p_t * (p_t.log() - torch.log_softmax(x, -1))).sum(-1).mean()

    (auto,) = torch.autograd.grad(taid_loss(s, t.detach(), t=0.6), [s])
    eps = 1e-6
    numeric = torch.zeros_like(s0)
    for idx in np.ndindex(*s0.shape):
        e = torch.zeros_like(s0)
        e[idx] = eps
        numeric[idx] = (surrogate(s0 + e) - surrogate(s0 - e)) / (2 * eps)
    assert torch.allclose(auto, numeric, atol=1e-8)
    # ...and differentiating through the student's copy inside p_t would give a different
    # Jacobian, so full finite differences must NOT match (proves the stop-gradient is real).
    assert not torch.autograd.gradcheck(
        lambda x: taid_loss(x, t.detach(), t=0.6), (s,), raise_exception=False
    )
    # The teacher path has no stop-gradient: plain gradcheck w.r.t. the teacher.
    assert torch.autograd.gradcheck(lambda y: taid_loss(s.detach(), y, t=0.6), (t,))


def test_taid_half_input_upcast_and_bad_t():
    s, t = _logits(2, 8, seed=13, dtype=torch.bfloat16), _logits(2, 8, seed=14, dtype=torch.bfloat16)
    out = taid_loss(s, t, t=0.5)
    assert out.dtype == torch.float32 and torch.isfinite(out)
    with pytest.raises(ValueError):
        taid_loss(s, t, t=1.5)


# --------------------------------------------------------------------------- TAID schedule


def test_schedule_bounds_and_monotone_with_falling_losses():
    sched = TAIDSchedule(t_start=0.4, t_end=1.0, alpha=5e-2, beta=0.9)
    assert sched.t == 0.4
    steps = 50
    prev_t = sched.t
    for step in range(steps + 1):
        progress = step / steps
        t = sched.update(5.0 * math.exp(-0.1 * step), progress)
        assert t == sched.t
        assert sched.lower_bound(progress) - 1e-12 <= t <= 1.0
        assert t >= prev_t
        prev_t = t
    assert sched.t == pytest.approx(1.0)


def test_schedule_adaptive_part_exceeds_linear_bound_and_matches_formula():
    sched = TAIDSchedule(t_start=0.4, t_end=0.9, alpha=0.1, beta=0.5)
    sched.update(2.0, 0.0)  # first call only records the loss
    assert sched.t == 0.4
    t = sched.update(1.0, 0.01)
    m = 0.5 * 0.0 + 0.5 * (2.0 - 1.0) / 2.0
    expected = 0.4 + 0.1 * (1 / (1 + math.exp(-m))) * (1 - 0.4)
    assert t == pytest.approx(expected, rel=1e-12)
    assert t > sched.lower_bound(0.01)
    # capped at t_end
    for _ in range(200):
        sched.update(1.0, 0.5)
    assert sched.t <= 0.9 and sched.t == pytest.approx(0.9)


def test_schedule_rising_loss_still_respects_lower_bound():
    sched = TAIDSchedule(alpha=0.0)  # no adaptive increment: t follows the linear bound
    for step, loss in enumerate([1.0, 2.0, 4.0, 8.0]):
        sched.update(loss, step / 3)
        assert sched.t == pytest.approx(sched.lower_bound(step / 3))


def test_schedule_state_dict_round_trip():
    a = TAIDSchedule(alpha=1e-2, beta=0.9)
    for step, loss in enumerate([3.0, 2.5, 2.0, 1.9]):
        a.update(loss, step / 10)
    state = a.state_dict()
    assert all(v is None or type(v) is float for v in state.values())
    b = TAIDSchedule()
    b.load_state_dict(state)
    assert b.state_dict() == state
    assert a.update(1.7, 0.5) == b.update(1.7, 0.5)
    assert a.state_dict() == b.state_dict()


def test_schedule_rejects_bad_progress():
    with pytest.raises(ValueError):
        TAIDSchedule().update(1.0, 1.5)


# --------------------------------------------------------------------------- Sinkhorn


def _numpy_sinkhorn(cost, a, b, eps, iters):
    """Plain probability-space Sinkhorn-Knopp (Cuturi 2013), float64."""
    K = np.exp(-cost / eps)
    v = np.ones_like(b)
    for _ in range(iters):
        u = a / (K @ v)
        v = b / (K.T @ u)
    P = u[:, None] * K * v[None, :]
    return P, float((P * cost).sum())


def test_sinkhorn_marginals():
    g = torch.Generator().manual_seed(0)
    cost = torch.rand(5, 4, generator=g, dtype=torch.float64)
    a = torch.tensor([0.1, 0.2, 0.3, 0.25, 0.15], dtype=torch.float64)
    b = torch.tensor([0.4, 0.1, 0.3, 0.2], dtype=torch.float64)
    P = sinkhorn_plan(cost, a, b, epsilon=0.1, iterations=200)
    assert torch.allclose(P.sum(-1), a, atol=1e-4)
    assert torch.allclose(P.sum(-2), b, atol=1e-4)


def test_sinkhorn_2x2_matches_numpy_reference():
    cost = np.array([[0.0, 1.0], [2.0, 0.5]])
    a, b = np.array([0.3, 0.7]), np.array([0.6, 0.4])
    P_ref, value_ref = _numpy_sinkhorn(cost, a, b, eps=0.5, iters=500)
    args = [torch.tensor(x) for x in (cost, a, b)]
    P = sinkhorn_plan(*args, epsilon=0.5, iterations=500)
    value = sinkhorn_distance(*args, epsilon=0.5, iterations=500)
    assert np.allclose(P.numpy(), P_ref, atol=1e-8)
    assert value.item() == pytest.approx(value_ref, rel=1e-8)
    # Sanity of the reference itself: the 2x2 plan has one free entry x = P[0,0]; at the
    # entropic optimum log(x * P11 / (P01 * P10)) = -(C00 + C11 - C01 - C10) / eps.
    x = P_ref[0, 0]
    p01, p10, p11 = a[0] - x, b[0] - x, a[1] - (b[0] - x)
    assert math.log(x * p11 / (p01 * p10)) == pytest.approx(-(0.0 + 0.5 - 1.0 - 2.0) / 0.5, abs=1e-6)


def test_sinkhorn_small_epsilon_approaches_exact_ot():
    cost = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    a = b = torch.tensor([0.5, 0.5], dtype=torch.float64)
    assert sinkhorn_distance(cost, a, b, epsilon=0.01, iterations=50).item() < 1e-6


def test_sinkhorn_kd_identical_no_larger_than_different():
    t = _logits(6, 5, seed=20, scale=2.0)
    s = _logits(6, 5, seed=21, scale=2.0)
    same = sinkhorn_kd(t.clone(), t)
    diff = sinkhorn_kd(s, t)
    assert same.item() <= diff.item()
    assert diff.item() > 0


def test_sinkhorn_kd_matches_manual_batchwise_cost_and_ignores_targets():
    s, t = _logits(2, 3, 4, seed=22), _logits(2, 3, 4, seed=23, scale=2.0)
    targets = torch.tensor([[1, -100, 0], [3, 2, -100]])
    keep = (targets != -100).reshape(-1)
    q = torch.softmax(s / 2.0, -1).reshape(-1, 4)[keep].double().numpy()
    p = torch.softmax(t / 2.0, -1).reshape(-1, 4)[keep].double().numpy()
    cost = np.abs(q[:, None, :] - p[None, :, :]).sum(-1)  # n x n between samples
    n = cost.shape[0]
    _, ref = _numpy_sinkhorn(cost, np.full(n, 1 / n), np.full(n, 1 / n), eps=0.1, iters=20)
    got = sinkhorn_kd(s, t, targets, temperature=2.0, epsilon=0.1, iterations=20)
    assert got.item() == pytest.approx(ref, rel=1e-5)


def test_sinkhorn_kd_stable_small_epsilon_large_logits():
    s = _logits(8, 10, seed=24, scale=100.0).requires_grad_()
    t = _logits(8, 10, seed=25, scale=100.0).requires_grad_()
    loss = sinkhorn_kd(s, t, epsilon=0.01, iterations=30)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(s.grad).all() and torch.isfinite(t.grad).all()


def test_sinkhorn_kd_all_ignored_is_zero():
    s = _logits(2, 3, seed=26).requires_grad_()
    t = _logits(2, 3, seed=27)
    loss = sinkhorn_kd(s, t, torch.tensor([-100, -100]))
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(s.grad) == 0


def test_sinkhorn_gradcheck_float64():
    s = _logits(3, 4, seed=28, dtype=torch.float64).requires_grad_()
    t = _logits(3, 4, seed=29, scale=2.0, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, y: sinkhorn_kd(x, y, epsilon=0.2, iterations=10), (s, t)
    )
    cost = torch.rand(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    cost.requires_grad_()
    a = torch.tensor([0.5, 0.5], dtype=torch.float64)
    b = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda c: sinkhorn_distance(c, a, b, epsilon=0.3, iterations=10), (cost,)
    )
