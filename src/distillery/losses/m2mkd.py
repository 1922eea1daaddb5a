"""Losses of module-to-module distillation (m2mKD) and of the mixture-of-experts student it trains.

* :func:`hybrid_loss` -- the m2mKD objective of one module pair. Lo, Liang, Du, Fan, Wang, Huang,
  Ma, Fu (2024), "m2mKD: Module-to-Module Knowledge Distillation for Modular Transformers",
  arXiv 2402.16918, Sec. 3 (the distillation objective of a teaching pair; the released code's
  ``m2mKDLoss``): the student hybrid ``S~_i`` (meta model with its i-th layer replaced by student
  module i) learns from the teacher hybrid ``T~_i`` (the same meta model with teacher module i)
  on the same input, plus the task loss on labels:

      L_i = (1 - alpha) * CE(S~_i(x), y) + alpha * T^2 * KL(softmax(T~_i(x)/T) || softmax(S~_i(x)/T))

* :func:`load_balancing_loss` -- the auxiliary loss that keeps a top-k router from sending every
  token to the same few experts. Fedus, Zoph, Shazeer (2022), "Switch Transformers: Scaling to
  Trillion Parameter Models with Simple and Efficient Sparsity", JMLR, eq. (4)-(6), written for
  top-k routing (the V-MoE student routes each token to k experts):

      loss = E * sum_e f_e * P_e,   f_e = (1 / (T k)) * #{(t, j): expert_index[t, j] = e},
                                    P_e = (1 / T) * sum_t router_probs[t, e]

  With k = 1 this is the paper's formula exactly. ``f`` counts routing slots, so it sums to one
  for any k and the loss is 1 under perfectly uniform routing, ``E`` when every token goes to the
  expert that also holds all the probability. Like the paper, only ``P`` carries a gradient
  (``f`` comes from an argmax).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from distillery.losses.logits import cross_entropy, kd


def hybrid_loss(student_hybrid_logits: Tensor, teacher_hybrid_logits: Tensor, targets: Tensor | None, *,
                alpha: float = 0.9, temperature: float = 4.0) -> Tensor:
    """m2mKD's loss of one teaching pair (Lo et al. 2024, Sec. 3): ``(1 - alpha) * CE + alpha * T^2 * KL``.

    The released code weighs the two terms the same way (``alpha_teacher`` / ``1 - alpha_teacher``);
    its KL is divided by ``batch x classes`` (DeiT's legacy ``numel`` reduction), here by the batch,
    as in Hinton et al.'s KD -- a constant factor of ``classes`` on the KD term.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"hybrid_loss: alpha must be in [0, 1] (the weight of the KD term), got {alpha}")
    if targets is None and alpha < 1.0:
        raise ValueError(f"hybrid_loss: targets (class labels) are required for the task term (alpha={alpha} < 1); "
                         "pass them, or alpha=1 for the KD term alone")
    loss = student_hybrid_logits.new_zeros(())
    if alpha < 1.0:
        loss = loss + (1.0 - alpha) * cross_entropy(student_hybrid_logits, None, targets)
    if alpha > 0.0:
        loss = loss + alpha * kd(student_hybrid_logits, teacher_hybrid_logits.detach(), temperature=temperature)
    return loss


def load_balancing_loss(router_probs: Tensor, expert_index: Tensor, num_experts: int) -> Tensor:
    """Switch Transformer load-balancing loss (Fedus et al. 2022, eq. 4-6), top-k form (see module doc).

    ``router_probs``: (tokens, E) softmax of the router; ``expert_index``: (tokens, k) long, the
    experts each token was sent to.
    """
    if router_probs.dim() != 2 or router_probs.shape[1] != num_experts:
        raise ValueError(f"load_balancing_loss: router_probs must be (tokens, {num_experts}), got {tuple(router_probs.shape)}")
    if expert_index.dim() != 2 or expert_index.shape[0] != router_probs.shape[0]:
        raise ValueError(f"load_balancing_loss: expert_index must be (tokens, k) with {router_probs.shape[0]} tokens, "
                         f"got {tuple(expert_index.shape)}")
    if expert_index.numel() and (int(expert_index.min()) < 0 or int(expert_index.max()) >= num_experts):
        raise ValueError(f"load_balancing_loss: expert_index must lie in [0, {num_experts}), "
                         f"got values in [{int(expert_index.min())}, {int(expert_index.max())}]")
    slots = F.one_hot(expert_index, num_experts).to(router_probs.dtype)  # (tokens, k, E)
    fraction_routed = slots.sum(dim=(0, 1)) / max(1, expert_index.numel())  # f_e
    mean_prob = router_probs.mean(dim=0)  # P_e
    return num_experts * torch.sum(fraction_routed * mean_prob)


def imitation_loss(predicted: Tensor, target: Tensor) -> Tensor:
    """Mean squared error between a meta-model layer's output and the teacher module's output on
    the same input -- how this package prepares the meta model (see ``methods/m2mkd.py``; the
    paper pretrains it end to end on labels instead)."""
    if predicted.shape != target.shape:
        raise ValueError(f"imitation_loss: shapes differ, {tuple(predicted.shape)} vs {tuple(target.shape)}")
    return F.mse_loss(predicted.float(), target.detach().float())
