"""Active distillation under a budget of teacher queries (Baykal et al., ICLR 2023).

    from distillery.config import load_config
    from distillery.recipes.active_kd import run_active_kd
    result = run_active_kd(load_config("configs/active_kd.yaml"), rounds=4, per_round=200, strategy="rad")

Baykal, Trinh, Iliopoulos, Menghani & Vee, "Robust Active Distillation" (ICLR 2023,
arXiv:2210.01213).  The training rows of the data are an unlabelled *pool*; every teacher soft
label costs one query.  The student starts from a small seed set (``seed_size`` rows, drawn at
random), then for ``rounds`` rounds chooses ``per_round`` unqueried rows, queries the teacher on
them and retrains on everything queried so far.  The pool's labels are never used for training
or selection -- only the seed set's, to estimate the teacher's error rate (below) -- and are
read only to report accuracy.

Training.  Every round is one run of the registry's ``kd`` with ``alpha = 1.0``: the student fits
the teacher's soft targets only.  We chose this for the seed set too (its labels are known) so
that all rounds train the same objective and their accuracies differ only by *which* rows were
queried; the labels the engine receives for queried rows are the teacher's argmax (what a query
returns), never the pool's labels, so nothing can leak even if a method reads them.

Selection rules (each picks among the unqueried rows):

* ``random`` -- uniformly at random (seeded);
* ``margin`` -- uncertainty sampling: the rows with the lowest student margin
  ``p_(1) - p_(2)`` (top-1 minus top-2 softmax probability), ties broken by row position;
* ``rad`` -- robust selection, our reading of the paper's game (Sec. 3): the informativeness
  (gain) of row i is ``g_i = 1 - margin_i``; the learner picks inclusion probabilities ``p``
  (``0 <= p_i <= 1``, ``sum p = B``) and an adversary -- the teacher's mistakes -- wipes out the
  gain of the ``k`` rows where the learner expects the most, so the learner maximises the
  worst-case expected gain

      max_p  sum_i p_i g_i  -  top_k(p_i g_i),

  ``top_k`` the sum of the k largest terms (fractional k: the CVaR form
  ``min_t k t + sum_i (p_i g_i - t)_+``, which makes the problem a linear program, solved
  exactly by HiGHS).  With ``k = 0`` this is ``margin``; with ``k > 0`` no single row may carry
  too much expected gain, so the hardest rows -- the ones the teacher most likely gets wrong --
  are *down-weighted* (``p_i < 1``) and the budget spreads over more rows.  It is
  parameter-free as in the paper: ``k = eps * B`` with ``eps`` the teacher's error rate on the
  labelled seed set (the expected number of teacher mistakes in the batch).  The B rows are then
  drawn by systematic sampling, which includes row i with probability exactly ``p_i``.
  Deviation: we could not read the paper's own closed-form solution and algorithm here; this
  LP is the game as described in its abstract and Sec. 3, solved directly.

Runs live in ``OUTPUT_DIR/NAME/`` as ``rad-s0-r2`` (strategy, seed, round; round 0, the seed set
alone, is ``seed-s0-r0``, shared by the strategies); the queried rows of
each round are stored next to them (``rad-s0-queried.json``) so a rerun reuses finished rounds
and resumes an unfinished one.  ``active_kd.md`` / ``active_kd.json`` hold the table (test
accuracy vs number of queries, mean ± std over seeds per strategy).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import statistics
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from distillery.config import RunConfig, config_from_dict
from distillery.data import DataBundle, Split, load_data
from distillery.engine import load_teacher
from distillery.engine.checkpoint import atomic_write_text
from distillery.errors import ConfigError
from distillery.models import forward_logits

__all__ = ["student_margin", "rad_probabilities", "worst_case_gain", "systematic_sample", "select", "run_active_kd"]

PAPER = "Baykal et al. 2023, Robust Active Distillation (ICLR)"
Strategy = Literal["random", "margin", "rad"]
STRATEGIES = ("random", "margin", "rad")


def student_margin(probs: torch.Tensor) -> torch.Tensor:
    """Top-1 minus top-2 probability per row of ``probs`` ``(N, C)``: 0 = undecided, 1 = certain."""
    if probs.dim() != 2 or probs.shape[1] < 2:
        raise ConfigError(f"margins need class probabilities of shape (N, C) with C >= 2, got {tuple(probs.shape)}")
    top2 = probs.topk(2, dim=1).values
    return top2[:, 0] - top2[:, 1]


def worst_case_gain(p: torch.Tensor, gain: torch.Tensor, mistakes: float) -> float:
    """``sum p_i g_i - top_k(p_i g_i)``: the expected gain left after the teacher's ``k = mistakes``
    wrong labels fall on the rows of largest expected gain (fractional k counts the next row in part)."""
    w = (p * gain).double().sort(descending=True).values
    whole = int(mistakes)
    lost = w[:whole].sum() + (mistakes - whole) * (w[whole] if whole < len(w) else 0.0)
    return float(w.sum() - lost)


def rad_probabilities(gain: torch.Tensor, budget: int, mistakes: float) -> torch.Tensor:
    """Inclusion probabilities maximising :func:`worst_case_gain` under ``sum p = budget``, ``0 <= p <= 1``.

    Solves the linear program (variables p, u >= 0 and t)
    ``max  g·p - k t - sum u   s.t.  u_i >= g_i p_i - t``, whose optimum over (t, u) is exactly
    the top-k sum (Rockafellar & Uryasev's CVaR identity)."""
    from scipy.optimize import linprog
    from scipy.sparse import csr_matrix, diags, hstack, identity

    n = int(gain.shape[0])
    _check_budget(budget, n)
    if mistakes < 0 or mistakes > budget:
        raise ConfigError(f"the number of teacher mistakes must lie in [0, budget={budget}], got {mistakes}")
    g = gain.double().cpu().numpy()
    if np.any(g < 0):
        raise ConfigError("gains must be non-negative (use 1 - margin)")
    cost = np.concatenate([-g, np.ones(n), [mistakes]])            # minimise the negated objective
    a_ub = hstack([diags(g), -identity(n), csr_matrix(-np.ones((n, 1)))]).tocsr()
    a_eq = csr_matrix(np.concatenate([np.ones(n), np.zeros(n + 1)])[None, :])
    bounds = [(0.0, 1.0)] * n + [(0.0, None)] * n + [(None, None)]
    res = linprog(cost, A_ub=a_ub, b_ub=np.zeros(n), A_eq=a_eq, b_eq=[float(budget)], bounds=bounds, method="highs")
    if res.status != 0:
        raise RuntimeError(f"the RAD linear program failed: {res.message}")
    return torch.from_numpy(np.clip(res.x[:n], 0.0, 1.0))


def systematic_sample(p: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Sorted positions of ``round(sum p)`` distinct rows, row i included with probability ``p_i``
    (systematic sampling: one uniform offset u, the rows whose cumulative-p interval holds u + j)."""
    c = p.double().cumsum(0)
    b = round(float(c[-1]))
    c = c * (b / float(c[-1]))                                      # absorb the LP's rounding error
    u = torch.rand((), generator=generator, dtype=torch.float64)
    picks = torch.searchsorted(c, u + torch.arange(b, dtype=torch.float64), right=True).clamp(max=len(p) - 1)
    if len(picks.unique()) != b:
        raise RuntimeError("systematic sampling needs every inclusion probability <= 1")
    return picks.sort().values


def _check_budget(budget: int, n: int) -> None:
    if isinstance(budget, bool) or not isinstance(budget, int) or not 1 <= budget <= n:
        raise ConfigError(f"per_round must be an integer between 1 and the {n} unqueried rows left, got {budget!r}; "
                          "lower --per-round or --rounds")


def select(strategy: Strategy, budget: int, *, probs: torch.Tensor | None = None, n: int | None = None,
           mistakes: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sorted positions (among the candidates) of the ``budget`` rows to query.

    ``probs``: the student's class probabilities on the candidates ``(N, C)`` (``margin`` and
    ``rad``); ``n``: the candidate count for ``random``; ``mistakes``: RAD's k."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    generator = generator or torch.Generator().manual_seed(0)
    if strategy == "random":
        count = n if probs is None else len(probs)
        _check_budget(budget, count)
        return torch.randperm(count, generator=generator)[:budget].sort().values
    if probs is None:
        raise ConfigError(f"strategy {strategy!r} needs the student's probabilities on the candidates")
    margin = student_margin(probs.double())
    _check_budget(budget, len(margin))
    if strategy == "margin":
        return torch.sort(margin, stable=True).indices[:budget].sort().values
    return systematic_sample(rad_probabilities(1.0 - margin, budget, mistakes), generator)


@torch.inference_mode()
def _probs(model: torch.nn.Module, split: Split, device, batch_size: int) -> torch.Tensor:
    model.to(device).eval()
    out = []
    for start in range(0, len(split), batch_size):
        part = split.take(torch.arange(start, min(start + batch_size, len(split))))
        x = {k: v.to(device) for k, v in part.inputs.items()} if isinstance(part.inputs, dict) else part.inputs.to(device)
        out.append(torch.softmax(forward_logits(model, x).double(), dim=-1).cpu())
    return torch.cat(out)


def _round_bundle(pool: DataBundle, rows: torch.Tensor, teacher_labels: torch.Tensor) -> DataBundle:
    """The queried rows, labelled with what the queries returned (the teacher's argmax), not the pool's labels."""
    train = pool.train.take(rows)
    train = Split(train.inputs, teacher_labels.clone(), train.index)
    digest = hashlib.sha256(f"{pool.fingerprint}:active:{rows.tolist()}:{teacher_labels.tolist()}".encode()).hexdigest()
    return dataclasses.replace(pool, train=train, fingerprint=digest)


def run_active_kd(cfg: RunConfig, rounds: int, per_round: int, strategy: Strategy = "rad", seed_size: int = 100, *,
                  seeds: list[int] | None = None, data: DataBundle | None = None) -> dict:
    """Query ``seed_size + rounds * per_round`` teacher labels in rounds, choosing them by ``strategy``.

    ``cfg``: method ``kd`` with a teacher (its temperature is used; alpha is set to 1.0), the
    student and training settings of every round.  ``data``: its train split is the pool
    (default ``load_data(cfg.data)``).  Returns the dict also written to
    ``OUTPUT_DIR/NAME/active_kd.json`` (rows of all strategies run so far in that series)."""
    if cfg.method.name != "kd":
        raise ConfigError(f"active distillation trains every round with method kd, the config has '{cfg.method.name}'")
    if cfg.teacher is None:
        raise ConfigError("active distillation queries a teacher: set teacher: {run: PATH}")
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise ConfigError(f"rounds must be a non-negative integer, got {rounds!r}")
    pool = data or load_data(cfg.data)
    if pool.task != "multiclass":
        raise ConfigError("margins need single-label classes (multi-label data is not supported)")
    n = len(pool.train)
    if isinstance(seed_size, bool) or not isinstance(seed_size, int) or not 1 <= seed_size < n:
        raise ConfigError(f"seed_size must be an integer in [1, {n - 1}] (pool rows), got {seed_size!r}")
    _check_budget(per_round, n - seed_size)
    if seed_size + rounds * per_round > n:
        raise ConfigError(f"the budget seed_size + rounds * per_round = {seed_size + rounds * per_round} exceeds "
                          f"the {n} pool rows; lower --rounds or --per-round")
    from distillery.recipes.self_distillation import _fit_or_reuse

    series = Path(cfg.output_dir) / cfg.name
    series.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() and not cfg.train.cpu else "cpu"
    batch = cfg.data.eval_batch_size
    teacher = load_teacher(cfg, pool)
    base = cfg.model_dump(mode="json")
    params = {**cfg.method.params, "alpha": 1.0}
    new_rows = []
    for seed in ([cfg.train.seed] if seeds is None else list(seeds)):
        store = series / f"{strategy}-s{seed}-queried.json"
        done = json.loads(store.read_text()) if store.is_file() else []
        if any(len(d) != per_round for d in done):
            raise ConfigError(f"{store} holds rounds of another size than per_round={per_round}; "
                              "choose another name with --set name=NEW or remove that series")
        # The seed set is the same for every strategy (it depends on the seed only), so strategies
        # differ from round 1 on.
        g = torch.Generator().manual_seed(cfg.data.split_seed * 100_003 + seed)
        queried = torch.randperm(n, generator=g)[:seed_size].sort().values
        # Queries are answered once and kept: the teacher is frozen, so asking again is waste.
        answers = _probs(teacher, pool.train.take(queried), device, batch)
        eps = float((answers.argmax(1) != pool.train.labels[queried]).double().mean())  # seed labels are known
        history = []
        for t in range(rounds + 1):
            if t > 0:
                if t <= len(done):  # a finished round's choice is reused exactly
                    picked = torch.tensor(done[t - 1], dtype=torch.long)
                else:
                    left = torch.ones(n, dtype=torch.bool)
                    left[queried] = False
                    candidates = left.nonzero().flatten()
                    probs = None
                    if strategy != "random":
                        probs = _student_probs(series / _run_name(strategy, seed, t - 1), pool, candidates, device, batch)
                    g_t = torch.Generator().manual_seed(g.initial_seed() * 31 + t)
                    picked = candidates[select(strategy, per_round, probs=probs, n=len(candidates),
                                               mistakes=eps * per_round, generator=g_t)]
                    done.append(picked.tolist())
                    atomic_write_text(store, json.dumps(done))
                answers = torch.cat([answers, _probs(teacher, pool.train.take(picked), device, batch)])
                queried = torch.cat([queried, picked])
            name = _run_name(strategy, seed, t)
            raw = {**base, "name": name, "output_dir": str(series), "method": {"name": "kd", "params": params},
                   "train": {**base["train"], "seed": seed}}
            summary = _fit_or_reuse(config_from_dict(raw, source=f"(active KD {name})"),
                                    _round_bundle(pool, queried, answers.argmax(1)))
            if summary.get("train_samples") not in (None, len(queried)):
                raise ConfigError(f"{series / name} was trained on {summary['train_samples']} rows, this round has "
                                  f"{len(queried)} (another seed_size?); choose another name with --set name=NEW")
            # Reported only: how often the teacher's answer on the queried rows was wrong.
            wrong = float((answers.argmax(1) != pool.train.labels[queried]).double().mean())
            history.append({"strategy": strategy, "seed": seed, "round": t, "queries": len(queried),
                            "test_accuracy": summary.get("test_accuracy"), "teacher_error_on_queried": wrong,
                            "seed_teacher_error": eps, "run": name})
        new_rows += history
    path = series / "active_kd.json"
    old = json.loads(path.read_text())["rows"] if path.is_file() else []
    keys = {(r["strategy"], r["seed"], r["round"]) for r in new_rows}
    rows = [r for r in old if (r["strategy"], r["seed"], r["round"]) not in keys] + new_rows
    result = {"paper": PAPER, "pool_rows": n, "seed_size": seed_size, "per_round": per_round, "rounds": rounds,
              "summary": summarise(rows), "rows": rows}
    atomic_write_text(path, json.dumps(result, indent=2))
    atomic_write_text(series / "active_kd.md", _markdown(cfg, result))
    return result


def _run_name(strategy: str, seed: int, t: int) -> str:
    # Round 0 trains on the seed set alone, the same for every strategy: one shared run.
    return f"seed-s{seed}-r0" if t == 0 else f"{strategy}-s{seed}-r{t}"


def _student_probs(run_dir: Path, pool: DataBundle, rows: torch.Tensor, device, batch: int) -> torch.Tensor:
    from distillery.config import load_config
    from distillery.models import build_model

    spec = load_config(run_dir / "config.yaml").student.model_copy(update={"weights": str(run_dir / "model.safetensors")})
    model = build_model(spec, in_channels=pool.in_channels, num_classes=pool.num_classes, input_size=pool.input_size)
    return _probs(model, pool.train.take(rows), device, batch)


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and (sample) std of test accuracy over seeds, per (strategy, number of queries)."""
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        groups.setdefault((r["strategy"], r["queries"]), []).append(r["test_accuracy"])
    return [{"strategy": s, "queries": q, "n": len(a), "mean": statistics.fmean(a),
             "std": statistics.stdev(a) if len(a) > 1 else 0.0} for (s, q), a in sorted(groups.items())]


def _markdown(cfg: RunConfig, result: dict) -> str:
    lines = [f"# Active distillation: {cfg.name}", "", f"{PAPER}.", "",
             f"Pool {result['pool_rows']} rows; seed set {result['seed_size']}, {result['rounds']} rounds of "
             f"{result['per_round']} queries; student {cfg.student.arch}, {cfg.train.epochs} epochs per round, "
             "KD with alpha 1.0 (teacher soft targets only).", "",
             "| strategy | teacher queries | seeds | test accuracy (mean ± std) |", "|---|---:|---:|---:|"]
    for s in result["summary"]:
        lines.append(f"| {s['strategy']} | {s['queries']} | {s['n']} | {100 * s['mean']:.2f} ± {100 * s['std']:.2f}% |")
    return "\n".join(lines) + "\n"
