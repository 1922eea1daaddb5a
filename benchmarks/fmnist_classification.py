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
import json
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
from distillery.methods import available

HERE = Path(__file__).resolve().parent
PAIRS = {  # name -> (student spec, family note)
    "CNN w32 -> CNN w16 (same family)": {"arch": "cnn", "kwargs": {"width": 16}},
    "CNN w32 -> MLP 784-128-10 (cross family)": {"arch": "mlp", "kwargs": {"hidden": [128]}},
    "CNN w32 -> ViT tiny (cross family)": {"arch": "vit_tiny", "kwargs": {"dim": 64, "depth": 4, "heads": 4, "patch_size": 4}},
}
# Pairs run for some methods only: the ViT student is for the token-based methods (and the
# baselines and heterogeneous-architecture methods they are compared with), not for every row.
ONLY = {"CNN w32 -> ViT tiny (cross family)": {"ce", "kd", "trg", "masked_kd"}}
# Methods that need a token or spatial student feature: not run with the MLP student.
NO_MLP = {"at", "trg"}
# Per-method parameters for this benchmark (the registry defaults otherwise).
PARAMS = {
    "kd": {"temperature": 4.0, "alpha": 0.9},
    "dkd": {"warmup_epochs": 5},
    "fitnets": {"feature_weight": 100.0},
    "at": {"n_pairs": 2},
}


# Methods whose setting is not "single-label student from this teacher": measured elsewhere.
ELSEWHERE = {
    "prototype_kd": "cross-task (teacher on classes 0-4, student on 5-9): benchmarks/results/cross_task.md",
    "hybrid_kd": "two teachers (CNN features + ViT relations): benchmarks/results/hybrid_kd.md",
    "mse": "regression only: benchmarks/results/regression_kd.md",
    "regression_kd": "regression only: benchmarks/results/regression_kd.md",
    "tough_tolerant": "regression only (two teachers): benchmarks/results/regression_kd.md",
    "m2mkd": "needs a ViT teacher (blocks.N modules) and a vit_moe student: benchmarks/results/m2mkd.md",
    "mlkd": "multi-label only: benchmarks/results/fmnist_multilabel.md",
    "crkd": "novel-class discovery (teacher on known classes): benchmarks/results/ncd_crkd.md",
    "kd3": "distils from an unlabelled, distribution-shifted web pool: benchmarks/results/kd3_web.md",
    "wa": "class-incremental (teacher on the old classes): benchmarks/results/class_incremental.md",
    "distill_nearest": "sources trained on other label sets: benchmarks/results/similar_tasks.md",
    "distill_weighted": "sources trained on other label sets: benchmarks/results/similar_tasks.md",
}


def _rounds(raw: dict, runs: Path) -> dict:
    """selfdistill: round 0 on labels, then one round distilled from it with the estimated alpha."""
    from distillery.recipes.self_distillation import run_rounds

    cfg = config_from_dict({**raw, "output_dir": str(runs)})
    result = run_rounds(cfg, 1, alpha="optimal")
    last = result.rows[-1]
    summary = json.loads((Path(result.dir) / last["run"] / "summary.json").read_text())
    summary["train_seconds"] = sum(json.loads(p.read_text())["train_seconds"] for p in Path(result.dir).glob("*/summary.json"))
    summary["alpha"] = last["alpha"]
    return summary


def _kind(pair: str) -> str:
    return "same" if "same family" in pair else "vit" if "ViT" in pair else "cross"


