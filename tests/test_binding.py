"""Direct tests of the CPython binding ``qvit._C`` (no torch.library layer).

Covers: NumPy arrays in and out (outputs allocated when given as None), torch
tensors through the registered DLPack exchange API and through raw capsules,
DLPack details (versioned / legacy capsules, read-only arrays, byte_offset,
lanes, devices, strides), every argument check with the message naming the
argument, value checks mapped to exceptions, determinism across thread counts
and ISA paths, docstring signatures, and a leak loop.

Numerics are held to the closed-form reference ``qvit.reference``: forward
bitwise (fp32, tie-free inputs), grad_x bitwise, parameter gradients within
1e-5 of the sum of |terms| (fp32 chunk partials vs float64 sums).
"""
from __future__ import annotations

import ctypes
import gc
import inspect
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import assert_bitwise
from qvit.ops import reference, torch_ops as ops

_C = pytest.importorskip("qvit._C")

BR = (2, 8)
K = BR[1] - BR[0] + 1
KW = dict(bits_min=BR[0], bits_max=BR[1])


def _params(G, rows, dtype=np.float32, seed=0, offset=False):
    rng = np.random.default_rng(seed)
    bits = rng.uniform(1.5, 8.5, size=G).astype(dtype)
    scale = rng.uniform(0.05, 0.5, size=(rows, K)).astype(dtype)
    off = (rng.normal(size=(rows, K)) * 0.2).astype(dtype) if offset else None
    return scale, bits, off


def _x(shape, dtype=np.float32, seed=1):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=shape) * 2).astype(dtype)


def _t(a):
    if a is None:
        return None
    return torch.from_numpy(np.array(a, copy=True))  # writable, contiguous


def _ref_fwd(x, scale, bits, off, signed, dim):
    return reference.fake_quant_forward(_t(x), _t(scale), _t(bits), _t(off), signed=signed,
                                        dim=dim, bits_range=BR).numpy()


def _ref_bwd(gy, x, scale, bits, off, signed, dim, grad_scale=None):
    out = reference.fake_quant_backward(_t(gy), _t(x), _t(scale), _t(bits), _t(off),
                                        signed=signed, dim=dim, bits_range=BR,
                                        grad_scale=grad_scale)
    return [None if o is None else o.numpy() for o in out]


def _close_sum(got, want, scale_of_terms, what):
    err = np.abs(got.astype(np.float64) - want.astype(np.float64))
    tol = 1e-5 * scale_of_terms + 1e-30
    assert np.all(err <= tol), f"{what}: max err {err.max()} > tol {tol}"


# ---------------------------------------------------------------------------
# NumPy round trips
# ---------------------------------------------------------------------------

LAYOUTS = [
    ((64, 197 * 2), 0, 1),        # per-tensor ("segments")
    ((8, 3, 50, 16), 1, 3),       # per-head, inner = 800 ("segments")
    ((300, 48), 1, 48),           # per-channel, inner = 1 ("rows")
    ((120, 4 * 16), 1, 4),        # proj columns, inner = 16 ("rows")
    ((5, 7, 11), 2, 11),          # odd sizes
]


@pytest.mark.parametrize("shape,dim,G", LAYOUTS)
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("with_offset", [False, True])
@pytest.mark.parametrize("shared", [False, True])
def test_numpy_forward_backward_match_reference(shape, dim, G, signed, with_offset, shared):
    rows = 1 if shared else G
    scale, bits, off = _params(G, rows, offset=with_offset)
    x = _x(shape)
    gy = _x(shape, seed=7)
    y = _C.fq_forward(x, scale, bits, off, None, dim=dim, signed=signed, **KW)
    assert isinstance(y, np.ndarray) and y.dtype == np.float32 and y.shape == x.shape
    np.testing.assert_array_equal(y, _ref_fwd(x, scale, bits, off, signed, dim))

    gx, gs, gb, go = _C.fq_backward(gy, x, scale, bits, off, None, None, None, None, dim=dim,
                                    signed=signed, **KW)
    want = _ref_bwd(gy, x, scale, bits, off, signed, dim)
    np.testing.assert_array_equal(gx, want[0])
    # sum of |terms| bounds the fp32 rounding of the chunked sums
    terms = float(np.abs(gy).astype(np.float64).sum()) * (2 ** 8)
    _close_sum(gs, want[1], terms * 0.5, "grad_scale")
    _close_sum(gb, want[2], terms * float(scale.max()) * 0.7 * 256, "grad_bits")
    if with_offset:
        assert go.shape == off.shape
        _close_sum(go, want[3], terms, "grad_offset")
    else:
        assert go is None


