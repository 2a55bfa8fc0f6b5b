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
    "reference": ("qvit.ops.reference", None),
    "fake_quant": ("qvit.ops", "fake_quant"),
    "config": ("qvit.nn.config", None),
    "QuantizerConfig": ("qvit.nn.config", "QuantizerConfig"),
    "QViTConfig": ("qvit.nn.config", "QViTConfig"),
    "preset": ("qvit.nn.config", "preset"),
    "PRESETS": ("qvit.nn.config", "PRESETS"),
    "Quantizer": ("qvit.nn.quantizer", "Quantizer"),
    "convert": ("qvit.models.convert", None),
    "create_model": ("qvit.models.recipe", "create"),
    "conversion_summary": ("qvit.models.convert", "conversion_summary"),
    "quantize_model": ("qvit.models.convert", "quantize_model"),
    "dequantize_model": ("qvit.models.convert", "dequantize_model"),
    "calibrate": ("qvit.models.convert", "calibrate"),
    "quantizers": ("qvit.models.convert", "quantizers"),
    "set_quantizers_enabled": ("qvit.models.convert", "set_quantizers_enabled"),
    "clamp_bits_": ("qvit.models.convert", "clamp_bits_"),
    "budget": ("qvit.models.budget", None),
    "bitops": ("qvit.models.budget", "bitops"),
    "budget_loss": ("qvit.models.budget", "budget_loss"),
    "uniform_bitops": ("qvit.models.budget", "uniform_bitops"),
    "model_size_bits": ("qvit.models.budget", "model_size_bits"),
    "freeze_bits": ("qvit.models.budget", "freeze_bits"),
    "average_bits": ("qvit.models.budget", "average_bits"),
    "param_groups": ("qvit.models.param_groups", "param_groups"),
    "report": ("qvit.models.report", "report"),
    "export": ("qvit.models.export", None),
    "nn": ("qvit.nn", None),
    "models": ("qvit.models", None),
    "plot_bits": ("qvit.models.report", "plot_bits"),
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
