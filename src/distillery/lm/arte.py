"""ARTE: align the teacher with the student's preferences, then let it write the student's data.

Liu, Ye, Zhang, Li, Zhou & Cohan (2024), "Aligning Teacher with Student Preferences for Tailored
Training Data Generation" (ARTE).  ``distillery lm arte CONFIG`` runs the five steps of the paper:

1. **drafts** -- the teacher writes ``drafts.per_prompt`` draft examples for each seed prompt
   (sampled; any :class:`~distillery.lm.textgen.GeneratorSpec`, an OpenAI-compatible endpoint too);
2. **in-context preference** -- each draft is put in front of a fixed validation set as an
   in-context demonstration, and the student's performance with it is the draft's score;
3. **pairs + DPO** -- best vs worst draft of each prompt (ties dropped) is a preference pair; the
   teacher is aligned on the pairs with DPO (Rafailov et al., 2023) through TRL's ``DPOTrainer``
   (optionally a LoRA adapter through ``peft``, merged on export);
4. **regeneration** -- the aligned teacher writes the training set from new prompts;
5. **student** -- the student is fine-tuned on it by SFT (``loss: ce``, the paper's choice) in
   :func:`distillery.lm.trainer.distill_lm`.  The same is done with the original teacher's
   generations (same prompts, examples and steps), the baseline the paper compares against.

Demo adaptation (what differs from the paper, and why):

* The domain is Python code, because the demo teacher is a code LM trained on the standard
  library.  A seed prompt is the first line of a top-level ``def``/``class`` block of the training
  documents; a draft is the teacher's continuation of it (question-rationale-answer triples do not
  exist here).
* The preference score is *likelihood*, not accuracy, since the task is language modelling:
  ``score(d) = 1/|V| sum_v [log p_S(v | d) - log p_S(v)] / |v|``, the student's mean per-token
  log-likelihood of each real validation snippet ``v`` with the draft ``d`` as context, minus the same
  without context (``distillery.lm.scoring.score_texts``).  Higher = the draft helps the student.
* The paper's student is a pretrained LM; the demo student is a random 2x96 GPT-2, whose in-context
  preferences would be noise.  ``student.pretrain_steps`` first trains it by CE on real text
  (``data.source``) for a few steps; that *base* student scores the drafts and is the starting point
  of both fine-tunings.  Set it to 0 for a student that is already pretrained.
* The paper also checks preference generalisation across tasks and students; here one "probe"
  check is made instead: fresh prompts, drafts of the original and of the aligned teacher, scored
  by the same in-context metric.

Everything lives under ``output_dir/name/``; every stage writes its output atomically and is
skipped when that output exists, so an interrupted run resumes.  DPO needs the teacher's weights:
an endpoint teacher is refused up front (``GeneratorSpec.model_spec``).
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from distillery.config import format_validation_error, read_yaml
from distillery.engine.checkpoint import atomic_write_text
from distillery.engine.progress import ProgressBar
from distillery.errors import ConfigError, DataError, RunDirExistsError
from distillery.lm.config import LMData, LoraSpec
from distillery.lm.textgen import GeneratorSpec


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ARTEPrompts(_Strict):
    """Seed prompts and the validation set, all cut from the training documents of ``data``."""

    pattern: str = Field(r"^(?:async def|def|class) \w+.*:[ \t]*$",
                         description="Regex (multiline) of a line that starts a block; such a line + newline is a prompt.")
    align: int = Field(32, gt=0, description="Prompts drafted for the preference pairs (step 1).")
    train: int = Field(256, gt=0, description="Prompts the teacher writes the student's training set from (one example each).")
    probe: int = Field(12, ge=0, description="Fresh prompts to compare original and aligned teachers' drafts (0: skip).")
    validation: int = Field(8, gt=0, description="Real snippets of the in-context validation set (from other files).")
    validation_chars: int = Field(240, gt=20, description="Characters per validation snippet (cut at a line end).")
    max_prompt_chars: int = Field(100, gt=0, description="Longer block lines are not used as prompts.")


class ARTEDrafts(_Strict):
    per_prompt: int = Field(4, ge=2, description="Drafts per prompt (best and worst form a pair).")
    max_new_tokens: int = Field(64, gt=0)
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of drafts and of the training set.")
    top_p: float = Field(0.95, gt=0, le=1)
    min_margin: float = Field(0.0, ge=0, description="A pair whose best and worst scores differ by <= this is a tie: dropped.")
    separator: str = Field("\n\n", description="Placed between the draft (context) and a validation snippet.")


class ARTEDPO(_Strict):
    """DPO through TRL's ``DPOTrainer`` (sigmoid loss of Rafailov et al., 2023, eq. 7)."""

    beta: float = Field(0.1, gt=0, description="DPO's beta: strength of the KL tie to the original teacher.")
    lr: float = Field(5e-5, gt=0)
    steps: int = Field(16, gt=0, description="Optimiser steps (epochs over the pairs as needed).")
    batch_size: int = Field(8, gt=0, description="Pairs per step.")
    lora: LoraSpec | None = Field(None, description="Train a LoRA adapter (merged on export) instead of every weight.")


