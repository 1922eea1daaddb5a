"""MDCS (Zhao et al. 2023): prior-shifted logits, the diversity loss and its special cases,
confident instance sampling, consistency self-distillation (values and stop-gradient), the
strong view, and the method end to end.  References are computed by hand or with numpy."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import interrupt_then_resume, same_weights, tiny_cfg
from distillery import methods
from distillery.data.strong_augment import cutout, strong_augment
from distillery.losses.mdcs import (
    confident_instance_mask,
    consistency_self_distillation,
    distribution_shifted_logits,
    diversity_loss,
)
from distillery.methods.base import ModelOutput, Progress
from distillery.taps import Taps

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LN3 = math.log(3.0)


# ----------------------------------------------------------------------------- diversity loss


def test_shifted_logits_by_hand():
    z = torch.tensor([[0.5, -1.0]])
    prior = torch.tensor([10.0, 30.0])  # counts: the scale does not matter to a softmax
    torch.testing.assert_close(distribution_shifted_logits(z, prior, 1.0), z + torch.log(prior))
    torch.testing.assert_close(distribution_shifted_logits(z, prior, -0.5), z - 0.5 * torch.log(prior))
    with pytest.raises(ValueError, match="positive"):
        distribution_shifted_logits(z, torch.tensor([0.0, 1.0]), 1.0)


def test_diversity_loss_by_hand():
    # z = [0, 0], prior [1, 3]: lambda 1 -> softmax([0, ln 3]) = [1/4, 3/4]; lambda -1 -> [3/4, 1/4]
    z = torch.zeros(1, 2)
    prior = torch.tensor([1.0, 3.0])
    y = torch.tensor([1])
    value = diversity_loss([z, z], y, prior=prior, exponents=[1.0, -1.0])
    assert value.item() == pytest.approx(-math.log(0.75) - math.log(0.25), rel=1e-6)


def test_diversity_loss_special_cases():
    g = torch.Generator().manual_seed(0)
    experts = [torch.randn(5, 4, generator=g) for _ in range(3)]
    y = torch.randint(0, 4, (5,), generator=g)
    plain = sum(F.cross_entropy(z, y) for z in experts)
    # a uniform prior shifts every class equally: the exponents do not matter
    uniform = torch.full((4,), 7.0)
    torch.testing.assert_close(diversity_loss(experts, y, prior=uniform, exponents=[1.0, -0.5, 2.5]), plain)
    # exponent 0: the plain CE, whatever the prior
    skewed = torch.tensor([1.0, 2.0, 5.0, 20.0])
    torch.testing.assert_close(diversity_loss(experts[:1], y, prior=skewed, exponents=[0.0]), F.cross_entropy(experts[0], y))
    # exponent 1 is balanced softmax / logit adjustment: CE of z + log(prior)
    torch.testing.assert_close(diversity_loss(experts[:1], y, prior=skewed, exponents=[1.0]),
                               F.cross_entropy(experts[0] + skewed.log(), y))
    with pytest.raises(ValueError, match="one exponent per expert"):
        diversity_loss(experts, y, prior=uniform, exponents=[1.0])


# ----------------------------------------------------------------------------- CIS and CS


def test_confident_instance_mask():
    weak = torch.tensor([
        [3.0, 0.0, 0.0],  # correct (class 0), p = 0.91: selected
        [0.2, 0.0, 0.0],  # correct (class 0) but p = 0.38
        [0.0, 2.0, 0.0],  # predicts class 1, label 0: wrong
        [0.0, 0.0, 5.0],  # ignored position
    ])
    y = torch.tensor([0, 0, 0, -100])
    assert confident_instance_mask(weak, y).tolist() == [True, True, False, False]
    assert confident_instance_mask(weak, y, confidence=0.6).tolist() == [True, False, False, False]


def test_consistency_by_hand_over_selected_instances_only():
    weak = torch.tensor([[0.0, LN3], [5.0, 0.0]])  # row 0: p = [1/4, 3/4], correct for y=1; row 1: wrong
    strong = torch.tensor([[0.0, 0.0], [0.0, 9.0]])
    y = torch.tensor([1, 1])
    kl = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert consistency_self_distillation(strong, weak, y).item() == pytest.approx(kl, rel=1e-6)
    # temperature T: T^2 * KL(softmax(w/T) || softmax(s/T)), numpy reference
    T = 2.0
    p = np.exp(weak[0].numpy() / T) / np.exp(weak[0].numpy() / T).sum()
    q = np.array([0.5, 0.5])
    expected = T**2 * float((p * np.log(p / q)).sum())
    assert consistency_self_distillation(strong, weak, y, temperature=T).item() == pytest.approx(expected, rel=1e-5)


def test_consistency_stop_gradient_on_weak_view():
    g = torch.Generator().manual_seed(1)
    weak = torch.randn(6, 4, generator=g, requires_grad=True)
    strong = torch.randn(6, 4, generator=g, requires_grad=True)
    y = weak.detach().argmax(-1)  # every instance selected
    y[0] = (y[0] + 1) % 4  # ... but the first
    consistency_self_distillation(strong, weak, y).backward()
    assert weak.grad is None or torch.count_nonzero(weak.grad) == 0
    assert torch.count_nonzero(strong.grad[1:]) > 0
    assert torch.count_nonzero(strong.grad[0]) == 0  # unselected: no gradient
    # closed form: d/ds KL(p || softmax(s)) = (softmax(s) - p) / (number selected)
    p = torch.softmax(weak.detach(), -1)
    expected = (torch.softmax(strong.detach(), -1) - p)[1:] / 5
    torch.testing.assert_close(strong.grad[1:], expected)


def test_consistency_with_nothing_selected_is_zero_with_zero_gradient():
    weak = torch.tensor([[5.0, 0.0]])
    strong = torch.tensor([[0.0, 1.0]], requires_grad=True)
    value = consistency_self_distillation(strong, weak, torch.tensor([1]))
    value.backward()
    assert value.item() == 0.0 and torch.count_nonzero(strong.grad) == 0


# ----------------------------------------------------------------------------- strong view


def test_strong_view_is_seeded_and_leaves_input_alone():
    x = torch.randn(4, 1, 8, 8)
    before = x.clone()
    a = strong_augment(x, torch.Generator().manual_seed(3))
    b = strong_augment(x, torch.Generator().manual_seed(3))
    c = strong_augment(x, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c) and a.shape == x.shape
    assert torch.equal(x, before)
    with pytest.raises(Exception, match="N, C, H, W"):
        strong_augment(torch.randn(4, 10), torch.Generator().manual_seed(0))


def test_cutout_zeroes_one_square_within_bounds():
    x = torch.ones(16, 2, 8, 8)
    out = cutout(x, 4, torch.Generator().manual_seed(0))
    for img in out:
        assert torch.equal(img[0], img[1])  # same hole in every channel
        rows = (img[0] == 0).any(1).nonzero().flatten()
        cols = (img[0] == 0).any(0).nonzero().flatten()
        assert 0 < len(rows) <= 4 and 0 < len(cols) <= 4
        assert rows.tolist() == list(range(rows[0], rows[-1] + 1)) and cols.tolist() == list(range(cols[0], cols[-1] + 1))
        assert int((img[0] == 0).sum()) == len(rows) * len(cols)  # a full rectangle (the square, clipped)


# ----------------------------------------------------------------------------- the method


def _method(experts=3, **params):
    from distillery.config import ModelSpec
    from distillery.models import build_model

    torch.manual_seed(0)
    student = build_model(ModelSpec(arch="mlp", kwargs={"hidden": [16]}), in_channels=1, num_classes=4, input_size=(8, 8))
    spec = methods.get_spec("mdcs")
    m = spec.cls(spec.validate_params({"experts": experts, **params}), student=student, teacher_layers=None, num_classes=4)
    x = torch.randn(6, 1, 8, 8)
    with Taps(student, m.student_taps) as taps:
        logits = student(x)
        feats = taps.collect()
    m.setup(ModelOutput(logits, feats, x), None)
    return m, student, ModelOutput(logits, feats, x)


def test_method_three_experts_terms_heads_and_gradients():
    m, student, out = _method(3, cs_warmup_epochs=0)
    assert not methods.get_spec("mdcs").needs_teacher
    assert m.student_taps == ["head:input"] and len(m.heads) == 2 and m.exponents == [1.0, -0.5, 2.5]
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    terms = m(out, None, y, Progress(1.0, 10, 100))
    assert set(terms) == {"diversity", "cs"} and all(torch.isfinite(v) for v in terms.values())
    assert m.class_counts.tolist() == [2.0, 2.0, 1.0, 1.0]  # the running prior saw this batch
    sum(terms.values()).backward()
    assert all(h.weight.grad is not None and torch.count_nonzero(h.weight.grad) > 0 for h in m.heads)
    assert torch.count_nonzero(student.head.weight.grad) > 0
    # the ensemble the engine evaluates: mean of the three experts' raw logits
    ens = m.eval_models()["ensemble"]
    with torch.no_grad():
        feat = student.layers(student.flatten(out.inputs))
        expected = torch.stack([student.head(feat)] + [h(feat) for h in m.heads]).mean(0)
        torch.testing.assert_close(ens(out.inputs), expected)


def test_method_one_expert_is_ce_plus_cs():
    m, _, out = _method(1)
    assert m.student_taps == [] and len(m.heads) == 0 and m.eval_models() == {}
    terms = m(out, None, torch.tensor([0, 1, 2, 3, 0, 1]), Progress(0.0, 0, 100))
    assert set(terms) == {"ce", "cs"}
    assert terms["cs"].item() == 0.0  # the CS weight ramps up from 0 at epoch 0


def test_method_params_validation():
    spec = methods.get_spec("mdcs")
    with pytest.raises(ValueError, match="prior_exponents"):
        spec.validate_params({"experts": 4})
    with pytest.raises(ValueError, match="prior_exponents"):
        spec.validate_params({"experts": 2, "prior_exponents": [1.0]})
    assert spec.validate_params({"experts": 4, "prior_exponents": [1, 0, 2, -1]}).experts == 4
    with pytest.raises(ValueError, match="image batches"):
        m, _, out = _method(1)
        m.setup(ModelOutput(out.logits, {}, torch.randn(6, 64)), None)


def test_mdcs_end_to_end_on_digits_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """Strong views are drawn from (seed, step) and the running prior is a checkpointed buffer,
    so a run interrupted mid-epoch and resumed ends with the uninterrupted run's weights."""
    from distillery.engine import fit

    common = dict(method={"name": "mdcs", "params": {"cs_warmup_epochs": 0.5}},
                  data={"name": "digits", "batch_size": 32, "augment": {"pad_crop": 1}},
                  train={"epochs": 2, "progress": False, "report": False, "checkpoint_every": 15})
    full = fit(tiny_cfg(tmp_path / "a", **common))
    s = full.summary
    assert s["method"] == "mdcs" and 0.0 <= s["test_accuracy"] <= 1.0 and "test_accuracy_ensemble" in s
    row = json.loads((full.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert row["train_cs"] > 0 and row["train_diversity"] > 0

    resumed = interrupt_then_resume(tiny_cfg(tmp_path / "b", **common), monkeypatch, at_step=50)
    assert same_weights(full, resumed)
