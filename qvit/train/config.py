"""Every setting of one training run: :class:`TrainConfig`.

One place per setting: a field of :class:`TrainConfig` declares its default,
its one-line help and its command-line form (group, short flag, argparse
type / nargs / choices). The CLI builds its ``qvit train`` flags from these
fields (:func:`add_arguments`); the demo builds ``TrainConfig`` objects
directly; ``args.yaml`` in a run folder is :meth:`TrainConfig.to_dict`, which
``-c`` and ``--resume`` read back through :meth:`TrainConfig.from_dict`.

Adding a flag: add one field below with :func:`setting`; nothing else.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

from ..models.recipe import UsageError

from ..nn.config import PRESETS as _PRESETS

QUANT_CHOICES = ("none",) + tuple(_PRESETS)
# the research code's recipe (DeiT's): these are the defaults of `qvit train DATA`
OFFICIAL_AA = "rand-m9-mstd0.5-inc1"
FLOAT_LR_BASE = 5e-4  # DeiT's float training: lr 5e-4 at a total batch of 512
GROUPS = ("data", "model", "optimisation", "quantization", "run")


def parse_value(text: str) -> Any:
    """A ``KEY=VALUE`` value: YAML (numbers, bools, ``[1, 2]``), plus the two
    forms people type for a sequence: ``(1,1,1,1)`` and ``1,1,1,1`` (-> a list)."""
    import yaml

    s = text.strip()
    if s.startswith("(") and s.endswith(")"):
        s = "[" + s[1:-1] + "]"
    try:
        value = yaml.safe_load(s) if s else None
    except yaml.YAMLError:
        return text
    if isinstance(value, str) and "," in value and not s.startswith(("'", '"')):
        try:
            parts = [yaml.safe_load(p) for p in value.split(",")]
        except yaml.YAMLError:
            return value
        if all(isinstance(p, (int, float, bool)) for p in parts):
            return parts
    return value


def parse_kv(text: str) -> Tuple[str, Any]:
    """``key=value`` with the value read by :func:`parse_value`."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    k, v = text.split("=", 1)
    return k.strip(), parse_value(v)


