"""What a report measures about a model: quality (accuracy, agreement, calibration, confusion)
and cost (parameters, MACs, bytes on disk, CPU latency and throughput).

Quality functions are pure functions of logits and labels.  Cost functions take a model (or
any callable that maps inputs to logits, e.g. an ONNX Runtime session wrapper) and real
inputs.  Latency is the median of repeated timed calls after warm-up calls, with the torch
thread count recorded next to it: a latency without its thread count cannot be compared.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distillery.data import Split
from distillery.models import forward_logits

#: Batch size of the throughput measurement (the issue's "throughput at batch 256").
THROUGHPUT_BATCH = 256


# ----------------------------------------------------------------------------------------------
# Predictions


def _as_fn(model: nn.Module | Callable) -> Callable:
    if isinstance(model, nn.Module):
        model.eval()
        return lambda x: forward_logits(model, x)
    return model


@torch.inference_mode()
def predict_logits(model: nn.Module | Callable, split: Split, batch_size: int = 512) -> torch.Tensor:
    """Float32 logits of ``model`` for every row of ``split``, in order, on the CPU."""
    fn = _as_fn(model)
    out = []
    for start in range(0, len(split), batch_size):
        part = split.take(torch.arange(start, min(start + batch_size, len(split))))
        out.append(fn(part.inputs).float().cpu())
    return torch.cat(out) if out else torch.empty(0, 0)


def take_rows(split: Split, n: int):
    """The inputs of the first ``n`` rows of ``split``, cycling through it when it has fewer
    (so a batch-256 throughput can be measured on a tiny test split with real inputs)."""
    index = torch.arange(n) % max(1, len(split))
    return split.take(index).inputs


# ----------------------------------------------------------------------------------------------
# Quality


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(-1) == labels).sum().item() / len(labels) if len(labels) else float("nan")


def top1_agreement(logits_a: torch.Tensor, logits_b: torch.Tensor) -> float:
    """Share of samples on which two models predict the same class (the student's fidelity to
    its teacher, independent of the labels; Stanton et al. 2021, 'Does Knowledge Distillation
    Really Work?')."""
    return (logits_a.argmax(-1) == logits_b.argmax(-1)).sum().item() / max(1, len(logits_a))


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """ECE of the top-1 confidence (Guo et al. 2017, 'On Calibration of Modern Neural Networks',
    eq. 3): samples are put into ``n_bins`` equal-width confidence bins ``(lo, hi]``, and the
    gaps ``|accuracy - mean confidence|`` of the bins are averaged, weighted by bin size."""
    probs = logits.float().softmax(-1)
    confidence, predicted = probs.max(-1)
    correct = (predicted == labels).float()
    # Bin b holds confidences in (b/n, (b+1)/n]; ceil(c*n)-1 maps exactly there.
    bins = (torch.ceil(confidence * n_bins).long() - 1).clamp(0, n_bins - 1)
    ece = torch.zeros(())
    for b in range(n_bins):
        mask = bins == b
        if mask.any():
            ece += mask.float().mean() * (correct[mask].mean() - confidence[mask].mean()).abs()
    return ece.item()


def average_precision(scores: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Per-label average precision (the area under the precision-recall step curve, as
    scikit-learn's ``average_precision_score``): for label j, the mean over its positive
    samples of the precision among samples scored at least as high.  ``scores``/``positives``
    are ``(N, L)``; labels without positives give NaN.  Ties are broken by sample order."""
    order = torch.sort(scores, dim=0, descending=True, stable=True).indices
    pos = positives.to(torch.float64).gather(0, order)
    hits = pos.cumsum(0)
    precision = hits / torch.arange(1, len(scores) + 1, dtype=torch.float64).unsqueeze(1)
    n_pos = pos.sum(0)
    return torch.where(n_pos > 0, (precision * pos).sum(0) / n_pos.clamp_min(1), torch.nan)


def multilabel_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """Multi-label quality from logits and multi-hot labels (N, L): mAP over labels with a
    positive, per-label and macro/micro F1 at probability 0.5, exact-match (subset) accuracy."""
    labels = labels > 0.5
    pred = logits > 0
    tp = (pred & labels).sum(0).double()
    fp = (pred & ~labels).sum(0).double()
    fn = (~pred & labels).sum(0).double()
    f1 = torch.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn).clamp_min(1), torch.ones_like(tp))
    ap = average_precision(logits.float(), labels)
    return {
        "map": float(ap[~ap.isnan()].mean()) if (~ap.isnan()).any() else float("nan"),
        "f1_macro": float(f1.mean()),
        "f1_micro": float(2 * tp.sum() / (2 * tp.sum() + fp.sum() + fn.sum()).clamp_min(1)),
        "f1_per_label": [round(float(v), 4) for v in f1],
        "subset_accuracy": float((pred == labels).all(1).double().mean()),
    }


def regression_metrics(pred: torch.Tensor, target: torch.Tensor, mean: torch.Tensor | None = None,
                       std: torch.Tensor | None = None) -> dict[str, Any]:
    """RMSE, MAE and R^2 of predictions ``(N, K)`` against targets ``(N, K)``, in the data's own
    units: when the targets were standardised, ``mean``/``std`` (per output) map both back first.
    Multi-output values are averaged over outputs with equal weight, as scikit-learn's
    ``root_mean_squared_error`` / ``mean_absolute_error`` / ``r2_score`` do by default; the
    per-output RMSE and R^2 are returned too.  R^2 of a constant target is NaN (undefined)."""
    p, y = pred.to(torch.float64), target.to(torch.float64)
    if p.dim() == 1:
        p, y = p.unsqueeze(1), y.unsqueeze(1)
    if std is not None:
        p = p * std.to(torch.float64) + (0 if mean is None else mean.to(torch.float64))
        y = y * std.to(torch.float64) + (0 if mean is None else mean.to(torch.float64))
    err = p - y
    rmse = err.pow(2).mean(0).sqrt()
    total = (y - y.mean(0)).pow(2).sum(0)
    r2 = torch.where(total > 0, 1 - err.pow(2).sum(0) / total.clamp_min(1e-300), torch.nan)
    return {
        "rmse": float(rmse.mean()),
        "mae": float(err.abs().mean()),
        "r2": float(r2.mean()),
        "rmse_per_output": [float(v) for v in rmse],
        "r2_per_output": [float(v) for v in r2],
    }


def confusion_matrix(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts ``cm[true, predicted]`` as an int64 ``(C, C)`` tensor."""
    predicted = logits.argmax(-1)
    return torch.bincount(labels * num_classes + predicted, minlength=num_classes * num_classes).view(num_classes, num_classes)


def per_class_accuracy(cm: torch.Tensor) -> torch.Tensor:
    """Recall of each class from a confusion matrix (NaN for a class absent from the labels)."""
    totals = cm.sum(1).double()
    return torch.where(totals > 0, cm.diag().double() / totals.clamp(min=1), torch.full_like(totals, float("nan")))


# ----------------------------------------------------------------------------------------------
# Cost


def count_macs(model: nn.Module, inputs: Any) -> int:
    """Multiply-accumulates of one forward pass on ``inputs``, counted with
    ``torch.utils.flop_counter.FlopCounterMode`` (MACs = FLOPs / 2).

    FlopCounterMode counts the matrix products (linear, convolution, batched matmul,
    attention); element-wise work (activations, normalisation, pooling) is not counted, as in
    the MAC figures papers usually quote.
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        forward_logits(model.eval(), inputs)
    return int(counter.get_total_flops()) // 2


def file_size(path: str | Path | None) -> int | None:
    """Bytes of a file (``None`` when there is no file to measure)."""
    if path is None:
        return None
    p = Path(path)
    if p.is_dir():
        p = p / "model.safetensors"
    return p.stat().st_size if p.is_file() else None


def _timed_calls(fn: Callable, inputs: Any, *, warmup: int, repeats: int, budget_s: float, at_least: int) -> list[float]:
    """Durations of up to ``repeats`` calls after ``warmup`` untimed ones; stops early once the
    timed calls took ``budget_s`` seconds and at least ``at_least`` were made (a large teacher
    at batch 256 can take seconds per call: a report must not take minutes)."""
    with torch.inference_mode():
        for _ in range(warmup):  # first calls pay for allocation, kernel selection, caches
            fn(inputs)
        times: list[float] = []
        while len(times) < repeats and (len(times) < at_least or sum(times) < budget_s):
            t0 = time.perf_counter()
            fn(inputs)
            times.append(time.perf_counter() - t0)
    return times


class _Threads:
    """Temporarily run torch with ``n`` intra-op threads (``None``: leave as it is)."""

    def __init__(self, n: int | None):
        self.n, self.before = n, torch.get_num_threads()

    def __enter__(self) -> int:
        if self.n:
            torch.set_num_threads(self.n)
        return torch.get_num_threads()

    def __exit__(self, *exc) -> None:
        torch.set_num_threads(self.before)


#: Default thread count of the timing.  One thread: on a shared or busy machine, multi-threaded
#: timings measure the scheduler more than the model (on a loaded 2-core box we saw a 1 M-MAC
#: CNN take 0.4 ms on one thread and 140 ms on two), and one-thread numbers compare across
#: machines with different core counts.  Pass ``threads=None`` for torch's current count.
DEFAULT_THREADS = 1


def measure_latency(
    model: nn.Module | Callable,
    split: Split,
    *,
    warmup: int = 5,
    repeats: int = 30,
    throughput_repeats: int = 5,
    threads: int | None = DEFAULT_THREADS,
    budget_s: float = 2.0,
) -> dict[str, Any]:
    """CPU latency at batch 1 and throughput at batch 256, on real rows of ``split``.

    Latency is the median (and 90th percentile) of up to ``repeats`` timed single-sample calls
    (at least 5) after ``warmup`` untimed ones; throughput is 256 divided by the median time of
    up to ``throughput_repeats`` batch-256 calls (at least 1) after one warm-up call.  Each
    series stops early once its timed calls took ``budget_s`` seconds; the counts actually made
    are recorded.  ``threads`` sets torch's intra-op thread count for the measurement (see
    :data:`DEFAULT_THREADS`; ``None``: the current count); it is recorded too.
    """
    fn = _as_fn(model)
    one, batch = take_rows(split, 1), take_rows(split, THROUGHPUT_BATCH)
    with _Threads(threads) as n_threads:
        single = _timed_calls(fn, one, warmup=warmup, repeats=repeats, budget_s=budget_s, at_least=min(5, repeats))
        big = _timed_calls(fn, batch, warmup=1, repeats=throughput_repeats, budget_s=budget_s, at_least=1)
    single_sorted = sorted(single)
    return {
        "batch1_median_ms": 1000 * statistics.median(single),
        "batch1_p90_ms": 1000 * single_sorted[min(len(single) - 1, int(0.9 * len(single)))],
        "throughput_samples_per_second": THROUGHPUT_BATCH / statistics.median(big),
        "threads": n_threads,
        "warmup": warmup,
        "repeats": len(single),
        "throughput_batch": THROUGHPUT_BATCH,
        "throughput_repeats": len(big),
        "machine": machine_description(),
        "torch": torch.__version__,
    }


def machine_description() -> str:
    """CPU model and core count, for stating where timings were taken."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical cores, {platform.system()}"
