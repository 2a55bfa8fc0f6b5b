"""The embedded default run: scikit-learn's 8x8 digits, a small DeiT, four runs.

`qvit train` with no data folder lands here. The digits ship inside
scikit-learn (no network); they are written once as a PNG image folder
(``train/<digit>/*.png``, ``val/<digit>/*.png``, a fixed stratified split) and
read back through the same timm loader a user's ImageNet folder goes through.
A small DeiT is trained in float, then quantization-aware from those weights
with uniform W4A4, uniform W3A3 and Q-ViT mixed head-wise bits at the uniform
3-bit BitOPs budget. The run ends with a table and a PNG of the learned bits.
"""
from __future__ import annotations

import csv
import os
import time
from typing import List, Tuple

VAL_FRACTION = 0.2
SPLIT_SEED = 0
_MARKER = ".qvit-digits-v1"


def write_digits_folder(root: str) -> str:
    """Write the digits as PNGs under ``root`` once; return ``root``.

    Idempotent: a marker file records a finished write, so an interrupted write
    is redone and a finished one is reused.
    """
    marker = os.path.join(root, _MARKER)
    if os.path.isfile(marker):
        return root
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images  # (1797, 8, 8), values 0..16
    labels = digits.target
    rng = np.random.RandomState(SPLIT_SEED)
    is_val = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):  # stratified split
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        is_val[idx[: int(round(len(idx) * VAL_FRACTION))]] = True
    for i, (img, y) in enumerate(zip(images, labels)):
        split = "val" if is_val[i] else "train"
        d = os.path.join(root, split, str(int(y)))
        os.makedirs(d, exist_ok=True)
        pix = np.clip(np.round(img * (255.0 / 16.0)), 0, 255).astype(np.uint8)
        Image.fromarray(pix, mode="L").save(os.path.join(d, f"{i:04d}.png"))
    with open(marker, "w") as f:
        f.write(f"{len(labels)} images, val fraction {VAL_FRACTION}, seed {SPLIT_SEED}\n")
    return root


# --------------------------------------------------------------- the runs
# A DeiT small enough for two CPU cores: 16x16 upsampled digits, 4x4 patches
# (16 tokens + cls), width 96, 3 heads, depth 4.
MODEL = "deit_tiny_patch16_224"
MODEL_KWARGS = ["patch_size=4", "embed_dim=96", "depth=4", "num_heads=3"]
IMG_SIZE = 16
FLOAT_EPOCHS = 15
QAT_EPOCHS = 6
def _common() -> List[str]:
    return [
        "--model", MODEL, "--img-size", str(IMG_SIZE), "--model-kwargs", *MODEL_KWARGS,
        "-b", "64", "-j", "0", "--opt", "adamw", "--sched", "cosine", "--weight-decay", "0.05",
        "--smoothing", "0.1",
        # digits: no flips, mild crops, grey images centred at 0.5
        "--mean", "0.5", "0.5", "0.5", "--std", "0.5", "0.5", "0.5", "--crop-pct", "1.0",
        "--interpolation", "bilinear", "--scale", "0.7", "1.0", "--ratio", "0.9", "1.1",
        "--hflip", "0", "--color-jitter", "0",
    ]


FLOAT_ARGS = ["--quant", "none", "--lr", "2e-3", "--warmup-epochs", "1"]
QAT_ARGS = ["--lr", "5e-4", "--calib-batches", "1"]
METHODS = [
    # (label, preset, extra flags)
    ("uniform W4A4 (LSQ)", "lsq_w4a4", []),
    ("uniform W3A3 (LSQ)", "uniform_w3a3", []),
    ("Q-ViT mixed, 3-bit budget", "qvit_mixed",
     ["--target-bits", "3", "--budget-relative", "--budget-weight", "10",
      "--bit-lr", "100", "--head-wise"]),
]
# flags of `qvit train` that the demo passes through to every run
PASS_THROUGH = ("workers", "device", "threads", "no_progress", "quiet", "amp", "amp_dtype",
                "no_tensorboard")


def _passthrough(args) -> List[str]:
    from .cli import build_parser

    train_parser = build_parser()._subparsers._group_actions[0].choices["train"]  # noqa: SLF001
    out: List[str] = []
    for action in train_parser._actions:  # noqa: SLF001
        if action.dest not in PASS_THROUGH or not action.option_strings:
            continue
        value = getattr(args, action.dest, None)
        if value == action.default:
            continue
        flag = action.option_strings[-1]
        if isinstance(value, bool):
            if value:
                out.append(flag)
        else:
            out += [flag, str(value)]
    return out


# --------------------------------------------------------------- statistics
# two-sided 95 % Student t quantiles t_{0.975, df}
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262, 10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}


