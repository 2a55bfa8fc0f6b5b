"""Convert timm DeiT / Swin models to Q-ViT quantized models and back.

Modules are recognised by structure (their attributes), not by class path, so
the conversion works across timm 1.0.x releases:

* ViT/DeiT attention: ``qkv`` and ``proj`` linears, ``num_heads``, ``scale``,
  ``head_dim``, no relative position bias -> :class:`~qvit.nn.QAttention`;
* Swin window attention: the same plus ``relative_position_bias_table`` and
  ``window_area`` -> :class:`~qvit.nn.QWindowAttention`;
* MLP: ``fc1``, ``act``, ``fc2`` linears -> :class:`~qvit.nn.QMlp` (the fc2
  input, the GELU output, with the unsigned + offset ``gelu`` config);
* the patch-embed conv and the classifier(s) (``get_classifier()``, both heads of
  a distilled DeiT) -> first/last layers at ``first_last_bits``;
* every other ``nn.Linear`` / ``nn.Conv2d`` (e.g. Swin patch merging) -> weights
  with ``weight``, input with ``act``.

Example::

    >>> import timm, qvit
    >>> model = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    >>> model = qvit.quantize_model(model, qvit.preset("qvit_mixed"))
    >>> qvit.calibrate(model, [torch.randn(8, 3, 224, 224)])
"""
from __future__ import annotations

import fnmatch
from typing import Iterable, Iterator, Optional, Tuple

import torch
from torch import nn

from ..nn import QAttention, QConv2d, QLinear, QMlp, QWindowAttention
from ..nn.config import QViTConfig
from ..nn.quantizer import Quantizer

__all__ = ["quantize_model", "dequantize_model", "calibrate", "quantizers",
           "set_quantizers_enabled", "clamp_bits_", "is_quantized"]

_QUANTIZED = (QLinear, QConv2d, QAttention, QWindowAttention, QMlp)


def _is_linear(m) -> bool:
    return isinstance(m, nn.Linear) and not isinstance(m, QLinear)


def _is_attention(m) -> bool:
    return (_is_linear(getattr(m, "qkv", None)) and _is_linear(getattr(m, "proj", None))
            and isinstance(getattr(m, "num_heads", None), int)
            and isinstance(getattr(m, "scale", None), float)
            and isinstance(getattr(m, "attn_drop", None), nn.Module))


def _is_vit_attention(m) -> bool:
    return (_is_attention(m) and isinstance(getattr(m, "head_dim", None), int)
            and not hasattr(m, "relative_position_bias_table")
            and not hasattr(m, "logit_scale") and not hasattr(m, "rope"))


def _is_window_attention(m) -> bool:
    return (_is_attention(m) and isinstance(getattr(m, "relative_position_bias_table", None), nn.Parameter)
            and isinstance(getattr(m, "relative_position_index", None), torch.Tensor)
            and isinstance(getattr(m, "window_area", None), int)
            and isinstance(getattr(m, "softmax", None), nn.Module)
            and not hasattr(m, "logit_scale"))


def _is_mlp(m) -> bool:
    return (_is_linear(getattr(m, "fc1", None)) and _is_linear(getattr(m, "fc2", None))
            and isinstance(getattr(m, "act", None), nn.Module))


def is_quantized(model: nn.Module) -> bool:
    """Whether ``model`` contains qvit quantized layers."""
    return any(isinstance(m, _QUANTIZED) for m in model.modules())


def _record_batch(module, args, kwargs):
    x = args[0] if args else next(iter(kwargs.values()), None)
    if isinstance(x, torch.Tensor) and x.dim() > 0:
        module.__dict__["_qvit_batch"] = int(x.shape[0])


def _track_batch(model: nn.Module) -> None:
    """Record the batch size of each forward (BitOPs are per image)."""
    if not any(h is _record_batch for h in model._forward_pre_hooks.values()):
        model.register_forward_pre_hook(_record_batch, with_kwargs=True)


