"""Command line: a thin layer over the Python API.

    distillery train CONFIG            train a teacher or a from-scratch baseline
    distillery distill CONFIG          distil a teacher into a student
    distillery eval CONFIG_OR_RUN      evaluate a finished run on its test split
    distillery demo                    the end-to-end Fashion-MNIST demo
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


def _run(config: Path, overrides, resume: bool, overwrite: bool, need_teacher: bool | None):
    from distillery.config import load_config
    from distillery.engine import fit
    from distillery.errors import ConfigError

    cfg = load_config(config, overrides)
    if need_teacher is True and cfg.teacher is None:
        raise ConfigError(f"{config}: `distillery distill` needs a `teacher:` section (use `distillery train` for a from-scratch run)")
    if need_teacher is False and cfg.method.name != "ce":
        raise ConfigError(f"{config}: `distillery train` trains on labels (method ce); use `distillery distill` for method '{cfg.method.name}'")
    result = fit(cfg, resume=resume, overwrite=overwrite)
    _print_summary(result.summary, result.run_dir)


def _print_summary(summary: dict, run_dir: Path) -> None:
    table = Table(title=f"{summary.get('name')} ({summary.get('method')}) -> {run_dir}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("test_accuracy", "teacher_test_accuracy", "params", "teacher_params", "wall_seconds", "train_samples_per_second"):
        if key in summary and summary[key] is not None:
            v = summary[key]
            table.add_row(key, f"{100 * v:.2f}%" if "accuracy" in key else f"{v:,.1f}" if isinstance(v, float) else f"{v:,}")
    console.print(table)


@app.command()
@friendly
def train(config: Path, set: Optional[List[str]] = SetOpt,
          resume: bool = typer.Option(False, help="Continue from the run's last checkpoint."),
          overwrite: bool = typer.Option(False, help="Replace an existing run directory.")):
    """Train a teacher or a from-scratch baseline (method ce)."""
    _run(config, set, resume, overwrite, need_teacher=False)


@app.command()
@friendly
def distill(config: Path, set: Optional[List[str]] = SetOpt,
            resume: bool = typer.Option(False, help="Continue from the run's last checkpoint."),
            overwrite: bool = typer.Option(False, help="Replace an existing run directory.")):
    """Distil the config's teacher into its student."""
    _run(config, set, resume, overwrite, need_teacher=True)


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
    console.print_json(json.dumps(out))


@app.command()
@friendly
def demo(output_dir: Path = typer.Option(Path("runs/demo"), help="Where the demo's runs go."),
         quick: bool = typer.Option(False, help="Tiny budget (for smoke tests): digits, 2 epochs.")):
    """Train a teacher on Fashion-MNIST, then a student from scratch and with KD; compare."""
    from distillery.demo import run_demo

    run_demo(output_dir, quick=quick, console=console)


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


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
