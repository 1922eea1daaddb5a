"""Clustering accuracy: how well unlabelled predictions match classes, up to a relabelling.

Used to evaluate novel class discovery, where the model's novel slots are clusters whose order
means nothing until they are matched to the true classes.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["cluster_accuracy"]


def cluster_accuracy(labels, predictions) -> float:
    """Accuracy under the best one-to-one mapping of predicted clusters to classes.

    The mapping maximises the number of samples whose cluster maps to their class (the
    Hungarian algorithm on the cluster x class count matrix, ``scipy.optimize.linear_sum_assignment``),
    as in the NCD literature (Han et al. 2019; Fini et al. 2021).  Cluster and class ids may
    be any non-negative integers and their counts may differ: with more clusters than classes
    the unmatched clusters count as errors.  Returns a fraction in [0, 1] (0 for no samples).
    """
    from scipy.optimize import linear_sum_assignment

    y = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).astype(np.int64).ravel()
    p = np.asarray(predictions.cpu() if isinstance(predictions, torch.Tensor) else predictions).astype(np.int64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"labels and predictions must have the same length, got {y.size} and {p.size}")
    if y.size == 0:
        return 0.0
    if y.min() < 0 or p.min() < 0:
        raise ValueError("labels and predictions must be non-negative integer ids")
    _, y = np.unique(y, return_inverse=True)  # compact ids: the matrix is only as big as what occurs
    _, p = np.unique(p, return_inverse=True)
    counts = np.zeros((p.max() + 1, y.max() + 1), dtype=np.int64)
    np.add.at(counts, (p, y), 1)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return float(counts[rows, cols].sum() / y.size)
