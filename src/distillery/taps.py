"""Capture intermediate features with forward hooks, addressed by module path.

Any model works unmodified -- the zoo's, torchvision's, timm's, Hugging Face's or the
user's own: a tap names a submodule by its dotted path (``layer3``,
``encoder.layer.5.output``) and the hook records its output.  ``path:input`` records the
module's first positional input instead (``head:input`` is the penultimate feature of
every zoo model).  This module is the only place in Distillery that registers hooks.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from distillery.errors import ModelError


def _first_tensor(value):
    """Hugging Face blocks return tuples or ModelOutputs; the hidden state comes first."""
    if isinstance(value, torch.Tensor):
        return value
    if hasattr(value, "last_hidden_state"):
        return value.last_hidden_state
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    raise ModelError(f"tapped module returned {type(value).__name__}, not a tensor")


def resolve(model: nn.Module, tap: str) -> tuple[nn.Module, bool]:
    """Return (module, capture_input) for a tap name; a clear error lists nearby names."""
    path, _, kind = tap.partition(":")
    if kind not in ("", "input", "output"):
        raise ModelError(f"tap '{tap}': the suffix must be ':input' or ':output'")
    try:
        module = model.get_submodule(path) if path else model
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        hint = ", ".join(names[:25]) + (" ..." if len(names) > 25 else "")
        raise ModelError(
            f"no module '{path}' in {type(model).__name__}; tap one of: {hint} "
            "(`distillery inspect` or `model.named_modules()` lists all)"
        ) from None
    return module, kind == "input"


class Taps:
    """Context manager: ``with Taps(model, ["layer2", "head:input"]) as taps: model(x); taps["layer2"]``.

    The hooks stay registered until the context exits, so a training loop opens it once and
    calls :meth:`clear` per step.  Features keep their autograd graph (student side); the
    caller decides whether to detach.
    """

    def __init__(self, model: nn.Module, names: Iterable[str]):
        self.model = model
        self.names = list(dict.fromkeys(names))
        self.features: dict[str, torch.Tensor] = {}
        self._handles: list = []
        # While True, the forward pass is abandoned (``StopForward``) as soon as every tap has
        # fired: a teacher read only up to its tapped layer costs only that far (masked-input
        # feature distillation).  Layers after the last tap never run.
        self.stop_when_complete = False
        for name in self.names:  # resolve eagerly so a typo fails before training starts
            resolve(model, name)

    def __enter__(self) -> "Taps":
        for name in self.names:
            module, capture_input = resolve(self.model, name)
            if capture_input:
                def pre_hook(_m, args, _name=name):
                    self._record(_name, _first_tensor(args))
                self._handles.append(module.register_forward_pre_hook(pre_hook))
            else:
                def hook(_m, _args, out, _name=name):
                    self._record(_name, _first_tensor(out))
                self._handles.append(module.register_forward_hook(hook))
        return self

    def _record(self, name: str, value: torch.Tensor) -> None:
        self.features[name] = value
        if self.stop_when_complete and all(n in self.features for n in self.names):
            raise StopForward

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def clear(self) -> None:
        self.features = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.features[name]

    def collect(self) -> dict[str, torch.Tensor]:
        missing = [n for n in self.names if n not in self.features]
        if missing:
            raise ModelError(f"taps {missing} were not reached by the forward pass (is the module used in forward()?)")
        out, self.features = self.features, {}
        return out


class StopForward(Exception):
    """Raised by a :class:`Taps` hook with ``stop_when_complete`` once every tap has fired; the
    caller catches it and uses the features (there are no logits)."""


class Rewrite:
    """While open, ``fn(output)`` replaces the output of ``model.<path>`` (a method that perturbs
    an intermediate layer, e.g. KD^3's MixDistribution); the hook is removed on exit."""

    def __init__(self, model: nn.Module, path: str, fn):
        self.module, _ = resolve(model, path)
        self.fn = fn
        self._handle = None

    def __enter__(self) -> "Rewrite":
        self._handle = self.module.register_forward_hook(lambda _m, _a, out: self.fn(out))
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


class RewriteInput:
    """While open, ``fn(x)`` replaces the first positional input of ``model.<path>``: e.g. keep only
    the visible tokens before the first transformer block (masked-input distillation), so every
    later layer runs on fewer tokens.  The hook is removed on exit."""

    def __init__(self, model: nn.Module, path: str, fn):
        self.module, _ = resolve(model, path)
        self.fn = fn
        self._handle = None

    def __enter__(self) -> "RewriteInput":
        self._handle = self.module.register_forward_pre_hook(lambda _m, args: (self.fn(args[0]), *args[1:]))
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def keep_tokens(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of ``tokens`` (B, N, D) at ``index`` (B, K): the visible tokens of each sample."""
    if tokens.dim() != 3 or index.dim() != 2 or index.shape[0] != tokens.shape[0]:
        raise ModelError(f"keep_tokens needs tokens (B, N, D) and an index (B, K); got {tuple(tokens.shape)} and "
                         f"{tuple(index.shape)} -- tap a transformer block, whose input is a token sequence")
    return tokens.gather(1, index.to(tokens.device).unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def edits(model: nn.Module, keep: tuple[str, torch.Tensor] | None = None,
          replace: dict[str, object] | None = None) -> list:
    """Context managers for one forward pass: ``keep=(path, index)`` keeps only the tokens at
    ``index`` from ``path``'s input on; ``replace={path: tensor_or_fn}`` substitutes a module's
    output (a tensor, or a function of the original output).  Shared by the teacher and student
    forward passes a method may ask for (:meth:`distillery.methods.base.Method.teacher_forward`)."""
    out: list = []
    if keep is not None:
        path, index = keep
        out.append(RewriteInput(model, path, lambda x, _i=index: keep_tokens(x, _i)))
    for path, value in (replace or {}).items():
        fn = value if callable(value) else (lambda _out, _v=value: _v)
        out.append(Rewrite(model, path, fn))
    return out
