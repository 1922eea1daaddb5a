"""Distillery: knowledge distillation from a large teacher into a small, fast student."""

__version__ = "0.1.0"


def __getattr__(name):  # keep `import distillery` light: torch/accelerate load on first use
    if name in ("distill", "train"):
        from distillery import api

        return getattr(api, name)
    raise AttributeError(name)


__all__ = ["distill", "train", "__version__"]
