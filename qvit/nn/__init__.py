"""Quantized drop-in layers for timm vision transformers (Q-ViT, Li et al. 2022)."""
from .attention import QAttention, QWindowAttention
from .linear import QConv2d, QLinear

__all__ = ["QLinear", "QConv2d", "QAttention", "QWindowAttention"]
