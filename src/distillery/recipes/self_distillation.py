"""Rounds of self-distillation with ground-truth weighting (Borup & Andersen, NeurIPS 2021).

    from distillery.config import load_config
    from distillery.recipes.self_distillation import run_rounds
    result = run_rounds(load_config("configs/selfdistill.yaml"), rounds=3)   # alpha="optimal"

Round 0 trains the config's student on the labels (method ``ce``).  Round ``t >= 1`` trains the
same architecture, from the same seed, with method ``selfdistill``: its teacher is round
``t - 1`` and its target ``alpha_t * onehot(y) + (1 - alpha_t) * softmax(round t-1)``.

Choosing ``alpha_t`` ("optimal").  In the paper's kernel-regression setting a step's fit is a
linear map of its target, so the fit with weight ``alpha`` is ``alpha * f_1 + (1 - alpha) * f_0``
(``f_1``: fit to the labels alone, ``f_0``: fit to the previous step alone) and the best
``alpha`` has a closed form (:func:`distillery.losses.self_distillation.optimal_alpha`); for
deep networks the paper estimates it from the two extreme fits instead of a grid search.  We
apply that to the network, treating it as linearised (a kernel machine in the NTK regime):

* ``f_1`` is the network trained on the labels alone.  That target does not depend on the
  teacher, and every round uses the same seed, data and schedule, so ``f_1`` *is* round 0 --
  no extra training.
* ``f_0`` is a probe run ``round-t-alpha0``: round ``t`` with ``alpha = 0``.
* Fits are compared as softmax probabilities (the space the targets live in) on the
  validation split, with one-hot validation labels as the reference: the unknown noise-free
  function is replaced by held-out labels, whose noise is independent of both fits, so the
  inner products stay unbiased.  (Training labels would not do: the fits are correlated with
  their noise and the estimate would always exceed 1.)
* ``alpha_t`` is clipped to ``[0, 1]`` and rounded to 4 decimals (so a rerun reproduces it).

Each round costs two trainings (probe + round) instead of one per grid point.  Run directories
are ``OUTPUT_DIR/NAME/round-t`` (and ``round-t-alpha0``); ``rounds.md`` / ``rounds.json`` there
hold the table (round, alpha, val/test accuracy).  A run with ``summary.json`` is reused, an
unfinished one resumed from its last checkpoint, so an interrupted series continues where it
stopped; a run whose stored config differs from the one this call would train is an error.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from distillery.config import RunConfig, config_from_dict, load_config
from distillery.data import DataBundle, Split, load_data
from distillery.engine import fit
from distillery.engine.checkpoint import atomic_write_text
from distillery.errors import ConfigError, DistilleryError
from distillery.losses.self_distillation import optimal_alpha
from distillery.models import build_model, forward_logits

__all__ = ["RoundsResult", "estimate_alpha", "parse_alpha", "run_rounds"]

PAPER = ("Borup & Andersen 2021, Even your Teacher Needs Guidance: Ground-Truth Targets Dampen "
         "Regularization Imposed by Self-Distillation")

# Config fields that change how a run is shown or logged, not what it learns: a rerun may differ in them.
_COSMETIC = {"train": ("progress", "report", "track", "checkpoint_every", "eval_every"), "data": ("eval_batch_size",)}


@dataclass
class RoundsResult:
    dir: Path
    rows: list[dict]
    markdown: Path
    json: Path


def parse_alpha(text: str | float) -> str | float:
    """``"optimal"`` or a fixed weight in ``[0, 1]`` (a number or its text)."""
    if isinstance(text, str) and text.strip().lower() == "optimal":
        return "optimal"
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ConfigError(f"alpha must be 'optimal' or a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"alpha must be in [0, 1] (the weight of the labels in the target), got {value}")
    return value


def _derive(cfg: RunConfig, series: Path, name: str, method: dict, teacher_run: Path | None) -> RunConfig:
    raw = cfg.model_dump(mode="json")
    raw.update(name=name, output_dir=str(series), method=method,
               teacher=None if teacher_run is None else {"run": str(teacher_run)})
    return config_from_dict(raw, source=f"(self-distillation {name})")


def _learning_fields(cfg: RunConfig) -> dict:
    d = cfg.model_dump(mode="json")
    for section, keys in _COSMETIC.items():
        for k in keys:
            d[section].pop(k, None)
    return d


def _fit_or_reuse(cfg: RunConfig, data: DataBundle) -> dict:
    """Train ``cfg``; reuse it if finished, resume it if started."""
    run_dir = cfg.run_dir
    stored = run_dir / "config.yaml"
    if stored.is_file() and _learning_fields(load_config(stored)) != _learning_fields(cfg):
        raise DistilleryError(
            f"{run_dir} holds a run with another config than this self-distillation series would train "
            f"(different settings or alpha); choose another name with --set name=NEW or remove {run_dir}")
    if (run_dir / "summary.json").is_file():
        return json.loads((run_dir / "summary.json").read_text())
    started = run_dir.is_dir() and any(run_dir.iterdir())
    return fit(cfg, resume=started, data=data).summary


@torch.inference_mode()
def _probabilities(run_dir: Path, split: Split, data: DataBundle, device, batch_size: int) -> torch.Tensor:
    spec = load_config(run_dir / "config.yaml").student.model_copy(update={"weights": str(run_dir / "model.safetensors")})
    model = build_model(spec, in_channels=data.in_channels, num_classes=data.num_classes, input_size=data.input_size)
    model.to(device).eval()
    probs = []
    for start in range(0, len(split), batch_size):
        part = split.take(torch.arange(start, min(start + batch_size, len(split))))
        x = {k: v.to(device) for k, v in part.inputs.items()} if isinstance(part.inputs, dict) else part.inputs.to(device)
        probs.append(torch.softmax(forward_logits(model, x).double(), dim=-1).cpu())
    return torch.cat(probs)


def estimate_alpha(label_run: Path, distill_run: Path, split: Split, data: DataBundle, *,
                   device="cpu", batch_size: int = 512) -> float:
    """The paper's optimal weight from the label-only fit and the ``alpha = 0`` fit, on ``split``."""
    f1 = _probabilities(label_run, split, data, device, batch_size)
    f0 = _probabilities(distill_run, split, data, device, batch_size)
    return round(float(optimal_alpha(f1, f0, split.labels)), 4)


