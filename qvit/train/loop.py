"""The training loop behind `qvit train` (float training and Q-ViT QAT).

Mirrors timm's ``train.py``: the same data layout and loader, model creation,
optimizer / scheduler factories, AMP, ``args.yaml`` and ``summary.csv`` in the
run folder, checkpoints with timm's keys. Adds quantization (a preset from
:mod:`qvit.nn.config`), calibration, the BitOPs budget, bit freezing and optional
distillation from the float model.
"""
from __future__ import annotations

import copy
import csv
import math
import os
import random
import time
from contextlib import nullcontext
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..models import checkpoint as ckpt_io
from ..models.recipe import UsageError, apply_quant, create_model, input_size
from . import distributed as dist_util
from .data import DataError, LoaderConfig, check_image_folder, create_loader, set_epoch


# --------------------------------------------------------------------- models
def model_kwargs(args) -> Dict[str, Any]:
    kw: Dict[str, Any] = {}
    if args.num_classes is not None:
        kw["num_classes"] = args.num_classes
    if args.img_size is not None:
        kw["img_size"] = args.img_size
    if getattr(args, "drop_path", None) is not None:
        kw["drop_path_rate"] = args.drop_path
    kw.update(args.model_kwargs or {})
    return kw


def quant_spec(args) -> Optional[Dict[str, Any]]:
    """The serialisable quantization recipe: preset name and overrides."""
    if args.quant in (None, "none"):
        return None
    overrides: Dict[str, Any] = {}
    if args.head_wise is not None:
        overrides["head_wise"] = bool(args.head_wise)
    if args.first_last_bits is not None:
        overrides["first_last_bits"] = int(args.first_last_bits)
    for key in ("shared_scale", "init", "weight_grouping"):  # differences from the research code
        if getattr(args, key, None) is not None:
            overrides[key] = getattr(args, key)
    return {"preset": args.quant, "overrides": overrides}


# --------------------------------------------------------------- optimizer
def param_groups(model, lr: float, weight_decay: float, bit_lr: float = 1.0,
                 scale_lr: float = 1.0) -> List[Dict[str, Any]]:
    """Four groups: decayed weights; undecayed norms/biases/tokens; scales+offsets; bits."""
    skip = set()
    if hasattr(model, "no_weight_decay"):
        try:
            skip = set(model.no_weight_decay())
        except Exception:  # noqa: BLE001 - optional timm hook
            skip = set()
    decay, no_decay, scales, bits = [], [], [], []
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "bits" or leaf.endswith("_bits"):
            bits.append(p)
        elif leaf in ("scale", "offset") or leaf.endswith(("_scale", "_offset")):
            if p.ndim <= 2 and _is_quantizer_param(model, name):
                scales.append(p)
            else:
                (no_decay if p.ndim <= 1 else decay).append(p)
        elif p.ndim <= 1 or name.endswith(".bias") or name in skip or \
                any(name.endswith("." + s) or name == s for s in skip):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "lr": lr, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": "no_decay"},
        {"params": scales, "lr": lr * scale_lr, "weight_decay": 0.0, "name": "scale"},
        {"params": bits, "lr": lr * bit_lr, "weight_decay": 0.0, "name": "bits"},
    ]
    return [g for g in groups if g["params"]]


def _is_quantizer_param(model, name: str) -> bool:
    mod_name = name.rsplit(".", 1)[0] if "." in name else ""
    try:
        mod = model.get_submodule(mod_name)
    except AttributeError:
        return False
    return hasattr(mod, "bits_range") or type(mod).__name__.endswith("Quantizer")


def create_optimizer(model, args):
    from timm.optim import create_optimizer_v2

    groups = param_groups(model, args.lr, args.weight_decay, args.bit_lr, args.scale_lr)
    try:
        return create_optimizer_v2(groups, opt=args.opt, lr=args.lr,
                                   weight_decay=args.weight_decay, momentum=args.momentum)
    except (AssertionError, ValueError, KeyError) as e:
        raise UsageError(f"--opt {args.opt!r}: {e}") from None


def create_scheduler(optimizer, args, updates_per_epoch: int):
    from timm.scheduler import create_scheduler_v2

    try:
        sched, _ = create_scheduler_v2(
            optimizer, sched=args.sched, num_epochs=args.epochs, min_lr=args.min_lr,
            warmup_lr=args.warmup_lr, warmup_epochs=args.warmup_epochs,
            step_on_epochs=False, updates_per_epoch=updates_per_epoch)
    except (AssertionError, ValueError, KeyError) as e:
        raise UsageError(f"--sched {args.sched!r}: {e}") from None
    if sched is None:
        raise UsageError(f"--sched {args.sched!r} is not a known scheduler")
    return sched


