"""The report's PNG plots, drawn with matplotlib's Agg renderer.

Figures are made with ``matplotlib.figure.Figure`` directly instead of ``pyplot``: no global
backend is switched and no figure is left registered, so calling these from a notebook or a
training script has no side effect on the user's own plotting.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

DPI = 110


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)  # attach the Agg canvas: PNG output without pyplot
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def _values(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(epochs, values) of ``key`` over the metric rows, skipping missing and NaN entries."""
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            xs.append(r.get("epoch", len(xs) + 1))
            ys.append(float(v))
    return xs, ys


def learning_curves(rows: list[dict[str, Any]], path: Path, *, teacher_accuracy: float | None = None,
                    test_accuracy: float | None = None, title: str = "") -> Path:
    """Left: the train loss and each named loss term per epoch.  Right: validation accuracy per
    epoch, with the teacher's test accuracy as a dashed reference line."""
    fig = Figure(figsize=(11, 4))
    ax_loss, ax_acc = fig.subplots(1, 2)
    terms = sorted({k for r in rows for k in r if k.startswith("train_") and k != "train_loss"})
    xs, ys = _values(rows, "train_loss")
    if xs:
        ax_loss.plot(xs, ys, "k-o", lw=2, ms=3, label="train loss (sum)")
    for key in terms:
        xs, ys = _values(rows, key)
        if xs:
            ax_loss.plot(xs, ys, "-o", ms=3, label=key[len("train_"):])
    ax_loss.set(xlabel="epoch", ylabel="loss (epoch mean)", title="loss terms")
    if ax_loss.lines:
        ax_loss.legend(fontsize=8)

    xs, ys = _values(rows, "val_accuracy")
    if xs:
        ax_acc.plot(xs, [100 * y for y in ys], "-o", ms=3, color="tab:blue", label="student val accuracy")
    else:
        ax_acc.text(0.5, 0.5, "no validation accuracy recorded", ha="center", va="center", transform=ax_acc.transAxes)
    if teacher_accuracy is not None:
        ax_acc.axhline(100 * teacher_accuracy, ls="--", color="tab:red", label=f"teacher test accuracy ({100 * teacher_accuracy:.2f}%)")
    if test_accuracy is not None and rows:
        ax_acc.plot([rows[-1].get("epoch", len(rows))], [100 * test_accuracy], "*", ms=12, color="tab:green",
                    label=f"student test accuracy ({100 * test_accuracy:.2f}%)")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if ax_acc.lines:
        ax_acc.legend(fontsize=8, loc="lower right")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def confusion(cm, class_names: list[str], path: Path, *, title: str = "confusion matrix") -> Path:
    """Row-normalised confusion matrix (true class down, predicted class across), with counts."""
    import numpy as np

    counts = np.asarray(cm, dtype=float)
    rates = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    n = len(class_names)
    size = max(4.0, 0.4 * n + 2)
    fig = Figure(figsize=(size + 1, size))
    ax = fig.subplots()
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    if n <= 30:  # beyond that, numbers in cells are unreadable
        for i in range(n):
            for j in range(n):
                if counts[i, j]:
                    ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", fontsize=7,
                            color="white" if rates[i, j] > 0.5 else "black")
        ax.set_xticks(range(n), class_names, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(n), class_names, fontsize=8)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    return _save(fig, path)


def per_class_change(deltas: list[float], class_names: list[str], path: Path, *, title: str) -> Path:
    """Bar chart of the per-class accuracy change in points (green up, red down)."""
    n = len(class_names)
    fig = Figure(figsize=(max(6, 0.45 * n + 2), 3.8))
    ax = fig.subplots()
    values = [100 * d if math.isfinite(d) else 0.0 for d in deltas]
    ax.bar(range(n), values, color=["tab:green" if v >= 0 else "tab:red" for v in values])
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(n), class_names, rotation=45 if n > 6 else 0, ha="right" if n > 6 else "center", fontsize=8)
    ax.set(ylabel="accuracy change (points)", title=title)
    return _save(fig, path)


@dataclass
class Point:
    """One run on the accuracy/cost plane."""

    label: str
    x: float  # latency (ms) or another cost; lower is better
    y: float  # accuracy in [0, 1]; higher is better
    current: bool = False  # the run the report is about
    is_teacher: bool = False


def pareto_front(points: list[Point]) -> list[Point]:
    """Points no other point beats on both axes (lower-or-equal cost and higher-or-equal
    accuracy, one strictly), sorted by cost."""
    front, best = [], -math.inf
    for p in sorted(points, key=lambda p: (p.x, -p.y)):
        if p.y > best:
            front.append(p)
            best = p.y
    return front


def pareto(points: list[Point], path: Path, *, xlabel: str, title: str = "accuracy vs cost",
           log_x: bool = True) -> Path:
    """Scatter of all points, the Pareto front joined and highlighted, the current run starred."""
    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    front = pareto_front(points)
    on_front = {id(p) for p in front}
    rest = [p for p in points if id(p) not in on_front]
    if rest:
        ax.scatter([p.x for p in rest], [100 * p.y for p in rest], s=30, color="0.6", label="run")
    if front:
        ax.plot([p.x for p in front], [100 * p.y for p in front], "-o", color="tab:orange", lw=2, ms=7,
                label="Pareto front", zorder=3)
    for p in points:
        if p.current:
            ax.scatter([p.x], [100 * p.y], marker="*", s=260, color="tab:blue", zorder=4, label="this run")
        if p.is_teacher:
            ax.scatter([p.x], [100 * p.y], marker="s", s=60, facecolors="none", edgecolors="tab:red", zorder=4, label="teacher")
    # Label every point when there are few; otherwise only the front and this run.
    for p in points if len(points) <= 12 else [p for p in points if id(p) in on_front or p.current]:
        ax.annotate(p.label, (p.x, 100 * p.y), textcoords="offset points", xytext=(5, 4), fontsize=7)
    if log_x and points and min(p.x for p in points) > 0:
        ax.set_xscale("log")
        # 1-2-5 ticks with plain numbers: runs often span less than a decade of latency.
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set(xlabel=xlabel, ylabel="test accuracy (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)
