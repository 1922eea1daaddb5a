"""Token-level losses for causal language models, and their memory-lean chunked computation.

Same conventions as ``distillery.losses.logits`` (vocabulary dim last, any leading dims such as
(batch, seq), fp16/bf16 upcast to float32, mean over positions, ``targets == -100`` left out,
gradients into both logits). ``targets`` are the labels already aligned with the logits: the
logit at position t is scored against ``targets[..., t]`` (a causal LM's labels shifted by one,
prompt and padding positions set to -100).

* ``skew_kl`` / ``skew_reverse_kl``: the alpha-skew divergences of DistiLLM.
* ``uld``: the Universal Logit Distillation loss, for teachers with another tokenizer.
* ``chunked_token_loss``: any same-vocabulary token loss over the valid positions in chunks,
  optionally fused with the student's LM head, so that neither the loss's intermediates nor
  (when fused) the student's logits ever exist for the whole batch at once.
"""

from __future__ import annotations

import inspect
import math
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distillery.losses.logits import (
    IGNORE_INDEX,
    _check_number,
    _check_pair,
    _check_targets,
    _check_temperature,
    _kl,
    _log_probs,
    _mean_over_positions,
    bdkd,
    cross_entropy,
    forward_kl,
    jsd,
    kd,
    reverse_kl,
    total_variation,
)
from distillery.losses.taid import taid_loss

__all__ = ["TOKEN_LOSSES", "chunked_token_loss", "skew_kl", "skew_reverse_kl", "uld"]


# --------------------------------------------------------------------------- skew KL (DistiLLM)


def _check_alpha(alpha: float) -> None:
    _check_number("alpha", alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")


def _skewed_kl(log_a: Tensor, log_b: Tensor, alpha: float) -> Tensor:
    """Per-position KL(A || alpha A + (1 - alpha) B), with the exact endpoints.

    log of the mixture = logaddexp(log A + log alpha, log B + log(1 - alpha)): no probability is
    formed, so nothing underflows to log(0) (the official DistiLLM code takes log of the mixed
    probabilities). alpha = 0 is KL(A || B); alpha = 1 mixes in nothing of B and is exactly 0.
    """
    if alpha == 0.0:
        return _kl(log_a, log_b)
    if alpha == 1.0:
        return _kl(log_a, log_a)  # exactly 0 (and a zero gradient), B plays no part
    log_mixture = torch.logaddexp(log_a + math.log(alpha), log_b + math.log1p(-alpha))
    return _kl(log_a, log_mixture)


def skew_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor | None = None,
    *,
    alpha: float = 0.1,
    temperature: float = 1.0,
) -> Tensor:
    """alpha-skew KL of DistiLLM: T^2 * KL(p || alpha p + (1 - alpha) q).

    Ko, Kim, Chen, Yun (2024), "DistiLLM: Towards Streamlined Distillation for Large Language
    Models", ICML 2024, Sec. 3.1 (S-KL): p = softmax(teacher / T) is the teacher, q =
    softmax(student / T) the student. Mixing a little of p into the student distribution keeps
    the divergence bounded by log(1/alpha) (the mixture is >= alpha p) where q is ~0 and p is
    not; the paper argues this gives more stable gradients than plain KL. alpha = 0.1 is the
    paper's default.

    Limits, returned exactly at the endpoints: alpha = 0 is ``forward_kl`` (same T), alpha = 1
    is 0. The T^2 factor mirrors ``kd`` / ``jsd`` (the paper uses T = 1, where it is 1).

    Difference from the official code (jongwooko/distillm, ``skewed_forward_kl``): that returns
    the cross-entropy -sum p log(mixture), i.e. this KL plus the teacher entropy H(p); the
    student's gradient is the same, the value and the teacher's gradient differ.
    """
    _check_pair(student_logits, teacher_logits)
    _check_targets(targets, student_logits, "skew_kl", required=False)
    _check_temperature(temperature)
    _check_alpha(alpha)
    log_p_teacher = _log_probs(teacher_logits, temperature)
    log_q_student = _log_probs(student_logits, temperature)
    per_position = _skewed_kl(log_p_teacher, log_q_student, alpha) * temperature**2
    return _mean_over_positions(per_position, targets)


