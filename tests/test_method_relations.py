"""RKD / SP / PKT / CRD as methods: layer pairing (same and cross family), the terms they return,
CRD's per-sample memory bank (momentum updates by row index, growth, Z fixed after the first
batch, checkpointed and resumable state), and a short
digits run of each from a teacher trained in tmp."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import interrupt_then_resume, same_weights, tiny_cfg
from distillery import methods
from distillery.config import ModelSpec
from distillery.engine import fit
from distillery.losses import relations as R
from distillery.methods.base import ModelOutput, Progress
from distillery.models import build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROGRESS = Progress(epoch=0.0, step=0, total_steps=10)


def _model(arch, **kwargs):
    return build_model(ModelSpec(arch=arch, kwargs=kwargs), in_channels=1, num_classes=10, input_size=(8, 8))


def _method(name, student, teacher, **params):
    spec = methods.get_spec(name)
    return spec.cls(spec.validate_params(params), student=student, teacher_layers=teacher.default_feature_layers,
                    num_classes=10)


def _outputs(method, student, teacher, x, index=None):
    from distillery.taps import Taps

    with Taps(student, method.student_taps) as st, Taps(teacher, method.teacher_taps) as tt:
        s_logits = student(x)
        with torch.no_grad():
            t_logits = teacher(x)
        return ModelOutput(s_logits, st.collect(), x, index), ModelOutput(t_logits, tt.collect())


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return _model("cnn", width=8), _model("cnn", width=4), _model("mlp", hidden=[16])


def test_registered_with_papers():
    for name in ("rkd", "sp", "pkt", "crd"):
        spec = methods.get_spec(name)
        assert spec.needs_teacher and spec.paper and spec.description


@pytest.mark.parametrize("name", ["rkd", "sp", "pkt", "crd"])
def test_default_pair_is_the_deepest_stage_also_cross_family(models, name):
    teacher, cnn, mlp = models
    assert _method(name, cnn, teacher).student_taps == [cnn.default_feature_layers[-1]]
    m = _method(name, mlp, teacher)  # CNN -> MLP: no projector needed, relations are N x N
    assert (m.student_taps, m.teacher_taps) == (["layers.0"], [teacher.default_feature_layers[-1]])


def test_relation_terms_match_the_losses(models):
    teacher, cnn, mlp = models
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.arange(6)
    m = _method("rkd", mlp, teacher, distance_weight=2.0, angle_weight=3.0, kd_weight=0.5)
    s_out, t_out = _outputs(m, mlp, teacher, x)
    terms = m(s_out, t_out, y, PROGRESS)
    assert set(terms) == {"rkd_distance", "rkd_angle", "ce", "kd"}
    t_vec = t_out.features[m.teacher_taps[0]].mean(dim=(2, 3))  # pooled map
    s_vec = s_out.features["layers.0"]
    torch.testing.assert_close(terms["rkd_distance"], 2.0 * R.rkd_distance(s_vec, t_vec))
    torch.testing.assert_close(terms["rkd_angle"], 3.0 * R.rkd_angle(s_vec, t_vec))

    sp = _method("sp", cnn, teacher, sp_weight=10.0)  # flattens maps by default (the paper's b x chw)
    s_out, t_out = _outputs(sp, cnn, teacher, x)
    expected = 10.0 * R.similarity_preserving(s_out.features[sp.student_taps[0]], t_out.features[sp.teacher_taps[0]])
    torch.testing.assert_close(sp(s_out, t_out, y, PROGRESS)["sp"], expected)

    pkt = _method("pkt", cnn, teacher, pkt_weight=1.0)
    s_out, t_out = _outputs(pkt, cnn, teacher, x)
    terms = pkt(s_out, t_out, y, PROGRESS)
    assert set(terms) == {"pkt", "ce"} and terms["pkt"].item() > 0
    terms["pkt"].backward()
    assert cnn.features[0][0].weight.grad is not None


def test_unknown_param_is_refused():
    with pytest.raises(ValueError, match="unknown parameter"):
        methods.get_spec("rkd").validate_params({"dist_weight": 1.0})
    with pytest.raises(ValueError, match="pairs"):
        methods.get_spec("crd").validate_params({"pairs": [{"student": "a", "teacher": "b"}] * 2})


def test_crd_memory_bank(models):
    teacher, cnn, _ = models
    torch.manual_seed(0)
    m = _method("crd", cnn, teacher, feat_dim=8, num_negatives=5)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    y, index = torch.arange(4), torch.tensor([7, 2, 9, 0])
    s_out, t_out = _outputs(m, cnn, teacher, x, index)
    m.setup(s_out, t_out)
    assert m.embed_s.out_features == m.embed_t.out_features == 8 and m.memory_s.shape == (0, 8)
    m._grow(10)
    mem_s0, mem_t0 = m.memory_s.clone(), m.memory_t.clone()
    assert 0.5 < mem_s0.norm(dim=1).mean() < 1.5  # CRD's initialisation: rows of norm ~1

    torch.manual_seed(5)
    terms = m(s_out, t_out, y, PROGRESS)
    terms["crd"].backward()  # the memory update happened in place after the rows were copied out
    assert m.embed_t.weight.grad is not None and cnn.features[0][0].weight.grad is not None
    z_s = m.z_s.item()
    assert z_s > 0 and m.z_t.item() > 0
    # the loss is the NCE of the definition: positives are the other model's rows of these
    # samples, negatives the rows drawn with the same seed, Z from this first batch
    torch.manual_seed(5)
    neg = torch.randint(10, (5,))
    with torch.no_grad():
        es = F.normalize(m.embed_s(s_out.features[m.student_taps[0]].mean(dim=(2, 3))), dim=1)
        et = F.normalize(m.embed_t(t_out.features[m.teacher_taps[0]].mean(dim=(2, 3))), dim=1)
        sc_s = R.crd_scores(es, mem_t0[index], mem_t0[neg], temperature=0.07)
        sc_t = R.crd_scores(et, mem_s0[index], mem_s0[neg], temperature=0.07)
        expected = 0.8 * (R.crd_nce_loss(sc_s, z=R.crd_normaliser(sc_s, 10), n_data=10)
                          + R.crd_nce_loss(sc_t, z=R.crd_normaliser(sc_t, 10), n_data=10))
    torch.testing.assert_close(terms["crd"].detach(), expected)
    # momentum update of exactly these rows: normalise(0.5 old + 0.5 new)
    torch.testing.assert_close(m.memory_s[index], F.normalize(0.5 * mem_s0[index] + 0.5 * es, dim=1))
    torch.testing.assert_close(m.memory_t[index], F.normalize(0.5 * mem_t0[index] + 0.5 * et, dim=1))
    others = torch.tensor([1, 3, 4, 5, 6, 8])
    assert torch.equal(m.memory_s[others], mem_s0[others]) and torch.equal(m.memory_t[others], mem_t0[others])

    # a later batch with a higher row grows the bank (old rows kept); Z stays
    m(*_outputs(m, cnn, teacher, x, torch.tensor([15, 1, 3, 4])), y, PROGRESS)
    assert m.memory_s.shape == (16, 8) and m.z_s.item() == z_s
    untouched = torch.tensor([5, 6, 8])
    assert torch.equal(m.memory_s[untouched], mem_s0[untouched]) and not torch.equal(m.memory_s[1], mem_s0[1])

    # eval mode neither updates the memory nor Z
    m.eval()
    state = {k: v.clone() for k, v in m.state_dict().items()}
    out = m(*_outputs(m, cnn, teacher, x, index), y, PROGRESS)
    assert torch.isfinite(out["crd"]) and all(torch.equal(state[k], v) for k, v in m.state_dict().items())

    # a fresh method (empty bank) loads the grown bank from a state dict (what resuming does)
    fresh = _method("crd", cnn, teacher, feat_dim=8, num_negatives=5)
    fresh.setup(s_out, t_out)
    fresh.load_state_dict(m.state_dict())
    assert torch.equal(fresh.memory_t, m.memory_t) and fresh.z_t.item() == m.z_t.item()
    with pytest.raises(ValueError, match="ModelOutput.index"):
        m(*_outputs(m, cnn, teacher, x), y, PROGRESS)


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("teacher")
    cfg = tiny_cfg(tmp, name="teacher", student={"arch": "cnn", "kwargs": {"width": 8}}, train={"epochs": 2, "progress": False})
    return fit(cfg)


@pytest.mark.parametrize("method,params,student,term", [
    ("rkd", {}, "cnn", "rkd_angle"), ("sp", {}, "cnn", "sp"), ("pkt", {}, "mlp", "pkt"),
    ("crd", {"num_negatives": 256}, "cnn", "crd"), ("crd", {"num_negatives": 64, "kd_weight": 0.5}, "mlp", "crd"),
])
def test_digits_run(tmp_path, teacher_run, method, params, student, term):
    """A short `fit`: the method's term is logged, summed into the loss, and falls over the last
    epoch (the student learns the teacher's relations); cnn -> mlp rows are the cross-family case.
    CRD gets a third epoch: in its first, every positive is a randomly initialised memory row, so
    its loss first rises when the memory fills with real embeddings."""
    student_spec = {"arch": "cnn", "kwargs": {"width": 4}} if student == "cnn" else {"arch": "mlp", "kwargs": {"hidden": [32]}}
    cfg = tiny_cfg(tmp_path, teacher={"run": str(teacher_run.run_dir)}, student=student_spec,
                   method={"name": method, "params": params},
                   train={"epochs": 3 if method == "crd" else 2, "progress": False})
    res = fit(cfg)
    assert 0.0 <= res.summary["test_accuracy"] <= 1.0
    rows = [json.loads(line) for line in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    terms = {k: v for k, v in rows[0].items() if k.startswith("train_") and k != "train_loss"}
    assert "train_ce" in terms and f"train_{term}" in terms
    assert rows[0]["train_loss"] == pytest.approx(sum(terms.values()), rel=1e-5)
    assert rows[-1][f"train_{term}"] < rows[-2][f"train_{term}"]


def test_crd_resume_reaches_same_weights(tmp_path, teacher_run, monkeypatch):
    """The memory bank (grown during the run) and Z are checkpointed: a run interrupted mid-epoch
    and resumed ends with the same weights as an uninterrupted one."""
    common = dict(teacher={"run": str(teacher_run.run_dir)}, student={"arch": "cnn", "kwargs": {"width": 4}},
                  method={"name": "crd", "params": {"num_negatives": 100}},
                  train={"epochs": 2, "progress": False, "checkpoint_every": 7})
    full = fit(tiny_cfg(tmp_path / "a", **common))
    resumed = interrupt_then_resume(tiny_cfg(tmp_path / "b", **common), monkeypatch, at_step=40)  # epoch 2, after a checkpoint
    assert same_weights(full, resumed)