def test_numpy_float64_matches_reference_tightly():
    scale, bits, off = _params(3, 3, dtype=np.float64, offset=True)
    x = _x((4, 3, 33), dtype=np.float64)
    gy = _x((4, 3, 33), dtype=np.float64, seed=3)
    y = _C.fq_forward(x, scale, bits, off, None, dim=1, signed=False, **KW)
    np.testing.assert_array_equal(y, _ref_fwd(x, scale, bits, off, False, 1))
    got = _C.fq_backward(gy, x, scale, bits, off, None, None, None, None, dim=1, signed=False,
                         lsq_grad_scale=0.5, **KW)
    want = _ref_bwd(gy, x, scale, bits, off, False, 1, grad_scale=0.5)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12)


def test_numpy_outputs_given_are_written_and_returned():
    scale, bits, _ = _params(1, 1)
    x = _x((1000,))
    y = np.full_like(x, np.nan)
    out = _C.fq_forward(x, scale, bits, None, y, dim=0, signed=True, **KW)
    assert out is y
    np.testing.assert_array_equal(y, _ref_fwd(x, scale, bits, None, True, 0))
    gs = np.full_like(scale, np.nan)
    gb = np.full_like(bits, np.nan)
    gx = np.empty_like(x)
    res = _C.fq_backward(x, x, scale, bits, None, gx, gs, gb, None, dim=0, signed=True, **KW)
    assert res[0] is gx and res[1] is gs and res[2] is gb and res[3] is None
    # inactive table entries are written as zeros
    assert np.count_nonzero(np.isnan(gs)) == 0
    assert np.count_nonzero(gs) <= 1


def test_numpy_float16_matches_reference():
    scale, bits, _ = _params(2, 2)
    x = _x((40, 2, 30), dtype=np.float16)
    y = _C.fq_forward(x, scale, bits, None, None, dim=1, signed=True, **KW)
    assert y.dtype == np.float16
    np.testing.assert_array_equal(y, _ref_fwd(x, scale, bits, None, True, 1))


def test_empty_x():
    scale, bits, _ = _params(1, 1)
    x = np.zeros((0, 5), np.float32)
    y = _C.fq_forward(x, scale, bits, None, None, dim=0, signed=True, **KW)
    assert y.shape == (0, 5)
    gx, gs, gb, _ = _C.fq_backward(x, x, scale, bits, None, None, None, None, None, dim=0,
                                   signed=True, **KW)
    assert gx.shape == (0, 5)
    assert not gs.any() and not gb.any()


# ---------------------------------------------------------------------------
# torch tensors: exchange API, capsules, dtypes
# ---------------------------------------------------------------------------

def _torch_case(dtype=torch.float32, G=3, shape=(6, 3, 40), dim=1):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 2).to(dtype)
    scale = torch.rand(G, K, generator=g) * 0.4 + 0.05
    bits = torch.rand(G, generator=g) * 7 + 1.5
    return x, scale, bits, dim


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_torch_exchange_api_path_matches_reference(dtype):
    if hasattr(torch.Tensor, "__dlpack_c_exchange_api__"):
        assert ops.backend_info()["exchange_api"] == "__dlpack_c_exchange_api__"
    x, scale, bits, dim = _torch_case(dtype)
    x.requires_grad_(True)  # the exchange API does not refuse requires_grad tensors
    y = torch.empty_like(x)
    _C.fq_forward(x, scale, bits, None, y, dim=dim, signed=True, **KW)
    want = reference.fake_quant_forward(x.detach(), scale, bits, None, signed=True, dim=dim,
                                        bits_range=BR)
    assert torch.equal(y, want)