class ARTEStudent(_Strict):
    path: str = Field("runs/lm/student-init", description="The student's initial weights (save_pretrained dir).")
    pretrain_steps: int = Field(100, ge=0, description="CE steps on data.source before ARTE (a pretrained student); 0: none.")
    steps: int = Field(40, gt=0, description="SFT steps on each generated training set.")
    batch_size: int = Field(16, gt=0)
    lr: float = Field(5e-4, gt=0)
    score_batch_size: int = Field(32, gt=0, description="Sequences per forward pass when scoring drafts in context.")


class ARTEConfig(_Strict):
    name: str = "arte"
    output_dir: str = "runs/lm-data"
    teacher: GeneratorSpec = GeneratorSpec(path="runs/lm/teacher")
    student: ARTEStudent = ARTEStudent()
    data: LMData = LMData(source="stdlib:*.py", block_size=128, eval_fraction=0.05, max_eval_blocks=64)
    prompts: ARTEPrompts = ARTEPrompts()
    drafts: ARTEDrafts = ARTEDrafts()
    dpo: ARTEDPO = ARTEDPO()
    compare_original: bool = Field(True, description="Also train the student on the original teacher's data (baseline).")
    seed: int = 0
    progress: bool = True

    @model_validator(mode="after")
    def _valid(self) -> "ARTEConfig":
        try:
            re.compile(self.prompts.pattern, re.MULTILINE)
        except re.error as err:
            raise ValueError(f"prompts.pattern is not a regular expression ({err}): fix it, e.g. '^def .*:$'") from None
        if self.data.format != "text":
            raise ValueError("data.format must be text: ARTE cuts prompts and validation snippets from plain documents")
        if self.data.eval_source is None and self.data.eval_fraction == 0:
            raise ValueError("the students are compared on held-out text: set data.eval_fraction > 0 or data.eval_source")
        return self


def load_arte_config(path: str | Path, overrides: list[str] | None = None) -> ARTEConfig:
    raw = read_yaml(path, overrides, hint="ready-made configs live in configs/lm/data/, e.g. configs/lm/data/arte.yaml")
    try:
        return ARTEConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, str(path), ARTEConfig)) from None


# ---------------------------------------------------------------- the defining computations

def seed_prompts(documents: list[str], p: ARTEPrompts, seed: int) -> dict[str, list[str]]:
    """Validation snippets from ``p.validation`` files, then distinct prompts (align / train / probe)
    from the other files, in a seeded random order."""
    pattern = re.compile(p.pattern, re.MULTILINE)
    starts = [(d, m.start(), m.group(0)) for d, doc in enumerate(documents) for m in pattern.finditer(doc)]
    random.Random(seed).shuffle(starts)
    validation, held = [], set()
    for d, at, _ in starts:
        if len(validation) == p.validation:
            break
        if d not in held:
            cut = documents[d][at:at + p.validation_chars]
            validation.append(cut[:cut.rfind("\n")] if "\n" in cut else cut)
            held.add(d)
    prompts, seen = [], set()
    for d, _, line in starts:
        if d not in held and len(line) <= p.max_prompt_chars and line not in seen:
            seen.add(line)
            prompts.append(line.rstrip() + "\n")
    need = p.align + p.train + p.probe
    if len(validation) < p.validation or len(prompts) < need:
        raise DataError(f"data.source has {len(prompts)} distinct block lines matching prompts.pattern in "
                        f"{len(documents) - len(held)} files and {len(validation)} validation snippets; the config "
                        f"asks for {need} prompts and {p.validation} snippets: lower prompts.align/train/probe or "
                        "widen prompts.pattern")
    return {"validation": validation, "align": prompts[:p.align], "train": prompts[p.align:p.align + p.train],
            "probe": prompts[p.align + p.train:need]}


