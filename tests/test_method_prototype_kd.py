"""Prototype-guided cross-task KD (ProC-KD): losses against their definition, the method's wiring,
and short cross-task fits on digits (teacher knows 0-4, student learns 5-9)."""
import json
import math

import pytest
import torch

from conftest import tiny_cfg
from distillery.engine import fit
from distillery.errors import DistilleryError
from distillery.losses.prototype import (
    prototype_assignment_kd,
    prototype_augment,
    prototype_readout,
    prototype_reconstruction,
    soft_assign,
)
from distillery.methods import get_spec
from distillery.methods.base import ModelOutput, Progress
from distillery.methods.prototype_kd import local_grid

pytestmark = pytest.mark.usefixtures("one_torch_thread")
D = torch.float64
EYE = torch.eye(2, dtype=D)  # two orthonormal prototypes e1, e2


def _softmax2(a, b):
    return math.exp(a) / (math.exp(a) + math.exp(b)), math.exp(b) / (math.exp(a) + math.exp(b))


# ---------------------------------------------------------------------------------------- hand-computed


def test_soft_assign_hand_computed_and_scale_free():
    # x = (3, 4): cosines with e1, e2 are 0.6 and 0.8; tau = 0.5 -> softmax(1.2, 1.6).
    x = torch.tensor([[3.0, 4.0]], dtype=D)
    got = soft_assign(x, EYE, temperature=0.5)
    torch.testing.assert_close(got, torch.tensor([_softmax2(1.2, 1.6)], dtype=D))
    # Cosine similarity: scaling features or prototypes by a positive factor changes nothing.
    torch.testing.assert_close(soft_assign(7 * x, 0.1 * EYE, temperature=0.5), got)
    # A zero feature is equally far from every prototype.
    torch.testing.assert_close(soft_assign(torch.zeros(1, 2, dtype=D), EYE), torch.full((1, 2), 0.5, dtype=D))


def test_reconstruction_hand_computed_and_limits():
    t = torch.tensor([[[3.0, 4.0]]], dtype=D)  # (B=1, N=1, C=2), normalised (0.6, 0.8)
    a1, a2 = _softmax2(0.6, 0.8)  # tau = 1
    expected = (0.6 - a1) ** 2 + (0.8 - a2) ** 2
    assert prototype_reconstruction(t, EYE, temperature=1.0).item() == pytest.approx(expected, rel=1e-12)
    # A feature sitting on a prototype, with a sharp assignment, is rebuilt exactly.
    on = torch.tensor([[[0.0, 5.0], [2.0, 0.0]]], dtype=D)
    assert prototype_reconstruction(on, EYE, temperature=1e-3).item() == pytest.approx(0.0, abs=1e-12)
    # Opposite to the only prototype it can pick: |t - (-t)|^2 = 4, the upper bound.
    protos = torch.tensor([[-1.0, 0.0], [-1.0, 0.0]], dtype=D)
    assert prototype_reconstruction(torch.tensor([[1.0, 0.0]], dtype=D), protos).item() == pytest.approx(4.0)


def test_assignment_kd_hand_computed_zero_and_positive():
    s = torch.tensor([[[0.0, 1.0]]], dtype=D)
    t = torch.tensor([[[2.0, 0.0]]], dtype=D)
    p, q = _softmax2(1.0, 0.0), _softmax2(0.0, 1.0)  # teacher and student assignments, tau = 1
    kl = p[0] * math.log(p[0] / q[0]) + p[1] * math.log(p[1] / q[1])
    assert prototype_assignment_kd(s, t, EYE, temperature=1.0).item() == pytest.approx(kl, rel=1e-12)
    # Same direction (any positive scale): identical assignments, zero loss.
    assert prototype_assignment_kd(5 * t, t, EYE, temperature=0.1).item() == pytest.approx(0.0, abs=1e-12)
    # Mean over positions and batch: a second position with zero KL halves it.
    two_s, two_t = torch.cat([s, t], 1), torch.cat([t, t], 1)
    assert prototype_assignment_kd(two_s, two_t, EYE, temperature=1.0).item() == pytest.approx(kl / 2, rel=1e-12)


def test_augment_hand_computed_and_zero_gate():
    s = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]], dtype=D)  # (B=1, N=2, C=2)
    a = torch.tensor([[[1.0, 0.0], [0.25, 0.75]]], dtype=D)
    protos = torch.tensor([[2.0, 0.0], [0.0, 3.0]], dtype=D)  # normalised: e1, e2
    gate = torch.tensor([[0.5, 1.0]], dtype=D)
    want = torch.tensor([[[1.5, 1.0], [0.125, 0.75]]], dtype=D)
    torch.testing.assert_close(prototype_augment(s, a, protos, gate), want)
    torch.testing.assert_close(prototype_augment(s, a, protos, torch.zeros(1, 2, dtype=D)), s)
    torch.testing.assert_close(prototype_readout(a, protos), torch.tensor([[[1.0, 0.0], [0.25, 0.75]]], dtype=D))


# ---------------------------------------------------------------------------------------- invariances


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D)


