"""The regression task type: data (diabetes, fmnist_landmarks), standardisation, metrics, the
engine's task checks and the summary/report of a regression run."""
import pytest
import torch

from conftest import needs_fmnist, tiny_cfg
from distillery.config import DataConfig, config_from_dict
from distillery.data import load_data
from distillery.errors import ConfigError, DataError, DistilleryError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def diabetes():
    return load_data(DataConfig(name="diabetes"))


def _sk_diabetes():
    from sklearn.datasets import load_diabetes

    return load_diabetes(scaled=False)


def test_diabetes_bundle_is_a_regression_task(diabetes):
    b = diabetes
    assert b.task == "regression" and b.kind == "table" and b.num_classes == 1
    assert b.class_names == ["disease_progression"] and b.input_size == (10,)
    assert len(b.train) + len(b.val) + len(b.test) == 442
    assert len(b.test) == round(442 * 0.2) and len(b.val) == round((442 - len(b.test)) * 0.1)
    # every source row lands in exactly one split
    rows = torch.cat([b.train.index, b.val.index, b.test.index]).sort().values
    assert torch.equal(rows, torch.arange(442))
    for split in (b.train, b.val, b.test):
        assert split.labels.dtype == torch.float32 and split.labels.shape == (len(split), 1)
    assert "1 regression targets" in b.describe()


def test_standardisation_round_trip(diabetes):
    b, sk = diabetes, _sk_diabetes()
    y = torch.from_numpy(sk.target)
    train_y = y[b.train.index]
    # statistics of the training split (population std), standardised train targets ~ N(0, 1)
    assert torch.allclose(b.train.target_mean.double(), train_y.mean().reshape(1), atol=1e-4)
    assert torch.allclose(b.train.target_std.double(), train_y.std(unbiased=False).reshape(1), atol=1e-4)
    assert abs(float(b.train.labels.mean())) < 1e-5 and abs(float(b.train.labels.std(unbiased=False)) - 1) < 1e-5
    # every split maps back to the raw targets with the same statistics
    for split in (b.train, b.val, b.test):
        back = split.labels.double() * split.target_std.double() + split.target_mean.double()
        assert torch.allclose(back[:, 0], y[split.index], atol=1e-3)
        assert torch.equal(split.target_std, b.train.target_std)
    # a taken subset keeps the statistics (evaluate relies on them)
    part = b.test.take(torch.arange(5))
    assert torch.equal(part.target_mean, b.test.target_mean) and torch.equal(part.target_std, b.test.target_std)


def test_subset_is_random_not_stratified_and_keeps_the_target_scale(diabetes, monkeypatch):
    import distillery.data as D

    def no_stratify(*a, **k):
        raise AssertionError("regression data must not be stratified")

    monkeypatch.setattr(D, "_stratified_pick", no_stratify)
    small = load_data(DataConfig(name="diabetes", train_subset=40))
    again = load_data(DataConfig(name="diabetes", train_subset=40))
    other_seed = load_data(DataConfig(name="diabetes", train_subset=40, split_seed=1))
    assert len(small.train) == 40 and torch.equal(small.train.index, again.train.index)
    assert set(small.train.index.tolist()) <= set(diabetes.train.index.tolist())
    assert not torch.equal(small.train.index, other_seed.train.index)
    # val/test untouched, and the scale is the full training split's: a teacher on all rows and a
    # student on the subset predict in the same units
    assert torch.equal(small.test.index, diabetes.test.index)
    assert torch.equal(small.train.target_mean, diabetes.train.target_mean)
    # the subset is a plain uniform draw from the split's own generator stream
    perm = torch.randperm(len(diabetes.train), generator=D._generator(0, "subset"))[:40].sort().values
    assert torch.equal(small.train.index, diabetes.train.index[perm])


