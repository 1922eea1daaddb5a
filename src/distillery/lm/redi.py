"""REDI: distil from the teacher's correct *and* incorrect reasoning traces (``distillery lm redi``).

Xu, Peng, Long, Xu, Chu and Qi, 2025, "Harnessing Negative Signals: Reinforcement Distillation
from Teacher Data for LLM Reasoning".  The recipe, on a task whose answers can be verified:

    problems ─ teacher samples n traces each (temperature ~1, ``load_generator``: local or endpoint)
             ─ verifier: positive (right final answer) / negative
    stage 1: SFT of the student on the positives          (``distill_lm``, loss ce, prompt_response)
    stage 2: the REDI objective on (positive, negative) pairs of the same problem
             L = -(1/|y+|) log π(y+|x) + α (1/|y-|) log π(y-|x)   (``distillery.losses.redi``)
    evaluation: greedy accuracy of the student on held-out problems

The paper distils DeepSeek-R1 traces on maths into Qwen2.5-Math-1.5B.  Offline and on a CPU, the
verifiable task here is multi-digit addition written step by step (one column per step, with the
carry), e.g. ``4 7 2 + 3 8 9 =`` -> `` 2+9+0=11 ; 7+8+1=16 ; 4+3+1=8 ; ans 8 6 1``.  When the
teacher path does not exist and ``teacher_build`` is given, a small GPT-2 teacher is first trained
on correct traces (``distill_lm``, loss ce) so that its temperature-1 samples are sometimes right
and sometimes wrong -- the raw material of REDI.  Differences from the paper: one REDI pass over
sampled pairs (the paper uses one epoch of its pair set too), a fixed number of steps, AdamW with a
constant learning rate, and pairs built from every positive x negative combination of a problem
up to ``redi.pairs_per_problem``.  Both stages are ``distill_lm`` runs: stage 2 reads the pairs as
``data.format: pairs`` with ``loss.name: redi`` (so it is also ``distillery lm distill`` with such a
config, on any pair data).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from distillery.config import format_validation_error, read_yaml
from distillery.engine.checkpoint import atomic_write_text
from distillery.engine.progress import ProgressBar
from distillery.errors import ConfigError, DataError, RunDirExistsError
from distillery.lm.textgen import GeneratorSpec, HFGenerator, load_generator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AdditionTask(_Strict):
    digits: int = Field(3, ge=1, le=8, description="Digits of each addend.")
    train_problems: int = Field(600, gt=0, description="Problems the teacher writes traces for (the student's training set).")
    eval_problems: int = Field(200, gt=0, description="Held-out problems (greedy accuracy).")
    seed: int = 0


class ModelBuild(_Strict):
    """A GPT-2 built with the demo tokenizer (``distillery.lm.demo.init_model``)."""

    tokenizer: str = "runs/lm/tokenizer"
    shape: dict[str, int] = Field(default_factory=lambda: {"n_layer": 2, "n_embd": 64, "n_head": 2})
    seed: int = 0


class TeacherBuild(ModelBuild):
    """Train a teacher on correct traces when ``teacher.path`` does not exist (cached there)."""

    problems: int = Field(4000, gt=0, description="Training problems (disjoint from the student's, by seed).")
    steps: int = Field(1500, gt=0)
    batch_size: int = Field(32, gt=0)
    lr: float = Field(2e-3, gt=0)


class Sampling(_Strict):
    samples_per_problem: int = Field(4, gt=0)
    temperature: float = Field(1.0, gt=0, description="The paper keeps the teacher's sampled traces; >0 gives both kinds.")
    max_new_tokens: int = Field(48, gt=0)


class SFTStage(_Strict):
    steps: int = Field(300, gt=0)
    batch_size: int = Field(32, gt=0)
    lr: float = Field(1e-3, gt=0)


class REDIStage(_Strict):
    steps: int = Field(300, ge=0, description="0: stop after SFT (the positives-only baseline).")
    batch_size: int = Field(16, gt=0, description="(positive, negative) pairs per step.")
    lr: float = Field(2e-4, gt=0)
    alpha: float = Field(0.8, ge=0, description="Weight of the negative term (the paper: 0.8; 1 is unstable).")
    pos_weight: float = Field(1.0, gt=0)
    pairs_per_problem: int = Field(2, gt=0)
    checkpoint_every: int = Field(100, ge=0)


class REDIConfig(_Strict):
    name: str = "redi"
    output_dir: str = "benchmarks/runs/lm_data/redi"
    teacher: GeneratorSpec = GeneratorSpec(path="runs/lm/redi-teacher")
    teacher_build: TeacherBuild | None = TeacherBuild(shape={"n_layer": 3, "n_embd": 128, "n_head": 4})
    student: ModelBuild = ModelBuild()
    task: AdditionTask = AdditionTask()
    sampling: Sampling = Sampling()
    traces_file: str | None = Field(None, description="Where the sampled traces are kept (default run_dir/traces.jsonl); "
                                                      "runs with the same teacher/task/sampling may share one file.")
    sft: SFTStage = SFTStage()
    redi: REDIStage = REDIStage()
    seed: int = 0
    progress: bool = True


def load_redi_config(path: str | Path, overrides: list[str] | None = None) -> REDIConfig:
    raw = read_yaml(path, overrides, hint="a ready-made config is configs/lm/data/redi.yaml")
    return redi_config_from_dict(raw, str(path))


def redi_config_from_dict(raw: dict, source: str = "") -> REDIConfig:
    try:
        return REDIConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source, REDIConfig)) from None


# ---- the verifiable task -------------------------------------------------------------------------

def _spaced(n: int) -> str:
    return " ".join(str(n))


def addition_trace(a: int, b: int) -> tuple[str, str]:
    """(prompt, correct trace): one step per column, least significant first, ``x+y+carry=sum``."""
    da, db = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    for i in range(max(len(da), len(db))):
        x, y = int(da[i]) if i < len(da) else 0, int(db[i]) if i < len(db) else 0
        steps.append(f"{x}+{y}+{carry}={x + y + carry}")
        carry = (x + y + carry) // 10
    return f"{_spaced(a)} + {_spaced(b)} =", " " + " ; ".join(steps) + f" ; ans {_spaced(a + b)}"


_ANSWER = re.compile(r"ans((?: \d)+)")


def final_answer(trace: str) -> int | None:
    """The verifier's parse: the digits after ``ans``; None when the trace gives no answer."""
    found = _ANSWER.search(trace)
    return int(found.group(1).replace(" ", "")) if found else None


