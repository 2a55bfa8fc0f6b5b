"""What is specific to the CUDA kernels (csrc/fq_cuda.cu).

The general op suite (tests/test_ops.py) already runs every implementation,
"cuda" included, on small layouts. Here:

* layouts large enough to reach both work mappings of the kernels with many
  blocks (rows: G == 1 or inner >= 1024, several blocks per group; cols:
  small inner, row chunks and column tiles), the 16-byte vector path and the
  scalar fallback (odd runs, misaligned pointers), shared and per-group scale
  tables, fp32 / fp16 / bf16;
* launch semantics: torch's current (non-default) stream, CUDA-graph capture
  and replay with new data and new bit-widths, ``torch.compile(mode=
  "reduce-overhead")``, bitwise determinism, a tensor on a non-current device,
  more than 2^31 elements;
* bad parameter values, which the CUDA path cannot check without a host sync:
  the affected group turns NaN, the others are untouched;
* on a machine without a GPU (this one runs everywhere): the extension imports
  and reports no device.

Rules are those of tests/helpers.py: ``y`` and ``grad_x`` bitwise equal to the
closed-form reference (fp32 on tie-free inputs; fp16 / bf16 because both sides
round the same fp32 value once), parameter gradients within
``RTOL_SUM * sum(|terms|)`` of the float64 reference sums.
"""
import math

import pytest
import torch

from conftest import SKIP_REASON
from helpers import (assert_bitwise, assert_close_tol, grad_tolerances, make_params,
                     tie_free_input)
from qvit.ops import reference, torch_ops as ops

_NO_CUDA = SKIP_REASON["cuda"]
needs_cuda = pytest.mark.skipif(_NO_CUDA is not None, reason=f"CUDA tests: {_NO_CUDA}")
pytestmark = pytest.mark.cuda

CUDA = torch.device("cuda")
HALF_TYPES = (torch.float16, torch.bfloat16)

# name -> (shape, dim, groups); the comment says which kernel path it reaches.
LAYOUTS = {
    "tensor_vec": ((64, 197, 48), 0, 1),        # rows, G = 1, hundreds of blocks, 16-B vectors
    "tensor_odd": ((12347,), 0, 1),             # rows, scalar path (odd length)
    "head_act": ((4, 6, 197, 16), 1, 6),        # rows, inner = N*d = 3152, S blocks per group
    "head_rows": ((6 * 64, 96), 0, 6),          # rows, W_q rows per head, inner = 6144
    "rows_odd": ((3, 5, 1031), 1, 5),           # rows, scalar path (inner odd)
    "channel": ((1000, 96), -1, 96),            # cols, inner = 1, several rows per block
    "channel_wide": ((40, 3000), -1, 3000),     # cols, several column tiles, G = 3000
    "head_cols": ((300, 6 * 64), 1, 6),         # cols, W_proj columns per head, inner = d = 64
    "cols_odd": ((50, 7), -1, 7),               # cols, scalar path (P = 7)
}


def _inputs(layout, dtype, signed, with_offset, shared_table, seed=0, bits=None):
    shape, dim, g = LAYOUTS[layout]
    scale, bits_t, offset = make_params(g, scale_rows=1 if shared_table else g,
                                        offset=with_offset, seed=seed, bits=bits)
    x = tie_free_input(shape, dim, scale, bits_t, offset, signed=signed, dtype=dtype, seed=seed)
    gy = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    return x, scale, bits_t, offset, gy, dict(signed=signed, dim=dim, bits_range=(2, 8))


def _run_cuda(x, scale, bits, offset, gy, device=CUDA, grad_scale=None, **kw):
    """Forward + backward through the public op on ``device``; CPU results."""
    leaves = [None if t is None else t.to(device).clone().requires_grad_()
              for t in (x, scale, bits, offset)]
    y = ops.fake_quant(*leaves, grad_scale=grad_scale, **kw)
    y.backward(gy.to(device))
    return [y.detach().cpu()] + [None if t is None else t.grad.cpu() for t in leaves]


