"""Export a trained student for deployment, and prove the export computes what PyTorch computes.

    distillery export runs/kd-cnn8 --format onnx --quantize int8
    model = distillery.export.load_exported("runs/kd-cnn8/export/onnx-int8")

Formats:

* ``safetensors`` -- the weights plus ``model_config.json`` (architecture, data shape, class
  names, input normalisation) and the run's ``config.yaml``: :func:`load_exported` rebuilds the
  model with Distillery's model zoo / import path / ``hf:`` adapter;
* ``onnx`` -- ``torch.onnx.export`` with a dynamic batch axis; ONNX Runtime must reproduce
  PyTorch's logits on real test inputs within ``atol + rtol * |logit|`` (:data:`TOLERANCES`),
  else the export fails and the file is renamed ``*.rejected``;
* ``torchscript`` -- ``torch.jit.trace`` (checked on a second real batch by the tracer, then
  the saved file is reloaded and compared like ONNX);
* ``hf`` -- ``save_pretrained`` for Hugging Face students (``arch: hf:...``), with class names
  as ``id2label``, reloadable with ``AutoModelFor...Classification.from_pretrained``.

Every export is checked after reloading it from disk, evaluated on the run's full test split
and timed, and writes ``export.json`` (checks, accuracy, latency, sizes).  ``distillery
report`` shows exports written under ``RUN_DIR/export/`` as extra columns.

``--quantize int8`` applies dynamic int8 quantisation to the Linear layers (weights stored as
int8, activations quantised on the fly): ``torch.ao.quantization.quantize_dynamic`` for
``safetensors`` and ``torchscript``; for ``onnx``, PyTorch's quantised operators have no ONNX
export, so the verified float ONNX graph is quantised with ONNX Runtime's own
``quantize_dynamic`` (MatMul/Gemm weights to int8) -- the same scheme, in the runtime that will
run it.  Quantised outputs legitimately differ from float ones, so for them the record is the
accuracy, the top-1 agreement with the float student, and the latency.  Both
``torch.ao.quantization`` and ``torch.jit`` are deprecated in recent PyTorch in favour of
torchao and ``torch.export``; their deprecation warnings are silenced here, and a PyTorch that
no longer ships them gets a clear error.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import json
import logging
import shutil
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from distillery.config import ModelSpec
from distillery.data import DataBundle, load_data
from distillery.errors import DistilleryError
from distillery.models import build_model, forward_logits
from distillery.report import metrics as M
from distillery.report.runs import build_student, load_run

__all__ = ["FORMATS", "TOLERANCES", "ExportError", "ExportResult", "export", "load_exported", "quantize_int8"]

FORMATS = ("safetensors", "onnx", "torchscript", "hf")
#: (atol, rtol) of the check "|exported - pytorch| <= atol + rtol * |pytorch|" on every logit.
#: ONNX Runtime uses other kernels (fused, reordered sums), so it gets a looser bound than the
#: formats that run PyTorch's own kernels.
TOLERANCES = {"onnx": (1e-4, 1e-3), "torchscript": (1e-5, 1e-4), "safetensors": (1e-5, 1e-4), "hf": (1e-5, 1e-4)}
#: How many real test rows the outputs are compared on.
CHECK_ROWS = 256


class ExportError(DistilleryError):
    """An export could not be written, or does not reproduce the PyTorch model."""


@dataclass
class ExportResult:
    dir: Path
    model_file: Path
    info: dict[str, Any]  # the content of export.json


# ----------------------------------------------------------------------------------------------
# int8 dynamic quantisation


@contextlib.contextmanager
def _quiet_deprecations():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r".*(deprecated|quantize_per_tensor).*")
        yield


def _dynamic_linear_cls():
    try:
        from torch.ao.nn.quantized.dynamic import Linear
    except ImportError as err:
        raise ExportError(f"this PyTorch ({torch.__version__}) has no torch.ao dynamic quantisation ({err}); "
                          "export without --quantize, or use --format onnx (quantised by ONNX Runtime)") from None
    return Linear


def quantize_int8(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with its ``nn.Linear`` layers dynamically quantised to int8
    (``torch.ao.quantization.quantize_dynamic``); raises when there is no Linear layer."""
    dyn_linear = _dynamic_linear_cls()
    with _quiet_deprecations():
        q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model).eval(), {nn.Linear}, dtype=torch.qint8)
    if not any(isinstance(m, dyn_linear) for m in q.modules()):
        raise ExportError(f"{type(model).__name__} has no nn.Linear layer, so int8 dynamic quantisation would change "
                          "nothing; export without --quantize")
    return q


