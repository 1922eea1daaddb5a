"""Exports of a trained student: each is reloaded from disk and must reproduce PyTorch."""
import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_cfg
from distillery.cli import app
from distillery.data import load_data
from distillery.engine import fit
from distillery.export import ExportError, OnnxModel, export, load_exported, quantize_int8
from distillery.models import forward_logits
from distillery.report import write_report
from distillery.report.runs import build_student, load_run

runner = CliRunner()
DATA = {"name": "digits", "batch_size": 32, "train_subset": 300}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A small CNN with a Linear head (so int8 quantisation has a layer to work on)."""
    tmp = tmp_path_factory.mktemp("export")
    res = fit(tiny_cfg(tmp, name="student", data=DATA, student={"arch": "cnn", "kwargs": {"width": 4}},
                       train={"epochs": 1, "progress": False}))
    data = load_data(load_run(res.run_dir).config.data)
    return {"dir": res.run_dir, "data": data, "student": build_student(load_run(res.run_dir), data)}


def _logits(model, data, n=64):
    with torch.inference_mode():
        return forward_logits(model, data.test.inputs[:n]).float()


def test_safetensors_export_rebuilds_the_model(run, tmp_path):
    out = tmp_path / "st"
    res = runner.invoke(app, ["export", str(run["dir"]), "--format", "safetensors", "--out", str(out), "--no-latency"])
    assert res.exit_code == 0, res.output
    meta = json.loads((out / "model_config.json").read_text())
    assert meta["model"]["arch"] == "cnn" and meta["data"]["num_classes"] == 10 and len(meta["class_names"]) == 10
    assert (out / "config.yaml").is_file() and (out / "model.safetensors").is_file()
    model = load_exported(out)
    assert torch.equal(_logits(model, run["data"]), _logits(run["student"], run["data"]))
    info = json.loads((out / "export.json").read_text())
    assert info["check"]["passed"] and info["test_accuracy"] == pytest.approx(info["pytorch_test_accuracy"])


def test_int8_safetensors_is_smaller_and_reloads_exactly(run, tmp_path):
    res = export(run["dir"], "safetensors", out=tmp_path / "q", quantize="int8", latency_repeats=3)
    info = res.info
    assert info["quantize"] == "int8" and "torch.ao.quantization.quantize_dynamic" in info["quantizer"]
    assert info["size_bytes"] < info["pytorch_size_bytes"]
    assert 0 <= info["test_accuracy"] <= 1 and info["latency"]["threads"] >= 1 and info["latency"]["batch1_median_ms"] > 0
    reloaded = load_exported(res.dir)
    assert torch.equal(_logits(reloaded, run["data"]), _logits(quantize_int8(run["student"]), run["data"]))


def test_onnx_matches_pytorch_on_real_test_inputs(run):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    res = export(run["dir"], "onnx", measure_latency=False)  # default place: RUN_DIR/export/onnx
    assert res.dir == run["dir"] / "export" / "onnx" and res.model_file.name == "model.onnx"
    check = res.info["check"]
    assert check["passed"] and check["batch_of_one_ok"] and check["max_abs_diff"] <= check["atol"]
    assert "test split" in check["compared_on"]
    ort = load_exported(res.dir)
    assert isinstance(ort, OnnxModel)
    assert torch.allclose(_logits(ort, run["data"]), _logits(run["student"], run["data"]), atol=1e-4, rtol=1e-3)
    assert res.info["test_accuracy"] == pytest.approx(res.info["pytorch_test_accuracy"])


def test_onnx_mismatch_fails_loudly(run, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    real_forward = OnnxModel.forward
    monkeypatch.setattr(OnnxModel, "forward", lambda self, x: real_forward(self, x) + 0.05)  # a wrong runtime
    with pytest.raises(ExportError, match=r"does not reproduce PyTorch.*tolerance atol=0.0001"):
        export(run["dir"], "onnx", out=tmp_path / "bad", measure_latency=False)
    assert (tmp_path / "bad" / "model.onnx.rejected").is_file()
    assert not (tmp_path / "bad" / "model.onnx").exists() and not (tmp_path / "bad" / "export.json").exists()


def test_torchscript_int8_is_checked_and_shown_in_the_report(run):
    res = export(run["dir"], "torchscript", quantize="int8", latency_repeats=3)
    assert res.dir.name == "torchscript-int8" and res.info["check"]["passed"]
    model = load_exported(res.dir)
    assert isinstance(model, torch.jit.ScriptModule)
    assert torch.allclose(_logits(model, run["data"]), _logits(quantize_int8(run["student"]), run["data"]), atol=1e-5)
    md = write_report(run["dir"], measure_latency=False, pareto=False).read_text()
    header = next(line for line in md.splitlines() if line.startswith("| measure"))
    assert "torchscript export int8" in header
    assert f"{100 * res.info['test_accuracy']:.2f}" in md


def test_bad_requests_are_clear_errors(run):
    with pytest.raises(ExportError, match="not a Hugging Face model.*safetensors, onnx or torchscript"):
        export(run["dir"], "hf")
    with pytest.raises(ExportError, match="choose one of: safetensors, onnx, torchscript, hf"):
        export(run["dir"], "tflite")
    with pytest.raises(ExportError, match="only one is int8"):
        export(run["dir"], "onnx", quantize="int4")
    res = runner.invoke(app, ["export", str(run["dir"] / "missing"), "--format", "onnx"])
    assert res.exit_code == 2 and "Traceback" not in res.output


def test_hf_student_exports_with_save_pretrained(tmp_path):
    transformers = pytest.importorskip("transformers")
    source = tmp_path / "tiny-vit"
    config = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=32, num_labels=10)
    transformers.ViTForImageClassification(config).save_pretrained(source)
    res = fit(tiny_cfg(tmp_path, name="vit", data=DATA, student={"arch": f"hf:{source}", "kwargs": {}},
                       train={"epochs": 1, "progress": False}))
    out = export(res.run_dir, "hf", measure_latency=False)
    assert (out.dir / "config.json").is_file() and out.info["check"]["passed"]
    reloaded = transformers.AutoModelForImageClassification.from_pretrained(out.dir)
    assert reloaded.config.id2label[3] == "3"
    data = load_data(load_run(res.run_dir).config.data)
    student = build_student(load_run(res.run_dir), data)
    assert torch.allclose(_logits(load_exported(out.dir), data), _logits(student, data), atol=1e-5)
