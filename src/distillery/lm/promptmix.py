"""PromptMix: class-boundary augmentation by a teacher LM, then relabelling by the teacher.

Sahu, Vechtomova, Bahdanau, Laradji, 2023, "PromptMix: A Class Boundary Augmentation Method for
Large Language Model Distillation" (EMNLP 2023).  The paper (i) asks an LLM for examples that
are "α% about class A and (1-α)% about class B" -- borderline examples near the boundary of
two classes -- and (ii) *relabels* every generated example with the LLM as a classifier,
because a borderline example often belongs to the minority class B.  A small student is then
trained on the few real examples plus the generated ones.

What is implemented here, on WordNet definitions (``distillery.lm.glossgen``):

* **Mixing.** Our teacher is a small class-conditional LM, not an instruction follower, so the
  "α% A / (1-α)% B" wording is replaced by mixing the two class-conditional next-token
  distributions (``mixing: mixture``, the default)::

      p(x_t | x_<t) = α p(x_t | "Category: A ...", x_<t) + (1 - α) p(x_t | "Category: B ...", x_<t)

  (:func:`mixture_probs`, sampled by our own loop, :func:`mix_sample`), which needs the
  teacher's weights.  For an endpoint teacher, ``mixing: switch`` writes the first
  ``round(α L)`` tokens under A's prompt and continues the same text under B's prompt, through
  :func:`~distillery.lm.textgen.load_generator` only.  α = 1 gives class A's own generator.
* **Relabelling** (the paper's key step) = the teacher's generative classifier,
  ``argmax_c log p(x | c)`` (:class:`~distillery.lm.glossgen.GenerativeClassifier`), applied to
  every generated example.  It needs log-probabilities, so an endpoint teacher cannot relabel:
  the run stops with a message asking for ``teacher.path`` (we do not prompt an endpoint to
  name the class -- a small LM cannot follow that instruction).
* Compared, for each setting (``shots`` real examples per class; 0 = zero-shot) and seed:
  real only / + generated (class-conditional, labels as prompted) / + generated, relabelled /
  + borderline without relabelling (majority label A) / + PromptMix (borderline, relabelled).
  Every generated variant has the same number of generated examples per class.
* Differs from the paper: the paper uses GPT-3.5/4 with class descriptions and the few-shot
  examples in the prompt; ours conditions on the category name only (it cannot read examples
  in context) and the few-shot examples enter only the student's training data.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from distillery.config import format_validation_error, read_yaml
from distillery.engine.checkpoint import atomic_write_text
from distillery.engine.progress import ProgressBar
from distillery.errors import ConfigError
from distillery.lm import glossgen as gg
from distillery.lm.textgen import GeneratorSpec, HFGenerator, load_generator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PromptMixConfig(_Strict):
    name: str = "promptmix"
    output_dir: str = Field("runs/lm/data", description="The run is written to output_dir/name.")
    task: gg.GlossTask = gg.GlossTask()
    teacher: GeneratorSpec = Field(default_factory=lambda: GeneratorSpec(path=gg.TEACHER_DIR),
                                   description="Writes (and, with `path`, relabels) definitions.")
    teacher_build: gg.TeacherBuild = Field(gg.TeacherBuild(), description="How teacher.path is trained if it is "
                                                                           "missing (the offline WordNet teacher).")
    mixing: Literal["mixture", "switch"] = Field(
        "mixture", description="mixture: sample from α p(.|A) + (1-α) p(.|B) (needs weights); switch: first "
                               "round(α L) tokens under A, the rest under B (works with an endpoint).")
    alpha: float = Field(0.7, ge=0.5, le=1.0, description="Share of the majority class A in a borderline example.")
    n_generated: int = Field(20, gt=0, description="Generated examples per class in every generated variant.")
    borderline_share: float = Field(0.5, gt=0, le=1, description="Of them, the share that is borderline (A mixed "
                                                                  "with a random other class B); the rest plain.")
    shots: list[int] = Field([0, 2], description="Real examples per class (0 = zero-shot), one setting each.")
    seeds: list[int] = Field([0, 1, 2], min_length=1)
    max_new_tokens: int = Field(32, gt=0)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(0.95, gt=0, le=1)
    student_C: float = Field(10.0, gt=0, description="Inverse L2 strength of the student's logistic regression.")
    teacher_eval: int = Field(50, ge=0, description="Test definitions per class the teacher classifier is scored on "
                                                    "(a reference row; 0: skip).")
    progress: bool = True


def load_promptmix_config(path: str | Path, overrides: list[str] | None = None) -> PromptMixConfig:
    raw = read_yaml(path, overrides, hint="ready-made configs live in configs/lm/data/")
    try:
        return PromptMixConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, str(path), PromptMixConfig)) from None


# ---- the mixture of two class-conditional generators

def mixture_probs(logits_a: torch.Tensor, logits_b: torch.Tensor, alpha: float, temperature: float = 1.0) -> torch.Tensor:
    """``α softmax(a / T) + (1 - α) softmax(b / T)`` over the last dimension: the next-token
    distribution of a text that is α parts class A and 1 - α parts class B."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return alpha * torch.softmax(logits_a / temperature, -1) + (1 - alpha) * torch.softmax(logits_b / temperature, -1)


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus sampling: keep the most likely tokens up to cumulative mass ``top_p``, renormalised."""
    if top_p >= 1.0:
        return probs
    sorted_p, order = probs.sort(-1, descending=True)
    drop = sorted_p.cumsum(-1) - sorted_p >= top_p  # mass before a token already reaches top_p
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    out = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return out / out.sum(-1, keepdim=True)


def _stop_tokens(tok) -> torch.Tensor:
    """Token ids that end a definition: EOS and any token containing a newline."""
    stop = torch.zeros(len(tok), dtype=torch.bool)
    for i in range(len(tok)):
        if "\n" in tok.decode([i]):
            stop[i] = True
    if tok.eos_token_id is not None:
        stop[tok.eos_token_id] = True
    return stop


class _Stream:
    """Rows of (different) prompts advanced one token at a time with the KV cache; prompts are
    left-padded, with positions counted from each row's first real token."""

    def __init__(self, model, rows: list[list[int]], pad: int, device):
        self.model = model
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), pad, dtype=torch.long)
        self.mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, length - len(r):] = torch.tensor(r)
            self.mask[i, length - len(r):] = 1
        ids, self.mask = ids.to(device), self.mask.to(device)
        out = model(input_ids=ids, attention_mask=self.mask, position_ids=(self.mask.cumsum(1) - 1).clamp_min(0),
                    use_cache=True)
        self.past, self.logits, self.pos = out.cache, out.logits[:, -1].float(), self.mask.sum(1)

    def step(self, tokens: torch.Tensor) -> None:
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], 1)
        out = self.model(input_ids=tokens[:, None], attention_mask=self.mask, position_ids=self.pos[:, None],
                         cache=self.past, use_cache=True)
        self.past, self.logits, self.pos = out.cache, out.logits[:, -1].float(), self.pos + 1


