"""Class-incremental learning with KD and Weight Aligning (Zhao et al., CVPR 2020).

    distillery incremental configs/wa_incremental.yaml --tasks 5 --strategy wa
    from distillery.recipes.class_incremental import run_incremental

The classes of the config's data arrive in ``tasks`` groups (Fashion-MNIST: 5 tasks of 2
classes).  Task 0 trains the config's student on its classes with cross-entropy.  Task t >= 1:

1. the student starts from task t-1's model with its classifier extended by rows for the new
   classes (old rows copied, new rows freshly initialised) -- :func:`expand_classifier`;
2. it trains on the new classes' data plus a small memory of exemplars of every old class
   (``memory_per_class`` random training rows per class, kept fixed once chosen);
3. strategy ``finetune``: cross-entropy only; ``kd``: method ``wa`` (KD on the old classes'
   logits from task t-1's model, λ = C_old / C_total); ``wa``: the same, then **weight
   aligning** -- the new classes' classifier rows are scaled by
   γ = mean ‖w_old‖ / mean ‖w_new‖ (:func:`align_weights`), which removes the bias toward new
   classes that KD alone leaves (the paper's eq. 7-8);
4. accuracy is measured on the test rows of every class seen so far.

The summary is the paper's *average incremental accuracy*: the mean over tasks of the accuracy
on all classes seen after that task (task 0 included, as in iCaRL's protocol).  Each task is a
normal run directory (``OUTPUT_DIR/NAME/task-t``), reused when finished and resumed when
started; ``incremental.md`` / ``incremental.json`` hold the table.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file

from distillery.config import RunConfig, config_from_dict
from distillery.data import DataBundle, load_data
from distillery.engine import evaluate
from distillery.engine.checkpoint import atomic_write_text
from distillery.errors import ConfigError
from distillery.models import build_model

PAPER = "Zhao et al. 2020, Maintaining Discrimination and Fairness in Class Incremental Learning"
Strategy = Literal["finetune", "kd", "wa"]


def split_tasks(num_classes: int, tasks: int | list[list[int]]) -> list[list[int]]:
    """``tasks`` equal groups of consecutive class ids, or an explicit list of groups (checked)."""
    if isinstance(tasks, int):
        if tasks < 2 or num_classes % tasks:
            raise ConfigError(f"--tasks {tasks} must be >= 2 and divide the {num_classes} classes evenly "
                              "(or give the groups explicitly)")
        size = num_classes // tasks
        return [list(range(i * size, (i + 1) * size)) for i in range(tasks)]
    flat = [c for group in tasks for c in group]
    if sorted(flat) != sorted(set(flat)) or not all(0 <= c < num_classes for c in flat) or len(tasks) < 2 or \
            any(not g for g in tasks):
        raise ConfigError(f"task groups {tasks} must be >= 2 non-empty groups of distinct class ids in 0..{num_classes - 1}")
    return [list(g) for g in tasks]


def classifier_key(state: dict[str, torch.Tensor], num_classes: int) -> str:
    """The classifier weight: ``head.weight`` of zoo models, else the last 2-D weight with one
    row per class."""
    if "head.weight" in state and state["head.weight"].shape[0] == num_classes:
        return "head.weight"
    keys = [k for k, v in state.items() if k.endswith("weight") and v.dim() == 2 and v.shape[0] == num_classes]
    if not keys:
        raise ConfigError(f"no classifier weight with {num_classes} rows in the model: class-incremental learning needs "
                          "a final linear layer (zoo models name it `head`)")
    return keys[-1]


def expand_classifier(old: dict[str, torch.Tensor], fresh: dict[str, torch.Tensor], c_old: int) -> dict[str, torch.Tensor]:
    """The fresh model's state with every tensor of the old model copied in: tensors of equal
    shape whole, the classifier (weight and bias) row-wise for the ``c_old`` old classes."""
    out = {}
    for key, value in fresh.items():
        prev = old.get(key)
        if prev is None:
            raise ConfigError(f"the previous task's model has no {key!r}: was the student architecture changed?")
        if prev.shape == value.shape:
            out[key] = prev.clone()
        elif prev.shape[0] == c_old and prev.shape[1:] == value.shape[1:] and value.shape[0] > c_old:
            new = value.clone()
            new[:c_old] = prev
            out[key] = new
        else:
            raise ConfigError(f"{key}: previous shape {tuple(prev.shape)} cannot grow into {tuple(value.shape)}")
    return out


def align_weights(state: dict[str, torch.Tensor], c_old: int, c_all: int) -> tuple[dict[str, torch.Tensor], float]:
    """Weight aligning (eq. 7-8): scale the new classes' classifier rows by
    γ = mean_i ‖w_i‖ (old) / mean_j ‖w_j‖ (new).  Returns the new state and γ."""
    key = classifier_key(state, c_all)
    w = state[key]
    norms = w.float().norm(dim=1)
    gamma = float(norms[:c_old].mean() / norms[c_old:].mean().clamp_min(1e-12))
    out = dict(state)
    out[key] = w.clone()
    out[key][c_old:] *= gamma
    return out, gamma


def task_data(full: DataBundle, seen: list[int], new: list[int], memory: dict[int, torch.Tensor]) -> DataBundle:
    """Train: the new classes' rows + the memory rows of old classes; val/test: every seen class.
    Labels are renumbered 0..len(seen)-1 in order of arrival."""
    remap = torch.full((full.num_classes,), -1, dtype=torch.long)
    remap[torch.tensor(seen)] = torch.arange(len(seen))

    def keep(split, rows):
        part = split.take(rows)
        return dataclasses.replace(part, labels=remap[part.labels])

    train_rows = torch.isin(full.train.labels, torch.tensor(new)).nonzero().flatten()
    if memory:
        train_rows = torch.cat([train_rows, *memory.values()]).sort().values
    seen_t = torch.tensor(seen)
    digest = hashlib.sha256(f"{full.fingerprint}:{seen}:{new}:{[m.tolist() for m in memory.values()]}".encode()).hexdigest()
    return dataclasses.replace(
        full, train=keep(full.train, train_rows), val=keep(full.val, torch.isin(full.val.labels, seen_t).nonzero().flatten()),
        test=keep(full.test, torch.isin(full.test.labels, seen_t).nonzero().flatten()), num_classes=len(seen),
        class_names=[full.class_names[c] for c in seen], fingerprint=digest)


def _exemplars(full: DataBundle, classes: list[int], per_class: int, seed: int) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for c in classes:
        rows = (full.train.labels == c).nonzero().flatten()
        out[c] = rows[torch.randperm(len(rows), generator=g)[:per_class]]
    return out


def _fit(cfg: RunConfig, data: DataBundle) -> dict:
    from distillery.recipes.self_distillation import _fit_or_reuse

    return _fit_or_reuse(cfg, data)


def run_incremental(cfg: RunConfig, *, tasks: int | list[list[int]] = 5, strategy: Strategy = "wa",
                    memory_per_class: int = 20, data: DataBundle | None = None) -> dict:
    if strategy not in ("finetune", "kd", "wa"):
        raise ConfigError(f"strategy must be finetune, kd or wa, got {strategy!r}")
    if memory_per_class < 0:
        raise ConfigError("memory_per_class must be >= 0")
    full = data or load_data(cfg.data)
    if full.task != "multiclass":
        raise ConfigError("class-incremental learning needs single-label classes")
    groups = split_tasks(full.num_classes, tasks)
    series = Path(cfg.output_dir) / cfg.name
    series.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() and not cfg.train.cpu else "cpu"
    base = cfg.model_dump(mode="json")
    rows, memory, previous = [], {}, None  # previous: (weights file, number of classes)
    for t, new in enumerate(groups):
        seen = [c for g in groups[: t + 1] for c in g]
        bundle = task_data(full, seen, new, memory)
        raw = {**base, "name": f"task-{t}", "output_dir": str(series), "teacher": None,
               "method": {"name": "ce", "params": {}}}
        if previous is not None:
            weights, c_old = previous
            fresh = build_model(cfg.student, in_channels=full.in_channels, num_classes=len(seen),
                                input_size=full.input_size).state_dict()
            init = series / f"task-{t}-init.safetensors"
            if not init.is_file():
                tmp = init.with_suffix(".tmp")
                save_file(expand_classifier(load_file(str(weights)), fresh, c_old), str(tmp))
                tmp.replace(init)
            raw["student"] = {**base["student"], "weights": str(init)}
            if strategy != "finetune":
                raw["method"] = {"name": "wa", "params": {}}
                raw["teacher"] = {"model": {**base["student"], "weights": str(weights)}}
        summary = _fit(config_from_dict(raw, source=f"(incremental task {t})"), bundle)
        run_dir = series / f"task-{t}"
        weights, gamma = run_dir / "model.safetensors", None
        if strategy == "wa" and t > 0:
            aligned = run_dir / "model-aligned.safetensors"
            state, gamma = align_weights(load_file(str(weights)), len(seen) - len(new), len(seen))
            tmp = aligned.with_suffix(".tmp")
            save_file(state, str(tmp))
            tmp.replace(aligned)
            weights = aligned
        model = build_model(cfg.student.model_copy(update={"weights": str(weights)}),
                            in_channels=full.in_channels, num_classes=len(seen), input_size=full.input_size).to(device)
        acc = evaluate(model, bundle.test, device, cfg.data.eval_batch_size)["accuracy"]
        old_rows = (bundle.test.labels < len(seen) - len(new)).nonzero().flatten()
        old_acc = evaluate(model, bundle.test.take(old_rows), device)["accuracy"] if len(old_rows) else None
        rows.append({"task": t, "classes": [full.class_names[c] for c in new], "seen": len(seen),
                     "test_accuracy": acc, "old_class_accuracy": old_acc, "gamma": gamma,
                     "unaligned_test_accuracy": summary.get("test_accuracy")})
        memory.update(_exemplars(full, new, memory_per_class, cfg.data.split_seed * 1000 + t))
        previous = (weights, len(seen))
    result = {"paper": PAPER, "strategy": strategy, "tasks": groups, "memory_per_class": memory_per_class,
              "average_incremental_accuracy": sum(r["test_accuracy"] for r in rows) / len(rows),
              "final_accuracy": rows[-1]["test_accuracy"], "rows": rows}
    atomic_write_text(series / "incremental.json", json.dumps(result, indent=2))
    atomic_write_text(series / "incremental.md", _markdown(cfg, result))
    return result


def _markdown(cfg: RunConfig, result: dict) -> str:
    pct = lambda v: "" if v is None else f"{100 * v:.2f}%"  # noqa: E731
    lines = [f"# Class-incremental learning: {cfg.name} ({result['strategy']})", "", f"{PAPER}.", "",
             f"{len(result['tasks'])} tasks {result['tasks']}, memory {result['memory_per_class']} exemplars per old "
             f"class, student {cfg.student.arch}, {cfg.train.epochs} epochs per task.", "",
             "| task | new classes | seen | accuracy (all seen) | old classes | γ (WA) |", "|---:|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        gamma = "" if r["gamma"] is None else f"{r['gamma']:.3f}"
        lines.append(f"| {r['task']} | {', '.join(r['classes'])} | {r['seen']} | {pct(r['test_accuracy'])} | "
                     f"{pct(r['old_class_accuracy'])} | {gamma} |")
    lines += ["", f"Average incremental accuracy: **{pct(result['average_incremental_accuracy'])}**"]
    return "\n".join(lines) + "\n"
