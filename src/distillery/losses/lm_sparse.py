"""Distillation from a *sparse* summary of a causal-LM teacher: top-k (+ tail) and sampled tokens.

A teacher over a 32k-150k vocabulary yields logits far too large to store for every token of a
corpus. Running it once and keeping a few entries per position lets the student distil later
without the teacher. Two summaries, each with its loss:

* ``sparsify_topk`` / ``topk_kl``: the k largest teacher log-probabilities and their ids, the
  scheme of DistillKit (arcee-ai) and of most open tooling; optionally with the remaining
  probability mass as one extra "tail" bucket.
* ``sparsify_sample`` / ``sampled_kl``: k tokens *drawn* from the teacher, stored as unique ids
  with importance weights -- Random Sampling KD of Anshumann et al. (2025), an unbiased
  estimate of the dense KD loss's gradient, where top-k is biased.

Conventions (those of ``distillery.losses.logits``): vocabulary dim last, any leading dims such
as (batch, seq); fp16/bf16 student logits are upcast to float32 (float64 stays float64, so
``gradcheck`` is meaningful); the result is the mean over positions whose label is not -100
(``labels`` aligned with the logits: position t is scored against ``labels[..., t]``; ``None``
scores every position); the sparse ids / values have shape ``(..., k)`` with the logits' leading
dims. Both losses apply a temperature T to the *student* logits and multiply by T^2 (Hinton et
al., 2015). The teacher's side is whatever was stored: build the cache at the temperature you
distil at, since stored log-probabilities cannot be re-tempered (the missing entries are gone).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from distillery.losses.logits import (
    _MASKED_LOGIT,
    _check_targets,
    _check_temperature,
    _mean_over_positions,
    _upcast,
)

__all__ = ["sampled_kl", "sparsify_sample", "sparsify_topk", "topk_buckets", "topk_kl"]

# exp() of anything below this underflows to exactly 0 in float16/32/64. Clamping stored
# log-probabilities here turns a -inf (a teacher token that had logit -inf, or fp16 overflow)
# into a probability of exactly 0 without ever forming 0 * inf = NaN, value and gradient alike.
_LOG_ZERO = -1e4


# --------------------------------------------------------------------------- input checks


def _check_k(k: object, vocab: int | None) -> int:
    """k in [1, vocab] for top-k; any k >= 1 for sampling (draws are with replacement)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if vocab is not None and k > vocab:
        raise ValueError(f"k must be at most the vocabulary size {vocab}, got {k}")
    return k


def _check_sparse(student_logits: Tensor, ids: Tensor, values: Tensor, names: tuple[str, str]) -> None:
    if student_logits.dim() < 1:
        raise ValueError("student logits must have a vocabulary dimension (shape (..., V)); got a scalar")
    ids_name, values_name = names
    lead = tuple(student_logits.shape[:-1])
    if ids.dim() != student_logits.dim() or tuple(ids.shape[:-1]) != lead:
        raise ValueError(
            f"{ids_name} {tuple(ids.shape)} must have shape (..., k) with the logits' leading shape "
            f"{lead} (logits are {tuple(student_logits.shape)})"
        )
    if values.shape != ids.shape:
        raise ValueError(f"{values_name} {tuple(values.shape)} must have the shape of {ids_name} {tuple(ids.shape)}")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"{ids_name} must be integer token ids, got dtype {ids.dtype}")
    if not values.dtype.is_floating_point:
        raise ValueError(f"{values_name} must be floating point, got dtype {values.dtype}")
    vocab = student_logits.shape[-1]
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(
            f"{ids_name} must lie in [0, {vocab}) (the student's vocabulary); found "
            f"[{int(ids.min())}, {int(ids.max())}] -- was the cache built with another tokenizer?"
        )


