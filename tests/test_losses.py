"""Tests of the distillation losses against their mathematical definitions.

Reference values are computed here with numpy (float64) straight from the formulas, or by
hand, never by calling the function under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distillery import losses
from distillery.errors import ConfigError
from distillery.losses import (
    attention_map,
    attention_transfer,
    bdkd,
    cross_entropy,
    dkd,
    forward_kl,
    hint_mse,
    jsd,
    kd,
    nckd_per_position,
    nkd,
    reverse_kl,
    tckd_per_position,
    total_variation,
)

# Losses whose value is a divergence: zero when the two distributions are equal.
DIVERGENCES = {
    "kd": kd,
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": jsd,
    "tv": total_variation,
    "dkd": dkd,
    "bdkd": bdkd,
}
ALL_NAMES = ["ce", "kd", "forward_kl", "reverse_kl", "jsd", "dkd", "nkd", "bdkd", "tv"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _logits(*shape: int, seed: int = 0, scale: float = 2.0, dtype=torch.float64) -> torch.Tensor:
    return (torch.randn(*shape, generator=_gen(seed), dtype=torch.float64) * scale).to(dtype)


def _targets(*shape: int, num_classes: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, num_classes, shape, generator=_gen(seed))


# ---------------------------------------------------------------- numpy references


def np_softmax(z: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64) / temperature
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Row-wise KL(p || q) for strictly positive distributions."""
    return (p * (np.log(p) - np.log(q))).sum(axis=-1)


def np_trl_jsd(s: np.ndarray, t: np.ndarray, beta: float) -> float:
    """TRL's generalized JSD written in probability space (no logsumexp), mean over rows."""
    q, p = np_softmax(s), np_softmax(t)
    m = beta * p + (1 - beta) * q
    return float((beta * np_kl(p, m) + (1 - beta) * np_kl(q, m)).mean())


# ---------------------------------------------------------------- zero / non-zero


@pytest.mark.parametrize("name", list(DIVERGENCES))
def test_divergence_is_zero_for_equal_distributions(name):
    s = _logits(6, 7)
    t = s + 3.0  # a constant shift leaves the softmax unchanged, the tensors differ
    y = _targets(6, num_classes=7)
    fn = DIVERGENCES[name]
    assert fn(s, t, y).abs().item() < 1e-10
    # and positive once the distributions differ, so the zero above is informative
    assert fn(s, _logits(6, 7, seed=5), y).item() > 1e-3


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_jsd_zero_for_equal_distributions_every_beta(beta):
    s = _logits(4, 5)
    assert jsd(s, s.clone(), beta=beta).abs().item() < 1e-12
    assert jsd(s, s.clone(), beta=beta, scaled=True).abs().item() < 1e-12


def test_nkd_equal_logits_is_not_zero_but_the_formula():
    z = _logits(5, 6, seed=3)
    y = _targets(5, num_classes=6)
    gamma, lam = 1.5, 2.0
    p = np_softmax(z.numpy())
    rows = np.arange(5)
    target_term = -p[rows, y.numpy()] * np.log(p[rows, y.numpy()])
    non_target_term = []
    for i in range(5):
        other = np.delete(z.numpy()[i], y[i].item())
        p_hat = np_softmax(other, lam)
        non_target_term.append(-gamma * lam**2 * (p_hat * np.log(p_hat)).sum())
    expected = (target_term + np.array(non_target_term)).mean()
    value = nkd(z, z.clone(), y, temperature=lam, gamma=gamma).item()
    assert value > 0.1
    assert value == pytest.approx(expected, rel=1e-10)


# ---------------------------------------------------------------- hand-computed values

# Two classes: teacher p = [1/2, 1/2], student q = [3/4, 1/4].
TEACHER_2 = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
STUDENT_2 = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)


