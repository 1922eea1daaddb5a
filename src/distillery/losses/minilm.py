"""Self-attention distillation losses of MiniLM and MiniLMv2, as pure functions of tensors.

* MiniLM v1 -- Wang, Wei, Dong, Bao, Yang, Zhou, "MiniLM: Deep Self-Attention Distillation for
  Task-Agnostic Compression of Pre-Trained Transformers", NeurIPS 2020.  The student mimics the
  teacher's *last* layer: the attention distributions (eq. 3, ``self_attention_kl``) and the
  value relation softmax(V V^T / sqrt(d_k)) (eqs. 4-5, ``value_relation_kl``), both KL(teacher ||
  student) per head and query position, averaged over heads and positions.  Needs the same
  number of attention heads in teacher and student.
* MiniLMv2 -- Wang, Bao, Huang, Dong, Wei, "MiniLMv2: Multi-Head Self-Attention Relation
  Distillation for Compressing Pretrained Transformers", Findings of ACL 2021.  The concatenated
  queries, keys and values (B, L, D) of one layer are re-split into A_r *relation heads* of size
  d_r = D / A_r -- the same A_r for teacher and student, whatever their attention-head counts
  and widths -- and R_ij = softmax(A_i A_j^T / sqrt(d_r)) is matched by KL (eqs. 6-8,
  ``attention_relation_kl``); the loss sums the Q-Q, K-K and V-V terms (``qkv_relation_kl``).
  The teacher layer need not be the last (the caller picks which layer's Q/K/V it passes).

Conventions shared by every function here:

* Teacher first inside KL: KL(teacher || student), as in both papers.  Nothing is detached --
  the caller passes teacher tensors that carry no gradient (``torch.inference_mode``).
* Padding: ``mask`` (B, L), 1 = real token.  Padded keys get no probability mass in either
  distribution and padded query rows are left out of the average.  The papers define the loss
  per input x as 1/(A |x|) sum_a sum_t KL(...); we take that per sequence (|x| = its number of
  real tokens) and then the mean over the batch.  A sequence with no real token contributes 0.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

RELATION_NAMES = ("qq", "qk", "qv", "kq", "kk", "kv", "vq", "vk", "vv")


def check_relation_weights(weights: dict[str, float]) -> dict[str, float]:
    """A config's ``relation_weights``: known two-letter names, weights >= 0 (for validators)."""
    unknown = sorted(set(weights) - set(RELATION_NAMES))
    if unknown:
        raise ValueError(f"unknown relation(s) {unknown}; use two letters of q, k, v: {', '.join(RELATION_NAMES)}")
    if any(w < 0 for w in weights.values()):
        raise ValueError("relation weights must be >= 0")
    return weights


def _valid(mask: Tensor | None, batch: int, length: int, device) -> Tensor:
    if mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    if mask.shape != (batch, length):
        raise ValueError(f"mask must have shape (batch, seq_len) = {(batch, length)}, got {tuple(mask.shape)}")
    return mask.to(device=device).bool()


def _average_rows(row_kl: Tensor, valid: Tensor) -> Tensor:
    """row_kl (B, H, L) -> mean over heads and real query rows per sequence, then over the batch."""
    per_row = row_kl.mean(dim=1)  # (B, L): heads averaged (the 1/A of the papers)
    per_seq = (per_row * valid).sum(dim=1) / valid.sum(dim=1).clamp_min(1)  # the 1/|x|
    return per_seq.mean()


def _kl_from_logits(student_logits: Tensor, teacher_logits: Tensor, valid: Tensor) -> Tensor:
    """KL(softmax(teacher) || softmax(student)) over the last (key) axis of (B, H, L, L) scores,
    with padded keys removed from both distributions, averaged as described in the module doc."""
    keys = valid[:, None, None, :]
    # finfo.min rather than -inf: a row with no real key (all padding) stays finite, and it is
    # dropped from the average anyway.
    fill = torch.finfo(student_logits.dtype).min
    log_t = torch.log_softmax(teacher_logits.masked_fill(~keys, fill), dim=-1)
    log_s = torch.log_softmax(student_logits.masked_fill(~keys, fill), dim=-1)
    terms = torch.where(keys, log_t.exp() * (log_t - log_s), torch.zeros((), dtype=log_t.dtype, device=log_t.device))
    return _average_rows(terms.sum(dim=-1), valid)