def skew_reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor | None = None,
    *,
    alpha: float = 0.1,
    temperature: float = 1.0,
) -> Tensor:
    """alpha-skew reverse KL of DistiLLM: T^2 * KL(q || alpha q + (1 - alpha) p).

    Ko et al. (2024), "DistiLLM", Sec. 3.1 (S-RKL), with the student q = softmax(student / T)
    and the teacher p = softmax(teacher / T); the official code's ``skewed_reverse_kl`` computes
    the same KL. alpha = 0.1 is the paper's default. Limits, exact at the endpoints: alpha = 0
    is ``reverse_kl`` (same T), alpha = 1 is 0.
    """
    _check_pair(student_logits, teacher_logits)
    _check_targets(targets, student_logits, "skew_reverse_kl", required=False)
    _check_temperature(temperature)
    _check_alpha(alpha)
    log_p_teacher = _log_probs(teacher_logits, temperature)
    log_q_student = _log_probs(student_logits, temperature)
    per_position = _skewed_kl(log_q_student, log_p_teacher, alpha) * temperature**2
    return _mean_over_positions(per_position, targets)


# --------------------------------------------------------------------------- ULD


def _as_sequences(logits: Tensor, name: str) -> Tensor:
    if logits.dim() == 2:
        return logits.unsqueeze(0)  # (T, V): one sequence
    if logits.dim() != 3:
        raise ValueError(f"{name} must be (batch, seq, vocab) or (seq, vocab); got {tuple(logits.shape)}")
    return logits


def _valid_mask(targets: Tensor | None, logits: Tensor, name: str) -> Tensor:
    """(B, T) bool mask of the scored positions of (B, T, V) logits."""
    if targets is None:
        return torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)
    targets = targets.unsqueeze(0) if targets.dim() == 1 else targets
    if targets.shape != logits.shape[:2]:
        raise ValueError(f"{name} {tuple(targets.shape)} must match the logits' (batch, seq) {tuple(logits.shape[:2])}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"{name} must be integer token ids, got dtype {targets.dtype}")
    return targets != IGNORE_INDEX


def _sorted_probs(logits: Tensor, temperature: float) -> Tensor:
    return _log_probs(logits, temperature).exp().sort(dim=-1, descending=True).values


def uld(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor | None = None,
    teacher_targets: Tensor | None = None,
    *,
    temperature: float = 1.0,
) -> Tensor:
    """Universal Logit Distillation: L1 between sorted probability vectors (any two vocabularies).

    Boizard, El Haddad, Hudelot, Colombo (2024), "Towards Cross-Tokenizer Distillation: the
    Universal Logit Distillation Loss for LLMs". With no token correspondence between the two
    vocabularies, the Wasserstein-1 distance between student and teacher next-token
    distributions is taken under the paper's simplification, which has the closed form

        W1 = sum_i | q_sorted[i] - p_sorted[i] |

    where each distribution is sorted in decreasing order and the one over the smaller
    vocabulary is zero-padded to the larger size. The value is invariant to any permutation of
    either vocabulary, lies in [0, 2], and has no T^2 factor (it is not a KL).

    Sequence alignment (our reading of the paper and its code, Nicolas-BZRD/llm-recipes,
    ``DistillationLoss``): the two tokenizers split the same answer into different numbers of
    tokens; per sequence, the scored (non -100) positions of the student and of the teacher are
    taken in order, aligned from the first scored one (the answer's first token), and the longer
    list is truncated to the shorter: the k-th student answer position is paired with the k-th
    teacher answer position. The loss is the mean over the aligned positions of each sequence,
    then the mean over the sequences that have any (the paper's code: per-sequence mean, then
    batch mean). The shift between labels and logits is the caller's, as for every loss here
    (the paper's code does it itself, from unshifted Hugging Face labels).

    Args:
        student_logits: (B, T_s, V_s), or (T_s, V_s) for one sequence.
        teacher_logits: (B, T_t, V_t): same batch; length and vocabulary may differ.
        targets: (B, T_s) student labels, -100 where not scored; None scores every position.
        teacher_targets: (B, T_t) teacher labels (the teacher tokenizer's ids, only their -100
            pattern matters). None: the student's ``targets`` when the lengths match, else an
            error (the two masks cannot be guessed across tokenizers).
        temperature: applied to both (the paper's code allows one per model; both are 1 there).

    Only the distillation term is computed; the paper adds the student's cross-entropy with
    weight 1, composed separately (``ce``).
    """
    _check_temperature(temperature)
    student = _as_sequences(student_logits, "student logits")
    teacher = _as_sequences(teacher_logits, "teacher logits")
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"student and teacher batch sizes differ: {student.shape[0]} vs {teacher.shape[0]}")
    if teacher_targets is None:
        if targets is not None and student.shape[1] != teacher.shape[1]:
            raise ValueError(
                f"student and teacher sequences have different lengths ({student.shape[1]} vs "
                f"{teacher.shape[1]}): pass teacher_targets (the teacher's labels, -100 where not scored)"
            )
        teacher_targets = targets
    student_valid = _valid_mask(targets, student, "targets")
    teacher_valid = _valid_mask(teacher_targets, teacher, "teacher_targets")

    # Pair the k-th scored student position with the k-th scored teacher position, per sequence.
    s_rows, t_rows, seq_of_row = [], [], []
    for b in range(student.shape[0]):
        s_pos = student_valid[b].nonzero().squeeze(-1)
        t_pos = teacher_valid[b].nonzero().squeeze(-1)
        n = min(s_pos.numel(), t_pos.numel())
        s_rows.append(b * student.shape[1] + s_pos[:n])
        t_rows.append(b * teacher.shape[1] + t_pos[:n])
        seq_of_row.append(torch.full((n,), b, dtype=torch.long, device=student.device))
    s_rows, t_rows, seq_of_row = torch.cat(s_rows), torch.cat(t_rows), torch.cat(seq_of_row)

    q = _sorted_probs(student.reshape(-1, student.shape[-1])[s_rows], temperature)
    p = _sorted_probs(teacher.reshape(-1, teacher.shape[-1])[t_rows], temperature)
    size = max(q.shape[-1], p.shape[-1])
    q = F.pad(q, (0, size - q.shape[-1]))
    p = F.pad(p, (0, size - p.shape[-1]))
    per_position = (q - p).abs().sum(dim=-1)

    batch = student.shape[0]
    counts = torch.bincount(seq_of_row, minlength=batch).to(per_position.dtype)
    per_sequence = torch.zeros(batch, dtype=per_position.dtype, device=per_position.device)
    per_sequence = per_sequence.index_add(0, seq_of_row, per_position) / counts.clamp(min=1)
    has_any = counts > 0
    return per_sequence.sum() / has_any.sum().clamp(min=1)


