"""Command line: a thin layer over the Python API.

    distillery train CONFIG            train a teacher or a from-scratch baseline
    distillery distill CONFIG          distil a teacher into a student
    distillery self-distill CONFIG --rounds N   rounds of self-distillation, label weight per round
    distillery eval CONFIG_OR_RUN      evaluate a finished run on its test split
    distillery inspect CONFIG          linear CKA between teacher and student layers (heat-map)
    distillery search CONFIG           training-free student architecture search (DisWOT)
    distillery demo                    the end-to-end Fashion-MNIST demo
    distillery cache build CONFIG      run the teacher once, store its outputs
    distillery lm demo|prepare|distill|cache build   causal-LM distillation (see distillery.cli_lm)
    distillery report / compare / export   read, rank and ship results
    distillery methods / models        what exists
"""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from distillery.errors import DistilleryError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Knowledge distillation: teacher -> smaller student.")
console = Console()
err_console = Console(stderr=True)

SetOpt = typer.Option(None, "--set", "-s", help="Override a config field: --set train.epochs=3 (repeatable).")
TrackOpt = typer.Option(None, "--track", help="Log to tensorboard and/or mlflow (local files in the run directory).")


def friendly(fn):
    """Print a DistilleryError as one clear message (no traceback) and exit non-zero."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DistilleryError as err:
            from distillery.engine import Interrupted

            err_console.print(f"[bold red]error:[/] {err}" if not isinstance(err, Interrupted) else f"[yellow]{err}[/]")
            raise typer.Exit(130 if isinstance(err, Interrupted) else 2)

    return wrapper


def _run(config: Path, overrides, resume: bool, overwrite: bool, need_teacher: bool | None, rebuild_cache: bool = False,
         track: list[str] | None = None):
    from distillery.config import load_config
    from distillery.engine import fit
    from distillery.errors import ConfigError

    from distillery.methods import get_spec

    cfg = load_config(config, list(overrides or []) + ([f"train.track=[{','.join(track)}]"] if track else []))
    spec = get_spec(cfg.method.name)
    # Teacher-free methods (ce, self- and mutual distillation) run under either command.
    if need_teacher is True and cfg.teacher is None and (spec.needs_teacher or spec.name == "ce"):
        raise ConfigError(f"{config}: `distillery distill` needs a `teacher:` section (use `distillery train` for a from-scratch run)")
    if need_teacher is False and spec.needs_teacher:
        raise ConfigError(f"{config}: method '{cfg.method.name}' distils from a teacher; run it with `distillery distill`")
    if need_teacher:  # pairs: auto-cka -> pairs read off a CKA map made now (distillery inspect)
        from distillery.inspect import resolve_auto_pairs

        cfg = resolve_auto_pairs(cfg)
    result = fit(cfg, resume=resume, overwrite=overwrite, rebuild_cache=rebuild_cache)
    _print_summary(result.summary, result.run_dir)


def _print_summary(summary: dict, run_dir: Path) -> None:
    table = Table(title=f"{summary.get('name')} ({summary.get('method')}) -> {run_dir}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("test_accuracy", "teacher_test_accuracy", "test_rmse", "test_r2", "teacher_test_rmse", "params",
                "teacher_params", "wall_seconds", "train_samples_per_second"):
        if key in summary and summary[key] is not None:
            v = summary[key]
            table.add_row(key, f"{100 * v:.2f}%" if "accuracy" in key else f"{v:.4g}" if key.endswith(("rmse", "r2"))
                          else f"{v:,.1f}" if isinstance(v, float) else f"{v:,}")
    console.print(table)


@app.command()
@friendly
def train(config: Path, set: Optional[List[str]] = SetOpt,
          resume: bool = typer.Option(False, help="Continue from the run's last checkpoint."),
          overwrite: bool = typer.Option(False, help="Replace an existing run directory."),
          track: Optional[List[str]] = TrackOpt):
    """Train a teacher, a from-scratch baseline (method ce) or a teacher-free method (self/mutual distillation)."""
    _run(config, set, resume, overwrite, need_teacher=False, track=track)


@app.command()
@friendly
def distill(config: Path, set: Optional[List[str]] = SetOpt,
            resume: bool = typer.Option(False, help="Continue from the run's last checkpoint."),
            overwrite: bool = typer.Option(False, help="Replace an existing run directory."),
            rebuild_cache: bool = typer.Option(False, help="Rebuild a stale teacher cache instead of refusing it."),
            track: Optional[List[str]] = TrackOpt):
    """Distil the config's teacher into its student."""
    _run(config, set, resume, overwrite, need_teacher=True, rebuild_cache=rebuild_cache, track=track)


