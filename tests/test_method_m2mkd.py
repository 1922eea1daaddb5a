"""m2mKD: the losses against their definitions (hybrid loss, Switch load balancing, imitation), the
vit_moe layer (top-k routing, output = a naive per-token loop over experts, aux loss), the hybrids
of the method (a student that is a copy of the teacher has zero module loss; values rebuilt by
hand; where gradients go in each phase), bad input, and a short digits run whose phases switch at
the set fractions."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_cfg
from distillery import methods
from distillery.config import ModelSpec
from distillery.engine import fit
from distillery.errors import ConfigError, ModelError
from distillery.losses.m2mkd import hybrid_loss, imitation_loss, load_balancing_loss
from distillery.methods.base import ModelOutput, Progress
from distillery.methods.m2mkd import split_blocks
from distillery.models import build_model
from distillery.models.moe import MoEMLP
from distillery.taps import Taps

pytestmark = pytest.mark.usefixtures("one_torch_thread")
F64 = torch.float64


def _rand(*shape, seed=0, scale=2.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64) * scale


# --------------------------------------------------------------------------- losses


@pytest.mark.parametrize("alpha,temperature", [(0.0, 1.0), (0.5, 2.0), (0.9, 4.0), (1.0, 3.0)])
def test_hybrid_loss_matches_the_definition_sample_by_sample(alpha, temperature):
    s, t, y = _rand(5, 4, seed=1), _rand(5, 4, seed=2), torch.tensor([0, 3, 1, 1, 2])
    want = 0.0
    for n in range(5):
        ce = -math.log(float(torch.softmax(s[n], -1)[y[n]]))
        p, q = torch.softmax(t[n] / temperature, -1), torch.softmax(s[n] / temperature, -1)
        kl = float((p * (p.log() - q.log())).sum())
        want += ((1 - alpha) * ce + alpha * temperature**2 * kl) / 5
    assert hybrid_loss(s, t, y, alpha=alpha, temperature=temperature).item() == pytest.approx(want, rel=1e-12)


def test_hybrid_loss_gradients_reach_the_student_only():
    s, t = _rand(3, 4, seed=3).requires_grad_(), _rand(3, 4, seed=4).requires_grad_()
    y = torch.tensor([2, 0, 1])
    assert torch.autograd.gradcheck(lambda a: hybrid_loss(a, t, y, alpha=0.7, temperature=2.0), (s,))
    assert torch.autograd.grad(hybrid_loss(s, t, y), t, allow_unused=True)[0] is None
    # identical hybrids and no task term: nothing to learn; alpha = 1 needs no labels
    assert hybrid_loss(s, s.detach(), y, alpha=1.0).item() == pytest.approx(0.0, abs=1e-12)
    assert hybrid_loss(s, t, None, alpha=1.0).item() == pytest.approx(hybrid_loss(s, t, y, alpha=1.0).item(), rel=1e-12)


def test_load_balancing_hand_value_and_limits():
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]], dtype=F64)
    top1 = probs.argmax(-1, keepdim=True)  # experts 0, 0, 1, 0 -> f = (3/4, 1/4), P = (0.65, 0.35)
    assert load_balancing_loss(probs, top1, 2).item() == pytest.approx(2 * (0.75 * 0.65 + 0.25 * 0.35), rel=1e-12)
    uniform = torch.full((8, 4), 0.25, dtype=F64)
    spread = torch.arange(8).remainder(4).unsqueeze(1)
    assert load_balancing_loss(uniform, spread, 4).item() == pytest.approx(1.0, rel=1e-12)
    collapsed = F.one_hot(torch.zeros(8, dtype=torch.long), 4).to(F64)
    assert load_balancing_loss(collapsed, torch.zeros(8, 1, dtype=torch.long), 4).item() == pytest.approx(4.0, rel=1e-12)
    # top-k counts routing slots: with k = E every expert gets 1/E of them whatever the probabilities
    both = torch.tensor([[0, 1]] * 4)
    assert load_balancing_loss(probs, both, 2).item() == pytest.approx(1.0, rel=1e-12)


def test_load_balancing_gradient_is_e_times_f():
    probs = torch.softmax(_rand(6, 3, seed=5), -1).requires_grad_()
    index = torch.tensor([[0], [0], [2], [1], [0], [2]])
    (g,) = torch.autograd.grad(load_balancing_loss(probs, index, 3), probs)
    f = torch.tensor([3, 1, 2], dtype=F64) / 6
    assert torch.allclose(g, (3 * f / 6).expand(6, 3))
    assert torch.autograd.gradcheck(lambda p: load_balancing_loss(p, index, 3), (probs,))


def test_imitation_is_mse_and_losses_reject_bad_input():
    a, b = _rand(2, 3, 4, seed=6), _rand(2, 3, 4, seed=7)
    assert imitation_loss(a, b).item() == pytest.approx(float(((a - b) ** 2).mean()), rel=1e-6)
    with pytest.raises(ValueError, match="shapes differ"):
        imitation_loss(a, b[:, :2])
    with pytest.raises(ValueError, match="alpha"):
        hybrid_loss(a[0], b[0], torch.zeros(3, dtype=torch.long), alpha=1.5)
    with pytest.raises(ValueError, match="targets"):
        hybrid_loss(a[0], b[0], None)
    with pytest.raises(ValueError, match=r"router_probs must be \(tokens, 3\)"):
        load_balancing_loss(torch.ones(4, 2), torch.zeros(4, 1, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="expert_index must lie in"):
        load_balancing_loss(torch.ones(4, 2) / 2, torch.full((4, 1), 2), 2)


# --------------------------------------------------------------------------- the MoE student


def test_moe_layer_routes_to_top_k_and_equals_a_naive_loop():
    torch.manual_seed(0)
    layer = MoEMLP(dim=6, hidden=5, num_experts=4, top_k=2).double().eval()
    x = _rand(2, 3, 6, seed=8)
    out = layer(x)
    tokens = x.reshape(-1, 6)
    probs = torch.softmax(tokens @ layer.router.T, -1).detach()
    want = torch.zeros_like(tokens)
    for t in range(tokens.shape[0]):
        ranked = sorted(range(4), key=lambda e: -float(probs[t, e]))
        assert sorted(layer.last_expert_index[t].tolist()) == sorted(ranked[:2])  # the two largest
        for e in ranked[:2]:
            want[t] += probs[t, e] * layer.experts[e](tokens[t])
    assert torch.allclose(out.reshape(-1, 6), want, atol=1e-12)
    assert layer.last_aux_loss.item() == pytest.approx(load_balancing_loss(probs, layer.last_expert_index, 4).item(), rel=1e-12)


def test_moe_router_learns_from_the_output_and_the_aux_loss():
    layer = MoEMLP(dim=4, hidden=3, num_experts=3, top_k=1).double()
    out = layer(_rand(5, 4, seed=9))
    (g_out,) = torch.autograd.grad(out.sum(), layer.router, retain_graph=True)
    (g_aux,) = torch.autograd.grad(layer.last_aux_loss, layer.router)
    assert g_out.abs().sum() > 0 and g_aux.abs().sum() > 0


def _vit(arch, depth=2, dim=16, **kw):
    spec = ModelSpec(arch=arch, kwargs={"patch_size": 4, "dim": dim, "depth": depth, "heads": 2, **kw})
    return build_model(spec, in_channels=1, num_classes=10, input_size=(8, 8))


def test_vit_moe_taps_aux_loss_and_placement():
    model = _vit("vit_moe", depth=4, num_experts=3, top_k=2, moe_every=2)
    assert [i for i, b in enumerate(model.blocks) if isinstance(b.mlp, MoEMLP)] == [1, 3]  # V-MoE "Every-2"
    with Taps(model, ["blocks.0", "blocks.3"]) as taps:
        logits = model(torch.randn(5, 1, 8, 8))
        feats = taps.collect()
    assert logits.shape == (5, 10) and feats["blocks.3"].shape == (5, 1 + 4, 16)
    layers = model.moe_layers()
    assert model.aux_loss.item() == pytest.approx(sum(m.last_aux_loss.item() for m in layers))
    assert all(m.last_expert_index.shape == (5 * 5, 2) for m in layers)
    with pytest.raises(ModelError, match="top_k <= num_experts"):
        _vit("vit_moe", num_experts=2, top_k=3)
    with pytest.raises(ModelError, match="moe_every"):
        _vit("vit_moe", moe_every=0)


# --------------------------------------------------------------------------- the method


def _method(student, teacher_depth=2, **params):
    spec = methods.get_spec("m2mkd")
    return spec.cls(spec.validate_params({"meta_heads": 2, **params}), student=student,
                    teacher_layers=[f"blocks.{teacher_depth - 1}"], num_classes=10)


def _outputs(model, taps, x):
    with Taps(model, taps) as t:
        logits = model(x)
        return ModelOutput(logits, t.collect(), x)


def _ready(teacher, student, **params):
    method = _method(student, len(teacher.blocks), **params)
    x = torch.randn(6, 1, 8, 8, dtype=student.head.weight.dtype)
    s_out, t_out = _outputs(student, method.student_taps, x), _outputs(teacher, method.teacher_taps, x)
    t_out = ModelOutput(t_out.logits.detach(), {k: v.detach() for k, v in t_out.features.items()})
    method.setup(s_out, t_out)
    return method, s_out, t_out


def test_split_depth_and_bad_params(tmp_path):
    assert split_blocks(5, 2) == [range(0, 3), range(3, 5)] and split_blocks(4, 4)[3] == range(3, 4)
    with pytest.raises(ValueError, match="num_modules between 1 and 2"):
        _method(_vit("vit_moe"), num_modules=3)
    with pytest.raises(ValueError, match="ViT student"):
        _method(build_model(ModelSpec(arch="mlp"), in_channels=1, num_classes=10, input_size=(8, 8)))
    with pytest.raises(ValueError, match="teacher_depth"):
        methods.get_spec("m2mkd").cls(methods.get_spec("m2mkd").validate_params({}), student=_vit("vit_moe"),
                                      teacher_layers=["layer1", "layer2"], num_classes=10)
    with pytest.raises(ConfigError, match="meta_fraction .* must be below module_fraction"):
        tiny_cfg(tmp_path, teacher={"run": "x"},
                 method={"name": "m2mkd", "params": {"meta_fraction": 0.5, "module_fraction": 0.4}})
    teacher = _vit("vit_tiny", depth=4)
    method = _method(_vit("vit_moe", depth=2), teacher_depth=4)
    assert method.teacher_taps == ["blocks.1", "blocks.3"] and method.student_taps == ["blocks.0"]
    with pytest.raises(ValueError, match="meta_heads=3 does not divide"):
        _ready(teacher, _vit("vit_moe", depth=2), meta_heads=3)


def test_a_student_copying_the_teacher_has_zero_module_loss():
    """S~_i and T~_i are the same network with module i swapped: equal modules, equal hybrids."""
    torch.manual_seed(1)
    teacher = _vit("vit_tiny", depth=4).double().eval()
    student = _vit("vit_tiny", depth=4).double().eval()
    student.load_state_dict(teacher.state_dict())
    method, s_out, t_out = _ready(teacher, student, num_modules=2, alpha=1.0)
    method.double()
    terms = method(s_out, t_out, torch.zeros(6, dtype=torch.long), Progress(epoch=0, step=2, total_steps=10))
    assert set(terms) == {"module0", "module1"}  # vit_tiny has no aux loss
    assert all(abs(v.item()) < 1e-10 for v in terms.values())


def test_module_losses_rebuilt_by_hand():
    torch.manual_seed(2)
    teacher = _vit("vit_tiny", depth=2, dim=16).double()
    student = _vit("vit_moe", depth=2, dim=8, num_experts=2, top_k=1).double()
    method, s_out, t_out = _ready(teacher, student, alpha=0.6, temperature=2.0, aux_weight=0.5)
    method.double()
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    terms = method(s_out, t_out, y, Progress(epoch=0, step=2, total_steps=10))
    t0, t1 = t_out.features["blocks.0"], t_out.features["blocks.1"]
    meta = method.meta_blocks[0]  # meta layer 1
    tail = lambda h: method.meta_head(method.meta_norm(meta(h))[:, 0])  # noqa: E731
    want0 = hybrid_loss(tail(method.stitch_out[0](s_out.features["blocks.0"])), tail(t0), y, alpha=0.6, temperature=2.0)
    s1 = student.head(student.norm(student.blocks[1](method.stitch_in[1](t0)))[:, 0])
    want1 = hybrid_loss(s1, t_out.logits, y, alpha=0.6, temperature=2.0)
    assert terms["module0"].item() == pytest.approx(want0.item(), rel=1e-10)
    assert terms["module1"].item() == pytest.approx(want1.item(), rel=1e-10)
    # block 0's aux loss is from the engine's pass, block 1's from its hybrid (just rerun above)
    assert terms["moe_aux"].item() == pytest.approx(0.5 * student.aux_loss.item(), rel=1e-10)
    assert t1.shape == (6, 5, 16)


def _grads(module):
    return [p.grad is not None and p.grad.abs().sum().item() > 0 for p in module.parameters()]


@pytest.mark.parametrize("step,stage", [(0, "meta"), (2, "module"), (7, "end_to_end")])
def test_each_phase_trains_the_right_parts(step, stage):
    torch.manual_seed(3)
    teacher = _vit("vit_tiny", depth=2, dim=16)
    student = _vit("vit_moe", depth=2, dim=8, num_experts=2, top_k=1)
    method, s_out, t_out = _ready(teacher, student, meta_fraction=0.2, module_fraction=0.5)
    progress = Progress(epoch=0, step=step, total_steps=10)
    assert method.stage_at(progress) == stage
    terms = method(s_out, t_out, torch.arange(6), progress)
    sum(terms.values()).backward()
    meta = [method.meta_blocks, method.meta_norm, method.meta_head]
    stitches = [method.stitch_in[1], method.stitch_out[0]]
    if stage == "meta":
        assert set(terms) == {"meta_imitation", "meta_head"}
        assert all(all(_grads(m)) for m in meta) and not any(_grads(student)) and not any(any(_grads(m)) for m in stitches)
    elif stage == "module":
        assert set(terms) == {"module0", "module1", "moe_aux"}
        assert not any(any(_grads(m)) for m in meta) and all(any(_grads(m)) for m in stitches)
        assert any(_grads(student.blocks[0])) and any(_grads(student.blocks[1])) and any(_grads(student.head))
    else:
        assert set(terms) == {"kd", "ce", "moe_aux"}
        assert not any(any(_grads(m)) for m in meta + stitches) and any(_grads(student.patch_embed))
    assert float(method.stage) == ("meta", "module", "end_to_end").index(stage)


def test_digits_run_switches_phases_at_the_set_fractions(tmp_path):
    vit = {"patch_size": 4, "depth": 2, "heads": 2}
    teacher = fit(tiny_cfg(tmp_path, name="teacher", student={"arch": "vit_tiny", "kwargs": {**vit, "dim": 16}},
                           train={"epochs": 1}))
    cfg = tiny_cfg(tmp_path, name="m2m", teacher={"run": str(teacher.run_dir)},
                   student={"arch": "vit_moe", "kwargs": {**vit, "dim": 8, "num_experts": 2, "top_k": 1}},
                   method={"name": "m2mkd", "params": {"meta_fraction": 1 / 3, "module_fraction": 2 / 3, "meta_heads": 2}},
                   train={"epochs": 3})
    result = fit(cfg)
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    terms = [sorted(k[len("train_"):] for k in row if k.startswith("train_") and k != "train_loss") for row in rows]
    assert terms == [["meta_head", "meta_imitation"], ["module0", "module1", "moe_aux"], ["ce", "kd", "moe_aux"]]
    assert [row["method_stage"] for row in rows] == [0.0, 1.0, 2.0]
    assert result.summary["test_accuracy"] > 0.1 and result.summary["student"] == "vit_moe"
