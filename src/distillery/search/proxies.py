"""Training-free scores of a candidate student: ``proxy(teacher, student, (x, y)) -> float``.

Higher is better for every proxy, so a search can maximise any of them.  The models are used
as they are given -- at random initialisation in a search, as in every paper cited here --
and are left exactly as they were found: forward passes run with batch statistics (the
train-mode behaviour of a freshly built network) and the BatchNorm running statistics are
restored afterwards; gradients are taken with ``torch.autograd.grad`` (no ``.grad`` is left
on a parameter); SynFlow works on a copy.

The mathematics is in small tensor functions (:func:`gram_distance`,
:func:`class_activation_maps`, :func:`semantic_distance`, :func:`relation_distance`,
:func:`naswot_logdet`) that the tests check against hand-computed values; the proxies only
capture the tensors and call them.

DisWOT (Dong, Li, Wei, "DisWOT: Student Architecture Search for Distillation WithOut
Training", CVPR 2023, Sec. 3.2 and the official code's core functions) is a *distance*
between teacher and student; the proxy is its negative.  Baselines: parameter count, MACs,
NASWOT (Mellor et al., ICML 2021), SynFlow (Tanaka et al., NeurIPS 2020), grad-norm
(Abdelfattah et al., ICLR 2021).
"""
from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from distillery.errors import ModelError
from distillery.models import count_parameters, forward_logits
from distillery.taps import Taps

Batch = tuple[torch.Tensor, torch.Tensor]
Proxy = Callable[[nn.Module | None, nn.Module, Batch], float]


# ---------------------------------------------------------------------------------------------
# Pure tensor functions


def gram_distance(g_a: torch.Tensor, g_b: torch.Tensor) -> torch.Tensor:
    """``||row_l2(G_a) - row_l2(G_b)||_F^2 / (n m)`` for (..., n, m) similarity matrices,
    averaged over any leading (batch) dimensions.

    The DisWOT distance between a teacher's and a student's similarity matrices (Sec. 3.2 of
    the paper; the official ``batch_similarity``): each row is L2-normalised, so the distance
    ignores the feature scale and the feature width -- only the pattern of similarities counts.
    It is symmetric, non-negative and 0 exactly when the normalised matrices agree."""
    if g_a.shape != g_b.shape:
        raise ValueError(f"similarity matrices differ in shape: {tuple(g_a.shape)} vs {tuple(g_b.shape)}")
    diff = F.normalize(g_a, dim=-1) - F.normalize(g_b, dim=-1)
    return (diff * diff).sum(dim=(-2, -1)).mean() / (g_a.shape[-2] * g_a.shape[-1])


def class_activation_maps(features: torch.Tensor, head_weight: torch.Tensor) -> torch.Tensor:
    """Grad-CAM maps ``ReLU(sum_k alpha_ck F_k)`` for every class: (B, D, L) features and a
    (C, D) linear classifier give (B, C, L) maps.

    For a classifier on globally average-pooled features, Grad-CAM's weights ``alpha_ck`` (the
    spatially averaged gradient of class score c w.r.t. feature map k; Selvaraju et al. 2017,
    eq. 1) are the classifier's weights divided by L, so Grad-CAM reduces to CAM (Zhou et al.
    2016) up to a positive factor -- which the normalised distances ignore."""
    if features.shape[1] != head_weight.shape[1]:
        raise ValueError(f"features have {features.shape[1]} channels but the classifier takes {head_weight.shape[1]}")
    return torch.relu(torch.einsum("cd,bdl->bcl", head_weight.to(features.dtype), features))


def semantic_distance(cam_t: torch.Tensor, cam_s: torch.Tensor) -> torch.Tensor:
    """DisWOT semantic-similarity metric (Sec. 3.2, 'semantic similarity metric'): per sample,
    the inter-class correlation ``G = M M^T`` (C x C) of the class activation maps M (C x L),
    compared by :func:`gram_distance` and averaged over the batch.

    The C x C matrices do not depend on the feature width or the map size, so a 64-channel
    7x7 teacher compares with a 16-channel 14x14 student."""
    if cam_t.shape[:2] != cam_s.shape[:2]:
        raise ValueError(f"teacher and student maps differ in (batch, classes): {tuple(cam_t.shape[:2])} vs {tuple(cam_s.shape[:2])}")
    g_t = cam_t @ cam_t.transpose(1, 2)
    g_s = cam_s @ cam_s.transpose(1, 2)
    return gram_distance(g_t, g_s)


