"""Fused fake-quantize-then-matmul autograd functions: every activation stored once.

A fake-quantized matmul written as two autograd nodes keeps its operand twice:
the quantizer keeps the float input for its backward, the matmul keeps the
quantized copy. The functions here keep only the float operands and recompute
the quantized ones in the backward with the fused forward kernel (it runs at
copy speed), then hand the matmul's gradient to the fused backward kernel:

* :func:`qlinear`   - ``F.linear(fq(x), fq(W), b)``, keeps ``x``;
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

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops.torch_ops import fq_backward, fq_forward

__all__ = ["qlinear", "qconv2d", "qattention"]

QArgs = Optional[Tuple[Tensor, Tensor, Optional[Tensor], tuple]]


def _fq(x: Tensor, s, b, o, cfg) -> Tensor:
    return x if cfg is None else fq_forward(x, s, b, o, *cfg[:4])


def _fq_grads(g: Tensor, x: Tensor, s, b, o, cfg, need: Sequence[bool]):
    """(grad_x, grad_scale, grad_bits, grad_offset) of one quantizer, given dL/dfq(x)."""
    if cfg is None:
        return g, None, None, None
    gx, gs, gb, go = fq_backward(g, x, s, b, o, *cfg)
    return (gx if need[0] else None, gs if need[1] else None, gb if need[2] else None,
            go if (o is not None and need[3]) else None)


def _unpack(q: QArgs):
    return (None, None, None, None) if q is None else q


class _QLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, bias, xs, xb, xo, xcfg, ws, wb, wo, wcfg):
        ctx.save_for_backward(x, w, xs, xb, xo, ws, wb, wo)
        ctx.cfg = (xcfg, wcfg)
        ctx.has_bias = bias is not None
        return F.linear(_fq(x, xs, xb, xo, xcfg), _fq(w, ws, wb, wo, wcfg), bias)

    @staticmethod
    def backward(ctx, gy):
        x, w, xs, xb, xo, ws, wb, wo = ctx.saved_tensors
        xcfg, wcfg = ctx.cfg
        need = ctx.needs_input_grad
        need_x = any(need[i] for i in (0, 3, 4, 5))
        need_w = any(need[i] for i in (1, 7, 8, 9))
        gy2 = gy.reshape(-1, gy.shape[-1])
        gx = gw = gbias = None
        xgrads = wgrads = (None, None, None, None)
        if need_x:
            gxq = gy.matmul(_fq(w, ws, wb, wo, wcfg))
            xgrads = _fq_grads(gxq, x, xs, xb, xo, xcfg, (need[0], need[3], need[4], need[5]))
            gx = xgrads[0]
        if need_w:
            xq = _fq(x, xs, xb, xo, xcfg)
            gwq = gy2.t().mm(xq.reshape(-1, xq.shape[-1]))
            wgrads = _fq_grads(gwq, w, ws, wb, wo, wcfg, (need[1], need[7], need[8], need[9]))
            gw = wgrads[0]
        if ctx.has_bias and need[2]:
            gbias = gy2.sum(0)
        return (gx, gw, gbias, *xgrads[1:], None, *wgrads[1:], None)


def qlinear(x: Tensor, weight: Tensor, bias: Optional[Tensor], xq: QArgs, wq: QArgs) -> Tensor:
    """``F.linear(fq(x), fq(weight), bias)`` keeping only ``x`` for the backward."""
    xs, xb, xo, xcfg = _unpack(xq)
    ws, wb, wo, wcfg = _unpack(wq)
    return _QLinear.apply(x, weight, bias, xs, xb, xo, xcfg, ws, wb, wo, wcfg)


class _QConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, bias, conv, xs, xb, xo, xcfg, ws, wb, wo, wcfg):
        ctx.save_for_backward(x, w, xs, xb, xo, ws, wb, wo)
        ctx.cfg = (xcfg, wcfg)
        ctx.conv = conv
        ctx.has_bias = bias is not None
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
        gxq, gwq, gbias = torch.ops.aten.convolution_backward(
            gy, _fq(x, xs, xb, xo, xcfg), _fq(w, ws, wb, wo, wcfg), bias_sizes,
            list(stride), list(padding), list(dilation), False, [0, 0], groups,
            [need_x, need_w, bool(ctx.has_bias and need[2])])
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
    """The q, k, v quantizers' tables as one ``[3G, K]`` table (one kernel call)."""
    (qs, qb, qo, _), (ks, kb, ko, _), (vs, vb, vo, _) = q3
    g = qb.shape[0]
    s = torch.cat([t.expand(g, -1) for t in (qs, ks, vs)])
    o = None if qo is None else torch.cat([t.expand(g, -1) for t in (qo, ko, vo)])
    return s, torch.cat([qb, kb, vb]), o


