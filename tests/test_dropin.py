"""timm builds quantized models from qvit's layers (no downloads, random init).

References: the unmodified timm model (same constructor arguments, same float
weights loaded from its ``state_dict``), and the same timm model converted by
``quantize_model``. With every quantizer disabled a drop-in model must equal
timm's explicit attention path exactly (atol 0: the same float ops in the
same order; timm's fused SDPA path within 1e-5, as in test_models.py); with
quantizers on it must equal the converted model exactly, after calibration and
after a training step (same modules, same initialisation).
"""
from __future__ import annotations

import copy
import functools
import inspect
import pickle

import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm")

import qvit  # noqa: E402
from qvit.models.convert import (calibrate, dequantize_model, quantize_model, quantizers,  # noqa: E402
                                 set_quantizers_enabled)
from qvit.nn import (QAttention, QConv2d, QLinear, QMlp, QPatchEmbed, QWindowAttention,  # noqa: E402
                     default_qconfig)
from qvit.nn.config import QuantizerConfig, preset  # noqa: E402

pytestmark = [pytest.mark.timm, pytest.mark.filterwarnings("ignore:qvit._C is not available")]

# DeiT-S as timm defines it (12 blocks, 384 wide, 6 heads), at 32 px: 4 patches + cls.
DEIT_S = ("deit_small_patch16_224", dict(img_size=32), 32)
TINY_DISTILLED = ("deit_tiny_distilled_patch16_224", dict(depth=2, img_size=32, patch_size=8), 32)


def explicit_attention(model):
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    return model


def float_model(spec, seed=0, **kw):
    name, base, _ = spec
    torch.manual_seed(seed)
    return explicit_attention(timm.create_model(name, pretrained=False, **base, **kw)).eval()


def dropin_model(spec, cfg, seed=1, **kw):
    """The model built by timm from qvit's layers, the classifier(s) by the documented one-liner."""
    name, base, _ = spec
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **base, **kw,
                              attn_layer=QAttention.with_qconfig(cfg),
                              mlp_layer=functools.partial(QMlp, qconfig=cfg),
                              embed_layer=functools.partial(QPatchEmbed, qconfig=cfg))
    for attr in ("head", "head_dist"):
        if isinstance(getattr(model, attr, None), nn.Linear):
            setattr(model, attr, QLinear.from_float(getattr(model, attr), cfg, first_last=True))
    return model.eval()


def images(spec, n=2, seed=7):
    img = spec[2]
    return torch.randn(n, 3, img, img, generator=torch.Generator().manual_seed(seed))


def quantizer_keys(model):
    return {f"{name}.{k}" for name, q in quantizers(model) for k in q.state_dict()}


def load_float(model, float_sd):
    res = model.load_state_dict(float_sd, strict=False)
    assert res.unexpected_keys == []
    assert set(res.missing_keys) == quantizer_keys(model)  # only quantizer state is missing
    return model


def train_step(model, x, target):
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    out = model(x)
    out = (out[0] + out[1]) / 2 if isinstance(out, tuple) else out
    loss = nn.functional.cross_entropy(out, target)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    opt.step()
    opt.zero_grad()
    return loss.detach(), grads


@pytest.mark.slow
def test_deit_small_built_by_timm():
    cfg = preset("qvit_mixed")
    ref = float_model(DEIT_S)
    fused = copy.deepcopy(ref)
    for m in fused.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = True
    model = load_float(dropin_model(DEIT_S, cfg), ref.state_dict())
    converted = quantize_model(copy.deepcopy(ref), cfg)
    # the same modules, names and state as a converted model
    assert [(n, type(m)) for n, m in model.named_modules()] == \
        [(n, type(m)) for n, m in converted.named_modules()]
    assert list(model.state_dict()) == list(converted.state_dict())
    assert sum(isinstance(m, QAttention) for m in model.modules()) == 12
    assert model.patch_embed.proj.first_last and model.head.first_last
    x = images(DEIT_S)
    with torch.no_grad():
        want, want_sdpa = ref(x), fused(x)
        set_quantizers_enabled(model, False)
        got = model(x)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    torch.testing.assert_close(got, want_sdpa, atol=1e-5, rtol=1e-5)

    set_quantizers_enabled(model, True)
    calibrate(model, [x])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss, grads = train_step(model, x, torch.tensor([3, 999]))
    assert torch.isfinite(loss)
    for name, q in quantizers(model):
        assert bool(q.initialized), name
        assert f"{name}.scale" in grads and grads[f"{name}.scale"].abs().sum() > 0, name
        assert f"{name}.bits" in grads, name  # learned bits (qvit_mixed)
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert "blocks.11.attn.qkv.weight" in moved and "blocks.0.attn.q_quant.scale" in moved
    assert float(qvit.bitops(model).detach()) > 0  # calibrate recorded the batch


