"""Quantized drop-in layers for timm vision transformers (Q-ViT, Li et al. 2022).

Each layer takes the constructor arguments of the timm (or torch) layer it
replaces plus ``qconfig=``, so timm builds quantized models directly::

    with qvit.nn.default_qconfig("qvit_mixed"):
        model = timm.create_model("deit_small_patch16_224", attn_layer=QAttention,
                                  mlp_layer=QMlp, embed_layer=QPatchEmbed)

:func:`qvit.quantize_model` builds the same layers from an existing model.
"""
from ._dropin import current_qconfig, default_qconfig
from .attention import QAttention, QWindowAttention
from .linear import QConv2d, QLinear
from .mlp import QMlp, QPatchEmbed

__all__ = ["QLinear", "QConv2d", "QAttention", "QWindowAttention", "QMlp", "QPatchEmbed",
           "default_qconfig", "current_qconfig"]
