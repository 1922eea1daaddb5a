"""hybrid_kd (Shi et al. 2023, Hybrid Distillation): token relations from a ViT's qkv against the
attention computed by hand, the relation loss, the progressive masking schedule, the teacher
stopping at its deepest tap, the student's dropped tokens, bad input, and short fits on digits."""
from __future__ import annotations

import json
import math

import pytest
import torch

from distillery.config import AugmentConfig, ModelSpec
from distillery.engine.teacher import OnlineTeacher
from distillery.engine.trainer import Ensemble
from distillery.losses.hybrid_kd import (kept_at, progressive_keep_counts, redundancy_order, relation_kl,
                                         token_relation)
from distillery.methods import get_spec
from distillery.methods.base import ModelOutput, Progress
from distillery.models import build_model
from distillery.taps import Taps

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VIT = {"arch": "vit_tiny", "kwargs": {"dim": 16, "depth": 3, "heads": 2, "patch_size": 2}}
CNN = {"arch": "cnn", "kwargs": {"width": 8}}
PARAMS = {"relation_blocks": [1, 2], "teacher_heads": 2}


def _model(spec, seed=0):
    torch.manual_seed(seed)
    return build_model(ModelSpec(**spec), in_channels=1, num_classes=10, input_size=(8, 8))


def _pair(seed=0):
    return Ensemble([_model(CNN, seed), _model(VIT, seed + 1)]).eval().requires_grad_(False)


def _method(student, teacher, **params):
    spec = get_spec("hybrid_kd")
    method = spec.cls(spec.validate_params({**PARAMS, **params}), student=student,
                      teacher_layers=teacher.default_feature_layers, num_classes=10)
    source = OnlineTeacher(teacher, method.teacher_taps, AugmentConfig(), 0, True, on_batch=False)
    taps = Taps(student, method.student_taps)
    source.__enter__(), taps.__enter__()
    object.__setattr__(method, "_teacher_fn", source.outputs)
    object.__setattr__(method, "_student_taps", taps)
    return method, taps


def _outputs(student, taps, x):
    taps.clear()
    return ModelOutput(student(x), taps.collect(), x)


# -- token relations from qkv -------------------------------------------------------------------

def test_relation_from_qkv_is_the_attention_the_block_really_uses():
    attn = _model(VIT).blocks[0].attn
    x = torch.randn(2, 5, 16)
    qkv = attn.qkv(x)
    attention_heads = []
    # By hand: head h uses columns h*8:(h+1)*8 of q, k, v (the zoo reshape is (3, heads, head_dim)).
    for h in range(2):
        q, k = qkv[..., h * 8:(h + 1) * 8], qkv[..., 16 + h * 8:16 + (h + 1) * 8]
        attention_heads.append(torch.softmax(q @ k.transpose(1, 2) / math.sqrt(8), -1))
    from distillery.losses.hybrid_kd import attention_from_qkv
    a = attention_from_qkv(qkv, 2)
    torch.testing.assert_close(a, torch.stack(attention_heads, 1))
    # ... and these maps reproduce the module's output: softmax(QK^T/sqrt d) V, heads concatenated, proj.
    v = qkv[..., 32:].reshape(2, 5, 2, 8).transpose(1, 2)
    torch.testing.assert_close(attn.proj((a @ v).transpose(1, 2).reshape(2, 5, 16)), attn(x))
    torch.testing.assert_close(token_relation(qkv, 2), a.mean(1))


def test_relation_on_kept_tokens_equals_attention_among_those_tokens_only():
    qkv = torch.randn(2, 6, 12)
    tokens = torch.tensor([[0, 4, 2], [0, 1, 5]])
    sub = torch.stack([qkv[b, tokens[b]] for b in range(2)])
    torch.testing.assert_close(token_relation(qkv, 2, tokens), token_relation(sub, 2))
    assert torch.allclose(token_relation(qkv, 2, tokens).sum(-1), torch.ones(2, 3))


def test_relation_kl_matches_the_definition():
    t = torch.tensor([[[0.5, 0.5], [0.9, 0.1]]], dtype=torch.float64)
    s = torch.tensor([[[0.25, 0.75], [0.9, 0.1]]], dtype=torch.float64)
    by_hand = (0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75) + 0.0) / 2
    assert relation_kl(s, t).item() == pytest.approx(by_hand, abs=1e-6)
    assert relation_kl(t, t).item() == pytest.approx(0.0, abs=1e-7)
    logits = torch.randn(1, 3, 3, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda z: relation_kl(torch.softmax(z, -1), t.new_full((1, 3, 3), 1 / 3)), (logits,))


# -- progressive masking schedule ----------------------------------------------------------------

