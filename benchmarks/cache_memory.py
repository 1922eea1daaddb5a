"""Peak RAM while training from a teacher cache larger than half of this machine's RAM.

    python benchmarks/cache_memory.py                 # ~10 min on 2 CPU cores, ~14 GB of disk
    python benchmarks/cache_memory.py --views 2       # smaller store (not > RAM/2 here)

A reinforced cache that stores a full-resolution teacher feature map (the first conv block of
the CNN teacher, 32 x 28 x 28, fp16 = 50 KB per view) for K augmented views of every Fashion-
MNIST training image is built, then a FitNets student (CNN w16) trains one epoch from it in a
child process.  When the machine allows it (root, cgroup v1 memory controller), the child runs
under a cgroup memory limit far below the store size: finishing at all shows the store is
memory-mapped, not loaded.  The parent samples the child's /proc status (RssAnon = memory the
process owns; RssFile = mapped store pages, reclaimable page cache) every 0.2 s.

Writes benchmarks/results/cache_memory.md.  All figures come from this script.
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

import torch
import yaml

HERE = Path(__file__).resolve().parent
CGROUP = Path("/sys/fs/cgroup/memory")


def _mem_total() -> int:
    return next(int(l.split()[1]) * 1024 for l in open("/proc/meminfo") if l.startswith("MemTotal"))


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in open(f"/proc/{pid}/status"):
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[key] = int(rest.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def _make_cgroup(limit: int) -> Path | None:
    """A cgroup-v1 memory group with ``limit`` bytes, or None where this machine does not allow it."""
    group = CGROUP / f"distillery-bench-{os.getpid()}"
    try:
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(limit))
        return group
    except OSError:
        return None


def _train_child(cfg_file: Path, group: Path | None) -> dict:
    """Run `distillery distill` in a child (inside ``group``), sampling its memory."""
    cmd = [sys.executable, "-m", "distillery.cli", "distill", str(cfg_file), "--overwrite"]
    if group is not None:  # join the group before exec, so every allocation is charged to it
        cmd = ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh", *cmd]
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0, "VmHWM": 0}
    while child.poll() is None:
        for k, v in _status(child.pid).items():
            peak[k] = max(peak[k], v)
        time.sleep(0.2)
    log = child.stdout.read()
    result = {"returncode": child.returncode, "seconds": time.perf_counter() - t0, "log_tail": log[-2000:], **peak}
    if group is not None:
        result["cgroup_max_usage"] = int((group / "memory.max_usage_in_bytes").read_text())
        result["cgroup_failcnt"] = int((group / "memory.failcnt").read_text())
        oom = (group / "memory.oom_control").read_text()
        result["oom_killed"] = "oom_kill 1" in oom or child.returncode in (-9, 137)
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--views", type=int, default=5, help="augmented views stored per sample (5 -> ~13.5 GB)")
    ap.add_argument("--limit-gib", type=float, default=3.0, help="cgroup memory limit for the training process")
    ap.add_argument("--runs", type=Path, default=HERE / "runs" / "cache_memory")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "cache_memory.md")
    ap.add_argument("--keep", action="store_true", help="keep the store afterwards (it is large)")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    from distillery.cache.from_config import build_from_config
    from distillery.config import config_from_dict
    from distillery.engine import fit

    t0 = time.perf_counter()
    runs = args.runs.resolve()
    runs.mkdir(parents=True, exist_ok=True)
    data = {"name": "fashion_mnist", "batch_size": 128, "augment": {"pad_crop": 2, "flip": True}}
    teacher_dir = runs / "teacher"
    if not (teacher_dir / "summary.json").is_file():
        fit(config_from_dict({"name": "teacher", "output_dir": str(runs), "data": {"name": "fashion_mnist", "batch_size": 128},
                              "student": {"arch": "cnn", "kwargs": {"width": 32}},
                              "train": {"epochs": 1, "progress": False, "report": False}}), overwrite=True)
    store = runs / "store"
    tap = "features.0.2"  # the first block's ReLU: full 28 x 28 resolution, before pooling
    raw = {"name": "fitnets-from-cache", "output_dir": str(runs), "data": data,
           "teacher": {"run": str(teacher_dir), "cache": {"dir": str(store), "views": args.views}},
           "student": {"arch": "cnn", "kwargs": {"width": 16}},
           "method": {"name": "fitnets", "params": {"pairs": [{"student": tap, "teacher": tap}], "feature_weight": 10.0}},
           "train": {"epochs": 1, "progress": False, "report": False}}
    cfg_file = runs / "config.yaml"
    cfg_file.write_text(yaml.safe_dump(raw))
    t_build = time.perf_counter()
    reused = (store / "manifest.json").is_file()
    manifest = build_from_config(cfg_file)
    build_note = (f"built earlier in {manifest['build_seconds']:.0f} s (reused: same fingerprint)" if reused
                  else f"built in {time.perf_counter() - t_build:.0f} s")
    store_bytes = sum(f.stat().st_size for f in store.glob("*.safetensors"))
    # Evict the store from the page cache: its pages were cached (and charged to this process's
    # cgroup) by the build; the training child must read them itself, under its own limit.
    os.sync()
    for f in store.iterdir():
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    ram = _mem_total()
    limit = int(args.limit_gib * 2**30)
    group = _make_cgroup(limit)
    try:
        res = _train_child(cfg_file, group)
    finally:
        if group is not None:
            try:
                group.rmdir()
            except OSError:
                pass
    summary_file = runs / raw["name"] / "summary.json"
    summary = json.loads(summary_file.read_text()) if res["returncode"] == 0 and summary_file.is_file() else {}
    if not args.keep:
        import shutil

        shutil.rmtree(store, ignore_errors=True)

    gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    lines = ["# Teacher cache larger than half of RAM: peak memory while training", "",
             f"- Command: `python benchmarks/cache_memory.py{'' if args.views == 5 else f' --views {args.views}'}`",
             f"- Date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
             f"- Machine: {platform.machine()}, {os.cpu_count()} CPU cores, {gib(ram)} RAM, torch {torch.__version__}, "
             f"Python {platform.python_version()}, no GPU",
             f"- Store: reinforced cache of the CNN w32 teacher over {manifest['num_samples']:,} Fashion-MNIST training images, "
             f"{manifest['views']} augmented views each, logits + feature map `{tap}` (32 x 28 x 28) in fp16: "
             f"**{gib(store_bytes)} on disk = {store_bytes / ram:.2f} x RAM** "
             f"({manifest['bytes_per_sample'] / 1024:.1f} KiB per sample); {build_note}.",
             f"- Training: FitNets on that feature (CNN w16 student, 1 epoch, batch 128) in a child process"
             + (f" inside a cgroup limited to **{gib(limit)}**" if group is not None else
                " (no cgroup available here: unconstrained, so RssFile shows pages touched, not a bound)") + ".", "",
             "- The store's pages are evicted from the page cache (posix_fadvise DONTNEED) after the build, so the "
             "training process reads them itself, charged to its own limit.", "",
             "| | value |", "|---|---|",
             f"| finished | {'yes' if res['returncode'] == 0 else 'NO (return code ' + str(res['returncode']) + ')'} |",
             f"| wall time of the training process | {res['seconds']:.0f} s |",
             f"| peak RssAnon (memory the process owns) | {gib(res['RssAnon'])} |",
             f"| peak RssFile (mapped store pages, reclaimable) | {gib(res['RssFile'])} |",
             f"| peak VmRSS | {gib(res['VmRSS'])} |"]
    if group is not None:
        lines += [f"| cgroup peak usage (incl. page cache) | {gib(res['cgroup_max_usage'])} |",
                  f"| cgroup limit hits (page cache reclaimed) | {res['cgroup_failcnt']:,} |",
                  f"| OOM kill | {'yes' if res.get('oom_killed') else 'no'} |"]
    if summary:
        lines.append(f"| student test accuracy after 1 epoch | {100 * summary['test_accuracy']:.2f}% |")
    lines += ["", "The store is read through numpy.memmap: a batch touches only its rows, pages stay file-backed and the kernel "
              "reclaims them under pressure, so the memory the training process owns (RssAnon) does not grow with the store.", ""]
    if res["returncode"] != 0:
        lines += ["Training log tail:", "", "```", res["log_tail"], "```", ""]
    lines.append(f"Total benchmark wall time: {(time.perf_counter() - t0) / 60:.1f} min.")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
