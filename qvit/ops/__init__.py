"""The op layer: learnable fake quantization as torch ops, and its reference.

- :mod:`qvit.ops.torch_ops`: the ``torch.library`` ops over the fused C / CUDA
  kernels in ``qvit._C``, their autograd, and :func:`fake_quant`, the public
  entry point (the only Python module that touches ``qvit._C``);
- :mod:`qvit.ops.reference`: the pure-PyTorch executable spec every kernel is
  tested against;
- :mod:`qvit.ops.checks`: :func:`fake_quant`'s argument checks (no tensor
  data read) and their per-call cache;
- :mod:`qvit.ops.contract`: the op's rules (bit-width range, group layout,
  code range, parameter shapes), written once for every layer above.
"""
from . import contract, reference
from .torch_ops import backend_info, fake_quant

__all__ = ["fake_quant", "backend_info", "contract", "reference"]
