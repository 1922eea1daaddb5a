"""The search config: a normal run config (``run:``) plus a ``search:`` section.

    run:                      # any RunConfig except the student, which the search picks
      name: search-fmnist
      data: {name: fashion_mnist, train_subset: 1000}
      teacher: {run: runs/teacher-fmnist, cache: true}
      method: {name: kd}
      student: {arch: cnn, kwargs: {width: 16}}   # optional: a hand-picked student to compare with
    search:
      proxy: diswot
      space:                  # zoo family -> {keyword: [choices]}; {} = the family as it is
        cnn: {width: [8, 16, 24], depth: [2, 3, 4]}
        mlp: {hidden: [[64], [128, 64]]}      # a list is always a list of choices
        resnet8: {}
      constraints: {max_params: 100000, max_macs: 5000000, max_latency_ms: 2.0}
      population: 16
      cycles: 64
      top_k: 3

The top-k architectures are written as ready-to-run configs: ``run`` with the candidate as
its student.  Validation happens once, at load, and names the field.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from distillery.config import ModelSpec, RunConfig, apply_overrides, config_from_dict, format_validation_error, read_yaml
from distillery.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Constraints(_Strict):
    """Limits every candidate must meet (``null`` = no limit)."""

    max_params: int | None = Field(None, gt=0, description="Most parameters a student may have.")
    max_macs: int | None = Field(None, gt=0, description="Most multiply-accumulates of one forward pass on one sample.")
    max_latency_ms: float | None = Field(
        None, gt=0, description="Most median CPU latency at batch 1 (one thread), measured on this machine.")
    latency_budget_s: float = Field(
        0.2, gt=0, description="Seconds of timed calls per candidate for the latency measurement (it stops early).")


def _hashable(value: Any) -> Any:
    return tuple(_hashable(v) for v in value) if isinstance(value, (list, tuple)) else value


def validate_space(space: dict[str, dict[str, Any]]) -> dict[str, dict[str, list[Any]]]:
    """Check a search space against the model zoo; a single value means a one-choice list.

    Raises ``ValueError`` naming the family or keyword, and the allowed names."""
    from distillery.models import adapters, zoo

    if not space:
        raise ValueError("the space is empty; list at least one zoo family, e.g. `cnn: {width: [8, 16], depth: [2, 3]}`")
    out: dict[str, dict[str, list[Any]]] = {}
    known = zoo.available_models()
    for family, dims in space.items():
        if family not in known:
            raise ValueError(f"unknown model family '{family}'; zoo families: {', '.join(known)}")
        dims = dims or {}
        if not isinstance(dims, dict):
            raise ValueError(f"{family}: expected a mapping of keyword -> choices, got {dims!r}")
        accepted = [n for n in adapters.accepted_names(zoo.get_factory(family)) if n not in adapters.DATA_KWARGS]
        fixed = {}
        for key, choices in dims.items():
            if key not in accepted:
                own = ", ".join(accepted) if accepted else "none (list it as `" + family + ": {}`)"
                raise ValueError(f"{family}: '{key}' is not a keyword of this model; its keywords: {own}")
            if not isinstance(choices, list):
                choices = [choices]  # a single value is a fixed keyword
            if not choices:
                raise ValueError(f"{family}.{key}: the list of choices is empty")
            seen = [_hashable(c) for c in choices]
            if len(set(seen)) != len(seen):
                raise ValueError(f"{family}.{key}: duplicate choices in {choices}")
            fixed[key] = list(choices)
        out[family] = fixed
    return out


class SearchSection(_Strict):
    """How to search: the space, the limits, the proxy that ranks, the evolution's budget."""

    proxy: str = Field("diswot", description="Ranking proxy: diswot, diswot_semantic, diswot_relation, params, macs, "
                                             "naswot, synflow or grad_norm (higher is better).")
    space: dict[str, dict[str, Any]] = Field(..., description="Zoo family -> {keyword: [choices]}; the family is the block type.")
    constraints: Constraints = Constraints()
    population: int = Field(16, ge=2, description="Individuals kept alive (aging evolution).")
    sample_size: int = Field(4, ge=1, description="Tournament size: the best of this many random members is mutated.")
    cycles: int = Field(64, ge=0, description="Children made after the initial population (each is scored once).")
    top_k: int = Field(3, ge=1, description="Architectures written as ready-to-run configs.")
    seed: int = Field(0, description="Seeds sampling, mutation, the proxy batch and every candidate's initialisation.")
    batch_size: int = Field(64, ge=2, description="Training samples in the proxies' batch.")
    family_mutation: float = Field(0.2, ge=0, le=1, description="Chance that a mutation changes the block type (family).")
    teacher_init: Literal["random", "trained"] = Field(
        "random", description="Score against the teacher architecture at random initialisation (as DisWOT does) "
                              "or against the trained teacher.")

    @field_validator("proxy")
    @classmethod
    def _known_proxy(cls, v: str) -> str:
        from distillery.search.proxies import PROXIES

        if v not in PROXIES:
            raise ValueError(f"unknown proxy '{v}'; proxies: {', '.join(PROXIES)}")
        return v

    @field_validator("space", mode="before")
    @classmethod
    def _valid_space(cls, v):
        if not isinstance(v, dict):
            raise ValueError("expected a mapping of zoo family -> {keyword: [choices]}")
        return validate_space(v)

    @model_validator(mode="after")
    def _tournament_fits(self) -> "SearchSection":
        if self.sample_size > self.population:
            raise ValueError(f"sample_size ({self.sample_size}) cannot exceed population ({self.population})")
        return self


