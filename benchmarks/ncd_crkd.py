"""Novel class discovery on Fashion-MNIST: UNO-style baseline vs class-relation KD (CRKD).

    python benchmarks/ncd_crkd.py            # 20k training images, 15 epochs, 3 seeds (~20 min on 2 cores)
    python benchmarks/ncd_crkd.py --quick    # 1 seed, 4k images, few epochs (smoke run, ~35 s)

Writes benchmarks/results/ncd_crkd.md.  Split: classes 0-4 (T-shirt/top, Trouser, Pullover,
Dress, Coat) are known and labelled, classes 5-9 (Sandal, Shirt, Sneaker, Bag, Ankle boot) are
novel and unlabelled.  Protocol, as in the NCD papers:

1. the known-class model (the teacher) is trained with cross-entropy on the known classes only
   (``data.classes: [0, 1, 2, 3, 4]``);
2. the discovery model (same architecture, 10 outputs: 5 known slots then 5 novel slots) starts
   from the known-class model's weights (its head is new) and trains with method ``crkd`` on all
   training images, labels of novel classes unused; ``kd_weight: 0`` is the UNO-style baseline;
3. reported: known-class accuracy (test images of known classes, argmax over the known slots),
   novel-class clustering accuracy (argmax over the novel slots, Hungarian matching to the five
   novel classes) on the test images of novel classes and on the unlabelled training images.

Every number in the table is produced by this script; rerun it rather than editing the file.
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
from safetensors.torch import load_file

from distillery.config import ModelSpec, config_from_dict, dump_config
from distillery.data import load_data
from distillery.engine import fit
from distillery.methods import get_spec
from distillery.models import build_model, forward_logits
from distillery.report.clustering import cluster_accuracy

HERE = Path(__file__).resolve().parent
KNOWN = [0, 1, 2, 3, 4]
ARCH = {"arch": "cnn", "kwargs": {"width": 8}}


def _warm_student(teacher_dir: Path, data, seed: int) -> torch.nn.Module:
    """The discovery model: the known-class model's weights, a freshly initialised 10-way head."""
    torch.manual_seed(seed)
    student = build_model(ModelSpec(**ARCH), in_channels=data.in_channels, num_classes=data.num_classes,
                          input_size=data.input_size)
    body = {k: v for k, v in load_file(str(teacher_dir / "model.safetensors")).items() if not k.startswith("head.")}
    missing, unexpected = student.load_state_dict(body, strict=False)
    assert not unexpected and all(k.startswith("head.") for k in missing), (missing, unexpected)
    return student


@torch.inference_mode()
def _ncd_metrics(model: torch.nn.Module, data) -> dict[str, float]:
    model.eval()
    k = len(KNOWN)
    out = {}
    for split_name in ("test", "train"):
        split = getattr(data, split_name)
        logits = torch.cat([forward_logits(model, split.inputs[i:i + 1024]) for i in range(0, len(split), 1024)])
        y = split.labels
        known, novel = y < k, y >= k
        if split_name == "test":
            out["known_acc"] = (logits[known, :k].argmax(-1) == y[known]).float().mean().item()
        out[f"novel_{split_name}_acc"] = cluster_accuracy(y[novel], logits[novel, k:].argmax(-1))
    return out


