"""The CPU output cache (csrc/cpu_pool.c, qvit.ops.*cpu_cache*).

Large CPU outputs of the op come from qvit's cache instead of torch's
allocator. These tests hold the cached outputs to the same reference as
everything else and check the cache's bookkeeping: blocks come back when the
last tensor dies (from any thread, or from an unconsumed capsule), the limit
is honoured, and bad arguments raise.
"""
import gc
import os
import subprocess
import sys
import threading

import pytest
import torch

from qvit.ops import reference, torch_ops as ops

pytestmark = pytest.mark.skipif(ops._C is None, reason="qvit._C not built")

BIG = (64, 197, 192)          # 9.7 MB fp32: above the 4 MiB threshold
MIB = 1 << 20


@pytest.fixture
def cache():
    """A clean cache with the default limit, restored afterwards."""
    gc.collect()   # tensors of earlier tests still awaiting the collector
    old = ops.set_cpu_cache_limit(1 << 30)
    ops.empty_cpu_cache()
    yield
    ops.set_cpu_cache_limit(old)
    ops.empty_cpu_cache()


def _params():
    scale = torch.full((1, 7), 2.5 / 8, requires_grad=True)
    bits = torch.full((1,), 4.0, requires_grad=True)
    return scale, bits


def test_cached_outputs_match_reference(cache):
    torch.manual_seed(0)
    x = torch.randn(BIG, requires_grad=True)
    gy = torch.randn(BIG)
    scale, bits = _params()
    before = ops.cpu_cache_info()
    y = ops.fake_quant(x, scale, bits)
    y.backward(gy)
    after = ops.cpu_cache_info()
    # y and grad_x both came from the cache (a miss maps a new block)
    assert after["hits"] + after["misses"] - before["hits"] - before["misses"] == 2
    assert after["live_bytes"] >= 2 * 10 * MIB
    want_y = reference.fake_quant_forward(x.detach(), scale.detach(), bits.detach())
    assert torch.equal(y, want_y)
    want = reference.fake_quant_backward(gy, x.detach(), scale.detach(), bits.detach())
    assert torch.equal(x.grad, want[0])
    # the gradient was handed to x.grad without a copy, still a normal tensor
    assert x.grad.is_contiguous() and x.grad.dtype == torch.float32


def test_blocks_are_reused_and_returned(cache):
    x = torch.randn(BIG)
    scale, bits = _params()
    live0 = ops.cpu_cache_info()["live_bytes"]
    with torch.no_grad():
        y = ops.fake_quant(x, scale, bits)
        ptr = y.data_ptr()
        assert ptr % (2 * MIB) == 0          # 2 MiB aligned (huge-page friendly)
        del y
        info = ops.cpu_cache_info()
        assert info["live_bytes"] == live0 and info["cached_bytes"] == 10 * MIB
        y = ops.fake_quant(x, scale, bits)
        assert y.data_ptr() == ptr           # the newest free block of its class
        assert ops.cpu_cache_info()["hits"] >= 1
        del y
    assert ops.empty_cpu_cache() == 10 * MIB
    assert ops.cpu_cache_info()["cached_bytes"] == 0


def test_small_outputs_bypass_the_cache(cache):
    scale, bits = _params()
    before = ops.cpu_cache_info()
    with torch.no_grad():
        ops.fake_quant(torch.randn(1000, 100), scale, bits)   # 400 kB
    after = ops.cpu_cache_info()
    assert (after["hits"], after["misses"]) == (before["hits"], before["misses"])


def test_limit_evicts_oldest_and_zero_turns_off(cache):
    live0 = ops.cpu_cache_info()["live_bytes"]
    ops.set_cpu_cache_limit(15 * MIB)
    a = torch.from_dlpack(ops._C.cpu_empty(BIG, "float32"))
    b = torch.from_dlpack(ops._C.cpu_empty(BIG, "float32"))
    pb = b.data_ptr()
    del a, b    # a's block, then b's: only the newer fits under 15 MiB
    info = ops.cpu_cache_info()
    assert info["cached_bytes"] == 10 * MIB and info["cached_blocks"] == 1
    c = torch.from_dlpack(ops._C.cpu_empty(BIG, "float32"))
    assert c.data_ptr() == pb
    del c
    assert ops.set_cpu_cache_limit(0) == 15 * MIB
    info = ops.cpu_cache_info()
    assert not info["enabled"] and info["cached_bytes"] == 0
    scale, bits = _params()
    with torch.no_grad():
        y = ops.fake_quant(torch.randn(BIG), scale, bits)
    after = ops.cpu_cache_info()
    assert (after["hits"], after["misses"]) == (info["hits"], info["misses"])
    assert after["live_bytes"] == live0 and y.shape == BIG


def test_freed_from_another_thread(cache):
    live0 = ops.cpu_cache_info()["live_bytes"]
    ts = [torch.from_dlpack(ops._C.cpu_empty(BIG, "float32")) for _ in range(4)]
    for t in ts:
        t.fill_(1.0)
    box = [ts]
    del ts, t

    def drop():
        box.clear()

    th = threading.Thread(target=drop)
    th.start()
    th.join()
    info = ops.cpu_cache_info()
    assert info["live_bytes"] == live0 and info["cached_blocks"] == 4