def _check_against_reference(got, x, scale, bits, offset, gy, grad_scale=None, **kw):
    y, gx, gs, gb, go = got
    want_y = reference.fake_quant_forward(x, scale, bits, offset, **kw)
    wgx, wgs, wgb, wgo = reference.fake_quant_backward(gy, x, scale, bits, offset,
                                                       grad_scale=grad_scale, **kw)
    assert_bitwise(y, want_y, "y")
    assert_bitwise(gx, wgx, "grad_x")
    ts, tb, to = grad_tolerances(gy, x, scale, bits, offset, grad_scale=grad_scale, **kw)
    assert_close_tol(gs, wgs, ts, "grad_scale")
    assert_close_tol(gb, wgb, tb, "grad_bits")
    if offset is not None:
        assert_close_tol(go, wgo, to, "grad_offset")
        # inactive table entries are written as exact zeros
        assert bool((go[wgo == 0] == 0).all())
    assert bool((gs[wgs == 0] == 0).all()), "inactive grad_scale entries must be 0"


# --------------------------------------------------------------- kernel vs reference

@needs_cuda
@pytest.mark.parametrize("shared_table", [False, True], ids=["Gs=G", "Gs=1"])
@pytest.mark.parametrize("signed,with_offset", [(True, False), (False, True)],
                         ids=["signed", "unsigned+offset"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_kernel_matches_reference(layout, dtype, signed, with_offset, shared_table):
    x, scale, bits, offset, gy, kw = _inputs(layout, dtype, signed, with_offset, shared_table)
    got = _run_cuda(x, scale, bits, offset, gy, **kw)
    _check_against_reference(got, x, scale, bits, offset, gy, **kw)


@needs_cuda
@pytest.mark.parametrize("b", [2, 3, 4, 5, 6, 7, 8, 1.4, 8.6, 4.5, 5.5])
def test_every_bit_width(b):
    """Each table column, ties of the bit-width rounding (4.5 -> 4, 5.5 -> 6), clamping."""
    x, scale, bits, offset, gy, kw = _inputs("head_act", torch.float32, True, False, False,
                                             bits=[b])
    got = _run_cuda(x, scale, bits, offset, gy, **kw)
    _check_against_reference(got, x, scale, bits, offset, gy, **kw)


@needs_cuda
@pytest.mark.parametrize("grad_scale", [0.0, 1.0, 0.37])
def test_grad_scale_override(grad_scale):
    x, scale, bits, offset, gy, kw = _inputs("channel", torch.float32, True, False, False)
    got = _run_cuda(x, scale, bits, offset, gy, grad_scale=grad_scale, **kw)
    _check_against_reference(got, x, scale, bits, offset, gy, grad_scale=grad_scale, **kw)


@needs_cuda
@pytest.mark.parametrize("layout", ["head_act", "channel", "tensor_vec"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_misaligned_pointers_use_scalar_path(layout, dtype):
    """x and grad_y 4 / 2 bytes past a 16-byte boundary: the scalar kernels, same results."""
    x, scale, bits, offset, gy, kw = _inputs(layout, dtype, True, False, False)
    n = x.numel()
    xbuf = torch.empty(n + 1, dtype=dtype, device=CUDA)
    gbuf = torch.empty(n + 1, dtype=dtype, device=CUDA)
    xc = xbuf[1:].view(x.shape).copy_(x.to(CUDA)).requires_grad_()
    gyc = gbuf[1:].view(x.shape).copy_(gy.to(CUDA))
    assert xc.data_ptr() % 16 != 0 and xc.is_contiguous()
    sc, bc = scale.to(CUDA).clone().requires_grad_(), bits.to(CUDA).clone().requires_grad_()
    y = ops.fake_quant(xc, sc, bc, **kw)
    y.backward(gyc)
    got = [y.detach().cpu(), xc.grad.cpu(), sc.grad.cpu(), bc.grad.cpu(), None]
    _check_against_reference(got, x, scale, bits, offset, gy, **kw)


# --------------------------------------------------------------- bad values on the device

@needs_cuda
def test_bad_parameter_values_poison_their_group_only():
    """NaN bits (group 1) and a negative active scale (group 2): NaN there, group 0 exact."""
    shape, dim, g = (2, 3, 5, 4), 1, 3
    scale, bits, _ = make_params(g, scale_rows=g, bits=[4, 4, 4])
    bits[1] = float("nan")
    scale[2, 4 - 2] = -0.5
    x = torch.randn(shape)
    gy = torch.randn(shape)
    xc, sc, bc, gyc = (t.to(CUDA) for t in (x, scale, bits, gy))
    y = torch.ops.qvit.fq_forward.default(xc, sc, bc, None, dim, True, 2, 8)
    gx, gs, gb, _ = torch.ops.qvit.fq_backward.default(gyc, xc, sc, bc, None, dim, True, 2, 8, -1.0)
    y, gx, gs, gb = (t.cpu() for t in (y, gx, gs, gb))
    # group 0 against the reference on that group alone
    want = reference.fake_quant_forward(x[:, :1], scale[:1], bits[:1], signed=True, dim=1)
    assert_bitwise(y[:, :1], want, "y of the good group")
    assert bool(torch.isnan(y[:, 1:]).all()), "a poisoned group's y must be NaN"
    assert bool(torch.isnan(gx[:, 1:]).all()), "a poisoned group's grad_x must be NaN"
    assert bool(torch.isfinite(gx[:, :1]).all())
    assert math.isfinite(gb[0].item()) and math.isnan(gb[1].item()) and math.isnan(gb[2].item())
    assert bool(torch.isfinite(gs[0]).all())
    assert math.isnan(gs[2, 4 - 2].item())


# --------------------------------------------------------------- launch semantics

@needs_cuda
def test_current_nondefault_stream_is_used():
    """Inputs written on a side stream behind a long sleep: the op must queue behind it.

    If the kernels ran on any other stream they would read the NaN-filled
    buffer before the copy lands.
    """
    x, scale, bits, offset, gy, kw = _inputs("head_act", torch.float32, True, False, False)
    xs = torch.full(x.shape, float("nan"), device=CUDA)
    src, sc, bc = x.to(CUDA), scale.to(CUDA), bits.to(CUDA)
    gyc = gy.to(CUDA)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # ~tens of ms of GPU time on this stream
        xs.copy_(src)
        y = torch.ops.qvit.fq_forward.default(xs, sc, bc, None, kw["dim"], True, 2, 8)
        gx, gs, gb, _ = torch.ops.qvit.fq_backward.default(gyc, xs, sc, bc, None, kw["dim"],
                                                          True, 2, 8, -1.0)
    torch.cuda.current_stream().wait_stream(side)
    got = [t.cpu() for t in (y, gx, gs, gb)] + [None]
    _check_against_reference(got, x, scale, bits, offset, gy, **kw)


@needs_cuda
def test_cuda_graph_capture_and_replay():
    """Captured forward + backward replays like eager, also after new x and new bits
    (a new active table column): the parameters are read on the device, not baked in."""
    x, scale, bits, offset, gy, kw = _inputs("head_act", torch.float32, False, True, False)
    dim = kw["dim"]
    xs, sc, bc, oc, gys = (t.to(CUDA) for t in (x, scale, bits, offset, gy))
    fwd, bwd = torch.ops.qvit.fq_forward.default, torch.ops.qvit.fq_backward.default

    def step():
        y = fwd(xs, sc, bc, oc, dim, False, 2, 8)
        return (y, *bwd(gys, xs, sc, bc, oc, dim, False, 2, 8, -1.0))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step()

    for seed, new_bits in ((0, None), (5, [2.2, 7.9, 3.5, 4.49, 8.0, 6.6])):
        if new_bits is not None:
            x2, _, b2, _, gy2, _ = _inputs("head_act", torch.float32, False, True, False,
                                          seed=seed, bits=new_bits)
            # keep the captured tables; new data, new bit-widths
            x2 = tie_free_input(x.shape, dim, scale, b2, offset, signed=False, seed=seed)
            xs.copy_(x2.to(CUDA))
            bc.copy_(b2.to(CUDA))
            gys.copy_(gy2.to(CUDA))
        graph.replay()
        torch.cuda.synchronize()
        eager = step()
        for a, b, name in zip(static_out, eager, ("y", "grad_x", "grad_scale", "grad_bits", "grad_offset")):
            assert_bitwise(a, b, f"replay vs eager {name}")
        got = [t.cpu() for t in static_out]
        _check_against_reference(got, xs.cpu(), scale, bc.cpu(), offset, gys.cpu(), **kw)


@needs_cuda
def test_torch_compile_reduce_overhead():
    x, scale, bits, offset, gy, kw = _inputs("tensor_vec", torch.float32, True, False, False)

    def f(x_, s_, b_):
        return ops.fake_quant(x_, s_, b_, **kw) * 2.0

    compiled = torch.compile(f, mode="reduce-overhead")
    leaves = [t.to(CUDA).requires_grad_() for t in (x, scale, bits)]
    gyc = gy.to(CUDA)
    y_e = f(*leaves)
    g_e = torch.autograd.grad(y_e, leaves, gyc)
    for _ in range(3):  # record, then replay the CUDA graph
        y_c = compiled(*leaves)
        g_c = torch.autograd.grad(y_c, leaves, gyc)
        y_c, g_c = y_c.detach().clone(), [g.clone() for g in g_c]
    assert_bitwise(y_c, y_e.detach(), "compiled y")
    for a, b, name in zip(g_c, g_e, ("grad_x", "grad_scale", "grad_bits")):
        assert_bitwise(a, b, f"compiled {name}")


@needs_cuda
@pytest.mark.parametrize("layout,shared_table",
                         [("tensor_vec", False), ("head_act", False), ("head_act", True),
                          ("channel", False), ("channel_wide", True), ("rows_odd", False)])
def test_backward_is_bitwise_deterministic(layout, shared_table):
    x, scale, bits, offset, gy, kw = _inputs(layout, torch.bfloat16, False, True, shared_table)
    first = _run_cuda(x, scale, bits, offset, gy, **kw)
    for _ in range(2):
        again = _run_cuda(x, scale, bits, offset, gy, **kw)
        for a, b, name in zip(first, again, ("y", "grad_x", "grad_scale", "grad_bits", "grad_offset")):
            assert_bitwise(a, b, f"second run {name}")


@needs_cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 or more GPUs")
def test_tensor_on_non_current_device():
    x, scale, bits, offset, gy, kw = _inputs("head_act", torch.float32, True, True, False)
    torch.cuda.set_device(0)
    dev1 = torch.device("cuda", 1)
    got = _run_cuda(x, scale, bits, offset, gy, device=dev1, **kw)
    assert torch.cuda.current_device() == 0, "the op must restore the current device"
    _check_against_reference(got, x, scale, bits, offset, gy, **kw)
    ch = _inputs("channel", torch.bfloat16, True, False, False)
    got = _run_cuda(*ch[:5], device=dev1, **ch[5])
    assert torch.cuda.current_device() == 0
    _check_against_reference(got, *ch[:5], **ch[5])
    # the other way round: current device 1, tensors on 0 (the extension's own
    # static cudart must read and restore the context torch made current)
    try:
        torch.cuda.set_device(1)
        got = _run_cuda(x, scale, bits, offset, gy, device=torch.device("cuda", 0), **kw)
        assert torch.cuda.current_device() == 1, "the op must restore the current device"
        _check_against_reference(got, x, scale, bits, offset, gy, **kw)
        y1 = torch.randn(8, device=dev1) * 2  # torch still works on its current device
        assert y1.device == dev1
    finally:
        torch.cuda.set_device(0)


def _chunk_terms(xc, uc, s, beta, qn, qp):
    """float64 sums of |terms| of one chunk (for the tolerance of the big test)."""
    v = (xc.float() - beta) / s
    u = uc.double()
    hi, lo = v > qp, v < qn
    inside = ~(hi | lo)
    r = torch.round(torch.clamp(v, qn, qp)) - torch.where(inside, v, torch.zeros_like(v))
    return (u.abs() * r.double().abs()).sum(), (u.abs() * (~inside)).sum()


@needs_cuda
def test_more_than_2_pow_31_elements():
    """bf16, 2 groups of 2^30 + 2^20 elements: indices of group 1 exceed 2^31."""
    n_g = (1 << 30) + (1 << 20)
    need = 4 * 2 * n_g * 2 + (3 << 30)   # x, grad_y, y, grad_x + reference chunks
    free, _ = torch.cuda.mem_get_info()
    if free < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB free on the GPU, has {free / 2**30:.1f}")
    g = 2
    scale, bits, _ = make_params(g, scale_rows=g, bits=[4, 6])
    sc, bc = scale.to(CUDA).clone().requires_grad_(), bits.to(CUDA).clone().requires_grad_()
    gen = torch.Generator(device=CUDA).manual_seed(0)
    x = (torch.randn(g, n_g, device=CUDA, generator=gen, dtype=torch.bfloat16) * 0.05).requires_grad_()
    gy = torch.randn(g, n_g, device=CUDA, generator=gen, dtype=torch.bfloat16)
    y = ops.fake_quant(x, sc, bc, signed=True, dim=0, grad_scale=1.0)
    y.backward(gy)
    chunk = 1 << 26
    for gi in range(g):
        s1, b1 = scale[gi:gi + 1].to(CUDA), bits[gi:gi + 1].to(CUDA)
        bh = round(float(bits[gi]))
        s_act = float(scale[gi, bh - 2])
        qn, qp = -(2 ** (bh - 1)), 2 ** (bh - 1) - 1
        acc = torch.zeros(3, dtype=torch.float64, device=CUDA)
        mag = torch.zeros(2, dtype=torch.float64, device=CUDA)
        for start in range(0, n_g, chunk):
            xc = x.detach()[gi, start:start + chunk]
            uc = gy[gi, start:start + chunk]
            want_y = reference.fake_quant_forward(xc, s1, b1, signed=True, dim=0)
            assert torch.equal(y.detach()[gi, start:start + chunk], want_y), f"y, group {gi} at {start}"
            wgx, wgs, wgb, _ = reference.fake_quant_backward(uc, xc, s1, b1, signed=True, dim=0,
                                                             grad_scale=1.0)
            assert torch.equal(x.grad[gi, start:start + chunk], wgx), f"grad_x, group {gi} at {start}"
            acc += torch.stack([wgs.sum().double(), wgb.sum().double(), torch.zeros((), device=CUDA)])
            mag += torch.stack(_chunk_terms(xc, uc, s_act, 0.0, qn, qp))
        tol_s = 1e-5 * mag[0].item() + 1e-30
        tol_b = 1e-5 * s_act * math.log(2) * 2 ** (bh - 1) * mag[1].item() + 1e-30
        assert abs(sc.grad[gi].sum().item() - acc[0].item()) <= tol_s
        assert abs(bc.grad[gi].item() - acc[1].item()) <= tol_b


@needs_cuda
def test_float64_on_cuda_is_rejected():
    x = torch.randn(4, 8, dtype=torch.float64, device=CUDA)
    scale = torch.full((1, 7), 0.1, dtype=torch.float64, device=CUDA)
    bits = torch.tensor([4.0], dtype=torch.float64, device=CUDA)
    with pytest.raises((TypeError, ValueError)):
        ops.fake_quant(x, scale, bits)


@needs_cuda
def test_workspace_bytes_and_too_small_workspace():
    from qvit import _C
    dev = torch.cuda.current_device()
    for outer, g, inner in ((1, 1, 4_841_472), (64, 6, 12608), (12608, 384, 1), (300, 6, 64)):
        nbytes = _C.fq_workspace_bytes(outer, g, inner, dev)
        # partials per block (rows) or per column and row chunk (cols): far below the data
        assert 0 < nbytes <= 256 * 3 + 12 * outer * g * inner // 16 + 24 * g + 4096
    x = torch.randn(64, 6, 12608, device=CUDA)
    scale = torch.full((6, 7), 0.05, device=CUDA)
    bits = torch.full((6,), 4.0, device=CUDA)
    outs = [torch.empty_like(x), torch.empty_like(scale), torch.empty_like(bits)]
    tiny = torch.empty(8, dtype=torch.uint8, device=CUDA)
    with pytest.raises((ValueError, RuntimeError)):
        _C.fq_backward(x, x, scale, bits, None, *outs, None, dim=1, signed=True,
                       bits_min=2, bits_max=8, workspace=tiny)


# --------------------------------------------------------------- no GPU (runs everywhere)
# (the CUDA source under the host emulation: tests/test_cuda_emu.py)

def test_extension_imports_and_reports_devices():
    """Importing qvit never needs a GPU; without a driver the device count is <= 0."""
    import qvit
    info = ops.backend_info()
    assert qvit.__version__
    if not info["c_loaded"]:
        pytest.skip(f"qvit._C not available: {info['c_import_error']}")
    from qvit import _C
    n = _C.cuda_device_count()
    assert isinstance(n, int)
    assert isinstance(_C.cuda_built(), bool)
    if not _C.cuda_built():
        assert n <= 0
    elif torch.cuda.is_available():
        assert n == torch.cuda.device_count()
    else:
        assert n <= 0
        # CPU work is unaffected by a CUDA build on a machine without a driver
        x = torch.randn(5, 6)
        y = ops.fake_quant(x, torch.full((1, 7), 0.1), torch.tensor([4.0]))
        assert y.shape == x.shape
