"""A new user's first hour (issue 16): each trap reproduced, then prevented or named.

One test (or a few) per numbered item of the issue; each asserts the text a
user needs to see, so a message that loses its advice fails here.
"""
from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))

from test_data import make_folder  # noqa: E402

import qvit  # noqa: E402
from qvit.train.cli import main, parse_train_args  # noqa: E402

pytestmark = pytest.mark.timm

KW = dict(img_size=8, patch_size=4, embed_dim=24, depth=1, num_heads=3, num_classes=3)
TINY = ["--model", "deit_tiny_patch16_224", "--img-size", "8",
        "--model-kwargs", "patch_size=4", "embed_dim=24", "depth=1", "num_heads=3",
        "-b", "4", "-j", "0", "--lr", "1e-3", "--crop-pct", "1", "--interpolation", "bilinear",
        "--mean", "0.5", "0.5", "0.5", "--std", "0.5", "0.5", "0.5",
        "--no-progress", "--quiet", "--no-tensorboard", "--threads", "1", "--epochs", "1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("data"), classes=3, per_class=(8, 4))


def _tiny(preset="qvit_mixed"):
    torch.manual_seed(0)
    m = qvit.create_model("deit_tiny_patch16_224", **KW)
    qvit.quantize_model(m, qvit.preset(preset))
    qvit.calibrate(m, [torch.randn(4, 3, 8, 8)])
    return m


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _one_line(rc, err, *texts):
    lines = [l for l in err.splitlines() if l.strip()]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    for t in texts:
        assert t in lines[0], lines[0]


# 1 ----------------------------------------------------------- budget units
def test_1_bitops_passed_as_gbitops_is_refused():
    m = _tiny()
    m(torch.randn(2, 3, 8, 8))
    raw = qvit.uniform_bitops(m, 3)  # BitOPs
    with pytest.raises(ValueError, match=r"Is it in BitOPs\? .*divide by 1e9"):
        qvit.budget_loss(m, raw)
    # the right unit: a real, non-zero penalty (bits start at 5 > 3)
    loss = qvit.budget_loss(m, raw / 1e9)
    assert float(loss.detach()) > 0
    # a budget just at the model's top cost is allowed (the loss is simply 0)
    top = qvit.uniform_bitops(m, 8, first_last_bits=8) / 1e9
    assert float(qvit.budget_loss(m, top).detach()) == 0.0


# 2 ------------------------------------------- optimizer built before conversion
def test_2_optimizer_before_quantize_model_is_named():
    torch.manual_seed(0)
    m = qvit.create_model("deit_tiny_patch16_224", **KW)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)  # the usual order in a script
    qvit.quantize_model(m, qvit.preset("qvit_mixed"))
    qvit.calibrate(m, [torch.randn(4, 3, 8, 8)])
    F.cross_entropy(m(torch.randn(4, 3, 8, 8)), torch.tensor([0, 1, 2, 0])).backward()
    with pytest.raises(qvit.models.param_groups.OptimizerSetupError,
                       match=r"built before qvit\.quantize_model.*qvit\.param_groups"):
        opt.step()


def test_2_param_groups_after_conversion_train_bits():
    m = _tiny()
    before = {n: p.detach().clone() for n, p in m.named_parameters() if n.endswith(".bits")}
    opt = torch.optim.AdamW(qvit.param_groups(m, lr=1e-3, bit_lr=10.0))
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    for _ in range(2):
        budget = qvit.uniform_bitops(m, 3) / 1e9
        loss = F.cross_entropy(m(x), y) + qvit.budget_loss(m, budget)
        opt.zero_grad()
        loss.backward()
        opt.step()
        qvit.clamp_bits_(m)
    moved = [n for n, p in m.named_parameters() if n in before and not torch.equal(p, before[n])]
    # before the fix: 0 of them ever changed; now (nearly) all do in two steps
    assert len(before) > 0 and len(moved) >= 0.75 * len(before)


# 3 ------------------------------------------------------- distillation teacher
def test_3_distill_without_teacher_weights(data, tmp_path, capsys):
    rc, out, err = _run(capsys, "train", data, *TINY, "--distill", "--output", tmp_path / "o")
    _one_line(rc, err, "--distill needs teacher weights", "--initial-checkpoint")
    assert not (tmp_path / "o").exists()


# 4 ------------------------------------------------ models that are not DeiT/Swin
def _convert(name, **kw):
    import timm

    m = timm.create_model(name, num_classes=3, **kw)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        qvit.quantize_model(m, qvit.preset("lsq_w4a4"))
    return m, [str(x.message) for x in w if issubclass(x.category, qvit.convert.UnrecognisedModelWarning)]


def test_4_unrecognised_attention_warns_and_eva_runs():
    m, w = _convert("eva02_tiny_patch14_224", img_size=28, depth=1)
    assert len(w) == 1 and "EvaAttention" in w[0] and "attention matmuls stay float" in w[0]
    assert "strict=True" in w[0]
    assert qvit.conversion_summary(m)["unrecognised_attention"] == ["blocks.0.attn"]
    with torch.no_grad():  # used to crash: unexpected keyword argument 'rope'
        assert m(torch.randn(1, 3, 28, 28)).shape == (1, 3)
    _, w = _convert("swinv2_tiny_window8_256", img_size=32, depths=(1, 1, 1, 1), window_size=2,
                    embed_dim=24, num_heads=(1, 1, 1, 1))
    assert len(w) == 1 and "WindowAttention" in w[0]


