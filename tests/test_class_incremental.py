"""Class-incremental KD + weight aligning (Zhao et al., CVPR 2020): the loss, the classifier
growth, the aligning rule and the recipe end to end on digits."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_cfg
from distillery.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _method(**params):
    from distillery.methods import get_spec

    spec = get_spec("wa")
    return spec.cls(spec.validate_params(params), student=torch.nn.Linear(2, 5), teacher_layers=None, num_classes=5)


def test_wa_loss_is_the_papers_mixture():
    from distillery.methods.base import ModelOutput, Progress

    torch.manual_seed(0)
    s, t = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    y = torch.tensor([0, 4, 3, 1, 2, 4])
    terms = _method(temperature=2.0)(ModelOutput(s, {}), ModelOutput(t, {}), y, Progress(0.0, 0, 1))
    lam, T = 3 / 5, 2.0
    expected_kd = lam * T * T * F.kl_div(F.log_softmax(s[:, :3] / T, -1), F.softmax(t / T, -1), reduction="batchmean")
    assert math.isclose(float(terms["kd"]), float(expected_kd), rel_tol=1e-9)
    assert math.isclose(float(terms["ce"]), (1 - lam) * float(F.cross_entropy(s, y)), rel_tol=1e-9)
    fixed = _method(kd_weight=0.25)(ModelOutput(s, {}), ModelOutput(t, {}), y, Progress(0.0, 0, 1))
    assert math.isclose(float(fixed["ce"]), 0.75 * float(F.cross_entropy(s, y)), rel_tol=1e-9)
    with pytest.raises(ConfigError, match="OLD classes"):
        _method()(ModelOutput(s, {}), ModelOutput(s, {}), y, Progress(0.0, 0, 1))


def test_classifier_grows_keeping_old_rows_and_aligning_scales_only_new_rows():
    from distillery.recipes.class_incremental import align_weights, expand_classifier

    old = {"body.weight": torch.randn(4, 3), "head.weight": torch.randn(2, 4), "head.bias": torch.randn(2)}
    fresh = {"body.weight": torch.zeros(4, 3), "head.weight": torch.full((5, 4), 7.0), "head.bias": torch.zeros(5)}
    grown = expand_classifier(old, fresh, c_old=2)
    assert torch.equal(grown["body.weight"], old["body.weight"])
    assert torch.equal(grown["head.weight"][:2], old["head.weight"])
    assert torch.equal(grown["head.weight"][2:], fresh["head.weight"][2:])
    assert torch.equal(grown["head.bias"][:2], old["head.bias"])
    with pytest.raises(ConfigError, match="cannot grow"):
        expand_classifier(old, {**fresh, "body.weight": torch.zeros(5, 3)}, c_old=2)

    w = torch.tensor([[3.0, 4.0], [0.0, 5.0], [0.0, 10.0], [6.0, 8.0]])  # old norms 5, 5; new norms 10, 10
    aligned, gamma = align_weights({"head.weight": w, "head.bias": torch.ones(4)}, c_old=2, c_all=4)
    assert gamma == pytest.approx(0.5)
    assert torch.equal(aligned["head.weight"][:2], w[:2])
    assert torch.allclose(aligned["head.weight"][2:].norm(dim=1), torch.tensor([5.0, 5.0]))
    assert torch.equal(aligned["head.bias"], torch.ones(4))  # WA rescales weights only


def test_task_groups_are_checked():
    from distillery.recipes.class_incremental import split_tasks

    assert split_tasks(10, 5) == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert split_tasks(4, [[3, 1], [0, 2]]) == [[3, 1], [0, 2]]
    with pytest.raises(ConfigError, match="divide"):
        split_tasks(10, 3)
    with pytest.raises(ConfigError, match="distinct"):
        split_tasks(4, [[0, 1], [1, 2]])


def test_task_data_trains_on_new_classes_plus_memory_and_tests_on_all_seen(tmp_path):
    from distillery.data import load_data
    from distillery.recipes.class_incremental import task_data

    full = load_data(tiny_cfg(tmp_path).data)
    memory = {3: (full.train.labels == 3).nonzero().flatten()[:4]}
    bundle = task_data(full, seen=[3, 7, 1], new=[7, 1], memory=memory)
    assert bundle.num_classes == 3 and bundle.class_names == [full.class_names[c] for c in (3, 7, 1)]
    # train: every row of classes 7 and 1, four rows of class 3 -- renumbered 3->0, 7->1, 1->2
    counts = torch.bincount(bundle.train.labels, minlength=3)
    assert counts[0] == 4 and counts[1] == (full.train.labels == 7).sum() and counts[2] == (full.train.labels == 1).sum()
    assert torch.equal(torch.bincount(bundle.test.labels, minlength=3),
                       torch.stack([(full.test.labels == c).sum() for c in (3, 7, 1)]))


def test_recipe_end_to_end_reuses_finished_tasks(tmp_path):
    from distillery.recipes.class_incremental import run_incremental

    cfg = tiny_cfg(tmp_path, name="cil", train={"epochs": 3})
    result = run_incremental(cfg, tasks=[[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]], strategy="wa", memory_per_class=5)
    rows = result["rows"]
    assert [r["seen"] for r in rows] == [5, 10] and rows[1]["gamma"] > 0
    assert result["average_incremental_accuracy"] == pytest.approx((rows[0]["test_accuracy"] + rows[1]["test_accuracy"]) / 2)
    series = tmp_path / "runs" / "cil"
    assert (series / "task-1" / "model-aligned.safetensors").is_file()
    assert "Average incremental accuracy" in (series / "incremental.md").read_text()
    from distillery.config import load_config

    t1 = load_config(series / "task-1" / "config.yaml")
    assert t1.method.name == "wa" and t1.teacher is not None and t1.student.weights.endswith("task-1-init.safetensors")
    mtime = (series / "task-0" / "model.safetensors").stat().st_mtime
    again = run_incremental(cfg, tasks=[[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]], strategy="wa", memory_per_class=5)
    assert (series / "task-0" / "model.safetensors").stat().st_mtime == mtime  # reused, not retrained
    assert again["average_incremental_accuracy"] == pytest.approx(result["average_incremental_accuracy"])


def test_cli_incremental_prints_the_average(tmp_path):
    import yaml
    from typer.testing import CliRunner

    from distillery.cli import app

    path = tmp_path / "c.yaml"
    raw = tiny_cfg(tmp_path, name="cli-cil", train={"epochs": 1}).model_dump(mode="json")
    path.write_text(yaml.safe_dump(raw))
    res = CliRunner().invoke(app, ["incremental", str(path), "--tasks", "2", "--strategy", "kd", "--memory", "3"])
    assert res.exit_code == 0, res.output
    assert "average incremental accuracy" in res.output
    bad = CliRunner().invoke(app, ["incremental", str(path), "--tasks", "3"])
    assert bad.exit_code != 0 and "divide" in bad.output and "Traceback" not in bad.output
