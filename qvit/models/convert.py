"""Convert timm DeiT / Swin models to Q-ViT quantized models and back.

Modules are recognised by structure (their attributes), not by class path, so
the conversion works across timm 1.0.x releases:

* ViT/DeiT attention: ``qkv`` and ``proj`` linears, ``num_heads``, ``scale``,
  ``head_dim``, no relative position bias -> :class:`~qvit.nn.QAttention`;
* Swin window attention: the same plus ``relative_position_bias_table`` and
  ``window_area`` -> :class:`~qvit.nn.QWindowAttention`;
* MLP: ``fc1``, ``act``, ``fc2`` linears -> both linears quantized in place, the
  fc2 input (GELU output) with the unsigned + offset ``gelu`` config;
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
import inspect
import warnings
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import torch
from torch import nn

from ..nn import QAttention, QConv2d, QLinear, QWindowAttention
from ..nn.config import QuantizerConfig, QViTConfig
from ..nn.quantizer import Quantizer

__all__ = ["quantize_model", "dequantize_model", "calibrate", "quantizers",
           "set_quantizers_enabled", "clamp_bits_", "is_quantized", "conversion_summary",
           "UnrecognisedModelWarning"]


class UnrecognisedModelWarning(UserWarning):
    """quantize_model met attention it does not know: only its linear layers are quantized."""

_QUANTIZED = (QLinear, QConv2d, QAttention, QWindowAttention)


def _is_linear(m) -> bool:
    return isinstance(m, nn.Linear) and not isinstance(m, QLinear)


def _is_attention(m) -> bool:
    return (_is_linear(getattr(m, "qkv", None)) and _is_linear(getattr(m, "proj", None))
            and isinstance(getattr(m, "num_heads", None), int)
            and isinstance(getattr(m, "scale", None), float)
            and isinstance(getattr(m, "attn_drop", None), nn.Module))


def _forward_fits(m, replacement) -> bool:
    """The module's forward takes no argument the quantized replacement lacks
    (EVA's ``rope``, BEiT's ``shared_rel_pos_bias``: a different attention)."""
    try:
        mine = inspect.signature(type(m).forward).parameters
        theirs = inspect.signature(replacement.forward).parameters
    except (TypeError, ValueError):
        return False
    return set(mine) <= set(theirs)


def _is_vit_attention(m) -> bool:
    return (_is_attention(m) and isinstance(getattr(m, "head_dim", None), int)
            and not hasattr(m, "relative_position_bias_table")
            and not hasattr(m, "logit_scale") and not hasattr(m, "rope")
            and getattr(m, "q_bias", None) is None and _forward_fits(m, QAttention))


def _is_window_attention(m) -> bool:
    return (_is_attention(m) and isinstance(getattr(m, "relative_position_bias_table", None), nn.Parameter)
            and isinstance(getattr(m, "relative_position_index", None), torch.Tensor)
            and isinstance(getattr(m, "window_area", None), int)
            and isinstance(getattr(m, "softmax", None), nn.Module)
            and not hasattr(m, "logit_scale") and _forward_fits(m, QWindowAttention))


def _looks_like_attention(m) -> bool:
    """Attention that :func:`quantize_model` did not recognise (its matmuls stay float)."""
    if isinstance(m, _QUANTIZED):
        return False
    named = "attention" in type(m).__name__.lower()
    heads = isinstance(getattr(m, "num_heads", None), int)
    return (named or heads) and any(isinstance(c, nn.Linear) for c in m.children())


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
    probe = module.__dict__.get("_qvit_probe")
    if probe is not None and probe.scale.dtype != torch.float32:
        raise TypeError(
            f"the quantizer parameters of this model are {probe.scale.dtype} (model.half() or "
            ".to(dtype) after quantize_model?); scales and bit-widths must stay float32: keep "
            "the model in float32 and run it under torch.autocast(device_type, "
            "dtype=torch.float16 or torch.bfloat16) for low-precision compute")


def _check_loaded_bits(module, state_dict, prefix, *args) -> None:
    """Warn when a state dict sets fixed bit-widths other than this model's config
    (a state dict of another preset: the model would then run at the loaded bits)."""
    differ = []
    for name, q in quantizers(module):
        key = f"{prefix}{name}.bits" if name else f"{prefix}bits"
        value = state_dict.get(key)
        if q.learn_bits or not isinstance(value, torch.Tensor) or value.shape != q.bits.shape:
            continue
        if not bool((value.detach().float().cpu() == q.config.bits).all()):
            differ.append((name, sorted(set(value.detach().float().cpu().tolist())), q.config.bits))
    if differ:
        name, got, want = differ[0]
        warnings.warn(
            f"load_state_dict: {len(differ)} fixed (not learned) bit-widths differ from this "
            f"model's quantization config, e.g. {name}.bits = {got} where the config says "
            f"{want:g}; the model now runs at the loaded bits. Was the state dict saved from a "
            "model converted with another preset?", UserWarning, stacklevel=4)


def _plain(cfg: Optional[QuantizerConfig]) -> Optional[QuantizerConfig]:
    """Outside attention there are no heads: 'head' granularity means per-tensor."""
    if cfg is not None and cfg.granularity == "head":
        return cfg.replace(granularity="tensor")
    return cfg


def _first_last(cfg: QuantizerConfig, bits: Optional[int]) -> QuantizerConfig:
    cfg = _plain(cfg)
    return cfg if bits is None else cfg.replace(bits=float(bits))


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


def quantize_model(model: nn.Module, config: QViTConfig, strict: bool = False) -> nn.Module:
    """Swap the matmul layers of a timm DeiT / Swin model for quantized ones, in place.

    Args:
        model: a timm ``VisionTransformer`` / ``VisionTransformerDistilled`` /
            ``SwinTransformer`` (or any model built from the same blocks).
        config: where each quantizer sits, see :class:`~qvit.nn.config.QViTConfig`.
        strict: raise instead of warning when the model is not a recognised
            DeiT / Swin (see below).

    Returns:
        ``model`` itself. Quantizers start uninitialised: call :func:`calibrate`
        (or they initialise lazily from their first input). What was and was
        not converted: :func:`conversion_summary`. Build the optimizer *after*
        this call (:func:`qvit.param_groups`): an earlier one misses the new
        scales and bit-widths, and its first ``step()`` raises.

    Warns:
        UnrecognisedModelWarning: the model has attention this function does not
            know (EVA, BEiT, Swin V2, ...: only their linear layers get quantized,
            their attention matmuls stay float) or no attention at all (a CNN:
            convs and linears only, no first/last layer found at 8 bits).

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or ``config`` not a ``QViTConfig``.
        ValueError: ``model`` is already quantized, or (``strict``) not recognised.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(config, QViTConfig):
        raise TypeError(f"config must be a QViTConfig, got {type(config).__name__}")
    if is_quantized(model):
        raise ValueError("model is already quantized; call dequantize_model first")
    heads = _classifier_ids(model)
    first = _patch_embed_ids(model)
    flb = config.first_last_bits

    def skipped(name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in config.skip)

    def linear(mod: nn.Linear, name: str, acfg: Optional[QuantizerConfig]) -> nn.Module:
        if skipped(name):
            return mod
        if id(mod) in heads:
            return QLinear.from_linear(mod, _first_last(config.weight, flb),
                                       _first_last(config.act, flb), first_last=True)
        return QLinear.from_linear(mod, _plain(config.weight), _plain(acfg))

    def convert(parent: nn.Module, prefix: str) -> None:
        for cname, child in list(parent.named_children()):
            name = f"{prefix}{cname}"
            if child is None or skipped(name):
                continue
            if _is_vit_attention(child) or _is_window_attention(child):
                cls = QWindowAttention if _is_window_attention(child) else QAttention
                new = cls.from_attention(
                    child, weight=config.weight, act=config.act, attn_cfg=config.attn,
                    probs=config.attn_probs, head_wise=config.head_wise,
                    weight_grouping=config.weight_grouping,
                    quantize_qkv=not skipped(f"{name}.qkv"),
                    quantize_proj=not skipped(f"{name}.proj"))
                setattr(parent, cname, new)
                for sub, m in list(new.named_children()):
                    if sub not in ("qkv", "proj") and not isinstance(m, Quantizer):
                        convert_one(new, sub, m, f"{name}.")
            elif _is_mlp(child):
                norm = getattr(child, "norm", None)
                gelu_in = norm is None or isinstance(norm, nn.Identity)
                child.fc1 = linear(child.fc1, f"{name}.fc1", config.act)
                child.fc2 = linear(child.fc2, f"{name}.fc2", config.gelu if gelu_in else config.act)
                for sub, m in list(child.named_children()):
                    if sub not in ("fc1", "fc2"):
                        convert_one(child, sub, m, f"{name}.")
            else:
                convert_one(parent, cname, child, prefix)

    def convert_one(parent: nn.Module, cname: str, child: nn.Module, prefix: str) -> None:
        name = f"{prefix}{cname}"
        if child is None or skipped(name) or isinstance(child, (_QUANTIZED, Quantizer)):
            return
        if _is_linear(child):
            setattr(parent, cname, linear(child, name, config.act))
        elif isinstance(child, nn.Conv2d) and not isinstance(child, QConv2d):
            is_first = id(child) in first
            w = _first_last(config.weight, flb) if is_first else _plain(config.weight)
            a = _first_last(config.act, flb) if is_first else _plain(config.act)
            setattr(parent, cname, QConv2d.from_conv(child, w, a, first_last=is_first))
        elif _is_vit_attention(child) or _is_window_attention(child) or _is_mlp(child):
            holder = nn.Module()
            holder.add_module(cname, child)
            convert(holder, prefix)
            setattr(parent, cname, getattr(holder, cname))
        else:
            convert(child, f"{name}.")

    convert(model, "")
    summary = conversion_summary(model, skipped_by=config.skip)
    _warn_unrecognised(model, summary, strict)
    if not any(h is _record_batch for h in model._forward_pre_hooks.values()):
        model.register_forward_pre_hook(_record_batch, with_kwargs=True)
        model.__dict__["_qvit_load_hook"] = model.register_load_state_dict_pre_hook(
            _check_loaded_bits)
    model.__dict__["qvit_config"] = config
    model.__dict__["_qvit_probe"] = next((q for _, q in quantizers(model)), None)
    from .param_groups import watch

    watch(model)
    return model


