"""Multi-label distillation: mosaic data, sigmoid losses against their definitions, mAP/F1
against scikit-learn, and the engine end to end (teacher, mlkd, dml, a clear refusal for
single-label methods)."""
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_cfg
from distillery.data import Split
from distillery.data.multilabel import mosaic
from distillery.engine import fit
from distillery.errors import DistilleryError
from distillery.losses import logits as L
from distillery.losses import multilabel as ML
from distillery.report.metrics import average_precision, multilabel_metrics

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_mosaic_tiles_and_labels_are_the_classes_shown():
    # image i is constant = its label, so each tile tells which class it shows
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 3, 3])
    x = labels.float().view(-1, 1, 1, 1).expand(-1, 1, 3, 3).clone()
    out = mosaic(Split(x, labels, torch.arange(12)), 2, 10, torch.Generator().manual_seed(0))
    assert out.inputs.shape == (12, 1, 6, 6) and out.labels.shape == (12, 10)
    for i in range(12):
        img = out.inputs[i, 0]
        tiles = {int(img[r * 3, c * 3]) for r in range(2) for c in range(2)}
        assert int(img[0, 0]) == int(labels[i])  # own image top-left
        assert (img[:3, :3] == labels[i]).all()  # a whole tile, not interleaved pixels
        assert set(torch.nonzero(out.labels[i]).flatten().tolist()) == tiles
    assert torch.equal(out.index, torch.arange(12))


def test_fashion_style_config_gives_a_multilabel_bundle():
    from distillery.config import DataConfig
    from distillery.data import load_data

    b = load_data(DataConfig(name="digits", mosaic=2))
    plain = load_data(DataConfig(name="digits"))
    assert b.task == "multilabel" and plain.task == "multiclass"
    assert b.train.inputs.shape[1:] == (1, 16, 16) and b.input_size == (16, 16)
    assert b.train.labels.dtype == torch.float32 and set(b.train.labels.sum(1).unique().tolist()) <= {1.0, 2.0, 3.0, 4.0}
    assert b.fingerprint != plain.fingerprint
    assert torch.equal(load_data(DataConfig(name="digits", mosaic=2)).train.inputs, b.train.inputs)  # seeded


def test_mosaic_on_a_table_is_refused():
    from distillery.config import DataConfig
    from distillery.data import load_data
    from distillery.errors import DataError
    import pandas as pd

    # covered with a tiny CSV so the message is checked, not just an exception type
    import tempfile, os
    d = tempfile.mkdtemp()
    pd.DataFrame({"a": range(20), "label": [0, 1] * 10}).to_csv(os.path.join(d, "t.csv"), index=False)
    with pytest.raises(DataError, match="data.mosaic builds multi-label images"):
        load_data(DataConfig(name="table", path=os.path.join(d, "t.csv"), mosaic=2))


def test_average_precision_matches_scikit_learn():
    from sklearn.metrics import average_precision_score

    g = torch.Generator().manual_seed(0)
    scores = torch.randn(200, 6, generator=g)
    pos = (torch.rand(200, 6, generator=g) < 0.3)
    ours = average_precision(scores, pos)
    ref = [average_precision_score(pos[:, j].numpy(), scores[:, j].numpy()) for j in range(6)]
    torch.testing.assert_close(ours, torch.tensor(ref, dtype=torch.float64))