def test_distilled_equals_converted_model_when_quantized():
    """Built under ``default_qconfig`` with the plain classes; after the same
    calibration and a training step it is bitwise the converted model."""
    ref = float_model(TINY_DISTILLED, num_classes=10)
    with default_qconfig("qvit_mixed"):
        torch.manual_seed(3)
        name, base, _ = TINY_DISTILLED
        model = timm.create_model(name, pretrained=False, num_classes=10, **base,
                                  attn_layer=QAttention, mlp_layer=QMlp, embed_layer=QPatchEmbed)
        model.head = QLinear.from_float(model.head, None, first_last=True)
        model.head_dist = QLinear.from_float(model.head_dist, None, first_last=True)
    model = load_float(explicit_attention(model).eval(), ref.state_dict())
    converted = quantize_model(copy.deepcopy(ref), preset("qvit_mixed"))
    assert list(model.state_dict()) == list(converted.state_dict())
    x = images(TINY_DISTILLED)
    with torch.no_grad():
        set_quantizers_enabled(model, False)
        torch.testing.assert_close(model(x), ref(x), atol=0, rtol=0)
        set_quantizers_enabled(model, True)
    calibrate(model, [x])
    calibrate(converted, [x])
    with torch.no_grad():
        torch.testing.assert_close(model(x), converted(x), atol=0, rtol=0)
    target = torch.tensor([1, 7])
    loss, grads = train_step(model, x, target)
    loss_c, grads_c = train_step(converted, x, target)
    assert torch.equal(loss, loss_c) and grads.keys() == grads_c.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], grads_c[n], atol=0, rtol=0, msg=n)
    torch.testing.assert_close(qvit.bitops(model), qvit.bitops(converted), atol=0, rtol=0)


def test_same_seed_same_float_init():
    """Layers are built by timm's own constructors: same seed, same weights as timm."""
    ref = float_model(TINY_DISTILLED, seed=4)
    model = dropin_model(TINY_DISTILLED, preset("lsq_w4a4"), seed=4)
    float_sd = ref.state_dict()
    for k, v in model.state_dict().items():
        if k not in quantizer_keys(model):
            assert torch.equal(v, float_sd[k]), k


def test_dequantize_gives_timm_modules_back():
    ref = float_model(TINY_DISTILLED)
    model = load_float(dropin_model(TINY_DISTILLED, preset("qvit_mixed")), ref.state_dict())
    x = images(TINY_DISTILLED)
    calibrate(model, [x])
    explicit_attention(dequantize_model(model))  # timm's Attention again, SDPA by default
    assert [(n, type(m)) for n, m in model.named_modules()] == \
        [(n, type(m)) for n, m in ref.named_modules()]
    assert list(model.state_dict()) == list(ref.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=0, rtol=0)


def _attention_kwargs():
    cases = [dict(), dict(qk_norm=True, norm_layer=nn.LayerNorm),
             dict(scale_norm=True, norm_layer=nn.LayerNorm, qkv_bias=True),
             dict(attn_head_dim=8, dim_out=24, proj_bias=False)]
    if "gated" in inspect.signature(timm.layers.Attention).parameters:
        cases.append(dict(gated=True, qkv_bias=True))
    return cases