def test_torch_legacy_capsules_path():
    from torch.utils.dlpack import to_dlpack
    x, scale, bits, dim = _torch_case()
    y = torch.empty_like(x)
    _C.fq_forward(to_dlpack(x), to_dlpack(scale), to_dlpack(bits), None, to_dlpack(y), dim=dim,
                  signed=False, **KW)
    want = reference.fake_quant_forward(x, scale, bits, None, signed=False, dim=dim,
                                        bits_range=BR)
    assert torch.equal(y, want)


def test_consumed_capsule_is_rejected():
    from torch.utils.dlpack import to_dlpack
    x, scale, bits, dim = _torch_case()
    cap = to_dlpack(x)
    y = torch.empty_like(x)
    _C.fq_forward(cap, scale, bits, None, y, dim=dim, signed=True, **KW)
    with pytest.raises(TypeError, match="x is not a usable DLPack capsule"):
        _C.fq_forward(cap, scale, bits, None, y, dim=dim, signed=True, **KW)


def test_torch_backward_matches_reference_and_is_deterministic():
    x, scale, bits, dim = _torch_case(shape=(50, 3, 700))
    gy = torch.randn_like(x)
    outs = []
    for nt in (1, 2, 3):
        gx, gs, gb = torch.empty_like(x), torch.empty_like(scale), torch.empty_like(bits)
        _C.fq_backward(gy, x, scale, bits, None, gx, gs, gb, None, dim=dim, signed=True,
                       num_threads=nt, **KW)
        outs.append((gx, gs, gb))
    for o in outs[1:]:
        for a, b in zip(outs[0], o):
            assert torch.equal(a, b), "backward differs across num_threads"
    want = reference.fake_quant_backward(gy, x, scale, bits, None, signed=True, dim=dim,
                                         bits_range=BR)
    assert torch.equal(outs[0][0], want[0])
    torch.testing.assert_close(outs[0][1], want[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs[0][2], want[2], rtol=1e-5, atol=1e-5)


def test_rows_layout_deterministic_across_threads():
    x, scale, bits, _ = _torch_case(G=96, shape=(2000, 96))
    gy = torch.randn_like(x)
    ref_out = None
    for nt in (1, 2, 4):
        gx, gs, gb = torch.empty_like(x), torch.empty_like(scale), torch.empty_like(bits)
        _C.fq_backward(gy, x, scale, bits, None, gx, gs, gb, None, dim=1, signed=True,
                       num_threads=nt, **KW)
        if ref_out is None:
            ref_out = (gx, gs, gb)
        else:
            assert all(torch.equal(a, b) for a, b in zip(ref_out, (gx, gs, gb)))


ISA_LEVELS = ("v4", "v3", "v2", "base")


def _isa_outputs():
    """Every layout / dtype / signedness / offset case through the CPU kernels, at the
    level the dispatcher picks now (it reads QVIT_ISA at each call, as _C.cpu_isa() does)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for shape, dim, G in (((64, 2048), 0, 1), ((512, 96), 1, 96), ((64, 3, 400), 1, 3),
                          ((7, 3, 33), 1, 3)):
        for dt in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            for signed, with_offset in ((True, False), (False, True), (True, True)):
                pdt = torch.float64 if dt == torch.float64 else torch.float32
                x = (torch.randn(shape, generator=g) * 2).to(dt)
                gy = torch.randn(shape, generator=g).to(dt)
                bits = (torch.rand(G, generator=g) * 6 + 2).to(pdt)
                scale = (torch.rand(G, 7, generator=g) * 0.45 + 0.05).to(pdt)
                off = (torch.rand(G, 7, generator=g) - 0.5).to(pdt) if with_offset else None
                kw = dict(dim=dim, signed=signed, bits_min=2, bits_max=8)
                y = _C.fq_forward(x, scale, bits, off, torch.empty_like(x), **kw)
                grads = _C.fq_backward(gy, x, scale, bits, off, torch.empty_like(x),
                                       torch.empty_like(scale), torch.empty_like(bits),
                                       None if off is None else torch.empty_like(off), **kw)
                out += [y] + [t for t in grads if t is not None]
    return out


def _isa_at(monkeypatch, cap):
    if cap is None:
        monkeypatch.delenv("QVIT_ISA", raising=False)
    else:
        monkeypatch.setenv("QVIT_ISA", cap)
    return _C.cpu_isa()


@pytest.fixture(scope="module")
def isa_base():
    """(the highest level this CPU and build run, the baseline loops' outputs)."""
    with pytest.MonkeyPatch.context() as mp:
        best = _isa_at(mp, None)
        assert _isa_at(mp, "base") == "base"
        return best, _isa_outputs()


@pytest.mark.slow
@pytest.mark.parametrize("isa", ISA_LEVELS[:-1])
def test_isa_paths_agree_bitwise(isa, isa_base, monkeypatch):
    """Each ISA instance (AVX-512, AVX2, SSE4.2) gives the bits of the baseline loops, for
    fp32 / fp16 / bf16 / fp64, signed, unsigned with offset and signed with offset; the
    dispatcher reports running the level asked for (so no level is compared with itself)."""
    best, base = isa_base
    if ISA_LEVELS.index(isa) < ISA_LEVELS.index(best):
        pytest.skip(f"this CPU (or build) runs at most {best}: no {isa} path to test")
    assert _isa_at(monkeypatch, isa) == isa, f"QVIT_ISA={isa} runs {_C.cpu_isa()}"
    res = _isa_outputs()
    assert len(res) == len(base)
    for i, (a, b) in enumerate(zip(res, base)):
        assert_bitwise(a, b, f"{isa} output {i} vs base")


def test_cpu_isa_honours_the_cap(monkeypatch):
    """cpu_isa() names the level the dispatcher picks: the CPU's, capped by QVIT_ISA."""
    order = ("base", "v2", "v3", "v4")
    monkeypatch.delenv("QVIT_ISA", raising=False)
    native = _C.cpu_isa()
    assert native in order
    for cap in order:
        monkeypatch.setenv("QVIT_ISA", cap)
        want = order[min(order.index(cap), order.index(native))]
        assert _C.cpu_isa() == want, cap
    monkeypatch.setenv("QVIT_ISA", "bogus")  # an unknown cap means the baseline
    assert _C.cpu_isa() == "base"


# ---------------------------------------------------------------------------
# DLPack corner cases through hand-made capsules
# ---------------------------------------------------------------------------

class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int32),
                ("dtype", _DLDataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]


class _DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p),
                ("deleter", ctypes.c_void_p)]


