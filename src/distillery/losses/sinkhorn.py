"""SinKD: Sinkhorn-distance knowledge distillation (batch-wise), plus a log-space Sinkhorn solver.

Cui, Qin, Gao, Zhang, Xu, Wu, Li, Sun, Zhou, Li (2024), "Sinkhorn Distance Minimization for
Knowledge Distillation", LREC-COLING 2024 (arXiv:2402.17110). Official code: 2018cx/SinKD.

Batch-wise reformulation (paper Sec. 3; the official ``Sinkhorn`` loss module): instead of
comparing each teacher/student pair of distributions separately, the n positions of a batch
are treated as two empirical measures of n points each in the probability simplex R^C, one
point per sample for the student (q_i = softmax(z_s_i / T)) and one for the teacher
(p_j = softmax(z_t_j / T)), each with mass 1/n. The cost between student sample i and teacher
sample j is the L1 distance between their probability vectors, and entropic OT runs on that
n x n matrix::

    C_ij = || q_i - p_j ||_1                              (torch.cdist(q, p, p=1) in the code)
    K    = exp(-C / epsilon)                              Gibbs kernel
    P    = diag(u) K diag(v),  alternately rescaled so that P 1 = a, P^T 1 = b
    L    = <P, C> = sum_ij P_ij C_ij                      the Sinkhorn (transport) cost

Here the scalings are iterated in log space (f = log u, g = log v, ``logsumexp``), which is the
same fixed-point iteration as the official code's alternating row / column normalisation of K
but cannot underflow when C / epsilon is large (exp(-C/epsilon) < 1e-38 in float32 as soon as
C / epsilon > ~87, e.g. epsilon = 0.01 and C > 0.9).

Differences from the official code (values differ by constant factors only):

* marginals are a = b = 1/n (probability measures), so the plan sums to 1 and the result is a
  mean over positions like every other loss here. The official code normalises rows and
  columns of K to sum to 1, i.e. marginals of mass 1 per sample and a plan of total mass n:
  its ``sum(P * C)`` is n times ours.
* the official module multiplies the result by 0.001 (a loss weight) and hard-codes T = 2;
  here there is no weight (compose it in the config) and ``temperature`` defaults to 1.
  No T^2 factor is applied (this is not a KL).
* gradients are taken through the unrolled iterations (as in the official code), with the
  default 20 iterations matching the official ``n_iters=20``; epsilon = 0.1 as there.

Cost: the n x n cost matrix needs O(n^2 C) work (``torch.cdist``), so for a language model
(n = batch * sequence positions, C = vocabulary) keep n moderate.
"""

from __future__ import annotations

import torch
from torch import Tensor

from distillery.losses.logits import (
    IGNORE_INDEX,
    _check_number,
    _check_pair,
    _check_targets,
    _check_temperature,
    _log_probs,
    _upcast,
)

__all__ = ["sinkhorn_distance", "sinkhorn_kd", "sinkhorn_plan"]


def _check_sinkhorn_args(epsilon: float, iterations: int) -> None:
    _check_number("epsilon", epsilon)
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be an int >= 1, got {iterations!r}")


