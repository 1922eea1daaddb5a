"""LELP: null-space projector, class moments, the subclass basis (principal directions, rotation,
scales), the teacher's subclass distribution and the loss against their definitions (hand values, the
S = 1 limit equal to KD, the flattened C*S KL, gradients); the method's first-pass statistics, the
basis it freezes, its state, and a binary digits run with an interrupted-and-resumed twin."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import interrupt_then_resume, same_weights, tiny_cfg
from distillery import methods
from distillery.config import ModelSpec
from distillery.engine import fit
from distillery.losses import lelp as LL
from distillery.losses.logits import kd
from distillery.methods.base import ModelOutput, Progress
from distillery.models import build_model
from distillery.taps import Taps

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --------------------------------------------------------------------------- the mathematics


def test_null_space_projector():
    w = _randn(2, 5, seed=1)
    p = LL.null_space_projector(w)
    torch.testing.assert_close(w @ p, torch.zeros(2, 5, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(p @ p, p)
    torch.testing.assert_close(p, p.T)
    assert torch.linalg.matrix_rank(p) == 3


def test_class_moments_match_direct_sums():
    emb, y = _randn(7, 3, seed=2), torch.tensor([0, 2, 2, 0, 2, 1, 2])
    count, total, outer = LL.class_moments(emb, y, 4)
    torch.testing.assert_close(count, torch.tensor([2.0, 1.0, 4.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(total[2], emb[y == 2].sum(0))
    torch.testing.assert_close(outer[0], emb[0:1].T @ emb[0:1] + emb[3:4].T @ emb[3:4])
    assert outer[3].abs().sum() == 0


def _cloud(seed=3):
    """Class 0: spread 5 along e0 and 2 along e1, little elsewhere; class 1: spread 3 along e2."""
    z = _randn(400, 4, seed=seed)
    a = z * torch.tensor([5.0, 2.0, 0.1, 0.1], dtype=torch.float64) + torch.tensor([1.0, 0, 0, 0], dtype=torch.float64)
    b = z.flip(0) * torch.tensor([0.1, 0.1, 3.0, 0.2], dtype=torch.float64)
    return torch.cat([a, b]), torch.cat([torch.zeros(400, dtype=torch.long), torch.ones(400, dtype=torch.long)])


def test_basis_is_the_top_principal_directions_rotated_within_their_span():
    emb, y = _cloud()
    moments = LL.class_moments(emb, y, 2)
    centres, plain, scales = LL.subclass_basis(*moments, 2)
    for c in range(2):
        cov = torch.cov(emb[y == c].T, correction=0)
        evals, evecs = torch.linalg.eigh(cov)
        top = evecs[:, -2:]
        torch.testing.assert_close(plain[c].T @ plain[c], top @ top.T, atol=1e-9, rtol=0)  # same subspace
        torch.testing.assert_close(scales[c], evals[-2:].mean().sqrt())
        torch.testing.assert_close(centres[c], emb[y == c].mean(0))
    assert abs(plain[0, 0, 0]) > 0.99  # largest first: e0 for class 0
    _, rotated, _ = LL.subclass_basis(*moments, 2, generator=torch.Generator().manual_seed(0))
    for c in range(2):
        torch.testing.assert_close(rotated[c] @ rotated[c].T, torch.eye(2, dtype=torch.float64))  # orthonormal
        torch.testing.assert_close(rotated[c].T @ rotated[c], plain[c].T @ plain[c], atol=1e-9, rtol=0)
    assert not torch.allclose(rotated[0].abs(), plain[0].abs(), atol=1e-3)  # really mixed
    # projected onto the null space of a classifier reading e0: class 0's top direction becomes e1
    w = torch.tensor([[1.0, 0, 0, 0], [-1.0, 0, 0, 0]], dtype=torch.float64)
    _, nulled, _ = LL.subclass_basis(*moments, 1, projector=LL.null_space_projector(w))
    assert abs(nulled[0, 0, 1]) > 0.99 and abs(nulled[0, 0, 0]) < 1e-9


def test_subclass_targets_hand_value_and_marginal():
    # one class of interest (c = 0), S = 2, directions e0 and e1, centre 0, scale 1, beta 0.5
    centres = torch.zeros(2, 2, dtype=torch.float64)
    directions = torch.eye(2, dtype=torch.float64).expand(2, 2, 2).clone()
    scales = torch.ones(2, dtype=torch.float64)
    h, t = torch.tensor([[1.0, 0.0]], dtype=torch.float64), torch.tensor([[2.0, 0.0]], dtype=torch.float64)
    p = LL.subclass_targets(t, h, centres, directions, scales, temperature=2.0, beta=0.5)
    p_class = torch.softmax(t / 2.0, -1)[0]
    split = torch.softmax(torch.tensor([2.0, 0.0], dtype=torch.float64), -1)  # z / beta = (2, 0)
    torch.testing.assert_close(p[0], p_class.unsqueeze(1) * split)
    emb, y = _cloud()
    basis = LL.subclass_basis(*LL.class_moments(emb, y, 2), 3, generator=torch.Generator().manual_seed(1))
    logits = _randn(800, 2, seed=4)
    q = LL.subclass_targets(logits, emb, *basis, temperature=3.0, beta=0.7)
    torch.testing.assert_close(q.sum(-1), torch.softmax(logits / 3.0, -1))
    with pytest.raises(ValueError, match="beta"):
        LL.subclass_targets(logits, emb, *basis, beta=0.0)
    with pytest.raises(ValueError, match="n_subclasses"):
        LL.subclass_basis(*LL.class_moments(emb, y, 2), 5)


def test_loss_with_one_subclass_is_kd_and_otherwise_the_flat_kl():
    z, t = _randn(5, 3, seed=5), _randn(5, 3, seed=6)
    ones = torch.softmax(t / 4.0, -1).unsqueeze(-1)  # S = 1: the targets are the class probabilities
    got = LL.lelp_loss(z, _randn(5, 3, 1, seed=7), ones, temperature=4.0)
    assert got.item() == pytest.approx(kd(z, t, temperature=4.0).item(), rel=1e-12)
    u = _randn(5, 3, 4, seed=8)
    target = torch.softmax(_randn(5, 12, seed=9), -1).view(5, 3, 4)
    # T = 1: the paper's single softmax over the C*S subclasses (student logits z_c + log softmax(u_c))
    flat_student = (z.unsqueeze(-1) + F.log_softmax(u, -1)).flatten(1)
    flat = F.kl_div(F.log_softmax(flat_student, -1), target.flatten(1), reduction="batchmean")
    assert LL.lelp_loss(z, u, target).item() == pytest.approx(flat.item(), rel=1e-10)
    # T = 2: T^2 * the class part (softened by T, as KD) + the within-class part, written out
    p_class = target.sum(-1)
    class_part = F.kl_div(F.log_softmax(z / 2.0, -1), p_class, reduction="batchmean")
    within = sum(p_class[n, c] * F.kl_div(F.log_softmax(u[n, c], -1), target[n, c] / p_class[n, c], reduction="sum")
                 for n in range(5) for c in range(3)) / 5
    assert LL.lelp_loss(z, u, target, temperature=2.0).item() == pytest.approx((4 * class_part + within).item(), rel=1e-10)
    # the student's class probability is the sum of its subclass probabilities: its own classifier
    torch.testing.assert_close(LL.joint_log_probs(z, u, temperature=2.0).exp().sum(-1), torch.softmax(z / 2.0, -1))
    # zero at a perfect match
    match_z, match_u = 2.0 * target.sum(-1).log(), (target / target.sum(-1, keepdim=True)).log()
    assert LL.lelp_loss(match_z, match_u, target, temperature=2.0).item() == pytest.approx(0.0, abs=1e-12)


def test_gradcheck():
    z, u = _randn(3, 2, seed=10).requires_grad_(), _randn(3, 2, 3, seed=11).requires_grad_()
    target = torch.softmax(_randn(3, 6, seed=12), -1).view(3, 2, 3)
    assert torch.autograd.gradcheck(lambda a, b: LL.lelp_loss(a, b, target, temperature=1.5), (z, u))


# --------------------------------------------------------------------------- the method


def _model(arch, **kwargs):
    return build_model(ModelSpec(arch=arch, kwargs=kwargs), in_channels=1, num_classes=3, input_size=(8, 8))


def _outputs(method, student, teacher, x):
    with Taps(student, method.student_taps) as st, Taps(teacher, method.teacher_taps) as tt:
        s_logits = student(x)
        with torch.no_grad():
            t_logits = teacher(x)
        return ModelOutput(s_logits, st.collect(), x), ModelOutput(t_logits, tt.collect())


def test_first_pass_statistics_then_frozen_basis():
    torch.manual_seed(0)
    teacher, student = _model("cnn", width=4), _model("mlp", hidden=[12])  # teacher embedding width 16
    spec = methods.get_spec("lelp")
    method = spec.cls(spec.validate_params({"n_subclasses": 3, "alpha": 1.0}), student=student, teacher_layers=None,
                      num_classes=3)
    xs, ys = [torch.randn(32, 1, 8, 8) for _ in range(3)], [torch.randint(0, 3, (32,)) for _ in range(3)]
    with torch.no_grad():
        method.setup(*_outputs(method, student, teacher, xs[0]))
    embs, logits = [], []
    for i, (x, y) in enumerate(zip(xs[:2], ys[:2])):  # the first pass: plain KD, statistics collected
        s_out, t_out = _outputs(method, student, teacher, x)
        terms = method(s_out, t_out, y, Progress(epoch=i / 2, step=i, total_steps=6))
        assert terms["lelp"].item() == pytest.approx(kd(s_out.logits, t_out.logits, temperature=4.0).item(), rel=1e-6)
        embs.append(t_out.features["head:input"])
    emb, y = torch.cat(embs), torch.cat(ys[:2])
    count, total, outer = LL.class_moments(emb, y, 3)
    torch.testing.assert_close(method.m_outer, outer)
    assert not bool(method.ready) and method.log_values() == {"lelp_basis_ready": 0.0}
    s_out, t_out = _outputs(method, student, teacher, xs[2])
    terms = method(s_out, t_out, ys[2], Progress(epoch=1.0, step=2, total_steps=6))  # second epoch: basis built
    assert bool(method.ready)
    # the null space comes from the teacher's classifier, recovered from its inputs and logits
    expected = LL.subclass_basis(count, total, outer, 3, projector=LL.null_space_projector(teacher.head.weight.double()))
    for c in range(3):
        got, ref = method.directions[c].double(), expected[1][c]
        torch.testing.assert_close(got.T @ got, ref.T @ ref, atol=1e-4, rtol=0)
        assert (teacher.head.weight.double() @ got.T).abs().max() < 1e-4
    u = method.subclass_head(s_out.features["head:input"]).view(32, 3, 3)
    probs = LL.subclass_targets(t_out.logits, t_out.features["head:input"], method.centres, method.directions,
                                method.scales, temperature=4.0)
    assert terms["lelp"].item() == pytest.approx(LL.lelp_loss(s_out.logits, u, probs, temperature=4.0).item(), rel=1e-5)
    (g,) = torch.autograd.grad(terms["lelp"], [method.subclass_head.weight])
    assert g.abs().sum() > 0
    state = method.state_dict()
    assert {"m_outer", "directions", "centres", "scales", "ready", "subclass_head.weight"} <= set(state)
    assert not any("subclass" in k for k in student.state_dict())
    with pytest.raises(ValueError, match="n_subclasses"):
        big = spec.cls(spec.validate_params({"n_subclasses": 17}), student=student, teacher_layers=None, num_classes=3)
        big.setup(*_outputs(big, student, teacher, xs[0]))


# --------------------------------------------------------------------------- end to end


def test_binary_digits_run_and_resume(tmp_path, monkeypatch):
    data = {"name": "digits", "batch_size": 32, "classes": [3, 8]}
    teacher = fit(tiny_cfg(tmp_path / "t", name="teacher", data=data, student={"arch": "cnn", "kwargs": {"width": 8}},
                           train={"epochs": 3, "progress": False}))
    raw = dict(data=data, teacher={"run": str(teacher.run_dir)}, student={"arch": "mlp", "kwargs": {"hidden": [32]}},
               method={"name": "lelp", "params": {"n_subclasses": 3}}, train={"epochs": 4, "progress": False})
    res = fit(tiny_cfg(tmp_path / "a", **raw))
    rows = [json.loads(line) for line in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["method_lelp_basis_ready"] for r in rows] == [0.0, 1.0, 1.0, 1.0]
    assert all("train_lelp" in r and "train_ce" in r for r in rows)
    assert res.summary["test_accuracy"] > 0.75
    assert not any("subclass" in k for k in res.student.state_dict())
    # interrupted inside the first pass (step 3 of 8), resumed: the same weights as uninterrupted
    resumed = interrupt_then_resume(tiny_cfg(tmp_path / "b", **raw), monkeypatch, at_step=3)
    assert same_weights(res, resumed)
