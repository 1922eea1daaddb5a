"""What the teacher-output cache buys: online vs cached KD, side by side in one run.

    python benchmarks/cache_speed.py            # ~15 min on 2 CPU cores
    python benchmarks/cache_speed.py --quick    # smaller budget

Writes benchmarks/results/cache_speed.md.  All figures come from this script.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from distillery.config import config_from_dict
from distillery.engine import fit

HERE = Path(__file__).resolve().parent
PAIRS = {"CNN w32 -> CNN w16": {"arch": "cnn", "kwargs": {"width": 16}},
         "CNN w32 -> MLP 784-128-10": {"arch": "mlp", "kwargs": {"hidden": [128]}}}


def _fit(raw: dict, runs: Path, **kw) -> dict:
    cfg = config_from_dict({**raw, "output_dir": str(runs)})
    return fit(cfg, overwrite=True, **kw).summary


def _epoch_seconds(run_dir: Path) -> float:
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return float(np.median([r["epoch_seconds"] for r in rows]))


def _peak_rss_reading(store_dir: Path, batches: int = 300, batch: int = 256) -> tuple[float, float]:
    """Peak RSS (MiB) of a fresh process that opens a store and gathers random batches."""
    code = f"""
import torch
from distillery.cache.store import TeacherStore

def hwm():  # VmHWM: this process's own peak RSS (reset at exec, unlike ru_maxrss, which inherits the parent's)
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')) / 1024

s = TeacherStore({str(store_dir)!r}, verify=False)
g = torch.Generator().manual_seed(0)
before = hwm()
for _ in range({batches}):
    rows = torch.randint(len(s), ({batch},), generator=g)
    s.logits(rows, torch.zeros({batch}, dtype=torch.long)).sum()
