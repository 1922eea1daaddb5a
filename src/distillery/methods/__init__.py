"""Registry of distillation methods: ``method: {name: kd, params: {...}}`` in a config.

A method is a small module (see :mod:`distillery.methods.base`) registered by name with its
parameter model.  ``available()`` feeds ``distillery methods`` and the README's list.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from pydantic import ValidationError

from distillery.methods.base import Method, ModelOutput, Params, Progress


@dataclass(frozen=True)
class MethodSpec:
    name: str
    cls: type[Method]
    params: type[Params]
    needs_teacher: bool
    description: str
    paper: str
    teacher_same_classes: bool = True
    multilabel: bool = False
    live_teacher: bool = False
    teacher_on_batch: bool = True
    regression: bool = False
    classification: bool = True
    num_teachers: int | None = None

    def validate_params(self, raw: dict[str, Any] | Params) -> Params:
        if isinstance(raw, Params):
            return raw
        try:
            return self.params.model_validate(raw or {})
        except ValidationError as err:
            allowed = ", ".join(
                f"{k} (default {f.default!r})" for k, f in self.params.model_fields.items()
            ) or "none"
            problems = "; ".join(
                f"method.params.{'.'.join(map(str, e['loc']))}: "
                + ("unknown parameter" if e["type"] == "extra_forbidden" else e["msg"])
                for e in err.errors()
            )
            raise ValueError(f"{problems}. Parameters of '{self.name}': {allowed}") from None


_REGISTRY: dict[str, MethodSpec] = {}


def register(name: str, *, params: type[Params], needs_teacher: bool = True, paper: str = "",
             teacher_same_classes: bool = True, multilabel: bool = False, live_teacher: bool = False,
             teacher_on_batch: bool = True, regression: bool = False, classification: bool = True,
             num_teachers: int | None = None) -> Callable:
    """``teacher_same_classes=False`` lets the teacher predict a different label set than the
    student (cross-task and novel-class methods); the engine then skips that check.
    ``multilabel=True``: the method also handles multi-label data (float multi-hot targets).
    ``live_teacher=True``: the method calls ``Method.teacher_forward`` on inputs it makes (mixup,
    learned augmentation, masking), so a teacher cache is refused for it.
    ``teacher_on_batch=False`` (with ``live_teacher``): the engine does not run the teacher on the
    training batch (``teacher_out`` is None); the method pays only for the teacher passes it asks
    for -- e.g. masked inputs run up to the tapped layer.
    ``regression=True``: the method also handles regression data (standardised float targets
    ``(N, K)``, outputs compared in that space); ``classification=False``: it handles nothing else.
    ``num_teachers=n``: the method distils from exactly ``n`` teachers (``teacher: [...]``, an
    ensemble whose members it taps one by one); the config is refused otherwise."""
    if not teacher_on_batch and not live_teacher:
        raise RuntimeError(f"method '{name}': teacher_on_batch=False needs live_teacher=True")

    def deco(cls: type[Method]) -> type[Method]:
        if name in _REGISTRY:
            raise RuntimeError(f"method '{name}' registered twice")
        doc = (cls.__doc__ or "").strip().splitlines()
        _REGISTRY[name] = MethodSpec(name, cls, params, needs_teacher, doc[0] if doc else "", paper,
                                     teacher_same_classes, multilabel, live_teacher, teacher_on_batch,
                                     regression=regression, classification=classification,
                                     num_teachers=num_teachers)
        return cls

    return deco


_HELPERS = {"base", "align"}  # modules of this package that register nothing


def _load_builtin() -> None:
    # Importing every module of this package runs its @register decorators: a new method is a
    # new file here, with no list to keep in sync.
    import importlib
    import pkgutil

    import distillery.methods as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name not in _HELPERS and not info.name.startswith("_"):
            importlib.import_module(f"distillery.methods.{info.name}")


def available() -> dict[str, MethodSpec]:
    _load_builtin()
    return dict(sorted(_REGISTRY.items()))


def get_spec(name: str) -> MethodSpec:
    _load_builtin()
    if name not in _REGISTRY:
        raise ValueError(f"unknown method '{name}'; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


__all__ = ["Method", "MethodSpec", "ModelOutput", "Params", "Progress", "available", "get_spec", "register"]
