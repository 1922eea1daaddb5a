"""Regression distillation benchmark: no teacher, one teacher, two teachers (tough + tolerant).

    python benchmarks/regression_kd.py            # 3 seeds (~25 min on 2 heavily shared CPU cores)
    python benchmarks/regression_kd.py --quick    # 1 seed, few epochs (smoke run)

Writes benchmarks/results/regression_kd.md.  Two real regression targets:

* ``fmnist_landmarks`` -- the 6 ink landmarks (bounding box + centroid) of Fashion-MNIST garments
  drawn at a random scale and offset on a 40x40 canvas, the closest this machine gets to the
  paper's facial landmarks.  Teachers: CNN width 32 on an 8,000-image random subset of the training
  split (all 54k images take ~18 min per epoch per teacher on this shared CPU); students: MLP
  [128] on a 1,000-image random subset.
* ``diabetes`` -- scikit-learn's diabetes table.  Teachers: MLP [64, 64] on the whole training
  split; students: MLP [8] on a 100-row random subset.

Per dataset: the *tough* teacher is trained (method ``mse``) on the ground truth, the *tolerant*
one on ASM soft targets (``data.soft_targets``); students: ``mse`` (no teacher), ``regression_kd``
from each teacher, and ``tough_tolerant`` from both.  Every number in the table comes from this
script; rerun it rather than editing the file.
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
from distillery.data import load_data
from distillery.engine import fit

HERE = Path(__file__).resolve().parent
ADAM = {"name": "adam", "lr": 1e-3}

# name -> data, teachers' and students' settings
SETTINGS = {
    "fmnist_landmarks": {
        "data": {"name": "fmnist_landmarks", "batch_size": 64, "eval_batch_size": 1000},
        "soft": {"pca_components": 3, "clip": 3.0},
        "teacher": {"arch": "cnn", "kwargs": {"width": 32}},
        "teacher_train": {"epochs": 2, "optimizer": ADAM, "scheduler": {"name": "cosine"}},
        "teacher_batch": 128,
        "teacher_subset": 8000,
        "student": {"arch": "mlp", "kwargs": {"hidden": [128]}},
        "subset": 1000,
        "student_train": {"epochs": 20, "optimizer": ADAM, "eval_every": 5},
    },
    "diabetes": {
        "data": {"name": "diabetes", "batch_size": 16},
        "soft": {"pca_components": 1, "clip": 1.0},  # one target: the ASM "smoothing" is the clip at +-1 sd
        "teacher": {"arch": "mlp", "kwargs": {"hidden": [64, 64]}},
        "teacher_train": {"epochs": 60, "optimizer": {"name": "adam", "lr": 3e-3}, "scheduler": {"name": "cosine"}},
        "teacher_batch": 32,
        "teacher_subset": None,
        "student": {"arch": "mlp", "kwargs": {"hidden": [8]}},
        "subset": 100,
        "student_train": {"epochs": 100, "optimizer": {"name": "adam", "lr": 3e-3}},
    },
}
ROWS = [  # label, method, teacher(s)
    ("mse (no teacher)", "mse", None),
    ("regression_kd (tough teacher)", "regression_kd", "tough"),
    ("regression_kd (tolerant teacher)", "regression_kd", "tolerant"),
    ("tough_tolerant (both)", "tough_tolerant", "both"),
]
PARAMS = {"regression_kd": {"alpha": 0.5}, "tough_tolerant": {}}


def _fit(raw: dict, runs: Path, data, reuse: bool = False) -> dict:
    """Train (replacing an earlier run of the same name); ``reuse``: a finished run with the same
    config is read back instead (the teachers: delete the runs folder to retrain them)."""
    import json

    from distillery.config import dump_config, load_config

    cfg = config_from_dict({**raw, "output_dir": str(runs)})
    summary_path = cfg.run_dir / "summary.json"
    if reuse and summary_path.is_file() and dump_config(load_config(cfg.run_dir / "config.yaml")) == dump_config(cfg):
        return json.loads(summary_path.read_text())
    return fit(cfg, overwrite=True, data=data).summary


def _teachers(name: str, s: dict, runs: Path, quick: bool) -> dict:
    train = {**s["teacher_train"], "progress": False, "report": False, "seed": 0}
    if quick:
        train["epochs"] = 1 if name == "fmnist_landmarks" else 20
    data = {**s["data"], "batch_size": s["teacher_batch"], "train_subset": s["teacher_subset"]}
    hard = load_data(config_from_dict({"student": s["teacher"], "data": data}).data)
    soft_cfg = {**data, "soft_targets": s["soft"]}
    soft = load_data(config_from_dict({"student": s["teacher"], "data": soft_cfg}).data)
    # how far the soft targets are from the truth (standardised units -> RMSE in target units)
    gap = ((soft.train.labels - hard.train.labels) * hard.train.target_std).pow(2).mean(0).sqrt().mean()
    out = {"soft_gap_rmse": float(gap)}
    for role, d, bundle in (("tough", data, hard), ("tolerant", soft_cfg, soft)):
        raw = {"name": f"{name}-teacher-{role}", "data": d, "student": s["teacher"], "method": {"name": "mse"},
               "train": train}
        out[role] = _fit(raw, runs, bundle, reuse=True)
        out[f"{role}_dir"] = str(runs / raw["name"])
    return out


def _students(name: str, s: dict, teachers: dict, runs: Path, seeds: int, quick: bool) -> dict:
    data = {**s["data"], "train_subset": s["subset"]}
    bundle = load_data(config_from_dict({"student": s["student"], "data": data}).data)
    results = {}
    for label, method, which in ROWS:
        for seed in range(seeds):
            train = {**s["student_train"], "progress": False, "report": False, "seed": seed}
            if quick:
                train["epochs"] = 3 if name == "fmnist_landmarks" else 20
                train["eval_every"] = 1
            raw = {"name": f"{name}-{method}-{which or 'none'}-s{seed}", "data": data, "student": s["student"],
                   "method": {"name": method, "params": PARAMS.get(method, {})}, "train": train}
            # The teachers' outputs on the 1,000 training rows are cached once per run (float32:
            # bit-identical losses to running them online, at a fraction of the time).
            cache = {"dtype": "float32", "load": "ram"}
            if which == "both":
                raw["teacher"] = {"ensemble": [{"run": teachers["tolerant_dir"]}, {"run": teachers["tough_dir"]}],
                                  "combine": "mean_logits", "cache": cache}
            elif which is not None:
                raw["teacher"] = {"run": teachers[f"{which}_dir"], "cache": cache}
            t = time.perf_counter()
            summary = _fit(raw, runs, bundle)
            print(f"  {name} {label} seed {seed}: RMSE {summary['test_rmse']:.4f} R2 {summary['test_r2']:.4f} "
                  f"({time.perf_counter() - t:.0f}s)", flush=True)
            results.setdefault(label, []).append(summary)
    return results


def _ms(vals: list[float], digits: int) -> str:
    m = statistics.mean(vals)
    s = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 seed, few epochs: a smoke run")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--runs", type=Path, default=HERE / "runs" / "regression", help="where the runs are written")
    ap.add_argument("--only", choices=list(SETTINGS), nargs="*", default=list(SETTINGS))
    ap.add_argument("--out", type=Path, default=HERE / "results" / "regression_kd.md")
    args = ap.parse_args()
    seeds = 1 if args.quick else args.seeds
    if args.quick and args.runs == HERE / "runs" / "regression":
        args.runs = HERE / "runs" / "regression-quick"  # never mixed with the full runs
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    t0 = time.perf_counter()
    tables = {}
    for name in args.only:
        s = SETTINGS[name]
        print(f"[{time.perf_counter() - t0:5.0f}s] {name}: teachers", flush=True)
        teachers = _teachers(name, s, args.runs, args.quick)
        print(f"[{time.perf_counter() - t0:5.0f}s] {name}: students", flush=True)
        tables[name] = (teachers, _students(name, s, teachers, args.runs, seeds, args.quick))

    command = "python benchmarks/regression_kd.py" + (" --quick" if args.quick else "") + \
        ("" if args.seeds == 3 else f" --seeds {args.seeds}") + \
        ("" if args.only == list(SETTINGS) else " --only " + " ".join(args.only))
    lines = [
        "# Regression distillation benchmark (tough / tolerant teachers)",
        "",
        f"- Command: `{command}`",
        f"- Date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; total wall time "
        f"{(time.perf_counter() - t0) / 60:.1f} min",
        f"- Machine: {platform.platform()}, {os.cpu_count()} CPU cores (shared with other jobs), Python "
        f"{platform.python_version()}, torch {torch.__version__}, no GPU",
        f"- {seeds} student seed(s) (0..{seeds - 1}); teachers seed 0. Test metrics in the targets' own units; "
        "RMSE and R² averaged over targets with equal weight (scikit-learn's default). Mean ± sample std over seeds.",
        "- Targets are standardised with the full training split's mean/std (teachers and students share the scale); "
        "the tolerant teacher trains on ASM soft targets (projection on the top principal components of the training "
        "targets, shape parameters clipped), validated and tested on the ground truth.",
        "- Method parameters: regression_kd alpha 0.5; tough_tolerant the official code's defaults (main/tough/"
        "tolerant weights 1, alpha 0.9/-0.45 (tough), 0.8/-0.4 (tolerant), beta 0.15, slope 3).",
        "",
    ]
    for name, (teachers, results) in tables.items():
        s = SETTINGS[name]
        st = s["student_train"]
        lines += [
            f"## {name}",
            "",
            f"- Teachers: {s['teacher']['arch']} {s['teacher']['kwargs']}, {teachers['tough']['epochs']} epochs (Adam, "
            f"cosine) on {teachers['tough']['train_samples']:,} training rows"
            f"{' (random subset)' if s['teacher_subset'] else ' (the whole training split)'}. Tough: test RMSE {teachers['tough']['test_rmse']:.4f}, "
            f"R² {teachers['tough']['test_r2']:.4f}. Tolerant (soft targets {s['soft']}, RMSE of the soft targets to the "
            f"truth on the training split {teachers['soft_gap_rmse']:.4f}): test RMSE "
            f"{teachers['tolerant']['test_rmse']:.4f}, R² {teachers['tolerant']['test_r2']:.4f}.",
            f"- Students: {s['student']['arch']} {s['student']['kwargs']} on a {s['subset']:,}-row random training subset, "
            f"{results[ROWS[0][0]][0]['epochs']} epochs, batch {s['data']['batch_size']}, Adam lr "
            f"{st['optimizer']['lr']}, constant LR.",
            "",
            "| student method (teacher) | test RMSE | test R² | train s / run |",
            "|---|---:|---:|---:|",
        ]
        for label, _, _ in ROWS:
            rs = results[label]
            lines.append(f"| {label} | {_ms([r['test_rmse'] for r in rs], 4)} | {_ms([r['test_r2'] for r in rs], 4)} | "
                         f"{statistics.mean(r['train_seconds'] for r in rs):.0f} |")
        lines.append("")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
