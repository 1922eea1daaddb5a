"""Robust active distillation (Baykal et al. 2023) on Fashion-MNIST: accuracy vs teacher queries.

    python benchmarks/active_kd.py                   # 2 seeds, 3 strategies, 20 epochs a round (~10 min, one core)
    python benchmarks/active_kd.py --seeds 1 --epochs 4   # a quicker look

Writes benchmarks/results/active_kd.md and active_kd.png.  Setting: the teacher is the CNN
width 32 of fmnist_classification.py (benchmarks/runs/fmnist/teacher, trained if missing); the
unlabelled pool is the stratified 10,000-image subset of pruned_kd.py (same loading, so the
normalisation is the teacher's).  A CNN width 16 student starts from 100 random pool images and
queries the teacher in 4 rounds of 200, choosing by random / margin / RAD, retrained each round
on all queried images with KD at alpha 1.0 (teacher soft targets only).  Finished rounds are
reused, so an interrupted benchmark continues.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from distillery.config import config_from_dict
from distillery.data import load_data
from distillery.recipes.active_kd import STRATEGIES, run_active_kd, summarise

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from pruned_kd import POOL_PER_CLASS, _pool, _teacher  # noqa: E402  (the same teacher and pool)

SEED_SIZE, ROUNDS, PER_ROUND = 100, 4, 200
LABELS = {"random": "random", "margin": "margin (uncertainty)", "rad": "RAD (robust)"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--runs", type=Path, default=HERE / "runs" / "active_kd")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    teacher = _teacher()
    tsum = json.loads((teacher / "summary.json").read_text())
    cfg = config_from_dict({
        "name": f"pool10k-e{args.epochs}", "output_dir": str(args.runs),
        "data": {"name": "fashion_mnist", "batch_size": 32},
        "teacher": {"run": str(teacher)}, "student": {"arch": "cnn", "kwargs": {"width": 16}},
        "method": {"name": "kd", "params": {"temperature": 4.0, "alpha": 1.0}},
        "train": {"epochs": args.epochs, "optimizer": {"name": "adam", "lr": 1e-3}, "scheduler": {"name": "cosine"},
                  "eval_every": args.epochs, "progress": False, "report": False},
    })
    pool = _pool(load_data(cfg.data), POOL_PER_CLASS, val_rows=1000)
    rows = []
    for seed in range(args.seeds):  # seed by seed: an interrupted benchmark still has whole seeds
        for strategy in STRATEGIES:
            rows += [r for r in run_active_kd(cfg, ROUNDS, PER_ROUND, strategy, SEED_SIZE, seeds=[seed], data=pool)["rows"]
                     if r["seed"] == seed and r["strategy"] == strategy]
            print(f"seed {seed} {strategy}: {time.perf_counter() - t0:.0f}s", flush=True)
    wall = time.perf_counter() - t0
    spent = sum(json.loads(p.read_text())["wall_seconds"] for p in (args.runs / cfg.name).glob("*/summary.json"))
    summary = summarise(rows)
    (HERE / "results").mkdir(exist_ok=True)
    _plot(summary, tsum["test_accuracy"], HERE / "results" / "active_kd.png")
    _write(summary, rows, tsum, args, wall, spent, HERE / "results" / "active_kd.md")
    print(f"wrote benchmarks/results/active_kd.md in {wall:.0f}s")


def _plot(summary: list[dict], teacher_acc: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for strategy, style in zip(STRATEGIES, ("o-", "s-", "^-")):
        pts = [s for s in summary if s["strategy"] == strategy]
        ax.errorbar([s["queries"] for s in pts], [100 * s["mean"] for s in pts], yerr=[100 * s["std"] for s in pts],
                    fmt=style, capsize=3, label=LABELS[strategy])
    ax.axhline(100 * teacher_acc, ls="--", c="grey", label="teacher")
    ax.set(xlabel="teacher queries (seed set included)", ylabel="student test accuracy (%)",
           title="Active KD on Fashion-MNIST (10k pool)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _write(summary, rows, tsum, args, wall, spent, path: Path) -> None:
    get = {(s["strategy"], s["queries"]): s for s in summary}
    cell = lambda s: f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}" if s else "–"  # noqa: E731
    err = {st: [r["teacher_error_on_queried"] for r in rows if r["strategy"] == st and r["round"] == ROUNDS]
           for st in STRATEGIES}
    eps = sorted({round(r["seed_teacher_error"], 4) for r in rows})
    lines = ["# Robust active distillation (Fashion-MNIST)", "",
             "Baykal et al. 2023, *Robust Active Distillation* (ICLR): under a budget of teacher queries, which "
             "unlabelled images should the teacher label?  Produced by `python benchmarks/active_kd.py` -- rerun it "
             "rather than editing this file.", "",
             f"- Teacher: CNN width 32 trained on the full training split (benchmarks/runs/fmnist/teacher), test "
             f"accuracy {100 * tsum['test_accuracy']:.2f}%.",
             "- Pool: a stratified 10,000-image subset of the training split (1,000 per class; labels unused except "
             f"the seed set's); seed set {SEED_SIZE} random pool images (the same for every strategy), then {ROUNDS} "
             f"rounds of {PER_ROUND} queries.  Test: the official 10,000 test images.",
             f"- Student: CNN width 16, retrained from scratch each round for {args.epochs} epochs on all queried "
             "images with KD alpha = 1.0, T = 4 (Adam 1e-3, cosine, batch 32); "
             f"{args.seeds} seeds (0..{args.seeds - 1}); mean ± std (sample std) of test accuracy.",
             "- Strategies: *random*; *margin* = lowest student margin p(1) − p(2); *RAD* = the robust game "
             "(max over inclusion probabilities of the expected gain 1 − margin left after the k most valuable "
             f"queries are wasted by teacher mistakes; k = teacher error on the seed set × {PER_ROUND}, here "
             f"error {', '.join(f'{100 * e:.0f}%' for e in eps)}), solved as a linear program and sampled systematically "
             "-- our reading of the paper's game, not its published algorithm (see src/distillery/recipes/active_kd.py).",
             f"- Budget: {spent / 60:.1f} min summed over the run directories' wall time (this invocation "
             f"{wall / 60:.1f} min; finished runs are reused), torch.set_num_threads(1), on "
             f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores shared with other jobs), "
             f"{datetime.now(timezone.utc):%Y-%m-%d}.", "",
             "| teacher queries | " + " | ".join(LABELS[s] for s in STRATEGIES) + " |",
             "|---:|" + "---:|" * len(STRATEGIES)]
    for q in sorted({s["queries"] for s in summary}):
        lines.append(f"| {q} | " + " | ".join(cell(get.get((s, q))) for s in STRATEGIES) + " |")
    lines += ["", f"Teacher error rate on the {SEED_SIZE + ROUNDS * PER_ROUND} queried images after the last round "
              "(reported from the pool labels, never used): "
              + ", ".join(f"{LABELS[s]} {100 * sum(e) / len(e):.1f}%" for s, e in err.items() if e) + ".", "",
              "![accuracy vs queries](active_kd.png)", "",
              "Per-run numbers: `benchmarks/runs/active_kd/*/active_kd.json` and each run's `summary.json`.", ""]
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
