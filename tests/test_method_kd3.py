"""KD^3 (Tang et al. 2023): combined teacher+student prediction and instance selection by hand,
KD over the selected instances only (values, empty selection, gradcheck), MixDistribution against
its definition (identity at lambda = 1, mixed moments, constant statistics), the symmetric InfoNCE
by hand, the method (agreement-weighted student vote, the teacher called on the re-styled images, labels never
read, the feature-level hook removed after use), the cache refused, and a short run on digits."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_cfg
from distillery import methods
from distillery.config import AugmentConfig, DataConfig, ModelSpec, config_from_dict
from distillery.data import load_data
from distillery.engine.teacher import OnlineTeacher
from distillery.errors import ConfigError, ModelError
from distillery.losses import logits as L
from distillery.losses.kd3 import combined_prediction, instance_contrastive, mix_distribution, select_instances, selected_kd
from distillery.methods.base import ModelOutput, Progress
from distillery.models import build_model
from distillery.taps import Taps

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------- selection and KD


def test_combined_prediction_and_selection_by_hand():
    t = torch.tensor([[math.log(9.0), 0.0], [0.0, 0.0], [0.0, math.log(4.0)]])  # p_t = .9/.1, .5/.5, .2/.8
    s = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [math.log(4.0), 0.0]])  # p_s = .5/.5, .75/.25, .8/.2
    torch.testing.assert_close(combined_prediction(t, s, 0.0), torch.softmax(t, -1))
    torch.testing.assert_close(combined_prediction(t, s, 1.0), torch.tensor([[1.0, 1.0], [1.0, 1 / 3], [1.0, 0.25]]))
    # w = 0.5: half the teacher's probabilities plus half the student's vote p_s / max p_s
    c = combined_prediction(t, s, 0.5)
    torch.testing.assert_close(c, torch.tensor([[0.95, 0.55], [0.75, 0.25 + 1 / 6], [0.6, 0.525]]))
    assert select_instances(c, 0.7).tolist() == [True, True, False]
    # an agreeing but unsure student never lowers the teacher's score (it can only veto by disagreeing)
    unsure = torch.tensor([[0.1, 0.0]]).expand(3, 2)
    assert bool((combined_prediction(t[:1], unsure[:1], 0.5).max(-1).values >= torch.softmax(t[:1], -1).max(-1).values).all())
    # agreement: row 1 -- teacher (tie -> class 0) and student (class 0) agree; row 2 they disagree
    assert select_instances(c, 0.5, teacher_logits=t, student_logits=s).tolist() == [True, True, False]
    with pytest.raises(ValueError, match="student_weight"):
        combined_prediction(t, s, 1.5)


def test_selected_kd_is_kd_over_the_selected_instances():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g) * 2
    mask = torch.tensor([True, False, True, True, False, False])
    torch.testing.assert_close(selected_kd(s, t, mask, temperature=3.0), L.kd(s[mask], t[mask], temperature=3.0))
    torch.testing.assert_close(selected_kd(s, t, torch.ones(6, dtype=torch.bool)), L.kd(s, t))
    s.requires_grad_(True)
    value = selected_kd(s, t, torch.zeros(6, dtype=torch.bool))
    value.backward()
    assert value.item() == 0.0 and torch.count_nonzero(s.grad) == 0
    s64 = torch.randn(4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    t64 = torch.randn(4, 3, dtype=torch.float64, generator=g)
    assert torch.autograd.gradcheck(lambda a: selected_kd(a, t64, torch.tensor([True, False, True, True])), (s64,))


# ----------------------------------------------------------------------------- MixDistribution


def test_mix_distribution_moments_and_identity():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 5, 6, generator=g) * torch.tensor([1.0, 3.0, 0.5]).view(1, 3, 1, 1) + 2.0
    perm = torch.tensor([2, 0, 3, 1])
    torch.testing.assert_close(mix_distribution(x, perm, torch.ones(4)), x, rtol=1e-5, atol=1e-5)
    lam = torch.tensor([0.2, 0.5, 1.0, 0.0])
    out = mix_distribution(x, perm, lam, eps=0.0)
    mu, sd = x.mean((2, 3)), x.std((2, 3), unbiased=False)
    w = lam[:, None]
    torch.testing.assert_close(out.mean((2, 3)), w * mu + (1 - w) * mu[perm], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.std((2, 3), unbiased=False), w * sd + (1 - w) * sd[perm], rtol=1e-5, atol=1e-5)
    # lambda = 0 gives the partner's moments exactly; vectors: one mean/std over the D features
    v = torch.randn(3, 7, generator=g)
    out_v = mix_distribution(v, torch.tensor([1, 2, 0]), torch.zeros(3), eps=0.0)
    torch.testing.assert_close(out_v.mean(1), v.mean(1)[[1, 2, 0]], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_v.std(1, unbiased=False), v.std(1, unbiased=False)[[1, 2, 0]], rtol=1e-5, atol=1e-5)


def test_mix_distribution_treats_the_statistics_as_constants():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64, generator=g, requires_grad=True)
    perm, lam = torch.tensor([1, 2, 0]), torch.tensor([0.3, 0.6, 0.9])
    mix_distribution(x, perm, lam).sum().backward()
    xd = x.detach()
    sd = (xd.var((2, 3), keepdim=True, unbiased=False) + 1e-6).sqrt()
    w = lam.double().view(3, 1, 1, 1)
    expected = (w * sd + (1 - w) * sd[perm]) / sd  # d out / d x with mu, sigma held fixed
    torch.testing.assert_close(x.grad, expected.expand_as(xd))


def test_instance_contrastive_by_hand():
    z = torch.eye(3)  # orthonormal: S_ii = 1/tau, S_ij = 0
    tau = 0.5
    expected = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + 2))
    assert instance_contrastive(z, z, temperature=tau).item() == pytest.approx(expected, rel=1e-6)
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[0.0, 2.0], [1.0, 0.0]])
    sim = (F.normalize(a, dim=1) @ F.normalize(b, dim=1).T / tau).numpy()

    def ce(m):
        return float(np.mean([-(m[i, i] - np.log(np.exp(m[i]).sum())) for i in range(len(m))]))

    assert instance_contrastive(a, b, temperature=tau).item() == pytest.approx((ce(sim) + ce(sim.T)) / 2, rel=1e-6)
    mask = torch.tensor([True, False, True])
    torch.testing.assert_close(instance_contrastive(z, z, mask, temperature=tau),
                               instance_contrastive(z[mask], z[mask], temperature=tau))
    zz = torch.randn(3, 2, requires_grad=True)
    one = instance_contrastive(zz, zz, torch.tensor([True, False, False]))
    one.backward()
    assert one.item() == 0.0 and torch.count_nonzero(zz.grad) == 0


# ----------------------------------------------------------------------------- the method


def _mlp(hidden, seed):
    torch.manual_seed(seed)
    return build_model(ModelSpec(arch="mlp", kwargs={"hidden": [hidden]}), in_channels=1, num_classes=10, input_size=(8, 8))


def _method(student, teacher, **params):
    spec = methods.get_spec("kd3")
    m = spec.cls(spec.validate_params(params), student=student, teacher_layers=None, num_classes=10)
    calls = []
    live = OnlineTeacher(teacher, [], AugmentConfig(), 0, True)

    def spy(x, grad=False):
        calls.append(x.detach().clone())
        return live.outputs(x, grad=grad)

    object.__setattr__(m, "_teacher_fn", spy)
    return m, calls


def _student_out(student, m, x):
    with Taps(student, m.student_taps) as taps:
        logits = student(x)
        return ModelOutput(logits, taps.collect(), x)


def test_method_selects_with_an_agreement_weighted_student_share_and_runs_the_teacher_on_restyled_images():
    student, teacher = _mlp(16, 0), _mlp(32, 1).eval().requires_grad_(False)
    with torch.no_grad():
        teacher.head.weight.mul_(20)  # a confident teacher on some inputs
    m, calls = _method(student, teacher, threshold=0.5, student_weight=0.8)
    x = torch.randn(16, 1, 8, 8)
    t = ModelOutput(teacher(x))
    out = _student_out(student, m, x)
    step = Progress(epoch=1.0, step=9, total_steps=40)
    terms = m(out, t, torch.full((16,), -100), step)
    # the student's share is student_weight x the batch's top-class agreement with the teacher
    agreement = (t.logits.argmax(-1) == out.logits.argmax(-1)).float().mean().item()
    assert 0 < agreement < 1
    mask = select_instances(combined_prediction(t.logits, out.logits, 0.8 * agreement), 0.5)
    assert 0 < int(mask.sum()) < 16  # the check below is not vacuous
    torch.testing.assert_close(terms["kd"], selected_kd(out.logits, t.logits, mask))
    # the teacher answered on the re-styled images drawn from (seed, step)
    rng = np.random.default_rng([0, 9])
    perm = torch.from_numpy(rng.permutation(16))
    lam = torch.from_numpy(rng.beta(0.1, 0.1, 16)).float()
    x_mix = mix_distribution(x, perm, lam)
    assert len(calls) == 1 and torch.equal(calls[0], x_mix)
    with torch.no_grad():
        torch.testing.assert_close(terms["kd_mix"], selected_kd(student(x_mix), teacher(x_mix), mask))
    assert terms["contrast"] > 0 and set(terms) == {"kd", "kd_mix", "contrast"}
    assert m.log_values()["selected_fraction"] == pytest.approx(mask.float().mean().item())
    # labels are never read
    again = m(out, t, torch.randint(0, 10, (16,)), step)
    assert all(torch.equal(terms[k], again[k]) for k in terms)


def test_feature_level_mix_distribution_uses_a_temporary_hook_and_no_teacher():
    student, teacher = _mlp(16, 0), _mlp(32, 1).eval().requires_grad_(False)
    m, calls = _method(student, teacher, mix_layer="layers.0", threshold=0.0)
    x = torch.randn(8, 1, 8, 8)
    out = _student_out(student, m, x)
    terms = m(out, ModelOutput(teacher(x)), torch.zeros(8, dtype=torch.long), Progress(0.0, 3, 10))
    assert calls == [] and set(terms) == {"kd", "contrast"}
    assert not student.layers[0]._forward_hooks  # removed after the second pass
    rng = np.random.default_rng([0, 3])
    perm, lam = torch.from_numpy(rng.permutation(8)), torch.from_numpy(rng.beta(0.1, 0.1, 8)).float()
    with torch.no_grad():
        h = mix_distribution(student.layers[0](student.flatten(x)), perm, lam)
        z_mix = student.layers[1:](h) if len(student.layers) > 1 else h
        expected = 0.1 * instance_contrastive(z_mix, out.features["head:input"].detach())
    torch.testing.assert_close(terms["contrast"], expected)
    with pytest.raises(ModelError, match="no module 'layers.9'"):
        _method(student, teacher, mix_layer="layers.9")


def test_cache_refused_and_params_checked():
    with pytest.raises(ConfigError, match="no cache"):
        config_from_dict({"student": {"arch": "mlp"}, "method": {"name": "kd3"}, "teacher": {"run": "t", "cache": True}})
    with pytest.raises(ValueError, match="threshold"):
        methods.get_spec("kd3").validate_params({"threshold": 1.5})


def test_kd3_on_digits(tmp_path):
    from distillery.engine import fit

    data = load_data(DataConfig(name="digits"))
    teacher = _mlp(64, 0)
    opt = torch.optim.Adam(teacher.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(teacher(data.train.inputs), data.train.labels).backward()
        opt.step()
    cfg = tiny_cfg(tmp_path, teacher={"model": {"arch": "mlp", "kwargs": {"hidden": [64]}}},
                   method={"name": "kd3", "params": {"threshold": 0.9}},
                   train={"epochs": 2, "progress": False, "report": False})
    res = fit(cfg, teacher=teacher)
    rows = [json.loads(line) for line in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"train_kd", "train_kd_mix", "train_contrast", "method_selected_fraction"} <= set(rows[-1])
    assert all(0.0 < r["method_selected_fraction"] <= 1.0 for r in rows)
    assert res.summary["test_accuracy"] > 0.5 and res.summary["teacher_test_accuracy"] > 0.9
