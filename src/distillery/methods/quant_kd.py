"""Quantised distillation and differentiable quantisation (Polino, Pascanu & Alistarh 2018).

Polino, Pascanu & Alistarh (2018), "Model compression via distillation and quantization", ICLR.
The quantiser and its gradients are in :mod:`distillery.losses.quant`; this module wires them
into a run:

* quantised distillation (Alg. 1): every ``nn.Linear`` / ``nn.Conv{1,2,3}d`` weight of the student
  is fake-quantised to ``bits`` bits (uniform levels, min-max scaling per bucket of
  ``bucket_size`` consecutive values); the forward pass uses the quantised weights, the gradient
  goes to the full-precision shadow weights (straight-through), and the loss is Hinton KD from
  the teacher plus label CE (``alpha`` weighs them, as method ``kd``);
* differentiable quantisation (Sec. 2.2, Alg. 2; ``learn_points: true``): the ``2^b`` quantisation
  points of each layer are parameters, moved by the gradient of the same distillation loss.
  ``points_only: true`` is Alg. 2 as written -- only the points learn, the student's weights stay
  as loaded (start from a trained student with ``student.weights``); with ``points_only: false``
  points and shadow weights learn together.

How the quantiser is attached, without touching the user's model class:
``torch.nn.utils.parametrize.register_parametrization`` on each weight.  During training the
checkpoint therefore holds ``<layer>.parametrizations.weight.original`` (the shadow weights) and
``...weight.0.points`` -- resumable, since the method re-registers the same parametrizations
before the checkpoint is loaded.  At the end (``on_train_end``, which the engine calls before
its test evaluation and before it saves ``model.safetensors``) the method

1. writes ``student-quantized.safetensors`` -- per quantised weight its codes packed ``b`` bits
   each, the per-bucket ``alpha`` / ``beta`` and the layer's points; every other tensor (biases,
   norm layers) in float32 -- and ``student-quantized.json`` with its size against float32;
2. removes the parametrizations, leaving each weight *at its quantised value*.

So the engine's ``test_accuracy`` is the quantised model's, and ``model.safetensors`` loads into
the plain architecture (ordinary state-dict keys) and computes exactly what the quantised model
computes.  :func:`load_quantized` rebuilds the float model from the compact file.

Differences from the paper: deterministic rounding only; biases and normalisation parameters stay
in float32 (the paper quantises weights); one set of points per layer, shared by its buckets.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import Field, model_validator
from torch import nn
from torch.nn.utils import parametrize

from distillery.losses import logits as L
from distillery.losses import quant as Q
from distillery.methods import register
from distillery.methods.base import Method, Params

QUANTIZED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
FORMAT = "distillery-polino-quantized-v1"


class QuantKDParams(Params):
    bits: int = Field(4, ge=2, le=8, description="Bits per weight: 2^bits quantisation levels per bucket.")
    bucket_size: int = Field(256, ge=1, description="Consecutive weights sharing one scaling (alpha, beta).")
    learn_points: bool = Field(False, description="Differentiable quantisation: learn each layer's quantisation points.")
    points_only: bool = Field(False, description="With learn_points: train only the points (the paper's Alg. 2); "
                                                 "start from a trained student (student.weights).")
    temperature: float = Field(4.0, gt=0, description="KD temperature T (the KD term is scaled by T^2).")
    alpha: float = Field(0.9, ge=0, le=1, description="Weight of the KD term; label CE gets 1 - alpha.")

    @model_validator(mode="after")
    def _points_only_needs_points(self):
        if self.points_only and not self.learn_points:
            raise ValueError("points_only: true trains only the quantisation points; set learn_points: true as well")
        return self


class FakeQuantize(nn.Module):
    """The parametrization: weight -> its ``bits``-bit quantised value (STE backward)."""

    def __init__(self, bits: int, bucket_size: int, learn_points: bool):
        super().__init__()
        self.bits, self.bucket_size = bits, bucket_size
        points = Q.uniform_points(bits)
        if learn_points:
            self.points = nn.Parameter(points)
        else:
            self.register_buffer("points", points)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return Q.fake_quantize(weight, self.points.to(weight.dtype), self.bucket_size)


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules()
            if isinstance(m, QUANTIZED_LAYERS) and isinstance(getattr(m, "weight", None), torch.Tensor)}


@register("quant_kd", params=QuantKDParams,
          paper="Polino, Pascanu & Alistarh 2018, Model compression via distillation and quantization (ICLR)")
class QuantKD(Method):
    """Quantised distillation: KD into a student whose weights are fake-quantised (optionally learned points)."""

    def __init__(self, params: QuantKDParams, *, student, teacher_layers, num_classes):
        super().__init__(params, student=student, teacher_layers=teacher_layers, num_classes=num_classes)
        layers = quantized_layers(student)
        if not layers:
            raise ValueError("quant_kd quantises nn.Linear / nn.Conv weights and the student has none; "
                             "use a student built from these layers")
        if params.points_only:
            student.requires_grad_(False)  # Alg. 2: the weights stay; only the points below learn
        for module in layers.values():
            if not parametrize.is_parametrized(module, "weight"):
                parametrize.register_parametrization(
                    module, "weight", FakeQuantize(params.bits, params.bucket_size, params.learn_points))

    def forward(self, student_out, teacher_out, targets, progress):
        a = self.params.alpha
        terms = {"kd": a * L.kd(student_out.logits, teacher_out.logits, temperature=self.params.temperature)}
        if a < 1:
            terms["ce"] = (1 - a) * L.cross_entropy(student_out.logits, None, targets)
        return terms

    def on_train_end(self, run_dir) -> None:
        info = export_quantized(self._student, Path(run_dir) / "student-quantized.safetensors")
        (Path(run_dir) / "student-quantized.json").write_text(json.dumps(info, indent=2))
        for module in quantized_layers(self._student).values():
            if parametrize.is_parametrized(module, "weight"):
                # The weight becomes a plain parameter holding its quantised value.
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)


# ------------------------------------------------------------------------------- export / load


def export_quantized(model: nn.Module, path: Path) -> dict:
    """Write the quantised form of a fake-quantised ``model`` (see the module docstring) and return
    its size report: bytes of the stored tensors against the same model in float32."""
    from safetensors.torch import save_file

    tensors, layers = {}, {}
    quantized = {f"{name}.weight": m for name, m in quantized_layers(model).items() if parametrize.is_parametrized(m, "weight")}
    if not quantized:
        raise ValueError("the model has no fake-quantised weights to export; was quant_kd attached to it?")
    for key, m in quantized.items():
        fq = m.parametrizations.weight[0]
        shadow = m.parametrizations.weight.original.detach().float().cpu()
        points = fq.points.detach().float().cpu()
        codes, alpha, beta = Q.quantize(shadow, points, fq.bucket_size)
        # The padding of the last bucket is not stored: the loader re-pads.
        tensors.update({f"{key}.codes": Q.pack_codes(codes.reshape(-1)[: shadow.numel()], fq.bits), f"{key}.alpha": alpha.reshape(-1).contiguous(),
                        f"{key}.beta": beta.reshape(-1).contiguous(), f"{key}.points": points.contiguous()})
        layers[key] = {"shape": list(shadow.shape), "bits": fq.bits, "bucket_size": fq.bucket_size}
    float_bytes = sum(_numel(v["shape"]) * 4 for v in layers.values())
    for key, value in model.state_dict().items():
        if ".parametrizations." in key:
            continue
        float_bytes += value.numel() * 4 if value.dtype.is_floating_point else value.numel() * value.element_size()
        tensors[key] = (value.float() if value.dtype.is_floating_point else value).detach().cpu().contiguous()
    save_file(tensors, str(path), metadata={"format": FORMAT, "layers": json.dumps(layers)})
    stored = sum(t.numel() * t.element_size() for t in tensors.values())
    return {"format": FORMAT, "file": path.name, "stored_bytes": stored, "float32_bytes": float_bytes,
            "compression": float_bytes / max(1, stored), "file_bytes": path.stat().st_size,
            "quantized_weights": sum(_numel(v["shape"]) for v in layers.values()),
            "bits": sorted({v["bits"] for v in layers.values()}), "bucket_size": sorted({v["bucket_size"] for v in layers.values()})}


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def load_quantized(path, model: nn.Module) -> nn.Module:
    """Fill ``model`` (the plain architecture, e.g. from ``build_model``) with the float weights the
    quantised file encodes; returns it.  Its logits equal the fake-quantised student's."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a quant_kd export (format {meta.get('format')!r}, expected {FORMAT!r})")
        raw = {k: f.get_tensor(k) for k in f.keys()}
    state = {}
    for key, info in json.loads(meta["layers"]).items():
        shape = info["shape"]
        codes = Q.unpack_codes(raw.pop(f"{key}.codes"), info["bits"], _numel(shape))
        codes = Q.buckets(codes, info["bucket_size"])
        alpha, beta = raw.pop(f"{key}.alpha")[:, None], raw.pop(f"{key}.beta")[:, None]
        state[key] = Q.dequantize(codes, alpha, beta, raw.pop(f"{key}.points"), shape)
    state.update(raw)
    model.load_state_dict(state, strict=True)
    return model