def _classifier_ids(model: nn.Module) -> set:
    ids = set()
    get = getattr(model, "get_classifier", None)
    heads = None
    if callable(get):
        try:
            heads = get()
        except Exception:  # a model without a classifier: nothing is first/last
            heads = None
    if heads is None:
        heads = [getattr(model, n, None) for n in ("head", "head_dist")]
    if not isinstance(heads, (tuple, list)):
        heads = [heads]
    for h in heads:
        if isinstance(h, nn.Linear):
            ids.add(id(h))
        elif isinstance(h, nn.Module) and isinstance(getattr(h, "fc", None), nn.Linear):
            ids.add(id(h.fc))
    return ids


def _patch_embed_ids(model: nn.Module) -> set:
    pe = getattr(model, "patch_embed", None)
    proj = getattr(pe, "proj", None)
    return {id(proj)} if isinstance(proj, nn.Conv2d) else set()


def quantize_model(model: nn.Module, config: QViTConfig) -> nn.Module:
    """Swap the matmul layers of a timm DeiT / Swin model for quantized ones, in place.

    Args:
        model: a timm ``VisionTransformer`` / ``VisionTransformerDistilled`` /
            ``SwinTransformer`` (or any model built from the same blocks).
        config: where each quantizer sits, see :class:`~qvit.nn.config.QViTConfig`.

    Returns:
        ``model`` itself. Quantizers start uninitialised: call :func:`calibrate`
        (or they initialise lazily from their first input).

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or ``config`` not a ``QViTConfig``.
        ValueError: ``model`` is already quantized.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(config, QViTConfig):
        raise TypeError(f"config must be a QViTConfig, got {type(config).__name__}")
    if is_quantized(model):
        raise ValueError("model is already quantized; call dequantize_model first")
    heads = _classifier_ids(model)
    first = _patch_embed_ids(model)

    def skipped(name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in config.skip)

    def kept(name: str, subs) -> list:
        return [s for s in subs if skipped(f"{name}.{s}")]

    def convert(parent: nn.Module, prefix: str) -> None:
        for cname, child in list(parent.named_children()):
            name = f"{prefix}{cname}"
            if child is None or skipped(name):
                continue
            if _is_vit_attention(child) or _is_window_attention(child):
                cls = QWindowAttention if _is_window_attention(child) else QAttention
                new = cls.from_float(child, config, keep_float=kept(name, ("qkv", "proj", "gate")))
                setattr(parent, cname, new)
                for sub, m in list(new.named_children()):
                    if sub not in ("qkv", "proj") and not isinstance(m, Quantizer):
                        convert_one(new, sub, m, f"{name}.")
            elif _is_mlp(child):
                keep = kept(name, ("fc1", "fc2"))
                if len(keep) == 2:  # nothing to quantize: timm's module stays
                    convert(child, f"{name}.")
                    continue
                new = QMlp.from_float(child, config, keep_float=keep)
                setattr(parent, cname, new)
                for sub, m in list(new.named_children()):
                    if sub not in ("fc1", "fc2"):
                        convert_one(new, sub, m, f"{name}.")
            else:
                convert_one(parent, cname, child, prefix)

    def convert_one(parent: nn.Module, cname: str, child: nn.Module, prefix: str) -> None:
        name = f"{prefix}{cname}"
        if child is None or skipped(name) or isinstance(child, (_QUANTIZED, Quantizer)):
            return
        if _is_linear(child):
            setattr(parent, cname, QLinear.from_float(child, config, first_last=id(child) in heads))
        elif isinstance(child, nn.Conv2d) and not isinstance(child, QConv2d):
            setattr(parent, cname, QConv2d.from_float(child, config, first_last=id(child) in first))
        elif _is_vit_attention(child) or _is_window_attention(child) or _is_mlp(child):
            holder = nn.Module()
            holder.add_module(cname, child)
            convert(holder, prefix)
            setattr(parent, cname, getattr(holder, cname))
        else:
            convert(child, f"{name}.")

    convert(model, "")
    _track_batch(model)
    model.__dict__["qvit_config"] = config
    return model


def dequantize_model(model: nn.Module) -> nn.Module:
    """Turn every quantized layer back into the timm module it came from, in place.

    The float weights are the (trained) weights themselves; quantizer state is
    dropped. Returns ``model`` (a quantized root module is returned converted).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, _QUANTIZED):
        return model.to_float()

    def walk(parent: nn.Module) -> None:
        for cname, child in list(parent.named_children()):
            if isinstance(child, _QUANTIZED):
                setattr(parent, cname, child.to_float())
            elif child is not None:
                walk(child)

    walk(model)
    for key, hook in list(model._forward_pre_hooks.items()):
        if hook is _record_batch:
            del model._forward_pre_hooks[key]
            model._forward_pre_hooks_with_kwargs.pop(key, None)
    model.__dict__.pop("qvit_config", None)
    model.__dict__.pop("_qvit_batch", None)
    return model


