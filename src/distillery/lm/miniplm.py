"""MiniPLM: knowledge distillation through the pre-training data (``distillery lm miniplm CONFIG``).

Gu, Zhou, Meng, Zhou & Huang (2024), "MiniPLM: Knowledge Distillation for Pre-Training Language
Models" (arXiv:2410.17215).  The teacher never meets the student: it only *reweights the corpus*.
*Difference sampling* (Section 3.2) scores every pre-training document ``x`` by

    r(x, p, p_ref) = log p(x) / p_ref(x)                                   (the paper's eq. 5)

where ``p`` is the large teacher and ``p_ref`` a small *reference* LM trained on a little of the
same corpus, and keeps the top-α fraction: documents the teacher finds much more likely than a
small model does are the "hard and knowledgeable" ones a small student should spend its budget
on; documents both find easy (boilerplate) or both find unlikely (noise) are dropped.  The
student is then pre-trained with the plain LM loss on the refined corpus.

What is implemented, stage by stage (each stage's output under ``output_dir/name/`` is reused,
so an interrupted run continues where it stopped):

1. ``corpus``: the pool's files are split into documents (:func:`chunk_source`), a seeded
   ``eval_fraction`` of the *files* is held out (``eval.jsonl``; never in the pool, never
   selected), the rest form ``pool.jsonl`` (at most ``max_documents``, a seeded sample).
2. ``reference``: an existing model (``reference.path``) or one trained here with
   :func:`~distillery.lm.trainer.distill_lm` (``loss: ce``) on a random ``fraction`` of the pool.
3. ``scores.json``: log p_teacher and log p_ref of every pool document (:func:`score_texts`).
4. ``selected/<arm>.jsonl``: ``difference`` (top-α by r), ``random`` (the same number of
   documents drawn uniformly, seeded), ``teacher`` (top-α by the teacher's log-likelihood alone,
   an ablation without the reference).
5. ``students/<arm>-s<seed>``: the student pre-trained with ``loss: ce`` on each arm, same
   steps x batch x block, evaluated on ``eval.jsonl``.

Differences from the paper, and why:

* Length normalisation: the paper's instances all have 1,024 tokens, so the released code
  compares the per-token *mean* losses (``small_loss - large_loss``); our documents have
  different lengths, so r is the difference of per-token mean log-probabilities (same thing
  for equal lengths, and not biased towards short or long documents otherwise).  Documents
  are scored on their first ``score_max_tokens`` tokens.
* Documents: the paper selects among fixed-length chunks of the Pile; the demo corpus (the
  standard library) has ~170 long modules, so we cut them into top-level ``def``/``class``
  blocks of at most ``max_lines`` lines (:func:`chunk_source`).
* Scale: a 2-layer reference, a 4-layer teacher and a few thousand documents instead of
  104M/1.8B models and 100B tokens; the paper's claim is about downstream accuracy, we measure
  held-out perplexity.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import statistics
from pathlib import Path
from typing import Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from distillery.config import format_validation_error, read_yaml
from distillery.engine.checkpoint import atomic_write_text
from distillery.errors import ConfigError, DataError, RunDirExistsError
from distillery.lm.config import LMModel, LMTrain
from distillery.lm.textgen import GeneratorSpec

ARMS = ("difference", "random", "teacher")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Pool(_Strict):
    """Where the candidate documents come from and how files become documents."""

    source: str = Field("stdlib:*.py", description="Text files (a glob, `stdlib:PATTERN` for the standard library, a "
                                                   "directory) or a .jsonl of {text} documents.")
    max_lines: int = Field(40, gt=0, description="Code files: a top-level def/class block longer than this is cut into "
                                                 "pieces of this many lines.")
    min_lines: int = Field(4, gt=0, description="Drop documents with fewer non-blank lines (stray imports, `pass`).")
    max_documents: int | None = Field(2000, gt=0, description="Keep at most this many pool documents (seeded sample).")
    eval_fraction: float = Field(0.1, gt=0, lt=1, description="Share of the *files* held out for evaluation.")
    max_eval_documents: int = Field(300, gt=0)
    seed: int = 0


class TrainReference(_Strict):
    """Train the reference LM here: small, and on a small random part of the pool (as in the paper)."""

    init: str = Field("runs/lm/student-init", description="Architecture (and tokenizer) of the reference; fresh weights.")
    fraction: float = Field(0.2, gt=0, le=1, description="Share of the pool documents it is trained on.")
    steps: int = Field(150, gt=0)
    batch_size: int = Field(16, gt=0)
    lr: float = Field(1e-3, gt=0)
    seed: int = 0


class Reference(_Strict):
    """The reference LM p_ref: an existing model (``path``) or ``train: {...}`` -- exactly one."""

    path: str | None = None
    train: TrainReference | None = None

    @model_validator(mode="after")
    def _one(self) -> "Reference":
        if (self.path is None) == (self.train is None):
            raise ValueError("give exactly one of `path` (an existing small causal LM) or `train: {...}` (train one on "
                             "a slice of the pool)")
        return self


class MiniPLMConfig(_Strict):
    name: str = "miniplm"
    output_dir: str = "runs/lm/data"
    teacher: GeneratorSpec = Field(GeneratorSpec(path="runs/lm/teacher"),
                                   description="The teacher; scoring needs its weights (a `path`, not an endpoint).")
    reference: Reference = Reference(train=TrainReference())
    pool: Pool = Pool()
    alpha: float = Field(0.5, gt=0, lt=1, description="Fraction of the pool kept (the paper's released corpus: 0.5).")
    score_max_tokens: int = Field(256, gt=1, description="Score each document on at most this many tokens.")
    score_batch_size: int = Field(16, gt=0)
    arms: list[Literal["difference", "random", "teacher"]] = Field(
        ["difference", "random"], min_length=1, description="Corpora to pre-train a student on: difference sampling, a "
                                                            "random subset of the same size, teacher-only top-α.")
    student: LMModel = Field(LMModel(path="runs/lm/student-init", init="random"),
                             description="init: random gives each seed fresh weights of this architecture.")
    seeds: list[int] = Field([0, 1], min_length=1)
    block_size: int = Field(128, gt=1)
    train: LMTrain = LMTrain(max_steps=150, batch_size=16, lr=1e-3, warmup_steps=20, checkpoint_every=50)
    progress: bool = True


def load_miniplm_config(path: str | Path, overrides: list[str] | None = None) -> MiniPLMConfig:
    raw = read_yaml(path, overrides, hint="a ready-made MiniPLM config is configs/lm/data/miniplm.yaml")
    try:
        return MiniPLMConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, str(path), MiniPLMConfig)) from None


# ---------------------------------------------------------------- documents

_TOP_LEVEL = re.compile(r"^(?:async\s+def|def|class)\b|^@")


def chunk_source(text: str, max_lines: int = 40, min_lines: int = 4) -> list[str]:
    """Split a Python module into documents: the preamble and each top-level ``def``/``class``
    block (decorators included) is one document; a block longer than ``max_lines`` lines is cut
    into consecutive pieces of ``max_lines``; pieces with fewer than ``min_lines`` non-blank lines
    are dropped.  Text that is not code has no such lines and is simply cut every ``max_lines``."""
    blocks: list[list[str]] = [[]]
    for line in text.splitlines():
        # a decorator line starts the block; the def/class right after it stays in that block
        if _TOP_LEVEL.match(line) and blocks[-1] and not blocks[-1][-1].startswith("@"):
            blocks.append([])
        blocks[-1].append(line)
    docs = []
    for block in blocks:
        for start in range(0, len(block), max_lines):
            piece = block[start:start + max_lines]
            if sum(1 for line in piece if line.strip()) >= min_lines:
                docs.append("\n".join(piece).strip("\n") + "\n")
    return docs


def _source_files(source: str) -> list[str]:
    from distillery.lm.data import _files

    files = _files(source)
    if files is None:
        raise ConfigError(f"pool.source {source!r} is not a local file, directory or glob: MiniPLM reads local text")
    return files


def _read_documents(files: list[str], pool: Pool) -> list[str]:
    docs: list[str] = []
    for f in files:
        if f.endswith(".jsonl"):
            with open(f, encoding="utf-8") as fh:
                docs.extend(json.loads(line)["text"] for line in fh if line.strip())
        else:
            docs.extend(chunk_source(Path(f).read_text(encoding="utf-8", errors="replace"), pool.max_lines, pool.min_lines))
    return docs


def write_jsonl(path: Path, texts: list[str]) -> Path:
    """``{"text": ...}`` per line, written to a temporary file and renamed (never half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for t in texts:
            fh.write(json.dumps({"text": t}) + "\n")
    os.replace(tmp, path)
    return path


def read_jsonl(path: Path) -> list[str]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line)["text"] for line in fh if line.strip()]


