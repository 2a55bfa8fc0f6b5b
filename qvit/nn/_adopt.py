"""Take over a timm module's state into a quantized module, and give it back.

A quantized layer keeps every attribute, parameter, buffer and child of the
float module it replaces under the same names (so timm checkpoints load and
state_dict keys only gain the quantizers' entries), and remembers the float
class so :func:`to_float` can rebuild an instance of it without calling its
``__init__`` (which would re-initialise weights). This works for whatever
attributes a timm release puts on its modules.
"""
from __future__ import annotations

from typing import Iterable

from torch import nn

_BASE_KEYS = frozenset(vars(nn.Module()))


def adopt(qmod: nn.Module, fmod: nn.Module, skip_children: Iterable[str] = ()) -> None:
    """Copy ``fmod``'s plain attributes, parameters, buffers and children onto ``qmod``.

    ``qmod`` must already have run ``nn.Module.__init__``. Children named in
    ``skip_children`` are not copied (the caller installs quantized versions).
    """
    extra = [k for k in vars(fmod) if k not in _BASE_KEYS]
    for k in extra:
        qmod.__dict__[k] = vars(fmod)[k]
    for name, p in fmod._parameters.items():
        qmod._parameters[name] = p
    for name, b in fmod._buffers.items():
        qmod._buffers[name] = b
    qmod._non_persistent_buffers_set = set(fmod._non_persistent_buffers_set)
    for name, child in fmod._modules.items():
        if name not in skip_children:
            qmod._modules[name] = child
    qmod.__dict__["_qvit_float_cls"] = type(fmod)
    qmod.__dict__["_qvit_float_attrs"] = tuple(extra)
    qmod.__dict__["_qvit_float_params"] = tuple(fmod._parameters)
    qmod.__dict__["_qvit_float_buffers"] = tuple(fmod._buffers)
    qmod.__dict__["_qvit_float_children"] = tuple(fmod._modules)
    qmod.train(fmod.training)


def to_float(qmod: nn.Module) -> nn.Module:
    """Rebuild the float module ``qmod`` was adopted from (sharing parameters and buffers).

    Quantized children are turned back too.
    """
    cls = qmod._qvit_float_cls
    fmod = cls.__new__(cls)
    nn.Module.__init__(fmod)
    for k in qmod._qvit_float_attrs:
        fmod.__dict__[k] = qmod.__dict__[k]
    for name in qmod._qvit_float_params:
        fmod._parameters[name] = qmod._parameters[name]
    for name in qmod._qvit_float_buffers:
        fmod._buffers[name] = qmod._buffers[name]
    fmod._non_persistent_buffers_set = set(qmod._non_persistent_buffers_set)
    for name in qmod._qvit_float_children:
        child = qmod._modules[name]
        if child is not None and hasattr(child, "_qvit_float_cls"):
            child = to_float(child)
        fmod._modules[name] = child
    fmod.train(qmod.training)
    return fmod