def _student_log_probs(student_logits: Tensor, temperature: float) -> Tensor:
    return F.log_softmax(_upcast(student_logits) / temperature, dim=-1)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -log 2 (Maechler 2012).

    Each branch sees an input clamped to its own domain, so the branch ``where`` discards never
    produces an inf or NaN whose (zero-weighted) gradient would still poison the backward pass.
    """
    near = x.clamp(min=-math.log(2.0))
    far = x.clamp(max=-math.log(2.0))
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(near)), torch.log1p(-torch.exp(far)))


# --------------------------------------------------------------------------- top-k (+ tail)


def sparsify_topk(teacher_logits: Tensor, k: int, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """The teacher's k most likely tokens per position: ``(ids int64 (..., k), logprobs (..., k))``.

    Log-probabilities are those of the full softmax at ``temperature`` (not renormalised over
    the k), in float32 (float64 for float64 logits), largest first.
    """
    _check_temperature(temperature)
    _check_k(k, teacher_logits.shape[-1])
    log_p = F.log_softmax(_upcast(teacher_logits) / temperature, dim=-1)
    logprobs, ids = log_p.topk(k, dim=-1)
    return ids, logprobs


def topk_kl(
    student_logits: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    labels: Tensor | None = None,
    *,
    tail: bool = True,
    temperature: float = 1.0,
) -> Tensor:
    """Forward KL from a top-k teacher (DistillKit's sparse KD), with an optional tail bucket; * T^2.

    Per position, with p_i = exp(topk_logprobs_i) the stored teacher probabilities of the k ids K
    and q = softmax(student_logits / T) over the *full* vocabulary:

        L = sum_{i in K} p_i (log p_i - log q_i)                               (head)
          + p_tail (log p_tail - log q_tail)          if tail                  (tail bucket)

    with p_tail = 1 - sum_K p_i and q_tail = 1 - sum_K q_i. With the tail, L is exactly the KL
    between the two distributions coarsened to k + 1 buckets (the k ids and "everything else"),
    hence >= 0, and it pushes the student's mass outside K towards the teacher's tail mass.
    Without it, L is the plain truncated sum DistillKit uses; it can be negative, and the
    student's logits outside K only receive the softmax-normalisation gradient. Anshumann et al.
    (2025, "Sparse Logit Sampling", Eq. 2) show this truncated top-k gradient is biased.

    log q_tail is computed by masking K out of the student's logits and taking a logsumexp of
    the rest (exact even when q_tail underflows 1 - sum q); log p_tail as log1mexp(logsumexp of
    the stored log-probs). When k equals the vocabulary size the tail is empty and its term is
    exactly 0, so it is left out (the stored probabilities, rounded to fp16, may not sum to 1).

    The stored log-probs are taken as they are (the cache's temperature); ``temperature`` is
    applied to the student only. Gradients flow into the student logits and the log-probs.
    """
    _check_sparse(student_logits, topk_ids, topk_logprobs, ("topk_ids", "topk_logprobs"))
    _check_targets(labels, student_logits, "topk_kl", required=False)
    _check_temperature(temperature)
    scaled = _upcast(student_logits) / temperature
    log_q_all = F.log_softmax(scaled, dim=-1)
    ids = topk_ids.long()
    log_q = log_q_all.gather(-1, ids)
    log_p = topk_logprobs.to(log_q.dtype).clamp(min=_LOG_ZERO)
    per_position = (log_p.exp() * (log_p - log_q)).sum(dim=-1)
    vocab, k = student_logits.shape[-1], topk_ids.shape[-1]
    if tail and k < vocab:
        # Teacher tail: the stored (fp16-rounded) probabilities may sum to slightly more than 1;
        # a tail that rounds to <= 0 is taken as empty (log clamped just below 0 -> p_tail ~ 1e-38).
        log_p_head = torch.logsumexp(log_p, dim=-1).clamp(max=-torch.finfo(log_p.dtype).tiny)
        log_p_tail = _log1mexp(log_p_head)
        # Student tail: logsumexp of the logits outside K. The masked value is finite (see
        # losses.logits._MASKED_LOGIT), so no inf - inf appears even if K repeats an id.
        masked = scaled.scatter(-1, ids, _MASKED_LOGIT)
        log_q_tail = torch.logsumexp(masked, dim=-1) - torch.logsumexp(scaled, dim=-1)
        per_position = per_position + log_p_tail.exp() * (log_p_tail - log_q_tail)
    return _mean_over_positions(per_position * temperature**2, labels)


# --------------------------------------------------------------------------- sampled (RS-KD)


def sparsify_sample(
    teacher_logits: Tensor,
    k: int,
    generator: torch.Generator | None = None,
    temperature: float = 1.0,
    *,
    proposal_temperature: float = 1.0,
    return_logprobs: bool = False,
) -> tuple[Tensor, ...]:
    """Random Sampling KD's sparse teacher: ``(ids (..., k), weights (..., k)[, logprobs (..., k)])``.

    Anshumann et al. (2025), "Sparse Logit Sampling: Accelerating Knowledge Distillation in
    LLMs" (ACL 2025), Sec. 3, Random Sampling KD. Per position, with p = softmax(z / T):

    1. draw k token ids i.i.d. (with replacement) from a proposal r; here
       r = softmax(z / (T * proposal_temperature)), i.e. r proportional to p^(1/tau);
    2. keep the unique ids, with n_i = how often id i was drawn;
    3. importance weights w_i = n_i p_i / r_i, normalised to sum to 1 (self-normalised
       importance sampling). For tau = 1 (r = p, the default) w_i = n_i / k exactly, and
       E[w_i] = p_i: the sparse distribution is an unbiased estimate of p. For tau != 1 it is
       consistent (unbiased as k grows) but, being self-normalised, slightly biased at finite k.

    Unique ids come first in increasing order; the remaining (k - #unique) slots are padding
    with id 0 and weight 0 (and logprob 0). ``generator`` makes the draw reproducible.
    ``return_logprobs`` adds the teacher's log p at each id (for the value of the KL; the
    gradient needs only the weights). Weights / log-probs are float32 (float64 for float64 input).

    Numbered equations of the paper could not be checked here (only its abstract and secondary
    descriptions of the method were available offline); the estimator above is written out in
    full so it can be compared with the paper directly.
    """
    _check_temperature(temperature)
    _check_temperature(proposal_temperature)
    vocab = teacher_logits.shape[-1]
    _check_k(k, None)
    log_p = F.log_softmax(_upcast(teacher_logits) / temperature, dim=-1).reshape(-1, vocab)
    log_r = log_p if proposal_temperature == 1.0 else F.log_softmax(
        _upcast(teacher_logits).reshape(-1, vocab) / (temperature * proposal_temperature), dim=-1
    )
    draws = torch.multinomial(log_r.exp(), k, replacement=True, generator=generator)  # (N, k)
    # Unique ids per row without a Python loop: sort, mark where a new id starts, and give each
    # run of equal ids the slot index = (number of run starts so far) - 1.
    draws, _ = draws.sort(dim=-1)
    starts = torch.ones_like(draws, dtype=torch.bool)
    starts[:, 1:] = draws[:, 1:] != draws[:, :-1]
    slot = starts.long().cumsum(dim=-1) - 1
    counts = torch.zeros(draws.shape, dtype=log_p.dtype, device=draws.device).scatter_add_(
        1, slot, torch.ones_like(draws, dtype=log_p.dtype)
    )
    ids = torch.zeros_like(draws).scatter_(1, slot, draws)  # a run writes one id to its slot
    present = counts > 0
    lp_ids = log_p.gather(-1, ids)
    if proposal_temperature == 1.0:
        weights = counts / k  # exact: no p/r ratio that is 1 only up to rounding
    else:
        log_w = counts.log() + lp_ids - log_r.gather(-1, ids)
        weights = torch.softmax(log_w.masked_fill(~present, -math.inf), dim=-1)
    shape = (*teacher_logits.shape[:-1], k)
    out = (ids.reshape(shape), weights.reshape(shape))
    if return_logprobs:
        out = (*out, torch.where(present, lp_ids, torch.zeros_like(lp_ids)).reshape(shape))
    return out


def sampled_kl(
    student_logits: Tensor,
    sample_ids: Tensor,
    sample_weights: Tensor,
    labels: Tensor | None = None,
    *,
    teacher_logprobs: Tensor | None = None,
    temperature: float = 1.0,
) -> Tensor:
    """Random Sampling KD loss (Anshumann et al., 2025, Sec. 3): sparse-teacher cross-entropy; * T^2.

    Per position, with the sampled ids S, their weights w (from ``sparsify_sample``: an estimate
    of the teacher distribution p restricted to S) and q = softmax(student_logits / T) over the
    full vocabulary:

        L = - sum_{j in S} w_j log q_j                       (teacher_logprobs=None)
        L = sum_{j in S} w_j (log p_j - log q_j)             (teacher_logprobs = log p at S)

    The second is an unbiased estimate of KL(p || q) when E[w_j] = p_j (proposal = teacher);
    the first differs from it by the teacher's entropy estimate, a constant for the student, so
    both have the same gradient, (sum_j w_j) q - w w.r.t. z / T, whose expectation q - p is
    the dense KD gradient: the paper's "gradient preserved in expectation". A cache of ids and
    weights alone therefore trains exactly like one with log-probs; only the reported value
    differs. Padding slots carry weight 0 (any id) and contribute nothing.
    """
    _check_sparse(student_logits, sample_ids, sample_weights, ("sample_ids", "sample_weights"))
    _check_targets(labels, student_logits, "sampled_kl", required=False)
    _check_temperature(temperature)
    if teacher_logprobs is not None and teacher_logprobs.shape != sample_ids.shape:
        raise ValueError(
            f"teacher_logprobs {tuple(teacher_logprobs.shape)} must have the shape of sample_ids "
            f"{tuple(sample_ids.shape)} (log p of the teacher at each sampled id)"
        )
    log_q = _student_log_probs(student_logits, temperature).gather(-1, sample_ids.long())
    weights = sample_weights.to(log_q.dtype)
    per_position = -(weights * log_q).sum(dim=-1)
    if teacher_logprobs is not None:
        per_position = per_position + (weights * teacher_logprobs.to(log_q.dtype).clamp(min=_LOG_ZERO)).sum(dim=-1)
    return _mean_over_positions(per_position * temperature**2, labels)


# --------------------------------------------------------------------------- any loss from top-k


def topk_buckets(
    student_logits: Tensor, topk_ids: Tensor, topk_logprobs: Tensor, *, temperature: float = 1.0,
    min_tail: float = 1e-8,
) -> tuple[Tensor, Tensor]:
    """Student and teacher as distributions over k + 1 buckets: the teacher's k stored tokens and
    one "everything else" bucket, as (..., k + 1) log-probabilities (student, teacher).

    A cache of the teacher's top-k log-probabilities (DistillKit's scheme) cannot give a full
    distribution, but it gives this coarsening exactly; the student is coarsened the same way
    (its probabilities of the k tokens, and the rest of its mass), so *any* divergence between
    distributions -- KL either way, JSD, skew KL, TV, TAID -- can be taken between the two
    (k+1)-bucket distributions. Forward KL over the buckets is the top-k + tail-mass loss; with
    k = V the buckets are the vocabulary and every loss equals its dense value. The data
    processing inequality makes each f-divergence over buckets <= its dense value.

    The stored teacher log-probs were computed at the cache's temperature; ``temperature``
    applies to the student and must match it. The teacher's tail mass is clamped to
    ``min_tail`` (float16 storage can round the top-k mass to 1 or above).
    """
    _check_temperature(temperature)
    if topk_ids.shape != topk_logprobs.shape or topk_ids.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(f"top-k ids {tuple(topk_ids.shape)} and log-probs {tuple(topk_logprobs.shape)} must be "
                         f"(..., k) with the student's leading shape {tuple(student_logits.shape[:-1])}")
    s_all = _student_log_probs(student_logits, temperature)
    s_top = s_all.gather(-1, topk_ids.long())
    # clamp below 0: a head mass that rounds to 1 would give log(0)
    s_tail = _log1mexp(torch.logsumexp(s_top, dim=-1, keepdim=True).clamp(max=-1e-12))
    t_top = topk_logprobs.to(s_all.dtype)
    t_tail = _log1mexp(torch.logsumexp(t_top, dim=-1, keepdim=True).clamp(max=-1e-12)).clamp(min=math.log(min_tail))
    # renormalise the teacher after the clamp so that its buckets sum to one
    teacher = torch.cat([t_top, t_tail], -1)
    return torch.cat([s_top, s_tail], -1), teacher - torch.logsumexp(teacher, -1, keepdim=True)
