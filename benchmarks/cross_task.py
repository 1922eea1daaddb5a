"""Cross-task distillation on Fashion-MNIST: the teacher knows one half of the classes, the student
learns the other half.

    python benchmarks/cross_task.py            # 3 seeds, 20 epochs (~20 min on 2 shared CPU cores)
    python benchmarks/cross_task.py --quick    # 1 seed, 3 epochs (smoke run)

Writes benchmarks/results/cross_task.md.  Regime:

* teacher: CNN width 32, cross-entropy on classes 0-4 (T-shirt/top, Trouser, Pullover, Dress,
  Coat) -- all their training images, 3 epochs;
* students: classes 5-9 (Sandal, Shirt, Sneaker, Bag, Ankle boot), relabelled 0..4, from 1,000
  labelled images (stratified), 20 epochs, Adam 1e-3, batch 64;
* rows: ``ce`` (no teacher), ``fitnets`` (feature hints on the deepest stage: needs no shared
  label space; the engine runs it because both label sets have 5 classes, and its KD-on-logits
  term is off by default) and ``prototype_kd`` (ProC-KD, Li et al. 2022).  Logit methods (kd, dkd,
  ...) are left out: the teacher's logits name classes the student does not have.

Every number in the table is produced by this script; rerun it rather than editing the file.
Finished runs whose config is unchanged are reused.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from distillery.config import config_from_dict
from distillery.engine import fit
from distillery.engine.checkpoint import finished_summary
from distillery.methods import get_spec

HERE = Path(__file__).resolve().parent
TEACHER_CLASSES, STUDENT_CLASSES = [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]
PAIRS = {
    "CNN w32 -> CNN w16 (same family)": {"arch": "cnn", "kwargs": {"width": 16}},
    "CNN w32 -> ViT tiny d32x2 (cross family)": {"arch": "vit_tiny", "kwargs": {"dim": 32, "depth": 2, "heads": 2, "patch_size": 4}},
}
# The MLP student of fmnist_classification.py is not a pair here: it has no local features for
# prototype_kd to work on (the method refuses it).
METHODS = {"ce": {}, "fitnets": {"feature_weight": 100.0}, "prototype_kd": {}}


def _run(raw: dict, runs: Path) -> dict:
    cfg = config_from_dict({**raw, "output_dir": str(runs)})
    # A finished run of the same config is reused: an interrupted benchmark resumes where it stopped.
    return finished_summary(cfg) or fit(cfg, overwrite=True).summary


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="1 seed, 3 student epochs")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--subset", type=int, default=1000, help="labelled training images of the student's classes")
    ap.add_argument("--runs", type=Path, default=HERE / "runs" / "cross_task")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "cross_task.md")
    ap.add_argument("--pairs", nargs="*", default=["same", "cross"], choices=["same", "cross"],
                    help="which pairs to run (e.g. one per process on a machine with spare cores; a final run with "
                         "both reuses every finished run and writes the whole table)")
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.epochs = 1, 3
        args.runs = args.runs.with_name(args.runs.name + "-quick")
    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()

    teacher = _run({"name": "teacher-half-a",
                    "data": {"name": "fashion_mnist", "batch_size": 128, "classes": TEACHER_CLASSES},
                    "student": {"arch": "cnn", "kwargs": {"width": 32}},
                    "train": {"epochs": 3, "progress": False, "report": False, "scheduler": {"name": "cosine"}}}, args.runs)
    teacher_dir = str(args.runs / "teacher-half-a")
    data = {"name": "fashion_mnist", "batch_size": 64, "train_subset": args.subset, "classes": STUDENT_CLASSES}
    train = {"epochs": args.epochs, "optimizer": {"name": "adam", "lr": 1e-3}, "eval_every": 5, "progress": False, "report": False}

    pairs = {k: v for k, v in PAIRS.items() if ("same" if "same family" in k else "cross") in args.pairs}
    results: dict[tuple[str, str], list[dict]] = {}
    # Seed outermost: an interrupted benchmark leaves whole seeds finished, reusable with --seeds.
    for seed in range(args.seeds):
        for pair, student in pairs.items():
            for name, params in METHODS.items():
                raw = {"name": f"{student['arch']}-{name}-s{seed}", "data": data, "student": student,
                       "method": {"name": name, "params": params}, "train": {**train, "seed": seed}}
                if get_spec(name).needs_teacher:
                    raw["teacher"] = {"run": teacher_dir}
                print(f"[{time.perf_counter() - t0:6.0f}s] {pair}: {name} seed {seed}", flush=True)
                results.setdefault((pair, name), []).append(_run(raw, args.runs))

    def ms(vals):
        return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)

    total_train = teacher["train_seconds"] + sum(r["train_seconds"] for rs in results.values() for r in rs)
    cmd = " ".join(["python", "benchmarks/cross_task.py", *sys.argv[1:]])
    pkd = get_spec("prototype_kd").params().model_dump()
    lines = [
        "# Cross-task distillation on Fashion-MNIST: teacher on classes 0-4, students on classes 5-9",
        "",
        f"- Command: `{cmd}`",
        f"- Date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; total wall time "
        f"{(time.perf_counter() - t0) / 60:.1f} min for this invocation (finished runs on disk are reused); training time "
        f"of all runs in the table, teacher included: {total_train / 60:.1f} min",
        f"- Machine: {platform.machine()}, {os.cpu_count()} CPU cores (shared with other jobs), {platform.system()}, "
        f"Python {platform.python_version()}, torch {torch.__version__}, no GPU",
        f"- Teacher: CNN width 32, 3 epochs cross-entropy on all training images of classes {TEACHER_CLASSES} "
        f"(T-shirt/top, Trouser, Pullover, Dress, Coat), Adam 1e-3, cosine; test accuracy on those classes "
        f"**{100 * teacher['test_accuracy']:.2f}%**. It never sees classes 5-9.",
        f"- Students: classes {STUDENT_CLASSES} (Sandal, Shirt, Sneaker, Bag, Ankle boot) relabelled 0..4, "
        f"{args.subset:,} labelled training images (stratified), {args.epochs} epochs, batch 64, Adam 1e-3, "
        f"{args.seeds} seed(s); test accuracy on the 5,000 official test images of those classes.",
        "- Methods: `ce` = no teacher; `fitnets` = MSE hints on the deepest stage, feature_weight 100 (no logit "
        "term); `prototype_kd` = ProC-KD (Li, Wu, Han & Tian 2022) with its defaults: "
        + ", ".join(f"{k} {v}" for k, v in pkd.items() if v is not None) + ". Logit KD methods are not run: the "
        "teacher's logits name other classes.",
        "",
        "| pair | method | test accuracy (%) mean ± std | Δ vs ce | epoch time (s) |",
        "|---|---|---|---|---|",
    ]
    for pair in pairs:
        base = ms([100 * r["test_accuracy"] for r in results[(pair, "ce")]])[0]
        for name in METHODS:
            runs = results[(pair, name)]
            m, s = ms([100 * r["test_accuracy"] for r in runs])
            epoch_t = statistics.mean(r["train_seconds"] / r["epochs"] for r in runs)
            delta = "" if name == "ce" else f"{m - base:+.2f}"
            lines.append(f"| {pair} | {name} | {m:.2f} ± {s:.2f} | {delta} | {epoch_t:.2f} |")
    lines += ["", "Mean ± std over seeds, as measured (not tuned per seed). Epoch time includes the teacher's "
              "forward pass and the shared machine's load.", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
