"""KD++ / ND loss: the loss against the released code's per-sample loop and hand values, its norm and
direction behaviour, gradients; the method's running class means, width projector, KD warm-up, and a
short CNN teacher -> MLP student run."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_cfg
from distillery import methods
from distillery.config import ModelSpec
from distillery.engine import fit
from distillery.losses.logits import kd
from distillery.losses.nd import class_sums, nd_loss
from distillery.methods.base import ModelOutput, Progress
from distillery.models import build_model
from distillery.taps import Taps

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --------------------------------------------------------------------------- the loss


def test_matches_the_released_per_sample_loop():
    s, t, centres = _randn(6, 5, seed=1), _randn(6, 5, seed=2), _randn(3, 5, seed=3)
    y = torch.tensor([0, 2, 1, 1, 0, 2])
    expected = 0.0
    for si, ti, c in zip(s, t, y):  # WangYZ1608/Knowledge-Distillation-via-ND, DirectNormLoss.project_center
        e_c = centres[c] / centres[c].norm(p=2)
        expected += float(1 - torch.dot(si, e_c) / max(si.norm(p=2), ti.norm(p=2)))
    assert nd_loss(s, t, centres, y).item() == pytest.approx(expected / 6, rel=1e-12)


def test_hand_values_norm_and_direction():
    e = torch.tensor([[2.0, 0.0]], dtype=torch.float64)  # class centre (not unit: normalised inside)
    y = torch.tensor([0])
    # student shorter than the teacher: the teacher's norm is the denominator
    assert nd_loss(torch.tensor([[3.0, 4.0]]).double(), torch.tensor([[0.0, 10.0]]).double(), e, y).item() == pytest.approx(0.7)
    # student longer: only the direction counts, 1 - cos
    s = torch.tensor([[3.0, 4.0]], dtype=torch.float64)
    assert nd_loss(s, torch.tensor([[1.0, 0.0]]).double(), e, y).item() == pytest.approx(1 - 3 / 5)
    assert nd_loss(10 * s, torch.tensor([[1.0, 0.0]]).double(), e, y).item() == pytest.approx(1 - 3 / 5)


def test_norm_term_pushes_a_short_aligned_student_up_to_the_teacher_norm():
    e, y, t = torch.tensor([[1.0, 0.0]]).double(), torch.tensor([0]), torch.tensor([[0.0, 4.0]]).double()
    values = [nd_loss(torch.tensor([[r, 0.0]]).double(), t, e, y).item() for r in (1.0, 2.0, 4.0, 8.0)]
    assert values == pytest.approx([0.75, 0.5, 0.0, 0.0])
    s = torch.tensor([[2.0, 0.0]], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(nd_loss(s, t, e, y), s)
    torch.testing.assert_close(g, torch.tensor([[-0.25, 0.0]], dtype=torch.float64))  # d/ds (1 - s_1 / 4)


def test_gradcheck_and_teacher_side_is_a_target():
    s = _randn(4, 3, seed=4).requires_grad_()
    t, centres = _randn(4, 3, seed=5).requires_grad_(), _randn(2, 3, seed=6).requires_grad_()
    y = torch.tensor([0, 1, 1, 0])
    assert torch.autograd.gradcheck(lambda a: nd_loss(a, t, centres, y), (s,))
    grads = torch.autograd.grad(nd_loss(s, t, centres, y), [t, centres], allow_unused=True)
    assert grads == (None, None)


def test_class_sums_and_bad_inputs():
    emb, y = _randn(5, 2, seed=7), torch.tensor([1, 0, 1, 1, 2])
    sums, counts = class_sums(emb, y, 4)
    torch.testing.assert_close(sums[1], emb[[0, 2, 3]].sum(0))
    torch.testing.assert_close(counts, torch.tensor([1.0, 3.0, 1.0, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="project the student"):
        nd_loss(_randn(2, 3), _randn(2, 4), _randn(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="class ids"):
        nd_loss(_randn(2, 3), _randn(2, 3), _randn(2, 3), torch.tensor([0, 2]))


# --------------------------------------------------------------------------- the method


def _model(arch, **kwargs):
    return build_model(ModelSpec(arch=arch, kwargs=kwargs), in_channels=1, num_classes=10, input_size=(8, 8))


def _method(student, **params):
    spec = methods.get_spec("nd")
    return spec.cls(spec.validate_params(params), student=student, teacher_layers=None, num_classes=10)


def _outputs(method, student, teacher, x):
    with Taps(student, method.student_taps) as st, Taps(teacher, method.teacher_taps) as tt:
        s_logits = student(x)
        with torch.no_grad():
            t_logits = teacher(x)
        return ModelOutput(s_logits, st.collect(), x), ModelOutput(t_logits, tt.collect())


@pytest.fixture()
def pair():
    torch.manual_seed(0)
    return _model("cnn", width=8), _model("mlp", hidden=[12])  # teacher width 32, student width 12


def test_running_class_means_are_the_exact_means_of_rows_seen(pair):
    teacher, student = pair
    method = _method(student)
    xs = [torch.randn(8, 1, 8, 8) for _ in range(2)]
    ys = [torch.randint(0, 3, (8,)) for _ in range(2)]
    with torch.no_grad():
        method.setup(*_outputs(method, student, teacher, xs[0]))
    progress = Progress(epoch=0.0, step=0, total_steps=10)
    embs = []
    for x, y in zip(xs, ys):
        s_out, t_out = _outputs(method, student, teacher, x)
        method(s_out, t_out, y, progress)
        embs.append(t_out.features["head:input"])
    emb, y = torch.cat(embs).double(), torch.cat(ys)
    for c in range(3):
        torch.testing.assert_close(method.class_centres()[c], emb[y == c].mean(0))
    assert method.class_centres()[5].abs().sum() == 0  # an unseen class
    assert {"centre_sum", "centre_count"} <= set(method.state_dict())  # checkpointed
    method.eval()  # evaluation batches leave the means alone
    before = method.centre_sum.clone()
    method(*_outputs(method, student, teacher, xs[0]), ys[0], progress)
    assert torch.equal(method.centre_sum, before)


def test_projector_only_when_widths_differ_and_gradient_paths(pair):
    teacher, student = pair
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    method = _method(student, kd_warmup_epochs=4.0, nd_weight=2.0)
    with torch.no_grad():
        method.setup(*_outputs(method, student, teacher, x))
    assert isinstance(method.projector[2], torch.nn.Linear) and method.projector[2].weight.shape == (32, 12)
    assert any(k.startswith("projector.") for k in method.state_dict()) and not any("projector" in k for k in student.state_dict())
    s_out, t_out = _outputs(method, student, teacher, x)
    terms = method(s_out, t_out, y, Progress(epoch=1.0, step=3, total_steps=10))
    assert set(terms) == {"nd", "kd", "ce"}
    assert terms["kd"].item() == pytest.approx(0.25 * kd(s_out.logits, t_out.logits, temperature=4.0).item(), rel=1e-6)
    assert terms["ce"].item() == pytest.approx(F.cross_entropy(s_out.logits, y).item(), rel=1e-6)
    g = torch.autograd.grad(terms["nd"], [student.layers[0][0].weight, student.head.weight, method.projector[2].weight],
                            allow_unused=True)
    assert g[0].abs().sum() > 0 and g[1] is None and g[2].abs().sum() > 0
    same = _method(_model("mlp", hidden=[32]))
    with torch.no_grad():
        same.setup(*_outputs(same, same._student, teacher, x))
    assert isinstance(same.projector, torch.nn.Identity)


# --------------------------------------------------------------------------- end to end


def test_cnn_teacher_to_mlp_student_run(tmp_path):
    teacher = fit(tiny_cfg(tmp_path / "t", name="teacher", student={"arch": "cnn", "kwargs": {"width": 8}}))
    cfg = tiny_cfg(tmp_path, teacher={"run": str(teacher.run_dir)}, student={"arch": "mlp", "kwargs": {"hidden": [32]}},
                   method={"name": "nd"}, train={"epochs": 3, "progress": False})
    res = fit(cfg)
    rows = [json.loads(line) for line in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all({"train_nd", "train_kd", "train_ce"} <= set(r) for r in rows)
    assert rows[-1]["train_nd"] < rows[0]["train_nd"]  # the student's embedding turns to the class centres
    assert res.summary["test_accuracy"] > 0.5
