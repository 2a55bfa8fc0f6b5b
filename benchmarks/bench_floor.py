"""Per-call floor of ``qvit.fake_quant`` in eager mode, against trivial autograd ops.

Usage::

    python benchmarks/bench_floor.py [--numel 16] [--rounds 15] [--per-round 5] [--calls 200]

On a tiny tensor (16 fp32 elements, one torch thread) the kernels take well
under a microsecond; what is timed is the per-call work around them: argument
checks, the autograd Function, the allocations and the autograd engine. Every
call is a training step of one op: forward, ``y.backward(ones)``, and the
leaves' ``.grad`` dropped again (so every contender accumulates into empty
gradients). Contenders, all on the same ``x``:

* ``x*2``          - ``(x * 2).backward(g)``: the floor of any autograd op;
* ``py-function``  - a trivial Python ``autograd.Function`` (saves ``x``,
  returns ``x * 2`` / ``g * 2``): the floor of an op whose autograd is Python;
* ``py-function x,s,b`` - the same trivial Function of ``x``, ``scale`` and
  ``bits`` (all three saved and requiring grad; gradients ``g * 2`` and zeros):
  the floor of an op with fake_quant's inputs, three leaves to accumulate into;
* ``fq s,b``       - ``qvit.fake_quant(x, scale, bits)`` with ``x``, ``scale``
  (``[1, 7]``) and ``bits`` (``[1]``) requiring grad;
* ``fq x-only``    - the same with only ``x`` requiring grad (frozen tables);
* ``Quantizer``    - ``qvit.Quantizer(QuantizerConfig(bits=4))``, initialised,
  called as a module (its ``prepare`` and table handling included);
* forward only: ``x*2 fwd``, ``py-function fwd``, ``fq fwd`` (graph recorded,
  no backward).

Timing: the contenders take turns (``common.time_rounds``): every round runs
each of them, in a shuffled order, ``--per-round`` times ``--calls`` calls;
a contender's time is the median over rounds of its round median, per call.
Ratios are paired: the ratio within each round, then the median over rounds.
With one thread the process CPU time is reported next to the wall time (a
loaded machine disturbs it less).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import qvit  # noqa: E402
from qvit import Quantizer, QuantizerConfig  # noqa: E402


class _Times2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * 2

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * 2


class _Times2Of3(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, bits):
        ctx.save_for_backward(x, scale, bits)
        return x * 2

    @staticmethod
    def backward(ctx, g):
        x, scale, bits = ctx.saved_tensors
        return g * 2, torch.zeros_like(scale), torch.zeros_like(bits)


def _repeat(fn: Callable[[], None], calls: int) -> Callable[[], None]:
    def run():
        for _ in range(calls):
            fn()
    return run


def contenders(numel: int) -> Dict[str, Callable[[], None]]:
    torch.manual_seed(0)
    x = torch.randn(numel, requires_grad=True)
    g = torch.ones(numel)
    scale = torch.full((1, 7), 0.1, requires_grad=True)
    bits = torch.tensor([4.0], requires_grad=True)
    scale_f, bits_f = scale.detach().clone(), bits.detach().clone()
    quant = Quantizer(QuantizerConfig(bits=4))
    with torch.no_grad():
        quant(torch.randn(numel))  # lazy initialisation from a first batch
    qparams = list(quant.parameters())

    def reset(*ts):
        for t in ts:
            t.grad = None

    def mul2():
        (x * 2).backward(g)
        x.grad = None

    def pyfn():
        _Times2.apply(x).backward(g)
        x.grad = None

    def pyfn3():
        _Times2Of3.apply(x, scale, bits).backward(g)
        reset(x, scale, bits)

    def fq_sb():
        qvit.fake_quant(x, scale, bits).backward(g)
        reset(x, scale, bits)

    def fq_x():
        qvit.fake_quant(x, scale_f, bits_f).backward(g)
        x.grad = None

    def module():
        quant(x).backward(g)
        reset(x, *qparams)

    return {
        "x*2": mul2,
        "py-function": pyfn,
        "py-function x,s,b": pyfn3,
        "fq s,b": fq_sb,
        "fq x-only": fq_x,
        "Quantizer": module,
        "x*2 fwd": lambda: x * 2,
        "py-function fwd": lambda: _Times2.apply(x),
        "fq fwd": lambda: qvit.fake_quant(x, scale, bits),
    }


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--numel", type=int, default=16)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--per-round", type=int, default=5)
    p.add_argument("--calls", type=int, default=200, help="calls per timed repeat")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    fns = {k: _repeat(f, args.calls) for k, f in contenders(args.numel).items()}
    print(common.machine_description("cpu"))
    print(f"x: {args.numel} fp32 elements; {args.rounds} rounds x {args.per_round} repeats "
          f"x {args.calls} calls\n")
    use_cpu = args.threads == 1
    wall, cpu = common.time_rounds(fns, "cpu", rounds=args.rounds, per_round=args.per_round,
                                   cpu_time=use_cpu)
    times = cpu if use_cpu else wall
    rows = []
    for name in fns:
        fwd = name.endswith("fwd")
        us = lambda d: f"{common.median(d[name]) / args.calls * 1e6:.1f}"  # noqa: E731
        ratio = lambda base: f"{common.paired(times[name], times[base]):.2f}"  # noqa: E731
        rows.append([name, us(wall), us(cpu) if use_cpu else "-",
                     ratio("x*2 fwd" if fwd else "x*2"),
                     ratio("py-function fwd" if fwd else "py-function"),
                     "-" if fwd else ratio("py-function x,s,b")])
    which = "CPU" if use_cpu else "wall"
    print(common.markdown_table(
        ["contender", "wall us/call", "CPU us/call", f"/ x*2 ({which})",
         f"/ py-function ({which})", f"/ py-function x,s,b ({which})"], rows))
    print("\n(fwd rows are paired with the fwd baselines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
