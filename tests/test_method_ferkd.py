"""FerKD (Shen 2023): random-resized crops against their geometry, the label adaptation rule on
hand-built confidences (drop easy, smooth hard, keep the rest; boundaries included), the kept-crop
soft CE by hand and by gradcheck, the teacher asked about exactly the views the student trains on,
the cache refused, and a digits run that learns and resumes to the same weights."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import interrupt_then_resume, same_weights, tiny_cfg
from distillery import methods
from distillery.config import AugmentConfig, DataConfig, ModelSpec, config_from_dict
from distillery.data import load_data
from distillery.engine.teacher import OnlineTeacher
from distillery.errors import ConfigError
from distillery.losses import ferkd as FK
from distillery.methods.base import ModelOutput, Progress
from distillery.models import build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------- crops


def test_random_resized_boxes_follow_the_scale_and_ratio():
    g = torch.Generator().manual_seed(0)
    boxes = FK.random_resized_boxes(2000, g, scale=(0.3, 0.7), ratio=(0.75, 4 / 3)).double()
    top, left, h, w = boxes.unbind(1)
    assert bool((top >= 0).all() and (left >= 0).all() and (top + h <= 1 + 1e-6).all() and (left + w <= 1 + 1e-6).all())
    area = h * w
    # with these ranges no box needs clipping (sqrt(0.7 * 4/3) < 1): area and aspect are exact
    assert float(area.min()) >= 0.3 - 1e-6 and float(area.max()) <= 0.7 + 1e-6
    assert float((w / h).min()) >= 0.75 - 1e-5 and float((w / h).max()) <= 4 / 3 + 1e-5
    assert abs(float(area.mean()) - 0.5) < 0.02  # uniform in [0.3, 0.7]
    assert torch.equal(FK.random_resized_boxes(5, torch.Generator().manual_seed(3)),
                       FK.random_resized_boxes(5, torch.Generator().manual_seed(3)))
    # a box that cannot fit (area 1 at a ratio != 1) is the whole image, as torchvision's fallback
    full = FK.random_resized_boxes(50, g, scale=(1.0, 1.0))
    assert torch.equal(full, torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(50, 4))
    with pytest.raises(ValueError, match="crop scale"):
        FK.random_resized_boxes(2, g, scale=(0.0, 1.0))


def test_crop_resize_samples_the_box():
    # A horizontal ramp f(y, x) = x: bilinear resampling of a linear image is exact, so output
    # column i must read the source at left*W + (i + 0.5) * w - 0.5 (pixel centres mapped into the box).
    H = W = 8
    ramp = torch.arange(W, dtype=torch.float64).expand(1, 1, H, W).clone()
    box = torch.tensor([[0.0, 0.25, 1.0, 0.5]])
    out = FK.crop_resize(ramp, box)
    expected = 0.25 * W + (torch.arange(W, dtype=torch.float64) + 0.5) * 0.5 - 0.5
    torch.testing.assert_close(out[0, 0], expected.expand(H, W))
    x = torch.randn(3, 2, 6, 6)
    torch.testing.assert_close(FK.crop_resize(x, torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(3, 4)), x)  # the full box
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        FK.crop_resize(torch.randn(3, 64), torch.zeros(3, 4))


# ----------------------------------------------------------------------------- the rule


def test_adapt_crop_labels_on_hand_built_confidences():
    # true-class probabilities 0.95 / 0.5 / 0.1 / 0.9 / 0.2 with thresholds easy 0.9, hard 0.2
    probs = torch.tensor([[0.95, 0.05, 0.00], [0.3, 0.5, 0.2], [0.1, 0.0, 0.9], [0.05, 0.05, 0.9], [0.2, 0.7, 0.1]])
    y = torch.tensor([0, 1, 0, 2, 0])
    q, w, kind = FK.adapt_crop_labels(probs, y, easy_threshold=0.9, hard_threshold=0.2, smoothing=0.3)
    assert kind.tolist() == [FK.EASY, FK.SOFT, FK.HARD, FK.EASY, FK.SOFT]  # >= easy drops; == hard is kept
    assert w.tolist() == [0.0, 1.0, 1.0, 0.0, 1.0]
    torch.testing.assert_close(q[1], probs[1])  # a kept crop keeps the teacher's soft label
    torch.testing.assert_close(q[4], probs[4])
    torch.testing.assert_close(q[2], torch.tensor([0.7 + 0.1, 0.1, 0.1]))  # (1 - eps) onehot + eps / C
    # limits: no drop, no smoothing -> plain teacher soft labels everywhere
    q0, w0, k0 = FK.adapt_crop_labels(probs, y, easy_threshold=1.0, hard_threshold=0.0)
    assert torch.equal(q0, probs) and bool((w0 == 1).all()) and bool((k0 == FK.SOFT).all())
    with pytest.raises(ValueError, match="hard_threshold <= easy_threshold"):
        FK.adapt_crop_labels(probs, y, easy_threshold=0.2, hard_threshold=0.5)
    with pytest.raises(ValueError, match="class ids"):
        FK.adapt_crop_labels(probs, torch.tensor([0, 1, 0, 2, -100]), easy_threshold=0.9, hard_threshold=0.2)


def test_ferkd_loss_by_hand_and_gradcheck():
    z = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0], [0.0, 3.0, 0.0]], dtype=torch.float64)
    q = torch.tensor([[0.7, 0.2, 0.1], [0.0, 0.0, 1.0], [1 / 3, 1 / 3, 1 / 3]], dtype=torch.float64)
    w = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)

    def ce(zi, qi):
        lse = math.log(sum(math.exp(v) for v in zi.tolist()))
        return -sum(qc * (zc - lse) for qc, zc in zip(qi.tolist(), zi.tolist()))

    assert FK.ferkd_loss(z, q, w).item() == pytest.approx((ce(z[0], q[0]) + ce(z[2], q[2])) / 2, rel=1e-12)
    dropped = FK.ferkd_loss(z.clone().requires_grad_(), q, torch.zeros(3, dtype=torch.float64))
    assert dropped.item() == 0.0 and dropped.requires_grad
    zz = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    qq = torch.softmax(torch.randn(4, 5, dtype=torch.float64), -1)
    assert torch.autograd.gradcheck(lambda a: FK.ferkd_loss(a, qq, torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64)), (zz,))


# ----------------------------------------------------------------------------- the method


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


def _method(teacher, **params):
    torch.manual_seed(1)
    student = build_model(ModelSpec(arch="mlp", kwargs={"hidden": [16]}), in_channels=1, num_classes=10, input_size=(8, 8))
    spec = methods.get_spec("ferkd")
    m = spec.cls(spec.validate_params(params), student=student, teacher_layers=None, num_classes=10)
    calls = []
    live = OnlineTeacher(teacher, [], AugmentConfig(), 0, True)

    def spy(x, grad=False):
        calls.append(x.detach().clone())
        return live.outputs(x, grad=grad)

    object.__setattr__(m, "_teacher_fn", spy)
    return m, student, calls


def test_teacher_and_student_see_the_same_views_and_the_rule_is_applied(teacher):
    m, student, calls = _method(teacher, easy_threshold=0.95, hard_threshold=0.3, selfmix=0.5)
    data = load_data(DataConfig(name="digits"))
    x, y = data.train.inputs[:48], data.train.labels[:48]
    terms = m(ModelOutput(student(x), {}, x), ModelOutput(teacher(x)), y, Progress(0.0, 5, 10))
    view = m.views(x, 5)
    assert len(calls) == 1 and torch.equal(calls[0], view)
    assert not torch.equal(view, x) and torch.equal(m.views(x, 5), view) and not torch.equal(m.views(x, 6), view)
    with torch.no_grad():
        probs = torch.softmax(teacher(view), -1)
        q, w, kind = FK.adapt_crop_labels(probs, y, easy_threshold=0.95, hard_threshold=0.3, smoothing=0.1)
        expected = FK.ferkd_loss(student(view), q, w)
    torch.testing.assert_close(terms["ferkd"], expected)
    shares = m.log_values()
    counts = torch.bincount(kind, minlength=3).double() / 48
    assert shares == pytest.approx({"easy_dropped": counts[0].item(), "soft_kept": counts[1].item(),
                                    "hard_smoothed": counts[2].item()})
    assert 0 < shares["easy_dropped"] < 1 and m.log_values() == {}  # reset after each report


def test_full_crops_without_selfmix_are_the_images(teacher):
    m, student, calls = _method(teacher, crop_scale=(1.0, 1.0), selfmix=0.0)
    x = torch.randn(6, 1, 8, 8)
    torch.testing.assert_close(m.views(x, 0), x)


def test_bad_params_and_inputs_are_named():
    spec = methods.get_spec("ferkd")
    with pytest.raises(ValueError, match="hard_threshold"):
        spec.validate_params({"easy_threshold": 0.3, "hard_threshold": 0.5})
    with pytest.raises(ValueError, match="crop_scale"):
        spec.validate_params({"crop_scale": [0.9, 0.5]})
    m, _, _ = _method(None)
    with pytest.raises(ValueError, match="ferkd crops images"):
        m(ModelOutput(torch.randn(4, 10), {}, torch.randn(4, 64)), ModelOutput(torch.randn(4, 10)), torch.arange(4),
          Progress(0.0, 0, 1))


def test_a_teacher_cache_is_refused():
    assert methods.get_spec("ferkd").live_teacher
    with pytest.raises(ConfigError, match="no cache"):
        config_from_dict({"student": {"arch": "mlp"}, "method": {"name": "ferkd"}, "teacher": {"run": "runs/t", "cache": True}})


def test_ferkd_on_digits_learns_and_resumes_to_the_same_weights(tmp_path, monkeypatch, teacher):
    from distillery.engine import fit

    common = dict(teacher={"model": {"arch": "mlp", "kwargs": {"hidden": [64]}}},
                  method={"name": "ferkd", "params": {"crop_scale": [0.5, 1.0]}},
                  train={"epochs": 2, "progress": False, "report": False, "checkpoint_every": 15})
    full = fit(tiny_cfg(tmp_path / "a", **common), teacher=teacher)
    assert full.summary["method"] == "ferkd" and full.summary["test_accuracy"] > 0.3  # chance is 0.1; 8x8 crops are hard after 2 epochs
    row = json.loads((full.run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert math.isfinite(row["train_ferkd"]) and row["method_soft_kept"] > 0
    assert row["method_easy_dropped"] + row["method_soft_kept"] + row["method_hard_smoothed"] == pytest.approx(1.0)

    import distillery.engine.trainer as trainer

    monkeypatch.setattr(trainer, "load_teacher", lambda *a, **k: teacher)
    resumed = interrupt_then_resume(tiny_cfg(tmp_path / "b", **common), monkeypatch, at_step=30)
    assert same_weights(full, resumed)