def test_hand_values_two_classes():
    fkl = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)  # = 0.5 ln(4/3)
    rkl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert kd(STUDENT_2, TEACHER_2, temperature=1.0).item() == pytest.approx(fkl, abs=1e-12)
    assert forward_kl(STUDENT_2, TEACHER_2).item() == pytest.approx(0.5 * math.log(4 / 3), abs=1e-12)
    assert reverse_kl(STUDENT_2, TEACHER_2).item() == pytest.approx(rkl, abs=1e-12)
    assert total_variation(STUDENT_2, TEACHER_2).item() == pytest.approx(0.25, abs=1e-12)
    ce = cross_entropy(STUDENT_2, None, torch.tensor([0])).item()
    assert ce == pytest.approx(-math.log(0.75), abs=1e-12)
    # JSD at beta = 1/2: M = [5/8, 3/8]
    m = (0.625, 0.375)
    expected_jsd = 0.5 * (0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])) + 0.5 * (
        0.75 * math.log(0.75 / m[0]) + 0.25 * math.log(0.25 / m[1])
    )
    assert jsd(STUDENT_2, TEACHER_2, beta=0.5).item() == pytest.approx(expected_jsd, abs=1e-12)


def test_bdkd_hand_values_pick_the_divergence_by_entropy():
    # student q = [3/4, 1/4] is more confident than teacher p = [1/2, 1/2] -> forward KL(p||q)
    fkl = 0.5 * math.log(4 / 3)
    assert bdkd(STUDENT_2, TEACHER_2, temperature=1.0).item() == pytest.approx(fkl, abs=1e-12)
    # roles swapped: student [1/2, 1/2] is less confident -> reverse KL(q_s || p_t)
    rkl = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    fkl_swapped = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    value = bdkd(TEACHER_2, STUDENT_2, temperature=1.0).item()
    assert value == pytest.approx(rkl, abs=1e-12)
    assert value != pytest.approx(fkl_swapped, abs=1e-3)
    # T^2 scaling at T = 2
    p, q = np_softmax([0.0, 0.0], 2.0), np_softmax([math.log(3.0), 0.0], 2.0)
    assert bdkd(STUDENT_2, TEACHER_2, temperature=2.0).item() == pytest.approx(
        4.0 * np_kl(p, q), abs=1e-12
    )


def test_dkd_and_nkd_hand_values_three_classes():
    teacher = torch.tensor([[0.0, 0.0, 0.0]], dtype=torch.float64)  # p = [1/3, 1/3, 1/3]
    student = torch.tensor([[0.0, math.log(2.0), 0.0]], dtype=torch.float64)  # q = [1/4, 1/2, 1/4]
    y = torch.tensor([0])
    tckd = (1 / 3) * math.log((1 / 3) / (1 / 4)) + (2 / 3) * math.log((2 / 3) / (3 / 4))
    nckd = 0.5 * math.log(0.5 / (2 / 3)) + 0.5 * math.log(0.5 / (1 / 3))
    value = dkd(student, teacher, y, alpha=1.0, beta=1.0, temperature=1.0).item()
    assert value == pytest.approx(tckd + nckd, abs=1e-12)
    value = dkd(student, teacher, y, alpha=2.0, beta=8.0, temperature=1.0).item()
    assert value == pytest.approx(2 * tckd + 8 * nckd, abs=1e-12)
    # NKD, gamma = 1.5, lambda = 1: -T_t log S_t - gamma * sum T_hat log S_hat
    expected_nkd = -(1 / 3) * math.log(1 / 4) - 1.5 * (0.5 * math.log(2 / 3) + 0.5 * math.log(1 / 3))
    assert nkd(student, teacher, y).item() == pytest.approx(expected_nkd, abs=1e-12)


# ---------------------------------------------------------------- gradients


def _gradcheck(fn, s, t, wrt_teacher: bool):
    s = s.clone().requires_grad_(True)
    t = t.clone().requires_grad_(wrt_teacher)
    inputs = (s, t) if wrt_teacher else (s,)
    if wrt_teacher:
        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)
    else:
        assert torch.autograd.gradcheck(lambda a: fn(a, t), inputs, eps=1e-6, atol=1e-6)


GRAD_CASES = [
    # (name, function of (s, t, targets), check teacher gradient too)
    ("ce", lambda s, t, y: cross_entropy(s, t, y), False),
    ("kd", lambda s, t, y: kd(s, t, y, temperature=2.0), True),
    ("forward_kl", lambda s, t, y: forward_kl(s, t, y), True),
    ("reverse_kl", lambda s, t, y: reverse_kl(s, t, y, temperature=1.5), True),
    ("jsd_0", lambda s, t, y: jsd(s, t, y, beta=0.0), True),
    ("jsd_0.3", lambda s, t, y: jsd(s, t, y, beta=0.3, temperature=2.0), True),
    ("jsd_scaled", lambda s, t, y: jsd(s, t, y, beta=0.7, scaled=True), True),
    ("jsd_1", lambda s, t, y: jsd(s, t, y, beta=1.0), True),
    ("dkd", lambda s, t, y: dkd(s, t, y, alpha=1.0, beta=8.0, temperature=4.0), True),
    ("nkd", lambda s, t, y: nkd(s, t, y, temperature=2.0, gamma=1.5), False),  # T_t is detached
    ("bdkd", lambda s, t, y: bdkd(s, t, y, temperature=4.0), True),
    ("tv", lambda s, t, y: total_variation(s, t, y, temperature=2.0), True),
]


