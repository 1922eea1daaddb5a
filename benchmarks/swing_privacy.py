"""Swing distillation privacy/accuracy trade-off: canaries planted in the teacher's training data.

    python benchmarks/swing_privacy.py            # 3 seeds, 2,000 images, 20 canaries x 4 copies (~15-20 min on 2 CPU cores)
    python benchmarks/swing_privacy.py --quick    # 1 seed, 600 images, 6 canaries, short training (~1 min; smoke run)

Setting (the threat model of Li et al. 2022, Swing Distillation): a teacher is trained on private
data; a student is distilled on the same images *without their labels* (distillation term only,
alpha = 1), so whatever the student learns about a private label it learns through the soft
targets. Privacy is measured with canaries (Carlini et al. 2019, "The Secret Sharer"): a few
training images get a unique random pattern in their top-left corner and a random wrong label.

* teacher: CNN w32 trained (CE) on the canaried set until it memorises the canaries;
* students: CNN w16 distilled from it with plain KD (T = 4) and with swing at several noise scales
  and maximal temperatures;
* canary hit rate: fraction of canaries whose planted label is the student's top-1 prediction
  (a model that never saw the planted labels predicts the garment, i.e. ~0);
* exposure: log2(C - 1) - log2(rank of the planted label among the C - 1 wrong labels), averaged
  over canaries (Carlini et al.'s rank exposure with the C - 1 possible planted labels as the
  randomness space; log2(9) = 3.17 is full memorisation, ~1.12 the mean of a random rank);
* test accuracy on the official 10k test set (no canaries there; --quick: a random 2,000 of it).

Writes benchmarks/results/swing_privacy.md; every number in it comes from this script.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import math
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from distillery.config import config_from_dict
from distillery.data import DataBundle, Split, load_data
from distillery.engine import fit
from distillery.models import forward_logits

HERE = Path(__file__).resolve().parent
PATCH = 5  # side of the corner pattern, pixels


def plant_canaries(bundle: DataBundle, k: int, repeats: int, seed: int) -> tuple[DataBundle, torch.Tensor, torch.Tensor]:
    """Give k random training images a unique random binary corner pattern and a random wrong
    label, and add ``repeats - 1`` more copies of each (the Secret Sharer's insertion frequency).
    Returns the new bundle, the canaries' row indices and their planted labels."""
    g = torch.Generator().manual_seed(seed)
    x, y = bundle.train.inputs.clone(), bundle.train.labels.clone()
    rows = torch.randperm(len(y), generator=g)[:k]
    mean, std = bundle.mean or [0.0], bundle.std or [1.0]
    lo = torch.tensor([(0.0 - m) / s for m, s in zip(mean, std)]).view(-1, 1, 1)
    hi = torch.tensor([(1.0 - m) / s for m, s in zip(mean, std)]).view(-1, 1, 1)
    c = bundle.num_classes
    for r in rows.tolist():
        bits = torch.randint(0, 2, (1, PATCH, PATCH), generator=g).bool()
        x[r, :, :PATCH, :PATCH] = torch.where(bits, hi, lo)
        y[r] = (y[r] + torch.randint(1, c, (1,), generator=g)) % c  # any label but the true one
    copies = rows.repeat(repeats - 1)
    index = bundle.train.index
    train = Split(torch.cat([x, x[copies]]), torch.cat([y, y[copies]]),
                  None if index is None else torch.cat([index, index[copies]]))
    digest = hashlib.sha256(f"{bundle.fingerprint}:canaries:{k}x{repeats}:{seed}".encode()).hexdigest()
    return dataclasses.replace(bundle, train=train, fingerprint=digest), rows, y[rows]


@torch.no_grad()
def canary_scores(model: torch.nn.Module, x: torch.Tensor, planted: torch.Tensor, true: torch.Tensor) -> dict[str, float]:
    """Hit rate, mean exposure and mean probability of the planted labels."""
    model.eval()
    logits = forward_logits(model, x).float()
    c = logits.shape[-1]
    wrong = logits.scatter(-1, true.unsqueeze(-1), float("-inf"))  # rank among the C-1 candidate labels
    rank = (wrong > wrong.gather(-1, planted.unsqueeze(-1))).sum(-1) + 1
    exposure = math.log2(c - 1) - torch.log2(rank.double())
    return {"hit": (logits.argmax(-1) == planted).double().mean().item(),
            "exposure": exposure.mean().item(),
            "p_planted": logits.softmax(-1).gather(-1, planted.unsqueeze(-1)).mean().item()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="1 seed, 600 images, 6 canaries, short training, 2,000 test images")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--subset", type=int, default=2000)
    ap.add_argument("--canaries", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=4, help="copies of each canary in the training set")
    ap.add_argument("--teacher-epochs", type=int, default=30)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.02, 0.05, 0.1], help="swing noise scales b")
    ap.add_argument("--t-max", type=float, nargs="+", default=[8.0, 16.0], help="swing t_max values (t_min = 4)")
    ap.add_argument("--runs", type=Path, default=HERE / "runs" / "swing_privacy")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "swing_privacy.md")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads")
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.teacher_epochs, args.epochs = 1, 15, 8
        args.subset, args.canaries = 600, 6
        args.noise, args.t_max = [0.0, 0.05], [8.0]
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    data = {"name": "fashion_mnist", "batch_size": 64, "train_subset": args.subset}
    train = {"optimizer": {"name": "adam", "lr": 1e-3}, "eval_every": 1000, "progress": False, "report": False}
    clean = load_data(config_from_dict({"name": "probe", "data": data, "student": {"arch": "cnn"}}).data)
    if args.quick:  # evaluation would otherwise cost more than the tiny trainings
        keep = torch.randperm(len(clean.test), generator=torch.Generator().manual_seed(0))[:2000]
        clean = dataclasses.replace(clean, val=clean.val.take(torch.arange(500)), test=clean.test.take(keep))
    bundle, rows, planted = plant_canaries(clean, args.canaries, args.repeats, seed=0)
    true = clean.train.labels[rows]
    canary_x = bundle.train.inputs[rows]

    def run(raw: dict, rebuild_cache: bool = False):
        cfg = config_from_dict({**raw, "data": data, "output_dir": str(args.runs)})
        return fit(cfg, data=bundle, overwrite=True, rebuild_cache=rebuild_cache)

    print(f"[{time.perf_counter() - t0:5.0f}s] teacher", flush=True)
    teacher = run({"name": "teacher", "student": {"arch": "cnn", "kwargs": {"width": 32}}, "method": {"name": "ce"},
                   "train": {**train, "epochs": args.teacher_epochs}})
    t_scores = canary_scores(teacher.student, canary_x, planted, true)

    variants = [("kd", "kd", "kd (T=4)", {"temperature": 4.0, "alpha": 1.0})]
    variants += [("swing", f"swing-t{t:g}-b{b:g}", f"swing t_max={t:g}, b={b:g}",
                  {"t_min": 4.0, "t_max": t, "noise_scale": b, "alpha": 1.0}) for t in args.t_max for b in args.noise]
    results: dict[str, list[dict]] = {}
    for method, run_name, label, params in variants:
        for seed in range(args.seeds):
            print(f"[{time.perf_counter() - t0:5.0f}s] {label} seed {seed}", flush=True)
            # the teacher's outputs are computed once and read from a cache by every student
            res = run({"name": f"{run_name}-s{seed}",
                       "teacher": {"run": str(teacher.run_dir), "cache": {"dir": str(args.runs / "teacher-cache"), "dtype": "float32"}},
                       "student": {"arch": "cnn", "kwargs": {"width": 16}}, "method": {"name": method, "params": params},
                       "train": {**train, "epochs": args.epochs, "seed": seed}},
                      rebuild_cache=not results)  # the first student rebuilds the cache (the teacher is new)
            results.setdefault(label, []).append({"acc": res.summary["test_accuracy"],
                                                  **canary_scores(res.student, canary_x, planted, true)})

    def ms(vals: list[float], scale: float = 1.0, digits: int = 2) -> str:
        m = statistics.mean(vals) * scale
        return f"{m:.{digits}f} ± {statistics.stdev(vals) * scale:.{digits}f}" if len(vals) > 1 else f"{m:.{digits}f}"

    chance = math.log2(bundle.num_classes - 1) - statistics.mean(math.log2(r) for r in range(1, bundle.num_classes))
    cmd = " ".join(["python", "benchmarks/swing_privacy.py", *sys.argv[1:]])
    lines = [
        "# Swing distillation: canary exposure vs accuracy",
        "",
        f"- Command: `{cmd}`",
        f"- Date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; total wall time {(time.perf_counter() - t0) / 60:.1f} min",
        f"- Machine: {platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()}, Python {platform.python_version()}, "
        f"torch {torch.__version__}, {'GPU ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}",
        f"- Data: Fashion-MNIST, {args.subset:,} training images (stratified subset); {args.canaries} of them are canaries: "
        f"a unique random {PATCH}x{PATCH} binary pattern in the top-left corner and a random wrong label, each inserted "
        f"{args.repeats} times.",
        f"- Test set: {len(clean.test):,} official Fashion-MNIST test images"
        + (" (a random subset, --quick)." if args.quick else "."),
        f"- Teacher: CNN w32, CE on the canaried set, {args.teacher_epochs} epochs (Adam 1e-3); test accuracy "
        f"{100 * teacher.summary['test_accuracy']:.2f}%, canary hit rate {100 * t_scores['hit']:.0f}%, "
        f"exposure {t_scores['exposure']:.2f} (it memorised the canaries if these are high).",
        f"- Students: CNN w16 on the same images without labels (alpha = 1: distillation term only, so the private labels "
        f"reach the student only through the soft targets), {args.epochs} epochs, batch 64, Adam 1e-3, {args.seeds} seed(s). "
        "swing: t_min = 4, per-sample temperature up to t_max for samples whose teacher/student gap stands out in the batch, "
        "Laplace noise of scale b on the tempered soft targets (see `distillery.losses.swing`).",
        f"- Canary hit rate: planted label = student's top-1. Exposure: log2(9) - log2(rank of the planted label among the "
        f"9 wrong labels); max {math.log2(bundle.num_classes - 1):.2f}, a random rank gives {chance:.2f} on average.",
        "",
        "| student | test accuracy (%) | canary hit rate (%) | exposure | p(planted label) |",
        "|---|---|---|---|---|",
    ]
    for label, rs in results.items():
        lines.append(f"| {label} | {ms([r['acc'] for r in rs], 100)} | {ms([r['hit'] for r in rs], 100, 0)} | "
                     f"{ms([r['exposure'] for r in rs])} | {ms([r['p_planted'] for r in rs], 1, 3)} |")
    lines += ["", "Lower hit rate / exposure = less of the teacher's private labels leaked into the student. "
              "With few canaries per run, a hit rate moves in steps of "
              f"{100 / args.canaries:.0f} points; differences within the seed std are noise.", ""]
    if args.quick:
        lines.insert(2, "_Quick smoke run (1 seed, short training): the full run is `python benchmarks/swing_privacy.py`._\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
