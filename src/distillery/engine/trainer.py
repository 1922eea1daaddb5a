"""The training loop, written once, on Hugging Face Accelerate.

It trains a teacher or baseline (method ``ce``) and distils (any other method) with the same
code.  It knows nothing about any particular method: it runs the frozen teacher and the
student with the taps the method asked for, hands their outputs to the method, sums the named
loss terms it gets back, and steps the optimiser.

Determinism and resume: the sample order of epoch ``e`` is a permutation drawn from a
generator seeded with ``(seed, e)``; augmentation of step ``k`` uses a generator seeded with
``(seed, k)``; the torch RNG is checkpointed.  A run resumed from any checkpoint therefore
reaches the same final weights as an uninterrupted one on CPU.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distillery import methods as method_registry
from distillery.config import RunConfig, dump_config
from distillery import cache
from distillery.data import DataBundle, load_data
from distillery.engine.evaluate import _rows, evaluate
from distillery.engine.checkpoint import atomic_write_text, latest_checkpoint, load_checkpoint, save_checkpoint
from distillery.engine.progress import ProgressBar
from distillery.engine.teacher import CachedTeacher, OnlineTeacher, _seeded
from distillery.errors import DistilleryError, DivergenceError, ModelError, RunDirExistsError
from distillery.methods.base import ModelOutput, Progress
from distillery.models import build_model, count_parameters, forward_logits
from distillery.taps import Taps


class Interrupted(DistilleryError):
    """Ctrl-C: a checkpoint was saved; the message says how to resume."""


@dataclass
class RunResult:
    run_dir: Path
    summary: dict[str, Any]
    student: nn.Module


# ----------------------------------------------------------------------------------------------
# Small helpers


def _check_model_fits(model: nn.Module, data: DataBundle, role: str, check_classes: bool = True) -> None:
    """Run one real batch through a model: wrong channels / sizes / class counts fail here,
    with a message that names the mismatch, instead of deep inside training."""
    x, _ = _rows(data.train, torch.arange(min(2, len(data.train))))
    try:
        with torch.inference_mode():
            was_training = model.training
            model.eval()
            logits = forward_logits(model, x)
            model.train(was_training)
    except RuntimeError as err:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else {k: tuple(v.shape) for k, v in x.items()}
        raise ModelError(
            f"the {role} cannot take this data's inputs {shape} ({str(err).splitlines()[0]}); "
            f"check the {role}'s in_channels / input_size against the data "
            f"(data has in_channels={data.in_channels}, input_size={data.input_size})"
        ) from None
    if check_classes and logits.shape[-1] != data.num_classes:
        raise ModelError(
            f"the {role} predicts {logits.shape[-1]} classes but the data has {data.num_classes} "
            f"({', '.join(data.class_names[:5])}{', ...' if data.num_classes > 5 else ''}); "
            f"use a {role} trained on the same label set, or fix data.label_column"
        )


class Ensemble(nn.Module):
    """Several frozen teachers as one: ``members.i`` are the models; the output combines their
    logits -- ``mean_probs``: log of the mean softmax (a proper distribution: MEAL V2's target,
    Shen & Savvides 2020, Sec. 3), ``mean_logits``: the mean logit vector."""

    def __init__(self, members: list[nn.Module], combine: str = "mean_probs"):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.combine = combine
        first = getattr(members[0], "default_feature_layers", None) or []
        self.default_feature_layers = [f"members.0.{name}" for name in first]

    def forward(self, x):
        logits = torch.stack([forward_logits(m, x).float() for m in self.members])
        if self.combine == "mean_logits":
            return logits.mean(0)
        return torch.logsumexp(torch.log_softmax(logits, -1), 0) - math.log(len(self.members))


def load_teacher(cfg: RunConfig, data: DataBundle, check_classes: bool = True) -> nn.Module:
    """Build the teacher from a training run directory or a model spec with safetensors weights
    (or an :class:`Ensemble` of those)."""
    tcfg = cfg.teacher
    members = [_load_source(src, data, check_classes) for src in tcfg.sources]
    if tcfg.ensemble is None:
        return members[0]
    counts = {m.head.out_features if hasattr(m, "head") else None for m in members} - {None}
    if len(counts) > 1:
        raise ModelError(f"the ensemble's teachers predict different class counts {sorted(counts)}; they must share one label set")
    teacher = Ensemble(members, tcfg.combine)
    teacher.eval().requires_grad_(False)
    return teacher


def _load_source(tcfg, data: DataBundle, check_classes: bool) -> nn.Module:
    from distillery.config import load_config

    if tcfg.run is not None:
        run = Path(tcfg.run)
        weights = run / "model.safetensors"
        if not (run / "config.yaml").is_file() or not weights.is_file():
            raise ModelError(
                f"teacher.run '{run}' is not a finished training run (expected config.yaml and model.safetensors); "
                f"train one with `distillery train CONFIG` or point teacher.model.weights at a .safetensors file"
            )
        spec = load_config(run / "config.yaml").student.model_copy(update={"weights": str(weights)})
    else:
        spec = tcfg.model
        if spec.weights is None:
            raise ModelError("teacher.model.weights is missing: a teacher must be trained (a .safetensors file or run directory)")
    num_classes = data.num_classes if check_classes else _saved_num_classes(spec, data)
    teacher = build_model(spec, in_channels=data.in_channels, num_classes=num_classes, input_size=data.input_size)
    _check_model_fits(teacher, data, "teacher", check_classes)
    teacher.eval().requires_grad_(False)
    return teacher


def _saved_num_classes(spec, data: DataBundle) -> int:
    """The class count a teacher was trained with, read from its weights' head (for methods whose
    teacher predicts another label set)."""
    from safetensors import safe_open

    try:
        with safe_open(spec.weights, "pt") as f:
            heads = [k for k in f.keys() if k.endswith("head.bias")]
            if heads:
                return int(f.get_slice(heads[0]).get_shape()[0])
    except Exception:
        pass
    return data.num_classes


def _make_optimizer(cfg, params):
    o = cfg.train.optimizer
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=o.momentum > 0)
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    return cls(params, lr=o.lr, weight_decay=o.weight_decay)


def _lr_factor(cfg, steps_per_epoch: int):
    s = cfg.train.scheduler
    total = cfg.train.epochs * steps_per_epoch
    warm = s.warmup_epochs * steps_per_epoch

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if s.name == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))
        if s.name == "linear":
            return max(0.0, 1 - (step - warm) / max(1, total - warm))
        if s.name == "step":
            return s.gamma ** sum(step >= e * steps_per_epoch for e in s.step_epochs)
        return 1.0

    return factor


class _GracefulStop:
    """First Ctrl-C asks the loop to stop after the current step (so the checkpoint is clean);
    a second one interrupts at once."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step and saving a checkpoint (Ctrl-C again to abort now) ...", flush=True)

    def __enter__(self) -> "_GracefulStop":
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class _Trainable(nn.Module):
    """Student + method in one module, so Accelerate/DDP wraps and syncs both."""

    def __init__(self, student: nn.Module, method: nn.Module):
        super().__init__()
        self.student = student
        self.method = method
        self.taps: Taps | None = None

    def forward(self, inputs, targets, teacher_out: ModelOutput | None, progress: Progress, index=None):
        logits = forward_logits(self.student, inputs)
        feats = self.taps.collect() if self.taps is not None else {}
        return self.method(ModelOutput(logits, feats, inputs, index), teacher_out, targets, progress)