@torch.no_grad()
def in_context_scores(model, tok, drafts: list[str], validation: list[str], *, separator: str = "\n\n",
                      batch_size: int = 32, progress: bool = False) -> torch.Tensor:
    """``score(d) = mean_v [log p(v | d + separator) - log p(v)] / |v|`` for every draft ``d``: how
    much the draft, as an in-context demonstration, raises the student's per-token log-likelihood
    of the real validation snippets (ARTE's in-context accuracy, with likelihood for accuracy)."""
    from distillery.lm.scoring import score_texts

    alone = score_texts(model, tok, validation, batch_size=batch_size)
    texts = [v for _ in drafts for v in validation]
    contexts = [d + separator for d in drafts for _ in validation]
    too_long = DataError("a draft + validation snippet is longer than the student's context: lower "
                         "drafts.max_new_tokens or prompts.validation_chars")
    try:
        helped = score_texts(model, tok, texts, contexts, batch_size=batch_size, progress=progress,
                             title="student scores drafts in context")
    except DataError:  # the draft alone fills the context
        raise too_long from None
    if (helped.tokens != alone.tokens.repeat(len(drafts))).any():  # the snippet was cut
        raise too_long
    gain = helped.per_token.view(len(drafts), len(validation)) - alone.per_token[None]
    return gain.mean(1)


def preference_pairs(rows: list[dict], min_margin: float = 0.0) -> list[dict]:
    """Best vs worst scored draft of each prompt (first one on equal scores); a prompt whose best
    and worst differ by ``min_margin`` or less, or whose two texts are equal, gives no pair."""
    groups: dict[int, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["prompt_id"], []).append(r)
    pairs = []
    for pid in sorted(groups):
        group = groups[pid]
        best = max(group, key=lambda r: r["score"])
        worst = min(group, key=lambda r: r["score"])
        if best["score"] - worst["score"] <= min_margin or best["continuation"] == worst["continuation"]:
            continue
        pairs.append({"prompt_id": pid, "prompt": best["prompt"], "chosen": best["continuation"],
                      "rejected": worst["continuation"], "chosen_score": best["score"], "rejected_score": worst["score"]})
    return pairs


@torch.no_grad()
def dpo_reward_margins(policy, reference, tok, pairs: list[dict], beta: float) -> torch.Tensor:
    """DPO's implicit reward margin per pair (Rafailov et al., 2023, eq. 5 and 7):
    ``beta * [log pi(y_w|x)/pi_ref(y_w|x) - log pi(y_l|x)/pi_ref(y_l|x)]``; 0 before training."""
    from distillery.lm.scoring import score_texts

    prompts = [p["prompt"] for p in pairs]

    def logp(model, key: str) -> torch.Tensor:
        return score_texts(model, tok, [p[key] for p in pairs], prompts).logprob

    return beta * ((logp(policy, "chosen") - logp(reference, "chosen"))
                   - (logp(policy, "rejected") - logp(reference, "rejected")))


# ---------------------------------------------------------------- stages

def write_drafts(generator, prompts: list[str], *, n: int, max_new_tokens: int, temperature: float, top_p: float,
                 seed: int, progress: bool = False, title: str = "teacher drafts", chunk: int = 16) -> list[dict]:
    """``n`` sampled continuations per prompt from any :class:`~distillery.lm.textgen.TextGenerator`
    (local model or endpoint); each chunk has its own seed, so a rerun writes the same rows."""
    rows = []
    with ProgressBar(len(prompts), enabled=progress, title=title) as bar:
        for start in range(0, len(prompts), chunk):
            batch = prompts[start:start + chunk]
            outs = generator.complete(batch, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                      n=n, seed=seed * 1_000_003 + start)
            for i, continuations in enumerate(outs):
                rows += [{"prompt_id": start + i, "draft_id": j, "prompt": batch[i], "continuation": c}
                         for j, c in enumerate(continuations)]
            bar.step(loss=float("nan"), samples=len(batch), advance=len(batch))
    return rows