def mean_std(values: List[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    import statistics

    v = list(values)
    return statistics.mean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)


def paired_verdict(a: List[float], b: List[float]) -> Tuple[float, float, str]:
    """Verdict of ``a`` vs ``b`` from the per-seed differences ``d = a - b``.

    Rule: ``win`` when the 95 % t confidence interval of the mean difference,
    ``mean(d) +- t_{0.975, n-1} * std(d) / sqrt(n)``, lies above 0, ``loss``
    when it lies below 0, ``level`` otherwise (and always with one seed).

    Returns:
        ``(mean(d), std(d), verdict)``.
    """
    import math

    if len(a) != len(b) or not a:
        raise ValueError(f"paired_verdict needs two equally long non-empty lists, "
                         f"got {len(a)} and {len(b)}")
    d = [x - y for x, y in zip(a, b)]
    m, sd = mean_std(d)
    n = len(d)
    if n < 2:
        return m, sd, "level"
    df = n - 1
    t = _T975.get(df) or _T975[max(k for k in _T975 if k <= df)]
    half = t * sd / math.sqrt(n)
    verdict = "win" if m - half > 0 else ("loss" if m + half < 0 else "level")
    return m, sd, verdict


def _run(argv: List[str]):
    from .cli import parse_train_args
    from .loop import train

    return train(parse_train_args(argv))


def _float_costs(qmodel):
    """BitOPs and size of the float model: every operand at 32 bits."""
    from ..models.budget import uniform_bitops, uniform_size_bits

    return (uniform_bitops(qmodel, 32, first_last_bits=32) / 1e9,
            uniform_size_bits(qmodel, 32, first_last_bits=32) / 8 / 1024)


def run_demo(args) -> List[dict]:
    """The embedded default of `qvit train`: float, W4A4, W3A3, Q-ViT mixed."""
    import torch

    from ..models.budget import average_bits, bitops, model_size_bits
    from ..models.report import plot_bits, report

    out = args.output or os.path.join("output", "demo")
    os.makedirs(out, exist_ok=True)
    cache = os.environ.get("QVIT_CACHE") or os.path.join(out, "data")
    data = write_digits_folder(os.path.join(cache, "digits"))
    seeds = args.seeds if args.seeds else [0]
    qat_epochs = args.epochs if args.epochs != 300 else QAT_EPOCHS
    float_epochs = FLOAT_EPOCHS if args.epochs == 300 else max(1, 2 * args.epochs)
    extra = _passthrough(args)
    t0 = time.time()
    rows: List[dict] = []
    mixed_model = None
    for seed in seeds:
        run_root = os.path.join(out, f"seed{seed}")
        base = [data, *_common(), "--seed", str(seed), *extra]
        print(f"[demo] seed {seed}: float {float_epochs} epochs", flush=True)
        f = _run([*base, *FLOAT_ARGS, "--epochs", str(float_epochs),
                  "--output", os.path.join(run_root, "float")])
        float_ckpt = os.path.join(run_root, "float", "last.pth")
        float_row = {"method": "float (32-bit)", "seed": seed, "top1": f["final_top1"],
                     "wbits": 32.0, "abits": 32.0}
        rows.append(float_row)
        for label, name, flags in METHODS:
            print(f"[demo] seed {seed}: {label}, {qat_epochs} epochs", flush=True)
            s = _run([*base, *QAT_ARGS, "--quant", name, *flags, "--epochs", str(qat_epochs),
                      "--initial-checkpoint", float_ckpt,
                      "--output", os.path.join(run_root, name)])
            m = s["model_obj"]
            with torch.no_grad():
                m.eval()
                m(torch.zeros(1, 3, IMG_SIZE, IMG_SIZE, device=next(m.parameters()).device))
            ab = average_bits(m)
            rows.append({"method": label, "seed": seed, "top1": s["final_top1"],
                         "wbits": ab["weights"], "abits": ab["activations"],
                         "gbitops": float(bitops(m).detach()) / 1e9,
                         "size_kb": float(model_size_bits(m).detach()) / 8 / 1024,
                         "budget_gbitops": s.get("budget")})
            if "gbitops" not in float_row:
                float_row["gbitops"], float_row["size_kb"] = _float_costs(m)
            if name == "qvit_mixed" and mixed_model is None:
                mixed_model = m
                with open(os.path.join(out, "mixed_bits.txt"), "w") as fh:
                    fh.write(report(m).table() + "\n")
                plot_bits(m, os.path.join(out, "bits.png"))
    wall = time.time() - t0
    table = _write_results(rows, seeds, out, wall)
    print(table, flush=True)
    print(f"[demo] {wall:.0f}s on {torch.get_num_threads()} threads; results in {out}/"
          f"results.md, results.csv, bits.png", flush=True)
    return rows


def _write_results(rows: List[dict], seeds, out: str, wall: float) -> str:
    import statistics

    fields = ["method", "seed", "top1", "wbits", "abits", "gbitops", "size_kb", "budget_gbitops"]
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    methods = []
    for r in rows:
        if r["method"] not in methods:
            methods.append(r["method"])
    lines = [f"digits (sklearn 8x8, 16x16 input), {MODEL} with {' '.join(MODEL_KWARGS)}; "
             f"seeds {list(seeds)}; top-1 on the {int(VAL_FRACTION * 100)}% validation split "
             f"(final epoch{', mean ± std' if len(seeds) > 1 else ''})", "",
             "| method | top-1 (%) | avg weight bits | avg act bits | GBitOPs | size (KB) |",
             "|---|---|---|---|---|---|"]
    for m in methods:
        rs = [r for r in rows if r["method"] == m]
        t = [r["top1"] for r in rs]
        top = f"{statistics.mean(t):.2f}"
        if len(t) > 1:
            top += f" ± {statistics.stdev(t):.2f}"

        def avg(k):
            v = [r[k] for r in rs if r.get(k) is not None]
            return statistics.mean(v) if v else float("nan")
        lines.append(f"| {m} | {top} | {avg('wbits'):.2f} | {avg('abits'):.2f} | "
                     f"{avg('gbitops'):.4f} | {avg('size_kb'):.1f} |")
    budget = [r["budget_gbitops"] for r in rows if r.get("budget_gbitops")]
    if budget:
        lines.append("")
        lines.append(f"3-bit budget: {budget[0]:.4f} GBitOPs (uniform W3A3, 8-bit first/last)")
    lines.append(f"wall time: {wall:.0f} s")
    table = "\n".join(lines)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table + "\n")
    return table
