"""Image-folder data through timm's own dataset / loader path.

A user's ImageNet folder and the embedded digits demo go through the same
code: ``<root>/train/<class>/*.png`` and ``<root>/val/<class>/*.png`` read by
:func:`timm.data.create_dataset` and batched by :func:`timm.data.create_loader`
(``use_prefetcher=False`` so it runs on any device).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

IMG_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
TRAIN_SPLITS = ("train", "training")
VAL_SPLITS = ("val", "valid", "validation", "eval", "evaluation")


class DataError(ValueError):
    """A data folder that cannot be used (missing, empty, inconsistent)."""


def find_split(root: str, names: Sequence[str]) -> Optional[str]:
    for name in names:
        path = os.path.join(root, name)
        if os.path.isdir(path):
            return path
    return None


def _count_images(split_dir: str) -> Tuple[list, int]:
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
    count = 0
    for c in classes:
        for _, _, files in os.walk(os.path.join(split_dir, c)):
            count += sum(1 for f in files if f.lower().endswith(IMG_EXTENSIONS))
    return classes, count


def check_image_folder(root: str, *, need_train: bool = True, need_val: bool = True) -> dict:
    """Validate ``root`` and return ``{"train": dir, "val": dir, "classes": [...]}``.

    Raises :class:`DataError` with a one-line message naming the folder.
    """
    if not root:
        raise DataError("data folder: no path given")
    if not os.path.isdir(root):
        raise DataError(f"data folder {root!r} does not exist or is not a directory")
    out = {"root": root}
    classes = None
    for key, names, needed in (("train", TRAIN_SPLITS, need_train), ("val", VAL_SPLITS, need_val)):
        if not needed:
            continue
        split = find_split(root, names)
        if split is None:
            raise DataError(f"data folder {root!r} has no {key}/ subfolder "
                            f"(expected one of: {', '.join(names)})")
        cls, n = _count_images(split)
        if not cls or n == 0:
            raise DataError(f"data folder {split!r} is empty (expected class subfolders "
                            f"holding images)")
        if classes is not None and cls != classes:
            raise DataError(f"data folder {root!r}: train/ and val/ class subfolders differ "
                            f"({len(classes)} vs {len(cls)} classes)")
        classes = cls
        out[key] = split
        out[key + "_count"] = n
    out["classes"] = classes or []
    return out


def eval_folder(root: str) -> str:
    """Accept either a dataset root (with val/) or a class-per-subfolder split itself."""
    if not os.path.isdir(root):
        raise DataError(f"data folder {root!r} does not exist or is not a directory")
    split = find_split(root, VAL_SPLITS)
    if split is None:
        split = root
    classes, n = _count_images(split)
    if not classes or n == 0:
        raise DataError(f"data folder {split!r} is empty (expected class subfolders holding images)")
    return split


class _Shard(torch.utils.data.Dataset):
    """Every ``world``-th sample of a timm dataset (exact, unpadded distributed eval).

    ``transform`` is forwarded so that timm's ``create_loader`` can set it.
    """

    def __init__(self, base, rank: int, world: int):
        self.base = base
        self.indices = list(range(rank, len(base), world))

    @property
    def transform(self):
        return self.base.transform

    @transform.setter
    def transform(self, value):
        self.base.transform = value

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.base[self.indices[i]]


@dataclass
class LoaderConfig:
    img_size: int
    batch_size: int
    workers: int = 0
    in_chans: int = 3
    mean: Tuple[float, ...] = (0.485, 0.456, 0.406)
    std: Tuple[float, ...] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"
    crop_pct: float = 1.0
    # training augmentation (timm create_transform arguments)
    no_aug: bool = False
    scale: Tuple[float, float] = (0.08, 1.0)
    ratio: Tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    hflip: float = 0.5
    color_jitter: float = 0.4
    auto_augment: Optional[str] = None
    re_prob: float = 0.0
    re_mode: str = "const"
    aug_repeats: int = 0  # repeated augmentation (timm's RepeatAugSampler; distributed only)


def _create_dataset(split_dir: str, is_training: bool, in_chans: int):
    from timm.data import create_dataset

    # the split folder itself is the ImageFolder root (class subfolders)
    return create_dataset("", root=split_dir, split="", search_split=False,
                          is_training=is_training,
                          input_img_mode="L" if in_chans == 1 else "RGB")


def _posterize_keep_zero(img, bits_to_keep, **kw):
    """timm's posterize with 0 bits kept meaning a black image (Pillow < 11's result).

    RandAugment's increasing posterize (the ``inc1`` of the research recipe's
    ``rand-m9-mstd0.5-inc1``) asks for 0 bits at magnitude 10, which Pillow >= 11
    rejects with a ValueError, ending the run.
    """
    from PIL import ImageOps

    if bits_to_keep <= 0:
        return ImageOps.posterize(img, 1).point(lambda v: 0)
    from timm.data import auto_augment

    return auto_augment.posterize(img, bits_to_keep, **kw)


def _patch_posterize() -> None:
    """Route timm's posterize ops through :func:`_posterize_keep_zero` when Pillow rejects 0 bits."""
    from PIL import Image, ImageOps
    from timm.data import auto_augment

    try:
        ImageOps.posterize(Image.new("RGB", (1, 1)), 0)
        return
    except ValueError:
        pass
    for name, fn in list(auto_augment.NAME_TO_OP.items()):
        if fn is auto_augment.posterize:
            auto_augment.NAME_TO_OP[name] = _posterize_keep_zero