def test_prototype_order_and_position_order_do_not_matter():
    s, t, protos = _rand(3, 5, 4, seed=0), _rand(3, 5, 4, seed=1), _rand(6, 4, seed=2)
    perm_k = torch.randperm(6, generator=torch.Generator().manual_seed(3))
    perm_n = torch.randperm(5, generator=torch.Generator().manual_seed(4))
    # Relabelling the prototypes permutes the assignment columns and leaves every loss unchanged.
    torch.testing.assert_close(soft_assign(t, protos[perm_k]), soft_assign(t, protos)[..., perm_k])
    for fn in (lambda a, b, p: prototype_assignment_kd(a, b, p), lambda a, b, p: prototype_reconstruction(b, p)):
        base = fn(s, t, protos)
        torch.testing.assert_close(fn(s, t, protos[perm_k]), base)
        # Shuffling positions the same way on both sides: the loss is a mean over positions.
        torch.testing.assert_close(fn(s[:, perm_n], t[:, perm_n], protos), base)
        torch.testing.assert_close(fn(3 * s, 0.5 * t, 2 * protos), base)  # cosine: scale-free
    # But the student must match the teacher *at the same position*: shuffling one side changes it.
    assert not torch.allclose(prototype_assignment_kd(s[:, perm_n], t, protos), prototype_assignment_kd(s, t, protos))


def test_kd_is_not_symmetric_and_nonnegative():
    s, t, protos = _rand(2, 4, 3, seed=5), _rand(2, 4, 3, seed=6), _rand(4, 3, seed=7)
    a, b = prototype_assignment_kd(s, t, protos), prototype_assignment_kd(t, s, protos)
    assert a.item() > 0 and b.item() > 0 and not torch.isclose(a, b)


# ---------------------------------------------------------------------------------------- gradients


def test_gradcheck_all_losses():
    s = _rand(2, 3, 4, seed=8).requires_grad_(True)
    t = _rand(2, 3, 4, seed=9).requires_grad_(True)
    protos = _rand(5, 4, seed=10).requires_grad_(True)
    gate = torch.rand(2, 4, generator=torch.Generator().manual_seed(11), dtype=D).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b, p: prototype_assignment_kd(a, b, p, temperature=0.5), (s, t, protos))
    assert torch.autograd.gradcheck(lambda b, p: prototype_reconstruction(b, p, temperature=0.5), (t, protos))
    assert torch.autograd.gradcheck(
        lambda a, p, g: prototype_augment(a, soft_assign(a, p, temperature=0.5), p, g), (s, protos, gate))


def test_reconstruction_gradient_pulls_prototype_towards_its_features():
    # One prototype owns both features (sharp assignment): a gradient step moves it towards them.
    t = torch.tensor([[[1.0, 0.2], [1.0, -0.1]]], dtype=D)
    protos = torch.tensor([[1.0, 1.0], [-1.0, 0.0]], dtype=D, requires_grad=True)
    prototype_reconstruction(t, protos, temperature=0.05).backward()
    moved = protos.detach() - 0.1 * protos.grad
    cos = lambda p: torch.nn.functional.cosine_similarity(p, torch.tensor([1.0, 0.05], dtype=D), dim=0)
    assert cos(moved[0]) > cos(protos.detach()[0])


# ---------------------------------------------------------------------------------------- bad input


def test_bad_inputs_name_the_problem():
    x = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match="K >= 2"):
        soft_assign(x, torch.zeros(1, 4))
    with pytest.raises(ValueError, match="width"):
        soft_assign(x, torch.zeros(5, 3))
    with pytest.raises(ValueError, match="temperature"):
        prototype_reconstruction(x, torch.ones(5, 4), temperature=0.0)
    with pytest.raises(ValueError, match="differ in shape"):
        prototype_assignment_kd(torch.zeros(2, 2, 4), x, torch.ones(5, 4))
    with pytest.raises(ValueError, match="gate must be"):
        prototype_augment(x, torch.zeros(2, 3, 5), torch.ones(5, 4), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="MLP has no spatial"):
        local_grid(torch.zeros(2, 32), "student", "layers.0")
    with pytest.raises(ValueError, match="square"):
        local_grid(torch.zeros(2, 7, 8), "student", "blocks.0")


def test_local_grid_tokens_and_class_token():
    tokens = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)  # class token + 2x2 patches
    grid = local_grid(tokens, "student", "blocks.0")
    assert grid.shape == (2, 3, 2, 2)
    torch.testing.assert_close(grid[:, :, 0, 1], tokens[:, 2])  # patch 1 (row 0, col 1), after the class token
    assert local_grid(tokens[:, 1:], "student", "x").shape == (2, 3, 2, 2)


# ---------------------------------------------------------------------------------------- method wiring


def _method(num_classes=3):
    from distillery.models.zoo import get_factory

    spec = get_spec("prototype_kd")
    student = get_factory("cnn")(1, num_classes, (8, 8), width=4)
    params = spec.validate_params({"num_prototypes": 4})
    return spec.cls(params, student=student, teacher_layers=["features.1", "features.3"], num_classes=num_classes)


