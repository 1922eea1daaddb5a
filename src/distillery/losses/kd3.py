"""KD^3: distillation on webly collected data -- instance selection, MixDistribution, instance alignment.

Tang, Chen, Niu, Sugiyama & Gong (2023), "Distribution Shift Matters for Knowledge Distillation with
Webly Collected Images", ICCV.  The student only ever sees an unlabelled pool collected from the web,
whose distribution differs from the teacher's private training data.  Three pieces are pure
functions here:

* dynamic instance selection: a web instance is used when the *combined* prediction of teacher
  and student is confident (:func:`combined_prediction`, :func:`select_instances`); KD then runs on
  the selected instances only (:func:`selected_kd`);
* MixDistribution: perturbed data "with a new distribution" made by mixing the first- and
  second-order statistics (per-channel mean / standard deviation) of two instances' features
  (:func:`mix_distribution`, the statistic mixing of MixStyle, Zhou, Yang, Qiao & Xiang 2021,
  "Domain Generalization with MixStyle", ICLR, eq. (4)-(5));
* instance alignment: a contrastive (InfoNCE) loss pulling each instance's representation on the
  perturbed data towards its own representation on the original, away from the other instances'
  (:func:`instance_contrastive`, van den Oord, Li & Vinyals 2018, "Representation Learning with
  Contrastive Predictive Coding", eq. (4), symmetric as in CLIP).

We could read the paper's abstract but not its equations; the exact weighting of the combined
prediction and the form of the contrastive block follow the description above and are stated as
our reading in :mod:`distillery.methods.kd3`.  The paper's third component (aligning weighted
features and classifier parameters of the two networks) is not implemented.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from distillery.losses.logits import _check_pair, _kl, _log_probs, _check_temperature, _upcast

__all__ = ["combined_prediction", "instance_contrastive", "mix_distribution", "select_instances", "selected_kd"]


def combined_prediction(teacher_logits: Tensor, student_logits: Tensor, student_weight: float) -> Tensor:
    """Per class ``(1 - w) p_t + w p_s / max(p_s)``: the teacher's class probabilities mixed, with the
    student's share ``w`` in [0, 1], with the student's *vote* -- its probabilities relative to its own
    top class (1 for the class it prefers).  A constant (no gradient): it only selects.

    Why the vote and not ``p_s`` itself: a student that already ranks the classes like the teacher
    but is not yet sure of them (KD at a high temperature sharpens its T = 1 outputs slowly) would
    otherwise drag every mixture under the threshold; nothing would be selected and it would never
    learn.  With the vote, agreeing with the teacher never lowers an instance's score, and a student
    that prefers another class lowers it by ``w (1 - p_s[c] / max p_s)``."""
    _check_pair(student_logits, teacher_logits)
    if not 0.0 <= student_weight <= 1.0:
        raise ValueError(f"student_weight must lie in [0, 1], got {student_weight}")
    p_t = torch.softmax(_upcast(teacher_logits.detach()), -1)
    p_s = torch.softmax(_upcast(student_logits.detach()), -1)
    vote = p_s / p_s.max(-1, keepdim=True).values
    return (1 - student_weight) * p_t + student_weight * vote


def select_instances(combined: Tensor, threshold: float, *, teacher_logits: Tensor | None = None,
                     student_logits: Tensor | None = None) -> Tensor:
    """Bool mask of the instances whose combined score reaches ``threshold`` in its top class;
    given both networks' logits, also require that their top classes agree."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must lie in [0, 1], got {threshold}")
    keep = combined.max(-1).values >= threshold
    if teacher_logits is not None and student_logits is not None:
        keep = keep & (teacher_logits.argmax(-1) == student_logits.argmax(-1))
    return keep


def selected_kd(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, *, temperature: float = 4.0) -> Tensor:
    """``T^2 * sum_i m_i KL(softmax(t_i/T) || softmax(s_i/T)) / max(1, sum_i m_i)``: Hinton KD over the
    selected instances only.  No instance selected: 0, with zero gradient (not NaN)."""
    _check_pair(student_logits, teacher_logits)
    _check_temperature(temperature)
    if mask.shape != student_logits.shape[:-1]:
        raise ValueError(f"mask {tuple(mask.shape)} must have the logits' leading shape {tuple(student_logits.shape[:-1])}")
    per_instance = _kl(_log_probs(teacher_logits, temperature), _log_probs(student_logits, temperature)) * temperature**2
    m = mask.to(per_instance.dtype)
    return (per_instance * m).sum() / m.sum().clamp(min=1)


def mix_distribution(feat: Tensor, perm: Tensor, lam: Tensor, *, eps: float = 1e-6) -> Tensor:
    """Re-style every instance with statistics mixed from itself and a partner:

        mu, sigma = mean / std of ``feat_i`` per channel (over all dims after the channel dim)
        out_i = (lam_i sigma_i + (1 - lam_i) sigma_perm(i)) * (feat_i - mu_i) / sigma_i
                + lam_i mu_i + (1 - lam_i) mu_perm(i)

    ``feat`` is ``(N, C, ...)`` (images or conv maps: statistics over the spatial dims) or ``(N, D)``
    (vectors: one statistic pair over the D features).  As in MixStyle the statistics are treated
    as constants (no gradient through mu, sigma).  ``lam_i = 1`` returns ``feat_i`` unchanged."""
    n = feat.shape[0]
    if perm.shape != (n,) or lam.shape != (n,):
        raise ValueError(f"perm and lam must be ({n},) tensors; got {tuple(perm.shape)} and {tuple(lam.shape)}")
    x = feat if feat.dim() > 2 else feat[:, None, :]
    dims = tuple(range(2, x.dim()))
    mu = x.mean(dims, keepdim=True).detach()
    sigma = (x.var(dims, keepdim=True, unbiased=False) + eps).sqrt().detach()
    w = lam.to(x.dtype).view((-1,) + (1,) * (x.dim() - 1))
    mu_mix = w * mu + (1 - w) * mu[perm]
    sigma_mix = w * sigma + (1 - w) * sigma[perm]
    out = (x - mu) / sigma * sigma_mix + mu_mix
    return out if feat.dim() > 2 else out[:, 0, :]


def instance_contrastive(z_perturbed: Tensor, z_original: Tensor, mask: Tensor | None = None, *,
                         temperature: float = 0.5) -> Tensor:
    """Symmetric InfoNCE between two views of the same instances: with cosine similarities
    ``S_ij = <z~_i, z_j> / (|z~_i| |z_j| tau)``, the loss is the mean of ``CE(S, i -> i)`` over rows and
    over columns, among the instances in ``mask`` (all if None).  Fewer than two instances: 0."""
    if z_perturbed.shape != z_original.shape or z_perturbed.dim() != 2:
        raise ValueError(f"expected two (N, D) representations of equal shape, got {tuple(z_perturbed.shape)} "
                         f"and {tuple(z_original.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if mask is not None:
        z_perturbed, z_original = z_perturbed[mask], z_original[mask]
    n = z_perturbed.shape[0]
    if n < 2:
        return (z_perturbed.sum() + z_original.sum()) * 0.0  # nothing to contrast: zero, graph kept
    a = F.normalize(_upcast(z_perturbed), dim=-1)
    b = F.normalize(_upcast(z_original), dim=-1)
    sim = a @ b.T / temperature
    labels = torch.arange(n, device=sim.device)
    return (F.cross_entropy(sim, labels) + F.cross_entropy(sim.T, labels)) / 2
