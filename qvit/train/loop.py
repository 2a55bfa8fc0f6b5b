"""The training loop behind ``qvit train`` (float training and Q-ViT QAT).

Mirrors timm's ``train.py``: the same data layout and loader, model creation,
optimizer / scheduler factories, AMP, ``args.yaml`` and ``summary.csv`` in the
run folder, checkpoints with timm's keys. Adds quantization (a preset from
:mod:`qvit.nn.config`), calibration, the BitOPs budget, bit freezing and
optional distillation from the float model. Everything it needs is one
:class:`~qvit.train.config.TrainConfig`.
"""
from __future__ import annotations

import copy
import os
import random
import time
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from ..models import checkpoint as ckpt_io
from ..models.recipe import UsageError, apply_quant, create_model, data_config, input_size
from . import distributed as dist_util
from . import run_dir
from .config import TrainConfig
from .data import DataError, LoaderConfig, check_image_folder, create_loader, set_epoch
from .evaluate import amp_context, evaluate, resolve_device
from .losses import kd_loss, logits, task_loss
from .optim import create_optimizer, create_scheduler
from .quant_state import QuantState


def model_kwargs(cfg: TrainConfig) -> Dict[str, Any]:
    """``timm.create_model`` keyword arguments of the run."""
    kw: Dict[str, Any] = {}
    if cfg.num_classes is not None:
        kw["num_classes"] = cfg.num_classes
    if cfg.img_size is not None:
        kw["img_size"] = cfg.img_size
    if cfg.drop_path is not None:
        kw["drop_path_rate"] = cfg.drop_path
    kw.update(cfg.model_kwargs or {})
    return kw


def quant_spec(cfg: TrainConfig) -> Optional[Dict[str, Any]]:
    """The serialisable quantization recipe: preset name and overrides."""
    if not cfg.quantized:
        return None
    overrides: Dict[str, Any] = {}
    if cfg.head_wise is not None:
        overrides["head_wise"] = bool(cfg.head_wise)
    if cfg.first_last_bits is not None:
        overrides["first_last_bits"] = int(cfg.first_last_bits)
    # the differences from the research code (see qvit.nn.config)
    if cfg.shared_scale is not None:
        overrides["shared_scale"] = bool(cfg.shared_scale)
    if cfg.scale_init is not None:
        overrides["init"] = cfg.scale_init
    if cfg.weight_grouping is not None:
        overrides["weight_grouping"] = cfg.weight_grouping
    return {"preset": cfg.quant, "overrides": overrides}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


class _Log:
    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __call__(self, msg: str) -> None:
        if self.enabled:
            print(msg, flush=True)


def train(cfg: TrainConfig) -> Dict[str, Any]:
    """Run one training job; return its summary (also ``summary.json`` in the run folder).

    ``summary["model_obj"]`` is the trained model.
    """
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    cfg.validate()
    if not cfg.data_dir:
        raise UsageError("no data folder: give data_dir (the CLI runs the demo without one)")
    if cfg.output is None:
        cfg = cfg.replace(output=run_dir.default_output(cfg))
    # every rank, before any of them writes: a refusal must not leave peers waiting
    run_dir.check_free(cfg.output, cfg)
    want_device = resolve_device(cfg.device)
    dinfo = dist_util.init(str(want_device))
    try:
        return _train(cfg, dinfo)
    finally:
        dist_util.cleanup(dinfo)


def _loaders(cfg: TrainConfig, folders, model, device, dinfo):
    in_chans, h, w = input_size(model)
    if h != w:
        raise UsageError(f"model input {h}x{w} is not square; give --img-size")
    lcfg = LoaderConfig(
        img_size=h, batch_size=cfg.batch_size, workers=cfg.workers, in_chans=in_chans,
        mean=tuple(cfg.mean), std=tuple(cfg.std), interpolation=cfg.interpolation,
        crop_pct=cfg.crop_pct, no_aug=cfg.no_aug, scale=tuple(cfg.scale),
        ratio=tuple(cfg.ratio), hflip=cfg.hflip, color_jitter=cfg.color_jitter,
        auto_augment=None if cfg.aa in (None, "", "none") else cfg.aa, re_prob=cfg.reprob,
        re_mode=cfg.remode,
        # timm's RepeatAugSampler shards the repeats over processes: torchrun only
        aug_repeats=cfg.aug_repeats if dinfo.enabled else 0)
    kw = dict(device=device, distributed=dinfo.enabled, rank=dinfo.rank, world=dinfo.world)
    return (create_loader(folders["train"], lcfg, is_training=True, **kw),
            create_loader(folders["val"], lcfg, is_training=False, **kw))