def problems(n: int, digits: int, seed: int, exclude: set | None = None) -> list[tuple[int, int]]:
    rng, lo, hi = random.Random(seed), 10 ** (digits - 1), 10 ** digits - 1
    out, seen = [], set(exclude or ())
    if n > (hi - lo + 1) ** 2 - len(seen):
        raise ConfigError(f"{n} distinct {digits}-digit problems do not exist: lower the number of problems")
    while len(out) < n:
        pair = (rng.randint(lo, hi), rng.randint(lo, hi))
        if pair not in seen:
            seen.add(pair)
            out.append(pair)
    return out


def _splits(cfg: REDIConfig) -> tuple[list, list]:
    t = cfg.task
    held_out = problems(t.eval_problems, t.digits, seed=10_000 + t.seed)
    return problems(t.train_problems, t.digits, seed=t.seed, exclude=set(held_out)), held_out


# ---- stages ---------------------------------------------------------------------------------------

def _write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def _sft(name: str, out: Path, student: str, data: Path, stage, seed: int, progress: bool) -> tuple[Path, dict]:
    """``distill_lm`` with loss ce on prompt_response JSONL; reused when finished."""
    from distillery.lm.config import lm_config_from_dict
    from distillery.lm.trainer import distill_lm

    run_dir = out / name
    if (run_dir / "summary.json").is_file() and (run_dir / "student" / "config.json").is_file():
        return run_dir / "student", json.loads((run_dir / "summary.json").read_text())
    cfg = lm_config_from_dict({
        "name": name, "output_dir": str(out), "student": {"path": student},
        "data": {"source": str(data), "format": "prompt_response", "block_size": 96, "eval_fraction": 0.0,
                 "chat_template": "never"},
        "loss": {"name": "ce"},
        "train": {"max_steps": stage.steps, "batch_size": stage.batch_size, "lr": stage.lr, "warmup_steps": 0,
                  "scheduler": "constant", "checkpoint_every": 100, "seed": seed, "progress": progress}})
    resume = (run_dir / "checkpoints").is_dir()
    return run_dir / "student", distill_lm(cfg, resume=resume, overwrite=not resume).summary


def _atomic_copy_model(src: Path, dst: Path) -> None:
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    os.replace(tmp, dst)


def ensure_teacher(cfg: REDIConfig) -> None:
    """Build and cache the teacher at ``teacher.path`` when it is missing and ``teacher_build`` is set."""
    spec, build = cfg.teacher, cfg.teacher_build
    if spec.endpoint is not None or Path(spec.path).exists():
        return
    if build is None:
        raise ConfigError(f"teacher path {spec.path} does not exist: add a `teacher_build:` section to train one")
    from distillery.lm.demo import init_model

    final = Path(spec.path)
    work = final.with_name(final.name + "-train")
    work.mkdir(parents=True, exist_ok=True)
    init = init_model(work / "init", Path(build.tokenizer), build.shape, seed=build.seed)
    data = work / "traces.jsonl"
    if not data.is_file():
        train = problems(build.problems, cfg.task.digits, seed=20_000 + build.seed, exclude=set(_splits(cfg)[1]))
        _write_jsonl(data, [dict(zip(("prompt", "response"), addition_trace(a, b))) for a, b in train])
    trained, _ = _sft("run", work, str(init), data, build, build.seed, cfg.progress)
    _atomic_copy_model(trained, final)


