"""masked_kd (DMAE, Bai et al. 2023): the mask, the losses against their definitions, the masked
and truncated teacher pass, the measured FLOPs saving, bad input, and short fits on digits."""
from __future__ import annotations

import json

import pytest
import torch

from distillery.config import AugmentConfig, ModelSpec
from distillery.engine.teacher import OnlineTeacher
from distillery.losses.masked_kd import (feature_distance, grid_tokens, masked_reconstruction, patchify,
                                          random_visible_patches, zero_masked_patches)
from distillery.methods import get_spec
from distillery.models import build_model
from distillery.taps import Taps

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VIT = {"arch": "vit_tiny", "kwargs": {"dim": 16, "depth": 3, "heads": 2, "patch_size": 2}}
CNN = {"arch": "cnn", "kwargs": {"width": 8}}


def _model(spec, seed=0):
    torch.manual_seed(seed)
    return build_model(ModelSpec(**spec), in_channels=1, num_classes=10, input_size=(8, 8))


def _method(student, teacher, **params):
    """A masked_kd wired by hand the way the engine wires it: live teacher, student taps."""
    spec = get_spec("masked_kd")
    method = spec.cls(spec.validate_params(params), student=student,
                      teacher_layers=teacher.default_feature_layers, num_classes=10)
    source = OnlineTeacher(teacher.eval().requires_grad_(False), method.teacher_taps, AugmentConfig(), 0, True,
                           on_batch=False)
    taps = Taps(student, method.student_taps)
    source.__enter__(), taps.__enter__()
    object.__setattr__(method, "_teacher_fn", source.outputs)
    object.__setattr__(method, "_student_taps", taps)
    return method


# -- the mask ---------------------------------------------------------------------------------

@pytest.mark.parametrize("n, ratio", [(16, 0.75), (49, 0.75), (16, 0.0), (10, 0.95)])
def test_mask_keeps_exactly_n_minus_round_ratio_n_distinct_sorted_patches(n, ratio):
    visible = random_visible_patches(5, n, ratio, generator=torch.Generator().manual_seed(0))
    k = max(1, n - round(n * ratio))
    assert visible.shape == (5, k)
    for row in visible:
        assert len(set(row.tolist())) == k and row.min() >= 0 and row.max() < n
        assert torch.equal(row, row.sort().values)
    if 0 < ratio:  # per-sample masks (MAE's per-sample shuffle), not one mask for the batch
        assert len({tuple(r.tolist()) for r in visible}) > 1


def test_mask_ratio_of_one_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="at least one patch must stay visible"):
        random_visible_patches(2, 16, 1.0)


def test_zeroed_input_keeps_exactly_the_visible_patches():
    x = torch.arange(1, 65, dtype=torch.float).reshape(1, 1, 8, 8)
    visible = torch.tensor([[0, 5, 15]])  # patches (row, col) (0,0), (1,1), (3,3) of a 4x4 grid
    z = zero_masked_patches(x, visible, 2)
    expected = torch.zeros_like(x)
    for p in (0, 5, 15):
        r, c = divmod(p, 4)
        expected[..., 2 * r:2 * r + 2, 2 * c:2 * c + 2] = x[..., 2 * r:2 * r + 2, 2 * c:2 * c + 2]
    assert torch.equal(z, expected)
    # patchify's raster order is the ViT's token order: patch 5 is rows 2-3, columns 2-3
    assert torch.equal(patchify(x, 2)[0, 5], x[0, 0, 2:4, 2:4].reshape(-1))


# -- the losses ---------------------------------------------------------------------------------

