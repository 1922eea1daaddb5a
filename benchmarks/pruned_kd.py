"""KD on pruned data (Ben-Baruch et al. 2025) on Fashion-MNIST: accuracy vs keep fraction.

    python benchmarks/pruned_kd.py                    # 2 seeds, 3 epochs (~15 min on one core)
    python benchmarks/pruned_kd.py --seeds 1 --epochs 2   # a quicker look
    python benchmarks/pruned_kd.py --matched          # + a steps-matched check at f = 0.1, 0.3 (~5 min more)

Writes benchmarks/results/pruned_kd.md and pruned_kd.png.  Setting: the teacher is the CNN
width 32 trained on the full training set (benchmarks/runs/fmnist/teacher, the teacher of
fmnist_classification.py; trained here if missing).  The pool is a stratified 10,000-image subset
of the training split (1,000 per class); it is pruned to keep fractions 0.1/0.3/0.5/1.0 at random
or by EL2N (2 score models x 2 epochs on the pool, keep the hardest), and a CNN width 16 student
is trained on each subset with CE, KD with a fixed alpha = 0.9, and KD with the adaptive alpha(f).
Every run directory is reused when finished, so an interrupted benchmark continues.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from distillery.config import config_from_dict
from distillery.data import load_data
from distillery.recipes.pruned_kd import adaptive_alpha, run_pruned_kd, summarise

HERE = Path(__file__).resolve().parent
TEACHER = HERE / "runs" / "fmnist" / "teacher"
FRACTIONS = [0.1, 0.3, 0.5, 1.0]
POOL_PER_CLASS = 1000
LABELS = {"ce": "CE only", "kd": "KD, fixed α = 0.9", "adaptive": "KD, adaptive α(f)"}


def _teacher() -> Path:
    """The fmnist_classification teacher; trained with the same settings if it is not there."""
    if (TEACHER / "summary.json").is_file():
        return TEACHER
    from distillery.engine import fit

    cfg = config_from_dict({"name": "teacher", "output_dir": str(TEACHER.parent),
                            "data": {"name": "fashion_mnist", "batch_size": 128},
                            "student": {"arch": "cnn", "kwargs": {"width": 32}}, "method": {"name": "ce"},
                            "train": {"epochs": 3, "optimizer": {"name": "adam", "lr": 1e-3},
                                      "scheduler": {"name": "cosine"}, "progress": False}})
    return fit(cfg).run_dir


def _pool(data, per_class: int, val_rows: int):
    """A stratified pool of ``per_class`` training images per class, and a smaller validation split
    (validation is not reported; a smaller one keeps the per-run evaluation cheap).  The data are
    loaded without ``train_subset`` so their normalisation is exactly the teacher's."""
    g = torch.Generator().manual_seed(0)
    rows = torch.cat([(data.train.labels == c).nonzero().flatten()[torch.randperm(int((data.train.labels == c).sum()), generator=g)[:per_class]]
                      for c in range(data.num_classes)]).sort().values
    val = torch.randperm(len(data.val), generator=g)[:val_rows].sort().values
    digest = hashlib.sha256(f"{data.fingerprint}:pool{per_class}:val{val_rows}".encode()).hexdigest()
    return dataclasses.replace(data, train=data.train.take(rows), val=data.val.take(val), fingerprint=digest)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--runs", type=Path, default=HERE / "runs" / "pruned_kd")
    ap.add_argument("--matched", action="store_true",
                    help="also train random subsets f=0.1, 0.3 for epochs/f epochs (as many steps as the whole pool), seed 0")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    teacher = _teacher()
    tsum = json.loads((teacher / "summary.json").read_text())
    cfg = config_from_dict({
        "name": f"pool10k-e{args.epochs}", "output_dir": str(args.runs),
        "data": {"name": "fashion_mnist", "batch_size": 64},
        "teacher": {"run": str(teacher)}, "student": {"arch": "cnn", "kwargs": {"width": 16}},
        "method": {"name": "kd", "params": {"temperature": 4.0, "alpha": 0.9}},
        "train": {"epochs": args.epochs, "optimizer": {"name": "adam", "lr": 1e-3}, "scheduler": {"name": "cosine"},
                  "eval_every": args.epochs, "progress": False, "report": False},
    })
    pool = _pool(load_data(cfg.data), POOL_PER_CLASS, val_rows=1000)
    rows = []
    for seed in range(args.seeds):  # seed by seed: an interrupted benchmark still has whole seeds
        for scorer in ("random", "el2n"):
            result = run_pruned_kd(cfg, FRACTIONS, scorer, keep="hard", variants=("ce", "kd", "adaptive"),
                                   seeds=[seed], score_epochs=2, score_seeds=2, data=pool)
            rows += result["rows"]
            print(f"seed {seed} {scorer}: {time.perf_counter() - t0:.0f}s", flush=True)
    matched = []
    if args.matched:
        # Fixed epochs give a 10% subset a tenth of the steps: is KD's deficit there just too few steps?
        for f in (0.1, 0.3):
            cfg_f = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": round(args.epochs / f)}),
                                           "name": f"pool10k-e{args.epochs}-matched"})
            matched += run_pruned_kd(cfg_f, [f], "random", variants=("ce", "kd", "adaptive"), seeds=[0], data=pool)["rows"]
            print(f"matched f={f}: {time.perf_counter() - t0:.0f}s", flush=True)
    wall = time.perf_counter() - t0
    # Runs are reused across invocations, so the budget is the runs' own time, summed from their summaries.
    spent = sum(json.loads(p.read_text())["wall_seconds"] for p in args.runs.glob("*/*/summary.json"))
    summary = summarise(rows)
    (HERE / "results").mkdir(exist_ok=True)
    _plot(summary, tsum["test_accuracy"], HERE / "results" / "pruned_kd.png")
    _write(summary, matched, tsum, args, wall, spent, HERE / "results" / "pruned_kd.md")
    print(f"wrote benchmarks/results/pruned_kd.md in {wall:.0f}s")


