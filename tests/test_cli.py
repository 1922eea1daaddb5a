"""End-to-end through the command line, on tiny data (digits ship with scikit-learn)."""
import json

import yaml
from typer.testing import CliRunner

from distillery.cli import app

runner = CliRunner()


def _write(path, raw):
    path.write_text(yaml.safe_dump(raw))
    return path


def test_methods_lists_registry():
    res = runner.invoke(app, ["methods"])
    assert res.exit_code == 0
    for name in ("ce", "kd", "dkd", "nkd", "rkl", "jsd", "bdkd", "fitnets", "at"):
        assert name in res.output


def test_train_distill_eval_end_to_end(tmp_path):
    out = str(tmp_path / "runs")
    teacher = _write(tmp_path / "t.yaml", {"name": "t", "output_dir": out, "data": {"name": "digits"},
                                           "student": {"arch": "cnn", "kwargs": {"width": 8}}})
    res = runner.invoke(app, ["train", str(teacher), "--set", "train.epochs=2", "--set", "train.progress=false"])
    assert res.exit_code == 0, res.output
    student = _write(tmp_path / "s.yaml", {"name": "s", "output_dir": out, "data": {"name": "digits", "train_subset": 300},
                                           "teacher": {"run": f"{out}/t"}, "student": {"arch": "mlp"},
                                           "method": {"name": "kd"}, "train": {"epochs": 2, "progress": False}})
    res = runner.invoke(app, ["distill", str(student)])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "runs" / "s" / "summary.json").read_text())
    assert summary["train_samples"] == 300 and summary["method"] == "kd"
    res = runner.invoke(app, ["eval", f"{out}/s"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["accuracy"] == summary["test_accuracy"]
    # the same run again without --overwrite: one clear message, no traceback, non-zero exit
    res = runner.invoke(app, ["distill", str(student)])
    assert res.exit_code == 2 and "--overwrite" in res.output and "Traceback" not in res.output


def test_config_typo_is_one_clear_message(tmp_path):
    cfg = _write(tmp_path / "c.yaml", {"student": {"arch": "mlp"}, "trian": {"epochs": 1}})
    res = runner.invoke(app, ["train", str(cfg)])
    assert res.exit_code == 2
    assert "trian" in res.output and "unknown key" in res.output and "Traceback" not in res.output


def test_distill_without_teacher_refused(tmp_path):
    cfg = _write(tmp_path / "c.yaml", {"student": {"arch": "mlp"}})
    res = runner.invoke(app, ["distill", str(cfg)])
    assert res.exit_code == 2 and "teacher" in res.output


def test_train_refuses_a_method_that_needs_a_teacher(tmp_path):
    cfg = _write(tmp_path / "c.yaml", {"student": {"arch": "mlp"}, "method": {"name": "kd"},
                                       "teacher": {"run": str(tmp_path / "t")}})
    res = runner.invoke(app, ["train", str(cfg)])
    assert res.exit_code == 2 and "distillery distill" in res.output


def test_train_runs_a_teacher_free_method(tmp_path):
    cfg = _write(tmp_path / "c.yaml", {"output_dir": str(tmp_path / "runs"), "data": {"name": "digits"},
                                       "student": {"arch": "mlp", "kwargs": {"hidden": [16]}}, "method": {"name": "dml"},
                                       "train": {"epochs": 1, "progress": False, "report": False}})
    res = runner.invoke(app, ["train", str(cfg)])
    assert res.exit_code == 0, res.output


def test_demo_quick(tmp_path):
    res = runner.invoke(app, ["demo", "--quick", "--output-dir", str(tmp_path / "demo")])
    assert res.exit_code == 0, res.output
    text = (tmp_path / "demo" / "results.md").read_text()
    assert "student distilled (KD)" in text and "student from scratch" in text
