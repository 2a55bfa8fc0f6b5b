"""DistributedDataParallel on the CPU (gloo): `torchrun -m qvit train` and the broadcast."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))

from test_cli import TINY  # noqa: E402
from test_data import make_folder  # noqa: E402

from qvit.models import checkpoint as ckpt_io  # noqa: E402

pytestmark = pytest.mark.timm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _broadcast_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        import timm

        from qvit.models.convert import calibrate, quantize_model
        from qvit.nn.config import preset
        from qvit.train.distributed import broadcast_module

        torch.manual_seed(100 + rank)  # every rank starts different
        m = timm.create_model("deit_tiny_patch16_224", img_size=8, patch_size=4, embed_dim=24,
                              depth=1, num_heads=3, num_classes=3)
        quantize_model(m, preset("qvit_mixed"))
        if rank == 0:
            calibrate(m, [torch.randn(4, 3, 8, 8)])
        broadcast_module(m)
        torch.save({k: v.clone() for k, v in m.state_dict().items()},
                   os.path.join(out, f"rank{rank}.pth"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_broadcast_module_copies_rank0_calibration(tmp_path):
    world = 2
    mp.spawn(_broadcast_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world,
             join=True)
    a = torch.load(tmp_path / "rank0.pth")
    b = torch.load(tmp_path / "rank1.pth")
    assert a.keys() == b.keys()
    inits = [k for k in a if k.endswith("initialized")]
    assert inits and all(bool(a[k]) and bool(b[k]) for k in inits)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# Runs `qvit train` as torchrun would run `-m qvit`, and has every rank write a hash of its
# model's parameters right after the start-of-run broadcast and at the end of training.
_RANK_HASH_MAIN = r"""
import hashlib, json, os, sys
from qvit.train import cli, distributed as dist_util, loop

def digest(model):
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()

record = {}
_broadcast, _train = dist_util.broadcast_module, loop.train

def broadcast_module(module, src=0):
    _broadcast(module, src)
    record["start"] = digest(module)

def train(args):
    summary = _train(args)
    record["end"] = digest(summary["model_obj"])
    with open(os.path.join(sys.argv[1], "rank%s.json" % os.environ["RANK"]), "w") as f:
        json.dump(record, f)
    return summary

dist_util.broadcast_module, loop.train = broadcast_module, train
sys.exit(cli.main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_torchrun_two_process_gloo_training(tmp_path):
    """Two ranks train in lockstep: after the run each rank's parameters hash the same, and
    differently from the broadcast start (without DDP's gradient all-reduce the ranks, fed
    different shards, would drift apart)."""
    data = make_folder(tmp_path / "data", classes=3, per_class=(8, 5))
    out = tmp_path / "run"
    main = tmp_path / "rank_hash_main.py"
    main.write_text(_RANK_HASH_MAIN)
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
           "--nproc-per-node", "2", str(main), str(tmp_path), "train", data, *TINY,
           "--device", "cpu", "--quant", "qvit_mixed", "--target-bits", "3", "--epochs", "2",
           "--freeze-bits-at", "0.5", "-b", "2", "--output", str(out),
           # 24 images: fewer than one round of timm's RepeatAugSampler (256)
           "--aug-repeats", "0"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    assert ranks[0]["start"] == ranks[1]["start"], "the broadcast did not give one start"
    assert ranks[0]["end"] == ranks[1]["end"], "the ranks' parameters differ after training"
    assert ranks[0]["end"] != ranks[0]["start"], "training did not change the parameters"
    ck = ckpt_io.load(str(out / "last.pth"))
    assert ck["epoch"] == 1 and ck["bits_frozen"]
    # validation is sharded without padding: every image counted exactly once
    assert ck["metrics"]["count"] == 15
    # only rank 0 writes: one summary row per epoch
    with open(out / "summary.csv") as f:
        assert len(f.read().strip().splitlines()) == 1 + 2
    assert all(torch.isfinite(v).all() for v in ck["state_dict"].values() if v.is_floating_point())
