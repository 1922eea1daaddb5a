"""LELP: pseudo-subclasses from linear projections of the teacher's embeddings.

Loo, Iliopoulos, Hu, Vee (2024), "Linear Projections of Teacher Embeddings for Few-Class
Distillation" (arXiv:2409.20449), Sec. 3.  With few classes the teacher's probabilities carry
little information, but its penultimate embeddings keep finer structure.  LELP

1. per class c, finds S informative directions of the teacher's training embeddings: the top S
   principal components of the class's embeddings, after projecting them onto the null space of
   the teacher's classifier weights (the directions that do not already show in the logits),
   then mixed by a random S x S rotation so that the S directions carry equal variance in
   expectation (:func:`subclass_basis`);
2. splits each class into S pseudo-subclasses with the teacher's probability
   ``p(c, s) = p_c * softmax_s(z_{c,s} / beta)``, z_{c,s} the sample's coordinate along direction
   s of class c and beta the subclass temperature (:func:`subclass_targets`);
3. trains the student on these S*C soft labels with one cross-entropy; the student's class
   probability is the sum of its subclass probabilities (:func:`lelp_loss`).

Our choices where the equations we could read (a review's quotation of Sec. 3.2) leave room:
the coordinates are centred on the class mean (PCA coordinates) and divided by the class's
root-mean top-S eigenvalue, so ``beta`` is in units of standard deviations and one default
serves teachers of any embedding scale; the class probabilities are softened by a temperature T
and that part of the loss is scaled by T^2, as in KD, the within-class part is not
(:func:`lelp_loss`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from distillery.losses.logits import _check_temperature, _upcast


def null_space_projector(weight: Tensor) -> Tensor:
    """``P = I - W^+ W`` (D, D): the orthogonal projector onto the null space of a (C, D)
    classifier weight, so that ``W P x = 0`` -- the part of an embedding the logits cannot see."""
    w = weight.double()
    return torch.eye(w.shape[1], dtype=w.dtype, device=w.device) - torch.linalg.pinv(w) @ w


def class_moments(emb: Tensor, targets: Tensor, num_classes: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-class (count (C,), sum (C, D), sum of outer products (C, D, D)) of the embeddings, in
    float64: batches add up to the statistics of a whole training set."""
    e = emb.detach().double()
    onehot = F.one_hot(targets, num_classes).double()  # (N, C)
    # one (D, D) product per class: an einsum over (N, C, D, D) would not fit for wide embeddings
    outers = torch.stack([e[targets == c].T @ e[targets == c] for c in range(num_classes)])
    return onehot.sum(0), onehot.T @ e, outers


def random_rotation(size: int, generator: torch.Generator) -> Tensor:
    """A Haar-random (size, size) orthogonal matrix (QR of a Gaussian matrix, signs fixed)."""
    q, r = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def subclass_basis(counts: Tensor, sums: Tensor, outers: Tensor, n_subclasses: int, *,
                   projector: Tensor | None = None, generator: torch.Generator | None = None
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """``(centres (C, D), directions (C, S, D), scales (C,))`` from :func:`class_moments`.

    Per class: the covariance of its embeddings (projected by ``projector`` when given, e.g.
    :func:`null_space_projector`), its top-S eigenvectors, mixed by a random rotation drawn from
    ``generator`` (none: no rotation, plain principal directions), and the scale sqrt(mean of
    the top-S eigenvalues) used to standardise the coordinates (1 for a class without spread)."""
    num_classes, dim = sums.shape
    if not 1 <= n_subclasses <= dim:
        raise ValueError(f"n_subclasses must be in [1, {dim}] (the embedding width), got {n_subclasses}")
    n = counts.double().clamp_min(1).view(-1, 1)
    centres = sums.double() / n
    cov = outers.double() / n.unsqueeze(-1) - centres.unsqueeze(2) * centres.unsqueeze(1)
    if projector is not None:
        cov = projector @ cov @ projector
    evals, evecs = torch.linalg.eigh((cov + cov.transpose(1, 2)) / 2)  # ascending
    top = evecs[:, :, -n_subclasses:].flip(-1)  # (C, D, S), largest first
    if generator is not None:
        top = top @ torch.stack([random_rotation(n_subclasses, generator) for _ in range(num_classes)])
    spread = evals[:, -n_subclasses:].clamp_min(0).mean(dim=1)
    scales = torch.where(spread > 1e-12, spread.sqrt(), torch.ones_like(spread))
    return centres, top.transpose(1, 2).contiguous(), scales


def subclass_targets(teacher_logits: Tensor, teacher_emb: Tensor, centres: Tensor, directions: Tensor,
                     scales: Tensor, *, temperature: float = 1.0, beta: float = 1.0) -> Tensor:
    """The teacher's pseudo-subclass distribution (N, C, S):
    ``p(c, s) = softmax(t / T)_c * softmax_s(z_{c,s} / beta)`` with the standardised coordinate
    ``z_{c,s} = <h - mu_c, v_{c,s}> / scale_c`` of the embedding h along subclass direction s of
    class c.  Summed over s it gives back the teacher's class probabilities."""
    _check_temperature(temperature)
    if not beta > 0:
        raise ValueError(f"beta (the subclass temperature) must be > 0, got {beta}")
    c, s, d = directions.shape
    if teacher_logits.shape[-1] != c or teacher_emb.shape[-1] != d or teacher_emb.shape[0] != teacher_logits.shape[0]:
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} and embeddings {tuple(teacher_emb.shape)} "
                         f"do not match the basis ({c} classes x {s} subclasses, width {d})")
    h = teacher_emb.detach().to(directions.dtype)
    z = (torch.einsum("nd,csd->ncs", h, directions) - torch.einsum("cd,csd->cs", centres, directions)) / scales.view(c, 1)
    p_class = F.softmax(_upcast(teacher_logits).detach().to(directions.dtype) / temperature, dim=-1)
    return p_class.unsqueeze(-1) * F.softmax(z / beta, dim=-1)


