"""DDK: distillation with a domain mixture that follows the student's gaps (``distillery lm ddk CONFIG``).

Liu, Zhang, Guo, Zhang, Que, Deng, Bai, Liu, Zhang, Wang, Wu, Liu, Su, Wang, Qu & Zheng (2024),
"DDK: Distilling Domain Knowledge for Efficient Large Language Models" (NeurIPS 2024,
arXiv:2407.16154).  The corpus is split into N domains, each with a validation set.  With
ℓ_S[i], ℓ_T[i] the student's and teacher's perplexities on domain i's validation set
(exp of the cross-entropy), the *domain discrepancy factor* is (eq. 1)

    r[i] = exp(ℓ_S[i] / ℓ_T[i]) / Σ_i' exp(ℓ_S[i'] / ℓ_T[i'])

and every K steps it is updated by *factor smooth updating* (eq. 2)

    ψ_{t+1}[i] = r_t[i] · exp(ℓ_S^{t+1}[i] / ℓ_T^{t+1}[i])
    r_{t+1}[i] = α · ψ_{t+1}[i] / Σ_j ψ_{t+1}[j] + (1 − α) / N          (α = 0.5 in the paper)

Training batches are drawn from the domains in proportion to r_t (domain knowledge guided
sampling, Algorithm 1); the loss is the run's ``loss:`` section (the paper: CE + γ·KL at
temperature T, i.e. ``loss: {name: forward_kl, ce_weight: γ}``).

Implementation: :class:`DDKMixture` is an :class:`~distillery.lm.hooks.LMHook`, so the one
training loop (:func:`~distillery.lm.trainer.distill_lm`) runs unchanged on the concatenated
per-domain data (:func:`domain_splits`); ``mixture: uniform`` gives the baseline with the same
sampler and the same measurements, only the weights stay 1/N.

Differences from the paper, and why:

* Rows are drawn with replacement (domain ~ r_t, then a row uniformly within it), a function of
  (seed, step, micro) so a resumed run reads the same rows; the paper draws a K-step dataset per
  interval and cycles through a domain when it is exhausted -- the same proportions in
  expectation, without the state of a per-domain cursor.
* Validation perplexities are taken on at most ``val_blocks`` blocks per domain (the paper: 500
  samples per domain); the teacher's are measured once (it is frozen).
* The final report adds a separate per-domain *test* split (files never trained on and never
  used to steer the mixture); the paper reports downstream benchmarks instead.
"""
from __future__ import annotations

import json
import math
import shutil
import statistics
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from distillery.config import format_validation_error, read_yaml
from distillery.engine.checkpoint import atomic_write_text
from distillery.errors import ConfigError, DataError, RunDirExistsError
from distillery.lm.config import LMData, LMLoss, LMModel, LMTrain
from distillery.lm.hooks import HookContext, LMHook


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Domain(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    source: str = Field(description="Files of this domain (a glob, `stdlib:email/*.py`, a directory, a .jsonl).")


class DDKSettings(_Strict):
    mixture: Literal["ddk", "uniform"] = Field("ddk", description="uniform: the same run with fixed 1/N weights (baseline).")
    interval: int = Field(20, gt=0, description="K: update the mixture every K optimiser steps.")
    alpha: float = Field(0.5, ge=0, le=1, description="Smoothing coefficient α of eq. 2 (paper: 0.5).")
    val_blocks: int = Field(8, gt=0, description="Validation blocks per domain for the perplexities of eq. 1.")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="Share of each domain's files used for validation.")
    test_fraction: float = Field(0.15, gt=0, lt=1, description="Share of each domain's files held out for the final test.")
    test_blocks: int = Field(32, gt=0, description="Test blocks per domain in the final report.")


class DDKConfig(_Strict):
    name: str = "ddk"
    output_dir: str = "runs/lm/data"
    teacher: LMModel = LMModel(path="runs/lm/teacher")
    student: LMModel = LMModel(path="runs/lm/student-init", init="random")
    domains: list[Domain] = Field(min_length=2)
    block_size: int = Field(128, gt=1)
    ddk: DDKSettings = DDKSettings()
    loss: LMLoss = LMLoss(name="forward_kl")
    train: LMTrain = LMTrain(max_steps=120, batch_size=16, lr=1e-3, warmup_steps=20, checkpoint_every=40)
    seed: int = Field(0, description="Seed of the per-domain file splits.")

    @field_validator("domains")
    @classmethod
    def _distinct(cls, v: list[Domain]) -> list[Domain]:
        names = [d.name for d in v]
        if len(set(names)) != len(names):
            raise ValueError(f"domain names must be distinct, got {names}")
        return v


