"""Fashion-MNIST classification benchmark: every registered method, two teacher->student pairs.

    python benchmarks/fmnist_classification.py            # full budget (~20-30 min on 2 CPU cores)
    python benchmarks/fmnist_classification.py --quick    # 1 seed, 5 epochs (smoke run)

Writes benchmarks/results/fmnist_classification.md.  Regime: the teacher (CNN width 32) is
trained on all 60k images; students see 1,000 labelled images (stratified), which is where
distillation measurably helps at this scale (see shared/MEASURED.md).  Every number in the
table is produced by this script; rerun it rather than editing the file.
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

from distillery.config import config_from_dict, dump_config
from distillery.engine import fit
from distillery.methods import available

HERE = Path(__file__).resolve().parent
PAIRS = {  # name -> (student spec, family note)
    "CNN w32 -> CNN w16 (same family)": {"arch": "cnn", "kwargs": {"width": 16}},
    "CNN w32 -> MLP 784-128-10 (cross family)": {"arch": "mlp", "kwargs": {"hidden": [128]}},
}
# Per-method parameters for this benchmark (the registry defaults otherwise).
PARAMS = {
    "kd": {"temperature": 4.0, "alpha": 0.9},
    "dkd": {"warmup_epochs": 5},
    "fitnets": {"feature_weight": 100.0},
    "at": {"n_pairs": 2},
}


def _run(raw: dict, runs: Path) -> dict:
    import json

    cfg = config_from_dict({**raw, "output_dir": str(runs)})
    done = cfg.run_dir / "summary.json"
    if done.is_file() and (cfg.run_dir / "config.yaml").read_text() == dump_config(cfg):
        return json.loads(done.read_text())  # resume an interrupted benchmark without redoing runs
    return fit(cfg, overwrite=True).summary


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="1 seed, 5 student epochs")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--subset", type=int, default=1000)
    ap.add_argument("--runs", type=Path, default=HERE / "runs" / "fmnist")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "fmnist_classification.md")
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.epochs = 1, 5
    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()

    data = {"name": "fashion_mnist", "batch_size": 64, "train_subset": args.subset}
    train = {"epochs": args.epochs, "optimizer": {"name": "adam", "lr": 1e-3}, "eval_every": 5, "progress": False, "report": False}
    teacher = _run({"name": "teacher", "data": {"name": "fashion_mnist", "batch_size": 128},
                    "student": {"arch": "cnn", "kwargs": {"width": 32}},
                    "train": {"epochs": 3, "progress": False, "scheduler": {"name": "cosine"}}}, args.runs)
    teacher_dir = str(args.runs / "teacher")

    methods = available()
    results: dict[tuple[str, str], list[dict]] = {}
    for pair, student in PAIRS.items():
        for name, spec in methods.items():
            if name.endswith("_for_test"):
                continue
            if name == "at" and student["arch"] == "mlp":
                continue  # attention maps need a spatial student feature
            for seed in range(args.seeds):
                raw = {"name": f"{student['arch']}-{name}-s{seed}", "data": data, "student": student,
                       "method": {"name": name, "params": PARAMS.get(name, {})}, "train": {**train, "seed": seed}}
                if spec.needs_teacher:
                    raw["teacher"] = {"run": teacher_dir}
                print(f"[{time.perf_counter() - t0:6.0f}s] {pair}: {name} seed {seed}", flush=True)
                results.setdefault((pair, name), []).append(_run(raw, args.runs))

    def ms(vals):
        return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)

    lines = [
        "# Fashion-MNIST classification benchmark",
        "",
        f"- Command: `python benchmarks/fmnist_classification.py{' --quick' if args.quick else ''}`",
        f"- Date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; total wall time {(time.perf_counter() - t0) / 60:.1f} min",
        f"- Machine: {platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()}, Python {platform.python_version()}, torch {torch.__version__}, no GPU",
        f"- Teacher: CNN width 32 ({teacher['params']:,} params), 3 epochs (Adam 1e-3, cosine) on all 60k training images (minus the 10% validation split), "
        f"test accuracy **{100 * teacher['test_accuracy']:.2f}%**.",
        f"- Students: {args.subset:,} labelled training images (stratified subset), {args.epochs} epochs, batch 64, Adam lr 1e-3, "
        f"constant LR, no augmentation, {args.seeds} seed(s); teacher run online (not cached). Test = the official 10k test set.",
        "- Method parameters: registry defaults except " + ", ".join(f"{k}: {v}" for k, v in PARAMS.items()) + ".",
        "- Epoch time = wall time of one training epoch of the student (teacher forward included).",
        "",
        "| pair | method | test accuracy (%) mean ± std | Δ vs scratch | epoch time (s) | params |",
        "|---|---|---|---|---|---|",
    ]
    for pair in PAIRS:
        base = ms([r["test_accuracy"] for r in results[(pair, "ce")]])[0]
        for name in methods:
            runs = results.get((pair, name))
            if not runs:
                continue
            m, s = ms([r["test_accuracy"] for r in runs])
            epoch_t = statistics.mean(r["train_seconds"] / r["epochs"] for r in runs)
            label = "ce (from scratch)" if name == "ce" else name
            delta = "—" if name == "ce" else f"{100 * (m - base):+.2f}"
            lines.append(f"| {pair} | {label} | {100 * m:.2f} ± {100 * s:.2f} | {delta} | {epoch_t:.2f} | {runs[0]['params']:,} |")
    lines += ["", "Rows with a negative Δ are methods that did not beat training from scratch in this regime and budget; "
              "they are reported as measured, not tuned away.", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