def _split_tables(gs, gb, go, rows: int, g: int):
    """Undo :func:`_cat_tables` on gradients: three of each, ``[rows, K]`` and ``[G]``."""
    def split(t):
        t = t.view(3, g, t.shape[-1])
        return (t.sum(1, keepdim=True) if rows == 1 else t).unbind(0)
    return split(gs), gb.view(3, g).unbind(0), (None,) * 3 if go is None else split(go)


class _QAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, bias, mask, qs, qb, qo, ks, kb, ko, vs, vb, vo, ps, pb, po, meta):
        heads, d, scale, qcfg, pcfg = meta
        s_cat, b_cat, o_cat = _cat_tables(((qs, qb, qo, qcfg), (ks, kb, ko, qcfg),
                                           (vs, vb, vo, qcfg)))
        out, p = _attention_forward(qkv, bias, mask, s_cat, b_cat, o_cat, ps, pb, po, meta)
        ctx.save_for_backward(qkv, p, s_cat, b_cat, o_cat, ps, pb, po)
        ctx.meta = meta
        ctx.shapes = (None if bias is None else bias.shape, qs.shape[0], qb.shape[0])
        return out

    @staticmethod
    def backward(ctx, g_out):
        qkv, p, s_cat, b_cat, o_cat, ps, pb, po = ctx.saved_tensors
        heads, d, scale, qcfg, pcfg = ctx.meta
        bias_shape, rows, g = ctx.shapes
        need = ctx.needs_input_grad
        b_, n, _ = qkv.shape
        flat = qkv.view(b_ * n, 3 * heads, d)
        q, k, v = _heads(fq_forward(flat, s_cat, b_cat, o_cat, *qcfg[:4]), b_, n, heads, d)
        a = _fq(p, ps, pb, po, pcfg)
        g_a = g_out.matmul(v.transpose(-2, -1))
        g_v = a.transpose(-2, -1).matmul(g_out)
        del a
        pgrads = _fq_grads(g_a, p, ps, pb, po, pcfg, (True,) + tuple(need[12:15]))
        g_logits = torch._softmax_backward_data(pgrads[0], p, -1, p.dtype)
        g_bias = g_logits.sum_to_size(bias_shape) if need[1] else None
        g_q = g_logits.matmul(k).mul_(scale)
        g_k = g_logits.transpose(-2, -1).matmul(q * scale)
        del g_logits
        g_qkv = torch.stack([t.transpose(1, 2) for t in (g_q, g_k, g_v)], dim=2)
        gx, gs, gb, go = fq_backward(g_qkv.view(b_ * n, 3 * heads, d), flat, s_cat, b_cat,
                                     o_cat, *qcfg)
        (sq, sk, sv), (bq, bk, bv), (oq, ok, ov) = _split_tables(
            gs, gb, go if o_cat is not None else None, rows, g)
        return (gx.view(qkv.shape), g_bias, None, sq, bq, oq, sk, bk, ok, sv, bv, ov, *pgrads[1:], None)


def _heads(qkv_q: Tensor, b_: int, n: int, heads: int, d: int):
    return qkv_q.view(b_, n, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)


def _attention_forward(qkv, bias, mask, s_cat, b_cat, o_cat, ps, pb, po, meta):
    heads, d, scale, qcfg, pcfg = meta
    b_, n, _ = qkv.shape
    qkv_q = fq_forward(qkv.view(b_ * n, 3 * heads, d), s_cat, b_cat, o_cat, *qcfg[:4])
    q, k, v = _heads(qkv_q, b_, n, heads, d)
    logits = (q * scale).matmul(k.transpose(-2, -1))
    if bias is not None:
        logits = logits + bias
    if mask is not None:
        nw = mask.shape[0]
        logits = (logits.view(-1, nw, heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
                  ).view(-1, heads, n, n)
    p = logits.softmax(dim=-1)
    del logits
    return _fq(p, ps, pb, po, pcfg).matmul(v), p


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
