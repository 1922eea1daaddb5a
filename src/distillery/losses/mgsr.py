"""Multi-granularity semantic revision (MGSR): the pure tensor parts.

Liu, Zhang, Li, Li, Huang, Chen, Tang, Hu, Xiong and Wang, 2024, "Multi-Granularity Semantic
Revision for Large Language Model Distillation" (arXiv:2407.10068; ACL 2026).  Three levels:

* sequence level -- SCRG, sequence correction and re-generation: the student generates, the
  teacher finds the first token it does not accept, that token is replaced by the teacher's own
  choice and the rest of the sequence is written again (:func:`revision_points` is the detection
  rule; the generation lives in ``distillery.lm.mgsr``).  The paper locates the error token from the
  teacher/student "semantic cognitive difference" of the generated tokens; we use the acceptance
  rule the issue describes (outside the teacher's top-k, or below a teacher probability), which
  needs no threshold on the student and is deterministic -- the first such token is the error.
* token level -- DAC-KL, distribution-adaptive clipping KL (:func:`dac_kl`): a learnable
  sub-network reads the teacher's distribution and predicts a lower and an upper probability limit;
  the KL is taken on the vocabulary entries whose teacher probability lies within them (plus the
  target token), both distributions renormalised on that set.  With the limits at 0 and 1 nothing
  is clipped and DAC-KL is the forward KL.  The hard clip has no gradient with respect to the limits,
  so for training the sub-network a soft membership (``sharpness``) replaces the indicator:
  w_i = σ((log p_i - log l)/s) σ((log u - log p_i)/s).
* span level -- correlation consistency (:func:`span_correlation_loss`): token probability vectors
  are averaged within spans (word boundaries of the tokenizer), each sequence's span x span
  Pearson-correlation matrix is computed for teacher and student, and their squared difference is
  the loss.  (The paper computes probability correlations with span priors from a parser; the
  word-boundary spans and the span-to-span matrix are the issue's reading of it.)

Conventions of ``distillery.losses.lm``: logits (B, T, V) aligned with ``targets`` (B, T), -100 =
not scored; losses are averaged over scored positions.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def _wide(x: torch.Tensor) -> torch.Tensor:
    """float32 at least (half-precision logits), float64 kept (gradcheck)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def revision_points(tokens: torch.Tensor, teacher_logits: torch.Tensor, valid: torch.Tensor, *,
                    top_k: int | None = 5, min_prob: float = 0.0) -> torch.Tensor:
    """SCRG's error detection: for each row, the first position t (with ``valid[b, t]``) whose token
    ``tokens[b, t]`` the teacher does not accept -- outside its ``top_k`` most probable tokens, or
    with teacher probability below ``min_prob`` -- or -1 when every token is accepted.

    ``teacher_logits[b, t]`` is the teacher's next-token distribution that *produced* position t
    (i.e. already shifted: it predicts ``tokens[b, t]``)."""
    if top_k is None and min_prob <= 0:
        raise ValueError("revision needs an acceptance rule: give top_k and/or min_prob > 0")
    logp = F.log_softmax(_wide(teacher_logits), -1)
    chosen = logp.gather(-1, tokens[..., None])[..., 0]
    rejected = torch.zeros_like(valid)
    if top_k is not None:
        # rank of the chosen token = number of tokens strictly more probable than it
        rank = (logp > chosen[..., None]).sum(-1)
        rejected |= rank >= top_k
    if min_prob > 0:
        rejected |= chosen < torch.log(torch.tensor(min_prob))
    rejected &= valid.bool()
    first = torch.where(rejected.any(-1), rejected.float().argmax(-1), torch.full_like(rejected[:, 0], -1, dtype=torch.long))
    return first.long()


