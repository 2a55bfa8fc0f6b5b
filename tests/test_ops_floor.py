"""The lean eager path of qvit.ops.fake_quant (issue 11 item 3).

* The argument checks' outcome is cached by the arguments' types, shapes,
  dtypes, devices and layouts: a call that differs in any of them from a
  cached one is checked again and raises what an uncached call raises.
* The autograd Function's backward allocates no empty grad_offset; the raw op
  and ``fq_backward`` still return one (their schema), with the same gradients.

Timing lives in benchmarks/bench_floor.py, not here.
"""
import os
import sys

import pytest
import torch

from helpers import assert_bitwise
from qvit.ops import checks, reference, torch_ops as ops
from test_ops_errors import BAD_ARGS, args, call


@pytest.fixture
def fresh_cache(monkeypatch):
    cache = {}
    monkeypatch.setattr(checks, "_CHECKED", cache)
    return cache


@pytest.fixture
def count_checks(monkeypatch, fresh_cache):
    calls = []
    full = checks.validate

    def counting(*a):
        calls.append(1)
        return full(*a)

    monkeypatch.setattr(checks, "validate", counting)
    return calls


def test_checks_run_once_per_key(count_checks):
    scale, bits = torch.full((1, 7), 0.1), torch.tensor([4.0])
    for _ in range(3):
        ops.fake_quant(torch.randn(4, 6), scale, bits)
    assert len(count_checks) == 1
    ops.fake_quant(torch.randn(4, 7), scale, bits)            # new shape
    ops.fake_quant(torch.randn(4, 6).double(), scale.double(), bits.double())   # new dtypes
    ops.fake_quant(torch.randn(4, 6), scale, bits, signed=False)                 # new flag
    ops.fake_quant(torch.randn(4, 6), scale, bits, dim=1)                        # new dim
    ops.fake_quant(torch.randn(4, 6), scale, bits, torch.zeros(1, 7))            # an offset
    assert len(count_checks) == 6
    ops.fake_quant(torch.randn(4, 7), scale, bits)
    assert len(count_checks) == 6


@pytest.mark.parametrize("over", [dict(grad_scale=0.5), dict(bits_range=[2, 8])],
                         ids=["grad_scale", "list_range"])
def test_other_argument_types_are_always_checked(count_checks, over):
    for _ in range(2):
        call(args(**over))
    assert len(count_checks) == 2


@pytest.mark.parametrize("over,exc,msg", BAD_ARGS, ids=[m for _, _, m in BAD_ARGS])
def test_bad_arguments_after_a_cached_good_call(fresh_cache, over, exc, msg):
    """Each bad call differs from the cached good one in one argument (or in a
    value equal across types: signed=1 vs True, dim=0.0 vs 0, (2.0, 8) vs (2, 8))."""
    call(args())
    assert fresh_cache
    with pytest.raises(exc, match=msg):
        call(args(**over))


# (a good call, the bad call made after it: it differs in one argument)
SIBLINGS = [
    (dict(signed=False, bits_range=(1, 8), scale=torch.full((1, 8), 0.1)),
     dict(signed=True, bits_range=(1, 8), scale=torch.full((1, 8), 0.1)),
     ValueError, "signed quantizer needs bits_range min >= 2"),
    (dict(x=torch.randn(4, 8), bits=torch.full((4,), 4.0), dim=1),
     dict(x=torch.randn(4, 6), bits=torch.full((4,), 4.0), dim=1),
     ValueError, "not divisible by the 4 groups"),
    (dict(x=torch.randn(4, 8), bits=torch.full((4,), 4.0), dim=1),
     dict(x=torch.randn(4, 8), bits=torch.full((4,), 4.0), dim=True),
     TypeError, "dim must be an int"),
    (dict(x=torch.randn(4, 8), bits=torch.full((4,), 4.0), dim=1),
     dict(x=torch.randn(4, 8), bits=torch.full((4,), 4.0), dim=2),
     ValueError, "dim=2 is out of range"),
    (dict(offset=torch.zeros(1, 7)), dict(offset=torch.zeros(1, 7, dtype=torch.float64)),
     TypeError, "offset must be float32"),
    (dict(offset=torch.zeros(1, 7)), dict(offset=torch.zeros(1, 7, device="meta")),
     ValueError, "offset is on meta"),
    (dict(offset=torch.zeros(1, 7)), dict(offset=torch.zeros(1, 7).to_sparse()),
     TypeError, "offset must be a dense"),
    (dict(offset=torch.zeros(1, 7)), dict(offset=torch.zeros(1, 6)),
     ValueError, "offset must have the shape of scale"),
    (dict(bits_range=(3, 8), scale=torch.full((1, 6), 0.1)),
     dict(bits_range=(3, 9), scale=torch.full((1, 6), 0.1)),
     ValueError, r"scale must have shape \[1, 7\]"),
]