@app.command("self-distill")
@friendly
def self_distill(config: Path, set: Optional[List[str]] = SetOpt,
                 rounds: int = typer.Option(..., "--rounds", min=1, help="Self-distillation rounds after round 0 (labels)."),
                 alpha: str = typer.Option("optimal", "--alpha", help="Label weight per round: 'optimal' (estimated) or a number in [0, 1].")):
    """Round 0 on labels, then N rounds each distilled from the previous one (finished rounds are reused)."""
    from distillery.config import load_config
    from distillery.recipes.self_distillation import parse_alpha, run_rounds

    result = run_rounds(load_config(config, set), rounds, alpha=parse_alpha(alpha))
    table = Table(title=f"self-distillation rounds -> {result.dir}")
    for col in ("round", "alpha", "val accuracy", "test accuracy"):
        table.add_column(col, justify="right")
    for r in result.rows:
        table.add_row(str(r["round"]), f"{r['alpha']:.4f}",
                      *(f"{100 * r[k]:.2f}%" if r[k] is not None else "" for k in ("val_accuracy", "test_accuracy")))
    console.print(table)
    console.print(f"wrote {result.markdown} and {result.json}")


@app.command("incremental")
@friendly
def incremental(config: Path, set: Optional[List[str]] = SetOpt,
                tasks: int = typer.Option(5, "--tasks", min=2, help="Number of tasks; the classes are split evenly in order."),
                strategy: str = typer.Option("wa", "--strategy", help="finetune | kd | wa (KD + weight aligning)."),
                memory: int = typer.Option(20, "--memory", min=0, help="Exemplars kept per old class.")):
    """Class-incremental learning: classes arrive in tasks; KD on old classes + weight aligning (Zhao et al. 2020)."""
    from distillery.config import load_config
    from distillery.recipes.class_incremental import run_incremental

    result = run_incremental(load_config(config, set), tasks=tasks, strategy=strategy, memory_per_class=memory)
    table = Table(title=f"class-incremental ({strategy})")
    for col in ("task", "new classes", "seen", "accuracy (all seen)", "old classes", "gamma"):
        table.add_column(col, justify="right")
    for r in result["rows"]:
        table.add_row(str(r["task"]), ", ".join(r["classes"]), str(r["seen"]), f"{100 * r['test_accuracy']:.2f}%",
                      "" if r["old_class_accuracy"] is None else f"{100 * r['old_class_accuracy']:.2f}%",
                      "" if r["gamma"] is None else f"{r['gamma']:.3f}")
    console.print(table)
    console.print(f"average incremental accuracy {100 * result['average_incremental_accuracy']:.2f}%")


@app.command("prune-kd")
@friendly
def prune_kd(config: Path, set: Optional[List[str]] = SetOpt,
             fractions: str = typer.Option("0.1,0.3,0.5,1.0", "--fractions", help="Keep fractions in (0, 1], comma- or space-separated."),
             scorer: str = typer.Option("random", "--scorer", help="random | el2n | teacher_el2n"),
             keep: str = typer.Option("hard", "--keep", help="hard (highest scores) | easy"),
             variants: str = typer.Option("ce,kd,adaptive", "--variants", help="ce | kd (config alpha) | adaptive | a KD weight in [0, 1]"),
             seeds: str = typer.Option("0", "--seeds", help="Training seeds, e.g. 0,1")):
    """KD on pruned data: train on kept fractions with CE / KD / adaptive-alpha KD (Ben-Baruch et al.)."""
    from distillery.config import load_config
    from distillery.errors import ConfigError
    from distillery.recipes.pruned_kd import run_pruned_kd

    def parse(text, cast, what):
        try:
            return [cast(t) for t in text.replace(",", " ").split()]
        except ValueError:
            raise ConfigError(f"--{what} must be a list of numbers, got {text!r}") from None

    vs = [v if v in ("ce", "kd", "adaptive") else parse(v, float, "variants")[0] for v in variants.replace(",", " ").split()]
    result = run_pruned_kd(load_config(config, set), parse(fractions, float, "fractions"), scorer, keep=keep,
                           variants=tuple(vs), seeds=parse(seeds, int, "seeds"))
    table = Table(title=f"pruned-data KD ({scorer}, keep {keep})")
    for col in ("keep fraction", "rows", "variant", "alpha", "test accuracy"):
        table.add_column(col, justify="right")
    for s in sorted(result["summary"], key=lambda s: (s["fraction"], str(s["variant"]))):
        table.add_row(f"{s['fraction']:g}", str(s["train_rows"]), str(s["variant"]), f"{s['alpha']:.3f}",
                      f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}%")
    console.print(table)


