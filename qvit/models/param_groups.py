"""Optimizer parameter groups for a quantized model, and the check that an
optimizer sees the quantizer parameters.

:func:`param_groups` splits a model's parameters into four groups: decayed
weights; norms, biases and tokens (no decay); quantizer scales and offsets
(``scale_lr`` times the lr, no decay); learned bit-widths (``bit_lr`` times
the lr, no decay). Pass the result to any ``torch.optim`` optimizer.

An optimizer built *before* :func:`~qvit.quantize_model` holds the float
weights but none of the scales and bit-widths that conversion creates: they
would never train. :func:`quantize_model` therefore registers
:func:`check_optimizer` as a global optimizer step pre-hook; on an
optimizer's first ``step()`` it raises if that optimizer updates a quantized
model's weights but none of its trainable quantizer parameters.

Example::

    >>> qvit.quantize_model(model, qvit.preset("qvit_mixed"))
    >>> opt = torch.optim.AdamW(qvit.param_groups(model, lr=1e-4, bit_lr=10.0))
"""
from __future__ import annotations

import weakref
from typing import Any, Dict, List

from torch import nn

from ..nn.quantizer import Quantizer

__all__ = ["param_groups", "quantizer_parameters", "check_optimizer", "OptimizerSetupError"]


class OptimizerSetupError(RuntimeError):
    """An optimizer that cannot train a quantized model's quantizers."""


def _check_rate(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{name} must be a non-negative number, got {value!r}")


def quantizer_parameters(model: nn.Module) -> Dict[str, nn.Parameter]:
    """``{qualified name: parameter}`` of every quantizer (scales, offsets, bits)."""
    out = {}
    for mname, m in model.named_modules():
        if isinstance(m, Quantizer):
            for pname, p in m.named_parameters(recurse=False):
                out[f"{mname}.{pname}" if mname else pname] = p
    return out


def param_groups(model: nn.Module, lr: float, weight_decay: float = 0.05,
                 bit_lr: float = 1.0, scale_lr: float = 1.0) -> List[Dict[str, Any]]:
    """Parameter groups for ``torch.optim`` optimizers (empty groups are left out).

    Args:
        model: a (quantized or float) model.
        lr: base learning rate.
        weight_decay: decay of the weights with two or more dimensions that the
            model does not list in ``no_weight_decay()``.
        bit_lr: learning-rate multiplier of the learned bit-widths.
        scale_lr: learning-rate multiplier of the quantizer scales and offsets.

    Returns:
        Dicts with ``params``, ``lr``, ``weight_decay`` and ``name``
        (``decay``, ``no_decay``, ``scale``, ``bits``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    for value, name in ((lr, "lr"), (weight_decay, "weight_decay"), (bit_lr, "bit_lr"),
                        (scale_lr, "scale_lr")):
        _check_rate(value, name)
    skip = set()
    if hasattr(model, "no_weight_decay"):
        try:
            skip = set(model.no_weight_decay())
        except Exception:  # noqa: BLE001 - optional timm hook
            skip = set()
    quant = {id(p): n for n, p in quantizer_parameters(model).items()}
    decay, no_decay, scales, bits = [], [], [], []
    for name, p in model.named_parameters():
        if id(p) in quant:
            (bits if name.rsplit(".", 1)[-1] == "bits" else scales).append(p)
        elif p.ndim <= 1 or name.endswith(".bias") or name in skip or \
                any(name.endswith("." + s) for s in skip):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "lr": lr, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": "no_decay"},
        {"params": scales, "lr": lr * scale_lr, "weight_decay": 0.0, "name": "scale"},
        {"params": bits, "lr": lr * bit_lr, "weight_decay": 0.0, "name": "bits"},
    ]
    return [g for g in groups if g["params"]]


# ------------------------------------------------------ the optimizer check
_models: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
_checked: "weakref.WeakSet[Any]" = weakref.WeakSet()
_hook = None


def watch(model: nn.Module) -> None:
    """Check every optimizer's first step against ``model`` (called by quantize_model)."""
    global _hook
    _models.add(model)
    if _hook is None:
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        _hook = register_optimizer_step_pre_hook(_step_pre_hook)


def unwatch(model: nn.Module) -> None:
    _models.discard(model)


def _step_pre_hook(optimizer, args, kwargs) -> None:
    if optimizer in _checked:
        return
    check_optimizer(optimizer)
    _checked.add(optimizer)


def check_optimizer(optimizer, models=None) -> None:
    """Raise :class:`OptimizerSetupError` if ``optimizer`` trains a quantized model's
    weights but none of its trainable quantizer parameters (an optimizer built before
    :func:`~qvit.quantize_model`)."""
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for model in list(_models if models is None else models):
        quant = {id(p) for p in quantizer_parameters(model).values() if p.requires_grad}
        if not quant or quant & held:
            continue
        if any(id(p) in held for p in model.parameters()):
            raise OptimizerSetupError(
                f"this {type(optimizer).__name__} updates the weights of a quantized model "
                f"but none of its {len(quant)} trainable quantizer parameters (scales, "
                "bit-widths): it was built before qvit.quantize_model. Build it after "
                "conversion, e.g. torch.optim.AdamW(qvit.param_groups(model, lr=...))")
