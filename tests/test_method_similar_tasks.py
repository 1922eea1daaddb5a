"""DistillNearest / DistillWeighted (Borup, Phoo & Hariharan 2023): the kNN task-similarity score on
hand-built features, the source weights (softmax / nearest), the weighted feature loss against a
hand computation and gradcheck, frozen sources, and a short digits run with two source teachers
trained here on other class subsets."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_cfg
from distillery.losses import similar_tasks as ST
from distillery.methods import get_spec
from distillery.methods.base import ModelOutput, Progress

pytestmark = pytest.mark.usefixtures("one_torch_thread")
P0 = Progress(epoch=0.0, step=0, total_steps=10)


# ---- the similarity score -------------------------------------------------------------------

def test_knn_similarity_separated_interleaved_and_partial():
    labels = torch.tensor([0, 0, 1, 1])
    separated = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    assert ST.knn_similarity(separated, labels, k=1).item() == 1.0
    # each sample's nearest other sample (by cosine) has the other label
    interleaved = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.99, 0.01], [0.01, 0.99]])
    assert ST.knn_similarity(interleaved, labels, k=1).item() == 0.0
    # scale does not matter (cosine), only direction
    assert ST.knn_similarity(separated * torch.tensor([[5.0], [0.1], [3.0], [7.0]]), labels, k=1).item() == 1.0
    # 5 samples at angles 0, 10, 20, 80, 90 degrees; labels 0, 0, 1, 1, 1; k=3 majority vote.
    ang = torch.deg2rad(torch.tensor([0.0, 10.0, 20.0, 80.0, 90.0]))
    feats = torch.stack([ang.cos(), ang.sin()], 1)
    y = torch.tensor([0, 0, 1, 1, 1])
    # by hand: s0 <- {10:0, 20:1, 80:1} -> 1 (wrong); s1 <- {0:0, 20:1, 80:1} -> 1 (wrong);
    # s2 <- {10:0, 0:0, 80:1} -> 0 (wrong); s3 <- {90:1, 20:1, 10:0} -> 1 (right); s4 <- {80:1, 20:1, 10:0} -> 1 (right)
    assert ST.knn_similarity(feats, y, k=3).item() == pytest.approx(2 / 5)
    # k=1: s0<-s1 (0 right), s1<-s0 or s2 (10 deg each: topk picks one), s2<-s1 (wrong), s3<-s4, s4<-s3 (right)
    assert ST.knn_similarity(feats, y, k=1).item() in (pytest.approx(3 / 5), pytest.approx(4 / 5))


def test_knn_similarity_rejects_bad_input():
    x, y = torch.randn(6, 3), torch.tensor([0, 1, 0, 1, 0, 1])
    with pytest.raises(ValueError, match="k=6"):
        ST.knn_similarity(x, y, k=6)
    with pytest.raises(ValueError, match="only one class"):
        ST.knn_similarity(x, torch.zeros(6, dtype=torch.long), k=1)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        ST.knn_similarity(torch.randn(6, 3, 2, 2), y)
    with pytest.raises(ValueError, match="labels"):
        ST.knn_similarity(x, y[:5])


# ---- weights -------------------------------------------------------------------------------

def test_softmax_weights_and_nearest():
    sims = torch.tensor([0.9, 0.5, 0.7], dtype=torch.float64)
    w = ST.source_weights(sims, temperature=0.1)
    e = [math.exp(9.0), math.exp(5.0), math.exp(7.0)]
    assert w.tolist() == pytest.approx([v / sum(e) for v in e], rel=1e-12)
    assert ST.source_weights(sims, temperature=None).tolist() == [1.0, 0.0, 0.0]
    assert ST.source_weights(torch.tensor([0.2, 0.8, 0.8]), temperature=None).tolist() == [0.0, 1.0, 0.0]
    # limits: T -> 0 is the nearest source, T -> inf is uniform
    assert ST.source_weights(sims, temperature=1e-4).tolist() == pytest.approx([1.0, 0.0, 0.0])
    assert ST.source_weights(sims, temperature=1e6).tolist() == pytest.approx([1 / 3] * 3, rel=1e-5)
    with pytest.raises(ValueError, match="temperature"):
        ST.source_weights(sims, temperature=0.0)
    with pytest.raises(ValueError, match="non-empty"):
        ST.source_weights(torch.tensor([]), temperature=1.0)


# ---- the feature loss ------------------------------------------------------------------------

def test_feature_distance_hand_values():
    p = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    f = torch.tensor([[0.0, 2.0], [2.0, 2.0]])
    # cosine distances: orthogonal -> 1, parallel -> 0; mean 0.5
    assert ST.feature_distance(p, f, kind="cosine").item() == pytest.approx(0.5)
    # mse: ((1-0)^2 + (0-2)^2 + (1-2)^2 + (1-2)^2) / 4 = 7/4
    assert ST.feature_distance(p, f, kind="mse").item() == pytest.approx(7 / 4)
    with pytest.raises(ValueError, match="projector must map"):
        ST.feature_distance(p, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="distance 'l1'"):
        ST.feature_distance(p, f, kind="l1")


def test_weighted_feature_loss_hand_value_and_gradcheck():
    p1, f1 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 3.0]])        # d = 1
    p2, f2 = torch.tensor([[1.0, 2.0, 0.0]]), torch.tensor([[2.0, 4.0, 0.0]])  # d = 0
    p3, f3 = torch.tensor([[1.0, 0.0]]), torch.tensor([[-1.0, 0.0]])       # d = 2
    w = torch.tensor([0.5, 0.3, 0.2])
    got = ST.weighted_feature_loss([p1, p2, p3], [f1, f2, f3], w)
    assert got.item() == pytest.approx(0.5 * 1 + 0.3 * 0 + 0.2 * 2)
    with pytest.raises(ValueError, match="one of each"):
        ST.weighted_feature_loss([p1, p2], [f1, f2, f3], w)

    g = torch.Generator().manual_seed(0)
    ps = [torch.randn(4, d, dtype=torch.float64, generator=g, requires_grad=True) for d in (3, 5)]
    fs = [torch.randn(4, d, dtype=torch.float64, generator=g) for d in (3, 5)]
    ww = torch.tensor([0.25, 0.75], dtype=torch.float64)
    for kind in ("cosine", "mse"):
        assert torch.autograd.gradcheck(lambda a, b: ST.weighted_feature_loss([a, b], fs, ww, kind=kind), tuple(ps))
    # the source features never receive a gradient
    f_req = fs[0].clone().requires_grad_(True)
    ST.weighted_feature_loss([ps[0]], [f_req], ww[:1]).backward()
    assert f_req.grad is None


# ---- the method on hand-made outputs -------------------------------------------------------------

def _outputs(n_per_class=6, seed=0):
    """Source 0's features separate the 3 target classes; source 1's are noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(3).repeat_interleave(n_per_class)
    good = torch.nn.functional.one_hot(y, 3).double() * 5 + 0.1 * torch.randn(len(y), 3, generator=g, dtype=torch.float64)
    noise = torch.randn(len(y), 7, generator=g, dtype=torch.float64)
    student_emb = torch.randn(len(y), 4, generator=g, dtype=torch.float64, requires_grad=True)
    s_out = ModelOutput(torch.randn(len(y), 3, generator=g, dtype=torch.float64), {"head:input": student_emb})
    t_out = ModelOutput(torch.zeros(len(y), 2), {"members.0.head:input": good, "members.1.head:input": noise})
    return s_out, t_out, y, good, noise


