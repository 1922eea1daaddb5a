"""The causal-LM distillation config: YAML on disk, the same validated object in Python.

    name: lm-fkl
    teacher: {path: runs/lm/teacher}                 # local dir or Hub id
    student: {path: runs/lm/student-init}            # or {path: ..., init: random, lora: {r: 8}}
    data:
      source: "/usr/lib/python3.11/json/*.py"        # .jsonl/.json/.parquet/.txt/.py files, a glob, a dir, or a Hub id
      format: text                                   # text | prompt_response | chat
      block_size: 128
    loss: {name: jsd, params: {beta: 0.5}, temperature: 1.0, ce_weight: 0.0}
    onpolicy: {lmbda: 0.5, max_new_tokens: 32}       # GKD (Agarwal et al., 2024)
    cache: {scheme: topk, k: 32}                     # distil from stored top-k teacher log-probs
    train: {max_steps: 300, batch_size: 8, lr: 5.0e-4}

Validation happens here, once, at load; the checks that need the models and tokenizers
(vocabularies, pad token, context length, an empty dataset) run in ``distillery.lm.checks``
before any training step.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from distillery.config import format_validation_error, read_yaml
from distillery.errors import ConfigError

#: Token losses the trainer knows: every name of ``distillery.losses.lm.TOKEN_LOSSES`` plus ULD
#: (different tokenizers). ``ce`` is the plain LM loss (a from-scratch baseline, or sequence-level
#: KD on teacher-generated text).  ``redi`` is REDI's pairwise objective on ``data.format: pairs``
#: (a correct and an incorrect teacher trace of each prompt; Xu et al. 2025) -- no teacher logits.
LOSS_NAMES = ("ce", "forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tv", "taid", "uld", "redi")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraSpec(_Strict):
    """A LoRA student through ``peft``: only the adapters train; the export is merged."""

    r: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | None = Field(None, description="Module names to adapt; None: peft's default for the architecture.")


class LMModel(_Strict):
    path: str = Field(description="A local directory written by `save_pretrained`, or a Hugging Face Hub id.")
    revision: str | None = None
    init: Literal["pretrained", "random"] = Field(
        "pretrained", description="`random`: build the architecture of `path` with fresh weights (a student from a config).")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = Field(False, description="Run model code shipped with the checkpoint (off unless you trust it).")
    lora: LoraSpec | None = None


class LMData(_Strict):
    source: str = Field(description="File, glob, directory (of .jsonl/.json/.parquet/.txt/.py/.md files) or Hub dataset id.")
    hub_config: str | None = Field(None, description="Config name of a Hub dataset.")
    split: str = "train"
    format: Literal["text", "prompt_response", "chat", "pairs"] = Field(
        "text", description="text: documents packed into blocks; prompt_response: prompt tokens masked from the loss; "
                            "chat: a list of {role, content} messages, all but the last assistant turn masked; "
                            "pairs: prompt + a chosen and a rejected response (loss.name: redi).")
    text_column: str = "text"
    prompt_column: str = "prompt"
    response_column: str = "response"
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"
    messages_column: str = "messages"
    chat_template: Literal["auto", "always", "never"] = Field(
        "auto", description="Wrap prompts with the tokenizer's chat template: when it has one (auto), always (error if none), never.")
    block_size: int = Field(128, gt=1, description="Tokens per training sequence (text is packed; longer examples are truncated).")
    eval_fraction: float = Field(0.05, ge=0, lt=1, description="Share of documents held out for evaluation (when no eval_source).")
    eval_source: str | None = None
    max_documents: int | None = Field(None, gt=0, description="Read at most this many documents (a quick run).")
    max_eval_blocks: int = Field(64, gt=0, description="Evaluate on at most this many held-out sequences.")
    pad_token: str | None = Field(None, description="Use this token as padding when the tokenizer has none (e.g. its EOS token).")
    seed: int = 0


class LMLoss(_Strict):
    name: Literal[LOSS_NAMES] = "forward_kl"  # type: ignore[valid-type]
    params: dict[str, Any] = Field(default_factory=dict, description="e.g. {beta: 0.5} for jsd, {alpha: 0.1} for skew_kl.")
    weight: float = Field(1.0, ge=0, description="Weight of the token loss; 0 with `hidden:` = latent distillation only.")
    temperature: float = Field(1.0, gt=0)
    ce_weight: float = Field(0.0, ge=0, description="Adds ce_weight x the student's LM cross-entropy.")
    chunk_size: int | None = Field(None, gt=0, description="Tokens per loss chunk; None: about 64 MiB of float32 logits.")
    fused: bool = Field(True, description="Compute the student's logits chunk by chunk inside the loss (no full logits).")
    taid: dict[str, float] = Field(default_factory=dict, description="TAID schedule: t_start, t_end, alpha, beta.")


class OnPolicy(_Strict):
    """GKD (Agarwal et al., 2024): with probability ``lmbda`` a batch is replaced by the
    student's own continuations of its prompts, scored by the teacher."""

    lmbda: float = Field(0.0, ge=0, le=1)
    max_new_tokens: int = Field(32, gt=0)
    temperature: float = Field(1.0, gt=0)
    top_k: int | None = Field(None, gt=0)
    prompt_length: int = Field(32, gt=0, description="Text data: the first N tokens of a block are the prompt.")


