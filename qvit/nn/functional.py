"""Fused fake-quantize-then-matmul autograd functions: every activation stored once.

A fake-quantized matmul written as two autograd nodes keeps its operand twice:
the quantizer keeps the float input for its backward, the matmul keeps the
quantized copy. The functions here keep only the float operands and recompute
the quantized ones in the backward with the fused forward kernel (it runs at
copy speed), then hand the matmul's gradient to the fused backward kernel
(docs/design.md section 4.1):

* :func:`qlinear`   - ``F.linear(fq(x), fq(W), b)``, keeps ``x`` (``W`` may be
  quantized in another layout, :class:`WeightLayout`);
* :func:`qconv2d`   - ``conv2d(fq(x), fq(W), b)``, keeps ``x``;
* :func:`qattention` - the attention core ``fq(softmax(fq(q) fq(k)^T * scale +
  bias)) @ fq(v)`` on the qkv projection's output, keeps ``qkv`` and the softmax
  output ``P`` once (``P`` is both the softmax's saved output and the input of
  its quantizer); ``q``, ``k`` and ``v`` are quantized in one kernel call.

An operand's quantizer is given as ``(scale, bits, offset, cfg)`` from
:meth:`qvit.nn.quantizer.Quantizer.kernel_args` (``cfg = (dim, signed, min,
max, lsq)``), or ``None`` for a float operand. The arithmetic, and so the
values and gradients, are those of ``qvit.ops.fake_quant`` followed by the
float matmul. Under ``torch.compile`` the functions are traced as written, so
the compiled backward also recomputes instead of saving.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops.torch_ops import fq_backward, fq_forward

__all__ = ["qlinear", "qconv2d", "qattention", "WeightLayout", "to_groups", "from_groups"]

QArgs = Optional[Tuple[Tensor, Tensor, Optional[Tensor], tuple]]


def _fq(x: Tensor, s, b, o, cfg) -> Tensor:
    return x if cfg is None else fq_forward(x, s, b, o, *cfg[:4])


def _fq_grads(g: Tensor, x: Tensor, s, b, o, cfg, need: Sequence[bool]):
    """(grad_x, grad_scale, grad_bits, grad_offset) of one quantizer, given dL/dfq(x).

    ``g`` may come from a matmul run in autocast's lower precision; it is cast
    back to ``x``'s dtype here, as the cast node of the unfused graph would do.
    """
    g = g.to(x.dtype)
    if cfg is None:
        return g, None, None, None
    gx, gs, gb, go = fq_backward(g, x, s, b, o, *cfg)
    return (gx if need[0] else None, gs if need[1] else None, gb if need[2] else None,
            go if (o is not None and need[3]) else None)


def _amp_state(t: Tensor):
    """The autocast state of ``t``'s device, recorded in the forward."""
    dev = t.device.type
    return dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev)


def _amp(state):
    """Re-enter the forward's autocast state in the backward (as ``custom_bwd`` does), so
    the recomputed quantized operands and the matmul gradients run in the same dtypes
    as in the forward."""
    dev, enabled, dtype = state
    return torch.autocast(dev, dtype=dtype, enabled=enabled)


def _to(g: Optional[Tensor], dtype) -> Optional[Tensor]:
    return g if g is None or dtype is None else g.to(dtype)


def _unpack(q: QArgs):
    return (None, None, None, None) if q is None else q


class WeightLayout(NamedTuple):
    """The layout a weight quantizer sees: ``w.reshape(view).permute(perm).reshape(grouped)``
    (a copy) of a weight shaped ``shape``; :func:`from_groups` is its inverse.
    E.g. the research code's qkv grouping (:class:`~qvit.nn.attention.QKVColumnGroups`):
    ``[3C, C_in] -> [C, 3H, C_in/H]``."""
    shape: Tuple[int, ...]
    view: Tuple[int, ...]
    perm: Tuple[int, ...]
    grouped: Tuple[int, ...]


def to_groups(w: Tensor, layout: WeightLayout) -> Tensor:
    """``w`` in its quantizer's layout."""
    return w.reshape(layout.view).permute(layout.perm).reshape(layout.grouped)