@torch.no_grad()
def mix_sample(model, tok, prompts_a: list[str], prompts_b: list[str], alpha: float, *, max_new_tokens: int,
               temperature: float = 1.0, top_p: float = 1.0, generator: torch.Generator | None = None,
               stop: torch.Tensor | None = None) -> list[str]:
    """One continuation per row, sampled token by token from :func:`mixture_probs` of the model
    read after ``prompts_a[i]`` and after ``prompts_b[i]`` (the same continuation appended to both)."""
    device = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    encode = lambda p: tok(p, add_special_tokens=False)["input_ids"]  # noqa: E731
    a = _Stream(model, [encode(p) for p in prompts_a], pad, device)
    b = _Stream(model, [encode(p) for p in prompts_b], pad, device)
    stop = _stop_tokens(tok) if stop is None else stop
    n = len(prompts_a)
    out = torch.zeros((n, 0), dtype=torch.long)
    done = torch.zeros(n, dtype=torch.bool)
    for t in range(max_new_tokens):
        probs = top_p_filter(mixture_probs(a.logits.cpu(), b.logits.cpu(), alpha, temperature), top_p)
        nxt = torch.multinomial(probs, 1, generator=generator)[:, 0]
        nxt[done] = tok.eos_token_id  # finished rows only pad
        done |= stop[nxt]
        out = torch.cat([out, nxt[:, None]], 1)
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        a.step(nxt.to(device))
        b.step(nxt.to(device))
    texts = []
    for row in out.tolist():
        ends = [i for i, t in enumerate(row) if stop[t]]
        texts.append(tok.decode(row[:ends[0]] if ends else row).split("\n")[0])
    return texts


