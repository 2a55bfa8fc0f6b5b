"""The model recipe: build a timm model, quantize it, rebuild one from a checkpoint.

A model carries its recipe as plain data (JSON-ready, no reprs):
:func:`create_model` records the timm name and creation arguments
(``model_info``), :func:`apply_quant` / :func:`qvit.quantize_model` the
quantization config (``quant``: a preset name with overrides, or the whole
:class:`~qvit.nn.config.QViTConfig` as a dict). :func:`describe` reads both
back, so :func:`qvit.models.export.export` needs nothing but the model.

Below the training loop and the CLI (both import it, never the other way);
:mod:`qvit.models.export` uses it to rebuild an exported model.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, Optional, Tuple

from . import checkpoint as ckpt_io


class UsageError(ValueError):
    """A flag value that cannot work (out of range, unknown name, ...)."""


def create_model(name: str, kwargs: Dict[str, Any], pretrained: bool = False,
                 pretrained_path: str = ""):
    """``timm.create_model`` (never the network unless ``pretrained`` without a path).

    ``pretrained_path``: a local file through timm's pretrained loading (its
    checkpoint filter and classifier adaptation), like timm's ``--pretrained-path``.
    """
    import timm

    if not timm.is_model(name):
        raise UsageError(f"unknown model {name!r} (see timm.list_models())")
    extra: Dict[str, Any] = {}
    if pretrained_path:
        if not os.path.isfile(pretrained_path):
            raise ckpt_io.CheckpointError(f"checkpoint {pretrained_path!r} does not exist")
        pretrained = True
        extra["pretrained_cfg_overlay"] = dict(file=pretrained_path, num_classes=-1)
    try:
        model = timm.create_model(name, pretrained=pretrained, **extra, **kwargs)
    except TypeError as e:
        text = [f"{k}={v!r}" for k, v in kwargs.items() if isinstance(v, str)]
        hint = (f" (model kwargs are read as YAML: a sequence is [1,1,2,1]; {text[0]} "
                "arrived as a string)") if text else ""
        raise UsageError(f"model {name!r} does not accept these arguments: {e}{hint}") from None
    except (RuntimeError, OSError, ValueError, KeyError) as e:
        if not pretrained:
            raise
        msg = str(e).strip().splitlines()
        raise ckpt_io.CheckpointError(f"pretrained weights for {name!r} could not be loaded: "
                                      f"{msg[0] if msg else type(e).__name__}") from None
    model.__dict__["qvit_model_info"] = {"name": name, "kwargs": _plain(dict(kwargs))}
    return model


def create(name: str, pretrained: bool = False, **kwargs):
    """``timm.create_model(name, pretrained, **kwargs)`` that records its recipe
    (``qvit.create_model``): export and checkpoints can then rebuild the model."""
    return create_model(name, kwargs, pretrained=pretrained)


def _plain(obj: Any) -> Any:
    """Dataclasses, tuples and dicts as JSON-ready dicts and lists."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    return obj


_QUANTIZER_FIELDS = ("weight", "act", "attn", "attn_probs", "gelu")


def _config_fields(data: Dict[str, Any]) -> Dict[str, Any]:
    """QViTConfig fields from plain data (nested quantizer dicts become QuantizerConfigs)."""
    from ..nn.config import QuantizerConfig

    out = dict(data)
    for k in _QUANTIZER_FIELDS:
        v = out.get(k)
        if isinstance(v, dict):
            v = dict(v)
            if isinstance(v.get("bits_range"), list):
                v["bits_range"] = tuple(v["bits_range"])
            out[k] = QuantizerConfig(**v)
    if isinstance(out.get("skip"), list):
        out["skip"] = tuple(out["skip"])
    return out


def quant_data(config) -> Dict[str, Any]:
    """A :class:`QViTConfig` as recipe data: ``{"config": {...}}``."""
    return {"config": _plain(config)}

def quant_config(spec: Dict[str, Any]):
    """The :class:`QViTConfig` of recipe data (a preset with overrides, or a whole config)."""
    from ..nn.config import QViTConfig, preset

    try:
        if "config" in spec:
            return QViTConfig(**_config_fields(spec["config"]))
        return preset(spec["preset"], **_config_fields(spec.get("overrides", {})))
    except (TypeError, ValueError, KeyError) as e:
        raise UsageError(f"quantization recipe {spec!r} is not valid: {e}") from None


def apply_quant(model, spec: Optional[Dict[str, Any]]):
    """Quantize ``model`` by recipe data (None: leave it float); the model records it."""
    if spec is None:
        return model
    from .convert import quantize_model

    quantize_model(model, quant_config(spec))
    model.__dict__["qvit_quant"] = _plain(spec)
    return model


def describe(model) -> Tuple[Optional[Dict[str, Any]], Optional[Dict[str, Any]]]:
    """``(model_info, quant)`` the model carries (None where it does not know)."""
    info = model.__dict__.get("qvit_model_info")
    quant = model.__dict__.get("qvit_quant")
    config = model.__dict__.get("qvit_config")
    if config is None:
        quant = None
    elif quant is None or quant_config(quant) != config:
        quant = quant_data(config)
    return info, quant


def model_from_checkpoint(ckpt: Dict[str, Any], path: str = "checkpoint"):
    """Rebuild the (fake-quant) model a qvit checkpoint was saved from."""
    info = ckpt.get("model_info")
    if not isinstance(info, dict) or "name" not in info:
        raise ckpt_io.CheckpointError(f"{path} is not a qvit checkpoint (no model_info)")
    model = create_model(info["name"], dict(info.get("kwargs", {})))
    apply_quant(model, ckpt.get("quant"))
    if isinstance(ckpt.get("args"), dict):
        model.__dict__["qvit_data"] = data_config(ckpt["args"])
    ckpt_io.load_model_state(model, ckpt_io.model_state(ckpt), path)
    model.eval()
    return model


def input_size(model) -> Tuple[int, int, int]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    c, h, w = cfg.get("input_size", (3, 224, 224))
    pe = getattr(model, "patch_embed", None)
    img = getattr(pe, "img_size", None)
    if img is not None:
        h, w = (img, img) if isinstance(img, int) else tuple(img)
    in_chans = getattr(getattr(pe, "proj", None), "in_channels", c)
    return int(in_chans), int(h), int(w)


DATA_KEYS = ("mean", "std", "interpolation", "crop_pct")


def data_config(values: Dict[str, Any]) -> Dict[str, Any]:
    """The evaluation transform settings (mean, std, interpolation, crop_pct) of a run."""
    return {k: _plain(values[k]) for k in DATA_KEYS if k in values}
