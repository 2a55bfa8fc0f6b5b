"""The op layer: learnable fake quantization as torch ops, and its reference.

- :mod:`qvit.ops.torch_ops`: the ``torch.library`` ops over the fused C / CUDA
  kernels in ``qvit._C``, their autograd, and :func:`fake_quant`, the public
  entry point (the only Python module that touches ``qvit._C``);
- :mod:`qvit.ops.reference`: the pure-PyTorch executable spec every kernel is
  tested against.
"""
from . import reference
from .torch_ops import backend_info, cpu_cache_info, empty_cpu_cache, fake_quant, set_cpu_cache_limit

__all__ = ["fake_quant", "backend_info", "reference", "cpu_cache_info", "empty_cpu_cache",
           "set_cpu_cache_limit"]
