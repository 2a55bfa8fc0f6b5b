"""The CUDA source (csrc/fq_cuda.cu, fq_cuda_kernels.cuh) under the host emulation.

The launchers and kernels are compiled for tests/cuda_emu: same source, same grid
geometry, blocks run one after another with their threads as coroutines. This checks the
kernels' logic on machines without a GPU (CI); the GPU run (benchmarks/gpu_check.sh)
checks the rest. Three parts:

* the parametrised op suite (tests/test_ops.py) runs "cuda_emu" as one more
  implementation (conftest.IMPLS), on its small layouts;
* here, layouts and launch geometries that reach every work mapping and vector path of
  the kernels (runs / cols, scalar / 16-byte vectors, fp32 / fp16 / bf16, vector rows
  blocks that cross rows, vector cols with more than one column tile, misaligned
  pointers), each asserting from the emulator's launch log which kernel instance ran;
* planted mutants of the CUDA source, each of which the emulator must report: a
  misaligned vector access, a shuffle mask leaving out lanes, a mask naming lanes of a
  partial warp that do not exist, a read of uninitialised shared memory (poisoned between
  blocks), a block larger than the kernel's __launch_bounds__.

Rules are those of tests/helpers.py (see tests/test_cuda.py).
"""
import math
import re

import pytest
import torch

from conftest import SKIP_REASON
from helpers import assert_bitwise, make_params, tie_free_input
from qvit.ops import reference
from test_cuda import _check_against_reference

pytestmark = pytest.mark.cuda_emu


@pytest.fixture(scope="module")
def emulated():
    from cuda_emu import emu
    if SKIP_REASON["cuda_emu"]:
        pytest.skip(SKIP_REASON["cuda_emu"])
    return emu.shared()


# name -> (shape, dim, groups, path): the path the layout reaches with aligned pointers,
# (mapping, vectors?) and, for two, the geometry property the case exists for.
LAYOUTS = {
    "tensor_vec": ((8, 16, 48), 0, 1, ("runs", True)),           # G = 1: one flattened row
    "tensor_odd": ((1031,), 0, 1, ("runs", False)),
    "rows_cross": ((3, 2, 1024), 1, 2, ("runs", True)),          # blocks of 1.5 rows (S = 2)
    "rows_odd": ((3, 2, 1025), 1, 2, ("runs", False)),
    "weight_rows": ((6 * 16, 20), 0, 6, ("runs", True)),         # outer = 1
    "one_row": ((1, 24), -1, 24, ("runs", False)),               # outer = 1, inner = 1
    "channel": ((300, 96), -1, 96, ("cols", True)),              # partial column tile, by > 1
    "cols_tiles": ((40, 300, 4), 1, 300, ("cols", True)),        # P = 1200: two fp32 tiles
    "cols_tiles_16": ((20, 600, 4), 1, 600, ("cols", True)),     # P = 2400: two 16-bit tiles
    "head_cols": ((100, 6 * 64), 1, 6, ("cols", True)),
    "cols_odd": ((50, 7), -1, 7, ("cols", False)),
}
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# (layout, dtype, signed, offset, shared table, misaligned, SMs, blocks per SM)
CASES = [
    ("tensor_vec", F32, True, False, False, False, 4, 2),
    ("tensor_vec", BF16, False, True, True, False, 132, 8),
    ("tensor_vec", F16, True, False, False, True, 3, 5),
    ("tensor_odd", F16, True, False, False, False, 3, 5),
    ("tensor_odd", F32, False, True, False, False, 1, 1),
    ("rows_cross", F32, True, False, False, False, 2, 2),
    ("rows_cross", BF16, False, True, True, False, 1, 4),
    ("rows_cross", F16, True, True, False, False, 4, 1),
    ("rows_odd", F32, True, False, True, False, 2, 2),
    ("rows_odd", BF16, True, False, False, False, 4, 2),
    ("weight_rows", F32, True, False, False, False, 132, 8),
    ("weight_rows", BF16, True, True, True, True, 4, 2),
    ("weight_rows", F16, False, False, False, False, 4, 2),
    ("one_row", BF16, False, False, False, False, 4, 2),
    ("channel", F32, True, False, False, False, 132, 3),
    ("channel", BF16, False, True, True, False, 4, 2),
    ("channel", F16, True, False, False, False, 1, 1),
    ("channel", F32, True, False, False, True, 4, 2),
    ("cols_tiles", F32, True, False, True, False, 4, 2),
    ("cols_tiles", F32, False, True, False, False, 1, 1),
    ("cols_tiles_16", BF16, True, False, False, False, 4, 2),
    ("cols_tiles_16", F16, False, True, True, False, 2, 3),
    ("head_cols", BF16, True, True, False, False, 132, 2),
    ("head_cols", F32, False, False, True, True, 1, 1),
    ("head_cols", F16, True, False, False, False, 4, 2),
    ("cols_odd", F32, True, True, False, False, 4, 2),
    ("cols_odd", F16, False, False, True, False, 4, 2),
    ("cols_odd", BF16, True, False, False, False, 3, 5),
    ("head_cols", BF16, False, True, True, True, 4, 2),
]
_KERNEL = re.compile(r"(fq_\w+_kernel)(?:<(\w+), (\d+), (true|false)>)?")
_DTYPE = {"float": F32, "__half": F16, "__nv_bfloat16": BF16}


