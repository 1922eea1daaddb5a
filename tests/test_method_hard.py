"""HARD (Nix, Burg & Sinz 2023): the affine warp against its definition (identity, one-pixel shift,
flip), the identity-initialised augmentor, gradient reversal, the one-backward min-max (student
descends, augmentor ascends the disagreement and descends the teacher shift -- checked against
separate autograd computations), log_values, the PNG grid, errors, the cache refused, and a short run."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_cfg
from distillery import methods
from distillery.config import AugmentConfig, DataConfig, ModelSpec, config_from_dict
from distillery.data import load_data
from distillery.engine.teacher import OnlineTeacher
from distillery.errors import ConfigError
from distillery.losses import logits as L
from distillery.losses.hard import apply_affine, disagreement, identity_deviation, reverse_gradient, teacher_shift
from distillery.methods.base import ModelOutput, Progress
from distillery.methods.hard import AffineAugmentor
from distillery.models import build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------- the warp


def test_identity_warp_and_identity_initialised_augmentor_reproduce_the_input_exactly():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 8, 6, generator=g)
    aug = AffineAugmentor(3, noise_dim=4, hidden=8, bound=0.5, gain=10.0)
    theta = aug(x, torch.randn(5, 4, generator=g))
    assert torch.equal(theta, torch.eye(2, 3).expand(5, 2, 3))
    assert torch.equal(apply_affine(x, theta), x)
    assert identity_deviation(theta).item() == 0.0


def test_warp_by_hand_shift_and_flip():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    # output pixel at normalised x samples input at x + 2/W: one pixel to the left, zeros come in
    shift = torch.tensor([[[1.0, 0.0, 2 / 4], [0.0, 1.0, 0.0]]])
    expected = torch.cat([x[..., 1:], torch.zeros(1, 1, 4, 1)], -1)
    torch.testing.assert_close(apply_affine(x, shift), expected)
    flip = torch.tensor([[[-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    torch.testing.assert_close(apply_affine(x, flip), x.flip(-1))
    assert identity_deviation(flip).item() == pytest.approx(2 / 6)
    with pytest.raises(ValueError, match="image batches"):
        apply_affine(torch.randn(2, 16), torch.eye(2, 3).expand(2, 2, 3))


def test_augmentor_is_bounded():
    aug = AffineAugmentor(1, noise_dim=2, hidden=4, bound=0.3, gain=1.0)
    with torch.no_grad():
        aug.head[-1].bias.fill_(100.0)  # saturate tanh
    theta = aug(torch.randn(2, 1, 8, 8), torch.randn(2, 2))
    torch.testing.assert_close(theta - torch.eye(2, 3), torch.full((2, 2, 3), 0.3))


# ----------------------------------------------------------------------------- gradient reversal


def test_gradient_reversal_flips_and_scales_the_gradient_only():
    w = torch.tensor([1.5, -2.0], dtype=torch.float64, requires_grad=True)
    x = torch.tensor([0.5, 3.0], dtype=torch.float64)
    y = reverse_gradient(w * x, 2.0)
    assert torch.equal(y, w.detach() * x)  # identity forward
    (y ** 2).sum().backward()
    torch.testing.assert_close(w.grad, -2.0 * 2 * (w.detach() * x) * x)
    # autograd view: the vector-Jacobian product is -scale * v
    v = torch.randn(2, dtype=torch.float64)
    a = torch.randn(2, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(reverse_gradient(a, 0.7), a, v)
    torch.testing.assert_close(grad, -0.7 * v)


def test_disagreement_and_teacher_shift_are_hinton_kd():
    g = torch.Generator().manual_seed(3)
    s, t, t0 = (torch.randn(4, 5, generator=g) for _ in range(3))
    torch.testing.assert_close(disagreement(s, t, temperature=2.0), L.kd(s, t, temperature=2.0))
    torch.testing.assert_close(teacher_shift(t, t0, temperature=2.0), L.kd(t, t0, temperature=2.0))
    assert teacher_shift(t0, t0).item() == pytest.approx(0.0, abs=1e-7)


# ----------------------------------------------------------------------------- the method


def _mlp(hidden, seed):
    torch.manual_seed(seed)
    return build_model(ModelSpec(arch="mlp", kwargs={"hidden": [hidden]}), in_channels=1, num_classes=10, input_size=(8, 8))


def _method(student, teacher, **params):
    spec = methods.get_spec("hard")
    m = spec.cls(spec.validate_params(params), student=student, teacher_layers=None, num_classes=10)
    if teacher is not None:  # attach the live teacher the way the engine does
        object.__setattr__(m, "_teacher_fn", OnlineTeacher(teacher, [], AugmentConfig(), 0, True).outputs)
    return m


def test_one_backward_student_descends_augmentor_ascends():
    student, teacher = _mlp(16, 0), _mlp(32, 1).eval().requires_grad_(False)
    m = _method(student, teacher, adversary_weight=0.5, teacher_weight=2.0, aug_weight=1.0, clean_weight=1.0,
                temperature=2.0)
    x = torch.randn(6, 1, 8, 8)
    m.setup(ModelOutput(student(x), {}, x), None)
    with torch.no_grad():  # leave the identity, so the teacher-shift term has a gradient too
        m.augmentor.head[-1].weight.normal_(0, 0.05)
    step = Progress(0.0, 5, 10)
    terms = m(ModelOutput(student(x), {}, x), ModelOutput(teacher(x)), torch.zeros(6, dtype=torch.long), step)
    assert set(terms) == {"kd_aug", "teacher_shift", "kd"} and terms["teacher_shift"] > 0
    aug_params, s_params = list(m.augmentor.parameters()), list(student.parameters())
    got_aug = torch.autograd.grad(sum(terms.values()), aug_params + s_params)

    # Reference, without any reversal: the two players' own objectives, differentiated separately.
    noise = torch.randn(6, 8, generator=torch.Generator().manual_seed(5)).to(x)
    x_aug = apply_affine(x, m.augmentor(x, noise))
    d = disagreement(student(x_aug), teacher(x_aug), temperature=2.0)
    shift = teacher_shift(teacher(x_aug), teacher(x), temperature=2.0)
    clean = L.kd(student(x), teacher(x), temperature=2.0)
    ref_aug = torch.autograd.grad(-0.5 * d + 2.0 * shift, aug_params, retain_graph=True)
    ref_s = torch.autograd.grad(d + clean, s_params)
    for got, ref in zip(got_aug, list(ref_aug) + list(ref_s)):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)
    assert any(r.abs().sum() > 0 for r in ref_aug)  # the check is not vacuous
    # and the reported values are the players' terms
    torch.testing.assert_close(terms["kd_aug"], d)
    torch.testing.assert_close(terms["teacher_shift"], 2.0 * shift)


def test_log_values_and_grid(tmp_path):
    student, teacher = _mlp(16, 0), _mlp(32, 1).eval().requires_grad_(False)
    m = _method(student, teacher, grid_dir=str(tmp_path / "grids"), grid_every=3, grid_samples=4)
    x = torch.randn(6, 1, 8, 8)
    m.setup(ModelOutput(student(x), {}, x), None)
    with torch.no_grad():
        m.augmentor.head[-1].bias.copy_(torch.tensor([0.1, 0.0, 0.05, 0.0, -0.1, 0.0]))
    thetas = []
    for step in (2, 3):
        m(ModelOutput(student(x), {}, x), ModelOutput(teacher(x)), torch.zeros(6, dtype=torch.long), Progress(0.0, step, 4))
        noise = torch.randn(6, 8, generator=torch.Generator().manual_seed(step))
        thetas.append(m.augmentor(x, noise).detach())
    expected = sum(identity_deviation(t) for t in thetas).item() / 2
    assert m.log_values()["affine_deviation"] == pytest.approx(expected, rel=1e-5)
    assert m.log_values()["affine_deviation"] == 0.0  # reset once read (one value per epoch)
    written = sorted(p.name for p in (tmp_path / "grids").iterdir())
    assert written == ["hard_step0000003.png"]  # step 3 is a multiple of grid_every, step 2 is not
    png = m.save_grid(tmp_path / "grid.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_errors_are_named():
    student = _mlp(16, 0)
    m = _method(student, None)
    with pytest.raises(ValueError, match=r"image batches \(N, C, H, W\)"):
        m.setup(ModelOutput(torch.randn(4, 10), {}, torch.randn(4, 64)), None)
    x = torch.randn(4, 1, 8, 8)
    m.setup(ModelOutput(student(x), {}, x), None)
    with pytest.raises(RuntimeError, match="no live teacher is attached"):
        m(ModelOutput(student(x), {}, x), ModelOutput(torch.randn(4, 10)), torch.zeros(4, dtype=torch.long), Progress(0, 0, 1))
    with pytest.raises(RuntimeError, match="nothing to show"):
        _method(student, None).save_grid("x.png")
    with pytest.raises(ConfigError, match="no cache"):
        config_from_dict({"student": {"arch": "mlp"}, "method": {"name": "hard"}, "teacher": {"run": "t", "cache": True}})


def test_hard_on_digits(tmp_path):
    from distillery.engine import fit

    data = load_data(DataConfig(name="digits"))
    teacher = _mlp(64, 0)
    opt = torch.optim.Adam(teacher.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(teacher(data.train.inputs), data.train.labels).backward()
        opt.step()
    cfg = tiny_cfg(tmp_path, teacher={"model": {"arch": "mlp", "kwargs": {"hidden": [64]}}},
                   method={"name": "hard"},
                   train={"epochs": 2, "progress": False, "report": False})
    res = fit(cfg, teacher=teacher)
    rows = [json.loads(line) for line in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"train_kd_aug", "train_teacher_shift", "train_kd", "method_affine_deviation"} <= set(rows[-1])
    assert all(r["method_affine_deviation"] > 0 for r in rows)  # the augmentor left the identity
    assert res.summary["test_accuracy"] > 0.5 and res.summary["teacher_test_accuracy"] > 0.9
    png = res.run_dir / "hard_augmentations.png"  # written by on_train_end
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