def test_multilabel_metrics_by_hand():
    logits = torch.tensor([[3.0, -1.0], [2.0, 1.0], [-2.0, -3.0]])  # predictions: [1,0], [1,1], [0,0]
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    m = multilabel_metrics(logits, labels)
    # label 0: tp 1 fp 1 fn 0 -> F1 2/3; label 1: tp 1 fp 0 fn 1 -> F1 2/3
    assert m["f1_per_label"] == [pytest.approx(2 / 3, abs=1e-4)] * 2
    assert m["f1_micro"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert m["subset_accuracy"] == pytest.approx(1 / 3)
    # AP label 0: only positive (row 0) ranked first -> 1; label 1: positives ranked 1 (row 1) and 3 (row 2)
    # -> (1/1 + 2/3) / 2
    assert m["map"] == pytest.approx((1 + (1 + 2 / 3) / 2) / 2)


def test_binary_kd_is_kd_on_the_two_logit_form():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    two = lambda z: torch.stack([z, torch.zeros_like(z)], -1)  # noqa: E731  sigmoid(z) = softmax((z, 0))[0]
    for T in (1.0, 3.0):
        torch.testing.assert_close(ML.binary_kd(s, t, temperature=T), L.kd(two(s), two(t), temperature=T))


def test_binary_kd_zero_at_match_positive_otherwise_and_stable():
    z = torch.randn(3, 4)
    assert ML.binary_kd(z, z).item() == pytest.approx(0.0, abs=1e-7)
    assert ML.binary_kd(z, z + 1).item() > 0
    big = torch.tensor([[80.0, -80.0]])
    assert torch.isfinite(ML.binary_kd(-big, big))


def test_binary_kd_gradient():
    s = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: ML.binary_kd(a, t, temperature=2.0), (s,))
    # d/ds of the T=1 loss is (sigmoid(s) - sigmoid(t)) / numel
    ML.binary_kd(s, t).backward()
    torch.testing.assert_close(s.grad, (torch.sigmoid(s) - torch.sigmoid(t)).detach() / s.numel())


def test_binary_cross_entropy_checks_targets():
    z = torch.randn(2, 3)
    torch.testing.assert_close(ML.binary_cross_entropy(z, None, torch.ones(2, 3)), F.binary_cross_entropy_with_logits(z, torch.ones(2, 3)))
    with pytest.raises(ValueError, match="float"):
        ML.binary_cross_entropy(z, None, torch.ones(2, 3, dtype=torch.long))


@pytest.fixture(scope="module")
def ml_teacher(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mlteacher")
    cfg = tiny_cfg(tmp, name="teacher", data={"name": "digits", "batch_size": 32, "mosaic": 2},
                   student={"arch": "cnn", "kwargs": {"width": 8}}, train={"epochs": 4, "progress": False})
    return fit(cfg)


def test_teacher_learns_the_multilabel_task(ml_teacher):
    s = ml_teacher.summary
    assert s["task"] == "multilabel"
    assert s["test_map"] > 0.6  # chance is the positive rate, about 0.34 here
    assert 0 < s["test_f1_macro"] <= 1 and len(s["test_f1_per_label"]) == 10


@pytest.mark.parametrize("method", ["mlkd", "dml"])
def test_multilabel_distillation_runs(tmp_path, ml_teacher, method):
    cfg = tiny_cfg(tmp_path, data={"name": "digits", "batch_size": 32, "mosaic": 2},
                   teacher={"run": str(ml_teacher.run_dir)}, method={"name": method},
                   student={"arch": "cnn", "kwargs": {"width": 4}}, train={"epochs": 1, "progress": False})
    res = fit(cfg)
    assert 0 <= res.summary["test_map"] <= 1
    row = json.loads((res.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert ("train_mlkd" in row) if method == "mlkd" else ("train_dml_student" in row)


def test_single_label_method_on_multilabel_data_is_refused(tmp_path, ml_teacher):
    cfg = tiny_cfg(tmp_path, data={"name": "digits", "batch_size": 32, "mosaic": 2},
                   teacher={"run": str(ml_teacher.run_dir)}, method={"name": "kd"})
    with pytest.raises(DistilleryError, match="multi-label.*mlkd"):
        fit(cfg)


def test_report_of_a_multilabel_run_shows_map_and_per_label_f1(ml_teacher):
    from distillery.report import write_report

    write_report(ml_teacher.run_dir)
    md = (ml_teacher.run_dir / "report.md").read_text()
    assert "Per-label F1" in md and "Test mAP" in md