def test_4_cnn_warns_about_its_first_layer_and_strict_raises():
    m, w = _convert("resnet18")
    assert len(w) == 1 and "no DeiT/ViT or Swin attention" in w[0]
    assert "first layer is not recognised" in w[0]
    import timm

    with pytest.raises(ValueError, match="strict=True"):
        qvit.quantize_model(timm.create_model("resnet18", num_classes=3), qvit.preset("lsq_w4a4"),
                            strict=True)


def test_4_deit_converts_silently_with_a_summary():
    with warnings.catch_warnings():
        warnings.simplefilter("error", qvit.convert.UnrecognisedModelWarning)
        m = _tiny("lsq_w4a4")
    s = qvit.conversion_summary(m)
    assert s["attention"] == ["blocks.0.attn"] and s["unrecognised_attention"] == []
    assert s["first_last"] == ["patch_embed.proj", "head"] and s["float_linear"] == []


# 5 ------------------------------------------------------------ run folders
def test_5_second_run_does_not_overwrite(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", data, *TINY, "--quant", "none", "--output", str(out)]) == 0
    before = (out / "last.pth").read_bytes()
    rc, _, err = _run(capsys, "train", data, *TINY, "--quant", "none", "--seed", "7",
                      "--output", out)
    _one_line(rc, err, "already holds a run", "--resume", "--overwrite")
    assert (out / "last.pth").read_bytes() == before
    assert main(["train", data, *TINY, "--quant", "none", "--seed", "7", "--output", str(out),
                 "--overwrite"]) == 0
    assert (out / "last.pth").read_bytes() != before


# 6 ------------------------------------------- a state dict of another preset
def test_6_loading_other_fixed_bits_warns():
    w4 = _tiny("lsq_w4a4")
    w3 = qvit.create_model("deit_tiny_patch16_224", **KW)
    qvit.quantize_model(w3, qvit.preset("uniform_w3a3"))
    with pytest.warns(UserWarning, match=r"fixed \(not learned\) bit-widths differ.*another preset"):
        w3.load_state_dict(w4.state_dict())
    # the same preset's state loads quietly
    again = qvit.create_model("deit_tiny_patch16_224", **KW)
    qvit.quantize_model(again, qvit.preset("lsq_w4a4"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again.load_state_dict(w4.state_dict())


# 7 -------------------------------------------------------------- extras
def test_7_missing_extras_are_named(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    rc, _, err = _run(capsys, "train", "--output", tmp_path / "demo", "--epochs", "1")
    _one_line(rc, err, "scikit-learn", "pip install 'qvit[demo]'")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    from qvit.models.report import require_matplotlib

    with pytest.raises(ImportError, match=r"pip install 'qvit\[demo\]'"):
        require_matplotlib()


def test_7_report_plot_without_matplotlib(monkeypatch, tmp_path, capsys):
    m = _tiny()
    ck = tmp_path / "m.safetensors"
    qvit.export.export(m, str(ck))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    rc, _, err = _run(capsys, "report", ck, "--plot", tmp_path / "b.png")
    _one_line(rc, err, "--plot", "matplotlib", "qvit[demo]")


# 8 ------------------------------------------------------ export symmetry
def test_8_export_needs_only_the_model(tmp_path):
    cfg = qvit.preset("qvit_mixed", act=qvit.QuantizerConfig(bits=6.0, learn_bits=True))
    torch.manual_seed(0)
    m = qvit.create_model("deit_tiny_patch16_224", **KW)
    qvit.quantize_model(m, cfg)  # an overridden QuantizerConfig: exported as data
    qvit.calibrate(m, [torch.randn(4, 3, 8, 8)])
    m.eval()
    path = str(tmp_path / "m.safetensors")
    qvit.export.export(m, path)
    loaded = qvit.export.load_exported(path)
    assert loaded.qvit_config == cfg
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(m(x), loaded(x))
    # a model timm built directly does not know its creation arguments: said so
    import timm

    plain = timm.create_model("deit_tiny_patch16_224", **KW)
    qvit.quantize_model(plain, cfg)
    with pytest.raises(qvit.export.ExportError, match=r"qvit\.create_model"):
        qvit.export.export(plain, str(tmp_path / "p.safetensors"))


def test_8_eval_report_read_exports_and_missing_folder(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", data, *TINY, "--quant", "lsq_w4a4", "--output", str(run)]) == 0
    exp = tmp_path / "m.safetensors"
    assert main(["export", str(run / "last.pth"), str(exp)]) == 0
    capsys.readouterr()
    rc, out_ck, err = _run(capsys, "eval", run / "last.pth", "--data", data, "-j", "0", "--json")
    assert rc == 0, err
    rc, out_ex, err = _run(capsys, "eval", exp, "--data", data, "-j", "0", "--json")
    assert rc == 0, err
    assert out_ex == out_ck  # same model, same transform (mean/std travel in the file)
    rc, out, err = _run(capsys, "report", exp)
    assert rc == 0 and "blocks.0.attn" in out, err
    rc, _, err = _run(capsys, "export", run / "last.pth", tmp_path / "missing_dir" / "m.safetensors")
    _one_line(rc, err, "does not exist", "missing_dir")


# 9 ------------------------------------------------------------- resume
def test_9_resume_without_data_restores_the_run(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", data, *TINY, "--quant", "none", "--epochs", "2", "-b", "3",
                 "--stop-after-epoch", "0", "--output", str(out)]) == 0
    cfg = parse_train_args(["--resume", str(out / "last.pth")])
    assert cfg.data_dir == data and cfg.batch_size == 3 and cfg.epochs == 2
    assert cfg.model_kwargs["embed_dim"] == 24 and cfg.stop_after_epoch is None
    # flags given now still win
    assert parse_train_args(["--resume", str(out / "last.pth"), "-b", "5"]).batch_size == 5
    assert main(["train", "--resume", str(out / "last.pth")]) == 0
    from qvit.models import checkpoint as ckpt_io

    ck = ckpt_io.load(str(out / "last.pth"))
    assert ck["epoch"] == 1 and ck["args"]["batch_size"] == 3


# 10 ------------------------------------------------------- model kwargs
@pytest.mark.parametrize("text", ["depths=(1,1,1,1)", "depths=1,1,1,1", "depths=[1,1,1,1]"])
def test_10_sequence_kwargs(text):
    cfg = parse_train_args([".", "--model-kwargs", text])
    assert cfg.model_kwargs == {"depths": [1, 1, 1, 1]}
    from qvit.models.recipe import create_model

    m = create_model("swin_tiny_patch4_window7_224", {**cfg.model_kwargs, "img_size": 32,
                                                      "window_size": 2, "embed_dim": 24,
                                                      "num_heads": [1, 1, 1, 1]})
    assert [len(layer.blocks) for layer in m.layers] == [1, 1, 1, 1]


def test_10_cli_kwargs_merge_over_yaml_and_string_hint(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("model_kwargs:\n  embed_dim: 24\n  depth: 2\n")
    cfg = parse_train_args(["-c", str(y), ".", "--model-kwargs", "depth=1", "num_heads=3"])
    assert cfg.model_kwargs == {"embed_dim": 24, "depth": 1, "num_heads": 3}
    from qvit.models.recipe import UsageError, create_model

    with pytest.raises(UsageError, match=r"a sequence is \[1,1,2,1\]; depths='1;1'"):
        create_model("swin_tiny_patch4_window7_224", {"depths": "1;1"})


# 11 -------------------------------------------------------------- half()
def test_11_half_says_what_to_do():
    m = _tiny()
    m.half()
    with pytest.raises(TypeError, match=r"must stay float32.*torch\.autocast"):
        m(torch.randn(1, 3, 8, 8).half())
    m.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert m(torch.randn(1, 3, 8, 8)).shape == (1, 3)


# 12 --------------------------------------------- calibrate and CUDA status
def test_12_calibrate_stops_after_max_batches():
    m = qvit.create_model("deit_tiny_patch16_224", **KW)
    qvit.quantize_model(m, qvit.preset("lsq_w4a4"))
    seen = []

    def endless():
        while True:
            seen.append(1)
            yield torch.randn(2, 3, 8, 8), torch.zeros(2, dtype=torch.long)

    assert qvit.calibrate(m, endless()) == 4 and len(seen) == 4
    assert qvit.calibrate(m, endless(), max_batches=2) == 2
    with pytest.raises(ValueError, match="max_batches"):
        qvit.calibrate(m, endless(), max_batches=0)


def test_12_backend_info_cuda_status_is_readable(monkeypatch):
    from qvit.ops import torch_ops

    class NoDriver:
        def cuda_built(self):
            return True

        def cuda_device_count(self):
            return -35

    monkeypatch.setattr(torch_ops, "_C", NoDriver())
    info = torch_ops.backend_info()
    assert info["cuda_devices"] == 0
    assert "cudaErrorInsufficientDriver" in info["cuda_status"]
    assert "no CUDA driver" in info["cuda_status"]
    monkeypatch.undo()
    real = torch_ops.backend_info()
    assert real["cuda_devices"] >= 0 and isinstance(real["cuda_status"], str)


# 13 ---------------------------------------------------------------- help
def test_13_help_has_a_line_and_default_for_every_flag():
    import dataclasses

    from qvit.train.cli import build_train_parser
    from qvit.train.config import TrainConfig

    text = build_train_parser().format_help()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        assert flag in text, flag
        assert f.metadata["help"].strip(), flag
    flat = " ".join(text.split())
    assert "base learning rate (default: 0.0002)" in flat
    assert "quantizer preset, or none for float training (default: qvit_mixed)" in flat
    assert "(default: 0.485 0.456 0.406)" in flat
    assert "==SUPPRESS==" not in text
    assert callable(qvit.param_groups)
