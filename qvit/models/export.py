"""Export a quantized model as integer codes + quantizer parameters (safetensors).

The file holds, for every quantized weight, its integer codes
(``<module>.weight.codes``, int8 when the codes fit, else int16 or int32) instead of
the float weight; every other tensor of the state dict as it is (quantizer
``bits``, ``scale`` and ``offset`` tables and buffers, biases, norms, tokens,
float layers). The safetensors metadata holds a JSON config: the timm model
name and creation kwargs and the qvit quantization recipe.

:func:`load_exported` rebuilds the fake-quant model: it decodes each weight as
``codes * scale + offset`` (the active table entry of its group), which the
model's weight quantizer maps onto itself, so outputs match the exported model.
"""
from __future__ import annotations

import json
from typing import Any, Dict, Iterator, Optional, Tuple

import torch
from torch import Tensor, nn

from ..ops import contract

FORMAT = "qvit-export"
FORMAT_VERSION = 1
CODES_SUFFIX = ".codes"


class ExportError(ValueError):
    """A file that is not a qvit export, or does not fit the model."""


def _weight_sites(model: nn.Module) -> Iterator[Tuple[str, nn.Module, Any]]:
    """``(module name, module, weight quantizer)`` for every enabled weight quantizer."""
    for name, m in model.named_modules():
        q = getattr(m, "weight_quant", None)
        w = getattr(m, "weight", None)
        if q is not None and isinstance(w, Tensor) and getattr(q, "enabled", True):
            yield name, m, q


def _active(q, rows: Tensor) -> Tuple[Tensor, Tensor]:
    """Active scale and offset of each group ``[G]`` at the current rounded bits."""
    lo, _ = q.bits_range
    b = q.rounded_bits().to(torch.long) - lo  # [G]
    s_tab, o_tab = q.expanded_tables()
    g = torch.arange(q.groups, device=b.device)
    s = s_tab.detach()[g, b]
    o = o_tab.detach()[g, b] if o_tab is not None else torch.zeros_like(s)
    return s, o


def _view(w: Tensor, q) -> Tuple[Tensor, Tuple[int, ...]]:
    outer, g, inner = contract.group_shape(tuple(w.shape), q.dim, q.groups)
    return w.reshape(outer, g, inner), tuple(w.shape)


def _layout(module: Optional[nn.Module]):
    """The layer's map of its weight to the quantizer's grouped view and back
    (``weight_to_groups`` / ``weight_from_groups``; identity for plain layers)."""
    to_g = getattr(module, "weight_to_groups", None)
    if to_g is None:
        return (lambda t: t), (lambda t: t)
    return to_g, module.weight_from_groups


@torch.no_grad()
def weight_codes(module: nn.Module, q) -> Tensor:
    """Integer codes of ``module.weight`` under its weight quantizer (same shape)."""
    to_g, from_g = _layout(module)
    y = q.quantize(to_g(module.weight.detach().float()))  # the fake-quant output: on the grid
    yv, shape = _view(y, q)
    s, o = _active(q, yv)
    qn, qp = contract.qrange(q.rounded_bits(), q.signed)
    codes = torch.round((yv - o[None, :, None]) / s[None, :, None])
    codes = torch.maximum(torch.minimum(codes, qp[None, :, None]), qn[None, :, None])
    return from_g(codes.reshape(shape)).to(_code_dtype(codes))


def _code_dtype(codes: Tensor) -> torch.dtype:
    """The narrowest signed integer type holding the codes (bit-widths go up to 24)."""
    lo, hi = (float(codes.min()), float(codes.max())) if codes.numel() else (0.0, 0.0)
    for dtype in (torch.int8, torch.int16):
        info = torch.iinfo(dtype)
        if lo >= info.min and hi <= info.max:
            return dtype
    return torch.int32


@torch.no_grad()
def decode_codes(codes: Tensor, q, module: Optional[nn.Module] = None) -> Tensor:
    """``codes * scale + offset`` per group (float32, the weight's shape)."""
    to_g, from_g = _layout(module)
    cv, shape = _view(to_g(codes.float()), q)
    s, o = _active(q, cv)
    return from_g((cv * s[None, :, None] + o[None, :, None]).reshape(shape))


