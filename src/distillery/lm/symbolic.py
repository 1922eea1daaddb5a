"""Distil through generated data: generate -> critic -> filter -> learn (symbolic KD and I2D2).

West et al. (2022), "Symbolic Knowledge Distillation: from General Language Models to Commonsense
Models": a large teacher writes a corpus from few-shot prompts, a critic (a RoBERTa classifier
fit to a small set of human acceptability labels) filters it, and a student trained on the
filtered corpus can surpass the teacher.  Bhagavatula et al. (2023), "I2D2: Inductive Knowledge
Distillation with NeuroLogic and Self-Imitation": a *small* generator decodes under lexical
constraints (NeuroLogic, :mod:`distillery.lm.constrained`), the critic filters, and the generator
is fine-tuned on its own filtered outputs (self-imitation), for several rounds.

The demo domain is Python from the standard library.  A prompt is a real function's header and
docstring (few-shot: ``prompts.shots`` real examples in front); the generator writes the first
statement of the body (one line, the demo's budget).  Acceptability is real:

* the **rule critic** (:func:`check_body`) compiles the function (``compile``, never ``exec``: the
  generated code is not run), and requires a non-trivial statement that reads one of the
  function's parameters;
* the **learned critic** mirrors the paper's critic fit to a small labelled set: a logistic
  regression (scikit-learn) on hashed character n-grams of the body plus its log-probability
  under a scorer LM, fit to ``critic.labelled`` generations whose labels are the *rule critic's*
  (no human labels exist here -- stated in every summary), evaluated on ``critic.heldout`` others.

What differs from the papers: the critic's labels are automatic (compile/parameter checks), not
human; the corpus is code, not commonsense triples; the generator in the demo is the demo teacher
(I2D2's is GPT-2 XL, small next to GPT-3); the student learns with ``distill_lm`` (``loss: ce`` on
prompt/response pairs).  The summary reports per round the rule acceptance rate and the corpus
kept; the critic's precision/recall against the rule labels on held-out generations; the student's
own acceptance rate and perplexity of the real first lines of held-out functions -- for the
filtered corpus and for an unfiltered corpus of the same size (the paper's main ablation).
"""
from __future__ import annotations

import ast
import glob
import json
import random
import shutil
import time
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from distillery.config import format_validation_error, read_yaml
from distillery.engine.checkpoint import atomic_write_text
from distillery.engine.progress import ProgressBar
from distillery.errors import ConfigError, DataError, RunDirExistsError
from distillery.lm.critic import LearnedCritic, _params, check_body, precision_recall, select
from distillery.lm.textgen import GeneratorSpec, HFGenerator, load_generator

STOP = ["\n"]  # one line of code per generation


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Prompts(_Strict):
    source: str = Field("stdlib:*.py", description="Python files whose top-level functions give the prompts.")
    max_prompts: int = Field(240, gt=0, description="Prompts the generator writes for.")
    heldout: int = Field(60, gt=0, description="Further prompts kept apart: the student's own acceptance and perplexity.")
    shots: int = Field(2, ge=0, description="Real examples (the shortest functions) put in front of every prompt.")
    max_chars: int = Field(400, gt=0, description="Skip functions whose header + docstring is longer (context budget).")
    seed: int = 0


class Generation(_Strict):
    samples: int = Field(4, gt=0, description="Continuations per prompt (sampled, or the best beams when constrained).")
    temperature: float = Field(0.7, ge=0, description="Sampling temperature (0 = greedy); unused when constrained.")
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(24, gt=0)
    constraints: bool = Field(False, description="NeuroLogic decoding (I2D2): the parameter names and `return` must "
                                                 "appear. Needs the generator's weights (`path`, not an endpoint).")
    num_beams: int = Field(8, gt=0)
    bonus: float = Field(2.0, ge=0, description="Score bonus per satisfied constraint (NeuroLogic's lambda).")
    seed: int = 0


class Critic(_Strict):
    kind: Literal["learned", "rule"] = Field("learned", description="learned: the classifier filters; rule: the "
                                             "compile/parameter checks themselves filter.")
    labelled: int = Field(200, gt=1, description="Round-0 generations, labelled by the rule checks, the classifier fits.")
    heldout: int = Field(200, gt=0, description="Further round-0 generations for its precision / recall.")
    threshold: float = Field(0.5, gt=0, lt=1, description="Keep generations with critic probability >= threshold.")
    top_fraction: float | None = Field(None, gt=0, le=1, description="Instead of the threshold: keep this best fraction.")
    scorer: str | None = Field("runs/lm/teacher", description="Causal LM whose per-token log p(body | prompt) is a "
                               "feature of the classifier; null: text features only.")
    hash_features: int = Field(4096, gt=0, description="Hashed character 2-4-gram features.")