@pytest.mark.parametrize("name,fn,wrt_teacher", GRAD_CASES, ids=[c[0] for c in GRAD_CASES])
def test_gradcheck(name, fn, wrt_teacher):
    s, t = _logits(2, 2, 4, seed=11), _logits(2, 2, 4, seed=12)
    y = _targets(2, 2, num_classes=4)
    y[0, 1] = -100  # an ignored position must not break the gradient
    _gradcheck(lambda a, b: fn(a, b, y), s, t, wrt_teacher)


def test_nkd_teacher_target_probability_is_detached():
    s, t = _logits(3, 4, seed=1), _logits(3, 4, seed=2).requires_grad_(True)
    y = _targets(3, num_classes=4)
    nkd(s, t, y, gamma=0.0).backward()  # gamma = 0 leaves only the target term
    assert torch.count_nonzero(t.grad) == 0


def test_gradcheck_feature_losses():
    s, t = _logits(2, 2, 3, 3, seed=1), _logits(2, 3, 3, 3, seed=2)
    assert torch.autograd.gradcheck(
        lambda a, b: attention_transfer(a, b), (s.requires_grad_(), t.requires_grad_()), eps=1e-6
    )
    big = _logits(2, 2, 6, 6, seed=3).requires_grad_()  # pooled 6x6 -> 3x3
    assert torch.autograd.gradcheck(lambda a: attention_transfer(a, t), (big,), eps=1e-6)
    a, b = _logits(2, 3, 4, seed=4), _logits(2, 3, 4, seed=5)
    assert torch.autograd.gradcheck(hint_mse, (a.requires_grad_(), b.requires_grad_()), eps=1e-6)


# ---------------------------------------------------------------- JSD


def test_jsd_endpoints_equal_forward_and_reverse_kl_exactly():
    s, t = _logits(4, 9, seed=1), _logits(4, 9, seed=2)
    for temperature in (1.0, 3.0):
        assert torch.equal(jsd(s, t, beta=0.0, temperature=temperature), forward_kl(s, t, temperature=temperature))
        assert torch.equal(jsd(s, t, beta=1.0, temperature=temperature), reverse_kl(s, t, temperature=temperature))
        # scaled: the endpoints are the same values
        assert torch.equal(jsd(s, t, beta=0.0, scaled=True, temperature=temperature), forward_kl(s, t, temperature=temperature))
        assert torch.equal(jsd(s, t, beta=1.0, scaled=True, temperature=temperature), reverse_kl(s, t, temperature=temperature))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_jsd_scaled_limits_are_continuous(dtype):
    s, t = _logits(4, 9, seed=1, dtype=dtype), _logits(4, 9, seed=2, dtype=dtype)
    fkl, rkl = forward_kl(s, t).item(), reverse_kl(s, t).item()
    assert jsd(s, t, beta=1e-4, scaled=True).item() == pytest.approx(fkl, rel=1e-3)
    assert jsd(s, t, beta=1 - 1e-4, scaled=True).item() == pytest.approx(rkl, rel=1e-3)
    # the unscaled JSD instead vanishes near the endpoints (TRL's jump at beta = 0 / 1)
    assert jsd(s, t, beta=1e-4).item() < 1e-3 * fkl


def test_jsd_half_is_symmetric():
    s, t = _logits(5, 6, seed=1), _logits(5, 6, seed=2)
    assert jsd(s, t, beta=0.5).item() == pytest.approx(jsd(t, s, beta=0.5).item(), rel=1e-12)
    # and swapping roles maps beta to 1 - beta in general
    assert jsd(s, t, beta=0.2).item() == pytest.approx(jsd(t, s, beta=0.8).item(), rel=1e-12)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_matches_trl_formula_in_probability_space(beta):
    s, t = _logits(2, 3, 7, seed=1), _logits(2, 3, 7, seed=2)
    expected = np_trl_jsd(s.reshape(-1, 7).numpy(), t.reshape(-1, 7).numpy(), beta)
    assert jsd(s, t, beta=beta).item() == pytest.approx(expected, rel=1e-10)
    assert jsd(s, t, beta=beta, scaled=True).item() == pytest.approx(
        expected / (beta * (1 - beta)), rel=1e-10
    )