# --------------------------------------------------------------------------- chunked computation

# Same-vocabulary token losses that chunked_token_loss accepts by name (the functions of the
# registry, plus the skew divergences). Any other callable with the same signature works too.
TOKEN_LOSSES: dict[str, Callable[..., Tensor]] = {
    "ce": cross_entropy,
    "kd": kd,
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": jsd,
    "skew_kl": skew_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "tv": total_variation,
    "taid": taid_loss,
    "bdkd": bdkd,
}


# chunk_size=None: as many tokens as fit 2^24 vocabulary entries (64 MiB per float32 tensor).
DEFAULT_CHUNK_ELEMENTS = 2**24


def _resolve(loss: str | Callable[..., Tensor], params: dict[str, object]) -> Callable[..., Tensor]:
    if callable(loss):
        return partial(loss, **params) if params else loss
    if loss not in TOKEN_LOSSES:
        raise ValueError(f"unknown token loss {loss!r}; available: {', '.join(TOKEN_LOSSES)} (or pass a function)")
    fn = TOKEN_LOSSES[loss]
    allowed = [
        p.name for p in inspect.signature(fn).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"loss {loss!r} got unknown parameter(s) {', '.join(unknown)}; allowed: {', '.join(allowed) or 'none'}")
    return partial(fn, **params)


