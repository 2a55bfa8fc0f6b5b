"""Learnable fake quantization as torch ops over the fused C / CUDA kernels.

The op of Q-ViT (Li et al., "Q-ViT: Fully Differentiable Quantization for
Vision Transformer", arXiv 2201.07703) on top of LSQ (Esser et al., 2020) and
LSQ+ (Bhalgat et al., 2020): learned scales, learned bit-widths, a switchable
scale table, an optional learned offset.

Three layers live here, and this is the only Python file that touches
``qvit._C``:

* two ``torch.library`` ops, ``qvit::fq_forward`` and ``qvit::fq_backward``,
  with CPU and CUDA kernels (outputs allocated by torch, the data handed to
  ``qvit._C`` through DLPack) and fake kernels, so ``torch.compile`` traces them without
  graph breaks;
* an ``autograd.Function`` outside the ops (measured cheaper than registering
  autograd on the op);
* :func:`fake_quant`, the public entry point, which validates its arguments in
  Python before anything reaches the dispatcher (:mod:`qvit.ops.checks`, cached
  per call signature).

The pure-PyTorch executable spec is :mod:`qvit.ops.reference`; tests hold the
kernels to it.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import contract, reference
from .checks import checked as _checked, validate as _validate  # noqa: F401 (nn uses _validate)

__all__ = ["fake_quant", "backend_info"]

_C_API = ("fq_forward", "fq_backward", "fq_workspace_bytes", "set_exchange_api",
          "cuda_built", "cuda_device_count", "cpu_isa")
try:
    from .. import _C
    _C_IMPORT_ERROR: Optional[str] = None
    _missing = [name for name in _C_API if not hasattr(_C, name)]
    if _missing:  # a stale or partial build: treat it as absent, say why
        _C_IMPORT_ERROR = f"qvit._C ({_C.__file__}) lacks {', '.join(_missing)}"
        _C = None
except ImportError as exc:  # pragma: no cover - depends on the build
    _C = None
    _C_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"


def _register_exchange_api() -> Optional[str]:
    """Hand torch's DLPack C exchange API to ``_C`` once; return the name used.

    With the exchange API a torch tensor crosses into C for well under a
    microsecond and ``requires_grad`` tensors are accepted. Older torch has
    neither attribute; then every tensor goes through a ``to_dlpack`` capsule.
    """
    if _C is None:
        return None
    for name in ("__dlpack_c_exchange_api__", "__c_dlpack_exchange_api__"):
        api = getattr(torch.Tensor, name, None)
        if api is not None:
            _C.set_exchange_api(api, torch._C.TensorBase)
            return name
    return None


_EXCHANGE_API = _register_exchange_api()

if _EXCHANGE_API is None:
    _to_c = torch.utils.dlpack.to_dlpack
else:
    def _to_c(t):
        return t


def _to_c_opt(t):
    return None if t is None else _to_c(t)


# CUDA runtime errors cudaGetDeviceCount reports on machines without a usable GPU
_CUDA_ERRORS = {
    3: ("cudaErrorInitializationError", "the CUDA driver could not be initialised"),
    34: ("cudaErrorStubLibrary", "a stub CUDA driver library is installed, not a real driver"),
    35: ("cudaErrorInsufficientDriver", "no CUDA driver, or one older than the CUDA runtime "
         "qvit was built with"),
    100: ("cudaErrorNoDevice", "no CUDA device"),
    101: ("cudaErrorInvalidDevice", "no valid CUDA device (check CUDA_VISIBLE_DEVICES)"),
    999: ("cudaErrorUnknown", "unknown CUDA error"),
}


def _cuda_status(loaded: bool) -> tuple:
    """``(devices >= 0, readable status)`` from the binding's device count."""
    if not loaded:
        return 0, "qvit._C is not loaded"
    if not _C.cuda_built():
        return 0, "CUDA kernels not compiled in (built with QVIT_CUDA=0 or without nvcc)"
    n = int(_C.cuda_device_count())
    if n >= 0:
        return n, f"ok ({n} device{'s' if n != 1 else ''})" if n else "no CUDA device"
    name, what = _CUDA_ERRORS.get(-n, (f"CUDA error {-n}", "the CUDA runtime reported an error"))
    return 0, f"{what} ({name})"


