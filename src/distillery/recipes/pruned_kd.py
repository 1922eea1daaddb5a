"""Knowledge distillation on pruned data (Ben-Baruch et al., ICML 2025).

    from distillery.config import load_config
    from distillery.recipes.pruned_kd import run_pruned_kd
    result = run_pruned_kd(load_config("configs/pruned_kd.yaml"), [0.1, 0.3, 0.5], scorer="el2n")

Ben-Baruch, Botach, Kviatkovsky, Aggarwal & Medioni, "Distilling the Knowledge in Data Pruning"
(ICML 2025, arXiv:2403.07854).  A teacher trained on the FULL training set distils into a student
that only sees a pruned subset (a fraction ``f`` of the rows), with the usual mixture

    L = (1 - α) · CE(student, y) + α · T² · KL(teacher_T ‖ student_T)          (Hinton et al. 2015)

The paper's findings this recipe lets one reproduce: KD helps at every keep fraction, most at
small ones; with KD, random pruning is as good as score-based pruning; and the best KD weight α
*grows as f shrinks* (less data: rely more on the teacher, whose soft labels also dampen the
noisy-label / low-quality rows that score-based pruning keeps, since those score as "hard").

Pruning scores (higher = harder):

* ``random`` -- no score; a uniformly random subset (a new one per training seed);
* ``el2n`` -- Paul, Ganguli & Dziugaite 2021, "Deep Learning on a Data Diet: Finding Important
  Examples Early in Training", EL2N score (their eq. 2): ``E_w ‖softmax(f_w(x)) - onehot(y)‖₂``,
  the expectation over ``score_seeds`` models trained ``score_epochs`` epochs on the whole pool
  (the paper: 10 seeds, early in training; we default to 2 seeds, 2 epochs to stay cheap);
* ``teacher_el2n`` -- the same norm from the (full-data) teacher's softmax: one model, no extra
  training.  A teacher that has fitted its training set scores most rows near 0, so this ranks
  mostly by label noise and ambiguity -- which is exactly what ``keep="easy"`` drops.

``keep="hard"`` keeps the highest scores (Paul et al.'s choice for large fractions); ``"easy"``
the lowest (better at small fractions, Sorscher et al. 2022).  The selection is global, NOT
stratified by class: score-based pruning is meant to change the class balance when some classes
are harder; a subset always has exactly ``round(f · N)`` rows.

The coupling between f and α.  The paper measures the optimal α per fraction and finds it
decreasing in f; we could not read its exact adaptive formula here, so :func:`adaptive_alpha`
is our documented monotone stand-in: linear from ``alpha_empty`` (f → 0: teacher only) to
``alpha_full`` (f = 1: the full-data KD weight), ``α(f) = alpha_full + (alpha_empty - alpha_full)(1 - f)``.

Runs live in ``OUTPUT_DIR/NAME/`` as ``f0.3-el2n-hard-a0.85-s0`` (``-ce-`` for α = 0) etc. (score probes:
``score-el2n-s0``); a finished run is reused, an unfinished one resumed.  ``pruned_kd.md`` /
``pruned_kd.json`` there hold the table (mean ± std over seeds per fraction and variant).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import statistics
from pathlib import Path
from typing import Literal

import torch

from distillery.config import RunConfig, config_from_dict
from distillery.data import DataBundle, load_data
from distillery.engine import load_teacher
from distillery.engine.checkpoint import atomic_write_text
from distillery.errors import ConfigError
from distillery.models import forward_logits

__all__ = ["adaptive_alpha", "el2n", "select_subset", "pruning_scores", "run_pruned_kd"]

PAPER = "Ben-Baruch et al. 2025, Distilling the Knowledge in Data Pruning (ICML)"
Scorer = Literal["random", "el2n", "teacher_el2n"]
Keep = Literal["hard", "easy"]


def el2n(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """EL2N of one model (Paul et al. 2021, eq. 2): ``‖softmax(logits) - onehot(y)‖₂`` per row.

    ``logits``: ``(N, C)``, ``labels``: ``(N,)`` class ids.  Average it over models for the
    paper's expectation.  Ranges from 0 (confident and right) to √2 (confident and wrong)."""
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ConfigError(f"el2n needs logits (N, C) and class ids (N,), got {tuple(logits.shape)} and {tuple(labels.shape)}")
    onehot = torch.nn.functional.one_hot(labels, logits.shape[1]).to(logits.dtype)
    return (torch.softmax(logits, dim=-1) - onehot).norm(dim=-1)