def _run(raw: dict, runs: Path) -> dict:
    cfg = config_from_dict({**raw, "output_dir": str(runs)})
    # A finished run of the same config is reused: an interrupted benchmark resumes where it stopped.
    return finished_summary(cfg) or fit(cfg, overwrite=True).summary


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="1 seed, 5 student epochs")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--subset", type=int, default=1000)
    ap.add_argument("--runs", type=Path, default=HERE / "runs" / "fmnist")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "fmnist_classification.md")
    ap.add_argument("--skip", nargs="*", default=[], help="registered methods to leave out of this run (named in the table)")
    ap.add_argument("--finished-only", nargs="*", default=[], choices=["same", "cross", "vit"],
                    help="for these pairs, report only runs already finished on disk (train nothing new)")
    ap.add_argument("--pairs", nargs="*", default=["same", "cross", "vit"], choices=["same", "cross", "vit"],
                    help="which teacher->student pairs to run (the table shows only these)")
    ap.add_argument("--seed-major", action="store_true",
                    help="run seed 0 of every method before seed 1 (a partial run then covers every row once)")
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
    unrun: set[str] = set()
    for pair, student in PAIRS.items():
        if _kind(pair) not in args.pairs:
            continue
        todo = [(name, spec, seed) for name, spec in methods.items() for seed in range(args.seeds)]
        if args.seed_major:
            todo.sort(key=lambda t: t[2])
        for name, spec, seed in todo:
            if name.endswith("_for_test") or name in ELSEWHERE or name in args.skip:
                continue
            if name in NO_MLP and student["arch"] == "mlp":
                continue  # attention maps / token graphs need a spatial or token student feature
            if pair in ONLY and name not in ONLY[pair]:
                continue
            raw = {"name": f"{student['arch']}-{name}-s{seed}", "data": data, "student": student,
                   "method": {"name": name, "params": PARAMS.get(name, {})}, "train": {**train, "seed": seed}}
            if spec.needs_teacher:
                raw["teacher"] = {"run": teacher_dir}
            if _kind(pair) in args.finished_only:
                cfg = config_from_dict({**raw, "output_dir": str(args.runs)})
                if not (cfg.run_dir / "summary.json").is_file():
                    unrun.add(f"{name} ({pair.split(' (')[0]})")
                    continue
            print(f"[{time.perf_counter() - t0:6.0f}s] {pair}: {name} seed {seed}", flush=True)
            if name == "selfdistill":  # round 0 on labels (ce), then rounds of selfdistill
                raw.pop("teacher", None)
                raw["method"] = {"name": "ce"}
                results.setdefault((pair, name), []).append(_rounds(raw, args.runs))
            else:
                results.setdefault((pair, name), []).append(_run(raw, args.runs))

    def ms(vals):
        return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)

    lines = [
        "# Fashion-MNIST classification benchmark",
        "",
        f"- Command: `python benchmarks/fmnist_classification.py{' --quick' if args.quick else ''}"
        f"{(' --skip ' + ' '.join(args.skip)) if args.skip else ''}"
        f"{(' --finished-only ' + ' '.join(args.finished_only)) if args.finished_only else ''}"
        f"{(' --pairs ' + ' '.join(args.pairs)) if args.pairs != ['same', 'cross', 'vit'] else ''}`",
        f"- Date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; total wall time {(time.perf_counter() - t0) / 60:.1f} min",
        f"- Machine: {platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()}, Python {platform.python_version()}, torch {torch.__version__}, no GPU",
        f"- Teacher: CNN width 32 ({teacher['params']:,} params), 3 epochs (Adam 1e-3, cosine) on all 60k training images (minus the 10% validation split), "
        f"test accuracy **{100 * teacher['test_accuracy']:.2f}%**.",
        f"- Students: {args.subset:,} labelled training images (stratified subset), {args.epochs} epochs, batch 64, Adam lr 1e-3, "
        f"constant LR, no augmentation, {args.seeds} seed(s); teacher run online (not cached). Test = the official 10k test set.",
        "- Method parameters: registry defaults except " + ", ".join(f"{k}: {v}" for k, v in PARAMS.items()) + ".",
        "- Epoch time = wall time of one training epoch of the student (teacher forward included), measured when the run "
        "trained: runs already on disk with the same config are reused, not retrained (hence a short total wall time), "
        "and runs trained while other jobs shared the CPU have inflated epoch times.",
        "- The ViT student (vit_tiny dim 64, depth 4, 4 heads, 4x4 patches) is run for the token-based methods and their "
        "comparisons only: " + ", ".join(sorted(ONLY["CNN w32 -> ViT tiny (cross family)"])) + ". "
        "Not run with the MLP student (need a spatial or token feature): " + ", ".join(sorted(NO_MLP)) + ".",
        "",
        "- Teacher-free methods (teacher column: no) never see the CNN w32 teacher. `selfdistill` = round 0 on labels, "
        "then one round distilled from round 0 with the estimated label weight alpha (its epoch time covers all three "
        "trainings: round 0, the alpha = 0 probe and round 1). `dml` trains a peer of the same architecture alongside.",
        "- Not in this table: " + "; ".join(f"`{k}` ({v})" for k, v in ELSEWHERE.items())
        + ("; not benchmarked in this run: " + ", ".join(f"`{m}`" for m in args.skip) if args.skip else "")
        + ("; not run yet (budget of this session): " + ", ".join(sorted(unrun)) if unrun else "") + ".",
        "",
        "| pair | method | teacher | test accuracy (%) mean ± std | Δ vs scratch | Δ vs kd | epoch time (s) | params |",
        "|---|---|---|---|---|---|---|---|",
    ]
    not_better = []
    for pair in PAIRS:
        if (pair, "ce") not in results:
            continue
        base = ms([r["test_accuracy"] for r in results[(pair, "ce")]])[0]
        kd_mean = ms([r["test_accuracy"] for r in results[(pair, "kd")]])[0] if (pair, "kd") in results else None
        for name, spec in methods.items():
            runs = results.get((pair, name))
            if not runs:
                continue
            m, s = ms([r["test_accuracy"] for r in runs])
            epoch_t = statistics.mean(r["train_seconds"] / r["epochs"] for r in runs)
            label = "ce (from scratch)" if name == "ce" else name
            delta = "—" if name == "ce" else f"{100 * (m - base):+.2f}"
            dkd = "—" if name in ("ce", "kd") or kd_mean is None else f"{100 * (m - kd_mean):+.2f}"
            if name not in ("ce", "kd") and kd_mean is not None and m <= kd_mean:
                not_better.append(f"{name} ({pair.split(' (')[0]})")
            lines.append(f"| {pair} | {label} | {'yes' if spec.needs_teacher else 'no'} | {100 * m:.2f} ± {100 * s:.2f}{f' (n={len(runs)} of {args.seeds})' if len(runs) < args.seeds else ''} | "
                         f"{delta} | {dkd} | {epoch_t:.2f} | {runs[0]['params']:,} |")
    lines += ["", "Rows with a negative Δ are methods that did not beat training from scratch (or plain KD) in this regime "
              "and budget; they are reported as measured, not tuned away. Differences smaller than the seed std are noise.",
              "", "Not better than plain KD here: " + (", ".join(not_better) or "none") + ".", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
