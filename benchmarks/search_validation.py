"""Do training-free proxies rank students the way distillation does?  (issue 8)

    python benchmarks/search_validation.py            # 30 architectures, 10 epochs, 1,000 images (about an hour on 2 cores)
    python benchmarks/search_validation.py --quick    # 4 small architectures, 1 epoch, 200 images (smoke run, ~2 min)

Samples ``--n`` distinct architectures from the space and limits of ``--config`` (default
configs/search_fmnist.yaml), scores each with every proxy (at random initialisation, as
DisWOT does; the DisWOT proxies also against the trained teacher), then trains each twice
with the same budget: distilled (the config's method, from the cached teacher) and from
scratch (ce).  Reports Kendall tau and Spearman rho between every proxy and both accuracies,
the time to score every candidate vs the time to distil every candidate, and one real
``distillery search`` run whose top candidate is distilled next to the config's hand-picked
student.  Writes benchmarks/results/search_validation.md.  Every number in that file comes
from this script; rerun it rather than editing the file.  Finished runs are reused (same
config), so an interrupted run resumes.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from scipy import stats

from distillery.cache import StaleCacheError
from distillery.config import RunConfig, config_from_dict, dump_config, load_config
from distillery.data import load_data
from distillery.engine import fit
from distillery.report.metrics import machine_description
from distillery.search import PROXIES, load_search_config, run_search
from distillery.search.proxies import TEACHER_PROXIES
from distillery.search.runner import proxy_batch, search_teacher
from distillery.search.space import Space

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


REUSED: list[str] = []  # runs finished by an earlier invocation (their times are their own)


def _fit(cfg: RunConfig, data) -> dict:
    done = cfg.run_dir / "summary.json"
    if done.is_file() and dump_config(load_config(cfg.run_dir / "config.yaml")) == dump_config(cfg):
        REUSED.append(cfg.name)
        return json.loads(done.read_text())
    try:
        return fit(cfg, overwrite=True, data=data).summary
    except StaleCacheError:  # the teacher or the data changed since an earlier run of this script
        return fit(cfg, overwrite=True, data=data, rebuild_cache=True).summary


def _teacher_run(args, runs: Path, teacher_run: str) -> str:
    """The config's teacher run, trained here when it is missing (quick: a one-epoch teacher)."""
    if (Path(teacher_run) / "model.safetensors").is_file() and not args.quick:
        return teacher_run
    raw = {"name": "teacher", "output_dir": str(runs), "data": {"name": "fashion_mnist", "batch_size": 128},
           "student": {"arch": "cnn", "kwargs": {"width": 32}}, "method": {"name": "ce"},
           "train": {"epochs": 3, "optimizer": {"name": "adam", "lr": 1e-3}, "scheduler": {"name": "cosine"},
                     "progress": False, "report": False}}
    if args.quick:
        raw["data"].update(train_subset=1000, val_fraction=0.02)
        raw["train"]["epochs"] = 1
    cfg = config_from_dict(raw)
    print(f"training the teacher into {cfg.run_dir}", flush=True)
    _fit(cfg, None)
    return str(cfg.run_dir)


