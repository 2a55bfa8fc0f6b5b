"""BitOPs and model-size accounting, the Q-ViT budget loss, bit freezing.

Q-ViT (Li et al., arXiv 2201.07703; ``docs/design.md`` section 5.3) trains
with ``loss = task + lambda * max(BitOPs / 1e9 - budget, 0)^2`` where BitOPs are
computed from the STE-rounded bit-widths, so the penalty reaches every learned
bit-width. Here every quantized matmul counts ``MACs x b_w x b_a``, summed over
weight rows / columns and input channels (head-wise: per head), and QK^T and
A·V count ``MACs x b_q x b_k`` and ``MACs x b_A x b_v`` per head. That is the
paper's formula generalised; for DeiT at 224 px (197 tokens) with 8-bit
first/last layers it gives the published budgets (DeiT-T W4A4 = 21.455 G).

Each layer states its cost once as :mod:`qvit.nn.cost` terms; the
differentiable totals (:func:`bitops`, :func:`model_size_bits`, so
:func:`budget_loss`) evaluate all of them in a few ops over one flat view of
every bit-width (:mod:`qvit.models.flat_cost`), per-layer reports term by term.

The shapes come from each layer's latest forward, so run one forward (batch 1
is enough) before asking for BitOPs. Disabled quantizers count as 32-bit
(float) operands; layers left out by ``QViTConfig.skip`` are not counted.

Example::

    >>> model(images)                       # any forward records the shapes
    >>> loss = ce + qvit.budget_loss(model, qvit.uniform_bitops(model, 3) / 1e9)
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

from ..nn import cost
from ..nn.quantizer import Quantizer
from .flat_cost import FlatCost, flat_cost

__all__ = ["bitops", "model_size_bits", "uniform_bitops", "uniform_size_bits",
           "budget_loss", "freeze_bits", "average_bits", "layer_bitops", "layer_size_bits",
           "head_bitops", "batch_size", "FlatCost"]

BitsFn = cost.BitsFn


def _ste(q: Optional[Quantizer]) -> Optional[Tensor]:
    if q is None or not q.enabled:
        return None
    return q.ste_bits()


def _uniform(bits: float, first_last_bits: Optional[float]) -> BitsFn:
    def fn(q: Optional[Quantizer]) -> Optional[Tensor]:
        if q is None:
            return None
        b = first_last_bits if (q.first_last and first_last_bits is not None) else bits
        return torch.full((q.groups,), float(b), device=q.bits.device)
    return fn


def batch_size(model: nn.Module) -> int:
    """Images in the latest forward of a quantized ``model``.

    Raises:
        RuntimeError: no forward has run since :func:`~qvit.quantize_model`.
    """
    b = model.__dict__.get("_qvit_batch")
    if not b:  # a wrapper (DistributedDataParallel, EMA): the quantized model is inside
        b = next((m.__dict__["_qvit_batch"] for m in model.modules() if m.__dict__.get("_qvit_batch")),
                 None)
    if not b:
        raise RuntimeError("no forward recorded: run the quantized model on a batch "
                           "(batch 1 is enough) before computing BitOPs")
    return b


def _costed(model: nn.Module):
    return [(name, m) for name, m in model.named_modules() if hasattr(m, "qvit_bitops_terms")]


def _ref(m: nn.Module) -> Tensor:
    return next(m.parameters())


def layer_bitops(model: nn.Module, bits_of: BitsFn = _ste) -> Dict[str, Tensor]:
    """BitOPs per image of every quantized layer (attention: QK^T + A·V), by module name."""
    batch = batch_size(model)
    return {name: cost.evaluate(m.qvit_bitops_terms(), bits_of, _ref(m)) / batch
            for name, m in _costed(model)}


def layer_size_bits(m: nn.Module, bits_of: BitsFn = _ste) -> Tensor:
    """Weight bits of one quantized layer."""
    return cost.evaluate(m.qvit_size_terms(), bits_of, _ref(m))


def head_bitops(m: nn.Module, bits_of: BitsFn = _ste) -> List[Tensor]:
    """BitOPs of QK^T + A·V of each head of an attention layer (all images of the
    latest forward)."""
    return [cost.evaluate(terms, bits_of, _ref(m)) for terms in m.qvit_head_terms()]


def _total(values) -> Tensor:
    values = list(values)
    if not values:
        raise ValueError("model has no quantized layers; call quantize_model first")
    return torch.stack([v.reshape(()) for v in values]).sum()


def bitops(model: nn.Module) -> Tensor:
    """BitOPs per image at the current rounded bit-widths (a scalar, differentiable in the bits).

    Computed in a few ops over one flat view of every bit-width (see :class:`FlatCost`).
    """
    return flat_cost(model, "bitops", batch_size(model))()


def uniform_bitops(model: nn.Module, bits: float, first_last_bits: Optional[float] = 8) -> float:
    """BitOPs (not GBitOPs) per image of the same model at uniform ``bits`` (first/last
    layers at ``first_last_bits``; ``None`` = same as the rest): the budget of a target
    bit-width. :func:`budget_loss` takes GBitOPs: divide by 1e9."""
    _check_bits(bits, "bits")
    if first_last_bits is not None:
        _check_bits(first_last_bits, "first_last_bits")
    with torch.no_grad():
        return float(_total(layer_bitops(model, _uniform(bits, first_last_bits)).values()))


def _sizes(model: nn.Module, bits_of: BitsFn) -> Tensor:
    return _total(layer_size_bits(m, bits_of) for m in model.modules()
                  if hasattr(m, "qvit_size_terms"))


def model_size_bits(model: nn.Module) -> Tensor:
    """Bits of all quantized weights at the current rounded bit-widths (differentiable)."""
    return flat_cost(model, "size")()


def uniform_size_bits(model: nn.Module, bits: float, first_last_bits: Optional[float] = 8) -> float:
    """Weight bits of the model at uniform ``bits``: the size budget of a target bit-width."""
    _check_bits(bits, "bits")
    with torch.no_grad():
        return float(_sizes(model, _uniform(bits, first_last_bits)))


def _check_bits(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 1 <= value <= 32:
        raise ValueError(f"{name} must be a number in [1, 32], got {value!r}")


def budget_loss(model: nn.Module, budget_gbitops: float, weight: float = 0.1,
                kind: str = "bitops") -> Tensor:
    """``weight * max(cost - budget, 0)^2``, the Q-ViT squared-hinge budget penalty.

    Units: ``budget_gbitops`` is in **GBitOPs** (1e9 BitOPs) per image, while
    :func:`bitops` and :func:`uniform_bitops` return plain BitOPs, so divide
    those by 1e9. A budget the model can never exceed (above its cost with
    every bit-width at the top of its range) is refused: the loss would be 0
    for ever, which is what passing BitOPs here looks like.

    Args:
        model: a quantized model that has run a forward.
        budget_gbitops: the budget: GBitOPs per image for ``kind="bitops"``,
            megabits (1e6 bits) of weights for ``kind="size"``.
        weight: lambda (0.1 in the paper).
        kind: ``"bitops"`` or ``"size"``.

    Raises:
        ValueError: bad ``kind``, negative ``budget_gbitops`` or ``weight``, or a
            budget above the model's largest possible cost (wrong unit).
    """
    if kind not in ("bitops", "size"):
        raise ValueError(f"kind must be 'bitops' or 'size', got {kind!r}")
    if not isinstance(budget_gbitops, (int, float)) or not budget_gbitops >= 0:
        raise ValueError(f"budget_gbitops must be a non-negative number, got {budget_gbitops!r}")
    if not isinstance(weight, (int, float)) or not weight >= 0:
        raise ValueError(f"weight must be a non-negative number, got {weight!r}")
    _check_budget_unit(model, float(budget_gbitops), kind)
    cost = bitops(model) / 1e9 if kind == "bitops" else model_size_bits(model) / 1e6
    return weight * torch.clamp(cost - budget_gbitops, min=0) ** 2


def _check_budget_unit(model: nn.Module, budget: float, kind: str) -> None:
    """Refuse a budget above the model's largest cost (checked once per model and budget)."""
    key = (kind, budget)
    if model.__dict__.get("_qvit_budget_checked") == key:
        return
    tops = [q.bits_range[1] for q in model.modules() if isinstance(q, Quantizer) and q.enabled]
    if tops:
        top = max(tops)
        if kind == "bitops":
            most, unit = uniform_bitops(model, top, first_last_bits=top) / 1e9, "GBitOPs"
        else:
            most, unit = uniform_size_bits(model, top, first_last_bits=top) / 1e6, "Mbit"
        if budget > most * (1 + 1e-6):
            hint = (" Is it in BitOPs? bitops() and uniform_bitops() return BitOPs: divide "
                    "by 1e9." if kind == "bitops" else
                    " Is it in bits? model_size_bits() returns bits: divide by 1e6.")
            raise ValueError(
                f"budget_gbitops={budget:.6g} is more than this model can ever cost "
                f"({most:.4g} {unit} with every bit-width at {top}), so the budget loss "
                f"would always be 0.{hint}")
    model.__dict__["_qvit_budget_checked"] = key


def freeze_bits(model: nn.Module, frozen: bool = True) -> int:
    """Stop (or resume) training the learned bit-widths; returns how many quantizers changed.

    Quantizers configured with ``learn_bits=False`` are never trained.
    """
    n = 0
    for m in model.modules():
        if isinstance(m, Quantizer) and m.learn_bits:
            m.bits.requires_grad_(not frozen)
            if frozen:
                m.bits.grad = None
            n += 1
    return n


@torch.no_grad()
def average_bits(model: nn.Module) -> Dict[str, float]:
    """Mean rounded bit-width of the enabled quantizers.

    ``weights``: weighted by weight elements; ``activations``: weighted by the
    elements each quantizer saw in the latest forward (uniform if none ran).
    """
    sums = {"weight": [0.0, 0.0], "act": [0.0, 0.0]}
    for m in model.modules():
        if not isinstance(m, Quantizer) or not m.enabled:
            continue
        b = m.rounded_bits()
        count = float(m.last_numel) if m.last_numel else 1.0
        sums[m.role][0] += float(b.mean()) * count
        sums[m.role][1] += count
    out = {}
    for key, name in (("weight", "weights"), ("act", "activations")):
        total, count = sums[key]
        out[name] = total / count if count else float("nan")
    return out