def split_heads(x: Tensor, n_heads: int) -> Tensor:
    """(B, L, D) -> (B, n_heads, L, D / n_heads): consecutive chunks of the concatenated vector,
    the layout Hugging Face's attention layers use for their heads (MiniLMv2 section 3.1)."""
    if x.dim() != 3:
        raise ValueError(f"expected a (batch, seq_len, width) projection, got shape {tuple(x.shape)}")
    b, length, width = x.shape
    if n_heads < 1 or width % n_heads:
        raise ValueError(
            f"width {width} is not divisible by n_relation_heads={n_heads}; pick a relation-head count "
            "that divides both the teacher's and the student's width (e.g. their greatest common divisor's factors)"
        )
    return x.view(b, length, n_heads, width // n_heads).transpose(1, 2)


def relation_logits(a: Tensor, b: Tensor, n_heads: int) -> Tensor:
    """Scaled dot products A_a A_b^T / sqrt(d_r) per relation head: (B, L, D) x2 -> (B, H, L, L)."""
    if a.shape != b.shape:
        raise ValueError(f"the two projections of one model must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    ha, hb = split_heads(a, n_heads), split_heads(b, n_heads)
    return ha @ hb.transpose(-1, -2) / math.sqrt(ha.shape[-1])


def attention_relation_kl(
    student_a: Tensor,
    student_b: Tensor,
    teacher_a: Tensor,
    teacher_b: Tensor,
    *,
    n_relation_heads: int,
    mask: Tensor | None = None,
) -> Tensor:
    """MiniLMv2 relation loss for one pair (eqs. 6-8): KL(R^T || R^S), R = softmax(A B^T / sqrt(d_r)).

    ``student_a``/``student_b`` are the student's (B, L, D_s) projections of one layer (e.g. its
    queries and keys: R is then the attention distribution; queries twice: the Q-Q relation);
    ``teacher_a``/``teacher_b`` the teacher's (B, L, D_t).  Both are split into
    ``n_relation_heads`` relation heads, so D_s and D_t may differ; d_r is each model's own
    D / n_relation_heads.  Returns a scalar.
    """
    if student_a.shape[:2] != teacher_a.shape[:2]:
        raise ValueError(
            f"student and teacher must see the same batch of tokens: (batch, seq_len) "
            f"{tuple(student_a.shape[:2])} vs {tuple(teacher_a.shape[:2])}"
        )
    valid = _valid(mask, student_a.shape[0], student_a.shape[1], student_a.device)
    return _kl_from_logits(
        relation_logits(student_a, student_b, n_relation_heads),
        relation_logits(teacher_a, teacher_b, n_relation_heads),
        valid,
    )


def qkv_relation_kl(
    student_qkv: tuple[Tensor, Tensor, Tensor],
    teacher_qkv: tuple[Tensor, Tensor, Tensor],
    *,
    n_relation_heads: int,
    mask: Tensor | None = None,
    weights: dict[str, float] | None = None,
) -> Tensor:
    """MiniLMv2 eq. (5): sum_ij w_ij * attention_relation_kl for the relations named in ``weights``.

    Names are two letters from q, k, v (``"qq"``, ``"kk"``, ``"vv"``, ``"qk"``...); the paper's
    choice, and the default, is Q-Q, K-K and V-V with weight 1 each.
    """
    weights = {"qq": 1.0, "kk": 1.0, "vv": 1.0} if weights is None else weights
    unknown = sorted(set(weights) - set(RELATION_NAMES))
    if unknown:
        raise ValueError(f"unknown relation(s) {unknown}; use two letters of q, k, v: {', '.join(RELATION_NAMES)}")
    index = {"q": 0, "k": 1, "v": 2}
    total = student_qkv[0].new_zeros(())
    for name, w in weights.items():
        if w == 0:
            continue
        i, j = index[name[0]], index[name[1]]
        total = total + w * attention_relation_kl(
            student_qkv[i], student_qkv[j], teacher_qkv[i], teacher_qkv[j], n_relation_heads=n_relation_heads, mask=mask
        )
    return total


def self_attention_kl(student_attn_probs: Tensor, teacher_attn_probs: Tensor, mask: Tensor | None = None) -> Tensor:
    """MiniLM v1 attention transfer, eq. (3): KL(A^T || A^S) per head and query position.

    Inputs are attention *probabilities* (B, H, L, L), as Hugging Face models return them with
    ``output_attentions=True`` (eager attention); the head counts must match (MiniLM v1's
    restriction -- MiniLMv2's ``attention_relation_kl`` on queries and keys lifts it).  Padded
    keys, which the model already gave ~0 probability, are excluded from the sum, padded
    query rows from the average.
    """
    if student_attn_probs.shape != teacher_attn_probs.shape:
        raise ValueError(
            f"attention maps must have the same shape (batch, heads, seq, seq), got student "
            f"{tuple(student_attn_probs.shape)} vs teacher {tuple(teacher_attn_probs.shape)}; for different head "
            "counts use attention_relation_kl on the queries and keys (MiniLMv2)"
        )
    b, _, length, _ = student_attn_probs.shape
    valid = _valid(mask, b, length, student_attn_probs.device)
    keys = valid[:, None, None, :]
    t, s = teacher_attn_probs, student_attn_probs
    # t log t with 0 log 0 = 0; the student's log is floored at the smallest normal number so a
    # probability that underflowed to 0 gives a large finite loss instead of inf.
    terms = torch.xlogy(t, t) - t * torch.log(s.clamp_min(torch.finfo(s.dtype).tiny))
    terms = torch.where(keys, terms, torch.zeros((), dtype=terms.dtype, device=terms.device))
    return _average_rows(terms.sum(dim=-1), valid)


def value_relation_kl(student_v: Tensor, teacher_v: Tensor, *, n_heads: int, mask: Tensor | None = None) -> Tensor:
    """MiniLM v1 value-relation transfer, eqs. (4)-(5): KL(softmax(V_t V_t^T / sqrt(d_k)) ||
    softmax(V_s V_s^T / sqrt(d_k))) per attention head, V given as (B, L, D) concatenated heads.

    ``n_heads`` is the attention-head count (the same for both models in MiniLM v1); d_k is each
    model's own head size D / n_heads.  This is MiniLMv2's V-V relation with A_r = n_heads.
    """
    return attention_relation_kl(student_v, student_v, teacher_v, teacher_v, n_relation_heads=n_heads, mask=mask)
