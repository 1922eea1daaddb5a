"""`distillery search` end to end on digits (8x8, ships with scikit-learn)."""
import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

from distillery.cli import app
from distillery.config import ModelSpec, load_config
from distillery.models import build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")
runner = CliRunner()


def _teacher(tmp_path):
    """A cnn teacher (weights need not be trained for a test)."""
    from safetensors.torch import save_model

    torch.manual_seed(0)
    model = build_model(ModelSpec(arch="cnn", kwargs={"width": 16}), in_channels=1, num_classes=10, input_size=(8, 8))
    save_model(model, str(tmp_path / "teacher.safetensors"))
    return {"model": {"arch": "cnn", "kwargs": {"width": 16}, "weights": str(tmp_path / "teacher.safetensors")}}


def _config(tmp_path, **search):
    raw = {
        "run": {"name": "s", "output_dir": str(tmp_path / "runs"), "data": {"name": "digits", "batch_size": 32},
                "teacher": _teacher(tmp_path), "student": {"arch": "cnn", "kwargs": {"width": 4}},
                "method": {"name": "kd"}, "train": {"epochs": 1, "progress": False, "report": False}},
        "search": {"space": {"cnn": {"width": [4, 8, 12], "depth": [1, 2, 3]}, "mlp": {"hidden": [[16], [32]]}},
                   "constraints": {"max_params": 20000}, "population": 4, "sample_size": 2, "cycles": 6,
                   "top_k": 2, "batch_size": 32, **search},
    }
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_search_writes_configs_that_load(tmp_path):
    res = runner.invoke(app, ["search", str(_config(tmp_path))])
    assert res.exit_code == 0, res.output
    out = tmp_path / "runs" / "s"
    for name in ("search.md", "pareto.png", "candidates.csv", "search.json", "top1.yaml", "top2.yaml", "reference.yaml"):
        assert (out / name).is_file(), name
    assert not (out / "top3.yaml").exists()
    info = json.loads((out / "search.json").read_text())
    for i, row in enumerate(info["top"], start=1):
        cfg = load_config(out / f"top{i}.yaml")
        assert cfg.name == f"s-top{i}" and cfg.method.name == "kd" and cfg.teacher is not None
        assert (cfg.student.arch, cfg.student.kwargs) == (row["arch"], row["kwargs"])
        assert row["params"] <= 20000
    assert [r["score"] for r in info["top"]] == sorted((r["score"] for r in info["candidates"]), reverse=True)[:2]
    assert load_config(out / "reference.yaml").student.kwargs == {"width": 4}
    table = (out / "search.md").read_text()
    assert "| 1 | `" in table and "| hand-picked | `cnn(width=4)`" in table


def test_search_is_deterministic_for_a_seed(tmp_path):
    from distillery.search import load_search_config, run_search

    path = _config(tmp_path, proxy="naswot")
    a = run_search(load_search_config(path), progress=False)
    b = run_search(load_search_config(path), progress=False)
    assert [(r.candidate, r.score) for r in a.rows] == [(r.candidate, r.score) for r in b.rows]
    c = run_search(load_search_config(path, ["search.seed=1"]), progress=False)
    assert [r.candidate for r in c.rows] != [r.candidate for r in a.rows]


def test_search_then_distil_the_top_candidate(tmp_path):
    res = runner.invoke(app, ["search", str(_config(tmp_path)), "--distill-top", "1", "--set", "search.cycles=2"])
    assert res.exit_code == 0, res.output
    table = (tmp_path / "runs" / "s" / "distilled.md").read_text()
    assert "| top1 |" in table and "| hand-picked |" in table
    for run in ("s-top1", "s-reference"):
        assert json.loads((tmp_path / "runs" / run / "summary.json").read_text())["method"] == "kd"


def test_search_config_error_is_one_clear_message(tmp_path):
    res = runner.invoke(app, ["search", str(_config(tmp_path)), "--set", "search.space.cnn.kernel_size=[3,5]"])
    assert res.exit_code == 2
    assert "'kernel_size' is not a keyword" in res.output and "Traceback" not in res.output
