"""TRG: the three token-graph losses against naive loops of their definitions, hand values and limits,
gradients, bad inputs; token extraction and grid matching (CNN maps, ViT tokens with the class token,
vectors); the method's projector, temperature schedule, gradient paths, and a short CNN teacher ->
ViT student run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import tiny_cfg
from distillery import methods
from distillery.config import ModelSpec
from distillery.engine import fit
from distillery.losses.trg import global_relation_loss, inner_contextual_loss, local_preserving_loss
from distillery.methods.base import ModelOutput, Progress
from distillery.methods.trg import matched_tokens
from distillery.models import build_model
from distillery.taps import Taps

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _softmax(values):
    m = max(values)
    e = [math.exp(v - m) for v in values]
    return [x / sum(e) for x in e]


# --------------------------------------------------------------------------- the losses


def test_inner_contextual_loss_matches_a_loop_and_a_hand_value():
    s, t = _randn(2, 3, 4, seed=1), _randn(2, 3, 5, seed=2)  # widths differ: only N x N contexts meet
    total = 0.0
    for b in range(2):
        for i in range(3):
            cs_s = _softmax([float(s[b, i] @ s[b, j]) / math.sqrt(4) for j in range(3)])
            cs_t = _softmax([float(t[b, i] @ t[b, j]) / math.sqrt(5) for j in range(3)])
            total += sum((a - c) ** 2 for a, c in zip(cs_s, cs_t))
    assert inner_contextual_loss(s, t).item() == pytest.approx(total / 18, rel=1e-12)
    # Two orthogonal unit tokens (D = 4) give CS rows softmax([1/2, 0]); two identical tokens give 1/2 each.
    ortho = torch.eye(4, dtype=torch.float64)[:2][None]
    same = torch.ones(1, 2, 4, dtype=torch.float64) / 2
    p = 1 / (1 + math.exp(-0.5))
    assert inner_contextual_loss(ortho, same).item() == pytest.approx((p - 0.5) ** 2, rel=1e-12)
    assert inner_contextual_loss(s, s).item() == 0.0


def _naive_local(s, t, k, sigma):
    m, total = s.shape[0], 0.0
    for i in range(m):
        dist = sorted((float(((t[i] - t[j]) ** 2).sum()), j) for j in range(m) if j != i)
        nbrs = [j for _, j in dist[:k]]  # the teacher's k nearest, used for both graphs
        p_s = _softmax([math.exp(-float(((s[i] - s[j]) ** 2).sum()) / (2 * sigma)) for j in nbrs])
        p_t = _softmax([math.exp(-float(((t[i] - t[j]) ** 2).sum()) / (2 * sigma)) for j in nbrs])
        total += sum(a * math.log(a / b) for a, b in zip(p_s, p_t))
    return total / m


@pytest.mark.parametrize("k, sigma", [(1, 1.0), (3, 0.5), (50, 2.0)])  # k = 50 is capped at M - 1 = 6
def test_local_preserving_loss_matches_a_loop(k, sigma):
    s, t = _randn(7, 3, seed=3), _randn(7, 5, seed=4)
    assert local_preserving_loss(s, t, k=k, sigma=sigma).item() == pytest.approx(_naive_local(s, t, k, sigma), rel=1e-10)


def test_local_preserving_hand_value_and_limits():
    t = torch.tensor([[0.0], [1.0], [3.0]], dtype=torch.float64)
    s = torch.tensor([[0.0], [2.0], [3.0]], dtype=torch.float64)
    # k = 1: every node has one neighbour, both softmaxes are [1]: no local structure to miss.
    assert local_preserving_loss(s, t, k=1).item() == 0.0
    # k = 2, node 0: teacher edges e^-0.5, e^-4.5; student edges e^-2, e^-4.5 (softmax over these values).
    p_t, p_s = _softmax([math.exp(-0.5), math.exp(-4.5)]), _softmax([math.exp(-2.0), math.exp(-4.5)])
    kl0 = sum(a * math.log(a / b) for a, b in zip(p_s, p_t))
    assert _naive_local(s, t, 2, 1.0) == pytest.approx(local_preserving_loss(s, t, k=2).item(), rel=1e-12)
    assert local_preserving_loss(s[:2].clone(), t[:2].clone(), k=2).item() == 0.0  # two nodes: k capped at 1
    assert kl0 > 0 and local_preserving_loss(t, t, k=2).item() == 0.0
    # Translation of a whole graph changes nothing: only distances enter.
    assert local_preserving_loss(s + 5.0, t, k=2).item() == pytest.approx(local_preserving_loss(s, t, k=2).item(), rel=1e-12)


def test_global_relation_loss_matches_a_loop_and_its_limit():
    s, t = _randn(6, 4, seed=5), _randn(6, 4, seed=6)
    tau, total = 0.3, 0.0
    cos = lambda a, b: float(a @ b / (a.norm() * b.norm()))  # noqa: E731
    for i in range(6):
        logits = [cos(s[i], t[j]) / tau for j in range(6)]
        total -= math.log(_softmax(logits)[i])
    assert global_relation_loss(s, t, temperature=tau).item() == pytest.approx(total / 6, rel=1e-10)
    # Student nodes pointing exactly at their teacher nodes (orthogonal ones): the loss -> 0 as tau -> 0,
    # and is log M at a huge temperature (all candidates alike).
    e = torch.eye(6, dtype=torch.float64)
    assert global_relation_loss(3 * e, e, temperature=0.01).item() < 1e-40
    assert global_relation_loss(3 * e, e, temperature=1e6).item() == pytest.approx(math.log(6), rel=1e-5)


def test_gradcheck_and_teacher_side_is_a_target():
    s3, t3 = _randn(2, 3, 4, seed=7).requires_grad_(), _randn(2, 3, 5, seed=8)
    assert torch.autograd.gradcheck(lambda a: inner_contextual_loss(a, t3), (s3,))
    s, t = _randn(6, 3, seed=9).requires_grad_(), _randn(6, 3, seed=10)
    assert torch.autograd.gradcheck(lambda a: local_preserving_loss(a, t, k=3, sigma=0.7), (s,))
    assert torch.autograd.gradcheck(lambda a: global_relation_loss(a, t, temperature=0.5), (s,))
    # Identical inputs (zero distances on the diagonal) still give finite gradients.
    (g,) = torch.autograd.grad(local_preserving_loss(s, s.detach().clone(), k=3), s)
    assert torch.isfinite(g).all()


def test_bad_inputs():
    with pytest.raises(ValueError, match="inner-instance context of a single token"):
        inner_contextual_loss(_randn(4, 1, 3), _randn(4, 1, 5))
    with pytest.raises(ValueError, match="resample the token grids"):
        inner_contextual_loss(_randn(2, 4, 3), _randn(2, 9, 3))
    with pytest.raises(ValueError, match=r"\(B, N, D\)"):
        inner_contextual_loss(_randn(2, 3), _randn(2, 3))
    with pytest.raises(ValueError, match="project the student nodes"):
        global_relation_loss(_randn(5, 3), _randn(5, 4))
    with pytest.raises(ValueError, match="at least 2 nodes"):
        local_preserving_loss(_randn(1, 3), _randn(1, 3))
    with pytest.raises(ValueError, match="same nodes"):
        local_preserving_loss(_randn(4, 3), _randn(5, 3))
    with pytest.raises(ValueError, match="sigma > 0"):
        local_preserving_loss(_randn(4, 3), _randn(4, 3), sigma=0.0)


# --------------------------------------------------------------------------- tokens


def test_vit_tokens_drop_the_class_token_and_pool_to_the_cnn_grid():
    vit = _randn(2, 1 + 16, 6, seed=11)  # class token + a 4 x 4 grid of patch tokens
    cnn = _randn(2, 5, 2, 2, seed=12)
    s, t = matched_tokens(vit, cnn)
    assert s.shape == (2, 4, 6) and t.shape == (2, 4, 5)
    grid = vit[:, 1:].reshape(2, 4, 4, 6)  # row-major patches, as the ViT's patch embedding lays them out
    torch.testing.assert_close(s[:, 1], grid[:, 0:2, 2:4].mean(dim=(1, 2)))  # token (0, 1) of the 2 x 2 grid
    torch.testing.assert_close(t, cnn.flatten(2).transpose(1, 2))  # the smaller grid is not resampled
    kept, _ = matched_tokens(_randn(2, 4, 6), _randn(2, 5, 2, 2), drop_class_token=False)  # 4 tokens: a 2 x 2 grid
    assert kept.shape == (2, 4, 6)
    vec_s, vec_t = matched_tokens(_randn(3, 7), _randn(3, 5, 2, 2))  # a vector: one token; the map pools to 1 x 1
    torch.testing.assert_close(vec_t[:, 0], _randn(3, 5, 2, 2).mean(dim=(2, 3)))
    assert vec_s.shape == (3, 1, 7)
    with pytest.raises(ValueError, match="not a square grid"):
        matched_tokens(_randn(2, 1 + 6, 4), _randn(2, 5, 2, 2))
    with pytest.raises(ValueError, match="batch sizes"):
        matched_tokens(_randn(2, 5, 2, 2), _randn(3, 5, 2, 2))


# --------------------------------------------------------------------------- the method


def _model(arch, **kwargs):
    return build_model(ModelSpec(arch=arch, kwargs=kwargs), in_channels=1, num_classes=10, input_size=(8, 8))


def _method(student, teacher, **params):
    spec = methods.get_spec("trg")
    return spec.cls(spec.validate_params(params), student=student, teacher_layers=teacher.default_feature_layers, num_classes=10)


def _outputs(method, student, teacher, x):
    with Taps(student, method.student_taps) as st, Taps(teacher, method.teacher_taps) as tt:
        s_logits = student(x)
        with torch.no_grad():
            t_logits = teacher(x)
        return ModelOutput(s_logits, st.collect(), x), ModelOutput(t_logits, tt.collect())


def test_projector_schedule_terms_and_gradient_paths():
    torch.manual_seed(0)
    teacher = _model("cnn", width=8)  # deepest stage features.3: (B, 32, 2, 2)
    student = _model("vit_tiny", patch_size=2, dim=12, depth=2, heads=2)  # blocks.1: (B, 1 + 16, 12)
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    method = _method(student, teacher, tokens_per_image=3, k_neighbours=4, global_temperature_start=0.5,
                     global_temperature_end=0.1, kd_weight=0.0)
    assert method.student_taps == ["blocks.1"] and method.teacher_taps == ["features.3"]
    with torch.no_grad():
        method.setup(*_outputs(method, student, teacher, x))
    assert isinstance(method.projector, torch.nn.Linear) and method.projector.weight.shape == (32, 12)
    s_out, t_out = _outputs(method, student, teacher, x)
    for frac, tau in ((0.0, 0.5), (0.5, 0.3), (1.0, 0.1)):
        terms = method(s_out, t_out, y, Progress(epoch=0.0, step=int(10 * frac), total_steps=10))
        assert method.log_values()["trg_global_temperature"] == pytest.approx(tau)
    assert set(terms) == {"trg_inner", "trg_local", "trg_global", "ce"}
    s_tok, t_tok = matched_tokens(s_out.features["blocks.1"], t_out.features["features.3"])
    assert terms["trg_inner"].item() == pytest.approx(100.0 * inner_contextual_loss(s_tok, t_tok).item(), rel=1e-6)
    g = torch.autograd.grad(terms["trg_global"], [student.patch_embed.weight, student.head.weight, method.projector.weight],
                            allow_unused=True, retain_graph=True)
    assert g[0].abs().sum() > 0 and g[1] is None and g[2].abs().sum() > 0
    g_local = torch.autograd.grad(terms["trg_local"], [student.patch_embed.weight, method.projector.weight], allow_unused=True)
    assert g_local[0].abs().sum() > 0 and g_local[1] is None  # the projector serves the global term only


def test_vector_features_degenerate_to_an_instance_graph():
    torch.manual_seed(0)
    teacher, student = _model("cnn", width=8), _model("mlp", hidden=[12])
    x, y = torch.randn(5, 1, 8, 8), torch.randint(0, 10, (5,))
    method = _method(student, teacher)
    with pytest.raises(ValueError, match="inner_weight: 0"):
        method.setup(*_outputs(method, student, teacher, x))
    method = _method(student, teacher, inner_weight=0.0)
    method.setup(*_outputs(method, student, teacher, x))
    terms = method(*_outputs(method, student, teacher, x), y, Progress(epoch=0.0, step=0, total_steps=1))
    assert set(terms) == {"trg_local", "trg_global", "ce", "kd"} and terms["trg_local"].item() > 0
    one = method(*_outputs(method, student, teacher, x[:1]), y[:1], Progress(epoch=0.0, step=0, total_steps=1))
    assert one["trg_local"].item() == 0.0 and one["trg_global"].item() == 0.0  # a ragged batch of one image


# --------------------------------------------------------------------------- end to end


def test_cnn_teacher_to_vit_student_run(tmp_path):
    teacher = fit(tiny_cfg(tmp_path / "t", name="teacher", student={"arch": "cnn", "kwargs": {"width": 8}}))
    cfg = tiny_cfg(tmp_path, teacher={"run": str(teacher.run_dir)},
                   student={"arch": "vit_tiny", "kwargs": {"patch_size": 2, "dim": 16, "depth": 2, "heads": 2}},
                   method={"name": "trg", "params": {"tokens_per_image": 4}}, train={"epochs": 3, "progress": False})
    res = fit(cfg)
    rows = [json.loads(line) for line in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all({"train_trg_inner", "train_trg_local", "train_trg_global", "train_ce", "train_kd"} <= set(r) for r in rows)
    # The ViT's 16 patch tokens are pooled to the CNN's 2 x 2 grid; its token graph moves to the teacher's.
    # (A ViT learns little in 3 epochs on 8 x 8 digits, with KD alone too: no accuracy claim here.)
    for term in ("train_trg_inner", "train_trg_local", "train_trg_global", "train_loss"):
        assert rows[-1][term] < rows[0][term], term
    assert rows[-1]["method_trg_global_temperature"] < rows[0]["method_trg_global_temperature"]
