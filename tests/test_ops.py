"""Every implementation against the closed-form reference, and the op's own guarantees.

Rules (see tests/helpers.py for the why):
* forward ``y`` and ``grad_x``: bitwise equal to ``reference.fake_quant_forward`` /
  ``fake_quant_backward`` for every dtype (fp32 on tie-free inputs from the
  generator, plus hand-written exact ties; fp16/bf16 because both sides round
  the same fp32 value once);
* scale / bits / offset gradients: within ``RTOL_SUM * sum(|terms|)`` of the
  float64-accumulated reference.
"""
import math

import numpy as np
import pytest
import torch

from helpers import (LAYOUTS, assert_bitwise, assert_close_tol, decode,
                     grad_tolerances, make_params, surrogate_gradcheck, tie_and_edge_cases,
                     tie_free_input)
from conftest import IMPLS, SKIP_REASON, impl_dtype_grid
from qvit.ops import reference, torch_ops as ops

IMPLS_CPU = IMPLS["cpu"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def run(impl, x, scale, bits, offset, gy, **kw):
    """Forward + backward on ``impl``; returns CPU tensors (y, gx, gs, gb, go)."""
    leaves = [None if t is None else impl.to(t).clone().requires_grad_()
              for t in (x, scale, bits, offset)]
    y = impl.fake_quant(*leaves, **kw)
    y.backward(impl.to(gy))
    out = [y.detach()] + [None if t is None else t.grad for t in leaves]
    return [None if t is None else t.cpu() for t in out]


def expected(x, scale, bits, offset, gy, **kw):
    fkw = {k: v for k, v in kw.items() if k != "grad_scale"}
    return (reference.fake_quant_forward(x, scale, bits, offset, **fkw),
            *reference.fake_quant_backward(gy, x, scale, bits, offset, **kw))


def check(got, want, tols, what="", composite=None):
    y, gx, gs, gb, go = got
    wy, wgx, wgs, wgb, wgo = want
    ts, tb, to = tols
    if composite is not None:
        # The autograd composite is not bitwise: its LSQ gradient-scale trick
        # (s - s*f).detach() + s*f moves s by an ulp, and its grad_x is formed as
        # u * s * (1/s). Both stay within 4 ulp of the dtype, relative to the
        # magnitudes added (|q*s| <= |y| + |beta|). ``composite`` = max |beta|.
        eps = torch.finfo(wy.dtype).eps
        assert_close_tol(y, wy, 4 * eps * (2 * wy.double().abs() + composite), f"{what} y")
        assert_close_tol(gx, wgx, 4 * eps * wgx.double().abs(), f"{what} grad_x")
    else:
        assert_bitwise(y, wy, f"{what} y")
        assert_bitwise(gx, wgx, f"{what} grad_x")
    assert_close_tol(gs, wgs, ts, f"{what} grad_scale")
    assert_close_tol(gb, wgb, tb, f"{what} grad_bits")
    if wgo is None:
        assert go is None, f"{what} grad_offset should be None"
    else:
        assert_close_tol(go, wgo, to, f"{what} grad_offset")


def compare(impl, x, scale, bits, offset, gy, what="", **kw):
    got = run(impl, x, scale, bits, offset, gy, **kw)
    want = expected(x, scale, bits, offset, gy, **kw)
    tols = grad_tolerances(gy, x, scale, bits, offset, signed=kw.get("signed", True),
                           dim=kw.get("dim", 0), bits_range=kw.get("bits_range", (2, 8)),
                           grad_scale=kw.get("grad_scale"), composite=impl.name == "reference")
    beta_max = float(offset.abs().max()) if offset is not None else 0.0
    check(got, want, tols, what, composite=beta_max if impl.name == "reference" else None)
    return got


def _clip_counts(x, scale, bits, offset, signed, dim, br):
    outer, g, inner = reference.group_shape(x.shape, dim, bits.numel())
    s, beta, qn, qp = (t.view(1, g, 1) for t in decode(scale, bits, offset, signed, br))
    v = (x.double().reshape(outer, g, inner) - beta) / s
    return int((v > qp).sum()), int((v < qn).sum())


# --- the main grid ------------------------------------------------------------------------

@pytest.mark.parametrize("impl,dtype", impl_dtype_grid(DTYPES), indirect=["impl"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
@pytest.mark.parametrize("with_offset", [False, True], ids=["", "offset"])
@pytest.mark.parametrize("rows", ["shared", "per_group"])
def test_matches_reference(impl, dtype, layout, signed, with_offset, rows):
    shape, dim, g = LAYOUTS[layout]
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    scale, bits, offset = make_params(g, scale_rows=1 if rows == "shared" else g,
                                      offset=with_offset, dtype=pdt, seed=g + 10 * signed)
    x = tie_free_input(shape, dim, scale, bits, offset, signed=signed, dtype=dtype, seed=1)
    gy = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    hi, lo = _clip_counts(x, scale, bits, offset, signed, dim, (2, 8))
    assert hi > 0 and lo > 0, "the input must clip on both sides"
    compare(impl, x, scale, bits, offset, gy, signed=signed, dim=dim)


BITS = [2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0,      # every width
        2.5, 3.5, 4.5, 7.5, 4.49, 4.51,          # near and at .5 (half to even)
        -3.0, 0.0, 1.2, 8.5, 9.7, 100.0]         # outside the range: clamped


@pytest.mark.parametrize("b", BITS)
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_bit_widths(impl, b, signed):
    shape, dim, g = (64, 9), -1, 3
    scale, bits, offset = make_params(g, scale_rows=g, bits=[b], offset=not signed, seed=3)
    x = tie_free_input(shape, dim, scale, bits, offset, signed=signed, seed=4)
    gy = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    compare(impl, x, scale, bits, offset, gy, signed=signed, dim=dim, what=f"bits={b}")


@pytest.mark.parametrize("n", [1, 2, 7, 33, 1023, 4099, 65537])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_odd_sizes_per_tensor(impl, n, dtype):
    scale, bits, _ = make_params(1, seed=n)
    x = tie_free_input((n,), 0, scale, bits, None, signed=True, dtype=dtype, seed=n)
    gy = torch.randn(n, generator=torch.Generator().manual_seed(1)).to(dtype)
    compare(impl, x, scale, bits, None, gy, what=f"n={n}")


@pytest.mark.parametrize("shape,dim,g", [
    ((1, 7), 1, 7), ((7, 1), 0, 7), ((3, 5, 7), 1, 5), ((5, 3, 4099), 1, 3),
    ((1023, 3), -1, 3), ((2, 13, 2521), 1, 13),
])
def test_odd_sizes_grouped(impl, shape, dim, g):
    scale, bits, offset = make_params(g, scale_rows=g, offset=True, seed=g)
    x = tie_free_input(shape, dim, scale, bits, offset, signed=False, seed=g)
    gy = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    compare(impl, x, scale, bits, offset, gy, signed=False, dim=dim, what=str(shape))


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["float32", "float16", "bfloat16"])
def test_exact_ties_and_range_edges(impl, signed, dtype):
    """2.5 -> 2, 3.5 -> 4 (half to even); v == Qn / Qp inside; just beyond them clipped."""
    x32, y_want, inside = tie_and_edge_cases(signed)
    x = x32.to(dtype)
    exact = x.float() == x32  # values that survive the cast keep their hand-written answer
    scale = torch.ones(1, 7)
    bits = torch.tensor([3.0])
    gy = torch.arange(1.0, x.numel() + 1).to(dtype)
    y, gx, _, _, _ = run(impl, x, scale, bits, None, gy, signed=signed)
    assert_bitwise(y.float()[exact], y_want[exact], "y vs hand-written")
    want_gx = torch.where(inside, gy, torch.zeros_like(gy))
    assert_bitwise(gx[exact], want_gx[exact], "grad_x vs hand-written mask")
    compare(impl, x, scale, bits, None, gy, signed=signed, what="ties")


@pytest.mark.parametrize("grad_scale", [None, 1.0, 0.0, 0.37])
def test_grad_scale_override(impl, grad_scale):
    shape, dim, g = LAYOUTS["per_head_act"]
    scale, bits, _ = make_params(g, scale_rows=g, seed=8)
    x = tie_free_input(shape, dim, scale, bits, None, signed=True, seed=9)
    gy = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    got = compare(impl, x, scale, bits, None, gy, dim=dim, grad_scale=grad_scale)
    if grad_scale == 0.0:
        assert float(got[2].abs().sum()) == 0.0


def test_non_contiguous_input(impl):
    scale, bits, _ = make_params(6, scale_rows=6, seed=1)
    base = tie_free_input((6, 40), 0, scale, bits, None, signed=True, seed=2)
    x = base.t()  # [40, 6], per-channel along dim -1, not contiguous
    assert not x.is_contiguous()
    gy = torch.randn(6, 40).t()
    compare(impl, x, scale, bits, None, gy, dim=-1)


def test_nan_input_propagates(kernel):
    """The pinned NaN rule (reference docstring); the autograd composite does not follow it."""
    scale = torch.ones(2, 7)
    bits = torch.tensor([4.0, 4.0])
    x = torch.tensor([[0.3, float("nan")], [1.2, 2.7], [100.0, -100.0]])
    gy = torch.ones(3, 2)
    y, gx, gs, gb, _ = run(kernel, x, scale, bits, None, gy, dim=-1)
    want = expected(x, scale, bits, None, gy, dim=-1)
    assert_bitwise(y, want[0], "y")
    assert_bitwise(gx, want[1], "grad_x")
    assert torch.isnan(y[0, 1]) and torch.isnan(gx[0, 1])
    assert not torch.isnan(y[:, 0]).any() and not torch.isnan(gx[:, 0]).any()
    assert torch.isnan(gs[1, 2]) and not torch.isnan(gs[0]).any()


# --- the op (compiled kernels) ------------------------------------------------------------

@pytest.mark.parametrize("layout", ["per_tensor", "per_head_act", "per_head_cols"])
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_gradcheck_op(needs_c, layout, signed):
    """float64 gradcheck of x / scale / offset through the C kernel (see helpers.surrogate_gradcheck)."""
    assert surrogate_gradcheck(ops.fake_quant, layout, signed)


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_bits_gradient_closed_form_op(kernel, signed):
    shape, dim, g = (4, 6, 50), 1, 6
    scale, bits, _ = make_params(g, scale_rows=g, seed=11)
    x = tie_free_input(shape, dim, scale, bits, None, signed=signed, seed=12)
    gy = torch.randn(shape, generator=torch.Generator().manual_seed(13))
    _, _, _, gb, _ = run(kernel, x, scale, bits, None, gy, signed=signed, dim=dim)
    s, _, qn, qp = decode(scale, bits, None, signed, (2, 8))
    v = x.double().reshape(4, g, 50) / s.view(1, g, 1)
    u = gy.double().reshape(4, g, 50)
    want = []
    for i in range(g):
        bh = round(min(max(float(bits[i]), 2), 8))
        hi = float(u[:, i][v[:, i] > qp[i]].sum())
        lo = float(u[:, i][v[:, i] < qn[i]].sum())
        want.append(float(s[i]) * math.log(2) * (2 ** (bh - 1) * (hi - lo) if signed else 2 ** bh * hi))
    torch.testing.assert_close(gb.double(), torch.tensor(want, dtype=torch.float64),
                               rtol=1e-4, atol=1e-4)


def _backward_once(impl, x, scale, bits, offset, gy, **kw):
    return run(impl, x, scale, bits, offset, gy, **kw)


def test_deterministic_backward(kernel):
    shape, dim, g = (64, 6, 999), 1, 6
    scale, bits, offset = make_params(g, scale_rows=1, offset=True, seed=1)
    x = tie_free_input(shape, dim, scale, bits, offset, signed=False, seed=2)
    gy = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    first = _backward_once(kernel, x, scale, bits, offset, gy, signed=False, dim=dim)
    second = _backward_once(kernel, x, scale, bits, offset, gy, signed=False, dim=dim)
    for a, b, name in zip(first, second, ("y", "gx", "gs", "gb", "go")):
        assert_bitwise(a, b, f"run-to-run {name}")
    if kernel.name == "cpu":
        saved = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            one = _backward_once(kernel, x, scale, bits, offset, gy, signed=False, dim=dim)
            torch.set_num_threads(2)
            two = _backward_once(kernel, x, scale, bits, offset, gy, signed=False, dim=dim)
        finally:
            torch.set_num_threads(saved)
        for a, b, name in zip(one, two, ("y", "gx", "gs", "gb", "go")):
            assert_bitwise(a, b, f"1 vs 2 threads {name}")


def test_needs_input_grad_respected(kernel):
    scale, bits, offset = make_params(1, offset=True, seed=1)
    x = tie_free_input((50,), 0, scale, bits, offset, signed=False, seed=2)
    x, scale, bits, offset = (kernel.to(t) for t in (x, scale, bits, offset))
    s = scale.clone().requires_grad_()
    y = ops.fake_quant(x, s, bits, offset, signed=False)
    y.sum().backward()
    assert s.grad is not None and bits.grad is None and offset.grad is None and x.grad is None
    xr = x.clone().requires_grad_()
    ops.fake_quant(xr, scale, bits, signed=False).sum().backward()
    assert xr.grad is not None


def test_empty_input(kernel):
    """Documented choice: empty x -> empty y, all-zero gradients."""
    scale, bits, offset = (kernel.to(t).requires_grad_() for t in make_params(4, scale_rows=4, offset=True))
    x = torch.empty(0, 8, device=kernel.device, requires_grad=True)
    y = ops.fake_quant(x, scale, bits, offset, dim=-1)
    assert y.shape == (0, 8)
    y.sum().backward()
    assert x.grad.shape == (0, 8)
    for t in (scale, bits, offset):
        assert t.grad is not None and float(t.grad.abs().sum()) == 0.0


def test_autocast_bf16(kernel):
    """Under autocast the op gets a bf16 activation and fp32 parameters, and matches the direct call."""
    lin = torch.nn.Linear(32, 48).to(kernel.device)
    inp = torch.randn(16, 32, device=kernel.device, generator=None)
    scale, bits, _ = (kernel.to(t) for t in make_params(1, seed=3))
    scale = (scale * 4).requires_grad_()
    with torch.autocast(kernel.device.type, dtype=torch.bfloat16):
        h = lin(inp)
        assert h.dtype == torch.bfloat16
        y = ops.fake_quant(h, scale, bits)
    assert y.dtype == torch.bfloat16
    y_direct = ops.fake_quant(h.detach(), scale.detach(), bits)
    assert_bitwise(y.detach(), y_direct, "autocast vs direct")
    y.float().sum().backward()
    assert scale.grad is not None and scale.grad.dtype == torch.float32


def test_reference_fallback_for_other_devices():
    x = torch.randn(10, device="meta")
    y = ops.fake_quant(x, torch.ones(1, 7, device="meta"), torch.full((1,), 4.0, device="meta"))
    assert y.device.type == "meta" and y.shape == x.shape


def test_backend_info_keys():
    info = ops.backend_info()
    assert set(info) == {"c_loaded", "c_import_error", "cuda_built", "cuda_devices", "cuda_status",
                         "exchange_api"}
    assert info["c_loaded"] == (info["c_import_error"] is None)


# --- NumPy straight into qvit._C ------------------------------------------------------------

@pytest.mark.parametrize("with_offset", [False, True])
def test_numpy_into_C(needs_c, with_offset):
    from qvit import _C
    shape, dim, g = (5, 6, 7), 1, 6
    scale, bits, offset = make_params(g, scale_rows=g, offset=with_offset, seed=1)
    x = tie_free_input(shape, dim, scale, bits, offset, signed=False, seed=2)
    gy = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    npx, nps, npb, npg = (t.numpy() for t in (x, scale, bits, gy))
    npo = offset.numpy() if offset is not None else None
    kw = dict(dim=dim, signed=False, bits_min=2, bits_max=8)
    y = _C.fq_forward(npx, nps, npb, npo, None, **kw)
    assert isinstance(y, np.ndarray) and y.shape == shape and y.dtype == np.float32
    want = expected(x, scale, bits, offset, gy, signed=False, dim=dim)
    assert_bitwise(torch.from_numpy(y), want[0], "numpy y")
    out = _C.fq_backward(npg, npx, nps, npb, npo, None, None, None, None, **kw)
    assert len(out) == 4 and all(isinstance(o, np.ndarray) for o in out[:3])
    tols = grad_tolerances(gy, x, scale, bits, offset, signed=False, dim=dim, bits_range=(2, 8),
                           grad_scale=None)
    got = [torch.from_numpy(want[0].numpy())] + [None if o is None else torch.from_numpy(o) for o in out]
    check(got, want, tols, "numpy")
    # the output-given form writes into the arrays passed
    y2 = np.empty_like(npx)
    r = _C.fq_forward(npx, nps, npb, npo, y2, **kw)
    assert np.array_equal(y2, y) and (r is y2 or np.shares_memory(r, y2))


# --- torch.library.opcheck ------------------------------------------------------------------

# Autograd lives in an autograd.Function outside the ops, so opcheck's
# autograd-registration check backprops through the raw op and torch warns that
# no Autograd kernel is registered; the check itself passes (the kernels'
# outputs do not require grad).
@pytest.mark.filterwarnings("ignore:.*an autograd kernel was not registered")
@pytest.mark.parametrize("with_offset", [False, True])
def test_opcheck(kernel, with_offset):
    g = 3
    scale, bits, offset = (kernel.to(t) for t in make_params(g, scale_rows=g, offset=with_offset, seed=1))
    x = kernel.to(tie_free_input((4, 6, 5), 1, scale.cpu(), bits.cpu(),
                                 None if offset is None else offset.cpu(), signed=True, seed=2))
    gy = torch.randn_like(x)
    x.requires_grad_()
    scale.requires_grad_()
    torch.library.opcheck(torch.ops.qvit.fq_forward.default, (x, scale, bits, offset, 1, True, 2, 8))
    torch.library.opcheck(torch.ops.qvit.fq_backward.default,
                          (gy, x, scale, bits, offset, 1, True, 2, 8, -1.0))


@pytest.mark.parametrize("fast", [True, False], ids=["fast_path", "dispatcher"])
def test_eager_fast_path_and_dispatcher_agree(kernel, fast, monkeypatch):
    """Both eager routes (direct impl call / torch.ops dispatch) give the same bits."""
    calls = []
    impl_fwd = ops._fq_forward_impl

    def counting(*a):
        calls.append(1)
        return impl_fwd(*a)

    monkeypatch.setattr(ops, "_fq_forward_impl", counting)
    monkeypatch.setattr(ops, "EAGER_FAST_PATH", fast)
    shape, dim, g = LAYOUTS["per_head_cols"]
    scale, bits, offset = make_params(g, scale_rows=g, offset=True, seed=21)
    x = tie_free_input(shape, dim, scale, bits, offset, signed=False, seed=22)
    gy = torch.randn(shape, generator=torch.Generator().manual_seed(23))
    compare(kernel, x, scale, bits, offset, gy, signed=False, dim=dim)
    assert len(calls) == (1 if fast else 0)


def test_zero_dim_input(impl):
    scale, bits, _ = make_params(1, seed=31)
    x = tie_free_input((), 0, scale, bits, None, signed=True, seed=32)
    gy = torch.tensor(0.75)
    compare(impl, x, scale, bits, None, gy)


@pytest.mark.parametrize("signed,br", [(False, (1, 4)), (True, (3, 6)), (False, (8, 8)), (True, (2, 16))])
def test_other_bit_ranges(impl, signed, br):
    """Table width K = max - min + 1 and the column index follow bits_range."""
    shape, dim, g = (3, 4, 33), 1, 4
    bits = [br[0] - 1.0, br[0] + 0.5, (br[0] + br[1]) / 2 + 0.2, br[1] + 3.0]
    scale, bits_t, offset = make_params(g, scale_rows=g, bits=bits, bits_range=br,
                                        offset=not signed, seed=41)
    x = tie_free_input(shape, dim, scale, bits_t, offset, signed=signed, bits_range=br, seed=42)
    gy = torch.randn(shape, generator=torch.Generator().manual_seed(43))
    compare(impl, x, scale, bits_t, offset, gy, signed=signed, dim=dim, bits_range=br)


def test_capsule_path_for_torch_without_exchange_api(kernel, monkeypatch):
    """Older torch has no DLPack C exchange API: tensors go in as to_dlpack capsules."""
    monkeypatch.setattr(ops, "_to_c", torch.utils.dlpack.to_dlpack)
    monkeypatch.setattr(ops, "_EXCHANGE_API", None)
    shape, dim, g = LAYOUTS["per_head_act"]
    scale, bits, offset = make_params(g, scale_rows=g, offset=True, seed=51)
    x = tie_free_input(shape, dim, scale, bits, offset, signed=False, seed=52)
    gy = torch.randn(shape, generator=torch.Generator().manual_seed(53))
    compare(kernel, x, scale, bits, offset, gy, signed=False, dim=dim)


# --- property test: random layouts ------------------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@st.composite
def _op_case(draw):
    shape = tuple(draw(st.lists(st.integers(1, 9), min_size=1, max_size=4)))
    dim = draw(st.integers(-len(shape), len(shape) - 1))
    size = shape[dim]
    g = draw(st.sampled_from([d for d in range(1, size + 1) if size % d == 0]))
    signed = draw(st.booleans())
    br = draw(st.sampled_from([(2, 8), (3, 5), (2, 2)] + ([] if signed else [(1, 8)])))
    bits = draw(st.lists(st.floats(-1.0, 11.0, allow_nan=False), min_size=g, max_size=g))
    rows = draw(st.sampled_from([1, g]))
    offset = draw(st.booleans())
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]))
    seed = draw(st.integers(0, 2**16))
    return shape, dim, g, signed, br, bits, rows, offset, dtype, seed


@pytest.mark.skipif(SKIP_REASON["cpu"] is not None, reason=str(SKIP_REASON["cpu"]))
@settings(max_examples=40, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(case=_op_case())
def test_random_layouts_match_reference(case):
    shape, dim, g, signed, br, bits, rows, with_offset, dtype, seed = case
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    scale, bits_t, offset = make_params(g, scale_rows=rows, bits=bits, bits_range=br,
                                        offset=with_offset, dtype=pdt, seed=seed)
    x = tie_free_input(shape, dim, scale, bits_t, offset, signed=signed, bits_range=br,
                       dtype=dtype, seed=seed + 1)
    gy = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 2)).to(dtype)
    compare(IMPLS_CPU, x, scale, bits_t, offset, gy, signed=signed, dim=dim, bits_range=br)