def setting(default: Any, help: str, *, group: str, short: Optional[str] = None,
            **argparse_kw) -> Any:
    """A :class:`TrainConfig` field: its default, one-line help and CLI form."""
    assert group in GROUPS, group
    meta = {"help": help, "group": group, "short": short, "argparse": argparse_kw}
    if isinstance(default, dict):
        return dataclasses.field(default_factory=lambda: dict(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class TrainConfig:
    """One ``qvit train`` run (float training or Q-ViT QAT); see each field's help."""

    # ------------------------------------------------------------------ data
    data_dir: Optional[str] = setting(
        None, "folder with train/ and val/ class subfolders (same as the positional "
        "argument); none: the embedded digits demo", group="data")
    batch_size: int = setting(64, "images per batch (per process under torchrun)",
                              group="data", short="b", type=int)
    workers: int = setting(2, "data loader processes", group="data", short="j", type=int)
    img_size: Optional[int] = setting(None, "input resolution (default: the model's)",
                                      group="data", type=int)
    mean: Tuple[float, ...] = setting((0.485, 0.456, 0.406), "per-channel input mean",
                                      group="data", type=float, nargs="+")
    std: Tuple[float, ...] = setting((0.229, 0.224, 0.225), "per-channel input std",
                                     group="data", type=float, nargs="+")
    interpolation: str = setting("bicubic", "resize interpolation (bilinear, bicubic, ...)",
                                 group="data")
    crop_pct: float = setting(0.875, "centre-crop fraction of the validation transform",
                              group="data", type=float)
    no_aug: bool = setting(False, "no training augmentation", group="data")
    scale: Tuple[float, float] = setting((0.08, 1.0), "random-resized-crop scale range",
                                         group="data", type=float, nargs=2)
    ratio: Tuple[float, float] = setting((3.0 / 4.0, 4.0 / 3.0),
                                         "random-resized-crop aspect-ratio range",
                                         group="data", type=float, nargs=2)
    hflip: float = setting(0.5, "horizontal flip probability", group="data", type=float)
    color_jitter: float = setting(0.4, "colour jitter strength", group="data", type=float)
    aa: Optional[str] = setting(OFFICIAL_AA, "timm auto-augment policy ('none': off)",
                                group="data")
    reprob: float = setting(0.25, "random erasing probability", group="data", type=float)
    remode: str = setting("pixel", "random erasing mode (timm: const, rand, pixel)",
                          group="data", choices=("const", "rand", "pixel"))
    mixup: float = setting(0.8, "mixup alpha (0: off)", group="data", type=float)
    cutmix: float = setting(1.0, "cutmix alpha (0: off)", group="data", type=float)
    mixup_prob: float = setting(1.0, "probability of mixup or cutmix per batch", group="data",
                                type=float)
    mixup_switch_prob: float = setting(0.5, "probability of cutmix instead of mixup when both "
                                       "are on", group="data", type=float)
    mixup_mode: str = setting("batch", "mixup / cutmix per batch, pair or element",
                              group="data", choices=("batch", "pair", "elem"))
    aug_repeats: int = setting(3, "repeated augmentation: each image this many times per "
                               "epoch, under torchrun (timm's RepeatAugSampler; 0: off)",
                               group="data", type=int)

    # ----------------------------------------------------------------- model
    model: str = setting("deit_tiny_patch16_224", "timm model name", group="model")
    pretrained: bool = setting(False, "timm's pretrained weights (downloads from the hub)",
                               group="model")
    pretrained_path: str = setting("", "local weights through timm's pretrained loading "
                                   "(classifier adapted)", group="model")
    initial_checkpoint: str = setting("", "local float checkpoint, loaded strictly (timm "
                                      "load_checkpoint semantics)", group="model")
    num_classes: Optional[int] = setting(None, "classifier classes (default: the data "
                                         "folder's)", group="model", type=int)
    drop_path: Optional[float] = setting(None, "stochastic depth rate (default: the "
                                         "model's)", group="model", type=float)
    model_kwargs: Dict[str, Any] = setting(
        {}, "extra timm.create_model arguments, values as YAML: depth=4 "
        "depths=[1,1,2,1] (also (1,1,2,1) or 1,1,2,1); merged over -c's",
        group="model", nargs="*", type=parse_kv, metavar="KEY=VALUE")

    # ---------------------------------------------------------- optimisation
    epochs: int = setting(300, "training epochs", group="optimisation", type=int)
    lr: Optional[float] = setting(None, "learning rate (default: --lr-base x total batch / "
                                  "512)", group="optimisation", type=float)
    lr_base: Optional[float] = setting(
        None, "learning rate at a total batch of 512 (default: the preset's: 2e-4 learned "
        "bits, 5e-4 uniform LSQ and float training)", group="optimisation", type=float)
    opt: str = setting("adamw", "timm optimizer name", group="optimisation")
    momentum: float = setting(0.9, "optimizer momentum (SGD-like optimizers)",
                              group="optimisation", type=float)
    weight_decay: float = setting(0.05, "weight decay (not on norms, biases, tokens, "
                                  "scales, bits)", group="optimisation", type=float)
    sched: str = setting("cosine", "timm scheduler name", group="optimisation")
    min_lr: float = setting(0.0, "learning rate at the end of the schedule",
                            group="optimisation", type=float)
    warmup_epochs: int = setting(0, "linear warm-up epochs", group="optimisation", type=int)
    warmup_lr: float = setting(1e-6, "learning rate at the start of the warm-up",
                               group="optimisation", type=float)
    smoothing: float = setting(0.1, "label smoothing", group="optimisation", type=float)
    clip_grad: Optional[float] = setting(None, "clip the gradient norm to this value",
                                         group="optimisation", type=float)
    amp: bool = setting(False, "mixed precision (torch.autocast)", group="optimisation")
    amp_dtype: str = setting("bfloat16", "autocast dtype", group="optimisation",
                             choices=("bfloat16", "float16"))
    torchcompile: Optional[str] = setting(None, "torch.compile the model with this backend "
                                          "(bare flag: inductor)", group="optimisation",
                                          nargs="?", const="inductor")
    seed: int = setting(42, "random seed", group="optimisation", type=int)
    device: Optional[str] = setting(None, "cpu, cuda, cuda:1 (default: cuda if present)",
                                    group="optimisation")
    threads: int = setting(0, "torch CPU threads (0: torch's default)",
                           group="optimisation", type=int)

    # ---------------------------------------------------------- quantization
    quant: str = setting("qvit_mixed", "quantizer preset, or none for float training",
                         group="quantization", choices=QUANT_CHOICES)
    target_bits: Optional[float] = setting(
        None, "BitOPs budget = the model at uniform WbAb (8-bit first/last layers)",
        group="quantization", type=float)
    budget_gbitops: Optional[float] = setting(
        None, "budget in GBitOPs per image (or Mbit of weights with --budget-kind size)",
        group="quantization", type=float)
    budget_kind: str = setting("bitops", "what the budget limits", group="quantization",
                               choices=("bitops", "size"))
    budget_weight: float = setting(0.1, "lambda of the budget loss", group="quantization",
                                   type=float)
    budget_relative: bool = setting(
        False, "penalise the overshoot relative to the budget: lambda*max(B/budget-1,0)^2 "
        "(for models far from DeiT size)", group="quantization")
    head_wise: Optional[bool] = setting(
        None, "one bit-width per attention head (default: the preset's)",
        group="quantization", action=argparse.BooleanOptionalAction)
    first_last_bits: Optional[int] = setting(
        None, "bits of the patch embedding and classifier (default: the preset's, 8)",
        group="quantization", type=int)
    shared_scale: Optional[bool] = setting(
        None, "one switchable scale table per quantizer, shared by its heads (research "
        "code; default: the preset's)", group="quantization",
        action=argparse.BooleanOptionalAction)
    scale_init: Optional[str] = setting(
        None, "scale initialisation: qvit's grid start or the research code's (default: the "
        "preset's)", group="quantization", choices=("grid", "official"))
    weight_grouping: Optional[str] = setting(
        None, "head groups of attention weights: real heads or the research code's "
        "transposed grouping (default: the preset's)", group="quantization",
        choices=("head", "transposed"))
    bit_lr: float = setting(1.0, "learning-rate multiplier for the bit-widths",
                            group="quantization", type=float)
    scale_lr: float = setting(1.0, "learning-rate multiplier for scales and offsets",
                              group="quantization", type=float)
    freeze_bits_at: float = setting(0.9, "fraction of training after which the bit-widths "
                                    "stop changing", group="quantization", type=float)
    calib_batches: int = setting(1, "validation batches that initialise the scales",
                                 group="quantization", type=int)
    qat_eval_mode: bool = setting(False, "keep the model in eval mode during QAT (research "
                                  "recipe: no drop-path)", group="quantization")
    distill: bool = setting(False, "distil from the float model (needs "
                            "--initial-checkpoint or --pretrained/--pretrained-path)",
                            group="quantization")
    distill_alpha: float = setting(0.5, "weight of the distillation loss",
                                   group="quantization", type=float)
    distill_temp: float = setting(1.0, "distillation temperature", group="quantization",
                                  type=float)

    # ------------------------------------------------------------------- run
    output: Optional[str] = setting(None, "run folder (default: output/train/"
                                    "<model>-<quant>-<seed>)", group="run")
    experiment: str = setting("", "run folder name under output/train/", group="run")
    resume: str = setting("", "continue from a last.pth (its run's settings are the "
                          "defaults)", group="run")
    overwrite: bool = setting(False, "replace a run folder that already holds a run",
                              group="run")
    log_interval: int = setting(10, "progress-bar update interval (steps)", group="run",
                                type=int)
    no_progress: bool = setting(False, "no progress bars", group="run")
    no_tensorboard: bool = setting(False, "no TensorBoard logs", group="run")
    quiet: bool = setting(False, "no per-epoch log lines", group="run")
    seeds: Optional[Tuple[int, ...]] = setting(
        None, "demo only: run the demo once per seed and average", group="run",
        type=int, nargs="+")
    stop_after_epoch: Optional[int] = setting(
        None, "stop after this epoch (the run stays resumable)", group="run", type=int)

    # ------------------------------------------------------------- helpers
    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict[str, Any]:
        """Plain data (lists, dicts, numbers, strings): ``args.yaml`` and checkpoints."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else (dict(v) if isinstance(v, dict) else v)
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "config",
                  ignore_unknown: bool = False) -> "TrainConfig":
        """Build from plain data; keys may use ``-`` or ``_``; unknown keys raise."""
        known = {f.name: f for f in fields(cls)}
        kw: Dict[str, Any] = {}
        unknown = []
        for key, value in values.items():
            name = str(key).replace("-", "_")
            if name not in known:
                unknown.append(str(key))
                continue
            kw[name] = _coerce(known[name], value)
        if unknown and not ignore_unknown:
            raise UsageError(f"{source}: unknown keys {sorted(unknown)}")
        return cls(**kw)

    @property
    def quantized(self) -> bool:
        return self.quant not in (None, "none")

    @property
    def mixup_active(self) -> bool:
        return self.mixup_prob > 0 and (self.mixup > 0 or self.cutmix > 0)

    def resolved_lr_base(self) -> float:
        """``lr_base``, or the research code's for the preset (float: DeiT's 5e-4)."""
        if self.lr_base is not None:
            return self.lr_base
        if not self.quantized:
            return FLOAT_LR_BASE
        from ..nn.config import preset_lr_base

        return preset_lr_base(self.quant)

    def resolved_lr(self, world: int = 1) -> float:
        """``lr``, or ``lr_base * batch_size * world / 512`` (the research code's rule)."""
        if self.lr is not None:
            return self.lr
        return self.resolved_lr_base() * self.batch_size * world / 512.0

    def validate(self) -> None:
        """Raise :class:`UsageError` (naming the flag) for a value that cannot work."""
        def need(cond, msg):
            if not cond:
                raise UsageError(msg)

        need(self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}")
        need(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        if self.lr is not None:
            need(self.lr > 0 and math.isfinite(self.lr),
                 f"--lr must be a positive number, got {self.lr}")
        if self.lr_base is not None:
            need(self.lr_base > 0 and math.isfinite(self.lr_base),
                 f"--lr-base must be a positive number, got {self.lr_base}")
        for name in ("mixup", "cutmix", "reprob", "smoothing"):
            need(getattr(self, name) >= 0, f"--{name} must be >= 0, got {getattr(self, name)}")
        for name in ("mixup_prob", "mixup_switch_prob", "reprob"):
            need(getattr(self, name) <= 1, f"--{name.replace('_', '-')} must be a probability "
                 f"in [0, 1], got {getattr(self, name)}")
        need(self.aug_repeats >= 0, f"--aug-repeats must be >= 0, got {self.aug_repeats}")
        need(not (self.mixup_active and self.batch_size % 2),
             f"--mixup / --cutmix need an even --batch-size, got {self.batch_size}")
        need(self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}")
        need(self.workers >= 0, f"--workers must be >= 0, got {self.workers}")
        need(self.calib_batches >= 1, f"--calib-batches must be >= 1, got {self.calib_batches}")
        need(0.0 <= self.freeze_bits_at <= 1.0,
             f"--freeze-bits-at must be a fraction in [0, 1], got {self.freeze_bits_at}")
        need(self.budget_weight >= 0 and math.isfinite(self.budget_weight),
             f"--budget-weight must be >= 0, got {self.budget_weight}")
        need(self.bit_lr >= 0 and self.scale_lr >= 0, "--bit-lr / --scale-lr must be >= 0")
        if self.target_bits is not None:
            need(2 <= self.target_bits <= 8,
                 f"--target-bits must lie in the bit range [2, 8], got {self.target_bits}")
        if self.budget_gbitops is not None:
            need(self.budget_gbitops > 0 and math.isfinite(self.budget_gbitops),
                 f"--budget-gbitops must be a positive number, got {self.budget_gbitops}")
        if self.first_last_bits is not None:
            need(2 <= self.first_last_bits <= 8,
                 f"--first-last-bits must lie in [2, 8], got {self.first_last_bits}")
        need(not (self.target_bits is not None and self.budget_gbitops is not None),
             "give either --target-bits or --budget-gbitops, not both")
        if not self.quantized:
            need(self.target_bits is None and self.budget_gbitops is None,
                 "--target-bits / --budget-gbitops need a --quant preset")
        need(self.amp_dtype in ("bfloat16", "float16"),
             f"--amp-dtype must be bfloat16 or float16, got {self.amp_dtype!r}")
        if self.img_size is not None:
            need(self.img_size >= 1, f"--img-size must be >= 1, got {self.img_size}")
        if self.num_classes is not None:
            need(self.num_classes >= 1, f"--num-classes must be >= 1, got {self.num_classes}")
        need(not self.distill or bool(self.initial_checkpoint or self.pretrained
                                      or self.pretrained_path),
             "--distill needs teacher weights: give --initial-checkpoint, --pretrained or "
             "--pretrained-path (the teacher is the float model they load; without them it "
             "would be randomly initialised)")


def _coerce(f: dataclasses.Field, value: Any) -> Any:
    """Lists from YAML / argparse become tuples where the field holds a tuple."""
    if value is None:
        return None
    if f.name == "model_kwargs":
        if isinstance(value, (list, tuple)):  # argparse: a list of (key, value) pairs
            value = dict(value)
        if not isinstance(value, dict):
            raise UsageError(f"model_kwargs must be a mapping of names to values, got {value!r}")
        return dict(value)
    if isinstance(value, list):
        return tuple(value)
    return value


def field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def _default_text(value: Any) -> str:
    if value is None or value is False or value == "" or value == {}:
        return ""
    if isinstance(value, tuple):
        value = " ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in value)
    return f" (default: {value})"


def add_arguments(parser: argparse.ArgumentParser, skip: Iterable[str] = ()) -> None:
    """Add one flag per :class:`TrainConfig` field, grouped, with its help and default.

    Every flag's default is ``argparse.SUPPRESS``: the namespace then holds only
    what the command line gave, which :func:`explicit_values` returns, so that
    command line > ``-c`` file > ``--resume``'s run > field defaults.
    """
    groups: Dict[str, Any] = {}
    skip = set(skip)
    for f in fields(TrainConfig):
        if f.name in skip:
            continue
        meta = f.metadata
        g = groups.get(meta["group"])
        if g is None:
            g = groups[meta["group"]] = parser.add_argument_group(meta["group"])
        flags = ([f"-{meta['short']}"] if meta["short"] else []) + \
            ["--" + f.name.replace("_", "-")]
        kw = dict(meta["argparse"])
        default = field_default(f)
        if "action" not in kw and isinstance(default, bool):
            kw["action"] = "store_true"
        help_text = meta["help"]
        if kw.get("action") != "store_true":
            help_text += _default_text(default)
        g.add_argument(*flags, dest=f.name, default=argparse.SUPPRESS,
                       help=help_text.replace("%", "%%"), **kw)


def explicit_values(ns: argparse.Namespace) -> Dict[str, Any]:
    """The :class:`TrainConfig` fields a parsed command line set explicitly."""
    names = {f.name for f in fields(TrainConfig)}
    return {k: v for k, v in vars(ns).items() if k in names}


def known_values(values: Mapping[str, Any], source: str,
                 ignore_unknown: bool = False) -> Dict[str, Any]:
    """``values`` with ``-`` in keys read as ``_``; unknown keys raise (or are dropped)."""
    names = {f.name for f in fields(TrainConfig)}
    out = {str(k).replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(k for k in out if k not in names)
    if unknown and not ignore_unknown:
        raise UsageError(f"{source}: unknown keys {unknown}")
    return {k: v for k, v in out.items() if k in names}


def layered(*layers: Mapping[str, Any]) -> TrainConfig:
    """Later layers win; ``model_kwargs`` dicts are merged key by key.

    Each layer must hold only field names (see :func:`known_values`).
    """
    merged: Dict[str, Any] = {}
    for layer in layers:
        for k, v in layer.items():
            k = str(k).replace("-", "_")
            if k == "model_kwargs" and v is not None:
                v = _coerce(next(f for f in fields(TrainConfig) if f.name == k), v)
                merged[k] = {**merged.get(k, {}), **v}
            else:
                merged[k] = v
    return TrainConfig.from_dict(merged)