def borderline(generator, cfg: PromptMixConfig, pairs: list[tuple[int, int]], seed: int) -> list[dict]:
    """One borderline definition per (A, B) pair, by ``cfg.mixing``; rows keep A, B and α."""
    cats, rows = cfg.task.categories, []
    if cfg.mixing == "mixture":
        if not isinstance(generator, HFGenerator):
            raise ConfigError("mixing: mixture samples from the teacher's next-token distributions and needs its "
                              "weights (teacher.path); with an endpoint teacher use mixing: switch")
        rows = [{"a": a, "b": b} for a, b in pairs]
        texts = mix_sample(generator.model, generator.tokenizer, [gg.prompt_of(cats[a]) for a, _ in pairs],
                           [gg.prompt_of(cats[b]) for _, b in pairs], cfg.alpha, max_new_tokens=cfg.max_new_tokens,
                           temperature=cfg.temperature, top_p=cfg.top_p,
                           generator=torch.Generator().manual_seed(seed))
        rows = [{**r, "text": t} for r, t in zip(rows, texts)]
    else:  # switch: A's prompt writes the first round(α L) tokens, B's prompt the rest of the same text
        head = max(1, round(cfg.alpha * cfg.max_new_tokens))
        starts = generator.complete([gg.prompt_of(cats[a]) for a, _ in pairs], max_new_tokens=head,
                                    temperature=cfg.temperature, top_p=cfg.top_p, stop=["\n"], seed=seed)
        tail = cfg.max_new_tokens - head
        ends = generator.complete([gg.prompt_of(cats[b]) + s[0] for (_, b), s in zip(pairs, starts)],
                                  max_new_tokens=tail, temperature=cfg.temperature, top_p=cfg.top_p, stop=["\n"],
                                  seed=seed + 1) if tail > 0 else [[""] for _ in pairs]
        rows = [{"text": s[0] + e[0], "a": a, "b": b} for (a, b), s, e in zip(pairs, starts, ends)]
    out = [{**r, "text": gg.clean(r["text"], cfg.task.max_words), "kind": "borderline", "alpha": cfg.alpha}
           for r in rows]
    return [r for r in out if len(r["text"].split()) >= 2]


def relabel_stats(rows: list[dict]) -> dict:
    """How many generated labels the teacher changed (to B: the paper's "belongs to the minority class")."""
    border = [r for r in rows if r["kind"] == "borderline"]
    plain = [r for r in rows if r["kind"] == "plain"]
    return {"borderline": len(border), "borderline_flipped": sum(r["teacher_label"] != r["a"] for r in border),
            "borderline_to_b": sum(r["teacher_label"] == r["b"] for r in border),
            "plain": len(plain), "plain_flipped": sum(r["teacher_label"] != r["a"] for r in plain)}


VARIANTS = ("real", "generated", "generated_relabelled", "borderline", "promptmix")


def training_set(variant: str, real: list[gg.Example], rows: list[dict], n_plain_all: int, n_plain_mixed: int,
                 K: int) -> list[gg.Example]:
    """The student's data for a variant; every generated variant holds the same number of
    generated rows per class (``n_plain_all`` plain, or ``n_plain_mixed`` plain + the borderline ones)."""
    if variant == "real":
        return list(real)
    plain = [r for r in rows if r["kind"] == "plain"]
    border = [r for r in rows if r["kind"] == "borderline"]
    if variant in ("generated", "generated_relabelled"):
        chosen = [r for k in range(K) for r in [p for p in plain if p["a"] == k][:n_plain_all]]
    else:
        chosen = [r for k in range(K) for r in [p for p in plain if p["a"] == k][:n_plain_mixed]] + border
    key = "teacher_label" if variant in ("generated_relabelled", "promptmix") else "a"
    return list(real) + [(r["text"], r[key]) for r in chosen]