def dpo_align(spec: GeneratorSpec, pairs: list[dict], cfg: ARTEDPO, out: Path, *, seed: int = 0,
              progress: bool = False) -> dict:
    """Align the teacher of ``spec`` on ``pairs`` with TRL's DPOTrainer; save it (and its tokenizer)
    to ``out`` atomically.  Returns the training log and the implicit reward margins."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from distillery.lm import models as lmmodels

    mspec = spec.model_spec()  # DPO changes the weights: an endpoint teacher stops here
    if not pairs:
        raise DataError("no preference pair to align the teacher on (every prompt's drafts tied): raise "
                        "drafts.per_prompt or drafts.temperature, or lower drafts.min_margin")
    tok = lmmodels.load_tokenizer(mspec, pad_token=lmmodels.eos_token_of(mspec))
    policy, reference = lmmodels.load_model(mspec, "teacher"), lmmodels.load_model(mspec, "teacher")
    reference.eval().requires_grad_(False)
    peft_config = None
    if cfg.lora is not None:
        from peft import LoraConfig

        peft_config = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                 target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    args = DPOConfig(output_dir=str(tmp / "trl"), beta=cfg.beta, learning_rate=cfg.lr, max_steps=cfg.steps,
                     per_device_train_batch_size=cfg.batch_size, lr_scheduler_type="constant", warmup_steps=0,
                     max_length=lmmodels.context_length(policy), logging_steps=1, save_strategy="no",
                     report_to="none", seed=seed, disable_tqdm=not progress, use_cpu=not torch.cuda.is_available(),
                     bf16=False, fp16=False)  # TRL defaults to bf16; the rest of the pipeline runs float32
    data = Dataset.from_list([{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs])
    trainer = DPOTrainer(model=policy, ref_model=None if peft_config else reference, args=args, train_dataset=data,
                         processing_class=tok, peft_config=peft_config)
    trainer.train()
    aligned = trainer.model.merge_and_unload() if hasattr(trainer.model, "merge_and_unload") else trainer.model
    aligned.eval()
    margins = dpo_reward_margins(aligned, reference, tok, pairs, cfg.beta)
    log = {"train_loss": [r["loss"] for r in trainer.state.log_history if "loss" in r],
           "reward_margin_mean": float(margins.mean()), "reward_accuracy": float((margins > 0).float().mean()),
           "pairs": len(pairs)}
    shutil.rmtree(tmp / "trl", ignore_errors=True)
    aligned.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    atomic_write_text(tmp / "dpo.json", json.dumps(log, indent=2))
    os.replace(tmp, out)
    return log


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _stage(path: Path, make) -> list[dict] | dict:
    """The stage's saved output, or ``make()`` written atomically (JSON lines for a list)."""
    if path.is_file():
        return _read_jsonl(path) if path.suffix == ".jsonl" else json.loads(path.read_text())
    out = make()
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in out) if path.suffix == ".jsonl"
                      else json.dumps(out, indent=2))
    return out


def _run_dir(cfg: ARTEConfig, overwrite: bool) -> Path:
    """Resume a run of the same config; refuse a foreign directory or another config's run."""
    run_dir = Path(cfg.output_dir) / cfg.name
    text = yaml.safe_dump(cfg.model_dump(mode="json", exclude={"progress"}), sort_keys=False)
    marker = run_dir / "arte.yaml"
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if not marker.is_file():
            raise RunDirExistsError(f"refusing to write into {run_dir}: it is not an ARTE run directory (no arte.yaml); "
                                    "choose another name with --set name=NEW")
        if overwrite:
            shutil.rmtree(run_dir)
        elif marker.read_text() != text:
            raise RunDirExistsError(f"{run_dir} holds an ARTE run with another config: pass --overwrite to start it "
                                    "again, or choose another name with --set name=NEW")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(marker, text)
    return run_dir


