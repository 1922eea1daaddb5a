"""Token-level LM losses (skew KL / RKL, ULD) and the chunked / fused computation.

Reference values come from numpy (float64) straight from the formulas, or by hand; the chunked
loss is compared with the plain (unchunked) loss functions it wraps.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distillery.losses.lm import TOKEN_LOSSES, chunked_token_loss, skew_kl, skew_reverse_kl, uld
from distillery.losses.logits import cross_entropy, forward_kl, jsd, reverse_kl

pytestmark = pytest.mark.usefixtures("one_torch_thread")

D = torch.float64


def _randn(*shape, seed=0, scale=2.0, dtype=D):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D) * scale).to(dtype)


def _labels(*shape, vocab, seed=1, masked=()):
    y = torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))
    for index in masked:
        y[index] = -100
    return y


def np_softmax(z, temperature=1.0):
    z = np.asarray(z, dtype=np.float64) / temperature
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_kl(p, q):
    return (p * (np.log(p) - np.log(q))).sum(axis=-1)


# ---------------------------------------------------------------- skew KL / skew reverse KL


def test_skew_hand_values_two_classes():
    # teacher p = [1/2, 1/2], student q = [3/4, 1/4], alpha = 0.1
    s = torch.tensor([[math.log(3.0), 0.0]], dtype=D)
    t = torch.zeros(1, 2, dtype=D)
    m = (0.1 * 0.5 + 0.9 * 0.75, 0.1 * 0.5 + 0.9 * 0.25)  # alpha p + (1 - alpha) q = [0.725, 0.275]
    skl = 0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])
    assert skew_kl(s, t).item() == pytest.approx(skl, abs=1e-12)
    r = (0.1 * 0.75 + 0.9 * 0.5, 0.1 * 0.25 + 0.9 * 0.5)  # alpha q + (1 - alpha) p = [0.525, 0.475]
    srkl = 0.75 * math.log(0.75 / r[0]) + 0.25 * math.log(0.25 / r[1])
    assert skew_reverse_kl(s, t).item() == pytest.approx(srkl, abs=1e-12)


@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.5, 0.9])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_skew_matches_numpy_with_masking(alpha, temperature):
    s, t = _randn(2, 5, 7, seed=0), _randn(2, 5, 7, seed=1)
    y = _labels(2, 5, vocab=7, masked=[(0, 0), (1, slice(3, None))])
    keep = (y != -100).numpy()
    p, q = np_softmax(t.numpy(), temperature)[keep], np_softmax(s.numpy(), temperature)[keep]
    want_skl = np_kl(p, alpha * p + (1 - alpha) * q).mean() * temperature**2
    want_srkl = np_kl(q, alpha * q + (1 - alpha) * p).mean() * temperature**2
    assert skew_kl(s, t, y, alpha=alpha, temperature=temperature).item() == pytest.approx(want_skl, rel=1e-10)
    got = skew_reverse_kl(s, t, y, alpha=alpha, temperature=temperature).item()
    assert got == pytest.approx(want_srkl, rel=1e-10)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_skew_limits(temperature):
    s, t = _randn(3, 4, 6, seed=2), _randn(3, 4, 6, seed=3)
    y = _labels(3, 4, vocab=6, masked=[(2, 1)])
    # alpha = 0: exactly the plain KLs (same T, same T^2 factor)
    assert torch.equal(skew_kl(s, t, y, alpha=0.0, temperature=temperature), forward_kl(s, t, y, temperature=temperature))
    assert torch.equal(
        skew_reverse_kl(s, t, y, alpha=0.0, temperature=temperature), reverse_kl(s, t, y, temperature=temperature)
    )
    # alpha = 1: exactly 0; and continuity at both ends
    for fn, kl in ((skew_kl, forward_kl), (skew_reverse_kl, reverse_kl)):
        assert fn(s, t, y, alpha=1.0, temperature=temperature).item() == 0.0
        assert fn(s, t, y, alpha=1 - 1e-5, temperature=temperature).item() < 1e-8
        near0 = fn(s, t, y, alpha=1e-7, temperature=temperature).item()
        assert near0 == pytest.approx(kl(s, t, y, temperature=temperature).item(), rel=1e-5)


def test_skew_is_zero_for_equal_distributions_and_bounded():
    s = _randn(4, 9)
    for fn in (skew_kl, skew_reverse_kl):
        assert fn(s, s + 5.0).abs().item() < 1e-12
    # the mixture is >= alpha p, so the divergence stays below log(1/alpha) even where q ~ 0 and p is not
    t = torch.tensor([[30.0, 0.0, 0.0]], dtype=D)
    s = torch.tensor([[-30.0, 0.0, 0.0]], dtype=D)
    assert forward_kl(s, t).item() > 25
    assert 0 < skew_kl(s, t, alpha=0.1).item() <= math.log(10) + 1e-9


def test_skew_half_precision_is_upcast():
    s, t = _randn(2, 3, 11, seed=4), _randn(2, 3, 11, seed=5)
    ref = skew_kl(s.bfloat16().double(), t.bfloat16().double())
    got = skew_kl(s.bfloat16(), t.bfloat16())
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)


def test_skew_masking_ignores_masked_rows_and_all_masked_is_zero():
    s, t = _randn(2, 4, 5, seed=6), _randn(2, 4, 5, seed=7)
    y = _labels(2, 4, vocab=5, masked=[(0, slice(0, 2))])
    s2 = s.clone()
    s2[0, :2] = 1e6  # whatever sits at masked positions does not matter
    assert skew_kl(s2, t, y).item() == pytest.approx(skew_kl(s, t, y).item(), rel=1e-12)
    y_all = torch.full((2, 4), -100)
    a = s.clone().requires_grad_(True)
    value = skew_reverse_kl(a, t, y_all)
    value.backward()
    assert value.item() == 0.0 and torch.count_nonzero(a.grad) == 0


def test_skew_bad_alpha():
    s = _randn(2, 3)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="alpha"):
            skew_kl(s, s, alpha=bad)


@pytest.mark.parametrize("fn", [skew_kl, skew_reverse_kl])
@pytest.mark.parametrize("alpha", [0.1, 0.6])
def test_skew_gradcheck(fn, alpha):
    s = _randn(2, 3, 4, seed=8).requires_grad_(True)
    t = _randn(2, 3, 4, seed=9).requires_grad_(True)
    y = _labels(2, 3, vocab=4, masked=[(1, 2)])
    assert torch.autograd.gradcheck(lambda a, b: fn(a, b, y, alpha=alpha, temperature=1.5), (s, t), eps=1e-6, atol=1e-6)


# ---------------------------------------------------------------- ULD


def test_uld_hand_value_different_vocab_sizes():
    # student over 3 tokens [0.7, 0.2, 0.1], teacher over 2 tokens [0.5, 0.5]:
    # sorted and zero-padded: |0.7 - 0.5| + |0.2 - 0.5| + |0.1 - 0| = 0.6
    s = torch.tensor([[math.log(0.2), math.log(0.7), math.log(0.1)]], dtype=D)
    t = torch.tensor([[0.0, 0.0]], dtype=D)
    assert uld(s, t).item() == pytest.approx(0.6, abs=1e-12)
    assert uld(t, s).item() == pytest.approx(0.6, abs=1e-12)  # symmetric


def test_uld_identical_distributions_is_zero_and_permutation_invariant():
    s = _randn(2, 5, 8, seed=1)
    assert uld(s, s.clone()).item() < 1e-14
    # any relabelling of either vocabulary leaves the value unchanged
    assert uld(s, s[..., torch.randperm(8)]).item() < 1e-14
    t = _randn(2, 5, 13, seed=2)
    base = uld(s, t).item()
    assert base > 0.05
    assert uld(s[..., torch.randperm(8)], t[..., torch.randperm(13)]).item() == pytest.approx(base, rel=1e-12)
    # and the same vocab padded with tokens of probability 0 is the same distribution
    padded = torch.cat([s, torch.full((2, 5, 4), -1e30, dtype=D)], dim=-1)
    assert uld(padded, s).item() < 1e-14


def _np_uld_pair(zs, zt, temperature=1.0):
    q = np.sort(np_softmax(zs, temperature))[::-1]
    p = np.sort(np_softmax(zt, temperature))[::-1]
    n = max(q.size, p.size)
    q, p = np.pad(q, (0, n - q.size)), np.pad(p, (0, n - p.size))
    return np.abs(q - p).sum()


def test_uld_sequence_alignment_matches_per_sequence_reference():
    # Student sequences of length 7 (vocab 6), teacher sequences of length 9 (vocab 10). The
    # prompts are masked (-100) and of different lengths under the two tokenizers; so are the
    # answers. The k-th scored student position is paired with the k-th scored teacher one,
    # truncated to the shorter answer; mean per sequence, then over sequences.
    s, t = _randn(2, 7, 6, seed=3), _randn(2, 9, 10, seed=4)
    ys = _labels(2, 7, vocab=6, masked=[(0, slice(0, 2)), (1, slice(0, 4))])  # answers: 5 and 3 tokens
    yt = _labels(2, 9, vocab=10, masked=[(0, slice(0, 3)), (1, slice(0, 2)), (1, slice(7, None))])  # 6 and 5
    per_seq = []
    for b in range(2):
        s_pos = np.nonzero(ys[b].numpy() != -100)[0]
        t_pos = np.nonzero(yt[b].numpy() != -100)[0]
        n = min(len(s_pos), len(t_pos))
        per_seq.append(np.mean([_np_uld_pair(s[b, i].numpy(), t[b, j].numpy(), 2.0) for i, j in zip(s_pos[:n], t_pos[:n])]))
    want = float(np.mean(per_seq))
    assert uld(s, t, ys, yt, temperature=2.0).item() == pytest.approx(want, rel=1e-12)
    # same lengths: the teacher uses the student's mask when teacher_targets is None
    t2 = _randn(2, 7, 10, seed=5)
    assert uld(s, t2, ys).item() == pytest.approx(uld(s, t2, ys, ys).item(), rel=1e-15)


def test_uld_edge_cases_and_errors():
    s, t = _randn(2, 4, 5), _randn(2, 6, 7)
    y_none = torch.full((2, 4), -100)
    assert uld(s, t, y_none, torch.zeros(2, 6, dtype=torch.long)).item() == 0.0  # nothing aligned
    with pytest.raises(ValueError, match="teacher_targets"):
        uld(s, t, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="batch"):
        uld(s, _randn(3, 4, 5))
    with pytest.raises(ValueError, match="temperature"):
        uld(s, t, temperature=0.0)
    # a sequence without any aligned position does not count in the mean over sequences
    y = torch.zeros(2, 4, dtype=torch.long)
    y[1] = -100
    assert uld(s, _randn(2, 4, 7), y).item() == pytest.approx(uld(s[:1], _randn(2, 4, 7)[:1], y[:1]).item(), rel=1e-12)


def test_uld_gradcheck_different_vocabularies():
    s = _randn(2, 3, 4, seed=6).requires_grad_(True)
    t = _randn(2, 3, 6, seed=7).requires_grad_(True)
    y = _labels(2, 3, vocab=4, masked=[(0, 0)])
    assert torch.autograd.gradcheck(lambda a, b: uld(a, b, y, temperature=1.3), (s, t), eps=1e-6, atol=1e-6)


# ---------------------------------------------------------------- chunked == unchunked

CASES = [
    ("forward_kl", {}),
    ("reverse_kl", {"temperature": 2.0}),
    ("jsd", {"beta": 0.3}),
    ("jsd", {"beta": 0.0}),
    ("skew_kl", {"alpha": 0.1}),
    ("skew_reverse_kl", {"alpha": 0.2, "temperature": 1.5}),
    ("tv", {}),
    ("taid", {"t": 0.6}),
    ("kd", {"temperature": 4.0}),
    ("ce", {}),
]
B, T, V, H = 3, 7, 11, 5  # 21 positions, 5 of them masked -> 16 valid
MASKED = [(0, slice(0, 3)), (2, 6), (1, 0)]


def _pair(requires_grad=True):
    s = _randn(B, T, V, seed=10).requires_grad_(requires_grad)
    t = _randn(B, T, V, seed=11).requires_grad_(requires_grad)
    return s, t, _labels(B, T, vocab=V, masked=MASKED)


def _grads(value, tensors):
    return torch.autograd.grad(value, tensors, allow_unused=True, materialize_grads=True)


@pytest.mark.parametrize("name,params", CASES, ids=[f"{n}{p}" for n, p in CASES])
@pytest.mark.parametrize("chunk_size", [1, 3, 5, 16, 100])
def test_chunked_equals_unchunked(name, params, chunk_size):
    s, t, y = _pair()
    fn = TOKEN_LOSSES[name]
    ref = fn(s, t, y, **params)
    got = chunked_token_loss(name, s, t, y, chunk_size=chunk_size, **params)
    assert got.dtype == ref.dtype
    assert got.item() == pytest.approx(ref.item(), rel=1e-12, abs=1e-14)
    for g_ref, g_got in zip(_grads(ref, (s, t)), _grads(got, (s, t))):
        torch.testing.assert_close(g_got, g_ref, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("chunk_size", [2, 4, 7, 64])
def test_chunked_without_labels_and_non_contiguous_teacher(chunk_size):
    s, t, _ = _pair()
    t_wide = _randn(B, T + 1, V, seed=12).requires_grad_(True)
    t_view = t_wide[:, 1:]  # a shifted view, as in causal-LM code: not copied whole
    ref = jsd(s, t_view, beta=0.7)
    got = chunked_token_loss("jsd", s, t_view, chunk_size=chunk_size, beta=0.7)
    assert got.item() == pytest.approx(ref.item(), rel=1e-12)
    for g_ref, g_got in zip(_grads(ref, (s, t_wide)), _grads(got, (s, t_wide))):
        torch.testing.assert_close(g_got, g_ref, rtol=1e-10, atol=1e-13)


def test_chunked_with_a_function_and_float32_accumulation():
    s, t, y = _pair()
    s32, t32 = s.detach().float().requires_grad_(True), t.detach().float()
    fn = lambda a, b, targets: jsd(a, b, targets, beta=0.5)  # noqa: E731 -- any loss with this signature
    got = chunked_token_loss(fn, s32, t32, y, chunk_size=4)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(jsd(s, t, y).item(), rel=1e-6)
    bf = chunked_token_loss("jsd", s32.detach().bfloat16(), t32.bfloat16(), y, chunk_size=4)
    assert bf.dtype == torch.float32  # half inputs, float32 result and accumulation
    assert bf.item() == pytest.approx(jsd(s.bfloat16(), t.bfloat16(), y).item(), rel=1e-6)


def test_chunked_ce_weight_mixes_in_the_lm_loss():
    s, t, y = _pair()
    ref = skew_kl(s, t, y) + 0.3 * cross_entropy(s, None, y)
    got = chunked_token_loss("skew_kl", s, t, y, chunk_size=6, ce_weight=0.3)
    assert got.item() == pytest.approx(ref.item(), rel=1e-12)
    for g_ref, g_got in zip(_grads(ref, (s, t)), _grads(got, (s, t))):
        torch.testing.assert_close(g_got, g_ref, rtol=1e-10, atol=1e-13)


def test_chunked_edge_cases():
    s, t, y = _pair()
    # every position masked: 0 and zero gradients (like the unchunked losses)
    value = chunked_token_loss("forward_kl", s, t, torch.full((B, T), -100), chunk_size=4)
    assert value.item() == 0.0
    assert all(torch.count_nonzero(g) == 0 for g in _grads(value, (s, t)))
    # a loss whose value does not depend on the student (skew alpha = 1) still backpropagates
    value = chunked_token_loss("skew_kl", s, t, y, chunk_size=4, alpha=1.0)
    assert value.item() == 0.0
    value.backward()
    # under no_grad: a plain value, no graph
    with torch.no_grad():
        value = chunked_token_loss("jsd", s, t, y, chunk_size=4)
    assert not value.requires_grad and value.item() == pytest.approx(jsd(s, t, y).item(), rel=1e-12)
    # the loss scaled before backward (a loss weight) scales the gradients
    s.grad = None
    (0.25 * chunked_token_loss("reverse_kl", s, t.detach(), y, chunk_size=4)).backward()
    torch.testing.assert_close(s.grad, 0.25 * _grads(reverse_kl(s, t.detach(), y), (s,))[0], rtol=1e-10, atol=1e-14)
    # one position (1-D logits)
    a, b = s[0, 0].detach(), t[0, 0].detach()
    assert chunked_token_loss("tv", a, b, chunk_size=2).item() == pytest.approx(
        TOKEN_LOSSES["tv"](a, b).item(), rel=1e-12
    )


def test_chunked_default_chunk_size_scales_with_the_vocabulary(monkeypatch):
    from distillery.losses import lm

    s, t, y = _pair()
    seen = []
    fn = lambda a, b, targets: (seen.append(a.shape[0]), forward_kl(a, b, targets))[1]  # noqa: E731
    monkeypatch.setattr(lm, "DEFAULT_CHUNK_ELEMENTS", 6 * V)  # 6 tokens of vocabulary V per chunk
    got = chunked_token_loss(fn, s, t, y)
    assert seen == [6, 6, 4]
    assert got.item() == pytest.approx(forward_kl(s, t, y).item(), rel=1e-12)


def test_chunked_backward_twice_is_refused():
    s, t, y = _pair()
    value = chunked_token_loss("jsd", s, t, y, chunk_size=4)
    value.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        value.backward()


def test_chunked_errors():
    s, t, y = _pair()
    with pytest.raises(ValueError, match="unknown token loss 'nope'.*forward_kl"):
        chunked_token_loss("nope", s, t, y)
    with pytest.raises(ValueError, match="unknown parameter.*beta"):
        chunked_token_loss("forward_kl", s, t, y, beta=0.5)
    with pytest.raises(ValueError, match="beta"):
        chunked_token_loss("jsd", s, t, y, beta=2.0, chunk_size=4)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="chunk_size"):
            chunked_token_loss("jsd", s, t, y, chunk_size=bad)
    with pytest.raises(ValueError, match="same shape"):
        chunked_token_loss("jsd", s[..., :5], t, y)
    with pytest.raises(ValueError, match="ce_weight needs labels"):
        chunked_token_loss("jsd", s, t, ce_weight=0.5)
    with pytest.raises(ValueError, match="lm_head weight must be"):
        chunked_token_loss("jsd", _randn(B, T, H), t, y, lm_head=_randn(V + 1, H))
    with pytest.raises(ValueError, match="hidden states"):
        chunked_token_loss("jsd", _randn(B, T, H + 1), t, y, lm_head=_randn(V, H))


# ---------------------------------------------------------------- fused LM head == unfused


@pytest.mark.parametrize("name,params", [("jsd", {"beta": 0.4}), ("skew_reverse_kl", {}), ("taid", {"t": 0.5})])
@pytest.mark.parametrize("chunk_size", [1, 4, 16, 50])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_lm_head_equals_unfused(name, params, chunk_size, bias):
    h = _randn(B, T, H, seed=13).requires_grad_(True)
    w = _randn(V, H, seed=14, scale=0.7).requires_grad_(True)
    b = _randn(V, seed=15).requires_grad_(True) if bias else None
    t = _randn(B, T, V, seed=16).requires_grad_(True)
    y = _labels(B, T, vocab=V, masked=MASKED)
    inputs = [x for x in (h, w, b, t) if x is not None]
    ref = TOKEN_LOSSES[name](F.linear(h, w, b), t, y, **params) + 0.5 * cross_entropy(F.linear(h, w, b), None, y)
    got = chunked_token_loss(name, h, t, y, chunk_size=chunk_size, lm_head=w, lm_head_bias=b, ce_weight=0.5, **params)
    assert got.item() == pytest.approx(ref.item(), rel=1e-12)
    for g_ref, g_got in zip(_grads(ref, inputs), _grads(got, inputs)):
        torch.testing.assert_close(g_got, g_ref, rtol=1e-10, atol=1e-13)


def test_fused_accepts_an_nn_linear_and_projects_one_chunk_at_a_time(monkeypatch):
    head = torch.nn.Linear(H, V, dtype=D)
    h = _randn(B, T, H, seed=17).requires_grad_(True)
    t, y = _randn(B, T, V, seed=18), _labels(B, T, vocab=V, masked=MASKED)
    ref = forward_kl(head(h), t, y)
    ref_grads = _grads(ref, (h, head.weight, head.bias))

    rows_projected = []
    linear = F.linear

    def spy(x, weight, bias=None):
        rows_projected.append(x.shape[0] if x.dim() == 2 else -1)
        return linear(x, weight, bias)

    monkeypatch.setattr(F, "linear", spy)
    got = chunked_token_loss("forward_kl", h, t, y, chunk_size=6, lm_head=head)
    got_grads = _grads(got, (h, head.weight, head.bias))
    monkeypatch.undo()
    assert got.item() == pytest.approx(ref.item(), rel=1e-12)
    for g_ref, g_got in zip(ref_grads, got_grads):
        torch.testing.assert_close(g_got, g_ref, rtol=1e-10, atol=1e-13)
    # 16 valid positions in chunks of 6: the student logits only ever exist 6 rows at a time
    assert rows_projected == [6, 6, 4]


def test_fused_half_precision_close_to_float32():
    h = _randn(B, T, H, seed=19, dtype=torch.float32)
    w = _randn(V, H, seed=20, scale=0.7, dtype=torch.float32)
    t, y = _randn(B, T, V, seed=21, dtype=torch.float32), _labels(B, T, vocab=V, masked=MASKED)
    hb, wb = h.bfloat16().requires_grad_(True), w.bfloat16().requires_grad_(True)
    got = chunked_token_loss("jsd", hb, t.bfloat16(), y, chunk_size=5, lm_head=wb)
    got.backward()
    assert got.dtype == torch.float32 and hb.grad.dtype == torch.bfloat16 and wb.grad.dtype == torch.bfloat16
    ref = jsd(F.linear(h, w), t, y)
    assert got.item() == pytest.approx(ref.item(), rel=3e-2)


# --------------------------------------------------------------------------- top-k buckets


def _coarsen(logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Naive (k+1)-bucket coarsening of full log-probs: the k ids, then the rest."""
    p = logp.exp()
    top = p.gather(-1, ids)
    return torch.cat([top, 1 - top.sum(-1, keepdim=True)], -1).log()