# ------------------------------------------------------------ quant helpers
class QuantState:
    """Lazy access to qvit.models.convert / qvit.models.budget for a (maybe) quantized model."""

    def __init__(self, model, spec, args, device):
        self.active = spec is not None
        self.model = model
        self.budget = None
        self.budget_kind = args.budget_kind
        self.budget_weight = args.budget_weight
        self.budget_relative = bool(getattr(args, "budget_relative", False))
        self.frozen = False
        self._quantizers: List[Any] = []
        if not self.active:
            return
        from ..models.convert import quantizers

        self._quantizers = [q for _, q in quantizers(model)]
        self.learn_bits = any(getattr(q, "learn_bits", False) for q in self._quantizers)

    def resolve_budget(self, args, example: torch.Tensor) -> Optional[float]:
        """Budget in GBitOPs (or in megabits of weights for kind='size')."""
        if not self.active:
            return None
        from ..models.budget import uniform_bitops

        if args.budget_gbitops is not None:
            self.budget = float(args.budget_gbitops)
        elif args.target_bits is not None:
            if self.budget_kind == "size":
                raise UsageError("--target-bits works with the BitOPs budget; for "
                                 "--budget-kind size give --budget-gbitops")
            else:
                with torch.no_grad():
                    self.model.eval()
                    self.model(example)
                self.budget = float(uniform_bitops(self.model, args.target_bits)) / 1e9
        return self.budget

    def loss(self):
        if self.budget is None or not self.active or self.frozen:
            return None
        from ..models.budget import budget_loss

        weight = self.budget_weight
        if self.budget_relative:
            # lambda * max(B/budget - 1, 0)^2: the same relative overshoot costs the
            # same whatever the model's size (tiny models have tiny GBitOPs)
            weight = weight / max(self.budget, 1e-30) ** 2
        return budget_loss(self.model, self.budget, weight=weight, kind=self.budget_kind)

    def after_step(self) -> None:
        for q in self._quantizers:
            q.clamp_bits_()

    def freeze(self) -> None:
        if self.active and not self.frozen:
            from ..models.budget import freeze_bits

            freeze_bits(self.model, True)
        self.frozen = True

    def stats(self) -> Dict[str, float]:
        if not self.active:
            return {}
        from ..models.budget import average_bits, bitops

        out: Dict[str, float] = {}
        try:
            out["gbitops"] = float(bitops(self.model).detach()) / 1e9
        except Exception:  # noqa: BLE001 - before the first forward
            pass
        for k, v in average_bits(self.model).items():
            out[_short_bits_key(k)] = float(v)
        return out


def _short_bits_key(k: str) -> str:
    k = str(k)
    if k.startswith("w") or "weight" in k:
        return "wbits"
    if k.startswith("a") or "act" in k:
        return "abits"
    return k


# --------------------------------------------------------------- training
def _amp_ctx(args, device: torch.device):
    if not args.amp:
        return nullcontext()
    dtype = torch.bfloat16 if args.amp_dtype == "bfloat16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _loss_fn(logits, target, smoothing: float):
    if isinstance(logits, (tuple, list)):  # distilled DeiT in training mode
        return sum(F.cross_entropy(l, target, label_smoothing=smoothing) for l in logits) / len(logits)
    return F.cross_entropy(logits, target, label_smoothing=smoothing)


def _kd_loss(student, teacher, temperature: float):
    if isinstance(student, (tuple, list)):
        student = student[-1]
    if isinstance(teacher, (tuple, list)):
        teacher = sum(teacher) / len(teacher)
    t = temperature
    return F.kl_div(F.log_softmax(student.float() / t, -1), F.log_softmax(teacher.float() / t, -1),
                    reduction="batchmean", log_target=True) * (t * t)


def _logits(out):
    if isinstance(out, (tuple, list)):
        return sum(out) / len(out)
    return out


