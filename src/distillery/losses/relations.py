"""Relation-based distillation losses: the student matches how the teacher relates the samples
of a batch to each other, not the teacher's features themselves.

Every function takes a student and a teacher tensor of shape (N, ...) holding one row per
sample of the same batch; rows are flattened to vectors, so the two sides may have any
(different) widths and shapes -- a CNN map and an MLP vector compare without a projector,
because only N x N (or N x N x N) relation tensors are matched.  Half-precision inputs are
upcast to float32.  Nothing here detaches the teacher: the engine's teacher outputs carry no
graph, and where a teacher-side head is learnable (CRD) its gradient is wanted.

Where the authors' released code differs from the paper's formula we follow the code (it is what
published numbers were measured with, and what torchdistill reproduces) and say so.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _rows(x: Tensor, name: str = "features") -> Tensor:
    if x.dim() < 2:
        raise ValueError(f"{name} need shape (N, ...) with one row per sample, got {tuple(x.shape)}")
    x = x.flatten(1)
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _pair(student: Tensor, teacher: Tensor, min_rows: int = 1) -> tuple[Tensor, Tensor]:
    s, t = _rows(student, "student features"), _rows(teacher, "teacher features")
    if s.shape[0] != t.shape[0]:
        raise ValueError(f"batch sizes differ: student {tuple(student.shape)} vs teacher {tuple(teacher.shape)}")
    if s.shape[0] < min_rows:
        raise ValueError(f"this loss relates samples to each other and needs at least {min_rows} rows, got {s.shape[0]}")
    if s.dtype != t.dtype:
        dtype = torch.promote_types(s.dtype, t.dtype)
        s, t = s.to(dtype), t.to(dtype)
    return s, t


# ----------------------------------------------------------------------------------------------
# RKD -- Park, Kim, Lu, Cho (2019), "Relational Knowledge Distillation", CVPR.


def pairwise_distances(e: Tensor, *, eps: float = 1e-12) -> Tensor:
    """Euclidean distances between the rows of ``e`` (N, D): an (N, N) matrix with a zero diagonal.

    Computed from ``|a|^2 + |b|^2 - 2 a.b`` clamped at ``eps`` before the square root (so the
    gradient stays finite for coincident rows), as in the RKD authors' code.
    """
    sq = e.pow(2).sum(1)
    d = (sq[:, None] + sq[None, :] - 2 * e @ e.T).clamp(min=eps).sqrt()
    return d * (1 - torch.eye(len(e), dtype=d.dtype, device=d.device))


def _normalised_distances(e: Tensor, eps: float) -> Tensor:
    d = pairwise_distances(e, eps=eps)
    n = len(e)
    mu = d.sum() / (n * (n - 1))  # mean over the N(N-1) ordered pairs i != j
    return d / mu


def rkd_distance(student: Tensor, teacher: Tensor, *, eps: float = 1e-12) -> Tensor:
    """RKD distance-wise loss: Huber loss between the distance potentials of student and teacher.

    Park et al. (2019), Sec. 3.2.1, eqs. (3)-(5): psi_D(t_i, t_j) = ||t_i - t_j||_2 / mu, with mu
    the mean distance over the pairs of the batch, and L_RKD-D = sum_{(i,j)} l_delta(psi_D(t_i,
    t_j), psi_D(s_i, s_j)), l_delta the Huber loss with delta = 1 (= ``smooth_l1``).  Dividing
    by mu makes the loss invariant to scaling either embedding by a positive constant.

    As in the authors' code: the mean over all N x N entries (the diagonal contributes 0 on both
    sides) instead of the sum over pairs -- a factor N^2 that the loss weight absorbs.
    """
    s, t = _pair(student, teacher, min_rows=2)
    return F.smooth_l1_loss(_normalised_distances(s, eps), _normalised_distances(t, eps))


def angle_potentials(e: Tensor) -> Tensor:
    """cos of the angle at vertex i between rows j and k: ``out[i, j, k] = <u_ij, u_ik>`` with
    ``u_ij = (e_j - e_i) / ||e_j - e_i||`` (0 when j == i), shape (N, N, N)."""
    u = F.normalize(e[None, :, :] - e[:, None, :], p=2, dim=2)
    return torch.bmm(u, u.transpose(1, 2))


def rkd_angle(student: Tensor, teacher: Tensor) -> Tensor:
    """RKD angle-wise loss: Huber loss between the angle potentials of all triplets.

    Park et al. (2019), Sec. 3.2.2, eqs. (6)-(7): psi_A(t_i, t_j, t_k) = cos angle(t_i t_j t_k)
    = <e_ij, e_kj>, e_ij = (t_i - t_j) / ||t_i - t_j||_2, and L_RKD-A = sum over triplets of
    l_delta(psi_A(t), psi_A(s)) (Huber, delta = 1).  Angles are invariant to translating,
    rotating and scaling an embedding.

    As in the authors' code: the mean over all N^3 index triplets, degenerate ones included (they
    give equal values, so zero difference, on both sides) -- a constant factor against the
    paper's sum over distinct triplets.
    """
    s, t = _pair(student, teacher, min_rows=3)
    return F.smooth_l1_loss(angle_potentials(s), angle_potentials(t))


# ----------------------------------------------------------------------------------------------
# Similarity-preserving KD -- Tung & Mori (2019), "Similarity-Preserving Knowledge Distillation", ICCV.


def similarity_matrix(feat: Tensor) -> Tensor:
    """G = row-wise L2 normalisation of Q Q^T, Q the (N, C*H*W) reshaped activations: (N, N).

    Tung & Mori (2019), Sec. 3, eqs. (1)-(2)."""
    q = _rows(feat)
    return F.normalize(q @ q.T, p=2, dim=1)


def similarity_preserving(student: Tensor, teacher: Tensor) -> Tensor:
    """Similarity-preserving loss L_SP = ||G_T - G_S||_F^2 / b^2 for one layer pair.

    Tung & Mori (2019), eq. (3): G are the row-normalised batch similarity matrices of
    :func:`similarity_matrix`, b the batch size; the paper sums over layer pairs and weighs
    the sum by gamma (eq. (4)) -- the method does that.  Invariant to scaling either feature
    tensor and to any orthogonal transform of either feature space.
    """
    s, t = _pair(student, teacher)
    b = s.shape[0]
    return (similarity_matrix(t) - similarity_matrix(s)).pow(2).sum() / (b * b)


# ----------------------------------------------------------------------------------------------
# PKT -- Passalis & Tefas (2018), "Learning Deep Representations with Probabilistic Knowledge Transfer", ECCV.


def cosine_conditional(e: Tensor, *, eps: float = 1e-7) -> Tensor:
    """Conditional probabilities p_{j|i} from the cosine kernel K(a, b) = (cos(a, b) + 1) / 2,
    each row normalised to sum 1: (N, N).

    Passalis & Tefas (2018), Sec. 3: p_{i|j} = K(x_i, x_j) / sum_k K(x_k, x_j) with the cosine
    kernel.  As in the authors' code the kernel's diagonal (K = 1) stays in the sum (the paper
    excludes k = j), and rows are normalised by ``||x|| + eps``.
    """
    e = e / (e.norm(dim=1, keepdim=True) + eps)
    k = (e @ e.T + 1.0) / 2.0
    return k / k.sum(dim=1, keepdim=True)


def pkt(student: Tensor, teacher: Tensor, *, eps: float = 1e-7) -> Tensor:
    """Probabilistic knowledge transfer: KL divergence between the teacher's and the student's
    conditional distributions over the batch, sum_{i,j} p_{j|i} log(p_{j|i} / q_{j|i}).

    Passalis & Tefas (2018), Sec. 3 (the divergence between the two kernel-density conditionals,
    with the cosine kernel).  As in the authors' code: the mean over the N x N terms (not the sum)
    and ``eps`` added inside the log.  Cosine similarities make it invariant to scaling each
    embedding and to rotating either embedding space.
    """
    s, t = _pair(student, teacher)
    p_t, p_s = cosine_conditional(t, eps=eps), cosine_conditional(s, eps=eps)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


# ----------------------------------------------------------------------------------------------
# CRD -- Tian, Krishnan, Isola (2020), "Contrastive Representation Distillation", ICLR.


def crd_scores(anchor: Tensor, positive: Tensor, negatives: Tensor, *, temperature: float = 0.07) -> Tensor:
    """Unnormalised critic values exp(<a, v> / tau) for the positive and each negative: (B, 1 + K).

    ``anchor`` and ``positive`` are (B, d) L2-normalised embeddings (one model's view and the other
    model's view of the same sample); ``negatives`` are (K, d) shared by every row (a memory bank)
    or (B, K, d) drawn per row.  Column 0 is the positive.  Computed in float32 at least (e^{1/0.07}
    overflows float16).
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    dtype = torch.promote_types(anchor.dtype, torch.float32)
    a, p, n = anchor.to(dtype), positive.to(dtype), negatives.to(dtype)
    pos = (a * p).sum(dim=1, keepdim=True)
    neg = a @ n.T if n.dim() == 2 else torch.bmm(n, a.unsqueeze(2)).squeeze(2)
    return torch.cat([pos, neg], dim=1).div(temperature).exp()


def crd_normaliser(scores: Tensor, n_data: int) -> Tensor:
    """Monte-Carlo estimate of the partition constant Z = n_data * mean(scores), so that
    scores / Z approximates a distribution over the ``n_data`` items negatives are drawn from.
    CRD (and its code) sets it once, from the first batch, and keeps it fixed."""
    return scores.detach().mean() * n_data


def crd_nce_loss(scores: Tensor, *, z: Tensor | float, n_data: int, eps: float = 1e-7) -> Tensor:
    """CRD's NCE loss for one direction (anchor from one model, memory of the other).

    Tian et al. (2020), Sec. 3.1: with P = scores / Z, K = scores.shape[1] - 1 negatives and
    the uniform noise distribution P_n = 1 / n_data, the critic is h = P / (P + K P_n) (the
    paper's e^{<g_T, g_S>/tau} / (e^{...} + N/M)), and the loss is
    -(sum_i log h(positive_i) + sum_{i,k} log(1 - h(negative_ik))) / B.
    """
    b, m = scores.shape[0], scores.shape[1] - 1
    if m < 1:
        raise ValueError("crd_nce_loss needs at least one negative (scores of shape (B, 1 + K), K >= 1)")
    p = scores / z
    mpn = m / float(n_data)
    log_pos = torch.log(p[:, 0] / (p[:, 0] + mpn + eps))
    log_neg = torch.log(mpn / (p[:, 1:] + mpn + eps))
    return -(log_pos.sum() + log_neg.sum()) / b
