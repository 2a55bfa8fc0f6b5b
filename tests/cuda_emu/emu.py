"""Builds csrc/fq_cuda.cu (kernels: fq_cuda_kernels.cuh) for the host emulation here, and calls it.

``build(outdir)`` rewrites the kernel launches (``k<<<grid, block, smem,
stream>>>(args)`` becomes ``sim_launch(grid, block, <k's __launch_bounds__>,
<k's instance name>, [&] { k(args); })``), the 16-byte vector casts (into
alignment-checked ``sim_vec``) and the ``__shared__`` declarations (into
statics registered for poisoning), swaps ``cuda_runtime.h`` for
``sim_cuda.h`` and compiles a shared library
with g++ against the CUDA headers (for cuda_fp16.h / cuda_bf16.h). The
library exports the real ``extern "C"`` launchers of qvit.h, so the tests
drive them through a ctypes copy of ``qvit_fq_params`` with CPU tensors
standing in for device memory. ``sim_sms`` / ``sim_bps`` set the SM count
and resident blocks per SM the launchers see, to vary the grid geometry.
A fault (sim_cuda.h lists them) raises :class:`EmuFault`; :meth:`Emulated.launches`
returns the kernel instances launched, with their grid and block.
"""
from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CSRC = os.path.join(ROOT, "csrc")


def cuda_include() -> Optional[str]:
    """A directory with cuda_fp16.h, or None."""
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        cands.append(os.path.dirname(os.path.dirname(real)))
    for c in cands:
        if c and os.path.isfile(os.path.join(c, "include", "cuda_fp16.h")):
            return os.path.join(c, "include")
    return None


def unavailable() -> Optional[str]:
    """Why the emulation cannot be built here, or None."""
    if shutil.which("g++") is None:
        return "g++ not found"
    if cuda_include() is None:
        return "CUDA headers (cuda_fp16.h) not found"
    return None


def _split_top(s: str):
    out, depth, cur = [], 0, ""
    for ch in s:
        if ch in "(<":
            depth += 1
        elif ch in ")>":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    out.append(cur.strip())
    return out


def _launch_bounds(src: str) -> dict:
    """Kernel name -> its __launch_bounds__ expression ("1024" without one)."""
    out = {}
    for m in re.finditer(r"__global__\s+void\s+(?:__launch_bounds__\(([^)]*)\)\s+)?(\w+)\s*\(", src):
        out[m.group(2)] = (m.group(1) or "1024").split(",")[0].strip()
    return out


def translate(src: str) -> str:
    """fq_cuda.cu source (kernels inlined) -> host C++ for the emulation.

    Every rewrite that the emulator's checks rely on must happen: a 16-byte
    vector cast left unrewritten would go unchecked, so its absence raises."""
    for inc in ("#include <cuda_bf16.h>\n", "#include <cuda_fp16.h>\n"):
        src = src.replace(inc, "")
    src = src.replace("#include <cuda_runtime.h>\n", '#include "sim_cuda.h"\n')
    bounds = _launch_bounds(src)

    def launch(m):
        kernel, cfg = m.group(1), _split_top(m.group(2))
        name = kernel.split("<")[0]
        if name not in bounds:
            raise RuntimeError(f"launch of {name}, which is not a __global__ function here")
        return (f"sim_launch(dim3({cfg[0]}), dim3({cfg[1]}), {bounds[name]}, sim_kname<&{kernel}>(), "
                f"[&] {{ {kernel}({m.group(3)}); }});")

    src, n = re.subn(r"([A-Za-z_]\w*(?:<[^<>;]*>)?)<<<(.*?)>>>\((.*?)\);", launch, src)
    if n == 0:
        raise RuntimeError("no kernel launch found in fq_cuda.cu")
    # 16-byte vector accesses: checked for alignment
    src = re.sub(r"reinterpret_cast<\s*(const\s+)?uint4\s*\*\s*>\(", r"sim_vec<\1uint4>(", src)
    if re.search(r"uint4\s*\*", src):
        raise RuntimeError("a uint4 pointer cast the emulation does not check")
    # __shared__ arrays: function-local statics, registered to be poisoned
    src, n_sh = re.subn(r"__shared__\s+([\w:<> ]+?)\s+(\w+)\s*((?:\[[^\]]*\])+)\s*;",
                        r"static \1 \2\3; sim_shared(\2, sizeof(\2));", src)
    # the launchers cache device facts; the emulation changes them between calls
    src = re.sub(r"static std::atomic<int> cache\[(\w+)\];",
                 r"std::atomic<int> cache[\1]; for (auto &c_ : cache) c_.store(0);", src)
    src = re.sub(r"const int c = g_sm_count\[device\]\.load\([^)]*\);", "const int c = 0;", src)
    return src


