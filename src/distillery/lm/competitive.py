"""Competitive distillation: ``distillery lm competitive CONFIG``.

Li, Lin, Wang & Qian (2023), "Unlock the Power: Competitive Distillation for Multi-Modal Large
Language Models" (CoMD, arXiv 2311.08213), stage 2 (competitive distillation), text only.  Each
round r = 1..R:

1. the instruction pool P_r (round 1: prompts cut from code: a ``def`` line and the lines after it);
2. teacher and student answer every instruction (greedy);
3. the *assessor* compares the two answers: here the judge's mean per-token log-likelihood of each
   answer given the instruction, log p_J(answer | instruction) / |answer|; the student wins when
   its answer scores at least the teacher's minus ``judge.margin`` (a blank answer always loses);
4. the student is trained (``distill_lm``, prompt/response data, ``train.loss`` = forward KL on
   the teacher's answers or ``ce``) on the instructions it lost -- the paper's "difficult" set;
5. the *augmentor* evolves the pool: the teacher writes new instructions from each lost one
   (``evolve.template``, default: the instruction's first line, continued by sampling), filtered
   for validity and near-duplicates (ROUGE-L F1 against the pool below ``evolve.max_similarity``,
   the filter of Self-Instruct, Wang et al. 2023); they join P_{r+1}.

What differs from the paper and why: the paper's assessor is a language model prompted to compare
the two answers; a small code model cannot be prompted so, hence the judge is a likelihood -- the
teacher's by default, or ``judge.path`` (e.g. a stronger model).  The paper calls the feedback
bidirectional (knowledge flows both ways); here only the student is updated and the teacher stays
fixed, since it may be a black-box endpoint.  Comparing arms: ``train.select: all`` with
``rounds: 1`` is one-shot distillation on the initial pool (the baseline; the same number of steps
when ``steps_per_round`` is R times larger); ``rounds: 0`` only evaluates ``student``.

Teacher text goes through :func:`~distillery.lm.textgen.load_generator`, so an OpenAI-compatible
endpoint works as teacher; the judge and ``train.loss: forward_kl`` need weights
(``GeneratorSpec.model_spec`` says so for an endpoint).  Everything is written under
``output_dir/name/``; a finished round (``round-K/round.json``) and a finished training run are
reused, so an interrupted run resumes.
"""
from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from distillery.config import format_validation_error, read_yaml
from distillery.engine.checkpoint import atomic_write_text
from distillery.engine.progress import ProgressBar
from distillery.errors import ConfigError, DataError
from distillery.lm.config import LMModel
from distillery.lm.textgen import GeneratorSpec, HFGenerator, load_generator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Instructions(_Strict):
    source: str = Field("stdlib:email/*.py", description="Code files the initial instructions are cut from (file, glob, stdlib:...).")
    num_train: int = Field(48, gt=0, description="Instructions in the initial pool.")
    num_eval: int = Field(32, ge=0, description="Held-out instructions for the final win rate (never trained on).")
    lines: int = Field(3, gt=0, description="Lines per instruction: a `def` line and the lines after it.")
    seed: int = 0


class Judge(_Strict):
    path: str | None = Field(None, description="Causal LM that scores answers; None: the teacher (needs its weights).")
    margin: float = Field(0.5, ge=0, description="The student wins when its mean log-likelihood per token is within "
                                                 "`margin` nats of the teacher's answer (ties go to the student).")


class Evolve(_Strict):
    enabled: bool = True
    template: str = Field("{prefix}", description="What the teacher continues for each lost instruction: "
                                                  "{prefix} (its first `prefix_lines` lines) and/or {instruction}.")
    prefix_lines: int = Field(1, gt=0)
    keep_prefix: bool = Field(True, description="New instruction = prefix + continuation (a completion model); "
                                                "false: the continuation alone (an instruction-following teacher).")
    per_failure: int = Field(1, gt=0, description="Candidates sampled per lost instruction.")
    max_new: int = Field(32, gt=0, description="At most this many new instructions per round.")
    max_new_tokens: int = Field(48, gt=0)
    temperature: float = Field(1.0, gt=0)
    max_similarity: float = Field(0.7, gt=0, le=1, description="Drop a candidate whose ROUGE-L F1 with any pool "
                                                               "instruction reaches this.")