def _instances(launches):
    out = []
    for name, grid, block in launches:
        m = _KERNEL.fullmatch(name)
        assert m, name
        k, t, v, bwd = m.groups()
        out.append((k, _DTYPE.get(t), None if v is None else int(v), bwd == "true", grid, block))
    return out


def _split_at(n, i, parts):
    q, r = divmod(n, parts)
    return q * i + min(i, r)


def _misaligned(t):
    buf = torch.empty(t.numel() + 1, dtype=t.dtype)
    return buf[1:].view(t.shape).copy_(t)


def test_cases_cover_every_path():
    """The case list reaches each mapping with scalars and with vectors in each dtype."""
    want = {(m, v, d) for m in ("runs", "cols") for v in (False, True) for d in (F32, F16, BF16)}
    got = set()
    for layout, dtype, *_, mis, _, _ in CASES:
        mapping, vec = LAYOUTS[layout][3]
        got.add((mapping, vec and not mis, dtype))
    assert want <= got, sorted(map(str, want - got))


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v).replace("torch.", "") for v in c))
def test_every_path_matches_reference(emulated, case):
    layout, dtype, signed, with_offset, shared, mis, sms, bps = case
    shape, dim, g, (mapping, vec) = LAYOUTS[layout]
    scale, bits, offset = make_params(g, scale_rows=1 if shared else g, offset=with_offset, seed=sms)
    x = tie_free_input(shape, dim, scale, bits, offset, signed=signed, dtype=dtype, seed=bps)
    gy = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    xk, gyk = (_misaligned(x), _misaligned(gy)) if mis else (x, gy)
    emulated.sms.value, emulated.bps.value = sms, bps
    kw = dict(signed=signed, dim=dim, bits_range=(2, 8))
    emulated.launches()
    got = emulated.run(xk, scale, bits, offset, gyk, **kw)
    _check_against_reference(list(got), x, scale, bits, offset, gy, **kw)

    # the kernel instances that ran: forward, backward, finish (+ table when shared)
    inst = _instances(emulated.launches())
    names = [i[0] for i in inst]
    table = shared and g > 1
    assert names == [f"fq_{mapping}_kernel"] * 2 + ["fq_finish_kernel"] + ["fq_table_kernel"] * table
    width = 16 // torch.empty((), dtype=dtype).element_size() if vec and not mis else 1
    for (k, t, v, bwd, grid, block), want_bwd in zip(inst[:2], (False, True)):
        assert (t, v, bwd) == (dtype, width, want_bwd), inst
    _, _, v, _, grid, block = inst[1]
    outer, _, inner = reference.group_shape(shape, dim, g)
    if layout == "rows_cross":  # some block's range starts inside a row
        S = grid[0] // g
        nvec = outer * inner // v
        assert any(_split_at(nvec, s, S) * v % inner for s in range(1, S)), (S, inner)
    if layout.startswith("cols_tiles"):
        assert grid[0] >= 2 and v > 1, (grid, v)  # more than one column tile of vectors

    again = emulated.run(xk, scale, bits, offset, gyk, **kw)
    for a, b, name in zip(got, again, ("y", "grad_x", "grad_scale", "grad_bits", "grad_offset")):
        if a is not None:
            assert_bitwise(a, b, f"second run {name}")