@app.command("active-kd")
@friendly
def active_kd(config: Path, set: Optional[List[str]] = SetOpt,
              rounds: int = typer.Option(4, "--rounds", help="Query rounds after the seed set."),
              per_round: int = typer.Option(200, "--per-round", help="Teacher queries per round."),
              strategy: str = typer.Option("rad", "--strategy", help="random | margin | rad"),
              seed_size: int = typer.Option(100, "--seed-size", help="Random seed set (its labels estimate the teacher's error)."),
              seeds: str = typer.Option("0", "--seeds", help="Training seeds, e.g. 0,1")):
    """Active distillation under a teacher-query budget (Baykal et al., Robust Active Distillation)."""
    from distillery.config import load_config
    from distillery.errors import ConfigError
    from distillery.recipes.active_kd import run_active_kd

    try:
        seed_list = [int(t) for t in seeds.replace(",", " ").split()]
    except ValueError:
        raise ConfigError(f"--seeds must be a list of integers, got {seeds!r}") from None
    result = run_active_kd(load_config(config, set), rounds, per_round, strategy, seed_size, seeds=seed_list)
    table = Table(title=f"active KD ({strategy})")
    for col in ("strategy", "teacher queries", "seeds", "test accuracy"):
        table.add_column(col, justify="right")
    for s in result["summary"]:
        table.add_row(s["strategy"], str(s["queries"]), str(s["n"]), f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}%")
    console.print(table)


@app.command("eval")
@friendly
def eval_(target: Path = typer.Argument(..., help="A run directory, or the config that produced one."),
          split: str = typer.Option("test", help="test, val or train"),
          set: Optional[List[str]] = SetOpt):
    """Evaluate a finished run's student on a data split."""
    from distillery.config import load_config
    from distillery.data import load_data
    from distillery.engine import evaluate
    from distillery.errors import ConfigError
    from distillery.models import build_model, count_parameters

    run_dir = target if target.is_dir() else load_config(target, set).run_dir
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file() or not (run_dir / "model.safetensors").is_file():
        raise ConfigError(f"{run_dir} is not a finished run (needs config.yaml and model.safetensors)")
    cfg = load_config(cfg_path, set if target.is_dir() else None)
    if split not in ("test", "val", "train"):
        raise ConfigError(f"--split must be test, val or train (got '{split}')")
    data = load_data(cfg.data)
    spec = cfg.student.model_copy(update={"weights": str(run_dir / "model.safetensors")})
    model = build_model(spec, in_channels=data.in_channels, num_classes=data.num_classes, input_size=data.input_size)
    res = evaluate(model, getattr(data, split), "cpu", cfg.data.eval_batch_size)
    out = {"run": str(run_dir), "split": split, "accuracy": res["accuracy"], "loss": res["loss"], "params": count_parameters(model)}
    out.update({k: res[k] for k in ("rmse", "mae", "r2") if k in res})  # regression runs (accuracy is None)
    console.print_json(json.dumps(out))