def run_promptmix(cfg: PromptMixConfig, *, overwrite: bool = False) -> dict:
    """Generate, relabel, train the students; ``output_dir/name/summary.json``."""
    run_dir = gg.open_run_dir(Path(cfg.output_dir) / cfg.name, yaml.safe_dump(cfg.model_dump(mode="json"),
                                                                              sort_keys=False), overwrite=overwrite)
    task, K = cfg.task, len(cfg.task.categories)
    gg.maybe_build_teacher(cfg.teacher, task, cfg.teacher_build, progress=cfg.progress)
    classifier = None
    if cfg.teacher.endpoint is not None:  # fail before generating anything
        gg.GenerativeClassifier.from_spec(cfg.teacher, task.categories)
    splits = gg.gloss_splits(task)
    generator = load_generator(cfg.teacher)
    if isinstance(generator, HFGenerator):
        classifier = gg.GenerativeClassifier(generator.model, generator.tokenizer, task.categories,
                                             progress=cfg.progress)
    n_border = round(cfg.borderline_share * cfg.n_generated)
    n_plain_mixed = cfg.n_generated - n_border

    teacher_file = run_dir / "teacher_test.json"
    if not teacher_file.is_file():  # the teacher as a classifier, on the first teacher_eval test rows per class
        subset = [e for k in range(K) for e in [e for e in splits["test"] if e[1] == k][:cfg.teacher_eval]]
        acc = None
        if subset:
            pred = classifier.predict([t for t, _ in subset])
            acc = float((pred == torch.tensor([k for _, k in subset])).double().mean())
        atomic_write_text(teacher_file, json.dumps({"accuracy": acc, "examples": len(subset)}))
    teacher_eval = json.loads(teacher_file.read_text())

    results: dict[str, dict[str, list[float]]] = {}
    flips = []
    with ProgressBar(len(cfg.seeds), enabled=cfg.progress, title="promptmix seeds") as bar:
        for seed in cfg.seeds:
            gen_file = run_dir / f"generated-seed{seed}.jsonl"
            if not gen_file.is_file():  # generation + relabelling of one seed, written in one go
                rng = random.Random(seed)
                plain_ids = [k for k in range(K) for _ in range(cfg.n_generated)]
                plain = [{"text": t, "a": k, "b": k, "kind": "plain", "alpha": 1.0}
                         for t, k in gg.generate(generator, task.categories, plain_ids,
                                                 max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                                 top_p=cfg.top_p, seed=seed, max_words=task.max_words)]
                pairs = [(a, rng.choice([b for b in range(K) if b != a])) for a in range(K) for _ in range(n_border)]
                rows = plain + borderline(generator, cfg, pairs, seed)
                labels = classifier.predict([r["text"] for r in rows]).tolist()
                gg.write_jsonl(gen_file, [{**r, "teacher_label": int(y)} for r, y in zip(rows, labels)])
            rows = gg.read_jsonl(gen_file)
            flips.append(relabel_stats(rows))
            for shots in cfg.shots:
                real = gg.few_shot(splits["pool"], shots, K, seed)
                for variant in VARIANTS:
                    if variant == "real" and shots == 0:
                        continue
                    data = training_set(variant, real, rows, cfg.n_generated, n_plain_mixed, K)
                    acc = gg.Student(K, C=cfg.student_C, seed=seed).fit(data).accuracy(splits["test"])
                    results.setdefault(f"{shots}-shot/{variant}", {"acc": [], "n": []})
                    results[f"{shots}-shot/{variant}"]["acc"].append(acc)
                    results[f"{shots}-shot/{variant}"]["n"].append(len(data))
            bar.step(loss=float("nan"), samples=1)
    full = gg.Student(K, C=cfg.student_C).fit(splits["pool"]).accuracy(splits["test"])
    table = {key: {"mean": gg.mean_std(v["acc"])[0], "std": gg.mean_std(v["acc"])[1], "per_seed": v["acc"],
                   "train_examples": int(np.mean(v["n"]))} for key, v in results.items()}
    summary = {"name": cfg.name, "categories": task.categories, "seeds": cfg.seeds, "alpha": cfg.alpha,
               "mixing": cfg.mixing, "n_generated_per_class": cfg.n_generated, "borderline_per_class": n_border,
               "teacher_test_accuracy": teacher_eval["accuracy"],
               "teacher_test_examples": teacher_eval["examples"], "student_full_pool_accuracy": full,
               "test_examples": len(splits["test"]), "accuracy": table,
               "relabelling": {k: int(sum(f[k] for f in flips)) for k in flips[0]}}
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    return summary
