"""`qvit train DATA` defaults to the research code's (DeiT's) training recipe.

The recipe's values are written out here from the research code's scripts
(``reference/method.md`` section 6: RandAugment rand-m9-mstd0.5-inc1, mixup 0.8,
cutmix 1.0, switch 0.5, label smoothing 0.1, random erasing 0.25, repeated
augmentation 3, lr = lr_base x total batch / 512 with 2e-4 for learned bits,
5e-4 for uniform LSQ), and checked against the ``args.yaml`` of a real run.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch
import yaml

sys.path.insert(0, os.path.dirname(__file__))

from test_data import make_folder  # noqa: E402

from qvit.train.cli import main  # noqa: E402
from qvit.train.config import TrainConfig  # noqa: E402

pytestmark = [pytest.mark.timm, pytest.mark.filterwarnings("ignore::UserWarning")]

TINY = ["--model-kwargs", "img_size=16", "patch_size=8", "embed_dim=24", "depth=1",
        "num_heads=3"]
OFFICIAL = {"aa": "rand-m9-mstd0.5-inc1", "mixup": 0.8, "cutmix": 1.0, "mixup_prob": 1.0,
            "mixup_switch_prob": 0.5, "smoothing": 0.1, "reprob": 0.25, "aug_repeats": 3,
            "lr_base": 2e-4}


def test_train_folder_defaults_to_official_recipe(tmp_path, monkeypatch):
    """No flags but a tiny model and one epoch: args.yaml holds the research recipe."""
    data = make_folder(tmp_path / "data", classes=2, per_class=(40, 4))
    monkeypatch.chdir(tmp_path)
    assert main(["train", data, "--epochs", "1", *TINY]) == 0
    runs = [os.path.join(r, f) for r, _, fs in os.walk(tmp_path / "output") for f in fs
            if f == "args.yaml"]
    assert len(runs) == 1, runs
    with open(runs[0]) as f:
        args = yaml.safe_load(f)
    for key, want in OFFICIAL.items():
        assert args[key] == pytest.approx(want) if isinstance(want, float) else args[key] == want, key
    assert args["quant"] == "qvit_mixed" and args["batch_size"] == 64
    assert args["lr"] == pytest.approx(2e-4 * 64 / 512)  # one process: total batch 64


@pytest.mark.parametrize("quant, lr_base", [("lsq_w4a4", 5e-4), ("uniform_w3a3", 5e-4),
                                            ("qvit_official", 2e-4), ("none", 5e-4)])
def test_lr_scaling_rule(quant, lr_base):
    cfg = TrainConfig(quant=quant, batch_size=64)
    assert cfg.resolved_lr_base() == lr_base
    assert cfg.resolved_lr(world=8) == pytest.approx(lr_base * 64 * 8 / 512)
    assert TrainConfig(lr=1e-3).resolved_lr(world=8) == 1e-3
    assert TrainConfig(lr_base=1e-3, batch_size=128).resolved_lr(2) == pytest.approx(5e-4)


def test_recipe_validation():
    from qvit.models.recipe import UsageError

    with pytest.raises(UsageError, match="even --batch-size"):
        TrainConfig(batch_size=5).validate()
    TrainConfig(batch_size=5, mixup=0.0, cutmix=0.0).validate()
    with pytest.raises(UsageError, match="--mixup-prob"):
        TrainConfig(mixup_prob=1.5).validate()
    with pytest.raises(UsageError, match="--aug-repeats"):
        TrainConfig(aug_repeats=-1).validate()
    with pytest.raises(UsageError, match="--lr-base"):
        TrainConfig(lr_base=0.0).validate()


def _targets_at_loss(tmp_path, monkeypatch, **settings):
    """Run one tiny epoch; return the targets the task loss received."""
    from qvit.train import loop

    seen = []
    real = loop.task_loss

    def spy(out, target, smoothing):
        seen.append(target.detach().clone())
        return real(out, target, smoothing)

    monkeypatch.setattr(loop, "task_loss", spy)
    data = make_folder(tmp_path / "data", classes=3, per_class=(12, 3))
    cfg = TrainConfig(data_dir=data, model="deit_tiny_patch16_224", img_size=16,
                      model_kwargs={"patch_size": 8, "embed_dim": 24, "depth": 1, "num_heads": 3},
                      batch_size=8, workers=0, epochs=1, quant="none", no_progress=True,
                      quiet=True, no_tensorboard=True, output=str(tmp_path / "run"), **settings)
    loop.train(cfg)
    return seen


def test_mixup_cutmix_targets_reach_the_loss(tmp_path, monkeypatch):
    seen = _targets_at_loss(tmp_path, monkeypatch)  # the defaults: mixup 0.8, cutmix 1.0
    assert seen and all(t.dim() == 2 and t.shape[1] == 3 for t in seen)
    t = torch.cat(seen)
    torch.testing.assert_close(t.sum(1), torch.ones(len(t)))
    # label smoothing alone gives 1 - 0.1 + 0.1/3 and 0.1/3: anything else is a mix of
    # two images' labels (mixup / cutmix with prob 1)
    smooth = torch.tensor([0.1 / 3, 1 - 0.1 + 0.1 / 3])
    off = (t[:, :, None] - smooth).abs().amin(dim=2) > 1e-4
    assert bool(off.any()), "no mixed target reached the loss"


def test_no_mixup_gives_class_targets(tmp_path, monkeypatch):
    seen = _targets_at_loss(tmp_path, monkeypatch, mixup=0.0, cutmix=0.0)
    assert seen and all(t.dim() == 1 and t.dtype == torch.int64 for t in seen)


def test_rand_augment_posterize_zero_bits():
    """The recipe's RandAugment (inc1) asks for 0 posterize bits at magnitude 10; with a
    Pillow that rejects 0 the loader's shim gives the black image older Pillow gave."""
    import numpy as np
    from PIL import Image
    from timm.data import auto_augment

    from qvit.train.data import _patch_posterize, _posterize_keep_zero

    _patch_posterize()
    img = Image.fromarray(np.full((4, 4, 3), 200, dtype=np.uint8))
    assert np.asarray(_posterize_keep_zero(img, 0)).max() == 0
    assert np.array_equal(np.asarray(_posterize_keep_zero(img, 4)), np.full((4, 4, 3), 192))
    op = auto_augment.AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10)
    np.asarray(op(img))  # no ValueError at the top magnitude