def build_corpus(pool: Pool, out: Path) -> tuple[list[str], list[str]]:
    """(pool documents, held-out documents), from disjoint sets of files; reused when written."""
    pool_path, eval_path = out / "pool.jsonl", out / "eval.jsonl"
    if pool_path.is_file() and eval_path.is_file():
        return read_jsonl(pool_path), read_jsonl(eval_path)
    files = _source_files(pool.source)
    if len(files) < 2:
        raise DataError(f"pool.source {pool.source!r} names {len(files)} file(s); MiniPLM holds out whole files for "
                        "evaluation, so it needs at least 2")
    rng = random.Random(pool.seed)
    shuffled = files[:]
    rng.shuffle(shuffled)
    n_eval = max(1, round(pool.eval_fraction * len(files)))
    held, kept = sorted(shuffled[:n_eval]), sorted(shuffled[n_eval:])
    docs, held_docs = _read_documents(kept, pool), _read_documents(held, pool)
    if pool.max_documents is not None and len(docs) > pool.max_documents:
        docs = [docs[i] for i in sorted(rng.sample(range(len(docs)), pool.max_documents))]
    held_docs = held_docs[:pool.max_eval_documents]
    if len(docs) < 2 or not held_docs:
        raise DataError(f"pool.source {pool.source!r} gave {len(docs)} pool and {len(held_docs)} held-out documents "
                        f"(min_lines {pool.min_lines}): add files or lower pool.min_lines")
    write_jsonl(eval_path, held_docs)
    write_jsonl(pool_path, docs)
    return docs, held_docs