def _stored_alpha(run_dir: Path, estimate: float) -> float:
    """The alpha a started round was trained with, if it matches the estimate up to float noise
    (an estimate on another device may differ in the last digit): resuming must not fail on that."""
    stored = run_dir / "config.yaml"
    if stored.is_file():
        previous = load_config(stored).method.params.get("alpha")
        if isinstance(previous, (int, float)) and abs(previous - estimate) <= 1e-3:
            return float(previous)
    return estimate


def _row(t: int, alpha: float, summary: dict, run: str, probe: str | None) -> dict:
    return {"round": t, "alpha": alpha, "val_accuracy": summary.get("val_accuracy"),
            "test_accuracy": summary.get("test_accuracy"), "run": run, "alpha_probe": probe}


def _pct(v) -> str:
    return "" if v is None or v != v else f"{100 * v:.2f}%"


def _write_table(series: Path, cfg: RunConfig, alpha, rows: list[dict]) -> tuple[Path, Path]:
    how = ("estimated per round by the paper's optimal-weight rule (probe runs round-t-alpha0)"
           if alpha == "optimal" else f"fixed at {alpha}")
    lines = [f"# Self-distillation rounds: {cfg.name}", "",
             f"{PAPER}.", "",
             f"alpha = weight of the ground-truth labels in a round's target (1 - alpha: the previous round's "
             f"softmax); round 0 trains on the labels alone. Student {cfg.student.arch}, data {cfg.data.name}, "
             f"{cfg.train.epochs} epochs per round, seed {cfg.train.seed}; alpha {how}.", "",
             "| round | alpha | val accuracy | test accuracy | run |", "|---:|---:|---:|---:|:---|"]
    lines += [f"| {r['round']} | {r['alpha']:.4f} | {_pct(r['val_accuracy'])} | {_pct(r['test_accuracy'])} | {r['run']} |"
              for r in rows]
    md, js = series / "rounds.md", series / "rounds.json"
    atomic_write_text(md, "\n".join(lines) + "\n")
    atomic_write_text(js, json.dumps({"name": cfg.name, "paper": PAPER, "alpha": alpha, "rounds": rows}, indent=2))
    return md, js


def run_rounds(cfg: RunConfig, rounds: int, alpha: str | float = "optimal", *, data: DataBundle | None = None) -> RoundsResult:
    """Round 0 on labels, then ``rounds`` self-distillation rounds, each from the previous one.

    ``cfg`` is a config whose method is ``selfdistill`` (its other params are kept; ``alpha`` is
    set per round and its ``teacher`` replaced by the previous round) or ``ce``.  ``alpha`` is
    ``"optimal"`` (estimated per round, see the module docstring) or a fixed weight in ``[0, 1]``.
    """
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ConfigError(f"rounds must be an integer >= 1 (self-distillation rounds after round 0), got {rounds!r}")
    alpha = parse_alpha(alpha)
    if cfg.method.name == "selfdistill":
        params = {k: v for k, v in cfg.method.params.items() if k != "alpha"}
        round0_method = {"name": "ce", "params": {}}
    elif cfg.method.name == "ce":
        params, round0_method = {}, cfg.method.model_dump(mode="json")
    else:
        raise ConfigError(f"self-distillation rounds use method selfdistill (or ce); the config has '{cfg.method.name}'")

    data = data or load_data(cfg.data)
    if alpha == "optimal" and len(data.val) == 0:
        raise ConfigError("alpha='optimal' is estimated on the validation split, which is empty; "
                          "set data.val_fraction > 0 or give a fixed alpha")
    device = "cuda" if torch.cuda.is_available() and not cfg.train.cpu else "cpu"
    series = Path(cfg.output_dir) / cfg.name
    series.mkdir(parents=True, exist_ok=True)

    round0 = _derive(cfg, series, "round-0", round0_method, None)
    rows = [_row(0, 1.0, _fit_or_reuse(round0, data), "round-0", None)]
    _write_table(series, cfg, alpha, rows)
    for t in range(1, rounds + 1):
        teacher = series / f"round-{t - 1}"
        probe = None
        if alpha == "optimal":
            probe = f"round-{t}-alpha0"
            _fit_or_reuse(_derive(cfg, series, probe, {"name": "selfdistill", "params": {**params, "alpha": 0.0}}, teacher), data)
            a_t = estimate_alpha(round0.run_dir, series / probe, data.val, data, device=device,
                                 batch_size=cfg.data.eval_batch_size)
            a_t = _stored_alpha(series / f"round-{t}", a_t)
        else:
            a_t = float(alpha)
        run = _derive(cfg, series, f"round-{t}", {"name": "selfdistill", "params": {**params, "alpha": a_t}}, teacher)
        rows.append(_row(t, a_t, _fit_or_reuse(run, data), f"round-{t}", probe))
        _write_table(series, cfg, alpha, rows)
    md, js = _write_table(series, cfg, alpha, rows)
    return RoundsResult(series, rows, md, js)
