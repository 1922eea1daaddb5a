"""A search space over the model zoo: sample, mutate, build, and check the limits.

A candidate is a zoo family (the block type: plain conv, basic or wide residual, inverted
residual, transformer, MLP) plus one value for each of that family's searched keywords
(depth, width, expansion ratio, patch size, ... -- whatever the zoo factory accepts; a kernel
size enters the space as soon as a zoo family takes one).  Every candidate the space hands
out builds and meets the constraints: parameters and MACs are counted on the built model,
CPU latency is measured (only when a latency limit is set, with a small time budget).
"""
from __future__ import annotations

import hashlib
import math
import random
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from distillery.config import ModelSpec
from distillery.errors import DistilleryError, ModelError
from distillery.search.config import Constraints


class SearchError(DistilleryError):
    """The space or its limits leave nothing to search."""


def _frozen(value: Any) -> Any:
    return tuple(_frozen(v) for v in value) if isinstance(value, (list, tuple)) else value


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, tuple) else value


@dataclass(frozen=True)
class Candidate:
    """One architecture: a zoo ``arch`` and its keyword values (sorted, hashable)."""

    arch: str
    kwargs: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def make(cls, arch: str, kwargs: dict[str, Any] | None = None) -> "Candidate":
        return cls(arch, tuple(sorted((k, _frozen(v)) for k, v in (kwargs or {}).items())))

    @property
    def key(self) -> str:
        """Readable and unique, e.g. ``cnn(depth=3, width=16)``."""
        if not self.kwargs:
            return self.arch
        return f"{self.arch}({', '.join(f'{k}={_plain(v)}' for k, v in self.kwargs)})"

    def kwargs_dict(self) -> dict[str, Any]:
        return {k: _plain(v) for k, v in self.kwargs}

    def spec(self) -> ModelSpec:
        return ModelSpec(arch=self.arch, kwargs=self.kwargs_dict())


@dataclass(frozen=True)
class Cost:
    params: int
    macs: int
    latency_ms: float | None = None


