"""Automatic projectors: make a student feature comparable with a teacher feature.

Built from the shapes seen on a probe batch, so teacher and student may be of different
families and widths (CNN -> MLP, CNN -> ViT, ...).  The rules, in order:

* same shape: identity;
* both maps (N, C, H, W): the student map is average-pooled (or upsampled) to the teacher's
  H x W, then a 1x1 conv + BN maps its channels -- the FitNets regressor (Romero et al. 2015);
* otherwise both are reduced to vectors (global average over space or tokens), and a linear
  layer maps the student's width to the teacher's.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def _to_vector(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 4:  # (N, C, H, W)
        return x.mean(dim=(2, 3))
    if x.dim() == 3:  # (N, L, D) tokens
        return x.mean(dim=1)
    return x.flatten(1)


class Align(nn.Module):
    """``align(student_feat, teacher_feat) -> (projected_student, teacher_target)``."""

    def __init__(self, student_shape: torch.Size, teacher_shape: torch.Size, *, learnable: bool = True):
        super().__init__()
        s, t = tuple(student_shape[1:]), tuple(teacher_shape[1:])
        self.mode = "identity"
        self.proj: nn.Module = nn.Identity()
        if s == t:
            return
        if len(s) == 3 and len(t) == 3:
            self.mode = "map"
            self.size = t[1:]
            if s[0] != t[0] and learnable:
                self.proj = nn.Sequential(nn.Conv2d(s[0], t[0], 1, bias=False), nn.BatchNorm2d(t[0]))
            elif s[0] != t[0]:
                raise ValueError(f"feature channels differ ({s[0]} vs {t[0]}) and no projector is allowed")
        else:
            self.mode = "vector"
            ds, dt = _to_vector(torch.zeros(1, *s)).shape[1], _to_vector(torch.zeros(1, *t)).shape[1]
            if ds != dt:
                if not learnable:
                    raise ValueError(f"feature widths differ ({ds} vs {dt}) and no projector is allowed")
                self.proj = nn.Linear(ds, dt)

    def forward(self, s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mode == "map":
            if s.shape[-2:] != t.shape[-2:]:
                s = F.adaptive_avg_pool2d(s, self.size) if s.shape[-1] >= t.shape[-1] else F.interpolate(
                    s, size=self.size, mode="bilinear", align_corners=False)
            return self.proj(s), t
        if self.mode == "vector":
            return self.proj(_to_vector(s)), _to_vector(t)
        return s, t


def default_pairs(student: nn.Module, teacher_layers: list[str] | None, n: int = 1) -> list[tuple[str, str]]:
    """Pair the deepest ``n`` stages of the student with those of the teacher.

    Zoo models list their stages in ``default_feature_layers``; other models need explicit
    ``pairs`` in the method parameters.
    """
    s_layers = list(getattr(student, "default_feature_layers", []) or [])
    t_layers = list(teacher_layers or [])
    if not s_layers or not t_layers:
        raise ValueError(
            "cannot choose feature layers automatically for a model without `default_feature_layers`; "
            "give method.params.pairs, e.g. [{student: layer3, teacher: layer3}] (module paths)"
        )
    n = min(n, len(s_layers), len(t_layers))
    return list(zip(s_layers[-n:], t_layers[-n:]))


AUTO_CKA = "auto-cka"
CKA_PREFIX = "cka:"
PAIRS_HELP = ("Layer pairs: a list, 'auto-cka' (from a CKA map made at the start), 'cka:PATH' (a `distillery inspect` "
              "cka.csv); default: the deepest stage(s) of zoo models.")


def check_pairs_text(value):
    """Validator of a ``pairs`` field given as text: ``auto-cka`` or ``cka:<path to cka.csv>``."""
    if isinstance(value, str) and value != AUTO_CKA and not value.startswith(CKA_PREFIX):
        raise ValueError(f"pairs as text must be '{AUTO_CKA}' (choose from a CKA map computed at the start of the run) "
                         f"or '{CKA_PREFIX}PATH' (the cka.csv written by `distillery inspect`), got {value!r}")
    return value


def pairs_from_cka(path: str | Path, student: nn.Module, n: int) -> list[tuple[str, str]]:
    """Layer pairs read off a CKA map written by ``distillery inspect`` (``cka.csv``: rows = student
    layers, columns = teacher layers): each student layer is paired with the teacher layer it
    resembles most, and the ``n`` pairs of highest CKA are kept, in the student's layer order.
    This is the diagnostic OFA-KD (Hao et al. 2023, Fig. 1) builds on: pair what is alike."""
    import csv
    import math

    from distillery.taps import resolve

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"pairs: no CKA map at {path}; write one with `distillery inspect CONFIG` (it saves cka.csv) "
                         f"or use pairs: {AUTO_CKA}")
    try:
        with path.open(newline="") as f:
            rows = list(csv.reader(f))
        header, body = rows[0], rows[1:]
        if header[0] != "student_layer" or len(header) < 2 or not body:
            raise ValueError("not a cka.csv")
        teacher_layers = header[1:]
        table = {r[0]: [float(v) for v in r[1:]] for r in body}
        if any(len(v) != len(teacher_layers) for v in table.values()):
            raise ValueError("ragged rows")
    except (ValueError, IndexError, OSError) as err:
        raise ValueError(f"pairs: {path} is not a CKA map written by `distillery inspect` ({err}); "
                         "re-run `distillery inspect CONFIG`") from None
    for s_layer in table:
        try:
            resolve(student, s_layer)
        except Exception:
            raise ValueError(f"pairs: the CKA map {path} names student layer '{s_layer}', which this student does "
                             "not have -- the map was made for another student; re-run `distillery inspect`") from None
    best = []
    for order, (s_layer, values) in enumerate(table.items()):
        scored = [(v, t) for v, t in zip(values, teacher_layers) if not math.isnan(v)]
        if scored:
            value, t_layer = max(scored)
            best.append((value, order, s_layer, t_layer))
    if not best:
        raise ValueError(f"pairs: every CKA value in {path} is NaN (constant features); tap other layers")
    kept = sorted(sorted(best, reverse=True)[:n], key=lambda b: b[1])
    return [(s_layer, t_layer) for _, _, s_layer, t_layer in kept]


def resolve_pairs(params, student, teacher_layers) -> list[tuple[str, str]]:
    """(student, teacher) layer pairs of a feature/relation method: ``params.pairs`` when given
    (a list, or ``cka:PATH`` read off an inspect map), else the ``params.n_pairs`` deepest stages
    paired automatically (:func:`default_pairs`)."""
    if isinstance(params.pairs, str):
        if params.pairs == AUTO_CKA:
            raise ValueError(f"pairs: {AUTO_CKA} is resolved before training by `distillery distill` (or "
                             "distillery.inspect.resolve_auto_pairs(cfg) in Python); with engine.fit directly, run "
                             f"`distillery inspect` first and give pairs: {CKA_PREFIX}<its cka.csv>")
        return pairs_from_cka(params.pairs[len(CKA_PREFIX):], student, params.n_pairs)
    if params.pairs:
        return [(p.student, p.teacher) for p in params.pairs]
    return default_pairs(student, teacher_layers, params.n_pairs)