def load_ddk_config(path: str | Path, overrides: list[str] | None = None) -> DDKConfig:
    raw = read_yaml(path, overrides, hint="a ready-made DDK config is configs/lm/data/ddk.yaml")
    try:
        return DDKConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, str(path), DDKConfig)) from None


# ---------------------------------------------------------------- the paper's equations

def discrepancy_factor(student_ppl, teacher_ppl) -> np.ndarray:
    """Eq. (1): softmax over domains of ℓ_S / ℓ_T (perplexity ratios)."""
    ratio = np.asarray(student_ppl, dtype=np.float64) / np.asarray(teacher_ppl, dtype=np.float64)
    e = np.exp(ratio - ratio.max())  # the shift cancels in the normalisation
    return e / e.sum()


def smooth_update(r_prev, student_ppl, teacher_ppl, alpha: float = 0.5) -> np.ndarray:
    """Eq. (2): ψ = r_t · exp(ℓ_S/ℓ_T); r_{t+1} = α ψ / Σψ + (1 − α) / N."""
    r_prev = np.asarray(r_prev, dtype=np.float64)
    ratio = np.asarray(student_ppl, dtype=np.float64) / np.asarray(teacher_ppl, dtype=np.float64)
    log_psi = np.log(r_prev) + ratio
    psi = np.exp(log_psi - log_psi.max())
    return alpha * psi / psi.sum() + (1 - alpha) / len(r_prev)


def sample_rows(weights, ranges: list[tuple[int, int]], size: int, seed: int, step: int, micro: int) -> list[int]:
    """``size`` training rows: each row's domain drawn with probability ``weights``, then a row
    of that domain uniformly; a function of (seed, step, micro) only."""
    rng = np.random.default_rng([seed, step, micro])
    domains = rng.choice(len(ranges), size=size, p=np.asarray(weights, dtype=np.float64))
    return [int(ranges[d][0] + rng.integers(ranges[d][1] - ranges[d][0])) for d in domains]


# ---------------------------------------------------------------- data

def domain_splits(cfg: DDKConfig, tok):
    """(LMSplits of the concatenated training data, row ranges of each domain in train,
    per-domain validation datasets, per-domain test datasets).  Each domain's documents are
    split by whole files (documents): test, validation, train."""
    from datasets import concatenate_datasets

    from distillery.lm import data as lmdata

    ds_cfg = LMData(source="-", format="text", block_size=cfg.block_size, seed=cfg.seed)
    trains, vals, tests, ranges, n_docs, start = [], [], [], [], 0, 0
    cols = ["input_ids", "targets", "prompt_len"]
    for d in cfg.domains:
        try:
            docs = lmdata.load_documents(d.source, ds_cfg)
        except DataError as err:
            raise DataError(f"domain {d.name!r}: {err}") from None
        if len(docs) < 3:
            raise DataError(f"domain {d.name!r} ({d.source}) has {len(docs)} document(s); each domain needs at least 3 "
                            "(train, validation, test files): add files to it or merge it into another domain")
        n_test = max(1, round(cfg.ddk.test_fraction * len(docs)))
        n_val = max(1, round(cfg.ddk.val_fraction * len(docs)))
        split = docs.train_test_split(test_size=n_test, seed=cfg.seed, shuffle=True)
        rest = split["train"].train_test_split(test_size=n_val, seed=cfg.seed, shuffle=True)
        parts = {}
        for part, docs_part, cap in (("train", rest["train"], None), ("validation", rest["test"], cfg.ddk.val_blocks),
                                     ("test", split["test"], cfg.ddk.test_blocks)):
            rows = lmdata.tokenize(docs_part, tok, ds_cfg)
            if len(rows) == 0:
                raise DataError(f"domain {d.name!r} has no {part} block of {cfg.block_size} tokens: its {part} files are "
                                "too short; add files to the domain or lower block_size")
            parts[part] = (rows if cap is None else rows.select(range(min(cap, len(rows))))).with_format("torch", columns=cols)
        trains.append(parts["train"])
        vals.append(parts["validation"])
        tests.append(parts["test"])
        ranges.append((start, start + len(parts["train"])))
        start += len(parts["train"])
        n_docs += len(docs)
    # no trainer-side evaluation: run_ddk reports each domain's test split on its own
    splits = lmdata.LMSplits(concatenate_datasets(trains).with_format("torch", columns=cols), None, n_docs)
    return splits, ranges, vals, tests