def test_regression_metrics_match_scikit_learn():
    from sklearn.metrics import mean_absolute_error, r2_score, root_mean_squared_error

    from distillery.report.metrics import regression_metrics

    g = torch.Generator().manual_seed(0)
    y = torch.randn(50, 3, generator=g, dtype=torch.float64)
    p = y + 0.5 * torch.randn(50, 3, generator=g, dtype=torch.float64)
    mean, std = torch.tensor([10.0, -2.0, 0.5]), torch.tensor([3.0, 0.1, 7.0])
    m = regression_metrics(p, y, mean, std)
    y_raw, p_raw = (y * std + mean).numpy(), (p * std + mean).numpy()
    assert m["rmse"] == pytest.approx(root_mean_squared_error(y_raw, p_raw), rel=1e-9)
    assert m["mae"] == pytest.approx(mean_absolute_error(y_raw, p_raw), rel=1e-9)
    assert m["r2"] == pytest.approx(r2_score(y_raw, p_raw), rel=1e-9)
    assert m["r2_per_output"] == pytest.approx(list(r2_score(y_raw, p_raw, multioutput="raw_values")), rel=1e-9)
    # perfect predictions; predicting the mean gives R^2 = 0
    assert regression_metrics(y, y)["rmse"] == 0 and regression_metrics(y, y)["r2"] == 1
    assert regression_metrics(y.mean(0).expand_as(y), y)["r2"] == pytest.approx(0.0, abs=1e-12)


def test_evaluate_reports_original_units(diabetes):
    from distillery.engine import evaluate

    class Constant(torch.nn.Module):  # predicts standardised 0: the training mean
        def forward(self, x):
            return torch.zeros(x.shape[0], 1)

    out = evaluate(Constant(), diabetes.test, "cpu")
    y = diabetes.test.labels.double() * diabetes.test.target_std + diabetes.test.target_mean
    err = float(diabetes.train.target_mean) - y
    assert out["accuracy"] is None
    assert out["rmse"] == pytest.approx(float(err.pow(2).mean().sqrt()), rel=1e-5)
    assert out["mae"] == pytest.approx(float(err.abs().mean()), rel=1e-5)
    assert out["loss"] == pytest.approx(float(diabetes.test.labels.pow(2).mean()), rel=1e-5)  # standardised MSE


def test_classification_method_is_refused_with_the_list(tmp_path):
    cfg = tiny_cfg(tmp_path, data={"name": "diabetes"})
    from distillery.engine import fit

    with pytest.raises(DistilleryError) as e:
        fit(cfg)  # method ce
    msg = str(e.value)
    assert "method 'ce' is for classification" in msg and "regression" in msg
    for name in ("mse", "regression_kd", "tough_tolerant"):
        assert name in msg
    # and the other way round
    with pytest.raises(DistilleryError, match="method 'mse' is for regression"):
        fit(tiny_cfg(tmp_path, name="digits-mse", method={"name": "mse"}))


def test_bad_regression_options_are_clear():
    with pytest.raises(DataError, match="soft_targets.*classification source"):
        load_data(DataConfig(name="digits", soft_targets={"pca_components": 1}))
    with pytest.raises(DataError, match="pca_components=2 exceeds the 1 target"):
        load_data(DataConfig(name="diabetes", soft_targets={"pca_components": 2}))
    with pytest.raises(DataError, match="augment would move the image but not its targets"):
        load_data(DataConfig(name="diabetes", augment={"flip": True}))
    with pytest.raises(DataError, match="no classes"):
        load_data(DataConfig(name="diabetes", classes=[0, 1]))
    with pytest.raises(DataError, match="image_size"):
        load_data(DataConfig(name="diabetes", image_size=8))
    base = {"student": {"arch": "mlp"}, "data": {"name": "diabetes"}}
    with pytest.raises(ConfigError, match="exactly 2 teachers but the config gives 1"):
        config_from_dict({**base, "method": {"name": "tough_tolerant"}, "teacher": {"run": "x"}})
    with pytest.raises(ConfigError, match="combine: mean_logits"):
        config_from_dict({**base, "method": {"name": "tough_tolerant"}, "teacher": [{"run": "a"}, {"run": "b"}]})


def test_soft_targets_replace_only_the_training_targets(diabetes):
    soft = load_data(DataConfig(name="diabetes", soft_targets={"pca_components": 1, "clip": 1.0}))
    # one target, one component: the ASM projection is the identity, the clip at +-1 sd (the
    # eigenvalue is the sample variance, n - 1) is what smooths
    sd = float(diabetes.train.labels.double().std(unbiased=True))
    assert torch.allclose(soft.train.labels, diabetes.train.labels.clamp(-sd, sd), atol=1e-5)
    assert float(diabetes.train.labels.abs().max()) > 1.5
    assert torch.equal(soft.val.labels, diabetes.val.labels) and torch.equal(soft.test.labels, diabetes.test.labels)
    assert soft.fingerprint != diabetes.fingerprint