class SeqKD(_Strict):
    """Sequence-level KD (Kim & Rush, 2016): before training, the teacher writes a continuation
    of every training prompt; the student learns from those sequences."""

    enabled: bool = False
    num_beams: int = Field(1, gt=0, description="1 = greedy; the paper uses beam search.")
    max_new_tokens: int = Field(64, gt=0)
    prompt_length: int = Field(32, gt=0, description="Text data: the first N tokens of a block are the prompt.")
    batch_size: int = Field(16, gt=0)


class LMCache(_Strict):
    dir: str | None = Field(None, description="Store directory; default <output_dir>/lm-cache/<name>-<scheme><k>.")
    scheme: Literal["topk", "sample"] = "topk"
    k: int = Field(32, gt=0)
    tail: bool = Field(True, description="top-k: keep the remaining probability mass as one extra bucket.")


class Hidden(_Strict):
    """Hidden-state distillation: learned projections student layer -> teacher layer."""

    weight: float = Field(1.0, gt=0)
    loss: Literal["mse", "cosine"] = "mse"
    mapping: Literal["uniform"] | list[tuple[int, int]] = "uniform"


class ExtraTerm(_Strict):
    """A term of ``distillery.lm.terms.TERMS`` (e.g. dac_kl, span_correlation) added to the loss."""

    name: str = Field(description="A name of distillery.lm.terms.TERMS.")
    weight: float = Field(1.0, gt=0)
    params: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of the term.")
    lr: float | None = Field(None, gt=0, description="Learning rate of the term's own parameters (default train.lr).")

    @model_validator(mode="after")
    def _known(self) -> "ExtraTerm":
        from distillery.lm.terms import TERMS

        if self.name not in TERMS:
            raise ValueError(f"unknown extra term {self.name!r}; known: {sorted(TERMS)}")
        return self


class Monitor(_Strict):
    """Teacher hacking (Tiapkin et al., 2025): measure the student against an *oracle* -- the
    model the teacher itself imitates -- as well as against the teacher, on held-out data."""

    oracle: str = Field(description="Path or Hub id of the oracle causal LM (same vocabulary as the student).")
    every: int = Field(10, gt=0, description="Measure every N steps (and at the end).")
    max_batches: int = Field(8, gt=0, description="Held-out batches per measurement.")


class LMTrain(_Strict):
    max_steps: int = Field(200, gt=0)
    batch_size: int = Field(8, gt=0)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    scheduler: Literal["constant", "cosine", "linear"] = "cosine"
    grad_clip: float | None = Field(1.0, gt=0)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    eval_every: int = Field(0, ge=0, description="Evaluate every N steps (0: only at the end).")
    checkpoint_every: int = Field(100, ge=0, description="Save a resumable checkpoint every N steps (0: only at the end).")
    seed: int = 0
    cpu: bool = False
    progress: bool = True