def _plot(summary: list[dict], teacher_acc: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, scorer in zip(axes, ("random", "el2n")):
        for variant, style in (("ce", "o-"), ("kd", "s-"), ("adaptive", "^-")):
            pts = sorted((s for s in summary if s["variant"] == variant and (s["scorer"] == scorer or s["fraction"] == 1.0)),
                         key=lambda s: s["fraction"])
            pts = list({s["fraction"]: s for s in pts}.values())
            ax.errorbar([s["fraction"] for s in pts], [100 * s["mean"] for s in pts], yerr=[100 * s["std"] for s in pts],
                        fmt=style, capsize=3, label=LABELS[variant])
        ax.axhline(100 * teacher_acc, ls="--", c="grey", label="teacher (full data)")
        ax.set(title=f"{'random' if scorer == 'random' else 'EL2N (keep hardest)'} pruning",
               xlabel="keep fraction of the 10k pool", xticks=FRACTIONS)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _write(summary, matched, tsum, args, wall, spent, path: Path) -> None:
    get = {(s["fraction"], s["scorer"], s["variant"]): s for s in summary}
    cell = lambda s: f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}" if s else "–"  # noqa: E731
    lines = ["# KD on pruned data (Fashion-MNIST)", "",
             "Ben-Baruch et al. 2025, *Distilling the Knowledge in Data Pruning* (ICML): a student trained on a pruned "
             "subset, with and without KD from a teacher trained on the full data.  Produced by "
             "`python benchmarks/pruned_kd.py` -- rerun it rather than editing this file.", "",
             f"- Teacher: CNN width 32, trained on all 54k training images (benchmarks/runs/fmnist/teacher), test accuracy "
             f"{100 * tsum['test_accuracy']:.2f}%.",
             "- Pool: a stratified 10,000-image subset of the training split (1,000 per class), normalised with the "
             "full training set's statistics (the teacher's).  Test: the official 10,000 test images.",
             f"- Student: CNN width 16, {args.epochs} epochs at every keep fraction (Adam 1e-3, cosine, batch 64): a "
             "fixed-epoch protocol, so a 10% subset also gets a tenth of the optimiser steps (see the steps-matched check), "
             f"{args.seeds} seeds (0..{args.seeds - 1}); mean ± std (sample std) of test accuracy.",
             "- Pruning: *random* draws a new subset per seed; *EL2N* (Paul et al. 2021) averages ‖softmax − onehot‖₂ of "
             "2 CNN-w16 models trained 2 epochs on the pool and keeps the highest scores (hardest), a global (not "
             "class-stratified) selection of exactly round(f·10,000) rows.",
             "- KD: T = 4; fixed α = 0.9; adaptive α(f) = 0.5 + 0.5·(1 − f) "
             f"({', '.join(f'f={f:g}: {adaptive_alpha(f):.2f}' for f in FRACTIONS)}) -- our monotone stand-in for the "
             "paper's keep-fraction/KD-weight coupling (its exact formula was not available to us).",
             f"- Budget: {spent / 60:.1f} min summed over the run directories' wall time (score models and the "
             f"`--matched` runs included; this invocation: {wall / 60:.1f} min, finished runs are reused), "
             f"torch.set_num_threads(1), on {platform.processor() or platform.machine()} "
             f"({os.cpu_count()} cores shared with other jobs), {datetime.now(timezone.utc):%Y-%m-%d}.", "",
             "| keep fraction | rows | pruning | CE only | KD, α = 0.9 | KD, adaptive α(f) | α(f) |",
             "|---:|---:|---|---:|---:|---:|---:|"]
    for f in FRACTIONS:
        for scorer in (("random", "el2n") if f < 1.0 else ("random",)):
            s = [get.get((f, scorer, v)) for v in ("ce", "kd", "adaptive")]
            name = "none (whole pool)" if f == 1.0 else ("random" if scorer == "random" else "EL2N, hardest")
            rows_n = next(x["train_rows"] for x in s if x)
            lines.append(f"| {f:g} | {rows_n} | {name} | {cell(s[0])} | {cell(s[1])} | {cell(s[2])} | {adaptive_alpha(f):.2f} |")
    if matched:
        lines += ["", f"Steps-matched check (`--matched`): random subsets trained for {args.epochs}/f epochs, i.e. as many "
                  "optimiser steps as the whole pool gets, seed 0 only.", "",
                  "| keep fraction | epochs | CE only | KD, α = 0.9 | KD, adaptive α(f) |", "|---:|---:|---:|---:|---:|"]
        for f in sorted({r["fraction"] for r in matched}):
            acc = {r["variant"]: f"{100 * r['test_accuracy']:.2f}" for r in matched if r["fraction"] == f}
            lines.append(f"| {f:g} | {round(args.epochs / f)} | {acc['ce']} | {acc['kd']} | {acc['adaptive']} |")
    lines += ["", "![accuracy vs keep fraction](pruned_kd.png)", "",
              "Per-run numbers: `benchmarks/runs/pruned_kd/*/pruned_kd.json` and each run's `summary.json`.", ""]
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
