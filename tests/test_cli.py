"""`qvit train / eval / report / export` end to end on a tiny generated image folder."""
from __future__ import annotations

import csv
import os
import sys

import pytest
import torch
import yaml

sys.path.insert(0, os.path.dirname(__file__))

from test_data import make_folder  # noqa: E402

from qvit.models import checkpoint as ckpt_io  # noqa: E402
from qvit.train.cli import main, parse_train_args  # noqa: E402

pytestmark = pytest.mark.timm

TINY = ["--model", "deit_tiny_patch16_224", "--img-size", "8",
        "--model-kwargs", "patch_size=4", "embed_dim=24", "depth=1", "num_heads=3",
        "-b", "4", "-j", "0", "--lr", "1e-3", "--crop-pct", "1", "--interpolation", "bilinear",
        "--mean", "0.5", "0.5", "0.5", "--std", "0.5", "0.5", "0.5",
        "--no-progress", "--quiet", "--no-tensorboard", "--threads", "1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("data"), classes=3, per_class=(8, 4))


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def qat_run(data, tmp_path_factory):
    """One Q-ViT mixed QAT epoch, shared by the eval / report / export tests."""
    out = str(tmp_path_factory.mktemp("qat"))
    rc = main(["train", data, *TINY, "--quant", "qvit_mixed", "--target-bits", "3",
               "--epochs", "1", "--output", out])
    assert rc == 0
    return out


def test_train_writes_run_folder(qat_run):
    files = set(os.listdir(qat_run))
    assert {"args.yaml", "summary.csv", "summary.json", "last.pth", "best.pth"} <= files
    with open(os.path.join(qat_run, "args.yaml")) as f:
        saved = yaml.safe_load(f)
    assert saved["quant"] == "qvit_mixed" and saved["target_bits"] == 3
    assert saved["model_kwargs"]["embed_dim"] == 24
    with open(os.path.join(qat_run, "summary.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["0"]
    assert 2.0 <= float(rows[0]["wbits"]) <= 8.0 and float(rows[0]["gbitops"]) > 0
    ck = ckpt_io.load(os.path.join(qat_run, "last.pth"))
    assert {"state_dict", "optimizer", "scheduler", "epoch", "rng", "args", "quant",
            "model_info"} <= set(ck)
    assert ck["quant"]["preset"] == "qvit_mixed" and ck["epoch"] == 0
    assert any(k.endswith(".bits") for k in ck["state_dict"])
    # args.yaml is a valid -c config: reading it back gives the same arguments
    cfg = {k: v for k, v in saved.items() if k not in ("data", "config")}
    p = os.path.join(qat_run, "again.yaml")
    with open(p, "w") as f:
        yaml.safe_dump(cfg, f)
    again = parse_train_args(["-c", p])
    assert again.quant == "qvit_mixed" and again.target_bits == 3
    assert again.model_kwargs == saved["model_kwargs"] and again.img_size == 8


def test_eval_matches_training_validation(qat_run, data, capsys):
    rc, out, err = run(capsys, "eval", os.path.join(qat_run, "last.pth"), "--data", data,
                       "-j", "0", "--json")
    assert rc == 0, err
    import json
    m = json.loads(out)
    with open(os.path.join(qat_run, "summary.csv")) as f:
        row = list(csv.DictReader(f))[-1]
    assert m["count"] == 12
    assert m["top1"] == pytest.approx(float(row["val_top1"]), abs=1e-3)
    assert m["top5"] == pytest.approx(100.0)  # 3 classes: top-5 covers all


def test_report_and_plot(qat_run, tmp_path, capsys):
    png = tmp_path / "bits.png"
    rc, out, err = run(capsys, "report", os.path.join(qat_run, "best.pth"), "--plot", png)
    assert rc == 0, err
    assert "blocks.0.attn" in out and "GBitOPs" in out
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"


def test_export_cli_roundtrip(qat_run, tmp_path, capsys):
    from qvit.models.export import load_exported
    from qvit.models.recipe import model_from_checkpoint

    path = tmp_path / "m.safetensors"
    rc, out, err = run(capsys, "export", os.path.join(qat_run, "last.pth"), path)
    assert rc == 0, err
    model = model_from_checkpoint(ckpt_io.load(os.path.join(qat_run, "last.pth")))
    loaded = load_exported(str(path))
    x = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def _state(path):
    return ckpt_io.load(path)


def test_resume_is_exact(data, tmp_path):
    """Interrupted after epoch 0 + --resume == one uninterrupted run, bit for bit."""
    common = [data, *TINY, "--quant", "qvit_mixed", "--target-bits", "3", "--epochs", "2",
              "--freeze-bits-at", "0.75", "--drop-path", "0.1", "--scale", "0.5", "1.0",
              "--hflip", "0.5", "--seed", "3"]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    assert main(["train", *common, "--output", full]) == 0
    assert main(["train", *common, "--output", part, "--stop-after-epoch", "0"]) == 0
    assert ckpt_io.load(os.path.join(part, "last.pth"))["epoch"] == 0
    # scramble the global RNG: resume must restore it from the checkpoint
    torch.manual_seed(999)
    assert main(["train", *common, "--output", part,
                 "--resume", os.path.join(part, "last.pth")]) == 0
    a, b = _state(os.path.join(full, "last.pth")), _state(os.path.join(part, "last.pth"))
    assert a["epoch"] == b["epoch"] == 1
    assert a["bits_frozen"] and b["bits_frozen"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k in sa[i]:
            assert torch.equal(torch.as_tensor(sa[i][k]), torch.as_tensor(sb[i][k])), (i, k)
    assert a["metrics"]["top1"] == b["metrics"]["top1"]
    # the CSV of the resumed run has each epoch once
    with open(os.path.join(part, "summary.csv")) as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["0", "1"]


def test_float_then_qat_with_distillation(data, tmp_path):
    f_out, q_out = str(tmp_path / "float"), str(tmp_path / "qat")
    assert main(["train", data, *TINY, "--quant", "none", "--epochs", "1",
                 "--output", f_out]) == 0
    fck = ckpt_io.load(os.path.join(f_out, "last.pth"))
    assert fck["quant"] is None and not any(k.endswith(".bits") for k in fck["state_dict"])
    # timm reads our float checkpoint with its own loader
    import timm
    from timm.models import load_checkpoint
    m = timm.create_model("deit_tiny_patch16_224", img_size=8, patch_size=4, embed_dim=24,
                          depth=1, num_heads=3, num_classes=3)
    load_checkpoint(m, os.path.join(f_out, "last.pth"))
    assert torch.equal(m.head.weight, fck["state_dict"]["head.weight"])
    assert main(["train", data, *TINY, "--quant", "uniform_w3a3", "--epochs", "1",
                 "--initial-checkpoint", os.path.join(f_out, "last.pth"), "--distill",
                 "--amp", "--amp-dtype", "bfloat16", "--output", q_out]) == 0
    qck = ckpt_io.load(os.path.join(q_out, "last.pth"))
    bits = [v for k, v in qck["state_dict"].items() if k.endswith(".bits")]
    # uniform W3A3: fixed bits, 3 everywhere but the 8-bit first/last layers
    assert bits and all(set(b.tolist()) <= {3.0, 8.0} for b in bits)


def test_param_groups_skip_weight_decay():
    import timm

    from qvit.nn.config import preset
    from qvit.models.convert import quantize_model
    from qvit import param_groups

    m = timm.create_model("deit_tiny_patch16_224", img_size=8, patch_size=4, embed_dim=24,
                          depth=1, num_heads=3, num_classes=3)
    quantize_model(m, preset("qvit_mixed"))
    groups = {g["name"]: g for g in param_groups(m, 1e-3, 0.05, bit_lr=10.0, scale_lr=2.0)}
    names = {id(p): n for n, p in m.named_parameters()}

    def of(g):
        return {names[id(p)] for p in groups[g]["params"]}

    assert all(n.endswith(".bits") for n in of("bits"))
    assert all(n.endswith((".scale", ".offset")) for n in of("scale"))
    assert {"pos_embed", "cls_token", "norm.weight", "norm.bias", "head.bias"} <= of("no_decay")
    assert all(p.ndim >= 2 for p in groups["decay"]["params"])
    assert "blocks.0.attn.qkv.weight" in of("decay")
    assert groups["bits"]["lr"] == pytest.approx(1e-2) and groups["bits"]["weight_decay"] == 0
    assert groups["scale"]["lr"] == pytest.approx(2e-3) and groups["scale"]["weight_decay"] == 0
    n_all = sum(1 for p in m.parameters())
    assert sum(len(g["params"]) for g in groups.values()) == n_all


# ------------------------------------------------------------------ bad input
@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, data):
    d = tmp_path_factory.mktemp("bad")
    corrupt = d / "corrupt.pth"
    corrupt.write_bytes(b"this is not a checkpoint" * 10)
    truncated = d / "truncated.pth"
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    other = d / "other.pth"  # a float checkpoint of a different width
    import timm
    m = timm.create_model("deit_tiny_patch16_224", img_size=8, patch_size=4, embed_dim=48,
                          depth=1, num_heads=3, num_classes=3)
    torch.save({"state_dict": m.state_dict()}, other)
    empty = d / "empty"
    os.makedirs(empty / "train" / "a")
    os.makedirs(empty / "val" / "a")
    return {"corrupt": str(corrupt), "truncated": str(truncated), "other": str(other),
            "empty": str(empty), "missing": str(d / "missing")}


BAD_TRAIN = [
    ("missing_data", lambda f, d: [f["missing"]], "does not exist"),
    ("empty_data", lambda f, d: [f["empty"]], "is empty"),
    ("unknown_model", lambda f, d: [d, "--model", "no_such_model"], "unknown model"),
    ("ckpt_mismatch", lambda f, d: [d, "--initial-checkpoint", f["other"]], "does not match"),
    ("corrupt_ckpt", lambda f, d: [d, "--initial-checkpoint", f["corrupt"]], "corrupt"),
    ("truncated_resume", lambda f, d: [d, "--resume", f["truncated"]], "corrupt"),
    ("missing_ckpt", lambda f, d: [d, "--resume", f["missing"]], "does not exist"),
    ("missing_pretrained", lambda f, d: [d, "--pretrained-path", f["missing"]], "does not exist"),
    ("bits_low", lambda f, d: [d, "--target-bits", "1"], "--target-bits"),
    ("bits_high", lambda f, d: [d, "--target-bits", "9"], "--target-bits"),
    ("budget_negative", lambda f, d: [d, "--budget-gbitops", "-1"], "--budget-gbitops"),
    ("budget_unreachable", lambda f, d: [d, "--budget-gbitops", "1e-9"], "below what 2-bit"),
    ("both_budgets", lambda f, d: [d, "--target-bits", "3", "--budget-gbitops", "1"], "either"),
    ("budget_float", lambda f, d: [d, "--quant", "none", "--target-bits", "3"], "--quant"),
    ("freeze_fraction", lambda f, d: [d, "--freeze-bits-at", "1.5"], "--freeze-bits-at"),
    ("bad_preset", lambda f, d: [d, "--quant", "w2a2"], "invalid choice"),
    ("bad_flag", lambda f, d: [d, "--no-such-flag"], "unrecognized"),
    ("bad_epochs", lambda f, d: [d, "--epochs", "0"], "--epochs"),
]


def _assert_one_line_error(rc, out, err, pattern):
    assert rc == 2
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("qvit") and "Traceback" not in err
    assert pattern in lines[0], lines[0]


@pytest.mark.parametrize("name, argv, pattern", BAD_TRAIN, ids=[b[0] for b in BAD_TRAIN])
def test_train_bad_input(name, argv, pattern, bad_files, data, tmp_path, capsys):
    # model flags of TINY come first so that a bad --model later overrides them
    args = argv(bad_files, data)
    rc, out, err = run(capsys, "train", *args[:1], *TINY, "--quant", "qvit_mixed",
                       "--epochs", "1", "--output", tmp_path / "o", *args[1:])
    _assert_one_line_error(rc, out, err, pattern)


@pytest.mark.parametrize("cmd", ["eval", "report", "export"])
@pytest.mark.parametrize("which, pattern", [("corrupt", "corrupt"), ("missing", "does not exist"),
                                            ("other", "not a qvit checkpoint")])
def test_checkpoint_commands_bad_input(cmd, which, pattern, bad_files, data, tmp_path, capsys):
    extra = {"eval": ["--data", data, "-j", "0"], "report": [],
             "export": [tmp_path / "x.safetensors"]}[cmd]
    rc, out, err = run(capsys, cmd, bad_files[which], *extra)
    _assert_one_line_error(rc, out, err, pattern)


def test_eval_bad_data_folder(qat_run, bad_files, capsys):
    rc, out, err = run(capsys, "eval", os.path.join(qat_run, "last.pth"), "--data",
                       bad_files["missing"])
    _assert_one_line_error(rc, out, err, "does not exist")


def test_config_file(tmp_path, data, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("epochs: 7\nlr: 0.01\nquant: lsq_w4a4\nhead-wise: true\n")
    a = parse_train_args(["-c", str(cfg), data, "--lr", "0.5"])
    assert a.epochs == 7 and a.lr == 0.5 and a.quant == "lsq_w4a4" and a.head_wise is True
    assert a.data_dir == data
    cfg.write_text("epochz: 7\n")
    rc, out, err = run(capsys, "train", "-c", cfg, data)
    _assert_one_line_error(rc, out, err, "unknown keys")
    cfg.write_text("epochs: [1\n")
    rc, out, err = run(capsys, "train", "-c", cfg, data)
    _assert_one_line_error(rc, out, err, "not valid YAML")


def test_python_m_qvit_help():
    import subprocess

    r = subprocess.run([sys.executable, "-m", "qvit", "train", "--help"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "--target-bits" in r.stdout and "--budget-gbitops" in r.stdout
