"""Conversion of real timm DeiT / distilled DeiT / Swin models (small configs, no downloads).

References: the unmodified timm model on the same weights. With every quantizer
disabled the converted model must equal timm's explicit attention path exactly
(atol 0: same float ops in the same order) and timm's default SDPA path within
1e-5 (different kernel, float rounding).
"""
from __future__ import annotations

import copy

import pytest
import torch

timm = pytest.importorskip("timm")

from qvit.nn.config import QuantizerConfig, QViTConfig, preset  # noqa: E402
from qvit.models.convert import (calibrate, dequantize_model, quantize_model, quantizers,  # noqa: E402
                          set_quantizers_enabled)
from qvit.nn import QAttention, QConv2d, QLinear, QWindowAttention  # noqa: E402

pytestmark = [pytest.mark.timm, pytest.mark.filterwarnings("ignore:qvit._C is not available")]

MODELS = {
    "deit": ("deit_tiny_patch16_224", dict(depth=2, img_size=32, patch_size=8), 32),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", dict(depth=2, img_size=32, patch_size=8), 32),
    # depths[0] = 2 at 14x14 tokens with window 7: the second block is shifted (mask path)
    "swin": ("swin_tiny_patch4_window7_224",
             dict(embed_dim=24, depths=(2, 1, 1, 1), num_heads=(1, 2, 3, 4), img_size=56), 56),
    "vit_qknorm": ("deit_tiny_patch16_224", dict(depth=1, img_size=32, patch_size=8, qk_norm=True), 32),
}


def make(key, fused=False, seed=0):
    name, kw, img = MODELS[key]
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kw).eval()
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused
    x = torch.randn(2, 3, img, img, generator=torch.Generator().manual_seed(seed + 1))
    return model, x


def uniform(bits, **kw):
    q = dict(bits=bits)
    return QViTConfig(weight=QuantizerConfig(**q), act=QuantizerConfig(**q), attn=QuantizerConfig(**q),
                      attn_probs=QuantizerConfig(signed=False, **q),
                      gelu=QuantizerConfig(signed=False, offset=True, **q), first_last_bits=8, **kw)


@pytest.mark.parametrize("key", list(MODELS))
def test_disabled_equals_timm(key):
    model, x = make(key)
    fused, _ = make(key, fused=True)
    with torch.no_grad():
        ref = model(x)
        ref_sdpa = fused(x)
    quantize_model(model, preset("qvit_mixed"))
    set_quantizers_enabled(model, False)
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    torch.testing.assert_close(out, ref_sdpa, atol=1e-5, rtol=1e-5)


