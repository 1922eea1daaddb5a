"""MiniLM / MiniLMv2 losses against a direct implementation of the papers' formulas (loops over
sequences, heads and query positions), plus limits, padding and float64 gradients."""
import math

import pytest
import torch

from distillery.losses.minilm import (
    attention_relation_kl,
    qkv_relation_kl,
    self_attention_kl,
    value_relation_kl,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def naive_relation_kl(sa, sb, ta, tb, n_heads, mask=None):
    """MiniLMv2 eqs. 6-8 written out: for each sequence, keep its real tokens; for each relation
    head a (consecutive chunk of the concatenated vector) and query t, KL(softmax(teacher row) ||
    softmax(student row)); average over heads and queries, then over the batch."""
    batch, length = sa.shape[:2]
    mask = torch.ones(batch, length, dtype=torch.bool) if mask is None else mask.bool()
    total = 0.0
    for b in range(batch):
        idx = mask[b].nonzero().flatten()
        n = len(idx)
        seq_loss = 0.0
        for a in range(n_heads):
            def head(x):
                d = x.shape[-1] // n_heads
                return x[b, idx, a * d:(a + 1) * d], d
            (qs, d_s), (ks, _) = head(sa), head(sb)
            (qt, d_t), (kt, _) = head(ta), head(tb)
            for t in range(n):
                p_t = torch.softmax(qt[t] @ kt.T / math.sqrt(d_t), dim=0)
                p_s = torch.softmax(qs[t] @ ks.T / math.sqrt(d_s), dim=0)
                seq_loss = seq_loss + (p_t * (p_t.log() - p_s.log())).sum()
        total = total + seq_loss / (n_heads * n)
    return total / batch


def naive_attention_kl(s_probs, t_probs, mask):
    batch, heads = s_probs.shape[:2]
    total = 0.0
    for b in range(batch):
        idx = mask[b].bool().nonzero().flatten()
        acc = 0.0
        for h in range(heads):
            for t in idx:
                pt, ps = t_probs[b, h, t, idx], s_probs[b, h, t, idx]
                acc = acc + (pt * (pt.log() - ps.log())).sum()
        total = total + acc / (heads * len(idx))
    return total / batch


def rand(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


# right padding, a hole in the middle, and left padding (as decoder batches use)
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 1, 1, 0, 1], [0, 0, 1, 1, 1, 1]])


def test_relation_kl_matches_direct_formula_with_different_widths_and_padding():
    sa, sb = rand(4, 6, 8, seed=1), rand(4, 6, 8, seed=2)  # student width 8
    ta, tb = rand(4, 6, 12, seed=3), rand(4, 6, 12, seed=4)  # teacher width 12
    got = attention_relation_kl(sa, sb, ta, tb, n_relation_heads=4, mask=MASK)
    want = naive_relation_kl(sa, sb, ta, tb, 4, MASK)
    assert got.item() == pytest.approx(want.item(), rel=1e-10)
    no_mask = attention_relation_kl(sa, sb, ta, tb, n_relation_heads=2)
    assert no_mask.item() == pytest.approx(naive_relation_kl(sa, sb, ta, tb, 2).item(), rel=1e-10)


def test_zero_for_identical_inputs_positive_otherwise():
    q, k = rand(2, 5, 12, seed=5), rand(2, 5, 12, seed=6)
    assert attention_relation_kl(q, k, q, k, n_relation_heads=3).item() == pytest.approx(0.0, abs=1e-12)
    assert qkv_relation_kl((q, k, q), (q, k, q), n_relation_heads=4).item() == pytest.approx(0.0, abs=1e-12)
    assert attention_relation_kl(q, k, q, k + 0.1 * rand(2, 5, 12, seed=7), n_relation_heads=3).item() > 1e-6