_PyCapsule_New = ctypes.pythonapi.PyCapsule_New
_PyCapsule_New.restype = ctypes.py_object
_PyCapsule_New.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
_KEEP = []  # keep hand-made structs alive (no deleter: the test owns the memory)


def _capsule(buf, shape, *, byte_offset=0, device_type=1, lanes=1, code=2, bits=32,
             strides=None):
    n = len(shape)
    shp = (ctypes.c_int64 * n)(*shape)
    st = (ctypes.c_int64 * n)(*strides) if strides is not None else None
    mt = _DLManagedTensor()
    mt.dl_tensor.data = buf.ctypes.data
    mt.dl_tensor.device = _DLDevice(device_type, 0)
    mt.dl_tensor.ndim = n
    mt.dl_tensor.dtype = _DLDataType(code, bits, lanes)
    mt.dl_tensor.shape = shp
    mt.dl_tensor.strides = st
    mt.dl_tensor.byte_offset = byte_offset
    mt.manager_ctx = None
    mt.deleter = None
    _KEEP.append((mt, shp, st, buf))
    return _PyCapsule_New(ctypes.addressof(mt), b"dltensor", None)


def test_raw_capsule_byte_offset_and_null_strides():
    scale, bits, _ = _params(1, 1)
    base = _x((110,))
    y = np.zeros(100, np.float32)
    cap = _capsule(base, (100,), byte_offset=10 * 4)   # x = base[10:]
    _C.fq_forward(cap, scale, bits, None, y, dim=0, signed=True, **KW)
    np.testing.assert_array_equal(y, _ref_fwd(base[10:], scale, bits, None, True, 0))


