"""Swing distillation: per-sample temperatures set by estimated private information, plus noisy soft targets.

Li, Wu, Dong, Wu, Bian, Xiong (2022), "Swing Distillation: A Privacy-Preserving Knowledge
Distillation Framework", arXiv:2212.08349. The paper's two mechanisms:

1. **Privacy-adaptive temperature.** Instead of one temperature T, each position (a token in
   the paper, a sample here) gets its own T_i, raised with the likelihood pi_i that the
   position carries private information of the teacher's training data, so the teacher's
   knowledge about private positions reaches the student only heavily softened.
2. **Noisy soft targets.** Noise is injected into the soft targets the student sees, so no
   soft target is transferred unshielded.

The conventions of :mod:`distillery.losses.logits` hold (class dim last, any leading dims,
half inputs upcast, mean over positions, ``-100`` targets left out).

UNCERTAIN -- how the paper is followed. We could not read the paper's method section (only its
abstract), so the concrete definitions below are our reconstruction; each is a documented,
replaceable choice:

* **Estimate of private information** (``swing_privacy_score``). The paper estimates, per
  token, the likelihood of private content. An image classifier has no token tagger, so we
  estimate what the teacher knows that a model *without* access to the private data does not
  predict: the gap d_i = TV(p_T, p_S) = 0.5 * sum_c |p_T,c - p_S,c| (temperature 1) between
  teacher and student. The student only learns what the soft targets transfer, so a sample
  the teacher memorised (a canary with a random label) keeps a large gap while generalisable
  knowledge, which the student picks up from the other samples, closes it. By default the gap
  is taken relative to the batch, pi_i = clamp((d_i - median d) / (1 - median d), 0, 1): only
  gaps that stand out count (an absolute gap is large for every sample early in training and
  would soften every target). Either way pi is detached. Hard but public samples also stand
  out, which is where the accuracy cost of the method comes from.
* **Temperature from pi** (``swing_temperature``): linear, T_i = t_min + (t_max - t_min) * pi_i.
* **Noise** (``noisy_soft_targets``): Laplace noise of scale b on the tempered teacher
  probabilities, then clamped at 0 and renormalised (post-processing), i.e. the Laplace
  mechanism on a probability vector; with L1 sensitivity 2 one release is (2/b)-DP. Noise is
  drawn afresh at every step and no privacy accounting across steps is done here, so **no
  formal DP guarantee is claimed**.
* **Scale.** Hinton's T^2 factor compensates the 1/T^2 shrinkage of soft-target gradients;
  applied per sample (T_i^2) it would give back exactly the signal a high T_i is meant to
  hide (at high T, T^2 KL tends to logit matching). So every position is scaled by the base
  temperature t_min^2: at pi = 0 the loss is Hinton KD at T = t_min, and private positions
  get a weaker (and, with noise, noise-dominated) signal.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from distillery.losses.logits import (
    IGNORE_INDEX,
    _check_non_negative,
    _check_pair,
    _check_targets,
    _check_temperature,
    _mean_over_positions,
    _upcast,
)

__all__ = ["laplace_noise", "noisy_soft_targets", "swing_kd", "swing_privacy_score", "swing_temperature"]


def swing_privacy_score(student_logits: Tensor, teacher_logits: Tensor, *, relative: bool = True) -> Tensor:
    """Estimated private information per position, in [0, 1], detached.

    d_i = TV(softmax(z_t,i), softmax(z_s,i)) = 0.5 * sum_c |p_T - p_S|, the teacher/student gap
    (our estimator for the paper's "likelihood that a position contains private information",
    see the module docstring). ``relative=False`` returns d_i itself. ``relative=True`` (default)
    measures it against the batch: pi_i = clamp((d_i - m) / (1 - m), 0, 1) with m the median gap
    of the valid positions, so only positions whose gap stands out from what the student still
    gets wrong everywhere count as private (early in training every gap is large, and an
    absolute gap would soften every target). Shape ``(...)`` for logits ``(..., C)``.
    """
    _check_pair(student_logits, teacher_logits)
    with torch.no_grad():
        p_t = F.softmax(_upcast(teacher_logits), dim=-1)
        p_s = F.softmax(_upcast(student_logits), dim=-1)
        gap = (0.5 * (p_t - p_s).abs().sum(dim=-1)).clamp(0.0, 1.0)
        if not relative or gap.numel() == 0:
            return gap
        m = gap.flatten().median()
        return ((gap - m) / (1.0 - m).clamp(min=1e-12)).clamp(0.0, 1.0)


def swing_temperature(privacy: Tensor, *, t_min: float = 4.0, t_max: float = 8.0) -> Tensor:
    """Per-position temperature T_i = t_min + (t_max - t_min) * pi_i for pi_i in [0, 1].

    The paper raises the temperature with the estimated private information; the linear map
    is our choice (module docstring). t_max == t_min gives plain KD's constant temperature.
    """
    _check_temperature(t_min)
    _check_temperature(t_max)
    if t_max < t_min:
        raise ValueError(f"need t_max >= t_min, got t_min={t_min}, t_max={t_max}")
    return t_min + (t_max - t_min) * privacy.clamp(0.0, 1.0)


def laplace_noise(shape, scale: float, *, generator: torch.Generator | None = None,
                  dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """Samples of Laplace(0, scale) by inverse CDF: x = -b * sign(u) * log(1 - 2|u|), u ~ U(-1/2, 1/2).

    Drawn on the generator's device (CPU for ``torch.Generator()``) and then moved to ``device``,
    so a seeded CPU generator gives the same noise whatever device the loss runs on.
    """
    _check_non_negative("scale", scale)
    gen_device = generator.device if generator is not None else device
    u = torch.rand(shape, generator=generator, dtype=torch.float64, device=gen_device) - 0.5
    # |u| < 1/2 strictly except with probability ~2^-53; clamp keeps log1p finite in that case.
    x = -scale * torch.sign(u) * torch.log1p(-2.0 * u.abs().clamp(max=0.5 - 1e-16))
    return x.to(dtype=dtype, device=device)


def noisy_soft_targets(
    teacher_logits: Tensor,
    temperature: Tensor | float,
    *,
    noise_scale: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Soft targets softmax(z_t / T) with Laplace noise: normalise(max(0, p + Lap(b))).

    ``temperature`` is a float or a per-position tensor of shape ``(...)``. With
    ``noise_scale == 0`` this is exactly ``softmax(z_t / T)``. A row whose noisy entries are all
    <= 0 (only possible when b is large against 1/C) becomes the uniform distribution. The
    noise is not differentiable; gradients reach the teacher logits through p.
    """
    _check_non_negative("noise_scale", noise_scale)
    z = _upcast(teacher_logits)
    if isinstance(temperature, Tensor):
        temperature = temperature.to(z.dtype).unsqueeze(-1)
    probs = F.softmax(z / temperature, dim=-1)
    if noise_scale == 0.0:
        return probs
    noisy = (probs + laplace_noise(probs.shape, noise_scale, generator=generator, dtype=probs.dtype,
                                   device=probs.device)).clamp(min=0.0)
    total = noisy.sum(dim=-1, keepdim=True)
    uniform = torch.full_like(noisy, 1.0 / noisy.shape[-1])
    return torch.where(total > 0, noisy / total.clamp(min=torch.finfo(noisy.dtype).tiny), uniform)


