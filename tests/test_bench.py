"""Smoke test of benchmarks/bench_ops.py on tiny shapes (timing logic, not speed)."""
import os
import sys
import types

import pytest
import torch

from qvit.ops import torch_ops as ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
bench_ops = pytest.importorskip("bench_ops")

pytestmark = pytest.mark.skipif(ops._C is None, reason="qvit._C not built")


def test_paired_ratio_is_the_median_of_per_round_ratios():
    # round 2 is a slow spell for both: the paired ratio ignores it
    assert bench_ops.common.paired([2.0, 20.0, 4.0], [1.0, 10.0, 1.0]) == 2.0


def test_rounds_interleave_and_count_calls():
    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    wall, cpu = bench_ops.common.time_rounds(fns, "cpu", rounds=3, per_round=2)
    assert sorted(wall) == ["a", "b"] and all(len(v) == 3 for v in wall.values())
    assert calls.count("a") == calls.count("b") == 3 * (1 + 2)   # warm-up + timed
    # each round runs one contender's calls together, then the other's
    blocks = [calls[i:i + 3] for i in range(0, len(calls), 3)]
    assert all(len(set(b)) == 1 for b in blocks)
    assert cpu == {}


@pytest.mark.parametrize("case", [
    bench_ops.Case("tiny per-tensor", (4, 33, 16)),
    bench_ops.Case("tiny per-channel", (4, 33, 16), dim=-1, groups=16),
    bench_ops.Case("tiny per-head", (2, 3, 9, 9), dim=1, groups=3),
])
def test_run_case_rows(case):
    args = types.SimpleNamespace(dtype="float32", device="cpu", compile_ref=False,
                                 rounds=2, per_round=1)
    rows, ratios, _ = bench_ops.run_case(case, args)
    names = [r[3] for r in rows]
    assert names[0] == "qvit" and names[-1] == "copy" and "reference" in names
    assert ("aten" in names) == (case.layout != "per-head")
    assert ratios["qvit"] == 1.0 and all(v > 0 for v in ratios.values())


@pytest.mark.timm
def test_bench_model_smoke(capsys):
    pytest.importorskip("timm")
    bench_model = pytest.importorskip("bench_model")
    rc = bench_model.main(["--models", "deit_tiny_patch16_224", "--batch", "2",
                           "--img-size", "32", "--rounds", "1", "--per-round", "1",
                           "--tiny-repeats", "1", "--compile", "none",
                           "--contenders", "float,qvit,reference"])
    out = capsys.readouterr().out
    assert rc == 0
    for name in ("float", "qvit", "reference"):
        assert f"| {name}" in out


def test_bench_model_backend_switch_is_scoped():
    """The reference contender swaps the quantizers' op only during its step."""
    bench_model = pytest.importorskip("bench_model")
    from qvit.nn import quantizer
    from qvit.ops import reference
    seen = []
    x, target = torch.randn(2, 4), torch.tensor([0, 2])
    before = quantizer._BACKEND

    class Spy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 3)

        def forward(self, v):
            seen.append(quantizer._BACKEND)
            return self.lin(v)

    step = bench_model._step_fn(Spy(), x, target, budget=None, backend=reference.fake_quant)
    step()
    assert seen == [reference.fake_quant] and quantizer._BACKEND is before
