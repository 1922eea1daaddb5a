"""PGKD: performance-guided active distillation of a teacher LM into a small text classifier.

Di Palo, Singhi, Fadlallah, 2024, "Performance-Guided LLM Knowledge Distillation for Efficient
Text Classification at Scale" (EMNLP 2024 Industry Track).  The paper's loop (Algorithm 1):
train the student; evaluate it on a validation set; collect its *hard negatives* (validation
examples it gets wrong or nearly wrong); show the LLM the validation metrics and those
examples and ask it for new training examples aimed at them; label them with the teacher; add
them; retrain; stop early when the validation metric has not improved for ``patience`` rounds.

Here, on WordNet definitions (``distillery.lm.glossgen``):

* **Selection** (:func:`select_hard`): validation examples sorted by the student's margin
  ``p(true) - max_{c != true} p(c)``, lowest first -- confidently wrong ones come first (most
  negative margin), then correct ones with a small margin; the top ``hard_per_round``, each with
  its *confused class* (the other class the student ranked highest).
* **Targeted generation**: our teacher is a class-conditional LM, not an instruction follower,
  so the paper's prompt (metrics + misclassified examples + "generate new samples") becomes:
  for a hard example (x, true c, confused c'), ``n_true`` definitions under c's prompt and
  ``n_contrast`` under c''s prompt, all continuing the first ``prefix_words`` words of x --
  minimal pairs with the same opening on both sides of the boundary the student got wrong (the
  contrast the paper obtains by showing the confusion).  Through
  :func:`~distillery.lm.textgen.load_generator`, so an endpoint teacher writes them too.
* **Teacher labels**: ``label_with: teacher`` (default, as in the paper) labels every new
  example with the teacher's generative classifier (needs weights); ``label_with: prompt``
  keeps the class it was written for (an endpoint teacher without log-probabilities).
* **Baseline** ``random``: the same number of new teacher-written, teacher-labelled examples
  per round, for uniformly random classes without a prefix.  Both start from the same data:
  ``shots`` real + ``n_initial`` generated examples per class.
* The reported accuracy is the test accuracy of the round with the best validation accuracy
  (early stopping restores the best student).  The paper fine-tunes BERT and keeps training
  it; our student is a logistic regression refit from scratch each round (cheap, deterministic).
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Literal

import numpy as np
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


class PGKDConfig(_Strict):
    name: str = "pgkd"
    output_dir: str = Field("runs/lm/data", description="The run is written to output_dir/name.")
    task: gg.GlossTask = gg.GlossTask()
    teacher: GeneratorSpec = Field(default_factory=lambda: GeneratorSpec(path=gg.TEACHER_DIR))
    teacher_build: gg.TeacherBuild = gg.TeacherBuild()
    label_with: Literal["teacher", "prompt"] = Field(
        "teacher", description="teacher: the generative classifier labels new examples (needs weights); prompt: "
                               "the class each was written for (for an endpoint teacher).")
    shots: int = Field(2, ge=0, description="Real examples per class in the initial training set.")
    n_initial: int = Field(10, ge=0, description="Teacher-written examples per class in the initial training set.")
    max_rounds: int = Field(6, ge=1, description="Rounds of (evaluate, select, generate, retrain) at most.")
    patience: int = Field(2, ge=1, description="Stop after this many rounds without a better validation accuracy.")
    min_delta: float = Field(0.0, ge=0, description="An improvement must exceed this.")
    hard_per_round: int = Field(12, gt=0, description="Hard validation examples targeted per round.")
    n_true: int = Field(2, ge=0, description="New examples per hard example under its true class.")
    n_contrast: int = Field(1, ge=0, description="New examples per hard example under its confused class.")
    prefix_words: int = Field(3, ge=0, description="Opening words of the hard example that new ones continue.")
    strategies: list[Literal["pgkd", "random"]] = Field(["pgkd", "random"], min_length=1)
    seeds: list[int] = Field([0, 1, 2], min_length=1)
    max_new_tokens: int = Field(32, gt=0)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(0.95, gt=0, le=1)
    student_C: float = Field(10.0, gt=0)
    progress: bool = True


def load_pgkd_config(path: str | Path, overrides: list[str] | None = None) -> PGKDConfig:
    raw = read_yaml(path, overrides, hint="ready-made configs live in configs/lm/data/")
    try:
        cfg = PGKDConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, str(path), PGKDConfig)) from None
    if cfg.n_true + cfg.n_contrast == 0:
        raise ConfigError(f"{path}: n_true + n_contrast is 0, so PGKD would add nothing: set n_true >= 1")
    return cfg


def select_hard(probs: np.ndarray, labels: np.ndarray, budget: int) -> list[tuple[int, int]]:
    """``(index, confused class)`` of the ``budget`` examples with the lowest margin
    ``p(true) - max_{c != true} p(c)``: misclassified ones (negative margin, most confident
    first), then the least certain correct ones.  Ties keep the original order."""
    probs, labels = np.asarray(probs, dtype=float), np.asarray(labels)
    rows = np.arange(len(labels))
    others = probs.copy()
    others[rows, labels] = -np.inf
    confused = others.argmax(1)
    margin = probs[rows, labels] - others[rows, confused]
    order = np.argsort(margin, kind="stable")[:budget]
    return [(int(i), int(confused[i])) for i in order]


class EarlyStopping:
    """Stop when the metric (higher is better) has not improved by more than ``min_delta`` for
    ``patience`` consecutive rounds; ``best_round`` is the round to restore."""

    def __init__(self, patience: int, min_delta: float = 0.0):
        self.patience, self.min_delta = patience, min_delta
        self.best, self.best_round, self.bad, self.rounds = -float("inf"), -1, 0, 0

    def update(self, value: float) -> bool:
        """Record one round's metric; True when training should stop."""
        if value > self.best + self.min_delta:
            self.best, self.best_round, self.bad = value, self.rounds, 0
        else:
            self.bad += 1
        self.rounds += 1
        return self.bad >= self.patience


