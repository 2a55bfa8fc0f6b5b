"""Configuration of Q-ViT quantization (Li et al., arXiv 2201.07703).

Two small frozen dataclasses: :class:`QuantizerConfig` describes one quantizer
(initial bit-width, bit range, learned or fixed bits, signedness, offset,
granularity, shared scale table); :class:`QViTConfig` says which config each
site of a vision transformer gets. :func:`preset` builds the three recipes the
project ships.

Example::

    >>> from qvit.nn.config import preset
    >>> cfg = preset("qvit_mixed")
    >>> cfg.attn.learn_bits, cfg.head_wise
    (True, True)
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional, Tuple

from ..ops import contract

__all__ = ["QuantizerConfig", "QViTConfig", "PRESETS", "preset", "GRANULARITIES"]

GRANULARITIES = ("tensor", "channel", "head")


@dataclass(frozen=True)
class QuantizerConfig:
    """One quantizer.

    Args:
        bits: initial (continuous) bit-width; must lie in ``bits_range``.
        bits_range: ``(min, max)`` integer bit-widths; the switchable scale table
            has ``max - min + 1`` entries.
        learn_bits: whether the bit-width is a trained parameter.
        signed: signed codes ``[-2^(b-1), 2^(b-1)-1]`` or unsigned ``[0, 2^b-1]``.
        offset: learn an LSQ+ offset (one per table entry).
        granularity: ``"tensor"``, ``"channel"`` or ``"head"`` (per-head groups
            where the layer has heads, per-tensor elsewhere).
        shared_scale: one scale table for all groups (the research code's
            behaviour for head-wise quantizers) instead of one per group.
        enabled: quantize (True) or pass through (False).
    """

    bits: float = 4.0
    bits_range: Tuple[int, int] = (2, 8)
    learn_bits: bool = False
    signed: bool = True
    offset: bool = False
    granularity: str = "tensor"
    shared_scale: bool = False
    enabled: bool = True

    def __post_init__(self):
        lo, hi = contract.check_bits_range(self.bits_range, bool(self.signed),
                                           name="QuantizerConfig.bits_range",
                                           type_error=ValueError)
        object.__setattr__(self, "bits_range", (lo, hi))
        try:
            bits = float(self.bits)
        except (TypeError, ValueError):
            raise ValueError(f"QuantizerConfig.bits must be a number, got {self.bits!r}") from None
        if not math.isfinite(bits) or not lo <= bits <= hi:
            raise ValueError(
                f"QuantizerConfig.bits={self.bits!r} is outside bits_range={self.bits_range}")
        object.__setattr__(self, "bits", bits)
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"QuantizerConfig.granularity={self.granularity!r}; expected one of {GRANULARITIES}")
        for name in ("learn_bits", "signed", "offset", "shared_scale", "enabled"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(
                    f"QuantizerConfig.{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def num_scales(self) -> int:
        """Entries of the switchable scale table."""
        return self.bits_range[1] - self.bits_range[0] + 1

    def replace(self, **changes) -> "QuantizerConfig":
        return dataclasses.replace(self, **changes)


def _weight_default():
    return QuantizerConfig(bits=4.0)


def _act_default():
    return QuantizerConfig(bits=4.0)


def _probs_default():
    return QuantizerConfig(bits=4.0, signed=False)


def _gelu_default():
    return QuantizerConfig(bits=4.0, signed=False, offset=True)


@dataclass(frozen=True)
class QViTConfig:
    """Which quantizer sits where in a vision transformer.

    Args:
        weight: linear / conv weights.
        act: linear inputs (LayerNorm outputs, patch-merging input, classifier input).
        attn: q, k, v and the A·V output (the proj input).
        attn_probs: the softmax output; must be unsigned.
        gelu: the GELU output (fc2 input); unsigned with offset by default.
        first_last_bits: patch-embed and classifier(s) start at this many bits
            (their quantizers are otherwise configured like the rest); ``None``
            keeps the regular initial bits.
        head_wise: attention quantizers, W_q/W_k/W_v rows and W_proj columns get
            one bit-width (and, unless ``shared_scale``, one scale table) per head.
        skip: ``fnmatch`` patterns of module names left in float, e.g. ``("head",)``.
    """

    weight: QuantizerConfig = field(default_factory=_weight_default)
    act: QuantizerConfig = field(default_factory=_act_default)
    attn: QuantizerConfig = field(default_factory=_act_default)
    attn_probs: QuantizerConfig = field(default_factory=_probs_default)
    gelu: QuantizerConfig = field(default_factory=_gelu_default)
    first_last_bits: Optional[int] = 8
    head_wise: bool = False
    skip: Tuple[str, ...] = ()

    def __post_init__(self):
        for name in ("weight", "act", "attn", "attn_probs", "gelu"):
            value = getattr(self, name)
            if not isinstance(value, QuantizerConfig):
                raise ValueError(
                    f"QViTConfig.{name} must be a QuantizerConfig, got {type(value).__name__}")
        if self.attn_probs.signed:
            raise ValueError(
                "QViTConfig.attn_probs must be unsigned (softmax output is in [0, 1]); "
                "got signed=True")
        flb = self.first_last_bits
        if flb is not None:
            if isinstance(flb, bool) or not isinstance(flb, int):
                raise ValueError(
                    f"QViTConfig.first_last_bits must be an int or None, got {flb!r}")
            for name in ("weight", "act"):
                lo, hi = getattr(self, name).bits_range
                if not lo <= flb <= hi:
                    raise ValueError(
                        f"QViTConfig.first_last_bits={flb} is outside {name}.bits_range=({lo}, {hi})")
        if not isinstance(self.head_wise, bool):
            raise ValueError(f"QViTConfig.head_wise must be a bool, got {self.head_wise!r}")
        skip = self.skip
        if isinstance(skip, str):
            skip = (skip,)
        if not all(isinstance(s, str) for s in skip):
            raise ValueError(f"QViTConfig.skip must be a tuple of strings, got {self.skip!r}")
        object.__setattr__(self, "skip", tuple(skip))

    def replace(self, **changes) -> "QViTConfig":
        return dataclasses.replace(self, **changes)

    def quantizers(self):
        """``(name, QuantizerConfig)`` for every site."""
        return [(n, getattr(self, n)) for n in ("weight", "act", "attn", "attn_probs", "gelu")]


def _uniform(bits: float, learn: bool = False, head_wise: bool = False,
             shared_scale: bool = False) -> QViTConfig:
    common = dict(bits=bits, learn_bits=learn, shared_scale=shared_scale)
    return QViTConfig(
        weight=QuantizerConfig(**common),
        act=QuantizerConfig(**common),
        attn=QuantizerConfig(**common),
        attn_probs=QuantizerConfig(signed=False, **common),
        gelu=QuantizerConfig(signed=False, offset=True, **common),
        first_last_bits=8,
        head_wise=head_wise,
    )


PRESETS = ("lsq_w4a4", "uniform_w3a3", "qvit_mixed")


def preset(name: str, **overrides) -> QViTConfig:
    """A named recipe, with fields of :class:`QViTConfig` overridden.

    * ``"lsq_w4a4"``: uniform LSQ, fixed 4-bit weights and activations.
    * ``"uniform_w3a3"``: the same at 3 bits.
    * ``"qvit_mixed"``: Q-ViT: learned bits starting at 5/5 in [2, 8], head-wise,
      per-bit-width (switchable) scale tables, one per head.

    Patch-embed and classifier(s) start at 8 bits in all three.

    Raises:
        ValueError: unknown ``name`` or a bad override.
    """
    if name == "lsq_w4a4":
        cfg = _uniform(4.0)
    elif name == "uniform_w3a3":
        cfg = _uniform(3.0)
    elif name == "qvit_mixed":
        cfg = _uniform(5.0, learn=True, head_wise=True)
    else:
        raise ValueError(f"preset name {name!r} is unknown; expected one of {PRESETS}")
    if overrides:
        unknown = set(overrides) - {f.name for f in dataclasses.fields(QViTConfig)}
        if unknown:
            raise ValueError(f"preset overrides {sorted(unknown)} are not fields of QViTConfig")
        cfg = dataclasses.replace(cfg, **overrides)
    return cfg