class SelfImitation(_Strict):
    rounds: int = Field(1, ge=1, description="1: plain symbolic KD. R > 1 (I2D2): after each of the first R-1 rounds "
                                             "the generator is fine-tuned on its filtered outputs.")
    steps: int = Field(60, gt=0)
    batch_size: int = Field(8, gt=0)
    lr: float = Field(2e-4, gt=0)
    block_size: int = Field(256, gt=1, description="Few-shot context + prompt + line, in tokens.")


class Student(_Strict):
    path: str = Field("runs/lm/student-init", description="The student's initial weights (a save_pretrained dir).")
    steps: int = Field(150, gt=0)
    batch_size: int = Field(16, gt=0)
    lr: float = Field(1e-3, gt=0)
    block_size: int = Field(256, gt=1, description="Prompt + line, in tokens (longer pairs are truncated).")
    seeds: list[int] = Field([0], min_length=1, description="One student per seed (and corpus).")
    unfiltered_ablation: bool = Field(True, description="Also train on an unfiltered corpus of the same size.")


class SymbolicConfig(_Strict):
    name: str = "symbolic-kd"
    output_dir: str = "runs/lm/data"
    teacher: GeneratorSpec = GeneratorSpec(path="runs/lm/teacher")
    prompts: Prompts = Prompts()
    generation: Generation = Generation()
    critic: Critic = Critic()
    self_imitation: SelfImitation = SelfImitation()
    student: Student = Student()
    progress: bool = True

    @model_validator(mode="after")
    def _weights_where_needed(self) -> "SymbolicConfig":
        if self.teacher.endpoint is not None and (self.generation.constraints or self.self_imitation.rounds > 1):
            raise ValueError("constrained decoding reads the generator's logits and self-imitation fine-tunes it: "
                             "give teacher.path (a local model), or set generation.constraints: false and "
                             "self_imitation.rounds: 1 for an endpoint teacher")
        g = self.generation
        if not g.constraints and g.temperature == 0 and g.samples > 1:
            raise ValueError("greedy decoding (generation.temperature: 0) writes one line per prompt: set "
                             "generation.samples: 1 or a temperature > 0")
        if self.generation.constraints and self.generation.samples > self.generation.num_beams:
            raise ValueError(f"generation.samples ({self.generation.samples}) are the best beams: raise "
                             f"generation.num_beams to at least {self.generation.samples}")
        return self


def symbolic_config_from_dict(raw: dict, source: str = "") -> SymbolicConfig:
    try:
        return SymbolicConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source, SymbolicConfig)) from None


def load_symbolic_config(path: str | Path, overrides: list[str] | None = None) -> SymbolicConfig:
    raw = read_yaml(path, overrides, hint="ready-made configs live in configs/lm/data/")
    return symbolic_config_from_dict(raw, source=str(path))


# ---------------------------------------------------------------- prompts from real functions
def function_prompts(source: str, max_chars: int = 400) -> list[dict]:
    """Top-level functions with a docstring whose first statement after it is one simple line:
    ``{name, prompt (header + docstring + newline), params, reference (that first line)}``."""
    from distillery.lm.data import resolve_source

    out = []
    for path in sorted(glob.glob(resolve_source(source))):
        try:
            text = Path(path).read_text(encoding="utf-8")
            tree = ast.parse(text)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        lines = text.split("\n")
        for node in tree.body:
            if not (isinstance(node, ast.FunctionDef) and ast.get_docstring(node) and len(node.body) >= 2
                    and not node.decorator_list):
                continue
            first = node.body[1]
            if first.lineno != first.end_lineno or isinstance(first, (ast.If, ast.For, ast.While, ast.With, ast.Try)):
                continue
            prompt = "\n".join(lines[node.lineno - 1:node.body[0].end_lineno]) + "\n"
            if len(prompt) <= max_chars and "\n" not in prompt.split("\n")[0] and first.col_offset == 4:
                out.append({"name": node.name, "prompt": prompt, "params": _params(node),
                            "reference": lines[first.lineno - 1]})
    if not out:
        raise DataError(f"no usable function (docstring, then a one-line statement) under prompts.source {source!r}")
    return out