def _method(name, **params):
    spec = get_spec(name)
    m = spec.cls(spec.validate_params({"num_sources": 2, "k": 3, **params}), student=torch.nn.Identity(),
                 teacher_layers=None, num_classes=3)
    return m.double()


def test_nearest_and_weighted_pick_the_similar_source():
    s_out, t_out, y, good, noise = _outputs()
    nearest, weighted = _method("distill_nearest"), _method("distill_weighted", temperature=0.2)
    assert nearest.teacher_taps == ["members.0.head:input", "members.1.head:input"]
    for m in (nearest, weighted):
        m.setup(s_out, t_out)
        assert [tuple(p.weight.shape) for p in m.projectors] == [(3, 4), (7, 4)]
        assert m.log_values() == {}
        terms = m(s_out, t_out, y, P0)
        sims = torch.stack([ST.knn_similarity(good, y, k=3), ST.knn_similarity(noise, y, k=3)])
        assert m.similarity.tolist() == sims.tolist() and sims[0] == 1.0 and sims[1] < 0.8
        # the loss is CE + sum_s w_s d(P_s h, f_s), recomputed from the pieces
        h = s_out.features["head:input"]
        want = sum(w * ST.feature_distance(p(h), f) for w, p, f in zip(m.weights, m.projectors, (good, noise)))
        assert terms["feature"].item() == pytest.approx(want.item())
        assert terms["ce"].item() == pytest.approx(torch.nn.functional.cross_entropy(s_out.logits, y).item())
    assert nearest.weights.tolist() == [1.0, 0.0]
    assert weighted.weights.tolist() == pytest.approx(torch.softmax(weighted.similarity / 0.2, 0).tolist())
    logs = weighted.log_values()
    assert logs["similarity_0"] == 1.0 and logs["weight_0"] > logs["weight_1"] > 0
    # estimated once: a later batch with shuffled labels does not change the weights
    before = weighted.weights.clone()
    weighted(s_out, t_out, y[torch.randperm(len(y))], P0)
    assert torch.equal(weighted.weights, before)