def test_reconstruction_is_mse_on_masked_patches_only_with_normalised_targets():
    torch.manual_seed(0)
    x, pred = torch.randn(2, 1, 4, 4), torch.randn(2, 4, 4, dtype=torch.float64)
    visible = torch.tensor([[0], [3]])
    patches = patchify(x, 2).double()
    total, count = 0.0, 0
    for b in range(2):
        for p in range(4):
            if p == visible[b, 0]:
                continue
            t = patches[b, p]
            t = (t - t.mean()) / (t.var() + 1e-6).sqrt()
            total += ((pred[b, p] - t) ** 2).mean()
            count += 1
    torch.testing.assert_close(masked_reconstruction(pred, x, visible, 2).double(), total / count)
    # Changing the prediction on a visible patch changes nothing.
    pred2 = pred.clone()
    pred2[0, 0] += 5
    torch.testing.assert_close(masked_reconstruction(pred2, x, visible, 2), masked_reconstruction(pred, x, visible, 2))
    torch.autograd.gradcheck(lambda p: masked_reconstruction(p, x.double(), visible, 2),
                             (pred.clone().requires_grad_(),))


def test_feature_distances_match_their_definitions():
    s, t = torch.tensor([[0.5, 2.0]]), torch.zeros(1, 2)
    torch.testing.assert_close(feature_distance(s, t, distance="smooth_l1"), torch.tensor((0.125 + 1.5) / 2))
    torch.testing.assert_close(feature_distance(s, t, distance="l1"), torch.tensor(1.25))
    torch.testing.assert_close(feature_distance(s, t, distance="mse"), torch.tensor((0.25 + 4) / 2))
    with pytest.raises(ValueError, match="project the student"):
        feature_distance(torch.zeros(1, 3), torch.zeros(1, 2))


def test_grid_tokens_average_each_patch_cell():
    m = torch.arange(16.0).reshape(1, 1, 4, 4)
    tok = grid_tokens(m, (2, 2))
    torch.testing.assert_close(tok[0, :, 0], torch.tensor([2.5, 4.5, 10.5, 12.5]))


# -- the method: the masked passes -----------------------------------------------------------

def _record_keep(method):
    seen = {}
    t_fn, s_fn = method.teacher_forward, method.student_forward
    method.teacher_forward = lambda x, **k: seen.setdefault("t", (x, k)) and t_fn(x, **k)
    method.student_forward = lambda x, **k: seen.setdefault("s", (x, k)) and s_fn(x, **k)
    return seen


def test_teacher_and_student_get_the_same_mask_class_token_first_and_the_teacher_stops_at_its_tap():
    teacher, student = _model(VIT), _model(VIT, 1)
    method = _method(student, teacher, teacher_layer="blocks.0", student_layer="blocks.1", recon_weight=0)
    x = torch.randn(4, 1, 8, 8)
    method.setup(type("Out", (), {"inputs": x, "features": {}})(), None)
    later = {"n": 0}
    teacher.blocks[1].register_forward_hook(lambda *_: later.__setitem__("n", later["n"] + 1))
    teacher.head.register_forward_hook(lambda *_: later.__setitem__("n", later["n"] + 1))
    seen = _record_keep(method)
    from distillery.methods.base import ModelOutput, Progress
    terms = method(ModelOutput(student(x), {}, x), None, torch.zeros(4, dtype=torch.long), Progress(0, 0, 1))
    assert later["n"] == 0  # blocks.1 and the head of the teacher never ran
    (_, tk), (_, sk) = seen["t"], seen["s"]
    assert tk["until_taps"] is True
    assert tk["keep"][0] == sk["keep"][0] == "blocks.0"
    t_idx, s_idx = tk["keep"][1], sk["keep"][1]
    assert torch.equal(t_idx, s_idx) and (t_idx[:, 0] == 0).all()  # one mask; the class token kept
    assert t_idx.shape == (4, 1 + 4)  # 16 patches, 75% masked: 4 visible
    assert torch.isfinite(terms["feature"]) and terms["feature"] > 0


