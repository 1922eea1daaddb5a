"""Hybrid distillation: token relations from one teacher, features from another, with progressive
redundant-token masking -- pure functions of tensors.

Shi, Zhang, Wang, Li, Dai, Zou, Xiong & Tian (2023), "Hybrid Distillation: Connecting Masked
Autoencoders with Contrastive Learners" (arXiv 2306.15876; ICLR 2024).  The student imitates the
token relations (self-attention maps) of one teacher at intermediate layers and the final
features of the other, on the tokens that survive a masking of the tokens that teacher's
[CLS] attention marks as redundant -- more of them at deeper layers.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _up(x: Tensor) -> Tensor:
    """Half precision is upcast to float32; float32 / float64 are kept (gradchecks run in float64)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def attention_from_qkv(qkv: Tensor, heads: int) -> Tensor:
    """Self-attention maps softmax(Q_h K_h^T / sqrt(d_h)) of every head, from the fused qkv
    projection (B, N, 3D) of a ViT block (the zoo's ``attn.qkv``: q, k, v concatenated, each split
    into ``heads`` heads) -> (B, heads, N, N).  Vaswani et al. 2017, eq. (1)."""
    b, n, three_d = qkv.shape
    if three_d % (3 * heads):
        raise ValueError(f"qkv width {three_d} is not 3 x heads x head_dim for heads={heads}: "
                         "set the relation teacher's head count (method.params.teacher_heads)")
    q, k, _ = _up(qkv).reshape(b, n, 3, heads, three_d // (3 * heads)).permute(2, 0, 3, 1, 4)
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)


def token_relation(qkv: Tensor, heads: int, tokens: Tensor | None = None) -> Tensor:
    """The head-averaged attention map (B, N, N) among ``tokens`` (B, K) of the sequence (all
    tokens if None).  Restricting first and then taking the softmax gives the relation the model
    would have if only those tokens were present (the masked tokens are gone, not zero-weighted)."""
    if tokens is not None:
        qkv = qkv.gather(1, tokens.unsqueeze(-1).expand(-1, -1, qkv.shape[-1]))
    return attention_from_qkv(qkv, heads).mean(1)


def feature_relation(queries: Tensor, keys: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(d)) over tokens (B, N, d): the token relation of a model without
    attention (a CNN's map cells as tokens), from learned query/key projections of its features."""
    return torch.softmax(_up(queries) @ _up(keys).transpose(-1, -2) / math.sqrt(queries.shape[-1]), dim=-1)


def relation_kl(student_rel: Tensor, teacher_rel: Tensor, eps: float = 1e-8) -> Tensor:
    """KL(teacher row || student row) of two relation maps (B, N, N) whose rows are
    distributions, averaged over rows and batch (MiniLM's attention-transfer form, Wang et al. 2020)."""
    if student_rel.shape != teacher_rel.shape:
        raise ValueError(f"relation maps differ in shape: student {tuple(student_rel.shape)} vs teacher "
                         f"{tuple(teacher_rel.shape)}; both must cover the same kept tokens")
    t = _up(teacher_rel)
    return (t * ((t + eps).log() - (_up(student_rel) + eps).log())).sum(-1).mean()


def redundancy_order(cls_attention: Tensor) -> Tensor:
    """Patch tokens (B, N) ordered from most to least attended by the [CLS] token; the tail of
    this order is what the paper calls redundant."""
    return cls_attention.argsort(dim=1, descending=True)


def progressive_keep_counts(n_patches: int, keep_ratios: list[float]) -> list[int]:
    """Patch tokens kept after each masking stage: round(n * ratio), at least one.  The ratios must
    not increase -- each stage drops more of the least-attended tokens (progressive masking), so
    the kept sets are nested prefixes of :func:`redundancy_order`."""
    if any(not 0 < r <= 1 for r in keep_ratios):
        raise ValueError(f"keep_ratios must be in (0, 1], got {keep_ratios}")
    if any(b > a for a, b in zip(keep_ratios, keep_ratios[1:])):
        raise ValueError(f"keep_ratios must not increase from stage to stage (progressive masking), got {keep_ratios}")
    return [max(1, round(n_patches * r)) for r in keep_ratios]


def kept_at(block: int, drop_before: list[int], counts: list[int], n_patches: int) -> int:
    """Patch tokens present at the input of ``block`` when stage s drops to counts[s] before
    block drop_before[s]."""
    kept = n_patches
    for start, count in zip(drop_before, counts):
        if block >= start:
            kept = count
    return kept


def feature_distance(student: Tensor, teacher: Tensor) -> Tensor:
    """Smooth-L1 distance between the projected student feature and the feature teacher's final
    feature, averaged over elements."""
    if student.shape != teacher.shape:
        raise ValueError(f"features differ in shape: student {tuple(student.shape)} vs teacher {tuple(teacher.shape)}")
    return F.smooth_l1_loss(_up(student), _up(teacher))