def from_groups(wg: Tensor, layout: WeightLayout) -> Tensor:
    """Inverse of :func:`to_groups` (also its adjoint: both only move elements)."""
    view, perm = layout.view, layout.perm
    inv = tuple(sorted(range(len(perm)), key=perm.__getitem__))
    return wg.reshape([view[p] for p in perm]).permute(inv).reshape(layout.shape)


def _fq_w(w: Tensor, s, b, o, cfg, layout: Optional[WeightLayout]) -> Tensor:
    """``fq(w)`` in ``w``'s layout, quantized in ``layout`` when one is given."""
    if cfg is None or layout is None:
        return _fq(w, s, b, o, cfg)
    return from_groups(fq_forward(to_groups(w, layout), s, b, o, *cfg[:4]), layout)


class _QLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, bias, xs, xb, xo, xcfg, ws, wb, wo, wcfg, layout):
        ctx.save_for_backward(x, w, xs, xb, xo, ws, wb, wo)
        ctx.cfg = (xcfg, wcfg, layout)
        ctx.has_bias = bias is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.amp = _amp_state(x)
        return F.linear(_fq(x, xs, xb, xo, xcfg), _fq_w(w, ws, wb, wo, wcfg, layout), bias)

    @staticmethod
    def backward(ctx, gy):
        x, w, xs, xb, xo, ws, wb, wo = ctx.saved_tensors
        xcfg, wcfg, layout = ctx.cfg
        need = ctx.needs_input_grad
        need_x = any(need[i] for i in (0, 3, 4, 5))
        need_w = any(need[i] for i in (1, 7, 8, 9))
        gy2 = gy.reshape(-1, gy.shape[-1])
        gx = gw = gbias = None
        xgrads = wgrads = (None, None, None, None)
        # a weight quantized in another layout: fq and its gradient are taken there
        # (one copy of w in that layout serves both), the results moved back
        grouped = wcfg is not None and layout is not None
        with _amp(ctx.amp):
            wl = to_groups(w, layout) if grouped else w
            if need_x:
                wq = _fq(wl, ws, wb, wo, wcfg)
                gxq = gy2.mm(from_groups(wq, layout) if grouped else wq).view(x.shape)
                del wq
                xgrads = _fq_grads(gxq, x, xs, xb, xo, xcfg, (need[0], need[3], need[4], need[5]))
                gx = xgrads[0]
            if need_w:
                xq = _fq(x, xs, xb, xo, xcfg)
                gwq = gy2.t().mm(xq.reshape(-1, xq.shape[-1]))
                del xq
                wgrads = _fq_grads(to_groups(gwq, layout) if grouped else gwq, wl, ws, wb, wo,
                                   wcfg, (need[1], need[7], need[8], need[9]))
                gw = wgrads[0]
                if grouped and gw is not None:
                    gw = from_groups(gw, layout)
        if ctx.has_bias and need[2]:
            gbias = _to(gy2.sum(0), ctx.bias_dtype)
        return (gx, gw, gbias, *xgrads[1:], None, *wgrads[1:], None, None)


def qlinear(x: Tensor, weight: Tensor, bias: Optional[Tensor], xq: QArgs, wq: QArgs,
            layout: Optional[WeightLayout] = None) -> Tensor:
    """``F.linear(fq(x), fq(weight), bias)`` keeping only ``x`` for the backward.

    ``layout``: the weight is quantized as ``to_groups(weight, layout)`` (``wq``'s
    tables are for that shape) and used as ``from_groups`` of the result.
    """
    xs, xb, xo, xcfg = _unpack(xq)
    ws, wb, wo, wcfg = _unpack(wq)
    return _QLinear.apply(x, weight, bias, xs, xb, xo, xcfg, ws, wb, wo, wcfg, layout)


