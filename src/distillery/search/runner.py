"""``distillery search``: rank the space by a proxy, write the top-k as ready-to-run configs.

Outputs in ``<run.output_dir>/<run.name>/``:

* ``top1.yaml .. topK.yaml`` -- distil configs (the ``run`` section with the candidate as student),
* ``search.md`` -- the top-k table (score, parameters, MACs, latency), the settings and the time,
* ``candidates.csv`` -- every architecture scored,
* ``pareto.png`` -- proxy score vs parameters and vs MACs, the Pareto front marked,
* ``search.json`` -- the same, machine-readable.

``distill_top`` then trains the top configs (and the hand-picked ``run.student``, if any) with
:func:`distillery.engine.fit` and writes ``distilled.md``.
"""
from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distillery.config import RunConfig, dump_config, load_config
from distillery.data import DataBundle, load_data
from distillery.errors import ModelError
from distillery.search.config import SearchConfig
from distillery.search.evolution import SearchProgress, regularized_evolution
from distillery.search.proxies import get_proxy
from distillery.search.space import Candidate, Cost, Space, stable_seed


@dataclass
class Row:
    candidate: Candidate
    score: float
    cost: Cost
    config: Path | None = None


@dataclass
class SearchResult:
    out_dir: Path
    proxy: str
    rows: list[Row]  # every feasible architecture scored, best first
    top: list[Row]
    reference: Row | None
    seconds: float
    evaluations: int
    files: dict[str, Path] = field(default_factory=dict)
    data: DataBundle | None = field(default=None, repr=False)  # reused by distill_top


# ---------------------------------------------------------------------------------------------
# Inputs: teacher, batch


def search_teacher(cfg: SearchConfig, run: RunConfig, data: DataBundle) -> nn.Module:
    """The model candidates are compared with: the teacher's architecture at a random
    initialisation fixed by the seed (``teacher_init: random``, as DisWOT does), or the trained
    teacher.  For an ensemble the first member stands for the teacher."""
    from distillery.engine import load_teacher
    from distillery.models import build_model

    if cfg.search.teacher_init == "trained":
        return load_teacher(run, data)
    source = run.teacher.sources[0]
    if source.run is not None:
        run_cfg = Path(source.run) / "config.yaml"
        if not run_cfg.is_file():
            raise ModelError(f"teacher.run '{source.run}' has no config.yaml; train the teacher first "
                             f"(e.g. `distillery train configs/teacher_fmnist.yaml`)")
        spec = load_config(run_cfg).student
    else:
        spec = source.model
    spec = spec.model_copy(update={"weights": None})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stable_seed(cfg.search.seed, "teacher"))
        return build_model(spec, in_channels=data.in_channels, num_classes=data.num_classes, input_size=data.input_size)


