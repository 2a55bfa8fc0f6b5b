"""The run folder: ``args.yaml``, ``summary.csv``, ``summary.json``, TensorBoard.

``args.yaml`` is :meth:`TrainConfig.to_dict`: ``qvit train -c args.yaml``
repeats the run and ``--resume`` reads the same settings from the checkpoint.
A folder that already holds a run is never overwritten silently.
"""
from __future__ import annotations

import csv
import json
import os
from typing import Any, Dict

from ..models.recipe import UsageError
from .config import TrainConfig

RUN_FILES = ("last.pth", "best.pth", "args.yaml", "summary.csv", "summary.json")


def default_output(cfg: TrainConfig) -> str:
    name = cfg.experiment or "-".join([cfg.model, cfg.quant or "none", str(cfg.seed)])
    return os.path.join("output", "train", name)


def check_free(out_dir: str, cfg: TrainConfig) -> None:
    """Refuse a folder holding an earlier run unless ``--resume`` or ``--overwrite``."""
    if cfg.resume or cfg.overwrite or not os.path.isdir(out_dir):
        return
    found = [f for f in RUN_FILES if os.path.exists(os.path.join(out_dir, f))]
    if found:
        raise UsageError(
            f"run folder {out_dir!r} already holds a run ({', '.join(found)}): continue it "
            f"with --resume {os.path.join(out_dir, 'last.pth')}, replace it with --overwrite, "
            "or choose another --output / --experiment")


def prepare(out_dir: str, cfg: TrainConfig, start_epoch: int) -> None:
    os.makedirs(out_dir, exist_ok=True)
    write_args_yaml(cfg, os.path.join(out_dir, "args.yaml"))
    truncate_csv(os.path.join(out_dir, "summary.csv"), start_epoch)


def write_args_yaml(cfg: TrainConfig, path: str) -> None:
    import yaml

    with open(path, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, default_flow_style=False, sort_keys=True)


def append_csv(path: str, row: Dict[str, Any]) -> None:
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def truncate_csv(path: str, start_epoch: int) -> None:
    """Drop rows of epochs that a resumed run will redo (or a fresh run replaces)."""
    if not os.path.exists(path):
        return
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    keep = [r for r in rows if r.get("epoch", "").isdigit() and int(r["epoch"]) < start_epoch]
    if not keep:
        os.unlink(path)
        return
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(keep[0]))
        w.writeheader()
        w.writerows(keep)


def write_summary(out_dir: str, summary: Dict[str, Any]) -> None:
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)


def tensorboard(out_dir: str):
    """A SummaryWriter under ``<out_dir>/tb``, or None without tensorboard."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # noqa: BLE001 - tensorboard is optional
        return None
    try:
        return SummaryWriter(os.path.join(out_dir, "tb"))
    except Exception:  # noqa: BLE001
        return None


def format_summary(s: Dict[str, Any]) -> str:
    parts = [f"done: {s['model']} quant={s['quant']}",
             f"final top1 {s['final_top1']:.2f}" if s.get("final_top1") is not None else "",
             f"best top1 {s['best_top1']:.2f} (epoch {s['best_epoch']})"]
    if "wbits" in s:
        parts.append(f"W{s['wbits']:.2f}/A{s.get('abits', float('nan')):.2f} bits")
    if "gbitops" in s:
        parts.append(f"{s['gbitops']:.4g} GBitOPs")
    parts.append(f"{s['wall_s']:.1f}s -> {s['output']}")
    return "  ".join(p for p in parts if p)