class _QConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, bias, conv, xs, xb, xo, xcfg, ws, wb, wo, wcfg):
        ctx.save_for_backward(x, w, xs, xb, xo, ws, wb, wo)
        ctx.cfg = (xcfg, wcfg)
        ctx.conv = conv
        ctx.has_bias = bias is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.amp = _amp_state(x)
        stride, padding, dilation, groups = conv
        return F.conv2d(_fq(x, xs, xb, xo, xcfg), _fq(w, ws, wb, wo, wcfg), bias,
                        stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, gy):
        x, w, xs, xb, xo, ws, wb, wo = ctx.saved_tensors
        xcfg, wcfg = ctx.cfg
        stride, padding, dilation, groups = ctx.conv
        need = ctx.needs_input_grad
        need_x = any(need[i] for i in (0, 4, 5, 6))
        need_w = any(need[i] for i in (1, 8, 9, 10))
        bias_sizes = [w.shape[0]] if ctx.has_bias else None
        with _amp(ctx.amp):
            xq, wq = _fq(x, xs, xb, xo, xcfg), _fq(w, ws, wb, wo, wcfg)
        # aten.convolution_backward has no autocast rule: run it in gy's dtype, as the
        # forward's autocast-cast conv did
        gxq, gwq, gbias = torch.ops.aten.convolution_backward(
            gy, xq.to(gy.dtype), wq.to(gy.dtype), bias_sizes,
            list(stride), list(padding), list(dilation), False, [0, 0], groups,
            [need_x, need_w, bool(ctx.has_bias and need[2])])
        gbias = _to(gbias, ctx.bias_dtype)
        xgrads = wgrads = (None, None, None, None)
        if need_x:
            xgrads = _fq_grads(gxq, x, xs, xb, xo, xcfg, (need[0], need[4], need[5], need[6]))
        if need_w:
            wgrads = _fq_grads(gwq, w, ws, wb, wo, wcfg, (need[1], need[8], need[9], need[10]))
        return (xgrads[0], wgrads[0], gbias, None, *xgrads[1:], None, *wgrads[1:], None)


def qconv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride, padding, dilation,
            groups: int, xq: QArgs, wq: QArgs) -> Tensor:
    """``conv2d(fq(x), fq(weight), bias, ...)`` keeping only ``x``; numeric padding only."""
    xs, xb, xo, xcfg = _unpack(xq)
    ws, wb, wo, wcfg = _unpack(wq)
    conv = (tuple(stride), tuple(padding), tuple(dilation), int(groups))
    return _QConv2d.apply(x, weight, bias, conv, xs, xb, xo, xcfg, ws, wb, wo, wcfg)


def _cat_tables(q3):
    """The q, k, v quantizers' tables as one ``[3G, K]`` table (one kernel call);
    a table is expanded only when it is shared by the ``G`` groups."""
    (qs, qb, qo, _), (ks, kb, ko, _), (vs, vb, vo, _) = q3
    g = qb.shape[0]

    def cat(ts):
        return torch.cat([t if t.shape[0] == g else t.expand(g, -1) for t in ts])
    return cat((qs, ks, vs)), torch.cat([qb, kb, vb]), None if qo is None else cat((qo, ko, vo))


def _split_tables(gs, gb, go, rows: int, g: int):
    """Undo :func:`_cat_tables` on gradients: three of each, ``[rows, K]`` and ``[G]``."""
    def split(t):
        if rows == 1 and g > 1:
            return t.view(3, g, t.shape[-1]).sum(1, keepdim=True).unbind(0)
        return t.split(g)
    return split(gs), gb.split(g), (None,) * 3 if go is None else split(go)


def _heads(qkv_q: Tensor, b_: int, n: int, heads: int, d: int):
    """q, k, v as contiguous ``[B*H, N, d]`` batches (one copy of the three)."""
    t = qkv_q.view(b_, n, 3, heads, d).permute(2, 0, 3, 1, 4).reshape(3, b_ * heads, n, d)
    return t.unbind(0)


