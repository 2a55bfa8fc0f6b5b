"""Top-1 / top-5 / loss of a model on a loader (summed across DDP ranks)."""
from __future__ import annotations

from contextlib import nullcontext
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from . import distributed as dist_util
from .losses import logits


def amp_context(enabled: bool, amp_dtype: str, device: torch.device):
    """``torch.autocast`` for ``--amp`` (bfloat16 or float16), else a no-op."""
    if not enabled:
        return nullcontext()
    dtype = torch.bfloat16 if amp_dtype == "bfloat16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def evaluate(model, loader, device, amp=None, desc: str = "eval",
             progress: bool = False) -> Dict[str, float]:
    """``{"loss", "top1", "top5", "count"}`` over ``loader`` (eval mode).

    ``amp``: a context manager for the forward (see :func:`amp_context`).
    """
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64)
    c1 = torch.zeros((), dtype=torch.float64)
    c5 = torch.zeros((), dtype=torch.float64)
    n = torch.zeros((), dtype=torch.float64)
    it = loader
    if progress:
        from tqdm import tqdm
        it = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True)
    for x, y in it:
        x, y = x.to(device), y.to(device)
        with (amp if amp is not None else nullcontext()):
            out = logits(model(x))
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


def resolve_device(name: Optional[str]) -> torch.device:
    """``--device`` (default: cuda if present) as a ``torch.device``; a clear error otherwise."""
    from ..models.recipe import UsageError

    name = name or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise UsageError(f"--device {name!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name!r}: CUDA is not available on this machine")
    return dev
