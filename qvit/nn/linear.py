"""Quantized linear and conv layers (weight and input quantizers), drop-in for timm's.

``QLinear`` / ``QConv2d`` subclass ``nn.Linear`` / ``nn.Conv2d`` and re-use the
float module's weight and bias Parameters, so timm code that inspects them keeps
working and checkpoints load. The matmul itself stays a float matmul of
fake-quantized operands (quantization-aware training).

Bit accounting (used by :mod:`qvit.models.budget`): a layer records the number of
output positions of its latest forward and states its BitOPs (MACs x b_w x b_a
summed over weight rows / columns and input channels) and weight size as
:mod:`.cost` terms.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import QuantizerConfig
from .quantizer import Quantizer, fused_ok
from . import functional as QF
from ._adopt import adopt, to_float
from ._dropin import DropIn, layer_sites
from .cost import Term, columns, total

__all__ = ["QLinear", "QConv2d"]


def _args(q: Optional[Quantizer], x: Tensor):
    return None if q is None else q.kernel_args(x)


def _groups_for(cfg: QuantizerConfig, channels: int) -> int:
    return channels if cfg.granularity == "channel" else 1


class QLinear(DropIn, nn.Linear):
    """``nn.Linear`` with a weight quantizer and an input quantizer.

    Built like ``nn.Linear`` plus ``qconfig=`` (see :meth:`from_float`) and
    ``first_last=`` (a classifier: ``first_last_bits``), or from a float layer
    with :meth:`from_float` / :meth:`from_linear`. Weight groups split rows (``weight_dim=0``, e.g. per output channel or per
    head of W_q/W_k/W_v) or columns (``weight_dim=1``, per head of W_proj); input
    groups split the last dimension. Shapes: ``x (..., in_features)``.

    Example::

        >>> lin = QLinear(8, 4, qconfig=QuantizerConfig(bits=4))  # 4-bit weight and input
        >>> lin(torch.randn(2, 8)).shape
        torch.Size([2, 4])
    """

    weight_quant: Optional[Quantizer]
    act_quant: Optional[Quantizer]

    @classmethod
    def from_linear(cls, linear: nn.Linear, wcfg: Optional[QuantizerConfig],
                    acfg: Optional[QuantizerConfig], *, weight_groups: Optional[int] = None,
                    weight_dim: int = 0, act_groups: Optional[int] = None,
                    first_last: bool = False, weight_units: int = 1) -> "QLinear":
        """Wrap ``linear`` (same weight/bias Parameters). ``None`` config = leave that operand float.

        ``weight_groups`` / ``act_groups`` default to the granularity of the config
        (``"channel"``: one group per output row / input channel, else one).
        ``weight_units``: quantizers the weight quantizer stands for (3 for a fused qkv).
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        adopt(self, linear)
        dev = linear.weight.device
        wq = aq = None
        if wcfg is not None:
            size = linear.out_features if weight_dim == 0 else linear.in_features
            g = weight_groups if weight_groups is not None else _groups_for(wcfg, size)
            if size % g:
                raise ValueError(f"weight_groups={g} does not divide {size}")
            wq = Quantizer(wcfg, g, weight_dim, first_last, role="weight", device=dev,
                           units=weight_units)
        if acfg is not None:
            g = act_groups if act_groups is not None else _groups_for(acfg, linear.in_features)
            if linear.in_features % g:
                raise ValueError(f"act_groups={g} does not divide in_features={linear.in_features}")
            aq = Quantizer(acfg, g, -1, first_last, role="act", device=dev)
        self.weight_quant = wq
        self.act_quant = aq
        self.weight_dim = weight_dim
        self.first_last = first_last
        self.positions = 0
        return self

    def to_float(self) -> nn.Linear:
        """The float module this layer was made from (same Parameters)."""
        return to_float(self)

    def forward(self, x: Tensor) -> Tensor:
        self.positions = x.numel() // self.in_features
        if fused_ok():   # one autograd node that keeps only the float x
            return QF.qlinear(x, self.weight, self.bias, _args(self.act_quant, x),
                              _args(self.weight_quant, self.weight))
        if self.act_quant is not None:
            x = self.act_quant(x)
        w = self.weight
        if self.weight_quant is not None:
            w = self.weight_quant(w)
        return F.linear(x, w, self.bias)

    @torch.no_grad()
    def init_weight_quantizers(self) -> None:
        if self.weight_quant is not None and self.weight_quant.enabled:
            self.weight_quant.init_from(self.weight)

    def qvit_bitops_terms(self) -> List[Term]:
        """BitOPs of the latest forward (all positions, all images) as cost terms."""
        if self.weight_dim == 0:   # (sum of row bits) x (sum of input bits) per position
            return [Term(float(self.positions), total(self.weight_quant, self.out_features),
                         total(self.act_quant, self.in_features))]
        return columns(float(self.out_features * self.positions), self.weight_quant,
                       self.act_quant, self.in_features)

    def qvit_size_terms(self) -> List[Term]:
        """Weight bits (biases stay float and are not counted)."""
        size = self.out_features if self.weight_dim == 0 else self.in_features
        return [Term(float(self.weight.numel() // size), total(self.weight_quant, size))]

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s + (", first_last" if self.first_last else "")

    _OPTIONS = ("first_last",)

    @classmethod
    def _float_cls(cls) -> type:
        return nn.Linear

    @classmethod
    def from_float(cls, linear: nn.Linear, qconfig=None, *, first_last: bool = False) -> "QLinear":
        """``linear`` (same Parameters) with the quantizers ``qconfig`` gives a linear layer.

        Args:
            qconfig: a :class:`~qvit.nn.config.QViTConfig` or preset name (its
                ``weight`` and ``act`` sites; ``None``: the current
                :func:`~qvit.nn.default_qconfig`), one ``QuantizerConfig`` for
                weight and input, or a ``(weight, input)`` pair (``None`` = float).
            first_last: a classifier / first layer: a QViTConfig's
                ``first_last_bits`` initial bits, and counted as such in budgets.

        Raises:
            TypeError: ``linear`` is not an ``nn.Linear`` or ``qconfig`` has a wrong type.
            ValueError: a config that does not fit this layer (e.g. per-head groups).
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        w, a = layer_sites(qconfig, f"{cls.__name__}({linear.extra_repr()})", first_last)
        return cls.from_linear(linear, w, a, first_last=first_last)


class QConv2d(DropIn, nn.Conv2d):
    """``nn.Conv2d`` (the patch embedding) with weight and input quantizers.

    Built like ``nn.Conv2d`` plus ``qconfig=`` and ``first_last=`` (see
    :meth:`QLinear.from_float`), or with :meth:`from_float` / :meth:`from_conv`.

    Weight groups split output channels; input groups split input channels (dim 1).
    Shapes: ``x (B, C_in, H, W)``.
    """

    weight_quant: Optional[Quantizer]
    act_quant: Optional[Quantizer]

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, wcfg: Optional[QuantizerConfig],
                  acfg: Optional[QuantizerConfig], *, first_last: bool = False) -> "QConv2d":
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        adopt(self, conv)
        dev = conv.weight.device
        self.weight_quant = (Quantizer(wcfg, _groups_for(wcfg, conv.out_channels), 0, first_last,
                                       role="weight", device=dev) if wcfg is not None else None)
        self.act_quant = (Quantizer(acfg, _groups_for(acfg, conv.in_channels), 1, first_last,
                                    role="act", device=dev) if acfg is not None else None)
        self.first_last = first_last
        self.positions = 0
        return self

    def to_float(self) -> nn.Conv2d:
        return to_float(self)

    def forward(self, x: Tensor) -> Tensor:
        if fused_ok() and self.padding_mode == "zeros" and not isinstance(self.padding, str):
            y = QF.qconv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                           self.groups, _args(self.act_quant, x),
                           _args(self.weight_quant, self.weight))
            self.positions = y.numel() // self.out_channels
            return y
        if self.act_quant is not None:
            x = self.act_quant(x)
        w = self.weight
        if self.weight_quant is not None:
            w = self.weight_quant(w)
        y = self._conv_forward(x, w, self.bias)
        self.positions = y.numel() // self.out_channels
        return y

    @torch.no_grad()
    def init_weight_quantizers(self) -> None:
        if self.weight_quant is not None and self.weight_quant.enabled:
            self.weight_quant.init_from(self.weight)

    def qvit_bitops_terms(self) -> List[Term]:
        kernel = self.weight[0, 0].numel() / self.groups
        return [Term(kernel * self.positions, total(self.weight_quant, self.out_channels),
                     total(self.act_quant, self.in_channels))]

    def qvit_size_terms(self) -> List[Term]:
        per_row = self.weight.numel() // self.out_channels
        return [Term(float(per_row), total(self.weight_quant, self.out_channels))]

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s + (", first_last" if self.first_last else "")

    _OPTIONS = ("first_last",)

    @classmethod
    def _float_cls(cls) -> type:
        return nn.Conv2d

    @classmethod
    def from_float(cls, conv: nn.Conv2d, qconfig=None, *, first_last: bool = False) -> "QConv2d":
        """``conv`` (same Parameters) with the quantizers of ``qconfig``, as :meth:`QLinear.from_float`."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        w, a = layer_sites(qconfig, f"{cls.__name__}({conv.extra_repr()})", first_last)
        return cls.from_conv(conv, w, a, first_last=first_last)
