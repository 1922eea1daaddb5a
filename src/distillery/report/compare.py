"""The leaderboard: runs ranked by test accuracy, repeats over seeds grouped as mean ± std.

    from distillery.report import group_runs
    for g in group_runs(["runs/"]):                 # a directory of runs, or run directories
        print(g.label, g.method, g.student, g.n, g.mean("test_accuracy"), g.std("test_accuracy"))

Two runs are repeats of one experiment when their configs are equal except for ``train.seed``
and ``name`` (and ``output_dir`` / ``train.progress``, which change where and how verbosely a
run is written, not what it trains).  :func:`group_runs` is what benchmark scripts use to build
their tables; :func:`compare_runs` is ``distillery compare``: it also writes ``compare.md`` and
``pareto.png``.
"""
from __future__ import annotations

import json
import os
import re
import statistics
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from distillery.config import RunConfig
from distillery.errors import DistilleryError
from distillery.report import plots
from distillery.report.render import Document, Image, Paragraph, Table, to_markdown
from distillery.report.runs import Run, describe_model, find_runs, finite

__all__ = ["RunGroup", "experiment_key", "group_runs", "leaderboard_table", "compare_runs", "CompareResult", "find_runs"]

#: Config fields that do not define the experiment (dotted paths).
IGNORED_FIELDS = ("name", "output_dir", "train.seed", "train.progress")


def experiment_key(cfg: RunConfig) -> str:
    """The config as canonical JSON without :data:`IGNORED_FIELDS`: equal keys = repeats."""
    raw = cfg.model_dump(mode="json")
    for dotted in IGNORED_FIELDS:
        *parents, leaf = dotted.split(".")
        node = raw
        for p in parents:
            node = node.get(p) or {}
        node.pop(leaf, None)
    return json.dumps(raw, sort_keys=True)


