"""OFA-KD: the OFA loss against its definition (naive loop, hand value, gamma = 1 limits, released-code
form, gradients), the branch heads for CNN / ViT / MLP features, what the method returns and where
its gradients go, and a short CNN teacher -> MLP student run."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import tiny_cfg
from distillery import methods
from distillery.config import ModelSpec
from distillery.engine import fit
from distillery.losses.logits import cross_entropy, kd
from distillery.losses.ofa import ofa_loss
from distillery.methods.base import ModelOutput, Progress
from distillery.models import build_model
from distillery.taps import Taps

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PROGRESS = Progress(epoch=0.0, step=0, total_steps=10)


def _logits(*shape, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def _naive(s, t, y, gamma, temperature=1.0, form="paper"):
    """The paper's equation (or the released code's weights), one sample and one class at a time."""
    total = 0.0
    for n in range(s.shape[0]):
        p_s = torch.softmax(s[n] / temperature, -1)
        p_t = torch.softmax(t[n] / temperature, -1)
        for i in range(s.shape[1]):
            if i == y[n]:
                w = (1 + p_t[i]) ** gamma - (1 if form == "code" else 0)
            else:
                w = p_t[i] ** gamma if form == "code" else p_t[i]
            total -= float(w * torch.log(p_s[i]))
    return total / s.shape[0]


# --------------------------------------------------------------------------- the loss


@pytest.mark.parametrize("form", ["paper", "code"])
@pytest.mark.parametrize("gamma,temperature", [(1.0, 1.0), (1.5, 1.0), (3.0, 2.0)])
def test_matches_the_definition_sample_by_sample(form, gamma, temperature):
    s, t, y = _logits(5, 4, seed=1), _logits(5, 4, seed=2), torch.tensor([0, 3, 1, 1, 2])
    got = ofa_loss(s, t, y, gamma=gamma, temperature=temperature, form=form)
    assert got.item() == pytest.approx(_naive(s, t, y, gamma, temperature, form), rel=1e-12)


def test_hand_value():
    # two classes, p_s = (1/2, 1/2), p_t = (3/4, 1/4), target 0, gamma 2:
    # -(1 + 3/4)^2 log(1/2) - 1/4 log(1/2) = (49/16 + 4/16) log 2
    s = torch.zeros(1, 2, dtype=torch.float64)
    t = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)
    got = ofa_loss(s, t, torch.tensor([0]), gamma=2.0)
    assert got.item() == pytest.approx(53 / 16 * math.log(2), rel=1e-12)


def test_gamma_one_is_label_ce_plus_kd_and_code_form_is_kd():
    """At gamma = 1 the paper's loss is CE + the soft cross-entropy of KD at T = 1 (= KL + H(p_t));
    the released code's form drops the label term."""
    s, t, y = _logits(6, 5, seed=3), _logits(6, 5, seed=4), torch.randint(0, 5, (6,))
    p_t = torch.softmax(t, -1)
    entropy = -(p_t * p_t.log()).sum(-1).mean()
    soft_ce = kd(s, t, temperature=1.0) + entropy
    assert ofa_loss(s, t, y, gamma=1.0).item() == pytest.approx((cross_entropy(s, None, y) + soft_ce).item(), rel=1e-12)
    assert ofa_loss(s, t, y, gamma=1.0, form="code").item() == pytest.approx(soft_ce.item(), rel=1e-12)


def test_gamma_enhances_the_target_more_where_the_teacher_is_sure():
    s = torch.zeros(2, 3, dtype=torch.float64)  # uniform student
    t = torch.tensor([[6.0, 0.0, 0.0], [0.3, 0.0, 0.0]], dtype=torch.float64)  # sure / unsure teacher
    y = torch.tensor([0, 0])
    rise = [ofa_loss(s[i:i + 1], t[i:i + 1], y[i:i + 1], gamma=2.0).item()
            - ofa_loss(s[i:i + 1], t[i:i + 1], y[i:i + 1], gamma=1.0).item() for i in range(2)]
    assert rise[0] > rise[1] > 0
    # the gradient pulls the target logit up harder for larger gamma
    grads = []
    for gamma in (1.0, 2.0):
        x = s.clone().requires_grad_()
        (gx,) = torch.autograd.grad(ofa_loss(x, t, y, gamma=gamma), x)
        grads.append(gx[0, 0].item())
    assert grads[1] < grads[0] < 0


def test_gradcheck_and_teacher_is_a_target():
    s = _logits(3, 4, seed=5).requires_grad_()
    t = _logits(3, 4, seed=6).requires_grad_()
    y = torch.tensor([1, 0, 3])
    assert torch.autograd.gradcheck(lambda a: ofa_loss(a, t, y, gamma=1.7, temperature=1.3), (s,))
    assert torch.autograd.grad(ofa_loss(s, t, y, gamma=1.7), t, allow_unused=True)[0] is None


def test_ignore_index_and_bad_inputs():
    s, t = _logits(4, 3, seed=7), _logits(4, 3, seed=8)
    y = torch.tensor([0, -100, 2, -100])
    keep = y != -100
    assert ofa_loss(s, t, y, gamma=1.5).item() == pytest.approx(ofa_loss(s[keep], t[keep], y[keep], gamma=1.5).item(), rel=1e-12)
    with pytest.raises(ValueError, match="gamma"):
        ofa_loss(s, t, torch.zeros(4, dtype=torch.long), gamma=0.0)
    with pytest.raises(ValueError, match="form"):
        ofa_loss(s, t, torch.zeros(4, dtype=torch.long), form="other")
    with pytest.raises(ValueError, match="targets"):
        ofa_loss(s, t, None)


