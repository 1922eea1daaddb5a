"""Sparse-teacher LM losses: top-k (+ tail bucket) KL and Random Sampling KD.

References are computed in numpy float64 straight from the definitions (the (k+1)-bucket
coarsened KL, the importance-weighted sampled estimate) or by hand; the dense reference is
``distillery.losses.logits.forward_kl``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from distillery.losses.lm_sparse import sampled_kl, sparsify_sample, sparsify_topk, topk_kl
from distillery.losses.logits import forward_kl

pytestmark = pytest.mark.usefixtures("one_torch_thread")

D = torch.float64


def _randn(*shape, seed=0, scale=2.0, dtype=D):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D) * scale).to(dtype)


def _log_softmax_np(z, temperature=1.0):
    z = np.asarray(z, dtype=np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


# ---------------------------------------------------------------- top-k


def test_topk_hand_value_one_id_and_tail():
    # teacher p = [0.5, 0.3, 0.2], top-1 = {0}: buckets (0.5, 0.5); student q = [0.25, 0.25, 0.5]:
    # buckets (0.25, 0.75). KL = 0.5 log(0.5/0.25) + 0.5 log(0.5/0.75).
    teacher = torch.log(torch.tensor([[0.5, 0.3, 0.2]], dtype=D))
    student = torch.log(torch.tensor([[0.25, 0.25, 0.5]], dtype=D))
    ids, lp = sparsify_topk(teacher, 1)
    assert ids.tolist() == [[0]] and lp.item() == pytest.approx(math.log(0.5), abs=1e-15)
    expected = 0.5 * math.log(2.0) + 0.5 * math.log(0.5 / 0.75)
    assert topk_kl(student, ids, lp).item() == pytest.approx(expected, abs=1e-12)
    assert topk_kl(student, ids, lp, tail=False).item() == pytest.approx(0.5 * math.log(2.0), abs=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("tail", [True, False])
def test_topk_with_k_equal_vocab_is_dense_forward_kl(temperature, tail):
    V = 17
    student, teacher = _randn(2, 5, V, seed=1), _randn(2, 5, V, seed=2, scale=3.0)
    labels = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(3))
    labels[0, :2] = -100
    labels[1, 4] = -100
    ids, lp = sparsify_topk(teacher, V, temperature=temperature)
    got = topk_kl(student, ids, lp, labels, tail=tail, temperature=temperature)
    want = forward_kl(student, teacher, labels, temperature=temperature)
    assert got.item() == pytest.approx(want.item(), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_tail_is_kl_of_coarsened_distributions(k, temperature):
    V = 12
    student, teacher = _randn(4, 6, V, seed=4), _randn(4, 6, V, seed=5, scale=3.0)
    ids, lp = sparsify_topk(teacher, k, temperature=temperature)
    log_p = _log_softmax_np(teacher.numpy(), temperature)
    log_q = _log_softmax_np(student.numpy(), temperature)
    top = ids.numpy()
    p_k = np.take_along_axis(np.exp(log_p), top, -1)
    q_k = np.take_along_axis(np.exp(log_q), top, -1)
    P = np.concatenate([p_k, 1 - p_k.sum(-1, keepdims=True)], -1)  # k + 1 buckets
    Q = np.concatenate([q_k, 1 - q_k.sum(-1, keepdims=True)], -1)
    per_position = (P * (np.log(P) - np.log(Q))).sum(-1) * temperature**2
    got = topk_kl(student, ids, lp, temperature=temperature)
    assert got.item() >= 0
    assert got.item() == pytest.approx(per_position.mean(), rel=1e-10, abs=1e-12)
    # without the tail: the plain truncated sum over the k ids (can be of either sign)
    head = (p_k * (np.log(p_k) - np.log(q_k))).sum(-1) * temperature**2
    assert topk_kl(student, ids, lp, tail=False, temperature=temperature).item() == pytest.approx(head.mean(), rel=1e-10)


def test_topk_tail_nonnegative_on_many_random_cases():
    for seed in range(20):
        V = 5 + seed
        student, teacher = _randn(3, V, seed=seed, scale=4.0), _randn(3, V, seed=100 + seed, scale=4.0)
        ids, lp = sparsify_topk(teacher, 1 + seed % (V - 1))
        assert topk_kl(student, ids, lp).item() >= -1e-12


def test_topk_extreme_tails_stay_finite_and_exact():
    # The student puts ~all mass on id 0 (q_tail ~ e^-200, far below float32's 1 - sum q
    # resolution) while the teacher keeps a tail of 0.2: log q_tail must come out as -200, not -inf.
    V = 6
    student = torch.tensor([[200.0, 0, 0, 0, 0, 0]], dtype=torch.float32, requires_grad=True)
    teacher_lp = torch.log(torch.tensor([[0.8, 0.04, 0.04, 0.04, 0.04, 0.04]]))
    ids, lp = sparsify_topk(teacher_lp, 1)
    loss = topk_kl(student, ids, lp)
    log_q_tail = math.log(5.0) - 200.0  # logsumexp(0 x 5) - logsumexp(200, 0 x 5)
    expected = 0.8 * math.log(0.8) + 0.2 * (math.log(0.2) - log_q_tail)  # log q_0 ~ 0
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert torch.isfinite(student.grad).all()


def test_topk_teacher_with_minus_inf_logits_and_fp16_student():
    # A teacher whose logits are -inf outside 3 tokens, cached with k = 5: two stored log-probs
    # are -inf (probability 0). They must contribute exactly 0, not NaN.
    teacher = torch.tensor([[2.0, 1.0, 0.5] + [-math.inf] * 5])
    ids, lp = sparsify_topk(teacher, 5)
    assert torch.isinf(lp[0, 3:]).all()
    student = _randn(1, 8, seed=6, dtype=torch.float16).requires_grad_()
    loss = topk_kl(student, ids, lp.half())  # as read from a float16 cache
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and torch.isfinite(student.grad).all()
    log_p = torch.log_softmax(teacher[0, :3].double(), -1)  # the 3 tokens with probability > 0
    log_q = torch.log_softmax(student.detach()[0].double(), -1)[:3]
    dense = (log_p.exp() * (log_p - log_q)).sum()
    assert loss.item() == pytest.approx(dense.item(), abs=2e-3)  # fp16 teacher log-probs


def test_topk_gradients_finite_and_zero_at_ignored_positions():
    V = 30
    student = _randn(2, 7, V, seed=7, scale=5.0).float().requires_grad_()
    ids, lp = sparsify_topk(_randn(2, 7, V, seed=8, scale=5.0).float(), 4)
    labels = torch.zeros(2, 7, dtype=torch.long)
    labels[0, 3:] = -100
    labels[1, :] = -100
    topk_kl(student, ids, lp, labels, temperature=2.0).backward()
    assert torch.isfinite(student.grad).all()
    assert (student.grad[0, 3:] == 0).all() and (student.grad[1] == 0).all()
    assert student.grad[0, :3].abs().sum() > 0
    # all positions ignored: 0 with a zero gradient, not NaN
    s2 = student.detach().clone().requires_grad_()
    out = topk_kl(s2, ids, lp, torch.full((2, 7), -100))
    out.backward()
    assert out.item() == 0 and (s2.grad == 0).all()


@pytest.mark.parametrize("tail", [True, False])
def test_topk_gradcheck(tail):
    student = _randn(2, 3, 7, seed=9).requires_grad_()
    ids, lp = sparsify_topk(_randn(2, 3, 7, seed=10), 3)
    lp = lp.detach().requires_grad_()
    labels = torch.tensor([[0, -100, 1], [2, 3, -100]])
    assert torch.autograd.gradcheck(lambda s, t: topk_kl(s, ids, t, labels, tail=tail, temperature=1.5), (student, lp))


def test_topk_bad_inputs_name_the_problem():
    student = torch.zeros(2, 5)
    ids, lp = sparsify_topk(torch.randn(2, 5), 2)
    with pytest.raises(ValueError, match="vocabulary"):
        topk_kl(student, ids + 4, lp)
    with pytest.raises(ValueError, match="leading shape"):
        topk_kl(student, ids[:1], lp[:1])
    with pytest.raises(ValueError, match="shape of topk_ids"):
        topk_kl(student, ids, lp[:, :1])
    with pytest.raises(ValueError, match="integer"):
        topk_kl(student, ids.float(), lp)
    with pytest.raises(ValueError, match="temperature"):
        topk_kl(student, ids, lp, temperature=0.0)
    with pytest.raises(ValueError, match="at most the vocabulary size 5"):
        sparsify_topk(student, 6)


# ---------------------------------------------------------------- sampled (Random Sampling KD)


def _draws_by_hand(logits, k, seed, proposal_temperature=1.0):
    """The definition, row by row: k draws from r, unique ids, weights n_i p_i / r_i normalised."""
    log_p = _log_softmax_np(logits.numpy())
    log_r = _log_softmax_np(logits.numpy(), proposal_temperature)
    draws = torch.multinomial(torch.from_numpy(np.exp(log_r)), k, replacement=True,
                              generator=torch.Generator().manual_seed(seed)).numpy()
    rows = []
    for row, d in enumerate(draws):
        uniq, counts = np.unique(d, return_counts=True)
        w = counts * np.exp(log_p[row, uniq] - log_r[row, uniq])
        rows.append((uniq, w / w.sum(), log_p[row, uniq]))
    return rows


@pytest.mark.parametrize("proposal_temperature", [1.0, 2.0])
def test_sample_matches_definition(proposal_temperature):
    logits, k = _randn(6, 9, seed=11), 7
    ids, w, lp = sparsify_sample(logits, k, torch.Generator().manual_seed(0),
                                 proposal_temperature=proposal_temperature, return_logprobs=True)
    for row, (uniq, weights, logp) in enumerate(_draws_by_hand(logits, k, 0, proposal_temperature)):
        n = len(uniq)
        assert ids[row, :n].tolist() == uniq.tolist()
        np.testing.assert_allclose(w[row, :n].numpy(), weights, rtol=1e-12)
        np.testing.assert_allclose(lp[row, :n].numpy(), logp, rtol=1e-12)
        assert (ids[row, n:] == 0).all() and (w[row, n:] == 0).all() and (lp[row, n:] == 0).all()
        if proposal_temperature == 1.0:  # weights are the counts / k exactly
            assert np.allclose(w[row, :n].numpy() * k, np.round(w[row, :n].numpy() * k), atol=1e-12)


def test_sample_reproducible_with_generator_and_shape():
    logits = _randn(2, 3, 11, seed=12)
    a = sparsify_sample(logits, 5, torch.Generator().manual_seed(3))
    b = sparsify_sample(logits, 5, torch.Generator().manual_seed(3))
    c = sparsify_sample(logits, 5, torch.Generator().manual_seed(4))
    assert a[0].shape == (2, 3, 5) and a[0].dtype == torch.int64
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert torch.allclose(a[1].sum(-1), torch.ones(2, 3, dtype=D))


def test_sampled_kl_hand_value():
    # q = [1/2, 1/4, 1/4]; ids {0, 2} with weights (3/4, 1/4) and teacher log-probs log(0.6), log(0.1)
    student = torch.log(torch.tensor([[0.5, 0.25, 0.25]], dtype=D))
    ids, w = torch.tensor([[0, 2, 0]]), torch.tensor([[0.75, 0.25, 0.0]], dtype=D)  # last slot: padding
    lp = torch.log(torch.tensor([[0.6, 0.1, 1.0]], dtype=D))
    ce = -(0.75 * math.log(0.5) + 0.25 * math.log(0.25))
    assert sampled_kl(student, ids, w).item() == pytest.approx(ce, abs=1e-12)
    kl = 0.75 * math.log(0.6 / 0.5) + 0.25 * math.log(0.1 / 0.25)
    assert sampled_kl(student, ids, w, teacher_logprobs=lp).item() == pytest.approx(kl, abs=1e-12)
    assert sampled_kl(student, ids, w, teacher_logprobs=lp, temperature=2.0).item() == pytest.approx(
        4 * (0.75 * (math.log(0.6) - math.log(0.5**0.5 / (0.5**0.5 + 2 * 0.25**0.5)))
             + 0.25 * (math.log(0.1) - math.log(0.25**0.5 / (0.5**0.5 + 2 * 0.25**0.5)))), abs=1e-12)


def test_sampled_kl_is_unbiased_for_dense_kl_value_and_gradient():
    """Average over S independent draws -> dense KL and its gradient (proposal = teacher).

    Tolerance: 5 standard errors of the mean, estimated from the S draws themselves (a correct
    estimator fails this with probability ~1e-6 per checked number; a biased one, e.g. top-k,
    fails by orders of magnitude -- checked at the end).
    """
    V, k, S = 10, 4, 4000
    teacher, student = _randn(V, seed=13, scale=1.5), _randn(V, seed=14)
    dense = forward_kl(student[None], teacher[None]).item()
    s_dense = student.clone().requires_grad_()
    forward_kl(s_dense[None], teacher[None]).backward()

    ids, w, lp = sparsify_sample(teacher.expand(S, V), k, torch.Generator().manual_seed(0), return_logprobs=True)
    s_rows = student.expand(S, V).clone().requires_grad_()
    mean = sampled_kl(s_rows, ids, w, teacher_logprobs=lp)
    mean.backward()
    per_draw_grad = s_rows.grad * S  # d(per-draw loss)/d student logits, one row per draw
    log_q = torch.log_softmax(student, -1)
    per_draw_value = (w * (lp - log_q[ids])).sum(-1)  # the definition, for the standard error
    assert mean.item() == pytest.approx(per_draw_value.mean().item(), rel=1e-12)

    se_value = per_draw_value.std().item() / math.sqrt(S)
    assert abs(mean.item() - dense) < 5 * se_value
    se_grad = per_draw_grad.std(0) / math.sqrt(S)
    assert ((per_draw_grad.mean(0) - s_dense.grad).abs() < 5 * se_grad + 1e-12).all()
    # the same check rejects the top-k (no tail) estimate with k = 4: it is biased
    ids_k, lp_k = sparsify_topk(teacher[None], k)
    s_top = student[None].clone().requires_grad_()
    topk_kl(s_top, ids_k, lp_k, tail=False).backward()
    assert ((s_top.grad[0] - s_dense.grad).abs() > 5 * se_grad).any()


def test_sampled_self_normalised_proposal_is_consistent():
    # tau = 2 (flatter proposal): the self-normalised weights average to p within O(1/k).
    V, k, S = 8, 64, 1000
    teacher = _randn(V, seed=15, scale=1.5)
    ids, w = sparsify_sample(teacher.expand(S, V), k, torch.Generator().manual_seed(1), proposal_temperature=2.0)
    p_hat = torch.zeros(S, V, dtype=D).scatter_add_(1, ids, w).mean(0)
    assert torch.allclose(p_hat, torch.softmax(teacher, -1), atol=0.01)


def test_sampled_gradients_finite_ignored_positions_and_gradcheck():
    V = 9
    teacher = _randn(2, 4, V, seed=16)
    ids, w, lp = sparsify_sample(teacher, 5, torch.Generator().manual_seed(2), return_logprobs=True)
    labels = torch.tensor([[1, -100, 2, 3], [-100, -100, 0, 1]])
    student = _randn(2, 4, V, seed=17).requires_grad_()
    sampled_kl(student, ids, w, labels, teacher_logprobs=lp).backward()
    assert torch.isfinite(student.grad).all()
    assert (student.grad[labels == -100] == 0).all() and (student.grad[labels != -100] != 0).any()
    w = w.detach().requires_grad_()
    lp = lp.detach().requires_grad_()
    student = student.detach().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda s, ww, ll: sampled_kl(s, ids, ww, labels, teacher_logprobs=ll, temperature=1.5), (student, w, lp))


def test_sampled_bad_inputs():
    student = torch.zeros(3, 5)
    with pytest.raises(ValueError, match="vocabulary"):
        sampled_kl(student, torch.full((3, 2), 5), torch.ones(3, 2))
    with pytest.raises(ValueError, match="teacher_logprobs"):
        sampled_kl(student, torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2), teacher_logprobs=torch.zeros(3, 1))
    with pytest.raises(ValueError, match="k must be"):
        sparsify_sample(student, 0)
    with pytest.raises(ValueError, match="temperature"):
        sparsify_sample(student, 2, proposal_temperature=-1.0)
