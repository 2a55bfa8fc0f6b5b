"""Initial step sizes (and offsets) of the switchable scale tables.

Every table entry is fitted for its own bit-width by the MSE fixed point
``q = round(clamp((x - beta)/s)); s <- <x - beta, q>/<q, q>`` (with an offset,
alternating ``beta <- mean(x - s q)`` from ``beta = min(x)``). Two starts, the
``QuantizerConfig.init`` option:

* :func:`mse_fit` (``"grid"``, qvit): the best point of a grid of clipping
  ratios, then at most ``_MAX_ITERS`` steps on a subsample (:func:`_subsample`);
* :func:`official_fit` (``"official"``, the research code github
  zhexinli/Q-ViT-DeiT): ``max|x|/Qp`` iterated to convergence on every element.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import Tensor

from ..ops import contract

__all__ = ["mse_fit", "official_fit"]

# The MSE fits see at most this many elements per quantizer (a random subset of
# positions, the same for every group; at least _MIN_ROW per group): tens of
# thousands of samples pin a step size far below the noise of LSQ training,
# and the fit costs ~50 passes per bit-width over them.
_MAX_SAMPLES = 1 << 14
_MIN_ROW = 256
_MAX_ITERS = 10
_REL_TOL = 1e-5
# official_fit has no iteration cap in the research code; the fixed point of a
# Lloyd iteration settles in tens of steps, this only guards against a cycle.
_OFFICIAL_MAX_ITERS = 10000



def _subsample(rows: Tensor) -> Tensor:
    """A fixed-seed random subset of the columns of ``rows [R, M]`` (see ``_MAX_SAMPLES``)."""
    r, m = rows.shape
    keep = max(_MAX_SAMPLES // r, _MIN_ROW)
    if m <= keep:
        return rows
    gen = torch.Generator(device="cpu").manual_seed(m)
    idx = torch.randperm(m, generator=gen)[:keep].to(rows.device)
    return rows[:, idx]


def _grid_best(x: Tensor, center: Tensor, beta: Tensor, qn: float, qp: float,
               ratios: Tensor) -> Tensor:
    """The step size ``center * ratio`` with the least squared error, per row of ``x [R, M]``."""
    r, m = x.shape
    ratios = ratios.to(x.device)
    chunk = max(1, (1 << 22) // max(1, r * m))
    errs = []
    xc = (x - beta[:, None])[:, None, :]
    for i in range(0, ratios.numel(), chunk):
        s = center[:, None] * ratios[None, i:i + chunk]           # [R, c]
        inv = (1.0 / s)[:, :, None]
        q = torch.round(torch.clamp(xc * inv, qn, qp))
        errs.append((q * s[:, :, None] - xc).pow(2).mean(dim=2))
    err = torch.cat(errs, dim=1)
    return center * ratios[err.argmin(dim=1)]


def mse_fit(x: Tensor, bits: int, signed: bool, offset: bool) -> Tuple[Tensor, Tensor]:
    """MSE-optimal step size (and offset) of every row of ``x [R, M]`` at ``bits``.

    The MSE fixed point of the research code (``q = round(clamp((x-beta)/s));
    s <- <x-beta, q>/<q, q>``, with an offset alternating ``beta <- mean(x - s q)``
    from ``beta = min(x)``) converges slowly and to the nearest local minimum
    when started at the full range, so it is started from the best of a
    log-spaced grid of clipping ratios and then iterated.

    Returns:
        ``(scale [R], offset [R])``; the offset is zeros without ``offset``.
    """
    x = x.float()
    qn, qp = contract.qrange_of(bits, signed)
    if offset:
        beta0 = x.amin(dim=1)
        span = (x.amax(dim=1) - beta0) / (qp - qn)
        beta0 = beta0 - qn * span
    else:
        beta0 = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        span = (x.abs().amax(dim=1) if signed else x.clamp_min(0).amax(dim=1)) / qp
    dead = ~(span > 0) | ~torch.isfinite(span)
    span = torch.where(dead, torch.ones_like(span), span)
    # coarse log grid of clipping ratios (step 1.33x), then a fine one around the best
    best_s = _grid_best(x, span, beta0, qn, qp, torch.logspace(-3, 0, 25, dtype=x.dtype))
    best_s = _grid_best(x, best_s, beta0, qn, qp, torch.linspace(0.8, 1.25, 16, dtype=x.dtype))
    best_s = _grid_best(x, best_s, beta0, qn, qp, torch.linspace(0.97, 1.03, 7, dtype=x.dtype))
    s, beta = best_s, beta0
    for _ in range(_MAX_ITERS):
        q = torch.round(torch.clamp((x - beta[:, None]) * (1.0 / s)[:, None], qn, qp))
        if offset:
            beta = (x - s[:, None] * q).mean(dim=1)
        qq = (q * q).sum(dim=1)
        s_new = (x - beta[:, None]).mul(q).sum(dim=1) / qq.clamp_min(1e-30)
        s_new = torch.where((qq > 0) & (s_new > 0), s_new, s)
        change = ((s_new - s).abs() / s).max()
        s = s_new
        if change < _REL_TOL:
            break
    s = torch.where(dead, torch.ones_like(s), s)
    beta = torch.where(dead, torch.zeros_like(beta), beta) if offset else beta
    return s, beta


def _qrange(bits: int, signed: bool) -> Tuple[float, float]:
    if signed:
        return -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1
    return 0.0, 2.0 ** bits - 1


def _official_row(xs: Tensor, prefix: Tensor, qn: float, qp: float,
                  offset: bool) -> Tuple[float, float]:
    """:func:`official_fit` of one sorted float64 row ``xs`` (``prefix``: its cumulative sums).

    ``q = round(clamp((x - beta)/s))`` takes level ``k`` on the run of sorted
    ``x`` between the edges ``beta + (k -+ 1/2) s``, so ``<x - beta, q>``,
    ``<q, q>`` and ``mean(x - s q)`` are sums over levels of prefix-sum
    differences: each step costs ``O(2^b log M)``, not ``O(M)``.
    """
    m = xs.numel()
    levels = torch.arange(qn, qp + 1, dtype=xs.dtype)
    beta = float(xs[0]) if offset else 0.0
    s = max(abs(float(xs[0]) - beta), abs(float(xs[-1]) - beta)) / qp
    if not (s > 0 and math.isfinite(s)):
        return 1.0, 0.0
    total = float(prefix[-1])
    for _ in range(_OFFICIAL_MAX_ITERS):
        edges = (levels[:-1] + 0.5) * s + beta
        cut = torch.searchsorted(xs, edges)  # x >= edge rounds up (ties: measure zero)
        bounds = torch.cat([cut.new_zeros(1), cut, cut.new_full((1,), m)])
        counts = (bounds[1:] - bounds[:-1]).to(xs.dtype)
        sums = prefix[bounds[1:]] - prefix[bounds[:-1]]
        qq = float((levels * levels * counts).sum())
        if qq <= 0:
            break
        xq = float((levels * sums).sum()) - beta * float((levels * counts).sum())
        s_new = xq / qq
        if offset:
            beta = (total - s * float((levels * counts).sum())) / m
        if not (s_new > 0 and math.isfinite(s_new)):
            break
        done = abs(s_new - s) / s_new < _REL_TOL
        s = s_new
        if done:
            break
    return s, beta


@torch.no_grad()
def official_fit(x: Tensor, bits: int, signed: bool, offset: bool) -> Tuple[Tensor, Tensor]:
    """The research code's MSE fit of every row of ``x [R, M]`` at ``bits`` (in float64).

    Without offset: ``s = max|x| / Qp``, then ``q = round(clamp(x/s, Qn, Qp))``,
    ``s <- <x, q> / <q, q>`` until ``|s - s_old| / s < 1e-5``. With offset:
    ``beta = min(x)``, ``s = max|x - beta| / Qp``, then each step
    ``q = round(clamp((x - beta)/s))``, ``beta' = mean(x - s q)`` (old ``s``),
    ``s <- <x - beta, q> / <q, q>`` (old ``beta``), ``beta <- beta'``. The
    iteration creeps (hundreds of steps from the full range), so each step is
    computed from the sorted row's prefix sums (same sums, another order).
    A row with no spread gets scale 1, offset 0.

    Returns:
        ``(scale [R], offset [R])`` in ``x``'s float type; zero offsets without ``offset``.
    """
    qn, qp = _qrange(bits, signed)
    out_s, out_b = [], []
    for row in x.detach().double().cpu():
        xs = torch.sort(row).values
        prefix = torch.cat([xs.new_zeros(1), torch.cumsum(xs, 0)])
        s, b = _official_row(xs, prefix, qn, qp, offset)
        out_s.append(s)
        out_b.append(b if offset else 0.0)
    kw = dict(dtype=x.dtype, device=x.device)
    return torch.tensor(out_s, **kw), torch.tensor(out_b, **kw)