def _logits(q: Tensor, k: Tensor, scale: float, bias, mask, b_: int, heads: int) -> Tensor:
    """``q * scale @ k^T (+ bias) (+ mask per window)`` as ``[B, H, N, N]``."""
    n = q.shape[1]
    logits = torch.bmm(q * scale, k.transpose(1, 2)).view(b_, heads, n, n)
    if bias is not None:
        logits = logits + bias
    if mask is not None:
        nw = mask.shape[0]
        logits = (logits.view(-1, nw, heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
                  ).view(-1, heads, n, n)
    return logits


class _QAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, bias, mask, qs, qb, qo, ks, kb, ko, vs, vb, vo, ps, pb, po, meta):
        heads, d, scale, qcfg, pcfg = meta
        s_cat, b_cat, o_cat = _cat_tables(((qs, qb, qo, qcfg), (ks, kb, ko, qcfg),
                                           (vs, vb, vo, qcfg)))
        b_, n, _ = qkv.shape
        q, k, v = _heads(fq_forward(qkv.view(b_ * n, 3 * heads, d), s_cat, b_cat, o_cat,
                                    *qcfg[:4]), b_, n, heads, d)
        p = _logits(q, k, scale, bias, mask, b_, heads).softmax(dim=-1)
        out = torch.bmm(_fq(p, ps, pb, po, pcfg).view(b_ * heads, n, n), v)
        ctx.save_for_backward(qkv, p, s_cat, b_cat, o_cat, ps, pb, po)
        ctx.meta = meta
        ctx.shapes = (None if bias is None else bias.shape, qs.shape[0], qb.shape[0])
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.amp = _amp_state(qkv)
        return out.view(b_, heads, n, d)

    @staticmethod
    def backward(ctx, g_out):
        qkv, p, s_cat, b_cat, o_cat, ps, pb, po = ctx.saved_tensors
        heads, d, scale, qcfg, pcfg = ctx.meta
        bias_shape, rows, g = ctx.shapes
        need = ctx.needs_input_grad
        b_, n, _ = qkv.shape
        bh = b_ * heads
        flat = qkv.view(b_ * n, 3 * heads, d)
        with _amp(ctx.amp):
            q, k, v = _heads(fq_forward(flat, s_cat, b_cat, o_cat, *qcfg[:4]), b_, n, heads, d)
            a = _fq(p, ps, pb, po, pcfg).view(bh, n, n)
            g_o = g_out.reshape(bh, n, d)
            g_a = torch.bmm(g_o, v.transpose(1, 2))
            g_v = torch.bmm(a.transpose(1, 2), g_o)
            del a
            pgrads = _fq_grads(g_a.view(p.shape), p, ps, pb, po, pcfg, (True,) + tuple(need[12:15]))
            g_logits = torch._softmax_backward_data(pgrads[0], p, -1, p.dtype)
            g_bias = _to(g_logits.sum_to_size(bias_shape), ctx.bias_dtype) if need[1] else None
            g_l = g_logits.view(bh, n, n)
            g_q = torch.bmm(g_l, k).mul_(scale)
            g_k = torch.bmm(g_l.transpose(1, 2), q * scale)
            del g_logits, g_l
            g_qkv = torch.stack([g_q, g_k, g_v]).to(qkv.dtype).view(3, b_, heads, n, d)
        g_qkv = g_qkv.permute(1, 3, 0, 2, 4).reshape(b_ * n, 3 * heads, d)
        gx, gs, gb, go = fq_backward(g_qkv, flat, s_cat, b_cat, o_cat, *qcfg)
        (sq, sk, sv), (bq, bk, bv), (oq, ok, ov) = _split_tables(
            gs, gb, go if o_cat is not None else None, rows, g)
        return (gx.view(qkv.shape), g_bias, None, sq, bq, oq, sk, bk, ok, sv, bv, ov,
                *pgrads[1:], None)


def qattention(qkv: Tensor, heads: int, scale: float, bias: Optional[Tensor],
               mask: Optional[Tensor], qkv_args: Sequence[QArgs], probs: QArgs) -> Tensor:
    """The quantized attention core on ``qkv [B, N, 3*H*d]`` (timm's fused layout).

    ``A = fq(softmax(fq(q) * scale @ fq(k)^T + bias [+ mask per window]))``,
    returns ``A @ fq(v)`` as ``[B, H, N, d]``. ``qkv_args``: the q, k, v
    quantizers (equal group counts, table rows and offset use; quantized in one
    kernel call on the ``[B*N, 3H, d]`` view); ``bias`` (e.g. Swin's relative
    position bias, may require grad) broadcasts to ``[B, H, N, N]``; ``mask``
    ``[nW, N, N]`` is added per window (Swin's shift mask, no gradient).
    Keeps ``qkv`` and the softmax output for the backward, nothing else.
    """
    b_, n, c3 = qkv.shape
    d = c3 // (3 * heads)
    qcfg = qkv_args[0][3]
    ps, pb, po, pcfg = _unpack(probs)
    (qs, qb, qo, _), (ks, kb, ko, _), (vs, vb, vo, _) = qkv_args
    meta = (heads, d, float(scale), qcfg, pcfg)
    return _QAttention.apply(qkv.contiguous(), bias, mask, qs, qb, qo, ks, kb, ko, vs, vb, vo,
                             ps, pb, po, meta)