def _fingerprint(cfg: REDIConfig) -> str:
    teacher = cfg.teacher.model_dump(mode="json")
    if cfg.teacher.path and (Path(cfg.teacher.path) / "model.safetensors").is_file():
        teacher["mtime"] = (Path(cfg.teacher.path) / "model.safetensors").stat().st_mtime_ns
    key = json.dumps([teacher, cfg.task.model_dump(), cfg.sampling.model_dump()], sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def sample_traces(cfg: REDIConfig, path: Path) -> list[dict]:
    """The teacher's sampled traces of every training problem, verified; written once (atomically)."""
    meta = path.with_suffix(".meta.json")
    fp = _fingerprint(cfg)
    if path.is_file() and meta.is_file():
        if json.loads(meta.read_text()).get("fingerprint") != fp:
            raise ConfigError(f"{path} holds traces of another teacher/task/sampling: delete it or set another traces_file")
        return [json.loads(line) for line in path.read_text().splitlines()]
    gen = load_generator(cfg.teacher)
    train, _ = _splits(cfg)
    s, rows, chunk = cfg.sampling, [], 64
    with ProgressBar(len(train), enabled=cfg.progress, title="teacher traces") as bar:
        for start in range(0, len(train), chunk):
            batch = train[start:start + chunk]
            prompts = [addition_trace(a, b)[0] for a, b in batch]
            outs = gen.complete(prompts, max_new_tokens=s.max_new_tokens, temperature=s.temperature, n=s.samples_per_problem,
                                stop=["\n"], seed=cfg.task.seed * 7919 + start)
            for (a, b), prompt, texts in zip(batch, prompts, outs):
                for text in texts:
                    rows.append({"a": a, "b": b, "prompt": prompt, "response": text, "correct": final_answer(text) == a + b})
            bar.step(loss=float("nan"), samples=len(batch), advance=len(batch))
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_jsonl(path, rows)
    atomic_write_text(meta, json.dumps({"fingerprint": fp, "teacher": cfg.teacher.model_dump(mode="json")}))
    return rows


def make_pairs(rows: list[dict], per_problem: int, seed: int) -> list[tuple[str, str, str]]:
    """(prompt, positive, negative) of the same problem: up to ``per_problem`` of each problem's
    positive x negative combinations (a fixed random choice)."""
    by_problem: dict[str, dict[str, list[str]]] = {}
    for r in rows:
        slot = by_problem.setdefault(r["prompt"], {"pos": [], "neg": []})
        slot["pos" if r["correct"] else "neg"].append(r["response"])
    rng, pairs = random.Random(seed), []
    for prompt, slot in by_problem.items():
        combos = [(p, n) for p in dict.fromkeys(slot["pos"]) for n in dict.fromkeys(slot["neg"])]
        rng.shuffle(combos)
        pairs.extend((prompt, p, n) for p, n in combos[:per_problem])
    return pairs


def redi_stage(cfg: REDIConfig, start: Path, pairs: list, run_dir: Path) -> tuple[Path, dict]:
    """Stage 2: the REDI objective on (positive, negative) pairs, from the SFT student --
    ``distill_lm`` with ``data.format: pairs`` and ``loss.name: redi``."""
    from distillery.lm.config import lm_config_from_dict
    from distillery.lm.trainer import distill_lm

    rc = cfg.redi
    if (run_dir / "summary.json").is_file() and (run_dir / "student" / "config.json").is_file():
        return run_dir / "student", json.loads((run_dir / "summary.json").read_text())
    if not pairs:
        raise DataError("the teacher's traces gave no (positive, negative) pair of one problem: sample more traces "
                        "per problem or at a higher temperature, or set redi.steps: 0")
    data = run_dir.parent / "pairs.jsonl"
    if not data.is_file():
        _write_jsonl(data, [{"prompt": p, "chosen": y, "rejected": n} for p, y, n in pairs])
    from transformers import AutoConfig

    context = AutoConfig.from_pretrained(start)
    block = min(96, getattr(context, "n_positions", None) or getattr(context, "max_position_embeddings", 96))
    lm_cfg = lm_config_from_dict({
        "name": run_dir.name, "output_dir": str(run_dir.parent), "student": {"path": str(start)},
        "data": {"source": str(data), "format": "pairs", "block_size": block, "eval_fraction": 0.0},
        "loss": {"name": "redi", "params": {"alpha": rc.alpha, "pos_weight": rc.pos_weight}},
        "train": {"max_steps": rc.steps, "batch_size": rc.batch_size, "lr": rc.lr, "warmup_steps": 0,
                  "scheduler": "constant", "checkpoint_every": rc.checkpoint_every, "seed": cfg.seed,
                  "progress": cfg.progress}})
    resume = (run_dir / "checkpoints").is_dir()
    summary = distill_lm(lm_cfg, resume=resume, overwrite=not resume).summary
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary.update(pairs=len(pairs), alpha=rc.alpha, final=rows[-1] if rows else None)
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    return run_dir / "student", summary


def accuracy(model_dir: Path | None, held_out: list, max_new_tokens: int, generator=None) -> float:
    """Greedy accuracy on held-out problems (the verifier on the final answer)."""
    if generator is None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        generator = HFGenerator(AutoModelForCausalLM.from_pretrained(model_dir).eval(),
                                AutoTokenizer.from_pretrained(model_dir), batch_size=100)
    outs = generator.complete([addition_trace(a, b)[0] for a, b in held_out], max_new_tokens=max_new_tokens,
                              temperature=0.0, stop=["\n"])
    return sum(final_answer(o[0]) == a + b for (a, b), o in zip(held_out, outs)) / len(held_out)


def _prepare_dir(cfg: REDIConfig, overwrite: bool) -> Path:
    run_dir = Path(cfg.output_dir) / cfg.name
    text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    marker = run_dir / "redi.yaml"
    if run_dir.exists() and any(run_dir.iterdir()):
        if not marker.is_file():
            raise RunDirExistsError(f"refusing to use {run_dir}: it is not a REDI run directory; choose another name")
        if marker.read_text() != text:
            if not overwrite:
                raise RunDirExistsError(f"{run_dir} holds a REDI run with another config: pass overwrite=True "
                                        "(--overwrite) or choose another name with --set name=NEW")
            shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(marker, text)
    return run_dir


def run_redi(cfg: REDIConfig, *, overwrite: bool = False) -> dict:
    """Teacher (built if needed) -> sampled, verified traces -> SFT on positives -> REDI ->
    held-out accuracy.  Finished stages are reused; an interrupted run resumes."""
    run_dir = _prepare_dir(cfg, overwrite)
    if (run_dir / "summary.json").is_file():
        return json.loads((run_dir / "summary.json").read_text())
    t0, c0 = time.perf_counter(), time.process_time()
    ensure_teacher(cfg)
    rows = sample_traces(cfg, Path(cfg.traces_file) if cfg.traces_file else run_dir / "traces.jsonl")
    positives = [{"prompt": r["prompt"], "response": r["response"]} for r in rows if r["correct"]]
    if not positives:
        raise DataError("none of the teacher's traces is correct: train the teacher longer or sample at a lower temperature")
    _write_jsonl(run_dir / "positives.jsonl", positives)
    from distillery.lm.demo import init_model

    init = init_model(run_dir / "student-init", Path(cfg.student.tokenizer), cfg.student.shape, seed=cfg.student.seed + cfg.seed)
    sft_dir, sft_summary = _sft("sft", run_dir, str(init), run_dir / "positives.jsonl", cfg.sft, cfg.seed, cfg.progress)
    _, held_out = _splits(cfg)
    budget = cfg.sampling.max_new_tokens
    summary = {"name": cfg.name, "traces": len(rows), "positives": len(positives), "negatives": len(rows) - len(positives),
               "teacher_sample_accuracy": len(positives) / len(rows), "eval_problems": len(held_out),
               "sft": {"steps": sft_summary["steps"], "accuracy": accuracy(sft_dir, held_out, budget)}}
    if cfg.teacher.path is not None:
        summary["teacher_greedy_accuracy"] = accuracy(Path(cfg.teacher.path), held_out, budget)
    final = sft_dir
    if cfg.redi.steps:
        pairs = make_pairs(rows, cfg.redi.pairs_per_problem, cfg.seed)
        final, redi_summary = redi_stage(cfg, sft_dir, pairs, run_dir / "redi")
        summary["redi"] = {**redi_summary, "accuracy": accuracy(final, held_out, budget)}
    summary["accuracy"] = summary["redi"]["accuracy"] if cfg.redi.steps else summary["sft"]["accuracy"]
    summary["student"] = str(final)
    summary["wall_seconds"] = time.perf_counter() - t0
    summary["cpu_seconds"] = time.process_time() - c0  # this process's CPU time: robust to a shared machine
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    return summary