@pytest.mark.parametrize("name, params", [("forward_kl", {}), ("reverse_kl", {}), ("jsd", {"beta": 0.3}), ("tv", {})])
def test_topk_buckets_with_k_equal_to_the_vocabulary_give_the_dense_loss(name, params):
    from distillery.losses.lm import TOKEN_LOSSES
    from distillery.losses.lm_sparse import topk_buckets

    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 11, dtype=torch.float64), 3 * torch.randn(2, 5, 11, dtype=torch.float64)
    t_lp = torch.log_softmax(t, -1)
    ids = t_lp.argsort(-1, descending=True)
    sb, tb = topk_buckets(s, ids, t_lp.gather(-1, ids), min_tail=1e-30)
    fn = TOKEN_LOSSES[name]
    dense = fn(s, t, **params)
    torch.testing.assert_close(fn(sb, tb, **params), dense, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name, params", [("forward_kl", {}), ("reverse_kl", {}), ("jsd", {"beta": 0.5}), ("tv", {})])
def test_topk_buckets_equal_the_hand_coarsened_distributions_and_never_exceed_the_dense_loss(name, params):
    from distillery.losses.lm import TOKEN_LOSSES
    from distillery.losses.lm_sparse import topk_buckets

    torch.manual_seed(1)
    s, t = torch.randn(3, 4, 50, dtype=torch.float64), 2 * torch.randn(3, 4, 50, dtype=torch.float64)
    T = 2.0
    s_lp, t_lp = torch.log_softmax(s / T, -1), torch.log_softmax(t / T, -1)
    ids = t_lp.topk(8, -1).indices
    sb, tb = topk_buckets(s, ids, t_lp.gather(-1, ids), temperature=T)
    torch.testing.assert_close(sb, _coarsen(s_lp, ids))
    torch.testing.assert_close(tb, _coarsen(t_lp, ids))
    fn = TOKEN_LOSSES[name]
    assert float(fn(sb, tb, **params)) <= float(fn(s_lp, t_lp, **params)) + 1e-12  # data processing inequality


def test_topk_buckets_gradients_and_bad_shapes():
    from distillery.losses.lm_sparse import topk_buckets

    torch.manual_seed(2)
    s = torch.randn(2, 3, 9, dtype=torch.float64, requires_grad=True)
    t_lp = torch.log_softmax(torch.randn(2, 3, 9, dtype=torch.float64), -1)
    ids = t_lp.topk(4, -1).indices
    torch.autograd.gradcheck(lambda x: topk_buckets(x, ids, t_lp.gather(-1, ids))[0], (s,))
    with pytest.raises(ValueError, match="must be"):
        topk_buckets(s, ids[..., :2], t_lp.gather(-1, ids))
    # float16 storage can round the top-k mass to >= 1: the teacher's tail stays finite, buckets sum to 1
    stored = torch.zeros(2, 3, 4, dtype=torch.float16)  # four tokens at probability 1 each
    _, tb = topk_buckets(s, ids, stored)
    assert torch.isfinite(tb).all()
    torch.testing.assert_close(tb.exp().sum(-1), torch.ones(2, 3, dtype=torch.float64))
