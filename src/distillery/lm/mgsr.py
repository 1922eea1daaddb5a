"""Multi-granularity semantic revision (MGSR) for causal-LM distillation (``distillery lm mgsr``).

Liu, Zhang, Li, Li, Huang, Chen, Tang, Hu, Xiong and Wang, 2024, "Multi-Granularity Semantic
Revision for Large Language Model Distillation".  The overall objective of the paper is
L = L_SFT + L_DAC-KL + L_span on sequences revised by SCRG; here, each level can be switched on
alone (the benchmark compares them on one budget):

    batch of text ─ (probability revision.prob: `revision.rows` rows replaced by SCRG sequences:
                     the student continues a prompt, the teacher finds the first token it does not
                     accept, puts its own token there, and the writer -- the teacher, local or an
                     OpenAI-compatible endpoint via ``load_generator`` -- writes the rest)
    token loss: forward KL, or DAC-KL with the clip limits predicted by ``ClipLimits`` (learned)
    + span.weight x span correlation consistency  + ce_weight x LM cross-entropy

Pure losses in ``distillery.losses.mgsr``.  Differences from the paper (see there too): the
error token is the first one outside the teacher's top-k / below a probability (the issue's rule)
rather than the largest teacher/student difference; the re-generation after the corrected token is
done by the teacher (the paper lets the student re-generate, for diversity -- set
``revision.writer`` to the student's path to do that); spans are word boundaries of the
tokenizer.

The run is ``distill_lm`` (Accelerate, checkpoints, resume, evaluation, export) with MGSR's
pieces plugged into its generic extension points: DAC-KL and span correlation are extra terms
(``distillery.lm.terms``: ``dac_kl`` owns the learned clip limits, trained at ``dac.lr``), and
SCRG is a hook (:class:`RevisionHook`) that rewrites rows of a step's batch.  ``config.yaml`` in
the run directory is the equivalent ``distillery lm distill`` config, minus the hook.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from distillery.config import format_validation_error, read_yaml
from distillery.engine.checkpoint import atomic_write_text
from distillery.errors import ConfigError, RunDirExistsError
from distillery.lm import data as lmdata
from distillery.lm.config import LMData, LMModel, LMRunConfig, lm_config_from_dict
from distillery.lm.hooks import HookContext, LMHook
from distillery.lm.textgen import GeneratorSpec, load_generator
from distillery.losses.mgsr import revision_points


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Revision(_Strict):
    """SCRG, sequence correction and re-generation (sequence level)."""

    prob: float = Field(0.0, ge=0, le=1, description="Probability that a step's batch gets revised rows (0: off).")
    rows: int = Field(4, gt=0, description="Rows of such a batch replaced by revised student generations.")
    prompt_length: int = Field(32, gt=0, description="The first N tokens of a text block are the prompt.")
    max_new_tokens: int = Field(32, gt=0)
    temperature: float = Field(1.0, gt=0, description="The student's sampling temperature.")
    top_k: int | None = Field(5, gt=0, description="A token outside the teacher's top-k is an error.")
    min_prob: float = Field(0.0, ge=0, lt=1, description="A token with teacher probability below this is an error.")
    writer: GeneratorSpec | None = Field(None, description="Writes the rest after the corrected token; default the "
                                                           "teacher (a path, or an OpenAI-compatible endpoint).")


class DAC(_Strict):
    """DAC-KL (token level): the clip limits come from a small network on the teacher's distribution."""

    enabled: bool = False
    features: int = Field(32, gt=1, description="The network reads the teacher's top-N sorted probabilities.")
    hidden: int = Field(64, gt=0)
    sharpness: float = Field(0.5, gt=0, description="Softness of the clip, in log-probability units.")
    coverage_weight: float = Field(1.0, ge=0, description="Weight of (1 - kept teacher mass): stops the limits from "
                                                          "shrinking the kept set to nothing.")
    lr: float = Field(1e-3, gt=0)


class Span(_Strict):
    weight: float = Field(0.0, ge=0, description="Weight of the span correlation consistency loss (0: off).")


class MGSRTrain(_Strict):
    max_steps: int = Field(200, gt=0)
    batch_size: int = Field(16, gt=0)
    lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(20, ge=0)
    checkpoint_every: int = Field(100, ge=0)
    seed: int = 0
    progress: bool = True