def conversion_summary(model: nn.Module, skipped_by: Iterable[str] = ()) -> Dict[str, List[str]]:
    """Module names by what conversion made of them.

    ``attention`` (quantized attention), ``linear`` / ``conv`` (quantized
    layers outside attention), ``first_last`` (of those: patch embedding and
    classifiers), ``skipped`` (left float by ``QViTConfig.skip``),
    ``unrecognised_attention`` (attention left float but for its linears),
    ``float_linear`` (``nn.Linear`` / ``nn.Conv2d`` left float).
    """
    out: Dict[str, List[str]] = {k: [] for k in ("attention", "linear", "conv", "first_last",
                                                 "skipped", "unrecognised_attention",
                                                 "float_linear")}
    patterns = tuple(skipped_by) or tuple(getattr(model.__dict__.get("qvit_config"), "skip", ()))
    inside: List[str] = []
    for name, m in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(m, (QAttention, QWindowAttention)):
            out["attention"].append(name)
            inside.append(name)
        elif isinstance(m, (QLinear, QConv2d)):
            out["conv" if isinstance(m, QConv2d) else "linear"].append(name)
            if m.first_last:
                out["first_last"].append(name)
        elif name and any(fnmatch.fnmatchcase(name, p) for p in patterns):
            out["skipped"].append(name)
            inside.append(name)
        elif _looks_like_attention(m):
            out["unrecognised_attention"].append(name)
        elif isinstance(m, (nn.Linear, nn.Conv2d)):
            out["float_linear"].append(name)
    return out