def _quantized_linears(model: nn.Module) -> dict[str, nn.Module]:
    dyn_linear = _dynamic_linear_cls()
    return {name: m for name, m in model.named_modules() if isinstance(m, dyn_linear)}


def _int8_state(qmodel: nn.Module) -> dict[str, torch.Tensor]:
    """Tensors of a dynamically quantised model in a form safetensors can store: int8 weights
    with their scale and zero point for quantised Linear layers, float tensors for the rest."""
    qlinears = _quantized_linears(qmodel)
    state: dict[str, torch.Tensor] = {}
    for name, m in qlinears.items():
        w, b = m.weight(), m.bias()
        if w.qscheme() not in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            raise ExportError(f"layer {name}: only per-tensor int8 weights can be stored (got {w.qscheme()})")
        state[f"{name}.weight_int8"] = w.int_repr().contiguous()
        state[f"{name}.weight_scale"] = torch.tensor([w.q_scale()], dtype=torch.float64)
        state[f"{name}.weight_zero_point"] = torch.tensor([w.q_zero_point()], dtype=torch.int64)
        if b is not None:
            state[f"{name}.bias"] = b.detach().contiguous()
    for key, value in qmodel.state_dict().items():
        if isinstance(value, torch.Tensor) and not any(key.startswith(f"{n}.") for n in qlinears):
            state[key] = value.contiguous()
    return state


def _load_int8_state(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Inverse of :func:`_int8_state`: load the float tensors into a freshly built float
    ``model``, quantise it, then set the stored int8 weights of each quantised Linear layer.
    (Float tensors go in before quantising: a quantised layer's own loader expects tensors
    this file does not hold.)"""
    qnames = {k[: -len(".weight_int8")] for k in state if k.endswith(".weight_int8")}

    def in_qlayer(key: str) -> bool:
        return any(key.startswith(f"{n}.") for n in qnames)

    floats = {k: v for k, v in state.items() if not in_qlayer(k)}
    missing = sorted(k for k in model.state_dict() if not in_qlayer(k) and k not in floats)
    if missing:
        raise ExportError(f"int8 weights do not fit the model: missing {', '.join(missing[:5])}")
    model.load_state_dict(floats, strict=False)
    qmodel = quantize_int8(model)
    qlinears = _quantized_linears(qmodel)
    if set(qlinears) != qnames:
        raise ExportError(f"int8 weights do not fit the model: quantised layers {sorted(qnames)} in the file, "
                          f"{sorted(qlinears)} in the model")
    for name, m in qlinears.items():
        q8, scale, zp = state[f"{name}.weight_int8"], float(state[f"{name}.weight_scale"]), int(state[f"{name}.weight_zero_point"])
        # Requantising the dequantised values with the same scale gives back exactly these ints.
        with _quiet_deprecations():
            weight = torch.quantize_per_tensor((q8.float() - zp) * scale, scale, zp, torch.qint8)
        m.set_weight_bias(weight, state.get(f"{name}.bias"))
    return qmodel


# ----------------------------------------------------------------------------------------------
# Checks


class _Logits(nn.Module):
    """Any classifier -> a module returning a plain logits tensor (HF models return an output
    object, which ONNX and TorchScript cannot take as the graph's output)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return forward_logits(self.model, x)


def _compare(fmt: str, got: torch.Tensor, want: torch.Tensor, what: str, rows: int) -> dict[str, Any]:
    """Check ``got`` against PyTorch's ``want`` within :data:`TOLERANCES`; raise when outside."""
    atol, rtol = TOLERANCES[fmt]
    got, want = got.float(), want.float()
    if got.shape != want.shape:
        raise ExportError(f"{what}: output shape {tuple(got.shape)} differs from PyTorch's {tuple(want.shape)}")
    diff = (got - want).abs()
    excess = diff - (atol + rtol * want.abs())
    check = {"compared_on": f"first {rows} rows of the run's test split (real inputs)",
             "atol": atol, "rtol": rtol, "max_abs_diff": diff.max().item(),
             "top1_agreement": M.top1_agreement(got, want), "passed": bool((excess <= 0).all())}
    if not check["passed"]:
        row = int(excess.amax(-1).argmax())
        raise ExportError(
            f"{what} does not reproduce PyTorch: max |difference| {check['max_abs_diff']:.3g} on {rows} real test "
            f"inputs exceeds the tolerance atol={atol:g} + rtol={rtol:g}·|logit| (worst at test row {row}); "
            "the exported model is not equivalent and must not be used"
        )
    return check


def _reject(path: Path) -> None:
    """Keep a failed artifact for inspection, under a name nobody will deploy by accident."""
    if path.exists():
        path.replace(path.with_name(path.name + ".rejected"))


# ----------------------------------------------------------------------------------------------
# ONNX Runtime behind the nn.Module call convention


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError as err:
        raise ExportError(f"ONNX needs onnx and onnxruntime ({err}); install them with: pip install 'distillery[export]'") from None
    return onnxruntime


class OnnxModel(nn.Module):
    """An ONNX file run by ONNX Runtime (CPU), called like a model: tensor in, logits out.

    ONNX Runtime gets as many intra-op threads as torch has, so latencies are comparable with
    the PyTorch ones next to them."""

    def __init__(self, path: str | Path, threads: int | None = None):
        super().__init__()
        ort = _onnxruntime()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input_name: x.detach().cpu().numpy()})[0]
        return torch.from_numpy(out)