@pytest.mark.parametrize("kw", _attention_kwargs(), ids=lambda kw: "-".join(kw) or "plain")
def test_attention_takes_timm_arguments(kw):
    torch.manual_seed(0)
    ref = explicit_attention(timm.layers.Attention(32, num_heads=4, **kw)).eval()
    layer = QAttention(32, num_heads=4, qconfig="qvit_mixed", **kw).eval()
    load_float(layer, ref.state_dict())
    assert isinstance(layer.qkv, QLinear) and isinstance(layer.proj, QLinear)
    if kw.get("gated"):
        assert isinstance(layer.gate, QLinear)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        set_quantizers_enabled(layer, False)
        torch.testing.assert_close(layer(x), ref(x), atol=0, rtol=0)
        set_quantizers_enabled(layer, True)
        assert not torch.equal(layer(x), ref(x))  # quantizers act (lazily initialised)
    assert type(layer.to_float()) is timm.layers.Attention


def test_mlp_takes_timm_arguments():
    kw = dict(hidden_features=40, out_features=12, norm_layer=nn.LayerNorm, bias=(True, False))
    torch.manual_seed(0)
    ref = timm.layers.Mlp(16, **kw).eval()
    layer = load_float(QMlp(16, qconfig="lsq_w4a4", **kw).eval(), ref.state_dict())
    # a norm between GELU and fc2: its (signed) output gets the `act` config, not `gelu`
    assert layer.fc2.act_quant.signed and layer.fc2.act_quant.offset is None
    plain = QMlp(16, qconfig="lsq_w4a4")
    assert not plain.fc2.act_quant.signed and plain.fc2.act_quant.offset is not None
    x = torch.randn(3, 16)
    with torch.no_grad():
        set_quantizers_enabled(layer, False)
        torch.testing.assert_close(layer(x), ref(x), atol=0, rtol=0)
    assert type(layer.to_float()) is timm.layers.Mlp


def test_swin_window_attention_takes_timm_arguments():
    """timm's Swin block builds its WindowAttention itself (no layer slot), so the
    layer is checked on its own, shifted-window mask included."""
    from timm.models.swin_transformer import WindowAttention
    torch.manual_seed(0)
    ref = explicit_attention(WindowAttention(24, num_heads=3, window_size=4)).eval()
    layer = QWindowAttention(24, num_heads=3, window_size=4, qconfig="qvit_mixed").eval()
    load_float(layer, ref.state_dict())
    x = torch.randn(4, 16, 24)  # 2 images x 2 windows of 4x4
    mask = torch.zeros(2, 16, 16).masked_fill_(torch.rand(2, 16, 16) < 0.3, -100.0)
    with torch.no_grad():
        set_quantizers_enabled(layer, False)
        for m in (None, mask):
            torch.testing.assert_close(layer(x, m), ref(x, m), atol=0, rtol=0)
        set_quantizers_enabled(layer, True)
    layer.train()
    layer(x, mask).square().mean().backward()
    assert all(q.scale.grad is not None and torch.isfinite(q.scale.grad).all()
               for _, q in quantizers(layer))
    assert type(layer.to_float()) is WindowAttention


def test_linear_and_conv_take_torch_arguments():
    lin = QLinear(8, 4, bias=False, qconfig=(QuantizerConfig(bits=8), None))
    assert lin.bias is None and lin.act_quant is None and lin.weight_quant is not None
    head = QLinear(8, 4, qconfig="qvit_mixed", first_last=True)
    assert head.first_last and head.weight_quant.bits.tolist() == [8.0]
    conv = QConv2d(3, 6, 4, stride=4, qconfig=QuantizerConfig(bits=4, granularity="channel"))
    assert conv.weight_quant.groups == 6 and conv.act_quant.groups == 3
    assert conv(torch.randn(1, 3, 8, 8)).shape == (1, 6, 2, 2)


def test_with_qconfig_builds_plain_instances():
    cls = QAttention.with_qconfig("lsq_w4a4")
    assert issubclass(cls, QAttention)
    layer = cls(16, num_heads=2)
    assert type(layer) is QAttention and layer.qkv.weight_quant.bits.tolist() == [4.0] * 3
    assert type(pickle.loads(pickle.dumps(layer))) is QAttention
    with default_qconfig("uniform_w3a3"):
        assert QMlp(8).fc1.weight_quant.bits.tolist() == [3.0]
        assert cls(16, num_heads=2).qkv.weight_quant.bits.tolist() == [4.0] * 3  # bound wins
    assert QMlp(8).fc1.weight_quant.bits.tolist() == [4.0]  # QViTConfig() outside the block