def create_loader(split_dir: str, cfg: LoaderConfig, *, is_training: bool,
                  device: torch.device, distributed: bool = False, rank: int = 0,
                  world: int = 1, class_map: Optional[dict] = None):
    """A timm loader over one class-per-subfolder split."""
    from timm.data import create_loader as timm_create_loader

    if is_training and cfg.auto_augment and not cfg.no_aug:
        _patch_posterize()
    dataset = _create_dataset(split_dir, is_training, cfg.in_chans)
    if len(dataset) == 0:
        raise DataError(f"data folder {split_dir!r} holds no readable images")
    if not is_training and distributed:
        dataset = _Shard(dataset, rank, world)
        distributed = False  # sharded by hand: no padding duplicates
    if is_training and distributed and cfg.aug_repeats and len(dataset) < 256:
        # timm's RepeatAugSampler (like DeiT's RASampler) keeps len // 256 * 256 / world
        # images per epoch
        raise DataError(f"data folder {split_dir!r} has {len(dataset)} images: repeated "
                        f"augmentation (--aug-repeats {cfg.aug_repeats}) keeps whole multiples "
                        "of 256 images per epoch, so none; give --aug-repeats 0")
    if is_training and len(dataset) < cfg.batch_size * (world if distributed else 1):
        raise DataError(f"data folder {split_dir!r} has {len(dataset)} images, fewer than one "
                        f"batch ({cfg.batch_size} x {world if distributed else 1} processes)")
    loader = timm_create_loader(
        dataset,
        input_size=(cfg.in_chans, cfg.img_size, cfg.img_size),
        batch_size=cfg.batch_size,
        is_training=is_training,
        no_aug=cfg.no_aug,
        re_prob=cfg.re_prob,
        re_mode=cfg.re_mode,
        num_aug_repeats=cfg.aug_repeats if is_training and distributed else 0,
        scale=cfg.scale,
        ratio=cfg.ratio,
        hflip=cfg.hflip,
        color_jitter=cfg.color_jitter,
        auto_augment=cfg.auto_augment,
        interpolation=cfg.interpolation,
        mean=cfg.mean,
        std=cfg.std,
        num_workers=cfg.workers,
        distributed=distributed,
        crop_pct=cfg.crop_pct,
        pin_memory=False,
        device=device,
        use_prefetcher=False,
        # fresh workers each epoch: their seeds then come from the per-epoch
        # generator set in `set_epoch`, which makes --resume exact
        persistent_workers=False,
    )
    return loader


def set_epoch(loader, epoch: int, seed: int) -> None:
    """Make the shuffle order and worker seeds a function of (seed, epoch) only."""
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        if hasattr(sampler, "seed"):
            sampler.seed = seed
        sampler.set_epoch(epoch)
    g = torch.Generator()
    g.manual_seed(seed * 1_000_003 + epoch)
    loader.generator = g
    if isinstance(sampler, torch.utils.data.RandomSampler):
        sampler.generator = g
