"""WordNet gloss classification: the shared setting of the data-level methods PromptMix and PGKD.

The task: read a WordNet definition ("a domesticated carnivorous mammal ...") and name its
lexicographer category (``noun.animal``) among K confusable ones.  Three parts:

* **The data** (:func:`gloss_splits`): the definitions of the chosen categories
  (``distillery.lm.wordnet``, usage examples after ``; "`` removed), split per category into
  a fixed test set, a validation set and a pool the teacher is trained on and few-shot
  examples are drawn from.
* **The teacher**: a causal LM that writes a definition for a category -- prompt
  ``"Category: noun.animal\\nDefinition:"``, response ``" <definition>"`` -- and, by Bayes'
  rule, classifies (:class:`GenerativeClassifier`):
  ``argmax_c log p(text | "Category: c\\nDefinition:") + log prior(c)``.  Offline there is no
  instruction-following LLM, so :func:`ensure_teacher` trains one once: the demo teacher
  (``runs/lm/teacher``, GPT-2 4 x 192 trained on Python sources) fine-tuned by
  :func:`distillery.lm.trainer.distill_lm` with ``loss: ce`` on prompt/response rows, saved
  atomically to ``runs/lm/wordnet-teacher`` (an interrupted build resumes).  Any causal LM that
  answers this prompt format can replace it; generation goes through
  :func:`distillery.lm.textgen.load_generator`, so an OpenAI-compatible endpoint works as well.
* **The student** (:class:`Student`): a linear classifier (scikit-learn logistic regression) on
  TF-IDF word uni/bi-grams and character 2-4-grams -- small, fast, and trained from the real
  few-shot + teacher-written examples.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from distillery.errors import ConfigError

DEFAULT_CATEGORIES = ["noun.animal", "noun.plant", "noun.food", "noun.artifact", "noun.substance", "noun.person"]
TEACHER_DIR = "runs/lm/wordnet-teacher"

Example = tuple[str, int]  # (definition text, category index)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def check_categories(categories: list[str]) -> list[str]:
    """The categories as given, or one message naming the unknown ones and listing the valid ones."""
    from distillery.lm.wordnet import LEXNAMES

    unknown = [c for c in categories if c not in LEXNAMES]
    if unknown:
        raise ValueError(f"unknown WordNet categor{'y' if len(unknown) == 1 else 'ies'} {unknown}; valid names are "
                         f"the lexicographer files: {', '.join(LEXNAMES)}")
    if len(set(categories)) != len(categories) or len(categories) < 2:
        raise ValueError(f"categories must be at least 2 distinct names, got {categories}")
    return categories


class GlossTask(_Strict):
    """Which categories, and how many real definitions per category go to each split."""

    categories: list[str] = Field(default_factory=lambda: list(DEFAULT_CATEGORIES),
                                  description="WordNet lexicographer categories (the classes), e.g. noun.animal.")
    n_test: int = Field(200, gt=0, description="Real test definitions per category (held out from everything).")
    n_val: int = Field(30, gt=0, description="Real validation definitions per category (PGKD's guide, early stopping).")
    n_pool: int = Field(800, gt=0, description="Real definitions per category the teacher is trained on; few-shot "
                                               "examples are drawn from them.")
    max_words: int = Field(30, gt=2, description="Definitions are cut to this many words.")
    wordnet_dir: str | None = Field(None, description="Directory with data.noun etc.; default /usr/share/wordnet.")

    @field_validator("categories")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        return check_categories(value)


class TeacherBuild(_Strict):
    """How the offline teacher is made when ``teacher.path`` is missing: ``init`` fine-tuned
    with the LM loss on the pool's (prompt, definition) pairs."""

    init: str = Field("runs/lm/teacher", description="Causal LM to start from (the LM demo's teacher).")
    steps: int = Field(700, gt=0)
    batch_size: int = Field(16, gt=0)
    lr: float = Field(1e-3, gt=0)
    block_size: int = Field(64, gt=8, description="Prompt + definition tokens per row (longer ones are cut).")
    seed: int = 0


def prompt_of(category: str) -> str:
    """The teacher's prompt for one category; the definition follows after a space."""
    return f"Category: {category}\nDefinition:"


def clean(text: str, max_words: int = 30) -> str:
    """The definition part of a gloss or a generation: first line, usage examples dropped."""
    text = text.strip().split("\n")[0].split('; "')[0].strip()
    return " ".join(text.split()[:max_words])


