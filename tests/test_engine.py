import json
import signal

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_cfg
from distillery import methods
from distillery.engine import Interrupted, fit
from distillery.errors import DistilleryError, DivergenceError, ModelError, RunDirExistsError
from distillery.methods.base import Method, Params


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("teacher")
    cfg = tiny_cfg(tmp, name="teacher", student={"arch": "cnn", "kwargs": {"width": 8}}, train={"epochs": 3, "progress": False})
    return fit(cfg)


def test_train_writes_run_artifacts(teacher_run):
    d = teacher_run.run_dir
    s = json.loads((d / "summary.json").read_text())
    for key in ("test_accuracy", "params", "wall_seconds", "train_samples_per_second"):
        assert key in s
    assert s["test_accuracy"] > 0.8  # a CNN learns 8x8 digits in 3 epochs
    rows = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3] and all("val_accuracy" in r and "train_ce" in r for r in rows)
    assert (d / "model.safetensors").is_file() and (d / "config.yaml").is_file()
    assert not (d / "checkpoints").exists()  # removed once the final weights are written


def test_distill_reports_teacher_and_keeps_teacher_frozen(tmp_path, teacher_run):
    before = load_file(str(teacher_run.run_dir / "model.safetensors"))
    cfg = tiny_cfg(tmp_path, teacher={"run": str(teacher_run.run_dir)}, method={"name": "kd", "params": {"alpha": 0.5}})
    res = fit(cfg)
    assert res.summary["teacher_test_accuracy"] == pytest.approx(teacher_run.summary["test_accuracy"])
    assert res.summary["teacher_params"] > res.summary["params"]
    rows = [json.loads(l) for l in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert "train_kd" in rows[0] and "train_ce" in rows[0]
    after = load_file(str(teacher_run.run_dir / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("method,params", [("fitnets", {}), ("at", {"n_pairs": 2}), ("dkd", {"warmup_epochs": 1}),
                                            ("nkd", {}), ("jsd", {}), ("rkl", {}), ("bdkd", {})])
def test_every_method_runs_one_epoch(tmp_path, teacher_run, method, params):
    student = {"arch": "cnn", "kwargs": {"width": 4}}
    cfg = tiny_cfg(tmp_path, teacher={"run": str(teacher_run.run_dir)}, student=student,
                   method={"name": method, "params": params}, train={"epochs": 1, "progress": False})
    res = fit(cfg)
    assert 0.0 <= res.summary["test_accuracy"] <= 1.0
    row = json.loads((res.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert row["train_loss"] == pytest.approx(sum(v for k, v in row.items() if k.startswith("train_") and k != "train_loss"), rel=1e-5)


def test_cross_family_feature_distillation_cnn_to_mlp(tmp_path, teacher_run):
    # MLP has no spatial map: the automatic projector pools the teacher map to a vector.
    cfg = tiny_cfg(tmp_path, teacher={"run": str(teacher_run.run_dir)}, method={"name": "fitnets"},
                   train={"epochs": 1, "progress": False})
    res = fit(cfg)
    assert res.summary["test_accuracy"] > 0.1


@pytest.mark.parametrize("how", ["sigint", "hard"])
def test_resume_reaches_same_weights(tmp_path, teacher_run, monkeypatch, how):
    """sigint: a first Ctrl-C (finish the step, save, stop); hard: an exception mid-step
    (resume from the last periodic checkpoint)."""
    common = dict(teacher={"run": str(teacher_run.run_dir)}, method={"name": "kd"},
                  student={"arch": "cnn", "kwargs": {"width": 4}},
                  data={"name": "digits", "batch_size": 32, "augment": {"pad_crop": 1, "flip": True}},
                  train={"epochs": 3, "progress": False, "checkpoint_every": 7, "scheduler": {"name": "cosine"}})
    full = fit(tiny_cfg(tmp_path / "a", **common))

    calls = {"n": 0}
    real_step = torch.optim.Adam.step

    def flaky_step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 50:  # in the middle of epoch 2, and of a step
            if how == "hard":
                raise KeyboardInterrupt
            signal.raise_signal(signal.SIGINT)
        return real_step(self, *a, **k)

    cfg_b = tiny_cfg(tmp_path / "b", **common)
    monkeypatch.setattr(torch.optim.Adam, "step", flaky_step)
    with pytest.raises(Interrupted, match="--resume"):
        fit(cfg_b)
    monkeypatch.setattr(torch.optim.Adam, "step", real_step)
    latest = (cfg_b.run_dir / "checkpoints" / "latest").read_text()
    assert latest == ("step-00000050" if how == "sigint" else "step-00000049")
    resumed = fit(cfg_b, resume=True)
    a = load_file(str(full.run_dir / "model.safetensors"))
    b = load_file(str(resumed.run_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert resumed.summary["test_accuracy"] == full.summary["test_accuracy"]


def test_existing_run_dir_is_not_overwritten(tmp_path):
    cfg = tiny_cfg(tmp_path, train={"epochs": 1, "progress": False})
    fit(cfg)
    with pytest.raises(RunDirExistsError, match="--overwrite"):
        fit(cfg)
    assert fit(cfg, overwrite=True).summary["epochs"] == 1


class _NaNParams(Params):
    at_step: int = 2


@methods.register("nan_for_test", params=_NaNParams, needs_teacher=False)
class _NaNMethod(Method):
    """Test-only: a loss term that turns NaN at a chosen step."""

    def forward(self, s, t, y, progress):
        ce = torch.nn.functional.cross_entropy(s.logits, y)
        bad = ce * float("nan") if progress.step == self.params.at_step else ce * 0
        return {"ce": ce, "exploding": bad}


def test_nan_loss_stops_naming_term_and_step(tmp_path):
    cfg = tiny_cfg(tmp_path, method={"name": "nan_for_test", "params": {"at_step": 3}})
    with pytest.raises(DivergenceError, match=r"'exploding'.*step 3"):
        fit(cfg)


def test_teacher_class_count_mismatch(tmp_path):
    from distillery.models import build_model
    from distillery.config import ModelSpec

    m = build_model(ModelSpec(arch="mlp"), in_channels=1, num_classes=5, input_size=(8, 8))
    w = tmp_path / "t5.safetensors"
    save_file(m.state_dict(), str(w))
    cfg = tiny_cfg(tmp_path, method={"name": "kd"},
                   teacher={"model": {"arch": "mlp", "kwargs": {"num_classes": 5}, "weights": str(w)}})
    with pytest.raises(ModelError, match="predicts 5 classes but the data has 10"):
        fit(cfg)


def test_teacher_channel_mismatch(tmp_path):
    from distillery.models import build_model
    from distillery.config import ModelSpec

    m = build_model(ModelSpec(arch="cnn", kwargs={"width": 4}), in_channels=3, num_classes=10, input_size=(8, 8))
    w = tmp_path / "t3.safetensors"
    save_file(m.state_dict(), str(w))
    cfg = tiny_cfg(tmp_path, method={"name": "kd"},
                   teacher={"model": {"arch": "cnn", "kwargs": {"width": 4, "in_channels": 3}, "weights": str(w)}})
    with pytest.raises(ModelError, match="in_channels"):
        fit(cfg)


def test_pickle_teacher_refused(tmp_path):
    p = tmp_path / "teacher.pt"
    torch.save({"x": torch.zeros(1)}, p)
    cfg = tiny_cfg(tmp_path, method={"name": "kd"}, teacher={"model": {"arch": "mlp", "weights": str(p)}})
    with pytest.raises(ModelError, match="safetensors"):
        fit(cfg)


def test_unfinished_teacher_run(tmp_path):
    cfg = tiny_cfg(tmp_path, method={"name": "kd"}, teacher={"run": str(tmp_path / "missing")})
    with pytest.raises(ModelError, match="not a finished training run"):
        fit(cfg)


def test_python_api_accepts_modules(tmp_path, teacher_run):
    import distillery
    from distillery.models import build_model
    from distillery.config import ModelSpec

    student = build_model(ModelSpec(arch="mlp", kwargs={"hidden": [16]}), in_channels=1, num_classes=10, input_size=(8, 8))
    res = distillery.distill(teacher=str(teacher_run.run_dir), student=student, data="digits", method="kd",
                             output_dir=str(tmp_path), epochs=1, progress=False)
    assert res.student is student and res.summary["method"] == "kd"
    with pytest.raises(DistilleryError):
        distillery.distill(teacher=str(teacher_run.run_dir), student="mlp", data="digits", method="kd",
                           output_dir=str(tmp_path), epochs=0)


def test_tensorboard_tracking_writes_local_events(tmp_path):
    pytest.importorskip("tensorboard")
    res = fit(tiny_cfg(tmp_path, train={"epochs": 1, "progress": False, "track": ["tensorboard"]}))
    events = list((res.run_dir / "tracking").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_missing_tracker_package_is_one_message(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(DistilleryError, match="pip install mlflow"):
        fit(tiny_cfg(tmp_path, train={"epochs": 1, "progress": False, "track": ["mlflow"]}))


def test_finished_summary_reuses_only_a_finished_run_of_the_same_config(tmp_path):
    from distillery.engine.checkpoint import finished_summary

    cfg = tiny_cfg(tmp_path, train={"epochs": 1, "progress": False, "report": False})
    assert finished_summary(cfg) is None  # nothing on disk
    summary = fit(cfg).summary
    assert finished_summary(cfg) == json.loads(json.dumps(summary))
    other = tiny_cfg(tmp_path, train={"epochs": 1, "progress": False, "report": False, "seed": 7})
    assert finished_summary(other) is None  # same run directory, another config
    (cfg.run_dir / "summary.json").unlink()  # an unfinished run is never reused
    assert finished_summary(cfg) is None
