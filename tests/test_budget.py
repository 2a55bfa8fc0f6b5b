"""BitOPs / size accounting, the budget loss, bit freezing and the report.

References: the published DeiT budget table (docs/design.md section 5.3, exact to the
3 decimals printed), and per-term formulas written out here by hand from the
model dimensions (exact up to float32 summation, rel 1e-6).
"""
from __future__ import annotations

import json

import pytest
import torch

timm = pytest.importorskip("timm")

import qvit  # noqa: E402
from qvit.models.budget import (average_bits, bitops, budget_loss, freeze_bits, model_size_bits,  # noqa: E402
                         uniform_bitops, uniform_size_bits)
from qvit.nn.config import preset  # noqa: E402
from qvit.models.convert import calibrate, clamp_bits_, quantize_model, quantizers, set_quantizers_enabled  # noqa: E402
from qvit.models.report import Report, plot_bits, report  # noqa: E402

pytestmark = [pytest.mark.timm, pytest.mark.filterwarnings("ignore:qvit._C is not available")]

TABLE = {  # GBitOPs per image, uniform bits with 8-bit first/last layers, 197 tokens
    "deit_tiny_patch16_224": [6.760, 12.883, 21.455, 32.477, 80.236],
    "deit_small_patch16_224": [21.887, 44.590, 76.375, 117.241, 294.328],
    "deit_base_patch16_224": [77.238, 164.475, 286.607, 443.634, 1124.085],
}


@pytest.mark.parametrize("name", list(TABLE))
def test_published_budget_table(name):
    model = timm.create_model(name, pretrained=False).eval()
    quantize_model(model, preset("lsq_w4a4"))
    set_quantizers_enabled(model, False)  # shapes only; no need to initialise
    with torch.no_grad():
        model(torch.zeros(1, 3, 224, 224))
    got = [round(uniform_bitops(model, b) / 1e9, 3) for b in (2, 3, 4, 5, 8)]
    assert got == TABLE[name]


def small_deit(cfg="qvit_mixed", **kw):
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=10, depth=1,
                              embed_dim=48, num_heads=3, img_size=32, patch_size=8, **kw).eval()
    quantize_model(model, preset(cfg) if isinstance(cfg, str) else cfg)
    return model


def test_bitops_by_hand_with_head_wise_bits():
    model = small_deit()
    x = torch.randn(2, 3, 32, 32)
    calibrate(model, [x])
    gen = torch.Generator().manual_seed(0)
    for _, q in quantizers(model):
        q.set_bits_(torch.randint(2, 9, (q.groups,), generator=gen).float())
    with torch.no_grad():
        model(x)
    N, C, H, d, P = 17, 48, 3, 16, 16

    def b(q):
        return q.rounded_bits().double()

    pe, blk, head = model.patch_embed.proj, model.blocks[0], model.head
    attn, mlp = blk.attn, blk.mlp
    want = P * C * 3 * 64 * b(pe.weight_quant).sum() * b(pe.act_quant).sum()
    want += N * C * d * b(attn.qkv.weight_quant).sum() * b(attn.qkv.act_quant).sum()
    want += N * N * d * (b(attn.q_quant) * b(attn.k_quant)).sum()
    want += N * N * d * (b(attn.attn_quant) * b(attn.v_quant)).sum()
    want += N * C * d * (b(attn.proj.weight_quant) * b(attn.proj.act_quant)).sum()
    want += N * C * 4 * C * b(mlp.fc1.weight_quant).sum() * b(mlp.fc1.act_quant).sum()
    want += N * 4 * C * C * b(mlp.fc2.weight_quant).sum() * b(mlp.fc2.act_quant).sum()
    want += C * 10 * b(head.weight_quant).sum() * b(head.act_quant).sum()
    assert float(bitops(model).detach()) == pytest.approx(float(want), rel=1e-6)

    total = bitops(model)
    total.backward()
    # d BitOPs / d b_w(fc1) = N * C * 4C * b_a(fc1);  d / d b_q[h] = N^2 d b_k[h]
    assert float(mlp.fc1.weight_quant.bits.grad) == pytest.approx(
        N * C * 4 * C * float(b(mlp.fc1.act_quant)), rel=1e-6)
    torch.testing.assert_close(attn.q_quant.bits.grad.double(), N * N * d * b(attn.k_quant), rtol=1e-6, atol=0)

    size = sum(float(m.weight.numel() * b(m.weight_quant).mean()) for m in model.modules()
               if isinstance(m, (qvit.nn.QLinear, qvit.nn.QConv2d)))
    assert float(model_size_bits(model).detach()) == pytest.approx(size, rel=1e-6)


