"""One QAT training step of a timm model: float vs qvit's kernels vs the reference op.

Usage::

    python benchmarks/bench_model.py [--model deit_tiny_patch16_224] [--batch 8]
                                     [--img-size 224] [--device cpu|cuda]
                                     [--preset qvit_mixed] [--rounds 5] [--per-round 2]
                                     [--threads N]

Three copies of one randomly initialised timm model (nothing is downloaded):

* ``float``     - the timm model as it is;
* ``qvit``      - ``qvit.quantize_model(model, preset)``, calibrated on one
  batch, its quantizers on ``qvit.ops.fake_quant`` (the C / CUDA kernels);
* ``reference`` - the same quantized model with the quantizers switched to
  ``qvit.reference.fake_quant``, the pure-PyTorch composite the research
  code's approach amounts to.

A step is: forward, cross-entropy (plus the BitOPs budget loss for the
quantized models), backward, SGD step, ``zero_grad(set_to_none=True)``. The
contenders take turns in rounds as in ``bench_ops.py`` (one untimed step,
then ``--per-round`` timed ones; median over rounds of each round's median)
and the ratios are paired within rounds. The column "vs float" is the step
time over the float model's: what fake quantization adds to training.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import qvit  # noqa: E402
from qvit.nn import quantizer
from qvit.ops import reference, torch_ops as ops  # noqa: E402


def _step_fn(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, *,
             budget: Optional[float], backend) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def step():
        saved = quantizer._BACKEND
        quantizer._BACKEND = backend
        try:
            loss = F.cross_entropy(model(x), target)
            if budget is not None:
                loss = loss + qvit.budget_loss(model, budget)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        finally:
            quantizer._BACKEND = saved
    return step


def build(args) -> Dict[str, Callable[[], None]]:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, num_classes=100,
                              img_size=args.img_size).to(args.device).train()
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=args.device)
    target = torch.randint(0, 100, (args.batch,), device=args.device)
    qmodel = qvit.quantize_model(copy.deepcopy(model), qvit.preset(args.preset))
    qvit.calibrate(qmodel, [x])
    budget = float(qvit.uniform_bitops(qmodel, 4)) / 1e9
    qref = copy.deepcopy(qmodel)
    return {
        "float": _step_fn(model, x, target, budget=None, backend=None),
        "qvit": _step_fn(qmodel, x, target, budget=budget, backend=ops.fake_quant),
        "reference": _step_fn(qref, x, target, budget=budget, backend=reference.fake_quant),
    }


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="deit_tiny_patch16_224")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--preset", default="qvit_mixed", choices=list(qvit.PRESETS))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--per-round", type=int, default=2)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    if args.batch < 1 or args.rounds < 1 or args.per_round < 1 or args.img_size < 16:
        p.error("--batch, --rounds and --per-round must be >= 1, --img-size >= 16")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if not ops.backend_info()["c_loaded"]:
        p.error(f"qvit._C is not available: {ops.backend_info()['c_import_error']}")

    print(common.machine_description(args.device))
    print(f"command: python benchmarks/bench_model.py "
          f"{' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"{args.model}, batch {args.batch}, {args.img_size}px, preset {args.preset}; "
          f"one SGD step; median over {args.rounds} rounds of the round's median of "
          f"{args.per_round}\n")
    fns = build(args)
    wall, _ = common.time_rounds(fns, args.device, rounds=args.rounds,
                                 per_round=args.per_round)
    rows = []
    for name, ts in wall.items():
        vs_float = common.paired(ts, wall["float"])
        vs_qvit = common.paired(ts, wall["qvit"])
        rows.append([name, f"{common.median(ts) * 1e3:.1f}", f"{vs_float:.2f}x",
                     "-" if name == "qvit" else f"{vs_qvit:.2f}x"])
    print(common.markdown_table(["contender", "step ms", "vs float", "vs qvit"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
