"""Image folders through timm's loader, the embedded digits folder, epoch seeding."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from qvit.train.data import (DataError, LoaderConfig, _Shard, check_image_folder, create_loader,
                       eval_folder, set_epoch)


def make_folder(root, classes=3, per_class=(6, 3), size=8, seed=0):
    """A tiny class-per-subfolder dataset of random RGB PNGs (train/ and val/)."""
    rng = np.random.RandomState(seed)
    for split, n in zip(("train", "val"), per_class):
        for c in range(classes):
            d = os.path.join(root, split, f"c{c}")
            os.makedirs(d, exist_ok=True)
            for i in range(n):
                pix = rng.randint(0, 256, size=(size, size, 3), dtype=np.uint8)
                pix[..., c % 3] = 40 * c  # a class signal
                Image.fromarray(pix).save(os.path.join(d, f"{i}.png"))
    return str(root)


def test_check_image_folder_ok(tmp_path):
    root = make_folder(tmp_path)
    info = check_image_folder(root)
    assert info["classes"] == ["c0", "c1", "c2"]
    assert info["train_count"] == 18 and info["val_count"] == 9
    assert info["train"].endswith("train") and info["val"].endswith("val")


@pytest.mark.parametrize("case, pattern", [
    ("missing", "does not exist"),
    ("no_val", "no val/ subfolder"),
    ("empty_train", "is empty"),
    ("class_mismatch", "class subfolders differ"),
])
def test_check_image_folder_errors(tmp_path, case, pattern):
    root = tmp_path / "d"
    if case == "missing":
        pass
    elif case == "no_val":
        make_folder(root)
        for f in os.listdir(root / "val" / "c0"):
            os.unlink(root / "val" / "c0" / f)
        os.rename(root / "val", root / "other")
    elif case == "empty_train":
        os.makedirs(root / "train" / "c0")
        make_folder(tmp_path / "src")
        os.rename(tmp_path / "src" / "val", root / "val")
    elif case == "class_mismatch":
        make_folder(root)
        os.rename(root / "val" / "c2", root / "val" / "zz")
    with pytest.raises(DataError, match=pattern):
        check_image_folder(str(root))


def test_eval_folder_accepts_root_or_split(tmp_path):
    root = make_folder(tmp_path)
    assert eval_folder(root).endswith("val")
    assert eval_folder(os.path.join(root, "train")).endswith("train")
    with pytest.raises(DataError):
        eval_folder(str(tmp_path / "nope"))


def _cfg(**kw):
    base = dict(img_size=16, batch_size=4, workers=0, mean=(0.5,) * 3, std=(0.5,) * 3,
                crop_pct=1.0, scale=(0.7, 1.0), hflip=0.0, color_jitter=0.0)
    base.update(kw)
    return LoaderConfig(**base)


def test_loader_shapes_and_values(tmp_path):
    root = make_folder(tmp_path)
    dev = torch.device("cpu")
    tl = create_loader(os.path.join(root, "train"), _cfg(), is_training=True, device=dev)
    vl = create_loader(os.path.join(root, "val"), _cfg(), is_training=False, device=dev)
    x, y = next(iter(tl))
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert len(tl) == 18 // 4  # drop_last in training
    xs, ys = zip(*list(vl))
    assert sum(len(t) for t in ys) == 9
    # eval transform is deterministic and normalised with the given mean/std
    v = torch.cat(xs)
    assert v.min() >= -1.0 - 1e-6 and v.max() <= 1.0 + 1e-6
    xs2, _ = zip(*list(vl))
    assert torch.equal(v, torch.cat(xs2))


def test_set_epoch_makes_order_a_function_of_seed_and_epoch(tmp_path):
    root = make_folder(tmp_path)
    dev = torch.device("cpu")
    cfg = _cfg(no_aug=True)
    tl = create_loader(os.path.join(root, "train"), cfg, is_training=True, device=dev)

    def labels(epoch, seed):
        torch.manual_seed(1234 + epoch)  # global RNG must not matter
        set_epoch(tl, epoch, seed)
        return torch.cat([y for _, y in tl]).tolist()

    a = labels(0, 7)
    assert labels(0, 7) == a
    assert any(labels(e, 7) != a for e in (1, 2, 3))


def test_shard_partitions_without_padding():
    base = list(range(10))

    class DS(torch.utils.data.Dataset):
        transform = None

        def __len__(self):
            return len(base)

        def __getitem__(self, i):
            return base[i]

    ds = DS()
    shards = [_Shard(ds, r, 3) for r in range(3)]
    got = sorted(x for s in shards for x in (s[i] for i in range(len(s))))
    assert got == base
    shards[1].transform = "t"
    assert ds.transform == "t"


def test_digits_folder_written_once_and_stratified(tmp_path):
    pytest.importorskip("sklearn")
    from qvit.train.demo import write_digits_folder

    root = write_digits_folder(str(tmp_path / "digits"))
    info = check_image_folder(root)
    assert info["classes"] == [str(i) for i in range(10)]
    assert info["train_count"] + info["val_count"] == 1797
    assert abs(info["val_count"] - 0.2 * 1797) <= 10
    for c in info["classes"]:  # every class in both splits, about 20% in val
        nv = len(os.listdir(os.path.join(root, "val", c)))
        nt = len(os.listdir(os.path.join(root, "train", c)))
        assert 0.15 < nv / (nv + nt) < 0.25
    # the images are the digits: compare one to sklearn's array
    from sklearn.datasets import load_digits
    d = load_digits()
    f = sorted(os.listdir(os.path.join(root, "val", "3")))[0]
    i = int(f.split(".")[0])
    img = np.asarray(Image.open(os.path.join(root, "val", "3", f)))
    assert d.target[i] == 3
    np.testing.assert_allclose(img, np.round(d.images[i] * 255 / 16), atol=0)
    # second call reuses the folder (marker present): no rewrite
    mtime = os.path.getmtime(os.path.join(root, "val", "3", f))
    write_digits_folder(root)
    assert os.path.getmtime(os.path.join(root, "val", "3", f)) == mtime


@pytest.mark.slow
@pytest.mark.timm
def test_demo_end_to_end_tiny(tmp_path, monkeypatch):
    """`qvit train` with no data: the demo's runs, table with statistics and verdicts, CSV, PNG."""
    pytest.importorskip("sklearn")
    import csv

    from qvit.train import demo
    from qvit.train.cli import main

    monkeypatch.setattr(demo, "MODEL_KWARGS", {"patch_size": 4, "embed_dim": 24, "depth": 1,
                                               "num_heads": 3})
    monkeypatch.setattr(demo, "IMG_SIZE", 8)
    # One QAT epoch (23 steps) is too short for the demo's bit learning rate to reach the
    # budget (its 6-epoch run does, README); ten times the rate does it in one epoch.
    methods = [(label, name, dict(extra, bit_lr=10 * extra["bit_lr"]) if name == "qvit_mixed"
                else extra) for label, name, extra in demo.METHODS]
    assert sum(name == "qvit_mixed" for _, name, _ in methods) == 2
    monkeypatch.setattr(demo, "METHODS", methods)
    out = tmp_path / "demo"
    assert main(["train", "--output", str(out), "--epochs", "1", "--no-progress", "--quiet",
                 "--no-tensorboard", "--seeds", "0", "1"]) == 0
    for f in ("results.md", "results.csv", "bits.png", "mixed_bits.txt"):
        assert (out / f).stat().st_size > 0, f
    with open(out / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    by = {}  # method -> its rows (one per seed); extra columns are ignored
    for r in rows:
        by.setdefault(r["method"], []).append(r)
    float_, w4, w3, mixed, w2, mixed2 = (
        "float (32-bit)", "uniform W4A4 (LSQ)", "uniform W3A3 (LSQ)",
        "Q-ViT mixed, 3-bit budget", "uniform W2A2 (LSQ)", "Q-ViT mixed, 2-bit budget")
    assert set(by) == {float_, w4, w3, mixed, w2, mixed2}
    assert len(by[float_]) == 1 and all(len(by[m]) == 2 for m in (w4, w3, mixed, w2, mixed2))
    g = {m: [float(r["gbitops"]) for r in rs] for m, rs in by.items()}
    assert min(g[float_]) > max(g[w4]) > max(g[w3]) > max(g[w2]) > 0
    # the verdicts are computed from the paired per-seed differences
    table = (out / "results.md").read_text()
    for m_name, u_name in demo.PAIRS:
        a = [float(r["top1"]) for r in by[m_name]]
        b = [float(r["top1"]) for r in by[u_name]]
        d_mean, d_sd, verdict = demo.paired_verdict(a, b)
        assert f"{m_name} vs {u_name}" in table
        assert f"{d_mean:+.2f} ± {d_sd:.2f} points over 2 seed(s): **{verdict}**" in table
    for r in by[mixed]:
        budget, gb = float(r["budget_gbitops"]), float(r["gbitops"])
        # the 3-bit budget is the BitOPs of uniform W3A3 (8-bit first / last layers)
        assert budget == pytest.approx(g[w3][0], rel=1e-6)
        assert gb <= budget * (1 + 1e-6), f"Q-ViT mixed ends over its budget: {gb} > {budget}"
        # the bits moved: qvit_mixed starts at W5A5 (above the budget) and learned its way
        # down (a run whose bits stayed put would end at ~25/9 of the budget)
        assert float(r["wbits"]) < 5 and float(r["abits"]) < 5, r
    # the cached digits folder is reused by a second call
    assert (out / "data" / "digits" / "train").is_dir()
