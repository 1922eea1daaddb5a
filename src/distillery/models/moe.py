"""``vit_moe``: a small Vision Transformer whose MLP blocks are sparse mixture-of-experts layers.

Riquelme, Puigcerver, Mustafa, Neumann, Jenatton, Susano Pinto, Keysers, Houlsby (2021), "Scaling
Vision with Sparse Mixture of Experts" (V-MoE), NeurIPS: the dense MLP of a transformer block is
replaced by ``E`` expert MLPs and a router; each token goes to its top-k experts and the block's
output is the sum of their outputs weighted by the router's softmax probabilities,

    MoE(x) = sum_{e in TopK(p(x))} p_e(x) * MLP_e(x),     p(x) = softmax(W x)

(the gates are not renormalised over the k chosen experts, as in V-MoE). The model is the zoo's
``vit_tiny`` (:class:`~distillery.models.zoo.VisionTransformer`: ``patch_embed``, ``blocks.N``,
``norm``, ``head``) with these blocks, so its stages are tapped the same way (``blocks.N``).

Load balancing: every MoE layer keeps the auxiliary loss of its last forward pass in
``last_aux_loss`` (:func:`distillery.losses.m2mkd.load_balancing_loss`); ``model.aux_loss`` sums
them over layers. A method adds it as a loss term (``m2mkd`` does) -- training with plain ``ce``
ignores it, as an ordinary model's extras would be.

Differences from V-MoE: no router noise and no expert capacity (every token reaches its k experts,
none is dropped: at this scale dropping tokens only adds variance); the load-balancing term is the
Switch Transformer's ``E * sum f_e P_e`` rather than V-MoE's importance + load pair (both push
towards uniform routing; the Switch form is the one most MoE code uses).

Registration: :mod:`distillery.models` imports only ``zoo`` and ``adapters``; this module is
imported by ``distillery.methods.m2mkd`` (so by every config validation, which loads the method
registry) until ``distillery.models.__init__`` imports it too.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from distillery.errors import ModelError
from distillery.losses.m2mkd import load_balancing_loss
from distillery.models.zoo import Attention, VisionTransformer, _image_channels, register_model


class MoEMLP(nn.Module):
    """Top-k routed mixture of GELU-MLP experts over tokens (..., D)."""

    def __init__(self, dim: int, hidden: int, num_experts: int, top_k: int, dropout: float = 0.0):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        # V-MoE's router is a plain W x (no bias); a Parameter rather than a bias-less nn.Linear so that
        # the ViT's init (every Linear has a bias) leaves it alone.
        self.router = nn.Parameter(torch.empty(num_experts, dim))
        nn.init.trunc_normal_(self.router, std=0.02)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout))
            for _ in range(num_experts)
        )
        self.last_aux_loss: torch.Tensor = torch.zeros(())
        self.last_expert_index: torch.Tensor | None = None  # (tokens, k) of the last forward, for inspection

    def route(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router softmax ``(T, E)``, and the gates and indices of each token's top-k experts ``(T, k)``."""
        logits = F.linear(tokens, self.router)
        # Under mixed precision the router's softmax runs in float32 (Switch Transformer's "selective precision").
        probs = torch.softmax(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, dim=-1)
        gates, index = probs.topk(self.top_k, dim=-1)
        return probs, gates, index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        probs, gates, index = self.route(tokens)
        self.last_aux_loss = load_balancing_loss(probs, index, self.num_experts)
        self.last_expert_index = index.detach()
        out = torch.zeros_like(tokens)
        # One batched call per expert on the tokens routed to it (not one per token): the rows that
        # chose expert e, and in which of their k slots, give the tokens and their gate values.
        for e, expert in enumerate(self.experts):
            rows, slot = (index == e).nonzero(as_tuple=True)
            if rows.numel():
                weight = gates[rows, slot].unsqueeze(-1).to(tokens.dtype)
                out = out.index_add(0, rows, weight * expert(tokens[rows]))
        return out.reshape(x.shape)


class MoEBlock(nn.Module):
    """Pre-norm block: x + Attn(LN(x)), then x + MLP(LN(x)); the MLP is a :class:`MoEMLP` when ``moe``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float, *, moe: bool, num_experts: int, top_k: int):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        if moe:
            self.mlp = MoEMLP(dim, hidden, num_experts, top_k, dropout)
        else:
            self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionMoE(VisionTransformer):
    """``vit_tiny`` with :class:`MoEBlock` blocks; ``aux_loss`` is the summed load-balancing loss of the last forward."""

    def __init__(self, in_channels: int, num_classes: int, input_size: Sequence[int], patch_size: int, dim: int,
                 depth: int, heads: int, mlp_ratio: float, dropout: float, num_experts: int, top_k: int, moe_every: int):
        super().__init__(in_channels, num_classes, input_size, patch_size, dim, depth, heads, mlp_ratio, dropout)
        # V-MoE's "Every-2" places experts in every other block, ending with the last one; moe_every=1: all blocks.
        self.blocks = nn.ModuleList(
            MoEBlock(dim, heads, mlp_ratio, dropout, moe=(i % moe_every == (depth - 1) % moe_every),
                     num_experts=num_experts, top_k=top_k)
            for i in range(depth)
        )
        self._init_weights()

    def moe_layers(self) -> list[MoEMLP]:
        return [m for m in self.modules() if isinstance(m, MoEMLP)]

    @property
    def aux_loss(self) -> torch.Tensor:
        layers = self.moe_layers()
        return sum((m.last_aux_loss for m in layers), torch.zeros((), device=self.head.weight.device))


@register_model("vit_moe")
def vit_moe(
    in_channels: int | None,
    num_classes: int,
    input_size: tuple[int, ...] | None = None,
    patch_size: int = 4,
    dim: int = 64,
    depth: int = 4,
    heads: int = 4,
    mlp_ratio: float = 2.0,
    dropout: float = 0.0,
    num_experts: int = 4,
    top_k: int = 2,
    moe_every: int = 1,
) -> nn.Module:
    """Small Vision MoE (Riquelme et al. 2021): vit_tiny whose MLPs are top-k routed experts."""
    channels = _image_channels("vit_moe", in_channels, input_size)
    if input_size is None:
        raise ModelError("'vit_moe' needs input_size (H, W) to size its position embedding")
    if not 1 <= int(top_k) <= int(num_experts):
        raise ModelError(f"vit_moe needs 1 <= top_k <= num_experts, got top_k={top_k}, num_experts={num_experts}; "
                         "e.g. num_experts: 4, top_k: 2")
    if int(moe_every) < 1:
        raise ModelError(f"vit_moe moe_every must be >= 1 (1: every block is MoE, 2: every other), got {moe_every}")
    return VisionMoE(channels, num_classes, input_size, int(patch_size), int(dim), int(depth), int(heads), float(mlp_ratio),
                     float(dropout), int(num_experts), int(top_k), int(moe_every))