# ----------------------------------------------------------------------------------------------
# Writers: each writes its file(s) into `out` and returns (model file, model reloaded from disk)


def _write_safetensors(model: nn.Module, out: Path, quantized: bool) -> tuple[Path, nn.Module]:
    from safetensors.torch import save_file, save_model

    path = out / "model.safetensors"
    if quantized:
        save_file(_int8_state(model), str(path), metadata={"format": "pt", "distillery_quantize": "int8"})
    else:
        save_model(model, str(path))
    return path, load_exported(out)


def _write_onnx(model: nn.Module, out: Path, example: torch.Tensor, quantized: bool,
                check: Callable[[nn.Module, str], dict]) -> tuple[Path, nn.Module, dict]:
    _onnxruntime()
    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:  # torch.onnx.export needs both; say how to get them instead of failing inside it
        raise ExportError(f"ONNX export needs {' and '.join(missing)}; install with: pip install 'distillery[export]'")
    path = out / "model.onnx"
    batch = torch.export.Dim("batch")
    # The exporter logs a line per missing optional operator library (torchvision): not our concern.
    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    onnx_log.setLevel(logging.ERROR)
    try:
        with _quiet_deprecations(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore", FutureWarning)
            torch.onnx.export(_Logits(model).eval(), (example,), str(path), input_names=["input"], output_names=["logits"],
                              dynamic_shapes=({0: batch},), external_data=False, verbose=False)
    except Exception as err:  # the exporter raises many types; all mean "this model does not export"
        raise ExportError(f"torch.onnx.export failed for {type(model).__name__}: {str(err).splitlines()[0]}") from None
    finally:
        onnx_log.setLevel(level)
    try:
        check_info = check(OnnxModel(path), "the ONNX model run by ONNX Runtime")
    except ExportError:
        _reject(path)
        raise
    if not quantized:
        return path, OnnxModel(path), check_info
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared, qpath = out / "model.prepared.onnx", out / "model.int8.onnx"
    quant_pre_process(str(path), str(prepared))  # shape inference + graph clean-up ORT recommends first
    quantize_dynamic(str(prepared), str(qpath), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
    prepared.unlink()
    return qpath, OnnxModel(qpath), check_info


def _write_torchscript(model: nn.Module, out: Path, example: torch.Tensor, second: torch.Tensor) -> tuple[Path, nn.Module]:
    path = out / "model.pt"
    try:
        with _quiet_deprecations(), torch.no_grad():
            # check_inputs: the tracer reruns the trace on another real batch and compares.
            traced = torch.jit.trace(_Logits(model).eval(), example, check_inputs=[(second,)])
            torch.jit.save(traced, str(path))
            loaded = torch.jit.load(str(path)).eval()
    except Exception as err:
        raise ExportError(f"torch.jit.trace failed for {type(model).__name__}: {str(err).splitlines()[0]}") from None
    return path, loaded


def _write_hf(model: nn.Module, out: Path, run, data: DataBundle) -> tuple[Path, nn.Module]:
    model.config.id2label = dict(enumerate(data.class_names))
    model.config.label2id = {name: i for i, name in enumerate(data.class_names)}
    model.save_pretrained(str(out), safe_serialization=True)
    if run.config.data.tokenizer:  # text students ship with their tokenizer
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(run.config.data.tokenizer).save_pretrained(str(out))
    spec = {"arch": f"hf:{out}", "kwargs": {}, "trust_remote_code": run.config.student.trust_remote_code}
    return out / "model.safetensors", _rebuild(out, spec, data_shape(data))


# ----------------------------------------------------------------------------------------------
# Public API


def data_shape(data: DataBundle) -> dict[str, Any]:
    return {"in_channels": data.in_channels, "num_classes": data.num_classes,
            "input_size": list(data.input_size) if data.input_size is not None else None}


def _rebuild(out: Path, spec: dict, shape: dict, weights: Path | None = None) -> nn.Module:
    model_spec = ModelSpec(arch=spec["arch"], kwargs=spec.get("kwargs") or {},
                           trust_remote_code=bool(spec.get("trust_remote_code")),
                           weights=str(weights) if weights is not None else None)
    size = tuple(shape["input_size"]) if shape.get("input_size") is not None else None
    return build_model(model_spec, in_channels=shape.get("in_channels"), num_classes=shape["num_classes"], input_size=size).eval()


def load_exported(directory: str | Path) -> nn.Module:
    """Load an export back as a callable model (tensor in, logits out) in eval mode: a rebuilt
    ``nn.Module`` (safetensors, hf), a TorchScript module, or ONNX Runtime behind an
    ``nn.Module`` (:class:`OnnxModel`)."""
    directory = Path(directory)
    meta_path = directory / "model_config.json"
    if not meta_path.is_file():
        raise ExportError(f"{directory} is not a Distillery export (no model_config.json); "
                          "write one with `distillery export RUN_DIR --format FORMAT`")
    meta = json.loads(meta_path.read_text())
    fmt, file = meta["format"], directory / meta["file"]
    if fmt == "onnx":
        return OnnxModel(file)
    if fmt == "torchscript":
        with _quiet_deprecations():
            return torch.jit.load(str(file)).eval()
    if fmt == "hf":
        return _rebuild(directory, {**meta["model"], "arch": f"hf:{directory}", "kwargs": {}}, meta["data"])
    if meta.get("quantize") == "int8":
        from safetensors.torch import load_file

        return _load_int8_state(_rebuild(directory, meta["model"], meta["data"]), load_file(str(file)))
    return _rebuild(directory, meta["model"], meta["data"], weights=file)


def export(run_dir: str | Path, format: str = "safetensors", *, out: str | Path | None = None,
           quantize: str | None = None, measure_latency: bool = True, latency_repeats: int = 20,
           threads: int | None = M.DEFAULT_THREADS) -> ExportResult:
    """Export the student of a finished run; see the module docstring for the formats.

    ``out`` defaults to ``RUN_DIR/export/<format>[-int8]`` (where ``distillery report`` finds
    it).  ``threads`` sets torch's (and ONNX Runtime's) thread count for the timing
    (default 1, as in reports; ``None``: torch's current count).  Returns
    the directory, the model file and the ``export.json`` record.  Raises :class:`ExportError`
    (a :class:`DistilleryError`) for an unknown format, an hf export of a non-Hugging-Face
    student, or an export whose outputs do not match PyTorch's.
    """
    if format not in FORMATS:
        raise ExportError(f"unknown export format '{format}'; choose one of: {', '.join(FORMATS)}")
    if quantize not in (None, "int8"):
        raise ExportError(f"unknown quantisation '{quantize}'; the only one is int8 (dynamic, Linear layers)")
    run = load_run(run_dir)
    arch = run.config.student.arch
    if format == "hf" and not arch.startswith("hf:"):
        raise ExportError(
            f"--format hf writes Hugging Face save_pretrained files, but this run's student is '{arch}', not a "
            "Hugging Face model (arch: hf:...); export it with --format safetensors, onnx or torchscript"
        )
    if format == "hf" and quantize:
        raise ExportError("save_pretrained cannot store dynamically quantised layers; use --format onnx, "
                          "torchscript or safetensors with --quantize int8")
    data = load_data(run.config.data)
    if isinstance(data.test.inputs, dict) and format in ("onnx", "torchscript"):
        raise ExportError(f"--format {format} takes one input tensor, but this run's data are token dicts (text); "
                          "use --format hf (or safetensors) for text models")
    student = build_student(run, data)
    out = Path(out) if out is not None else run.dir / "export" / (format + ("-int8" if quantize else ""))
    out.mkdir(parents=True, exist_ok=True)
    # A record of an earlier export here would outlive a failure of this one: drop it first.
    (out / "export.json").unlink(missing_ok=True)

    # Torch-side quantisation (ONNX is quantised by ONNX Runtime after the float check).
    model = quantize_int8(student) if quantize and format != "onnx" else student
    rows = min(CHECK_ROWS, len(data.test))
    x_check = M.take_rows(data.test, rows)
    with torch.inference_mode():
        reference = forward_logits(model, x_check).float()

    def check(loaded: nn.Module, what: str) -> dict:
        with torch.inference_mode():
            info = _compare(format, forward_logits(loaded, x_check), reference, what, rows)
            one = forward_logits(loaded, M.take_rows(data.test, 1))  # a batch of one: the batch axis is free
        return {**info, "batch_of_one_ok": tuple(one.shape) == (1, data.num_classes)}

    shape = data_shape(data)
    meta = {"format": format, "quantize": quantize, "model": run.config.student.model_dump(mode="json", exclude={"weights"}),
            "data": shape, "class_names": data.class_names,
            "input": {"kind": data.kind, "mean": data.mean, "std": data.std,
                      "note": "inputs are normalised as in training: images (pixels scaled to [0, 1] - mean) / std "
                              "per channel, tables (x - mean) / std per feature"},
            "source_run": str(run.dir)}
    shutil.copyfile(run.dir / "config.yaml", out / "config.yaml")
    if format == "safetensors":
        meta["file"] = "model.safetensors"
        (out / "model_config.json").write_text(json.dumps(meta, indent=2))  # load_exported reads it
        model_file, loaded = _write_safetensors(model, out, bool(quantize))
        check_info = check(loaded, "the model rebuilt from the safetensors export")
    elif format == "onnx":
        example = M.take_rows(data.test, 2)  # batch 2: torch.export specialises sizes 0 and 1
        model_file, loaded, check_info = _write_onnx(model, out, example, bool(quantize), check)
        meta.update(file=model_file.name, onnx={"input_name": "input", "output_name": "logits", "dynamic_axes": {"input": [0]}})
    elif format == "torchscript":
        model_file, loaded = _write_torchscript(model, out, M.take_rows(data.test, 2), x_check)
        meta["file"] = model_file.name
        try:
            check_info = check(loaded, "the TorchScript module reloaded from disk")
        except ExportError:
            _reject(model_file)
            raise
    else:
        model_file, loaded = _write_hf(model, out, run, data)
        meta["file"] = model_file.name
        check_info = check(loaded, "the Hugging Face model reloaded with from_pretrained")
    (out / "model_config.json").write_text(json.dumps(meta, indent=2))

    # What the exported artifact does on the whole test split, and how fast, in its own runtime.
    labels = data.test.labels
    exported_logits = M.predict_logits(loaded, data.test, run.config.data.eval_batch_size)
    student_logits = M.predict_logits(student, data.test, run.config.data.eval_batch_size)
    info = {
        "format": format, "quantize": quantize, "run": str(run.dir), "dir": str(out), "model_file": model_file.name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "runtime": _runtime(format),
        "quantizer": None if not quantize else ("onnxruntime.quantization.quantize_dynamic (int8 MatMul/Gemm weights)"
                                                 if format == "onnx" else "torch.ao.quantization.quantize_dynamic (int8 nn.Linear)"),
        "check": check_info if not quantize or format != "onnx" else {**check_info, "checked_model": "float ONNX graph, before quantisation"},
        "test_accuracy": M.accuracy(exported_logits, labels),
        "pytorch_test_accuracy": M.accuracy(student_logits, labels),
        "agreement_with_pytorch": M.top1_agreement(exported_logits, student_logits),
        "size_bytes": model_file.stat().st_size,
        "pytorch_size_bytes": run.weights.stat().st_size,
        "latency": _latency(format, loaded, data, latency_repeats, threads) if measure_latency else None,
    }
    (out / "export.json").write_text(json.dumps(info, indent=2))
    return ExportResult(out, model_file, info)


def _latency(fmt: str, loaded: nn.Module, data: DataBundle, repeats: int, threads: int | None) -> dict:
    if fmt == "onnx":  # ONNX Runtime fixes its thread count when the session is made
        loaded = OnnxModel(loaded.path, threads=threads or torch.get_num_threads())
    return M.measure_latency(loaded, data.test, repeats=repeats, threads=threads)


def _runtime(fmt: str) -> str:
    if fmt == "onnx":
        return f"onnxruntime {_onnxruntime().__version__} (CPUExecutionProvider)"
    return f"torch {torch.__version__}" + (" (TorchScript)" if fmt == "torchscript" else "")