def backend_info() -> dict:
    """Which backend :func:`fake_quant` runs on.

    Returns:
        A dict with ``c_loaded`` (``qvit._C`` imported), ``c_import_error``
        (the import error text, or ``None``), ``cuda_built`` (the CUDA kernels
        were compiled in), ``cuda_devices`` (devices the CUDA runtime sees,
        0 without a GPU or driver), ``cuda_status`` (readable: ``"ok (1
        device)"``, or why there is none, e.g. ``"no CUDA driver, ...
        (cudaErrorInsufficientDriver)"``) and ``exchange_api`` (the torch
        attribute used to pass tensors into C, or ``"to_dlpack"`` when torch
        has no DLPack C exchange API).
    """
    loaded = _C is not None
    devices, status = _cuda_status(loaded)
    return {
        "c_loaded": loaded,
        "c_import_error": _C_IMPORT_ERROR,
        "cuda_built": bool(_C.cuda_built()) if loaded else False,
        "cuda_devices": devices,
        "cuda_status": status,
        "exchange_api": (_EXCHANGE_API or "to_dlpack") if loaded else None,
    }


def _require_c() -> None:
    if _C is None:
        raise RuntimeError(
            "qvit: the compiled extension qvit._C could not be imported "
            f"({_C_IMPORT_ERROR}); rebuild it with `pip install -e .` "
            "(or use qvit.ops.reference.fake_quant)"
        )


# ---------------------------------------------------------------------------
# torch.library ops
# ---------------------------------------------------------------------------

_lib = torch.library.Library("qvit", "DEF")
_lib.define(
    "fq_forward(Tensor x, Tensor scale, Tensor bits, Tensor? offset, int dim, "
    "bool signed, int bits_min, int bits_max) -> Tensor"
)
# A missing offset gets an empty grad_offset: the schema keeps four tensor
# outputs, which opcheck and the fake kernels handle without Optional returns.
_lib.define(
    "fq_backward(Tensor grad_y, Tensor x, Tensor scale, Tensor bits, Tensor? offset, "
    "int dim, bool signed, int bits_min, int bits_max, float lsq_grad_scale) "
    "-> (Tensor, Tensor, Tensor, Tensor)"
)


def _stream_arg(x: Tensor):
    # With the exchange API, None makes _C ask torch for the current stream;
    # a capsule carries no stream, so pass the raw cudaStream_t.
    if x.is_cuda and _EXCHANGE_API is None:
        return torch.cuda.current_stream(x.device).cuda_stream
    return None


def _contig(t):
    # is_contiguous() is a cheap attribute read; contiguous() is a dispatcher call
    return t if t is None or t.is_contiguous() else t.contiguous()


def _kernel_view(x: Tensor, dim: int, groups: int) -> Tuple[Tensor, int]:
    """x made contiguous, with the dim the kernel gets (0-d x becomes [1])."""
    x = _contig(x)
    if x.dim() == 0:
        return x.reshape(1), 0
    return x, (dim % x.dim() if groups > 1 else 0)


def _fq_forward_impl(x, scale, bits, offset, dim, signed, bits_min, bits_max):
    _require_c()
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    if x.numel() == 0:
        return y
    xk, kdim = _kernel_view(x, dim, bits.numel())
    _C.fq_forward(
        _to_c(xk), _to_c(_contig(scale)), _to_c(_contig(bits)), _to_c_opt(_contig(offset)),
        _to_c(y.view(1) if x.dim() == 0 else y),
        dim=kdim, signed=signed, bits_min=bits_min, bits_max=bits_max,
        num_threads=torch.get_num_threads(), stream=_stream_arg(x),
    )
    return y


