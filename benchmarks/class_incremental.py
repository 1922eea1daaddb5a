"""Class-incremental Fashion-MNIST: fine-tuning vs KD vs KD + weight aligning (Zhao et al., CVPR 2020).

    python benchmarks/class_incremental.py            # 3 seeds, 5 tasks x 2 classes
    python benchmarks/class_incremental.py --quick    # 1 seed, 2 epochs per task

The ten classes arrive as five tasks of two (in label order); after each task the student is
tested on every class seen so far; the figure of merit is the average incremental accuracy (mean
over the five tasks, task 0 included).  Every strategy starts each task from the previous model
(classifier grown by two rows) and keeps ``--memory`` random exemplars per old class.  Writes
benchmarks/results/class_incremental.md and .png.
"""
from __future__ import annotations

import argparse
import datetime as dt
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
STRATEGIES = ("finetune", "kd", "wa")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--memory", type=int, default=20)
    ap.add_argument("--subset", type=int, default=5000)
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.epochs = 1, 2
    torch.set_num_threads(1)
    from distillery.config import config_from_dict
    from distillery.data import load_data
    from distillery.recipes.class_incremental import run_incremental
    from distillery.report.metrics import machine_description

    runs = HERE / "runs" / ("class_incremental_quick" if args.quick else "class_incremental")
    t0 = time.time()
    results: dict[str, list[dict]] = {s: [] for s in STRATEGIES}
    data = None
    for seed in range(args.seeds):
        for strategy in STRATEGIES:
            cfg = config_from_dict({
                "name": f"{strategy}-s{seed}", "output_dir": str(runs),
                "data": {"name": "fashion_mnist", "batch_size": 64, "train_subset": args.subset},
                "student": {"arch": "cnn", "kwargs": {"width": 16}}, "method": {"name": "ce"},
                "train": {"epochs": args.epochs, "seed": seed, "optimizer": {"name": "adam", "lr": 1e-3},
                          "progress": False, "report": False}})
            data = data or load_data(cfg.data)
            print(f"seed {seed} {strategy}", flush=True)
            results[strategy].append(run_incremental(cfg, tasks=5, strategy=strategy, memory_per_class=args.memory,
                                                     data=data))
    minutes = (time.time() - t0) / 60

    def ms(values: list[float]) -> str:
        m = 100 * statistics.mean(values)
        return f"{m:.2f} ± {100 * statistics.stdev(values):.2f}" if len(values) > 1 else f"{m:.2f}"

    lines = ["# Class-incremental Fashion-MNIST: KD and weight aligning", "",
             f"- Command: `{' '.join(shlex.quote(a) for a in ['python'] + sys.argv)}`",
             f"- Date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; wall time {minutes:.1f} min "
             "(other jobs shared the 2 cores)",
             f"- Machine: {machine_description()}; torch {torch.__version__}",
             f"- Setup: 10 classes as 5 tasks of 2 in label order; student CNN w16; {args.subset} stratified training "
             f"images in all (≈{args.subset // 10} per class); {args.epochs} epochs per task (Adam 1e-3); memory "
             f"{args.memory} random exemplars per old class; {args.seeds} seed(s). Accuracy on the test images of "
             "every class seen so far.",
             "- Paper: Zhao et al. 2020, *Maintaining Discrimination and Fairness in Class Incremental Learning* "
             "(`wa` = KD on old-class logits with λ = C_old/C_total, T = 2, then weight aligning).", "",
             "| strategy | average incremental accuracy (%) | final accuracy, 10 classes (%) | old-class accuracy at the last task (%) |",
             "|---|---:|---:|---:|"]
    for s in STRATEGIES:
        rs = results[s]
        lines.append(f"| {s} | {ms([r['average_incremental_accuracy'] for r in rs])} | "
                     f"{ms([r['final_accuracy'] for r in rs])} | {ms([r['rows'][-1]['old_class_accuracy'] for r in rs])} |")
    lines += ["", "Accuracy on all seen classes after each task (mean over seeds):", "",
              "| strategy | " + " | ".join(f"task {t}" for t in range(5)) + " |", "|---|" + "---:|" * 5]
    for s in STRATEGIES:
        per = [statistics.mean(r["rows"][t]["test_accuracy"] for r in results[s]) for t in range(5)]
        lines.append(f"| {s} | " + " | ".join(f"{100 * v:.2f}" for v in per) + " |")
    gammas = [r["rows"][t]["gamma"] for r in results["wa"] for t in range(1, 5)]
    lines += ["", f"Weight-aligning factor γ over tasks 1-4 and seeds: {min(gammas):.3f} – {max(gammas):.3f} "
              "(γ < 1 means the new classes' classifier rows had the larger norms -- the bias toward new classes "
              "that WA removes; γ > 1 means they had the smaller norms, and aligning raises them).", "",
              "![accuracy per task](class_incremental.png)"]
    stem = "class_incremental"
    out = (runs if args.quick else HERE / "results") / f"{stem}.md"  # a smoke run never replaces the results
    out.write_text("\n".join(lines) + "\n")
    _plot(results, out.with_suffix(".png"))
    print(out)


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for s, rs in results.items():
        per = [100 * statistics.mean(r["rows"][t]["test_accuracy"] for r in rs) for t in range(5)]
        ax.plot([2 * (t + 1) for t in range(5)], per, marker="o", label=s)
    ax.set(xlabel="classes seen", ylabel="test accuracy on seen classes (%)", title="Class-incremental Fashion-MNIST")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