def joint_log_probs(class_logits: Tensor, subclass_logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """The student's (N, C, S) log-probabilities ``log softmax(z / T)_c + log softmax_s(u_c)``:
    a distribution over the C*S subclasses whose class marginal is softmax(z / T), i.e. the
    student's own classifier, which therefore is the sum of its subclass probabilities."""
    return (F.log_softmax(_upcast(class_logits) / temperature, dim=-1).unsqueeze(-1)
            + F.log_softmax(_upcast(subclass_logits), dim=-1))


def lelp_loss(class_logits: Tensor, subclass_logits: Tensor, subclass_probs: Tensor, *,
              temperature: float = 1.0) -> Tensor:
    """LELP loss: KL(p || q) over the C*S pseudo-subclasses, its class part scaled by T^2 as in KD.

    ``class_logits`` z (N, C): the student's classifier; ``subclass_logits`` u (N, C, S): its extra
    subclass head (only the split within each class is read from it); ``subclass_probs`` p
    (N, C, S): the teacher's :func:`subclass_targets`.  With q = :func:`joint_log_probs` the KL
    splits exactly into a class part and a within-class part,

        KL(p || q) = KL(p_c || softmax(z / T)) + sum_c p_c KL(p(s | c) || softmax(u_c)),

    and, as in KD, the class part -- whose targets are softened by T -- is multiplied by T^2; the
    within-class targets are not softened by T (beta sets their sharpness), so that part is not.
    At T = 1 this is the paper's single cross-entropy over the C*S subclasses less the targets'
    entropy (a constant: same gradients, and 0 at a perfect match); with S = 1 it is exactly
    KD (:func:`distillery.losses.logits.kd`).  Averaged over the batch."""
    _check_temperature(temperature)
    if subclass_logits.dim() != 3 or subclass_logits.shape != subclass_probs.shape or \
            subclass_logits.shape[:2] != class_logits.shape:
        raise ValueError(f"need class logits (N, C), subclass logits and targets (N, C, S); got "
                         f"{tuple(class_logits.shape)}, {tuple(subclass_logits.shape)}, {tuple(subclass_probs.shape)}")
    p = subclass_probs.detach().to(torch.promote_types(_upcast(class_logits).dtype, subclass_probs.dtype))
    p_class = p.sum(-1)
    p_within = p / p_class.clamp_min(1e-30).unsqueeze(-1)
    log_q_class = F.log_softmax(_upcast(class_logits) / temperature, dim=-1)
    log_q_within = F.log_softmax(_upcast(subclass_logits), dim=-1)
    class_kl = (torch.xlogy(p_class, p_class) - p_class * log_q_class).sum(-1)
    within_kl = (p_class * (torch.xlogy(p_within, p_within) - p_within * log_q_within).sum(-1)).sum(-1)
    return (class_kl * temperature**2 + within_kl).mean()