def _documents(cfg: ARTEConfig, tok) -> tuple[list[str], object]:
    """Training documents (prompts and validation snippets come from them) and the tokenised
    held-out split -- the same split ``load_splits`` makes, so perplexities match the demo's."""
    from distillery.lm import data as lmdata

    docs = lmdata.load_documents(cfg.data.source, cfg.data)
    if cfg.data.max_documents is not None:
        docs = docs.select(range(min(cfg.data.max_documents, len(docs))))
    if cfg.data.eval_source is not None:
        train_docs, eval_docs = docs, lmdata.load_documents(cfg.data.eval_source, cfg.data)
    else:
        split = docs.train_test_split(test_size=max(1, round(cfg.data.eval_fraction * len(docs))),
                                      seed=cfg.data.seed, shuffle=True)
        train_docs, eval_docs = split["train"], split["test"]
    evaluation = lmdata.tokenize(eval_docs, tok, cfg.data)
    if len(evaluation) == 0:
        raise DataError(f"the held-out documents of {cfg.data.source!r} fill no block of {cfg.data.block_size} tokens: "
                        "raise data.eval_fraction or lower data.block_size")
    evaluation = evaluation.select(range(min(cfg.data.max_eval_blocks, len(evaluation))))
    return list(train_docs[cfg.data.text_column]), evaluation.with_format("torch", columns=["input_ids", "targets", "prompt_len"])


