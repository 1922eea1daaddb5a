"""Swing distillation: privacy score, temperature map, Laplace noise and the loss against hand
values and limits; the stop-gradient on the temperatures; the method's seeded noise; a short run."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_cfg
from distillery import methods
from distillery.engine import fit
from distillery.losses.logits import cross_entropy, kd
from distillery.losses.swing import laplace_noise, noisy_soft_targets, swing_kd, swing_privacy_score, swing_temperature
from distillery.methods.base import ModelOutput, Progress
from distillery.methods.swing import Swing

pytestmark = pytest.mark.usefixtures("one_torch_thread")

D = torch.float64


def _logits(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D) * scale


# --------------------------------------------------------------------------- pieces


def test_privacy_score_hand_values_and_range():
    # teacher (3/4, 1/4) vs student (1/2, 1/2): TV = 1/4; identical: 0; disjoint (one-hot apart): ~1
    t = torch.tensor([[math.log(3.0), 0.0], [1.0, 2.0], [60.0, 0.0]], dtype=D)
    s = torch.tensor([[0.0, 0.0], [1.0, 2.0], [0.0, 60.0]], dtype=D)
    gap = swing_privacy_score(s, t, relative=False)
    torch.testing.assert_close(gap, torch.tensor([0.25, 0.0, 1.0], dtype=D), atol=1e-12, rtol=0)
    assert not gap.requires_grad
    # relative to the batch median 0.25: (d - 0.25) / 0.75, clamped at 0
    torch.testing.assert_close(swing_privacy_score(s, t), torch.tensor([0.0, 0.0, 1.0], dtype=D), atol=1e-12, rtol=0)
    many = swing_privacy_score(_logits(2, 3, 7, seed=1, scale=4), _logits(2, 3, 7, seed=2, scale=4))
    assert many.shape == (2, 3) and bool(((many >= 0) & (many <= 1)).all())
    assert (many == 0).sum() >= 3  # at least the lower half of the batch is not private


def test_relative_score_by_hand_with_an_even_batch():
    # gaps 0.1, 0.2, 0.6, 1.0 (two classes: TV = |p_T,0 - p_S,0|); torch's median of an even count
    # is the lower middle value, 0.2
    p_t = torch.tensor([0.6, 0.7, 0.9, 1.0], dtype=D)
    p_s = torch.tensor([0.5, 0.5, 0.3, 0.0], dtype=D)

    def logits(p):
        return torch.stack([p.clamp(min=1e-300).log(), (1 - p).clamp(min=1e-300).log()], -1)

    score = swing_privacy_score(logits(p_s), logits(p_t))
    torch.testing.assert_close(score, torch.tensor([0.0, 0.0, 0.5, 1.0], dtype=D), atol=1e-12, rtol=0)


def test_temperature_map_is_linear_between_the_bounds():
    pi = torch.tensor([0.0, 0.25, 1.0])
    torch.testing.assert_close(swing_temperature(pi, t_min=2.0, t_max=10.0), torch.tensor([2.0, 4.0, 10.0]))
    torch.testing.assert_close(swing_temperature(pi, t_min=3.0, t_max=3.0), torch.full((3,), 3.0))
    with pytest.raises(ValueError, match="t_max"):
        swing_temperature(pi, t_min=4.0, t_max=2.0)


def test_laplace_noise_moments_and_seeding():
    g = torch.Generator().manual_seed(0)
    x = laplace_noise((200_000,), 0.3, generator=g, dtype=D)
    # Laplace(0, b): mean 0, E|X| = b, Var = 2 b^2, P(X > b) = exp(-1) / 2
    assert abs(x.mean().item()) < 0.005
    assert x.abs().mean().item() == pytest.approx(0.3, rel=0.01)
    assert x.var().item() == pytest.approx(2 * 0.09, rel=0.02)
    assert (x > 0.3).double().mean().item() == pytest.approx(math.exp(-1) / 2, abs=0.005)
    a = laplace_noise((5,), 1.0, generator=torch.Generator().manual_seed(7))
    b = laplace_noise((5,), 1.0, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and torch.equal(laplace_noise((3,), 0.0), torch.zeros(3))


def test_noisy_targets_are_distributions_and_exact_without_noise():
    z = _logits(4, 6, seed=3, scale=3.0)
    temps = torch.tensor([1.0, 2.0, 4.0, 8.0], dtype=D)
    exact = noisy_soft_targets(z, temps)
    torch.testing.assert_close(exact, torch.softmax(z / temps[:, None], -1))
    noisy = noisy_soft_targets(z, temps, noise_scale=0.2, generator=torch.Generator().manual_seed(1))
    assert bool((noisy >= 0).all()) and torch.allclose(noisy.sum(-1), torch.ones(4, dtype=D))
    assert not torch.allclose(noisy, exact)
    # huge noise: rows whose entries all clamp to 0 fall back to uniform, never NaN
    wild = noisy_soft_targets(z, 1.0, noise_scale=1e6, generator=torch.Generator().manual_seed(2))
    assert torch.isfinite(wild).all() and torch.allclose(wild.sum(-1), torch.ones(4, dtype=D))


def test_noise_is_unbiased_before_clamping_effects():
    """Averaged over many draws, small noise on a non-degenerate target reproduces the target:
    the noise hides individual releases, not the expectation."""
    z = torch.tensor([[0.5, 0.0, -0.5, 0.2]], dtype=D).expand(50_000, 4)
    mean = noisy_soft_targets(z, 1.0, noise_scale=0.02, generator=torch.Generator().manual_seed(3)).mean(0)
    torch.testing.assert_close(mean, torch.softmax(z[0], -1), atol=2e-3, rtol=0)


# --------------------------------------------------------------------------- the loss


def test_equal_temperature_bounds_without_noise_is_hinton_kd():
    s, t = _logits(3, 4, 6, seed=4, scale=2.0), _logits(3, 4, 6, seed=5, scale=3.0)
    y = torch.tensor([[0, 1, -100, 2], [3, 4, 5, 0], [-100, 1, 2, 3]])
    for temp in (1.0, 4.0):
        assert swing_kd(s, t, y, t_min=temp, t_max=temp).item() == pytest.approx(kd(s, t, y, temperature=temp).item(), rel=1e-12)


def test_per_sample_temperature_hand_value():
    """Row i: t_min^2 * KL(softmax(t_i / T_i) || softmax(s_i / T_i)), with T_i from the TV gap."""
    s = torch.tensor([[0.0, 0.0], [2.0, 0.0]], dtype=D)
    t = torch.tensor([[math.log(3.0), 0.0], [2.0, 0.0]], dtype=D)
    # row 0: TV = 1/4 -> T = 2 + (10 - 2) / 4 = 4; row 1: identical -> T = 2, KL = 0
    # (relative score: the median of two gaps is the lower one, 0, so pi equals the gap here)
    p = torch.softmax(t[0] / 4.0, -1)
    q = torch.tensor([0.5, 0.5], dtype=D)
    expected = 2.0**2 * (p * (p / q).log()).sum().item() / 2
    assert swing_kd(s, t, t_min=2.0, t_max=10.0).item() == pytest.approx(expected, rel=1e-12)
    # an explicit temperature tensor overrides the estimate
    override = swing_kd(s, t, t_min=2.0, t_max=10.0, temperature=torch.tensor([2.0, 2.0], dtype=D))
    assert override.item() == pytest.approx(kd(s, t, temperature=2.0).item(), rel=1e-12)
    with pytest.raises(ValueError, match="> 0"):
        swing_kd(s, t, temperature=torch.tensor([2.0, 0.0], dtype=D))
    with pytest.raises(ValueError, match="leading shape"):
        swing_kd(s, t, temperature=torch.tensor([2.0], dtype=D))


def test_the_sample_that_stands_out_gets_the_high_temperature_and_a_weaker_signal():
    """The point of the swing: in a batch where the student agrees with the teacher, the one
    sample it disagrees with (a memorised canary) is transferred at a high temperature and
    moves the student less than plain KD at t_min would move it."""
    t = _logits(8, 4, seed=20, scale=2.0)
    s = t + _logits(8, 4, seed=21, scale=0.1)  # student close to the teacher ...
    t[5] = torch.tensor([8.0, 0.0, 0.0, 0.0], dtype=D)  # ... except on row 5
    s[5] = torch.tensor([0.0, 3.0, 0.0, 0.0], dtype=D)
    s.requires_grad_()
    temps = swing_temperature(swing_privacy_score(s, t), t_min=2.0, t_max=20.0)
    assert temps[5] > 19.0 and int((temps <= 2.0 + 1e-9).sum()) >= 4
    (g_swing,) = torch.autograd.grad(swing_kd(s, t, t_min=2.0, t_max=20.0), [s])
    (g_kd,) = torch.autograd.grad(swing_kd(s, t, t_min=2.0, t_max=2.0), [s])
    assert g_swing[5].norm() < 0.2 * g_kd[5].norm()
    # absolute gaps: a lone sample is scored by its own gap
    assert swing_privacy_score(s[5:6], t[5:6], relative=False).item() > 0.9


def test_ignored_positions_do_not_enter_the_batch_median():
    s, t = _logits(6, 4, seed=22, scale=2.0), _logits(6, 4, seed=23, scale=2.0)
    y = torch.tensor([0, -100, 1, 2, -100, 3])
    keep = y != -100
    assert swing_kd(s, t, y).item() == pytest.approx(swing_kd(s[keep], t[keep], y[keep]).item(), rel=1e-12)


def test_invariant_to_shifting_logits():
    s, t = _logits(5, 4, seed=6), _logits(5, 4, seed=7, scale=2.0)
    shift_s, shift_t = _logits(5, 1, seed=8, scale=10.0), _logits(5, 1, seed=9, scale=10.0)
    a = swing_kd(s, t, t_min=2.0, t_max=8.0)
    assert swing_kd(s + shift_s, t + shift_t, t_min=2.0, t_max=8.0).item() == pytest.approx(a.item(), rel=1e-10)


def test_gradcheck_with_fixed_temperatures_and_the_stop_gradient_on_estimated_ones():
    s = _logits(3, 4, seed=10).requires_grad_()
    t = _logits(3, 4, seed=11, scale=2.0).requires_grad_()
    temps = torch.tensor([1.5, 3.0, 6.0], dtype=D)
    assert torch.autograd.gradcheck(lambda a, b: swing_kd(a, b, t_min=2.0, temperature=temps), (s, t))
    # The estimated temperatures are detached: autograd differs from finite differences of the
    # full function (which also move T_i), but equals the gradient with T_i frozen at its value.
    frozen = swing_temperature(swing_privacy_score(s, t), t_min=2.0, t_max=8.0)
    (auto,) = torch.autograd.grad(swing_kd(s, t, t_min=2.0, t_max=8.0), [s])
    (fixed,) = torch.autograd.grad(swing_kd(s, t, t_min=2.0, temperature=frozen), [s])
    torch.testing.assert_close(auto, fixed)
    assert not torch.autograd.gradcheck(lambda a: swing_kd(a, t.detach(), t_min=2.0, t_max=8.0), (s,),
                                        raise_exception=False)


def test_noisy_loss_is_finite_with_finite_gradients():
    s = _logits(16, 5, seed=12).requires_grad_()
    t = _logits(16, 5, seed=13, scale=4.0).requires_grad_()
    loss = swing_kd(s, t, noise_scale=0.3, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all() and torch.isfinite(t.grad).all()


# --------------------------------------------------------------------------- the method


def _method(**params):
    spec = methods.get_spec("swing")
    return Swing(spec.validate_params(params), student=torch.nn.Identity(), teacher_layers=None, num_classes=5)


def test_method_terms_and_seeded_noise():
    s, t, y = _logits(6, 5, seed=14, scale=2.0), _logits(6, 5, seed=15, scale=3.0), torch.tensor([0, 1, 2, 3, 4, 0])
    m = _method(alpha=0.8, noise_scale=0.1, seed=3, t_min=3.0, t_max=9.0)
    terms = m(ModelOutput(s), ModelOutput(t), y, Progress(0.5, 7, 100))
    g = torch.Generator().manual_seed(3 * 2**32 + 7)
    expected = 0.8 * swing_kd(s, t, t_min=3.0, t_max=9.0, noise_scale=0.1, generator=g)
    assert terms["swing"].item() == pytest.approx(expected.item(), rel=1e-12)
    assert terms["ce"].item() == pytest.approx(0.2 * cross_entropy(s, None, y).item(), rel=1e-12)
    again = m(ModelOutput(s), ModelOutput(t), y, Progress(0.5, 7, 100))["swing"]
    other_step = m(ModelOutput(s), ModelOutput(t), y, Progress(0.5, 8, 100))["swing"]
    assert again.item() == terms["swing"].item() and other_step.item() != terms["swing"].item()
    assert set(_method(alpha=1.0)(ModelOutput(s), ModelOutput(t), y, Progress(0.5, 7, 100))) == {"swing"}
    with pytest.raises(ValueError, match="t_max"):
        methods.get_spec("swing").validate_params({"t_min": 5.0, "t_max": 2.0})


def test_distillation_run_on_digits_logs_the_swing_term(tmp_path):
    teacher = fit(tiny_cfg(tmp_path / "t", name="teacher", student={"arch": "cnn", "kwargs": {"width": 8}},
                           train={"epochs": 2, "progress": False, "report": False}))
    res = fit(tiny_cfg(tmp_path, teacher={"run": str(teacher.run_dir)}, student={"arch": "cnn", "kwargs": {"width": 4}},
                       method={"name": "swing"},
                       train={"epochs": 2, "progress": False, "report": False}))
    rows = [json.loads(line) for line in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["train_swing"] > 0 and r["train_ce"] > 0 for r in rows)
    assert res.summary["test_accuracy"] > 0.3
