"""The op contract's rules, written once for Python.

The bit-width range, the group layout ``[outer, G, inner]``, the integer code
range and the shape rules of the parameter tables. The config, the reference
op, the torch ops' argument checks, the quantizer modules and the exporter
call these; the C layer states the same rules once in ``csrc/qvit.h``
(``QVIT_BITS_LIMIT``, ``qvit_group_layout``, ``qvit_fq_check_params``).
Every ``check_*`` raises with a message naming the argument; ``prefix`` says
who is asking (e.g. ``"qvit.fake_quant: "``).
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["BITS_MIN", "BITS_LIMIT", "check_bits_range", "group_shape", "qrange", "qrange_of",
           "check_param_shapes"]

#: Smallest bit-width (unsigned; signed needs 2).
BITS_MIN = 1
#: Largest bit-width, the same as ``QVIT_BITS_LIMIT`` in ``csrc/qvit.h``: the
#: kernels hold codes in fp32, and ``2**24 - 1`` (unsigned, 24 bits) is the
#: largest ``Qp`` whose integers a float32 represents exactly.
BITS_LIMIT = 24


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def check_bits_range(bits_range, signed: bool, *, prefix: str = "", name: str = "bits_range",
                     type_error: type = TypeError) -> Tuple[int, int]:
    """``(min, max)`` of a valid ``bits_range``, as ints.

    Raises:
        type_error (TypeError unless given): not a pair of ints.
        ValueError: not ``1 <= min <= max <= BITS_LIMIT``, or signed with ``min < 2``.
    """
    if (not isinstance(bits_range, (tuple, list)) or len(bits_range) != 2
            or not (_is_int(bits_range[0]) and _is_int(bits_range[1]))):
        raise type_error(f"{prefix}{name} must be a pair of ints, got {bits_range!r}")
    lo, hi = int(bits_range[0]), int(bits_range[1])
    if not BITS_MIN <= lo <= hi <= BITS_LIMIT:
        raise ValueError(f"{prefix}{name} must satisfy {BITS_MIN} <= min <= max <= {BITS_LIMIT}, "
                         f"got {(lo, hi)}")
    if signed and lo < 2:
        raise ValueError(f"{prefix}a signed quantizer needs {name} min >= 2, got {(lo, hi)} "
                         "(use signed=False for 1-bit codes)")
    return lo, hi


def group_shape(shape: Sequence[int], dim: int, groups: int) -> Tuple[int, int, int]:
    """Return ``(outer, groups, inner)`` for ``x.shape == shape`` split in ``groups`` along ``dim``.

    ``groups`` equal contiguous chunks of dimension ``dim``; one group is the
    whole tensor, ``(1, 1, numel)``, whatever ``dim``.

    Raises:
        ValueError: if ``groups < 1``, ``dim`` is out of range, or ``shape[dim]``
            is not divisible by ``groups``.
    """
    shape = tuple(int(s) for s in shape)
    if groups < 1:
        raise ValueError(f"bits must have at least one element (got {groups} groups)")
    numel = math.prod(shape)
    if groups == 1:
        return 1, 1, numel
    ndim = len(shape)
    if ndim == 0:
        raise ValueError(f"a 0-d tensor cannot be split into {groups} groups")
    if not -ndim <= dim < ndim:
        raise ValueError(f"dim={dim} is out of range for a tensor with {ndim} dimensions")
    dim %= ndim
    size = shape[dim]
    if size % groups != 0:
        raise ValueError(
            f"dimension {dim} of x has size {size}, which is not divisible by "
            f"the {groups} groups given by bits.numel()"
        )
    outer = math.prod(shape[:dim])
    inner = (size // groups) * math.prod(shape[dim + 1:])
    return outer, groups, inner


def qrange(bhat: Tensor, signed: bool) -> Tuple[Tensor, Tensor]:
    """Integer code range ``(Qn, Qp)`` at (rounded) bit-width ``bhat``, differentiable in ``bhat``.

    signed: ``[-2^(b-1), 2^(b-1) - 1]``; unsigned: ``[0, 2^b - 1]``.
    """
    if signed:
        half = torch.pow(2.0, bhat - 1)
        return -half, half - 1
    return torch.zeros_like(bhat), torch.pow(2.0, bhat) - 1


def qrange_of(bits: int, signed: bool) -> Tuple[float, float]:
    """``(Qn, Qp)`` of one integer bit-width, as Python floats (the rule of :func:`qrange`)."""
    if signed:
        return -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1
    return 0.0, 2.0 ** bits - 1


def check_param_shapes(scale_shape: Sequence[int], bits_shape: Sequence[int],
                       offset_shape: Optional[Sequence[int]], bits_range: Tuple[int, int],
                       *, prefix: str = "") -> Tuple[int, int]:
    """``(G, K)`` when ``bits`` is ``[G]`` (G >= 1) and ``scale`` (and ``offset``) ``[1 or G, K]``.

    ``K = max - min + 1`` columns, one per candidate bit-width of ``bits_range``
    (already checked by :func:`check_bits_range`).

    Raises:
        ValueError: a shape that does not fit, naming the argument.
    """
    lo, hi = bits_range
    k = hi - lo + 1
    bits_shape, scale_shape = tuple(bits_shape), tuple(scale_shape)
    if len(bits_shape) != 1 or bits_shape[0] < 1:
        raise ValueError(
            f"{prefix}bits must be a 1-D tensor [G] with G >= 1, got shape {bits_shape}")
    g = bits_shape[0]
    if len(scale_shape) != 2 or scale_shape[1] != k or scale_shape[0] not in (1, g):
        raise ValueError(
            f"{prefix}scale must have shape [1, {k}] or [{g}, {k}] for bits_range "
            f"{(lo, hi)} and {g} groups, got {scale_shape}")
    if offset_shape is not None and tuple(offset_shape) != scale_shape:
        raise ValueError(
            f"{prefix}offset must have the shape of scale {scale_shape}, "
            f"got {tuple(offset_shape)}")
    return g, k