def _fmt(v: float, digits: int = 3) -> str:
    return "nan" if v != v else f"{v:+.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "search_fmnist.yaml")
    ap.add_argument("--n", type=int, default=30, help="architectures sampled from the space")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--subset", type=int, default=1000, help="labelled training images")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="4 architectures under 2M MACs, 1 epoch, 200 images, a tiny search")
    ap.add_argument("--runs", type=Path, default=HERE / "runs" / "search_validation")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "search_validation.md")
    args = ap.parse_args()
    if args.quick:
        args.n, args.epochs, args.subset = 4, 1, 200
    torch.set_num_threads(1)
    t0 = time.perf_counter()

    base = load_search_config(args.config)
    teacher = _teacher_run(args, args.runs, base.run["teacher"]["run"])
    overrides = [f"run.output_dir={args.runs}", f"run.data.train_subset={args.subset}", f"run.train.epochs={args.epochs}",
                 "run.train.progress=false", "run.train.report=false", f"run.train.eval_every={args.epochs}",
                 f"run.teacher.run={teacher}",
                 "run.teacher.cache=true", f"search.seed={args.seed}"]
    if args.quick:  # small and cheap students, a small validation split: a smoke run in about two minutes
        overrides += ["search.population=4", "search.sample_size=2", "search.cycles=4",
                      "search.constraints.max_macs=2000000", "run.data.val_fraction=0.02"]
    scfg = load_search_config(args.config, overrides)
    run = scfg.reference_run()
    data = load_data(run.data)
    s = scfg.search

    # ---- sample N distinct feasible architectures
    space = Space.for_data(s.space, s.constraints, data, seed=s.seed)
    rng = random.Random(args.seed)
    archs = []
    for _ in range(50 * args.n):
        c = space.sample(rng)
        if c not in archs:
            archs.append(c)
        if len(archs) == args.n:
            break
    print(f"[{time.perf_counter() - t0:5.0f}s] {len(archs)} architectures from a space of {len(space)}", flush=True)

    # ---- proxies (random-init teacher as DisWOT; the DisWOT proxies also vs the trained teacher)
    batch = proxy_batch(data, s.batch_size, s.seed)
    random_teacher = search_teacher(scfg.model_copy(update={"search": s.model_copy(update={"teacher_init": "random"})}), run, data)
    trained_teacher = search_teacher(scfg.model_copy(update={"search": s.model_copy(update={"teacher_init": "trained"})}), run, data)
    variants = [(name, fn, random_teacher) for name, fn in PROXIES.items()]
    variants += [(f"{name} (trained teacher)", PROXIES[name], trained_teacher) for name in PROXIES if name in TEACHER_PROXIES]
    scores = {name: [] for name, _, _ in variants}
    proxy_seconds = {name: 0.0 for name, _, _ in variants}
    for c in archs:
        for name, fn, teacher_model in variants:
            start = time.perf_counter()
            scores[name].append(fn(teacher_model, space.build(c), batch))
            proxy_seconds[name] += time.perf_counter() - start

    # ---- distil and train from scratch, same budget
    kd, ce, kd_seconds = [], [], []
    for i, c in enumerate(archs):
        print(f"[{time.perf_counter() - t0:5.0f}s] {i + 1}/{len(archs)} {c.key}", flush=True)
        cfg = scfg.candidate_run(c.spec(), f"arch{i:02d}-{run.method.name}")
        summary = _fit(cfg, data)
        kd.append(summary["test_accuracy"])
        kd_seconds.append(summary["wall_seconds"])
        raw = cfg.model_dump(mode="json")
        raw.update(name=f"arch{i:02d}-ce", teacher=None, method={"name": "ce"})
        ce.append(_fit(config_from_dict(raw), data)["test_accuracy"])

    # ---- a real search, and its top candidate vs the hand-picked student
    print(f"[{time.perf_counter() - t0:5.0f}s] search ({s.proxy})", flush=True)
    result = run_search(scfg, data=data, progress=False)
    top1 = _fit(load_config(result.top[0].config), data)
    ref = _fit(load_config(result.reference.config), data) if result.reference else None

    # ---- the table
    def corr(x, y):
        if len(set(x)) < 2 or len(set(y)) < 2:
            return float("nan"), float("nan"), float("nan"), float("nan")
        tau, p_tau = stats.kendalltau(x, y)
        rho, p_rho = stats.spearmanr(x, y)
        return tau, p_tau, rho, p_rho

    distil_total = sum(kd_seconds)
    cmd = "python benchmarks/search_validation.py" + (" --quick" if args.quick else "") + \
          ("" if args.config == ROOT / "configs" / "search_fmnist.yaml" else f" --config {args.config}")
    lines = [
        "# Training-free student search: do the proxies predict distilled accuracy?",
        "",
        f"- Command: `{cmd}`" + (" (**smoke run: too few architectures for the correlations to mean anything**)" if args.quick else ""),
        f"- Date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; total wall time {(time.perf_counter() - t0) / 60:.1f} min"
        + (f" ({len(REUSED)} finished runs reused from an earlier invocation)" if REUSED else ""),
        f"- Machine: {machine_description()}, Python {platform.python_version()}, torch {torch.__version__}, "
        f"torch threads 1, {os.cpu_count()} CPU cores, no GPU",
        f"- Space and limits: `{args.config.relative_to(ROOT) if args.config.is_relative_to(ROOT) else args.config}` "
        f"({len(space)} architectures; limits {s.constraints.model_dump(exclude_defaults=True)}"
        f"{', validation split 2%' if args.quick else ''}); "
        f"{len(archs)} distinct architectures sampled uniformly (seed {args.seed}).",
        f"- Teacher: `{teacher}` ({'one-epoch smoke teacher' if args.quick else 'the config teacher'}), "
        "outputs cached (`teacher.cache: true`).",
        f"- Budget per student: {args.subset:,} labelled Fashion-MNIST training images, {args.epochs} epoch(s), "
        f"batch {run.data.batch_size}, {run.train.optimizer.name} lr {run.train.optimizer.lr:g}, seed {run.train.seed}, one run each; "
        f"distilled = `{run.method.name}` {run.method.params or ''}, scratch = `ce`. Test = the official 10k test set.",
        f"- Proxies: one batch of {s.batch_size} training images; every model at a seeded random initialisation "
        "(the DisWOT proxies also against the trained teacher).",
        "",
        "## Rank correlation with accuracy",
        "",
        "| proxy | Kendall τ (distilled) | Spearman ρ (distilled) | Kendall τ (scratch) | Spearman ρ (scratch) | "
        f"time for {len(archs)} archs (s) |",
        "|---|---|---|---|---|---|",
    ]
    for name in scores:
        t_kd, p_kd, r_kd, q_kd = corr(scores[name], kd)
        t_ce, p_ce, r_ce, q_ce = corr(scores[name], ce)
        lines.append(f"| `{name}` | {_fmt(t_kd)} (p {p_kd:.2g}) | {_fmt(r_kd)} (p {q_kd:.2g}) | {_fmt(t_ce)} (p {p_ce:.2g}) | "
                     f"{_fmt(r_ce)} (p {q_ce:.2g}) | {proxy_seconds[name]:.2f} |")
    t_dc, p_dc, r_dc, q_dc = corr(kd, ce)
    lines += [
        f"| distilled vs scratch accuracy | {_fmt(t_dc)} (p {p_dc:.2g}) | {_fmt(r_dc)} (p {q_dc:.2g}) | | | |",
        "",
        "Positive = a higher score goes with a higher accuracy. With one training run per architecture, "
        "differences between architectures smaller than the seed noise blur every correlation.",
        "",
        "## Cost: scoring vs distilling every candidate",
        "",
        f"- Distilling all {len(archs)} candidates: {distil_total:.1f} s (mean {statistics.mean(kd_seconds):.1f} s each, wall time incl. evaluation).",
        f"- Scoring all {len(archs)} with `{s.proxy}`: {proxy_seconds[s.proxy]:.2f} s -> "
        f"**{distil_total / max(proxy_seconds[s.proxy], 1e-9):.0f}x** cheaper (DisWOT reports >= 180x vs training-based search).",
        f"- The evolutionary search (`distillery search`, population {s.population}, {s.cycles} cycles) took {result.seconds:.1f} s for "
        f"{len(result.rows)} distinct architectures (cost measurement and latency timing included); distilling those would take "
        f"about {len(result.rows) * statistics.mean(kd_seconds):.0f} s "
        f"({len(result.rows) * statistics.mean(kd_seconds) / max(result.seconds, 1e-9):.0f}x).",
        "",
        "## The search's top candidate vs the hand-picked student",
        "",
        "| student | architecture | proxy score | params | MACs | distilled test accuracy (%) |",
        "|---|---|---|---|---|---|",
        f"| search top-1 | `{result.top[0].candidate.key}` | {result.top[0].score:.5g} | {result.top[0].cost.params:,} | "
        f"{result.top[0].cost.macs:,} | {100 * top1['test_accuracy']:.2f} |",
    ]
    if ref is not None:
        r = result.reference
        lines.append(f"| hand-picked | `{r.candidate.key}` | {r.score:.5g} | {r.cost.params:,} | {r.cost.macs:,} | "
                     f"{100 * ref['test_accuracy']:.2f} |")
    lines += ["", "## Per architecture", "",
              "| # | architecture | distilled acc (%) | scratch acc (%) | " + " | ".join(f"`{n}`" for n in PROXIES) + " |",
              "|---|---|---|---|" + "---|" * len(PROXIES)]
    for i, c in enumerate(archs):
        lines.append(f"| {i} | `{c.key}` | {100 * kd[i]:.2f} | {100 * ce[i]:.2f} | "
                     + " | ".join(f"{scores[n][i]:.4g}" for n in PROXIES) + " |")
    lines.append("")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