def test_raw_capsule_rejections():
    scale, bits, _ = _params(1, 1)
    buf = _x((64,))
    y = np.zeros(32, np.float32)
    with pytest.raises(TypeError, match="x has unsupported dtype float32 x 2 lanes"):
        _C.fq_forward(_capsule(buf, (32,), lanes=2), scale, bits, None, y, dim=0, signed=True,
                      **KW)
    with pytest.raises(TypeError, match="x has unsupported dtype int32"):
        _C.fq_forward(_capsule(buf, (32,), code=0), scale, bits, None, y, dim=0, signed=True,
                      **KW)
    with pytest.raises(ValueError, match="x must be contiguous"):
        _C.fq_forward(_capsule(buf, (4, 8), strides=(1, 4)), scale, bits, None,
                      np.zeros((4, 8), np.float32), dim=0, signed=True, **KW)
    with pytest.raises(ValueError, match="x is on an unsupported device"):
        _C.fq_forward(_capsule(buf, (32,), device_type=8), scale, bits, None, y, dim=0,
                      signed=True, **KW)


@pytest.mark.skipif(_C.cuda_built(), reason="checks the message of a CPU-only build")
def test_cuda_tensor_without_cuda_build():
    scale, bits, _ = _params(1, 1)
    buf = _x((32,))
    cap = _capsule(buf, (32,), device_type=2)
    with pytest.raises(ValueError, match="device"):
        _C.fq_forward(cap, scale, bits, None, np.zeros(32, np.float32), dim=0, signed=True,
                      **KW)


def test_read_only_output_rejected():
    scale, bits, _ = _params(1, 1)
    x = _x((16,))
    y = np.zeros(16, np.float32)
    y.flags.writeable = False
    with pytest.raises(ValueError, match="y is read-only"):
        _C.fq_forward(x, scale, bits, None, y, dim=0, signed=True, **KW)


def test_read_only_input_accepted():
    scale, bits, _ = _params(1, 1)
    x = _x((16,))
    x.flags.writeable = False
    y = _C.fq_forward(x, scale, bits, None, None, dim=0, signed=True, **KW)
    np.testing.assert_array_equal(y, _ref_fwd(x, scale, bits, None, True, 0))


# ---------------------------------------------------------------------------
# Argument validation: each error names the argument
# ---------------------------------------------------------------------------

def _fwd(**over):
    scale, bits, _ = _params(3, 3)
    args = dict(x=_x((4, 3, 5)), scale=scale, bits=bits, offset=None, y=None)
    kw = dict(dim=1, signed=True, **KW)
    for k, v in over.items():
        (args if k in args else kw)[k] = v
    return _C.fq_forward(args["x"], args["scale"], args["bits"], args["offset"], args["y"], **kw)


@pytest.mark.parametrize("over,exc,msg", [
    (dict(x=[1.0, 2.0]), TypeError, "x must be a tensor supporting DLPack"),
    (dict(x=np.zeros((4, 3, 5), np.int32)), TypeError, "x has unsupported dtype int32"),
    (dict(scale=np.ones((3, K), np.float64)), TypeError, "scale must be float32"),
    (dict(bits=np.ones(3, np.float16)), TypeError, "bits must be float32"),
    (dict(scale=np.ones((3, K + 1), np.float32)), ValueError, "scale must be"),
    (dict(scale=np.ones((2, K), np.float32)), ValueError, "scale must be"),
    (dict(bits=np.ones((3, 1), np.float32)), ValueError, "bits must be 1-D"),
    (dict(bits=np.ones(4, np.float32), scale=np.ones((4, K), np.float32)), ValueError,
     "not divisible"),
    (dict(dim=3), ValueError, "dim=3 is out of range"),
    (dict(offset=np.ones((3, K - 1), np.float32)), ValueError, "offset has shape"),
    (dict(y=np.zeros((4, 3, 6), np.float32)), ValueError, "y has shape"),
    (dict(y=np.zeros((4, 3, 5), np.float64)), TypeError, "y must be float32"),
    (dict(bits_min=0), ValueError, "bits_min"),
    (dict(bits_max=25), ValueError, "bits_max <= 24"),
    (dict(bits_min=1, bits_max=7), ValueError, "signed quantizer needs bits_min >= 2"),
    (dict(x=np.ones((4, 3, 8), np.float32)[:, :, ::2]), ValueError, "x must be contiguous"),
    (dict(scale=np.ones((K, 3), np.float32).T), ValueError, "scale must be contiguous"),
])
def test_forward_argument_errors(over, exc, msg):
    with pytest.raises(exc, match=msg):
        _fwd(**over)