def test_config_that_does_not_fit_names_the_layer():
    with pytest.raises(ValueError, match=r"QLinear\(in_features=8, out_features=4.*no heads"):
        QLinear(8, 4, qconfig=QuantizerConfig(granularity="head"))
    with pytest.raises(ValueError, match=r"QConv2d\(3, 6.*no heads"):
        QConv2d(3, 6, 4, qconfig=(None, QuantizerConfig(granularity="head")))
    with pytest.raises(TypeError, match=r"QAttention\(dim=16, num_heads=2\): qconfig must be a QViTConfig"):
        QAttention(16, num_heads=2, qconfig=QuantizerConfig())
    with pytest.raises(TypeError, match=r"QMlp\(in_features=8, hidden_features=8\): qconfig"):
        QMlp(8, qconfig={"bits": 4})
    with pytest.raises(ValueError, match="not a preset"):
        QMlp(8, qconfig="w4a4")
    with pytest.raises(TypeError, match=r"QMlp.*use_conv"):
        QMlp(8, use_conv=True)
    with pytest.raises(TypeError, match="QWindowAttention.from_float needs"):
        QWindowAttention.from_float(timm.layers.Attention(16, num_heads=2))
    with pytest.raises(TypeError, match="QAttention.from_float needs"):
        QAttention.from_float(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="keep_float"):
        QAttention(16, num_heads=2, keep_float=("qkvv",))
    with pytest.raises(TypeError, match="unknown options"):
        QAttention.with_qconfig("lsq_w4a4", first_last=True)
    with pytest.raises(TypeError, match="qconfig pair"):
        QLinear(4, 4, qconfig=(QuantizerConfig(),))


def test_quantize_model_makes_the_same_layers():
    model = float_model(TINY_DISTILLED)
    quantize_model(model, preset("lsq_w4a4", skip=("blocks.1.mlp.fc2",)))
    assert type(model.blocks[0].mlp) is QMlp and type(model.blocks[0].attn) is QAttention
    assert type(model.blocks[1].mlp) is QMlp and type(model.blocks[1].mlp.fc2) is nn.Linear
    model = float_model(TINY_DISTILLED)
    quantize_model(model, preset("lsq_w4a4", skip=("blocks.1.mlp.*",)))
    assert type(model.blocks[1].mlp) is timm.layers.Mlp  # nothing of it quantized


def test_other_mlp_kinds_keep_their_forward():
    """A converted MLP runs the forward of its own class (here timm's GluMlp) on
    the quantized fc1 / fc2."""
    torch.manual_seed(0)
    ref = nn.Sequential(timm.layers.GluMlp(16, hidden_features=32)).eval()
    model = quantize_model(copy.deepcopy(ref), preset("lsq_w4a4"))
    assert type(model[0]) is QMlp and isinstance(model[0].fc1, QLinear)
    x = torch.randn(3, 16)
    with torch.no_grad():
        set_quantizers_enabled(model, False)
        torch.testing.assert_close(model(x), ref(x), atol=0, rtol=0)
    assert type(dequantize_model(model)[0]) is timm.layers.GluMlp


@pytest.mark.slow
def test_readme_dropin_example_runs():
    import os
    import re
    text = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "README.md")).read()
    section = text.split("### Letting timm build the quantized model\n", 1)[1].split("\n## ", 1)[0]
    code = re.findall(r"```python\n(.*?)```", section, flags=re.S)[0]
    torch.manual_seed(0)
    ns = {"qvit": qvit, "images": torch.randn(2, 3, 64, 64)}
    exec(compile(code, "README.md", "exec"), ns)
    model, float_model = ns["model"], ns["float_model"]
    assert all(bool(q.initialized) for _, q in quantizers(model))
    assert torch.equal(model.blocks[0].attn.qkv.weight, float_model.blocks[0].attn.qkv.weight)
