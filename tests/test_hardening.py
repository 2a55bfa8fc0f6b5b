"""Hardening of the native layer: non-finite values, sizes at and beyond 2^31,
hand-built DLPack tensors, threads, leaks.

Non-finite behaviour (pinned in qvit/ops/reference.py and csrc/fq_math.h, held
here for the kernels against the reference closed forms):

* NaN in x gives NaN in y and in grad_x at that element only, and NaN in the
  active scale-table entry of its own group (the entry's LSQ sum contains
  round(NaN) - NaN). A NaN counts as "inside" the code range, so it adds
  nothing to the clip sums: the group's bit-width and offset gradients stay
  finite and every other group's parameter gradients are bitwise unchanged.
  With a shared table (scale with one row) groups of the same rounded
  bit-width share the active entry, so that entry is NaN for all of them.
* +-Inf in x clips: y = Qp*s + beta or Qn*s + beta, grad_x = 0, and the clip
  sums get u*Qp / u*Qn like any clipped element.
* NaN in grad_y propagates to grad_x where the element is inside, and to the
  sums of its own group only.
* Parameter values are checked on the CPU: a scale that is not finite and > 0,
  a non-finite bit-width or offset raises ValueError (tests/test_ops_errors.py).
  Denormal and huge (finite, positive) scales are valid and match the reference.
"""
from __future__ import annotations

import math
import os
import sys
import threading

import numpy as np
import pytest
import torch

from qvit.ops import reference, torch_ops as ops

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "fuzz"))
from dlpack_raw import RawTensor  # noqa: E402

try:
    from qvit import _C
except ImportError:  # pragma: no cover
    _C = None

pytestmark = pytest.mark.skipif(_C is None, reason="qvit._C not built")

NAN, INF = float("nan"), float("inf")
KW = dict(signed=True, bits_min=2, bits_max=8)