def cuda_source() -> str:
    """fq_cuda.cu with the local headers it includes (the kernels) inlined, so
    that ``translate`` sees the kernels and their launches as one text."""
    with open(os.path.join(CSRC, "fq_cuda.cu")) as f:
        src = f.read()

    def inline(m):
        with open(os.path.join(CSRC, m.group(1))) as f:
            return f.read()

    return re.sub(r'^#include "(\w+\.cuh)"\n', inline, src, flags=re.M)


def build(outdir: str, source: Optional[str] = None, defines=()) -> str:
    """Compile the emulation library into outdir; return its path. ``source``: the CUDA
    source to use instead of csrc's (a mutant, in the tests); ``defines``: -D flags."""
    cpp = translate(cuda_source() if source is None else source)
    src = os.path.join(outdir, "fq_cuda_emu.cpp")
    with open(src, "w") as f:
        f.write(cpp)
    lib = os.path.join(outdir, "libfq_cuda_emu.so")
    # -Bsymbolic: the stub cuda* functions must win over a libcudart that torch
    # may already have loaded into the process.
    cmd = ["g++", "-O1", "-std=c++17", "-fPIC", "-shared", "-Wl,-Bsymbolic", "-fno-strict-aliasing",
           "-ffp-contract=off", "-I" + cuda_include(), "-I" + CSRC, "-I" + HERE,
           *[f"-D{d}" for d in defines], src, os.path.join(HERE, "sim_rt.cpp"),
           # the parameter rules the launchers call (C, shared with the CPU path)
           "-x", "c", os.path.join(CSRC, "fq_params.c"), "-x", "none", "-o", lib]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return lib


class Params(ctypes.Structure):
    """ctypes mirror of qvit_fq_params (csrc/qvit.h)."""
    _fields_ = (
        [("outer", ctypes.c_int64), ("groups", ctypes.c_int64), ("inner", ctypes.c_int64),
         ("scale_groups", ctypes.c_int64), ("bits_min", ctypes.c_int32), ("bits_max", ctypes.c_int32),
         ("is_signed", ctypes.c_int32), ("has_offset", ctypes.c_int32), ("grad_scale", ctypes.c_double),
         ("x_dtype", ctypes.c_int), ("param_dtype", ctypes.c_int)]
        + [(n, ctypes.c_void_p) for n in ("x", "grad_y", "scale", "bits", "offset", "y", "grad_x",
                                          "grad_scale_out", "grad_bits", "grad_offset")]
        + [("num_threads", ctypes.c_int32), ("device", ctypes.c_int32), ("stream", ctypes.c_void_p),
           ("workspace", ctypes.c_void_p), ("workspace_bytes", ctypes.c_int64)]
    )


class EmuFault(RuntimeError):
    """The emulation caught what a GPU would reject or leave undefined."""