@app.command("inspect")
@friendly
def inspect_(config: Path, set: Optional[List[str]] = SetOpt,
             out: Optional[Path] = typer.Option(None, "--out", help="Output directory (default: <output_dir>/<name>-inspect)."),
             samples: int = typer.Option(512, help="Rows of real data to compare the layers on."),
             split: str = typer.Option("train", help="train, val or test"),
             teacher_layer: Optional[List[str]] = typer.Option(None, "--teacher-layer", help="Teacher module path (repeatable; default: its default_feature_layers)."),
             student_layer: Optional[List[str]] = typer.Option(None, "--student-layer", help="Student module path (repeatable; default: its default_feature_layers)."),
             list_modules: bool = typer.Option(False, "--list", help="Only list both models' module paths (what a layer can be).")):
    """Linear CKA between every teacher and student layer on real data: heat-map, table, best match per student layer."""
    from distillery.config import load_config
    from distillery.inspect import build_pair, inspect_config, module_paths

    cfg = load_config(config, set)
    if list_modules:
        for role, model in zip(("teacher", "student"), build_pair(cfg)):
            table = Table(title=f"{role} modules ({type(model).__name__}); default layers: "
                                f"{', '.join(getattr(model, 'default_feature_layers', []) or []) or 'none'}")
            table.add_column("module path")
            table.add_column("type")
            for name, kind in module_paths(model):
                table.add_row(name, kind)
            console.print(table)
        return
    res = inspect_config(cfg, out_dir=out, samples=samples, split=split,
                         teacher_layers=teacher_layer or None, student_layers=student_layer or None)
    table = Table(title=f"linear CKA on {res.samples} {split} samples: best teacher layer per student layer")
    for col in ("student layer", "best teacher layer", "CKA"):
        table.add_column(col, justify="right" if col == "CKA" else "left")
    for s, (t, v) in res.best().items():
        table.add_row(s, t, f"{v:.3f}")
    console.print(table)
    console.print(f"wrote {res.png}, {res.csv} and {res.markdown}")


@app.command("search")
@friendly
def search_(config: Path, set: Optional[List[str]] = SetOpt,
            distill_top: int = typer.Option(0, "--distill-top", min=0, help="Then distil the top K candidates (and the hand-picked run.student, if any)."),
            overwrite: bool = typer.Option(False, help="With --distill-top: replace existing run directories.")):
    """Training-free student search (DisWOT): rank the space by a proxy; write the top-k as distil configs, a table and a Pareto plot."""
    from distillery.search import distill_top as distill_candidates, load_search_config, run_search

    cfg = load_search_config(config, set)
    cfg.search.top_k = max(cfg.search.top_k, distill_top)  # --distill-top 5 needs five configs
    result = run_search(cfg)
    table = Table(title=f"top {len(result.top)} of {len(result.rows)} architectures by {result.proxy} ({result.seconds:.0f} s)")
    for col in ("rank", "architecture", "score", "params", "MACs", "config"):
        table.add_column(col, justify="right" if col in ("score", "params", "MACs") else "left")
    rows = [(str(i), r) for i, r in enumerate(result.top, start=1)] + ([("hand-picked", result.reference)] if result.reference else [])
    for label, r in rows:
        table.add_row(label, r.candidate.key, f"{r.score:.5g}", f"{r.cost.params:,}", f"{r.cost.macs:,}", r.config.name)
    console.print(table)
    console.print(f"wrote {result.files['markdown']}, {result.files['pareto']} and {result.files['csv']}")
    if distill_top:
        console.print(f"wrote {distill_candidates(result, distill_top, overwrite=overwrite)}")


@app.command()
@friendly
def demo(output_dir: Path = typer.Option(Path("runs/demo"), help="Where the demo's runs go."),
         quick: bool = typer.Option(False, help="Tiny budget (for smoke tests): digits, 2 epochs.")):
    """Train a teacher on Fashion-MNIST, then a student from scratch and with KD; compare."""
    from distillery.demo import run_demo

    run_demo(output_dir, quick=quick, console=console)


from distillery.cli_lm import lm_app  # noqa: E402  (the `distillery lm ...` commands)

app.add_typer(lm_app, name="lm")

cache_app = typer.Typer(help="Teacher-output cache: run the teacher once, distil many times.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")


@cache_app.command("build")
@friendly
def cache_build(config: Path, set: Optional[List[str]] = SetOpt,
                rebuild: bool = typer.Option(False, help="Rebuild even if a store exists (required when it is stale)."),
                dtype: Optional[str] = typer.Option(None, help="float16 (default) or float32."),
                views: Optional[int] = typer.Option(None, help="Augmented views per sample (reinforced dataset)."),
                topk: Optional[int] = typer.Option(None, help="Store top-k log-probabilities instead of dense logits.")):
    """Run the config's teacher over its training set and store the outputs."""
    from distillery.cache.from_config import build_from_config

    extra = [f"teacher.cache.{k}={v}" for k, v in (("dtype", dtype), ("views", views), ("topk", topk)) if v is not None]
    manifest = build_from_config(config, list(set or []) + extra, rebuild=rebuild)
    console.print_json(json.dumps({k: manifest[k] for k in ("num_samples", "views", "topk", "dtype", "taps", "bytes",
                                                             "bytes_per_sample", "build_seconds")}))


