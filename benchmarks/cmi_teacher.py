"""CE teacher vs maximum-CMI (MCMI) teacher, and KD students distilled from each.

    python benchmarks/cmi_teacher.py            # teachers on all 54k images, students 3 seeds (~15 min on 2 CPU cores)
    python benchmarks/cmi_teacher.py --quick    # tiny teachers and students, 2 seeds (~1 min; smoke run only)

Ye et al. (2024) train the teacher with CE - lambda * CMI (method ``cmi``) instead of CE alone and
report better students. Here: two CNN w32 teachers with the same architecture, data, budget and
seed, one per objective; then the same CNN w16 student distilled with Hinton KD (T = 4,
alpha = 0.9) from each, on 1,000 labelled images, several seeds. Reported: teacher test accuracy,
NLL, expected calibration error (15 equal-width confidence bins) and CMI on the test set (plug-in
estimate, centroids of the test outputs), and student test accuracy mean ± std.

Writes benchmarks/results/cmi_teacher.md; every number in it comes from this script.
"""
from __future__ import annotations

import argparse
import dataclasses
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
from distillery.losses.cmi import empirical_cmi
from distillery.models import forward_logits

HERE = Path(__file__).resolve().parent


@torch.no_grad()
def test_logits(model: torch.nn.Module, x: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    model.eval()
    return torch.cat([forward_logits(model, x[i:i + batch]).float() for i in range(0, len(x), batch)])


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """ECE: sum over equal-width confidence bins of (bin share) * |accuracy - mean confidence|."""
    conf, pred = logits.softmax(-1).max(-1)
    correct = (pred == labels).double()
    which = (conf * bins).long().clamp(max=bins - 1)
    ece = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            ece += sel.double().mean().item() * abs(correct[sel].mean().item() - conf[sel].double().mean().item())
    return ece


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="teachers: 2,000 images, 3 epochs; students: 600 images, 5 epochs, 2 seeds")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--teacher-subset", type=int, default=None, help="teacher training images (default: all)")
    ap.add_argument("--teacher-epochs", type=int, default=3)
    ap.add_argument("--teacher-batch", type=int, default=128)
    ap.add_argument("--cmi-weight", type=float, default=0.2, help="lambda of the MCMI teacher")
    ap.add_argument("--epochs", type=int, default=20, help="student epochs")
    ap.add_argument("--subset", type=int, default=1000, help="student training images")
    ap.add_argument("--runs", type=Path, default=HERE / "runs" / "cmi_teacher")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "cmi_teacher.md")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads")
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.teacher_subset, args.teacher_epochs, args.teacher_batch, args.subset, args.epochs = 2, 2000, 3, 64, 600, 5
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    teacher_data = {"name": "fashion_mnist", "batch_size": args.teacher_batch, "train_subset": args.teacher_subset}
    student_data = {"name": "fashion_mnist", "batch_size": 64, "train_subset": args.subset}
    # each data set is loaded once; --quick evaluates on a random 2,000 of the 10k test images
    # (evaluation would otherwise cost more than the tiny trainings)
    bundles = {}
    for key, raw in (("teacher", teacher_data), ("student", student_data)):
        b = load_data(config_from_dict({"name": "probe", "data": raw, "student": {"arch": "cnn"}}).data)
        if args.quick:
            keep = torch.randperm(len(b.test), generator=torch.Generator().manual_seed(0))[:2000]
            b = dataclasses.replace(b, val=b.val.take(torch.arange(500)), test=b.test.take(keep))
        bundles[key] = b
    test = bundles["teacher"].test
    objectives = {"ce": {"name": "ce"},
                  "cmi": {"name": "cmi", "params": {"cmi_weight": args.cmi_weight, "warmup_epochs": 1.0}}}
    teachers, stats = {}, {}
    for name, method in objectives.items():
        print(f"[{time.perf_counter() - t0:5.0f}s] teacher {name}", flush=True)
        cfg = config_from_dict({"name": f"teacher-{name}", "output_dir": str(args.runs), "data": teacher_data,
                                "student": {"arch": "cnn", "kwargs": {"width": 32}}, "method": method,
                                "train": {"epochs": args.teacher_epochs, "optimizer": {"name": "adam", "lr": 1e-3},
                                          "scheduler": {"name": "cosine"}, "seed": 0, "eval_every": 1000,
                                          "progress": False, "report": False}})
        res = fit(cfg, overwrite=True, data=bundles["teacher"])
        z = test_logits(res.student, test.inputs)
        stats[name] = {"acc": res.summary["test_accuracy"], "nll": res.summary["test_loss"],
                       "ece": expected_calibration_error(z, test.labels), "cmi": empirical_cmi(z, test.labels).item()}
        teachers[name] = res.run_dir

    students: dict[str, list[float]] = {}
    for name, run_dir in teachers.items():
        for seed in range(args.seeds):
            print(f"[{time.perf_counter() - t0:5.0f}s] student from {name} teacher, seed {seed}", flush=True)
            cfg = config_from_dict({
                "name": f"student-{name}-s{seed}", "output_dir": str(args.runs),
                "data": student_data,
                # the teacher's outputs on the student's images are computed once, then read from a cache
                "teacher": {"run": str(run_dir), "cache": {"dir": str(args.runs / f"cache-{name}"), "dtype": "float32"}},
                "student": {"arch": "cnn", "kwargs": {"width": 16}},
                "method": {"name": "kd", "params": {"temperature": 4.0, "alpha": 0.9}},
                "train": {"epochs": args.epochs, "optimizer": {"name": "adam", "lr": 1e-3}, "seed": seed,
                          "eval_every": 1000, "progress": False, "report": False}})
            # the first student of a teacher (re)builds its cache: a cache from an earlier invocation is stale
            summary = fit(cfg, overwrite=True, rebuild_cache=seed == 0, data=bundles["student"]).summary
            students.setdefault(name, []).append(summary["test_accuracy"])

    def ms(vals: list[float]) -> str:
        vals = [100 * v for v in vals]
        return f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f}" if len(vals) > 1 else f"{vals[0]:.2f}"

    cmd = " ".join(["python", "benchmarks/cmi_teacher.py", *sys.argv[1:]])
    n_teacher = f"{args.teacher_subset:,} (stratified subset)" if args.teacher_subset else "all 54,000"
    lines = [
        "# CE teacher vs maximum-CMI teacher (Ye et al. 2024), then KD students",
        "",
        f"- Command: `{cmd}`",
        f"- Date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; total wall time {(time.perf_counter() - t0) / 60:.1f} min",
        f"- Machine: {platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()}, Python {platform.python_version()}, "
        f"torch {torch.__version__}, {'GPU ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}",
        f"- Teachers: CNN w32 on {n_teacher} Fashion-MNIST training images, {args.teacher_epochs} epochs, batch {args.teacher_batch}, Adam 1e-3, "
        f"cosine, seed 0. `ce`: cross-entropy. `cmi`: CE - lambda * CMI with lambda = {args.cmi_weight:g}, class centroids "
        "as a moving average of batch class means (decay 0.9), 1 warm-up epoch of plain CE.",
        f"- Students: CNN w16, KD (T = 4, alpha = 0.9) on {args.subset:,} labelled images (stratified), {args.epochs} epochs, "
        f"batch 64, Adam 1e-3, {args.seeds} seeds. Test = "
        + ("a random 2,000 of the official 10k test images (--quick)." if args.quick else "the official 10k test set."),
        "- ECE: 15 equal-width confidence bins. CMI: mean KL(P_x || Q_y) over the test set, Q_y the mean output of class y.",
        "",
        "| teacher objective | teacher acc (%) | teacher NLL | teacher ECE (%) | teacher CMI (nats) | student acc (%) mean ± std |",
        "|---|---|---|---|---|---|",
    ]
    for name in objectives:
        s = stats[name]
        lines.append(f"| {name} | {100 * s['acc']:.2f} | {s['nll']:.3f} | {100 * s['ece']:.2f} | {s['cmi']:.3f} | "
                     f"{ms(students[name])} |")
    lines += ["", "One teacher per objective (seed 0): teacher-side differences are single measurements. "
              "Student differences within the seed std are noise.", ""]
    if args.quick:
        lines.insert(2, "_Quick smoke run (small teachers, short student training): the full run is "
                        "`python benchmarks/cmi_teacher.py`._\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