# ---------------------------------------------------------------- DKD


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_dkd_identity_kd_equals_tckd_plus_weighted_nckd(temperature):
    s, t = _logits(8, 10, seed=1, scale=3.0), _logits(8, 10, seed=2, scale=3.0)
    y = _targets(8, num_classes=10)
    kd_rows = np_kl(np_softmax(t.numpy(), temperature), np_softmax(s.numpy(), temperature))
    p_target = np_softmax(t.numpy(), temperature)[np.arange(8), y.numpy()]
    tckd = tckd_per_position(s, t, y, temperature=temperature).numpy()
    nckd = nckd_per_position(s, t, y, temperature=temperature).numpy()
    assert (tckd >= 0).all() and (nckd >= 0).all()
    np.testing.assert_allclose(tckd + (1 - p_target) * nckd, kd_rows, rtol=1e-10, atol=1e-12)


def test_dkd_alpha_beta_one_exceeds_kd_by_teacher_weighted_nckd():
    # DKD(1, 1) = T^2 (TCKD + NCKD) and KD = T^2 (TCKD + (1 - p_t) NCKD), so their difference
    # is T^2 * mean(p_t * NCKD) >= 0.
    temperature = 4.0
    s, t = _logits(8, 10, seed=3), _logits(8, 10, seed=4)
    y = _targets(8, num_classes=10)
    p_target = torch.softmax(t / temperature, dim=-1).gather(1, y[:, None]).squeeze(1)
    nckd = nckd_per_position(s, t, y, temperature=temperature)
    diff = dkd(s, t, y, alpha=1.0, beta=1.0, temperature=temperature) - kd(s, t, temperature=temperature)
    assert diff.item() == pytest.approx((temperature**2 * p_target * nckd).mean().item(), rel=1e-10)
    assert diff.item() > 0


def test_dkd_extreme_logits_no_nan():
    s = torch.tensor([[1e4, -1e4, 0.0], [0.0, 5e3, -5e3]], requires_grad=True)
    t = torch.tensor([[-1e4, 1e4, 3.0], [1e4, 0.0, -1e4]], requires_grad=True)
    y = torch.tensor([0, 1])
    for fn in (dkd, nkd, kd, reverse_kl, jsd, bdkd, total_variation):
        s.grad = t.grad = None
        value = fn(s, t, y)
        value.backward()
        assert torch.isfinite(value), fn.__name__
        assert torch.isfinite(s.grad).all() and torch.isfinite(t.grad).all(), fn.__name__


# ---------------------------------------------------------------- shapes and ignored targets


@pytest.mark.parametrize("name", ALL_NAMES)
def test_leading_dims_same_as_flattened(name):
    fn = losses.get(name)
    s, t = _logits(2, 3, 11, seed=1), _logits(2, 3, 11, seed=2)
    y = _targets(2, 3, num_classes=11)
    y[1, 2] = -100
    assert fn(s, t, y).item() == pytest.approx(fn(s.reshape(6, 11), t.reshape(6, 11), y.reshape(6)).item(), rel=1e-12)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_ignored_targets_equal_loss_on_the_valid_positions(name):
    fn = losses.get(name)
    s, t = _logits(7, 5, seed=1), _logits(7, 5, seed=2)
    y = _targets(7, num_classes=5)
    y[[1, 4]] = -100
    keep = y != -100
    assert fn(s, t, y).item() == pytest.approx(fn(s[keep], t[keep], y[keep]).item(), rel=1e-12)
    # all ignored: 0, not NaN, and a zero gradient
    s_all = s.clone().requires_grad_(True)
    value = fn(s_all, t, torch.full((7,), -100))
    value.backward()
    assert value.item() == 0.0 and torch.count_nonzero(s_all.grad) == 0