# ---------------------------------------------------------------- the pipeline
def _write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def _run_dir(cfg: SymbolicConfig, overwrite: bool) -> Path:
    """The run's directory; a finished or interrupted run of the same config is continued."""
    run_dir = Path(cfg.output_dir) / cfg.name
    mine = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    saved = run_dir / "config.yaml"
    if run_dir.exists() and any(run_dir.iterdir()):
        if not saved.is_file() or "self_imitation" not in (yaml.safe_load(saved.read_text()) or {}):
            raise RunDirExistsError(f"refusing to use {run_dir}: it is not a symbolic-KD run; choose another name "
                                    "(--set name=NEW) or output_dir")
        if saved.read_text() != mine:
            if not overwrite:
                raise RunDirExistsError(f"{run_dir} holds a run with another config: pass --overwrite to replace "
                                        "it, or choose another name with --set name=NEW")
            shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(saved, mine)
    return run_dir


def _prompt_split(cfg: SymbolicConfig, run_dir: Path) -> dict:
    path = run_dir / "prompts.json"
    if path.is_file():
        return json.loads(path.read_text())
    pc = cfg.prompts
    pool = function_prompts(pc.source, pc.max_chars)
    by_length = sorted(range(len(pool)), key=lambda i: (len(pool[i]["prompt"]) + len(pool[i]["reference"]), i))
    shots = [pool[i] for i in by_length[:pc.shots]]
    rest = [pool[i] for i in sorted(by_length[pc.shots:])]
    random.Random(pc.seed).shuffle(rest)
    if len(rest) < pc.heldout + 1:
        raise DataError(f"{len(rest)} usable functions in {pc.source!r}: fewer than prompts.heldout + 1; lower it")
    split = {"context": "".join(s["prompt"] + s["reference"] + "\n\n\n" for s in shots),
             "heldout": rest[:pc.heldout], "train": rest[pc.heldout:pc.heldout + pc.max_prompts]}
    atomic_write_text(path, json.dumps(split, indent=1))
    return split


def _write(generator_spec: GeneratorSpec, cfg: SymbolicConfig, prompts: list[dict], context: str, seed: int,
           title: str) -> list[list[str]]:
    """The generator's lines for each prompt: sampled through any TextGenerator, or NeuroLogic beams."""
    g = cfg.generation
    out: list[list[str]] = []
    if g.constraints:
        from distillery.lm.constrained import constrained_beam_search, stop_token_ids

        gen = HFGenerator.from_spec(generator_spec)
        stop_ids = stop_token_ids(gen.tokenizer, STOP)
    else:
        gen = load_generator(generator_spec)
    with ProgressBar(len(prompts), enabled=cfg.progress, title=title) as bar:
        for start in range(0, len(prompts), 16):
            chunk = prompts[start:start + 16]
            if g.constraints:
                for p in chunk:
                    hyps = constrained_beam_search(gen.model, gen.tokenizer, context + p["prompt"],
                                                   p["params"] + ["return"], num_beams=g.num_beams,
                                                   max_new_tokens=g.max_new_tokens, bonus=g.bonus,
                                                   num_return=g.samples, stop=STOP, stop_ids=stop_ids)
                    out.append([h.text for h in hyps])
            else:
                out.extend(gen.complete([context + p["prompt"] for p in chunk], max_new_tokens=g.max_new_tokens,
                                        temperature=g.temperature, top_p=g.top_p, n=g.samples, stop=STOP,
                                        seed=seed + start))
            bar.step(loss=float("nan"), samples=len(chunk), advance=len(chunk))
    return out


def _logprobs(cfg: SymbolicConfig, rows: list[dict], prompts: dict[int, dict]) -> list[float]:
    """Per-token log p(body | prompt) under the critic's scorer (0 for every row without one)."""
    if cfg.critic.scorer is None or not rows:
        return [0.0] * len(rows)
    from distillery.lm import models as lmmodels
    from distillery.lm.config import LMModel
    from distillery.lm.scoring import score_texts

    spec = LMModel(path=cfg.critic.scorer)
    tok = lmmodels.load_tokenizer(spec, pad_token=lmmodels.eos_token_of(spec))
    model = lmmodels.load_model(spec, "teacher").eval()
    scores = score_texts(model, tok, [r["body"] or " " for r in rows], [prompts[r["prompt_id"]]["prompt"] for r in rows],
                         progress=cfg.progress, title="critic scorer")
    return scores.per_token.tolist()