def test_a_regression_run_summary_and_report(tmp_path):
    from distillery.engine import fit
    from distillery.report import write_report

    cfg = tiny_cfg(tmp_path, data={"name": "diabetes", "batch_size": 32}, method={"name": "mse"},
                   train={"epochs": 3, "optimizer": {"name": "adam", "lr": 0.01}})
    s = fit(cfg).summary
    assert s["task"] == "regression" and "test_accuracy" not in s and "val_accuracy" not in s
    assert 0 < s["test_rmse"] < 200 and -1 < s["test_r2"] < 1 and s["test_mae"] < s["test_rmse"]
    md = write_report(cfg.run_dir, measure_latency=False).read_text()
    assert "test RMSE (target units)" in md and "disease_progression" in md and "test accuracy" not in md
    from distillery.report.runs import load_run

    assert load_run(cfg.run_dir).test_accuracy is None  # readers of test_accuracy cope


# ---------------------------------------------------------------------------------------------
# fmnist_landmarks


def test_ink_landmarks_by_hand():
    from distillery.data.regression import ink_landmarks

    img = torch.zeros(1, 1, 10, 10, dtype=torch.uint8)
    img[0, 0, 2, 3] = 200  # row 2, column 3
    img[0, 0, 6, 7] = 200
    img[0, 0, 6, 8] = 20  # below the ink threshold: not in the box, but in the centroid
    lm = ink_landmarks(img)[0]
    # left, top, right, bottom at pixel centres / 10
    assert lm[:4].tolist() == pytest.approx([0.35, 0.25, 0.75, 0.65])
    cx = (3 * 200 + 7 * 200 + 8 * 20 + 0.5 * 420) / 420 / 10
    cy = (2 * 200 + 6 * 220 + 0.5 * 420) / 420 / 10
    assert lm[4:].tolist() == pytest.approx([cx, cy])
    with pytest.raises(DataError, match="no ink"):
        ink_landmarks(torch.zeros(1, 1, 10, 10, dtype=torch.uint8))


def test_place_on_canvas_draws_the_image_inside_at_its_scale():
    from distillery.data.regression import SCALE_RANGE, ink_landmarks, place_on_canvas

    block = torch.full((64, 1, 28, 28), 255, dtype=torch.uint8)  # a full square: its box is the drawn area
    g = torch.Generator().manual_seed(3)
    drawn = place_on_canvas(block, 40, g)
    again = place_on_canvas(block, 40, torch.Generator().manual_seed(3))
    assert torch.equal(drawn, again)  # seeded
    lm = ink_landmarks(drawn)
    side = (lm[:, 2] - lm[:, 0]) * 40 + 1  # pixels covered
    assert (side >= SCALE_RANGE[0] * 40 - 2).all() and (side <= SCALE_RANGE[1] * 40 + 2).all()
    assert torch.allclose(side, (lm[:, 3] - lm[:, 1]) * 40 + 1, atol=1.01)  # square stays square
    assert torch.allclose(lm[:, 4], (lm[:, 0] + lm[:, 2]) / 2, atol=0.02)  # a uniform square's centroid is its centre
    assert side.std() > 2  # scales vary


@needs_fmnist
@pytest.mark.slow
def test_fmnist_landmarks_bundle():
    b = load_data(DataConfig(name="fmnist_landmarks", train_subset=500))
    assert b.task == "regression" and b.kind == "image" and b.in_channels == 1 and b.input_size == (40, 40)
    assert b.num_classes == 6 and b.class_names[:2] == ["left", "top"]
    assert len(b.train) == 500 and len(b.val) == 6000 and len(b.test) == 10000
    raw = b.test.labels.double() * b.test.target_std + b.test.target_mean
    assert raw.min() > 0 and raw.max() < 1  # normalised coordinates
    assert (raw[:, 2] > raw[:, 0]).all() and (raw[:, 3] > raw[:, 1]).all()  # right of left, below top
    inside = (raw[:, 4] > raw[:, 0]) & (raw[:, 4] < raw[:, 2]) & (raw[:, 5] > raw[:, 1]) & (raw[:, 5] < raw[:, 3])
    assert inside.all()  # the centroid lies in the box