def test_estimate_over_several_batches_then_distil():
    s_out, t_out, y, good, noise = _outputs()
    m = _method("distill_weighted", estimate_batches=2, temperature=0.2)
    m.setup(s_out, t_out)
    # first batch: collected, no estimate yet, feature term exactly 0 (CE alone)
    terms = m(s_out, t_out, y, P0)
    assert terms["feature"].item() == 0.0 and m.log_values() == {} and not bool(m.estimated)
    # second batch (other samples): the estimate uses both batches' samples
    s2, t2, y2, good2, noise2 = _outputs(seed=1)
    terms = m(s2, t2, y2, Progress(epoch=0.5, step=1, total_steps=10))
    want = [ST.knn_similarity(torch.cat(pair), torch.cat([y, y2]), k=3) for pair in ((good, good2), (noise, noise2))]
    assert m.similarity.tolist() == [w.item() for w in want]
    assert torch.equal(m.bank_labels, torch.cat([y, y2])) and torch.equal(m.bank_1, torch.cat([noise, noise2]))
    assert terms["feature"].item() > 0
    # collecting past one epoch would put duplicates among the neighbours: refused
    late = _method("distill_nearest", estimate_batches=3)
    late.setup(s_out, t_out)
    with pytest.raises(ValueError, match="more than one epoch"):
        late(s_out, t_out, y, Progress(epoch=1.0, step=4, total_steps=10))


def test_method_errors_name_the_fix():
    s_out, t_out, y, _, _ = _outputs()
    m = _method("distill_weighted", num_sources=3)
    with pytest.raises(ValueError, match="num_sources must equal"):
        m.setup(s_out, t_out)
    with pytest.raises(ValueError, match="no source models"):
        _method("distill_nearest").setup(s_out, None)
    with pytest.raises(ValueError, match="temperature"):
        get_spec("distill_weighted").validate_params({"temperature": 0})
    with pytest.raises(ValueError, match="unknown parameter"):
        get_spec("distill_nearest").validate_params({"temperature": 0.1})  # nearest has no temperature


