"""``qvit.ops.fake_quant``'s signature over the emulated CUDA launchers, with autograd:
the "cuda_emu" implementation of the parametrised op suite (tests/conftest.py).

The forward and backward call the real ``extern "C"`` launchers of csrc/fq_cuda.cu built
for the host emulation (emu.py), with CPU tensors standing in for device memory.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import emu


class _EmuFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, bits, offset, signed, dim, bits_range, grad_scale):
        lib = emu.shared()
        xc = x.detach().contiguous()
        params = [t.detach().contiguous() if t is not None else None for t in (scale, bits, offset)]
        kw = dict(signed=signed, dim=dim, bits_range=bits_range)
        y = lib.forward(xc, *params, **kw)
        ctx.save_for_backward(xc, *[t for t in params if t is not None])
        ctx.has_offset, ctx.kw, ctx.grad_scale = offset is not None, kw, grad_scale
        return y

    @staticmethod
    def backward(ctx, gy):
        xc, scale, bits, *rest = ctx.saved_tensors
        offset = rest[0] if ctx.has_offset else None
        gx, gs, gb, go = emu.shared().backward(gy.contiguous(), xc, scale, bits, offset,
                                               grad_scale=ctx.grad_scale, **ctx.kw)
        return gx, gs, gb, go, None, None, None, None


def fake_quant(x: torch.Tensor, scale: torch.Tensor, bits: torch.Tensor,
               offset: Optional[torch.Tensor] = None, *, signed: bool = True, dim: int = 0,
               bits_range: Tuple[int, int] = (2, 8), grad_scale: Optional[float] = None):
    return _EmuFakeQuant.apply(x, scale, bits, offset, signed, dim, tuple(bits_range), grad_scale)
