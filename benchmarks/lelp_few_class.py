"""LELP on few-class tasks: a binary and a 3-class task cut from Fashion-MNIST, students trained
with ce (labels only), kd and lelp from a teacher trained on the same task.

    python benchmarks/lelp_few_class.py            # full budget (~15 min on 2 CPU cores)
    python benchmarks/lelp_few_class.py --quick    # 1 seed, 5 epochs (smoke run)

Writes benchmarks/results/lelp_few_class.md.  The tasks keep Fashion-MNIST's upper-body garments,
which the 10-class models confuse most (``data.classes``): binary T-shirt/top vs Shirt (ids 0, 6)
and 3-class T-shirt/top, Pullover, Shirt (ids 0, 2, 6).  Teachers: CNN width 32, 3 epochs on all
training rows of the task (configs/teacher_fmnist_3class.yaml, with the binary task's classes
for the binary teacher).  Students: 1,000 labelled training rows (stratified), the same budget for
every method.  Every number in the table comes from this script; rerun it rather than editing.
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
import yaml

from distillery.config import config_from_dict
from distillery.engine import fit
from distillery.engine.checkpoint import finished_summary

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TASKS = {  # name -> Fashion-MNIST class ids
    "binary: T-shirt/top vs Shirt": [0, 6],
    "3-class: T-shirt/top, Pullover, Shirt": [0, 2, 6],
}
STUDENTS = {"cnn16": {"arch": "cnn", "kwargs": {"width": 16}}, "mlp128": {"arch": "mlp", "kwargs": {"hidden": [128]}}}
METHODS = {  # name -> params: kd as in benchmarks/fmnist_classification.py, lelp at its registry defaults
    "ce": {},
    "kd": {"temperature": 4.0, "alpha": 0.9},
    "lelp": {},
}


def _run(raw: dict, runs: Path) -> dict:
    cfg = config_from_dict({**raw, "output_dir": str(runs)})
    # A finished run of the same config is reused: an interrupted benchmark resumes where it stopped.
    return finished_summary(cfg) or fit(cfg, overwrite=True).summary


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="1 seed, 5 student epochs")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--subset", type=int, default=1000)
    ap.add_argument("--students", nargs="+", default=list(STUDENTS), choices=list(STUDENTS))
    ap.add_argument("--runs", type=Path, default=HERE / "runs" / "lelp")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "lelp_few_class.md")
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.epochs = 1, 5
    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()

    teacher_raw = yaml.safe_load((ROOT / "configs" / "teacher_fmnist_3class.yaml").read_text())
    teacher_raw["train"] = {**teacher_raw["train"], "progress": False, "report": False}
    train = {"epochs": args.epochs, "optimizer": {"name": "adam", "lr": 1e-3}, "eval_every": args.epochs,
             "progress": False, "report": False}
    teachers, results = {}, {}
    for task, classes in TASKS.items():
        tname = f"teacher-{len(classes)}class"
        print(f"[{time.perf_counter() - t0:6.0f}s] {task}: teacher", flush=True)
        teachers[task] = _run({**teacher_raw, "name": tname, "data": {**teacher_raw["data"], "classes": classes}}, args.runs)
        data = {"name": "fashion_mnist", "batch_size": 64, "classes": classes, "train_subset": args.subset}
        for sname in args.students:
            for method, params in METHODS.items():
                for seed in range(args.seeds):
                    print(f"[{time.perf_counter() - t0:6.0f}s] {task}: {sname} {method} seed {seed}", flush=True)
                    raw = {"name": f"{len(classes)}class-{sname}-{method}-s{seed}", "data": data, "student": STUDENTS[sname],
                           "method": {"name": method, "params": params}, "train": {**train, "seed": seed}}
                    if method != "ce":
                        raw["teacher"] = {"run": str(args.runs / tname)}
                    results.setdefault((task, sname, method), []).append(_run(raw, args.runs))

    def ms(vals):
        return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)

    command = "python benchmarks/lelp_few_class.py" + (" --quick" if args.quick else "") + (
        f" --seeds {args.seeds} --epochs {args.epochs}" if not args.quick and (args.seeds, args.epochs) != (3, 15) else "")
    first = next(iter(results.values()))[0]
    # Finished runs are reused, so this invocation's wall time can be ~0: report the runs' own time too.
    run_minutes = sum(r["wall_seconds"] for r in [*teachers.values(), *(r for v in results.values() for r in v)]) / 60
    lines = [
        "# LELP on few-class Fashion-MNIST tasks",
        "",
        f"- Command: `{command}`",
        f"- Date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; wall time of this invocation "
        f"{(time.perf_counter() - t0) / 60:.1f} min, of the {sum(map(len, results.values())) + len(teachers)} runs in the "
        f"table {run_minutes:.1f} min (finished runs are reused)",
        f"- Machine: {platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()}, Python {platform.python_version()}, "
        f"torch {torch.__version__}, no GPU; load average {' / '.join(f'{x:.1f}' for x in os.getloadavg())} (1/5/15 min) when this file was written "
        "-- a load above the core count means a shared machine and inflated epoch times",
        "- Tasks (`data.classes`): " + "; ".join(f"{t} (ids {c})" for t, c in TASKS.items()) + ".",
        "- Teachers: CNN width 32, 3 epochs (Adam 1e-3, cosine) on all training rows of the task (minus the 10% validation "
        "split): " + "; ".join(f"{t.split(':')[0]} **{100 * teachers[t]['test_accuracy']:.2f}%** "
                               f"({teachers[t]['train_samples']:,} rows)" for t in TASKS) + " test accuracy.",
        f"- Students: {first['train_samples']:,} labelled training rows (stratified subset), {args.epochs} epochs, batch 64, "
        f"Adam lr 1e-3, constant LR, no augmentation, {args.seeds} seed(s); teacher run online. Test = the official test "
        "images of the task's classes.",
        "- Methods: ce = labels only; kd = Hinton KD, T 4, alpha 0.9; lelp = registry defaults (S = 4 subclasses per class, "
        "beta 1, T 4, alpha 0.9, null space + random rotation; the first epoch collects the teacher's embeddings and trains "
        "on plain KD, the subclass basis is frozen after it).",
        "- Epoch time = wall time of one student training epoch (teacher forward included).",
        "",
        "| task | student | method | test accuracy (%) mean ± std | Δ vs ce | Δ vs kd | epoch time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for task in TASKS:
        for sname in args.students:
            base = ms([r["test_accuracy"] for r in results[(task, sname, "ce")]])[0]
            kd_mean = ms([r["test_accuracy"] for r in results[(task, sname, "kd")]])[0]
            for method in METHODS:
                runs = results[(task, sname, method)]
                m, s = ms([r["test_accuracy"] for r in runs])
                epoch_t = statistics.mean(r["train_seconds"] / r["epochs"] for r in runs)
                d_ce = "—" if method == "ce" else f"{100 * (m - base):+.2f}"
                d_kd = "—" if method in ("ce", "kd") else f"{100 * (m - kd_mean):+.2f}"
                lines.append(f"| {task} | {sname} | {method} | {100 * m:.2f} ± {100 * s:.2f} | {d_ce} | {d_kd} | {epoch_t:.2f} |")
    lines += ["", "Differences smaller than the seed std are noise; negative Δ are reported as measured, not tuned away.", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
