"""Deep mutual learning (Zhang et al. 2018): the loss against eq. (9)-(10), and the engine
training several models at once (peers trained, checkpointed, evaluated; only the student saved)."""
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import tiny_cfg
from distillery import methods
from distillery.engine import fit
from distillery.methods.base import ModelOutput, Progress

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PROGRESS = Progress(epoch=0.0, step=0, total_steps=1)


def _method(**params):
    spec = methods.get_spec("dml")
    student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    m = spec.cls(spec.validate_params(params), student=student, teacher_layers=None, num_classes=3)
    x = torch.randn(5, 4)
    m.setup(ModelOutput(student(x), {}, x), None)
    return m, student, x


def test_two_member_loss_is_ce_plus_kl_from_the_peer():
    torch.manual_seed(0)
    m, student, x = _method()
    y = torch.tensor([0, 1, 2, 1, 0])
    s = student(x)
    terms = m(ModelOutput(s, {}, x), None, y, PROGRESS)
    peer = m.peer_models[0](x)
    p_s, p_p = F.softmax(s, -1), F.softmax(peer, -1)
    kl = lambda p, q: (p * (p.log() - q.log())).sum(-1).mean()  # noqa: E731  KL(p || q)
    torch.testing.assert_close(terms["ce_student"], F.cross_entropy(s, y))
    torch.testing.assert_close(terms["dml_student"], kl(p_p, p_s))  # eq. (9): KL(p2 || p1)
    torch.testing.assert_close(terms["ce_peer0"], F.cross_entropy(peer, y))
    torch.testing.assert_close(terms["dml_peer0"], kl(p_s, p_p))    # eq. (10): KL(p1 || p2)


def test_each_member_only_receives_gradient_from_its_own_terms():
    torch.manual_seed(0)
    m, student, x = _method()
    y = torch.tensor([0, 1, 2, 1, 0])
    terms = m(ModelOutput(student(x), {}, x), None, y, PROGRESS)
    terms["dml_student"].backward()
    assert student[1].weight.grad is not None and student[1].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.peer_models.parameters())  # the peer's prediction is a detached target


def test_cohort_of_three_averages_over_peers():
    torch.manual_seed(0)
    m, student, x = _method(peers=2)
    y = torch.tensor([0, 1, 2, 1, 0])
    s = student(x)
    terms = m(ModelOutput(s, {}, x), None, y, PROGRESS)
    p = [F.log_softmax(z, -1) for z in (s, m.peer_models[0](x), m.peer_models[1](x))]
    kl = lambda a, b: (a.exp() * (a - b)).sum(-1).mean()  # noqa: E731
    torch.testing.assert_close(terms["dml_student"], (kl(p[1], p[0]) + kl(p[2], p[0])) / 2)
    assert set(terms) == {"ce_student", "dml_student", "ce_peer0", "dml_peer0", "ce_peer1", "dml_peer1"}


def test_peers_start_from_different_weights_than_the_student():
    torch.manual_seed(0)
    m, student, _ = _method()
    assert not torch.equal(m.peer_models[0][1].weight, student[1].weight)


def test_identical_members_have_zero_mimicry():
    torch.manual_seed(0)
    m, student, x = _method()
    m.peer_models[0].load_state_dict(student.state_dict())
    terms = m(ModelOutput(student(x), {}, x), None, torch.zeros(5, dtype=torch.long), PROGRESS)
    assert terms["dml_student"].item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("divergence", ["kl", "bdkd"])
def test_engine_trains_student_and_peer_together(tmp_path, divergence):
    cfg = tiny_cfg(tmp_path, method={"name": "dml", "params": {"divergence": divergence}},
                   train={"epochs": 2, "progress": False})
    res = fit(cfg)
    s = res.summary
    assert 0.5 < s["test_accuracy"] <= 1.0 and 0.5 < s["test_accuracy_peer0"] <= 1.0  # both learned digits
    row = json.loads((res.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert {"train_ce_student", "train_dml_student", "train_ce_peer0", "train_dml_peer0"} <= set(row)
    saved = load_file(str(res.run_dir / "model.safetensors"))
    assert not any("peer" in k for k in saved)  # the exported model is the student alone


def test_peer_with_another_architecture(tmp_path):
    cfg = tiny_cfg(tmp_path, method={"name": "dml", "params": {"peer": {"arch": "cnn", "kwargs": {"width": 4}}}},
                   train={"epochs": 1, "progress": False})
    res = fit(cfg)
    assert "test_accuracy_peer0" in res.summary