def test_sources_stay_frozen_under_backward():
    """Gradients of the loss reach the student embedding and the projectors, never the sources."""
    from distillery.config import ModelSpec
    from distillery.engine.trainer import Ensemble
    from distillery.models import build_model
    from distillery.taps import Taps

    torch.manual_seed(0)
    members = [build_model(ModelSpec(arch="mlp", kwargs={"hidden": [w]}), in_channels=1, num_classes=3,
                           input_size=(8, 8)) for w in (6, 9)]
    teacher = Ensemble(members)  # parameters left trainable on purpose: only the method can keep them frozen
    student = build_model(ModelSpec(arch="mlp", kwargs={"hidden": [5]}), in_channels=1, num_classes=3, input_size=(8, 8))
    m = _method("distill_weighted").float()
    x, y = torch.randn(12, 1, 8, 8), torch.arange(3).repeat(4)
    with Taps(student, m.student_taps) as st, Taps(teacher, m.teacher_taps) as tt:
        s_out = ModelOutput(student(x), st.collect())
        t_out = ModelOutput(teacher(x), tt.collect())
    m.setup(s_out, t_out)
    terms = m(s_out, t_out, y, P0)
    sum(terms.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.projectors.parameters())
    assert student.head.weight.grad.abs().sum() > 0


# ---- end to end ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def source_runs(tmp_path_factory):
    """Two tiny digits sources trained on other classes than the target's (0-2 and 3-5)."""
    from distillery.engine import fit

    tmp = tmp_path_factory.mktemp("sources")
    return [fit(tiny_cfg(tmp / f"s{i}", name=f"source{i}", data={"name": "digits", "batch_size": 32, "classes": classes},
                         student={"arch": "mlp", "kwargs": {"hidden": [24 + 8 * i]}}, train={"epochs": 2, "progress": False})
                ).run_dir for i, classes in enumerate(([0, 1, 2], [3, 4, 5]))]


TARGET = {"name": "digits", "batch_size": 64, "classes": [6, 7, 8, 9], "train_subset": 200}


def test_digits_run_with_two_sources_trained_on_other_classes(tmp_path, source_runs):
    from distillery.engine import fit

    sources = source_runs
    before = [load_file(str(d / "model.safetensors")) for d in sources]
    results = {}
    for name, params in (("distill_nearest", {}), ("distill_weighted", {"temperature": 0.05})):
        cfg = tiny_cfg(tmp_path / name, name=name, data=TARGET, teacher={"ensemble": [{"run": str(d)} for d in sources]},
                       method={"name": name, "params": {"num_sources": 2, **params}}, train={"epochs": 6, "progress": False})
        res = fit(cfg)
        rows = [json.loads(line) for line in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
        logged = rows[-1]
        sims = [logged["method_similarity_0"], logged["method_similarity_1"]]
        weights = [logged["method_weight_0"], logged["method_weight_1"]]
        assert all(0.0 <= s <= 1.0 for s in sims) and sum(weights) == pytest.approx(1.0)
        assert all(r["method_similarity_0"] == sims[0] for r in rows if "method_similarity_0" in r)  # estimated once
        if name == "distill_nearest":
            assert weights == [1.0, 0.0] if sims[0] >= sims[1] else weights == [0.0, 1.0]
        else:
            assert weights == pytest.approx(torch.softmax(torch.tensor(sims, dtype=torch.float64) / 0.05, 0).tolist())
        assert "train_feature" in logged and "train_ce" in logged
        results[name] = res.summary["test_accuracy"]
    # 4 target classes from 200 labels: both students learn the task (chance is 0.25)
    assert min(results.values()) > 0.6, results
    after = [load_file(str(d / "model.safetensors")) for d in sources]
    assert all(torch.equal(a[k], b[k]) for a, b in zip(before, after) for k in a)


def test_resume_keeps_the_estimated_weights(tmp_path, source_runs, monkeypatch):
    """The similarities are buffers: a run interrupted after its first step resumes with them
    (re-estimating on another batch would change the weights) and ends bit-identical."""
    from conftest import interrupt_then_resume, same_weights
    from distillery.engine import fit

    raw = dict(data=TARGET, teacher={"ensemble": [{"run": str(d)} for d in source_runs]},
               method={"name": "distill_weighted", "params": {"num_sources": 2, "temperature": 0.05}},
               train={"epochs": 2, "progress": False, "checkpoint_every": 1})
    straight = fit(tiny_cfg(tmp_path / "a", **raw))
    resumed = interrupt_then_resume(tiny_cfg(tmp_path / "b", **raw), monkeypatch, at_step=4)
    assert same_weights(straight, resumed)
