"""qvit: Q-ViT quantization-aware training for timm vision transformers.

Learned scales and learned (head-wise) bit-widths with switchable scales
(Li et al., "Q-ViT: Fully Differentiable Quantization for Vision Transformer",
arXiv 2201.07703), on fused C / CUDA fake-quant kernels.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public names, imported on first use so that `import qvit` stays cheap and
# does not pull in timm unless a model function is used.
_LAZY = {
    "ops": ("qvit.ops", None),
    "reference": ("qvit.reference", None),
    "fake_quant": ("qvit.ops", "fake_quant"),
    "config": ("qvit.config", None),
    "QuantizerConfig": ("qvit.config", "QuantizerConfig"),
    "QViTConfig": ("qvit.config", "QViTConfig"),
    "preset": ("qvit.config", "preset"),
    "PRESETS": ("qvit.config", "PRESETS"),
    "Quantizer": ("qvit.quantizer", "Quantizer"),
    "convert": ("qvit.convert", None),
    "quantize_model": ("qvit.convert", "quantize_model"),
    "dequantize_model": ("qvit.convert", "dequantize_model"),
    "calibrate": ("qvit.convert", "calibrate"),
    "quantizers": ("qvit.convert", "quantizers"),
    "set_quantizers_enabled": ("qvit.convert", "set_quantizers_enabled"),
    "clamp_bits_": ("qvit.convert", "clamp_bits_"),
    "budget": ("qvit.budget", None),
    "bitops": ("qvit.budget", "bitops"),
    "budget_loss": ("qvit.budget", "budget_loss"),
    "uniform_bitops": ("qvit.budget", "uniform_bitops"),
    "model_size_bits": ("qvit.budget", "model_size_bits"),
    "freeze_bits": ("qvit.budget", "freeze_bits"),
    "average_bits": ("qvit.budget", "average_bits"),
    "report": ("qvit.report", "report"),
    "plot_bits": ("qvit.report", "plot_bits"),
}


def __getattr__(name):
    try:
        mod, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'qvit' has no attribute {name!r}") from None
    value = importlib.import_module(mod)
    if attr is not None:
        value = getattr(value, attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["__version__", *_LAZY]
