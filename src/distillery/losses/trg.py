"""TRG: knowledge distillation via a token-level relationship graph.

Zhang, Liu, He (2023), "Knowledge Distillation via Token-level Relationship Graph" (arXiv
2306.12442).  Nodes of the graph are token embeddings -- the patch tokens of a ViT, the spatial
positions (patches) of a CNN feature map -- sampled from every image of the batch, so the graph
has intra-instance edges (tokens of one image) and inter-instance edges (tokens of different
images).  The paper's objective is

    L = L_logit + alpha L_inner + beta L_local + gamma L_global,

and this module holds its three token terms, as pure functions of token tensors:

* :func:`inner_contextual_loss` (L_inner, the "contextual loss"): inside each image, the token
  context matrix CS = softmax(F F^T / sqrt(D)) of the student must match the teacher's (MSE);
* :func:`local_preserving_loss` (L_local): on the k-NN graph of the sampled tokens with Gaussian
  edge weights A_ij = exp(-||T_i - T_j||^2 / (2 sigma)), each node's softmax distribution over its
  neighbours' edge weights must match the teacher's (KL, student first, as written in the paper);
* :func:`global_relation_loss` (L_global): InfoNCE over all sampled nodes -- a student token must
  pick out the teacher token at the same place of the same image among every other node, by
  cosine similarity at temperature tau_g (the method lowers tau_g during training: coarse global
  structure first, fine structure later).

Where the text leaves a choice open, the choice made (and why) is stated at each function.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _nodes(x: Tensor, name: str) -> Tensor:
    if x.dim() != 2:
        raise ValueError(f"{name} must be graph nodes of shape (M, D), one token per row, got {tuple(x.shape)}")
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _node_pair(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    s, t = _nodes(student, "student nodes"), _nodes(teacher, "teacher nodes")
    if s.shape[0] != t.shape[0]:
        raise ValueError(f"student and teacher graphs need the same nodes (the same sampled tokens), "
                         f"got {s.shape[0]} vs {t.shape[0]}")
    if s.shape[0] < 2:
        raise ValueError(f"a relationship graph needs at least 2 nodes, got {s.shape[0]}")
    return s, t.to(s.dtype)


def squared_distances(x: Tensor) -> Tensor:
    """(M, M) squared Euclidean distances between rows; no square root, so the gradient is finite
    on the diagonal."""
    sq = (x * x).sum(dim=1)
    return (sq[:, None] + sq[None, :] - 2.0 * x @ x.T).clamp_min(0.0)


def knn_neighbours(nodes: Tensor, k: int) -> Tensor:
    """(M, k) indices of each node's k nearest other nodes (Euclidean); ``k`` is capped at M - 1."""
    d = squared_distances(nodes.detach())
    d.fill_diagonal_(float("inf"))  # a node is not its own neighbour
    return d.topk(min(k, nodes.shape[0] - 1), dim=1, largest=False).indices


def gaussian_edges(nodes: Tensor, neighbours: Tensor, *, sigma: float) -> Tensor:
    """(M, k) edge weights A_ij = exp(-||T_i - T_j||^2 / (2 sigma)) to each node's neighbours."""
    diff = nodes[:, None, :] - nodes[neighbours]
    return torch.exp(-(diff * diff).sum(-1) / (2.0 * sigma))


def local_preserving_loss(student: Tensor, teacher: Tensor, *, k: int = 8, sigma: float = 1.0) -> Tensor:
    """L_local of TRG: mean over nodes i of KL( softmax_j A^S_ij || softmax_j A^T_ij ).

    Nodes are rows of (M, D) tensors, the same sampled tokens on both sides (widths may differ:
    each graph lives in its own model's space).  Choices: the neighbourhoods are the teacher's
    k-NN graph, used for both models -- the two softmaxes must run over the same j for the KL to
    be defined, and the teacher's graph is the structure to preserve (as in Yang et al. 2020's
    local structure preserving loss, which this term follows); the softmax runs over the
    neighbours only (an off-graph A_ij = 0 inside a softmax over all nodes would give every
    non-neighbour weight e^0 and drown the local structure); the sum over nodes of the paper is
    a mean here, so the weight does not scale with the number of sampled tokens.
    """
    s, t = _node_pair(student, teacher)
    if k < 1 or sigma <= 0:
        raise ValueError(f"need k >= 1 neighbours and sigma > 0, got k={k}, sigma={sigma}")
    neighbours = knn_neighbours(t, k)
    log_p_s = F.log_softmax(gaussian_edges(s, neighbours, sigma=sigma), dim=1)
    log_p_t = F.log_softmax(gaussian_edges(t, neighbours, sigma=sigma), dim=1)
    return (log_p_s.exp() * (log_p_s - log_p_t)).sum(dim=1).mean()


def global_relation_loss(student: Tensor, teacher: Tensor, *, temperature: float = 0.1) -> Tensor:
    """L_global of TRG: InfoNCE over the graph's nodes,
    mean_i -log( exp(cos(S_i, T_i) / tau) / sum_j exp(cos(S_i, T_j) / tau) ).

    Node i of the student (projected to the teacher's width beforehand) is the anchor, the teacher
    node at the same place is its positive, every other teacher node -- of the same image or of
    another -- a negative.  The paper sums over nodes; a mean here (weight independent of M)."""
    s, t = _node_pair(student, teacher)
    if s.shape[1] != t.shape[1]:
        raise ValueError(f"the global loss compares student and teacher nodes directly: widths differ "
                         f"({s.shape[1]} vs {t.shape[1]}); project the student nodes to the teacher's width first")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = F.normalize(s, dim=1) @ F.normalize(t, dim=1).T / temperature
    return F.cross_entropy(logits, torch.arange(s.shape[0], device=s.device))


def context_matrix(tokens: Tensor) -> Tensor:
    """(B, N, N) CS = softmax(F F^T / sqrt(D)) of tokens (B, N, D), row-wise: how each token of an
    image attends to the image's other tokens."""
    return torch.softmax(tokens @ tokens.transpose(1, 2) / math.sqrt(tokens.shape[-1]), dim=-1)


def inner_contextual_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """L_inner of TRG: MSE(CS^S, CS^T) over the (B, N, N) context matrices of
    :func:`context_matrix`.  Tokens (B, N, D): the same N places on both sides, any widths."""
    for name, x in (("student tokens", student), ("teacher tokens", teacher)):
        if x.dim() != 3:
            raise ValueError(f"{name} must have shape (B, N, D) (images, tokens, width), got {tuple(x.shape)}")
    if student.shape[:2] != teacher.shape[:2]:
        raise ValueError(f"student and teacher need the same images and token places, got (B, N) = "
                         f"{tuple(student.shape[:2])} vs {tuple(teacher.shape[:2])}; resample the token grids first")
    if student.shape[1] < 2:
        raise ValueError("the inner-instance context of a single token is the constant 1 (a 1x1 softmax): "
                         "tap a layer with several tokens (a feature map or a token sequence), or switch this term off")
    s = student.float() if student.dtype in (torch.float16, torch.bfloat16) else student
    return F.mse_loss(context_matrix(s), context_matrix(teacher.to(s.dtype)))