print(before, hwm())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return float(out[0]), float(out[1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--runs", type=Path, default=HERE / "runs" / "cache")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "cache_speed.md")
    args = ap.parse_args()
    epochs = 2 if args.quick else 3
    t0 = time.perf_counter()
    runs = args.runs
    data = {"name": "fashion_mnist", "batch_size": 128}
    teacher = _fit({"name": "teacher", "data": data, "student": {"arch": "cnn", "kwargs": {"width": 32}},
                    "train": {"epochs": 1 if args.quick else 2, "progress": False}}, runs)
    tdir = str(runs / "teacher")
    lines = ["# Teacher-output cache: speed, size, memory", "",
             f"- Command: `python benchmarks/cache_speed.py{' --quick' if args.quick else ''}`",
             f"- Date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
             f"- Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} "
             f"({torch.get_num_threads()} threads), Python {platform.python_version()}, no GPU",
             f"- Data: Fashion-MNIST, all {54000:,} training images (10% held out for validation), batch 128, "
             f"{epochs} epochs per run, Adam 1e-3. Teacher: CNN width 32 ({teacher['params']:,} params, "
             f"{100 * teacher['test_accuracy']:.2f}% test). Epoch time = median training-epoch wall time.",
             "- The cache is safetensors shards read through numpy.memmap (see `distillery/cache/store.py`).", ""]

    # ---- 1. online vs cached KD vs plain CE, per pair
    lines += ["## KD epoch time: online teacher vs cache", "",
              "| pair | CE (no teacher) s/epoch | online KD s/epoch | cached KD s/epoch | speed-up online/cached | cached / CE (goal <= 1.15) | store in RAM / CE (floor) | test acc online / cached (%) |",
              "|---|---|---|---|---|---|---|---|"]
    build_info = None
    for pair, student in PAIRS.items():
        common = {"data": data, "student": student, "train": {"epochs": epochs, "progress": False, "eval_every": 99}}
        ce = _fit({**common, "name": "ce"}, runs)
        online = _fit({**common, "name": "online", "teacher": {"run": tdir}, "method": {"name": "kd"}}, runs)
        cached = _fit({**common, "name": "cached", "teacher": {"run": tdir, "cache": {"dir": str(runs / "store-dense")}},
                       "method": {"name": "kd"}}, runs, rebuild_cache=build_info is None)
        if build_info is None:
            build_info = json.loads((runs / "store-dense" / "manifest.json").read_text())
        cached_again = _fit({**common, "name": "cached", "teacher": {"run": tdir, "cache": {"dir": str(runs / "store-dense")}},
                             "method": {"name": "kd"}}, runs)  # second run: the store already exists
        e_ce, e_on, e_ca = _epoch_seconds(runs / "ce"), _epoch_seconds(runs / "online"), _epoch_seconds(runs / "cached")
        # The same cached KD with the store copied into RAM: what is left is the KD loss itself.
        _fit({**common, "name": "cached-ram", "method": {"name": "kd"},
              "teacher": {"run": tdir, "cache": {"dir": str(runs / "store-dense"), "load": "ram"}}}, runs)
        e_ram = _epoch_seconds(runs / "cached-ram")
        lines.append(f"| {pair} | {e_ce:.2f} | {e_on:.2f} | {e_ca:.2f} | {e_on / e_ca:.1f}x | {e_ca / e_ce:.2f} | {e_ram / e_ce:.2f} | "
                     f"{100 * online['test_accuracy']:.2f} / {100 * cached_again['test_accuracy']:.2f} |")
        print(lines[-1], flush=True)
    lines += ["", "The ideal speed-up is (teacher forward + student forward/backward) / (student forward/backward); "
              "cached/CE > 1 is the cost of reading the store and computing the KD loss; the 'store in RAM' column "
              "is the same run with the store copied into memory (`teacher.cache.load: ram`), i.e. the floor set by the KD "
              "loss and batch bookkeeping alone: the memory-mapped read costs the difference between the two columns.", ""]

    # ---- 2. storage per sample: dense fp16 vs fp32 vs top-k
    lines += ["## Build time and size on disk", "", "| store | build (s) | bytes per sample |", "|---|---|---|"]
    from distillery.cache.from_config import build_from_config
    import yaml

    cfg_file = runs / "cache_cfg.yaml"
    for label, opts in (("dense fp16", {}), ("dense fp32", {"dtype": "float32"}), ("top-5 fp16", {"topk": 5})):
        cfg_file.write_text(yaml.safe_dump({"output_dir": str(runs), "data": data, "student": {"arch": "mlp"},
                                            "teacher": {"run": tdir, "cache": {"dir": str(runs / f"store-{label.replace(' ', '-')}"), **opts}},
                                            "method": {"name": "kd"}, "train": {"progress": False}}))
        m = build_from_config(cfg_file, rebuild=True)
        lines.append(f"| {label} | {m['build_seconds']:.1f} | {m['bytes_per_sample']:.1f} |")
    lines += ["", "Per sample: 10 logits, 6 bytes of augmentation parameters, and the shard headers (amortised). "
              "Top-k pays off for large class counts (e.g. a 32k-150k vocabulary), not for 10 classes.", ""]

    # ---- 3. reinforced dataset (K views) vs online augmentation
    aug = {**data, "augment": {"pad_crop": 2, "flip": True}}
    common = {"data": aug, "student": PAIRS["CNN w32 -> CNN w16"], "method": {"name": "kd"},
              "train": {"epochs": epochs, "progress": False, "eval_every": 99}}
    on_aug = _fit({**common, "name": "online-aug", "teacher": {"run": tdir}}, runs)
    reinf = _fit({**common, "name": "reinforced", "teacher": {"run": tdir, "cache": {"dir": str(runs / "store-k4"), "views": 4}}},
                 runs, rebuild_cache=True)
    k4 = json.loads((runs / "store-k4" / "manifest.json").read_text())
    reinf2 = _fit({**common, "name": "reinforced", "teacher": {"run": tdir, "cache": {"dir": str(runs / "store-k4"), "views": 4}}}, runs)
    lines += ["## Reinforced dataset (4 stored views per sample) vs online augmentation (pad-crop 2 + flip), CNN w16 student", "",
              "| | s/epoch | test accuracy (%) | one-off build (s) | bytes per sample |", "|---|---|---|---|---|",
              f"| online teacher on augmented views | {_epoch_seconds(runs / 'online-aug'):.2f} | {100 * on_aug['test_accuracy']:.2f} | — | — |",
              f"| reinforced cache, K=4 | {_epoch_seconds(runs / 'reinforced'):.2f} | {100 * reinf2['test_accuracy']:.2f} | "
              f"{k4['build_seconds']:.1f} | {k4['bytes_per_sample']:.1f} |", ""]

    # ---- 4. memory while reading a store much larger than the RSS it needs
    big = runs / "store-big"
    from distillery.cache.store import CacheLayout, build_store, finalize_store

    n, c = (200_000 if args.quick else 1_000_000), 1000
    fp = {"synthetic": True}
    gen = torch.Generator().manual_seed(0)
    build_store(big, fp, CacheLayout(views=1, topk=None, dtype="float16", taps=[], shard_size=50_000), n, c,
                lambda rows, k: (torch.zeros(len(rows), 3, dtype=torch.int16), torch.randn(len(rows), c, generator=gen), {}))
    m = finalize_store(big, fp, CacheLayout(views=1, topk=None, dtype="float16", taps=[], shard_size=50_000), n, c)
    before, peak = _peak_rss_reading(big)
    lines += ["## Peak memory while reading a large store", "",
              f"A synthetic store of {n:,} samples x {c} classes (fp16, {m['bytes'] / 2**30:.2f} GiB on disk) is opened in a fresh "
              f"process and 300 random batches of 256 rows are gathered: peak RSS (VmHWM) {peak:.0f} MiB, of which {before:.0f} MiB "
              f"before the first batch (Python + torch + the opened store); reading added {peak - before:.0f} MiB. "
              "Batches read only their rows (numpy.memmap), but every page touched stays mapped and counts as (file-backed, "
              "reclaimable) RSS, so RSS grows with the share of the store visited. Training from a store larger than half of "
              "RAM under a memory limit, with anonymous and file-backed RSS measured apart, is in "
              "`benchmarks/results/cache_memory.md` (`python benchmarks/cache_memory.py`).", ""]

    # ---- 4b. per-batch gather cost: many small shards vs one (shards are sized by bytes now)
    lines += ["## Reading one batch from the store: shards of 8,192 rows vs one shard", "",
              "| shards | gather of 128 random rows (µs, best of 5 epochs) |", "|---|---|"]
    n_rows = 54_000
    for shard_rows in (8192, n_rows):
        p = runs / f"store-gather-{shard_rows}"
        lay = CacheLayout(views=1, topk=None, dtype="float16", taps=[], shard_size=shard_rows)
        g = torch.Generator().manual_seed(0)
        build_store(p, {"gather": shard_rows}, lay, n_rows, 10,
                    lambda rows, k: (torch.zeros(len(rows), 3, dtype=torch.int16), torch.randn(len(rows), 10, generator=g), {}))
        finalize_store(p, {"gather": shard_rows}, lay, n_rows, 10)
        from distillery.cache.store import TeacherStore

        store = TeacherStore(p, verify=False)
        order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(1))
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            for b in range(0, n_rows - 128, 128):
                store.logits(order[b:b + 128], torch.zeros(128, dtype=torch.long))
            best = min(best, (time.perf_counter() - t) / (n_rows // 128))
        lines.append(f"| {len(store.manifest['shards'])} | {best * 1e6:.0f} |")
    lines += ["", "Every batch gathers from each shard it touches; a store now defaults to ~128 MiB shards, so a "
              "logits-only Fashion-MNIST store is a single shard.", ""]

    # ---- 5. two processes vs one (samples/s), same global batch
    lines += ["## 2 processes vs 1 (torchrun -> Accelerate MULTI_CPU, gloo)", ""]
    rates = {}
    for nproc, bs in ((1, 128), (2, 64)):
        cfg_file.write_text(yaml.safe_dump({"name": f"mp{nproc}", "output_dir": str(runs), "data": {**data, "batch_size": bs},
                                            "student": PAIRS["CNN w32 -> CNN w16"],
                                            "teacher": {"run": tdir, "cache": {"dir": str(runs / "store-dense")}},
                                            "method": {"name": "kd"}, "train": {"epochs": 1, "progress": False, "eval_every": 99}}))
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // nproc))}
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", "29650",
                        "-m", "distillery.cli", "distill", str(cfg_file), "--overwrite"], check=True, env=env, capture_output=True)
        rates[nproc] = json.loads((runs / f"mp{nproc}" / "summary.json").read_text())["train_samples_per_second"]
    lines += ["| processes | threads each | samples/s |", "|---|---|---|",
              f"| 1 | {os.cpu_count()} | {rates[1]:.0f} |", f"| 2 | {max(1, (os.cpu_count() or 2) // 2)} | {rates[2]:.0f} |", "",
              f"Ratio 2-process / 1-process: {rates[2] / rates[1]:.2f} (both share the same {os.cpu_count()} cores; "
              "multi-process pays off across machines or GPUs, not on one small CPU).", "",
              f"Total benchmark wall time: {(time.perf_counter() - t0) / 60:.1f} min.", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