def _loader(ds, batch_size: int, pad: int):
    from distillery.lm import data as lmdata

    return torch.utils.data.DataLoader(ds, batch_size=batch_size, collate_fn=lambda rows: lmdata.collate(rows, pad))


# ---------------------------------------------------------------- the hook

class DDKMixture(LMHook):
    """Chooses every batch's rows from the domains by the current weights; every ``interval``
    steps measures validation perplexities and updates the weights (eq. 2)."""

    name = "ddk"

    def __init__(self, names: list[str], ranges: list[tuple[int, int]], val_sets: list, *, interval: int,
                 alpha: float = 0.5, mixture: str = "ddk", seed: int = 0, pad_id: int = 0, batch_size: int = 8):
        if len(names) != len(ranges) or len(names) != len(val_sets):
            raise ValueError("one range and one validation set per domain")
        empty = [n for n, (a, b) in zip(names, ranges) if b <= a]
        if empty:
            raise DataError(f"domain(s) {empty} have no training rows: add data to them or remove them")
        self.names, self.ranges, self.val_sets = names, ranges, val_sets
        self.interval, self.alpha, self.mixture, self.seed = interval, alpha, mixture, seed
        self.pad_id, self.batch_size = pad_id, batch_size
        self.weights: list[float] | None = None
        self.teacher_ppl: list[float] | None = None
        self.history: list[dict] = []

    @torch.no_grad()
    def _perplexities(self, model, ctx: HookContext) -> list[float]:
        from distillery.lm.evaluate import evaluate_lm

        return [evaluate_lm(model, None, _loader(v, self.batch_size, self.pad_id), ctx.device, ctx.vocab)["eval_ppl"]
                for v in self.val_sets]

    def setup(self, ctx: HookContext) -> None:
        if ctx.teacher is None:
            raise ConfigError("DDK compares the student with the teacher per domain: the run needs a `teacher:`")
        if self.teacher_ppl is None:
            self.teacher_ppl = self._perplexities(ctx.teacher, ctx)
        if self.weights is None:  # Algorithm 1, line 1: r_0 from eq. 1 (a fresh run, not a resumed one)
            student_ppl = self._perplexities(ctx.student, ctx)
            r0 = discrepancy_factor(student_ppl, self.teacher_ppl) if self.mixture == "ddk" \
                else np.full(len(self.names), 1 / len(self.names))
            self.weights = r0.tolist()
            self.history.append({"step": 0, "weights": self.weights, "student_ppl": student_ppl})

    def batch_indices(self, step: int, micro: int, size: int) -> list[int]:
        return sample_rows(self.weights, self.ranges, size, self.seed, step, micro)

    def after_step(self, step: int, ctx: HookContext) -> dict[str, float]:
        if step % self.interval:
            return {}
        student_ppl = self._perplexities(ctx.student, ctx)
        if self.mixture == "ddk":
            self.weights = smooth_update(self.weights, student_ppl, self.teacher_ppl, self.alpha).tolist()
        self.history.append({"step": step, "weights": self.weights, "student_ppl": student_ppl})
        return {**{f"ddk_w_{n}": w for n, w in zip(self.names, self.weights)},
                **{f"ddk_ppl_{n}": p for n, p in zip(self.names, student_ppl)}}

    def summary(self) -> dict:
        return {"mixture": self.mixture, "domains": self.names, "teacher_ppl": self.teacher_ppl,
                "final_weights": self.weights, "history": self.history}

    def state_dict(self) -> dict:
        return {"weights": self.weights, "teacher_ppl": self.teacher_ppl, "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.weights = state.get("weights")
        self.teacher_ppl = state.get("teacher_ppl")
        self.history = list(state.get("history", []))


# ---------------------------------------------------------------- the whole method

def plot_mixture(history: list[dict], names: list[str], path: Path, title: str = "DDK domain mixture") -> Path:
    """Stacked area of the sampling weights over steps (each weight held until the next update)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    weights = np.array([h["weights"] for h in history]).T
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.stackplot(steps, weights, labels=names, step="post")
    ax.set(xlabel="step", ylabel="sampling weight", title=title, ylim=(0, 1), xlim=(0, max(steps[-1], 1)))
    ax.legend(loc="center left", bbox_to_anchor=(1, 0.5), fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def _prepare_dir(cfg: DDKConfig, overwrite: bool) -> Path:
    run_dir = Path(cfg.output_dir) / cfg.name
    mine = run_dir / "ddk.yaml"
    text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    if run_dir.exists() and any(run_dir.iterdir()):
        if not mine.is_file():
            raise RunDirExistsError(f"refusing to write into {run_dir}: it is not a DDK run directory (no ddk.yaml); "
                                    "choose another name with --set name=NEW")
        if overwrite:
            shutil.rmtree(run_dir)
        elif mine.read_text() != text:
            raise RunDirExistsError(f"{run_dir} holds a DDK run with another config: pass --overwrite to replace it, "
                                    "or choose another name with --set name=NEW (same config: it resumes)")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(mine, text)
    return run_dir


def run_ddk(cfg: DDKConfig, *, overwrite: bool = False) -> dict:
    """Distil with the DDK (or uniform) mixture into ``output_dir/name/train``, then report each
    domain's held-out test perplexity (student and teacher); writes summary.json, mixture.png."""
    from distillery.lm import models as lmmodels
    from distillery.lm.config import lm_config_from_dict
    from distillery.lm.evaluate import evaluate_lm
    from distillery.lm.trainer import distill_lm

    run_dir = _prepare_dir(cfg, overwrite)
    if (run_dir / "summary.json").is_file():
        return json.loads((run_dir / "summary.json").read_text())
    pad = lmmodels.eos_token_of(cfg.student)  # only fills, never scored; used where the tokenizer has no pad
    lm_cfg = lm_config_from_dict({
        "name": "train", "output_dir": str(run_dir), "teacher": cfg.teacher.model_dump(),
        "student": cfg.student.model_dump(),
        "data": {"source": "(the domains)", "block_size": cfg.block_size, "pad_token": pad},
        "loss": cfg.loss.model_dump(), "train": cfg.train.model_dump()})
    tok = lmmodels.load_tokenizer(cfg.student, pad)
    splits, ranges, vals, tests = domain_splits(cfg, tok)
    names = [d.name for d in cfg.domains]
    hook = DDKMixture(names, ranges, vals, interval=cfg.ddk.interval, alpha=cfg.ddk.alpha, mixture=cfg.ddk.mixture,
                      seed=cfg.train.seed, pad_id=tok.pad_token_id, batch_size=cfg.train.batch_size)
    resume = (run_dir / "train" / "checkpoints").is_dir()
    result = distill_lm(lm_cfg, resume=resume, overwrite=not resume and (run_dir / "train").exists(),
                        hooks=[hook], splits=splits)
    ddk = result.summary["ddk"]

    student = lmmodels.load_model(LMModel(path=str(result.run_dir / "student")), "student").eval()
    teacher = lmmodels.load_model(cfg.teacher, "teacher").eval()
    device, per_domain = torch.device("cpu"), {}
    for name, test in zip(names, tests):
        m = evaluate_lm(student, teacher, _loader(test, cfg.train.batch_size, tok.pad_token_id), device, len(tok))
        per_domain[name] = {"student_ppl": m["eval_ppl"], "teacher_ppl": m["teacher_ppl"], "eval_kl": m["eval_kl"],
                            "train_rows": ranges[names.index(name)][1] - ranges[names.index(name)][0]}
    ppl = [v["student_ppl"] for v in per_domain.values()]
    summary = {"name": cfg.name, "mixture": cfg.ddk.mixture, "steps": result.summary["steps"],
               "interval": cfg.ddk.interval, "alpha": cfg.ddk.alpha, "per_domain": per_domain,
               "mean_ppl": statistics.mean(ppl), "worst_ppl": max(ppl),
               "worst_domain": names[int(np.argmax(ppl))],
               "mean_log_ppl": statistics.mean(math.log(p) for p in ppl),
               "final_weights": dict(zip(names, ddk["final_weights"])), "history": ddk["history"],
               "teacher_val_ppl": dict(zip(names, ddk["teacher_ppl"])), "wall_seconds": result.summary["wall_seconds"]}
    plot_mixture(ddk["history"], names, run_dir / "mixture.png",
                 title=f"{'DDK' if cfg.ddk.mixture == 'ddk' else 'uniform'} mixture (K={cfg.ddk.interval})")
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    return summary
