"""A whole model's BitOPs or weight size in a few ops over one flat vector of bit-widths.

Each quantized layer states its cost as :mod:`qvit.nn.cost` terms,
``coef * A * B`` with ``A`` and ``B`` weighted sums of a contiguous range of
one quantizer's bit-widths (or a float operand's 32 bits). :class:`FlatCost`
gathers every term of a model once into index tensors over the vector::

    e = [0, bits of quantizer 1, ..., bits of quantizer Q, 32, 1]

so that, with ``c = cumsum(e)``, each range sum is ``c[hi] - c[lo]``. A call
then costs a fixed handful of ops whatever the model's size: one ``cat`` with
the straight-through rounding (``round(clamp(bits))`` forward, identity
backward, as :func:`qvit.nn.quantizer.ste_bits`), a float64 ``cumsum``, one
gather and a dot product. Its values and gradients are those of summing the
layers' :func:`qvit.nn.cost.evaluate` (the per-layer path of
:func:`qvit.models.budget.layer_bitops`), in float64 instead of float32; the
rounded bit-widths are integers, so every range sum is exact.

The plan is rebuilt when anything it depends on changes: the module tree or a
Parameter assignment anywhere (torch's global registration hooks count them),
a layer's input shape (positions, attention shape), the batch, a quantizer's
``enabled`` flag, range or device. Checking that costs a pass over the
plan's own layers and quantizers, not over the module tree.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from torch import Tensor, nn

from ..nn import cost
from ..nn.quantizer import Quantizer

__all__ = ["FlatCost", "flat_cost"]

_KINDS = ("bitops", "size")


class _RoundedFlat(torch.autograd.Function):
    """``round(clamp(cat(parts), lo, hi))``; the gradient goes straight through,
    split back to the parts in one op."""

    @staticmethod
    def forward(ctx, lo, hi, *parts):
        ctx.sizes = [p.numel() for p in parts]
        return torch.round(torch.clamp(torch.cat(parts), lo, hi))

    @staticmethod
    def backward(ctx, g):
        return (None, None, *g.split(ctx.sizes))


# Bumped whenever any module anywhere gets a submodule or a Parameter assigned
# (torch's global registration hooks): a plan built before such a change may
# miss a layer or hold a replaced ``bits`` Parameter, so it is rebuilt.
_STRUCTURE = [0]


def _structure_changed(*args) -> None:
    _STRUCTURE[0] += 1


_HOOKS = (nn.modules.module.register_module_module_registration_hook(_structure_changed),
          nn.modules.module.register_module_parameter_registration_hook(_structure_changed))


class FlatCost:
    """The BitOPs per image (``kind="bitops"``) or weight bits (``kind="size"``) of
    ``model`` at its STE-rounded bit-widths; call it for a differentiable float32 scalar.

    Build it with :func:`flat_cost`, which keeps one per model and kind and
    rebuilds it when the model's shapes or quantizers change.
    """

    def __init__(self, model: nn.Module, kind: str, batch: int = 1):
        if kind not in _KINDS:
            raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
        self._structure = _STRUCTURE[0]
        mods = list(model.modules())
        layers = [m for m in mods if hasattr(m, "qvit_bitops_terms")]
        if not layers:
            raise ValueError("model has no quantized layers; call quantize_model first")
        self._layers = layers
        self._all_quants = [m for m in mods if isinstance(m, Quantizer)]
        self._state = self.state(batch)
        terms: List[cost.Term] = []
        for m in layers:
            if kind == "bitops":
                terms += m.qvit_bitops_terms()
            elif hasattr(m, "qvit_size_terms"):
                terms += m.qvit_size_terms()
        per = 1.0 / batch if kind == "bitops" else 1.0
        device = next(m.parameters()).device
        self.quants: List[Quantizer] = []
        offset: Dict[int, int] = {}
        lo_b, hi_b = [0.0], [0.0]          # e[0] = 0
        n = 1
        for t in terms:
            for op in (t.a, t.b):
                q = None if op is None else op.quant
                if q is not None and q.enabled and id(q) not in offset:
                    offset[id(q)] = n
                    self.quants.append(q)
                    n += q.groups
                    lo_b += [float(q.bits_range[0])] * q.groups
                    hi_b += [float(q.bits_range[1])] * q.groups
        self._float, self._one = n, n + 1   # e[n] = 32, e[n + 1] = 1
        lo_b += [cost.FLOAT_BITS, 1.0]
        hi_b += [cost.FLOAT_BITS, 1.0]

        def rng(op) -> Tuple[int, int, float]:
            """(hi, lo, weight): the operand is ``weight * (c[hi] - c[lo])``."""
            if op is None:
                return self._one, self._one - 1, 1.0
            q = op.quant
            if q is None or not q.enabled:
                return self._float, self._float - 1, op.weight * (op.hi - op.lo)
            o = offset[id(q)]
            return o + op.hi - 1, o + op.lo - 1, op.weight

        hi_i: List[List[int]] = [[], []]
        lo_i: List[List[int]] = [[], []]
        coef: List[float] = []
        for t in terms:
            (ha, la, wa), (hb, lb, wb) = rng(t.a), rng(t.b)
            hi_i[0].append(ha)
            lo_i[0].append(la)
            hi_i[1].append(hb)
            lo_i[1].append(lb)
            coef.append(t.coef * wa * wb * per)
        self.kind = kind
        self.num_terms = len(terms)
        self.lo = torch.tensor(lo_b, dtype=torch.float32, device=device)
        self.hi = torch.tensor(hi_b, dtype=torch.float32, device=device)
        self.idx = torch.tensor(hi_i[0] + hi_i[1] + lo_i[0] + lo_i[1], dtype=torch.int64,
                                device=device)
        self.coef = torch.tensor(coef, dtype=torch.float64, device=device)
        self._head = torch.zeros(1, device=device)
        self._tail = torch.tensor([cost.FLOAT_BITS, 1.0], device=device)

    def state(self, batch: int) -> tuple:
        """What this plan depends on besides the module tree, read without tensor data."""
        # plain attribute reads (module __dict__ / _parameters): this runs every step
        return (batch,
                tuple(m.__dict__.get("attn_shape", m.__dict__.get("positions"))
                      for m in self._layers),
                tuple((q.__dict__["enabled"], q.__dict__["bits_range"],
                       q._parameters["bits"].device, q._parameters["bits"].shape)
                      for q in self._all_quants))

    def valid(self, batch: int) -> bool:
        """True while the model's tree, shapes and quantizers are those it was built for."""
        return self._structure == _STRUCTURE[0] and self.state(batch) == self._state

    def flat_bits(self) -> Tensor:
        """``e``: the STE-rounded bit-widths of every quantizer, between the constants."""
        return _RoundedFlat.apply(self.lo, self.hi, self._head,
                                  *[q.bits for q in self.quants], self._tail)

    def __call__(self) -> Tensor:
        c = self.flat_bits().to(torch.float64).cumsum(0)
        v = c.index_select(0, self.idx).view(2, 2, -1)     # [hi | lo, A | B, term]
        ab = v[0] - v[1]
        return torch.dot(ab[0] * ab[1], self.coef).to(torch.float32)


def flat_cost(model: nn.Module, kind: str = "bitops", batch: int = 1) -> FlatCost:
    """The :class:`FlatCost` of ``model`` (BitOPs per image of a ``batch``-image forward),
    kept on the model and rebuilt when stale (:meth:`FlatCost.valid`)."""
    plans = model.__dict__.setdefault("_qvit_flat_cost", {})
    plan = plans.get(kind)
    if plan is None or not plan.valid(batch):
        plan = plans[kind] = FlatCost(model, kind, batch)
    return plan