class CompetitiveTrain(_Strict):
    select: Literal["lost", "all"] = Field("lost", description="lost: the instructions the student lost (CoMD); "
                                                          "all: the whole pool (one-shot baseline).")
    loss: Literal["forward_kl", "ce"] = Field("forward_kl", description="forward_kl: token-level KD on the teacher's "
                                                                        "answers (needs its weights); ce: its text only.")
    steps_per_round: int = Field(30, gt=0)
    batch_size: int = Field(8, gt=0)
    lr: float = Field(1e-3, gt=0)
    block_size: int = Field(128, gt=1)
    seed: int = 0


class CompetitiveConfig(_Strict):
    name: str = "competitive"
    output_dir: str = "runs/lm/data"
    teacher: GeneratorSpec = GeneratorSpec(path="runs/lm/teacher")
    student: LMModel = LMModel(path="runs/lm/student-init")
    instructions: Instructions = Instructions()
    judge: Judge = Judge()
    evolve: Evolve = Evolve()
    train: CompetitiveTrain = CompetitiveTrain()
    rounds: int = Field(3, ge=0, description="Competition rounds; 0: only evaluate `student` (a reference row).")
    max_new_tokens: int = Field(32, gt=0, description="Answer length, teacher and student.")
    eval_text: str | None = Field("stdlib:json/*.py", description="Held-out text for the final perplexity (None: skip).")
    progress: bool = True

    @model_validator(mode="after")
    def _needs_weights(self) -> "CompetitiveConfig":
        if self.teacher.endpoint is not None and self.judge.path is None:
            raise ValueError("the judge scores log-likelihoods and an endpoint teacher has no weights: set judge.path "
                             "to a local causal LM")
        if self.teacher.endpoint is not None and self.train.loss == "forward_kl":
            raise ValueError("train.loss: forward_kl reads the teacher's logits, which an endpoint does not give: "
                             "use train.loss: ce (learn from its answers' text)")
        return self


def load_competitive_config(path: str | Path, overrides: list[str] | None = None) -> CompetitiveConfig:
    raw = read_yaml(path, overrides, hint="ready-made configs live in configs/lm/data/")
    try:
        return CompetitiveConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, str(path), CompetitiveConfig)) from None


# ---- the method's pure parts: selection, judging, similarity

_DEF = re.compile(r"^\s*def \w+\(.*\)[^:]*:\s*$")


def cut_instructions(texts: list[str], lines: int) -> list[str]:
    """Each one-line ``def`` signature followed by ``lines - 1`` lines, ending with a newline; duplicates dropped."""
    out: dict[str, None] = {}
    for text in texts:
        rows = text.splitlines()
        for i, row in enumerate(rows):
            if _DEF.match(row) and i + lines <= len(rows):
                out["\n".join(rows[i:i + lines]) + "\n"] = None
    return list(out)


def student_wins(student_lp: list[float], teacher_lp: list[float], margin: float) -> list[bool]:
    """The assessor's verdicts from mean per-token log-likelihoods (None/-inf: an empty answer, loses)."""
    return [s is not None and s > float("-inf") and (t is None or s >= t - margin) for s, t in zip(student_lp, teacher_lp)]


