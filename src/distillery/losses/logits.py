"""Logit-based distillation losses, written as pure functions of tensors.

Conventions shared by every function here:

* ``student_logits`` and ``teacher_logits`` have the same shape ``(..., C)``: any number of
  leading dims (batch, sequence, ...) and the class / vocabulary dim last. Nothing assumes a
  2-D ``(N, C)`` input, so the same code serves image classifiers and language models.
* Half-precision inputs (fp16 / bf16) are upcast to float32 before any softmax; float32 and
  float64 inputs are used as they are (float64 keeps ``gradcheck`` meaningful).
* The result is a scalar: the mean over all leading positions of the per-position divergence
  (summed over classes), i.e. PyTorch's ``'batchmean'`` for 2-D input.
* ``targets`` are int64 class ids of shape ``(...)``. Positions whose target is ``-100`` are
  left out of the mean. Losses that need targets (CE, DKD, NKD) raise without them; for the
  teacher-only divergences ``targets`` is optional and, when given, only masks out ``-100``
  positions (padding in a language-model batch).
* Gradients flow into both logits unless a docstring says otherwise (online distillation
  trains the teacher too); detach the teacher yourself for offline distillation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100

# A finite stand-in for -inf when masking one class out of a softmax. exp() of it underflows
# to exactly 0 in float32 and float64, so the softmax over the remaining classes is exact (the
# same as -inf masking), yet nothing computes inf - inf or 0 * inf, so no NaN appears in the
# forward or backward pass. (mdistiller subtracts 1000, which is only approximate when the
# logits span more than ~100 after dividing by the temperature.)
_MASKED_LOGIT = -1e30


# --------------------------------------------------------------------------- input checks


def _check_pair(student_logits: Tensor, teacher_logits: Tensor) -> None:
    if student_logits.dim() < 1:
        raise ValueError("logits must have a class dimension (shape (..., C)); got a scalar")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same shape (..., C)"
        )


def _check_targets(targets: Tensor | None, logits: Tensor, loss_name: str, required: bool) -> None:
    if targets is None:
        if required:
            raise ValueError(f"loss {loss_name!r} needs targets (class ids of shape (...)); got None")
        return
    if targets.shape != logits.shape[:-1]:
        raise ValueError(
            f"targets {tuple(targets.shape)} must have the logits' leading shape "
            f"{tuple(logits.shape[:-1])} (logits are {tuple(logits.shape)})"
        )
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"targets must be integer class ids, got dtype {targets.dtype}")
    if required:
        # Out-of-range ids would otherwise surface as an opaque gather/device-side error.
        num_classes = logits.shape[-1]
        bad = (targets != IGNORE_INDEX) & ((targets < 0) | (targets >= num_classes))
        if bool(bad.any()):
            raise ValueError(
                f"targets must be in [0, {num_classes}) or {IGNORE_INDEX} (ignored); "
                f"found {targets[bad].flatten()[:5].tolist()}"
            )


def _check_temperature(temperature: float) -> None:
    _check_number("temperature", temperature)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _check_number(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def _check_non_negative(name: str, value: float) -> None:
    _check_number(name, value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


# --------------------------------------------------------------------------- shared pieces


def _upcast(x: Tensor) -> Tensor:
    """fp16/bf16 -> float32 so softmax, log and sums do not lose precision or overflow."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _log_probs(logits: Tensor, temperature: float) -> Tensor:
    return F.log_softmax(_upcast(logits) / temperature, dim=-1)


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Per-position KL(P || Q) = sum_c p_c (log p_c - log q_c), from log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def _entropy(log_p: Tensor) -> Tensor:
    return -(log_p.exp() * log_p).sum(dim=-1)


def _mean_over_positions(per_position: Tensor, targets: Tensor | None) -> Tensor:
    """Mean of a (...)-shaped per-position loss, leaving out positions whose target is -100."""
    if targets is None:
        return per_position.mean()
    valid = targets != IGNORE_INDEX
    total = torch.where(valid, per_position, torch.zeros_like(per_position)).sum()
    # clamp: a batch where every position is ignored gives 0 (and zero gradient), not NaN.
    return total / valid.sum().clamp(min=1)


def _target_mask(targets: Tensor, logits: Tensor) -> Tensor:
    """Boolean (..., C) mask that is True at each position's target class."""
    safe = targets.clamp(min=0)  # -100 rows get class 0; they are dropped by the mean anyway
    # scatter into a bool tensor: F.one_hot would build an int64 (..., C) tensor first, 8x the
    # memory, which matters at vocabulary sizes of 150k.
    mask = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
    return mask.scatter_(-1, safe.unsqueeze(-1), True)


def _gather_target(values: Tensor, targets: Tensor) -> Tensor:
    return values.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)