def relation_distance(feat_t: torch.Tensor, feat_s: torch.Tensor) -> torch.Tensor:
    """DisWOT sample-relation metric (Sec. 3.2, 'relation similarity metric'; the similarity-
    preserving relation of Tung & Mori 2019): the B x B Gram matrices ``f f^T`` of the
    flattened last features of teacher and student, compared by :func:`gram_distance`."""
    f_t, f_s = feat_t.flatten(1), feat_s.flatten(1)
    if f_t.shape[0] != f_s.shape[0]:
        raise ValueError(f"teacher and student saw different batch sizes: {f_t.shape[0]} vs {f_s.shape[0]}")
    return gram_distance(f_t @ f_t.T, f_s @ f_s.T)


def naswot_kernel(codes: torch.Tensor) -> torch.Tensor:
    """``K_H[i, j] = N_A - d_H(c_i, c_j)`` for (B, N_A) binary activation codes (Mellor et al.
    2021, Sec. 3): the number of units on which samples i and j agree, computed as
    ``c c^T + (1 - c)(1 - c)^T`` (float64: exact integer counts)."""
    c = codes.to(torch.float32)  # exact for counts below 2**24 units per call
    return (c @ c.T + (1 - c) @ (1 - c).T).to(torch.float64)


def naswot_score(kernel: torch.Tensor) -> float:
    """The NASWOT score ``log |K_H|`` (Mellor et al. 2021, Sec. 3); ``-inf`` when the kernel is
    singular (e.g. two samples share a code)."""
    sign, logabsdet = torch.linalg.slogdet(kernel.to(torch.float64))
    return float(logabsdet) if sign != 0 else float("-inf")


def naswot_logdet(codes: torch.Tensor) -> float:
    """:func:`naswot_score` of the kernel of (B, N_A) binary codes."""
    return naswot_score(naswot_kernel(codes))


# ---------------------------------------------------------------------------------------------
# Capturing tensors from a model without changing it