def dac_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
           lower: torch.Tensor | float = 0.0, upper: torch.Tensor | float = 1.0, *,
           sharpness: float | None = None, temperature: float = 1.0) -> torch.Tensor:
    """DAC-KL (Liu et al., 2024, token level): KL(p_t|S || p_s|S) on the clipped set
    S = {i : lower <= p_t,i <= upper} ∪ {target}, both distributions renormalised on S.

    ``lower``/``upper``: floats or tensors broadcastable to (B, T) (the sub-network's per-position
    limits).  ``upper >= 1`` / ``lower <= 0`` do not clip on that side.  ``sharpness=None``: the
    hard indicator; a float s > 0: the soft membership (differentiable in the limits)."""
    if temperature <= 0 or (sharpness is not None and sharpness <= 0):
        raise ValueError("dac_kl needs temperature > 0 and sharpness > 0 (or None for the hard clip)")
    valid = targets != IGNORE
    lp_t = F.log_softmax(_wide(teacher_logits) / temperature, -1)
    lp_s = F.log_softmax(_wide(student_logits) / temperature, -1)
    lower = torch.as_tensor(lower, dtype=lp_t.dtype, device=lp_t.device).expand(valid.shape)[..., None]
    upper = torch.as_tensor(upper, dtype=lp_t.dtype, device=lp_t.device).expand(valid.shape)[..., None]
    no_low, no_up = lower <= 0, upper >= 1
    log_low, log_up = lower.clamp_min(1e-30).log(), upper.clamp(1e-30, 1.0).log()
    if sharpness is None:
        keep = ((lp_t >= log_low) | no_low) & ((lp_t <= log_up) | no_up)
        log_w = torch.zeros_like(lp_t).masked_fill(~keep, float("-inf"))
    else:
        log_w = (torch.where(no_low, 0.0, F.logsigmoid((lp_t - log_low) / sharpness))
                 + torch.where(no_up, 0.0, F.logsigmoid((log_up - lp_t) / sharpness)))
    # the target token always stays in S (the paper keeps the ground-truth class)
    log_w = log_w.scatter(-1, targets.clamp_min(0)[..., None], 0.0)
    z_t = torch.logsumexp(log_w + lp_t, -1, keepdim=True)
    z_s = torch.logsumexp(log_w + lp_s, -1, keepdim=True)
    q_t = torch.exp(log_w + lp_t - z_t)
    # log q_t - log q_s does not contain log w: finite even where w = 0
    per_pos = (q_t * ((lp_t - z_t) - (lp_s - z_s))).sum(-1)
    return (per_pos * valid).sum() / valid.sum().clamp_min(1)


def clip_coverage(teacher_logits: torch.Tensor, targets: torch.Tensor, lower, upper, *, sharpness: float,
                  temperature: float = 1.0) -> torch.Tensor:
    """Mean teacher probability mass kept by the soft clip (the sub-network's regulariser: without
    it, the limits could shrink S until the KL vanishes)."""
    valid = targets != IGNORE
    lp_t = F.log_softmax(_wide(teacher_logits) / temperature, -1)
    lower = torch.as_tensor(lower, dtype=lp_t.dtype).expand(valid.shape)[..., None]
    upper = torch.as_tensor(upper, dtype=lp_t.dtype).expand(valid.shape)[..., None]
    w = torch.sigmoid((lp_t - lower.clamp_min(1e-30).log()) / sharpness) * \
        torch.sigmoid((upper.clamp(1e-30, 1.0).log() - lp_t) / sharpness)
    mass = (w * lp_t.exp()).sum(-1)
    return (mass * valid).sum() / valid.sum().clamp_min(1)


def span_ids_from_starts(starts: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Span index of every position: a new span at each ``starts`` (and at the first valid
    position of a row); -1 where ``valid`` is False."""
    valid = valid.bool()
    first = valid & (valid.long().cumsum(-1) == 1)
    ids = ((starts.bool() | first) & valid).long().cumsum(-1) - 1
    return ids.masked_fill(~valid, -1)


def _span_correlations(probs: torch.Tensor, span_ids: torch.Tensor, n_spans: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, S, S) Pearson correlations between the span-mean probability vectors, and the (B, S)
    mask of spans that exist."""
    onehot = F.one_hot(span_ids.clamp_min(0), n_spans).to(probs.dtype) * (span_ids >= 0)[..., None]  # (B, T, S)
    count = onehot.sum(1)                                                                            # (B, S)
    pooled = onehot.transpose(1, 2) @ probs / count.clamp_min(1)[..., None]                          # (B, S, V)
    centred = pooled - pooled.mean(-1, keepdim=True)
    unit = centred / centred.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return unit @ unit.transpose(1, 2), count > 0


def span_correlation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, span_ids: torch.Tensor,
                          *, temperature: float = 1.0) -> torch.Tensor:
    """Span-level correlation consistency (Liu et al., 2024): mean over sequences of
    ||C_s - C_t||²_F / S², C = Pearson correlations of the span-averaged probability vectors.
    ``span_ids`` (B, T): span index per position, -1 = not in any span."""
    if temperature <= 0:
        raise ValueError("span_correlation_loss needs temperature > 0")
    n_spans = int(span_ids.max()) + 1
    if n_spans < 2:
        return student_logits.sum() * 0.0  # one span: a 1x1 correlation matrix carries nothing
    c_s, present = _span_correlations(F.softmax(_wide(student_logits) / temperature, -1), span_ids, n_spans)
    with torch.no_grad():
        c_t, _ = _span_correlations(F.softmax(_wide(teacher_logits) / temperature, -1), span_ids, n_spans)
    pair = (present[:, :, None] & present[:, None, :]).to(c_s.dtype)
    per_row = ((c_s - c_t) ** 2 * pair).sum((1, 2)) / pair.sum((1, 2)).clamp_min(1)
    rows = present.sum(-1) >= 2
    return (per_row * rows).sum() / rows.sum().clamp_min(1)