def quantizers(model: nn.Module) -> Iterator[Tuple[str, Quantizer]]:
    """``(qualified name, Quantizer)`` for every quantizer in ``model``."""
    for name, m in model.named_modules():
        if isinstance(m, Quantizer):
            yield name, m


def set_quantizers_enabled(model: nn.Module, enabled: bool = True, role: Optional[str] = None) -> None:
    """Enable / disable every quantizer (or only ``role`` = ``"weight"`` / ``"act"``)."""
    if role not in (None, "weight", "act"):
        raise ValueError(f"role must be None, 'weight' or 'act', got {role!r}")
    for _, q in quantizers(model):
        if role is None or q.role == role:
            q.enabled = bool(enabled)


@torch.no_grad()
def clamp_bits_(model: nn.Module) -> None:
    """Project every bit-width into its range and floor the scales (after each optimizer step)."""
    for _, q in quantizers(model):
        q.clamp_bits_()


def _model_input(batch, device):
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("calibrate: got an empty batch")
        batch = batch[0]
    elif isinstance(batch, dict):
        for key in ("image", "input", "x", "pixel_values"):
            if key in batch:
                batch = batch[key]
                break
    if not isinstance(batch, torch.Tensor):
        raise TypeError(f"calibrate: batches must be tensors or (input, target) pairs, "
                        f"got {type(batch).__name__}")
    return batch.to(device) if device is not None else batch


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable) -> int:
    """Initialise every quantizer: weights from the weights, activations from data.

    Activations are observed on a float forward of each batch (all quantizers
    pass their input through) and every table entry is then fitted on the
    pooled samples. The model's train/eval mode is restored.

    Args:
        model: a model returned by :func:`quantize_model` or built from
            :mod:`qvit.nn` layers (from here on its batch size is recorded for
            :func:`~qvit.bitops`).
        batches: an iterable of input tensors or ``(input, target)`` pairs (a
            ``DataLoader`` works); one batch of 64 images is the paper's choice.

    Returns:
        The number of batches used.

    Raises:
        ValueError: ``model`` has no quantizers or ``batches`` yields nothing.
    """
    qs = [q for _, q in quantizers(model)]
    if not qs:
        raise ValueError("calibrate: model has no quantizers; call quantize_model first")
    _track_batch(model)  # a model built from qvit.nn layers was never converted
    for m in model.modules():
        if hasattr(m, "init_weight_quantizers"):
            m.init_weight_quantizers()
    acts = [q for q in qs if q.role == "act" and q.enabled]
    param = next(model.parameters(), None)
    device = param.device if param is not None else None
    was_training = model.training
    model.eval()
    n = 0
    try:
        for q in acts:
            q.start_observing()
        for batch in batches:
            model(_model_input(batch, device))
            n += 1
    finally:
        for q in acts:
            if n:
                q.finish_observing()
            else:
                q._observing, q._samples = False, []
        model.train(was_training)
    if n == 0:
        raise ValueError("calibrate: batches yielded no batch")
    return n
