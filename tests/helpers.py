"""Input generators, layouts and tolerances shared by the op tests.

Tie-free inputs. ``tie_free_input`` draws the code-space value ``v`` of every
element first and builds ``x = v*s + beta`` in float64: the integer part of
``v`` lies below ``Qn`` for 15% of the elements, above ``Qp`` for 15%, and in
``[Qn, Qp)`` for the rest (so both clipping sides are hit) and the fractional part stays at least ``TIE_MARGIN`` away from .5
(and from .0, so clipping decisions at ``Qn``/``Qp`` are not borderline
either). For float32 inputs the generator recomputes ``v`` in float32 exactly
as the kernels do and checks the margin still holds. Exact ties and values
exactly at ``Qn``/``Qp`` are tested by dedicated, hand-written cases.

For float16/bfloat16 inputs casting moves ``v`` (by up to half a code at 8
bits in bf16), so ties can occur; the rule there does not need tie-freedom:
kernel and reference read the same half-precision ``x``, do the same fp32
arithmetic (true division, round-half-even, separate multiply and add) and
round the fp32 result once to the half type, so ``y`` and ``grad_x`` must be
bitwise equal.

Gradient tolerances. ``grad_x`` is ``u`` or 0 per element, so it must match
exactly. Parameter gradients are group sums: kernels add fp32 terms in
fixed-order chunks, the reference adds the same fp32 terms in float64. The
allowed error of a sum is ``RTOL_SUM[dtype] * sum(|term|)`` (times the group's
constant factor), i.e. relative to the sum of magnitudes, not to the possibly
cancelling result: a float32 chunked sum stays far below 1e-5 of it, while
one wrong element of a small test group is far above.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

from qvit.ops import reference

TIE_MARGIN = 0.05

# Bound on |kernel sum - float64 sum| relative to sum(|terms|), per x dtype.
RTOL_SUM = {torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5, torch.float64: 1e-12}

# name -> (shape, dim, groups): the layouts of docs/design.md section 2.1.
LAYOUTS: Dict[str, Tuple[Tuple[int, ...], int, int]] = {
    "per_tensor": ((3, 7, 5), 0, 1),
    "per_channel": ((11, 6), -1, 6),           # [T, C], G = C
    "per_head_act": ((2, 3, 5, 4), 1, 3),      # [B, H, N, d], G = H
    "per_head_rows": ((3 * 4, 5), 0, 3),       # W_q [H*d, C_in], G = H
    "per_head_cols": ((5, 3 * 4), 1, 3),       # W_proj [C_out, H*d], G = H
}


def make_params(
    groups: int,
    *,
    scale_rows: int = 1,
    bits: Optional[Sequence[float]] = None,
    bits_range: Tuple[int, int] = (2, 8),
    offset: bool = False,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Random positive scale table ``[scale_rows, K]``, bits ``[groups]``, optional offset."""
    gen = torch.Generator().manual_seed(seed)
    bmin, bmax = bits_range
    k = bmax - bmin + 1
    scale = torch.pow(2.0, torch.empty(scale_rows, k, dtype=torch.float64).uniform_(-7, 0, generator=gen))
    scale = scale * torch.empty(scale_rows, k, dtype=torch.float64).uniform_(1, 1.9, generator=gen)
    if bits is None:
        bits_t = torch.empty(groups, dtype=torch.float64).uniform_(bmin - 0.4, bmax + 0.4, generator=gen)
    else:
        bits_t = torch.tensor([float(b) for b in bits], dtype=torch.float64)
        if bits_t.numel() == 1 and groups > 1:
            bits_t = bits_t.expand(groups).clone()
    off = None
    if offset:
        off = torch.empty(scale_rows, k, dtype=torch.float64).uniform_(-0.5, 0.5, generator=gen)
        off = off.to(dtype)
    return scale.to(dtype), bits_t.to(dtype), off


def decode(scale: Tensor, bits: Tensor, offset: Optional[Tensor], signed: bool,
           bits_range: Tuple[int, int]):
    """Per group ``(s, beta, qn, qp)`` as float64 tensors ``[G]``, independent of the reference."""
    bmin, bmax = bits_range
    out = []
    for g, b in enumerate(bits.tolist()):
        bh = int(round(min(max(b, bmin), bmax)))  # Python round is half-to-even
        row = 0 if scale.shape[0] == 1 else g
        s = float(scale[row, bh - bmin])
        beta = float(offset[row, bh - bmin]) if offset is not None else 0.0
        qn, qp = (-(2 ** (bh - 1)), 2 ** (bh - 1) - 1) if signed else (0, 2 ** bh - 1)
        out.append((s, beta, qn, qp))
    t = torch.tensor(out, dtype=torch.float64)
    return t[:, 0], t[:, 1], t[:, 2], t[:, 3]


