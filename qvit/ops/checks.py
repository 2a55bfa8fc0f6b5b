"""The argument checks of :func:`qvit.ops.fake_quant`, and their cache.

:func:`validate` checks everything that needs no tensor data (types, dtypes,
layouts, devices, shapes, the scalar arguments), so it costs no device sync;
the parameter *values* are checked by the CPU kernel. :func:`checked` is the
per-call entry: it remembers the outcome of a passing call under everything
the outcome depends on, so a repeated call (the same quantizer, the same
activation shape) pays a dictionary lookup instead of the checks.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor

from . import contract

__all__ = ["validate", "checked"]

_X_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _is_int(v) -> bool:
    return type(v) is int or (isinstance(v, numbers.Integral) and not isinstance(v, bool))


def validate(x, scale, bits, offset, signed, dim, bits_range, grad_scale):
    """Argument checks that need no tensor data (so they cost no device sync).

    Written for the common case first (plain ints, tuples, CPU or one device):
    this runs on every call, next to kernels of a few microseconds.
    """
    for name, t in (("x", x), ("scale", scale), ("bits", bits)):
        if not isinstance(t, Tensor):
            raise TypeError(f"qvit.fake_quant: {name} must be a torch.Tensor, got {type(t).__name__}")
    if offset is not None and not isinstance(offset, Tensor):
        raise TypeError(
            f"qvit.fake_quant: offset must be a torch.Tensor or None, got {type(offset).__name__}")
    if type(signed) is not bool:
        raise TypeError(f"qvit.fake_quant: signed must be a bool, got {type(signed).__name__}")
    if not _is_int(dim):
        raise TypeError(f"qvit.fake_quant: dim must be an int, got {type(dim).__name__}")
    bmin, bmax = contract.check_bits_range(bits_range, signed, prefix="qvit.fake_quant: ")
    if grad_scale is None:
        lsq = -1.0
    else:
        if isinstance(grad_scale, bool) or not isinstance(grad_scale, numbers.Real):
            raise TypeError(
                f"qvit.fake_quant: grad_scale must be None or a float, got {type(grad_scale).__name__}")
        lsq = float(grad_scale)
        if not (math.isfinite(lsq) and lsq >= 0.0):
            raise ValueError(f"qvit.fake_quant: grad_scale must be finite and >= 0, got {grad_scale}")

    for name, t in (("x", x), ("scale", scale), ("bits", bits), ("offset", offset)):
        if t is not None and (t.layout is not torch.strided or t.is_nested):
            kind = "a nested tensor" if t.is_nested else f"layout {t.layout}"
            raise TypeError(
                f"qvit.fake_quant: {name} must be a dense (strided) tensor, got {kind}; "
                "convert it first (e.g. .to_dense(), or quantize each component)")
    xdt = x.dtype
    if xdt not in _X_DTYPES:
        raise TypeError(
            f"qvit.fake_quant: x must be float32, float16, bfloat16 or float64, got {xdt}")
    pdt = torch.float64 if xdt == torch.float64 else torch.float32
    x_cpu = x.is_cpu
    for name, t in (("scale", scale), ("bits", bits), ("offset", offset)):
        if t is None:
            continue
        if t.dtype != pdt:
            raise TypeError(
                f"qvit.fake_quant: {name} must be {str(pdt)[6:]} for a {str(xdt)[6:]} x, "
                f"got {str(t.dtype)[6:]}")
        if (t.is_cpu != x_cpu) or (not x_cpu and t.device != x.device):
            raise ValueError(
                f"qvit.fake_quant: {name} is on {t.device} but x is on {x.device}; "
                "all tensors must be on one device")

    g, _ = contract.check_param_shapes(scale.shape, bits.shape,
                                       None if offset is None else offset.shape, (bmin, bmax),
                                       prefix="qvit.fake_quant: ")
    if g > 1:
        try:
            contract.group_shape(x.shape, int(dim), g)
        except ValueError as exc:
            raise ValueError(f"qvit.fake_quant: {exc}") from None
    return bmin, bmax, lsq


# validate's results by everything they depend on (below); cleared when full
_CHECKED: dict = {}
_CHECKED_MAX = 4096


def _tensor_key(t) -> tuple:
    return (type(t), t.shape, t.dtype, t.device, t.layout, t.is_nested)


def checked(x, scale, bits, offset, signed, dim, bits_range, grad_scale) -> Optional[tuple]:
    """``(dim, signed, bits_min, bits_max, lsq)`` for the kernels, or ``None`` when x is
    on neither the CPU nor CUDA; raises what :func:`validate` raises.

    The checks need no tensor data, so their outcome is a function of the
    arguments' types, shapes, dtypes, devices and layouts and of the scalar
    arguments: the outcome of a passing call is remembered under exactly that
    key. Only arguments of the plain types are cached (a bool ``signed``, an int
    ``dim``, a tuple of two ints ``bits_range``, no ``grad_scale``), so values
    that compare equal across types (``1 == True == 1.0``) cannot share an entry;
    anything else, a failing call, and tracing under ``torch.compile`` run the
    full checks every time.
    """
    key = None
    if (grad_scale is None and type(signed) is bool and type(dim) is int
            and type(bits_range) is tuple and len(bits_range) == 2
            and type(bits_range[0]) is int and type(bits_range[1]) is int
            and not torch.compiler.is_compiling()):
        try:   # written out: this runs on every call
            key = (signed, dim, bits_range,
                   type(x), x.shape, x.dtype, x.device, x.layout, x.is_nested,
                   type(scale), scale.shape, scale.dtype, scale.device, scale.layout,
                   scale.is_nested,
                   type(bits), bits.shape, bits.dtype, bits.device, bits.layout, bits.is_nested,
                   None if offset is None else _tensor_key(offset))
            cfg = _CHECKED.get(key, False)
        except Exception:   # noqa: BLE001 - not a tensor, no sizes, unhashable: checked below
            key, cfg = None, False
        if cfg is not False:
            return cfg
    bmin, bmax, lsq = validate(x, scale, bits, offset, signed, dim, bits_range, grad_scale)
    cfg = (int(dim), signed, bmin, bmax, lsq) if (x.is_cpu or x.is_cuda) else None
    if key is not None:
        if len(_CHECKED) >= _CHECKED_MAX:
            _CHECKED.clear()
        _CHECKED[key] = cfg
    return cfg