def _fq_backward_impl(grad_y, x, scale, bits, offset, dim, signed, bits_min, bits_max,
                      lsq_grad_scale):
    gx, gs, gb, go = _backward_kernel(grad_y, x, scale, bits, offset, dim, signed, bits_min,
                                      bits_max, lsq_grad_scale)
    return gx, gs, gb, (scale.new_empty((0,)) if go is None else go)


def _backward_kernel(grad_y, x, scale, bits, offset, dim, signed, bits_min, bits_max,
                     lsq_grad_scale):
    """The backward impl, with ``None`` for grad_offset without offset (the op's
    schema wants an empty tensor there; the autograd Function does not)."""
    _require_c()
    grad_x = torch.empty_like(x, memory_format=torch.contiguous_format)
    if x.numel() == 0:
        # Documented choice: an empty x has zero gradients everywhere.
        grad_x.zero_()
        gs = torch.zeros_like(scale, memory_format=torch.contiguous_format)
        gb = torch.zeros_like(bits, memory_format=torch.contiguous_format)
        go = (torch.zeros_like(offset, memory_format=torch.contiguous_format)
              if offset is not None else None)
        return grad_x, gs, gb, go
    gs = torch.empty_like(scale, memory_format=torch.contiguous_format)
    gb = torch.empty_like(bits, memory_format=torch.contiguous_format)
    go = (torch.empty_like(offset, memory_format=torch.contiguous_format)
          if offset is not None else None)
    xk, kdim = _kernel_view(x, dim, bits.numel())
    gyk = _contig(grad_y)
    gxk = grad_x
    if x.dim() == 0:
        gyk, gxk = gyk.reshape(1), grad_x.view(1)
    workspace = None
    if x.is_cuda:
        outer, g, inner = contract.group_shape(xk.shape, kdim, bits.numel())
        nbytes = _C.fq_workspace_bytes(outer, g, inner, x.device.index or 0)
        if nbytes > 0:
            workspace = _to_c(torch.empty(nbytes, dtype=torch.uint8, device=x.device))
    _C.fq_backward(
        _to_c(gyk), _to_c(xk), _to_c(_contig(scale)), _to_c(_contig(bits)),
        _to_c_opt(_contig(offset)),
        _to_c(gxk), _to_c(gs), _to_c(gb), _to_c_opt(go),
        dim=kdim, signed=signed, bits_min=bits_min, bits_max=bits_max,
        lsq_grad_scale=lsq_grad_scale, num_threads=torch.get_num_threads(),
        stream=_stream_arg(x), workspace=workspace,
    )
    return grad_x, gs, gb, go


for _key in ("CPU", "CUDA"):
    _lib.impl("fq_forward", _fq_forward_impl, _key)
    _lib.impl("fq_backward", _fq_backward_impl, _key)


@torch.library.register_fake("qvit::fq_forward", lib=_lib)
def _fq_forward_fake(x, scale, bits, offset, dim, signed, bits_min, bits_max):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("qvit::fq_backward", lib=_lib)
def _fq_backward_fake(grad_y, x, scale, bits, offset, dim, signed, bits_min, bits_max,
                      lsq_grad_scale):
    go = (torch.empty_like(offset, memory_format=torch.contiguous_format)
          if offset is not None else scale.new_empty((0,)))
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        torch.empty_like(scale, memory_format=torch.contiguous_format),
        torch.empty_like(bits, memory_format=torch.contiguous_format),
        go,
    )


_fq_forward_op = torch.ops.qvit.fq_forward.default
_fq_backward_op = torch.ops.qvit.fq_backward.default


# ---------------------------------------------------------------------------
# autograd
# ---------------------------------------------------------------------------

# Eager fast path: call the kernels' Python impls directly instead of going
# through the dispatcher (about 15-20 us less per direction on a small tensor).
# Taken only for plain tensors with no torch-function / dispatch mode active and
# outside torch.compile, i.e. exactly when the dispatcher would pick the same
# CPU / CUDA impl; everything else (FakeTensor, FunctionalTensor, tracing,
# subclasses) goes through torch.ops.qvit.*. Set to False to always dispatch.
EAGER_FAST_PATH = True
_PLAIN = (Tensor, torch.nn.Parameter)


