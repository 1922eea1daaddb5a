"""TGeo-KD: relation features and the fused loss against hand values, the look-ahead
hypergradient against an explicit virtual step, the ratio network's training signal, and a
short distillation run."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from conftest import tiny_cfg
from distillery import methods
from distillery.engine import fit
from distillery.losses.logits import cross_entropy, kd
from distillery.losses.tgeo import fusion_terms, lookahead_alignment, tgeo_kd, tgeo_relations
from distillery.methods.base import ModelOutput, Progress

pytestmark = pytest.mark.usefixtures("one_torch_thread")

D = torch.float64


def _randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D) * scale


# --------------------------------------------------------------------------- pure functions


def test_relations_hand_value():
    # S = (1/2, 1/2), T = (3/4, 1/4), G = (1, 0), T_bar = (0.6, 0.4)
    s, t = torch.tensor([[0.0, 0.0]], dtype=D), torch.tensor([[math.log(3.0), 0.0]], dtype=D)
    class_mean = torch.tensor([[0.6, 0.4], [0.1, 0.9]], dtype=D)
    rel = tgeo_relations(s, t, torch.tensor([0]), class_mean)
    expected = [-0.25, 0.25, -0.5, 0.5, -0.25, 0.25, -0.1, 0.1, 0.15, -0.15, 0.4, -0.4]
    torch.testing.assert_close(rel, torch.tensor([expected], dtype=D))
    # class 1 picks row 1 of the class means and the other one-hot
    rel1 = tgeo_relations(s, t, torch.tensor([1]), class_mean)
    torch.testing.assert_close(rel1[0, 2:4], torch.tensor([0.5, -0.5], dtype=D))
    torch.testing.assert_close(rel1[0, 10:12], torch.tensor([-0.1, 0.1], dtype=D))
    with pytest.raises(ValueError, match="teacher_class_mean"):
        tgeo_relations(s, t, torch.tensor([0]), torch.zeros(3, 3))


def test_fused_loss_limits_and_per_sample_mix():
    s, t = _randn(2, 5, seed=1, scale=2.0), _randn(2, 5, seed=2, scale=2.0)
    y = torch.tensor([3, 0])
    assert tgeo_kd(s, t, y, torch.ones(2, dtype=D), temperature=4.0).item() == pytest.approx(kd(s, t, temperature=4.0).item(), rel=1e-12)
    assert tgeo_kd(s, t, y, torch.zeros(2, dtype=D)).item() == pytest.approx(cross_entropy(s, None, y).item(), rel=1e-12)
    # independent per-sample reference: T^2 KL with torch's kl_div, CE with cross_entropy
    kd_i = F.kl_div(F.log_softmax(s / 2, -1), F.log_softmax(t / 2, -1), log_target=True, reduction="none").sum(-1) * 4
    ce_i = F.cross_entropy(s, y, reduction="none")
    r = torch.tensor([0.25, 0.8], dtype=D)
    expected = ((r * kd_i + (1 - r) * ce_i).mean()).item()
    assert tgeo_kd(s, t, y, r, temperature=2.0).item() == pytest.approx(expected, rel=1e-12)
    got_kd, got_ce = fusion_terms(s, t, y, temperature=2.0)
    torch.testing.assert_close(got_kd, kd_i)
    torch.testing.assert_close(got_ce, ce_i)


def test_fused_loss_checks_and_ignore_index():
    s, t = _randn(2, 3, 4, seed=3), _randn(2, 3, 4, seed=4)
    y = torch.tensor([[0, -100, 2], [1, 3, -100]])
    r = torch.full((2, 3), 0.4, dtype=D)
    keep = y != -100
    assert tgeo_kd(s, t, y, r).item() == pytest.approx(tgeo_kd(s[keep], t[keep], y[keep], r[keep]).item(), rel=1e-12)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        tgeo_kd(s, t, y, r + 1.0)
    with pytest.raises(ValueError, match="shape"):
        tgeo_kd(s, t, y, r[0])


def test_gradcheck_fused_loss():
    s, t = _randn(3, 4, seed=5).requires_grad_(), _randn(3, 4, seed=6).requires_grad_()
    r = torch.tensor([0.2, 0.5, 0.9], dtype=D, requires_grad=True)
    y = torch.tensor([0, 2, 3])
    assert torch.autograd.gradcheck(lambda a, b, w: tgeo_kd(a, b, y, w, temperature=2.0), (s, t, r))


def _linear_problem(seed=0, n=8, c=3):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, c).double()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=D)
    y = (x @ torch.randn(4, c, generator=g, dtype=D)).argmax(-1)  # labels a learnable function of x
    t = torch.randn(n, c, generator=g, dtype=D) * 2
    return model, x, y, t


def test_lookahead_alignment_matches_per_sample_gradient_products():
    model, x, y, t = _linear_problem()
    kd_i, ce_i = fusion_terms(model(x), t, y)
    params = list(model.parameters())
    outer = ce_i[4:].mean()
    got = lookahead_alignment(kd_i[:4] - ce_i[:4], outer, params)
    g_out = torch.autograd.grad(outer, params, retain_graph=True)
    for j in range(4):
        g_j = torch.autograd.grad(kd_i[j] - ce_i[j], params, retain_graph=True)
        expected = sum((a * b).sum() for a, b in zip(g_j, g_out))
        assert got[j].item() == pytest.approx(expected.item(), rel=1e-10)
    assert not got.requires_grad
    outer.backward()  # the caller's graph survives


def test_lookahead_alignment_is_the_hypergradient_of_a_virtual_step():
    """d/dr_j CE_B(theta - eta * grad mean_A[r KD + (1-r) CE]) = -eta * alignment_j / |A| + O(eta^2)."""
    model, x, y, t = _linear_problem(seed=1)
    params = dict(model.named_parameters())
    r = torch.tensor([0.3, 0.5, 0.7, 0.9], dtype=D, requires_grad=True)
    eta = 1e-5
    kd_i, ce_i = fusion_terms(functional_call(model, params, (x,)), t, y)
    inner = (r * kd_i[:4] + (1 - r) * ce_i[:4]).mean()
    grads = torch.autograd.grad(inner, list(params.values()), create_graph=True)
    stepped = {k: v - eta * g for (k, v), g in zip(params.items(), grads)}
    outer_after = F.cross_entropy(functional_call(model, stepped, (x[4:],)), y[4:])
    (exact,) = torch.autograd.grad(outer_after, r)
    alignment = lookahead_alignment(kd_i[:4] - ce_i[:4], ce_i[4:].mean(), list(params.values()))
    torch.testing.assert_close(exact, -eta * alignment / 4, rtol=1e-3, atol=0)


# --------------------------------------------------------------------------- the method


def _method(student, num_classes=3, **params):
    spec = methods.get_spec("tgeo_kd")
    return spec.cls(spec.validate_params(params), student=student, teacher_layers=None, num_classes=num_classes)


def _terms(method, model, x, y, t):
    return method(ModelOutput(model(x).float(), {}, x), ModelOutput(t.float()), y, Progress(0.0, 0, 10))


def test_initial_ratio_is_one_half_and_bilevel_off_is_kd_with_alpha_half():
    model, x, y, t = _linear_problem(seed=2)
    model = model.float()
    method = _method(model, bilevel=False, temperature=3.0)
    terms = _terms(method, model, x.float(), y, t)
    assert set(terms) == {"kd", "ce"}
    s = model(x.float())
    assert terms["kd"].item() == pytest.approx(0.5 * kd(s, t.float(), temperature=3.0).item(), rel=1e-5)
    assert terms["ce"].item() == pytest.approx(0.5 * cross_entropy(s, None, y).item(), rel=1e-5)


def test_class_means_are_running_teacher_averages_and_checkpointed():
    model, x, y, _ = _linear_problem(seed=3)
    model = model.float()
    method = _method(model, bilevel=False)
    t1 = torch.tensor([[0.0, 0.0, 0.0], [math.log(2.0), 0.0, 0.0]])
    t2 = torch.tensor([[0.0, math.log(3.0), 0.0], [0.0, 0.0, 0.0]])
    y1, y2 = torch.tensor([0, 0]), torch.tensor([1, -100])
    for t, yy in ((t1, y1), (t2, y2)):
        method(ModelOutput(torch.zeros(2, 3, requires_grad=True)), ModelOutput(t), yy, Progress(0.0, 0, 10))
    mean = method.teacher_class_mean()
    torch.testing.assert_close(mean[0], torch.tensor([(1 / 3 + 0.5) / 2, (1 / 3 + 0.25) / 2, (1 / 3 + 0.25) / 2]))
    torch.testing.assert_close(mean[1], torch.tensor([0.2, 0.6, 0.2]))
    assert (mean[2] == 0).all()  # never seen
    assert {"teacher_class_sum", "teacher_class_count"} <= set(method.state_dict())
    assert any(k.startswith("ratio_net.") for k in method.state_dict())


def test_meta_term_trains_only_the_ratio_network():
    model, x, y, t = _linear_problem(seed=4, n=16)
    model = model.float()
    on, off = _method(model), _method(model, bilevel=False)
    off.load_state_dict(on.state_dict())
    terms = _terms(on, model, x.float(), y, t)
    assert set(terms) == {"kd", "ce", "ratio_meta"}
    student_params = list(model.parameters())
    assert all(g is None for g in torch.autograd.grad(terms["ratio_meta"], student_params, retain_graph=True, allow_unused=True))
    ratio_grads = torch.autograd.grad(terms["ratio_meta"], list(on.ratio_net.parameters()), retain_graph=True, allow_unused=True)
    assert ratio_grads[-1].abs().sum() > 0 and ratio_grads[-2].abs().sum() > 0  # the last layer starts at zero
    # the student's own gradient is the same as without the bilevel part
    g_on = torch.autograd.grad(terms["kd"] + terms["ce"], student_params)
    t_off = _terms(off, model, x.float(), y, t)
    g_off = torch.autograd.grad(t_off["kd"] + t_off["ce"], student_params)
    for a, b in zip(g_on, g_off):
        torch.testing.assert_close(a, b)


def _train_ratio(method, model, x, y, t, steps=15):
    optimizer = torch.optim.Adam(method.ratio_net.parameters(), lr=0.05)
    for _ in range(steps):
        terms = _terms(method, model, x, y, t)
        optimizer.zero_grad()
        terms["ratio_meta"].backward()
        optimizer.step()
    with torch.no_grad():
        return method.ratio(model(x), t.float(), y)


def test_ratio_network_follows_the_teacher_that_helps_held_out_data():
    """A teacher that always names the wrong class works against the held-out CE: the
    hypergradient must push the fusion ratio below its initial 1/2. A teacher that names the
    right class (confidently) helps: the ratio must rise. The student is fixed, only the
    ratio network learns."""
    model, x, y, _ = _linear_problem(seed=5, n=32, c=4)
    model, x = model.float(), x.float()
    wrong = 6.0 * F.one_hot((y + 1) % 4, 4).to(D)
    right = 6.0 * F.one_hot(y, 4).to(D)
    assert _train_ratio(_method(model, num_classes=4), model, x, y, wrong).mean().item() < 0.3
    assert _train_ratio(_method(model, num_classes=4), model, x, y, right).mean().item() > 0.7


# --------------------------------------------------------------------------- end to end


def test_distillation_run_logs_terms(tmp_path):
    teacher = fit(tiny_cfg(tmp_path / "t", name="teacher", student={"arch": "cnn", "kwargs": {"width": 8}},
                           train={"epochs": 2, "progress": False}))
    cfg = tiny_cfg(tmp_path, teacher={"run": str(teacher.run_dir)}, student={"arch": "cnn", "kwargs": {"width": 4}},
                   method={"name": "tgeo_kd"}, train={"epochs": 2, "progress": False})
    res = fit(cfg)
    rows = [json.loads(line) for line in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        assert {"train_kd", "train_ce", "train_ratio_meta"} <= set(row)
        assert row["train_ratio_meta"] != 0.0 and math.isfinite(row["train_ratio_meta"])
    assert rows[-1]["train_ce"] < rows[0]["train_ce"]
    assert res.summary["test_accuracy"] > 0.3
