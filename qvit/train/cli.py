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
from typing import Any, Dict, List, Optional, Tuple

from .config import TrainConfig, add_arguments, explicit_values, known_values, layered

PROG = "qvit"
EXIT_USAGE = 2
# flags a resumed run does not take over from the checkpoint's settings
_NOT_RESUMED = ("resume", "overwrite", "stop_after_epoch")


class CLIError(Exception):
    """One-line user error (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage + exiting."""

    def error(self, message):  # noqa: D401 - argparse API
        raise CLIError(f"{self.prog}: error: {message}")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", nargs="?", default=argparse.SUPPRESS,
                   help="folder with train/ and val/ class subfolders; omit to run the "
                        "embedded digits demo (or to resume with --resume)")
    p.add_argument("-c", "--config", default="",
                   help="YAML file of settings (flag names as keys, e.g. an args.yaml); "
                        "command-line flags override it")
    add_arguments(p)


def build_train_parser(prog: str = f"{PROG} train") -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description="train a timm model (float or Q-ViT QAT); with no "
                "data folder: the embedded digits demo")
    _add_train_args(p)
    return p


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Q-ViT quantization-aware training for timm ViTs")
    sub = p.add_subparsers(dest="command", metavar="{train,eval,report,export}",
                           parser_class=_Parser)
    t = sub.add_parser("train", help="train (float or QAT); no data folder: the digits demo")
    _add_train_args(t)

    e = sub.add_parser("eval", help="top-1/top-5 of a checkpoint or exported file on an "
                       "image folder")
    e.add_argument("checkpoint", help="a qvit checkpoint (.pth) or export (.safetensors)")
    e.add_argument("--data", "--data-dir", dest="data", required=True,
                   help="dataset root (uses val/) or a class-per-subfolder folder")
    e.add_argument("-b", "--batch-size", type=int, default=64,
                   help="images per batch (default: 64)")
    e.add_argument("-j", "--workers", type=int, default=2,
                   help="data loader processes (default: 2)")
    e.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if present)")
    e.add_argument("--json", action="store_true", help="print the metrics as JSON")

    rp = sub.add_parser("report", help="the learned bit-widths of a checkpoint or export")
    rp.add_argument("checkpoint", help="a qvit checkpoint (.pth) or export (.safetensors)")
    rp.add_argument("--plot", default=None,
                    help="write a PNG of per-layer / per-head bits (needs matplotlib)")
    rp.add_argument("--json", action="store_true", help="print the report as JSON")

    x = sub.add_parser("export", help="integer codes + scales + bits to safetensors")
    x.add_argument("checkpoint", help="a quantized qvit checkpoint (.pth)")
    x.add_argument("out", help="output .safetensors path (its folder must exist)")
    return p


# ------------------------------------------------------------------ train
def parse_train(argv: List[str]) -> Tuple[TrainConfig, Dict[str, Any]]:
    """``qvit train`` arguments as a :class:`TrainConfig` and the explicitly given values.

    Precedence: command line > ``-c`` YAML > the ``--resume`` checkpoint's
    settings > :class:`TrainConfig` defaults; ``model_kwargs`` merge key by key.
    """
    ns = build_train_parser().parse_args(argv)
    explicit = explicit_values(ns)
    data = getattr(ns, "data", None)
    if data is not None:
        if explicit.get("data_dir") not in (None, data):
            raise CLIError("give the data folder once (positional or --data-dir)")
        explicit["data_dir"] = data
    from_file = known_values(_read_yaml(ns.config), source=ns.config) if ns.config else {}
    resume = explicit.get("resume") or from_file.get("resume")
    from_run: Dict[str, Any] = {}
    if resume:
        from ..models import checkpoint as ckpt_io

        saved = ckpt_io.load(resume).get("args") or {}
        if isinstance(saved, dict):
            from_run = known_values(saved, source=resume, ignore_unknown=True)
            for k in _NOT_RESUMED:
                from_run.pop(k, None)
    return layered(from_run, from_file, explicit), explicit


def parse_train_args(argv: List[str]) -> TrainConfig:
    """Parse ``qvit train`` arguments (with ``-c`` YAML defaults, timm style)."""
    return parse_train(argv)[0]


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
    cfg, explicit = parse_train(argv)
    if not cfg.data_dir:
        from .demo import run_demo

        run_demo(cfg, explicit=set(explicit))
        return 0
    from .loop import train

    train(cfg)
    return 0


# ------------------------------------------------------------- eval/report
def _is_export(path: str) -> bool:
    from ..models.export import ExportError, read_config

    if not (path.endswith(".safetensors") and os.path.isfile(path)):
        return False
    try:
        read_config(path)
    except ExportError:
        return False  # a plain safetensors file: the checkpoint path explains
    return True


def _load_model(path: str):
    """``(model, recipe)`` of a qvit checkpoint (.pth) or export (.safetensors).

    The model carries its recipe and evaluation transform; ``recipe`` is
    ``{"model_info": ..., "quant": ...}`` (``quant`` None for a float model).
    """
    from ..models.recipe import describe

    if _is_export(path):
        from ..models.export import load_exported

        model = load_exported(path)
    else:
        from ..models import checkpoint as ckpt_io
        from ..models.recipe import model_from_checkpoint

        model = model_from_checkpoint(ckpt_io.load(path), path)
    info, quant = describe(model)
    return model, {"model_info": info, "quant": quant}


def cmd_eval(args) -> int:
    from ..models.recipe import input_size
    from .data import LoaderConfig, create_loader, eval_folder
    from .evaluate import evaluate, resolve_device

    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    split = eval_folder(args.data)
    model, _ = _load_model(args.checkpoint)
    device = resolve_device(args.device)
    model.to(device)
    a = model.__dict__.get("qvit_data") or {}
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
    from ..models.report import plot_bits, report, require_matplotlib

    if args.plot:
        try:
            require_matplotlib()
        except ImportError as e:
            raise CLIError(f"--plot: {e}") from None
    model, recipe = _load_model(args.checkpoint)
    if recipe["quant"] is None:
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

    model, recipe = _load_model(args.checkpoint)
    if recipe["quant"] is None:
        raise CLIError(f"{args.checkpoint} is a float checkpoint: export needs a quantized one")
    n = export(model, args.out)
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
    from ..models.export import ExportError
    from .data import DataError

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        from ..models.recipe import UsageError
    except ImportError:  # pragma: no cover
        UsageError = ValueError  # noqa: N806
    try:
        return _dispatch(argv)
    except (CLIError, DataError, CheckpointError, ExportError, UsageError) as e:
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
