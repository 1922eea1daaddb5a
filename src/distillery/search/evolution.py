"""Aging (regularized) evolution, the search DisWOT runs over its proxy.

Real, Aggarwal, Huang, Le, "Regularized Evolution for Image Classifier Architecture Search",
AAAI 2019, Algorithm 1 -- the search of DisWOT's official code (Dong et al. 2023, Sec. 3.3):

1. fill a population of ``population`` random architectures and score them;
2. each cycle, draw ``sample_size`` members at random (with replacement), mutate the best of
   them, score the child, add it, and remove the *oldest* member (aging, not the worst).

The search knows nothing about models: it gets ``sample(rng)``, ``mutate(parent, rng)`` and
``score(candidate)`` callables.  All randomness comes from one ``random.Random(seed)``, so a
seed and a deterministic ``score`` give the same history.  A candidate met again is not
re-scored.
"""
from __future__ import annotations

import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable


@dataclass
class Scored:
    candidate: Any
    score: float
    cycle: int  # -1: initial population
    seconds: float  # time to score it (0 when it was met before)


@dataclass
class EvolutionResult:
    history: list[Scored] = field(default_factory=list)
    seconds: float = 0.0

    def ranked(self) -> list[Scored]:
        """Unique candidates, best score first (ties: first found first)."""
        best: dict[Hashable, Scored] = {}
        for s in self.history:
            best.setdefault(s.candidate, s)
        return sorted(best.values(), key=lambda s: -s.score if s.score == s.score else float("inf"))

    def best_so_far(self) -> list[float]:
        """The best score after each evaluation (a non-decreasing curve)."""
        out, best = [], float("-inf")
        for s in self.history:
            best = max(best, s.score)
            out.append(best)
        return out


def regularized_evolution(
    *,
    sample: Callable[[random.Random], Hashable],
    mutate: Callable[[Hashable, random.Random], Hashable],
    score: Callable[[Hashable], float],
    population: int,
    sample_size: int,
    cycles: int,
    seed: int = 0,
    progress: Callable[[int, int, float], None] | None = None,
) -> EvolutionResult:
    """Run Algorithm 1 of Real et al. (2019); ``progress(done, total, best)`` after every evaluation."""
    if population < 1 or sample_size < 1 or cycles < 0:
        raise ValueError(f"need population >= 1, sample_size >= 1, cycles >= 0 (got {population}, {sample_size}, {cycles})")
    rng = random.Random(seed)
    cache: dict[Hashable, float] = {}
    result = EvolutionResult()
    total = population + cycles
    t0 = time.perf_counter()
    best = float("-inf")

    def evaluate(candidate, cycle: int) -> Scored:
        nonlocal best
        start = time.perf_counter()
        if candidate not in cache:
            cache[candidate] = float(score(candidate))
            spent = time.perf_counter() - start
        else:
            spent = 0.0
        s = Scored(candidate, cache[candidate], cycle, spent)
        result.history.append(s)
        if s.score > best:
            best = s.score
        if progress is not None:
            progress(len(result.history), total, best)
        return s

    alive: deque[Scored] = deque()
    while len(alive) < population:
        alive.append(evaluate(sample(rng), -1))
    for cycle in range(cycles):
        contenders = [rng.choice(alive) for _ in range(sample_size)]
        parent = max(contenders, key=lambda s: s.score)
        alive.append(evaluate(mutate(parent.candidate, rng), cycle))
        alive.popleft()
    result.seconds = time.perf_counter() - t0
    return result


class SearchProgress:
    """A live bar in a terminal (rich, as the training bar); in a log, a line every tenth of the way."""

    def __init__(self, total: int, *, title: str = "search", enabled: bool = True):
        from rich.console import Console

        self.console = Console()
        self.total, self.title = total, title
        self.live = enabled and self.console.is_terminal
        self.log_lines = enabled and not self.live
        self._next_line = 0
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("best {task.fields[best]}"), TimeElapsedColumn(), TimeRemainingColumn(),
            )
            self._task = self._progress.add_task(title, total=total, best="—")

    def __enter__(self) -> "SearchProgress":
        if self.live:
            self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.live:
            self._progress.stop()

    def __call__(self, done: int, total: int, best: float) -> None:
        if self.live:
            self._progress.update(self._task, completed=done, best=f"{best:.5g}")
        elif self.log_lines and (done >= self._next_line or done == total):
            self.console.print(f"{self.title}: {done}/{total} candidates scored, best {best:.5g}", highlight=False)
            self._next_line = done + max(1, total // 10)