def _direct(x, scale, bits, offset, grad_y=None) -> bool:
    # written out (no loop): this runs twice per call. is_compiling() first:
    # dynamo folds it and must not trace the mode queries.
    return (EAGER_FAST_PATH and not torch.compiler.is_compiling()
            and type(x) in _PLAIN and type(scale) in _PLAIN
            and type(bits) in _PLAIN and (offset is None or type(offset) in _PLAIN)
            and (grad_y is None or type(grad_y) in _PLAIN)
            and not torch._C._is_torch_function_mode_enabled()
            and not torch._C._len_torch_dispatch_stack())


def fq_forward(x, scale, bits, offset, dim, signed, bits_min, bits_max):
    """The forward kernel on validated arguments: the Python impl directly in
    plain eager mode, the ``qvit::fq_forward`` op otherwise (no autograd)."""
    if _direct(x, scale, bits, offset):
        return _fq_forward_impl(x, scale, bits, offset, dim, signed, bits_min, bits_max)
    return _fq_forward_op(x, scale, bits, offset, dim, signed, bits_min, bits_max)


def fq_backward(grad_y, x, scale, bits, offset, dim, signed, bits_min, bits_max, lsq):
    """The backward kernel on validated arguments (see :func:`fq_forward`):
    ``(grad_x, grad_scale, grad_bits, grad_offset)``, the last empty without offset."""
    if _direct(x, scale, bits, offset, grad_y):
        return _fq_backward_impl(grad_y, x, scale, bits, offset, dim, signed,
                                 bits_min, bits_max, lsq)
    return _fq_backward_op(grad_y, x, scale, bits, offset, dim, signed, bits_min, bits_max, lsq)


class _FakeQuantFunction(torch.autograd.Function):
    """Saves x and the parameters (no masks); the backward recomputes from x.

    ``cfg`` is ``(dim, signed, bits_min, bits_max, lsq_grad_scale)``, validated,
    one argument (each argument of ``apply`` costs per call)."""

    @staticmethod
    def forward(ctx, x, scale, bits, offset, cfg):
        ctx.save_for_backward(x, scale, bits, offset)
        ctx.cfg = cfg
        return fq_forward(x, scale, bits, offset, *cfg[:4])

    @staticmethod
    def backward(ctx, grad_y):
        x, scale, bits, offset = ctx.saved_tensors
        if _direct(x, scale, bits, offset, grad_y):   # no empty grad_offset allocated
            gx, gs, gb, go = _backward_kernel(grad_y, x, scale, bits, offset, *ctx.cfg)
        else:
            gx, gs, gb, go = _fq_backward_op(grad_y, x, scale, bits, offset, *ctx.cfg)
        need = ctx.needs_input_grad
        return (
            gx if need[0] else None,
            gs if need[1] else None,
            gb if need[2] else None,
            go if need[3] else None,   # False for a None offset
            None,
        )


# ---------------------------------------------------------------------------
# public entry point
# ---------------------------------------------------------------------------

