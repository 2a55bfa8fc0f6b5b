"""One QAT training step of a timm model: float vs qvit's kernels vs the reference op.

Usage::

    python benchmarks/bench_model.py [--models deit_small_patch16_224,swin_tiny_patch4_window7_224]
                                     [--batch 16] [--img-size 224] [--device cpu|cuda]
                                     [--preset qvit_mixed] [--rounds 3] [--per-round 1]
                                     [--compile inductor|aot_eager|eager|none] [--threads N]

Three copies of one randomly initialised timm model (nothing is downloaded):

* ``float``     - the timm model as it is;
* ``qvit``      - ``qvit.quantize_model(model, preset)``, calibrated on one
  batch, its quantizers on ``qvit.ops.fake_quant`` (the C / CUDA kernels);
* ``reference`` - the same quantized model with the quantizers switched to
  ``qvit.reference.fake_quant``, the pure-PyTorch composite the research
  code's approach amounts to.

A step is: forward, cross-entropy (plus the BitOPs budget loss for the
quantized models), backward, SGD step, ``zero_grad(set_to_none=True)``.
Measured per contender, in one run (docs/design.md section 6):

* **step ms** - contenders take turns in rounds as in ``bench_ops.py`` (one
  untimed step, then ``--per-round`` timed ones; median over rounds of each
  round's median); "vs float" is paired within rounds.
* **peak growth MiB** - CPU: the peak resident set during one step minus the
  resident set before it, read exactly from the kernel (``VmHWM`` after
  resetting it through ``/proc/self/clear_refs``; no sampling). It is taken
  in a child process started with ``MALLOC_MMAP_THRESHOLD_=65536`` (every
  block over 64 KiB is its own mapping, returned on free, so the resident set
  follows the live tensors instead of glibc's free lists); eager contenders
  only (compiling again in the child costs minutes on a small CPU). GPU: ``torch.cuda.max_memory_allocated`` after
  ``reset_peak_memory_stats``, minus the allocation before the step.
* **ops/step** - ATen (and ``qvit::``) ops dispatched in one eager step,
  counted with a ``TorchDispatchMode`` (on a GPU each is about one launch).
* **tiny host ms** - a step of the same architecture on 2 images of 32 px:
  the activation work vanishes; Python and dispatch overhead is left, and on
  a CPU the weight-sized work too (weight quantization, weight gradients, the
  optimizer), which the weights' size keeps whatever the input.
  On a GPU: host time to issue the step (no synchronisation inside).
* the ``+compile`` rows: the model under ``torch.compile(dynamic=True)``
  (``--compile``; float and qvit only, compiling the reference composite
  costs minutes and is not what a qvit user runs). Their memory is not
  measured ("n/m") and their ops are not counted (the compiled graph runs
  outside the dispatcher's Python mode).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import qvit  # noqa: E402
from qvit.nn import quantizer  # noqa: E402
from qvit.ops import reference, torch_ops as ops  # noqa: E402

MODELS = "deit_small_patch16_224,swin_tiny_patch4_window7_224"
TINY_BATCH, TINY_PX = 2, 32


def _step_fn(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, *,
             budget: Optional[float], backend, run=None) -> Callable[[], None]:
    """One SGD step of ``model``; ``run`` (default ``model``) is what is called
    (e.g. the compiled model); the quantizers use ``backend`` during the step."""
    # foreach=True: the default on CUDA, chosen on the CPU too so that ops/step
    # counts the model's ops and not one optimizer loop per parameter
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, foreach=True)
    run = model if run is None else run

    def one():
        loss = F.cross_entropy(run(x), target)
        if budget is not None:
            loss = loss + qvit.budget_loss(model, budget)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if backend is None or backend is ops.fake_quant:
        # the float model never reads the backend, and the compiled kernels are the
        # default: leave the global alone (a compiled model guards on it, and
        # switching it between contenders made every compiled step recompile)
        return one

    def step():
        saved = quantizer._BACKEND
        quantizer._BACKEND = backend
        try:
            one()
        finally:
            quantizer._BACKEND = saved
    return step


def build(args, model_name: Optional[str] = None, batch: Optional[int] = None,
          img_size: Optional[int] = None, compile_backend: str = "none"
          ) -> Dict[str, Callable[[], None]]:
    """The contenders' step functions for one model, batch and image size."""
    import timm

    model_name = model_name or args.model
    batch = batch or args.batch
    img_size = img_size or args.img_size
    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False, num_classes=100,
                              img_size=img_size).to(args.device).train()
    x = torch.randn(batch, 3, img_size, img_size, device=args.device)
    target = torch.randint(0, 100, (batch,), device=args.device)
    qmodel = qvit.quantize_model(copy.deepcopy(model), qvit.preset(args.preset))
    qvit.calibrate(qmodel, [x])
    budget = float(qvit.uniform_bitops(qmodel, 4)) / 1e9
    want = set(getattr(args, "contenders", "float,qvit,reference").split(",")) | {"float"}
    fns = {"float": _step_fn(model, x, target, budget=None, backend=None)}
    if "qvit" in want:
        fns["qvit"] = _step_fn(qmodel, x, target, budget=budget, backend=ops.fake_quant)
    if "reference" in want:
        fns["reference"] = _step_fn(copy.deepcopy(qmodel), x, target, budget=budget,
                                    backend=reference.fake_quant)
    if compile_backend != "none":
        for name, m, b, be in (("float", model, None, None),
                               ("qvit", qmodel, budget, ops.fake_quant)):
            if name not in fns:
                continue
            cm = torch.compile(m, backend=compile_backend, dynamic=True)
            fns[f"{name}+compile"] = _step_fn(m, x, target, budget=b, backend=be, run=cm)
    return fns


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn: Callable[[], None]) -> int:
    """Ops dispatched by one call of ``fn`` (after a warm-up call)."""
    fn()
    with _OpCounter() as counter:
        fn()
    return counter.count


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def peak_growth_mib(fn: Callable[[], None], device: str) -> float:
    """Peak memory during one call of ``fn`` over the memory before it (after a warm-up call)."""
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                      # reset VmHWM to the current resident set
    base = _rss_kib("VmRSS")
    fn()
    return (_rss_kib("VmHWM") - base) / 1024


