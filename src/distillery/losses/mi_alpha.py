"""MI-alpha: the interpolated variational lower bound on mutual information, as a distillation loss.

He, Shi, Mueller, Zha, Li, Karypis (2021), "Distiller: A Systematic Study of Model Distillation
Methods in Natural Language Processing" (arXiv 2109.11105), propose MI-alpha: maximise a lower
bound on the mutual information between a teacher's and a student's intermediate
representations, the bound being the interpolated bound I_alpha of Poole, Ozair, van den Oord,
Alemi, Tucker (2019), "On Variational Bounds of Mutual Information", ICML, Sec. 2.5, eq. (11)-(12):

    I_alpha = 1 + E_p(x,y)[ log( e^f(x,y) / (alpha m(y; x_1:K) + (1 - alpha) a(y)) ) ]
                - E_p(x)p(y)[ e^f(x,y) / (alpha m(y; x_1:K) + (1 - alpha) a(y)) ]

with f a learned critic, m(y; x_1:K) = (1/K) sum_k e^f(x_k, y) the InfoNCE ("multi-sample")
baseline and a(y) a single-sample baseline (learned, or the constant e).  alpha = 0 gives the
TUBA bound (the NWJ bound when log a = 1); alpha = 1 gives InfoNCE.

Batch form, as in Poole et al.'s reference code (``vbmi_demo.ipynb``, ``interpolated_lower_bound``)
which Distiller's ``textbrewer/losses.py`` ports to PyTorch: ``scores[i, j] = f(x_j, y_i)`` for a
batch of B pairs, the positives on the diagonal.  Every baseline m is a leave-one-out mean over
K = B - 1 columns: for the joint term of pair i, B - 1 baselines each leave out one negative
x_j (j != i) and are averaged; for the marginal term of row i (negatives x_j, j != i) the baseline
leaves out the positive x_i, so that no baseline contains the sample it is compared with when
that sample is dependent.  Consequently at alpha = 1

    I_1 = mean_{i, j != i} [ log(B - 1) - CE(row i of scores without column j, target i) ],

InfoNCE over K = B - 1 candidates averaged over which negative is dropped, and the marginal term
is exactly 1.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def _check_scores(scores: Tensor) -> None:
    if scores.dim() != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"critic scores must be a square (B, B) matrix with the positive pairs on the diagonal, "
                         f"got shape {tuple(scores.shape)}; score every student row against every teacher row")
    if scores.shape[0] < 2:
        raise ValueError(f"the bound needs at least 2 pairs in the batch (negatives come from the other rows), "
                         f"got {scores.shape[0]}")


def log_loo_mean_exp(scores: Tensor) -> Tensor:
    """``out[i, j] = log( (1 / (B-1)) sum_{k != j} exp(scores[i, k]) )``: the log leave-one-out
    mean of each row, leaving out column j.

    Exact and stable in O(B^2): for a column that is not its row's maximum, subtracting its share
    from the row's log-sum-exp is ``lse + log1p(-exp(s - lse))`` with ``exp(s - lse) <= 1/2``, so
    no cancellation; the row's maximum is left out by a log-sum-exp over the rest.  (The
    reference's ``softplus_inverse(lse - s)`` loses all precision when one column dominates the
    row -- a confident critic's positive.)"""
    _check_scores(scores)
    b = scores.shape[0]
    top = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, scores.argmax(dim=1, keepdim=True), True)
    rest = scores.masked_fill(top, float("-inf"))
    lse = torch.logsumexp(scores, dim=1, keepdim=True)
    without_other = lse + torch.log1p(-torch.exp(rest - lse))  # rest = -inf at the top: harmless, replaced below
    without_top = torch.logsumexp(rest, dim=1, keepdim=True).expand_as(scores)
    return torch.where(top, without_top, without_other) - math.log(b - 1)


def interpolated_mi_bound(scores: Tensor, *, alpha: float, log_baseline: Tensor | float = 1.0) -> Tensor:
    """I_alpha of Poole et al. (2019), eq. (11)-(12), estimated on one batch (see the module
    docstring for the batch form); a scalar, in nats.  Maximise it (a loss is its negative).

    ``scores``: (B, B) critic values, ``scores[i, j] = f(x_j, y_i)``, positives on the diagonal.
    ``alpha`` in [0, 1]: 1 = InfoNCE (low variance, at most log(B-1)), 0 = TUBA/NWJ (unbiased,
    high variance).  ``log_baseline``: log a(y_i), a (B,) tensor or a constant; 1.0 (Distiller's
    default, ``torch.ones``) makes alpha = 0 the NWJ bound E_p[f] - E_q[e^(f-1)].
    """
    _check_scores(scores)
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1] (1 = InfoNCE, 0 = NWJ/TUBA), got {alpha}")
    b = scores.shape[0]
    log_a = torch.as_tensor(log_baseline, dtype=scores.dtype, device=scores.device)
    if log_a.dim() > 1 or (log_a.dim() == 1 and log_a.shape[0] != b):
        raise ValueError(f"log_baseline must be a scalar or one value per row (shape ({b},)), got {tuple(log_a.shape)}")
    log_a = log_a.expand(b)[:, None].expand(b, b)
    # log(alpha m + (1 - alpha) a), in log space; the end points skip the log of 0.
    if alpha == 1:
        baseline = log_loo_mean_exp(scores)
    elif alpha == 0:
        baseline = log_a
    else:
        baseline = torch.logaddexp(math.log(alpha) + log_loo_mean_exp(scores), math.log1p(-alpha) + log_a)
    off = ~torch.eye(b, dtype=torch.bool, device=scores.device)
    # Joint term: positive pair i against the baselines that each leave one negative j out.
    joint = (scores.diagonal()[:, None] - baseline)[off].mean()
    # Marginal term: negatives (x_j, y_i), j != i, against the baseline without the positive x_i.
    marginal = torch.exp(torch.logsumexp((scores - baseline.diagonal()[:, None])[off], dim=0) - math.log(b * (b - 1)))
    return 1.0 + joint - marginal