def _run(raw: dict, runs: Path, student=None, data=None) -> dict:
    cfg = config_from_dict({**raw, "output_dir": str(runs)})
    done = cfg.run_dir / "summary.json"
    if done.is_file() and (cfg.run_dir / "config.yaml").read_text() == dump_config(cfg):
        return json.loads(done.read_text())  # resume an interrupted benchmark without redoing runs
    result = fit(cfg, overwrite=True, student=student, data=data)
    summary = result.summary
    if data is not None:  # a discovery run: add the NCD metrics to its summary
        summary.update(_ncd_metrics(result.student, data))
        done.write_text(json.dumps(summary, indent=2))
    return summary


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="1 seed, 4,000 training images, 5 teacher + 4 discovery epochs")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=15, help="discovery epochs")
    ap.add_argument("--teacher-epochs", type=int, default=5)
    ap.add_argument("--subset", type=int, default=20000, help="training images (stratified); 0 = all 54k")
    ap.add_argument("--kd-weight", type=float, default=None, help="CRKD weight (default: the method's)")
    ap.add_argument("--runs", type=Path, default=HERE / "runs" / "ncd")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "ncd_crkd.md")
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.epochs, args.teacher_epochs, args.subset = 1, 4, 5, 4000
        args.runs = args.runs.with_name(args.runs.name + "-quick")
    torch.set_num_threads(1)  # a shared machine; one intra-op thread per process
    t0 = time.perf_counter()

    subset = args.subset or None
    data_cfg = {"name": "fashion_mnist", "batch_size": 128, "train_subset": subset}
    train = {"optimizer": {"name": "adam", "lr": 1e-3}, "scheduler": {"name": "cosine"}, "progress": False, "report": False}
    # The teacher sees as many known-class images as the discovery model has labelled ones.
    teacher_data = {**data_cfg, "classes": KNOWN, "train_subset": subset and subset * len(KNOWN) // 10}
    teacher = _run({"name": "known-teacher", "data": teacher_data, "student": ARCH,
                    "train": {**train, "epochs": args.teacher_epochs}}, args.runs)
    teacher_dir = args.runs / "known-teacher"
    data = load_data(config_from_dict({"data": data_cfg, "student": ARCH}).data)

    # Every parameter written out: the resume check then notices a changed default.
    params = get_spec("crkd").params().model_dump()
    if args.kd_weight is not None:
        params["kd_weight"] = args.kd_weight
    arms = {"UNO-style baseline (kd_weight 0)": {**params, "kd_weight": 0.0}, "CRKD": params}
    results: dict[str, list[dict]] = {}
    for arm, p in arms.items():
        for seed in range(args.seeds):
            tag = "uno" if p["kd_weight"] == 0.0 else "crkd"
            print(f"[{time.perf_counter() - t0:6.0f}s] {arm} seed {seed}", flush=True)
            raw = {"name": f"{tag}-s{seed}", "data": data_cfg, "student": ARCH, "teacher": {"run": str(teacher_dir)},
                   "method": {"name": "crkd", "params": p}, "train": {**train, "epochs": args.epochs, "seed": seed}}
            results.setdefault(arm, []).append(_run(raw, args.runs, _warm_student(teacher_dir, data, seed), data))

    def ms(key, runs):
        vals = [100 * r[key] for r in runs]
        return f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals) if len(vals) > 1 else 0.0:.2f}"

    cmd = " ".join(["python", "benchmarks/ncd_crkd.py", *sys.argv[1:]])
    lines = [
        "# Novel class discovery on Fashion-MNIST: UNO-style baseline vs CRKD",
        "",
        f"- Command: `{cmd}`",
        f"- Date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; total wall time {(time.perf_counter() - t0) / 60:.1f} min",
        f"- Machine: {platform.machine()}, {os.cpu_count()} CPU cores (1 torch thread), {platform.system()}, "
        f"Python {platform.python_version()}, torch {torch.__version__}, no GPU",
        f"- Split: known = classes {KNOWN} (labelled), novel = classes 5-9 (unlabelled; their labels are used only "
        "for evaluation).",
        f"- Training images: {'all 54,000' if subset is None else f'{subset:,} (stratified subset of 54,000)'} left "
        "after the 6,000-image validation split; test = the official 10k test set.",
        f"- Known-class model (teacher): CNN width 8, {args.teacher_epochs} epochs CE on as many known-class images as the "
        f"discovery model has labelled ones, Adam 1e-3, cosine; test accuracy on the known classes "
        f"**{100 * teacher['test_accuracy']:.2f}%**.",
        f"- Discovery model: the same CNN initialised from the known-class model (new 10-way head), {args.epochs} epochs, "
        f"batch 128, Adam 1e-3, cosine, {args.seeds} seed(s). Method `crkd` with "
        + ", ".join(f"{k}: {v}" for k, v in params.items() if k != "known_classes")
        + "; the baseline differs only in kd_weight: 0.",
        "- Known acc: test images of known classes, argmax over the 5 known slots. Novel acc: clustering accuracy "
        "(Hungarian matching) of the argmax over the 5 novel slots, on the novel test images and on the unlabelled "
        "(novel) training images.",
        "",
        "| method | novel acc, test (%) | novel acc, train (%) | known acc (%) | epoch time (s) |",
        "|---|---|---|---|---|",
    ]
    for arm, runs in results.items():
        epoch_t = statistics.mean(r["train_seconds"] / r["epochs"] for r in runs)
        lines.append(f"| {arm} | {ms('novel_test_acc', runs)} | {ms('novel_train_acc', runs)} | "
                     f"{ms('known_acc', runs)} | {epoch_t:.1f} |")
    lines += ["", "Mean ± std over seeds, as measured (not tuned per seed).", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