@dataclass
class RunGroup:
    """Runs of one experiment (same config but for the seed and name)."""

    runs: list[Run]

    @property
    def config(self) -> RunConfig:
        return self.runs[0].config

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def seeds(self) -> list[int]:
        return [r.config.train.seed for r in self.runs]

    @property
    def label(self) -> str:
        """The runs' common name: ``kd-s0`` and ``kd-s1`` give ``kd``."""
        names = [r.name for r in self.runs]
        if len(names) == 1:
            return names[0]
        stems = {re.sub(r"[-_.]?(?:seed|s)?\d+$", "", n) for n in names}
        return stems.pop() if len(stems) == 1 and "" not in stems else ", ".join(names)

    @property
    def method(self) -> str:
        return self.config.method.name

    @property
    def student(self) -> str:
        return describe_model(self.config.student)

    def values(self, key: str) -> list[float]:
        """``summary.json[key]`` of each run that has a finite value."""
        return [v for v in (finite(r.summary.get(key)) for r in self.runs) if v is not None]

    def mean(self, key: str = "test_accuracy") -> float | None:
        vals = self.values(key)
        return statistics.mean(vals) if vals else None

    def std(self, key: str = "test_accuracy") -> float | None:
        """Sample standard deviation over seeds (0 for a single run)."""
        vals = self.values(key)
        return statistics.stdev(vals) if len(vals) > 1 else (0.0 if vals else None)

    @property
    def latency_ms(self) -> float | None:
        """Mean batch-1 latency over the runs whose ``latency.json`` exists (written by
        ``distillery report``); ``None`` when no run of the group was measured."""
        vals = []
        for r in self.runs:
            try:
                vals.append(float(json.loads((r.dir / "latency.json").read_text())["batch1_median_ms"]))
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return statistics.mean(vals) if vals else None

    @property
    def latency_threads(self) -> int | None:
        for r in self.runs:
            try:
                return int(json.loads((r.dir / "latency.json").read_text())["threads"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return None


def group_runs(runs, *, metric: str = "test_accuracy") -> list[RunGroup]:
    """Group runs (``Run`` objects, run directories, or directories of runs) into experiments,
    ranked by the mean of ``metric`` (best first; groups without it last)."""
    runs = list(runs)
    loaded = [r for r in runs if isinstance(r, Run)]
    paths = [r for r in runs if not isinstance(r, Run)]
    loaded += find_runs(paths) if paths else []
    groups: dict[str, list[Run]] = {}
    seen: set[Path] = set()
    for r in loaded:
        if r.dir.resolve() in seen:  # the same run named twice (e.g. a dir and its parent)
            continue
        seen.add(r.dir.resolve())
        groups.setdefault(experiment_key(r.config), []).append(r)
    result = [RunGroup(sorted(rs, key=lambda r: (r.config.train.seed, r.name))) for rs in groups.values()]
    return sorted(result, key=lambda g: (g.mean(metric) is None, -(g.mean(metric) or 0.0), g.label))


# ----------------------------------------------------------------------------------------------
# Tables and the command


def _acc(g: RunGroup) -> str:
    m, s = g.mean("test_accuracy"), g.std("test_accuracy")
    if m is None:
        return "—"
    return f"{100 * m:.2f} ± {100 * s:.2f}" if g.n > 1 else f"{100 * m:.2f}"


def leaderboard_table(groups: list[RunGroup]) -> tuple[list[str], list[list[str]]]:
    """Header and rows (strings) of the ranked table: the same for Markdown and the terminal."""
    header = ["rank", "run", "method", "student", "n", "test accuracy (%)", "params", "latency b1 (ms)"]
    rows = []
    for i, g in enumerate(groups, 1):
        params = g.values("params")
        lat = g.latency_ms
        rows.append([str(i), g.label, g.method, g.student, str(g.n), _acc(g),
                     f"{int(params[0]):,}" if params else "—", f"{lat:.3f}" if lat is not None else "—"])
    return header, rows


@dataclass
class CompareResult:
    groups: list[RunGroup]
    markdown: Path
    pareto: Path | None


def compare_runs(paths, out: str | Path | None = None) -> CompareResult:
    """``distillery compare``: rank the runs in ``paths`` and write ``compare.md`` and
    ``pareto.png`` into ``out`` (default: the runs' common parent directory)."""
    groups = group_runs(paths)
    dirs = [r.dir.resolve() for g in groups for r in g.runs]
    if out is None:
        out = Path(os.path.commonpath([d.parent for d in dirs]))
        if out == Path(out.anchor):
            raise DistilleryError("these runs share no parent directory but the filesystem root; "
                                  "say where compare.md goes with --out DIR")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    header, rows = leaderboard_table(groups)
    doc = Document("Distillery leaderboard")
    doc.add(Paragraph(
        f"{len(dirs)} runs in {len(groups)} groups, written {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}. "
        "Runs whose configs differ only in train.seed and name are one group: test accuracy is the mean ± "
        "sample standard deviation over its n seeds. Latency is the batch-1 CPU median from each run's "
        "latency.json (written by `distillery report`), '—' where not measured."))
    doc.add(Table(header, rows, align=["r", "l", "l", "l", "r", "r", "r", "r"]))

    pareto_path = None
    scored = [g for g in groups if g.mean() is not None]
    if scored:
        use_latency = all(g.latency_ms is not None for g in scored)
        points = [plots.Point(g.label, g.latency_ms if use_latency else float((g.values("params") or [0])[0]), g.mean())
                  for g in scored]
        threads = scored[0].latency_threads
        xlabel = f"CPU latency at batch 1, median (ms, {threads} torch threads)" if use_latency else "parameters"
        pareto_path = plots.pareto(points, out / "pareto.png", xlabel=xlabel, title="leaderboard: accuracy vs cost")
        doc.add(Image(pareto_path, f"Mean test accuracy vs {xlabel} per group; the orange line is the Pareto front."))
    md = out / "compare.md"
    md.write_text(to_markdown(doc, out))
    return CompareResult(groups, md, pareto_path)
