"""Weight quantisation of Polino, Pascanu & Alistarh (2018), "Model compression via distillation and
quantization", ICLR -- as pure tensor functions.

Sec. 2.1, uniform quantisation with scaling.  A weight vector ``v`` is cut into buckets of ``d``
consecutive values; each bucket is scaled to [0, 1] by ``sc(v) = (v - beta) / alpha`` with
``alpha = max(v) - min(v)`` and ``beta = min(v)`` of that bucket, quantised to ``s + 1``
equally spaced levels ``{0, 1/s, ..., 1}`` by deterministic rounding,
``Q^(x) = floor(x s) / s + xi / s`` with ``xi = 1`` iff ``x s - floor(x s) > 1/2``, and scaled
back: ``Q(v) = alpha Q^(sc(v)) + beta``.  With ``b`` bits we take ``s = 2^b - 1``, so each bucket
holds at most ``2^b`` distinct values and a code fits in ``b`` bits.

Sec. 2.2 / Alg. 2, differentiable quantisation.  The levels become free quantisation points
``p = (p_1 .. p_k)`` (per layer, in the scaled [0, 1] frame); each scaled weight goes to its
nearest point and ``Q(v, p)_i = alpha p_j(i) + beta``, so that
``dL/dp_j = sum_{i: j(i) = j} alpha_i dL/dQ_i`` -- the gradient :func:`fake_quantize` gives its
``points`` argument.  Starting from the uniform levels, the nearest-point rule is exactly the
deterministic rounding above (ties go down in both), so learned points start as uniform
quantisation.

Quantised distillation (Sec. 2.1, Alg. 1) keeps full-precision weights, runs the forward with
their quantised values and applies the gradient taken at the quantised weights to the
full-precision ones: the straight-through estimator, ``dQ/dv = 1``.  Min-max scaling puts every
weight inside the quantisation range, so the identity holds everywhere (no clipping region).
``alpha`` and ``beta`` are treated as constants in the backward pass, as in the paper's gradient.

Rounding here is deterministic (the paper also describes stochastic rounding): the forward at
training, at evaluation and in the exported file is then one and the same function.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def _check(bits: int, bucket_size: int) -> None:
    if not (isinstance(bits, int) and 1 <= bits <= 8):
        raise ValueError(f"bits must be an integer in [1, 8] (codes are stored in bytes), got {bits!r}")
    if not (isinstance(bucket_size, int) and bucket_size >= 1):
        raise ValueError(f"bucket_size must be a positive integer, got {bucket_size!r}")


def uniform_points(bits: int, dtype=torch.float32) -> Tensor:
    """The ``2^b`` uniform levels ``{0, 1/s, ..., 1}`` with ``s = 2^b - 1``."""
    _check(bits, 1)
    return torch.linspace(0.0, 1.0, 2 ** bits, dtype=dtype)


def buckets(v: Tensor, bucket_size: int) -> Tensor:
    """``v`` flattened (row-major) into rows of ``bucket_size`` consecutive values; the last row is
    padded by repeating the last value, which leaves its min and max -- hence its scaling -- unchanged."""
    _check(1, bucket_size)
    flat = v.reshape(-1)
    pad = (-flat.numel()) % bucket_size
    if pad:
        flat = torch.cat([flat, flat[-1:].expand(pad)])
    return flat.view(-1, bucket_size)


def scaling(b: Tensor) -> tuple[Tensor, Tensor]:
    """Per-bucket ``alpha = max - min`` and ``beta = min`` (shapes ``(nb, 1)``), detached.  A constant
    bucket gets ``alpha = 1``: its values scale to 0 and come back exactly."""
    b = b.detach()
    lo, hi = b.min(1, keepdim=True).values, b.max(1, keepdim=True).values
    alpha = hi - lo
    return torch.where(alpha > 0, alpha, torch.ones_like(alpha)), lo


def nearest_codes(scaled: Tensor, points: Tensor) -> Tensor:
    """Index of the nearest point for each scaled value (the first one on a tie)."""
    return (scaled.detach()[..., None] - points.detach()).abs().argmin(-1)


def quantize(v: Tensor, points: Tensor, bucket_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """The integer form of ``v``: ``(codes (nb, d) int64, alpha (nb, 1), beta (nb, 1))``."""
    b = buckets(v, bucket_size)
    alpha, beta = scaling(b)
    return nearest_codes((b.detach() - beta) / alpha, points), alpha, beta


def dequantize(codes: Tensor, alpha: Tensor, beta: Tensor, points: Tensor, shape) -> Tensor:
    """``alpha p[codes] + beta``, un-padded and reshaped to ``shape``: the float weight that the
    quantised model computes with."""
    q = alpha * points[codes] + beta
    n = math.prod(shape)
    return q.reshape(-1)[:n].view(shape)


def fake_quantize(v: Tensor, points: Tensor, bucket_size: int) -> Tensor:
    """The quantised value of ``v`` (same shape) for the forward pass.  Backward: the
    straight-through estimator into ``v`` (identity) and ``sum alpha dL/dQ`` into each point."""
    codes, alpha, beta = quantize(v, points, bucket_size)
    q = dequantize(codes, alpha, beta, points, v.shape)
    # v - v.detach() is exactly zero in the forward and carries the identity gradient into v.
    return v - v.detach() + q


def uniform_quantize_reference(v: Tensor, bits: int, bucket_size: int) -> Tensor:
    """The paper's formula written out (``floor(x s)/s + xi/s``), for checking :func:`fake_quantize`."""
    s = 2 ** bits - 1
    b = buckets(v, bucket_size).detach()
    alpha, beta = scaling(b)
    x = (b - beta) / alpha * s
    xi = ((x - torch.floor(x)) > 0.5).to(x.dtype)
    q = alpha * ((torch.floor(x) + xi) / s) + beta
    return q.reshape(-1)[: v.numel()].view(v.shape)


# ------------------------------------------------------------------------------- storage


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Codes in ``[0, 2^b)`` packed ``b`` bits each, little-endian, into a uint8 tensor of
    ``ceil(n b / 8)`` bytes: the storage the size report counts."""
    _check(bits, 1)
    flat = codes.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2 ** bits):
        raise ValueError(f"codes must lie in [0, {2 ** bits}) for {bits} bits")
    bitplanes = (flat[:, None] >> torch.arange(bits)) & 1
    stream = bitplanes.reshape(-1)
    stream = torch.cat([stream, stream.new_zeros((-stream.numel()) % 8)])
    return (stream.view(-1, 8) << torch.arange(8)).sum(1).to(torch.uint8)


def unpack_codes(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of :func:`pack_codes`: the first ``n`` codes as int64."""
    stream = ((packed.to(torch.int64)[:, None] >> torch.arange(8)) & 1).reshape(-1)
    if stream.numel() < n * bits:
        raise ValueError(f"packed codes hold {stream.numel() // bits} values, expected {n}")
    planes = stream[: n * bits].view(n, bits)
    return (planes << torch.arange(bits)).sum(1)
