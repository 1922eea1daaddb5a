"""The OFA loss: KD with adaptive target information enhancement, as a pure function of tensors.

Hao, Guo, Han, Tang, Hu, Wang, Xu (2023), "One-for-All: Bridge the Gap Between Heterogeneous
Architectures in Knowledge Distillation", NeurIPS, Sec. 3.3.  Written as a cross-entropy
against the teacher's probabilities, KD plus the label cross-entropy is

    -(1 + p_t[c]) log p_s[c] - sum_{i != c} p_t[i] log p_s[i]        (c: the true class)

and OFA raises the target-class weight to a power gamma >= 1 (the paper's modulating
parameter, ``--ofa-eps`` in the released code):

    L_OFA = -(1 + p_t[c])^gamma log p_s[c] - sum_{i != c} p_t[i] log p_s[i].

Since 1 + p_t[c] >= 1, a confident teacher enlarges the target weight more than an unsure one:
the student takes more "target information" where the teacher is right and sure, and less of the
teacher's possibly architecture-specific dark knowledge elsewhere.

The released code (Hao840/OFAKD, ``distillers/ofa.py``, ``ofa_loss``) computes a variant:
weights ``(p_t + onehot)^gamma - onehot``, i.e. ``(1 + p_t[c])^gamma - 1`` on the target and
``p_t[i]^gamma`` on the others, with the label cross-entropy added separately on the final
logits only.  ``form="code"`` gives that variant; ``form="paper"`` (default) the equation above.
At gamma = 1 the code form is the soft cross-entropy of KD at temperature T and the paper form
adds the label cross-entropy to it.

Conventions of :mod:`distillery.losses.logits`: logits ``(..., C)``, mean over positions, ``-100``
targets left out, fp16/bf16 upcast, float64 kept.  Both softmaxes are taken at ``temperature``
(1 in the paper and the released code); there is no T^2 factor, as in the released code.
"""
from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor

from distillery.losses.logits import (
    _check_number,
    _check_pair,
    _check_targets,
    _check_temperature,
    _mean_over_positions,
    _target_mask,
    _upcast,
)


def ofa_weights(teacher_probs: Tensor, target_mask: Tensor, *, gamma: float, form: str = "paper") -> Tensor:
    """Per-class weights w of the OFA cross-entropy ``-sum_i w_i log p_s[i]``: ``(1 + p_t[c])^gamma``
    on the target and ``p_t[i]`` elsewhere (``form="paper"``), or ``(p_t + onehot)^gamma - onehot``
    (``form="code"``, the released code)."""
    onehot = target_mask.to(teacher_probs.dtype)
    if form == "code":
        return (teacher_probs + onehot) ** gamma - onehot
    return target_mask * (1 + teacher_probs) ** gamma + (~target_mask) * teacher_probs


def ofa_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    *,
    gamma: float = 1.0,
    temperature: float = 1.0,
    form: Literal["paper", "code"] = "paper",
) -> Tensor:
    """OFA loss (Hao et al. 2023, Sec. 3.3): ``-(1 + p_t[c])^gamma log p_s[c] - sum_{i != c}
    p_t[i] log p_s[i]``, with p = softmax(logits / temperature), averaged over positions.

    ``gamma`` >= 1 in the paper (the code allows any value; gamma = 1 is KD + label CE).  The
    teacher's probabilities are detached (they are targets)."""
    _check_pair(student_logits, teacher_logits)
    _check_targets(targets, student_logits, "ofa", required=True)
    _check_temperature(temperature)
    _check_number("gamma", gamma)
    if gamma <= 0:
        raise ValueError(f"gamma must be > 0 (the paper uses gamma >= 1), got {gamma}")
    if form not in ("paper", "code"):
        raise ValueError(f"form must be 'paper' or 'code', got {form!r}")
    log_p_s = F.log_softmax(_upcast(student_logits) / temperature, dim=-1)
    p_t = F.softmax(_upcast(teacher_logits).detach() / temperature, dim=-1)
    weights = ofa_weights(p_t, _target_mask(targets, student_logits), gamma=gamma, form=form)
    return _mean_over_positions(-(weights * log_p_s).sum(dim=-1), targets)