def _train(cfg: TrainConfig, dinfo) -> Dict[str, Any]:
    device = dinfo.device
    is_main = dinfo.is_main
    log = _Log(is_main and not cfg.quiet)
    progress = is_main and not cfg.no_progress
    out_dir = cfg.output
    seed_everything(cfg.seed + dinfo.rank)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # lr = lr_base x total batch / 512 unless given (recorded in args.yaml)
    cfg = cfg.replace(lr_base=cfg.resolved_lr_base(), lr=cfg.resolved_lr(dinfo.world))

    folders = check_image_folder(cfg.data_dir)
    num_classes = cfg.num_classes or len(folders["classes"])
    cfg = cfg.replace(num_classes=num_classes)

    kwargs = model_kwargs(cfg)
    model_info = {"name": cfg.model, "kwargs": kwargs}
    model = create_model(cfg.model, kwargs, pretrained=cfg.pretrained,
                         pretrained_path=cfg.pretrained_path)
    model.__dict__["qvit_data"] = data_config(cfg.to_dict())
    if cfg.initial_checkpoint:
        init = ckpt_io.load(cfg.initial_checkpoint)
        ckpt_io.load_model_state(model, ckpt_io.model_state(init), cfg.initial_checkpoint)
        log(f"loaded float weights from {cfg.initial_checkpoint}")
    train_loader, val_loader = _loaders(cfg, folders, model, device, dinfo)
    head = getattr(model, "num_classes", num_classes)
    if head != num_classes:
        raise UsageError(f"model has {head} classes but the data folder has {num_classes}")

    teacher = None
    if cfg.distill:
        teacher = copy.deepcopy(model).to(device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)

    spec = quant_spec(cfg)
    apply_quant(model, spec)
    model.to(device)
    qs = QuantState(model, cfg)

    resume = ckpt_io.load(cfg.resume) if cfg.resume else None
    if resume is not None:
        if resume.get("quant") != spec or (resume.get("model_info") or {}).get("name") != cfg.model:
            raise ckpt_io.CheckpointError(
                f"{cfg.resume} was saved by a different run (model / --quant differ)")
        ckpt_io.load_model_state(model, ckpt_io.model_state(resume), cfg.resume)
    elif spec is not None:
        _calibrate(model, val_loader, cfg, device, dinfo, log)

    budget = None
    if spec is not None:
        example = next(iter(val_loader))[0][:1].to(device)
        budget = qs.resolve_budget(cfg, example)
        if budget is not None:
            log(f"budget: {budget:.4g} {'GBitOPs' if cfg.budget_kind == 'bitops' else 'Mbit'}")

    optimizer = create_optimizer(model, cfg)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise DataError(f"data folder {folders['train']!r}: fewer images than one batch")
    scheduler = create_scheduler(optimizer, cfg, steps_per_epoch)
    scaler = None
    if cfg.amp and cfg.amp_dtype == "float16" and device.type == "cuda":
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
            raise ckpt_io.CheckpointError(f"{cfg.resume}: optimizer state does not fit: "
                                          f"{str(e).splitlines()[0]}") from None
        start_epoch = int(resume["epoch"]) + 1
        best = dict(resume.get("best", best))
        if resume.get("bits_frozen"):
            qs.freeze()
        log(f"resumed from {cfg.resume} at epoch {start_epoch}")

    mixup_fn = _mixup(cfg, num_classes)
    total_steps = cfg.epochs * steps_per_epoch
    freeze_step = int(round(cfg.freeze_bits_at * total_steps)) if qs.active else None

    train_model = model
    if dinfo.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        dist_util.broadcast_module(model)
        train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                          find_unused_parameters=bool(qs.active and qs.learn_bits))
    if cfg.torchcompile:
        train_model = torch.compile(train_model, backend=cfg.torchcompile)

    if is_main:
        run_dir.prepare(out_dir, cfg, start_epoch)
    tb = run_dir.tensorboard(out_dir) if is_main and not cfg.no_tensorboard else None

    if resume is not None:
        # last: everything above may have drawn random numbers
        ckpt_io.set_rng_state(resume["rng"])

    args_dict = cfg.to_dict()
    t_start = time.time()
    epoch = start_epoch - 1
    val: Dict[str, float] = {}
    amp = amp_context(cfg.amp, cfg.amp_dtype, device)
    for epoch in range(start_epoch, cfg.epochs):
        set_epoch(train_loader, epoch, cfg.seed)
        t0 = time.time()
        tr = _train_one_epoch(train_model, model, teacher, train_loader, optimizer, scheduler,
                              scaler, qs, cfg, device, epoch, steps_per_epoch, freeze_step,
                              mixup_fn, progress)
        val = evaluate(model, val_loader, device, amp, desc=f"val {epoch}", progress=progress)
        stats = qs.stats()
        row = {"epoch": epoch, "train_loss": tr["loss"], "train_top1": tr["top1"],
               "val_loss": val["loss"], "val_top1": val["top1"], "val_top5": val["top5"],
               "lr": tr["lr"], "wbits": stats.get("wbits", float("nan") if qs.active else 32.0),
               "abits": stats.get("abits", float("nan") if qs.active else 32.0),
               "gbitops": stats.get("gbitops", float("nan")), "epoch_time": time.time() - t0}
        is_best = val["top1"] > best["top1"]
        if is_best:
            best = {"top1": val["top1"], "top5": val["top5"], "epoch": epoch}
        if is_main:
            run_dir.append_csv(os.path.join(out_dir, "summary.csv"), row)
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
        if cfg.stop_after_epoch is not None and epoch >= cfg.stop_after_epoch:
            break
    if tb is not None:
        tb.close()

    summary = {
        "model": cfg.model, "quant": cfg.quant, "epochs": cfg.epochs,
        "last_epoch": epoch, "final_top1": val.get("top1"), "final_top5": val.get("top5"),
        "best_top1": best.get("top1"), "best_epoch": best.get("epoch"),
        "budget": budget, "wall_s": time.time() - t_start, "output": out_dir,
        **qs.stats(),
    }
    if qs.active:
        summary["size_kb"] = qs.size_kb()
    if is_main:
        run_dir.write_summary(out_dir, summary)
        log(run_dir.format_summary(summary))
    summary["model_obj"] = model
    return summary