def _check_trackers(track: list[str]) -> None:
    import importlib.util

    for name, module in (("tensorboard", "tensorboard"), ("mlflow", "mlflow")):
        if name in track and importlib.util.find_spec(module) is None:
            raise DistilleryError(f"train.track includes {name} but the package is not installed: pip install {module}")


def _prepare_run_dir(cfg: RunConfig, resume: bool, overwrite: bool) -> Path:
    run_dir = cfg.run_dir
    if run_dir.exists() and any(run_dir.iterdir()) and not resume:
        if not overwrite:
            raise RunDirExistsError(
                f"run directory {run_dir} already exists; pass --overwrite to replace it, --resume to continue it, "
                f"or choose another name with --set name=NEW"
            )
        if not (run_dir / "config.yaml").is_file():
            raise RunDirExistsError(f"refusing to overwrite {run_dir}: it does not look like a Distillery run (no config.yaml)")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


# ----------------------------------------------------------------------------------------------
# The loop


def fit(
    cfg: RunConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    data: DataBundle | None = None,
    student: nn.Module | None = None,
    teacher: nn.Module | None = None,
    rebuild_cache: bool = False,
) -> RunResult:
    """Train ``cfg.student`` with ``cfg.method`` (distilling from ``cfg.teacher`` if the method
    needs one).  Writes ``config.yaml``, ``metrics.jsonl``, checkpoints, ``model.safetensors``
    and ``summary.json`` into ``cfg.run_dir``."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    t_start = time.perf_counter()
    tc = cfg.train
    _check_trackers(tc.track)
    # cpu=True on a machine without a GPU: under torchrun that is what selects multi-CPU (gloo).
    accelerator = Accelerator(cpu=tc.cpu or not torch.cuda.is_available(), mixed_precision=tc.mixed_precision, gradient_accumulation_steps=tc.grad_accum,
                              log_with=tc.track or None, project_dir=str(cfg.run_dir / "tracking"))
    main = accelerator.is_main_process
    run_dir = cfg.run_dir
    if main:
        run_dir = _prepare_run_dir(cfg, resume, overwrite)
    accelerator.wait_for_everyone()
    if tc.track:
        if "mlflow" in tc.track and not os.environ.get("MLFLOW_TRACKING_URI"):
            os.environ["MLFLOW_TRACKING_URI"] = (run_dir / "tracking" / "mlruns").resolve().as_uri()  # local unless set
        accelerator.init_trackers(cfg.name, config={"method": cfg.method.name, "student": cfg.student.arch,
                                                    "epochs": tc.epochs, "lr": tc.optimizer.lr, "seed": tc.seed})
    ckpt = latest_checkpoint(run_dir) if resume else None
    if resume and ckpt is None and (run_dir / "summary.json").is_file():
        raise DistilleryError(f"{run_dir} already finished (summary.json exists); nothing to resume")
    set_seed(tc.seed)
    if main:
        atomic_write_text(run_dir / "config.yaml", dump_config(cfg))

    data = data or load_data(cfg.data)
    spec = method_registry.get_spec(cfg.method.name)
    device = accelerator.device

    # ---- the teacher: a cache when asked for (then the model is never built), else online
    store, teacher_acc, teacher_params, teacher_layers, teacher_eval = None, None, None, None, {}
    use_cache = spec.needs_teacher and cfg.teacher is not None and cfg.teacher.cache is not None and teacher is None
    if use_cache and not rebuild_cache:
        store = cache.try_open(cfg, data)  # raises, naming what changed, when stale
    if store is not None:
        m = store.manifest
        teacher_acc, teacher_params, teacher_layers = m.get("teacher_test_accuracy"), m.get("teacher_params"), m.get("teacher_layers")
    elif spec.needs_teacher or teacher is not None:
        if teacher is None:
            teacher = load_teacher(cfg, data, spec.teacher_same_classes)
        else:
            _check_model_fits(teacher, data, "teacher", spec.teacher_same_classes)
            teacher.eval().requires_grad_(False)
        teacher.to(device)
        teacher_layers = list(getattr(teacher, "default_feature_layers", []) or [])
        if spec.teacher_same_classes:  # another label set: accuracy on these labels means nothing
            teacher_eval = evaluate(teacher, data.test, device, cfg.data.eval_batch_size)
            teacher_acc = teacher_eval["accuracy"]
        teacher_params = count_parameters(teacher)

    set_seed(tc.seed)  # the student's init must not depend on whether a teacher was built
    if student is None:
        student = build_model(cfg.student, in_channels=data.in_channels, num_classes=data.num_classes, input_size=data.input_size)
    _check_model_fits(student, data, "student")
    if data.task == "multilabel" and not spec.multilabel:
        able = ", ".join(n for n, sp in method_registry.available().items() if sp.multilabel and not n.endswith("_for_test"))
        raise DistilleryError(f"method '{spec.name}' is for single-label classification but the data is multi-label "
                              f"(data.mosaic); methods with a multi-label form: {able}")
    if data.task == "regression" and not spec.regression:
        able = ", ".join(n for n, sp in method_registry.available().items() if sp.regression and not n.endswith("_for_test"))
        raise DistilleryError(f"method '{spec.name}' is for classification but {cfg.data.name} is a regression task "
                              f"(continuous targets); methods with a regression form: {able}")
    if data.task != "regression" and not spec.classification:
        raise DistilleryError(f"method '{spec.name}' is for regression (continuous targets) but {cfg.data.name} is a "
                              "classification task; use a classification method (e.g. ce, kd) or a regression source "
                              "(data.name: diabetes or fmnist_landmarks)")
    try:
        method = spec.cls(spec.validate_params(cfg.method.params), student=student, teacher_layers=teacher_layers,
                          num_classes=data.num_classes)
    except ValueError as err:
        raise DistilleryError(f"method '{spec.name}': {err}") from None
    student.to(device)

    if store is not None and not set(method.teacher_taps) <= set(store.manifest["taps"]):
        raise cache.StaleCacheError(
            f"the teacher cache at {store.path} holds features {store.manifest['taps']} but method "
            f"'{spec.name}' taps {method.teacher_taps}; rebuild it with --rebuild-cache")
    if use_cache and store is None:  # build it now, then drop the teacher
        store = cache.build(cfg, data, teacher, method.teacher_taps, accelerator=accelerator,
                            teacher_test_accuracy=teacher_acc, show_progress=tc.progress)
        teacher = None
    image_data = data.kind == "image"
    source = (CachedTeacher(store, cfg.data.augment, tc.seed, image_data) if store is not None
              else OnlineTeacher(teacher, method.teacher_taps, cfg.data.augment, tc.seed, image_data,
                                 on_batch=spec.teacher_on_batch))
    if spec.live_teacher and store is None and teacher is not None:
        object.__setattr__(method, "_teacher_fn", source.outputs)  # a plain reference: not a submodule

    world, rank = accelerator.num_processes, accelerator.process_index
    per_step = cfg.data.batch_size
    global_batch = per_step * world
    steps_per_epoch = max(1, len(data.train) // global_batch)  # drop the ragged last batch
    total_steps = tc.epochs * steps_per_epoch

    with ExitStack() as stack:
        s_taps = stack.enter_context(Taps(student, method.student_taps)) if method.student_taps else None
        object.__setattr__(method, "_student_taps", s_taps)  # for Method.student_forward(features=True)
        stack.enter_context(source)

        # Probe batch: lets the method build shape-dependent parts before the optimiser exists.
        probe_rows = torch.arange(min(per_step, len(data.train)))
        with torch.no_grad():
            px, t_probe = source.batch(data.train.take(probe_rows).inputs, probe_rows, 0, device)
            s_logits = forward_logits(student, px)
            s_probe = ModelOutput(s_logits, s_taps.collect() if s_taps else {}, px, probe_rows.to(device))
        try:
            method.setup(s_probe, t_probe)
        except ValueError as err:
            raise DistilleryError(f"method '{spec.name}': {err}") from None
        method.to(device)

        trainable = _Trainable(student, method)
        trainable.taps = s_taps
        optimizer = _make_optimizer(cfg, [p for p in trainable.parameters() if p.requires_grad])
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(cfg, steps_per_epoch))
        trainable, optimizer = accelerator.prepare(trainable, optimizer)
        raw = accelerator.unwrap_model(trainable)

        step, sums, count = 0, {}, 0
        if ckpt is not None:
            state = load_checkpoint(ckpt, raw, optimizer)
            step, sums, count = state["step"], state["sums"], state["count"]
            scheduler.load_state_dict(state["scheduler"])
            if main:
                print(f"resumed from {ckpt} (step {step}/{total_steps})")

        def checkpoint() -> None:
            accelerator.wait_for_everyone()
            if main:
                save_checkpoint(run_dir, step, raw, optimizer,
                                {"step": step, "sums": sums, "count": count, "scheduler": scheduler.state_dict()})

        bar = ProgressBar(total_steps, enabled=main and tc.progress, initial=step, title=f"{cfg.name} [{spec.name}]")
        metrics_path = run_dir / "metrics.jsonl"
        train_time, samples_seen, val_acc = 0.0, 0, float("nan")
        stop = stack.enter_context(_GracefulStop())
        try:
            with bar:
                while step < total_steps:
                    epoch, in_epoch = divmod(step, steps_per_epoch)
                    order = torch.randperm(len(data.train), generator=_seeded(tc.seed, epoch))
                    t_epoch = time.perf_counter()
                    for b in range(in_epoch, steps_per_epoch):
                        rows = order[b * global_batch:(b + 1) * global_batch][rank::world]
                        x, y = _rows(data.train, rows)
                        x, teacher_out = source.batch(x, rows, step, device)
                        y = y.to(device)
                        progress = Progress(epoch=step / steps_per_epoch, step=step, total_steps=total_steps)
                        with accelerator.accumulate(trainable):
                            with accelerator.autocast():
                                terms = trainable(x, y, teacher_out, progress, rows.to(device))
                            for name, value in terms.items():
                                if not torch.isfinite(value).all():
                                    raise DivergenceError(
                                        f"loss term '{name}' became {value.item()} at step {step} (epoch {epoch}); "
                                        f"lower train.optimizer.lr, set train.grad_clip, or check the inputs"
                                    )
                            loss = sum(terms.values())
                            accelerator.backward(loss)
                            if tc.grad_clip and accelerator.sync_gradients:
                                accelerator.clip_grad_norm_(trainable.parameters(), tc.grad_clip)
                            optimizer.step()
                            optimizer.zero_grad(set_to_none=True)
                        scheduler.step()
                        step += 1
                        count += 1
                        for name, value in {"loss": loss, **terms}.items():
                            sums[name] = sums.get(name, 0.0) + float(value.detach())
                        bar.step(loss=sums["loss"] / count, samples=global_batch)
                        if stop.requested:  # Ctrl-C: finish the step, save a clean checkpoint, stop
                            checkpoint()
                            raise Interrupted(
                                f"interrupted at step {step}/{total_steps}; checkpoint saved in {run_dir}/checkpoints. "
                                f"Resume with the same command plus --resume"
                            )
                        if tc.checkpoint_every and step % tc.checkpoint_every == 0 and step % steps_per_epoch:
                            checkpoint()
                    # ---- end of epoch
                    elapsed = time.perf_counter() - t_epoch
                    train_time += elapsed
                    samples_seen += (steps_per_epoch - in_epoch) * global_batch
                    row = {"epoch": epoch + 1, "step": step, "lr": scheduler.get_last_lr()[0],
                           "epoch_seconds": elapsed,
                           "samples_per_second": (steps_per_epoch - in_epoch) * global_batch / max(elapsed, 1e-9),
                           **{f"train_{k}": v / max(1, count) for k, v in sums.items()}}
                    if (epoch + 1) % tc.eval_every == 0 or step == total_steps:
                        val = evaluate(raw.student, data.val, device, cfg.data.eval_batch_size) if len(data.val) else {}
                        val_acc = val.get("accuracy", float("nan"))
                        row.update({"val_accuracy": val.get("accuracy"), "val_loss": val.get("loss")})
                        row.update({f"val_{k}": val[k] for k in ("rmse", "mae", "r2") if k in val})  # regression
                    row.update({f"method_{k}": float(v) for k, v in raw.method.log_values().items()})
                    if teacher_acc is not None:
                        row["teacher_test_accuracy"] = teacher_acc
                    sums, count = {}, 0
                    if main:
                        with metrics_path.open("a") as f:
                            f.write(json.dumps(row) + "\n")
                    if tc.track:
                        accelerator.log({k: v for k, v in row.items() if isinstance(v, (int, float)) and v is not None},
                                        step=epoch + 1)
                    bar.set(val_acc=val_acc)
                    checkpoint()
        except KeyboardInterrupt:  # a second Ctrl-C: the state is mid-step, so keep the last clean checkpoint
            last = latest_checkpoint(run_dir)
            raise Interrupted(
                f"interrupted mid-step at step {step}/{total_steps}; "
                + (f"the last checkpoint is {last}. Resume with the same command plus --resume" if last
                   else "no checkpoint was written yet; rerun with --overwrite")
            ) from None

    accelerator.wait_for_everyone()
    if tc.track:
        accelerator.end_training()
    if main:
        raw.method.on_train_end(run_dir)
    student = raw.student
    test = evaluate(student, data.test, device, cfg.data.eval_batch_size)
    extra = {f"test_accuracy_{name}": evaluate(model, data.test, device, cfg.data.eval_batch_size)["accuracy"]
             for name, model in raw.method.eval_models().items()}
    extra.update({f"test_{k}": v for k, v in test.items() if k not in ("accuracy", "loss")})
    if data.task != "multiclass":
        extra["task"] = data.task
    summary = {
        "name": cfg.name,
        "method": spec.name,
        "student": cfg.student.arch,
        "data": cfg.data.name,
        "seed": tc.seed,
        "epochs": tc.epochs,
        "train_samples": len(data.train),
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        "val_accuracy": val_acc,
        "params": count_parameters(student),
        "wall_seconds": time.perf_counter() - t_start,
        "train_seconds": train_time,
        "train_samples_per_second": samples_seen / max(train_time, 1e-9),
        "data_fingerprint": data.fingerprint,
        **extra,
    }
    if spec.needs_teacher:
        summary.update({"teacher_test_accuracy": teacher_acc, "teacher_params": teacher_params,
                        "teacher_source": "cache" if store is not None else "online"})
    if data.task == "regression":  # no classes: RMSE / MAE / R^2 (test_*) replace the accuracies
        for key in ("test_accuracy", "val_accuracy", "teacher_test_accuracy"):
            summary.pop(key, None)
        if "rmse" in teacher_eval:  # the teacher's test evaluation at the start (not with a cache)
            summary.update({"teacher_test_rmse": teacher_eval["rmse"], "teacher_test_r2": teacher_eval["r2"]})
    if main:
        from safetensors.torch import save_model

        tmp = run_dir / "model.safetensors.tmp"
        save_model(student, str(tmp))
        tmp.replace(run_dir / "model.safetensors")
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        if tc.report:
            from distillery.report import write_report

            try:
                summary["report"] = str(write_report(run_dir))
            except Exception as err:  # the run itself succeeded: never lose it to a reporting problem
                print(f"warning: report not written ({type(err).__name__}: {err}); retry with `distillery report {run_dir}`")
    return RunResult(run_dir, summary, student)