class Emulated:
    """The launchers of one emulation library."""

    def __init__(self, path: str):
        self.lib = ctypes.CDLL(path)
        self.lib.qvit_fq_cuda_workspace_bytes.restype = ctypes.c_int64
        self.lib.qvit_cuda_last_error.restype = ctypes.c_char_p
        self.lib.qvit_sim_fault.restype = ctypes.c_char_p
        self.lib.qvit_sim_log.restype = ctypes.c_char_p
        self.lib.sim_current_device.restype = ctypes.c_int
        self.sms = ctypes.c_int.in_dll(self.lib, "sim_sms")
        self.bps = ctypes.c_int.in_dll(self.lib, "sim_bps")

    def launches(self):
        """[(kernel instance, (grid x, y), (block x, y))] since the last call."""
        out = []
        for line in self.lib.qvit_sim_log().decode().splitlines():
            name, grid, block = line.split("|")
            out.append((name, tuple(map(int, grid.split(","))), tuple(map(int, block.split(",")))))
        self.lib.qvit_sim_clear_log()
        return out

    def _call(self, fn, p):
        st = fn(ctypes.byref(p))
        fault = self.lib.qvit_sim_fault().decode()
        if fault:
            self.lib.qvit_sim_reset()
            raise EmuFault(fault)
        if st != 0:
            raise RuntimeError(f"status {st}: {self.lib.qvit_cuda_last_error().decode()}")

    @staticmethod
    def _params(x, scale, bits, offset, signed, dim, bits_range, grad_scale, device):
        import torch
        from qvit.ops import reference
        dt = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}[x.dtype]
        outer, g, inner = reference.group_shape(x.shape, dim, bits.numel())
        return Params(outer=outer, groups=g, inner=inner, scale_groups=scale.shape[0],
                      bits_min=bits_range[0], bits_max=bits_range[1], is_signed=int(signed),
                      has_offset=int(offset is not None),
                      grad_scale=-1.0 if grad_scale is None else float(grad_scale),
                      x_dtype=dt, param_dtype=0, x=x.data_ptr(), scale=scale.data_ptr(),
                      bits=bits.data_ptr(), offset=None if offset is None else offset.data_ptr(),
                      device=device)

    def forward(self, x, scale, bits, offset, *, signed, dim, bits_range=(2, 8), device=0, y=None):
        """y through the CUDA forward launcher (x, y may be misaligned views)."""
        import torch
        y = torch.empty_like(x) if y is None else y
        p = self._params(x, scale, bits, offset, signed, dim, bits_range, None, device)
        p.y = y.data_ptr()
        self._call(self.lib.qvit_fq_forward_cuda, p)
        return y

    def backward(self, gy, x, scale, bits, offset, *, signed, dim, bits_range=(2, 8),
                 grad_scale=None, device=0, gx=None):
        """(gx, gs, gb, go) through the CUDA backward launchers."""
        import torch
        gx = torch.empty_like(x) if gx is None else gx
        gs, gb = torch.full_like(scale, 123.0), torch.full_like(bits, 123.0)
        go = torch.full_like(offset, 123.0) if offset is not None else None
        p = self._params(x, scale, bits, offset, signed, dim, bits_range, grad_scale, device)
        p.grad_y, p.grad_x = gy.data_ptr(), gx.data_ptr()
        p.grad_scale_out, p.grad_bits = gs.data_ptr(), gb.data_ptr()
        p.grad_offset = None if go is None else go.data_ptr()
        nbytes = self.lib.qvit_fq_cuda_workspace_bytes(ctypes.byref(p))
        assert nbytes > 0
        ws = torch.full((nbytes,), 0xAB, dtype=torch.uint8)  # garbage, as a fresh allocation may hold
        p.workspace, p.workspace_bytes = ws.data_ptr(), nbytes
        self._call(self.lib.qvit_fq_backward_cuda, p)
        return gx, gs, gb, go

    def run(self, x, scale, bits, offset, gy, *, signed, dim, bits_range=(2, 8), grad_scale=None,
            device=0):
        """Forward and backward through the CUDA launchers; returns (y, gx, gs, gb, go)."""
        assert x.is_contiguous() and gy.is_contiguous()
        kw = dict(signed=signed, dim=dim, bits_range=bits_range, device=device)
        y = self.forward(x, scale, bits, offset, **kw)
        return (y, *self.backward(gy, x, scale, bits, offset, grad_scale=grad_scale, **kw))


_SHARED: Optional[Emulated] = None


def shared() -> Emulated:
    """One emulation library per process (built on first use into a temporary folder)."""
    global _SHARED
    if _SHARED is None:
        import tempfile
        _SHARED = Emulated(build(tempfile.mkdtemp(prefix="qvit_cuda_emu_")))
    return _SHARED