def _train(run_dir: Path, name: str, init: str, corpus: Path, *, steps: int, batch_size: int, lr: float,
           block_size: int, seed: int, progress: bool, eval_source: Path | None = None) -> dict:
    """One ``distill_lm`` run (``loss: ce`` on prompt/response pairs); a finished one is reused."""
    from distillery.lm.config import lm_config_from_dict
    from distillery.lm.trainer import distill_lm

    if (run_dir / name / "summary.json").is_file():
        return json.loads((run_dir / name / "summary.json").read_text())
    batch_size = min(batch_size, len(_read_jsonl(corpus)))  # a small filtered corpus still fills a batch
    data = {"source": str(corpus), "format": "prompt_response", "chat_template": "never", "block_size": block_size,
            "eval_fraction": 0.0, "seed": seed}
    if eval_source is not None:
        data["eval_source"] = str(eval_source)
    raw = {"name": name, "output_dir": str(run_dir), "student": {"path": init}, "data": data, "loss": {"name": "ce"},
           "train": {"max_steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "progress": progress,
                     "checkpoint_every": max(steps // 2, 1), "warmup_steps": min(10, steps // 10)}}
    resume = (run_dir / name / "checkpoints").is_dir()
    return distill_lm(lm_config_from_dict(raw), resume=resume, overwrite=not resume).summary


def _acceptance(model_dir: str, prompts: list[dict], context: str, cfg: SymbolicConfig, title: str) -> float:
    """Share of held-out prompts whose greedy line (one per prompt) the rule critic accepts."""
    gen = load_generator(GeneratorSpec(path=model_dir))
    texts = []
    with ProgressBar(len(prompts), enabled=cfg.progress, title=title) as bar:
        for start in range(0, len(prompts), 16):
            chunk = [context + p["prompt"] for p in prompts[start:start + 16]]
            texts += [row[0] for row in gen.complete(chunk, max_new_tokens=cfg.generation.max_new_tokens,
                                                     temperature=0.0, n=1, stop=STOP)]
            bar.step(loss=float("nan"), samples=len(chunk), advance=len(chunk))
    return sum(check_body(p["prompt"], t, p["params"])["accepted"] for p, t in zip(prompts, texts)) / len(prompts)


def run_symbolic(cfg: SymbolicConfig, *, overwrite: bool = False) -> dict:
    """Generate -> critic -> filter -> (self-imitation rounds) -> student; see the module docstring."""
    t0 = time.perf_counter()
    run_dir = _run_dir(cfg, overwrite)
    if (run_dir / "summary.json").is_file():  # finished with this very config
        return json.loads((run_dir / "summary.json").read_text())
    split = _prompt_split(cfg, run_dir)
    prompts = dict(enumerate(split["train"]))
    heldout_file = run_dir / "heldout.jsonl"  # the real first lines: the students' perplexity
    _write_jsonl(heldout_file, [{"prompt": p["prompt"], "response": p["reference"]} for p in split["heldout"]])
    generator, rounds, critic = cfg.teacher, [], None
    for r in range(cfg.self_imitation.rounds):
        rdir = run_dir / f"round{r}"
        rdir.mkdir(exist_ok=True)
        if not (rdir / "generations.jsonl").is_file():
            lines = _write(generator, cfg, list(prompts.values()), split["context"], cfg.generation.seed + 1000 * r,
                           f"round {r}: generate")
            rows = [{"prompt_id": i, "body": body, **check_body(prompts[i]["prompt"], body, prompts[i]["params"])}
                    for i, bodies in zip(prompts, lines) for body in bodies]
            for row, lp in zip(rows, _logprobs(cfg, rows, prompts)):
                row["logprob"] = lp
            _write_jsonl(rdir / "generations.jsonl", rows)
        rows = _read_jsonl(rdir / "generations.jsonl")
        if critic is None:  # fit once, on round 0 (the paper's critic is trained once)
            critic = _critic(cfg, run_dir, rows)
        if cfg.critic.kind == "rule":
            probs = [float(row["accepted"]) for row in rows]
        else:
            probs = critic["model"].probability([x["body"] for x in rows], [x["logprob"] for x in rows])
        c = cfg.critic
        kept = select(probs, threshold=None if c.top_fraction else c.threshold, top_fraction=c.top_fraction)
        if not kept:
            raise DataError(f"round {r}: the critic kept none of {len(rows)} generations: lower critic.threshold, "
                            "use critic.top_fraction, or generate more (generation.samples)")
        corpus = [rows[i] for i in kept]
        _write_jsonl(rdir / "corpus.jsonl", [{"prompt": prompts[x["prompt_id"]]["prompt"], "response": x["body"]}
                                             for x in corpus])
        rounds.append({"round": r, "generator": generator.path or generator.endpoint.url, "generations": len(rows),
                       "acceptance": sum(x["accepted"] for x in rows) / len(rows), "kept": len(kept),
                       "kept_acceptance": sum(x["accepted"] for x in corpus) / len(corpus)})
        if r + 1 < cfg.self_imitation.rounds:  # self-imitation: the generator learns its filtered lines in context
            _write_jsonl(rdir / "imitation.jsonl", [{"prompt": split["context"] + prompts[x["prompt_id"]]["prompt"],
                                                     "response": x["body"]} for x in corpus])
            si = cfg.self_imitation
            _train(run_dir, f"generator-r{r + 1}", generator.path, rdir / "imitation.jsonl", steps=si.steps,
                   batch_size=si.batch_size, lr=si.lr, block_size=si.block_size, seed=cfg.generation.seed,
                   progress=cfg.progress)
            generator = GeneratorSpec(path=str(run_dir / f"generator-r{r + 1}" / "student"))
    summary = {"name": cfg.name, "teacher": cfg.teacher.path or cfg.teacher.endpoint.url, "rounds": rounds,
               "critic": {k: v for k, v in critic.items() if k != "model"}, "students": {}}
    summary["students"] = _students(cfg, run_dir, split, rows, kept, heldout_file)
    if cfg.teacher.path is not None:
        summary["teacher_heldout_acceptance"] = _acceptance(cfg.teacher.path, split["heldout"], split["context"], cfg,
                                                            "teacher on held-out")
    summary["wall_seconds"] = time.perf_counter() - t0
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    return summary


def _critic(cfg: SymbolicConfig, run_dir: Path, rows: list[dict]) -> dict:
    """Fit (or reload) the learned critic on the first ``labelled`` generations; precision and
    recall against the rule labels on the next ``heldout``."""
    c = cfg.critic
    if len(rows) < c.labelled + c.heldout:
        raise DataError(f"{len(rows)} round-0 generations cannot give critic.labelled ({c.labelled}) + "
                        f"critic.heldout ({c.heldout}): lower them or raise prompts.max_prompts / generation.samples")
    fit, test = rows[:c.labelled], rows[c.labelled:c.labelled + c.heldout]
    path = run_dir / "critic.json"
    if path.is_file():
        model = LearnedCritic.from_json(path.read_text())
    else:
        model = LearnedCritic(c.hash_features).fit([x["body"] for x in fit], [x["logprob"] for x in fit],
                                                   [x["accepted"] for x in fit], seed=cfg.generation.seed)
        atomic_write_text(path, model.to_json())
    probs = model.probability([x["body"] for x in test], [x["logprob"] for x in test])
    kept = set(select(probs, threshold=None if c.top_fraction else c.threshold, top_fraction=c.top_fraction))
    return {"model": model, "labels": "rule critic (compiles, non-trivial, reads a parameter); no human labels",
            "labelled": len(fit), "labelled_positives": sum(x["accepted"] for x in fit), "heldout": len(test),
            "degenerate": model.constant is not None,
            **precision_recall([i in kept for i in range(len(test))], [x["accepted"] for x in test])}


def _students(cfg: SymbolicConfig, run_dir: Path, split: dict, rows: list[dict], kept: list[int],
              heldout_file: Path) -> dict:
    """The student on the last round's filtered corpus and on an unfiltered one of the same size."""
    s = cfg.student
    corpora = {"filtered": run_dir / f"round{cfg.self_imitation.rounds - 1}" / "corpus.jsonl"}
    if s.unfiltered_ablation:
        pick = sorted(random.Random(cfg.prompts.seed).sample(range(len(rows)), len(kept)))
        prompts = split["train"]
        _write_jsonl(run_dir / "corpus-unfiltered.jsonl",
                     [{"prompt": prompts[rows[i]["prompt_id"]]["prompt"], "response": rows[i]["body"]} for i in pick])
        corpora["unfiltered"] = run_dir / "corpus-unfiltered.jsonl"
    out: dict[str, dict] = {}
    for label, corpus in corpora.items():
        for seed in s.seeds:
            name = f"student-{label}-s{seed}"
            result = _train(run_dir, name, s.path, corpus, steps=s.steps, batch_size=s.batch_size, lr=s.lr,
                            block_size=s.block_size, seed=seed, progress=cfg.progress, eval_source=heldout_file)
            accept = _acceptance(str(run_dir / name / "student"), split["heldout"], "", cfg, f"{name} on held-out")
            out.setdefault(label, {})[str(seed)] = {"eval_ppl": result.get("eval_ppl"), "acceptance": accept,
                                                    "train_examples": result["train_sequences"]}
    return out


# ``distillery lm symbolic CONFIG`` and ``distillery lm i2d2 CONFIG`` run the same pipeline; the
# config (generation.constraints, self_imitation.rounds) is what makes it I2D2.
load_i2d2_config, run_i2d2 = load_symbolic_config, run_symbolic
