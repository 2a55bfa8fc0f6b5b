"""`qvit` command line: train / eval / report / export.

``qvit train`` takes timm ``train.py``-style flags plus the QAT flags; with no
data folder it runs the embedded digits demo (:mod:`qvit.train.demo`). Bad input
ends with one line on stderr and exit code 2, no traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Optional

PROG = "qvit"
QUANT_CHOICES = ("none", "lsq_w4a4", "uniform_w3a3", "uniform_w2a2", "qvit_mixed", "qvit_official")
EXIT_USAGE = 2


class CLIError(Exception):
    """One-line user error (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage + exiting."""

    def error(self, message):  # noqa: D401 - argparse API
        raise CLIError(f"{self.prog}: error: {message}")


def _kv(text: str):
    """``key=value`` with the value read as YAML (numbers, bools, lists)."""
    import yaml

    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    k, v = text.split("=", 1)
    return k.strip(), yaml.safe_load(v)


def _float_pair(text: str):
    try:
        a, b = (float(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two numbers 'a,b', got {text!r}") from None
    return (a, b)


def _add_train_args(p: argparse.ArgumentParser) -> None:
    d = p.add_argument_group("data")
    d.add_argument("data", nargs="?", default=None,
                   help="folder with train/ and val/ class subfolders; omit to run the "
                        "embedded digits demo")
    d.add_argument("--data-dir", default=None, help="same as the positional data folder")
    d.add_argument("-b", "--batch-size", type=int, default=64)
    d.add_argument("-j", "--workers", type=int, default=2, help="data loader processes")
    d.add_argument("--img-size", type=int, default=None)
    d.add_argument("--mean", type=float, nargs="+", default=[0.485, 0.456, 0.406])
    d.add_argument("--std", type=float, nargs="+", default=[0.229, 0.224, 0.225])
    d.add_argument("--interpolation", default="bicubic")
    d.add_argument("--crop-pct", type=float, default=0.875)
    d.add_argument("--no-aug", action="store_true", help="no training augmentation")
    d.add_argument("--scale", type=float, nargs=2, default=[0.08, 1.0],
                   help="random-resized-crop scale range")
    d.add_argument("--ratio", type=float, nargs=2, default=[3.0 / 4.0, 4.0 / 3.0])
    d.add_argument("--hflip", type=float, default=0.5)
    d.add_argument("--color-jitter", type=float, default=0.4)
    d.add_argument("--aa", default=None, help="timm auto-augment policy, e.g. rand-m9-mstd0.5-inc1")
    d.add_argument("--reprob", type=float, default=0.0, help="random erasing probability")

    m = p.add_argument_group("model")
    m.add_argument("--model", default="deit_tiny_patch16_224")
    m.add_argument("--pretrained", action="store_true",
                   help="timm's pretrained weights (needs the hub)")
    m.add_argument("--pretrained-path", default="",
                   help="local weights through timm's pretrained loading (head adapted)")
    m.add_argument("--initial-checkpoint", default="",
                   help="local float checkpoint (timm load_checkpoint semantics: strict)")
    m.add_argument("--num-classes", type=int, default=None)
    m.add_argument("--drop-path", type=float, default=None)
    m.add_argument("--model-kwargs", nargs="*", type=_kv, default=[],
                   metavar="KEY=VALUE", help="extra timm.create_model arguments")

    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=300)
    o.add_argument("--lr", type=float, default=2e-4)
    o.add_argument("--opt", default="adamw")
    o.add_argument("--momentum", type=float, default=0.9)
    o.add_argument("--weight-decay", type=float, default=0.05)
    o.add_argument("--sched", default="cosine")
    o.add_argument("--min-lr", type=float, default=0.0)
    o.add_argument("--warmup-epochs", type=int, default=0)
    o.add_argument("--warmup-lr", type=float, default=1e-6)
    o.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    o.add_argument("--clip-grad", type=float, default=None)
    o.add_argument("--amp", action="store_true")
    o.add_argument("--amp-dtype", default="bfloat16")
    o.add_argument("--torchcompile", nargs="?", const="inductor", default=None)
    o.add_argument("--seed", type=int, default=42)
    o.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if present)")
    o.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")

    q = p.add_argument_group("quantization")
    q.add_argument("--quant", default="qvit_mixed", choices=QUANT_CHOICES,
                   help="quantizer preset, or none for float training")
    q.add_argument("--target-bits", type=float, default=None,
                   help="BitOPs budget = uniform WbAb with 8-bit first/last layers")
    q.add_argument("--budget-gbitops", type=float, default=None)
    q.add_argument("--budget-kind", default="bitops", choices=("bitops", "size"))
    q.add_argument("--budget-weight", type=float, default=0.1, help="lambda of the budget loss")
    q.add_argument("--budget-relative", action="store_true",
                   help="penalise the overshoot relative to the budget: "
                        "lambda*max(B/budget-1,0)^2 (for models far from DeiT size)")
    hw = q.add_mutually_exclusive_group()
    hw.add_argument("--head-wise", dest="head_wise", action="store_true", default=None)
    hw.add_argument("--no-head-wise", dest="head_wise", action="store_false")
    q.add_argument("--first-last-bits", type=int, default=None)
    ss = q.add_mutually_exclusive_group()
    ss.add_argument("--shared-scale", dest="shared_scale", action="store_true", default=None,
                    help="one switchable scale table per quantizer, shared by its heads "
                         "(research code; default: the preset's)")
    ss.add_argument("--no-shared-scale", dest="shared_scale", action="store_false")
    q.add_argument("--scale-init", dest="init", default=None, choices=("grid", "official"),
                   help="scale initialisation: qvit's grid start or the research code's "
                        "(default: the preset's)")
    q.add_argument("--weight-grouping", default=None, choices=("head", "transposed"),
                   help="head groups of attention weights: real heads or the research code's "
                        "transposed grouping (default: the preset's)")
    q.add_argument("--bit-lr", type=float, default=1.0, help="lr multiplier for bit-widths")
    q.add_argument("--scale-lr", type=float, default=1.0, help="lr multiplier for scales/offsets")
    q.add_argument("--freeze-bits-at", type=float, default=0.9,
                   help="fraction of training after which bit-widths stop changing")
    q.add_argument("--calib-batches", type=int, default=1)
    q.add_argument("--qat-eval-mode", action="store_true",
                   help="keep the model in eval mode during QAT (research recipe)")
    q.add_argument("--distill", action="store_true", help="float model as soft-KD teacher")
    q.add_argument("--distill-alpha", type=float, default=0.5)
    q.add_argument("--distill-temp", type=float, default=1.0)

    r = p.add_argument_group("run")
    r.add_argument("--output", default=None, help="run folder (default ./output/train/<name>)")
    r.add_argument("--experiment", default="")
    r.add_argument("--resume", default="", help="continue from a last.pth")
    r.add_argument("--log-interval", type=int, default=10)
    r.add_argument("--no-progress", action="store_true")
    r.add_argument("--no-tensorboard", action="store_true")
    r.add_argument("--quiet", action="store_true")
    r.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="demo only: run the demo once per seed and average")
    r.add_argument("--stop-after-epoch", type=int, default=None, help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Q-ViT quantization-aware training for timm ViTs")
    sub = p.add_subparsers(dest="command", metavar="{train,eval,report,export}",
                           parser_class=_Parser)
    t = sub.add_parser("train", help="train (float or QAT); no data folder: the digits demo")
    t.add_argument("-c", "--config", default="", help="YAML file whose keys set defaults")
    _add_train_args(t)

    e = sub.add_parser("eval", help="top-1/top-5 of a checkpoint on an image folder")
    e.add_argument("checkpoint")
    e.add_argument("--data", "--data-dir", dest="data", required=True,
                   help="dataset root (uses val/) or a class-per-subfolder folder")
    e.add_argument("-b", "--batch-size", type=int, default=64)
    e.add_argument("-j", "--workers", type=int, default=2)
    e.add_argument("--device", default=None)
    e.add_argument("--json", action="store_true", help="print the metrics as JSON")

    rp = sub.add_parser("report", help="the learned bit-widths of a checkpoint")
    rp.add_argument("checkpoint")
    rp.add_argument("--plot", default=None, help="write a PNG of per-layer / per-head bits")
    rp.add_argument("--json", action="store_true")

    x = sub.add_parser("export", help="integer codes + scales + bits to safetensors")
    x.add_argument("checkpoint")
    x.add_argument("out", help="output .safetensors path")
    return p


# ------------------------------------------------------------------ train
def parse_train_args(argv: List[str]) -> argparse.Namespace:
    """Parse ``qvit train`` arguments (with ``-c`` YAML defaults, timm style)."""
    parser = build_parser()
    train_parser = parser._subparsers._group_actions[0].choices["train"]  # noqa: SLF001
    pre = _Parser(add_help=False)
    pre.add_argument("-c", "--config", default="")
    known, _ = pre.parse_known_args(argv)
    if known.config:
        cfg = _read_yaml(known.config)
        dests = {a.dest for a in train_parser._actions}  # noqa: SLF001
        unknown = sorted(k for k in (k.replace("-", "_") for k in cfg) if k not in dests)
        if unknown:
            raise CLIError(f"{known.config}: unknown keys {unknown}")
        train_parser.set_defaults(**{k.replace("-", "_"): v for k, v in cfg.items()})
    args = parser.parse_args(["train", *argv])
    return finish_train_args(args)


def finish_train_args(args: argparse.Namespace) -> argparse.Namespace:
    if args.data and args.data_dir and args.data != args.data_dir:
        raise CLIError("give the data folder once (positional or --data-dir)")
    args.data_dir = args.data_dir or args.data
    args.model_kwargs = dict(args.model_kwargs or [])
    if args.output is None and args.data_dir:
        name = args.experiment or "-".join(
            [args.model, args.quant or "none", str(args.seed)])
        args.output = os.path.join("output", "train", name)
    return args


def _read_yaml(path: str) -> Dict[str, Any]:
    import yaml

    if not os.path.isfile(path):
        raise CLIError(f"config file {path!r} does not exist")
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise CLIError(f"config file {path!r} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(cfg, dict):
        raise CLIError(f"config file {path!r} must hold a mapping of flag names to values")
    return cfg


def cmd_train(argv: List[str]) -> int:
    args = parse_train_args(argv)
    if not args.data_dir:
        from .demo import run_demo

        run_demo(args)
        return 0
    from .loop import train

    train(args)
    return 0


# ------------------------------------------------------------- eval/report
def _load_model(path: str, device: Optional[str] = None):
    from ..models import checkpoint as ckpt_io
    from ..models.recipe import model_from_checkpoint

    ck = ckpt_io.load(path)
    model = model_from_checkpoint(ck, path)
    return model, ck


def cmd_eval(args) -> int:
    from .data import LoaderConfig, create_loader, eval_folder
    from ..models.recipe import input_size
    from .loop import _device, evaluate

    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    split = eval_folder(args.data)
    model, ck = _load_model(args.checkpoint)
    device = _device(args)
    model.to(device)
    a = ck.get("args") or {}
    c, h, _ = input_size(model)
    cfg = LoaderConfig(img_size=h, batch_size=args.batch_size, workers=args.workers,
                       in_chans=c, mean=tuple(a.get("mean", (0.485, 0.456, 0.406))),
                       std=tuple(a.get("std", (0.229, 0.224, 0.225))),
                       interpolation=a.get("interpolation", "bicubic"),
                       crop_pct=a.get("crop_pct", 0.875))
    loader = create_loader(split, cfg, is_training=False, device=device)
    ncls = len(loader.dataset.reader.class_to_idx) if hasattr(loader.dataset, "reader") else None
    if ncls is not None and getattr(model, "num_classes", ncls) != ncls:
        raise CLIError(f"checkpoint has {model.num_classes} classes but {split!r} has {ncls}")
    m = evaluate(model, loader, device)
    if args.json:
        print(json.dumps(m))
    else:
        print(f"top1 {m['top1']:.2f}  top5 {m['top5']:.2f}  loss {m['loss']:.4f}  "
              f"({m['count']} images, {split})")
    return 0


def cmd_report(args) -> int:
    import torch

    from ..models.recipe import input_size
    from ..models.report import plot_bits, report

    model, ck = _load_model(args.checkpoint)
    if ck.get("quant") is None:
        raise CLIError(f"{args.checkpoint} is a float checkpoint: nothing to report")
    c, h, w = input_size(model)
    with torch.no_grad():  # BitOPs come from the latest forward
        model(torch.zeros(1, c, h, w))
    rep = report(model)
    if args.json:
        print(json.dumps(rep.to_dict(), default=float))
    else:
        print(rep.table())
    if args.plot:
        plot_bits(rep, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def cmd_export(args) -> int:
    from ..models.export import export

    model, ck = _load_model(args.checkpoint)
    if ck.get("quant") is None:
        raise CLIError(f"{args.checkpoint} is a float checkpoint: export needs a quantized one")
    n = export(model, args.out, model_info=ck["model_info"], quant=ck["quant"])
    print(f"wrote {args.out} ({n} tensors)")
    return 0


# ------------------------------------------------------------------- main
def _dispatch(argv: List[str]) -> int:
    if argv and argv[0] == "train":
        return cmd_train(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    if args.command == "train":  # pragma: no cover - handled above
        return cmd_train(argv[1:])
    return {"eval": cmd_eval, "report": cmd_report, "export": cmd_export}[args.command](args)


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``qvit`` console script; returns the exit code."""
    from ..models.checkpoint import CheckpointError
    from .data import DataError

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        from ..models.recipe import UsageError
    except ImportError:  # pragma: no cover
        UsageError = ValueError  # noqa: N806
    try:
        return _dispatch(argv)
    except (CLIError, DataError, CheckpointError, UsageError) as e:
        msg = str(e)
        if not msg.startswith(PROG):
            msg = f"{PROG}: error: {msg}"
        print(msg.splitlines()[0] if msg else f"{PROG}: error", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # e.g. `qvit report ... | head`
        return 0
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