def _non_target_log_probs(scaled_logits: Tensor, target_mask: Tensor) -> Tensor:
    """log-softmax over the non-target classes only (target entry ~ -1e30, probability 0)."""
    return F.log_softmax(scaled_logits.masked_fill(target_mask, _MASKED_LOGIT), dim=-1)


# --------------------------------------------------------------------------- losses


def cross_entropy(
    student_logits: Tensor, teacher_logits: Tensor | None = None, targets: Tensor | None = None
) -> Tensor:
    """Plain cross-entropy with the ground-truth labels (the no-teacher baseline).

    L = -log softmax(z_s)[y], averaged over positions whose target is not -100. The teacher
    logits are accepted (so every loss has the same call signature) and ignored.
    """
    if student_logits.dim() < 1:
        raise ValueError("logits must have a class dimension (shape (..., C)); got a scalar")
    _check_targets(targets, student_logits, "ce", required=True)
    log_q = F.log_softmax(_upcast(student_logits), dim=-1)
    return _mean_over_positions(-_gather_target(log_q, targets), targets)


def kd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor | None = None,
    *,
    temperature: float = 4.0,
) -> Tensor:
    """Classic knowledge distillation: T^2 * KL(softmax(t/T) || softmax(s/T)).

    Hinton, Vinyals, Dean (2015), "Distilling the Knowledge in a Neural Network", Sec. 2: the
    student matches the teacher's soft targets at temperature T, and the soft-target term is
    multiplied by T^2 so its gradient magnitude does not shrink as 1/T^2. Only this soft-target
    term is computed; the paper's weighted hard-label CE term is composed separately (``ce``).
    """
    _check_pair(student_logits, teacher_logits)
    _check_targets(targets, student_logits, "kd", required=False)
    _check_temperature(temperature)
    log_p_teacher = _log_probs(teacher_logits, temperature)
    log_q_student = _log_probs(student_logits, temperature)
    per_position = _kl(log_p_teacher, log_q_student) * temperature**2
    return _mean_over_positions(per_position, targets)


def forward_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor | None = None,
    *,
    temperature: float = 1.0,
) -> Tensor:
    """Forward KL(P_teacher || Q_student) * T^2: ``kd`` with temperature 1 by default.

    Mode-covering: the student is penalised wherever the teacher has mass it lacks. Same
    formula as Hinton et al. (2015); see ``kd``.
    """
    return kd(student_logits, teacher_logits, targets, temperature=temperature)


def reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor | None = None,
    *,
    temperature: float = 1.0,
) -> Tensor:
    """Reverse KL(Q_student || P_teacher) * T^2 (mode-seeking).

    The objective used e.g. by MiniLLM (Gu et al., 2024, "MiniLLM: Knowledge Distillation of
    Large Language Models") at the token level; here computed exactly over all classes rather
    than estimated with policy gradients. The T^2 factor mirrors ``kd``.
    """
    _check_pair(student_logits, teacher_logits)
    _check_targets(targets, student_logits, "reverse_kl", required=False)
    _check_temperature(temperature)
    log_p_teacher = _log_probs(teacher_logits, temperature)
    log_q_student = _log_probs(student_logits, temperature)
    per_position = _kl(log_q_student, log_p_teacher) * temperature**2
    return _mean_over_positions(per_position, targets)


def jsd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor | None = None,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    scaled: bool = False,
) -> Tensor:
    """Generalized Jensen-Shannon divergence of GKD, interpolating forward and reverse KL.

    Agarwal et al. (2024), "On-Policy Distillation of Language Models: Learning from
    Self-Generated Mistakes" (GKD), generalized JSD:

        M = beta * P_T + (1 - beta) * Q_S
        JSD_beta = beta * KL(P_T || M) + (1 - beta) * KL(Q_S || M)

    with P_T = softmax(t/T) and Q_S = softmax(s/T). log M is computed stably as
    logsumexp(log Q_S + log(1 - beta), log P_T + log(beta)). For 0 < beta < 1 this is the
    formula of TRL's ``GKDTrainer.generalized_jsd_loss``; like TRL, beta == 0 returns forward
    KL(P_T || Q_S) and beta == 1 returns reverse KL(Q_S || P_T).

    Note the unscaled JSD_beta tends to 0 (not to a KL) as beta -> 0 or 1, so TRL's endpoints
    are a jump. Expanding M = Q_S + beta (P_T - Q_S) gives JSD_beta = beta KL(P_T||Q_S) + O(beta^2)
    and symmetrically JSD_beta = (1-beta) KL(Q_S||P_T) + O((1-beta)^2). Hence ``scaled=True``
    returns JSD_beta / (beta (1 - beta)), which is continuous in beta with the limits forward KL
    (beta -> 0) and reverse KL (beta -> 1), the values returned at the endpoints.

    Differences from TRL: the result is multiplied by T^2 like ``kd`` (so beta=0 equals
    ``forward_kl`` at any temperature; TRL has no T^2, identical at the default T = 1), and
    ``scaled`` is our addition.
    """
    _check_pair(student_logits, teacher_logits)
    _check_targets(targets, student_logits, "jsd", required=False)
    _check_temperature(temperature)
    _check_number("beta", beta)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if not isinstance(scaled, bool):
        raise ValueError(f"scaled must be True or False, got {scaled!r}")

    log_p_teacher = _log_probs(teacher_logits, temperature)
    log_q_student = _log_probs(student_logits, temperature)
    if beta == 0.0:
        per_position = _kl(log_p_teacher, log_q_student)
    elif beta == 1.0:
        per_position = _kl(log_q_student, log_p_teacher)
    else:
        log_mixture = torch.logsumexp(
            torch.stack([log_q_student + math.log1p(-beta), log_p_teacher + math.log(beta)]),
            dim=0,
        )
        per_position = beta * _kl(log_p_teacher, log_mixture) + (1.0 - beta) * _kl(
            log_q_student, log_mixture
        )
        if scaled:
            per_position = per_position / (beta * (1.0 - beta))
    return _mean_over_positions(per_position * temperature**2, targets)