class MGSRConfig(_Strict):
    name: str = "mgsr"
    output_dir: str = "benchmarks/runs/lm_data/mgsr"
    teacher: LMModel = LMModel(path="runs/lm/teacher")
    student: LMModel = LMModel(path="runs/lm/student-init")
    data: LMData = LMData(source="stdlib:*.py", block_size=128, max_eval_blocks=64)
    temperature: float = Field(1.0, gt=0)
    ce_weight: float = Field(0.0, ge=0)
    revision: Revision = Revision()
    dac: DAC = DAC()
    span: Span = Span()
    train: MGSRTrain = MGSRTrain()


def load_mgsr_config(path: str | Path, overrides: list[str] | None = None) -> MGSRConfig:
    return mgsr_config_from_dict(read_yaml(path, overrides, hint="a ready-made config is configs/lm/data/mgsr.yaml"), str(path))


def mgsr_config_from_dict(raw: dict, source: str = "") -> MGSRConfig:
    try:
        return MGSRConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source, MGSRConfig)) from None


def revise(student, teacher, writer, tok, batch: dict, rc: Revision, device) -> tuple[list[dict], dict]:
    """SCRG on the first ``rc.rows`` rows of ``batch``: revised training rows and statistics."""
    from distillery.lm.generate import generate_batch, prompts_of

    sub = {k: v[: rc.rows] for k, v in batch.items()}
    gen = generate_batch(student, prompts_of(sub, rc.prompt_length), max_new_tokens=rc.max_new_tokens,
                         pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, do_sample=True,
                         temperature=rc.temperature, device=device)
    ids, attn, plen = gen["input_ids"].to(device), gen["attention_mask"].to(device), gen["prompt_len"]
    with torch.no_grad():
        t_logits = teacher(input_ids=ids, attention_mask=attn).logits[..., : len(tok)]
    positions = torch.arange(ids.shape[1], device=device)[None, :]
    generated = (positions >= plen.to(device)[:, None]) & attn.bool()
    first = revision_points(ids[:, 1:], t_logits[:, :-1], generated[:, 1:], top_k=rc.top_k, min_prob=rc.min_prob)
    rows, prefixes, where = [], [], []
    for b in range(ids.shape[0]):
        n = int(attn[b].sum())
        seq = ids[b, :n].tolist()
        if first[b] >= 0:
            t = int(first[b]) + 1  # the error token's index in seq
            seq = seq[:t] + [int(t_logits[b, t - 1].argmax())]
            prefixes.append(seq)
            where.append(b)
        rows.append({"input_ids": seq, "prompt_len": int(plen[b]), "limit": n})
    if prefixes:
        budget = max(rows[b]["limit"] - len(p) for b, p in zip(where, prefixes))
        if budget > 0:
            texts = writer.complete([tok.decode(p) for p in prefixes], max_new_tokens=budget, temperature=0.0)
            for b, p, text in zip(where, prefixes, texts):
                rest = tok(text[0], add_special_tokens=False)["input_ids"]
                rows[b]["input_ids"] = p + rest[: rows[b]["limit"] - len(p)]
    out = []
    for r in rows:
        s, p = r["input_ids"], r["prompt_len"]
        out.append({"input_ids": s, "prompt_len": p,
                    "targets": [s[t + 1] if t + 1 >= p else lmdata.IGNORE for t in range(len(s) - 1)] + [lmdata.IGNORE]})
    hit = first >= 0
    stats = {"revised_rows": float(hit.float().mean()),
             "error_position": float((first[hit].float() + 1 - plen.to(device)[hit]).mean()) if hit.any() else float("nan")}
    return out, stats


class RevisionHook(LMHook):
    """SCRG as a ``distill_lm`` hook: with probability ``prob`` the first ``rows`` rows of a
    step's batch are replaced by revised student generations."""

    name = "revision"

    def __init__(self, rc: Revision, teacher_spec: LMModel):
        self.rc, self.teacher_spec = rc, teacher_spec
        self.batches, self.rows, self.last = 0, 0.0, {}

    def setup(self, ctx: HookContext) -> None:
        spec = self.rc.writer or GeneratorSpec(path=self.teacher_spec.path, revision=self.teacher_spec.revision)
        self.writer = load_generator(spec)

    def transform_batch(self, step: int, batch: dict, ctx: HookContext) -> dict:
        self.last = {}
        if float(torch.rand(())) >= self.rc.prob:
            return batch
        revised, stats = revise(ctx.student, ctx.teacher, self.writer, ctx.tokenizer, batch, self.rc, ctx.device)
        mask = batch["attention_mask"].bool()
        rest = [{"input_ids": batch["input_ids"][i][mask[i]].tolist(), "targets": batch["targets"][i][mask[i]].tolist(),
                 "prompt_len": 0} for i in range(len(revised), batch["input_ids"].shape[0])]
        self.batches += 1
        self.rows += stats["revised_rows"]
        self.last = stats
        return lmdata.collate(revised + rest, ctx.tokenizer.pad_token_id)

    def after_step(self, step: int, ctx: HookContext) -> dict[str, float]:
        return dict(self.last)

    def summary(self) -> dict:
        return {"revised_batches": self.batches,
                "revised_row_fraction": self.rows / self.batches if self.batches else None}

    def state_dict(self) -> dict:
        return {"batches": self.batches, "rows": self.rows}

    def load_state_dict(self, state: dict) -> None:
        self.batches, self.rows = state.get("batches", 0), state.get("rows", 0.0)