@torch.no_grad()
def evaluate(model, loader, device, args=None, desc: str = "eval",
             progress: bool = False) -> Dict[str, float]:
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64)
    c1 = torch.zeros((), dtype=torch.float64)
    c5 = torch.zeros((), dtype=torch.float64)
    n = torch.zeros((), dtype=torch.float64)
    it = loader
    if progress:
        from tqdm import tqdm
        it = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True)
    amp = _amp_ctx(args, device) if args is not None else nullcontext()
    for x, y in it:
        x, y = x.to(device), y.to(device)
        with amp:
            out = _logits(model(x))
        out = out.float()
        loss_sum += F.cross_entropy(out, y, reduction="sum").double().cpu()
        k = min(5, out.shape[-1])
        top = out.topk(k, dim=-1).indices
        hit = top.eq(y[:, None])
        c1 += hit[:, 0].sum().double().cpu()
        c5 += hit.any(dim=1).sum().double().cpu()
        n += y.numel()
    stats = torch.stack([loss_sum, c1, c5, n])
    dist_util.all_reduce_sum(stats)
    loss_sum, c1, c5, n = stats.tolist()
    n = max(n, 1.0)
    return {"loss": loss_sum / n, "top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n,
            "count": int(n)}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def validate_args(args) -> None:
    def need(cond, msg):
        if not cond:
            raise UsageError(msg)

    need(args.epochs >= 1, f"--epochs must be >= 1, got {args.epochs}")
    need(args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}")
    need(args.lr > 0 and math.isfinite(args.lr), f"--lr must be a positive number, got {args.lr}")
    need(args.weight_decay >= 0, f"--weight-decay must be >= 0, got {args.weight_decay}")
    need(args.workers >= 0, f"--workers must be >= 0, got {args.workers}")
    need(args.calib_batches >= 1, f"--calib-batches must be >= 1, got {args.calib_batches}")
    need(0.0 <= args.freeze_bits_at <= 1.0,
         f"--freeze-bits-at must be a fraction in [0, 1], got {args.freeze_bits_at}")
    need(args.budget_weight >= 0 and math.isfinite(args.budget_weight),
         f"--budget-weight must be >= 0, got {args.budget_weight}")
    need(args.bit_lr >= 0 and args.scale_lr >= 0, "--bit-lr / --scale-lr must be >= 0")
    if args.target_bits is not None:
        need(2 <= args.target_bits <= 8,
             f"--target-bits must lie in the bit range [2, 8], got {args.target_bits}")
    if args.budget_gbitops is not None:
        need(args.budget_gbitops > 0 and math.isfinite(args.budget_gbitops),
             f"--budget-gbitops must be a positive number, got {args.budget_gbitops}")
    if args.first_last_bits is not None:
        need(2 <= args.first_last_bits <= 8,
             f"--first-last-bits must lie in [2, 8], got {args.first_last_bits}")
    need(not (args.target_bits is not None and args.budget_gbitops is not None),
         "give either --target-bits or --budget-gbitops, not both")
    if args.quant in (None, "none"):
        need(args.target_bits is None and args.budget_gbitops is None,
             "--target-bits / --budget-gbitops need a --quant preset")
    need(args.amp_dtype in ("bfloat16", "float16"),
         f"--amp-dtype must be bfloat16 or float16, got {args.amp_dtype!r}")
    if args.img_size is not None:
        need(args.img_size >= 1, f"--img-size must be >= 1, got {args.img_size}")
    if args.num_classes is not None:
        need(args.num_classes >= 1, f"--num-classes must be >= 1, got {args.num_classes}")


def _device(args) -> torch.device:
    name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise UsageError(f"--device {name!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name!r}: CUDA is not available on this machine")
    return dev


class _Log:
    def __init__(self, enabled: bool, quiet: bool = False):
        self.enabled = enabled and not quiet

    def __call__(self, msg: str) -> None:
        if self.enabled:
            print(msg, flush=True)


def train(args) -> Dict[str, Any]:
    """Run one training job described by parsed ``qvit train`` arguments.

    Returns the final summary (also written as ``summary.json`` next to
    ``summary.csv`` in the run folder).
    """
    validate_args(args)
    want_device = _device(args)
    dinfo = dist_util.init(str(want_device))
    try:
        return _train(args, dinfo)
    finally:
        dist_util.cleanup(dinfo)