class _ChunkedTokenLoss(torch.autograd.Function):
    """sum over chunks of loss_fn(chunk) * n_chunk / n_valid, with the gradients computed chunk
    by chunk during the forward pass and only scaled in the backward pass.

    Each chunk's gradient is taken as soon as its value is (torch.autograd.grad on that chunk
    alone), so only one chunk's intermediates (softmaxes, mixtures, (chunk, V) logits when
    fused) are alive at any time; what is kept for backward is the size of the inputs' own
    gradients: (N, V) for student logits, or (N, H) and (V, H) for hidden states and the LM
    head weight. This is the scheme of Liger-Kernel's fused linear losses; recomputing each
    chunk in backward (torch.utils.checkpoint) would bound memory the same way but run every
    chunk's forward twice. When no input needs a gradient, the chunks run without autograd.
    """

    @staticmethod
    def forward(ctx, student, teacher, weight, bias, loss_fn, positions, targets, chunk_size, ce_weight, n_valid, need_any):
        need_s, need_t, need_w, need_b = ctx.needs_input_grad[:4]
        fused = weight is not None
        # float32 at least, float64 when the inputs are (so gradcheck stays meaningful)
        acc_dtype = torch.promote_types(torch.promote_types(student.dtype, teacher.dtype), torch.float32)
        total = torch.zeros((), dtype=acc_dtype, device=teacher.device)

        grad_s = torch.zeros_like(student) if need_s and need_any else None
        grad_t = torch.zeros_like(teacher) if need_t and need_any else None
        grad_w = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if fused and need_w and need_any else None
        grad_b = torch.zeros(bias.shape, dtype=acc_dtype, device=bias.device) if bias is not None and need_b and need_any else None
        need_logit_grad = need_any and (need_s or (fused and (need_w or need_b)))

        for start in range(0, n_valid, chunk_size):
            index = tuple(i[start : start + chunk_size] for i in positions)
            rows = index[0].numel()
            x = student[index]  # (n, V) logits, or (n, H) hidden states when fused
            t = teacher[index]
            y = None if targets is None else targets[start : start + chunk_size]
            logits = F.linear(x, weight, bias) if fused else x
            with torch.enable_grad():
                s_leaf = logits.detach().requires_grad_(need_logit_grad)
                t_leaf = t.detach().requires_grad_(grad_t is not None)
                value = loss_fn(s_leaf, t_leaf, y)
                if ce_weight:
                    value = value + ce_weight * cross_entropy(s_leaf, None, y)
                value = value * (rows / n_valid)
                g_logits = g_teacher = None
                leaves = [leaf for leaf in (s_leaf, t_leaf) if leaf.requires_grad]
                if leaves and value.requires_grad:
                    grads = list(torch.autograd.grad(value, leaves, allow_unused=True))
                    g_logits = grads.pop(0) if s_leaf.requires_grad else None
                    g_teacher = grads.pop(0) if t_leaf.requires_grad else None
            total += value.detach().to(acc_dtype)
            if g_logits is not None:
                if not fused:
                    grad_s[index] = g_logits
                else:
                    if grad_s is not None:
                        grad_s[index] = (g_logits @ weight).to(grad_s.dtype)
                    if grad_w is not None:
                        grad_w.addmm_(g_logits.t().to(acc_dtype), x.to(acc_dtype))
                    if grad_b is not None:
                        grad_b += g_logits.sum(dim=0).to(acc_dtype)
            if g_teacher is not None:
                grad_t[index] = g_teacher

        if fused:
            grad_w = None if grad_w is None else grad_w.to(weight.dtype)
            grad_b = None if grad_b is None else grad_b.to(bias.dtype)
        ctx.grads = (grad_s, grad_t, grad_w, grad_b)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.grads is None:
            raise RuntimeError(
                "chunked_token_loss: backward ran twice through the same loss (its gradients are "
                "computed once, in the forward pass); compute the loss again instead of retain_graph"
            )
        grads, ctx.grads = ctx.grads, None
        scale_by = None if bool(grad_output == 1) else grad_output
        out = []
        for g in grads:
            if g is not None and scale_by is not None:
                g.mul_(scale_by.to(g.dtype))  # in place: this buffer is ours and used once
            out.append(g)
        return (*out, None, None, None, None, None, None, None)


