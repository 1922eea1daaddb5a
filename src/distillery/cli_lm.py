"""``distillery lm ...``: causal-LM distillation on the command line (thin over ``distillery.lm``).

    distillery lm demo                   prepare the offline demo (stdlib corpus, GPT-2 teacher) and distil
    distillery lm prepare                only the demo's tokenizer, teacher and student initialisation
    distillery lm distill CONFIG         distil (or train with loss: ce) from a config such as configs/lm/fkl.yaml
    distillery lm cache build CONFIG     run the teacher once; store top-k / sampled log-probs
    distillery lm encoder CONFIG         distil a sentence encoder (configs/encoder/minilm_3layer.yaml)
    distillery lm autodistil CONFIG      AutoDistil: search a smaller encoder under a budget (configs/encoder/autodistil.yaml)
    distillery lm recipe CONFIG          stages, each starting from the last (ERNIE-Tiny's progressive schedule)
    distillery lm serve MODEL            a local LM as an OpenAI-compatible /v1/completions endpoint
    distillery lm miniplm|ddk|symbolic|i2d2|arte|promptmix|pgkd|redi|mgsr|competitive CONFIG
                                         distil through data (configs/lm/data/)
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

lm_app = typer.Typer(help="Distil causal language models (Hugging Face transformers).", no_args_is_help=True)
cache_app = typer.Typer(help="Sparse teacher-logit cache for LM distillation.", no_args_is_help=True)
lm_app.add_typer(cache_app, name="cache")
console = Console()
SetOpt = typer.Option(None, "--set", "-s", help="Override a config field: --set train.max_steps=50 (repeatable).")

_SHOWN = ("eval_ppl", "teacher_ppl", "agreement", "eval_kl", "student_params", "teacher_params", "steps", "wall_seconds")


def _table(title: str, summaries: dict[str, dict]) -> Table:
    table = Table(title=title)
    table.add_column("run")
    for key in _SHOWN:
        table.add_column(key, justify="right")
    for name, s in summaries.items():
        cells = []
        for key in _SHOWN:
            v = s.get(key)
            cells.append("—" if v is None else f"{100 * v:.2f}%" if key == "agreement" else
                         f"{v:,.2f}" if isinstance(v, float) else f"{v:,}")
        table.add_row(name, *cells)
    return table


def _friendly(fn):
    from distillery.cli import friendly

    return friendly(fn)


@lm_app.command("distill")
@_friendly
def distill(config: Path, set: Optional[List[str]] = SetOpt,
            resume: bool = typer.Option(False, help="Continue an interrupted run from its last checkpoint."),
            overwrite: bool = typer.Option(False, help="Replace an existing run directory."),
            rebuild_cache: bool = typer.Option(False, help="Rebuild the teacher cache even if one exists."),
            monitor_oracle: Optional[str] = typer.Option(
                None, help="Teacher hacking: also measure KL(oracle || student) against this oracle LM (path/Hub id).")):
    """Distil a causal LM from a config (loss: ce trains without a teacher)."""
    from distillery.lm.config import load_lm_config
    from distillery.lm.trainer import distill_lm

    cfg = load_lm_config(config, list(set or []) + ([f"monitor.oracle={monitor_oracle}"] if monitor_oracle else []))
    result = distill_lm(cfg, resume=resume, overwrite=overwrite, rebuild_cache=rebuild_cache)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun / accelerate launch: print once
        console.print(_table(f"{cfg.name} ({cfg.loss.name}) -> {result.run_dir}", {cfg.name: result.summary}))
        oracle = result.summary.get("oracle")
        if oracle:
            verdict = ("[red]teacher hacking[/red]: the student moved away from the oracle while approaching the teacher"
                       if oracle["teacher_hacking"] else "no teacher hacking detected")
            console.print(f"oracle KL: min {oracle['oracle_kl_min']:.4f} (step {oracle['oracle_kl_min_step']}), "
                          f"final {oracle['oracle_kl_final']:.4f}; teacher KL final {oracle['teacher_kl_final']:.4f}; "
                          f"KL(oracle || teacher) {oracle['oracle_teacher_kl']:.4f} -- {verdict}")


@lm_app.command("serve")
@_friendly
def serve(model: str, port: int = typer.Option(8000, min=0, max=65535),
          host: str = typer.Option("127.0.0.1", help="Interface to bind (127.0.0.1: this machine only)."),
          name: str = typer.Option("teacher", help="The model name clients send."),
          trust_remote_code: bool = typer.Option(False, help="Run model code shipped with the checkpoint.")):
    """Serve a local causal LM as an OpenAI-compatible /v1/completions endpoint (a teacher for black-box generation)."""
    from distillery.lm.serve import make_server
    from distillery.lm.textgen import GeneratorSpec, HFGenerator

    generator = HFGenerator.from_spec(GeneratorSpec(path=model, trust_remote_code=trust_remote_code))
    server = make_server(generator, model_name=name, host=host, port=port)
    console.print(f"serving {model} as {name!r} on http://{host}:{server.server_address[1]}/v1 (Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


@lm_app.command("recipe")
@_friendly
def recipe(config: Path, set: Optional[List[str]] = SetOpt,
           overwrite: bool = typer.Option(False, help="Redo every stage, replacing their run directories.")):
    """Run a multi-stage recipe (e.g. configs/lm/ernie_tiny.yaml); finished stages are reused."""
    from distillery.lm.recipe import run_recipe

    summaries = run_recipe(config, set, overwrite=overwrite)
    if int(os.environ.get("RANK", "0")) == 0:
        console.print(_table(f"recipe {config}", summaries))


@lm_app.command("encoder")
@_friendly
def encoder(config: Path, set: Optional[List[str]] = SetOpt):
    """Distil a sentence encoder (e.g. all-MiniLM-L6-v2 -> 3 blocks): MiniLMv2 relations, hidden states, cosine."""
    from distillery.lm.encoder import distill_encoder, load_encoder_config

    metrics = distill_encoder(load_encoder_config(config, set))
    console.print_json(json.dumps(metrics, default=str))


@lm_app.command("autodistil")
@_friendly
def autodistil(config: Path, set: Optional[List[str]] = SetOpt):
    """AutoDistil: K weight-sharing BERT super-networks, self-attention distillation, best student per budget."""
    from rich.markdown import Markdown

    from distillery.search.autodistil import run_autodistil
    from distillery.search.autodistil_config import load_autodistil_config

    summary = run_autodistil(load_autodistil_config(config, set))
    console.print(Markdown(Path(summary["files"]["markdown"]).read_text()))


@lm_app.command("prepare")
@_friendly
def prepare(root: Path = typer.Option(Path("runs/lm"), help="Where the tokenizer and models go."),
            teacher_steps: int = typer.Option(800, min=1, help="Training steps of the demo teacher.")):
    """Train the demo's BPE tokenizer and GPT-2 teacher on the standard library; save the student's init."""
    from distillery.lm.demo import prepare as run_prepare

    paths = run_prepare(root, teacher_steps=teacher_steps)
    console.print_json(json.dumps({k: str(v) for k, v in paths.items()}))


@lm_app.command("demo")
@_friendly
def demo(root: Path = typer.Option(Path("runs/lm"), help="Where the demo's runs go."),
         steps: int = typer.Option(300, min=1, help="Distillation steps per student."),
         teacher_steps: int = typer.Option(800, min=1, help="Training steps of the demo teacher.")):
    """Prepare the offline LM demo, then train the student from scratch and by forward-KL distillation."""
    from distillery.lm.demo import run_demo

    summaries = run_demo(root, steps=steps, teacher_steps=teacher_steps)
    console.print(_table("LM demo: held-out Python stdlib text", summaries))


@cache_app.command("build")
@_friendly
def cache_build(config: Path, set: Optional[List[str]] = SetOpt,
                rebuild: bool = typer.Option(False, help="Rebuild even if a store exists.")):
    """Run the config's teacher over its training data once and store its sparse outputs."""
    from distillery.lm.config import load_lm_config
    from distillery.lm.trainer import build_cache

    store = build_cache(load_lm_config(config, set), rebuild=rebuild)
    console.print(f"cache: {len(store)} sequences, scheme {store.scheme}, k={store.k}, "
                  f"{store.bytes_per_token:.1f} bytes/token")


