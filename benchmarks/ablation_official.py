"""Ablation: each difference between qvit_mixed and the research code, on its own.

On the embedded digits benchmark of ``qvit train`` (the demo's data, model and
Q-ViT flags: 3-bit BitOPs budget), per seed: one float run, then QAT from it
with ``qvit_mixed`` and with one of its choices switched to the research
code's (``--shared-scale``, ``--scale-init official``, ``--weight-grouping
transposed``; the TrainConfig fields ``shared_scale``, ``scale_init``,
``weight_grouping``), and with ``--all-three`` all three (``qvit_official``'s model
side). Prints
top-1 mean +- std over seeds and the paired difference to ``qvit_mixed``
with the demo's win / level / loss rule (95 % t interval of the mean paired
difference; see ``qvit.train.demo.paired_verdict``).

    OMP_NUM_THREADS=1 python benchmarks/ablation_official.py [--seeds 0 1 2] [--epochs 6]
        [--output DIR] [--all-three]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qvit.train import demo  # noqa: E402

VARIANTS = [
    # (label, TrainConfig settings): qvit_mixed, then one research-code choice at a time
    ("qvit_mixed", {}),
    ("+ shared tables (per quantizer)", dict(shared_scale=True)),
    ("+ official init", dict(scale_init="official")),
    ("+ transposed weight groups", dict(weight_grouping="transposed")),
]
ALL_THREE = ("all three (qvit_official model side)",
             dict(shared_scale=True, scale_init="official", weight_grouping="transposed"))
BUDGET_BITS = 3.0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=demo.QAT_EPOCHS, help="QAT epochs per run")
    p.add_argument("--float-epochs", type=int, default=demo.FLOAT_EPOCHS)
    p.add_argument("--output", default=os.path.join("output", "ablation_official"))
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per run (1: on a loaded machine 2 threads run ~10x slower)")
    p.add_argument("--all-three", action="store_true", help="also run all three switched together")
    a = p.parse_args(argv)
    variants = VARIANTS + ([ALL_THREE] if a.all_three else [])
    import torch

    torch.set_num_threads(a.threads)
    data = demo.write_digits_folder(os.path.join(a.output, "data", "digits"))
    quiet = dict(no_progress=True, quiet=True, no_tensorboard=True, threads=a.threads)
    top1 = {label: [] for label, _ in variants}
    t0 = time.time()
    for seed in a.seeds:
        root = os.path.join(a.output, f"seed{seed}")
        base = demo._common(seed).replace(data_dir=data, **quiet)  # noqa: SLF001
        demo._run(base.replace(**demo.FLOAT_RUN, epochs=a.float_epochs,  # noqa: SLF001
                               output=os.path.join(root, "float")))
        ckpt = os.path.join(root, "float", "last.pth")
        for i, (label, change) in enumerate(variants):
            s = demo._run(base.replace(  # noqa: SLF001
                **demo.QAT_RUN, **demo.MIXED, **change, quant="qvit_mixed",
                target_bits=BUDGET_BITS, epochs=a.epochs, initial_checkpoint=ckpt,
                output=os.path.join(root, f"v{i}")))
            top1[label].append(float(s["final_top1"]))
            print(f"[ablation] seed {seed} {label}: top-1 {top1[label][-1]:.2f} "
                  f"({time.time() - t0:.0f} s)", flush=True)
    wall = time.time() - t0
    ref = top1[VARIANTS[0][0]]
    print(f"\ndigits demo setup, 3-bit budget, {a.epochs} QAT epochs, seeds {a.seeds}; "
          f"{torch.get_num_threads()} threads, {wall:.0f} s wall, load {os.getloadavg()[0]:.1f}\n")
    print("| variant | top-1 (%) mean ± std | paired diff vs qvit_mixed | verdict |")
    print("|---|---|---|---|")
    for label, _ in variants:
        m, sd = demo.mean_std(top1[label])
        per = " ".join(f"{v:.2f}" for v in top1[label])
        if label == VARIANTS[0][0]:
            print(f"| {label} | {m:.2f} ± {sd:.2f} ({per}) | — | — |")
            continue
        dm, dsd, verdict = demo.paired_verdict(top1[label], ref)
        print(f"| {label} | {m:.2f} ± {sd:.2f} ({per}) | {dm:+.2f} ± {dsd:.2f} | {verdict} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