def _params(G, rows, offset=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    scale = torch.pow(2.0, torch.empty(rows, 7).uniform_(-5, -1, generator=g))
    bits = torch.tensor([3.0, 4.2, 6.0, 7.6, 5.0][:G])
    off = torch.empty(rows, 7).uniform_(-0.1, 0.1, generator=g) if offset else None
    return scale, bits, off


def _bwd(gy, x, scale, bits, off, dim=1):
    """The C backward through the raw binding (fresh outputs)."""
    gx = torch.empty_like(x)
    gs, gb = torch.empty_like(scale), torch.empty_like(bits)
    go = None if off is None else torch.empty_like(off)
    _C.fq_backward(gy, x, scale, bits, off, gx, gs, gb, go, dim=dim, **KW)
    return gx, gs, gb, go


def _fwd(x, scale, bits, off, dim=1):
    y = torch.empty_like(x)
    _C.fq_forward(x, scale, bits, off, y, dim=dim, **KW)
    return y


def _ref_bwd(gy, x, scale, bits, off, dim=1):
    return reference.fake_quant_backward(gy, x, scale, bits, off, signed=True, dim=dim,
                                         bits_range=(2, 8))


def _assert_same(a, b):
    """Bitwise equal, NaN where the other has NaN."""
    assert torch.equal(torch.isnan(a), torch.isnan(b))
    assert torch.equal(a[~torch.isnan(a)], b[~torch.isnan(b)])


def _assert_close_sums(a, b):
    """Parameter gradients: same NaN / Inf pattern, finite values within fp32 sum error."""
    assert torch.equal(torch.isnan(a), torch.isnan(b)), (a, b)
    fin = torch.isfinite(a) & torch.isfinite(b)
    assert torch.equal(torch.isinf(a), torch.isinf(b)), (a, b)
    torch.testing.assert_close(a[fin], b[fin], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# non-finite inputs
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("rows", [3, 1], ids=["own-rows", "shared-row"])
def test_nan_in_x_stays_in_its_element_and_group(rows):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 40) * 0.3               # [B, H, N]: G = 3 heads, dim = 1
    scale, bits, off = _params(3, rows)
    gy = torch.randn_like(x)
    clean = x.clone()
    x[1, 1, 5] = NAN
    clean[1, 1, 5] = 0.0                          # an "inside" value: adds nothing to clip sums

    y = _fwd(x, scale, bits, off)
    _assert_same(y, reference.fake_quant_forward(x, scale, bits, off, dim=1, signed=True))
    nan_y = torch.isnan(y)
    assert nan_y.sum() == 1 and nan_y[1, 1, 5]

    gx, gs, gb, go = _bwd(gy, x, scale, bits, off)
    cgx, cgs, cgb, cgo = _bwd(gy, clean, scale, bits, off)
    rgx, rgs, rgb, rgo = _ref_bwd(gy, x, scale, bits, off)
    _assert_same(gx, rgx)
    assert torch.isnan(gx).sum() == 1 and torch.isnan(gx[1, 1, 5])
    _assert_close_sums(gs, rgs)
    _assert_close_sums(gb, rgb)
    _assert_close_sums(go, rgo)

    # group 1's active scale entry is NaN; with a shared row, so is every group
    # that uses the same entry. Nothing else is NaN.
    k1 = int(torch.round(bits[1])) - 2
    nan_s = torch.isnan(gs)
    assert nan_s[0 if rows == 1 else 1, k1]
    assert nan_s.sum() == 1
    # the bit-width and offset gradients stay finite and equal the clean run
    assert torch.isfinite(gb).all() and torch.isfinite(go).all()
    assert torch.equal(gb, cgb) and torch.equal(go, cgo)
    # the other groups' entries are bitwise those of the clean run
    if rows == 3:
        assert torch.equal(gs[[0, 2]], cgs[[0, 2]])
    else:
        mask = ~nan_s
        assert torch.equal(gs[mask], cgs[mask])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_inf_in_x_clips(dtype):
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    x = (torch.randn(2, 6, 33) * 0.5).to(dtype)
    x[0, 0, 0], x[1, 5, 32], x[1, 2, 7] = INF, -INF, INF
    scale, bits, off = (t if t is None else t.to(pdt) for t in _params(2, 2))
    gy = torch.randn_like(x)
    y = _fwd(x, scale, bits, off)
    _assert_same(y, reference.fake_quant_forward(x, scale, bits, off, dim=1, signed=True))
    assert torch.isfinite(y).all()
    for (i, j, k), top in (((0, 0, 0), True), ((1, 5, 32), False), ((1, 2, 7), True)):
        g = j // 3
        b = int(torch.round(bits[g]))
        s, beta = float(scale[g, b - 2]), float(off[g, b - 2])
        q = 2 ** (b - 1) - 1 if top else -(2 ** (b - 1))
        want = torch.tensor(q, dtype=pdt).to(torch.float32 if pdt == torch.float32 else pdt)
        want = (want * torch.tensor(s, dtype=want.dtype) + torch.tensor(beta, dtype=want.dtype))
        assert float(y[i, j, k]) == float(want.to(dtype))
    gx, gs, gb, go = _bwd(gy, x, scale, bits, off)
    rgx, rgs, rgb, rgo = _ref_bwd(gy, x, scale, bits, off)
    _assert_same(gx, rgx)
    assert gx[0, 0, 0] == 0 and gx[1, 5, 32] == 0 and gx[1, 2, 7] == 0
    for a, b in ((gs, rgs), (gb, rgb), (go, rgo)):
        assert torch.isfinite(a).all()
        _assert_close_sums(a, b)


def test_nan_in_grad_y_stays_in_its_group():
    torch.manual_seed(1)
    x = torch.randn(5, 4, 20) * 0.3
    scale, bits, off = _params(4, 4)
    gy = torch.randn_like(x)
    gy[2, 3, 4] = NAN
    gx, gs, gb, go = _bwd(gy, x, scale, bits, off)
    rgx, rgs, rgb, rgo = _ref_bwd(gy, x, scale, bits, off)
    _assert_same(gx, rgx)
    assert torch.isnan(gx).sum() <= 1
    for a, b in ((gs, rgs), (gb, rgb), (go, rgo)):
        _assert_close_sums(a, b)
    clean = gy.clone()
    clean[2, 3, 4] = 0.0
    cgx, cgs, cgb, cgo = _bwd(clean, x, scale, bits, off)
    assert torch.equal(gs[:3], cgs[:3]) and torch.equal(gb[:3], cgb[:3])
    assert torch.equal(go[:3], cgo[:3])
    assert torch.isnan(gs[3]).any()


def test_nan_through_autograd_op():
    x = (torch.randn(3, 2, 16) * 0.3)
    x[0, 1, 3] = NAN
    scale, bits, off = _params(2, 2)
    leaves = [t.clone().requires_grad_(True) for t in (x, scale, bits, off)]
    y = ops.fake_quant(*leaves, dim=1)
    gy = torch.randn_like(x)
    y.backward(gy)
    rgx, rgs, rgb, rgo = _ref_bwd(gy, x, scale, bits, off)
    _assert_same(y.detach(), reference.fake_quant_forward(x, scale, bits, off, dim=1))
    _assert_same(leaves[0].grad, rgx)
    _assert_close_sums(leaves[1].grad, rgs)
    assert torch.isnan(leaves[1].grad[1]).any() and not torch.isnan(leaves[1].grad[0]).any()
    assert torch.isfinite(leaves[2].grad).all() and torch.isfinite(leaves[3].grad).all()


@pytest.mark.parametrize("s", [1e-45, 1e-38, 1e-30, 3e38], ids=["denorm", "min-normal", "tiny",
                                                                   "huge"])
def test_extreme_but_valid_scales_match_reference(s):
    x = torch.randn(7, 50) * 3
    scale = torch.full((1, 7), s)
    bits = torch.tensor([4.0])
    gy = torch.randn_like(x)
    y = _fwd(x, scale, bits, None, dim=0)
    _assert_same(y, reference.fake_quant_forward(x, scale, bits, None, dim=0))
    gx, gs, gb, _ = _bwd(gy, x, scale, bits, None, dim=0)
    rgx, rgs, rgb, _ = _ref_bwd(gy, x, scale, bits, None, dim=0)
    _assert_same(gx, rgx)
    _assert_close_sums(gs, rgs)
    _assert_close_sums(gb, rgb)


# ---------------------------------------------------------------------------
# hand-built DLPack tensors: sizes the producers cannot make (regressions)
# ---------------------------------------------------------------------------

SC = np.full((1, 7), 0.1, np.float32)
B4 = np.full(1, 4.0, np.float32)


def _raw_pair(shape, n=8):
    buf = np.zeros(n, np.float32)
    return RawTensor(shape, buffer=buf), RawTensor(shape, buffer=np.zeros(n, np.float32))


@pytest.mark.parametrize("shape,msg", [
    ([-2, -3], "negative size"),                # product 6 > 0: used to run over 6 elements
    ([4, -1], "negative size"),
    ([2**62 + 1, 4], "more than 2\\^63"),       # product wraps to 4: used to run
    ([2**32, 2**32, 2], "more than 2\\^63"),    # wraps to 0
])
def test_raw_sizes_rejected(shape, msg):
    x, y = _raw_pair(shape)
    with pytest.raises(ValueError, match="qvit: x .*" + msg):
        _C.fq_forward(x.capsule, SC, B4, None, y.capsule, dim=0, **KW)


def test_raw_negative_ndim_rejected():
    x = RawTensor([3], buffer=np.zeros(3, np.float32), ndim=-1)
    with pytest.raises(ValueError, match="qvit: x has an invalid DLPack shape"):
        _C.fq_forward(x.capsule, SC, B4, None, np.zeros(3, np.float32), dim=0, **KW)


@pytest.mark.parametrize("shape", [[0, 2**40, 2**40], [2**40, 2**40, 0], [2**40, 0, 2**40]])
def test_empty_with_huge_sizes_no_overflow(shape):
    # The element count is 0 but partial products of the other sizes overflow
    # int64 (UBSan: signed-integer-overflow in the layout code before the fix).
    x, y = _raw_pair(shape)
    assert _C.fq_forward(x.capsule, SC, np.full(2, 4.0, np.float32), None, y.capsule,
                         dim=1, **KW) is not None
    gy, x = _raw_pair(shape)
    gx = RawTensor(shape, buffer=np.zeros(8, np.float32))
    gs, gb = np.full((1, 7), 9.0, np.float32), np.full(2, 9.0, np.float32)
    _C.fq_backward(gy.capsule, x.capsule, SC, np.full(2, 4.0, np.float32), None, gx.capsule,
                   gs, gb, None, dim=1, **KW)
    assert not gs.any() and not gb.any()  # empty x: zero gradients


@pytest.mark.skipif(_C is not None and _C.cuda_device_count() > 0,
                    reason="a real GPU would be handed host pointers")
@pytest.mark.parametrize("stream", [None, 0])
def test_cuda_capsule_without_driver_raises(stream):
    """A CUDA-device DLPack tensor on a machine without a GPU / driver: a
    ValueError (built without CUDA), KernelError (no driver) or torch's own
    RuntimeError (stream=None asks torch for the current stream), never a crash."""
    def cuda(shape, fill):
        return RawTensor(shape, buffer=np.full(max(math.prod(shape), 1), fill, np.float32),
                         device=(2, 0))
    x, y, sc, b = cuda([8], 0.5), cuda([8], 0.0), cuda([1, 7], 0.1), cuda([1], 4.0)
    with pytest.raises((ValueError, RuntimeError)):
        _C.fq_forward(x.capsule, sc.capsule, b.capsule, None, y.capsule, dim=0,
                      stream=stream, **KW)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
@pytest.mark.parametrize("arg", ["x", "y", "scale"])
def test_misaligned_numpy_rejected(dtype, arg):
    # NumPy exports unaligned views through DLPack; the kernels load whole
    # elements (UBSan: misaligned load; vector code may fault). Now a ValueError.
    def unaligned(a):
        raw = np.zeros(a.nbytes + 1, np.uint8)
        u = np.frombuffer(raw.data, dtype=a.dtype, count=a.size, offset=1).reshape(a.shape)
        u[...] = a
        return u
    pdt = np.float64 if dtype == np.float64 else np.float32
    args = dict(x=np.random.randn(100).astype(dtype), y=np.zeros(100, dtype),
                scale=np.full((1, 7), 0.1, pdt))
    args[arg] = unaligned(args[arg])
    with pytest.raises(ValueError, match=f"qvit: {arg} is not aligned"):
        _C.fq_forward(args["x"], args["scale"], np.full(1, 4.0, pdt), None, args["y"],
                      dim=0, **KW)


@pytest.mark.parametrize("shape", [(2, 0, 3, 8), (0,), (5, 0), (0, 7, 1)])
def test_empty_numpy_arrays_accepted(shape):
    # NumPy gives empty arrays all-zero strides; they used to be rejected as
    # non-contiguous.
    x = np.zeros(shape, np.float16)
    y = _C.fq_forward(x, SC, B4, None, None, dim=0, **KW)
    assert y.shape == shape
    gx, gs, gb, go = _C.fq_backward(x, x, SC, B4, None, None, None, None, None, dim=0, **KW)
    assert gx.shape == shape and not gs.any() and not gb.any() and go is None


# ---------------------------------------------------------------------------
# > 2^31 elements
# ---------------------------------------------------------------------------

def _mem_available_gib():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


P = 1021  # period of the input pattern: prime, so 2^32 mod P != 0


@pytest.mark.slow
@pytest.mark.skipif(_mem_available_gib() < 10.5, reason="needs ~9 GiB free memory (fp16 x and y "
                    "of 2^31+ elements)")
def test_more_than_2_31_elements_fp16():
    """fp16 x of 4 groups x 2^29+ elements (2^31 + 4*P*k total, 4.3 GB): forward
    and backward against the closed form, checked in chunks without float64
    copies. Group 3 straddles element 2^31; every group has its own bits /
    scale / offset, so an index that wrapped at 2^31 (or 2^32 bytes) would read
    another group's parameters or another phase of the pattern. The groups of
    the per-group sums hold 2^29+ elements each; the per-tensor case (one group
    of > 2^31 elements) runs on the same buffers. Cost: peak RSS ~9.1 GB and
    ~60-70 s of CPU time (4 kernel passes and 4 bitwise compares over 2^31
    elements): about 40 s on an idle 2-core machine; slow-marked."""
    m = (2**29) // P + 1                                  # periods per group
    inner = m * P                                         # > 2^29: 4 groups > 2^31
    n = 4 * inner
    assert n > 2**31
    pattern = (torch.linspace(-1.0, 1.0, P, dtype=torch.float64) * 2.3
               + 0.37 * torch.sin(torch.arange(P, dtype=torch.float64))).to(torch.float16)
    x = torch.empty(n, dtype=torch.float16)
    x.view(4 * m, P).copy_(pattern)
    y = torch.empty_like(x)
    scale = torch.tensor([[0.05, 0.04, 0.03, 0.02, 0.011, 0.007, 0.005]]).repeat(4, 1)
    scale = scale * torch.tensor([[1.0], [1.3], [0.7], [1.1]])
    bits = torch.tensor([3.0, 5.0, 8.0, 4.0])
    off = torch.tensor([[0.01], [-0.02], [0.0], [0.03]]).repeat(1, 7)
    chunk = 8192  # periods per comparison chunk

    def check(out, table, g):
        # bitwise, as int16 (twice as fast as an fp16 compare)
        rows = out.view(torch.int16).view(4, m, P)[g]
        table = table.view(torch.int16)
        for r0 in range(0, m, chunk):
            blk = rows[r0:r0 + chunk]
            assert torch.equal(blk, table.expand_as(blk)), (g, r0)

    for G in (4, 1):  # per-head (4 groups) and per-tensor (1 group of n elements)
        sc, bt, of = (scale, bits, off) if G == 4 else (scale[:1], bits[3:], off[:1])
        _C.fq_forward(x.view(4, inner), sc, bt, of, y.view(4, inner), dim=0, **KW)
        for g in range(4):
            gi = g if G == 4 else 0
            table = reference.fake_quant_forward(pattern, sc[gi:gi + 1], bt[gi:gi + 1],
                                                 of[gi:gi + 1], signed=True)
            check(y, table, g)
        # backward: grad_y = x (inputs may share memory; only outputs may not)
        gs, gb, go = torch.empty_like(sc), torch.empty_like(bt), torch.empty_like(of)
        _C.fq_backward(x.view(4, inner), x.view(4, inner), sc, bt, of, y.view(4, inner),
                       gs, gb, go, dim=0, **KW)
        want_s, want_b, want_o = torch.zeros(sc.shape, dtype=torch.float64), [], \
            torch.zeros(sc.shape, dtype=torch.float64)
        for g in range(4):  # grad_x (written over y) against the pattern's closed form
            gi = g if G == 4 else 0
            pg = reference.fake_quant_backward(pattern, pattern, sc[gi:gi + 1], bt[gi:gi + 1],
                                               of[gi:gi + 1], signed=True, grad_scale=1.0)
            check(y, pg[0], g)
        # sums: each group holds m (G=4) or 4m (G=1) copies of the pattern
        copies = m if G == 4 else 4 * m
        n_group = n // G
        for gi in range(G):
            b = int(bt[gi])
            pg = reference.fake_quant_backward(pattern.double(), pattern.double(),
                                               sc[gi:gi + 1].double(), bt[gi:gi + 1].double(),
                                               of[gi:gi + 1].double(), signed=True,
                                               grad_scale=1.0)
            qp = 2 ** (b - 1) - 1
            want_s[gi] = pg[1][0] * copies / math.sqrt(n_group * qp)
            want_b.append(float(pg[2][0]) * copies)
            want_o[gi] = pg[3][0] * copies
        torch.testing.assert_close(gs.double(), want_s, rtol=2e-5, atol=1e-6)
        torch.testing.assert_close(gb.double(), torch.tensor(want_b, dtype=torch.float64),
                                   rtol=2e-5, atol=1e-3)
        torch.testing.assert_close(go.double(), want_o, rtol=2e-5, atol=1e-3)


# ---------------------------------------------------------------------------
# threads
# ---------------------------------------------------------------------------

def _case(seed, n=3 * 40000):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, n // 3, generator=g) * 0.4      # > 16384 elements: the GIL is released
    scale, bits, off = _params(3, 3, seed=seed)
    gy = torch.randn(x.shape, generator=g)
    return gy, x, scale, bits, off


def _run(gy, x, scale, bits, off, num_threads=0):
    y = torch.empty_like(x)
    _C.fq_forward(x, scale, bits, off, y, dim=0, num_threads=num_threads, **KW)
    gx, gs, gb, go = (torch.empty_like(t) for t in (x, scale, bits, off))
    _C.fq_backward(gy, x, scale, bits, off, gx, gs, gb, go, dim=0,
                   num_threads=num_threads, **KW)
    return y, gx, gs, gb, go


def _equal(a, b):
    return all(torch.equal(u, v) for u, v in zip(a, b))


def test_concurrent_python_threads_match_sequential():
    cases = [_case(s) for s in range(6)]
    want = [_run(*c) for c in cases]
    errors, got = [], {}

    def worker(i):
        try:
            for rep in range(6):
                r = _run(*cases[(i + rep) % len(cases)])
                got.setdefault((i + rep) % len(cases), []).append(r)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a worker thread hung"
    assert not errors, errors
    assert sum(len(v) for v in got.values()) == 24
    for k, results in got.items():
        for r in results:
            assert _equal(r, want[k]), f"case {k} differs when run concurrently"


def test_thread_count_does_not_change_results():
    case = _case(11, n=3 * 70000)
    base = _run(*case, num_threads=1)
    for nt in (2, 3, 7):
        assert _equal(_run(*case, num_threads=nt), base), nt
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _op_results(case)
        torch.set_num_threads(max(old, 2))
        many = _op_results(case)
    finally:
        torch.set_num_threads(old)
    assert _equal(one, many)


def _op_results(case):
    gy, x, scale, bits, off = case
    leaves = [t.clone().requires_grad_(True) for t in (x, scale, bits, off)]
    y = ops.fake_quant(*leaves, dim=0)
    y.backward(gy)
    return [y.detach()] + [t.grad for t in leaves]


def test_op_passes_torch_thread_count(monkeypatch):
    """ops.fake_quant hands torch.get_num_threads() to the kernel's OpenMP team."""
    seen = []
    real = ops._C

    class Spy:
        def __getattr__(self, name):
            attr = getattr(real, name)
            if name in ("fq_forward", "fq_backward"):
                def wrapped(*a, **k):
                    seen.append((name, k.get("num_threads")))
                    return attr(*a, **k)
                return wrapped
            return attr

    monkeypatch.setattr(ops, "_C", Spy())
    case = _case(3, n=3 * 100)
    old = torch.get_num_threads()
    try:
        for nt in (1, 2):
            torch.set_num_threads(nt)
            seen.clear()
            _op_results(case)
            assert seen == [("fq_forward", nt), ("fq_backward", nt)]
    finally:
        torch.set_num_threads(old)


_THREAD_PROBE = r"""
import os, sys, torch
from qvit.ops import torch_ops as ops
def tasks():
    return len(os.listdir("/proc/self/task"))
torch.set_num_threads(int(sys.argv[1]))
x = torch.randn(400000)
scale, bits = torch.full((1, 7), 0.05), torch.tensor([4.0])
n0 = tasks()
peak = n0
for _ in range(5):
    y = ops.fake_quant(x.requires_grad_(True), scale, bits)
    y.sum().backward()
    peak = max(peak, tasks())
print(n0, peak)
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs /proc (Linux)")
@pytest.mark.parametrize("nt", [1, 2])
def test_op_honours_torch_thread_count_in_os_threads(nt):
    """In a fresh process, the op's OpenMP team uses torch.get_num_threads()
    threads: with 1 no thread is started, with 2 at most one (the team shares
    libgomp with torch, so torch's own pool threads are reused)."""
    import subprocess
    out = subprocess.run([sys.executable, "-c", _THREAD_PROBE, str(nt)], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "8"})
    assert out.returncode == 0, out.stderr
    n0, peak = map(int, out.stdout.split())
    assert peak - n0 <= nt - 1, (n0, peak)


def test_threads_do_not_accumulate():
    """Repeated calls (also with num_threads far above the core count) reuse
    the OpenMP pool: the process's thread count stops growing."""
    case = _case(5, n=3 * 40000)
    counts = []
    for _ in range(4):
        _run(*case, num_threads=16)
        counts.append(len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task")
                      else 0)
    assert counts[-1] == counts[1], counts


# ---------------------------------------------------------------------------
# leaks
# ---------------------------------------------------------------------------

@pytest.mark.skipif("libasan" in os.environ.get("LD_PRELOAD", ""),
                    reason="under ASan freed memory sits in the quarantine: RSS is no leak signal")
def test_no_leak_over_many_calls():
    """RSS and tracemalloc stay flat over thousands of calls (valid and failing
    ones, NumPy / torch / raw capsules); input refcounts are checked per call."""
    import fuzz_binding
    assert fuzz_binding.leak_check(1000, max_rss_mb=8.0, max_traced_kb=256.0, max_numel=512)


# ---------------------------------------------------------------------------
# outputs are torch's own tensors
# ---------------------------------------------------------------------------

def test_outputs_are_torch_allocations_that_resize():
    """y and grad_x come from torch's allocator (no private cache): their storage
    resizes in place, and the values kept are the op's (checked against the reference)."""
    x = torch.randn(4, 512, 1024)  # 8 MiB: the size a private output cache used to take
    scale = torch.full((1, 7), 0.05, requires_grad=True)
    bits = torch.tensor([4.0], requires_grad=True)
    xr = x.clone().requires_grad_(True)
    y = ops.fake_quant(xr, scale, bits)
    gy = torch.randn_like(x)
    y.backward(gy)
    want_y = reference.fake_quant_forward(x, scale.detach(), bits.detach(), None, signed=True,
                                          dim=0, bits_range=(2, 8))
    want_gx = reference.fake_quant_backward(gy, x, scale.detach(), bits.detach(), None,
                                            signed=True, dim=0, bits_range=(2, 8))[0]
    for out, want in ((y.detach(), want_y), (xr.grad, want_gx)):
        n = out.numel()
        out.resize_(2 * n)                 # grows the storage in place
        assert out.untyped_storage().nbytes() >= 2 * n * out.element_size()
        assert torch.equal(out[:n], want.reshape(-1))
        out.resize_(3, 5)
        assert out.shape == (3, 5)
