"""Models from outside the zoo: ``pkg.module:factory`` import paths and ``hf:`` models.

* ``arch: mypkg.nets:build_net`` imports ``mypkg.nets`` and calls ``build_net(**kwargs)``.
  The data-derived ``in_channels`` / ``num_classes`` / ``input_size`` are added only when the
  factory's signature names them (a factory taking only ``**kwargs`` gets just the kwargs).
* ``arch: hf:<local dir or Hub id>`` loads ``AutoModelForImageClassification`` (configs with
  ``image_size`` / ``num_channels``) or ``AutoModelForSequenceClassification`` (everything
  else) with a fresh head of ``num_classes`` outputs.  ``transformers`` is imported lazily:
  it is an optional dependency (``pip install 'distillery[hf]'``).
"""
from __future__ import annotations

import importlib
import inspect
import os
import sys
from typing import Any

from torch import nn

from distillery.errors import ModelError

DATA_KWARGS = ("in_channels", "num_classes", "input_size")


# ---------------------------------------------------------------------------------------------
# pkg.module:factory


def _import_module(module_name: str, arch: str):
    def attempt():
        return importlib.import_module(module_name)

    try:
        return attempt()
    except ModuleNotFoundError as err:
        missing_is_target = err.name is not None and (module_name == err.name or module_name.startswith(err.name + "."))
        cwd = os.getcwd()
        if missing_is_target and cwd not in sys.path and "" not in sys.path:
            # Console scripts do not put the working directory on sys.path; a user's own
            # module next to their config is the common case, so look there too.
            sys.path.append(cwd)
            try:
                return attempt()
            except ModuleNotFoundError:
                pass
        if missing_is_target:
            raise ModelError(
                f"model '{arch}': cannot import module '{module_name}' ({err}). "
                "Is the package installed, or is its directory the working directory or on PYTHONPATH?"
            ) from None
        raise ModelError(f"model '{arch}': importing '{module_name}' failed: {err} (a dependency of that module is missing)") from err
    except Exception as err:  # a broken user module: SyntaxError, an exception at import time, ...
        raise ModelError(f"model '{arch}': importing '{module_name}' raised {type(err).__name__}: {err}") from err


def accepted_names(factory: Any) -> list[str]:
    """Parameter names ``factory`` accepts by keyword, in order (empty when it cannot be inspected)."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def build_from_import_path(arch: str, kwargs: dict[str, Any], data_kwargs: dict[str, Any]) -> nn.Module:
    """Build ``pkg.module:factory`` (``factory`` may be dotted, e.g. ``Net.small``)."""
    module_name, _, attr = arch.partition(":")
    module_name, attr = module_name.strip(), attr.strip()
    if not module_name or not attr:
        raise ModelError(f"model '{arch}': an import path looks like 'pkg.module:factory'")
    obj: Any = _import_module(module_name, arch)
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n in dir(obj) if not n.startswith("_") and callable(getattr(obj, n, None)))
            raise ModelError(
                f"model '{arch}': '{getattr(obj, '__name__', module_name)}' has no attribute '{part}'"
                + (f"; callables there: {', '.join(public[:20])}" if public else "")
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelError(f"model '{arch}': '{attr}' is a {type(obj).__name__}, not a callable that builds a model")

    accepted = accepted_names(obj)
    call_kwargs = {k: v for k, v in data_kwargs.items() if k in accepted and k not in kwargs}
    call_kwargs.update(kwargs)
    try:
        model = obj(**call_kwargs)
    except TypeError as err:
        raise ModelError(f"model '{arch}': calling {attr}(**{call_kwargs!r}) failed: {err}") from err
    if not isinstance(model, nn.Module):
        raise ModelError(f"model '{arch}': {attr}(...) returned a {type(model).__name__}, expected a torch.nn.Module")
    return model


# ---------------------------------------------------------------------------------------------
# hf:<dir or hub id>


def _transformers():
    try:
        import transformers
    except ImportError as err:
        raise ModelError(
            f"'hf:' models need the Hugging Face transformers library ({err}); install it with: pip install 'distillery[hf]'"
        ) from None
    return transformers


def _is_image_config(config: Any) -> bool:
    return hasattr(config, "image_size") or hasattr(config, "num_channels")


def build_hf_model(
    source: str,
    kwargs: dict[str, Any],
    *,
    in_channels: int | None,
    num_classes: int,
    trust_remote_code: bool = False,
) -> nn.Module:
    """Load a Hugging Face classifier from a local directory or the Hub with ``num_classes`` labels.

    ``kwargs`` go to ``from_pretrained`` (e.g. ``revision``).  A head whose size differs is
    re-initialised (``ignore_mismatched_sizes=True``).
    """
    source = source.strip()
    if not source:
        raise ModelError("model 'hf:': give a local directory or a Hub id after 'hf:', e.g. hf:google/vit-base-patch16-224")
    transformers = _transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as err:
        raise ModelError(
            f"model 'hf:{source}': cannot read its config ({type(err).__name__}: {err}). Give a directory written by "
            "save_pretrained (with config.json) or a Hub id (needs network access or a cached copy); "
            "models with custom code also need trust_remote_code: true"
        ) from None

    if _is_image_config(config):
        auto_cls = transformers.AutoModelForImageClassification
        expected = getattr(config, "num_channels", None)
        if in_channels is not None and expected is not None and int(expected) != int(in_channels):
            raise ModelError(
                f"model 'hf:{source}' expects {expected}-channel images but the data has {in_channels} channel(s); "
                "convert the images (e.g. grayscale -> RGB) or pick a model with matching num_channels"
            )
    else:
        auto_cls = transformers.AutoModelForSequenceClassification

    try:
        model = auto_cls.from_pretrained(
            source,
            num_labels=num_classes,
            ignore_mismatched_sizes=True,
            trust_remote_code=trust_remote_code,
            **kwargs,
        )
    except Exception as err:
        raise ModelError(
            f"model 'hf:{source}': loading it as {auto_cls.__name__} failed ({type(err).__name__}: {err})"
        ) from err
    return model