def test_a_cnn_student_sees_the_teachers_visible_patches_zeroed_elsewhere():
    teacher, student = _model(VIT), _model(CNN, 1)
    method = _method(student, teacher, recon_weight=0)
    x = torch.rand(3, 1, 8, 8) + 0.5
    method.setup(type("Out", (), {"inputs": x, "features": {}})(), None)
    seen = _record_keep(method)
    from distillery.methods.base import ModelOutput, Progress
    student.train()
    logits = student(x)  # the engine's unmasked pass moves the BatchNorm statistics ...
    before = [b.clone() for b in student.buffers()]
    method(ModelOutput(logits, {}, x), None, torch.zeros(3, dtype=torch.long), Progress(0, 0, 1))
    visible = seen["t"][1]["keep"][1][:, 1:] - 1
    torch.testing.assert_close(seen["s"][0], zero_masked_patches(x, visible, 2))
    # ... the masked pass does not (test images are unmasked); momentum is restored afterwards.
    bn = student.features[0][1]
    for b, a in zip(before, student.buffers()):
        if b.dtype.is_floating_point:
            torch.testing.assert_close(a, b)
    assert bn.momentum == 0.1


def test_flops_fraction_is_the_measured_ratio_cnn_teacher_loses_exactly_its_head():
    from torch.utils.flop_counter import FlopCounterMode

    teacher = _model(CNN)
    method = _method(_model(CNN, 1), teacher, teacher_layer="features.3", recon_weight=0)
    x = torch.randn(4, 1, 8, 8)
    method.setup(type("Out", (), {"inputs": x, "features": {}})(), None)
    with FlopCounterMode(display=False) as fc:
        teacher(x)
    full = fc.get_total_flops()
    head = 2 * 4 * teacher.head.in_features * teacher.head.out_features
    # A CNN on zeroed patches costs what it costs on the whole image; stopping at features.3 saves the head.
    assert method.log_values()["teacher_flops_fraction"] == pytest.approx((full - head) / full)


def test_vit_teacher_flops_fall_with_the_mask_and_the_depth():
    teacher = _model(VIT)
    fractions = []
    for layer, ratio in [("blocks.2", 0.0), ("blocks.2", 0.75), ("blocks.0", 0.75)]:
        method = _method(_model(CNN, 1), teacher, teacher_layer=layer, mask_ratio=ratio, recon_weight=0)
        method.setup(type("Out", (), {"inputs": torch.randn(4, 1, 8, 8), "features": {}})(), None)
        fractions.append(method.log_values()["teacher_flops_fraction"])
    assert 0.95 < fractions[0] < 1.0  # everything but norm + head
    assert fractions[1] < 0.4  # 5 of 17 tokens
    assert fractions[2] < fractions[1] / 2  # one block of three


# -- bad input ---------------------------------------------------------------------------------

def test_bad_input_is_refused_with_the_fix():
    spec = get_spec("masked_kd")
    with pytest.raises(ValueError, match="mask_ratio"):
        spec.validate_params({"mask_ratio": 1.0})
    with pytest.raises(ValueError, match="patch_size to the student's patch size"):
        method = _method(_model(VIT, 1), _model(CNN), patch_size=4)
        method.setup(type("Out", (), {"inputs": torch.randn(2, 1, 8, 8), "features": {}})(), None)
    with pytest.raises(ValueError, match="must be images"):
        method = _method(_model(CNN, 1), _model(CNN))
        method.setup(type("Out", (), {"inputs": torch.randn(2, 64), "features": {}})(), None)


# -- short fits ---------------------------------------------------------------------------------

@pytest.mark.parametrize("teacher_spec, student_spec", [(CNN, VIT), (VIT, CNN)], ids=["cnn->vit", "vit->cnn"])
def test_short_fit_cross_family(tmp_path, teacher_spec, student_spec):
    from conftest import tiny_cfg
    from distillery.engine import fit

    cfg = tiny_cfg(tmp_path, method={"name": "masked_kd"}, teacher={"model": teacher_spec}, student=student_spec,
                   train={"epochs": 2, "progress": False, "report": False, "optimizer": {"name": "adam", "lr": 0.003}})
    result = fit(cfg, teacher=_model(teacher_spec).eval().requires_grad_(False))
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert 0 < rows[-1]["method_teacher_flops_fraction"] < 1
    assert rows[-1]["train_reconstruction"] < rows[0]["train_reconstruction"]
    assert rows[-1]["train_feature"] < rows[0]["train_feature"]
    assert result.summary["test_accuracy"] > 0.2  # CE on the unmasked batch trains the student (chance: 0.1)