class SearchConfig(_Strict):
    """``run``: the run config of every candidate (its ``student``, if given, is the hand-picked
    reference); ``search``: :class:`SearchSection`."""

    run: dict[str, Any]
    search: SearchSection

    @model_validator(mode="after")
    def _valid_run(self) -> "SearchConfig":
        self.reference_run()  # raises with the run section's field paths
        if self.run.get("teacher") is None:
            raise ValueError("run.teacher is missing: the search picks a student for a teacher (e.g. teacher: {run: runs/teacher-fmnist})")
        return self

    def reference_run(self) -> RunConfig:
        """The run section as a RunConfig; the student is the hand-picked one, or a placeholder
        (the first family of the space) when none is given."""
        raw = dict(self.run)
        if raw.get("student") is None:
            family = next(iter(self.search.space))
            raw["student"] = {"arch": family}
        try:
            return config_from_dict(raw, source="(run section)")
        except ConfigError as err:
            raise ValueError(str(err).replace("invalid config (run section):", "invalid `run:` section:")) from None

    @property
    def reference_student(self) -> ModelSpec | None:
        return self.reference_run().student if self.run.get("student") is not None else None

    def candidate_run(self, student: ModelSpec, name: str) -> RunConfig:
        """A ready-to-run config: the run section with ``student`` and ``name``."""
        return config_from_dict({**self.run, "name": name, "student": student.model_dump(exclude_defaults=True)},
                                source=f"(candidate {name})")

    @property
    def output_dir(self) -> Path:
        """Where the search writes: ``<run.output_dir>/<run.name>``."""
        run = self.reference_run()
        return Path(run.output_dir) / run.name


def search_config_from_dict(raw: dict, source: str = "") -> SearchConfig:
    try:
        return SearchConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source, SearchConfig)) from None


def load_search_config(path: str | Path, overrides: list[str] | None = None) -> SearchConfig:
    """Read a search YAML (``run:`` + ``search:``), apply ``--set`` overrides (``search.cycles=10``,
    ``run.data.train_subset=500``), validate."""
    raw = read_yaml(path, hint="a ready-made one: configs/search_fmnist.yaml")
    if "search" not in raw or "run" not in raw:
        raise ConfigError(f"{path}: a search config has two sections, `run:` (a run config without its student) "
                          "and `search:` (space, constraints, proxy, ...); see configs/search_fmnist.yaml")
    return search_config_from_dict(apply_overrides(raw, overrides), source=str(path))
