"""Quantized timm MLP (fc1 -> act -> fc2) and the patch embedding, drop-in for timm's.

Quantized (Q-ViT, ``docs/design.md`` section 5.1): the fc1 input and
weights, the fc2 weights and the fc2 input, i.e. the activation output
(unsigned with a learned offset: ``QViTConfig.gelu``; with a norm between the
activation and fc2, the norm output is signed and gets ``act``). Float: the
activation and norm arithmetic, dropout, biases.
"""
from __future__ import annotations

from torch import nn

from ._adopt import adopt, to_float
from ._dropin import DropIn, plain_site, resolve_qconfig, timm_class
from .linear import QConv2d, QLinear

__all__ = ["QMlp", "QPatchEmbed"]


class QMlp(DropIn, nn.Module):
    """Quantized timm ``Mlp``: ``fc1`` and ``fc2`` are :class:`~qvit.nn.QLinear`.

    Takes ``timm.layers.Mlp``'s arguments (``in_features, hidden_features,
    out_features, act_layer, norm_layer, bias, drop``) plus ``qconfig=`` (a
    :class:`~qvit.nn.config.QViTConfig` or preset name; ``None``: the current
    :func:`~qvit.nn.default_qconfig`), so ``timm.create_model(...,
    mlp_layer=functools.partial(QMlp, qconfig=cfg))`` works. From an existing
    MLP: :meth:`from_float`. Its forward is the forward of the MLP class it was
    made from (timm's ``Mlp``, or e.g. ``GluMlp`` when converted), run on the
    quantized ``fc1`` / ``fc2``. Shapes: ``x (..., in_features)``.
    """

    _OPTIONS = ("keep_float",)

    @classmethod
    def _float_cls(cls) -> type:
        return timm_class("timm.layers:Mlp")

    @classmethod
    def from_float(cls, mlp: nn.Module, qconfig=None, *, keep_float=()) -> "QMlp":
        """``mlp`` (same Parameters) with ``fc1`` / ``fc2`` quantized.

        Args:
            mlp: a module with ``fc1`` and ``fc2`` linears and an ``act``.
            qconfig: see the class; the ``weight``, ``act`` and ``gelu`` sites.
            keep_float: names among ``"fc1"``, ``"fc2"`` left in float.

        Raises:
            TypeError: ``mlp`` has no ``fc1`` / ``fc2`` linears (e.g. timm's
                ``use_conv=True``), or ``qconfig`` is not a model-wide config.
        """
        fc1, fc2 = getattr(mlp, "fc1", None), getattr(mlp, "fc2", None)
        if not (isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear)
                and isinstance(getattr(mlp, "act", None), nn.Module)
                and not isinstance(fc1, QLinear) and not isinstance(fc2, QLinear)):
            raise TypeError(f"{cls.__name__}.from_float needs an MLP with float fc1 and fc2 "
                            f"nn.Linear layers and an act (not use_conv=True); got "
                            f"{type(mlp).__name__} with fc1={type(fc1).__name__}")
        name = f"{cls.__name__}(in_features={fc1.in_features}, hidden_features={fc1.out_features})"
        cfg = resolve_qconfig(qconfig, name)
        keep = set(keep_float)
        if not keep <= {"fc1", "fc2"}:
            raise ValueError(f"{name}: keep_float={sorted(keep)}; expected names among fc1, fc2")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        adopt(self, mlp)
        norm = getattr(mlp, "norm", None)
        act_out = norm is None or isinstance(norm, nn.Identity)
        w = plain_site(cfg.weight)
        if "fc1" not in keep:
            self.fc1 = QLinear.from_linear(fc1, w, plain_site(cfg.act))
        if "fc2" not in keep:
            self.fc2 = QLinear.from_linear(fc2, w, plain_site(cfg.gelu if act_out else cfg.act))
        return self

    def to_float(self) -> nn.Module:
        """The float MLP this was made from (same Parameters)."""
        return to_float(self)

    def forward(self, *args, **kwargs):
        return self._qvit_float_cls.forward(self, *args, **kwargs)


def QPatchEmbed(*args, qconfig=None, **kwargs) -> nn.Module:  # noqa: N802 - a layer factory
    """timm's ``PatchEmbed`` built from its own arguments, its ``proj`` a first-layer
    :class:`~qvit.nn.QConv2d` (``first_last_bits``), as :func:`~qvit.quantize_model`
    leaves it. For timm's ``embed_layer`` slot:
    ``embed_layer=functools.partial(QPatchEmbed, qconfig=cfg)``.
    It is timm's own class, so :func:`~qvit.dequantize_model` and timm's
    methods (``set_input_size``, ``feat_ratio``) keep working.
    """
    pe = timm_class("timm.layers:PatchEmbed")(*args, **kwargs)
    pe.proj = QConv2d.from_float(pe.proj, qconfig, first_last=True)
    return pe