def chunked_token_loss(
    loss: str | Callable[..., Tensor],
    student: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None = None,
    *,
    chunk_size: int | None = None,
    lm_head: Tensor | nn.Linear | None = None,
    lm_head_bias: Tensor | None = None,
    ce_weight: float = 0.0,
    **loss_params: object,
) -> Tensor:
    """A token-level loss computed over the valid positions in chunks, optionally fused with the LM head.

    Equal (up to float rounding) to ``loss_fn(student_logits, teacher_logits, labels)`` (the mean
    over positions whose label is not -100), with ``ce_weight * ce(student_logits, labels)``
    added when ``ce_weight`` is set, but peak extra memory O(chunk_size x V) instead of
    O(batch x seq x V): the valid positions are flattened and processed ``chunk_size`` at a time,
    each chunk's value accumulated in float32 (float64 for float64 input) and its gradient taken
    at once (see ``_ChunkedTokenLoss``).

    Args:
        loss: a name from ``TOKEN_LOSSES`` (``forward_kl``, ``reverse_kl``, ``jsd``, ``skew_kl``,
            ``skew_reverse_kl``, ``tv``, ``taid``, ``kd``, ``bdkd``, ``ce``) or a function
            ``fn(student_logits (n, V), teacher_logits (n, V), targets (n,) | None) -> mean over
            the n rows``; ``loss_params`` are bound to it (e.g. ``beta=0.5``, ``t=0.7``).
        student: the student's logits (..., V), or with ``lm_head`` its final hidden states
            (..., H), the input of the LM head.
        teacher_logits: (..., V), same leading shape. Detach it for offline distillation.
        labels: (...) token ids aligned with the logits, -100 where not scored; None scores
            every position. Needed for ``ce`` and ``ce_weight``.
        chunk_size: tokens per chunk (the last chunk may be shorter). None: 2^24 // V tokens
            (524 at V = 32k, 111 at 150k), so one (chunk, V) float32 tensor is <= 64 MiB. The
            working set of ``jsd`` is about 14 such tensors per chunk (forward and backward),
            on top of the inputs' gradient: ~0.95 GB at 512 x 32k in
            benchmarks/results/lm_loss_memory.md.
        lm_head: the student's LM head, an ``nn.Linear`` or its weight (V, H). The (chunk, V)
            student logits are computed per chunk as ``F.linear(hidden, weight, bias)`` and never
            for the whole batch; gradients reach ``hidden``, the weight and the bias. Models that
            post-process their logits (soft-capping, scaling) need the unfused path.
        lm_head_bias: the bias (V,) when ``lm_head`` is a weight tensor.
        ce_weight: adds ``ce_weight`` x the student's cross-entropy with ``labels`` (the LM loss)
            in the same pass, which the fused path needs since no full logits exist to compute it.

    Not supported: double backward, and backward twice through one result (it raises).
    """
    if isinstance(lm_head, nn.Linear):
        if lm_head_bias is not None:
            raise ValueError("lm_head_bias is taken from the nn.Linear lm_head; do not pass both")
        lm_head, lm_head_bias = lm_head.weight, lm_head.bias
    if teacher_logits.dim() < 1:
        raise ValueError("teacher logits must have a vocabulary dimension (shape (..., V))")
    if chunk_size is None:
        chunk_size = max(1, DEFAULT_CHUNK_ELEMENTS // teacher_logits.shape[-1])
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    _check_non_negative_weight(ce_weight)
    leading = teacher_logits.shape[:-1]
    if lm_head is None:
        if lm_head_bias is not None:
            raise ValueError("lm_head_bias needs lm_head")
        _check_pair(student, teacher_logits)
    else:
        vocab = teacher_logits.shape[-1]
        if lm_head.dim() != 2 or lm_head.shape[0] != vocab:
            raise ValueError(f"lm_head weight must be (V, H) with V = {vocab} (the teacher's vocabulary); got {tuple(lm_head.shape)}")
        if student.shape[:-1] != leading or student.shape[-1] != lm_head.shape[1]:
            raise ValueError(
                f"student hidden states {tuple(student.shape)} must be (..., H) with the teacher's leading "
                f"shape {tuple(leading)} and H = {lm_head.shape[1]} (the lm_head's input size)"
            )
        if lm_head_bias is not None and lm_head_bias.shape != (vocab,):
            raise ValueError(f"lm_head_bias must be ({vocab},), got {tuple(lm_head_bias.shape)}")
    if labels is not None:
        _check_targets(labels, teacher_logits, "chunked_token_loss", required=False)
    if ce_weight and labels is None:
        raise ValueError("ce_weight needs labels (the token ids the student should predict)")
    loss_fn = _resolve(loss, loss_params)

    if teacher_logits.dim() == 1:  # a single position
        student, teacher_logits = student.unsqueeze(0), teacher_logits.unsqueeze(0)
        labels = None if labels is None else labels.reshape(1)
        leading = teacher_logits.shape[:-1]

    valid = torch.ones(leading, dtype=torch.bool, device=teacher_logits.device) if labels is None else labels != IGNORE_INDEX
    positions = valid.nonzero(as_tuple=True)  # one index tensor per leading dim, row-major order
    targets = None if labels is None else labels[positions]
    # Grad mode is off inside Function.forward: say from here whether gradients are wanted.
    return _ChunkedTokenLoss.apply(
        student, teacher_logits, lm_head, lm_head_bias, loss_fn, positions, targets, chunk_size,
        float(ce_weight), int(positions[0].numel()), torch.is_grad_enabled(),
    )


def _check_non_negative_weight(ce_weight: float) -> None:
    _check_number("ce_weight", ce_weight)
    if ce_weight < 0:
        raise ValueError(f"ce_weight must be >= 0, got {ce_weight}")
