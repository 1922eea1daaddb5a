"""Distilling from similar tasks (Borup, Phoo & Hariharan 2023) on Fashion-MNIST class splits.

    python benchmarks/similar_tasks.py            # full budget (2 seeds; ~10 min with 1 thread)
    python benchmarks/similar_tasks.py --quick    # 1 seed, 5 student epochs (smoke run)

Writes benchmarks/results/similar_tasks.md.  Three source models are trained (CE, all training
rows of their classes) on disjoint 2-class subsets of Fashion-MNIST -- tops (T-shirt/top, Dress),
shoes (Sandal, Sneaker), misc (Trouser, Bag); the ensemble path of the engine needs equal class
counts, so Ankle boot is left out.  The target task is the remaining upper-body garments
(Pullover, Coat, Shirt) with few labels (``train_subset``).  Students, same budget for every row:

- ce: labels only;
- distill_nearest: CE + cosine feature distillation from the source with the highest kNN task
  similarity (estimated once, on the first training batch, without fine-tuning any source);
- distill_weighted: the same from all three sources, weighted by softmax(similarity / T);
- feature KD, least similar source: the same loss from one source only -- the one that
  distill_weighted (same seed) scored lowest.

Every number in the table comes from this script; rerun it rather than editing.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from distillery.config import config_from_dict
from distillery.engine import fit
from distillery.engine.checkpoint import finished_summary

HERE = Path(__file__).resolve().parent
SOURCES = {"tops": [0, 3], "shoes": [5, 7], "misc": [1, 8]}  # name -> Fashion-MNIST class ids
TARGET = [2, 4, 6]  # Pullover, Coat, Shirt
STUDENT = {"arch": "cnn", "kwargs": {"width": 8}}
SOURCE_MODEL = {"arch": "cnn", "kwargs": {"width": 16}}


def _run(raw: dict, runs: Path) -> tuple[dict, Path]:
    cfg = config_from_dict({**raw, "output_dir": str(runs)})
    # A finished run of the same config is reused: an interrupted benchmark resumes where it stopped.
    return finished_summary(cfg) or fit(cfg, overwrite=True).summary, cfg.run_dir


def _logged(run_dir: Path) -> dict:
    """The method's logged values (similarities, weights) from the last metrics row."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {k[len("method_"):]: v for k, v in rows[-1].items() if k.startswith("method_")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="1 seed, 5 student epochs")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--subset", type=int, default=300, help="labelled target training rows (stratified)")
    ap.add_argument("--temperature", type=float, default=0.1)
    ap.add_argument("--estimate-batches", type=int, default=4,
                    help="first training batches the similarity is estimated on (4 x 64 = 256 of the 300 labels)")
    ap.add_argument("--runs", type=Path, default=HERE / "runs" / "similar_tasks")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "similar_tasks.md")
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.epochs = 1, 5
    torch.set_num_threads(1)  # the budget is stated for one thread (the machine is shared)
    t0 = time.perf_counter()

    quiet = {"progress": False, "report": False}
    sources = {}
    for name, classes in SOURCES.items():
        print(f"[{time.perf_counter() - t0:6.0f}s] source {name} {classes}", flush=True)
        sources[name] = _run({"name": f"source-{name}", "data": {"name": "fashion_mnist", "batch_size": 128, "classes": classes},
                              "student": SOURCE_MODEL, "method": {"name": "ce"},
                              "train": {"epochs": 2, "optimizer": {"name": "adam", "lr": 1e-3}, "seed": 0, **quiet}}, args.runs)
    names = list(SOURCES)
    ensemble = {"ensemble": [{"run": str(sources[n][1])} for n in names]}
    data = {"name": "fashion_mnist", "batch_size": 64, "classes": TARGET, "train_subset": args.subset}
    train = {"epochs": args.epochs, "optimizer": {"name": "adam", "lr": 1e-3}, "eval_every": args.epochs, **quiet}
    rows: dict[str, list[dict]] = {}
    picks: dict[str, list[dict]] = {}
    for seed in range(args.seeds):
        def student(label, method, params, teacher=None):
            print(f"[{time.perf_counter() - t0:6.0f}s] {label} seed {seed}", flush=True)
            raw = {"name": f"{label.replace(' ', '_').replace(',', '')}-s{seed}", "data": data, "student": STUDENT,
                   "method": {"name": method, "params": params}, "train": {**train, "seed": seed}}
            if teacher is not None:
                raw["teacher"] = teacher
            summary, run_dir = _run(raw, args.runs)
            rows.setdefault(label, []).append(summary)
            return run_dir

        student("ce", "ce", {})
        est = {"estimate_batches": args.estimate_batches}
        nearest = student("distill_nearest", "distill_nearest", {"num_sources": 3, **est}, ensemble)
        weighted = student("distill_weighted", "distill_weighted",
                           {"num_sources": 3, "temperature": args.temperature, **est}, ensemble)
        logged = _logged(weighted)
        sims = [logged[f"similarity_{i}"] for i in range(len(names))]
        least = names[min(range(len(names)), key=sims.__getitem__)]
        picks.setdefault("weighted", []).append(logged)
        picks.setdefault("nearest", []).append(_logged(nearest))
        picks.setdefault("least", []).append({"source": least})
        student("feature KD, least similar source", "distill_weighted", {"num_sources": 1, **est},
                {"run": str(sources[least][1])})

    def ms(vals):
        return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)

    command = "python benchmarks/similar_tasks.py" + (" --quick" if args.quick else "") + (
        f" --seeds {args.seeds} --epochs {args.epochs} --subset {args.subset} --temperature {args.temperature}"
        f" --estimate-batches {args.estimate_batches}"
        if not args.quick and (args.seeds, args.epochs, args.subset, args.temperature, args.estimate_batches)
        != (2, 30, 300, 0.1, 4) else "")
    run_minutes = sum(r["wall_seconds"] for r in [*(s for s, _ in sources.values()), *(r for v in rows.values() for r in v)]) / 60
    first = rows["ce"][0]
    base = ms([r["test_accuracy"] for r in rows["ce"]])[0]
    lines = [
        "# Distilling from similar tasks: DistillNearest / DistillWeighted on Fashion-MNIST class splits",
        "",
        f"- Command: `{command}`",
        f"- Date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; wall time of this invocation "
        f"{(time.perf_counter() - t0) / 60:.1f} min, of the runs in the table {run_minutes:.1f} min (finished runs are reused)",
        f"- Machine: {platform.machine()}, {os.cpu_count()} CPU cores (torch.set_num_threads(1)), {platform.system()}, "
        f"Python {platform.python_version()}, torch {torch.__version__}, no GPU; load average "
        f"{' / '.join(f'{x:.1f}' for x in os.getloadavg())} (1/5/15 min) when this file was written",
        "- Sources (CNN width 16, 2 epochs, Adam 1e-3, all training rows of their classes): "
        + "; ".join(f"{n} (ids {SOURCES[n]}) {100 * sources[n][0]['test_accuracy']:.2f}% on its own test images"
                    for n in names) + ".",
        f"- Target: Pullover, Coat, Shirt (ids {TARGET}); {first['train_samples']:,} labelled training rows (stratified), "
        f"student CNN width 8, {args.epochs} epochs, batch 64, Adam lr 1e-3, no augmentation, {args.seeds} seed(s); "
        "test = the official test images of the target classes.",
        f"- Distillation: cosine feature distance between the projected student embedding and each source's embedding "
        f"(`head:input`), weight 1, plus CE; similarity = leave-one-out 5-NN accuracy of the target labels in each source's "
        f"embedding on the first {args.estimate_batches} training batch(es) ({64 * args.estimate_batches} labelled rows; "
        f"CE alone during them, for every distilling row); distill_weighted T = {args.temperature}.",
        "",
        "| method | test accuracy (%) mean ± std | Δ vs ce |",
        "|---|---|---|",
    ]
    for label, runs in rows.items():
        m, s = ms([r["test_accuracy"] for r in runs])
        lines.append(f"| {label} | {100 * m:.2f} ± {100 * s:.2f} | {'—' if label == 'ce' else f'{100 * (m - base):+.2f}'} |")
    lines += ["", "Task similarity and weights per seed (estimated on each seed's first training batches; chance = 1/3):", "",
              "| seed | " + " | ".join(f"sim {n}" for n in names) + " | " + " | ".join(f"weight {n}" for n in names)
              + " | nearest picks | least similar |",
              "|---" * (2 * len(names) + 3) + "|"]
    for seed, (w, nr, le) in enumerate(zip(picks["weighted"], picks["nearest"], picks["least"])):
        nearest_pick = names[max(range(len(names)), key=lambda i: nr[f"weight_{i}"])]
        lines.append(f"| {seed} | " + " | ".join(f"{w[f'similarity_{i}']:.3f}" for i in range(len(names))) + " | "
                     + " | ".join(f"{w[f'weight_{i}']:.3f}" for i in range(len(names))) + f" | {nearest_pick} | {le['source']} |")
    lines += ["", "Differences smaller than the seed std are noise; negative Δ are reported as measured, not tuned away.", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
