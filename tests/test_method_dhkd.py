"""Dual-Head KD: BinaryKL / BinaryKL-Norm against hand values, their invariances, gradients, the
auxiliary head's isolation from the main head, and a short distillation run."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_cfg
from distillery import methods
from distillery.engine import evaluate, fit
from distillery.losses.dhkd import binary_kl, binary_kl_norm
from distillery.losses.logits import kd
from distillery.methods.base import ModelOutput, Progress
from distillery.models.zoo import cnn
from distillery.taps import Taps

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _logits(*shape, seed=0, scale=2.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


# --------------------------------------------------------------------------- the losses


def test_binary_kl_hand_value():
    # T = 1, one class: p_t = sigmoid(log 3) = 3/4, p_s = sigmoid(0) = 1/2.
    s, t = torch.tensor([[0.0]], dtype=torch.float64), torch.tensor([[math.log(3.0)]], dtype=torch.float64)
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert binary_kl(s, t, temperature=1.0).item() == pytest.approx(expected, rel=1e-12)
    # Temperature: logits divided by T, result times T^2; classes summed, positions averaged.
    s2 = torch.tensor([[0.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    t2 = torch.tensor([[2 * math.log(3.0), 0.0], [0.0, 2 * math.log(3.0)]], dtype=torch.float64)
    assert binary_kl(s2, t2, temperature=2.0).item() == pytest.approx(4 * expected, rel=1e-12)


def test_binary_kl_norm_is_log_cosh_of_half_the_gap():
    s = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64)
    t = torch.tensor([[-1.0, 1.0, 0.5]], dtype=torch.float64)
    T = 2.0
    # direct definition: KL(Bern(1/2) || Bern(q)), q = sigmoid((s - t) / T), summed, times T^2
    q = torch.sigmoid((s - t) / T)
    direct = (0.5 * torch.log(0.5 / q) + 0.5 * torch.log(0.5 / (1 - q))).sum() * T**2
    closed = sum(math.log(math.cosh(d / (2 * T))) for d in (2.0, -3.0, 0.0)) * T**2
    got = binary_kl_norm(s, t, temperature=T)
    assert got.item() == pytest.approx(direct.item(), rel=1e-12)
    assert got.item() == pytest.approx(closed, rel=1e-12)


@pytest.mark.parametrize("loss", [binary_kl, binary_kl_norm])
def test_zero_iff_equal_and_positive_otherwise(loss):
    z = _logits(3, 5, seed=1)
    assert loss(z, z).item() == pytest.approx(0.0, abs=1e-12)
    assert loss(z + 0.1 * _logits(3, 5, seed=2), z).item() > 1e-6


def test_logit_level_shift_behaviour():
    """KD cannot see a common shift of the student's logits; these losses can (the paper's
    point). BinaryKL-Norm depends on s - t only, so a shift of both logits changes nothing;
    BinaryKL looks at absolute logits, so it does change."""
    s, t = _logits(4, 6, seed=3), _logits(4, 6, seed=4)
    assert kd(s + 3.0, t).item() == pytest.approx(kd(s, t).item(), rel=1e-10)
    for loss in (binary_kl, binary_kl_norm):
        assert loss(s + 3.0, t).item() != pytest.approx(loss(s, t).item(), rel=1e-3)
    assert binary_kl_norm(s + 3.0, t + 3.0).item() == pytest.approx(binary_kl_norm(s, t).item(), rel=1e-10)
    assert binary_kl(s + 3.0, t + 3.0).item() != pytest.approx(binary_kl(s, t).item(), rel=1e-3)


@pytest.mark.parametrize("loss", [binary_kl, binary_kl_norm])
def test_gradcheck_float64(loss):
    s = _logits(3, 4, seed=5).requires_grad_()
    t = _logits(3, 4, seed=6).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: loss(a, b, temperature=1.5), (s, t))


def test_norm_gradient_is_bounded_and_saturated_logits_stay_finite():
    # d/ds of T^2 log cosh((s - t)/(2T)) = (T/2) tanh(.) : at most T/2 per logit (per position).
    s = torch.tensor([[1e4, -1e4, 0.0]], dtype=torch.float32, requires_grad=True)
    t = torch.tensor([[-1e4, 1e4, 0.0]], dtype=torch.float32)
    for loss in (binary_kl, binary_kl_norm):
        value = loss(s, t, temperature=2.0)
        (grad,) = torch.autograd.grad(value, s)
        assert torch.isfinite(value) and torch.isfinite(grad).all()
    (grad,) = torch.autograd.grad(binary_kl_norm(s, t, temperature=2.0), s)
    torch.testing.assert_close(grad, torch.tensor([[1.0, -1.0, 0.0]]))  # T/2 * sign, 0 where equal


@pytest.mark.parametrize("loss", [binary_kl, binary_kl_norm])
def test_leading_dims_and_ignore_index(loss):
    s, t = _logits(2, 3, 4, seed=7), _logits(2, 3, 4, seed=8)
    targets = torch.tensor([[0, -100, 2], [-100, 1, 3]])
    keep = targets != -100
    assert loss(s, t, targets).item() == pytest.approx(loss(s[keep], t[keep]).item(), rel=1e-12)
    assert loss(s, t).item() == pytest.approx(loss(s.reshape(6, 4), t.reshape(6, 4)).item(), rel=1e-12)


def test_rejects_bad_inputs():
    z = _logits(2, 3)
    with pytest.raises(ValueError, match="same shape"):
        binary_kl_norm(z, _logits(2, 4))
    with pytest.raises(ValueError, match="temperature"):
        binary_kl(z, z, temperature=0.0)


# --------------------------------------------------------------------------- the method


def _method(**params):
    spec = methods.get_spec("dhkd")
    student = cnn(1, 10, (8, 8), width=4)
    method = spec.cls(spec.validate_params(params), student=student, teacher_layers=None, num_classes=10)
    return student, method


def _step(student, method, x):
    with Taps(student, method.student_taps) as taps:
        logits = student(x)
        return ModelOutput(logits, taps.collect(), x)


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_aux_head_is_owned_trained_and_isolated_from_main_head(head):
    torch.manual_seed(0)
    student, method = _method(aux_head=head)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    teacher = ModelOutput(torch.randn(8, 10) * 3)
    with torch.no_grad():
        method.setup(_step(student, method, x), teacher)
    assert method.student_taps == ["head:input"]
    # owned by the method: in its parameters (so the engine's optimiser gets it) and state dict
    assert any(k.startswith("aux_head.") for k in method.state_dict())
    assert {id(p) for p in method.aux_head.parameters()} <= {id(p) for p in method.parameters()}
    assert not any("aux" in k for k in student.state_dict())

    terms = method(_step(student, method, x), teacher, y, Progress(0.0, 0, 10))
    assert set(terms) == {"ce", "binary_kl_norm"}
    backbone = student.features[0][0].weight
    # the KD term reaches the backbone and the auxiliary head, never the main head ...
    g = torch.autograd.grad(terms["binary_kl_norm"], [backbone, student.head.weight, *method.aux_head.parameters()],
                            retain_graph=True, allow_unused=True)
    assert g[0].abs().sum() > 0 and g[1] is None and all(gi.abs().sum() > 0 for gi in g[2:])
    # ... and the label CE reaches the backbone and the main head, never the auxiliary head
    g = torch.autograd.grad(terms["ce"], [backbone, student.head.weight, *method.aux_head.parameters()],
                            allow_unused=True)
    assert g[0].abs().sum() > 0 and g[1].abs().sum() > 0 and all(gi is None for gi in g[2:])


def test_inference_uses_the_main_head_only():
    torch.manual_seed(1)
    student, method = _method()
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        method.setup(_step(student, method, x), None)
        student.eval()
        before = student(x)
        method.aux_head.weight.normal_().mul_(100)
        torch.testing.assert_close(student(x), before, rtol=0, atol=0)


def test_weights_and_loss_choice():
    torch.manual_seed(2)
    student, method = _method(aux_loss="binary_kl", aux_weight=0.5, ce_weight=2.0, temperature=3.0)
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    t = torch.randn(6, 10)
    with torch.no_grad():
        method.setup(_step(student, method, x), None)
        out = _step(student, method, x)
        terms = method(out, ModelOutput(t), y, Progress(0.0, 0, 10))
        aux = method.aux_head(out.features["head:input"])
    assert set(terms) == {"ce", "binary_kl"}
    assert terms["binary_kl"].item() == pytest.approx(0.5 * binary_kl(aux, t, temperature=3.0).item(), rel=1e-6)
    assert terms["ce"].item() == pytest.approx(2.0 * torch.nn.functional.cross_entropy(out.logits, y).item(), rel=1e-6)
    with pytest.raises(ValueError, match="aux_head"):
        methods.get_spec("dhkd").validate_params({"aux_head": "deep"})


# --------------------------------------------------------------------------- end to end


def test_distillation_run_logs_terms_and_exports_the_student_alone(tmp_path):
    teacher = fit(tiny_cfg(tmp_path / "t", name="teacher", student={"arch": "cnn", "kwargs": {"width": 8}},
                           train={"epochs": 2, "progress": False}))
    cfg = tiny_cfg(tmp_path, teacher={"run": str(teacher.run_dir)}, student={"arch": "cnn", "kwargs": {"width": 4}},
                   method={"name": "dhkd"}, train={"epochs": 2, "progress": False})
    res = fit(cfg)
    rows = [json.loads(line) for line in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all("train_ce" in r and "train_binary_kl_norm" in r for r in rows)
    assert rows[-1]["train_binary_kl_norm"] < rows[0]["train_binary_kl_norm"]  # the aux head learns
    assert res.summary["test_accuracy"] > 0.3
    saved = load_file(str(res.run_dir / "model.safetensors"))
    assert set(saved) == set(res.student.state_dict()) and not any("aux" in k for k in saved)
    from distillery.data import load_data

    acc = evaluate(res.student, load_data(cfg.data).test, "cpu")["accuracy"]
    assert res.summary["test_accuracy"] == pytest.approx(acc)
