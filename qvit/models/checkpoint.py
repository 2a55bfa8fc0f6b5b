"""Checkpoints: atomic save, RNG capture/restore, clear errors on bad files.

Layout (timm-compatible keys so `timm.models.load_checkpoint` reads the
weights of a float run): ``state_dict``, ``optimizer``, ``scheduler``,
``scaler``, ``epoch``, ``rng``, ``args``, ``quant`` (preset name and overrides,
or None for a float model), ``model_info`` (timm name and creation kwargs),
``metrics``.
"""
from __future__ import annotations

import os
import random
import tempfile
from typing import Any, Callable, Dict, Optional

import numpy as np
import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


def rng_state() -> Dict[str, Any]:
    # only tensors and plain python values: the file then loads with
    # torch.load(weights_only=True), as timm's load_checkpoint does
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                  float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos,
                         has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def _umask() -> int:
    """The process umask, read without changing it where Linux allows."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: the classic read-by-setting
    os.umask(mask)
    return mask


def atomic_write(path: str, write: Callable[[str], None], suffix: str = ".tmp") -> None:
    """``write(tmp)`` into a temporary file next to ``path``, then rename it onto ``path``.

    A crash mid-write never leaves a truncated ``path``. The file gets the
    permissions any other new file gets (``0o666 & ~umask``; ``mkstemp``
    alone would leave it ``0o600``). The folder must exist.
    """
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise CheckpointError(f"cannot write {path!r}: folder {d!r} does not exist")
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save(obj: Dict[str, Any], path: str) -> None:
    """Write atomically (see :func:`atomic_write`), creating the folder if needed."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda tmp: torch.save(obj, tmp), suffix=".pth")


def load(path: str, map_location: Any = "cpu") -> Dict[str, Any]:
    """Read a checkpoint; raise :class:`CheckpointError` (one line) if it is unusable."""
    if not path:
        raise CheckpointError("checkpoint: no path given")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
            return {"state_dict": load_file(path, device=str(map_location))}
        except Exception as e:  # noqa: BLE001 - any decoder failure means corrupt
            raise CheckpointError(f"checkpoint {path!r} is corrupt or unreadable: "
                                  f"{_first_line(e)}") from None
    try:
        # tensors and plain python values only: no code runs from the file
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"checkpoint {path!r} is corrupt or unreadable: "
                              f"{_first_line(e)}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path!r} does not hold a state dict "
                              f"(found {type(obj).__name__})")
    return obj


def model_state(ckpt: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """The model weights of a checkpoint in any of timm's key conventions."""
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
        sd = ckpt.get(key)
        if isinstance(sd, dict):
            break
    else:
        sd = ckpt
    if not all(isinstance(v, torch.Tensor) for v in sd.values()) or not sd:
        raise CheckpointError("checkpoint holds no model weights (no state_dict)")
    return {(k[7:] if k.startswith("module.") else k): v for k, v in sd.items()}


def load_model_state(model: torch.nn.Module, state: Dict[str, torch.Tensor],
                     path: str = "checkpoint", strict: bool = True) -> None:
    """``load_state_dict`` with a one-line summary when the keys or shapes differ."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if shapes or (strict and (missing or unexpected)):
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        if shapes:
            k = shapes[0]
            parts.append(f"{len(shapes)} shape mismatches (e.g. {k}: checkpoint "
                         f"{tuple(state[k].shape)} vs model {tuple(own[k].shape)})")
        raise CheckpointError(f"{path} does not match the model: " + "; ".join(parts))
    model.load_state_dict(state, strict=strict)


def _first_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module) and \
                type(model).__name__ == "DistributedDataParallel":
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def build_checkpoint(model, optimizer=None, scheduler=None, scaler=None, *, epoch: int,
                     args: Optional[dict] = None, quant: Optional[dict] = None,
                     model_info: Optional[dict] = None, metrics: Optional[dict] = None,
                     extra: Optional[dict] = None) -> Dict[str, Any]:
    ckpt = {
        "state_dict": unwrap(model).state_dict(),
        "epoch": epoch,
        "rng": rng_state(),
        "args": args,
        "quant": quant,
        "model_info": model_info,
        "metrics": metrics or {},
    }
    if optimizer is not None:
        ckpt["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        ckpt["scheduler"] = scheduler.state_dict()
    if scaler is not None:
        ckpt["scaler"] = scaler.state_dict()
    if extra:
        ckpt.update(extra)
    return ckpt
