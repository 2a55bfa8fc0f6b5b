"""Configuration of Q-ViT quantization (Li et al., arXiv 2201.07703).

Two small frozen dataclasses: :class:`QuantizerConfig` describes one quantizer
(initial bit-width, bit range, learned or fixed bits, signedness, offset,
granularity, scale-table sharing, initialisation); :class:`QViTConfig` says
which config each site of a vision transformer gets and how attention weights
are grouped into heads. :func:`preset` builds the recipes the project ships;
:func:`preset_lr_base` gives each one's learning rate at batch 512.

Where qvit's recommendation (``qvit_mixed``) and the research code
(``qvit_official``, github zhexinli/Q-ViT-DeiT) differ, each difference is one
option: ``QuantizerConfig.shared_scale`` (tables), ``QuantizerConfig.init``
(initialisation), ``QViTConfig.weight_grouping`` (head groups of weights).

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

__all__ = ["QuantizerConfig", "QViTConfig", "PRESETS", "preset", "preset_lr_base",
           "GRANULARITIES", "INITS", "WEIGHT_GROUPINGS"]

GRANULARITIES = ("tensor", "channel", "head")
INITS = ("grid", "official")
WEIGHT_GROUPINGS = ("head", "transposed")


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
        shared_scale: one switchable scale table per quantizer, shared by all
            its groups (heads), as in the research code; ``False`` gives every
            group (head) its own table. W_q, W_k and W_v are three quantizers
            (three tables) either way. With a shared table, heads that have the
            same bit-width use the same step size.
        init: how every table entry is first fitted (MSE fixed point
            ``q = round(clamp(x/s)); s <- <x,q>/<q,q>`` for its own bit-width):

            * ``"grid"`` (qvit): started from the best of a grid of clipping
              ratios, at most 10 iterations on a subsample of at most 16k
              elements, one fit per table row (per head with per-head tables).
            * ``"official"`` (research code): started from ``max|x|/Qp``
              (with an offset: ``beta = min(x)``, ``s = max|x-beta|/Qp``),
              iterated on every element until the relative change is below
              1e-5, one fit on the whole tensor of each quantizer (all heads
              together; W_q, W_k, W_v each on its own), copied into every row.
        enabled: quantize (True) or pass through (False).
    """

    bits: float = 4.0
    bits_range: Tuple[int, int] = (2, 8)
    learn_bits: bool = False
    signed: bool = True
    offset: bool = False
    granularity: str = "tensor"
    shared_scale: bool = False
    init: str = "grid"
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
        if self.init not in INITS:
            raise ValueError(f"QuantizerConfig.init={self.init!r}; expected one of {INITS}")
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
        head_wise: attention quantizers, W_q/W_k/W_v and W_proj get one
            bit-width (and, unless ``shared_scale``, one scale table) per head.
        weight_grouping: which channels of the attention weights form a head
            group when ``head_wise``:

            * ``"head"`` (qvit): the channels the head computes with, output
              rows of W_q/W_k/W_v and input columns of W_proj; proj BitOPs pair
              each head's weight bits with that head's A·V bits
              (``sum_h b_w[h] b_a[h]``).
            * ``"transposed"`` (research code): its reshape of the
              ``(out, in)`` weight as ``(in, out)`` makes the groups input
              columns of W_q/W_k/W_v and output rows of W_proj (not head
              aligned); proj BitOPs then are ``mean(b_w) mean(b_a)``, the
              research code's formula.
        skip: ``fnmatch`` patterns of module names left in float, e.g. ``("head",)``.
    """

    weight: QuantizerConfig = field(default_factory=_weight_default)
    act: QuantizerConfig = field(default_factory=_act_default)
    attn: QuantizerConfig = field(default_factory=_act_default)
    attn_probs: QuantizerConfig = field(default_factory=_probs_default)
    gelu: QuantizerConfig = field(default_factory=_gelu_default)
    first_last_bits: Optional[int] = 8
    head_wise: bool = False
    weight_grouping: str = "head"
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
        if self.weight_grouping not in WEIGHT_GROUPINGS:
            raise ValueError(f"QViTConfig.weight_grouping={self.weight_grouping!r}; "
                             f"expected one of {WEIGHT_GROUPINGS}")
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
             shared_scale: bool = False, init: str = "grid",
             weight_grouping: str = "head") -> QViTConfig:
    common = dict(bits=bits, learn_bits=learn, shared_scale=shared_scale, init=init)
    return QViTConfig(
        weight=QuantizerConfig(**common),
        act=QuantizerConfig(**common),
        attn=QuantizerConfig(**common),
        attn_probs=QuantizerConfig(signed=False, **common),
        gelu=QuantizerConfig(signed=False, offset=True, **common),
        first_last_bits=8,
        head_wise=head_wise,
        weight_grouping=weight_grouping,
    )


PRESETS = ("lsq_w4a4", "uniform_w3a3", "uniform_w2a2", "qvit_mixed", "qvit_official")

# Learning rate at a total batch of 512 (lr = lr_base * batch / 512), as in the
# research code's scripts: 5e-4 for the uniform LSQ baselines
# (uniform_train.sh), 2e-4 for learned bits (mixed_train.sh).
_LR_BASE = {"lsq_w4a4": 5e-4, "uniform_w3a3": 5e-4, "uniform_w2a2": 5e-4, "qvit_mixed": 2e-4,
            "qvit_official": 2e-4}


def preset_lr_base(name: str) -> float:
    """The research code's learning rate for ``name`` at a total batch of 512.

    Raises:
        ValueError: unknown ``name``.
    """
    if name not in _LR_BASE:
        raise ValueError(f"preset name {name!r} is unknown; expected one of {PRESETS}")
    return _LR_BASE[name]


# QuantizerConfig fields a preset override may set on every quantizer at once
_ALL_QUANTIZER_FIELDS = ("shared_scale", "init")

# qvit_mixed's side of each difference from the research code (the ablation
# decides: a qvit choice stays only where it is at least as good).
QVIT_MIXED_CHOICES = dict(shared_scale=False, init="grid", weight_grouping="head")


def preset(name: str, **overrides) -> QViTConfig:
    """A named recipe, with fields of :class:`QViTConfig` overridden.

    ``shared_scale`` and ``init`` are also accepted: they set that field of
    every quantizer (e.g. ``preset("qvit_mixed", init="official")``).

    * ``"lsq_w4a4"``: uniform LSQ, fixed 4-bit weights and activations.
    * ``"uniform_w3a3"``, ``"uniform_w2a2"``: the same at 3 and 2 bits.
    * ``"qvit_mixed"``: Q-ViT as qvit recommends: learned bits starting at 5/5
      in [2, 8], head-wise, per-bit-width (switchable) scale tables; its
      table sharing, initialisation and weight grouping are those the
      ablation (``benchmarks/ablation_official.py``) found at least as good.
    * ``"qvit_official"``: Q-ViT exactly as the research code: the same, with
      one table per quantizer shared by its heads (three for W_q, W_k, W_v),
      ``init="official"`` and ``weight_grouping="transposed"``.

    Patch-embed and classifier(s) start at 8 bits in all of them.

    Raises:
        ValueError: unknown ``name`` or a bad override.
    """
    if name == "lsq_w4a4":
        cfg = _uniform(4.0)
    elif name == "uniform_w3a3":
        cfg = _uniform(3.0)
    elif name == "uniform_w2a2":
        cfg = _uniform(2.0)
    elif name == "qvit_mixed":
        cfg = _uniform(5.0, learn=True, head_wise=True, **QVIT_MIXED_CHOICES)
    elif name == "qvit_official":
        cfg = _uniform(5.0, learn=True, head_wise=True, shared_scale=True, init="official",
                       weight_grouping="transposed")
    else:
        raise ValueError(f"preset name {name!r} is unknown; expected one of {PRESETS}")
    if overrides:
        top = {f.name for f in dataclasses.fields(QViTConfig)}
        unknown = set(overrides) - top - set(_ALL_QUANTIZER_FIELDS)
        if unknown:
            raise ValueError(f"preset overrides {sorted(unknown)} are not fields of QViTConfig "
                             f"or one of {_ALL_QUANTIZER_FIELDS}")
        per_q = {k: overrides.pop(k) for k in list(overrides) if k in _ALL_QUANTIZER_FIELDS}
        if per_q:
            cfg = cfg.replace(**{n: q.replace(**per_q) for n, q in cfg.quantizers()})
        cfg = dataclasses.replace(cfg, **overrides)
    return cfg
