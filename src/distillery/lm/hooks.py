"""Extension points of :func:`distillery.lm.trainer.distill_lm` for methods that act on the data
or watch the run rather than change the loss: DDK's domain mixture chooses which rows each step
reads; the oracle monitor (teacher hacking) measures the student against a third model.  The
trainer calls hooks at fixed points and knows nothing about any particular one.

A hook's state (``state_dict``) is saved in every checkpoint, so a resumed run continues the
mixture / the monitor's history where it stopped.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass
class HookContext:
    """What a hook may read (never replace): the models, data and where the run writes."""

    student: torch.nn.Module       # the raw (unwrapped) student
    teacher: torch.nn.Module | None
    tokenizer: Any
    train: Any                     # the training dataset (rows with input_ids / targets / prompt_len)
    eval_loader: Any               # held-out batches, or None
    vocab: int
    device: torch.device
    run_dir: Path
    max_steps: int


class LMHook:
    """Base class: every method is optional."""

    name = "hook"

    def setup(self, ctx: HookContext) -> None:
        """Called once, after the checks and before the first step (also on resume)."""

    def batch_indices(self, step: int, micro: int, size: int) -> list[int] | None:
        """The training rows of micro-batch ``micro`` of optimiser step ``step`` (``size`` rows,
        all processes together); None: the trainer's shuffled epochs.  Must be a function of
        (step, micro, the hook's state) so that a resumed run reads the same rows."""
        return None

    def transform_batch(self, step: int, batch: dict, ctx: HookContext) -> dict:
        """The batch step ``step`` trains on, given the one it read (after on-policy generation):
        e.g. rows replaced by teacher-revised student generations.  Randomness here is seeded by
        the trainer per step, so a resumed run transforms the same way."""
        return batch

    def after_step(self, step: int, ctx: HookContext) -> dict[str, float]:
        """Called after optimiser step ``step``; returned values are logged to metrics.jsonl."""
        return {}

    def summary(self) -> dict:
        """Added to the run's summary.json under the hook's name."""
        return {}

    def state_dict(self) -> dict:
        """JSON-serialisable (it is stored in the checkpoint's state.json)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
