"""Shared fixtures: one op test-suite parametrised over reference / cpu / cuda.

``impl`` yields an :class:`Impl`: a device and a ``fake_quant`` callable with
the public signature that returns an autograd-tracked ``y``. The "reference"
implementation is the autograd composite ``qvit.reference.fake_quant`` (held
to the closed forms like the kernels are); "cpu" and "cuda" are
``qvit.ops.fake_quant`` on that device, i.e. the C / CUDA kernels.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Callable

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # make tests/helpers.py importable

from qvit.ops import reference, torch_ops as ops  # noqa: E402

_INFO = ops.backend_info()


def _cpu_skip():
    if not _INFO["c_loaded"]:
        return f"qvit._C not available: {_INFO['c_import_error']}"
    return None


def _cuda_skip():
    if not _INFO["c_loaded"]:
        return f"qvit._C not available: {_INFO['c_import_error']}"
    if not _INFO["cuda_built"]:
        return "qvit._C was built without CUDA"
    if not torch.cuda.is_available() or _INFO["cuda_devices"] <= 0:
        return "no CUDA device"
    return None


def _emu_skip():
    from cuda_emu import emu
    why = emu.unavailable()
    if why is None and "libasan" in os.environ.get("LD_PRELOAD", ""):
        why = "ASan is preloaded (scripts/run_sanitizers.sh), and it does not support the " \
              "emulation's ucontext coroutines"
    return f"host emulation of the CUDA kernels: {why}" if why else None


SKIP_REASON = {"reference": None, "cpu": _cpu_skip(), "cuda": _cuda_skip(), "cuda_emu": _emu_skip()}


@dataclasses.dataclass(frozen=True)
class Impl:
    name: str
    device: torch.device
    fake_quant: Callable

    def to(self, t):
        return None if t is None else t.to(self.device)


def _emu_fake_quant(*args, **kwargs):
    from cuda_emu import op
    return op.fake_quant(*args, **kwargs)


IMPLS = {
    "reference": Impl("reference", torch.device("cpu"), reference.fake_quant),
    "cpu": Impl("cpu", torch.device("cpu"), ops.fake_quant),
    "cuda": Impl("cuda", torch.device("cuda"), ops.fake_quant),
    # the CUDA source's launchers and kernels run by the host emulation (tests/cuda_emu)
    "cuda_emu": Impl("cuda_emu", torch.device("cpu"), _emu_fake_quant),
}


def _param(name):
    reason = SKIP_REASON[name]
    marks = [pytest.mark.skip(reason=reason)] if reason else []
    if name == "cuda":
        marks.append(pytest.mark.cuda)
    if name == "cuda_emu":
        marks.append(pytest.mark.cuda_emu)
    return pytest.param(name, marks=marks, id=name)


IMPL_NAMES = ("reference", "cpu", "cuda", "cuda_emu")


def impl_dtype_grid(dtypes):
    """(impl, dtype) parameters for ``indirect=["impl"]``: every implementation with every
    dtype it accepts. float64 is a CPU-only (gradcheck) dtype: the CUDA op refuses it
    (tests/test_cuda.py checks the refusal), so those pairs are not in the grid at all."""
    out = []
    for n in IMPL_NAMES:
        p = _param(n)
        for d in dtypes:
            if n in ("cuda", "cuda_emu") and d == torch.float64:
                continue
            out.append(pytest.param(n, d, marks=p.marks, id=f"{n}-{str(d).replace('torch.', '')}"))
    return out


@pytest.fixture(params=[_param(n) for n in IMPL_NAMES])
def impl(request) -> Impl:
    """Every implementation of the op (skips carry a reason)."""
    return IMPLS[request.param]


@pytest.fixture(params=[_param(n) for n in ("cpu", "cuda")])
def kernel(request) -> Impl:
    """The compiled kernels only (C on the CPU, CUDA)."""
    return IMPLS[request.param]


@pytest.fixture
def needs_c():
    reason = SKIP_REASON["cpu"]
    if reason:
        pytest.skip(reason)
