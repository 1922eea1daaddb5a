"""Hybrid distillation (hybrid_kd, Shi et al. 2023) and masked-input distillation (masked_kd, DMAE,
Bai et al. 2023) on Fashion-MNIST with 1,000 labels.

    python benchmarks/hybrid_kd.py              # 3 seeds, 20 epochs
    python benchmarks/hybrid_kd.py --quick      # 1 seed, 3 epochs (smoke run)

Writes benchmarks/results/hybrid_kd.md.  Teachers (both supervised, CE-trained -- neither MAE- nor
contrastive-pretrained, unlike the papers'):

- CNN width 32, benchmarks/runs/fmnist/teacher (all training rows);
- vit_tiny dim 64, depth 4, patch 4, heads 4, ``--teacher-epochs`` (3) epochs on all training rows
  (configs/teacher_fmnist_vit_small.yaml; trained here once, kept in benchmarks/runs/hybrid/teacher-vit).

Students: vit_tiny (dim 64, depth 4, patch 4) and CNN width 16, on a stratified 1,000-row subset,
20 epochs, Adam 1e-3, batch 64.  Rows:

- ce: labels only;
- kd: Hinton KD from the ViT teacher (T = 4, alpha = 0.9);
- masked_kd: DMAE from the ViT teacher -- 75% of patches hidden, the teacher run on the visible
  tokens up to blocks.2, student features on those patches projected onto it, MAE decoder, CE on the
  unmasked batch;
- hybrid_kd: teacher [CNN (features), ViT (token relations at blocks 2, 3)], progressive masking
  of the least [CLS]-attended tokens (keep 75% then 50%), CE on the unmasked batch.

Every number in the table comes from this script; rerun it rather than editing.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import torch
import yaml

from distillery.config import config_from_dict, dump_config, load_config
from distillery.engine import fit

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CNN_TEACHER = HERE / "runs" / "fmnist" / "teacher"
VIT_TEACHER_CONFIG = ROOT / "configs" / "teacher_fmnist_vit_small.yaml"
VIT = {"arch": "vit_tiny", "kwargs": {"patch_size": 4, "dim": 64, "depth": 4, "heads": 4}}
STUDENTS = {"vit_tiny d64x4": VIT, "CNN w16": {"arch": "cnn", "kwargs": {"width": 16}}}


def _methods(vit_teacher: str) -> dict[str, tuple[object, dict]]:
    """Row name -> (teacher entry, method entry)."""
    return {
        "ce": (None, {"name": "ce"}),
        "kd (ViT teacher)": ({"run": vit_teacher}, {"name": "kd", "params": {"temperature": 4.0, "alpha": 0.9}}),
        "masked_kd (ViT teacher)": ({"run": vit_teacher}, {"name": "masked_kd"}),
        "hybrid_kd (CNN features + ViT relations)": (
            [{"run": str(CNN_TEACHER)}, {"run": vit_teacher}],
            {"name": "hybrid_kd", "params": {"relation_blocks": [2, 3], "teacher_heads": 4}}),
    }


def _run(raw: dict) -> dict:
    torch.set_num_threads(1)  # one thread per run: the CPU is shared
    cfg = config_from_dict(raw)
    done = cfg.run_dir / "summary.json"
    # A finished run with the same config is reused: an interrupted benchmark resumes where it stopped.
    if not (done.is_file() and dump_config(load_config(cfg.run_dir / "config.yaml")) == dump_config(cfg)):
        fit(cfg, overwrite=True)
    summary = json.loads(done.read_text())
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    summary["epoch_seconds"] = statistics.mean(r["epoch_seconds"] for r in rows)
    summary["logged"] = {k[len("method_"):]: v for k, v in rows[-1].items() if k.startswith("method_")}
    return summary


def _vit_teacher(runs: Path, epochs: int) -> tuple[str, dict]:
    raw = yaml.safe_load(VIT_TEACHER_CONFIG.read_text())
    train = {**raw["train"], "epochs": epochs, "progress": False, "report": False}
    cfg = config_from_dict({**raw, "output_dir": str(runs), "train": train})
    if not (cfg.run_dir / "model.safetensors").is_file():
        print(f"training the ViT teacher into {cfg.run_dir} ({epochs} epochs)", flush=True)
        torch.set_num_threads(1)
        fit(cfg, overwrite=True)
    return str(cfg.run_dir), json.loads((cfg.run_dir / "summary.json").read_text())


def _fmt(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    if len(values) == 1:
        return f"{values[0] * scale:.{digits}f}"
    return f"{statistics.mean(values) * scale:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="1 seed, 3 epochs")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--subset", type=int, default=1000)
    ap.add_argument("--jobs", type=int, default=2, help="runs in parallel, one thread each")
    ap.add_argument("--teacher-epochs", type=int, default=3, help="epochs of the ViT teacher (all training rows)")
    ap.add_argument("--runs", type=Path, default=HERE / "runs" / "hybrid")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "hybrid_kd.md")
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.epochs = 1, 3
    t0 = time.perf_counter()
    vit_teacher = str(args.runs / yaml.safe_load(VIT_TEACHER_CONFIG.read_text())["name"])
    cnn_summary = json.loads((CNN_TEACHER / "summary.json").read_text())

    jobs = {}
    train = {"epochs": args.epochs, "optimizer": {"name": "adam", "lr": 0.001}, "progress": False, "report": False}
    for s_name, student in STUDENTS.items():
        for row, (teacher, method) in _methods(vit_teacher).items():
            for seed in range(args.seeds):
                raw = {"name": f"{student['arch']}-{method['name']}-s{seed}", "output_dir": str(args.runs / "students"),
                       "data": {"name": "fashion_mnist", "batch_size": 64, "train_subset": args.subset},
                       "student": student, "method": method, "train": {**train, "seed": seed}}
                if teacher is not None:
                    raw["teacher"] = teacher
                jobs[(s_name, row, seed)] = raw
    for raw in jobs.values():  # every config validates before anything trains
        config_from_dict(raw)
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        # The CE rows need no teacher: they run while the ViT teacher trains (once) in this process.
        futures = {key: pool.submit(_run, raw) for key, raw in jobs.items() if "teacher" not in raw}
        _, vit_summary = _vit_teacher(args.runs, args.teacher_epochs)
        futures.update({key: pool.submit(_run, raw) for key, raw in jobs.items() if "teacher" in raw})
        results = {}
        for key, fut in futures.items():
            results[key] = fut.result()
            print(f"[{time.perf_counter() - t0:6.0f}s] {key}: {results[key]['test_accuracy']:.4f}", flush=True)

    wall = time.perf_counter() - t0
    cmd = " ".join(["python", *sys.argv])
    lines = [
        "# Hybrid distillation and masked-input distillation, Fashion-MNIST, 1,000 labels",
        "",
        f"- Machine: {platform.machine()}, {os.cpu_count()} CPU cores shared with other jobs, torch {torch.__version__}, "
        f"one thread per run, {args.jobs} runs in parallel.",
        f"- Command: `{cmd}`",
        f"- Date (UTC): {datetime.now(timezone.utc):%Y-%m-%d %H:%M}; wall time {wall / 60:.1f} min "
        "(finished runs are reused on a rerun; the ViT teacher is trained once).",
        f"- Budget: {args.epochs} epochs, Adam 1e-3, batch 64, {args.subset} stratified training rows, "
        f"seeds 0-{args.seeds - 1}; mean ± std (sample) over seeds of the test accuracy (10,000 images).",
        f"- Teachers, both supervised (CE), not MAE- or contrastive-pretrained as in the papers: CNN w32 "
        f"({cnn_summary['test_accuracy'] * 100:.2f}%, all training rows), vit_tiny d64x4 p4 "
        f"({vit_summary['test_accuracy'] * 100:.2f}%, {args.teacher_epochs} epoch(s) on all training rows, "
        "configs/teacher_fmnist_vit_small.yaml).",
        "- kd and masked_kd distil from the ViT teacher; hybrid_kd takes features from the CNN (members.0) and "
        "token relations from the ViT (members.1, blocks 2 and 3).  masked_kd and hybrid_kd keep CE on the "
        "unmasked batch as the task loss.  Epoch time: mean seconds per training epoch (the teacher passes "
        "included), on a busy shared CPU -- compare within this table only.",
        "",
        "| method | " + " | ".join(f"{s} acc. (%) | {s} s/epoch" for s in STUDENTS) + " |",
        "|---|" + "---|---|" * len(STUDENTS),
    ]
    for row in _methods(vit_teacher):
        cells = []
        for s_name in STUDENTS:
            rs = [results[(s_name, row, seed)] for seed in range(args.seeds)]
            cells += [_fmt([r["test_accuracy"] for r in rs]), f"{statistics.mean(r['epoch_seconds'] for r in rs):.1f}"]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    logged = {k: v for (s, row, seed), r in results.items() if seed == 0 for k, v in
              {f"{row.split()[0]} / {s} / {name}": val for name, val in r["logged"].items()}.items()}
    if logged:
        lines += ["", "Logged by the methods (seed 0): " + "; ".join(f"{k} = {v:.3f}" for k, v in logged.items()) + "."]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
