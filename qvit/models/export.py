"""Export a quantized model as integer codes + quantizer parameters (safetensors).

The file holds, for every quantized weight, its integer codes
(``<module>.weight.codes``, int8 when the codes fit, else int16) instead of
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


def _qrange(q) -> Tuple[Tensor, Tensor]:
    b = q.rounded_bits()
    if q.signed:
        return -(2.0 ** (b - 1)), 2.0 ** (b - 1) - 1
    return torch.zeros_like(b), 2.0 ** b - 1


def _view(w: Tensor, q) -> Tuple[Tensor, Tuple[int, ...]]:
    from ..ops.reference import group_shape

    outer, g, inner = group_shape(tuple(w.shape), q.dim, q.groups)
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
    qn, qp = _qrange(q)
    codes = torch.round((yv - o[None, :, None]) / s[None, :, None])
    codes = torch.maximum(torch.minimum(codes, qp[None, :, None]), qn[None, :, None])
    dtype = torch.int8 if bool(codes.min() >= -128) and bool(codes.max() <= 127) else torch.int16
    return from_g(codes.reshape(shape)).to(dtype)


@torch.no_grad()
def decode_codes(codes: Tensor, q, module: Optional[nn.Module] = None) -> Tensor:
    """``codes * scale + offset`` per group (float32, the weight's shape)."""
    to_g, from_g = _layout(module)
    cv, shape = _view(to_g(codes.float()), q)
    s, o = _active(q, cv)
    return from_g((cv * s[None, :, None] + o[None, :, None]).reshape(shape))


def export(model: nn.Module, path: str, *, model_info: Dict[str, Any],
           quant: Optional[Dict[str, Any]]) -> int:
    """Write ``model`` to ``path``; returns the number of tensors written.

    Args:
        model: a quantized model (after :func:`qvit.quantize_model`).
        model_info: ``{"name": timm model name, "kwargs": create_model kwargs}``.
        quant: ``{"preset": name, "overrides": {...}}`` (as stored in checkpoints).
    """
    from safetensors.torch import save_file

    sites = list(_weight_sites(model))
    if not sites:
        raise ExportError("model has no enabled weight quantizers: nothing to export")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for name, m, q in sites:
        key = f"{name}.weight" if name else "weight"
        state.pop(key, None)
        state[key + CODES_SUFFIX] = weight_codes(m, q).cpu().contiguous()
    meta = {
        "format": FORMAT, "format_version": str(FORMAT_VERSION),
        "config": json.dumps({"model_info": model_info, "quant": quant}, default=str),
    }
    save_file(state, path, metadata=meta)
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
    return model