@pytest.mark.parametrize("what,value,msg", [
    ("scale", 0.0, "scale has an entry"), ("scale", -1.0, "scale has an entry"),
    ("scale", np.inf, "scale has an entry"), ("scale", np.nan, "scale has an entry"),
    ("bits", np.nan, "bits has an entry"), ("bits", np.inf, "bits has an entry"),
    ("offset", np.inf, "offset has an entry"),
])
def test_parameter_values_raise_value_error(what, value, msg):
    scale, bits, off = _params(3, 3, offset=True)
    arr = {"scale": scale, "bits": bits, "offset": off}[what]
    arr.flat[-1] = value
    with pytest.raises(ValueError, match=msg):
        _C.fq_forward(_x((4, 3, 5)), scale, bits, off, None, dim=1, signed=True, **KW)
    with pytest.raises(ValueError, match=msg):
        _C.fq_backward(_x((4, 3, 5)), _x((4, 3, 5)), scale, bits, off, None, None, None, None,
                       dim=1, signed=True, **KW)


def test_missing_keywords_and_output_rules():
    scale, bits, _ = _params(1, 1)
    x = _x((8,))
    with pytest.raises(TypeError, match="missing required keyword argument 'dim'"):
        _C.fq_forward(x, scale, bits, None, None, signed=True, **KW)
    with pytest.raises(TypeError, match="'signed'"):
        _C.fq_forward(x, scale, bits, None, None, dim=0, **KW)
    with pytest.raises(TypeError, match="y=None is only allowed when x is a NumPy array"):
        _C.fq_forward(torch.from_numpy(x), scale, bits, None, None, dim=0, signed=True, **KW)
    with pytest.raises(ValueError, match="grad_offset must be None when offset is None"):
        _C.fq_backward(x, x, scale, bits, None, None, None, None, np.zeros_like(scale), dim=0,
                       signed=True, **KW)
    with pytest.raises(ValueError, match="lsq_grad_scale must not be NaN"):
        _C.fq_backward(x, x, scale, bits, None, None, None, None, None, dim=0, signed=True,
                       lsq_grad_scale=float("nan"), **KW)


def test_argument_parsing_rules():
    scale, bits, _ = _params(1, 1)
    x = _x((8,))
    # positional parameters may also be given by keyword; ints may be NumPy ints
    y = _C.fq_forward(x=x, scale=scale, bits=bits, offset=None, y=None, dim=np.int64(0),
                      signed=True, bits_min=2, bits_max=np.int32(8))
    np.testing.assert_array_equal(y, _ref_fwd(x, scale, bits, None, True, 0))
    with pytest.raises(TypeError, match="unexpected keyword argument 'dims'"):
        _C.fq_forward(x, scale, bits, None, None, dims=0, signed=True, **KW)
    with pytest.raises(TypeError, match="multiple values for argument 'x'"):
        _C.fq_forward(x, scale, bits, None, None, x=x, dim=0, signed=True, **KW)
    with pytest.raises(TypeError, match="at most 5 positional arguments"):
        _C.fq_forward(x, scale, bits, None, None, 0, dim=0, signed=True, **KW)
    with pytest.raises(TypeError, match="missing required argument 'y'"):
        _C.fq_forward(x, scale, bits, None, dim=0, signed=True, **KW)
    with pytest.raises(TypeError, match="dim must be an int"):
        _C.fq_forward(x, scale, bits, None, None, dim=0.5, signed=True, **KW)
    with pytest.raises(TypeError, match="lsq_grad_scale must be a float"):
        _C.fq_backward(x, x, scale, bits, None, None, None, None, None, dim=0, signed=True,
                       lsq_grad_scale="1", **KW)
    with pytest.raises(ValueError, match="num_threads=.* is out of range"):
        _C.fq_forward(x, scale, bits, None, None, dim=0, signed=True, num_threads=2 ** 40, **KW)