def test_relation_heads_of_a_wider_teacher_with_duplicated_chunks_give_zero():
    # Teacher relation head = [c, c] * s, d_r doubled: its scores are 2 s^2 c.c' / sqrt(2 d) and
    # the student's c.c' / sqrt(d); equal when s^2 = 1/sqrt(2).  Zero loss proves each model is
    # scaled by its own d_r and that heads are consecutive chunks.
    s = 2 ** -0.25
    q = rand(2, 5, 8, seed=8)  # 4 relation heads of size 2
    heads = q.view(2, 5, 4, 2)
    wide = torch.cat([heads, heads], dim=-1).reshape(2, 5, 16) * s  # 4 heads of size 4
    assert attention_relation_kl(q, q, wide, wide, n_relation_heads=4).item() == pytest.approx(0.0, abs=1e-12)
    assert attention_relation_kl(q, q, wide, wide, n_relation_heads=2).item() == pytest.approx(0.0, abs=1e-12)
    # Swapping the teacher's first two relation heads leaves one whole-vector relation unchanged
    # but breaks the per-head match.
    swapped = wide.view(2, 5, 4, 4)[:, :, [1, 0, 2, 3]].reshape(2, 5, 16)
    assert attention_relation_kl(q, q, swapped, swapped, n_relation_heads=1).item() == pytest.approx(0.0, abs=1e-12)
    assert attention_relation_kl(q, q, swapped, swapped, n_relation_heads=4).item() > 1e-3


def test_loss_is_the_mean_of_per_head_losses_after_resplitting():
    # MiniLMv2 re-splits the concatenation: A_r heads of the whole equal the average of the
    # single-head loss on each chunk, and the source model's attention-head count plays no part.
    sa, ta = rand(3, 5, 12, seed=9), rand(3, 5, 6, seed=10)
    whole = attention_relation_kl(sa, sa, ta, ta, n_relation_heads=3, mask=MASK[:3, :5])
    parts = [
        attention_relation_kl(sa[..., 4 * a:4 * a + 4], sa[..., 4 * a:4 * a + 4], ta[..., 2 * a:2 * a + 2],
                              ta[..., 2 * a:2 * a + 2], n_relation_heads=1, mask=MASK[:3, :5])
        for a in range(3)
    ]
    assert whole.item() == pytest.approx(sum(p.item() for p in parts) / 3, rel=1e-10)


def test_padding_positions_do_not_matter():
    sa, ta = rand(2, 6, 8, seed=11), rand(2, 6, 8, seed=12)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]])
    base = attention_relation_kl(sa, sa, ta, ta, n_relation_heads=2, mask=mask)
    noisy_s, noisy_t = sa.clone(), ta.clone()
    noisy_s[mask == 0] = 100.0 * rand(int((mask == 0).sum()), 8, seed=13)
    noisy_t[mask == 0] = -50.0
    assert attention_relation_kl(noisy_s, noisy_s, noisy_t, noisy_t, n_relation_heads=2, mask=mask).item() == pytest.approx(base.item(), rel=1e-12)
    # and it equals the per-sequence losses on the truncated sequences, averaged
    first = attention_relation_kl(sa[:1, :4], sa[:1, :4], ta[:1, :4], ta[:1, :4], n_relation_heads=2)
    second = attention_relation_kl(sa[1:, :2], sa[1:, :2], ta[1:, :2], ta[1:, :2], n_relation_heads=2)
    assert base.item() == pytest.approx((first.item() + second.item()) / 2, rel=1e-12)


def test_qkv_relation_kl_sums_the_named_relations():
    s = tuple(rand(2, 4, 8, seed=20 + i) for i in range(3))
    t = tuple(rand(2, 4, 8, seed=30 + i) for i in range(3))
    got = qkv_relation_kl(s, t, n_relation_heads=2, weights={"qq": 1.0, "kk": 0.5, "vv": 2.0, "qk": 0.25})
    parts = {n: attention_relation_kl(s[i], s[j], t[i], t[j], n_relation_heads=2)
             for n, (i, j) in {"qq": (0, 0), "kk": (1, 1), "vv": (2, 2), "qk": (0, 1)}.items()}
    want = parts["qq"] + 0.5 * parts["kk"] + 2.0 * parts["vv"] + 0.25 * parts["qk"]
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    default = qkv_relation_kl(s, t, n_relation_heads=2)
    assert default.item() == pytest.approx((parts["qq"] + parts["kk"] + parts["vv"]).item(), rel=1e-12)


