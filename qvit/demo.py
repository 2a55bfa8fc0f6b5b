"""The embedded default run: scikit-learn's 8x8 digits, a small DeiT, four runs.

`qvit train` with no data folder lands here. The digits ship inside
scikit-learn (no network); they are written once as a PNG image folder
(``train/<digit>/*.png``, ``val/<digit>/*.png``, a fixed stratified split) and
read back through the same timm loader a user's ImageNet folder goes through.
A small DeiT is trained in float, then quantization-aware from those weights
with uniform W4A4, uniform W3A3 and Q-ViT mixed head-wise bits at the uniform
3-bit BitOPs budget. The run ends with a table and a PNG of the learned bits.
"""
from __future__ import annotations

import csv
import json
import os
import time
from typing import List, Optional

VAL_FRACTION = 0.2
SPLIT_SEED = 0
_MARKER = ".qvit-digits-v1"


def write_digits_folder(root: str) -> str:
    """Write the digits as PNGs under ``root`` once; return ``root``.

    Idempotent: a marker file records a finished write, so an interrupted write
    is redone and a finished one is reused.
    """
    marker = os.path.join(root, _MARKER)
    if os.path.isfile(marker):
        return root
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images  # (1797, 8, 8), values 0..16
    labels = digits.target
    rng = np.random.RandomState(SPLIT_SEED)
    is_val = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):  # stratified split
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        is_val[idx[: int(round(len(idx) * VAL_FRACTION))]] = True
    for i, (img, y) in enumerate(zip(images, labels)):
        split = "val" if is_val[i] else "train"
        d = os.path.join(root, split, str(int(y)))
        os.makedirs(d, exist_ok=True)
        pix = np.clip(np.round(img * (255.0 / 16.0)), 0, 255).astype(np.uint8)
        Image.fromarray(pix, mode="L").save(os.path.join(d, f"{i:04d}.png"))
    with open(marker, "w") as f:
        f.write(f"{len(labels)} images, val fraction {VAL_FRACTION}, seed {SPLIT_SEED}\n")
    return root