def test_language_model_sized_vocab():
    s, t = _logits(2, 3, 32000, seed=1, dtype=torch.float32), _logits(2, 3, 32000, seed=2, dtype=torch.float32)
    y = _targets(2, 3, num_classes=32000)
    for name in ALL_NAMES:
        assert torch.isfinite(losses.get(name)(s, t, y))


# ---------------------------------------------------------------- temperature and precision


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 8.0])
def test_kd_temperature_against_tempered_kl(temperature):
    s, t = _logits(5, 6, seed=1), _logits(5, 6, seed=2)
    p, q = np_softmax(t.numpy(), temperature), np_softmax(s.numpy(), temperature)
    expected = temperature**2 * np_kl(p, q).mean()
    assert kd(s, t, temperature=temperature).item() == pytest.approx(expected, rel=1e-10)
    expected_rkl = temperature**2 * np_kl(q, p).mean()
    assert reverse_kl(s, t, temperature=temperature).item() == pytest.approx(expected_rkl, rel=1e-10)
    expected_tv = 0.5 * np.abs(p - q).sum(-1).mean()
    assert total_variation(s, t, temperature=temperature).item() == pytest.approx(expected_tv, rel=1e-10)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_half_precision_inputs(name):
    fn = losses.get(name)
    s32, t32 = _logits(4, 3, 50, seed=1, dtype=torch.float32), _logits(4, 3, 50, seed=2, dtype=torch.float32)
    y = _targets(4, 3, num_classes=50)
    for half in (torch.float16, torch.bfloat16):
        s, t = s32.to(half), t32.to(half)
        value = fn(s, t, y)
        assert value.dtype == torch.float32 and torch.isfinite(value)
        # compare with fp32 on the same (rounded) inputs: any difference is computation error
        assert value.item() == pytest.approx(fn(s.float(), t.float(), y).item(), rel=1e-5, abs=1e-6)
    # and close to the un-rounded fp32 inputs
    assert fn(s32.half(), t32.half(), y).item() == pytest.approx(fn(s32, t32, y).item(), rel=2e-2, abs=1e-3)


# ---------------------------------------------------------------- feature losses


def test_hint_mse_value_and_shape_error():
    a, b = _logits(2, 3, 4, seed=1), _logits(2, 3, 4, seed=2)
    assert hint_mse(a, b).item() == pytest.approx(((a - b) ** 2).mean().item(), rel=1e-12)
    assert hint_mse(a, a.clone()).item() == 0.0
    with pytest.raises(ValueError, match=r"\(2, 3, 4\).*\(2, 5, 4\)"):
        hint_mse(a, _logits(2, 5, 4))


def test_attention_map_matches_definition():
    feat = _logits(2, 3, 4, 5, seed=1)
    for p in (1, 2, 3):
        raw = np.abs(feat.numpy()) ** p
        amap = raw.mean(axis=1).reshape(2, -1)
        expected = amap / np.linalg.norm(amap, axis=1, keepdims=True)
        np.testing.assert_allclose(attention_map(feat, p=p).numpy(), expected, rtol=1e-12)
    tokens = _logits(2, 6, 8, seed=2)  # (N, L, D): one value per token
    amap = (tokens.numpy() ** 2).mean(axis=2)
    np.testing.assert_allclose(
        attention_map(tokens).numpy(), amap / np.linalg.norm(amap, axis=1, keepdims=True), rtol=1e-12
    )


def test_attention_transfer_identical_zero_and_scale_invariant():
    s, t = _logits(2, 4, 6, 6, seed=1), _logits(2, 8, 6, 6, seed=2)  # channel counts may differ
    assert attention_transfer(s, s.clone()).item() == 0.0
    base = attention_transfer(s, t).item()
    assert base > 1e-4
    assert attention_transfer(7.5 * s, t).item() == pytest.approx(base, rel=1e-10)
    assert attention_transfer(s, 0.01 * t).item() == pytest.approx(base, rel=1e-10)
    tokens_s, tokens_t = _logits(2, 5, 3, seed=3), _logits(2, 5, 7, seed=4)
    assert attention_transfer(tokens_s, tokens_s * 3).item() == pytest.approx(0.0, abs=1e-15)
    assert attention_transfer(tokens_s, tokens_t).item() > 1e-4


