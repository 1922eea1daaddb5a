"""General knowledge transfer with data partitioning (Roth et al. 2024, KL+DP): the mask picks exactly
the samples where the teacher is more confident (true class / top-1; ties go to the student), the
loss is the masked sum of the two KL terms (by hand, limits, gradcheck), the frozen initial student
is the pretrained one and stays frozen, and a digits transfer from pretrained weights resumes to the
same weights."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_model

from conftest import interrupt_then_resume, same_weights, tiny_cfg
from distillery import methods
from distillery.config import DataConfig, ModelSpec
from distillery.data import load_data
from distillery.losses import logits as L
from distillery.methods.base import ModelOutput, Progress
from distillery.methods.kt_partition import partition_mask, partitioned_kd
from distillery.models import build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _logits(probs):
    return torch.log(torch.tensor(probs, dtype=torch.float64))


def test_partition_mask_on_hand_built_confidences():
    t = _logits([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8], [0.4, 0.4, 0.2]])
    st = _logits([[0.5, 0.4, 0.1], [0.1, 0.1, 0.8], [0.05, 0.05, 0.9], [0.4, 0.4, 0.2]])
    y = torch.tensor([0, 1, 0, 0])
    # true class: 0.6 > 0.5 yes; 0.5 > 0.1 yes; 0.1 > 0.05 yes; row 4 identical: a tie -> the initial student
    assert partition_mask(t, st, y).tolist() == [True, True, True, False]
    # top-1 (unsupervised): 0.6 > 0.5; 0.5 < 0.8; 0.8 < 0.9; 0.4 = 0.4 (tie) -> student
    assert partition_mask(t, st).tolist() == [True, False, False, False]
    # a uniform (untrained) initial student: the teacher wins wherever it beats 1/C
    uniform = torch.zeros(4, 3, dtype=torch.float64)
    assert partition_mask(t, uniform, y).tolist() == [True, True, False, True]
    with pytest.raises(ValueError, match="partition: top1"):
        partition_mask(t, st, torch.tensor([0, 1, 0, -100]))


def test_partitioned_kd_is_the_masked_sum_of_both_kl_terms():
    g = torch.Generator().manual_seed(0)
    s, t, st = (torch.randn(6, 5, dtype=torch.float64, generator=g) for _ in range(3))
    mask = torch.tensor([True, False, True, True, False, False])
    T = 2.0

    def kl(target, student):
        p, logq = torch.softmax(target / T, -1), torch.log_softmax(student / T, -1)
        return (p * (torch.log(p) - logq)).sum(-1)

    expected = (torch.where(mask, kl(t, s), kl(st, s))).mean() * T ** 2
    torch.testing.assert_close(partitioned_kd(s, t, st, mask, temperature=T), expected)
    torch.testing.assert_close(partitioned_kd(s, t, st, torch.ones(6, dtype=torch.bool), temperature=T),
                               L.kd(s, t, temperature=T))  # all to the teacher: plain KD
    torch.testing.assert_close(partitioned_kd(st, t, st, torch.zeros(6, dtype=torch.bool)),
                               torch.zeros((), dtype=torch.float64))  # all retained and unchanged: zero
    a = s.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda z: partitioned_kd(z, t, st, mask, temperature=T), (a,))
    with pytest.raises(ValueError, match="bool"):
        partitioned_kd(s, t, st, mask.float())


@pytest.fixture(scope="module")
def digits():
    return load_data(DataConfig(name="digits"))


def _train(digits, hidden, steps, seed):
    torch.manual_seed(seed)
    model = build_model(ModelSpec(arch="mlp", kwargs={"hidden": hidden}), in_channels=1, num_classes=10, input_size=(8, 8))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(digits.train.inputs), digits.train.labels).backward()
        opt.step()
    return model


def test_the_frozen_initial_student_is_a_copy_taken_at_setup(digits):
    student = _train(digits, [32], 40, seed=1)
    teacher = _train(digits, [64], 150, seed=0).eval().requires_grad_(False)
    spec = methods.get_spec("kt_partition")
    m = spec.cls(spec.validate_params({"temperature": 2.0}), student=student, teacher_layers=None, num_classes=10)
    x, y = digits.train.inputs[:64], digits.train.labels[:64]
    m.setup(ModelOutput(student(x), {}, x), ModelOutput(teacher(x)))
    before = student(x).detach()
    with torch.no_grad():  # the student moves on; its frozen copy must not
        for p in student.parameters():
            p.add_(0.1 * torch.randn_like(p))
    torch.testing.assert_close(m.initial_forward(x), before)
    assert not any(p.requires_grad for p in m._initial.parameters())
    assert not any(n.startswith("_initial") for n, _ in m.named_parameters())  # not trained, not checkpointed
    s = student(x)
    terms = m(ModelOutput(s, {}, x), ModelOutput(teacher(x)), y, Progress(0.0, 0, 1))
    mask = partition_mask(teacher(x), before, y)
    torch.testing.assert_close(terms["kl_dp"], partitioned_kd(s, teacher(x), before, mask, temperature=2.0))
    assert m.log_values() == {"teacher_share": pytest.approx(mask.float().mean().item())}
    assert 0 < mask.float().mean() < 1  # a half-trained student and a trained teacher each win somewhere


def test_transfer_from_pretrained_weights_on_digits_resumes(tmp_path, monkeypatch, digits):
    from distillery.engine import fit

    student0 = _train(digits, [32], 60, seed=1)
    weights = tmp_path / "student0.safetensors"
    save_model(student0, str(weights))
    initial_acc = (student0(digits.test.inputs).argmax(-1) == digits.test.labels).float().mean().item()
    teacher = _train(digits, [64], 150, seed=0).eval().requires_grad_(False)
    common = dict(student={"arch": "mlp", "kwargs": {"hidden": [32]}, "weights": str(weights)},
                  teacher={"model": {"arch": "mlp", "kwargs": {"hidden": [64]}}},
                  method={"name": "kt_partition", "params": {"temperature": 1.0}},
                  train={"epochs": 2, "progress": False, "report": False, "checkpoint_every": 15,
                         "optimizer": {"name": "adam", "lr": 1e-3}})
    full = fit(tiny_cfg(tmp_path / "a", **common), teacher=teacher)
    # the run started from the pretrained student (not from a random init) and did not lose it
    assert full.summary["test_accuracy"] >= initial_acc - 0.02 and initial_acc > 0.8
    rows = [json.loads(r) for r in (full.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < r["method_teacher_share"] < 1 for r in rows)

    import distillery.engine.trainer as trainer

    monkeypatch.setattr(trainer, "load_teacher", lambda *a, **k: teacher)
    resumed = interrupt_then_resume(tiny_cfg(tmp_path / "b", **common), monkeypatch, at_step=30)
    assert same_weights(full, resumed)