def stable_seed(*parts: Any) -> int:
    """A seed from any values, the same in every process (Python's ``hash`` of a string is not)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class Space:
    """The runtime space: validated ``families`` (see :func:`distillery.search.config.validate_space`),
    the ``constraints``, and the data's shape (models are built for it).

    ``latency_inputs`` (a :class:`~distillery.data.Split`) is needed only for a latency limit.
    ``seed`` fixes every candidate's initialisation (:meth:`build`)."""

    def __init__(
        self,
        families: dict[str, dict[str, list[Any]]],
        constraints: Constraints | None = None,
        *,
        in_channels: int | None,
        num_classes: int,
        input_size: tuple[int, ...] | None,
        latency_inputs=None,
        seed: int = 0,
        family_mutation: float = 0.2,
    ):
        if not families:
            raise SearchError("the search space has no family")
        self.families = {f: {k: list(v) for k, v in dims.items()} for f, dims in families.items()}
        self.constraints = constraints or Constraints()
        self.in_channels, self.num_classes = in_channels, num_classes
        self.input_size = tuple(input_size) if input_size is not None else None
        self.latency_inputs = latency_inputs
        self.seed = seed
        self.family_mutation = family_mutation
        if self.constraints.max_latency_ms is not None and latency_inputs is None:
            raise SearchError("a latency limit needs inputs to time the candidates on (latency_inputs)")
        self._costs: dict[Candidate, Cost | str] = {}

    @classmethod
    def for_data(cls, families, constraints, data, **kw) -> "Space":
        """A space for the shapes of a :class:`~distillery.data.DataBundle` (latency timed on its validation rows)."""
        timing = data.val if len(data.val) else data.train
        return cls(families, constraints, in_channels=data.in_channels, num_classes=data.num_classes,
                   input_size=data.input_size, latency_inputs=timing, **kw)

    # ---- size, building, cost

    def __len__(self) -> int:
        return sum(math.prod(len(c) for c in dims.values()) for dims in self.families.values())

    def __contains__(self, c: Candidate) -> bool:
        dims = self.families.get(c.arch)
        if dims is None or {k for k, _ in c.kwargs} != set(dims):
            return False
        return all(v in [_frozen(x) for x in dims[k]] for k, v in c.kwargs)

    def build(self, c: Candidate, *, seed: int | None = None) -> nn.Module:
        """The candidate's model at a random initialisation fixed by (space seed, candidate) --
        the global torch RNG is left untouched."""
        from distillery.models import build_model

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(stable_seed(self.seed if seed is None else seed, c.key))
            return build_model(c.spec(), in_channels=self.in_channels, num_classes=self.num_classes,
                               input_size=self.input_size)

    def _example(self) -> torch.Tensor:
        if self.latency_inputs is not None:
            from distillery.report.metrics import take_rows

            return take_rows(self.latency_inputs, 1)
        if self.input_size is None:
            raise SearchError("the data has no fixed input size; MACs cannot be counted")
        shape = (1, self.in_channels, *self.input_size) if len(self.input_size) == 2 else (1, *self.input_size)
        return torch.zeros(shape)

    def _measure(self, c: Candidate) -> Cost | str:
        """The candidate's cost, or why it is out: it does not build, or it breaks a limit."""
        from distillery.models import count_parameters
        from distillery.report.metrics import count_macs, measure_latency

        lim = self.constraints
        try:
            model = self.build(c)
        except (ModelError, ValueError, RuntimeError) as err:
            return f"does not build: {str(err).splitlines()[0]}"
        n_params = count_parameters(model)
        if lim.max_params is not None and n_params > lim.max_params:
            return f"{n_params:,} params > max_params {lim.max_params:,}"
        try:
            n_macs = count_macs(model, self._example())
        except RuntimeError as err:
            return f"does not run on the data: {str(err).splitlines()[0]}"
        if lim.max_macs is not None and n_macs > lim.max_macs:
            return f"{n_macs:,} MACs > max_macs {lim.max_macs:,}"
        latency = None
        if lim.max_latency_ms is not None:
            timing = measure_latency(model, self.latency_inputs, warmup=2, repeats=20, throughput_repeats=1,
                                     budget_s=lim.latency_budget_s)
            latency = timing["batch1_median_ms"]
            if latency > lim.max_latency_ms:
                return f"{latency:.2f} ms > max_latency_ms {lim.max_latency_ms:g}"
        return Cost(n_params, n_macs, latency)

    def check(self, c: Candidate) -> Cost | str:
        """:class:`Cost` of a feasible candidate, else the reason it is not (both cached)."""
        if c not in self._costs:
            self._costs[c] = self._measure(c)
        return self._costs[c]

    def cost(self, c: Candidate) -> Cost:
        out = self.check(c)
        if isinstance(out, str):
            raise SearchError(f"{c.key} is not a valid candidate: {out}")
        return out

    # ---- sampling and mutation

    def random_candidate(self, rng: random.Random, family: str | None = None) -> Candidate:
        """Uniform family (unless given), then a uniform choice per keyword; limits not checked."""
        family = family or rng.choice(list(self.families))
        return Candidate.make(family, {k: rng.choice(v) for k, v in self.families[family].items()})

    def sample(self, rng: random.Random, *, max_tries: int = 500) -> Candidate:
        """A random candidate that builds and meets the limits."""
        reasons: Counter[str] = Counter()
        for _ in range(max_tries):
            c = self.random_candidate(rng)
            out = self.check(c)
            if isinstance(out, Cost):
                return c
            reasons[f"{c.key}: {out}"] += 1
        shown = "; ".join(r for r, _ in reasons.most_common(3))
        raise SearchError(f"no architecture of the space met the limits in {max_tries} draws "
                          f"({self.constraints.model_dump(exclude_defaults=True)}); e.g. {shown}. "
                          "Loosen search.constraints or add smaller choices to search.space")

    def mutate(self, parent: Candidate, rng: random.Random, *, max_tries: int = 50) -> Candidate:
        """A feasible child that differs from ``parent`` in one place: one keyword takes another
        of its choices, or (with probability ``family_mutation``, or when the family has
        nothing to vary) the block type changes to another family with random keywords.
        Falls back to a fresh :meth:`sample` when no feasible neighbour turns up."""
        for _ in range(max_tries):
            child = self._neighbour(parent, rng)
            if child is None:
                break
            if child != parent and isinstance(self.check(child), Cost):
                return child
        return self.sample(rng)

    def _neighbour(self, parent: Candidate, rng: random.Random) -> Candidate | None:
        dims = self.families.get(parent.arch, {})
        variable = [k for k, v in dims.items() if len(v) > 1]
        other_families = [f for f in self.families if f != parent.arch]
        switch = bool(other_families) and (not variable or rng.random() < self.family_mutation)
        if switch:
            return self.random_candidate(rng, rng.choice(other_families))
        if not variable:
            return None  # a one-architecture space
        key = rng.choice(variable)
        current = dict(parent.kwargs)[key]
        value = rng.choice([v for v in dims[key] if _frozen(v) != current])
        return Candidate.make(parent.arch, {**parent.kwargs_dict(), key: value})