def test_attention_transfer_pools_the_larger_map():
    s, t = _logits(2, 3, 8, 8, seed=1), _logits(2, 5, 4, 4, seed=2)
    # independent reference: 8x8 -> 4x4 by 2x2 average pooling of mean_c F^2, then L2-normalise
    s_map = F.avg_pool2d((s**2).mean(1, keepdim=True), 2).flatten(1)
    t_map = (t**2).mean(1).flatten(1)
    expected = (s_map / s_map.norm(dim=1, keepdim=True) - t_map / t_map.norm(dim=1, keepdim=True)).pow(2).mean()
    assert attention_transfer(s, t).item() == pytest.approx(expected.item(), rel=1e-10)
    assert attention_transfer(t, s).item() == pytest.approx(expected.item(), rel=1e-10)
    # tokens: L = 6 vs 3, pooled pairwise
    a, b = _logits(2, 6, 4, seed=3), _logits(2, 3, 4, seed=4)
    a_map = (a**2).mean(2).reshape(2, 3, 2).mean(2)
    b_map = (b**2).mean(2)
    expected = (a_map / a_map.norm(dim=1, keepdim=True) - b_map / b_map.norm(dim=1, keepdim=True)).pow(2).mean()
    assert attention_transfer(a, b).item() == pytest.approx(expected.item(), rel=1e-10)


def test_attention_transfer_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="batch"):
        attention_transfer(_logits(2, 3, 4, 4), _logits(3, 3, 4, 4))
    with pytest.raises(ValueError):
        attention_transfer(_logits(2, 3, 4, 4), _logits(2, 3, 4))


# ---------------------------------------------------------------- registry


def test_available_lists_every_logit_loss_with_its_summary():
    listed = losses.available()
    # the others are tested in tests/test_losses_taid_sinkhorn.py, test_lm_losses.py, test_multilabel.py, test_method_dhkd.py
    assert list(listed) == ALL_NAMES + ["taid", "sinkhorn", "skew_kl", "skew_reverse_kl", "uld", "swing", "binary_kd",
                                        "binary_kl", "binary_kl_norm"]
    assert listed["kd"].startswith("Classic knowledge distillation")
    assert all(summary for summary in listed.values())


def test_needs_targets():
    assert {n for n in ALL_NAMES if losses.needs_targets(n)} == {"ce", "dkd", "nkd"}
    with pytest.raises(ValueError, match="available"):
        losses.needs_targets("nope")


def test_get_binds_params():
    s, t = _logits(3, 4, seed=1), _logits(3, 4, seed=2)
    y = _targets(3, num_classes=4)
    assert losses.get("kd", temperature=2.0)(s, t).item() == kd(s, t, temperature=2.0).item()
    assert losses.get("dkd", beta=2.0)(s, t, y).item() == dkd(s, t, y, beta=2.0).item()
    assert losses.get("jsd", beta=0.3, scaled=True)(s, t).item() == jsd(s, t, beta=0.3, scaled=True).item()


def test_get_unknown_param_lists_allowed_params_with_defaults():
    with pytest.raises(ValueError) as info:
        losses.get("dkd", gamma=2.0)
    message = str(info.value)
    assert "gamma" in message
    assert "alpha=1.0" in message and "beta=8.0" in message and "temperature=4.0" in message
    assert isinstance(info.value, ConfigError)


def test_get_unknown_name_lists_available():
    with pytest.raises(ValueError, match="kd.*jsd.*bdkd"):
        losses.get("kl_divergence")


@pytest.mark.parametrize(
    "name,params",
    [("kd", {"temperature": 0}), ("kd", {"temperature": "4"}), ("jsd", {"beta": 1.5}),
     ("dkd", {"alpha": -1.0}), ("nkd", {"gamma": float("nan")}), ("jsd", {"scaled": 1})],
)
def test_get_rejects_bad_values(name, params):
    with pytest.raises(ValueError, match=next(iter(params))):
        losses.get(name, **params)


@pytest.mark.parametrize("name", ["ce", "dkd", "nkd"])
def test_losses_needing_targets_raise_without_them(name):
    fn = losses.get(name)
    with pytest.raises(ValueError, match="targets"):
        fn(_logits(2, 3), _logits(2, 3))


def test_input_validation():
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)"):
        kd(_logits(2, 3), _logits(2, 4))
    with pytest.raises(ValueError, match="must be in"):
        dkd(_logits(2, 3), _logits(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="leading shape"):
        nkd(_logits(2, 3), _logits(2, 3), torch.tensor([0, 1, 2]))