class LMRunConfig(_Strict):
    name: str = "lm-run"
    output_dir: str = "runs/lm"
    teacher: LMModel | None = None
    student: LMModel
    data: LMData
    loss: LMLoss = LMLoss()
    onpolicy: OnPolicy = OnPolicy()
    seqkd: SeqKD = SeqKD()
    cache: LMCache | None = None
    hidden: Hidden | None = None
    train: LMTrain = LMTrain()
    monitor: Monitor | None = None
    extra_terms: list[ExtraTerm] = Field(default_factory=list, description="Terms with their own parameters "
                                         "(distillery.lm.terms), e.g. MGSR's dac_kl and span_correlation.")

    @model_validator(mode="after")
    def _consistent(self) -> "LMRunConfig":
        if (self.loss.name == "redi") != (self.data.format == "pairs"):
            raise ValueError("loss.name: redi and data.format: pairs go together (REDI learns from a chosen and a "
                             "rejected response of each prompt)")
        if self.loss.name == "redi" and (self.onpolicy.lmbda or self.seqkd.enabled or self.cache or self.hidden
                                         or self.extra_terms or self.monitor):
            raise ValueError("loss.name: redi trains on fixed (chosen, rejected) traces: remove onpolicy, seqkd, cache, "
                             "hidden, extra_terms and monitor")
        if self.teacher is None and (self.loss.name not in ("ce", "redi") or self.onpolicy.lmbda or self.seqkd.enabled
                                     or self.cache or self.hidden):
            raise ValueError(f"loss '{self.loss.name}' and on-policy/seq-KD/cache/hidden need a `teacher:` section "
                             "(use loss: {name: ce} for a from-scratch student)")
        if self.cache is not None:
            if self.loss.name in ("ce", "uld"):
                raise ValueError(f"loss '{self.loss.name}' does not read teacher logits: remove the `cache:` section")
            if self.cache.scheme == "sample" and self.loss.name != "forward_kl":
                raise ValueError("sampled teacher tokens estimate forward KL only: use loss.name: forward_kl with "
                                 f"cache.scheme: sample, or cache.scheme: topk for '{self.loss.name}'")
            if self.cache.scheme == "topk" and not self.cache.tail and self.loss.name != "forward_kl":
                raise ValueError("cache.tail: false (top-k mass only) supports forward_kl; keep tail: true for "
                                 f"'{self.loss.name}'")
            if self.onpolicy.lmbda:
                raise ValueError("on-policy batches are new text the cache cannot hold: set onpolicy.lmbda: 0 with cache")
            if self.hidden is not None:
                raise ValueError("the cache stores logits only: hidden-state distillation needs the live teacher")
        if self.loss.name == "uld" and (self.cache or self.hidden):
            raise ValueError("uld (different tokenizers) runs with the live teacher only, without cache or hidden")
        if self.extra_terms and (self.teacher is None or self.cache is not None or self.loss.name == "uld"):
            raise ValueError("extra_terms compare live teacher and student logits over one vocabulary: they need a "
                             "`teacher:`, no `cache:` and a token loss other than uld")
        if self.loss.weight == 0 and self.hidden is None and not self.loss.ce_weight and not self.extra_terms:
            raise ValueError("loss.weight: 0 leaves nothing to learn: add a `hidden:` section, extra_terms or "
                             "loss.ce_weight")
        if self.monitor is not None and self.teacher is None:
            raise ValueError("monitor.oracle compares the student with the oracle *and the teacher*: add a `teacher:`")
        if self.monitor is not None and self.loss.name == "uld":
            raise ValueError("monitor.oracle compares token distributions over one vocabulary, and a uld teacher has "
                             "another tokenizer: remove `monitor:` or distil with a token loss and a shared tokenizer")
        if self.student.lora is not None and self.student.init == "random":
            raise ValueError("student.lora adapts pretrained weights: use init: pretrained with lora")
        return self


def lm_config_from_dict(raw: dict, source: str = "") -> LMRunConfig:
    try:
        return LMRunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source, LMRunConfig)) from None


def load_lm_config(path: str | Path, overrides: list[str] | None = None) -> LMRunConfig:
    raw = read_yaml(path, overrides, hint="ready-made LM configs live in configs/lm/")
    return lm_config_from_dict(raw, source=str(path))


def dump_lm_config(cfg: LMRunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