@pytest.mark.slow
def test_emulated_edge_cases(emulated):
    """grad_scale overrides, bit-width ties / clamps, poisoned groups, empty x, the device guard."""
    emulated.sms.value, emulated.bps.value = 4, 2
    shape, dim = (2, 6, 197, 16), 1
    scale, bits, _ = make_params(6, scale_rows=6, bits=[2, 8, 1.4, 8.6, 4.5, 5.5])
    x = tie_free_input(shape, dim, scale, bits, None, signed=True)
    gy = torch.randn(shape)
    for gsc in (None, 0.0, 1.0, 0.37):
        got = emulated.run(x, scale, bits, None, gy, signed=True, dim=dim, grad_scale=gsc)
        _check_against_reference(list(got), x, scale, bits, None, gy, grad_scale=gsc,
                                 signed=True, dim=dim, bits_range=(2, 8))
    for signed, br, rows in ((True, (3, 6), 1), (False, (1, 4), 6), (False, (5, 5), 6)):
        scale, bits, offset = make_params(6, scale_rows=rows, bits_range=br, offset=not signed)
        x = tie_free_input(shape, dim, scale, bits, offset, signed=signed, bits_range=br)
        got = emulated.run(x, scale, bits, offset, gy, signed=signed, dim=dim, bits_range=br)
        _check_against_reference(list(got), x, scale, bits, offset, gy, signed=signed, dim=dim,
                                 bits_range=br)
    scale, bits, _ = make_params(3, scale_rows=3, bits=[4, 4, 4])
    bits[1] = float("nan")
    scale[2, 4 - 2] = -0.5
    x, gy = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)
    y, gx, gs, gb, _ = emulated.run(x, scale, bits, None, gy, signed=True, dim=1)
    assert bool(torch.isnan(y[:, 1:]).all()) and bool(torch.isnan(gx[:, 1:]).all())
    assert_bitwise(y[:, :1], reference.fake_quant_forward(x[:, :1], scale[:1], bits[:1], signed=True, dim=1),
                   "y of the good group")
    assert math.isfinite(gb[0].item()) and math.isnan(gb[1].item()) and math.isnan(gb[2].item())
    assert math.isnan(gs[2, 4 - 2].item()) and bool(torch.isfinite(gs[0]).all())
    # empty x: no main kernel; the finish writes all-zero gradients
    for shape in ((0, 3, 4), (5, 3, 0)):
        x = torch.empty(shape)
        scale, bits, offset = make_params(3, scale_rows=3, offset=True)
        emulated.launches()
        y, gx, gs, gb, go = emulated.run(x, scale, bits, offset, torch.empty(shape), signed=False, dim=1)
        assert y.shape == shape and gx.shape == shape
        assert [i[0] for i in _instances(emulated.launches())] == ["fq_finish_kernel"]
        for t in (gs, gb, go):
            assert bool((t == 0).all())
    # a tensor on device 1 while device 0 is current: switched to and back
    scale, bits, _ = make_params(1)
    x = tie_free_input((100,), 0, scale, bits, None, signed=True)
    gy = torch.randn(100)
    got = emulated.run(x, scale, bits, None, gy, signed=True, dim=0, device=1)
    _check_against_reference(list(got), x, scale, bits, None, gy, signed=True, dim=0, bits_range=(2, 8))
    assert emulated.lib.sim_current_device() == 0


# --------------------------------------------------------------- planted mutants
# Each builds a mutated copy of the CUDA source and asserts that the emulator reports the
# fault a GPU would show (or leave undefined). The mutation must apply exactly once.

def _mutant(tmp_path, old, new, defines=()):
    from cuda_emu import emu
    if SKIP_REASON["cuda_emu"]:
        pytest.skip(SKIP_REASON["cuda_emu"])
    src = emu.cuda_source()
    assert src.count(old) == 1, f"mutation site not found once: {old!r}"
    return emu.Emulated(emu.build(str(tmp_path), src.replace(old, new), defines))