def _train(args, dinfo) -> Dict[str, Any]:
    device = dinfo.device
    is_main = dinfo.is_main
    log = _Log(is_main, getattr(args, "quiet", False))
    progress = is_main and not getattr(args, "no_progress", False)
    seed_everything(args.seed + dinfo.rank)
    if args.threads:
        torch.set_num_threads(args.threads)

    # ---------------------------------------------------------------- data
    folders = check_image_folder(args.data_dir)
    num_classes = args.num_classes or len(folders["classes"])
    if args.num_classes is None:
        args.num_classes = num_classes

    # --------------------------------------------------------------- model
    kwargs = model_kwargs(args)
    model_info = {"name": args.model, "kwargs": kwargs}
    model = create_model(args.model, kwargs, pretrained=args.pretrained,
                         pretrained_path=args.pretrained_path)
    if args.initial_checkpoint:
        init = ckpt_io.load(args.initial_checkpoint)
        state = ckpt_io.model_state(init)
        ckpt_io.load_model_state(model, state, args.initial_checkpoint)
        log(f"loaded float weights from {args.initial_checkpoint}")
    in_chans, h, w = input_size(model)
    if h != w:
        raise UsageError(f"model input {h}x{w} is not square; give --img-size")
    lcfg = LoaderConfig(
        img_size=h, batch_size=args.batch_size, workers=args.workers, in_chans=in_chans,
        mean=tuple(args.mean), std=tuple(args.std), interpolation=args.interpolation,
        crop_pct=args.crop_pct, no_aug=args.no_aug, scale=tuple(args.scale),
        ratio=tuple(args.ratio), hflip=args.hflip, color_jitter=args.color_jitter,
        auto_augment=args.aa, re_prob=args.reprob)
    train_loader = create_loader(folders["train"], lcfg, is_training=True, device=device,
                                 distributed=dinfo.enabled, rank=dinfo.rank, world=dinfo.world)
    val_loader = create_loader(folders["val"], lcfg, is_training=False, device=device,
                               distributed=dinfo.enabled, rank=dinfo.rank, world=dinfo.world)
    head = getattr(model, "num_classes", num_classes)
    if head != num_classes:
        raise UsageError(f"model has {head} classes but the data folder has {num_classes}")

    teacher = None
    if args.distill:
        teacher = copy.deepcopy(model).to(device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)

    spec = quant_spec(args)
    apply_quant(model, spec)
    model.to(device)
    qs = QuantState(model, spec, args, device)

    resume = ckpt_io.load(args.resume) if args.resume else None
    if resume is not None:
        if resume.get("quant") != spec or (resume.get("model_info") or {}).get("name") != args.model:
            raise ckpt_io.CheckpointError(
                f"{args.resume} was saved by a different run (model / --quant differ)")
        ckpt_io.load_model_state(model, ckpt_io.model_state(resume), args.resume)
    elif spec is not None:
        _calibrate(model, train_loader, val_loader, args, device, dinfo, log)

    example = next(iter(val_loader))[0][:1].to(device)
    budget = qs.resolve_budget(args, example) if spec is not None else None
    if budget is not None:
        _check_budget(model, budget, args)
        log(f"budget: {budget:.4g} {'GBitOPs' if args.budget_kind == 'bitops' else 'Mbit'}")

    optimizer = create_optimizer(model, args)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise DataError(f"data folder {folders['train']!r}: fewer images than one batch")
    scheduler = create_scheduler(optimizer, args, steps_per_epoch)
    scaler = None
    if args.amp and args.amp_dtype == "float16" and device.type == "cuda":
        scaler = torch.amp.GradScaler("cuda")

    start_epoch = 0
    best = {"top1": -1.0, "epoch": -1}
    if resume is not None:
        try:
            optimizer.load_state_dict(resume["optimizer"])
            if "scheduler" in resume:
                scheduler.load_state_dict(resume["scheduler"])
            if scaler is not None and resume.get("scaler"):
                scaler.load_state_dict(resume["scaler"])
        except (KeyError, ValueError, RuntimeError) as e:
            raise ckpt_io.CheckpointError(f"{args.resume}: optimizer state does not fit: "
                                          f"{str(e).splitlines()[0]}") from None
        start_epoch = int(resume["epoch"]) + 1
        best = dict(resume.get("best", best))
        if resume.get("bits_frozen"):
            qs.freeze()
        log(f"resumed from {args.resume} at epoch {start_epoch}")

    total_steps = args.epochs * steps_per_epoch
    freeze_step = int(round(args.freeze_bits_at * total_steps)) if qs.active else None

    train_model = model
    if dinfo.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        dist_util.broadcast_module(model)
        train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                          find_unused_parameters=bool(qs.active and qs.learn_bits))
    if args.torchcompile:
        train_model = torch.compile(train_model, backend=args.torchcompile)

    out_dir = args.output
    if is_main:
        os.makedirs(out_dir, exist_ok=True)
        _write_args_yaml(args, os.path.join(out_dir, "args.yaml"))
        _truncate_csv(os.path.join(out_dir, "summary.csv"), start_epoch)
    tb = _tensorboard(out_dir) if is_main and not args.no_tensorboard else None

    if resume is not None:
        # last: everything above may have drawn random numbers
        ckpt_io.set_rng_state(resume["rng"])

    args_dict = _args_dict(args)
    history: List[Dict[str, Any]] = []
    t_start = time.time()
    epoch = start_epoch - 1
    val = {}
    for epoch in range(start_epoch, args.epochs):
        set_epoch(train_loader, epoch, args.seed)
        t0 = time.time()
        tr = _train_one_epoch(train_model, model, teacher, train_loader, optimizer, scheduler,
                              scaler, qs, args, device, epoch, steps_per_epoch, freeze_step,
                              progress)
        val = evaluate(model, val_loader, device, args, desc=f"val {epoch}", progress=progress)
        stats = qs.stats()
        row = {"epoch": epoch, "train_loss": tr["loss"], "train_top1": tr["top1"],
               "val_loss": val["loss"], "val_top1": val["top1"], "val_top5": val["top5"],
               "lr": tr["lr"], "wbits": stats.get("wbits", float("nan") if qs.active else 32.0),
               "abits": stats.get("abits", float("nan") if qs.active else 32.0),
               "gbitops": stats.get("gbitops", float("nan")), "epoch_time": time.time() - t0}
        history.append(row)
        is_best = val["top1"] > best["top1"]
        if is_best:
            best = {"top1": val["top1"], "top5": val["top5"], "epoch": epoch}
        if is_main:
            _append_csv(os.path.join(out_dir, "summary.csv"), row)
            if tb is not None:
                for k, v in row.items():
                    if k != "epoch":
                        tb.add_scalar(k, v, epoch)
            ck = ckpt_io.build_checkpoint(
                model, optimizer, scheduler, scaler, epoch=epoch, args=args_dict, quant=spec,
                model_info=model_info, metrics={**val, **stats},
                extra={"best": best, "bits_frozen": qs.frozen, "version": 1})
            ckpt_io.save(ck, os.path.join(out_dir, "last.pth"))
            if is_best:
                ckpt_io.save(ck, os.path.join(out_dir, "best.pth"))
            bits = ""
            if qs.active:
                bits = (f"  bits W{row['wbits']:.2f}/A{row['abits']:.2f}"
                        f"  {row['gbitops']:.4g} GBitOPs")
            log(f"epoch {epoch}: train loss {tr['loss']:.4f} top1 {tr['top1']:.2f}  "
                f"val top1 {val['top1']:.2f} top5 {val['top5']:.2f}{bits}  "
                f"({row['epoch_time']:.1f}s)")
        dist_util.barrier()
        if args.stop_after_epoch is not None and epoch >= args.stop_after_epoch:
            break
    if tb is not None:
        tb.close()

    summary = {
        "model": args.model, "quant": args.quant, "epochs": args.epochs,
        "last_epoch": epoch, "final_top1": val.get("top1"), "final_top5": val.get("top5"),
        "best_top1": best.get("top1"), "best_epoch": best.get("epoch"),
        "budget": budget, "wall_s": time.time() - t_start, "output": out_dir,
        **{k: v for k, v in qs.stats().items()},
    }
    if qs.active:
        summary.update(_size_summary(model))
    if is_main:
        import json

        with open(os.path.join(out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2, default=str)
        log(_format_summary(summary))
    summary["model_obj"] = model
    return summary


def _size_summary(model) -> Dict[str, float]:
    from ..models.budget import model_size_bits

    try:
        return {"size_kb": float(model_size_bits(model).detach()) / 8.0 / 1024.0}
    except Exception:  # noqa: BLE001
        return {}


def _format_summary(s: Dict[str, Any]) -> str:
    parts = [f"done: {s['model']} quant={s['quant']}",
             f"final top1 {s['final_top1']:.2f}" if s.get("final_top1") is not None else "",
             f"best top1 {s['best_top1']:.2f} (epoch {s['best_epoch']})"]
    if "wbits" in s:
        parts.append(f"W{s['wbits']:.2f}/A{s.get('abits', float('nan')):.2f} bits")
    if "gbitops" in s:
        parts.append(f"{s['gbitops']:.4g} GBitOPs")
    parts.append(f"{s['wall_s']:.1f}s -> {s['output']}")
    return "  ".join(p for p in parts if p)


def _check_budget(model, budget: float, args) -> None:
    """A BitOPs budget below all-2-bit cannot be met: refuse it up front."""
    if args.budget_kind != "bitops":
        return
    from ..models.budget import uniform_bitops

    lo = float(uniform_bitops(model, 2)) / 1e9
    if budget < lo * (1 - 1e-6):
        raise UsageError(f"budget {budget:.4g} GBitOPs is below what 2-bit weights and "
                         f"activations reach ({lo:.4g} GBitOPs)")


def _calibrate(model, train_loader, val_loader, args, device, dinfo, log) -> None:
    """Fit scales on a few batches (rank 0), then broadcast to every rank."""
    from ..models.convert import calibrate

    if dinfo.is_main:
        batches = []
        # calibration images without augmentation: the validation transform
        for i, (x, _) in enumerate(val_loader):
            if i >= args.calib_batches:
                break
            batches.append(x.to(device))
        was = model.training
        model.eval()
        with torch.no_grad():
            calibrate(model, batches)
        model.train(was)
        log(f"calibrated quantizer scales on {len(batches)} batch(es)")
    dist_util.broadcast_module(model)


def _train_one_epoch(train_model, model, teacher, loader, optimizer, scheduler, scaler, qs,
                     args, device, epoch, steps_per_epoch, freeze_step, progress):
    train_model.train()
    if args.qat_eval_mode and qs.active:
        # the research recipe fine-tunes with the model in eval mode (no drop-path)
        train_model.eval()
    it = loader
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(loader, desc=f"train {epoch}", leave=False, dynamic_ncols=True,
                   total=steps_per_epoch)
        it = bar
    loss_sum, correct, count = 0.0, 0, 0
    lr = optimizer.param_groups[0]["lr"]
    for i, (x, y) in enumerate(it):
        step = epoch * steps_per_epoch + i
        if freeze_step is not None and step >= freeze_step and not qs.frozen:
            qs.freeze()
        x, y = x.to(device), y.to(device)
        with _amp_ctx(args, device):
            out = train_model(x)
            loss = _loss_fn(out, y, args.smoothing)
            if teacher is not None:
                with torch.no_grad():
                    t_out = teacher(x)
                kd = _kd_loss(out, t_out, args.distill_temp)
                loss = (1 - args.distill_alpha) * loss + args.distill_alpha * kd
        bl = qs.loss()
        if bl is not None:
            loss = loss + bl
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch} step {i}")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            if args.clip_grad:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if args.clip_grad:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            optimizer.step()
        qs.after_step()
        scheduler.step_update(num_updates=step + 1)
        lr = optimizer.param_groups[0]["lr"]
        with torch.no_grad():
            logits = _logits(out).detach()
            loss_sum += float(loss.detach()) * y.numel()
            correct += int((logits.argmax(-1) == y).sum())
            count += y.numel()
        if bar is not None and (i % max(1, args.log_interval) == 0 or i == steps_per_epoch - 1):
            post = {"loss": f"{loss_sum / count:.3f}", "acc": f"{100.0 * correct / count:.1f}"}
            for k, v in qs.stats().items():
                post[k] = f"{v:.3g}" if k == "gbitops" else f"{v:.2f}"
            bar.set_postfix(post, refresh=False)
    scheduler.step(epoch + 1)
    if bar is not None:
        bar.close()
    return {"loss": loss_sum / max(count, 1), "top1": 100.0 * correct / max(count, 1), "lr": lr}


# ----------------------------------------------------------------- logging
def _args_dict(args) -> Dict[str, Any]:
    out = {}
    for k, v in vars(args).items():
        if callable(v) or k == "command":
            continue
        if isinstance(v, tuple):
            v = list(v)
        out[k] = v
    return out


def _write_args_yaml(args, path: str) -> None:
    import yaml

    with open(path, "w") as f:
        yaml.safe_dump(_args_dict(args), f, default_flow_style=False, sort_keys=True)


def _append_csv(path: str, row: Dict[str, Any]) -> None:
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def _truncate_csv(path: str, start_epoch: int) -> None:
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


def _tensorboard(out_dir: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # noqa: BLE001 - tensorboard is optional
        return None
    try:
        return SummaryWriter(os.path.join(out_dir, "tb"))
    except Exception:  # noqa: BLE001
        return None