# ---------------------------------------------------------------- the selection rule

def difference_scores(teacher_logprob: torch.Tensor, reference_logprob: torch.Tensor,
                      tokens: torch.Tensor) -> torch.Tensor:
    """r(x) = log p(x)/p_ref(x) per scored token: (log p_teacher(x) - log p_ref(x)) / |x|."""
    return (teacher_logprob - reference_logprob) / tokens.clamp_min(1)


def top_alpha(scores: torch.Tensor, alpha: float) -> list[int]:
    """Indices (ascending) of the ``floor(alpha * N)`` highest scores -- the paper's Top-α; ties
    go to the earlier document (a stable sort), so the choice is deterministic."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    k = int(alpha * len(scores))
    if k == 0:
        raise DataError(f"alpha {alpha} of {len(scores)} documents keeps none: raise alpha or add documents")
    order = torch.sort(scores, descending=True, stable=True).indices
    return sorted(order[:k].tolist())


def random_subset(n: int, k: int, seed: int) -> list[int]:
    """k of n indices, uniformly without replacement (the same-size baseline)."""
    return sorted(random.Random(seed).sample(range(n), k))


def select(arm: str, scores: dict[str, torch.Tensor], alpha: float, seed: int) -> list[int]:
    n = len(scores["tokens"])
    if arm == "difference":
        return top_alpha(difference_scores(scores["teacher"], scores["reference"], scores["tokens"]), alpha)
    if arm == "teacher":
        return top_alpha(scores["teacher"] / scores["tokens"].clamp_min(1), alpha)
    if arm == "random":
        return random_subset(n, int(alpha * n), seed)
    raise ValueError(f"unknown arm {arm!r}; arms: {', '.join(ARMS)}")


# ---------------------------------------------------------------- stages that need models

def _train_lm(name: str, out: Path, student: LMModel, data: Path, eval_data: Path, train: LMTrain,
              block_size: int, teacher: str | None = None) -> dict:
    """One distill_lm run with ``loss: ce`` (no teacher logits); a finished run is reused, an
    interrupted one resumed."""
    from distillery.lm.config import lm_config_from_dict
    from distillery.lm.trainer import distill_lm

    run_dir = out / name
    if (run_dir / "summary.json").is_file():
        return json.loads((run_dir / "summary.json").read_text())
    cfg = lm_config_from_dict({
        "name": name, "output_dir": str(out), "student": student.model_dump(),
        "data": {"source": str(data), "format": "text", "block_size": block_size, "eval_source": str(eval_data),
                 "max_eval_blocks": 10_000},
        "loss": {"name": "ce"}, "train": train.model_dump()})
    resume = (run_dir / "checkpoints").is_dir()
    return distill_lm(cfg, resume=resume, overwrite=not resume and run_dir.exists()).summary


def score_pool(cfg: MiniPLMConfig, docs: list[str], reference_dir: str, out: Path) -> dict[str, torch.Tensor]:
    """log p_teacher(x) and log p_ref(x) of every pool document (``scores.json``, reused)."""
    from distillery.lm import models as lmmodels
    from distillery.lm.scoring import score_texts

    path = out / "scores.json"
    if path.is_file():
        raw = json.loads(path.read_text())
        if len(raw["tokens"]) == len(docs):
            return {k: torch.tensor(v) for k, v in raw.items()}
    tspec = cfg.teacher.model_spec()  # scoring needs the teacher's weights: a clear error for an endpoint
    rspec = LMModel(path=reference_dir)
    tok_t = lmmodels.load_tokenizer(tspec, lmmodels.eos_token_of(tspec))
    tok_r = lmmodels.load_tokenizer(rspec, lmmodels.eos_token_of(rspec))
    out_scores = {}
    for role, spec, tok in (("teacher", tspec, tok_t), ("reference", rspec, tok_r)):
        model = lmmodels.load_model(spec, role).eval()
        s = score_texts(model, tok, docs, max_length=cfg.score_max_tokens, batch_size=cfg.score_batch_size,
                        progress=cfg.progress, title=f"scoring with the {role}")
        out_scores[role] = s.logprob
        out_scores[f"{role}_tokens"] = s.tokens
        del model
    # one tokenizer for both in the demo; with two, each model's own token count normalises its score
    tokens = out_scores.pop("teacher_tokens")
    ref_tokens = out_scores.pop("reference_tokens")
    if not torch.equal(tokens, ref_tokens):
        out_scores["reference"] = out_scores["reference"] / ref_tokens.clamp_min(1) * tokens
    result = {"teacher": out_scores["teacher"], "reference": out_scores["reference"], "tokens": tokens}
    atomic_write_text(path, json.dumps({k: v.tolist() for k, v in result.items()}))
    return result


def _prepare_dir(cfg: MiniPLMConfig, overwrite: bool) -> Path:
    run_dir = Path(cfg.output_dir) / cfg.name
    mine = run_dir / "miniplm.yaml"
    text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    if run_dir.exists() and any(run_dir.iterdir()):
        if not mine.is_file():
            raise RunDirExistsError(f"refusing to write into {run_dir}: it is not a MiniPLM run directory (no "
                                    "miniplm.yaml); choose another name with --set name=NEW")
        if overwrite:
            shutil.rmtree(run_dir)
        elif mine.read_text() != text:
            raise RunDirExistsError(f"{run_dir} holds a MiniPLM run with another config: pass --overwrite to replace "
                                    "it, or choose another name with --set name=NEW (same config: it resumes)")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(mine, text)
    return run_dir


def _mean_std(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def run_miniplm(cfg: MiniPLMConfig, *, overwrite: bool = False) -> dict:
    """All stages (module docstring); returns the summary also written to ``summary.json``."""
    cfg.teacher.model_spec()  # fail now, not after the corpus stage, for an endpoint teacher
    run_dir = _prepare_dir(cfg, overwrite)
    docs, held = build_corpus(cfg.pool, run_dir)
    eval_path = run_dir / "eval.jsonl"

    if cfg.reference.path is not None:
        reference_dir, ref_summary = cfg.reference.path, None
    else:
        rt = cfg.reference.train
        ref_docs = [docs[i] for i in random_subset(len(docs), max(1, round(rt.fraction * len(docs))), rt.seed)]
        ref_data = write_jsonl(run_dir / "reference_corpus.jsonl", ref_docs) \
            if not (run_dir / "reference_corpus.jsonl").is_file() else run_dir / "reference_corpus.jsonl"
        ref_summary = _train_lm("reference", run_dir, LMModel(path=rt.init, init="random"), ref_data, eval_path,
                                LMTrain(max_steps=rt.steps, batch_size=rt.batch_size, lr=rt.lr, seed=rt.seed,
                                        warmup_steps=min(20, rt.steps // 5), checkpoint_every=50,
                                        progress=cfg.progress), cfg.block_size)
        reference_dir = str(run_dir / "reference" / "student")

    scores = score_pool(cfg, docs, reference_dir, run_dir)
    r = difference_scores(scores["teacher"], scores["reference"], scores["tokens"])
    selections: dict[str, dict] = {}
    students: dict[str, list[dict]] = {}
    for arm in cfg.arms:
        for seed in cfg.seeds if arm == "random" else cfg.seeds[:1]:
            idx = select(arm, scores, cfg.alpha, seed)
            path = run_dir / "selected" / (f"{arm}-s{seed}.jsonl" if arm == "random" else f"{arm}.jsonl")
            if not path.is_file():
                write_jsonl(path, [docs[i] for i in idx])
            selections[path.stem] = {"documents": len(idx), "mean_r": float(r[idx].mean()),
                                     "tokens": int(scores["tokens"][idx].sum())}
        for seed in cfg.seeds:
            data = run_dir / "selected" / (f"{arm}-s{seed}.jsonl" if arm == "random" else f"{arm}.jsonl")
            train = cfg.train.model_copy(update={"seed": seed, "progress": cfg.progress})
            s = _train_lm(f"{arm}-s{seed}", run_dir / "students", cfg.student, data, eval_path, train, cfg.block_size)
            students.setdefault(arm, []).append({"seed": seed, "eval_ppl": s["eval_ppl"], "steps": s["steps"],
                                                 "train_sequences": s["train_sequences"]})
    diff_idx = set(select("difference", scores, cfg.alpha, 0))
    teach_idx = set(select("teacher", scores, cfg.alpha, 0))
    summary = {
        "name": cfg.name, "pool_documents": len(docs), "eval_documents": len(held), "alpha": cfg.alpha,
        "reference": reference_dir, "reference_eval_ppl": ref_summary["eval_ppl"] if ref_summary else None,
        "mean_r_pool": float(r.mean()), "selections": selections,
        "overlap_difference_teacher": len(diff_idx & teach_idx) / max(1, len(diff_idx)),
        "students": {arm: {"eval_ppl": _mean_std([s["eval_ppl"] for s in runs]), "runs": runs}
                     for arm, runs in students.items()},
    }
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    return summary
