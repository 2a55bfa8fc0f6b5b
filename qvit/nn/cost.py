"""BitOPs and weight size of quantized layers, stated once as bilinear terms.

Every quantized layer states its cost (``docs/design.md`` section 5.3) as a
list of :class:`Term`\\ s::

    cost = sum over terms of  coef * A * B
    A    = weight_a * sum(bits of groups [lo_a, hi_a) of quantizer a)
    B    = likewise for b; a size term has no B (B = 1)

An operand whose bits are ``None`` (no quantizer; a disabled one in the
budget) counts ``FLOAT_BITS`` per channel. ``Quantizer`` groups split a channel
axis into equal contiguous chunks, so "the bits of every channel, summed" is
``channels / G`` times the sum over the ``G`` groups (:func:`total`), and a
per-channel product of two such axes (:func:`columns`) pairs up the
overlapping groups.

The same terms serve two consumers: :func:`evaluate`, which computes a layer's
cost from any choice of bit-widths (per-layer reports, uniform budgets), and
the flat budget loss of :mod:`qvit.models.budget`, which gathers every term of
a model into a few index tensors and computes the whole model's cost in a few
ops over one flat vector of bit-widths.
"""
from __future__ import annotations

from typing import Callable, List, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from .quantizer import Quantizer

__all__ = ["FLOAT_BITS", "Operand", "Term", "total", "columns", "evaluate"]

FLOAT_BITS = 32.0

BitsFn = Callable[[Optional[Quantizer]], Optional[Tensor]]


class Operand(NamedTuple):
    """``weight * sum(bits[lo:hi])`` of ``quant``; as a float operand (no quantizer,
    or no bits for it) ``weight * (hi - lo) * FLOAT_BITS``."""
    quant: Optional[Quantizer]
    lo: int
    hi: int
    weight: float


class Term(NamedTuple):
    """``coef * A * B`` (``b=None``: ``coef * A``, a size term)."""
    coef: float
    a: Operand
    b: Optional[Operand] = None


def _groups(q: Optional[Quantizer]) -> int:
    return 1 if q is None else q.groups


def total(q: Optional[Quantizer], channels: int, lo: int = 0, groups: Optional[int] = None
          ) -> Operand:
    """The bits of ``channels`` channels summed, from groups ``[lo, lo + groups)`` of ``q``
    (default: all of its groups), which split the channels evenly."""
    if q is None:
        return Operand(None, 0, 1, float(channels))
    n = q.groups - lo if groups is None else groups
    if channels % n:
        raise ValueError(f"{channels} channels do not split into {n} bit-width groups")
    return Operand(q, lo, lo + n, float(channels // n))


def columns(coef: float, a: Optional[Quantizer], b: Optional[Quantizer], length: int,
            a_lo: int = 0, a_groups: Optional[int] = None) -> List[Term]:
    """``coef * sum_c bits_a(c) * bits_b(c)`` over ``length`` channels that both
    quantizers split into their groups (``a``: groups ``[a_lo, a_lo + a_groups)``)."""
    na = (a.groups - a_lo if a_groups is None else a_groups) if a is not None else 1
    nb = _groups(b)
    if length % na or length % nb:
        raise ValueError(f"{length} channels do not split into {na} and {nb} bit-width groups")
    if nb == 1:      # b constant over the channels: b times the sum of a
        return [Term(coef, total(a, length, a_lo, na if a is not None else None),
                     Operand(b, 0, 1, 1.0))]
    if na == 1:
        return [Term(coef, Operand(a, a_lo, a_lo + 1, 1.0), total(b, length))]
    wa, wb = length // na, length // nb
    cuts = sorted(set(range(0, length, wa)) | set(range(0, length, wb)) | {length})
    terms = []
    for c0, c1 in zip(cuts[:-1], cuts[1:]):
        ga, gb = a_lo + c0 // wa, c0 // wb
        terms.append(Term(coef, Operand(a, ga, ga + 1, float(c1 - c0)),
                          Operand(b, gb, gb + 1, 1.0)))
    return terms


def _value(op: Operand, bits_of: BitsFn, like: Tensor) -> Tensor:
    b = bits_of(op.quant) if op.quant is not None else None
    if b is None:
        return like.new_tensor(op.weight * (op.hi - op.lo) * FLOAT_BITS)
    return b[op.lo:op.hi].sum() * op.weight


def evaluate(terms: Sequence[Term], bits_of: BitsFn, like: Tensor) -> Tensor:
    """The cost of ``terms`` with the bit-widths ``bits_of(quantizer)`` (``None``:
    float); a float32 scalar on ``like``'s device, differentiable in the bits."""
    out = like.new_zeros((), dtype=torch.float32)
    for t in terms:
        v = _value(t.a, bits_of, like)
        if t.b is not None:
            v = v * _value(t.b, bits_of, like)
        out = out + v * t.coef
    return out