def rouge_l(a: str, b: str) -> float:
    """ROUGE-L F1 on whitespace tokens (Lin, 2004): 2 P R / (P + R) with P = LCS/|a|, R = LCS/|b|."""
    x, y = a.split(), b.split()
    if not x or not y:
        return 0.0
    prev = [0] * (len(y) + 1)
    for xi in x:
        cur = [0]
        for j, yj in enumerate(y):
            cur.append(prev[j] + 1 if xi == yj else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(x), lcs / len(y)
    return 2 * p * r / (p + r)


def filter_candidates(candidates: list[str], pool: list[str], *, lines: int, max_similarity: float) -> list[str]:
    """Valid (``lines`` lines, the first a ``def`` signature, no blank-only body) and new (ROUGE-L
    F1 with every pool instruction and every kept candidate below ``max_similarity``)."""
    kept: list[str] = []
    for cand in candidates:
        rows = cand.splitlines()[:lines]
        if len(rows) < lines or not _DEF.match(rows[0]) or not any(r.strip() for r in rows[1:]):
            continue
        text = "\n".join(rows) + "\n"
        if all(rouge_l(text, other) < max_similarity for other in [*pool, *kept]):
            kept.append(text)
    return kept


def judge_answers(model, tok, instructions: list[str], answers: list[str]) -> list[float]:
    """Mean log p(answer | instruction) per answer token; -inf for an empty answer."""
    from distillery.lm.scoring import score_texts

    scores = score_texts(model, tok, answers, contexts=instructions, batch_size=16)
    return [float(lp / n) if n > 0 and a.strip() else float("-inf")
            for lp, n, a in zip(scores.logprob.tolist(), scores.tokens.tolist(), answers)]


# ---- the loop

def _write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _prepare_dir(cfg: CompetitiveConfig, overwrite: bool) -> Path:
    root = Path(cfg.output_dir) / cfg.name
    marker = root / "competitive.json"
    if root.exists() and any(root.iterdir()) and not marker.is_file():
        raise ConfigError(f"refusing to write into {root}: it exists and is not a competitive-distillation run "
                          "(no competitive.json); choose another name with --set name=NEW")
    config = cfg.model_dump_json(indent=2)
    if marker.is_file() and marker.read_text() != config:
        if not overwrite:
            raise ConfigError(f"{root} holds a run with another config: pass --overwrite to replace it, or choose "
                              "another name with --set name=NEW")
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    if overwrite and marker.is_file():
        shutil.rmtree(root)
        root.mkdir(parents=True)
    atomic_write_text(marker, config)
    return root


def _initial_pool(cfg: CompetitiveConfig, root: Path) -> tuple[list[str], list[str]]:
    path = root / "instructions.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        return saved["train"], saved["eval"]
    from distillery.lm import data as lmdata
    from distillery.lm.config import LMData

    ic = cfg.instructions
    docs = lmdata.load_documents(ic.source, LMData(source=ic.source))
    found = cut_instructions([t for t in docs["text"] if t], ic.lines)
    need = ic.num_train + ic.num_eval
    if len(found) < need:
        raise DataError(f"{ic.source!r} gives {len(found)} instructions (a one-line `def` signature + {ic.lines - 1} "
                        f"lines); {need} are needed: lower instructions.num_train/num_eval or point "
                        "instructions.source at more code")
    random.Random(ic.seed).shuffle(found)
    train, held = found[:ic.num_train], found[ic.num_train:need]
    atomic_write_text(path, json.dumps({"train": train, "eval": held}, indent=1))
    return train, held


class _Answers:
    """The teacher's answers, written once per instruction and kept on disk (the teacher may be a
    paid endpoint)."""

    def __init__(self, path: Path, generator, max_new_tokens: int):
        self.path, self.generator, self.max_new_tokens = path, generator, max_new_tokens
        self.known = {r["instruction"]: r["answer"] for r in _read_jsonl(path)} if path.is_file() else {}

    def __call__(self, instructions: list[str]) -> list[str]:
        missing = [i for i in dict.fromkeys(instructions) if i not in self.known]
        if missing:
            texts = self.generator.complete(missing, max_new_tokens=self.max_new_tokens, temperature=0.0)
            self.known.update((i, t[0]) for i, t in zip(missing, texts))
            _write_jsonl(self.path, [{"instruction": k, "answer": v} for k, v in self.known.items()])
        return [self.known[i] for i in instructions]


def _student_answers(student_dir: Path, instructions: list[str], max_new_tokens: int) -> list[str]:
    spec = GeneratorSpec(path=str(student_dir))
    return [t[0] for t in HFGenerator.from_spec(spec).complete(instructions, max_new_tokens=max_new_tokens)]


def _train(cfg: CompetitiveConfig, rows: list[dict], student: LMModel, out: Path, name: str) -> Path:
    """distill_lm on prompt/response rows; returns the exported student.  Rows are repeated to fill
    at least one batch (a round may have lost only a few instructions)."""
    from distillery.lm.config import lm_config_from_dict
    from distillery.lm.trainer import distill_lm

    tc = cfg.train
    run_dir = out / name
    if (run_dir / "summary.json").is_file():
        return run_dir / "student"
    data = out / f"{name}.jsonl"
    filled = rows * -(-tc.batch_size // len(rows))
    _write_jsonl(data, filled)
    raw = {"name": name, "output_dir": str(out), "student": student.model_dump(exclude_none=True),
           "data": {"source": str(data), "format": "prompt_response", "block_size": tc.block_size,
                    "eval_fraction": 0.0, "chat_template": "never"},
           "loss": {"name": tc.loss},
           "train": {"max_steps": tc.steps_per_round, "batch_size": tc.batch_size, "lr": tc.lr,
                     "warmup_steps": min(10, tc.steps_per_round // 5), "checkpoint_every": 0, "seed": tc.seed,
                     "progress": cfg.progress}}
    if tc.loss != "ce":
        raw["teacher"] = cfg.teacher.model_spec().model_dump(exclude_none=True)
    resume = (run_dir / "checkpoints").is_dir()
    distill_lm(lm_config_from_dict(raw, source=f"{name} (competitive round)"), resume=resume, overwrite=not resume)
    return run_dir / "student"


def _evolve(cfg: CompetitiveConfig, generator, lost: list[str], pool: list[str], seed: int) -> list[str]:
    ev = cfg.evolve
    prefixes = ["\n".join(i.splitlines()[:ev.prefix_lines]) + "\n" for i in lost]
    prompts = [ev.template.format(prefix=p, instruction=i) for p, i in zip(prefixes, lost)]
    outs = generator.complete(prompts, max_new_tokens=ev.max_new_tokens, temperature=ev.temperature,
                              n=ev.per_failure, seed=seed)
    candidates = [(p if ev.keep_prefix else "") + t for p, texts in zip(prefixes, outs) for t in texts]
    return filter_candidates(candidates, pool, lines=cfg.instructions.lines, max_similarity=ev.max_similarity)[:ev.max_new]


def _heldout_ppl(student_dir: Path, teacher_model, source: str) -> dict:
    import torch

    from distillery.lm import data as lmdata
    from distillery.lm import models as lmmodels
    from distillery.lm.config import LMData
    from distillery.lm.evaluate import evaluate_lm

    spec = LMModel(path=str(student_dir))
    tok = lmmodels.load_tokenizer(spec)
    student = lmmodels.load_model(spec, "student").eval()
    block = min(128, lmmodels.context_length(student) or 128)  # blocks the student can read in one window
    rows = lmdata.tokenize(lmdata.load_documents(source, LMData(source=source)), tok,
                           LMData(source=source, block_size=block)).with_format("torch")
    rows = rows.select(range(min(32, len(rows))))
    loader = torch.utils.data.DataLoader(rows, batch_size=8, collate_fn=lambda r: lmdata.collate(r, tok.pad_token_id))
    return evaluate_lm(student, teacher_model, loader, torch.device("cpu"), len(tok))


def run_competitive(cfg: CompetitiveConfig, *, overwrite: bool = False) -> dict:
    """The whole method; returns (and writes as summary.json) the per-round record and the final
    held-out win rate against the teacher and perplexity."""
    from distillery.lm import models as lmmodels

    root = _prepare_dir(cfg, overwrite)
    generator = load_generator(cfg.teacher)
    if cfg.judge.path is not None:
        jspec = LMModel(path=cfg.judge.path)
        judge_model, judge_tok = lmmodels.load_model(jspec, "judge").eval(), lmmodels.load_tokenizer(jspec)
    else:  # the teacher judges (the paper's setting); its weights are already loaded by the generator
        judge_model, judge_tok = generator.model, generator.tokenizer
    teacher_answers = _Answers(root / "teacher_answers.jsonl", generator, cfg.max_new_tokens)
    pool, held = _initial_pool(cfg, root)
    student, rounds = cfg.student, []
    with ProgressBar(cfg.rounds, enabled=cfg.progress, title=f"{cfg.name}: rounds") as bar:
        for r in range(1, cfg.rounds + 1):
            rdir = root / f"round-{r}"
            rdir.mkdir(exist_ok=True)
            done = rdir / "round.json"
            if done.is_file():
                record = json.loads(done.read_text())
            else:
                record = _round(cfg, r, rdir, pool, student, generator, teacher_answers, judge_model, judge_tok)
                atomic_write_text(done, json.dumps(record, indent=1))
            rounds.append({k: v for k, v in record.items() if k not in ("pool_next",)})
            pool = record["pool_next"]
            student = LMModel(path=record["student"])
            bar.step(loss=float("nan"), samples=record["trained_on"])
    final_dir = Path(student.path)
    answers = final_dir.is_dir() and student.init == "pretrained"  # random weights: no answer (it loses)
    summary = {"name": cfg.name, "rounds": cfg.rounds, "train_on": cfg.train.select,
               "train_steps": sum(r["steps"] for r in rounds), "per_round": rounds, "final_pool": len(pool)}
    if held:
        t_ans = teacher_answers(held)
        s_ans = _student_answers(final_dir, held, cfg.max_new_tokens) if answers else [""] * len(held)
        t_lp = judge_answers(judge_model, judge_tok, held, t_ans)
        s_lp = judge_answers(judge_model, judge_tok, held, s_ans)
        wins = student_wins(s_lp, t_lp, cfg.judge.margin)
        gap = [t - s for s, t in zip(s_lp, t_lp) if s > float("-inf") and t > float("-inf")]
        summary.update(eval_win_rate=sum(wins) / len(wins), eval_instructions=len(held),
                       eval_blank_answers=sum(not a.strip() for a in s_ans),
                       eval_judge_gap=sum(gap) / len(gap) if gap else None)  # pairs of non-blank answers
        _write_jsonl(root / "eval_judgments.jsonl",
                     [{"instruction": i, "teacher": t, "student": s, "teacher_lp": a, "student_lp": b, "student_wins": w}
                      for i, t, s, a, b, w in zip(held, t_ans, s_ans, t_lp, s_lp, wins)])
    if cfg.eval_text and answers:
        teacher_model = generator.model if isinstance(generator, HFGenerator) else None
        summary.update({f"heldout_{k}": v for k, v in _heldout_ppl(final_dir, teacher_model, cfg.eval_text).items()})
    atomic_write_text(root / "summary.json", json.dumps(summary, indent=2))
    return summary


def _round(cfg, r: int, rdir: Path, pool: list[str], student: LMModel, generator, teacher_answers,
           judge_model, judge_tok) -> dict:
    """One round: answer, judge, train on the lost (or all) instructions, evolve the pool."""
    t_ans = teacher_answers(pool)
    trained = Path(student.path).is_dir() and student.init == "pretrained"
    s_ans = _student_answers(Path(student.path), pool, cfg.max_new_tokens) if trained else [""] * len(pool)
    t_lp = judge_answers(judge_model, judge_tok, pool, t_ans)
    s_lp = judge_answers(judge_model, judge_tok, pool, s_ans)
    wins = student_wins(s_lp, t_lp, cfg.judge.margin)
    _write_jsonl(rdir / "judgments.jsonl",
                 [{"instruction": i, "teacher": t, "student": s, "teacher_lp": a, "student_lp": b, "student_wins": w}
                  for i, t, s, a, b, w in zip(pool, t_ans, s_ans, t_lp, s_lp, wins)])
    lost = [i for i, w in zip(pool, wins) if not w]
    chosen = set(pool if cfg.train.select == "all" else lost)
    rows = [{"prompt": i, "response": a} for i, a in zip(pool, t_ans) if i in chosen and a.strip()]
    record = {"round": r, "pool": len(pool), "win_rate": sum(wins) / len(wins), "lost": len(lost),
              "trained_on": len(rows), "steps": 0, "student": student.path, "new_instructions": 0}
    if rows:
        record["student"] = str(_train(cfg, rows, student, rdir, "train"))
        record["steps"] = cfg.train.steps_per_round
    new = _evolve(cfg, generator, lost, pool, seed=cfg.train.seed * 1000 + r) if cfg.evolve.enabled and lost else []
    atomic_write_text(rdir / "new_instructions.json", json.dumps(new, indent=1))
    record["new_instructions"] = len(new)
    record["pool_next"] = pool + new
    return record