def swing_kd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor | None = None,
    *,
    t_min: float = 4.0,
    t_max: float = 8.0,
    noise_scale: float = 0.0,
    generator: torch.Generator | None = None,
    temperature: Tensor | None = None,
    relative: bool = True,
) -> Tensor:
    """Swing distillation loss: t_min^2 * KL(p~_T(T_i) || softmax(z_s / T_i)), mean over positions.

    Li et al. (2022), "Swing Distillation: A Privacy-Preserving Knowledge Distillation
    Framework": per position i, T_i = ``swing_temperature(swing_privacy_score(s, t, relative=relative))``
    (or the given ``temperature`` tensor of shape ``(...)``), the teacher's soft target at T_i gets
    Laplace noise of scale ``noise_scale`` (``noisy_soft_targets``), and the student matches it
    at the same temperature. All definitions are our reconstruction, see the module docstring
    (UNCERTAIN). Special cases: t_max == t_min with no noise is ``kd(temperature=t_min)``
    exactly; the temperatures are detached, so gradients flow through the softmaxes only.
    """
    _check_pair(student_logits, teacher_logits)
    _check_targets(targets, student_logits, "swing", required=False)
    _check_temperature(t_min)
    _check_temperature(t_max)
    z_s = _upcast(student_logits)
    if temperature is None:
        if targets is None:
            privacy = swing_privacy_score(student_logits, teacher_logits, relative=relative)
        else:  # score the valid positions only: ignored ones must not move the batch median
            valid = targets != IGNORE_INDEX
            privacy = torch.zeros(targets.shape, dtype=z_s.dtype, device=z_s.device).masked_scatter_(
                valid, swing_privacy_score(student_logits[valid], teacher_logits[valid], relative=relative))
        temperature = swing_temperature(privacy, t_min=t_min, t_max=t_max)
    elif temperature.shape != student_logits.shape[:-1]:
        raise ValueError(f"temperature {tuple(temperature.shape)} must have the logits' leading shape "
                         f"{tuple(student_logits.shape[:-1])}")
    elif not bool((temperature > 0).all()):
        raise ValueError("temperatures must be > 0")
    temperature = temperature.detach().to(z_s.dtype)
    target = noisy_soft_targets(teacher_logits, temperature, noise_scale=noise_scale, generator=generator)
    log_q = F.log_softmax(z_s / temperature.unsqueeze(-1), dim=-1)
    # Noisy targets contain exact zeros (0 * log 0 = 0). Clamping inside the log keeps the backward
    # finite there too (xlogy(p, p) would give 0/0 = NaN for the gradient at p = 0).
    log_target = target.clamp(min=torch.finfo(target.dtype).tiny).log()
    per_position = (target * (log_target - log_q)).sum(dim=-1) * t_min**2
    return _mean_over_positions(per_position, targets)
