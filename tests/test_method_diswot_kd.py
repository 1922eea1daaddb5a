"""DisWOT as a distiller: the semantic (CAM inter-class Gram) and relation (batch Gram) losses against
naive loops, their invariances and gradients, the least-squares recovery of the teacher's classifier,
what the method returns and where its gradients go, and a short CNN teacher -> MLP student run."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_cfg
from distillery import methods
from distillery.config import ModelSpec
from distillery.engine import fit
from distillery.losses.diswot_kd import head_moments, recover_linear_head, relation_loss, semantic_loss
from distillery.methods.base import ModelOutput, Progress
from distillery.models import build_model
from distillery.taps import Taps

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PROGRESS = Progress(epoch=0.0, step=0, total_steps=10)


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _normalised_sq_diff(a, b):
    """||row_l2(a) - row_l2(b)||_F^2 / (n m), written out row by row."""
    total = 0.0
    for ra, rb in zip(a, b):
        total += float(((ra / ra.norm().clamp_min(1e-12) - rb / rb.norm().clamp_min(1e-12)) ** 2).sum())
    return total / (a.shape[0] * a.shape[1])


# --------------------------------------------------------------------------- the losses


def test_semantic_loss_matches_a_per_sample_loop():
    f_t, w_t = _randn(3, 6, 4, seed=1), _randn(5, 6, seed=2)  # B=3, D_t=6, L_t=4, C=5
    f_s, w_s = _randn(3, 2, 9, seed=3), _randn(5, 2, seed=4)  # other width and map size
    expected = 0.0
    for b in range(3):
        m_t, m_s = torch.relu(w_t @ f_t[b]), torch.relu(w_s @ f_s[b])  # (C, L) class activation maps
        expected += _normalised_sq_diff(m_t @ m_t.T, m_s @ m_s.T)
    assert semantic_loss(f_t, w_t, f_s, w_s).item() == pytest.approx(expected / 3, rel=1e-10)


def test_relation_loss_matches_the_batch_gram_definition():
    f_t, f_s = _randn(5, 3, 2, 2, seed=5), _randn(5, 7, seed=6)
    a, b = f_t.flatten(1), f_s
    assert relation_loss(f_t, f_s).item() == pytest.approx(_normalised_sq_diff(a @ a.T, b @ b.T), rel=1e-10)


def test_zero_at_a_match_and_invariant_to_feature_scale():
    f, w = _randn(4, 6, 3, seed=7).abs(), _randn(5, 6, seed=8)
    assert semantic_loss(f, w, f, w).item() == pytest.approx(0.0, abs=1e-12)
    assert relation_loss(f, f).item() == pytest.approx(0.0, abs=1e-12)
    f_s, w_s = _randn(4, 2, 5, seed=9), _randn(5, 2, seed=10)
    assert semantic_loss(f, w, 7.0 * f_s, 0.5 * w_s).item() == pytest.approx(semantic_loss(f, w, f_s, w_s).item(), rel=1e-10)
    assert relation_loss(f, 3.0 * f_s).item() == pytest.approx(relation_loss(f, f_s).item(), rel=1e-10)
    assert semantic_loss(f, w, f_s, w_s).item() > 1e-4


def test_gradcheck_student_side_teacher_detached():
    f_t, w_t = _randn(3, 4, 2, seed=11).requires_grad_(), _randn(3, 4, seed=12).requires_grad_()
    f_s, w_s = _randn(3, 5, 2, seed=13).requires_grad_(), _randn(3, 5, seed=14).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: semantic_loss(f_t, w_t, a, b), (f_s, w_s))
    assert torch.autograd.gradcheck(lambda a: relation_loss(f_t, a), (f_s,))
    grads = torch.autograd.grad(semantic_loss(f_t, w_t, f_s, w_s) + relation_loss(f_t, f_s), [f_t, w_t], allow_unused=True)
    assert grads == (None, None)


def test_linear_head_is_recovered_exactly_from_batches():
    w, b = _randn(3, 6, seed=15), _randn(3, seed=16)
    xs = [_randn(5, 6, seed=20 + i).relu() for i in range(4)]
    xs = [torch.cat([x[:, :5], torch.zeros(5, 1, dtype=x.dtype)], 1) for x in xs]  # a dead channel
    moments = [head_moments(x, x @ w.T + b) for x in xs]
    gram, cross, t_sq = (sum(m[i] for m in moments) for i in range(3))
    w_hat, b_hat, residual = recover_linear_head(gram, cross, t_sq)
    torch.testing.assert_close(w_hat[:, :5], w[:, :5])  # the live channels exactly
    assert w_hat[:, 5].abs().max() < 1e-9  # the dead channel: minimum norm
    torch.testing.assert_close(b_hat, b)
    assert residual < 1e-12
    x = torch.cat(xs)
    _, _, bad = recover_linear_head(*head_moments(x, torch.tanh(x @ w.T)))
    assert bad > 1e-3


# --------------------------------------------------------------------------- the method


def _model(arch, **kwargs):
    return build_model(ModelSpec(arch=arch, kwargs=kwargs), in_channels=1, num_classes=10, input_size=(8, 8))


def _method(student, teacher, **params):
    spec = methods.get_spec("diswot")
    return spec.cls(spec.validate_params(params), student=student, teacher_layers=teacher.default_feature_layers,
                    num_classes=10)


def _outputs(method, student, teacher, x):
    with Taps(student, method.student_taps) as st, Taps(teacher, method.teacher_taps) as tt:
        s_logits = student(x)
        with torch.no_grad():
            t_logits = teacher(x)
        return ModelOutput(s_logits, st.collect(), x), ModelOutput(t_logits, tt.collect())


def test_teacher_head_recovered_then_semantic_term_switches_on():
    torch.manual_seed(0)
    teacher, student = _model("cnn", width=4), _model("cnn", width=2)  # teacher classifier width D = 16
    method = _method(student, teacher)
    assert method.student_taps == ["pool:input"] and method.teacher_taps == ["features.3", "head:input"]
    with torch.no_grad():
        method.setup(*_outputs(method, student, teacher, torch.randn(4, 1, 8, 8)))
    seen = []
    for step in range(3):  # 2 (D + 1) = 34 rows are needed: the third batch of 16 completes them
        x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
        s_out, t_out = _outputs(method, student, teacher, x)
        terms = method(s_out, t_out, y, PROGRESS)
        seen.append(terms["diswot_semantic"].item())
        assert set(terms) == {"diswot_semantic", "diswot_relation", "kd", "ce"}
    assert seen[0] == seen[1] == 0.0 and seen[2] > 0 and bool(method.head_ready)
    assert method.log_values()["diswot_head_residual"] < 1e-6
    # the recovered head gives the teacher's own class activation maps
    feats = t_out.features["features.3"].flatten(2)
    torch.testing.assert_close(torch.einsum("cd,bdl->bcl", method.head_w, feats),
                               torch.einsum("cd,bdl->bcl", teacher.head.weight, feats), atol=1e-4, rtol=1e-4)
    # gradients: the semantic term reaches the student's classifier and features, the relation term the features only
    head, conv = student.head.weight, student.features[0][0].weight
    g_sem = torch.autograd.grad(terms["diswot_semantic"], [head, conv], retain_graph=True)
    g_rel = torch.autograd.grad(terms["diswot_relation"], [head, conv], allow_unused=True)
    assert g_sem[0].abs().sum() > 0 and g_sem[1].abs().sum() > 0 and g_rel[0] is None and g_rel[1].abs().sum() > 0
    assert not any(k.startswith("student_head") for k in method.state_dict())  # the head stays the student's


def test_cross_family_defaults_and_clear_errors():
    teacher = _model("cnn", width=4)
    mlp = _method(_model("mlp", hidden=[12]), teacher)
    assert mlp.student_taps == ["layers.0"]  # no pool: the deepest stage, (N, 12) = the classifier's input
    bad = _method(_model("mlp", hidden=[12]), teacher, teacher_feature="features.1", teacher_embedding="features.1")
    x = torch.randn(40, 1, 8, 8)
    with torch.no_grad():
        bad.setup(*_outputs(bad, bad._student, teacher, x[:4]))
    with pytest.raises(ValueError, match="teacher_embedding"):  # logits are not linear in features.1
        bad(*_outputs(bad, bad._student, teacher, x), torch.zeros(40, dtype=torch.long), PROGRESS)
    with pytest.raises(ValueError, match="teacher_feature"):
        _method(_model("mlp", hidden=[12]), _Bare())


class _Bare(torch.nn.Module):
    default_feature_layers: list = []


# --------------------------------------------------------------------------- end to end


def test_cnn_teacher_to_mlp_student_run(tmp_path):
    teacher = fit(tiny_cfg(tmp_path / "t", name="teacher", student={"arch": "cnn", "kwargs": {"width": 8}}))
    cfg = tiny_cfg(tmp_path, teacher={"run": str(teacher.run_dir)}, student={"arch": "mlp", "kwargs": {"hidden": [32]}},
                   method={"name": "diswot"}, train={"epochs": 3, "progress": False})
    res = fit(cfg)
    rows = [json.loads(line) for line in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all({"train_diswot_semantic", "train_diswot_relation", "train_kd", "train_ce"} <= set(r) for r in rows)
    assert rows[-1]["train_diswot_relation"] < rows[0]["train_diswot_relation"]
    assert rows[-1]["train_diswot_semantic"] > 0 and rows[-1]["method_diswot_head_residual"] < 1e-6
    assert res.summary["test_accuracy"] > 0.4