def tckd_per_position(
    student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, *, temperature: float = 4.0
) -> Tensor:
    """Target-class KD of DKD, per position and without the T^2 factor: KL(b^T || b^S).

    b = [p_target, 1 - p_target] is the binary target/non-target distribution at temperature
    T (Zhao et al., 2022, Sec. 3.1). Both entries are computed in log space: log p_target =
    z_target - logsumexp(z) and log(1 - p_target) = logsumexp(z without target) - logsumexp(z),
    so a confident model does not produce log(0).
    """
    mask = _target_mask(targets, student_logits)

    def binary_log_probs(logits: Tensor) -> Tensor:
        z = _upcast(logits) / temperature
        log_total = torch.logsumexp(z, dim=-1)
        log_target = _gather_target(z, targets) - log_total
        log_rest = torch.logsumexp(z.masked_fill(mask, _MASKED_LOGIT), dim=-1) - log_total
        return torch.stack([log_target, log_rest], dim=-1)

    return _kl(binary_log_probs(teacher_logits), binary_log_probs(student_logits))


def nckd_per_position(
    student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, *, temperature: float = 4.0
) -> Tensor:
    """Non-target-class KD of DKD, per position and without T^2: KL(p_hat^T || p_hat^S).

    p_hat is the softmax at temperature T over the non-target classes only (Zhao et al., 2022,
    Sec. 3.1); the target class is masked out exactly (see ``_MASKED_LOGIT``).
    """
    mask = _target_mask(targets, student_logits)
    log_p_teacher = _non_target_log_probs(_upcast(teacher_logits) / temperature, mask)
    log_q_student = _non_target_log_probs(_upcast(student_logits) / temperature, mask)
    return _kl(log_p_teacher, log_q_student)


def dkd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor | None = None,
    *,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
) -> Tensor:
    """Decoupled KD: T^2 * (alpha * TCKD + beta * NCKD).

    Zhao, Cui, Song, Qiu, Liang (2022), "Decoupled Knowledge Distillation", CVPR. The paper
    rewrites KD = KL(p^T || p^S) as KD = TCKD + (1 - p_t^T) NCKD, with TCKD = KL(b^T || b^S),
    NCKD = KL(p_hat^T || p_hat^S) and p_t^T the teacher's target-class probability, then
    decouples the two terms into its DKD objective DKD = alpha TCKD + beta NCKD. Both terms
    use temperature T and, as in the official mdistiller code, are multiplied by T^2. Differences from mdistiller: the target class is masked exactly (a
    -1e30 logit instead of subtracting 1000), TCKD is computed in log space, and the loss
    works on any leading shape with -100 targets ignored. mdistiller's warm-up factor on the
    loss weight is a training-schedule choice and is not part of this function.
    """
    _check_pair(student_logits, teacher_logits)
    _check_targets(targets, student_logits, "dkd", required=True)
    _check_non_negative("alpha", alpha)
    _check_non_negative("beta", beta)
    _check_temperature(temperature)
    tckd = tckd_per_position(student_logits, teacher_logits, targets, temperature=temperature)
    nckd = nckd_per_position(student_logits, teacher_logits, targets, temperature=temperature)
    per_position = (alpha * tckd + beta * nckd) * temperature**2
    return _mean_over_positions(per_position, targets)


