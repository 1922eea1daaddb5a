"""Run reports: what the distilled student kept of its teacher, and what it costs.

    from distillery.report import write_report
    write_report("runs/kd-cnn8", baseline="runs/scratch-cnn8")   # -> runs/kd-cnn8/report.md

:func:`write_report` evaluates the teacher (read from the run's ``config.yaml``), the
from-scratch baseline (when given) and the distilled student on the run's test split, and
writes into the run directory:

* ``report.md`` and ``report.html`` (self-contained: images embedded, opens offline);
* ``report.json`` -- every number of the report, for scripts;
* ``plots/*.png`` -- learning curves, confusion matrix, per-class change vs the baseline, and
  the accuracy-vs-latency Pareto view of all runs in the run's parent directory;
* ``latency.json`` -- the student's latency measurement, reused by ``distillery compare`` and by
  the Pareto view of later reports (also written for other runs whose latency was measured);
* ``test_logits.safetensors`` -- the student's test-split logits, keyed by a hash of weights and
  data (also written for the teacher and baseline runs, so the next report reuses them).

Exports made with ``distillery export`` into ``RUN_DIR/export/*/`` appear as extra columns.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distillery.data import DataBundle, load_data
from distillery.errors import DistilleryError
from distillery.models import count_parameters
from distillery.report import metrics as M
from distillery.report import plots
from distillery.report.render import Bullets, Document, Heading, Image, Paragraph, Table, write
from distillery.report.runs import Run, build_student, describe_model, finite, is_run_dir, load_run

__all__ = ["write_report", "load_run", "find_runs", "group_runs", "compare_runs"]

#: DataConfig fields that decide which rows land in the test split: a baseline must agree on
#: them, or per-class comparisons would compare different images.
_TEST_SPLIT_FIELDS = ("name", "path", "label_column", "input_column", "feature_columns", "image_size",
                      "tokenizer", "max_length", "test_fraction", "split_seed", "classes", "mosaic")
#: DataConfig fields that do not change input shapes (ignored when reusing data to time a model).
_SHAPE_IRRELEVANT = ("train_subset", "batch_size", "eval_batch_size", "augment", "val_fraction",
                     "test_fraction", "split_seed", "download")


def __getattr__(name):  # the leaderboard lives in compare.py; import it on first use
    if name in ("group_runs", "compare_runs", "find_runs"):
        from distillery.report import compare

        return getattr(compare, name)
    raise AttributeError(name)


@dataclass
class _Model:
    """One column of the side-by-side table."""

    role: str  # teacher | scratch | student
    label: str
    module: nn.Module
    weights: Path | None
    run_dir: Path | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    logits: torch.Tensor | None = None


# ----------------------------------------------------------------------------------------------
# Formatting


def _num(v) -> str:
    """A regression metric: 4 significant digits, or a dash when missing."""
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4g}"


def _pct(v) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"


def _count(v) -> str:
    if v is None:
        return "—"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if v >= scale:
            return f"{v / scale:.2f} {unit}"
    return f"{v:,}"


def _bytes(v) -> str:
    if v is None:
        return "—"
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if v >= scale:
            return f"{v / scale:.1f} {unit}"
    return f"{v} B"


def _ms(v) -> str:
    return "—" if v is None else f"{v:.3f}" if v < 10 else f"{v:.1f}"


def _rate(v) -> str:
    return "—" if v is None else f"{v:,.0f}"


def _ratio(v) -> str:
    return "—" if v is None or not math.isfinite(v) else f"{v:.2f}×"


def _div(a, b):
    return a / b if a is not None and b else None


# ----------------------------------------------------------------------------------------------
# Models of the report


def _teacher(run: Run, data: DataBundle, notes: list[str]) -> _Model | None:
    """The run's teacher, as the engine built it; ``None`` (with a note) when it cannot be loaded,
    e.g. a teacher run directory moved since training: the rest of the report still stands."""
    from distillery.engine.trainer import load_teacher

    tcfg = run.config.teacher
    if tcfg is None:
        return None
    try:
        module = load_teacher(run.config, data)
    except DistilleryError as err:
        notes.append(f"The teacher could not be loaded, so teacher columns are left out: {err}")
        return None
    if tcfg.ensemble is not None:
        names = "+".join(Path(t.run).name if t.run else t.model.arch for t in tcfg.ensemble)
        label, weights, run_dir = f"teacher ensemble ({names})", None, None
    elif tcfg.run is not None:
        label, weights, run_dir = f"teacher ({Path(tcfg.run).name})", Path(tcfg.run) / "model.safetensors", Path(tcfg.run)
    else:
        label, weights, run_dir = f"teacher ({tcfg.model.arch})", Path(tcfg.model.weights), None
        if weights.is_dir():
            weights = weights / "model.safetensors"
    return _Model("teacher", label, module, weights, run_dir)


def _check_same_test_split(run: Run, other: Run) -> None:
    a, b = run.config.data, other.config.data
    differ = [f for f in _TEST_SPLIT_FIELDS if getattr(a, f) != getattr(b, f)]
    if differ:
        detail = ", ".join(f"data.{f}: {getattr(b, f)!r} vs {getattr(a, f)!r}" for f in differ)
        raise DistilleryError(
            f"baseline {other.dir} was trained on a different test split than {run.dir} ({detail}); "
            "a from-scratch baseline must use the same data settings (train_subset may differ)"
        )


def _test_logits(m: _Model, data: DataBundle, batch_size: int) -> torch.Tensor:
    """The model's logits on the test split, cached in its run directory.

    Every report of a student distilled from the same teacher needs the teacher's logits on the
    same test split; computing them is most of a report's time for a large teacher.  The cache
    is keyed by a hash of the weights file and of the test split, so new weights or other test
    rows are never served stale logits."""
    from safetensors.torch import load_file, save_file

    cache = m.run_dir / "test_logits.safetensors" if m.run_dir is not None and m.weights is not None else None
    key = None
    if cache is not None and m.weights.is_file():
        h = hashlib.sha256(m.weights.read_bytes())
        inputs = data.test.inputs if isinstance(data.test.inputs, dict) else {"x": data.test.inputs}
        for name in sorted(inputs):
            h.update(name.encode() + inputs[name].contiguous().numpy().tobytes())
        h.update(data.test.labels.numpy().tobytes())
        key = h.hexdigest()
        try:
            from safetensors import safe_open

            with safe_open(str(cache), "pt") as f:
                if (f.metadata() or {}).get("key") == key:
                    return load_file(str(cache))["logits"]
        except Exception:  # no cache yet, or an unreadable one: compute
            pass
    logits = M.predict_logits(m.module, data.test, batch_size)
    if key is not None:
        try:
            save_file({"logits": logits.contiguous()}, str(cache), metadata={"key": key})
        except OSError:
            pass  # a read-only run directory: the cache is only a cache
    return logits


def _evaluate(m: _Model, data: DataBundle, teacher_logits: torch.Tensor | None, batch_size: int) -> None:
    m.logits = _test_logits(m, data, batch_size)
    labels = data.test.labels
    if data.task == "regression":  # RMSE / MAE / R^2 in the data's units; "agreement" = RMSE to the teacher
        mean, std = data.test.target_mean, data.test.target_std
        r = M.regression_metrics(m.logits, labels, mean, std)
        m.stats.update({
            "test_accuracy": None, "test_rmse": r["rmse"], "test_mae": r["mae"], "test_r2": r["r2"],
            "rmse_per_output": r["rmse_per_output"], "r2_per_output": r["r2_per_output"],
            "rmse_to_teacher": (M.regression_metrics(m.logits, teacher_logits, mean, std)["rmse"]
                                if teacher_logits is not None and m.role != "teacher" else None),
            "agreement_with_teacher": None, "ece": None, "params": count_parameters(m.module),
            "macs": M.count_macs(m.module, M.take_rows(data.test, 1)), "size_bytes": M.file_size(m.weights),
            "confusion": None, "per_class_accuracy": None,
        })
        return
    if labels.dim() == 2:  # multi-label: mAP, F1 per label; "accuracy" = exact match
        ml = M.multilabel_metrics(m.logits, labels)
        m.stats.update({
            "test_accuracy": ml["subset_accuracy"], "map": ml["map"], "f1_macro": ml["f1_macro"],
            "agreement_with_teacher": (float(((m.logits > 0) == (teacher_logits > 0)).float().mean())
                                       if teacher_logits is not None and m.role != "teacher" else None),
            "ece": None, "params": count_parameters(m.module),
            "macs": M.count_macs(m.module, M.take_rows(data.test, 1)), "size_bytes": M.file_size(m.weights),
            "confusion": None, "per_class_accuracy": ml["f1_per_label"],
        })
        return
    cm = M.confusion_matrix(m.logits, labels, data.num_classes)
    m.stats.update({
        "test_accuracy": M.accuracy(m.logits, labels),
        "agreement_with_teacher": M.top1_agreement(m.logits, teacher_logits) if teacher_logits is not None and m.role != "teacher" else None,
        "ece": M.expected_calibration_error(m.logits, labels, n_bins=15),
        "params": count_parameters(m.module),
        "macs": M.count_macs(m.module, M.take_rows(data.test, 1)),
        "size_bytes": M.file_size(m.weights),
        "confusion": cm.tolist(),
        "per_class_accuracy": M.per_class_accuracy(cm).tolist(),
    })


# ----------------------------------------------------------------------------------------------
# Latency, cached per run directory


def _cached_latency(run_dir: Path, threads: int) -> dict | None:
    """A run's earlier latency measurement, when taken on this machine with the same thread
    count and torch version (otherwise it is not comparable and is measured again)."""
    path = run_dir / "latency.json"
    try:
        lat = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    same = (lat.get("threads") == threads and lat.get("machine") == M.machine_description()
            and lat.get("torch") == torch.__version__)
    return lat if same else None


def _save_latency(run_dir: Path | None, lat: dict) -> None:
    if run_dir is not None and is_run_dir(run_dir):
        try:
            (run_dir / "latency.json").write_text(json.dumps(lat, indent=2))
        except OSError:
            pass  # a read-only run directory (e.g. a shared teacher): the cache is only a cache


def _data_key(cfg) -> str:
    return json.dumps({k: v for k, v in cfg.model_dump(mode="json").items() if k not in _SHAPE_IRRELEVANT}, sort_keys=True)


# ----------------------------------------------------------------------------------------------
# Pareto view over the runs next to this one


def _pareto_points(run: Run, models: list[_Model], data: DataBundle, *, measure: bool,
                   timing: dict, notes: list[str]) -> tuple[list[plots.Point], str]:
    """Accuracy and latency of every finished run in ``run.dir.parent``.  Latency comes from this
    report's measurements, a run's ``latency.json``, or (``measure=True``) a new measurement.
    When some run has no latency, the x axis falls back to parameters for all runs."""
    measured = {m.run_dir.resolve(): m.stats for m in models if m.run_dir is not None and "batch1_median_ms" in m.stats}
    teacher_dir = next((m.run_dir.resolve() for m in models if m.role == "teacher" and m.run_dir), None)
    datasets = {_data_key(run.config.data): data}
    threads = timing.get("threads") or torch.get_num_threads()
    rows = []
    for d in sorted(p for p in run.dir.parent.iterdir() if is_run_dir(p)):
        try:
            other = load_run(d)
        except DistilleryError:
            continue
        acc = other.test_accuracy
        if acc is None:
            continue
        lat = measured.get(d.resolve()) or _cached_latency(d, threads)
        if lat is None and measure:
            try:
                key = _data_key(other.config.data)
                if key not in datasets:
                    datasets[key] = load_data(other.config.data)
                lat = M.measure_latency(build_student(other, datasets[key]), datasets[key].test, **timing)
                _save_latency(d, lat)
            except Exception as err:  # a broken neighbour must not cost this run its report
                notes.append(f"Pareto view: could not time {d.name} ({str(err).splitlines()[0]}).")
        rows.append((other, acc, lat))
    if not rows:
        return [], ""
    use_latency = all(lat is not None for _, _, lat in rows)
    points = [plots.Point(o.name, lat["batch1_median_ms"] if use_latency else float(o.summary.get("params") or 0), acc,
                          current=o.dir.resolve() == run.dir.resolve(), is_teacher=o.dir.resolve() == teacher_dir)
              for o, acc, lat in rows]
    if use_latency:
        return points, f"CPU latency at batch 1, median (ms, {threads} torch threads)"
    notes.append("Pareto view: some runs have no latency measurement, so parameters are the cost axis.")
    return points, "parameters"


# ----------------------------------------------------------------------------------------------
# The report


def _exports(run_dir: Path) -> list[dict]:
    """``export.json`` records of exports written under ``RUN_DIR/export/`` (see distillery.export)."""
    found = []
    for p in sorted(run_dir.glob("export/*/export.json")):
        try:
            found.append(json.loads(p.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
    return found


def write_report(
    run_dir: str | Path,
    *,
    baseline: str | Path | None = None,
    measure_latency: bool = True,
    latency_repeats: int = 20,
    throughput_repeats: int = 5,
    threads: int | None = M.DEFAULT_THREADS,
    pareto: bool = True,
) -> Path:
    """Write ``report.md``, ``report.html``, ``report.json`` and ``plots/`` into ``run_dir``;
    return the path of ``report.md``.

    ``baseline`` is a run of the same student trained from scratch (method ``ce``) on the same
    data; it adds a column and the per-class change.  ``measure_latency=False`` skips the timing
    (the slowest part); ``latency_repeats`` / ``throughput_repeats`` set how many timed calls
    the medians are taken over, after warm-up (fewer for a model slow enough to exhaust the
    time budget of :func:`~distillery.report.metrics.measure_latency`); ``threads`` sets
    torch's thread count for the timing (default 1, see
    :data:`~distillery.report.metrics.DEFAULT_THREADS`; ``None``: the current count; it is
    stated in the report).  ``pareto=False`` skips the
    view of the sibling runs.

    Raises :class:`DistilleryError` when ``run_dir`` (or ``baseline``) is not a finished run.
    """
    run = load_run(run_dir)
    base = load_run(baseline) if baseline is not None else None
    if base is not None:
        _check_same_test_split(run, base)
    notes: list[str] = []
    data = load_data(run.config.data)
    batch = run.config.data.eval_batch_size

    models: list[_Model] = []
    teacher = _teacher(run, data, notes)
    if teacher is not None:
        models.append(teacher)
    if base is not None:
        models.append(_Model("scratch", f"student from scratch ({base.name})", build_student(base, data), base.weights, base.dir))
    student_label = f"distilled student ({run.name})" if run.config.teacher is not None else f"student ({run.name})"
    student = _Model("student", student_label, build_student(run, data), run.weights, run.dir)
    models.append(student)

    # Quality first (teacher first: the others' agreement is measured against it).
    for m in models:
        _evaluate(m, data, teacher.logits if teacher is not None else None, batch)
    recorded = finite(run.summary.get("test_accuracy"))
    if recorded is not None and abs(recorded - student.stats["test_accuracy"]) > 1e-6:
        notes.append(f"The recomputed test accuracy ({_pct(student.stats['test_accuracy'])}%) differs from summary.json "
                     f"({_pct(recorded)}%): the data, the code or the hardware differ from training.")
    recorded = finite(run.summary.get("test_rmse"))
    if recorded is not None and abs(recorded - student.stats["test_rmse"]) > 1e-6 * max(1.0, abs(recorded)):
        notes.append(f"The recomputed test RMSE ({_num(student.stats['test_rmse'])}) differs from summary.json "
                     f"({_num(recorded)}): the data, the code or the hardware differ from training.")

    timing = {"warmup": 5, "repeats": latency_repeats, "throughput_repeats": throughput_repeats, "threads": threads}
    if measure_latency:
        for m in models:
            lat = M.measure_latency(m.module, data.test, **timing)
            m.stats.update(lat)
            _save_latency(m.run_dir, lat)

    out_plots = run.dir / "plots"
    out_plots.mkdir(exist_ok=True)
    exports = _exports(run.dir)
    # Before the document: the Pareto view may add notes, which go at the top of the report.
    # The Pareto view ranks runs by accuracy, which a regression run has not.
    pareto = pareto and data.task != "regression"
    pareto_view = _pareto_points(run, models, data, measure=measure_latency, timing=timing, notes=notes) if pareto else None
    doc = _document(run, base, data, models, exports, notes, out_plots, pareto_view, timing)

    md_path, _ = write(doc, run.dir / "report.md")
    report_json = {
        "run": str(run.dir), "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "test_samples": len(data.test), "class_names": data.class_names, "notes": notes,
        "models": {m.role: {"label": m.label, **m.stats} for m in models}, "exports": exports,
    }
    (run.dir / "report.json").write_text(json.dumps(report_json, indent=2))
    return md_path


def _document(run: Run, base: Run | None, data: DataBundle, models: list[_Model], exports: list[dict],
              notes: list[str], out_plots: Path, pareto: tuple[list[plots.Point], str] | None,
              timing: dict) -> Document:
    cfg = run.config
    teacher = next((m for m in models if m.role == "teacher"), None)
    student = next(m for m in models if m.role == "student")
    scratch = next((m for m in models if m.role == "scratch"), None)
    doc = Document(f"Distillery report: {run.name}")
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    doc.add(Paragraph(
        f"Method {cfg.method.name} · student {describe_model(cfg.student)} · data {cfg.data.name} "
        f"({len(data.train):,} train / {len(data.val):,} val / {len(data.test):,} test samples) · "
        f"{cfg.train.epochs} epochs · seed {cfg.train.seed} · written {stamp}."))
    if notes:
        doc.add(Bullets(notes))

    # ---- the side-by-side table: one column per model, one row per measure
    doc.add(Heading("Teacher, baseline and student side by side"))
    columns = [(m.label, m.stats) for m in models]
    for e in exports:
        label = f"{e.get('format')} export" + (f" {e['quantize']}" if e.get("quantize") else "")
        columns.append((label, {"test_accuracy": e.get("test_accuracy"), "size_bytes": e.get("size_bytes"),
                                "agreement_with_teacher": None, **(e.get("latency") or {})}))
    t = teacher.stats if teacher is not None else {}
    quality = [
        ("test accuracy (%)", lambda s: _pct(s.get("test_accuracy"))),
        ("top-1 agreement with teacher (%)", lambda s: _pct(s.get("agreement_with_teacher"))),
        ("expected calibration error, 15 bins (%)", lambda s: _pct(s.get("ece"))),
    ]
    if data.task == "regression":
        quality = [
            ("test RMSE (target units)", lambda s: _num(s.get("test_rmse"))),
            ("test MAE (target units)", lambda s: _num(s.get("test_mae"))),
            ("test R²", lambda s: _num(s.get("test_r2"))),
            ("RMSE to the teacher's predictions", lambda s: _num(s.get("rmse_to_teacher"))),
        ]
    measures = [
        *quality,
        ("parameters", lambda s: _count(s.get("params"))),
        ("MACs per sample", lambda s: _count(s.get("macs"))),
        ("size on disk (model file)", lambda s: _bytes(s.get("size_bytes"))),
        ("CPU latency, batch 1 (median ms)", lambda s: _ms(s.get("batch1_median_ms"))),
        ("CPU throughput, batch 256 (samples/s)", lambda s: _rate(s.get("throughput_samples_per_second"))),
        ("timing: threads, timed calls at batch 1 / 256",
         lambda s: f"{s['threads']}, {s['repeats']} / {s['throughput_repeats']}" if "threads" in s else "—"),
    ]
    if teacher is not None:
        measures += [
            ("compression vs teacher (parameters)", lambda s: _ratio(_div(t.get("params"), s.get("params")))),
            ("MACs reduction vs teacher", lambda s: _ratio(_div(t.get("macs"), s.get("macs")))),
            ("size reduction vs teacher", lambda s: _ratio(_div(t.get("size_bytes"), s.get("size_bytes")))),
            ("latency speed-up vs teacher", lambda s: _ratio(_div(t.get("batch1_median_ms"), s.get("batch1_median_ms")))),
            ("throughput gain vs teacher", lambda s: _ratio(_div(s.get("throughput_samples_per_second"), t.get("throughput_samples_per_second")))),
        ]
    doc.add(Table(["measure"] + [c[0] for c in columns], [[name] + [fmt(s) for _, s in columns] for name, fmt in measures]))

    timed = next((m.stats for m in models if "threads" in m.stats), None)
    how = [
        f"All models are evaluated on this run's test split ({len(data.test):,} samples).",
        "MACs are counted with torch.utils.flop_counter.FlopCounterMode on one sample (MACs = FLOPs / 2; "
        "matrix products and convolutions only, element-wise operations are not counted).",
        "Expected calibration error: top-1 confidence in 15 equal-width bins (Guo et al. 2017)." if data.task != "regression"
        else "Regression: RMSE, MAE and R² in the targets' own units, averaged over targets with equal weight "
             "(as scikit-learn does); RMSE to the teacher compares the two models' predictions.",
    ]
    if timed is not None:
        how.append(f"Latency: median of up to {timing['repeats']} single-sample calls after {timed['warmup']} warm-up calls; "
                   f"throughput: 256 / median time of up to {timing['throughput_repeats']} batch-256 calls after a warm-up call "
                   f"(fewer for slow models, see the timing row); {timed['threads']} torch thread(s) on {timed['machine']}, "
                   f"torch {timed['torch']}. Exported models run in their own runtime with the thread count in their column.")
    else:
        how.append("Latency was not measured for this report (measure_latency=False).")
    if exports:
        how.append("Export columns come from distillery export (export.json): the exported artifact run by its own runtime.")
    doc.add(Bullets(how))

    # ---- learning curves
    doc.add(Heading("Learning curves"))
    if run.metrics:
        path = plots.learning_curves(run.metrics, out_plots / "learning_curves.png",
                                     teacher_accuracy=t.get("test_accuracy"),
                                     test_accuracy=student.stats["test_accuracy"], title=run.name)
        doc.add(Image(path, "Each named loss term and the summed train loss per epoch (left); validation accuracy "
                            "per epoch with the teacher's test accuracy as the dashed reference (right)."
                      if data.task != "regression" else "Each named loss term and the summed train loss per epoch."))
        last = next((r for r in reversed(run.metrics) if finite(r.get("val_rmse")) is not None), None)
        if data.task == "regression":
            doc.add(Paragraph("Regression: there is no accuracy (right panel); " + (
                f"the last validation RMSE is {_num(last['val_rmse'])} and R² {_num(last.get('val_r2'))} "
                f"(epoch {last.get('epoch')}; every epoch's val_rmse / val_r2 are in metrics.jsonl)."
                if last else "no validation RMSE was recorded.")))
        elif not any(finite(r.get("val_accuracy")) is not None for r in run.metrics):
            doc.add(Paragraph("No validation accuracy was recorded (data.val_fraction: 0 or eval_every larger than the epochs)."))
    else:
        doc.add(Paragraph("metrics.jsonl is missing or empty: no learning curves."))

    # ---- per class
    names = data.class_names
    if data.task == "regression":
        _per_output(doc, data, [m for m in (teacher, scratch, student) if m is not None])
        return _pareto_section(doc, run, pareto, out_plots)
    if student.stats["confusion"] is not None:
        doc.add(Heading("Per-class accuracy"))
        path = plots.confusion(student.stats["confusion"], names, out_plots / "confusion.png",
                               title=f"{student.label}: confusion on the test split")
        doc.add(Image(path, "Confusion matrix of the student (rows: true class, normalised per row; numbers: counts)."))
    else:
        doc.add(Heading("Per-label F1 (multi-label task)"))
        doc.add(Paragraph(f"Test mAP: student {_pct(student.stats['map'])}%"
                          + (f", teacher {_pct(teacher.stats['map'])}%" if teacher else "")
                          + (f", scratch {_pct(scratch.stats['map'])}%" if scratch else "")
                          + ". Rows below: F1 of each label at probability 0.5; accuracy above is the exact match "
                            "of all labels; agreement with the teacher is per label."))
    header = ["class"] + ([teacher.label] if teacher else []) + ([scratch.label] if scratch else []) + [student.label]
    if scratch is not None:
        header.append("change vs scratch (points)")
    rows = []
    for i, name in enumerate(names):
        row = [name]
        if teacher is not None:
            row.append(_pct(teacher.stats["per_class_accuracy"][i]))
        if scratch is not None:
            row.append(_pct(scratch.stats["per_class_accuracy"][i]))
        row.append(_pct(student.stats["per_class_accuracy"][i]))
        if scratch is not None:
            d = student.stats["per_class_accuracy"][i] - scratch.stats["per_class_accuracy"][i]
            row.append("—" if math.isnan(d) else f"{100 * d:+.2f}")
        rows.append(row)
    doc.add(Table(header, rows))
    if scratch is not None:
        deltas = [a - b for a, b in zip(student.stats["per_class_accuracy"], scratch.stats["per_class_accuracy"])]
        path = plots.per_class_change(deltas, names, out_plots / "per_class_change.png",
                                      title=f"per-class accuracy: {run.name} minus {base.name}")
        doc.add(Image(path, "Per-class test accuracy change of the distilled student vs the same student trained from scratch."))

    return _pareto_section(doc, run, pareto, out_plots)


def _per_output(doc: Document, data: DataBundle, models: list[_Model]) -> None:
    """Regression: RMSE and R² of each target (output) per model, in the data's units."""
    doc.add(Heading("Per-target error (regression)"))
    doc.add(Paragraph(f"{data.num_classes} continuous target(s), standardised for training with the training split's "
                      "mean and standard deviation; errors below are in the targets' own units."))
    header = ["target"] + [f"{m.label} RMSE / R²" for m in models]
    rows = [[name] + [f"{_num(m.stats['rmse_per_output'][i])} / {_num(m.stats['r2_per_output'][i])}" for m in models]
            for i, name in enumerate(data.class_names)]
    doc.add(Table(header, rows))


def _pareto_section(doc: Document, run: Run, pareto, out_plots: Path) -> Document:
    if pareto is not None:
        points, xlabel = pareto
        doc.add(Heading(f"Runs in {run.dir.parent}: accuracy vs cost"))
        if points:
            path = plots.pareto(points, out_plots / "pareto.png", xlabel=xlabel,
                                title=f"{len(points)} runs in {run.dir.parent.name or run.dir.parent}")
            doc.add(Image(path, f"Test accuracy vs {xlabel} of every finished run in {run.dir.parent}; "
                                "the orange line is the Pareto front (no other run is both faster and more accurate)."))
            front = plots.pareto_front(points)
            doc.add(Paragraph("On the Pareto front: " + ", ".join(f"{p.label} ({_pct(p.y)}%)" for p in front) + "."))
    return doc
