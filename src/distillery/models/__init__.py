"""Models: build one from a :class:`~distillery.config.ModelSpec`, load its weights, call it.

``spec.arch`` is one of

* a zoo name (:func:`available_models`; see :mod:`distillery.models.zoo`),
* an import path ``pkg.module:factory``, or
* ``hf:<local dir or Hub id>`` (see :mod:`distillery.models.adapters`).

Weights are read from safetensors only, never from pickles (``torch.load`` can run arbitrary
code from the file).
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distillery.config import ModelSpec
from distillery.errors import ModelError
from distillery.models import adapters, moe, zoo  # noqa: F401  (moe registers vit_moe)
from distillery.models.zoo import available_models, register_model

__all__ = [
    "available_models",
    "build_model",
    "count_parameters",
    "forward_logits",
    "load_weights",
    "register_model",
]

_CONVERT_HINT = (
    "Only safetensors weights are accepted (pickled .pt/.pth/.bin files can run arbitrary code when loaded). "
    "Convert once, in a Python session you trust: "
    "`safetensors.torch.save_file(model.state_dict(), 'model.safetensors')`"
)


def build_model(
    spec: ModelSpec,
    *,
    in_channels: int | None,
    num_classes: int,
    input_size: tuple[int, ...] | None,
) -> nn.Module:
    """Build the model ``spec`` describes for data with this shape; load ``spec.weights`` if set.

    ``in_channels`` / ``num_classes`` / ``input_size`` come from the data; a key of the same name
    in ``spec.kwargs`` wins.
    """
    kwargs = dict(spec.kwargs)
    data_kwargs: dict[str, Any] = {
        "in_channels": in_channels,
        "num_classes": num_classes,
        "input_size": tuple(input_size) if input_size is not None else None,
    }
    effective_num_classes = kwargs.get("num_classes", num_classes)
    arch = spec.arch.strip()
    if arch.startswith("hf:"):
        data_kwargs.update({k: kwargs.pop(k) for k in adapters.DATA_KWARGS if k in kwargs})
        model = adapters.build_hf_model(
            arch[3:],
            kwargs,
            in_channels=data_kwargs["in_channels"],
            num_classes=data_kwargs["num_classes"],
            trust_remote_code=spec.trust_remote_code,
        )
    elif ":" in arch:
        model = adapters.build_from_import_path(arch, kwargs, data_kwargs)
    else:
        model = _build_zoo_model(arch, kwargs, data_kwargs)
    if spec.weights:
        load_weights(model, spec.weights, num_classes=effective_num_classes)
    return model


def _build_zoo_model(arch: str, kwargs: dict[str, Any], data_kwargs: dict[str, Any]) -> nn.Module:
    factory = zoo.get_factory(arch)
    allowed = adapters.accepted_names(factory)
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        own = [n for n in allowed if n not in adapters.DATA_KWARGS]
        raise ModelError(
            f"model '{arch}' has no parameter(s) {', '.join(unknown)}; "
            f"its kwargs are: {', '.join(own) if own else '(none)'} "
            f"(and {', '.join(adapters.DATA_KWARGS)}, which come from the data)"
        )
    if "input_size" in kwargs and kwargs["input_size"] is not None:
        kwargs = {**kwargs, "input_size": tuple(kwargs["input_size"])}
    return factory(**{**data_kwargs, **kwargs})


# ---------------------------------------------------------------------------------------------
# Weights


def _resolve_weights_path(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        candidate = p / "model.safetensors"
        if not candidate.is_file():
            found = sorted(x.name for x in p.glob("*.safetensors"))
            also = f"; safetensors files there: {', '.join(found)}" if found else ""
            raise ModelError(f"weights: directory {p} has no model.safetensors{also}. {_CONVERT_HINT}")
        return candidate
    if p.suffix != ".safetensors":
        raise ModelError(f"weights: {p} is not a .safetensors file. {_CONVERT_HINT}")
    if not p.is_file():
        raise ModelError(f"weights: file not found: {p}")
    return p


def _first(items: list[str], n: int = 5) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def load_weights(model: nn.Module, path: str | Path, *, num_classes: int | None = None) -> nn.Module:
    """Load a safetensors state dict (a file, or a directory holding ``model.safetensors``).

    Every key and shape must match; otherwise a :class:`ModelError` names the first few
    mismatches (and says so when the classifier's class count differs from ``num_classes``).
    """
    from safetensors.torch import load_file

    file = _resolve_weights_path(path)
    try:
        state = load_file(str(file), device="cpu")
    except Exception as err:
        raise ModelError(f"weights: {file} is not a readable safetensors file ({err}). {_CONVERT_HINT}") from None

    expected = model.state_dict()
    # A tensor tied to another one (shared storage) is stored once by safetensors' save_model.
    present_ptrs = {expected[k].data_ptr() for k in state if k in expected and expected[k].numel()}
    missing = [k for k in expected if k not in state and not (expected[k].numel() and expected[k].data_ptr() in present_ptrs)]
    unexpected = [k for k in state if k not in expected]
    mismatched = [k for k in state if k in expected and tuple(state[k].shape) != tuple(expected[k].shape)]

    if missing or unexpected or mismatched:
        problems = []
        if mismatched:
            shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}" for k in mismatched]
            problems.append(f"shape mismatch for {_first(shapes, 3)}")
            for k in mismatched:
                got, want = tuple(state[k].shape), tuple(expected[k].shape)
                if num_classes is not None and want[:1] == (num_classes,) and got[1:] == want[1:]:
                    problems.insert(0, f"the weights have {got[0]} classes but the data has {num_classes} ({k})")
                    break
        if missing:
            problems.append(f"missing from the file: {_first(missing)}")
        if unexpected:
            problems.append(f"in the file but not in the model: {_first(unexpected)}")
        raise ModelError(f"weights {file} do not fit the model: " + "; ".join(problems))

    model.load_state_dict(state, strict=False)
    return model


# ---------------------------------------------------------------------------------------------
# Calling a model, counting it


def forward_logits(model: nn.Module, inputs: Any) -> torch.Tensor:
    """Run ``model`` and return its logits, whatever the output convention.

    A dict of inputs is passed as keyword arguments (``model(**inputs)``, as for Hugging Face
    text models), anything else positionally.  The logits are ``output.logits`` when present,
    ``output[0]`` for tuples/lists, else the output itself.
    """
    out = model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
    logits = getattr(out, "logits", None)
    if logits is not None:
        return logits
    if isinstance(out, Mapping) and "logits" in out:
        return out["logits"]
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared ones counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