@contextmanager
def batch_statistics(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` in train mode (BatchNorm on batch statistics, as a freshly built network
    behaves in the papers' code) and restore its modes and buffers afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    saved = {name: b.detach().clone() for name, b in model.named_buffers()}
    model.train()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(saved[name])


def classifier(model: nn.Module) -> nn.Linear:
    """The model's linear classifier: its ``head`` (every zoo model has one), else its last ``nn.Linear``."""
    head = getattr(model, "head", None)
    if isinstance(head, nn.Linear):
        return head
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ModelError(f"{type(model).__name__} has no nn.Linear classifier; DisWOT's semantic score needs one "
                         "(name it `head` to be sure it is the one used)")
    return linears[-1]


def _last_feature_tap(model: nn.Module) -> str:
    """The map the classifier reads, before pooling: the input of a global ``pool`` module when
    there is one (every zoo CNN), else the deepest default feature layer (ViT tokens, MLP
    hidden layer), else the classifier's input."""
    pool = getattr(model, "pool", None)
    if isinstance(pool, (nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool1d)):
        return "pool:input"
    layers = list(getattr(model, "default_feature_layers", None) or [])
    return layers[-1] if layers else "head:input"


def _as_channels(feature: torch.Tensor, channels: int) -> torch.Tensor | None:
    """(B, D, L) view of a captured feature with D = ``channels``: maps (B, D, H, W), tokens
    (B, N, D), vectors (B, D); ``None`` when no axis matches."""
    if feature.dim() == 4 and feature.shape[1] == channels:
        return feature.flatten(2)
    if feature.dim() == 3 and feature.shape[2] == channels:
        return feature.transpose(1, 2)
    if feature.dim() == 3 and feature.shape[1] == channels:
        return feature
    if feature.dim() == 2 and feature.shape[1] == channels:
        return feature.unsqueeze(-1)
    return None


@torch.no_grad()
def last_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, D, L): the last feature map of ``model`` on ``x`` (D = the classifier's input width,
    L = spatial positions or tokens, 1 for vectors), captured by a tap."""
    head = classifier(model)
    tap = _last_feature_tap(model)
    taps = [tap, "head:input"] if tap != "head:input" and head is getattr(model, "head", None) else [tap]
    with batch_statistics(model), Taps(model, taps) as t:
        forward_logits(model, x)
        feats = t.collect()
    out = _as_channels(feats[tap], head.in_features)
    if out is None and "head:input" in feats:
        out = _as_channels(feats["head:input"], head.in_features)
    if out is None:
        raise ModelError(f"{type(model).__name__}: the feature at '{tap}' {tuple(feats[tap].shape)} does not match "
                         f"the classifier's input width {head.in_features}")
    return out.float()


class _RectifierCodes(TorchFunctionMode):
    """Accumulates NASWOT's kernel over every rectifier call (ReLU, ReLU6, GELU; module or
    functional): the binary code of a call is ``output > 0`` per unit.  The kernel is summed
    layer by layer (``K = sum_l K_l``, the same as the kernel of the concatenated codes), so
    a wide network's full code never has to be held in memory."""

    _ALWAYS = {F.relu, F.relu_, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_, F.relu6, F.gelu}

    def __init__(self):
        super().__init__()
        self.kernel: torch.Tensor | None = None
        self.units = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        rectifier = func in self._ALWAYS
        if func is F.hardtanh:  # nn.ReLU6 is hardtanh(0, 6)
            min_val = args[1] if len(args) > 1 else kwargs.get("min_val", -1.0)
            rectifier = min_val == 0
        if rectifier and isinstance(out, torch.Tensor) and out.dim() >= 1:
            codes = (out.detach() > 0).flatten(1)
            k = naswot_kernel(codes)
            self.kernel = k if self.kernel is None else self.kernel + k
            self.units += codes.shape[1]
        return out


# ---------------------------------------------------------------------------------------------
# The proxies


def params(teacher: nn.Module | None, student: nn.Module, batch: Batch) -> float:
    """Number of parameters of the student (the simplest baseline)."""
    return float(count_parameters(student))


def macs(teacher: nn.Module | None, student: nn.Module, batch: Batch) -> float:
    """Multiply-accumulates of one student forward pass on one sample
    (:func:`distillery.report.metrics.count_macs`)."""
    from distillery.report.metrics import count_macs

    was_training = student.training
    try:
        return float(count_macs(student, batch[0][:1]))
    finally:
        student.train(was_training)


def naswot(teacher: nn.Module | None, student: nn.Module, batch: Batch) -> float:
    """NASWOT (Mellor, Turner, Storkey, Crowley, "Neural Architecture Search without Training",
    ICML 2021, Sec. 3): ``log |K_H|`` of the kernel of the batch's binary ReLU codes
    (:func:`naswot_logdet`).  Every rectifier counts (ReLU, ReLU6 and GELU codes are all
    ``pre-activation > 0``), whether called as a module or functionally."""
    mode = _RectifierCodes()
    with torch.no_grad(), batch_statistics(student), mode:
        forward_logits(student, batch[0])
    if mode.kernel is None:
        raise ModelError(f"{type(student).__name__} calls no ReLU/ReLU6/GELU: NASWOT needs rectifier codes")
    return naswot_score(mode.kernel)


def _weights(model: nn.Module) -> list[nn.Parameter]:
    """The weights of the prunable layers (convolutions and linear layers), as in the
    zero-cost-proxy literature (Abdelfattah et al. 2021)."""
    return [m.weight for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))]


def synflow(teacher: nn.Module | None, student: nn.Module, batch: Batch) -> float:
    """SynFlow (Tanaka, Kunin, Yamins, Ganguli, "Pruning neural networks without any data by
    iteratively conserving synaptic flow", NeurIPS 2020, Sec. 4 and 6): data-free.  On a float64
    copy with every parameter and buffer replaced by its absolute value, an all-ones input
    gives ``R = 1^T (prod_l |theta_l|) 1`` (summed logits); the score is
    ``sum |theta ⊙ dR/dtheta|`` over the conv/linear weights.

    For a bias-free linear (or ReLU) network of L layers every layer carries the same flow R
    (the paper's conservation theorem), so the score is ``L * R``.  BatchNorm is evaluated
    with its (absolute) running statistics -- a positive per-channel affine map -- since a
    batch of one constant input has no batch statistics."""
    net = copy.deepcopy(student).double().eval()
    with torch.no_grad():
        for t in [*net.parameters(), *net.buffers()]:
            if t.is_floating_point():
                t.abs_()
    weights = _weights(net)
    if not weights:
        raise ModelError(f"{type(student).__name__} has no conv/linear weights for SynFlow")
    ones = torch.ones((1, *batch[0].shape[1:]), dtype=torch.float64)
    flow = forward_logits(net, ones).sum()
    grads = torch.autograd.grad(flow, weights, allow_unused=True)
    with torch.no_grad():
        return float(sum((w * g).abs().sum() for w, g in zip(weights, grads) if g is not None))


def grad_norm(teacher: nn.Module | None, student: nn.Module, batch: Batch) -> float:
    """grad-norm (Abdelfattah, Mehrotra, Dudziak, Lane, "Zero-Cost Proxies for Lightweight
    NAS", ICLR 2021, Sec. 3): ``sum_l ||dL/dW_l||_2`` of the cross-entropy on one batch over
    the conv/linear weights ``W_l``, at initialisation."""
    x, y = batch
    weights = _weights(student)
    with batch_statistics(student):
        loss = F.cross_entropy(forward_logits(student, x), y)
        grads = torch.autograd.grad(loss, weights, allow_unused=True)
    return float(sum(g.norm() for g in grads if g is not None))


def _needs_teacher(teacher: nn.Module | None, name: str) -> nn.Module:
    if teacher is None:
        raise ModelError(f"the '{name}' proxy compares the student with a teacher; none was given")
    return teacher


def diswot_semantic(teacher: nn.Module | None, student: nn.Module, batch: Batch) -> float:
    """DisWOT semantic similarity (Dong et al. 2023, Sec. 3.2): minus :func:`semantic_distance`
    between the teacher's and the student's class activation maps on the batch (maps from the
    last feature layer and the classifier weights, :func:`class_activation_maps`)."""
    teacher = _needs_teacher(teacher, "diswot_semantic")
    x = batch[0]
    cam_t = class_activation_maps(last_features(teacher, x), classifier(teacher).weight.detach().float())
    cam_s = class_activation_maps(last_features(student, x), classifier(student).weight.detach().float())
    return -float(semantic_distance(cam_t, cam_s))


def diswot_relation(teacher: nn.Module | None, student: nn.Module, batch: Batch) -> float:
    """DisWOT sample-relation similarity (Dong et al. 2023, Sec. 3.2): minus
    :func:`relation_distance` between the Gram matrices of the last features."""
    teacher = _needs_teacher(teacher, "diswot_relation")
    x = batch[0]
    return -float(relation_distance(last_features(teacher, x), last_features(student, x)))


def diswot(teacher: nn.Module | None, student: nn.Module, batch: Batch) -> float:
    """The DisWOT score (Dong et al. 2023, Sec. 3.2): minus the sum of the semantic and the
    relation distances, with equal weights as in the paper; 0 is the best possible score
    (the student's normalised similarity matrices equal the teacher's)."""
    teacher = _needs_teacher(teacher, "diswot")
    x = batch[0]
    f_t, f_s = last_features(teacher, x), last_features(student, x)
    cam_t = class_activation_maps(f_t, classifier(teacher).weight.detach().float())
    cam_s = class_activation_maps(f_s, classifier(student).weight.detach().float())
    return -float(semantic_distance(cam_t, cam_s) + relation_distance(f_t, f_s))


#: name -> proxy; every proxy is ``(teacher, student, (x, y)) -> float``, higher is better.
PROXIES: dict[str, Proxy] = {
    "diswot": diswot,
    "diswot_semantic": diswot_semantic,
    "diswot_relation": diswot_relation,
    "params": params,
    "macs": macs,
    "naswot": naswot,
    "synflow": synflow,
    "grad_norm": grad_norm,
}

#: Proxies that compare with the teacher (the others ignore it).
TEACHER_PROXIES = frozenset({"diswot", "diswot_semantic", "diswot_relation"})


def get_proxy(name: str) -> Proxy:
    try:
        return PROXIES[name]
    except KeyError:
        raise ValueError(f"unknown proxy '{name}'; proxies: {', '.join(PROXIES)}") from None

