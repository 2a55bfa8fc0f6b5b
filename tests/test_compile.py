"""torch.compile traces the op (fake kernels, autograd.Function) without graph breaks.

Compiling is slow on the CPU, so there are few tests here: one through
AOTAutograd with the eager backend (what checks the fake kernels and the
traced backward), one through Inductor (marked slow).
"""
import pytest
import torch

from helpers import assert_bitwise, make_params, tie_free_input
from qvit.ops import torch_ops as ops


def _inputs(seed=0):
    shape, dim, g = (4, 3, 10, 8), 1, 3
    scale, bits, offset = make_params(g, scale_rows=g, offset=True, seed=seed)
    x = tie_free_input(shape, dim, scale, bits, offset, signed=False, seed=seed + 1)
    return x, scale, bits, offset, dim


def _loss(x, scale, bits, offset, dim):
    y = ops.fake_quant(x * 1.0, scale, bits, offset, signed=False, dim=dim)
    return (y * torch.linspace(-1, 1, y.shape[-1])).sum()


def _grads(fn, x, scale, bits, offset, dim):
    leaves = [t.clone().requires_grad_() for t in (x, scale, bits, offset)]
    loss = fn(*leaves, dim)
    loss.backward()
    return [loss.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("backend", [
    "aot_eager",
    pytest.param("inductor", marks=pytest.mark.slow),
])
def test_compile_fullgraph_matches_eager(needs_c, backend):
    torch._dynamo.reset()
    x, scale, bits, offset, dim = _inputs()
    eager = _grads(_loss, x, scale, bits, offset, dim)
    compiled_fn = torch.compile(_loss, fullgraph=True, backend=backend)
    compiled = _grads(compiled_fn, x, scale, bits, offset, dim)
    for name, a, b in zip(("loss", "x", "scale", "bits", "offset"), compiled, eager):
        if backend == "inductor":
            # Inductor generates its own code for the surrounding ops (the
            # weights, the sum), so upstream gradients may differ by an ulp.
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
        else:
            assert_bitwise(a, b, name)
    # new parameter values reuse the compiled graph (bits and scales are tensors)
    x2, scale2, bits2, offset2, _ = _inputs(seed=5)
    again = _grads(compiled_fn, x2, scale2, bits2, offset2, dim)
    eager2 = _grads(_loss, x2, scale2, bits2, offset2, dim)
    torch.testing.assert_close(again[3], eager2[3], rtol=1e-5, atol=1e-6)