def test_progressive_schedule_values():
    assert progressive_keep_counts(16, [0.75, 0.5]) == [12, 8]
    assert progressive_keep_counts(49, [0.75, 0.5, 0.25]) == [37, 24, 12]
    assert progressive_keep_counts(4, [0.1]) == [1]  # never below one token
    drop_before, counts = [1, 2], [12, 8]
    assert [kept_at(b, drop_before, counts, 16) for b in range(4)] == [16, 12, 8, 8]
    with pytest.raises(ValueError, match="must not increase"):
        progressive_keep_counts(16, [0.5, 0.75])
    assert torch.equal(redundancy_order(torch.tensor([[0.1, 0.5, 0.2, 0.9]])), torch.tensor([[3, 1, 2, 0]]))


def test_vit_student_drops_the_least_attended_tokens_stage_by_stage_and_teacher_stops_at_its_tap():
    teacher, student = _pair(), _model(VIT, 7)
    method, taps = _method(student, teacher, drop_before=[1, 2], keep_ratios=[0.75, 0.5], relation_blocks=[1])
    x = torch.randn(3, 1, 8, 8)
    method.setup(_outputs(student, taps, x), None)
    sizes, inputs, later = [], {}, {"n": 0}

    def record(i):
        def hook(_m, a):
            sizes.append(a[0].shape[1])
            inputs[i] = a[0]
        return hook

    hooks = [blk.register_forward_pre_hook(record(i)) for i, blk in enumerate(student.blocks)]
    member1 = teacher.members[1]
    for m in (member1.blocks[2], member1.head):
        m.register_forward_hook(lambda *_: later.__setitem__("n", later["n"] + 1))
    terms = method(_outputs(student, taps, x), None, torch.zeros(3, dtype=torch.long), Progress(0, 0, 1))
    assert later["n"] == 0  # the relation teacher stopped after blocks.1's qkv
    assert sizes[3:] == [17, 13, 9]  # the masked pass: 16 patches + cls, then 12 + cls, then 8 + cls
    assert terms["relation"] >= 0 and torch.isfinite(terms["feature"])
    for h in hooks:
        h.remove()
    # The 12 tokens kept before blocks.1 are the class token and the 12 patches the teacher's [CLS]
    # attends most (its deepest relation block), most attended first.
    from distillery.losses.hybrid_kd import attention_from_qkv
    from distillery.taps import keep_tokens
    t, order = method._teacher(x)
    cls = attention_from_qkv(t.features["members.1.blocks.1.attn.qkv"], 2).mean(1)[:, 0, 1:]
    kept = order[:, :12]
    torch.testing.assert_close(cls.gather(1, kept), cls.sort(1, descending=True).values[:, :12])
    with torch.no_grad():
        full_block0 = student.blocks[0](inputs[0])
    index = torch.cat([torch.zeros(3, 1, dtype=torch.long), 1 + kept], 1)
    torch.testing.assert_close(inputs[1], keep_tokens(full_block0, index))


# -- bad input --------------------------------------------------------------------------------

def test_bad_teachers_and_parameters_are_refused_with_one_message():
    spec = get_spec("hybrid_kd")
    student = _model(VIT, 3)
    with pytest.raises(ValueError, match="exactly two teachers"):
        spec.cls(spec.validate_params(PARAMS), student=student, teacher_layers=["features.1"], num_classes=10)
    with pytest.raises(ValueError, match="relation_blocks"):
        spec.cls(spec.validate_params({}), student=student, teacher_layers=["members.0.features.1"], num_classes=10)
    with pytest.raises(ValueError, match="must not increase"):
        spec.cls(spec.validate_params({**PARAMS, "keep_ratios": [0.5, 0.9]}), student=student,
                 teacher_layers=["members.0.features.1"], num_classes=10)
    three = Ensemble([_model(CNN), _model(VIT, 1), _model(VIT, 2)]).eval().requires_grad_(False)
    method, taps = _method(student, three)
    with pytest.raises(ValueError, match="exactly two teachers"):
        method.setup(_outputs(student, taps, torch.randn(2, 1, 8, 8)), None)


# -- short fits ---------------------------------------------------------------------------------

@pytest.mark.parametrize("student_spec", [VIT, CNN], ids=["vit-student", "cnn-student"])
def test_short_fit_cnn_and_vit_teachers(tmp_path, student_spec):
    from conftest import tiny_cfg
    from distillery.engine import fit

    cfg = tiny_cfg(tmp_path, method={"name": "hybrid_kd", "params": PARAMS},
                   teacher={"ensemble": [{"model": CNN}, {"model": VIT}]}, student=student_spec,
                   train={"epochs": 2, "progress": False, "report": False, "optimizer": {"name": "adam", "lr": 0.003}})
    result = fit(cfg, teacher=_pair())
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["train_feature"] < rows[0]["train_feature"]
    assert rows[-1]["method_kept_token_fraction"] == (0.5 if student_spec is VIT else 1.0)
    assert all(math.isfinite(r["train_relation"]) for r in rows)
    if student_spec is CNN:  # a ViT student needs more than two epochs of digits
        assert result.summary["test_accuracy"] > 0.2
