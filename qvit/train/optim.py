"""The optimizer and the learning-rate schedule of a run (timm's factories)."""
from __future__ import annotations

from ..models.param_groups import param_groups
from ..models.recipe import UsageError
from .config import TrainConfig


def create_optimizer(model, cfg: TrainConfig):
    """A timm optimizer over :func:`qvit.param_groups` (bits and scales at their own lr)."""
    from timm.optim import create_optimizer_v2

    groups = param_groups(model, cfg.lr, cfg.weight_decay, cfg.bit_lr, cfg.scale_lr)
    try:
        return create_optimizer_v2(groups, opt=cfg.opt, lr=cfg.lr,
                                   weight_decay=cfg.weight_decay, momentum=cfg.momentum)
    except (AssertionError, ValueError, KeyError) as e:
        raise UsageError(f"--opt {cfg.opt!r}: {e}") from None


def create_scheduler(optimizer, cfg: TrainConfig, updates_per_epoch: int):
    """timm's scheduler, stepped per update (``step_update``) and per epoch."""
    from timm.scheduler import create_scheduler_v2

    try:
        sched, _ = create_scheduler_v2(
            optimizer, sched=cfg.sched, num_epochs=cfg.epochs, min_lr=cfg.min_lr,
            warmup_lr=cfg.warmup_lr, warmup_epochs=cfg.warmup_epochs,
            step_on_epochs=False, updates_per_epoch=updates_per_epoch)
    except (AssertionError, ValueError, KeyError) as e:
        raise UsageError(f"--sched {cfg.sched!r}: {e}") from None
    if sched is None:
        raise UsageError(f"--sched {cfg.sched!r} is not a known scheduler")
    return sched