def gloss_splits(task: GlossTask) -> dict[str, list[Example]]:
    """``{"test", "val", "pool"}`` lists of (definition, class index), disjoint, fixed by the
    task alone (not by an experiment's seed) so every run is scored on the same test set."""
    from distillery.lm.wordnet import load_glosses

    by_class: dict[str, list[str]] = {c: [] for c in task.categories}
    for gloss, category in load_glosses(task.wordnet_dir):
        if category in by_class:
            text = clean(gloss, task.max_words)
            if len(text.split()) >= 2:
                by_class[category].append(text)
    need = task.n_test + task.n_val + task.n_pool
    out: dict[str, list[Example]] = {"test": [], "val": [], "pool": []}
    for k, category in enumerate(task.categories):
        texts = sorted(set(by_class[category]))
        if len(texts) < task.n_test + task.n_val + 2:
            raise ConfigError(f"{category} has only {len(texts)} definitions: lower n_test / n_val")
        random.Random(f"gloss-split-{category}").shuffle(texts)
        texts = texts[:need]
        out["test"] += [(t, k) for t in texts[:task.n_test]]
        out["val"] += [(t, k) for t in texts[task.n_test:task.n_test + task.n_val]]
        out["pool"] += [(t, k) for t in texts[task.n_test + task.n_val:]]
    return out


def few_shot(pool: list[Example], shots: int, n_classes: int, seed: int) -> list[Example]:
    """``shots`` real examples per class drawn from the pool with ``seed``."""
    rng = random.Random(seed)
    out: list[Example] = []
    for k in range(n_classes):
        members = [e for e in pool if e[1] == k]
        out += rng.sample(members, min(shots, len(members)))
    return out


def ensure_teacher(out: str | Path, task: GlossTask, build: TeacherBuild, *, progress: bool = True) -> Path:
    """The gloss-writing teacher at ``out``: reused when present, otherwise trained (resumably,
    in ``<out>-train``) and then moved into place in one rename."""
    from distillery.engine.checkpoint import atomic_write_text
    from distillery.lm.config import lm_config_from_dict
    from distillery.lm.trainer import distill_lm

    out = Path(out)
    if (out / "config.json").is_file():
        made_for = out / "wordnet_task.json"
        if made_for.is_file() and json.loads(made_for.read_text())["categories"] != task.categories:
            raise ConfigError(f"the teacher at {out} was trained for the categories "
                              f"{json.loads(made_for.read_text())['categories']}, not {task.categories}: point "
                              "teacher.path at another directory (it is trained there on first use)")
        return out
    if not Path(build.init).exists():
        raise ConfigError(f"teacher_build.init {build.init} does not exist: run `distillery lm prepare` first "
                          "(it writes runs/lm/teacher) or point init at a causal LM")
    work = out.with_name(out.name + "-train")
    rows = work / "pairs.jsonl"
    if not rows.is_file():
        pool = gloss_splits(task)["pool"]
        text = "".join(json.dumps({"prompt": prompt_of(task.categories[k]), "response": " " + t}) + "\n"
                       for t, k in pool)
        work.mkdir(parents=True, exist_ok=True)
        atomic_write_text(rows, text)
    raw = {"name": "run", "output_dir": str(work), "student": {"path": build.init},
           "data": {"source": str(rows), "format": "prompt_response", "block_size": build.block_size,
                    "eval_fraction": 0.02, "max_eval_blocks": 64, "chat_template": "never"},
           "loss": {"name": "ce"},
           "train": {"max_steps": build.steps, "batch_size": build.batch_size, "lr": build.lr, "warmup_steps": 20,
                     "checkpoint_every": 100, "seed": build.seed, "progress": progress}}
    run_dir = work / "run"
    if not (run_dir / "student" / "config.json").is_file():
        distill_lm(lm_config_from_dict(raw, source="teacher_build"), resume=(run_dir / "checkpoints").is_dir())
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(run_dir / "student", tmp)
    (tmp / "wordnet_task.json").write_text(json.dumps(task.model_dump(mode="json"), indent=2))
    os.replace(tmp, out)
    return out


def maybe_build_teacher(spec, task: GlossTask, build: TeacherBuild, *, progress: bool = True) -> None:
    """Train the offline teacher when ``spec.path`` is a local path that does not exist yet,
    or check that an existing one was made for these categories (a Hub id or an endpoint is
    used as it is)."""
    path = spec.path
    if path is not None and path.startswith(("runs/", "./", "/", "~")):
        ensure_teacher(Path(path).expanduser(), task, build, progress=progress)


def generative_labels(loglik: torch.Tensor, log_prior: torch.Tensor | None = None) -> torch.Tensor:
    """Bayes' rule with a class-conditional LM: ``argmax_c log p(x | c) + log p(c)``.
    ``loglik`` is (N, K); ``log_prior`` (K,) or None (uniform)."""
    return posterior(loglik, log_prior).argmax(-1)


def posterior(loglik: torch.Tensor, log_prior: torch.Tensor | None = None) -> torch.Tensor:
    """``p(c | x)`` (N, K) from the class-conditional log-likelihoods."""
    joint = loglik if log_prior is None else loglik + log_prior
    return torch.softmax(joint.double(), -1)


