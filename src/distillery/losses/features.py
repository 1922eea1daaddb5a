"""Feature-based distillation losses, written as pure functions of feature tensors.

Projection of student features to the teacher's width (FitNets' regressor, adapters, ...)
belongs to the caller; these functions only compare tensors. Half-precision inputs are
upcast to float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _upcast(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def hint_mse(student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
    """FitNets hint loss: mean squared error between (projected) student and teacher features.

    Romero, Ballas, Kahou, Chassang, Gatta, Bengio (2015), "FitNets: Hints for Thin Deep
    Nets", ICLR: L_HT = 1/2 || u_h(x) - r(v_g(x)) ||^2, where r is the learned regressor that
    maps the student's guided layer to the teacher's hint layer. The caller applies r; this
    function takes the result. Difference from the paper: we average over all elements instead
    of summing and halving, so the loss scale does not grow with feature size or batch.
    """
    if student_feat.shape != teacher_feat.shape:
        raise ValueError(
            f"hint_mse needs features of the same shape: student {tuple(student_feat.shape)} vs "
            f"teacher {tuple(teacher_feat.shape)}; project the student features to the "
            "teacher's shape first (FitNets' regressor)"
        )
    return F.mse_loss(_upcast(student_feat), _upcast(teacher_feat))


def _spatial_map(feat: Tensor, p: float) -> Tensor:
    """Unnormalised attention map mean_c |F_c|^p: (N,C,H,W) -> (N,H,W); (N,L,D) -> (N,L)."""
    feat = _upcast(feat)
    if feat.dim() == 4:
        return feat.abs().pow(p).mean(dim=1)
    if feat.dim() == 3:
        # token features: the "spatial" positions are the L tokens, the channels are D
        return feat.abs().pow(p).mean(dim=2)
    raise ValueError(
        f"attention maps need (N, C, H, W) or (N, L, D) features, got shape {tuple(feat.shape)}"
    )


def attention_map(feat: Tensor, p: float = 2) -> Tensor:
    """Spatial attention map Q = vec(mean_c |F_c|^p) / ||vec(mean_c |F_c|^p)||_2, shape (N, positions).

    Zagoruyko & Komodakis (2017), "Paying More Attention to Attention: Improving the
    Performance of Convolutional Neural Networks via Attention Transfer", ICLR: the
    activation-based map F^p_mean, flattened and L2-normalised per sample (the paper's F^p_sum
    gives the same normalised map, as the two differ by the constant factor C). (N, C, H, W) maps
    give H*W positions; (N, L, D) token features give L positions (mean over D).
    """
    if not p > 0:
        raise ValueError(f"p must be > 0, got {p}")
    amap = _spatial_map(feat, p)
    return F.normalize(amap.flatten(1), dim=1)


def _pool_to(amap: Tensor, size: tuple[int, ...]) -> Tensor:
    if tuple(amap.shape[1:]) == size:
        return amap
    if amap.dim() == 3:  # (N, H, W)
        return F.adaptive_avg_pool2d(amap.unsqueeze(1), size).squeeze(1)
    return F.adaptive_avg_pool1d(amap.unsqueeze(1), size).squeeze(1)  # (N, L)


def attention_transfer(student_feat: Tensor, teacher_feat: Tensor, *, p: float = 2) -> Tensor:
    """Attention transfer loss: mean over batch and positions of (Q_s - Q_t)^2.

    Zagoruyko & Komodakis (2017), "Paying More Attention to Attention". The paper's Eq. (2)
    sums || Q_s/||Q_s|| - Q_t/||Q_t|| ||_p (a norm, not squared) with weight beta/2; we follow
    the authors' released code instead: the squared difference of the normalised maps,
    averaged over batch and spatial positions (so the magnitude is independent of map size;
    scale it with the method's weight, ~1e3 in their code). The normalisation makes the loss
    invariant to multiplying either feature tensor by a positive constant.

    Channel counts may differ (only the maps are compared). When spatial sizes differ, both
    unnormalised maps are adaptive-average-pooled to the smaller size per axis (min of H and
    of W, or of L) before normalising; equal sizes are left untouched.
    """
    if student_feat.dim() != teacher_feat.dim():
        raise ValueError(
            f"student features {tuple(student_feat.shape)} and teacher features "
            f"{tuple(teacher_feat.shape)} must both be (N, C, H, W) or both (N, L, D)"
        )
    if student_feat.shape[0] != teacher_feat.shape[0]:
        raise ValueError(
            f"batch sizes differ: student {tuple(student_feat.shape)} vs teacher "
            f"{tuple(teacher_feat.shape)}"
        )
    if not p > 0:
        raise ValueError(f"p must be > 0, got {p}")
    s_map = _spatial_map(student_feat, p)
    t_map = _spatial_map(teacher_feat, p)
    size = tuple(min(a, b) for a, b in zip(s_map.shape[1:], t_map.shape[1:]))
    q_s = F.normalize(_pool_to(s_map, size).flatten(1), dim=1)
    q_t = F.normalize(_pool_to(t_map, size).flatten(1), dim=1)
    return (q_s - q_t).pow(2).mean()
