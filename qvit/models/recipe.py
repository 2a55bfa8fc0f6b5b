"""The model recipe: build a timm model, quantize it, rebuild one from a checkpoint.

Below the training loop and the CLI (both import it, never the other way);
:mod:`qvit.models.export` uses it to rebuild an exported model.
"""
from __future__ import annotations

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
        return timm.create_model(name, pretrained=pretrained, **extra, **kwargs)
    except TypeError as e:
        raise UsageError(f"model {name!r} does not accept these arguments: {e}") from None
    except (RuntimeError, OSError, ValueError, KeyError) as e:
        if not pretrained:
            raise
        msg = str(e).strip().splitlines()
        raise ckpt_io.CheckpointError(f"pretrained weights for {name!r} could not be loaded: "
                                      f"{msg[0] if msg else type(e).__name__}") from None

def quant_config(spec: Dict[str, Any]):
    from ..nn.config import preset

    try:
        return preset(spec["preset"], **spec.get("overrides", {}))
    except ValueError as e:
        raise UsageError(str(e)) from None


def apply_quant(model, spec: Optional[Dict[str, Any]]):
    if spec is None:
        return model
    from .convert import quantize_model

    return quantize_model(model, quant_config(spec))


def model_from_checkpoint(ckpt: Dict[str, Any], path: str = "checkpoint"):
    """Rebuild the (fake-quant) model a qvit checkpoint was saved from."""
    info = ckpt.get("model_info")
    if not isinstance(info, dict) or "name" not in info:
        raise ckpt_io.CheckpointError(f"{path} is not a qvit checkpoint (no model_info)")
    model = create_model(info["name"], dict(info.get("kwargs", {})))
    apply_quant(model, ckpt.get("quant"))
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