#: Data-level methods (issue "distil through data"): command -> (module of distillery.lm, help).
#: Each module has ``load_<command>_config(path, overrides)`` and ``run_<command>(cfg, overwrite=...)``.
DATA_METHODS = {
    "miniplm": ("miniplm", "MiniPLM: select pre-training documents by teacher-vs-reference difference sampling, then train."),
    "ddk": ("ddk", "DDK: distil with a domain mixture driven by the per-domain teacher-student loss gap."),
    "symbolic": ("symbolic", "Symbolic KD (West et al. 2022): the teacher writes from few-shot prompts, a critic filters, the student learns."),
    "i2d2": ("symbolic", "I2D2 (Bhagavatula et al. 2023): NeuroLogic-constrained generation, critic filter, self-imitation rounds."),
    "arte": ("arte", "ARTE: align the teacher to the student's in-context preferences (DPO), regenerate, train."),
    "promptmix": ("promptmix", "PromptMix: borderline examples between classes, relabelled by the teacher, for a small classifier."),
    "pgkd": ("pgkd", "PGKD: the teacher writes new examples from the student's validation errors, with early stopping."),
    "redi": ("redi", "REDI: learn from correct and incorrect teacher traces with the asymmetric REDI objective."),
    "mgsr": ("mgsr", "Multi-granularity semantic revision: teacher-revised sequences, DAC-KL and span correlation."),
    "competitive": ("competitive", "Competitive distillation: rounds of answer comparison and instruction evolution."),
}


def _data_command(name: str, module: str, help_: str) -> None:
    def command(config: Path, set: Optional[List[str]] = SetOpt,
                overwrite: bool = typer.Option(False, help="Redo every stage, replacing the run directory.")):
        import importlib

        mod = importlib.import_module(f"distillery.lm.{module}")
        cfg = getattr(mod, f"load_{name}_config")(config, set)
        summary = getattr(mod, f"run_{name}")(cfg, overwrite=overwrite)
        console.print_json(json.dumps(summary, default=str))

    command.__doc__ = help_
    lm_app.command(name)(_friendly(command))


for _name, (_module, _help) in DATA_METHODS.items():
    _data_command(_name, _module, _help)