# --------------------------------------------------------------------------- the method


def _model(arch, **kwargs):
    return build_model(ModelSpec(arch=arch, kwargs=kwargs), in_channels=1, num_classes=10, input_size=(8, 8))


def _method(student, teacher, **params):
    spec = methods.get_spec("ofa")
    return spec.cls(spec.validate_params(params), student=student, teacher_layers=teacher.default_feature_layers,
                    num_classes=10)


def _outputs(method, student, teacher, x):
    with Taps(student, method.student_taps) as st:
        s_logits = student(x)
        with torch.no_grad():
            t_logits = teacher(x)
        return ModelOutput(s_logits, st.collect(), x), ModelOutput(t_logits)


@pytest.mark.parametrize("arch,kwargs", [("cnn", {"width": 4}), ("mlp", {"hidden": [16, 12]}),
                                         ("vit_tiny", {"patch_size": 4, "dim": 16, "depth": 3, "heads": 2})])
def test_branch_per_stage_for_each_family(arch, kwargs):
    torch.manual_seed(0)
    teacher, student = _model("cnn", width=8), _model(arch, **kwargs)
    method = _method(student, teacher)
    assert method.student_taps == student.default_feature_layers
    x = torch.randn(6, 1, 8, 8)
    with torch.no_grad():
        method.setup(*_outputs(method, student, teacher, x))
    s_out, _ = _outputs(method, student, teacher, x)
    logits = method.branch_logits(s_out)
    assert len(logits) == len(student.default_feature_layers) and all(z.shape == (6, 10) for z in logits)
    # owned by the method: trained and checkpointed with it, never part of the exported student
    assert any(k.startswith("branches.") for k in method.state_dict())
    assert not any("branch" in k for k in student.state_dict())


def test_cnn_branches_downsample_to_the_deepest_map():
    student = build_model(ModelSpec(arch="cnn", kwargs={"width": 4}), in_channels=1, num_classes=10, input_size=(28, 28))
    method = _method(student, _model("cnn", width=8))
    x = torch.randn(2, 1, 28, 28)
    with Taps(student, method.student_taps) as st:
        out = ModelOutput(student(x), st.collect(), x)
    shapes = [tuple(out.features[s].shape) for s in method.stages]
    assert shapes == [(2, 4, 14, 14), (2, 8, 7, 7), (2, 16, 7, 7)]
    with torch.no_grad():
        method.setup(out, None)
    first = method.branches[0][0]  # one stride-2 separable block: 14x14 -> 7x7, 4 -> 16 (widest stage) channels
    assert first(out.features[method.stages[0]]).shape == (2, 16, 7, 7)
    assert isinstance(method.branches[2][0], torch.nn.Conv2d)  # already 7x7: a 1x1 conv


@pytest.mark.parametrize("form", ["paper", "code"])
def test_terms_weights_and_gradient_paths(form):
    torch.manual_seed(1)
    teacher, student = _model("cnn", width=8), _model("mlp", hidden=[16, 12])
    method = _method(student, teacher, form=form, gamma=2.0, branch_weight=0.5, logit_weight=2.0)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    with torch.no_grad():
        method.setup(*_outputs(method, student, teacher, x))
    s_out, t_out = _outputs(method, student, teacher, x)
    terms = method(s_out, t_out, y, PROGRESS)
    assert set(terms) == ({"ofa", "ofa_branches"} if form == "paper" else {"ofa", "ofa_branches", "ce"})
    expect = 2.0 * ofa_loss(s_out.logits, t_out.logits, y, gamma=2.0, form=form)
    assert terms["ofa"].item() == pytest.approx(expect.item(), rel=1e-6)
    branch = sum(ofa_loss(z, t_out.logits, y, gamma=2.0, form=form) for z in method.branch_logits(s_out))
    assert terms["ofa_branches"].item() == pytest.approx(0.5 * branch.item(), rel=1e-6)
    if form == "code":
        assert terms["ce"].item() == pytest.approx(F.cross_entropy(s_out.logits, y).item(), rel=1e-6)
    # the branch loss trains the branch and the stages below it, never the student's own head
    first_layer, head = student.layers[0][0].weight, student.head.weight
    g = torch.autograd.grad(terms["ofa_branches"], [first_layer, head, *method.branches.parameters()], allow_unused=True)
    assert g[0].abs().sum() > 0 and g[1] is None and all(gi is not None for gi in g[2:])


def test_needs_stages_for_a_model_without_default_layers():
    bare = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    with pytest.raises(ValueError, match="method.params.stages"):
        _method(bare, _model("cnn", width=8))


# --------------------------------------------------------------------------- end to end


def test_cnn_teacher_to_mlp_student_run(tmp_path):
    teacher = fit(tiny_cfg(tmp_path / "t", name="teacher", student={"arch": "cnn", "kwargs": {"width": 8}}))
    cfg = tiny_cfg(tmp_path, teacher={"run": str(teacher.run_dir)}, student={"arch": "mlp", "kwargs": {"hidden": [32]}},
                   method={"name": "ofa"}, train={"epochs": 3, "progress": False})
    res = fit(cfg)
    rows = [json.loads(line) for line in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all("train_ofa" in r and "train_ofa_branches" in r for r in rows)
    assert rows[-1]["train_ofa_branches"] < rows[0]["train_ofa_branches"]  # the branch learns
    assert res.summary["test_accuracy"] > 0.5
    saved = load_file(str(res.run_dir / "model.safetensors"))
    assert not any("branch" in k for k in saved)