@app.command()
def methods():
    """List the distillation methods (from the registry)."""
    from distillery.methods import available

    table = Table(title="methods")
    for col in ("name", "teacher", "description", "paper"):
        table.add_column(col)
    for spec in available().values():
        table.add_row(spec.name, "yes" if spec.needs_teacher else "no", spec.description, spec.paper)
    console.print(table)


@app.command()
def models():
    """List the model zoo architectures."""
    from distillery.models import available_models

    table = Table(title="model zoo (also: pkg.module:factory, hf:<dir or hub id>)")
    table.add_column("arch")
    table.add_column("description")
    for name, desc in available_models().items():
        table.add_row(name, desc)
    console.print(table)


@app.command()
@friendly
def report(run_dir: Path = typer.Argument(..., help="A finished run directory."),
           baseline: Optional[Path] = typer.Option(None, "--baseline", help="The same student trained from scratch (a run directory)."),
           latency: bool = typer.Option(True, "--latency/--no-latency", help="Time the models on the CPU (the slowest part)."),
           repeats: int = typer.Option(20, help="Timed single-sample calls per model (median reported, after warm-up)."),
           threads: int = typer.Option(1, help="torch threads for the timing (0: torch's current count).")):
    """Write report.md, a self-contained report.html and plots for a finished run."""
    from distillery.report import write_report

    md = write_report(run_dir, baseline=baseline, measure_latency=latency, latency_repeats=repeats, threads=threads or None)
    console.print(f"wrote {md} and {md.with_suffix('.html')} (plots in {md.parent / 'plots'})")


@app.command()
@friendly
def compare(runs: List[Path] = typer.Argument(..., help="Run directories, or one directory of runs."),
            out: Optional[Path] = typer.Option(None, "--out", help="Where compare.md and pareto.png go (default: the runs' common parent).")):
    """Rank runs by test accuracy; repeats over seeds are grouped as mean ± std."""
    from distillery.report.compare import compare_runs, leaderboard_table

    result = compare_runs(runs, out=out)
    header, rows = leaderboard_table(result.groups)
    table = Table(title=f"leaderboard ({sum(g.n for g in result.groups)} runs, {len(result.groups)} groups)")
    for col in header:
        table.add_column(col, justify="left" if col in ("run", "method", "student") else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    console.print(f"wrote {result.markdown}" + (f" and {result.pareto}" if result.pareto else ""))


@app.command("export")
@friendly
def export_(run_dir: Path = typer.Argument(..., help="A finished run directory."),
            format: str = typer.Option("safetensors", "--format", "-f", help="safetensors, onnx, torchscript or hf."),
            out: Optional[Path] = typer.Option(None, "--out", help="Output directory (default: RUN_DIR/export/FORMAT[-int8])."),
            quantize: Optional[str] = typer.Option(None, "--quantize", help="int8: dynamic int8 quantisation of Linear layers."),
            latency: bool = typer.Option(True, "--latency/--no-latency", help="Time the exported model."),
            threads: int = typer.Option(1, help="Threads for the timing (0: torch's current count).")):
    """Export a run's student; the export is reloaded and checked against PyTorch on real test inputs."""
    from distillery.export import export

    res = export(run_dir, format, out=out, quantize=quantize, measure_latency=latency, threads=threads or None)
    info = res.info
    check = info["check"]
    console.print(f"exported {info['format']}{' int8' if info['quantize'] else ''} to {res.model_file} "
                  f"({info['size_bytes']:,} bytes)")
    console.print(f"check: max |diff| {check['max_abs_diff']:.2e} vs PyTorch on {check['compared_on']} "
                  f"(atol {check['atol']:g}, rtol {check['rtol']:g}): passed")
    line = f"test accuracy {100 * info['test_accuracy']:.2f}% (PyTorch student {100 * info['pytorch_test_accuracy']:.2f}%)"
    if info["latency"]:
        lat = info["latency"]
        line += f"; latency {lat['batch1_median_ms']:.3f} ms at batch 1 ({lat['threads']} threads)"
    console.print(line)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
