"""Pure-PyTorch reference of the learnable fake-quant op: the executable spec.

The op of Q-ViT (Li et al., "Q-ViT: Fully Differentiable Quantization for Vision
Transformer", arXiv 2201.07703), built on LSQ (Esser et al., 2020) and LSQ+
(Bhalgat et al., 2020): learned scales, learned bit-widths (rounded with a
straight-through estimator), a switchable scale table with one entry per
candidate bit-width, and an optional learned offset.

Two independent implementations live here:

* :func:`fake_quant` composes differentiable torch ops the way the research code
  does (straight-through rounding by the detach trick, tensor-valued clamp
  bounds so the bit-width receives gradient) and lets autograd derive the
  backward. It is float64-capable and is what ``gradcheck`` runs on.
* :func:`fake_quant_forward` / :func:`fake_quant_backward` state the closed
  forms of the op contract (docs/design.md section 2) directly. They pin the numerics every kernel must
  reproduce:

  - rounding is round-half-to-even (``torch.round``);
  - ``v = (x - beta) / s`` is a true division, not a multiply by ``1/s``;
  - ``y = round(clamp(v, Qn, Qp)) * s + beta`` as a separate multiply and add
    (no fused multiply-add), so fp32 kernels match bitwise;
  - the clip test is done on ``v`` before rounding: ``v == Qn`` and ``v == Qp``
    are inside the range, and so is NaN;
  - a NaN element gives NaN in ``y`` and in ``grad_x`` and in its own group's
    scale gradient, and nothing else;
  - arithmetic is fp32 for fp32/fp16/bf16 inputs (fp64 for fp64), parameter
    gradient sums are accumulated in fp64 here (kernels use fp32 with fixed-order
    partial sums; tests state the tolerance).

Layout: ``x`` is viewed as ``[outer, G, inner]`` where ``G = bits.numel()`` splits
dimension ``dim`` of ``x`` into ``G`` equal contiguous chunks. Examples::

    per-tensor                      G = 1 (dim is ignored)
    per-channel of a [T, C] input   dim = -1, G = C
    per-head of q/k/v [B, H, N, d]  dim = 1,  G = H
    per-head rows of W_q [H*d, C]   dim = 0,  G = H
    per-head cols of W_proj [C, H*d] dim = 1, G = H
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import contract
# The layout and the code range are the contract's (qvit.ops.contract); the
# reference uses them and tests reach them here too.
from .contract import group_shape, qrange

__all__ = [
    "group_shape",
    "qrange",
    "fake_quant",
    "fake_quant_forward",
    "fake_quant_backward",
]

LN2 = math.log(2.0)


def _check(x: Tensor, scale: Tensor, bits: Tensor, offset: Optional[Tensor],
           signed: bool, bits_range: Tuple[int, int]) -> Tuple[int, int, int]:
    bmin, bmax = contract.check_bits_range(tuple(bits_range), signed)
    _, k = contract.check_param_shapes(scale.shape, bits.shape,
                                       None if offset is None else offset.shape, (bmin, bmax))
    return bmin, bmax, k


def _active_rows(scale: Tensor, groups: int) -> Tensor:
    if scale.shape[0] == 1:
        return torch.zeros(groups, dtype=torch.long, device=scale.device)
    return torch.arange(groups, device=scale.device)


def _lsq_factor(grad_scale: Optional[float], n_group: int, qp: Tensor) -> Tensor:
    if grad_scale is not None:
        return torch.full_like(qp, float(grad_scale))
    if n_group == 0:  # an empty x: every gradient sum is 0, and so is its factor
        return torch.zeros_like(qp)
    return 1.0 / torch.sqrt(n_group * qp)


def fake_quant(
    x: Tensor,
    scale: Tensor,
    bits: Tensor,
    offset: Optional[Tensor] = None,
    *,
    signed: bool = True,
    dim: int = 0,
    bits_range: Tuple[int, int] = (2, 8),
    grad_scale: Optional[float] = None,
) -> Tensor:
    """Learnable fake quantization, composed from differentiable torch ops.

    ``y = round(clamp((x - beta)/s, Qn, Qp)) * s + beta`` per group, with
    ``s = scale[row, round(clamp(bits)) - bits_min]``. Gradients reach ``x``,
    the active scale (times the LSQ factor ``1/sqrt(N_g*Qp)`` unless
    ``grad_scale`` is given), ``bits`` (through ``Qn``/``Qp``) and the active
    offset.

    Args:
        x: input of any shape; fp16/bf16 are computed in fp32.
        scale: ``[1 or G, K]`` switchable-scale table, ``K = bits_max - bits_min + 1``.
        bits: ``[G]`` continuous bit-widths.
        offset: optional ``[1 or G, K]`` offset table (LSQ+).
        signed: signed ``[-2^(b-1), 2^(b-1)-1]`` or unsigned ``[0, 2^b-1]`` codes.
        dim: the dimension of ``x`` split into ``G`` groups.
        bits_range: ``(bits_min, bits_max)``.
        grad_scale: constant factor on the scale gradient; ``None`` = LSQ default.

    Returns:
        The fake-quantized tensor, with ``x``'s shape and dtype.
    """
    bmin, bmax, _ = _check(x, scale, bits, offset, signed, bits_range)
    outer, g, inner = group_shape(x.shape, dim, bits.numel())
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    xv = x.to(work).reshape(outer, g, inner)

    bits_w = bits.to(work)
    bhat = bits_w + (torch.round(bits_w.clamp(bmin, bmax)) - bits_w).detach()
    col = (bhat.detach() - bmin).long()
    rows = _active_rows(scale, g)
    s = scale.to(work)[rows, col]
    qn, qp = qrange(bhat, signed)
    factor = _lsq_factor(grad_scale, outer * inner, qp.detach())
    s = (s - s * factor).detach() + s * factor
    beta = offset.to(work)[rows, col] if offset is not None else torch.zeros_like(s)

    s3, b3 = s.view(1, g, 1), beta.view(1, g, 1)
    qn3, qp3 = qn.view(1, g, 1), qp.view(1, g, 1)
    v = (xv - b3) / s3
    v_ste = v + (torch.round(v) - v).detach()
    q = torch.where(v > qp3, qp3, torch.where(v < qn3, qn3, v_ste))
    y = q * s3 + b3
    return y.reshape(x.shape).to(x.dtype)


def _decode(scale: Tensor, bits: Tensor, offset: Optional[Tensor], signed: bool,
            bmin: int, bmax: int, work: torch.dtype):
    g = bits.numel()
    bhat = torch.round(bits.to(torch.float64).clamp(bmin, bmax))
    col = (bhat - bmin).long()
    rows = _active_rows(scale, g)
    s = scale.to(work)[rows, col]
    beta = offset.to(work)[rows, col] if offset is not None else torch.zeros_like(s)
    qn, qp = qrange(bhat, signed)
    return bhat, rows, col, s, beta, qn.to(work), qp.to(work)


def fake_quant_forward(
    x: Tensor,
    scale: Tensor,
    bits: Tensor,
    offset: Optional[Tensor] = None,
    *,
    signed: bool = True,
    dim: int = 0,
    bits_range: Tuple[int, int] = (2, 8),
) -> Tensor:
    """Closed-form forward: the numerics every kernel must match (bitwise for fp32)."""
    bmin, bmax, _ = _check(x, scale, bits, offset, signed, bits_range)
    outer, g, inner = group_shape(x.shape, dim, bits.numel())
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    _, _, _, s, beta, qn, qp = _decode(scale, bits, offset, signed, bmin, bmax, work)
    s3, b3 = s.view(1, g, 1), beta.view(1, g, 1)
    v = (x.to(work).reshape(outer, g, inner) - b3) / s3
    c = torch.where(v < qn.view(1, g, 1), qn.view(1, g, 1), v)
    c = torch.where(c > qp.view(1, g, 1), qp.view(1, g, 1), c)
    y = torch.round(c) * s3
    y = y + b3
    return y.reshape(x.shape).to(x.dtype)


def fake_quant_backward(
    grad_y: Tensor,
    x: Tensor,
    scale: Tensor,
    bits: Tensor,
    offset: Optional[Tensor] = None,
    *,
    signed: bool = True,
    dim: int = 0,
    bits_range: Tuple[int, int] = (2, 8),
    grad_scale: Optional[float] = None,
) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """Closed-form backward.

    Returns:
        ``(grad_x, grad_scale_table, grad_bits, grad_offset_table)``: ``grad_x``
        in ``x``'s dtype; the others in the parameters' dtype, with zeros in
        the inactive table entries; ``grad_offset_table`` is ``None`` without
        an offset.
    """
    bmin, bmax, _ = _check(x, scale, bits, offset, signed, bits_range)
    if grad_y.shape != x.shape:
        raise ValueError(f"grad_y has shape {tuple(grad_y.shape)}, x has {tuple(x.shape)}")
    outer, g, inner = group_shape(x.shape, dim, bits.numel())
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    bhat, rows, col, s, beta, qn, qp = _decode(scale, bits, offset, signed, bmin, bmax, work)
    s3, b3 = s.view(1, g, 1), beta.view(1, g, 1)
    qn3, qp3 = qn.view(1, g, 1), qp.view(1, g, 1)
    v = (x.to(work).reshape(outer, g, inner) - b3) / s3
    u = grad_y.to(work).reshape(outer, g, inner)
    hi, lo = v > qp3, v < qn3
    inside = ~(hi | lo)
    zero = torch.zeros((), dtype=work, device=x.device)
    gx = torch.where(inside, u, zero)
    gx = torch.where(torch.isnan(v), v, gx)

    c = torch.where(lo, qn3, v)
    c = torch.where(hi, qp3, c)
    r = torch.round(c) - torch.where(inside, v, zero)
    f64 = torch.float64
    acc_r = (u.to(f64) * r.to(f64)).sum(dim=(0, 2))
    acc_hi = torch.where(hi, u, zero).to(f64).sum(dim=(0, 2))
    acc_lo = torch.where(lo, u, zero).to(f64).sum(dim=(0, 2))

    pdt = scale.dtype
    factor = _lsq_factor(grad_scale, outer * inner, qp.to(f64))
    s64 = s.to(f64)
    if signed:
        gbits = s64 * LN2 * torch.pow(2.0, bhat - 1) * (acc_hi - acc_lo)
    else:
        gbits = s64 * LN2 * torch.pow(2.0, bhat) * acc_hi

    gscale = torch.zeros(scale.shape, dtype=f64, device=x.device)
    gscale.index_put_((rows, col), factor * acc_r, accumulate=True)
    goff = None
    if offset is not None:
        goff = torch.zeros(scale.shape, dtype=f64, device=x.device)
        goff.index_put_((rows, col), acc_hi + acc_lo, accumulate=True)
        goff = goff.to(pdt)
    return gx.reshape(x.shape).to(x.dtype), gscale.to(pdt), gbits.to(bits.dtype), goff