class GenerativeClassifier:
    """The teacher as a classifier: scores every text under every category's prompt."""

    def __init__(self, model, tokenizer, categories: list[str], *, batch_size: int = 64, progress: bool = False):
        self.model, self.tok, self.categories = model, tokenizer, categories
        self.batch_size, self.progress = batch_size, progress

    @classmethod
    def from_spec(cls, spec, categories: list[str], **kw) -> "GenerativeClassifier":
        """From a :class:`~distillery.lm.textgen.GeneratorSpec`; an endpoint gives one message."""
        from distillery.lm.textgen import HFGenerator

        try:
            gen = HFGenerator.from_spec(spec)
        except ConfigError:
            raise ConfigError("the teacher labels examples by scoring log p(text | category) with its weights; an "
                              "`endpoint` teacher returns text only: give teacher.path (a local or Hub causal LM)") from None
        return cls(gen.model, gen.tokenizer, categories, **kw)

    def loglik(self, texts: list[str]) -> torch.Tensor:
        """(N, K) ``log p(" " + text | prompt_of(c))``."""
        from distillery.lm.scoring import score_texts

        K = len(self.categories)
        flat = [" " + t for t in texts for _ in range(K)]
        contexts = [prompt_of(c) for _ in texts for c in self.categories]
        scores = score_texts(self.model, self.tok, flat, contexts, batch_size=self.batch_size,
                             progress=self.progress, title="teacher labels")
        return scores.logprob.view(len(texts), K)

    def predict(self, texts: list[str]) -> torch.Tensor:
        return generative_labels(self.loglik(texts)) if texts else torch.zeros(0, dtype=torch.long)


def generate(generator, categories: list[str], class_ids: list[int], *, prefixes: list[str] | None = None,
             max_new_tokens: int = 32, temperature: float = 1.0, top_p: float = 0.95, seed: int = 0,
             max_words: int = 30) -> list[Example]:
    """One definition per entry of ``class_ids`` from any :class:`TextGenerator` (local or
    endpoint), optionally continuing a given opening (``prefixes``); empty ones are dropped."""
    prefixes = prefixes or [""] * len(class_ids)
    prompts = [prompt_of(categories[k]) + (" " + p if p else "") for k, p in zip(class_ids, prefixes)]
    outs = generator.complete(prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                              n=1, stop=["\n"], seed=seed)
    examples = [(clean((p + " " if p else "") + o[0], max_words), k) for o, p, k in zip(outs, prefixes, class_ids)]
    return [(t, k) for t, k in examples if len(t.split()) >= 2]


class Student:
    """Logistic regression on TF-IDF word 1-2-grams and character 2-4-grams (scikit-learn).
    Fitted on one BLAS/OpenMP thread: on a few hundred rows more threads only spin."""

    def __init__(self, n_classes: int, *, C: float = 10.0, seed: int = 0):
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline, make_union

        features = make_union(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True),
                              TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), sublinear_tf=True))
        self.n_classes = n_classes
        self.pipe = make_pipeline(features, LogisticRegression(C=C, max_iter=2000, random_state=seed))

    def fit(self, examples: list[Example]) -> "Student":
        from threadpoolctl import threadpool_limits

        texts, labels = zip(*examples)
        if len(set(labels)) < 2:
            raise ValueError("the student needs examples of at least 2 classes")
        with threadpool_limits(1):
            self.pipe.fit(list(texts), list(labels))
        return self

    def proba(self, texts: list[str]) -> np.ndarray:
        """(N, n_classes); a class absent from the training data gets probability 0."""
        from threadpoolctl import threadpool_limits

        out = np.zeros((len(texts), self.n_classes))
        with threadpool_limits(1):
            out[:, self.pipe.classes_] = self.pipe.predict_proba(list(texts))
        return out

    def accuracy(self, examples: list[Example]) -> float:
        texts, labels = zip(*examples)
        return float((self.proba(list(texts)).argmax(1) == np.array(labels)).mean())


# ---- run directories shared by the methods built on this task

def open_run_dir(run_dir: Path, config_text: str, *, overwrite: bool) -> Path:
    """Create ``run_dir`` or reuse it when it holds the same config (finished stages are then
    skipped: an interrupted run resumes).  Another config needs ``overwrite``; a directory that
    is not one of these runs is never deleted."""
    from distillery.engine.checkpoint import atomic_write_text

    marker = run_dir / "config.yaml"
    if run_dir.exists() and any(run_dir.iterdir()):
        if not marker.is_file():
            raise ConfigError(f"refusing to write into {run_dir}: it exists and is not a run of this method "
                              "(no config.yaml); choose another name with --set name=NEW")
        if marker.read_text() != config_text:
            if not overwrite:
                raise ConfigError(f"{run_dir} holds a run with another config: pass --overwrite to replace it, or "
                                  "choose another name with --set name=NEW")
            shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(marker, config_text)
    return run_dir


def write_jsonl(path: Path, rows: list[dict]) -> None:
    from distillery.engine.checkpoint import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