def test_unconsumed_capsule_returns_its_block(cache):
    live0 = ops.cpu_cache_info()["live_bytes"]
    cap = ops._C.cpu_empty((3, 5), "bfloat16")
    assert ops.cpu_cache_info()["live_bytes"] == live0 + 2 * MIB
    del cap
    assert ops.cpu_cache_info()["live_bytes"] == live0


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
def test_cpu_empty_dtypes_and_shapes(cache, dtype):
    t = torch.from_dlpack(ops._C.cpu_empty((2, 0, 3), dtype))
    assert t.shape == (2, 0, 3) and t.dtype == getattr(torch, dtype)
    t = torch.from_dlpack(ops._C.cpu_empty((), dtype))
    assert t.shape == () and t.numel() == 1
    t = torch.from_dlpack(ops._C.cpu_empty([7, 9], dtype))
    t.copy_(torch.arange(63.0).reshape(7, 9))
    assert float(t.double().sum()) == float(sum(range(63)))   # exact in every dtype


def test_cached_tensor_storage_behaviour(cache):
    """What differs from torch's own tensors: the storage cannot grow."""
    y = torch.from_dlpack(ops._C.cpu_empty(BIG, "float32"))
    y.fill_(2.0)
    with pytest.raises(RuntimeError, match="not resizable"):
        y.resize_(10 ** 8)
    y.resize_(10)                     # shrinking within the storage is fine
    y2 = torch.from_dlpack(ops._C.cpu_empty(BIG, "float32")).fill_(3.0)
    y2.share_memory_()                # moves the data to shared memory
    assert y2.is_shared() and float(y2[0, 0, 0]) == 3.0


@pytest.mark.parametrize("args, exc, match", [
    (((2, 3), "int32"), ValueError, "dtype must be"),
    (((2, -3), "float32"), ValueError, r"shape\[1\] is negative"),
    (((2, 3.0), "float32"), TypeError, r"shape\[1\] must be an int"),
    ((5, "float32"), TypeError, "shape must be a sequence"),
    (((1,) * 65, "float32"), ValueError, "at most 64 dims"),
    (((1 << 40, 1 << 40), "float32"), ValueError, "overflows"),
])
def test_cpu_empty_bad_input(args, exc, match):
    with pytest.raises(exc, match=match):
        ops._C.cpu_empty(*args)


@pytest.mark.parametrize("value, exc", [(-1, ValueError), ("1", TypeError), (True, TypeError),
                                        (1.5, TypeError)])
def test_set_limit_bad_input(value, exc):
    before = ops.cpu_cache_info()["limit_bytes"]
    with pytest.raises(exc, match="nbytes"):
        ops.set_cpu_cache_limit(value)
    assert ops.cpu_cache_info()["limit_bytes"] == before


def _run(env_value, code):
    env = dict(os.environ, QVIT_CPU_CACHE_MB=env_value)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)


def test_env_limit():
    r = _run("64", "from qvit.ops import torch_ops as ops; i = ops.cpu_cache_info(); "
                   "print(i['limit_bytes'], i['enabled'])")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(64 * MIB), "True"]
    r = _run("0", "from qvit.ops import torch_ops as ops; print(ops.cpu_cache_info()['enabled'])")
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr


def test_env_limit_bad_value():
    r = _run("lots", "from qvit.ops import torch_ops as ops")
    assert r.returncode != 0
    assert "QVIT_CPU_CACHE_MB must be a non-negative integer" in r.stderr


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_fork_child_can_use_the_cache(cache):
    keep = torch.from_dlpack(ops._C.cpu_empty(BIG, "float32"))
    code = (
        "import os, torch\n"
        "from qvit.ops import torch_ops as ops\n"
        "t = torch.from_dlpack(ops._C.cpu_empty((64, 197, 192), 'float32'))\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    u = torch.from_dlpack(ops._C.cpu_empty((64, 197, 192), 'float32')).fill_(1)\n"
        "    del u, t\n"
        "    os._exit(0 if ops.cpu_cache_info()['live_bytes'] == 0 else 3)\n"
        "_, status = os.waitpid(pid, 0)\n"
        "raise SystemExit(os.waitstatus_to_exitcode(status))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    del keep


def test_cache_stays_off_when_torch_cannot_adopt_it(cache, monkeypatch):
    """An older torch that refuses the capsule: outputs come from torch's allocator."""
    monkeypatch.setattr(ops, "_CACHE_ERROR", "TypeError: simulated")
    ops.set_cpu_cache_limit(1 << 30)
    info = ops.cpu_cache_info()
    assert not info["enabled"] and info["unavailable"] == "TypeError: simulated"
    scale, bits = _params()
    with torch.no_grad():
        y = ops.fake_quant(torch.randn(BIG), scale, bits)
    after = ops.cpu_cache_info()
    assert (after["hits"], after["misses"]) == (info["hits"], info["misses"])
    monkeypatch.undo()
    ops.set_cpu_cache_limit(1 << 30)
    assert ops.cpu_cache_info()["enabled"] and y.shape == BIG


def test_probe_reports_a_refusing_torch(monkeypatch):
    def refuse(_):
        raise TypeError("unsupported capsule")
    monkeypatch.setattr(torch, "from_dlpack", refuse)
    assert ops._probe_cache() == "TypeError: unsupported capsule"
