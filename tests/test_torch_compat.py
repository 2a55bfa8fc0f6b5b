"""Which torch interfaces qvit uses, and the fallback where a torch lacks one.

These run in every environment, and in CI also under the second torch version
(``scripts/run_torch_compat.sh``: the same wheel under torch 2.13.0 and the
main environment's torch). Each states which path ran, so a torch that silently
lost an interface shows up as a failed assertion, not as a slower run.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from qvit.ops import torch_ops as ops

needs_c = pytest.mark.skipif(ops._C is None, reason="qvit._C not built")

_NAMES = ("__dlpack_c_exchange_api__", "__c_dlpack_exchange_api__")


@needs_c
def test_exchange_api_is_used_when_torch_has_one():
    offered = [n for n in _NAMES if getattr(torch.Tensor, n, None) is not None]
    info = ops.backend_info()
    assert info["exchange_api"] == (offered[0] if offered else "to_dlpack"), torch.__version__


def test_fake_kernels_are_registered():
    """``torch.library.register_fake`` (torch >= 2.4) gave both ops a meta kernel."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x = torch.empty(4, 6)
        y = torch.ops.qvit.fq_forward(x, torch.empty(1, 7), torch.empty(1), None, 0, True, 2, 8)
        gx, gs, gb, go = torch.ops.qvit.fq_backward(x, x, torch.empty(1, 7), torch.empty(1), None,
                                                    0, True, 2, 8, 1.0)
    assert y.shape == x.shape and gx.shape == x.shape
    assert gs.shape == (1, 7) and gb.shape == (1,) and go.numel() == 0


_WITHOUT_API = textwrap.dedent("""
    import sys
    import torch
    for name in {names!r}:           # a torch from before the DLPack C exchange API
        if name in vars(torch.Tensor):
            delattr(torch.Tensor, name)
    sys.path.insert(0, {tests!r})
    import qvit
    assert qvit.__file__ == {qvit_file!r}, qvit.__file__
    from qvit.ops import reference, torch_ops as ops
    from helpers import make_params, tie_free_input
    assert ops.backend_info()["exchange_api"] == "to_dlpack", ops.backend_info()
    scale, bits, offset = make_params(3, scale_rows=3, offset=True, seed=61)
    x = tie_free_input((2, 3, 5, 4), 1, scale, bits, offset, signed=False, seed=62)
    gy = torch.randn(x.shape, generator=torch.Generator().manual_seed(63))
    xs, ss, os_ = (t.clone().requires_grad_(True) for t in (x, scale, offset))
    y = ops.fake_quant(xs, ss, bits, os_, signed=False, dim=1)
    y.backward(gy)
    kw = dict(signed=False, dim=1)
    ry = reference.fake_quant_forward(x, scale, bits, offset, **kw)
    rgx, rgs, _, rgo = reference.fake_quant_backward(gy, x, scale, bits, offset, **kw)
    assert torch.equal(y, ry) and torch.equal(xs.grad, rgx)
    torch.testing.assert_close(ss.grad, rgs.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(os_.grad, rgo.float(), rtol=1e-5, atol=1e-6)
    print("capsule path ok")
""")


@needs_c
def test_torch_without_exchange_api_goes_through_capsules(tmp_path):
    """Imported under a torch without the exchange API, qvit passes ``to_dlpack``
    capsules; forward and grad_x equal the reference bitwise, parameter gradients
    (sums) within 1e-5."""
    import qvit
    code = _WITHOUT_API.format(names=_NAMES, tests=os.path.dirname(os.path.abspath(__file__)),
                               qvit_file=qvit.__file__)
    # cwd: an empty folder, so that the subprocess imports the same qvit as this one
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "capsule path ok" in res.stdout