def lm_config(cfg: MGSRConfig) -> LMRunConfig:
    """The ``distill_lm`` config of an MGSR run: forward KL (weight 0 when DAC-KL replaces it),
    the enabled levels as extra terms, warm-up then a constant learning rate."""
    extra = []
    if cfg.dac.enabled:
        extra.append({"name": "dac_kl", "lr": cfg.dac.lr, "params": {
            "features": cfg.dac.features, "hidden": cfg.dac.hidden, "sharpness": cfg.dac.sharpness,
            "coverage_weight": cfg.dac.coverage_weight, "temperature": cfg.temperature}})
    if cfg.span.weight:
        extra.append({"name": "span_correlation", "weight": cfg.span.weight, "params": {"temperature": cfg.temperature}})
    tc = cfg.train
    raw = {"name": cfg.name, "output_dir": cfg.output_dir, "teacher": cfg.teacher.model_dump(mode="json"),
           "student": cfg.student.model_dump(mode="json"), "data": cfg.data.model_dump(mode="json"),
           "loss": {"name": "forward_kl", "weight": 0.0 if cfg.dac.enabled else 1.0, "temperature": cfg.temperature,
                    "ce_weight": cfg.ce_weight},
           "extra_terms": extra,
           "train": {"max_steps": tc.max_steps, "batch_size": tc.batch_size, "lr": tc.lr, "warmup_steps": tc.warmup_steps,
                     "scheduler": "constant", "checkpoint_every": tc.checkpoint_every, "seed": tc.seed,
                     "progress": tc.progress}}
    return lm_config_from_dict(raw, source=f"(mgsr {cfg.name})")


def run_mgsr(cfg: MGSRConfig, *, overwrite: bool = False) -> dict:
    """Distil ``cfg.student`` from ``cfg.teacher`` with the MGSR levels the config switches on;
    writes the usual ``distill_lm`` run directory under ``output_dir/name``."""
    from distillery.lm.trainer import distill_lm

    if cfg.revision.prob and cfg.revision.prompt_length >= cfg.data.block_size:
        raise ConfigError(f"revision.prompt_length {cfg.revision.prompt_length} must be below data.block_size "
                          f"{cfg.data.block_size}: lower it")
    lm_cfg = lm_config(cfg)
    run_dir = Path(cfg.output_dir) / cfg.name
    marker, text = run_dir / "mgsr.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    same = marker.is_file() and marker.read_text() == text
    if (run_dir / "summary.json").is_file() and same and not overwrite:
        return json.loads((run_dir / "summary.json").read_text())
    if run_dir.exists() and any(run_dir.iterdir()) and not marker.is_file():
        raise RunDirExistsError(f"refusing to use {run_dir}: it is not an MGSR run directory; choose another name")
    if marker.is_file() and not same and not overwrite:
        raise RunDirExistsError(f"{run_dir} holds an MGSR run with another config: pass overwrite=True "
                                "(--overwrite) or choose another name with --set name=NEW")
    if not (same and not overwrite) and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(marker, text)
    hooks = [RevisionHook(cfg.revision, cfg.teacher)] if cfg.revision.prob else []
    # the directory is ours now (checked above): resume from a checkpoint if there is one, else start
    summary = distill_lm(lm_cfg, resume=True, hooks=hooks).summary
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary.update({"levels": {"revision": cfg.revision.prob, "dac_kl": cfg.dac.enabled, "span": cfg.span.weight},
                    **summary.pop("revision", {"revised_batches": 0, "revised_row_fraction": None})})
    coverage = [r["coverage"] for r in rows if "coverage" in r]
    if cfg.dac.enabled and coverage and cfg.dac.coverage_weight:
        summary["final_kept_mass"] = 1 - coverage[-1] / cfg.dac.coverage_weight
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    return summary