def targeted_requests(hard: list[tuple[int, int]], val: list[gg.Example], cfg: PGKDConfig) -> tuple[list[int], list[str]]:
    """(class to write for, opening words) of every new example aimed at the hard ones."""
    classes, prefixes = [], []
    for i, confused in hard:
        text, true = val[i]
        opening = " ".join(text.split()[:cfg.prefix_words])
        for k in [true] * cfg.n_true + [confused] * cfg.n_contrast:
            classes.append(k)
            prefixes.append(opening)
    return classes, prefixes


def _label(rows: list[gg.Example], classifier, cfg: PGKDConfig) -> list[dict]:
    if not rows:
        return []
    texts = [t for t, _ in rows]
    labels = classifier.predict(texts).tolist() if cfg.label_with == "teacher" else [k for _, k in rows]
    return [{"text": t, "asked": k, "label": int(y)} for (t, k), y in zip(rows, labels)]


def run_pgkd(cfg: PGKDConfig, *, overwrite: bool = False) -> dict:
    """The active loop for every (strategy, seed); ``output_dir/name/summary.json`` and
    ``val_accuracy.png`` (validation accuracy per round, PGKD vs random)."""
    run_dir = gg.open_run_dir(Path(cfg.output_dir) / cfg.name, yaml.safe_dump(cfg.model_dump(mode="json"),
                                                                              sort_keys=False), overwrite=overwrite)
    task, K = cfg.task, len(cfg.task.categories)
    gg.maybe_build_teacher(cfg.teacher, task, cfg.teacher_build, progress=cfg.progress)
    if cfg.label_with == "teacher" and cfg.teacher.endpoint is not None:
        gg.GenerativeClassifier.from_spec(cfg.teacher, task.categories)  # the message for an endpoint
    generator = load_generator(cfg.teacher)
    classifier = None
    if cfg.label_with == "teacher":
        assert isinstance(generator, HFGenerator)
        classifier = gg.GenerativeClassifier(generator.model, generator.tokenizer, task.categories)
    splits = gg.gloss_splits(task)
    val_texts, val_labels = [t for t, _ in splits["val"]], np.array([k for _, k in splits["val"]])
    gen_kw = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                  max_words=task.max_words)
    per_round = cfg.hard_per_round * (cfg.n_true + cfg.n_contrast)

    curves: dict[str, list[list[dict]]] = {s: [] for s in cfg.strategies}
    with ProgressBar(len(cfg.seeds) * len(cfg.strategies), enabled=cfg.progress, title="pgkd runs") as bar:
        for seed in cfg.seeds:
            init_file = run_dir / f"initial-seed{seed}.jsonl"
            if not init_file.is_file():  # shared by the strategies of this seed
                asked = [k for k in range(K) for _ in range(cfg.n_initial)]
                made = gg.generate(generator, task.categories, asked, seed=seed, **gen_kw) if asked else []
                gg.write_jsonl(init_file, _label(made, classifier, cfg))
            initial = gg.few_shot(splits["pool"], cfg.shots, K, seed) + \
                [(r["text"], r["label"]) for r in gg.read_jsonl(init_file)]
            for strategy in cfg.strategies:
                log_file = run_dir / f"rounds-{strategy}-seed{seed}.jsonl"
                rows = gg.read_jsonl(log_file) if log_file.is_file() else []  # resume: replay finished rounds
                data = list(initial) + [(a["text"], a["label"]) for r in rows for a in r["added"]]
                stopper = EarlyStopping(cfg.patience, cfg.min_delta)
                stopped = any(stopper.update(r["val_acc"]) for r in rows) or \
                    bool(rows and rows[-1]["round"] == cfg.max_rounds)
                while not stopped:
                    r = len(rows)
                    student = gg.Student(K, C=cfg.student_C, seed=seed).fit(data)
                    probs = student.proba(val_texts)
                    row = {"round": r, "n_train": len(data),
                           "val_acc": float((probs.argmax(1) == val_labels).mean()),
                           "test_acc": student.accuracy(splits["test"]), "added": []}
                    stopped = stopper.update(row["val_acc"]) or r == cfg.max_rounds
                    if not stopped:
                        g_seed = seed * 1000 + r + (500 if strategy == "random" else 0)
                        if strategy == "pgkd":
                            hard = select_hard(probs, val_labels, cfg.hard_per_round)
                            classes, prefixes = targeted_requests(hard, splits["val"], cfg)
                            row["confusions"] = [[int(val_labels[i]), c] for i, c in hard]
                        else:
                            rng = random.Random(g_seed)
                            classes, prefixes = [rng.randrange(K) for _ in range(per_round)], None
                        made = gg.generate(generator, task.categories, classes, prefixes=prefixes, seed=g_seed, **gen_kw)
                        row["added"] = _label(made, classifier, cfg)
                        data += [(a["text"], a["label"]) for a in row["added"]]
                    rows.append(row)
                    gg.write_jsonl(log_file, rows)
                curves[strategy].append(rows)
                bar.step(loss=float("nan"), samples=1)

    summary = {"name": cfg.name, "categories": task.categories, "seeds": cfg.seeds, "new_per_round": per_round,
               "strategies": {}}
    for strategy, runs in curves.items():
        best = [max(rows, key=lambda x: (x["val_acc"], -x["round"])) for rows in runs]
        added = [a for rows in runs for r in rows for a in r["added"]]
        summary["strategies"][strategy] = {
            "test_acc_at_best_val": gg.mean_std([b["test_acc"] for b in best]),
            "best_val_acc": gg.mean_std([b["val_acc"] for b in best]),
            "initial_test_acc": gg.mean_std([rows[0]["test_acc"] for rows in runs]),
            "rounds_run": [len(rows) for rows in runs], "best_round": [b["round"] for b in best],
            "train_size_at_best": [b["n_train"] for b in best],
            "teacher_kept_asked_label": float(np.mean([a["label"] == a["asked"] for a in added])) if added else None,
            "val_curves": [[r["val_acc"] for r in rows] for rows in runs],
            "test_curves": [[r["test_acc"] for r in rows] for rows in runs]}
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    plot_curves(summary, run_dir / "val_accuracy.png", cfg.max_rounds)
    return summary


def plot_curves(summary: dict, path: Path, max_rounds: int) -> None:
    """Validation accuracy per round: thin lines per seed, thick the mean (a stopped run holds
    its last value, the student it would keep training from)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for (strategy, info), color in zip(summary["strategies"].items(), ("tab:red", "tab:blue")):
        filled = [c + [c[-1]] * (max_rounds + 1 - len(c)) for c in info["val_curves"]]
        for c in info["val_curves"]:
            ax.plot(range(len(c)), c, color=color, alpha=0.3, lw=1)
        ax.plot(range(max_rounds + 1), np.mean(filled, 0), color=color, lw=2.5,
                label=f"{'PGKD (targeted)' if strategy == 'pgkd' else 'random teacher generations'}")
    ax.set_xlabel("round")
    ax.set_ylabel("validation accuracy")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