def fake_quant(
    x: Tensor,
    scale: Tensor,
    bits: Tensor,
    offset: Optional[Tensor] = None,
    *,
    signed: bool = True,
    dim: int = 0,
    bits_range: Tuple[int, int] = (2, 8),
    grad_scale: Optional[float] = None,
) -> Tensor:
    r"""Learnable fake quantization with learned scales and bit-widths (fused kernels).

    ``x`` is viewed as ``[outer, G, inner]``: ``G = bits.numel()`` splits
    dimension ``dim`` into ``G`` equal contiguous chunks (per-tensor: ``G = 1``;
    per-channel of ``[T, C]``: ``dim=-1, G=C``; per-head of ``[B, H, N, d]``:
    ``dim=1, G=H``; per-head rows of ``W_q [H*d, C]``: ``dim=0, G=H``; per-head
    columns of ``W_proj [C, H*d]``: ``dim=1, G=H``). For group ``g``::

        b^ = round_half_even(clamp(bits[g], bits_min, bits_max))
        s  = scale[row, b^ - bits_min],  beta = offset[row, b^ - bits_min] (or 0),
             row = 0 if scale has one row else g
        signed: Qn = -2^(b^-1), Qp = 2^(b^-1) - 1;   unsigned: Qn = 0, Qp = 2^b^ - 1
        v = (x - beta) / s
        y = round_half_even(clamp(v, Qn, Qp)) * s + beta

    Gradients, with ``u = dL/dy``, ``I = [Qn <= v <= Qp]`` (tested on ``v``
    before rounding), ``H = [v > Qp]``, ``L = [v < Qn]``, sums over the group::

        dL/dx      = u * I
        dL/ds      = g_s * sum(u * (I * (round(v) - v) + H * Qp + L * Qn)),
                     g_s = 1 / sqrt(N_g * Qp) (LSQ) or grad_scale
        dL/dbits   = s * ln2 * 2^(b^-1) * sum(u * (H - L))    (signed)
                   = s * ln2 * 2^b^ * sum(u * H)               (unsigned)
        dL/dbeta   = sum(u * (1 - I))

    Only the active table entries receive gradient (zeros elsewhere). The
    bit-width passes the rounding straight through (``db^/dbits = 1``).
    Arithmetic is fp32 for fp32/fp16/bf16 ``x`` (fp64 for fp64 ``x`` on the
    CPU); parameter gradients are deterministic fixed-order sums. An empty
    ``x`` gives an empty ``y`` and all-zero gradients.

    Non-finite input: a NaN in ``x`` gives NaN in ``y`` and ``grad_x`` at that
    element and in its own group's active scale gradient, nothing else (NaN
    counts as inside the range); +-Inf clips to ``Qp*s+beta`` / ``Qn*s+beta``
    with zero ``grad_x``.

    Args:
        x: input of any shape, float32 / float16 / bfloat16 (float64 on CPU).
        scale: ``[1 or G, K]`` switchable-scale table, ``K = bits_max - bits_min + 1``;
            float32 (float64 for a float64 ``x``), positive and finite.
        bits: ``[G]`` continuous bit-widths, same dtype as ``scale``.
        offset: optional ``[1 or G, K]`` offset table (LSQ+), same dtype as ``scale``.
        signed: signed codes ``[-2^(b-1), 2^(b-1)-1]`` or unsigned ``[0, 2^b-1]``.
        dim: the dimension of ``x`` split into ``G`` groups (ignored when ``G == 1``).
        bits_range: ``(bits_min, bits_max)``, ``1 <= min <= max <= 24``
            (:data:`qvit.ops.contract.BITS_LIMIT`); signed needs min >= 2.
        grad_scale: constant factor on the scale gradient; ``None`` = the LSQ default.

    Returns:
        The fake-quantized tensor: ``x``'s shape, dtype and device (contiguous).

    Raises:
        TypeError: a non-tensor argument, or a wrong dtype.
        ValueError: shapes that do not fit, a device mix, a bad ``bits_range`` or
            ``grad_scale``; on the CPU also a scale that is not finite and > 0,
            a non-finite bit-width or offset (checked by the kernel). The CUDA
            kernels never read parameters on the host: there such a group's
            outputs and gradients become NaN, and other groups are unaffected.
        RuntimeError: ``qvit._C`` failed to import (the message carries why).

    Example::

        >>> x = torch.randn(8, 197, 192)
        >>> scale = torch.full((1, 7), 0.1)      # bits 2..8
        >>> bits = torch.tensor([4.0], requires_grad=True)
        >>> y = fake_quant(x, scale, bits)
        >>> y.sum().backward()
    """
    cfg = _checked(x, scale, bits, offset, signed, dim, bits_range, grad_scale)
    if cfg is None:   # neither CPU nor CUDA
        return reference.fake_quant(x, scale, bits, offset, signed=signed, dim=dim,
                                    bits_range=bits_range, grad_scale=grad_scale)
    _require_c()
    return _FakeQuantFunction.apply(x, scale, bits, offset, cfg)