def test_budget_loss_and_uniform_helpers():
    model = small_deit("lsq_w4a4")
    with pytest.raises(RuntimeError, match="forward"):
        bitops(model)
    set_quantizers_enabled(model, False)
    with torch.no_grad():
        model(torch.randn(3, 3, 32, 32))
    set_quantizers_enabled(model, True)
    g4 = uniform_bitops(model, 4) / 1e9
    assert float(bitops(model)) / 1e9 == pytest.approx(g4, rel=1e-6)
    assert uniform_bitops(model, 3) / 1e9 < g4
    assert uniform_bitops(model, 4, first_last_bits=None) / 1e9 < g4  # first/last at 4, not 8
    assert float(budget_loss(model, g4 * 1.01)) == 0.0
    assert float(budget_loss(model, g4 / 2, weight=0.5)) == pytest.approx(0.5 * (g4 / 2) ** 2, rel=1e-5)
    mb = uniform_size_bits(model, 4) / 1e6  # megabits
    assert float(budget_loss(model, mb / 2, weight=1.0, kind="size")) == pytest.approx((mb / 2) ** 2, rel=1e-5)
    with pytest.raises(ValueError, match="kind"):
        budget_loss(model, 1.0, kind="flops")
    with pytest.raises(ValueError, match="budget_gbitops"):
        budget_loss(model, -1.0)
    with pytest.raises(ValueError, match="bits"):
        uniform_bitops(model, 0)


def test_average_bits_and_freeze():
    model = small_deit(preset("qvit_mixed", first_last_bits=None))
    x = torch.randn(2, 3, 32, 32)
    calibrate(model, [x])
    model(x)
    assert average_bits(model) == {"weights": 5.0, "activations": 5.0}
    assert freeze_bits(model) > 0
    assert all(not q.bits.requires_grad for _, q in quantizers(model))
    model(x)
    assert not budget_loss(model, 0.0).requires_grad  # no path to any bit-width
    freeze_bits(model, frozen=False)
    assert all(q.bits.requires_grad for _, q in quantizers(model))


def test_report_rows_table_and_plot(tmp_path):
    model = small_deit()
    x = torch.randn(2, 3, 32, 32)
    calibrate(model, [x])
    model.blocks[0].attn.q_quant.set_bits_([2, 5, 8])
    model(x)
    rep = qvit.report(model)  # the lazily exported function
    assert isinstance(rep, Report) and rep is not None
    layers = {r["layer"]: r for r in rep.rows}
    assert layers["blocks.0.attn"]["q_bits"] == [2, 5, 8]
    assert layers["head"]["w_bits"] == [8] and layers["head"]["first_last"]
    assert rep.totals["gbitops"] == pytest.approx(float(bitops(model).detach()) / 1e9, rel=1e-6)
    assert sum(layers["blocks.0.attn"]["head_gbitops"]) == pytest.approx(layers["blocks.0.attn"]["gbitops"], rel=1e-6)
    json.dumps(rep.to_dict())
    text = rep.table()
    assert "blocks.0.mlp.fc1" in text and "GBitOPs" in text
    path = plot_bits(model, tmp_path / "bits.png")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no quantized"):
        report(torch.nn.Linear(2, 2))


def test_budget_training_reaches_budget():
    """A few hundred steps on a toy task: BitOPs end under a 3-bit budget, the task loss falls."""
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=4, depth=1,
                              embed_dim=32, num_heads=2, img_size=16, patch_size=4)
    quantize_model(model, preset("qvit_mixed"))
    gen = torch.Generator().manual_seed(1)
    protos = torch.randn(4, 3, 16, 16, generator=gen)
    labels = torch.arange(64) % 4
    data = protos[labels] + 0.8 * torch.randn(64, 3, 16, 16, generator=gen)
    calibrate(model, [data[:32]])
    model.eval()
    model(data[:1])
    budget = uniform_bitops(model, 3) / 1e9
    start = float(bitops(model).detach()) / 1e9
    weight = 1.0 / (start - budget) ** 2  # the penalty starts at 1 on this tiny model
    bit_params = [q.bits for _, q in quantizers(model)]
    ids = {id(p) for p in bit_params}
    others = [p for p in model.parameters() if id(p) not in ids]
    opt = torch.optim.AdamW([{"params": others, "lr": 2e-3, "weight_decay": 0.0},
                             {"params": bit_params, "lr": 2e-2, "weight_decay": 0.0}])
    task = []
    for step in range(300):
        idx = torch.randint(0, 64, (16,), generator=gen)
        out = model(data[idx])
        ce = torch.nn.functional.cross_entropy(out, labels[idx])
        loss = ce + budget_loss(model, budget, weight=weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
        clamp_bits_(model)
        task.append(float(ce.detach()))
    with torch.no_grad():
        model(data[:1])
    final = float(bitops(model).detach()) / 1e9
    assert final <= budget * (1 + 1e-6), (start, final, budget)
    first, last = sum(task[:30]) / 30, sum(task[-30:]) / 30
    assert last < 0.7 * first, (first, last)
