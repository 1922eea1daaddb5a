"""Evaluation of a model on a split: accuracy and loss, or the multi-label / regression metrics.

Shared by the training loop (validation each ``eval_every`` epochs, the final test), the teacher's
one-off test evaluation, the cache builder and ``distillery eval``.
"""
from __future__ import annotations

import torch
from torch import nn

from distillery.data import Split
from distillery.models import forward_logits


def _move(inputs, device):
    if isinstance(inputs, dict):
        return {k: v.to(device) for k, v in inputs.items()}
    return inputs.to(device)


def _rows(split: Split, index: torch.Tensor):
    part = split.take(index)
    return part.inputs, part.labels



@torch.inference_mode()
def evaluate(model: nn.Module, split: Split, device, batch_size: int = 512) -> dict[str, float]:
    """Top-1 accuracy and mean CE of ``model`` on a split (model put in eval mode, restored after).

    Multi-label splits (float multi-hot labels): ``accuracy`` is the exact-match (subset)
    accuracy, ``loss`` the mean binary cross-entropy per label, plus mAP and F1
    (:func:`distillery.report.metrics.multilabel_metrics`).

    Regression splits (standardised float targets, ``split.target_std`` set): ``accuracy`` is
    ``None`` (there are no classes), ``loss`` the mean squared error in standardised units (what
    training minimises), plus RMSE, MAE and R^2 in the data's own units
    (:func:`distillery.report.metrics.regression_metrics`)."""
    was_training = model.training
    model.eval()
    correct, loss, n = 0, 0.0, len(split)
    regression = split.target_std is not None
    multilabel = split.labels.dim() == 2 and not regression
    all_logits = []
    for start in range(0, n, batch_size):
        x, y = _rows(split, torch.arange(start, min(start + batch_size, n)))
        logits = forward_logits(model, _move(x, device)).float()
        y = y.to(device)
        if regression:
            all_logits.append(logits.cpu())
            loss += nn.functional.mse_loss(logits, y, reduction="sum").item() / y.shape[1]
            continue
        if multilabel:
            all_logits.append(logits.cpu())
            loss += nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="sum").item() / y.shape[1]
            continue
        correct += (logits.argmax(-1) == y).sum().item()
        loss += nn.functional.cross_entropy(logits, y, reduction="sum").item()
    model.train(was_training)
    if regression:
        from distillery.report.metrics import regression_metrics

        preds = torch.cat(all_logits) if all_logits else torch.zeros(0, split.labels.shape[1])
        return {"accuracy": None, "loss": loss / max(1, n),
                **regression_metrics(preds, split.labels, split.target_mean, split.target_std)}
    if multilabel:
        from distillery.report.metrics import multilabel_metrics

        m = multilabel_metrics(torch.cat(all_logits) if all_logits else torch.zeros(0, split.labels.shape[1]), split.labels)
        return {"accuracy": m["subset_accuracy"], "loss": loss / max(1, n), **m}
    return {"accuracy": correct / max(1, n), "loss": loss / max(1, n)}