def _train_student(cfg: ARTEConfig, run_dir: Path, name: str, init: str, steps: int, corpus: Path | None = None,
                   evaluation=None) -> dict:
    """SFT (``loss: ce``) through ``distill_lm``: on ``data.source`` (pretraining) or on a corpus."""
    from distillery.lm import data as lmdata
    from distillery.lm import models as lmmodels
    from distillery.lm.config import LMModel, lm_config_from_dict
    from distillery.lm.trainer import distill_lm

    if (run_dir / name / "summary.json").is_file():
        return json.loads((run_dir / name / "summary.json").read_text())
    s = cfg.student
    data = cfg.data.model_dump() | ({"source": str(corpus), "text_column": "text"} if corpus else {})
    raw = {"name": name, "output_dir": str(run_dir), "student": {"path": init}, "data": data, "loss": {"name": "ce"},
           "train": {"max_steps": steps, "batch_size": s.batch_size, "lr": s.lr, "warmup_steps": min(20, steps // 5),
                     "checkpoint_every": 50, "seed": cfg.seed, "progress": cfg.progress}}
    lcfg = lm_config_from_dict(raw, source=f"the {name} run built by arte")
    splits = None
    if corpus is not None:
        tok = lmmodels.load_tokenizer(LMModel(path=init), cfg.data.pad_token)
        docs = lmdata.load_documents(str(corpus), lcfg.data)
        train = lmdata.tokenize(docs, tok, lcfg.data).with_format("torch", columns=["input_ids", "targets", "prompt_len"])
        splits = lmdata.LMSplits(train, evaluation, len(docs))
    return distill_lm(lcfg, resume=(run_dir / name).is_dir(), splits=splits).summary


def run_arte(cfg: ARTEConfig, *, overwrite: bool = False) -> dict:
    """The whole method (module docstring); returns the summary also written to summary.json."""
    from distillery.lm import models as lmmodels
    from distillery.lm.config import LMModel
    from distillery.lm.data import collate
    from distillery.lm.textgen import load_generator
    from distillery.lm.evaluate import evaluate_lm

    cfg.teacher.model_spec()  # ARTE fine-tunes the teacher: refuse an endpoint before any work
    run_dir = _run_dir(cfg, overwrite)
    s, d = cfg.student, cfg.drafts
    base = run_dir / "student-base" / "student" if s.pretrain_steps else Path(s.path)
    if s.pretrain_steps:
        _train_student(cfg, run_dir, "student-base", s.path, s.pretrain_steps)
    tok = lmmodels.load_tokenizer(LMModel(path=str(base)), cfg.data.pad_token)
    student = lmmodels.load_model(LMModel(path=str(base)), "student").eval()
    docs, evaluation = _documents(cfg, tok)
    prompts = _stage(run_dir / "prompts.json", lambda: seed_prompts(docs, cfg.prompts, cfg.seed))

    def drafts_of(spec: GeneratorSpec, which: str, n: int, seed: int, title: str) -> list[dict]:
        return write_drafts(load_generator(spec), prompts[which], n=n, max_new_tokens=d.max_new_tokens,
                            temperature=d.temperature, top_p=d.top_p, seed=seed, progress=cfg.progress, title=title)

    def scored(rows: list[dict]) -> list[dict]:
        values = in_context_scores(student, tok, [r["prompt"] + r["continuation"] for r in rows], prompts["validation"],
                                   separator=d.separator, batch_size=s.score_batch_size, progress=cfg.progress)
        return [{**r, "score": float(v)} for r, v in zip(rows, values)]

    # 1-3: drafts, the student's in-context scores, pairs, DPO
    drafts = _stage(run_dir / "drafts.jsonl", lambda: drafts_of(cfg.teacher, "align", d.per_prompt, cfg.seed, "teacher drafts"))
    scores = _stage(run_dir / "scores.jsonl", lambda: scored(drafts))
    pairs = _stage(run_dir / "pairs.jsonl", lambda: preference_pairs(scores, d.min_margin))
    aligned_dir = run_dir / "aligned-teacher"
    dpo = (json.loads((aligned_dir / "dpo.json").read_text()) if (aligned_dir / "dpo.json").is_file()
           else dpo_align(cfg.teacher, pairs, cfg.dpo, aligned_dir, seed=cfg.seed, progress=cfg.progress))
    teachers = {"original": cfg.teacher, "aligned": cfg.teacher.model_copy(update={"path": str(aligned_dir)})}

    # probe: fresh prompts, both teachers' drafts, the same in-context metric
    probe = {}
    if cfg.prompts.probe:
        for label, spec in teachers.items():
            rows = _stage(run_dir / f"probe-{label}.jsonl", lambda: scored(
                drafts_of(spec, "probe", d.per_prompt, cfg.seed + 1, f"probe drafts ({label} teacher)")))
            per_prompt = torch.tensor([r["score"] for r in rows]).view(-1, d.per_prompt)
            probe[label] = {"score_mean": float(per_prompt.mean()),
                            "best_minus_worst": float((per_prompt.max(1).values - per_prompt.min(1).values).mean()),
                            "draft_chars": sum(len(r["continuation"]) for r in rows) / len(rows), "_per": per_prompt}
        wins = (probe["aligned"].pop("_per").mean(1) > probe["original"].pop("_per").mean(1)).float().mean()
        probe["aligned_wins"] = float(wins)

    # 4-5: the training set from each teacher (same prompts and sampling seed), SFT of the student
    loader = torch.utils.data.DataLoader(evaluation, batch_size=s.batch_size,
                                         collate_fn=lambda rows: collate(rows, tok.pad_token_id))
    students = {"base": evaluate_lm(student, None, loader, next(student.parameters()).device, len(tok))["eval_ppl"]}
    corpora = {}
    for label in (("original", "aligned") if cfg.compare_original else ("aligned",)):
        path = run_dir / f"corpus-{label}.jsonl"
        rows = _stage(path, lambda: [{"text": r["prompt"] + r["continuation"]} for r in drafts_of(
            teachers[label], "train", 1, cfg.seed + 2, f"training set ({label} teacher)")])
        corpora[label] = {"examples": len(rows), "chars_mean": sum(len(r["text"]) for r in rows) / len(rows)}
        students[label] = _train_student(cfg, run_dir, f"student-{label}", str(base), s.steps, path, evaluation)["eval_ppl"]

    gaps = [p["chosen_score"] - p["rejected_score"] for p in pairs]
    summary = {"name": cfg.name, "seed": cfg.seed, "prompts": {k: len(v) for k, v in prompts.items()},
               "drafts": len(drafts), "pairs": len(pairs), "ties_dropped": len(prompts["align"]) - len(pairs),
               "pair_score_gap": sum(gaps) / max(len(gaps), 1), "dpo": dpo, "probe": probe, "corpora": corpora,
               "student_eval_ppl": students, "student_steps": s.steps, "aligned_teacher": str(aligned_dir)}
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    return summary