@pytest.mark.parametrize("good,bad,exc,msg", SIBLINGS, ids=[m for *_, m in SIBLINGS])
def test_bad_sibling_of_a_cached_good_call(fresh_cache, good, bad, exc, msg):
    call(args(**good))
    with pytest.raises(exc, match=msg):
        call(args(**bad))


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_strided_nested_x_after_a_cached_call(fresh_cache):
    nt = torch.nested.nested_tensor([torch.randn(2, 6), torch.randn(3, 6)])
    call(args())
    with pytest.raises(TypeError, match="x must be a dense"):
        call(args(x=nt))


def test_cache_is_bounded(monkeypatch, fresh_cache):
    monkeypatch.setattr(checks, "_CHECKED_MAX", 3)
    scale, bits = torch.full((1, 7), 0.1), torch.tensor([4.0])
    for n in range(1, 8):
        ops.fake_quant(torch.randn(n), scale, bits)
        assert 1 <= len(fresh_cache) <= 3


def test_cached_call_off_cpu_and_cuda_still_uses_the_reference(fresh_cache):
    for _ in range(2):
        y = ops.fake_quant(torch.randn(10, device="meta"), torch.ones(1, 7, device="meta"),
                           torch.full((1,), 4.0, device="meta"))
        assert y.device.type == "meta" and y.shape == (10,)


@pytest.mark.parametrize("with_offset", [False, True])
@pytest.mark.parametrize("grads", ["x,s,b", "x", "s,b"])
def test_cached_calls_match_reference_and_raw_op(needs_c, fresh_cache, with_offset, grads):
    """Repeated calls (the second and third from the cache) give the reference's
    values and gradients, and the Function's gradients are the raw op's, bit for bit."""
    gen = torch.Generator().manual_seed(5)
    x0 = torch.randn(3, 8, 5, generator=gen)
    gy = torch.randn(3, 8, 5, generator=gen)
    s0 = torch.rand(4, 7, generator=gen) * 0.1 + 0.05
    b0 = torch.tensor([2.4, 3.6, 5.1, 8.7])
    o0 = torch.randn(4, 7, generator=gen) * 0.01 if with_offset else None
    for _ in range(3):
        x, s, b = (t.clone().requires_grad_(n in grads.split(","))
                   for t, n in ((x0, "x"), (s0, "s"), (b0, "b")))
        o = None if o0 is None else o0.clone().requires_grad_("s" in grads)
        y = ops.fake_quant(x, s, b, o, dim=1, signed=False)
        y.backward(gy)
        xr, sr, br = (t.clone().requires_grad_() for t in (x0, s0, b0))
        orr = None if o0 is None else o0.clone().requires_grad_()
        yr = reference.fake_quant(xr, sr, br, orr, dim=1, signed=False)
        yr.backward(gy)
        torch.testing.assert_close(y, yr, rtol=0, atol=1e-6)
        raw = torch.ops.qvit.fq_backward.default(gy, x0, s0, b0, o0, 1, False, 2, 8, -1.0)
        for got, want, ref in zip((x, s, b, o), raw, (xr, sr, br, orr)):
            if got is None:
                continue
            if not got.requires_grad:
                assert got.grad is None
                continue
            assert_bitwise(got.grad, want, "Function vs raw op")
            torch.testing.assert_close(got.grad, ref.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("direct", [True, False])
def test_fq_backward_keeps_its_empty_grad_offset(needs_c, monkeypatch, direct):
    """The public kernel entry and the op keep four tensors, the last empty without offset."""
    monkeypatch.setattr(ops, "EAGER_FAST_PATH", direct)
    x, gy = torch.randn(4, 6), torch.randn(4, 6)
    s, b = torch.full((1, 7), 0.1), torch.tensor([4.0])
    got = ops.fq_backward(gy, x, s, b, None, 0, True, 2, 8, -1.0)
    raw = torch.ops.qvit.fq_backward.default(gy, x, s, b, None, 0, True, 2, 8, -1.0)
    assert len(got) == 4 and got[3].shape == (0,) and got[3].dtype == s.dtype
    for g, r in zip(got[:3], raw[:3]):
        assert_bitwise(g, r, "fq_backward vs raw op")


class _DuckTensor:
    """Has a tensor's attributes (one unhashable) but is no tensor."""
    shape, dtype, device, layout, is_nested = [4, 6], torch.float32, "cpu", torch.strided, False


def test_duck_typed_x_gets_the_type_error(fresh_cache):
    call(args())
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        call(args(x=_DuckTensor()))


def test_bench_floor_smoke(needs_c, capsys):
    """benchmarks/bench_floor.py runs and prints every contender (timing logic, not speed)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                    "benchmarks"))
    bench_floor = pytest.importorskip("bench_floor")
    threads = torch.get_num_threads()
    try:
        assert bench_floor.main(["--rounds", "1", "--per-round", "1", "--calls", "2"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    for name in ("x*2", "py-function", "py-function x,s,b", "fq s,b", "fq x-only", "Quantizer",
                 "x*2 fwd", "py-function fwd", "fq fwd"):
        assert f"| {name} " in out