def test_backward_argument_errors():
    scale, bits, _ = _params(1, 1)
    x = _x((8,))
    with pytest.raises(ValueError, match="grad_y has shape"):
        _C.fq_backward(_x((9,)), x, scale, bits, None, None, None, None, None, dim=0,
                       signed=True, **KW)
    with pytest.raises(ValueError, match="grad_scale has shape"):
        _C.fq_backward(x, x, scale, bits, None, None, np.zeros((2, K), np.float32), None, None,
                       dim=0, signed=True, **KW)
    with pytest.raises(TypeError, match="grad_bits must be float32"):
        _C.fq_backward(x, x, scale, bits, None, None, None, np.zeros(1, np.float64), None,
                       dim=0, signed=True, **KW)
    with pytest.raises(TypeError, match="grad_x must be float32"):
        _C.fq_backward(x, x, scale, bits, None, np.zeros(8, np.float16), None, None, None,
                       dim=0, signed=True, **KW)


def test_outputs_overlapping_inputs_rejected():
    scale, bits, _ = _params(1, 1)
    x = _x((64,))
    with pytest.raises(ValueError, match="y shares memory with x"):
        _C.fq_forward(x, scale, bits, None, x, dim=0, signed=True, **KW)
    gy = _x((64,), seed=5)
    with pytest.raises(ValueError, match="grad_x shares memory with grad_y"):
        _C.fq_backward(gy, x, scale, bits, None, gy, None, None, None, dim=0, signed=True, **KW)


def test_mixed_devices_and_numpy_torch_mix():
    # NumPy and torch CPU tensors are both CPU: mixing them is fine.
    scale, bits, _ = _params(1, 1)
    x = _x((32,))
    y = torch.empty(32)
    _C.fq_forward(x, torch.from_numpy(scale), bits, None, y, dim=0, signed=True, **KW)
    np.testing.assert_array_equal(y.numpy(), _ref_fwd(x, scale, bits, None, True, 0))


# ---------------------------------------------------------------------------
# Small functions, signatures, exchange API registration
# ---------------------------------------------------------------------------

def test_cuda_queries_consistent():
    assert isinstance(_C.cuda_built(), bool)
    n = _C.cuda_device_count()
    assert isinstance(n, int)
    if not _C.cuda_built():
        assert n <= 0
        assert _C.fq_workspace_bytes(4, 3, 100, 0) == 0
    with pytest.raises(ValueError, match="groups >= 1"):
        _C.fq_workspace_bytes(4, 0, 100, 0)
    assert issubclass(_C.KernelError, RuntimeError)


@pytest.mark.parametrize("name", ["fq_forward", "fq_backward", "fq_workspace_bytes",
                                  "set_exchange_api", "cuda_built", "cuda_device_count"])
def test_text_signatures(name):
    sig = inspect.signature(getattr(_C, name))
    if name == "fq_forward":
        assert list(sig.parameters)[:5] == ["x", "scale", "bits", "offset", "y"]
        assert sig.parameters["dim"].kind is inspect.Parameter.KEYWORD_ONLY
    if name == "fq_backward":
        assert "workspace" in sig.parameters and "lsq_grad_scale" in sig.parameters


def test_set_exchange_api_validation():
    with pytest.raises(TypeError, match="tensor_type must be a type"):
        _C.set_exchange_api(1234, "not a type")
    with pytest.raises(TypeError, match="api must be"):
        _C.set_exchange_api("nope", torch._C.TensorBase)
    bad = _PyCapsule_New(ctypes.addressof(_DLDataType()), b"wrong_name", None)
    with pytest.raises(ValueError):
        _C.set_exchange_api(bad, torch._C.TensorBase)


def test_without_exchange_api_torch_goes_through_dlpack():
    """Unregistered, a torch tensor is viewed through __dlpack__ (which refuses
    requires_grad); re-registering restores the fast path."""
    api = getattr(torch.Tensor, "__dlpack_c_exchange_api__", None)
    x, scale, bits, dim = _torch_case()
    y = torch.empty_like(x)
    try:
        _C.set_exchange_api(None, None)
        _C.fq_forward(x, scale, bits, None, y, dim=dim, signed=True, **KW)
        want = reference.fake_quant_forward(x, scale, bits, None, signed=True, dim=dim,
                                            bits_range=BR)
        assert torch.equal(y, want)
    finally:
        if api is not None:
            _C.set_exchange_api(api, torch._C.TensorBase)
    if api is not None:
        xg = x.clone().requires_grad_(True)
        _C.fq_forward(xg, scale, bits, None, y, dim=dim, signed=True, **KW)