def _warn_unrecognised(model: nn.Module, summary: Dict[str, List[str]], strict: bool) -> None:
    kind = type(model).__name__
    bad = summary["unrecognised_attention"]
    if bad:
        msg = (f"quantize_model: {len(bad)} attention module(s) of this {kind} are not a "
               f"DeiT/ViT or Swin attention qvit knows (e.g. {bad[0]}: "
               f"{type(model.get_submodule(bad[0])).__name__}); only their linear layers "
               "are quantized, their attention matmuls stay float")
    elif not summary["attention"]:
        msg = (f"quantize_model: this {kind} has no DeiT/ViT or Swin attention; only its "
               f"{len(summary['linear']) + len(summary['conv'])} Linear/Conv2d layers are "
               "quantized" + ("" if summary["first_last"] and len(summary["first_last"]) > 1
                              else ", and its first layer is not recognised (it runs at the "
                              "regular bits, not first_last_bits)"))
    else:
        return
    if strict:
        raise ValueError(msg + " (strict=True)")
    warnings.warn(msg + "; pass strict=True to make this an error", UnrecognisedModelWarning,
                  stacklevel=3)


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
    model.__dict__.pop("_qvit_probe", None)
    handle = model.__dict__.pop("_qvit_load_hook", None)
    if handle is not None:
        handle.remove()
    from .param_groups import unwatch

    unwatch(model)
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


CALIBRATION_BATCHES = 4


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable,
              max_batches: Optional[int] = CALIBRATION_BATCHES) -> int:
    """Initialise every quantizer: weights from the weights, activations from data.

    Activations are observed on a float forward of each batch (all quantizers
    pass their input through) and every table entry is then fitted on the
    pooled samples. The model's train/eval mode is restored.

    Args:
        model: a model returned by :func:`quantize_model`.
        batches: an iterable of input tensors or ``(input, target)`` pairs (a
            ``DataLoader`` works); one batch of 64 images is the paper's choice.
        max_batches: stop after this many batches (default 4), so that a
            training loader is not run for a whole epoch; ``None``: all of them.

    Returns:
        The number of batches used.

    Raises:
        ValueError: ``model`` has no quantizers, ``batches`` yields nothing or
            ``max_batches`` is not a positive int (or None).
    """
    if max_batches is not None and (isinstance(max_batches, bool)
                                    or not isinstance(max_batches, int) or max_batches < 1):
        raise ValueError(f"calibrate: max_batches must be a positive int or None, "
                         f"got {max_batches!r}")
    qs = [q for _, q in quantizers(model)]
    if not qs:
        raise ValueError("calibrate: model has no quantizers; call quantize_model first")
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
            if max_batches is not None and n >= max_batches:
                break
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