def test_import_qvit_does_not_import_timm():
    import subprocess
    import sys
    code = ("import sys, qvit; qvit.preset; qvit.quantize_model; qvit.bitops; qvit.report; "
            "qvit.budget_loss; qvit.calibrate; qvit.dequantize_model; assert 'timm' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_structure_is_recognised():
    model, x = make("swin")
    weight = model.layers[0].blocks[0].mlp.fc1.weight
    quantize_model(model, preset("lsq_w4a4"))
    assert sum(isinstance(m, QWindowAttention) for m in model.modules()) == 5
    assert isinstance(model.patch_embed.proj, QConv2d) and model.patch_embed.proj.first_last
    assert isinstance(model.head.fc, QLinear) and model.head.fc.first_last
    assert isinstance(model.layers[1].downsample.reduction, QLinear)
    assert model.head.fc.weight_quant.bits.tolist() == [8.0]
    assert model.layers[0].blocks[0].mlp.fc1.weight is weight  # same Parameter, not a copy
    model, _ = make("deit_distilled")
    quantize_model(model, preset("lsq_w4a4"))
    assert model.head.first_last and model.head_dist.first_last
    assert sum(isinstance(m, QAttention) for m in model.modules()) == 2
    assert model.blocks[0].mlp.fc2.act_quant.offset is not None
    assert not model.blocks[0].mlp.fc2.act_quant.signed


@pytest.mark.parametrize("key", ["deit", "swin"])
def test_8_bits_close_2_bits_far(key):
    model, x = make(key)
    with torch.no_grad():
        ref = model(x)
    errs = {}
    qm = quantize_model(copy.deepcopy(model), uniform(8))
    calibrate(qm, [x])  # fits the scale of every bit-width: switching to 2 bits needs no refit
    for bits in (8, 2):
        for _, q in quantizers(qm):
            if not q.first_last:
                q.set_bits_(bits)
        with torch.no_grad():
            errs[bits] = float((qm(x) - ref).norm() / ref.norm())
    assert errs[8] < 0.05, errs
    assert errs[2] > 0.2, errs


def shared_channel():
    """Head-wise with one shared table per attention quantizer; per-channel weights and inputs elsewhere."""
    cfg = preset("qvit_mixed")
    return cfg.replace(attn=cfg.attn.replace(shared_scale=True),
                       attn_probs=cfg.attn_probs.replace(shared_scale=True),
                       weight=cfg.weight.replace(granularity="channel"),
                       act=cfg.act.replace(granularity="channel"))


@pytest.mark.parametrize("key, cfg", [("deit_distilled", "qvit_mixed"), ("swin", "qvit_mixed"),
                                      ("swin", "shared_channel")])
def test_forward_backward_gradients(key, cfg):
    model, x = make(key)
    quantize_model(model, preset(cfg) if cfg in ("qvit_mixed",) else shared_channel())
    calibrate(model, [(x, None)])
    model.train()
    out = model(x)
    out = out[0] + out[1] if isinstance(out, tuple) else out
    torch.nn.functional.cross_entropy(out, torch.tensor([1, 7])).backward()
    n = 0
    for name, q in quantizers(model):
        cols = (q.rounded_bits().long() - q.bits_range[0])
        rows = torch.arange(q.groups) if q.scale.shape[0] > 1 else torch.zeros(q.groups, dtype=torch.long)
        active = torch.zeros_like(q.scale, dtype=torch.bool)
        active[rows, cols] = True
        for p in [q.scale] + ([q.offset] if q.offset is not None else []):
            assert p.grad is not None, name
            assert torch.isfinite(p.grad).all(), name
            assert torch.count_nonzero(p.grad[~active]) == 0, name
            assert p.grad[active].abs().sum() > 0, name
        assert q.bits.grad is not None and torch.isfinite(q.bits.grad).all(), name
        n += 1
    assert n > 20
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_head_wise_groups_are_head_aligned():
    model, x = make("deit")
    quantize_model(model, preset("qvit_mixed"))
    calibrate(model, [x])
    attn = model.blocks[0].attn
    H, d = attn.num_heads_q, attn.head_dim_q
    C = H * d
    head = 1

    def weights_and_acts(bits_for_head):
        for q in (attn.qkv.weight_quant, attn.proj.weight_quant, attn.proj.act_quant,
                  attn.q_quant, attn.k_quant, attn.v_quant, attn.attn_quant):
            bits = torch.full((q.groups,), 8.0)
            per = q.groups // H if q.groups > H else 1  # qkv weight has 3H groups: s*H + h
            for s in range(per):
                bits[s * H + head] = bits_for_head
            q.set_bits_(bits)
        with torch.no_grad():
            wqkv = attn.qkv.weight_quant(attn.qkv.weight)
            wproj = attn.proj.weight_quant(attn.proj.weight)
            tokens = torch.randn(2, 5, C, generator=torch.Generator().manual_seed(3))
            qkv = attn._quant_qkv(torch.randn(2, 5, 3 * C, generator=torch.Generator().manual_seed(4)), 10)
            probs = attn.attn_quant(torch.softmax(torch.randn(2, H, 5, 5, generator=torch.Generator().manual_seed(5)), -1))
            pin = attn.proj.act_quant(tokens)
        return wqkv, wproj, qkv, probs, pin

    hi = weights_and_acts(8.0)
    lo = weights_and_acts(2.0)
    rows = torch.zeros(3 * C, dtype=torch.bool)
    for s in range(3):
        rows[s * C + head * d: s * C + (head + 1) * d] = True
    cols = torch.zeros(C, dtype=torch.bool)
    cols[head * d:(head + 1) * d] = True
    diff_qkv_w = (hi[0] != lo[0]).any(dim=1)
    assert diff_qkv_w[rows].all() and not diff_qkv_w[~rows].any()
    diff_proj_w = (hi[1] != lo[1]).any(dim=0)
    assert diff_proj_w[cols].all() and not diff_proj_w[~cols].any()
    diff_qkv = (hi[2] != lo[2]).reshape(10, 3, H, d).any(dim=(0, 3))
    assert diff_qkv[:, head].all() and not diff_qkv[:, [h for h in range(H) if h != head]].any()
    diff_probs = (hi[3] != lo[3]).any(dim=(0, 2, 3))
    assert diff_probs[head] and diff_probs.sum() == 1
    diff_pin = (hi[4] != lo[4]).reshape(-1, C).any(dim=0)
    assert diff_pin[cols].all() and not diff_pin[~cols].any()


def test_state_dict_round_trip():
    model, x = make("swin")
    cfg = preset("qvit_mixed")
    quantize_model(model, cfg)
    calibrate(model, [x])
    for _, q in quantizers(model):
        with torch.no_grad():
            q.bits.sub_(torch.rand(q.groups, generator=torch.Generator().manual_seed(q.groups)) * 2.4)
    with torch.no_grad():
        out = model(x)
    other, _ = make("swin", seed=5)
    quantize_model(other, cfg)
    other.load_state_dict(model.state_dict())
    assert all(bool(q.initialized) for _, q in quantizers(other))
    with torch.no_grad():
        torch.testing.assert_close(other(x), out, atol=0, rtol=0)


@pytest.mark.parametrize("key", ["deit_distilled", "swin"])
def test_dequantize_returns_timm_model(key):
    model, x = make(key)
    ref_model = copy.deepcopy(model)
    with torch.no_grad():
        ref = model(x)
    float_keys = set(model.state_dict())
    quantize_model(model, preset("qvit_mixed"))
    calibrate(model, [x])
    dequantize_model(model)
    assert not any(isinstance(m, (QLinear, QConv2d, QAttention, QWindowAttention)) for m in model.modules())
    assert set(model.state_dict()) == float_keys
    assert [type(m) for m in model.modules()] == [type(m) for m in ref_model.modules()]
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, atol=0, rtol=0)
    quantize_model(model, preset("lsq_w4a4"))  # a dequantized model converts again


def test_skip_and_bad_input():
    model, x = make("deit")
    quantize_model(model, preset("lsq_w4a4", skip=("head", "blocks.1.mlp.*")))
    assert type(model.head) is torch.nn.Linear
    assert type(model.blocks[1].mlp.fc1) is torch.nn.Linear
    assert isinstance(model.blocks[0].mlp.fc1, QLinear)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(model, preset("lsq_w4a4"))
    with pytest.raises(TypeError, match="config"):
        quantize_model(make("deit")[0], {"bits": 4})
    with pytest.raises(TypeError, match="model"):
        quantize_model("deit", preset("lsq_w4a4"))
    with pytest.raises(ValueError, match="no batch"):
        calibrate(model, [])
    with pytest.raises(ValueError, match="no quantizers"):
        calibrate(make("deit")[0], [x])


@pytest.mark.slow
def test_compiles_without_graph_breaks():
    model, x = make("deit")
    quantize_model(model, preset("qvit_mixed"))
    calibrate(model, [x])
    with torch.no_grad():
        ref = model(x)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        out = compiled(x)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