def export(model: nn.Module, path: str, *, model_info: Optional[Dict[str, Any]] = None,
           quant: Optional[Dict[str, Any]] = None) -> int:
    """Write ``model`` to ``path``; returns the number of tensors written.

    The model's recipe (see :mod:`qvit.models.recipe`) goes into the file's
    metadata, so :func:`load_exported`, ``qvit eval`` and ``qvit report``
    rebuild the model from the file alone.

    Args:
        model: a quantized model built with ``qvit.create_model`` (or loaded from a
            qvit checkpoint or export), then ``qvit.quantize_model``.
        model_info: ``{"name": timm model name, "kwargs": create_model kwargs}``;
            default: what the model recorded. Needed for a model built with
            ``timm.create_model`` directly.
        quant: quantization recipe data; default: the model's own config.

    Raises:
        ExportError: the model is not quantized, does not know how it was created,
            or the folder of ``path`` does not exist.
    """
    from safetensors.torch import save_file

    import os

    from .checkpoint import atomic_write

    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ExportError(f"cannot write {str(path)!r}: folder {folder!r} does not exist")
    from .recipe import _plain, describe

    own_info, own_quant = describe(model)
    model_info = model_info if model_info is not None else own_info
    quant = quant if quant is not None else own_quant
    if quant is None:
        raise ExportError("model is not quantized: call qvit.quantize_model first")
    if model_info is None:
        raise ExportError(
            "model does not record how it was created: build it with qvit.create_model(name, "
            "**kwargs) instead of timm.create_model, or pass model_info={'name': ..., "
            "'kwargs': {...}}")
    sites = list(_weight_sites(model))
    if not sites:
        raise ExportError("model has no enabled weight quantizers: nothing to export")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for name, m, q in sites:
        key = f"{name}.weight" if name else "weight"
        state.pop(key, None)
        state[key + CODES_SUFFIX] = weight_codes(m, q).cpu().contiguous()
    config = {"model_info": _plain(model_info), "quant": _plain(quant)}
    if model.__dict__.get("qvit_data"):
        config["data"] = _plain(model.__dict__["qvit_data"])
    meta = {
        "format": FORMAT, "format_version": str(FORMAT_VERSION),
        "config": json.dumps(config),
    }
    atomic_write(str(path), lambda tmp: save_file(state, tmp, metadata=meta),
                 suffix=".safetensors")
    return len(state)


def read_config(path: str) -> Dict[str, Any]:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - any decoder failure: not an export
        raise ExportError(f"{path!r} is not a readable safetensors file: {e}") from None
    if meta.get("format") != FORMAT:
        raise ExportError(f"{path!r} is not a qvit export (metadata format "
                          f"{meta.get('format')!r})")
    return json.loads(meta["config"])


def load_exported(path: str, device: str = "cpu") -> nn.Module:
    """Rebuild the fake-quant model written by :func:`export` (eval mode)."""
    from safetensors.torch import load_file

    from .checkpoint import load_model_state
    from .recipe import apply_quant, create_model

    cfg = read_config(path)
    info = cfg["model_info"]
    model = create_model(info["name"], dict(info.get("kwargs", {})))
    apply_quant(model, cfg.get("quant"))
    tensors = load_file(path, device=device)
    codes = {k[: -len(CODES_SUFFIX)]: tensors.pop(k) for k in list(tensors)
             if k.endswith(CODES_SUFFIX)}
    own = model.state_dict()
    # quantizer parameters first: decoding needs the learned bits and scales
    partial = {k: v for k, v in tensors.items()}
    for k in codes:
        partial[k] = own[k] if k in own else None
    if any(v is None for v in partial.values()):
        bad = next(k for k, v in partial.items() if v is None)
        raise ExportError(f"{path!r} does not match the model: unexpected key {bad}")
    load_model_state(model, partial, path)
    with torch.no_grad():
        for name, m, q in _weight_sites(model):
            key = f"{name}.weight" if name else "weight"
            if key not in codes:
                raise ExportError(f"{path!r} does not match the model: no codes for {key}")
            c = codes[key]
            if tuple(c.shape) != tuple(m.weight.shape):
                raise ExportError(f"{path!r}: codes of {key} have shape {tuple(c.shape)}, "
                                  f"model weight {tuple(m.weight.shape)}")
            m.weight.copy_(decode_codes(c.to(m.weight.device), q, m).to(m.weight.dtype))
    model.to(device)
    model.eval()
    if cfg.get("data"):
        model.__dict__["qvit_data"] = dict(cfg["data"])
    return model