def proxy_batch(data: DataBundle, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` training rows drawn with a seeded generator."""
    g = torch.Generator().manual_seed(stable_seed(seed, "batch"))
    rows = torch.randperm(len(data.train), generator=g)[: min(size, len(data.train))]
    part = data.train.take(rows)
    return part.inputs, part.labels


# ---------------------------------------------------------------------------------------------
# The search


def run_search(cfg: SearchConfig, *, data: DataBundle | None = None, progress: bool = True) -> SearchResult:
    """Evolve, rank, and write the outputs (see the module docstring)."""
    t0 = time.perf_counter()
    s = cfg.search
    run = cfg.reference_run()
    data = data or load_data(run.data)
    teacher = search_teacher(cfg, run, data)
    batch = proxy_batch(data, s.batch_size, s.seed)
    space = Space.for_data(s.space, s.constraints, data, seed=s.seed, family_mutation=s.family_mutation)
    proxy = get_proxy(s.proxy)

    def score(c: Candidate) -> float:
        return proxy(teacher, space.build(c), batch)

    with SearchProgress(s.population + s.cycles, title=f"search ({s.proxy})", enabled=progress) as bar:
        evo = regularized_evolution(sample=space.sample, mutate=space.mutate, score=score, population=s.population,
                                    sample_size=s.sample_size, cycles=s.cycles, seed=s.seed, progress=bar)
    rows = [Row(e.candidate, e.score, space.cost(e.candidate)) for e in evo.ranked()]

    reference = None
    if cfg.reference_student is not None:
        c = Candidate.make(cfg.reference_student.arch, cfg.reference_student.kwargs)
        reference = Row(c, score(c), _unconstrained_cost(space, c))

    out = cfg.output_dir
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("top*.yaml"):  # from an earlier search with a larger top_k
        stale.unlink()
    top = rows[: s.top_k]
    for i, row in enumerate(top, start=1):
        row.config = out / f"top{i}.yaml"
        row.config.write_text(f"# distillery search: rank {i} of {len(rows)} by {s.proxy} ({row.candidate.key})\n"
                              + dump_config(cfg.candidate_run(row.candidate.spec(), f"{run.name}-top{i}")))
    if reference is not None:
        reference.config = out / "reference.yaml"
        reference.config.write_text("# the hand-picked student of the search config, for comparison\n"
                                    + dump_config(cfg.candidate_run(reference.candidate.spec(), f"{run.name}-reference")))
    result = SearchResult(out, s.proxy, rows, top, reference, time.perf_counter() - t0, len(evo.history), data=data)
    result.files = {
        "csv": _write_csv(rows, out / "candidates.csv"),
        "pareto": write_pareto_png(rows, out / "pareto.png", proxy=s.proxy, top=top, reference=reference),
    }
    result.files["markdown"] = _write_markdown(result, cfg, data, out / "search.md")
    result.files["json"] = _write_json(result, cfg, out / "search.json")
    return result


def _unconstrained_cost(space: Space, c: Candidate) -> Cost:
    """Cost of an architecture that may lie outside the space or its limits (the reference)."""
    from distillery.models import count_parameters
    from distillery.report.metrics import count_macs, measure_latency

    model = space.build(c)
    latency = None
    if space.constraints.max_latency_ms is not None:
        latency = measure_latency(model, space.latency_inputs, warmup=2, repeats=20, throughput_repeats=1,
                                  budget_s=space.constraints.latency_budget_s)["batch1_median_ms"]
    return Cost(count_parameters(model), count_macs(model, space._example()), latency)


# ---------------------------------------------------------------------------------------------
# Outputs


def pareto_front(costs: list[float], scores: list[float]) -> list[int]:
    """Indices of the points no other point beats on both cost (lower) and score (higher),
    by increasing cost."""
    order = sorted(range(len(costs)), key=lambda i: (costs[i], -scores[i]))
    front, best = [], float("-inf")
    for i in order:
        if scores[i] > best:
            front.append(i)
            best = scores[i]
    return front


def _fmt_int(n: int | None) -> str:
    return "—" if n is None else f"{n:,}"


def _fmt_score(v: float) -> str:
    return f"{v:.6g}" if math.isfinite(v) else str(v)


def _write_csv(rows: list[Row], path: Path) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["rank", "arch", "kwargs", "score", "params", "macs", "latency_ms"])
        for i, r in enumerate(rows, start=1):
            w.writerow([i, r.candidate.arch, json.dumps(r.candidate.kwargs_dict()), r.score, r.cost.params, r.cost.macs,
                        "" if r.cost.latency_ms is None else f"{r.cost.latency_ms:.4f}"])
    return path


def _row_line(label: str, r: Row) -> str:
    lat = "—" if r.cost.latency_ms is None else f"{r.cost.latency_ms:.3f}"
    cfg = f"`{r.config.name}`" if r.config else ""
    return f"| {label} | `{r.candidate.key}` | {_fmt_score(r.score)} | {_fmt_int(r.cost.params)} | {_fmt_int(r.cost.macs)} | {lat} | {cfg} |"


def _write_markdown(res: SearchResult, cfg: SearchConfig, data: DataBundle, path: Path) -> Path:
    s = cfg.search
    lim = s.constraints.model_dump(exclude_defaults=True)
    lines = [
        f"# Student search: {cfg.reference_run().name}",
        "",
        f"- Proxy: `{s.proxy}` (higher is better), teacher at {'its trained weights' if s.teacher_init == 'trained' else 'random initialisation'}; "
        f"batch of {s.batch_size} training samples; data: {data.describe()}.",
        f"- Aging evolution: population {s.population}, tournament {s.sample_size}, {s.cycles} cycles, seed {s.seed}: "
        f"{res.evaluations} evaluations, {len(res.rows)} distinct architectures, {res.seconds:.1f} s.",
        f"- Space: {', '.join(s.space)}; limits: {lim or 'none'}.",
        f"- Date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}.",
        "",
        "| rank | architecture | score | params | MACs | latency (ms) | config |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [_row_line(str(i), r) for i, r in enumerate(res.top, start=1)]
    if res.reference is not None:
        lines.append(_row_line("hand-picked", res.reference))
    lines += ["", "Distil one: `distillery distill <config>`; all of them: `distillery search CONFIG --distill-top K`.",
              "Every scored architecture: `candidates.csv`; score vs cost: `pareto.png`.", ""]
    path.write_text("\n".join(lines))
    return path


def _write_json(res: SearchResult, cfg: SearchConfig, path: Path) -> Path:
    def row(r: Row) -> dict[str, Any]:
        return {"arch": r.candidate.arch, "kwargs": r.candidate.kwargs_dict(), "score": r.score,
                "params": r.cost.params, "macs": r.cost.macs, "latency_ms": r.cost.latency_ms,
                "config": str(r.config) if r.config else None}

    path.write_text(json.dumps({
        "proxy": res.proxy, "seconds": res.seconds, "evaluations": res.evaluations,
        "search": cfg.search.model_dump(mode="json"),
        "top": [row(r) for r in res.top], "reference": row(res.reference) if res.reference else None,
        "candidates": [row(r) for r in res.rows],
    }, indent=2, default=str))
    return path


def write_pareto_png(rows: list[Row], path: Path, *, proxy: str, top: list[Row] | None = None,
                     reference: Row | None = None) -> Path:
    """Proxy score vs parameters (left) and vs MACs (right): every scored architecture by
    family, the Pareto front (cheapest for its score), the top-k numbered, the hand-picked star."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2))
    axes = fig.subplots(1, 2)
    families = list(dict.fromkeys(r.candidate.arch for r in rows))
    scores = [r.score for r in rows]
    finite = [v for v in scores if math.isfinite(v)]
    log_y = bool(finite) and min(finite) > 0 and max(finite) / min(finite) > 1e3
    for ax, attr, label in ((axes[0], "params", "parameters"), (axes[1], "macs", "MACs")):
        costs = [getattr(r.cost, attr) for r in rows]
        for fam in families:
            pts = [(c, s) for c, s, r in zip(costs, scores, rows) if r.candidate.arch == fam and math.isfinite(s)]
            if pts:
                ax.scatter(*zip(*pts), s=18, alpha=0.7, label=fam)
        front = [i for i in pareto_front(costs, scores) if math.isfinite(scores[i])]
        if front:
            ax.plot([costs[i] for i in front], [scores[i] for i in front], "k--", lw=1, label="Pareto front")
        for i, r in enumerate(top or [], start=1):
            ax.annotate(str(i), (getattr(r.cost, attr), r.score), textcoords="offset points", xytext=(4, 4), fontsize=9, weight="bold")
        if reference is not None and math.isfinite(reference.score):
            ax.scatter([getattr(reference.cost, attr)], [reference.score], marker="*", s=160, c="red", label="hand-picked")
        ax.set_xscale("log")
        if log_y:
            ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel(f"{proxy} score (higher is better)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="best")
    fig.suptitle(f"Training-free student search: {proxy} vs cost ({len(rows)} architectures)")
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


# ---------------------------------------------------------------------------------------------
# Then distil


def distill_top(result: SearchResult, k: int, *, data: DataBundle | None = None, overwrite: bool = False) -> Path:
    """Distil the top ``k`` configs (and the hand-picked reference) with :func:`distillery.engine.fit`;
    write ``distilled.md`` next to the search outputs and return its path."""
    from distillery.engine import fit

    todo = [(f"top{i}", r) for i, r in enumerate(result.top[:k], start=1)]
    if result.reference is not None:
        todo.append(("hand-picked", result.reference))
    lines = ["# Distilled search candidates", "",
             f"Top {min(k, len(result.top))} by `{result.proxy}`" + (" and the hand-picked student" if result.reference else "")
             + ", each distilled with the search config's `run` section.", "",
             "| candidate | architecture | score | params | MACs | test accuracy (%) | train time (s) | run |",
             "|---|---|---|---|---|---|---|---|"]
    for label, row in todo:
        cfg = load_config(row.config)
        summary = fit(cfg, overwrite=overwrite, data=data or result.data).summary
        lines.append(f"| {label} | `{row.candidate.key}` | {_fmt_score(row.score)} | {_fmt_int(row.cost.params)} | "
                     f"{_fmt_int(row.cost.macs)} | {100 * summary['test_accuracy']:.2f} | {summary['train_seconds']:.1f} | "
                     f"`{cfg.run_dir}` |")
    path = result.out_dir / "distilled.md"
    path.write_text("\n".join(lines) + "\n")
    return path
