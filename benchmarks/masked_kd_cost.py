"""What masked-input distillation (masked_kd, DMAE: Bai et al. 2023) saves in teacher compute.

    python benchmarks/masked_kd_cost.py

Writes benchmarks/results/masked_kd_cost.md.  Per training step (a batch of 64 Fashion-MNIST-
sized images, 1x28x28), the teacher's FLOPs counted by ``torch.utils.flop_counter.FlopCounterMode``
and its wall time (median of repeated passes, one thread, inference mode), for:

- full: the unmasked pass to the logits -- what a logit/feature KD method pays per step;
- to tap, unmasked: the pass stopped at the tapped layer (``until_taps``) on the whole image;
- masked_kd: the pass masked_kd runs -- 75% of the 4x4 patches hidden (a ViT drops them before
  ``blocks.0``; a CNN sees them zeroed), stopped at the tap.  The code path is the method's own
  (``MaskedKD.teacher_masked``), through the engine's ``OnlineTeacher``.

Teachers: the CNN width 32 of benchmarks/runs/fmnist/teacher and the vit_tiny (dim 64, depth 4,
patch 4) of benchmarks/runs/hybrid/teacher-vit (weights loaded when the run exists; FLOPs and
time do not depend on them).  Both are supervised (CE-trained), not MAE-pretrained.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from distillery.config import AugmentConfig, ModelSpec, load_config
from distillery.engine.teacher import OnlineTeacher
from distillery.methods import get_spec
from distillery.models import build_model
from distillery.taps import Taps

HERE = Path(__file__).resolve().parent
TEACHERS = {"CNN w32": HERE / "runs" / "fmnist" / "teacher", "vit_tiny d64x4 p4": HERE / "runs" / "hybrid" / "teacher-vit"}
TAPS = {"CNN w32": ["features.1", "features.3"], "vit_tiny d64x4 p4": ["blocks.0", "blocks.2"]}


def _teacher(run: Path) -> tuple[torch.nn.Module, bool]:
    spec = load_config(run / "config.yaml").student
    weights = run / "model.safetensors"
    if weights.is_file():
        spec = spec.model_copy(update={"weights": str(weights)})
    model = build_model(spec, in_channels=1, num_classes=10, input_size=(28, 28))
    return model.eval().requires_grad_(False), weights.is_file()


def _wired(teacher, tap: str, ratio: float):
    """masked_kd wired as the engine wires it (live teacher, tap), with a CNN student for shapes."""
    spec = get_spec("masked_kd")
    student = build_model(ModelSpec(arch="cnn", kwargs={"width": 8}), in_channels=1, num_classes=10, input_size=(28, 28))
    method = spec.cls(spec.validate_params({"teacher_layer": tap, "mask_ratio": ratio, "recon_weight": 0, "patch_size": 4}),
                      student=student, teacher_layers=teacher.default_feature_layers, num_classes=10)
    source = OnlineTeacher(teacher, method.teacher_taps, AugmentConfig(), 0, True, on_batch=False)
    source.__enter__()
    taps = Taps(student, method.student_taps).__enter__()
    object.__setattr__(method, "_teacher_fn", source.outputs)
    object.__setattr__(method, "_student_taps", taps)
    return method


def _measure(fn, repeats: int) -> tuple[int, float]:
    with FlopCounterMode(display=False) as fc:
        fn()
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return fc.get_total_flops(), statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--mask-ratio", type=float, default=0.75)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "masked_kd_cost.md")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    t_start = time.perf_counter()
    x = torch.randn(args.batch, 1, 28, 28)
    rows = []
    for name, run in TEACHERS.items():
        teacher, trained = _teacher(run)
        with torch.inference_mode():
            full = _measure(lambda: teacher(x), args.repeats)
        rows.append((name, "full pass to the logits", "-", *full, full))
        for tap in TAPS[name]:
            plain = _wired(teacher, tap, 0.0)
            stop = _measure(lambda: plain.teacher_forward(x, until_taps=True), args.repeats)
            rows.append((name, f"to tap `{tap}`, unmasked", "0%", *stop, full))
            method = _wired(teacher, tap, args.mask_ratio)
            visible = method.sample_mask(x)
            masked = _measure(lambda: method.teacher_masked(x, visible), args.repeats)
            rows.append((name, f"masked_kd: to tap `{tap}`, masked", f"{args.mask_ratio:.0%}", *masked, full))
        print(f"{name}: done (trained weights: {trained})", flush=True)

    lines = [
        "# masked_kd: teacher compute per training step",
        "",
        f"- Machine: {platform.machine()}, {platform.processor() or 'cpu'}, {torch.get_num_threads()} torch thread, "
        f"torch {torch.__version__}, Python {platform.python_version()} (shared CPU: times are medians; other jobs ran).",
        f"- Command: `{' '.join([Path(sys.executable).name, *sys.argv])}`",
        f"- Date (UTC): {datetime.now(timezone.utc):%Y-%m-%d %H:%M}; wall time {time.perf_counter() - t_start:.0f} s.",
        f"- One step = the teacher on a batch of {args.batch} images 1x28x28; masks on the 7x7 grid of 4x4 patches "
        f"({args.mask_ratio:.0%} hidden: 12 of 49 patches visible).  FLOPs from `torch.utils.flop_counter.FlopCounterMode` "
        "(matmuls/convs/attention; elementwise ops not counted); time: median of "
        f"{args.repeats} passes under `torch.inference_mode()`.",
        "- The masked rows run the method's own code (`MaskedKD.teacher_masked` through the engine's `OnlineTeacher`): "
        "the ViT drops hidden tokens before `blocks.0` (class token kept); the CNN sees hidden patches zeroed, which "
        "saves nothing by itself -- only stopping at the tap does.",
        "- Teachers are supervised (CE-trained), not MAE-pretrained; the cost does not depend on the weights.",
        "",
        "| teacher | teacher pass | masked | GFLOPs / step | fraction of full | ms / step | time fraction |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, what, ratio, flops, secs, (full_flops, full_secs) in rows:
        lines.append(f"| {name} | {what} | {ratio} | {flops / 1e9:.4f} | {flops / full_flops:.3f} | "
                     f"{secs * 1e3:.2f} | {secs / full_secs:.2f} |")
    lines += ["", "`teacher_flops_fraction` (logged by masked_kd from its probe batch) is the `fraction of full` of "
              "the masked row for the run's tap."]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