def sinkhorn_plan(cost: Tensor, a: Tensor, b: Tensor, *, epsilon: float, iterations: int) -> Tensor:
    """Entropic-OT transport plan P for ``cost`` (..., n, m) and marginals a (..., n), b (..., m).

    Cuturi (2013), "Sinkhorn Distances: Lightspeed Computation of Optimal Transport", NeurIPS:
    P = diag(u) K diag(v) with K = exp(-C / epsilon), found by alternately enforcing the row
    sums a and the column sums b. In log space (f = log u, g = log v, log K = -C / epsilon)::

        f <- log a - logsumexp_j(log K_ij + g_j)
        g <- log b - logsumexp_i(log K_ij + f_i)
        log P_ij = log K_ij + f_i + g_j

    starting from g = 0, ``iterations`` times. The last update is the column one, so the
    column sums equal b to rounding and the row sums converge to a as iterations grow. a and
    b must be strictly positive and sum to the same total (normally 1); they are not
    checked element-wise (that would synchronise with the GPU).
    """
    _check_sinkhorn_args(epsilon, iterations)
    if cost.dim() < 2:
        raise ValueError(f"cost must have shape (..., n, m), got {tuple(cost.shape)}")
    if a.shape != cost.shape[:-1] or b.shape != cost.shape[:-2] + cost.shape[-1:]:
        raise ValueError(
            f"marginals a {tuple(a.shape)} and b {tuple(b.shape)} must have shapes "
            f"{tuple(cost.shape[:-1])} and {tuple(cost.shape[:-2] + cost.shape[-1:])} "
            f"for cost {tuple(cost.shape)}"
        )
    cost = _upcast(cost)
    log_k = -cost / epsilon
    log_a = torch.log(_upcast(a).to(cost.dtype))
    log_b = torch.log(_upcast(b).to(cost.dtype))
    g = torch.zeros_like(log_b)
    for _ in range(iterations):
        f = log_a - torch.logsumexp(log_k + g.unsqueeze(-2), dim=-1)
        g = log_b - torch.logsumexp(log_k + f.unsqueeze(-1), dim=-2)
    return torch.exp(log_k + f.unsqueeze(-1) + g.unsqueeze(-2))


def sinkhorn_distance(cost: Tensor, a: Tensor, b: Tensor, *, epsilon: float, iterations: int) -> Tensor:
    """Sinkhorn transport cost <P, C> = sum_ij P_ij C_ij, with P from ``sinkhorn_plan``.

    Cuturi (2013), "Sinkhorn Distances: Lightspeed Computation of Optimal Transport", the
    "Sinkhorn distance" d_M^lambda (the transport cost of the entropic plan, without the
    entropy term). Returns shape (...) for cost (..., n, m): a scalar for a single problem.
    """
    plan = sinkhorn_plan(cost, a, b, epsilon=epsilon, iterations=iterations)
    return (plan * _upcast(cost)).sum(dim=(-2, -1))


def sinkhorn_kd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor | None = None,
    *,
    temperature: float = 1.0,
    epsilon: float = 0.1,
    iterations: int = 20,
) -> Tensor:
    """SinKD: batch-wise Sinkhorn distance between student and teacher distributions.

    Cui et al. (2024), "Sinkhorn Distance Minimization for Knowledge Distillation",
    LREC-COLING 2024, batch-wise reformulation (Sec. 3): all leading positions (those whose
    target is not -100) form the batch of n samples; q_i = softmax(z_s_i / T) and
    p_j = softmax(z_t_j / T); C_ij = ||q_i - p_j||_1 (n x n); the result is the transport
    cost <P, C> of the entropic plan with uniform marginals a = b = 1/n (see the module
    docstring for the log-space iteration and the constant factors that differ from the
    official code). Identical student and teacher batches give a small but non-zero value
    (entropic smoothing spreads mass off the zero-cost diagonal), decreasing to 0 as
    epsilon -> 0. With a single valid position the plan is [[1]] and the value is the L1
    distance between the two distributions. Returns 0 when every position is ignored.

    Gradients flow into both logits (through the cost and the unrolled iterations).
    """
    _check_pair(student_logits, teacher_logits)
    _check_targets(targets, student_logits, "sinkhorn", required=False)
    _check_temperature(temperature)
    _check_sinkhorn_args(epsilon, iterations)

    num_classes = student_logits.shape[-1]
    q = _log_probs(student_logits, temperature).exp().reshape(-1, num_classes)
    p = _log_probs(teacher_logits, temperature).exp().reshape(-1, num_classes)
    if targets is not None:
        valid = (targets != IGNORE_INDEX).reshape(-1)
        q, p = q[valid], p[valid]
    n = q.shape[0]
    if n == 0:
        # keep the graph so backward() works and gives zero gradients, like _mean_over_positions
        return (q.sum() + p.sum()) * 0.0
    cost = torch.cdist(q.unsqueeze(0), p.unsqueeze(0), p=1.0).squeeze(0)
    marginal = torch.full((n,), 1.0 / n, dtype=cost.dtype, device=cost.device)
    return sinkhorn_distance(cost, marginal, marginal, epsilon=epsilon, iterations=iterations)
