"""Two builds of qvit (or one build under two environments) timed in one run, taking turns.

Usage::

    python benchmarks/ab_builds.py --tree old=PATH [--tree new=PATH[:VAR=VAL;...]] ...
                                   [--what op|step] [--batch 8] [--rounds 15] [--per-round 5]

Each ``--tree NAME=PATH`` is a checkout with ``qvit._C`` built in place; an
optional ``:VAR=VALUE;...`` tail sets environment variables of that
contender's process (e.g. ``LD_PRELOAD=...libjemalloc.so.2`` for an
allocator). One worker process per contender imports qvit from its PATH
(two builds cannot share a process: both register the ``qvit::`` torch ops)
and waits; in every round the contenders run in a shuffled order, each one
untimed call then ``--per-round`` timed ones, so a drifting, shared machine
slows them alike. Reported: the median over rounds of each round's median,
and each contender's time over the first one's, paired within rounds.

``--what op``: ``fake_quant`` forward + backward of a 64x197x192 fp32
per-tensor activation (gradients dropped each call, inputs rotated);
``--what step``: one QAT step (forward, cross-entropy + budget loss,
backward, SGD step, zero_grad) of DeiT-Tiny (random init, ``qvit_mixed``,
224 px) at ``--batch``. Only public API that every qvit layout has is used.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import statistics
import subprocess
import sys

WORKER = r"""
import json, sys, time, torch
what, batch, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if threads > 0:
    torch.set_num_threads(threads)
import qvit
torch.manual_seed(0)
if what == "op":
    from qvit.ops import fake_quant
    xs = [torch.randn(64, 197, 192).requires_grad_() for _ in range(4)]
    gys = [torch.randn(64, 197, 192) for _ in range(4)]
    scale = torch.full((1, 7), 2.5 / 8).requires_grad_()
    bits = torch.full((1,), 4.0).requires_grad_()
    state = {"i": 0}
    def call():
        i = state["i"] = (state["i"] + 1) % 4
        x = xs[i]
        fake_quant(x, scale, bits).backward(gys[i])
        x.grad = scale.grad = bits.grad = None
else:
    import timm
    import torch.nn.functional as F
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=100).train()
    x = torch.randn(batch, 3, 224, 224)
    target = torch.randint(0, 100, (batch,))
    model = qvit.quantize_model(model, qvit.preset("qvit_mixed"))
    qvit.calibrate(model, [x])
    budget = float(qvit.uniform_bitops(model, 4)) / 1e9
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    def call():
        loss = F.cross_entropy(model(x), target) + qvit.budget_loss(model, budget)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
print("ready", flush=True)
for line in sys.stdin:
    n = int(line)
    call()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        call()
        ts.append(time.perf_counter() - t0)
    print(json.dumps(ts), flush=True)
"""


def _start(name, spec, what, batch, threads):
    path, _, envs = spec.partition(":")
    env = dict(os.environ, PYTHONPATH=os.path.abspath(path))
    for kv in filter(None, envs.split(";")):
        k, _, v = kv.partition("=")
        env[k] = v
    return subprocess.Popen([sys.executable, "-c", WORKER, what, str(batch), str(threads)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                            cwd=os.path.abspath(path))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tree", action="append", required=True, metavar="NAME=PATH[:VAR=VAL;...]")
    p.add_argument("--what", choices=["op", "step"], default="op")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--per-round", type=int, default=5)
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args(argv)
    trees = [t.partition("=")[::2] for t in a.tree]
    print(f"command: python benchmarks/ab_builds.py {shlex.join(argv or sys.argv[1:])}")
    print(f"load before: {os.getloadavg()}")
    procs = {name: _start(name, spec, a.what, a.batch, a.threads) for name, spec in trees}
    for name, proc in procs.items():  # set up side by side, then timed in turns
        if proc.stdout.readline().strip() != "ready":
            raise SystemExit(f"{name}: worker failed to start (see its stderr)")
    names = [name for name, _ in trees]
    per_round = {name: [] for name in names}
    rng = random.Random(0)
    for _ in range(a.rounds):
        order = names[:]
        rng.shuffle(order)
        for name in order:
            procs[name].stdin.write(f"{a.per_round}\n")
            procs[name].stdin.flush()
            per_round[name].append(statistics.median(json.loads(procs[name].stdout.readline())))
    for proc in procs.values():
        proc.stdin.close()
        proc.wait()
    print(f"load after: {os.getloadavg()}")
    first = names[0]
    print(f"\n| contender | median ms | vs {first} (paired) |\n|---|---|---|")
    for name in names:
        ratio = statistics.median(t / f for t, f in zip(per_round[name], per_round[first]))
        print(f"| {name} | {statistics.median(per_round[name]) * 1e3:.2f} | {ratio:.3f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