def host_ms(fn: Callable[[], None], device: str, repeats: int) -> float:
    """Median host time of ``fn`` (CUDA: time to issue it; synchronised between calls)."""
    times = []
    for _ in range(repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    if device == "cuda":
        torch.cuda.synchronize()
    return common.median(times[1:]) * 1e3


def _memory_in_child(args, model_name: str) -> Dict[str, float]:
    """Peak growth of every contender, measured in a fresh process (see the module doc)."""
    if args.device == "cuda":
        fns = build(args, model_name, compile_backend=args.compile)
        return {k: _safe(lambda f=f: peak_growth_mib(f, "cuda")) for k, f in fns.items()}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", "--models", model_name,
           "--batch", str(args.batch), "--img-size", str(args.img_size),
           "--preset", args.preset, "--compile", "none", "--contenders", args.contenders,
           "--threads",
           str(torch.get_num_threads())]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        print(f"memory child failed:\n{out.stderr[-3000:]}", file=sys.stderr)
        return {}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _safe(fn: Callable[[], float]):
    try:
        return fn()
    except Exception as exc:  # a contender that fails (e.g. compile) is reported, not fatal
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"  failed: {type(exc).__name__}: {msg[:200]}", file=sys.stderr)
        return None


def _fmt(v, spec: str) -> str:
    return "fails" if v is None else format(v, spec)


def run_model(args, model_name: str) -> List[List[str]]:
    fns = build(args, model_name, compile_backend=args.compile)
    ok = {}
    for name, fn in fns.items():       # compile (and check) every contender once
        ok[name] = _safe(lambda: (fn(), 1)[1]) is not None
    live = {k: f for k, f in fns.items() if ok[k]}
    wall, _ = common.time_rounds(live, args.device, rounds=args.rounds,
                                 per_round=args.per_round)
    ops_n = {k: _safe(lambda f=f: count_ops(f)) for k, f in live.items() if "+compile" not in k}
    mem = _memory_in_child(args, model_name)
    tiny = build(args, model_name, TINY_BATCH, TINY_PX, compile_backend=args.compile)
    tiny_ms = {k: _safe(lambda f=f: host_ms(f, args.device, args.tiny_repeats))
               for k, f in tiny.items()}
    rows = []
    for name in fns:
        base = "float+compile" if name.endswith("+compile") else "float"
        if name in wall and base in wall:
            t, r = f"{common.median(wall[name]) * 1e3:.1f}", \
                f"{common.paired(wall[name], wall[base]):.2f}x"
        else:
            t, r = "fails", "-"
        m, mf = mem.get(name), mem.get(base)
        o, of = ops_n.get(name), ops_n.get(base)
        h, hf = tiny_ms.get(name), tiny_ms.get(base)
        if name.endswith("+compile"):    # the memory child runs the eager contenders only
            mem_cells = ["n/m", "-"]
        else:
            mem_cells = [_fmt(m, ".0f"), "-" if m is None or not mf else f"{m / mf:.2f}x"]
        rows.append([
            model_name, name, t, r, *mem_cells,
            "-" if o is None else str(o), "-" if o is None or not of else f"{o / of:.2f}x",
            _fmt(h, ".1f"), "-" if h is None or not hf else f"{h / hf:.2f}x",
        ])
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=MODELS, help="comma-separated timm model names")
    p.add_argument("--model", dest="models", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--preset", default="qvit_mixed", choices=list(qvit.PRESETS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--per-round", type=int, default=1)
    p.add_argument("--tiny-repeats", type=int, default=20)
    p.add_argument("--compile", default="inductor",
                   choices=["none", "eager", "aot_eager", "inductor"])
    p.add_argument("--contenders", default="float,qvit,reference",
                   help="comma-separated subset of float,qvit,reference (float is always run)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.batch < 1 or args.rounds < 1 or args.per_round < 1 or args.img_size < 16:
        p.error("--batch, --rounds and --per-round must be >= 1, --img-size >= 16")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if not ops.backend_info()["c_loaded"]:
        p.error(f"qvit._C is not available: {ops.backend_info()['c_import_error']}")
    models = [m for m in args.models.split(",") if m]
    if args.memory_child:
        fns = build(args, models[0], compile_backend=args.compile)
        print(json.dumps({k: _safe(lambda f=f: peak_growth_mib(f, "cpu"))
                          for k, f in fns.items()}))
        return 0

    print(common.machine_description(args.device))
    print(f"command: python benchmarks/bench_model.py "
          f"{' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"batch {args.batch}, {args.img_size}px, preset {args.preset}; one SGD step; "
          f"median over {args.rounds} rounds of the round's median of {args.per_round}; "
          f"tiny: {TINY_BATCH} images of {TINY_PX}px, median of {args.tiny_repeats}; "
          f"compile: {args.compile}\n")
    header = ["model", "contender", "step ms", "vs float", "peak growth MiB", "vs float",
              "ops/step", "vs float", "tiny host ms", "vs float"]
    rows: List[List[str]] = []
    for name in models:   # the table so far after each model (a long run shows progress)
        rows += run_model(args, name)
        print(common.markdown_table(header, rows) + "\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