def _calibrate(model, val_loader, cfg: TrainConfig, device, dinfo, log) -> None:
    """Fit scales on a few batches (rank 0), then broadcast to every rank."""
    from ..models.convert import calibrate

    if dinfo.is_main:
        # calibration images without augmentation: the validation transform
        n = calibrate(model, ((x.to(device), y) for x, y in val_loader),
                      max_batches=cfg.calib_batches)
        log(f"calibrated quantizer scales on {n} batch(es)")
    dist_util.broadcast_module(model)


def _mixup(cfg: TrainConfig, num_classes: int):
    """timm's ``Mixup`` (mixup / cutmix and label smoothing into soft targets), or None."""
    if not cfg.mixup_active:
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                 switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode,
                 label_smoothing=cfg.smoothing, num_classes=num_classes)


def _train_one_epoch(train_model, model, teacher, loader, optimizer, scheduler, scaler, qs,
                     cfg: TrainConfig, device, epoch, steps_per_epoch, freeze_step, mixup_fn,
                     progress):
    train_model.train()
    if cfg.qat_eval_mode and qs.active:
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
        target = y
        if mixup_fn is not None:  # soft targets; the loss is timm's SoftTargetCrossEntropy
            x, target = mixup_fn(x, y)
        with amp_context(cfg.amp, cfg.amp_dtype, device):
            out = train_model(x)
            loss = task_loss(out, target, cfg.smoothing)
            if teacher is not None:
                with torch.no_grad():
                    t_out = teacher(x)
                kd = kd_loss(out, t_out, cfg.distill_temp)
                loss = (1 - cfg.distill_alpha) * loss + cfg.distill_alpha * kd
        bl = qs.loss()
        if bl is not None:
            loss = loss + bl
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch} step {i}")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            if cfg.clip_grad:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if cfg.clip_grad:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            optimizer.step()
        qs.after_step()
        scheduler.step_update(num_updates=step + 1)
        lr = optimizer.param_groups[0]["lr"]
        with torch.no_grad():
            pred = logits(out).detach()
            loss_sum += float(loss.detach()) * y.numel()
            correct += int((pred.argmax(-1) == y).sum())
            count += y.numel()
        if bar is not None and (i % max(1, cfg.log_interval) == 0 or i == steps_per_epoch - 1):
            post = {"loss": f"{loss_sum / count:.3f}", "acc": f"{100.0 * correct / count:.1f}"}
            for k, v in qs.stats().items():
                post[k] = f"{v:.3g}" if k == "gbitops" else f"{v:.2f}"
            bar.set_postfix(post, refresh=False)
    scheduler.step(epoch + 1)
    if bar is not None:
        bar.close()
    return {"loss": loss_sum / max(count, 1), "top1": 100.0 * correct / max(count, 1), "lr": lr}