def test_method_on_vit_tokens_resamples_to_the_teacher_grid():
    from distillery.models.zoo import get_factory

    spec = get_spec("prototype_kd")
    student = get_factory("vit_tiny")(1, 3, (6, 6), patch_size=2, dim=8, depth=1, heads=2)
    m = spec.cls(spec.validate_params({"num_prototypes": 3}), student=student, teacher_layers=["features.3"], num_classes=3)
    assert m.student_taps == ["blocks.0"]
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(4, 10, 8, generator=g)  # class token + 3x3 patches
    t_out = ModelOutput(torch.randn(4, 5, generator=g), {"features.3": torch.randn(4, 6, 2, 2, generator=g)})
    s_out = ModelOutput(torch.randn(4, 3, generator=g), {"blocks.0": tokens})
    m.setup(s_out, t_out)
    local = m.student_local(tokens)
    assert local.shape == (4, 4, 6)  # 3x3 patches pooled onto the teacher's 2x2 grid, 8 -> 6 channels
    patches = tokens[:, 1:].transpose(1, 2).reshape(4, 8, 3, 3)
    want = m.proj(torch.nn.functional.adaptive_avg_pool2d(patches, (2, 2)).flatten(2).transpose(1, 2))
    torch.testing.assert_close(local, want)
    assert torch.isfinite(sum(m(s_out, t_out, torch.tensor([0, 1, 2, 0]), Progress(0.0, 0, 1)).values()))


def test_method_terms_and_which_parameters_each_term_moves():
    assert get_spec("prototype_kd").teacher_same_classes is False
    m = _method()
    assert m.student_taps == ["features.3"] and m.teacher_taps == ["features.3"]
    g = torch.Generator().manual_seed(0)
    s_feat = torch.randn(6, 16, 2, 2, generator=g, requires_grad=True)
    t_out = ModelOutput(torch.randn(6, 7, generator=g), {"features.3": torch.randn(6, 12, 2, 2, generator=g)})
    s_out = ModelOutput(torch.randn(6, 3, generator=g, requires_grad=True), {"features.3": s_feat})
    m.setup(s_out, t_out)  # teacher logits have 7 classes, the student 3: never compared
    assert m.prototypes.shape == (4, 12)
    terms = m(s_out, t_out, torch.tensor([0, 1, 2, 0, 1, 2]), Progress(0.0, 0, 10))
    assert set(terms) == {"ce", "proto", "assign", "aug"}
    terms["proto"].backward(retain_graph=True)
    assert m.prototypes.grad.abs().sum() > 0 and s_feat.grad is None  # prototypes learn from the teacher only
    m.prototypes.grad = None
    (terms["assign"] + terms["aug"]).backward()
    assert m.prototypes.grad is None  # ... and are fixed for the student's terms,
    assert s_feat.grad.abs().sum() > 0 and m.gate.weight.grad.abs().sum() > 0  # which reach the student


# ---------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def digits_teacher(tmp_path_factory):
    """A CNN that knows digits 0-4 only."""
    tmp = tmp_path_factory.mktemp("pkd")
    cfg = tiny_cfg(tmp, name="teacher", data={"classes": [0, 1, 2, 3, 4]},
                   student={"arch": "cnn", "kwargs": {"width": 8}}, train={"epochs": 3})
    return fit(cfg).run_dir


# Cross family: a residual network (a ViT this small learns too little in a few epochs on 900 images to
# test against chance; its token path is covered by the wiring test and by benchmarks/cross_task.py).
STUDENTS = {
    "same_family": {"arch": "cnn", "kwargs": {"width": 8}},
    "cross_family": {"arch": "resnet8", "kwargs": {}},
}


@pytest.mark.parametrize("student", STUDENTS)
def test_cross_task_fit_on_digits(tmp_path, digits_teacher, student):
    cfg = tiny_cfg(tmp_path, data={"classes": [5, 6, 7, 8, 9]}, student=STUDENTS[student],
                   teacher={"run": str(digits_teacher)}, method={"name": "prototype_kd", "params": {"num_prototypes": 8}},
                   train={"epochs": 2})
    result = fit(cfg)
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert result.summary["test_accuracy"] > 0.5  # 5 classes: chance is 0.2
    first, last = rows[0], rows[-1]
    assert {"train_ce", "train_proto", "train_assign", "train_aug"} <= set(first)
    assert last["train_proto"] < first["train_proto"]  # the prototypes learn the teacher's local patterns
    assert last["train_assign"] < first["train_assign"]  # and the student's local features follow them
    assert all(math.isfinite(v) for r in rows for v in r.values() if isinstance(v, float))


def test_mlp_student_is_refused_with_a_clear_message(tmp_path, digits_teacher):
    cfg = tiny_cfg(tmp_path, data={"classes": [5, 6, 7, 8, 9]}, teacher={"run": str(digits_teacher)},
                   method={"name": "prototype_kd"}, train={"epochs": 1})
    with pytest.raises(DistilleryError, match="MLP has no spatial positions"):
        fit(cfg)
