"""Typed, validated run configuration.

A config is YAML on disk, the same object in Python, and ``--set a.b=c`` on the
command line.  Validation happens once, here, and every error names the field
path and the allowed values (see :func:`load_config`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from distillery.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AugmentConfig(_Strict):
    """Tensor-level augmentation for small images, applied to training batches only."""

    pad_crop: int = Field(0, ge=0, description="Zero-pad by this many pixels, then random-crop back (0 = off).")
    flip: bool = Field(False, description="Random horizontal flip with probability 0.5.")


#: Data sources whose targets are continuous (see distillery.data.regression).
REGRESSION_DATA = ("diabetes", "fmnist_landmarks")


class SoftTargetsConfig(_Strict):
    """Soft regression targets as an Active Shape Model makes them (Cootes et al. 1995): each
    training target vector projected on the top principal components of all training targets."""

    pca_components: int = Field(..., ge=1, description="Principal components kept (fewer = smoother targets).")
    clip: float | None = Field(3.0, gt=0, description="Clip each shape parameter b_i to +-clip*sqrt(lambda_i) "
                                                      "(the ASM constraint; null: plain projection).")


class DataConfig(_Strict):
    """Where the data comes from and how it is split.

    ``name`` picks the source:

    * ``fashion_mnist`` -- IDX files from ``path``, ``$DISTILLERY_DATA``,
      ``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``)
      or downloaded when ``download: true`` and the network allows.
    * ``digits`` -- scikit-learn's 8x8 digits (always offline).
    * ``image_folder`` -- ``path/<class_name>/*.png|jpg`` (needs Pillow).
    * ``table`` -- a CSV or Parquet file at ``path``; ``label_column`` is the target,
      ``feature_columns`` (default: all others) the numeric inputs.
    * ``hf`` -- a Hugging Face ``datasets`` dataset: a Hub id or a local directory/file in
      ``path``; ``input_column`` (image or text) and ``label_column``.
    * ``diabetes`` -- regression: scikit-learn's diabetes table (442 x 10, one target; offline).
    * ``fmnist_landmarks`` -- regression: Fashion-MNIST garments placed at a seeded offset and
      scale on a larger canvas (``image_size``, default 40), targets the ink's bounding box and
      centroid (6 coordinates in [0, 1]); reads the same IDX files as ``fashion_mnist``.
    """

    name: Literal["fashion_mnist", "digits", "image_folder", "table", "hf", "diabetes", "fmnist_landmarks"] = "fashion_mnist"
    path: str | None = None
    download: bool = False
    label_column: str = "label"
    input_column: str | None = None
    feature_columns: list[str] | None = None
    image_size: int | None = Field(None, gt=0, description="Resize images to this square size (image_folder/hf).")
    tokenizer: str | None = Field(None, description="Tokenizer (local dir or Hub id) for text inputs of an `hf` dataset.")
    max_length: int = Field(128, gt=0, description="Token length for text inputs.")
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Share of the training set held out for validation.")
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="Share held out for test when the source has no test split.")
    train_subset: int | None = Field(None, gt=0, description="Use only this many (stratified) training samples.")
    classes: list[int] | None = Field(
        None, min_length=2,
        description="Keep only these class ids of the source (0..C-1), relabelled 0..k-1 in this order, e.g. the "
                    "known classes of a novel-class-discovery split. Applied after the test/validation split.")
    mosaic: int | None = Field(
        None, ge=2, le=4,
        description="Make a multi-label image task: every sample becomes a g x g mosaic of images of its split, "
                    "labelled with the classes that appear (multi-hot), e.g. 2 for 2x2 Fashion-MNIST mosaics.")
    soft_targets: SoftTargetsConfig | None = Field(
        None, description="Regression only: train on ASM-smoothed targets (projection of the training targets on "
                          "their top principal components), e.g. for the tolerant teacher of tough_tolerant; "
                          "validation and test targets stay the ground truth.")
    split_seed: int = Field(0, description="Seed of the deterministic train/val/test split.")
    batch_size: int = Field(128, gt=0)
    eval_batch_size: int = Field(512, gt=0)
    augment: AugmentConfig = AugmentConfig()
    trust_remote_code: bool = False

    @field_validator("classes")
    @classmethod
    def _distinct_class_ids(cls, v: list[int] | None) -> list[int] | None:
        # The range check needs the dataset's classes: it happens in load_data.
        if v is not None:
            if min(v) < 0:
                raise ValueError(f"class ids are >= 0, got {min(v)}")
            if len(set(v)) != len(v):
                raise ValueError(f"class ids must be distinct, got {v}")
        return v


class ModelSpec(_Strict):
    """A model to build.

    ``arch`` is a zoo name (``distillery models`` lists them), an import path
    ``pkg.module:factory`` (called as ``factory(**kwargs)``), or ``hf:<dir or hub id>`` for
    ``AutoModelFor{Image,Sequence}Classification``.  ``in_channels``, ``num_classes`` and
    ``input_size`` are filled from the data unless given in ``kwargs``.
    """

    arch: str
    kwargs: dict[str, Any] = Field(default_factory=dict)
    weights: str | None = Field(None, description="A .safetensors file (or a run directory) to initialise from.")
    trust_remote_code: bool = False


class CacheConfig(_Strict):
    """Teacher-output cache (``distillery cache build``): the teacher runs once; training
    reads its stored outputs and never constructs or runs it."""

    dir: str | None = Field(None, description="Store directory; default <output_dir>/teacher-cache/<run name>.")
    views: int = Field(1, ge=1, description="Augmentation draws stored per sample (reinforced dataset); >1 needs data.augment.")
    topk: int | None = Field(None, ge=1, description="Store only the top-k log-probabilities (+ tail mass) instead of dense logits.")
    dtype: Literal["float16", "float32"] = Field("float16", description="Stored precision of logits and features.")
    shard_size: int | None = Field(None, ge=1, description="Samples per shard file; default: as many as fit in about "
                                   "128 MiB (fewer shards = fewer reads per batch).")
    seed: int = Field(0, description="Seed of the stored augmentation draws.")
    load: Literal["mmap", "ram"] = Field("mmap", description="Read the store memory-mapped (any size) or copy it "
                                         "into RAM on first use (small stores; not part of the fingerprint).")


class TeacherSource(_Strict):
    """One trained model: a run directory (config + weights) or a model spec with weights."""

    run: str | None = None
    model: ModelSpec | None = None

    @model_validator(mode="after")
    def _one_source(self) -> "TeacherSource":
        if (self.run is None) == (self.model is None):
            raise ValueError("give exactly one of `run` (a training run directory) or `model` for each ensemble member")
        return self


class TeacherConfig(_Strict):
    """The teacher: a run directory written by ``distillery train`` (config + weights), a
    model spec whose ``weights`` point at a safetensors file, or an ``ensemble`` of those.

    ``teacher: [{run: a}, {run: b}]`` is short for ``teacher: {ensemble: [...]}``.  An ensemble
    is one teacher to every method and to the cache: its logits are ``combine``d from the
    members' (MEAL V2 averages the members' probabilities), and member ``i``'s own logits and
    layers can be tapped as ``members.i`` / ``members.i.<layer>``."""

    run: str | None = None
    model: ModelSpec | None = None
    ensemble: list[TeacherSource] | None = Field(None, min_length=1, description="Several teachers acting as one.")
    combine: Literal["mean_probs", "mean_logits"] = Field(
        "mean_probs", description="Ensemble logits: log of the members' mean softmax (mean_probs) or their mean logits.")
    cache: CacheConfig | None = Field(None, description="`true` or a mapping: distil from a teacher-output cache.")

    @property
    def sources(self) -> list[TeacherSource]:
        return list(self.ensemble) if self.ensemble else [TeacherSource(run=self.run, model=self.model)]

    @field_validator("cache", mode="before")
    @classmethod
    def _cache_bool(cls, v):
        if v is True:
            return {}
        return None if v is False else v

    @model_validator(mode="before")
    @classmethod
    def _list_is_ensemble(cls, v):
        return {"ensemble": v} if isinstance(v, list) else v

    @model_validator(mode="after")
    def _one_source(self) -> "TeacherConfig":
        if sum(x is not None for x in (self.run, self.model, self.ensemble)) != 1:
            raise ValueError("give exactly one of `teacher.run` (a training run directory), `teacher.model`, "
                             "or `teacher.ensemble` (a list of those)")
        return self


class MethodConfig(_Strict):
    name: str = "kd"
    params: dict[str, Any] = Field(default_factory=dict)


class OptimizerConfig(_Strict):
    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)


class SchedulerConfig(_Strict):
    name: Literal["constant", "cosine", "step", "linear"] = "constant"
    warmup_epochs: float = Field(0.0, ge=0)
    step_epochs: list[int] = Field(default_factory=list, description="Epochs at which `step` multiplies the LR by `gamma`.")
    gamma: float = Field(0.1, gt=0)


class TrainConfig(_Strict):
    epochs: int = Field(10, gt=0)
    optimizer: OptimizerConfig = OptimizerConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    grad_accum: int = Field(1, ge=1)
    grad_clip: float | None = Field(None, gt=0)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    checkpoint_every: int = Field(0, ge=0, description="Save a checkpoint every N optimiser steps (0: at epoch ends only).")
    eval_every: int = Field(1, ge=1, description="Validate every N epochs.")
    seed: int = 0
    cpu: bool = Field(False, description="Force CPU even when an accelerator is present.")
    progress: bool = True
    report: bool = Field(True, description="Write report.md/report.html/plots into the run directory at the end.")
    track: list[Literal["tensorboard", "mlflow"]] = Field(
        default_factory=list, description="Accelerate trackers; logs stay in the run directory unless you configure a remote.")


class RunConfig(_Strict):
    """Everything one run needs.  ``teacher`` is absent for a from-scratch run."""

    name: str = "run"
    output_dir: str = "runs"
    data: DataConfig = DataConfig()
    student: ModelSpec
    teacher: TeacherConfig | None = None
    method: MethodConfig = MethodConfig(name="ce")
    train: TrainConfig = TrainConfig()

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not v or "/" in v or v in {".", ".."}:
            raise ValueError("must be a plain directory name (no '/')")
        return v

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    @model_validator(mode="after")
    def _method_known(self) -> "RunConfig":
        from distillery import methods

        spec = methods.get_spec(self.method.name)  # raises ValueError listing the names
        spec.validate_params(self.method.params)
        if spec.live_teacher and self.teacher is not None and self.teacher.cache is not None:
            raise ValueError(f"method '{self.method.name}' runs the teacher on inputs it makes during training "
                             "(mixed, augmented or masked), which no cache holds: remove teacher.cache")
        if spec.needs_teacher and self.teacher is None:
            raise ValueError(f"method '{self.method.name}' needs a teacher: add a `teacher:` section")
        if spec.num_teachers is not None and self.teacher is not None and len(self.teacher.sources) != spec.num_teachers:
            raise ValueError(f"method '{self.method.name}' distils from exactly {spec.num_teachers} teachers but the config "
                             f"gives {len(self.teacher.sources)}; list them in order, e.g. `teacher: [{{run: A}}, {{run: B}}]` "
                             f"(the method's documentation says which is which)")
        if (self.data.name in REGRESSION_DATA and self.teacher is not None and self.teacher.ensemble is not None
                and self.teacher.combine == "mean_probs"):
            raise ValueError("teacher.combine: mean_probs averages class probabilities, which regression outputs are not; "
                             "set teacher.combine: mean_logits (the members' mean prediction)")
        return self


# ---------------------------------------------------------------------------------------------
# Loading, overrides, saving


def _parse_scalar(text: str) -> Any:
    """`--set a.b=VALUE`: VALUE is read as YAML, so `3`, `0.5`, `true`, `[1, 2]`, `null` work."""
    return yaml.safe_load(text)


def apply_overrides(raw: dict, overrides: list[str] | None) -> dict:
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE with a dotted key, got '{item}' (e.g. --set train.epochs=3)")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = raw
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {key}: '{p}' is a value, not a section")
            node = nxt
        node[parts[-1]] = _parse_scalar(value)
    return raw


def format_validation_error(err: ValidationError, source: str, root: type[BaseModel] | None = None) -> str:
    """One line per problem, with the field's dotted path (and, for an unknown key, the keys
    allowed there, looked up from ``root``, the config class; default ``RunConfig``)."""
    root = root or RunConfig
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
            parent = _model_at(root, e["loc"][:-1])
            if parent is not None:
                msg += f"; allowed keys here: {', '.join(sorted(parent.model_fields))}"
        elif e["type"] == "literal_error":
            msg = f"{msg} (got {e.get('input')!r})"
        lines.append(f"  {path}: {msg}")
    return "\n".join(lines)


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    import typing

    for key in loc:
        field = model.model_fields.get(str(key)) if isinstance(key, str) else None
        if field is None:
            return None
        ann = field.annotation
        candidates = [ann, *typing.get_args(ann)]
        nxt = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if nxt is None:
            return None
        model = nxt
    return model


def config_from_dict(raw: dict, source: str = "") -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def read_yaml(path: str | Path, overrides: list[str] | None = None,
              hint: str = "ready-made configs live in configs/, e.g. configs/kd.yaml") -> dict:
    """A config file's mapping with ``--set`` overrides applied; a clear message for a missing
    file, broken YAML or a top level that is not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} ({hint})")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level of a config must be a mapping of sections")
    return apply_overrides(raw, overrides)


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config, apply ``--set`` overrides, validate.  Errors name the field."""
    return config_from_dict(read_yaml(path, overrides), source=str(path))


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
