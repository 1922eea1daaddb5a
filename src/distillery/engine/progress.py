"""A progress bar with live loss, throughput and validation accuracy (rich)."""
from __future__ import annotations

import math
import time

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class ProgressBar:
    """A live bar in a terminal; in a log (CI, a pipe) one plain line per epoch instead."""

    def __init__(self, total: int, *, enabled: bool = True, initial: int = 0, title: str = "train"):
        from rich.console import Console

        self.console = Console()
        self.live = self.enabled = enabled and self.console.is_terminal
        self.log_lines = enabled and not self.live
        self.title, self.total, self.done = title, total, initial
        self.fields = {"loss": float("nan"), "val_acc": float("nan"), "rate": 0.0}
        self._t0, self._n = time.perf_counter(), 0
        if self.live:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f}  val_acc {task.fields[val_acc]}  {task.fields[rate]:.0f} samples/s"),
                TimeElapsedColumn(), TimeRemainingColumn(), transient=False,
            )
            self._task = self._progress.add_task(title, total=total, completed=initial, **self._shown())

    def _shown(self) -> dict:
        va = self.fields["val_acc"]
        return {**self.fields, "val_acc": "—" if va is None or math.isnan(va) else f"{100 * va:.2f}%"}

    def __enter__(self) -> "ProgressBar":
        if self.enabled:
            self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self._progress.stop()

    def step(self, *, loss: float, samples: int, advance: int = 1) -> None:
        self._n += samples
        self.done += advance
        self.fields.update(loss=loss, rate=self._n / max(time.perf_counter() - self._t0, 1e-9))
        if self.enabled:
            self._progress.update(self._task, advance=advance, **self._shown())

    def set(self, **fields) -> None:
        self.fields.update(fields)
        if self.log_lines:
            f = self._shown()
            self.console.print(f"{self.title} step {self.done}/{self.total}  loss {f['loss']:.4f}  "
                               f"val_acc {f['val_acc']}  {f['rate']:.0f} samples/s", highlight=False)
        if self.enabled:
            self._progress.update(self._task, **self._shown())
