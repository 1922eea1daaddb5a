"""The forward-pass edits a method may ask of the teacher or the student (taps.py / engine
teacher): stop at the last tap, keep only some tokens, substitute a layer's output, and a method
for which the engine never runs the teacher on the plain batch."""
from __future__ import annotations

import pytest
import torch

from distillery import methods
from distillery.config import AugmentConfig
from distillery.engine.teacher import OnlineTeacher
from distillery.methods.base import Method, Params
from distillery.config import ModelSpec
from distillery.models import build_model
from distillery.taps import Taps, keep_tokens
from distillery.errors import ModelError


def _vit(seed=0):
    torch.manual_seed(seed)
    return build_model(ModelSpec(arch="vit_tiny", kwargs={"dim": 16, "depth": 3, "heads": 2, "patch_size": 4}),
                       in_channels=1, num_classes=10, input_size=(8, 8)).eval().requires_grad_(False)


def _count_calls(module):
    calls = {"n": 0}
    module.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    return calls


def test_until_taps_stops_after_the_last_tap_and_matches_the_full_pass():
    vit = _vit()
    later, head = _count_calls(vit.blocks[2]), _count_calls(vit.head)
    x = torch.randn(4, 1, 8, 8)
    with OnlineTeacher(vit, ["blocks.1"], AugmentConfig(), 0, True) as t:
        full = t.outputs(x)
        assert (later["n"], head["n"]) == (1, 1)
        part = t.outputs(x, until_taps=True)
    assert part.logits is None
    assert (later["n"], head["n"]) == (1, 1)  # blocks.2 and the head never ran the second time
    torch.testing.assert_close(part.features["blocks.1"], full.features["blocks.1"])


def test_keep_tokens_equals_running_the_blocks_on_the_kept_tokens_by_hand():
    vit = _vit()
    x = torch.randn(3, 1, 8, 8)
    index = torch.tensor([[0, 1, 3], [0, 2, 4], [0, 4, 1]])
    with OnlineTeacher(vit, ["blocks.2"], AugmentConfig(), 0, True) as t:
        out = t.outputs(x, keep=("blocks.0", index))
    # By hand: embed, add positions, gather the tokens, run the blocks and the head on [cls].
    tok = vit.patch_embed(x).flatten(2).transpose(1, 2)
    tok = torch.cat([vit.cls_token.expand(3, -1, -1), tok], 1) + vit.pos_embed
    tok = keep_tokens(tok, index)
    for block in vit.blocks:
        tok = block(tok)
    torch.testing.assert_close(out.features["blocks.2"], tok)
    torch.testing.assert_close(out.logits, vit.head(vit.norm(tok)[:, 0]))


def test_keep_tokens_refuses_a_non_token_input():
    with pytest.raises(ModelError, match="token sequence"):
        keep_tokens(torch.randn(2, 5), torch.zeros(2, 1, dtype=torch.long))


def test_replace_substitutes_a_layer_output_and_gradients_reach_the_substitute():
    vit = _vit()
    x = torch.randn(2, 1, 8, 8)
    message = torch.randn(2, 5, 16, requires_grad=True)
    with OnlineTeacher(vit, ["blocks.2"], AugmentConfig(), 0, True) as t:
        out = t.outputs(x, grad=True, replace={"blocks.0": message})
    expected = vit.blocks[2](vit.blocks[1](message))
    torch.testing.assert_close(out.features["blocks.2"], expected)
    out.logits.sum().backward()
    assert message.grad is not None and message.grad.abs().sum() > 0
    # The hooks are gone afterwards: a plain pass is the plain model again.
    torch.testing.assert_close(vit(x), OnlineTeacher(vit, [], AugmentConfig(), 0, True).outputs(x).logits)


class _P(Params):
    pass


@methods.register("masked_probe_for_test", params=_P, live_teacher=True, teacher_on_batch=False)
class _MaskedProbe(Method):
    """Checks the engine contract: no teacher on the batch; the teacher up to its tap on demand."""

    def __init__(self, params, *, student, teacher_layers, num_classes):
        super().__init__(params, student=student, teacher_layers=teacher_layers, num_classes=num_classes)
        self.teacher_taps = ["blocks.0"]
        self.student_taps = ["blocks.0"]

    def forward(self, student_out, teacher_out, targets, progress):
        assert teacher_out is None  # the engine did not run the teacher on the batch
        x = student_out.inputs
        index = torch.tensor([0, 1, 2]).expand(x.shape[0], -1)
        t = self.teacher_forward(x, until_taps=True, keep=("blocks.0", index))
        s = self.student_forward(x, features=True, keep=("blocks.0", index))
        assert t.logits is None and t.features["blocks.0"].shape[1] == 3
        assert s.features["blocks.0"].shape[1] == 3
        return {"ce": torch.nn.functional.cross_entropy(student_out.logits, targets),
                "feat": (s.features["blocks.0"] - t.features["blocks.0"]).pow(2).mean()}


def test_engine_does_not_run_the_teacher_on_the_batch_when_the_method_says_so(tmp_path, one_torch_thread):
    from conftest import tiny_cfg
    from distillery.engine import fit

    vit = _vit(1)
    cfg = tiny_cfg(tmp_path, method={"name": "masked_probe_for_test"},
                   teacher={"model": {"arch": "vit_tiny", "kwargs": {"dim": 16, "depth": 3, "heads": 2, "patch_size": 4}}},
                   student={"arch": "vit_tiny", "kwargs": {"dim": 16, "depth": 2, "heads": 2, "patch_size": 4}},
                   train={"epochs": 1, "progress": False, "report": False})
    head = _count_calls(vit.head)
    result = fit(cfg, teacher=vit)
    assert result.summary["epochs"] == 1
    # The head ran only for the teacher's one test-set evaluation (batched), never per step.
    n_eval_batches = head["n"]
    assert n_eval_batches <= 2
    with pytest.raises(RuntimeError, match="teacher_on_batch=False needs live_teacher"):
        methods.register("bad_for_test", params=_P, teacher_on_batch=False)(_MaskedProbe)