def test_bad_inputs_name_the_problem():
    x = rand(2, 4, 10)
    with pytest.raises(ValueError, match="not divisible by n_relation_heads=4"):
        attention_relation_kl(x, x, x, x, n_relation_heads=4)
    with pytest.raises(ValueError, match="unknown relation"):
        qkv_relation_kl((x, x, x), (x, x, x), n_relation_heads=2, weights={"qz": 1.0})
    with pytest.raises(ValueError, match="same batch of tokens"):
        attention_relation_kl(x, x, x[:, :3], x[:, :3], n_relation_heads=2)
    with pytest.raises(ValueError, match="mask must have shape"):
        attention_relation_kl(x, x, x, x, n_relation_heads=2, mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="attention_relation_kl"):
        self_attention_kl(torch.rand(1, 2, 3, 3), torch.rand(1, 4, 3, 3))


def test_self_attention_kl_hand_computed_and_direct():
    # one head, two tokens: teacher rows (0.5, 0.5) and (0.9, 0.1), student (0.25, 0.75) and (0.9, 0.1)
    t = torch.tensor([[[[0.5, 0.5], [0.9, 0.1]]]], dtype=torch.float64)
    s = torch.tensor([[[[0.25, 0.75], [0.9, 0.1]]]], dtype=torch.float64)
    want = (0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75) + 0.0) / 2
    assert self_attention_kl(s, t).item() == pytest.approx(want, rel=1e-12)
    assert self_attention_kl(t, t).item() == pytest.approx(0.0, abs=1e-15)

    # attention probabilities as a model makes them: softmax over the real keys only
    mask = MASK
    keys = mask.bool()[:, None, None, :]
    def probs(seed):
        return torch.softmax(rand(4, 3, 6, 6, seed=seed).masked_fill(~keys, float("-inf")), dim=-1)
    ps, pt = probs(40), probs(41)
    assert self_attention_kl(ps, pt, mask).item() == pytest.approx(naive_attention_kl(ps, pt, mask).item(), rel=1e-10)


def test_value_relation_is_the_vv_relation_with_attention_heads():
    vs, vt = rand(4, 6, 8, seed=50), rand(4, 6, 16, seed=51)
    got = value_relation_kl(vs, vt, n_heads=4, mask=MASK)
    assert got.item() == pytest.approx(naive_relation_kl(vs, vs, vt, vt, 4, MASK).item(), rel=1e-10)


def test_float64_gradients():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    sq = rand(2, 4, 6, seed=60).requires_grad_()
    sk = rand(2, 4, 6, seed=61).requires_grad_()
    tq, tk = rand(2, 4, 9, seed=62), rand(2, 4, 9, seed=63)
    assert torch.autograd.gradcheck(lambda a, b: attention_relation_kl(a, b, tq, tk, n_relation_heads=3, mask=mask), (sq, sk))

    keys = mask.bool()[:, None, None, :]
    logits = rand(2, 2, 4, 4, seed=64).requires_grad_()
    pt = torch.softmax(rand(2, 2, 4, 4, seed=65).masked_fill(~keys, float("-inf")), dim=-1)
    assert torch.autograd.gradcheck(
        lambda z: self_attention_kl(torch.softmax(z.masked_fill(~keys, float("-inf")), dim=-1), pt, mask), (logits,)
    )


def test_v1_attention_kl_on_hf_attention_maps_equals_v2_qk_relation():
    # MiniLM v1 on the attention probabilities a BERT returns (eager attention) is the MiniLMv2
    # Q-K relation with A_r = the attention-head count, computed from the hooked projections.
    transformers = pytest.importorskip("transformers")
    from distillery.taps import Taps

    def bert(width, seed):
        torch.manual_seed(seed)
        cfg = transformers.BertConfig(vocab_size=50, hidden_size=width, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=2 * width, attn_implementation="eager",
                                      initializer_range=0.5)  # peaked attention, not near-uniform
        return transformers.BertModel(cfg).eval().double()

    student, teacher = bert(16, 0), bert(32, 1)
    ids = torch.randint(0, 50, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 4:] = 0
    names = ["encoder.layer.1.attention.self.query", "encoder.layer.1.attention.self.key"]
    out = {}
    for who, model in (("s", student), ("t", teacher)):
        with Taps(model, names) as taps, torch.no_grad():
            out[who] = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions[-1]
            out[who + "qk"] = [taps[n] for n in names]
    v1 = self_attention_kl(out["s"], out["t"], mask)
    v2 = attention_relation_kl(*out["sqk"], *out["tqk"], n_relation_heads=4, mask=mask)
    assert v1.item() > 1e-2
    assert v1.item() == pytest.approx(v2.item(), rel=1e-6)