def nkd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor | None = None,
    *,
    temperature: float = 1.0,
    gamma: float = 1.5,
) -> Tensor:
    """Normalized KD: -T_t log S_t - gamma * lambda^2 * sum_{i != t} T_hat_i log S_hat_i.

    Yang, Zeng, Zhang, Li, Yuan, Li (2023), "From Knowledge Distillation to Self-Knowledge
    Distillation: A Unified Approach with Normalized Loss and Customized Soft Labels", ICCV,
    the NKD loss L_NKD written above. T_t and S_t are the teacher's and student's target-class
    probabilities at temperature 1; T_hat and S_hat are the distributions over the non-target
    classes re-normalised by a softmax at temperature lambda (``temperature``). As in the
    authors' released code (yzd-v/cls_KD, nkd.py), T_t is detached, so no gradient reaches the
    teacher through the target term (the non-target term is not detached). Unlike a divergence
    the loss is not zero when student and teacher agree: it is a cross-entropy, whose minimum
    over the student is the teacher's (normalised) entropy.
    """
    _check_pair(student_logits, teacher_logits)
    _check_targets(targets, student_logits, "nkd", required=True)
    _check_temperature(temperature)
    _check_non_negative("gamma", gamma)

    log_s = F.log_softmax(_upcast(student_logits), dim=-1)
    teacher_target_prob = _gather_target(F.softmax(_upcast(teacher_logits), dim=-1), targets).detach()
    target_term = -teacher_target_prob * _gather_target(log_s, targets)

    mask = _target_mask(targets, student_logits)
    log_s_hat = _non_target_log_probs(_upcast(student_logits) / temperature, mask)
    t_hat = _non_target_log_probs(_upcast(teacher_logits) / temperature, mask).exp()  # 0 at target
    non_target_term = -gamma * temperature**2 * (t_hat * log_s_hat).sum(dim=-1)

    return _mean_over_positions(target_term + non_target_term, targets)


def bdkd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor | None = None,
    *,
    temperature: float = 4.0,
) -> Tensor:
    """Balanced-divergence KD: per position, reverse KL if the student is less certain, else forward.

    Amara, Sepahvand, Meyer, Gross, Clark (2022/2023), "BD-KD: Balancing the Divergences for
    Online Knowledge Distillation", arXiv:2212.12965. The paper replaces the student's KD term
    with a sample-wise weighting of forward KL(p_t || p_s) and reverse KL(p_s || p_t), chosen
    by the entropy gap between teacher and student predictions (its teacher loss, a separate
    reverse-KL regulariser for the online teacher, is not part of this function).

    Implemented here, per position, with p = softmax(logits / T):

        T^2 * KL(p_s || p_t)   if H(p_s) > H(p_t)   (student less confident: mode-seeking RKL
                                                     sharpens it towards the teacher's modes)
        T^2 * KL(p_t || p_s)   otherwise            (student over-confident: mode-covering FKL
                                                     spreads its mass, improving calibration)

    UNCERTAIN: we could not read the paper's method section, only summaries ("sample-wise
    weighting of forward and reverse KL ... guided by the entropy gap between teacher and
    student"), so the exact weights are our reconstruction: a hard 0/1 switch on the sign of
    H(p_s) - H(p_t), with no extra weighting hyper-parameter. If the paper uses other weights
    (e.g. a tuned factor on the selected term), results will differ in scale. The switch is
    piecewise constant, so no gradient flows through the entropies.
    """
    _check_pair(student_logits, teacher_logits)
    _check_targets(targets, student_logits, "bdkd", required=False)
    _check_temperature(temperature)
    log_p_teacher = _log_probs(teacher_logits, temperature)
    log_q_student = _log_probs(student_logits, temperature)
    with torch.no_grad():
        student_less_certain = _entropy(log_q_student) > _entropy(log_p_teacher)
    forward = _kl(log_p_teacher, log_q_student)
    reverse = _kl(log_q_student, log_p_teacher)
    per_position = torch.where(student_less_certain, reverse, forward) * temperature**2
    return _mean_over_positions(per_position, targets)


def total_variation(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor | None = None,
    *,
    temperature: float = 1.0,
) -> Tensor:
    """Total variation distance 0.5 * sum_c |p_c - q_c| between tempered softmaxes.

    A bounded (0..1), symmetric distance. Not rescaled by T^2 (it is not a KL). The absolute
    value has no derivative where p_c == q_c exactly; autograd uses 0 there.
    """
    _check_pair(student_logits, teacher_logits)
    _check_targets(targets, student_logits, "tv", required=False)
    _check_temperature(temperature)
    p_teacher = _log_probs(teacher_logits, temperature).exp()
    q_student = _log_probs(student_logits, temperature).exp()
    per_position = 0.5 * (p_teacher - q_student).abs().sum(dim=-1)
    return _mean_over_positions(per_position, targets)