# ---------------------------------------------------------------------------
# Leaks
# ---------------------------------------------------------------------------

def test_no_reference_or_object_leaks():
    scale, bits, off = _params(3, 3, offset=True)
    x = _x((6, 3, 10))
    tx, ts, tb = torch.from_numpy(x.copy()), torch.from_numpy(scale), torch.from_numpy(bits)
    ty = torch.empty_like(tx)
    refs = [sys.getrefcount(o) for o in (x, scale, bits, off, tx, ts, tb, ty)]

    def once():
        _C.fq_forward(x, scale, bits, off, None, dim=1, signed=False, **KW)
        _C.fq_backward(x, x, scale, bits, off, None, None, None, None, dim=1, signed=False,
                       **KW)
        _C.fq_forward(tx, ts, tb, None, ty, dim=1, signed=True, **KW)
        with pytest.raises(ValueError):  # the error path releases what it took, too
            _C.fq_forward(x, scale, bits, off, np.zeros(3, np.float32), dim=1, signed=True,
                          **KW)

    for _ in range(200):
        once()
    gc.collect()
    before = len(gc.get_objects())
    for _ in range(2000):
        once()
    gc.collect()
    after = len(gc.get_objects())
    assert after - before < 50, f"{after - before} objects leaked over 2000 calls"
    assert refs == [sys.getrefcount(o) for o in (x, scale, bits, off, tx, ts, tb, ty)]


# ---------------------------------------------------------------------------
# the bit-width limit: one value in every layer, and exact at the limit
# ---------------------------------------------------------------------------

def test_bits_limit_is_one_rule_in_every_layer():
    from qvit.nn.config import QuantizerConfig
    from qvit.ops import contract

    lim = contract.BITS_LIMIT
    assert lim == 24
    QuantizerConfig(bits=float(lim), bits_range=(2, lim))
    with pytest.raises(ValueError, match=f"<= {lim}"):
        QuantizerConfig(bits=4.0, bits_range=(2, lim + 1))
    x = torch.randn(64)
    for fn in (ops.fake_quant, reference.fake_quant):
        with pytest.raises(ValueError, match=f"<= {lim}"):
            fn(x, torch.full((1, lim), 0.1), torch.tensor([4.0]), bits_range=(2, lim + 1))
    with pytest.raises(ValueError, match=f"bits_max <= {lim}"):
        _C.fq_forward(x.numpy(), np.full((1, lim), 0.1, np.float32), np.array([4.0], np.float32),
                      None, None, dim=0, signed=True, bits_min=2, bits_max=lim + 1)


@pytest.mark.parametrize("signed", [True, False])
def test_kernel_at_the_bits_limit_matches_reference(signed):
    """At 24 bits the fp32 codes are still exact: the kernel equals the reference bitwise."""
    from qvit.ops import contract

    lim = contract.BITS_LIMIT
    br = (lim - 2, lim)
    gen = torch.Generator().manual_seed(3)
    # codes spread over the whole range, plus values beyond both ends
    x = (torch.rand(4096, generator=gen) * 2.2 - (1.1 if signed else 0.1)) * 2.0 ** (lim - 1)
    scale = torch.tensor([[1.0, 1.0, 1.0]])
    bits = torch.tensor([float(lim)], requires_grad=True)
    s = scale.clone().requires_grad_(True)
    y = ops.fake_quant(x, s, bits, signed=signed, bits_range=br)
    want = reference.fake_quant_forward(x, scale, bits.detach(), None, signed=signed, dim=0,
                                        bits_range=br)
    assert torch.equal(y, want)
    qn, qp = contract.qrange_of(lim, signed)
    assert y.min().item() == qn and y.max().item() == qp  # both ends reached, exactly
    gy = torch.randn(4096, generator=gen)
    y.backward(gy)
    gx, gs, gb, _ = reference.fake_quant_backward(gy, x, scale, bits.detach(), None,
                                                  signed=signed, dim=0, bits_range=br)
    torch.testing.assert_close(gb, bits.grad, rtol=1e-5, atol=0)
    torch.testing.assert_close(gs, s.grad, rtol=1e-4, atol=1e-3)