def tie_free_input(
    shape: Sequence[int],
    dim: int,
    scale: Tensor,
    bits: Tensor,
    offset: Optional[Tensor],
    *,
    signed: bool,
    bits_range: Tuple[int, int] = (2, 8),
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Tensor:
    """An ``x`` whose code-space values sit away from .5 ties and from integers (see module doc)."""
    gen = torch.Generator().manual_seed(seed)
    outer, g, inner = reference.group_shape(shape, dim, bits.numel())
    s, beta, qn, qp = (t.view(1, g, 1) for t in decode(scale, bits, offset, signed, bits_range))
    n = outer * g * inner
    # integer part: 15% below Qn, 15% above Qp, the rest inside [Qn, Qp)
    side = torch.rand(outer, g, inner, dtype=torch.float64, generator=gen)
    u = torch.rand(outer, g, inner, dtype=torch.float64, generator=gen)
    ints = torch.where(side < 0.15, qn - 1 - torch.floor(3 * u),
                       torch.where(side > 0.85, qp + torch.floor(3 * u),
                                   torch.floor(qn + u * (qp - qn))))
    frac = torch.rand(outer, g, inner, dtype=torch.float64, generator=gen)
    # map [0, 1) onto [m, .5 - m) U [.5 + m, 1 - m)
    m = TIE_MARGIN
    half = 0.5 - 2 * m
    frac = torch.where(frac < 0.5, m + 2 * frac * half, 0.5 + m + 2 * (frac - 0.5) * half)
    v = ints + frac
    x = (v * s + beta).reshape(tuple(shape)).to(dtype)
    if dtype == torch.float32 and n:
        s32, b32 = (t.to(torch.float32) for t in (s, beta))
        v32 = (x.reshape(outer, g, inner) - b32) / s32
        f = v32.double() - torch.floor(v32.double())
        assert bool(((f - 0.5).abs() > m / 2).all()), "generator produced a near-tie"
    return x


def tie_and_edge_cases(signed: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """Hand-written x at scale 1, 3 bits: exact ties and values exactly at Qn/Qp.

    Returns ``(x, expected_y, expected_inside)`` for ``scale = 1``, ``bits = 3``,
    no offset. Signed 3-bit: Qn = -4, Qp = 3; unsigned: Qn = 0, Qp = 7.
    """
    if signed:
        x = [2.5, 3.5, -2.5, -3.5, 0.5, -0.5, 1.5, -1.5, -4.0, 3.0, 3.4, 3.6, -4.4, -4.6, 2.4999998]
        y = [2.0, 3.0, -2.0, -4.0, 0.0, -0.0, 2.0, -2.0, -4.0, 3.0, 3.0, 3.0, -4.0, -4.0, 2.0]
        #    v = 3.5 is a tie that rounds to 4 but clamps to Qp = 3 first.
        inside = [1, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 1]
        # 3.5 > Qp = 3 is clipped; -3.5 >= Qn = -4 is inside.
    else:
        x = [2.5, 3.5, 4.5, 6.5, 0.5, 0.0, 7.0, 7.4, -0.4, -0.6, 6.4999995]
        y = [2.0, 4.0, 4.0, 6.0, 0.0, 0.0, 7.0, 7.0, 0.0, 0.0, 6.0]
        inside = [1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 1]
    return (torch.tensor(x), torch.tensor(y), torch.tensor(inside, dtype=torch.bool))


def grad_tolerances(
    grad_y: Tensor,
    x: Tensor,
    scale: Tensor,
    bits: Tensor,
    offset: Optional[Tensor],
    *,
    signed: bool,
    dim: int,
    bits_range: Tuple[int, int],
    grad_scale: Optional[float],
    composite: bool = False,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Allowed absolute errors ``(tol_scale [Gs,K], tol_bits [G], tol_offset [Gs,K])``.

    ``composite=True`` is for autograd of the reference composite, which forms
    the scale term as ``round(v) + s * d(v)/ds`` (a cancellation of two numbers
    of size ``|v|``), so its magnitude is ``sum |u| (|round(v)| + |v|)``.
    """
    rtol = RTOL_SUM[x.dtype]
    bmin, _ = bits_range
    outer, g, inner = reference.group_shape(x.shape, dim, bits.numel())
    s, beta, qn, qp = decode(scale, bits, offset, signed, bits_range)
    v = (x.double().reshape(outer, g, inner) - beta.view(1, g, 1)) / s.view(1, g, 1)
    u = grad_y.double().reshape(outer, g, inner).abs()
    hi, lo = v > qp.view(1, g, 1), v < qn.view(1, g, 1)
    inside = ~(hi | lo)
    c = torch.minimum(torch.maximum(v, qn.view(1, g, 1)), qp.view(1, g, 1))
    if composite:
        term_r = (u * (torch.round(c).abs() + v.abs())).sum((0, 2))
    else:
        term_r = (u * (torch.round(c) - torch.where(inside, v, torch.zeros_like(v))).abs()).sum((0, 2))
    term_c = (u * (~inside)).sum((0, 2))
    n_g = outer * inner
    factor = (torch.full_like(qp, grad_scale) if grad_scale is not None
              else 1.0 / torch.sqrt(n_g * qp))
    bhat = [int(round(min(max(b, bmin), bits_range[1]))) for b in bits.tolist()]
    coef = torch.tensor([s_i * math.log(2) * 2.0 ** (b - 1 if signed else b)
                         for s_i, b in zip(s.tolist(), bhat)], dtype=torch.float64)
    tol_s = torch.zeros(scale.shape, dtype=torch.float64)
    tol_o = torch.zeros(scale.shape, dtype=torch.float64)
    for gi in range(g):
        row = 0 if scale.shape[0] == 1 else gi
        tol_s[row, bhat[gi] - bmin] += rtol * factor[gi] * term_r[gi]
        tol_o[row, bhat[gi] - bmin] += rtol * term_c[gi]
    tol_b = rtol * coef * term_c
    tiny = 1e-30
    return tol_s + tiny, tol_b + tiny, tol_o + tiny


def assert_close_tol(got: Tensor, want: Tensor, tol: Tensor, what: str) -> None:
    """``|got - want| <= tol`` elementwise (float64 comparison), with a helpful message."""
    got64, want64 = got.detach().cpu().double(), want.detach().cpu().double()
    err = (got64 - want64).abs()
    bad = ~(err <= tol)
    if bool(bad.any()):
        idx = bad.nonzero()[0].tolist()
        raise AssertionError(
            f"{what}: {int(bad.sum())} entries out of tolerance; first at {idx}: "
            f"got {got64[tuple(idx)].item()!r}, want {want64[tuple(idx)].item()!r}, "
            f"tol {tol[tuple(idx)].item()!r}")


def assert_bitwise(got: Tensor, want: Tensor, what: str) -> None:
    """Exact equality, NaN == NaN, -0.0 == 0.0 (``torch.equal`` semantics on values)."""
    got, want = got.detach().cpu(), want.detach().cpu()
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    same = (got == want) | (torch.isnan(got) & torch.isnan(want))
    if not bool(same.all()):
        bad = (~same).nonzero()[0].tolist()
        raise AssertionError(
            f"{what}: {int((~same).sum())} of {got.numel()} differ; first at {bad}: "
            f"got {got[tuple(bad)].item()!r}, want {want[tuple(bad)].item()!r}")


def frozen_surrogate(x, scale, offset, bits, signed, dim, br, base=None):
    """The function whose true derivative the straight-through gradient is.

    Rounding residuals ``round(v0) - v0`` and the clip masks are frozen at the
    unperturbed input (``base``, the ``v0`` returned by a first call), so inside the range
    ``y = (v + c0) * s + beta`` and outside ``y = Q * s + beta``: smooth in x,
    scale and offset. Written here independently of the reference.
    """
    outer, g, inner = reference.group_shape(x.shape, dim, bits.numel())
    _, _, qn, qp = decode(scale.detach(), bits, None, signed, br)
    bhat = [round(min(max(float(b), br[0]), br[1])) for b in bits]
    rows = [0 if scale.shape[0] == 1 else i for i in range(g)]
    cols = [b - br[0] for b in bhat]
    s = scale[rows, cols].view(1, g, 1)
    beta = offset[rows, cols].view(1, g, 1) if offset is not None else torch.zeros_like(s)
    v = (x.reshape(outer, g, inner) - beta) / s
    v0 = v.detach() if base is None else base
    c0 = torch.round(v0) - v0
    qn, qp = qn.view(1, g, 1), qp.view(1, g, 1)
    y = torch.where(v0 > qp, qp * s + beta, torch.where(v0 < qn, qn * s + beta, (v + c0) * s + beta))
    return y.reshape(x.shape), v0


def surrogate_gradcheck(fake_quant, layout: str, signed: bool) -> bool:
    """float64 ``gradcheck`` of ``fake_quant``'s x / scale / offset gradients.

    Finite differences of a fake quantizer are 0 almost everywhere (the
    straight-through gradient is a chosen surrogate), so the numerical side is
    the frozen-residual surrogate and the analytical side is ``fake_quant``'s
    backward: ``forward = surrogate.detach() + (y - y.detach())``. Residuals and
    masks are frozen at the unperturbed point; ``eps`` keeps every perturbed
    ``v`` within its margin from ties and clip edges. ``grad_scale=1`` because
    the LSQ factor rescales only the gradient.
    """
    shape, dim, g = LAYOUTS[layout]
    br = (2, 8)
    scale, bits, offset = make_params(g, scale_rows=g, bits_range=br, offset=not signed,
                                      dtype=torch.float64, seed=3)
    x = tie_free_input(shape, dim, scale, bits, offset, signed=signed, dtype=torch.float64, seed=4)
    inputs = [x.requires_grad_(), scale.requires_grad_()]
    if offset is not None:
        inputs.append(offset.requires_grad_())
    _, v_base = frozen_surrogate(x.detach(), scale.detach(), offset, bits, signed, dim, br)

    def f(x, scale, offset=None):
        y = fake_quant(x, scale, bits, offset, signed=signed, dim=dim, grad_scale=1.0)
        sur, _ = frozen_surrogate(x, scale, offset, bits, signed, dim, br, base=v_base)
        return sur.detach() + (y - y.detach())

    return torch.autograd.gradcheck(f, inputs, eps=1e-7, atol=1e-6)