def _inputs(shape, dim, g, dtype=F32, shared=False, signed=True):
    scale, bits, offset = make_params(g, scale_rows=1 if shared else g, offset=not signed)
    x = tie_free_input(shape, dim, scale, bits, offset, signed=signed, dtype=dtype)
    gy = torch.randn(shape).to(dtype)
    return x, scale, bits, offset, gy, dict(signed=signed, dim=dim)


@pytest.mark.slow
def test_mutant_misaligned_vector_access_is_reported(tmp_path):
    from cuda_emu.emu import EmuFault
    m = _mutant(tmp_path, "bool aligned16(const void *p) { return p == nullptr || ((uintptr_t)p & 15u) == 0; }",
                "bool aligned16(const void *p) { return true; }")
    x, scale, bits, offset, gy, kw = _inputs((8, 16, 48), 0, 1)
    m.run(x, scale, bits, offset, gy, **kw)  # aligned: fine
    with pytest.raises(EmuFault, match="misaligned 16-byte vector access"):
        m.forward(_misaligned(x), scale, bits, offset, **kw)


@pytest.mark.slow
def test_mutant_shuffle_mask_is_honoured(tmp_path):
    from cuda_emu.emu import EmuFault
    m = _mutant(tmp_path, "r += __shfl_down_sync(0xffffffffu, r, o);",
                "r += __shfl_down_sync(0x0000ffffu, r, o);")
    x, scale, bits, offset, gy, kw = _inputs((8, 16, 48), 0, 1)
    m.forward(x, scale, bits, offset, **kw)  # the forward has no shuffle
    # lanes 0-15 complete the round and lane 15 reads lane 31, or lane 16 arrives first:
    # either way a lane outside the mask is involved, and the fault names the mask
    with pytest.raises(EmuFault, match=r"(not in|leaves it out).*|mask 0x0000ffff") as e:
        m.backward(gy, x, scale, bits, offset, **kw)
    assert "0x0000ffff" in str(e.value)


@pytest.mark.slow
def test_mutant_partial_warp_is_honoured(tmp_path):
    """A runs block of 240 threads: its last warp has 16 lanes, and the full-warp shuffle
    mask of the block reduction names 16 that do not exist."""
    from cuda_emu.emu import EmuFault
    m = _mutant(tmp_path, "pl.block = dim3(NT, 1, 1);", "pl.block = dim3(NT - 16, 1, 1);")
    x, scale, bits, offset, gy, kw = _inputs((8, 16, 48), 0, 1)
    with pytest.raises(EmuFault, match="names lanes that do not exist .*16 threads"):
        m.backward(gy, x, scale, bits, offset, **kw)


@pytest.mark.slow
def test_mutant_uninitialised_shared_memory_is_poisoned(tmp_path):
    """The table kernel's threads without groups skip zeroing their reduction slots. Shared
    memory that persisted (zeros from the start, as before) hides it; poisoned memory
    turns the shared-table gradients NaN."""
    old = "red[0][t] = as;\n        red[1][t] = ao;"
    new = "if (t < G) { red[0][t] = as; red[1][t] = ao; }"
    x, scale, bits, offset, gy, kw = _inputs((300, 6), -1, 6, shared=True, signed=False)
    for poison, sub in ((False, "plain"), (True, "poisoned")):
        d = tmp_path / sub
        d.mkdir()
        m = _mutant(d, old, new, defines=() if poison else ("SIM_NO_POISON",))
        got = m.run(x, scale, bits, offset, gy, **kw)
        if poison:
            assert bool(torch.isnan(got[2]).any()) and bool(torch.isnan(got[4]).any())
        else:  # the fault this catches: without poisoning the emulation passes it
            _check_against_reference(list(got), x, scale, bits, offset, gy, bits_range=(2, 8), **kw)


@pytest.mark.slow
def test_mutant_block_over_launch_bounds_is_rejected(tmp_path):
    from cuda_emu.emu import EmuFault
    m = _mutant(tmp_path, "__global__ void __launch_bounds__(FIN_NT) fq_finish_kernel",
                "__global__ void __launch_bounds__(128) fq_finish_kernel")
    x, scale, bits, offset, gy, kw = _inputs((64, 12), -1, 12)
    with pytest.raises(EmuFault, match=r"fq_finish_kernel: block of 256 threads exceeds its __launch_bounds__\(128\)"):
        m.backward(gy, x, scale, bits, offset, **kw)