def adaptive_alpha(fraction: float, *, alpha_full: float = 0.5, alpha_empty: float = 1.0) -> float:
    """KD weight for keep fraction ``fraction`` (see the module docstring: our monotone
    stand-in for the paper's f-dependent weight, not its exact formula)."""
    _check_fraction(fraction)
    if not 0.0 <= alpha_full <= alpha_empty <= 1.0:
        raise ConfigError(f"need 0 <= alpha_full ({alpha_full}) <= alpha_empty ({alpha_empty}) <= 1: "
                          "less data must never mean less weight on the teacher")
    return round(alpha_full + (alpha_empty - alpha_full) * (1.0 - fraction), 6)


def _check_fraction(fraction: float) -> None:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0:
        raise ConfigError(f"keep fraction must be a number in (0, 1] (the share of training rows kept), got {fraction!r}")


def select_subset(n: int, fraction: float, *, scores: torch.Tensor | None = None, keep: Keep = "hard",
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Sorted row positions of the kept ``round(fraction · n)`` rows (at least 1).

    Without ``scores``: uniformly random (from ``generator``).  With ``scores`` (``(n,)``, higher
    = harder): the highest (``keep="hard"``) or lowest (``"easy"``) scores, ties broken by row
    position so the choice is reproducible."""
    _check_fraction(fraction)
    if keep not in ("hard", "easy"):
        raise ConfigError(f"keep must be 'hard' or 'easy', got {keep!r}")
    k = max(1, round(fraction * n))
    if scores is None:
        return torch.randperm(n, generator=generator)[:k].sort().values
    if scores.shape != (n,):
        raise ConfigError(f"scores must have one value per training row ({n}), got shape {tuple(scores.shape)}")
    # A stable sort on the (negated) score keeps equal scores in row order.
    order = torch.sort(-scores if keep == "hard" else scores, stable=True).indices
    return order[:k].sort().values


@torch.inference_mode()
def _logits(model: torch.nn.Module, data: DataBundle, device, batch_size: int) -> torch.Tensor:
    model.to(device).eval()
    split, out = data.train, []
    for start in range(0, len(split), batch_size):
        part = split.take(torch.arange(start, min(start + batch_size, len(split))))
        x = {k: v.to(device) for k, v in part.inputs.items()} if isinstance(part.inputs, dict) else part.inputs.to(device)
        out.append(forward_logits(model, x).double().cpu())
    return torch.cat(out)


def pruning_scores(cfg: RunConfig, data: DataBundle, scorer: Scorer, *, series: Path,
                   score_epochs: int = 2, score_seeds: int = 2) -> torch.Tensor | None:
    """Per-row difficulty of ``data.train`` (``None`` for ``random``)."""
    device = "cuda" if torch.cuda.is_available() and not cfg.train.cpu else "cpu"
    batch = cfg.data.eval_batch_size
    if scorer == "random":
        return None
    if scorer == "teacher_el2n":
        if cfg.teacher is None:
            raise ConfigError("scorer 'teacher_el2n' scores rows with the teacher, but the config has none; "
                              "set teacher: {run: PATH} or use scorer 'el2n'")
        return el2n(_logits(load_teacher(cfg, data), data, device, batch), data.train.labels)
    if scorer != "el2n":
        raise ConfigError(f"scorer must be random, el2n or teacher_el2n, got {scorer!r}")
    if score_epochs < 1 or score_seeds < 1:
        raise ConfigError(f"EL2N needs score_epochs >= 1 and score_seeds >= 1, got {score_epochs} and {score_seeds}")
    from distillery.models import build_model
    from distillery.recipes.self_distillation import _fit_or_reuse

    total = torch.zeros(len(data.train), dtype=torch.float64)
    base = cfg.model_dump(mode="json")
    for s in range(score_seeds):
        # Paul et al.: plain CE on the whole pool, stopped early; each seed is a separate model.
        raw = {**base, "name": f"score-el2n-s{s}", "output_dir": str(series), "teacher": None,
               "method": {"name": "ce", "params": {}},
               "train": {**base["train"], "epochs": score_epochs, "seed": s, "checkpoint_every": 0}}
        probe = config_from_dict(raw, source=f"(EL2N score model, seed {s})")
        _fit_or_reuse(probe, data)
        spec = probe.student.model_copy(update={"weights": str(probe.run_dir / "model.safetensors")})
        model = build_model(spec, in_channels=data.in_channels, num_classes=data.num_classes, input_size=data.input_size)
        total += el2n(_logits(model, data, device, batch), data.train.labels)
    return total / score_seeds


def _variant_alpha(variant, fraction: float, cfg_alpha: float, alpha_full: float, alpha_empty: float) -> float:
    """``ce`` -> 0 (no teacher); ``kd`` -> the config's fixed α; ``adaptive`` -> α(f); a number -> itself."""
    if variant == "ce":
        return 0.0
    if variant == "kd":
        return float(cfg_alpha)
    if variant == "adaptive":
        return adaptive_alpha(fraction, alpha_full=alpha_full, alpha_empty=alpha_empty)
    if isinstance(variant, (int, float)) and not isinstance(variant, bool) and 0.0 <= variant <= 1.0:
        return float(variant)
    raise ConfigError(f"variant must be 'ce', 'kd', 'adaptive' or a KD weight in [0, 1], got {variant!r}")


def _subset_bundle(full: DataBundle, rows: torch.Tensor) -> DataBundle:
    digest = hashlib.sha256(f"{full.fingerprint}:pruned:{rows.tolist()}".encode()).hexdigest()
    return dataclasses.replace(full, train=full.train.take(rows), fingerprint=digest)


def run_pruned_kd(cfg: RunConfig, fractions: list[float], scorer: Scorer = "random", *, keep: Keep = "hard",
                  variants: tuple = ("ce", "kd", "adaptive"), seeds: list[int] | None = None,
                  alpha_full: float = 0.5, alpha_empty: float = 1.0, score_epochs: int = 2, score_seeds: int = 2,
                  data: DataBundle | None = None) -> dict:
    """Train the config's student on each pruned subset, once per variant and seed.

    ``cfg``: method ``kd`` with a teacher trained on the full data (its ``alpha`` is the fixed
    weight of variant ``kd``, its ``temperature`` is used by every KD variant).  ``data``: the
    pool to prune (default: ``load_data(cfg.data)``).  Returns the result dict also written to
    ``OUTPUT_DIR/NAME/pruned_kd.json``."""
    if cfg.method.name != "kd":
        raise ConfigError(f"pruned-data KD trains with method kd (its alpha is varied per fraction); "
                          f"the config has '{cfg.method.name}'")
    if cfg.teacher is None and any(v != "ce" for v in variants):
        raise ConfigError("the KD variants need a teacher trained on the full data: set teacher: {run: PATH}")
    if not fractions:
        raise ConfigError("give at least one keep fraction, e.g. --fractions 0.1 0.3 0.5")
    for f in fractions:
        _check_fraction(f)
    seeds = [cfg.train.seed] if seeds is None else list(seeds)
    full = data or load_data(cfg.data)
    if full.task != "multiclass":
        raise ConfigError("pruning scores need single-label classes (multi-label data is not supported)")
    series = Path(cfg.output_dir) / cfg.name
    series.mkdir(parents=True, exist_ok=True)
    from distillery.recipes.self_distillation import _fit_or_reuse

    params = cfg.method.params
    cfg_alpha = params.get("alpha", 0.9)
    alphas = {(v, f): _variant_alpha(v, f, cfg_alpha, alpha_full, alpha_empty) for v in variants for f in fractions}
    scores = pruning_scores(cfg, full, scorer, series=series, score_epochs=score_epochs, score_seeds=score_seeds)
    base = cfg.model_dump(mode="json")
    n, rows = len(full.train), []
    for f in fractions:
        for seed in seeds:
            # Random pruning draws a new subset per seed (one permutation for every fraction, so the
            # smaller subsets are nested in the larger ones); a score ranking gives the same one.
            g = torch.Generator().manual_seed(cfg.data.split_seed * 100_003 + seed)
            kept = torch.arange(n) if f == 1.0 else select_subset(n, f, scores=scores, keep=keep, generator=g)
            bundle = _subset_bundle(full, kept)
            # The whole pool is the same run whatever the scorer: share it between scorers.
            subset = "all" if f == 1.0 else (scorer if scorer == "random" else f"{scorer}-{keep}")
            for v in variants:
                a = alphas[(v, f)]
                tag = v if isinstance(v, str) else f"a{a:g}"
                # Runs are named by their weight, so variants that agree (adaptive α(f) = the fixed α)
                # share one training instead of repeating it.
                run_name = f"f{f:g}-{subset}-{'ce' if a == 0.0 else f'a{a:g}'}-s{seed}"
                raw = {**base, "name": run_name, "output_dir": str(series),
                       "train": {**base["train"], "seed": seed}}
                if a == 0.0:  # plain CE: no teacher forward pass at all
                    raw.update(method={"name": "ce", "params": {}}, teacher=None)
                else:
                    raw["method"] = {"name": "kd", "params": {**params, "alpha": a}}
                summary = _fit_or_reuse(config_from_dict(raw, source=f"(pruned KD {raw['name']})"), bundle)
                rows.append({"fraction": f, "scorer": scorer, "keep": keep, "variant": tag, "alpha": a, "seed": seed,
                             "train_rows": len(kept), "test_accuracy": summary.get("test_accuracy"),
                             "val_accuracy": summary.get("val_accuracy"), "train_seconds": summary.get("train_seconds"),
                             "run": raw["name"]})
    result = {"paper": PAPER, "scorer": scorer, "keep": keep, "pool_rows": n, "fractions": list(fractions),
              "seeds": seeds, "alpha_rule": {"alpha_full": alpha_full, "alpha_empty": alpha_empty},
              "summary": summarise(rows), "rows": rows}
    atomic_write_text(series / "pruned_kd.json", json.dumps(result, indent=2))
    atomic_write_text(series / "pruned_kd.md", _markdown(cfg, result))
    return result


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and (sample) std of test accuracy over seeds, per (fraction, scorer, keep, variant)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["fraction"], r["scorer"], r["keep"], r["variant"]), []).append(r)
    out = []
    for (f, scorer, keep, variant), rs in groups.items():
        accs = [r["test_accuracy"] for r in rs]
        out.append({"fraction": f, "scorer": scorer, "keep": keep, "variant": variant, "alpha": rs[0]["alpha"],
                    "train_rows": rs[0]["train_rows"], "n": len(accs), "mean": statistics.fmean(accs),
                    "std": statistics.stdev(accs) if len(accs) > 1 else 0.0})
    return out


def _markdown(cfg: RunConfig, result: dict) -> str:
    lines = [f"# KD on pruned data: {cfg.name}", "", f"{PAPER}.", "",
             f"Pool {result['pool_rows']} training rows; scorer {result['scorer']} (keep {result['keep']}); "
             f"student {cfg.student.arch}, {cfg.train.epochs} epochs, seeds {result['seeds']}. Adaptive "
             f"α(f) = {result['alpha_rule']['alpha_full']} + ({result['alpha_rule']['alpha_empty']} - "
             f"{result['alpha_rule']['alpha_full']})·(1 - f).", "",
             "| keep fraction | rows | variant | α | test accuracy (mean ± std) |", "|---:|---:|---|---:|---:|"]
    for s in sorted(result["summary"], key=lambda s: (s["fraction"], str(s["variant"]))):
        lines.append(f"| {s['fraction']:g} | {s['train_rows']} | {s['variant']} | {s['alpha']:.3f} | "
                     f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}% |")
    return "\n".join(lines) + "\n"
