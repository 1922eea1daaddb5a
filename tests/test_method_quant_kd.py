"""Quantised distillation (Polino et al. 2018): the quantiser against the paper's formula (levels,
per-bucket scaling, <= 2^b values per bucket), the straight-through gradient, the points' gradient
against a hand-computed sum, bit packing, the export/loader round trip (same logits as the
fake-quantised student), and digits runs: the reported accuracy is the quantised model's, learned
points move, an interrupted run resumes to the same weights."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torch.nn.utils import parametrize

from conftest import interrupt_then_resume, same_weights, tiny_cfg
from distillery import methods
from distillery.config import DataConfig, ModelSpec
from distillery.data import load_data
from distillery.engine.trainer import evaluate
from distillery.losses import quant as Q
from distillery.methods.quant_kd import load_quantized
from distillery.models import build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------- the quantiser


@pytest.mark.parametrize("bits,bucket", [(2, 4), (3, 7), (4, 256), (8, 5)])
def test_fake_quantize_is_the_papers_uniform_quantiser(bits, bucket):
    g = torch.Generator().manual_seed(bits)
    v = torch.randn(5, 9, generator=g, dtype=torch.float64)  # 45 values: the last bucket is short
    q = Q.fake_quantize(v, Q.uniform_points(bits, torch.float64), bucket)
    torch.testing.assert_close(q, Q.uniform_quantize_reference(v, bits, bucket))
    for row, orig in zip(Q.buckets(q, bucket), Q.buckets(v, bucket)):
        assert row.unique().numel() <= 2 ** bits
        # min and max of every bucket are levels: they come back exactly
        assert row.min().item() == pytest.approx(orig.min().item(), abs=1e-12)
        assert row.max().item() == pytest.approx(orig.max().item(), abs=1e-12)
        # the error is at most half a step alpha / (2 s)
        step = (orig.max() - orig.min()) / (2 ** bits - 1)
        assert float((row - orig).abs().max()) <= float(step) / 2 + 1e-12


def test_quantiser_by_hand_and_ties_round_down():
    # one bucket [0, 1, 0.5, 0.25, 0.2] with 2 bits: levels {0, 1/3, 2/3, 1}
    v = torch.tensor([0.0, 1.0, 0.5, 0.25, 0.1], dtype=torch.float64)
    q = Q.fake_quantize(v, Q.uniform_points(2, torch.float64), 8)
    torch.testing.assert_close(q, torch.tensor([0.0, 1.0, 1 / 3, 1 / 3, 0.0], dtype=torch.float64))  # 0.5 * 3 = 1.5: tie -> down
    # scaling: [-2, 2] maps to levels {-2, -2/3, 2/3, 2}; a constant bucket comes back as it is
    w = torch.tensor([-2.0, 2.0, 0.1, -0.9], dtype=torch.float64)
    torch.testing.assert_close(Q.fake_quantize(w, Q.uniform_points(2, torch.float64), 4),
                               torch.tensor([-2.0, 2.0, 2 / 3, -2 / 3], dtype=torch.float64))
    c = torch.full((6,), 0.37, dtype=torch.float64)
    torch.testing.assert_close(Q.fake_quantize(c, Q.uniform_points(3, torch.float64), 4), c)


def test_straight_through_gradient_is_the_identity():
    g = torch.Generator().manual_seed(1)
    v = torch.randn(40, generator=g, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(40, generator=g, dtype=torch.float64)
    (Q.fake_quantize(v, Q.uniform_points(2, torch.float64), 16) * upstream).sum().backward()
    torch.testing.assert_close(v.grad, upstream)


def test_points_gradient_is_the_alpha_weighted_sum_and_a_step_moves_them():
    g = torch.Generator().manual_seed(2)
    v = torch.randn(30, generator=g, dtype=torch.float64)
    c = torch.randn(30, generator=g, dtype=torch.float64)
    p = Q.uniform_points(2, torch.float64).requires_grad_()
    loss = (Q.fake_quantize(v, p, 10) * c).sum()  # dL/dQ_i = c_i
    loss.backward()
    codes, alpha, _ = Q.quantize(v, p, 10)
    expected = torch.zeros(4, dtype=torch.float64)
    for i in range(30):
        expected[codes.reshape(-1)[i]] += alpha.reshape(-1)[i // 10] * c[i]
    torch.testing.assert_close(p.grad, expected)
    # one SGD step on the points changes the quantised weights by alpha * delta p (assignment fixed)
    with torch.no_grad():
        p2 = p - 1e-3 * p.grad
    q1, q2 = Q.fake_quantize(v, p.detach(), 10), Q.fake_quantize(v, p2, 10)
    codes2, _, _ = Q.quantize(v, p2, 10)
    assert torch.equal(codes2, codes)
    torch.testing.assert_close(q2 - q1, (alpha * (p2 - p.detach())[codes]).reshape(-1))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 7, 8])
def test_pack_and_unpack_codes(bits):
    codes = torch.randint(0, 2 ** bits, (101,), generator=torch.Generator().manual_seed(bits))
    packed = Q.pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-101 * bits // 8)
    assert torch.equal(Q.unpack_codes(packed, bits, 101), codes)
    with pytest.raises(ValueError, match=r"\[0, "):
        Q.pack_codes(torch.tensor([2 ** bits]), bits)


# ----------------------------------------------------------------------------- the method


def _student(**params):
    torch.manual_seed(0)
    student = build_model(ModelSpec(arch="mlp", kwargs={"hidden": [16]}), in_channels=1, num_classes=10, input_size=(8, 8))
    spec = methods.get_spec("quant_kd")
    m = spec.cls(spec.validate_params(params), student=student, teacher_layers=None, num_classes=10)
    return m, student


def test_attached_student_computes_with_quantised_weights_and_exports_losslessly(tmp_path):
    m, student = _student(bits=3, bucket_size=50)
    x = torch.randn(7, 1, 8, 8)
    shadow = {k: v.detach().clone() for k, v in student.state_dict().items() if k.endswith("original")}
    assert set(shadow) == {"layers.0.0.parametrizations.weight.original", "head.parametrizations.weight.original"}
    w1 = Q.uniform_quantize_reference(shadow["layers.0.0.parametrizations.weight.original"], 3, 50)
    w2 = Q.uniform_quantize_reference(shadow["head.parametrizations.weight.original"], 3, 50)
    h = F.relu(F.linear(x.flatten(1), w1, student.layers[0][0].bias))
    torch.testing.assert_close(student(x), F.linear(h, w2, student.head.bias))
    logits = student(x).detach()

    m.on_train_end(tmp_path)
    assert not parametrize.is_parametrized(student.head)  # plain weights, holding the quantised values
    assert set(student.state_dict()) == {"layers.0.0.weight", "layers.0.0.bias", "head.weight", "head.bias"}
    assert torch.equal(student(x), logits)
    fresh = build_model(ModelSpec(arch="mlp", kwargs={"hidden": [16]}), in_channels=1, num_classes=10, input_size=(8, 8))
    assert torch.equal(load_quantized(tmp_path / "student-quantized.safetensors", fresh)(x), logits)

    # size: 64*16 + 16*10 = 1184 weights at 3 bits (384 + 60 bytes, padding not stored); 21 + 4 buckets of alpha, beta; 8 points
    # per layer; 26 biases -- all float32 except the codes
    info = json.loads((tmp_path / "student-quantized.json").read_text())
    stored = (-(-1024 * 3 // 8)) + (-(-160 * 3 // 8)) + (21 + 4) * 2 * 4 + 2 * 8 * 4 + 26 * 4
    assert info["stored_bytes"] == stored and info["float32_bytes"] == (1184 + 26) * 4
    assert info["compression"] == pytest.approx((1184 + 26) * 4 / stored)
    stored_keys = load_file(str(tmp_path / "student-quantized.safetensors"))
    assert stored_keys["head.weight.codes"].dtype == torch.uint8


def test_points_are_parameters_only_when_learned_and_points_only_freezes_the_weights():
    _, student = _student()
    assert not any("points" in name for name, _ in student.named_parameters())
    _, student = _student(learn_points=True, points_only=True)
    trainable = {name for name, p in student.named_parameters() if p.requires_grad}
    assert trainable == {"layers.0.0.parametrizations.weight.0.points", "head.parametrizations.weight.0.points"}
    spec = methods.get_spec("quant_kd")
    with pytest.raises(ValueError, match="learn_points: true"):
        spec.validate_params({"points_only": True})
    with pytest.raises(ValueError, match="bits"):
        spec.validate_params({"bits": 9})
    with pytest.raises(ValueError, match="nn.Linear / nn.Conv"):
        spec.cls(spec.validate_params({}), student=nn.Sequential(nn.Flatten(), nn.ReLU()), teacher_layers=None, num_classes=10)


@pytest.fixture(scope="module")
def teacher():
    data = load_data(DataConfig(name="digits"))
    torch.manual_seed(0)
    t = build_model(ModelSpec(arch="mlp", kwargs={"hidden": [64]}), in_channels=1, num_classes=10, input_size=(8, 8))
    opt = torch.optim.Adam(t.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(t(data.train.inputs), data.train.labels).backward()
        opt.step()
    return t.eval().requires_grad_(False)


def test_quant_kd_on_digits_reports_the_quantised_model_and_resumes(tmp_path, monkeypatch, teacher):
    from distillery.engine import fit

    common = dict(teacher={"model": {"arch": "mlp", "kwargs": {"hidden": [64]}}},
                  method={"name": "quant_kd", "params": {"bits": 2, "bucket_size": 64, "learn_points": True}},
                  train={"epochs": 2, "progress": False, "report": False, "checkpoint_every": 15})
    full = fit(tiny_cfg(tmp_path / "a", **common), teacher=teacher)
    assert full.summary["test_accuracy"] > 0.5  # chance is 0.1
    run = full.run_dir
    # the engine's test accuracy is that of the model rebuilt from the 2-bit file
    spec = ModelSpec(arch="mlp", kwargs={"hidden": [32]})
    rebuilt = load_quantized(run / "student-quantized.safetensors",
                             build_model(spec, in_channels=1, num_classes=10, input_size=(8, 8)))
    data = load_data(DataConfig(name="digits"))
    assert evaluate(rebuilt, data.test, "cpu")["accuracy"] == full.summary["test_accuracy"]
    # model.safetensors: plain keys, each weight with at most 4 values per bucket of 64
    saved = load_file(str(run / "model.safetensors"))
    assert set(saved) == {"layers.0.0.weight", "layers.0.0.bias", "head.weight", "head.bias"}
    assert all(row.unique().numel() <= 4 for row in Q.buckets(saved["head.weight"], 64))
    # differentiable quantisation: the points moved away from the uniform levels
    points = load_file(str(run / "student-quantized.safetensors"))["head.weight.points"]
    assert not torch.allclose(points, Q.uniform_points(2), atol=1e-4)
    info = json.loads((run / "student-quantized.json").read_text())
    assert info["bits"] == [2] and info["compression"] > 5

    import distillery.engine.trainer as trainer

    monkeypatch.setattr(trainer, "load_teacher", lambda *a, **k: teacher)
    resumed = interrupt_then_resume(tiny_cfg(tmp_path / "b", **common), monkeypatch, at_step=30)
    assert same_weights(full, resumed)
