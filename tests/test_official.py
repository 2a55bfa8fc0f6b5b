"""``qvit_official`` against the research code (github zhexinli/Q-ViT-DeiT).

Independent re-statements of the research code, written here from its
description (``docs/design.md`` sections 2.6, 5.2 and 5.3): its per-tensor MSE
initialisation loop (``quantize_by_mse`` / ``quantize_by_mse_with_offset``, a
plain ``while`` loop on a flat tensor, float64 here), its weight reshapes
(``weight.reshape(Cin, H, Cout // H)`` for W_q/W_k/W_v, ``weight.reshape(H,
Cin // H, Cout)`` for W_proj, on the ``(out, in)`` weight) and its BitOPs
formulas. The effective quantized weights are read back from the layer's
output on an identity input (act quantizer off), not from qvit's own layout
helpers. Tolerances: scales rtol 1e-5 (same fixed point, different summation
order); weights 1e-6 absolute.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from qvit.models import budget
from qvit.models.convert import calibrate, quantize_model
from qvit.nn.config import QuantizerConfig, QViTConfig, preset, preset_lr_base
from qvit.nn.quantizer import Quantizer

timm = pytest.importorskip("timm")
pytestmark = pytest.mark.filterwarnings("ignore:qvit._C is not available")

C, H = 48, 3
D = C // H


# ------------------------------------------------- the research code, restated
def _research_mse(t: torch.Tensor, n: int, signed: bool = True) -> float:
    flat = t.reshape(-1).double()
    qn, qp = (-(2 ** (n - 1)), 2 ** (n - 1) - 1) if signed else (0, 2 ** n - 1)
    alpha = flat.abs().max() / qp
    alpha_old = -1.0
    while abs((alpha - alpha_old) / alpha) >= 1e-5:
        q = (flat / alpha).clamp(qn, qp).round()
        alpha_old = alpha
        alpha = flat.dot(q) / q.dot(q)
    return float(alpha)


def _research_mse_offset(t: torch.Tensor, n: int, signed: bool = False):
    flat = t.reshape(-1).double()
    qn, qp = (-(2 ** (n - 1)), 2 ** (n - 1) - 1) if signed else (0, 2 ** n - 1)
    beta = flat.min()
    nomin = flat - beta
    alpha = nomin.abs().max() / qp
    alpha_old = -1.0
    while abs((alpha - alpha_old) / alpha) >= 1e-5:
        q = (nomin / alpha).clamp(qn, qp).round()
        alpha_old = alpha
        beta = (flat - alpha * q).mean()
        alpha = nomin.dot(q) / q.dot(q)
        nomin = flat - beta
    return float(alpha), float(beta)


def _research_table(t, signed=True):
    return torch.tensor([_research_mse(t, n, signed) for n in range(2, 9)])


def _research_head_quant(w_view, alpha_h, bits_h):
    """Research code: ``round(clamp(w / alpha_h, Qn_h, Qp_h)) * alpha_h`` per head (dim ``1``)."""
    qn = (-(2.0 ** (bits_h - 1))).reshape(1, -1, 1)
    qp = (2.0 ** (bits_h - 1) - 1).reshape(1, -1, 1)
    a = alpha_h.reshape(1, -1, 1)
    return torch.minimum(torch.maximum(w_view / a, qn), qp).round() * a


# ------------------------------------------------------------------ helpers
_CACHE = {}


def _model(name: str):
    """A calibrated tiny DeiT under preset ``name`` (a fresh copy; calibration is done once)."""
    if name not in _CACHE:
        torch.manual_seed(0)
        m = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=C,
                              depth=2, num_heads=H, num_classes=10)
        qm = quantize_model(m, preset(name))
        calibrate(qm, [torch.randn(8, 3, 32, 32)])
        _CACHE[name] = qm
    return copy.deepcopy(_CACHE[name])


def _effective_weight(lin) -> torch.Tensor:
    """The weight a quantized linear multiplies with, read from its output on ``I``."""
    lin.act_quant.enabled = False
    try:
        with torch.no_grad():
            y = lin(torch.eye(lin.in_features))
    finally:
        lin.act_quant.enabled = True
    return (y - (lin.bias if lin.bias is not None else 0)).T


# -------------------------------------------------------------------- tests
def test_preset_fields_and_lr():
    off, mixed = preset("qvit_official"), preset("qvit_mixed")
    for q in (off.weight, off.act, off.attn, off.attn_probs, off.gelu):
        assert q.shared_scale and q.init == "official" and q.learn_bits and q.bits == 5
    assert off.head_wise and off.weight_grouping == "transposed"
    assert mixed.head_wise and mixed.weight.learn_bits
    assert preset_lr_base("qvit_official") == 2e-4
    assert preset_lr_base("lsq_w4a4") == preset_lr_base("uniform_w3a3") == 5e-4
    with pytest.raises(ValueError, match="preset name"):
        preset_lr_base("nope")
    with pytest.raises(ValueError, match="QuantizerConfig.init"):
        QuantizerConfig(init="lsq")
    with pytest.raises(ValueError, match="QViTConfig.weight_grouping"):
        QViTConfig(weight_grouping="rows")


def test_official_table_shapes():
    """One 7-entry table per research-code quantizer: three for W_q/W_k/W_v, per-head bits."""
    qm = _model("qvit_official")
    a = qm.blocks[0].attn
    assert tuple(a.qkv.weight_quant.scale.shape) == (3, 7)
    assert tuple(a.qkv.weight_quant.bits.shape) == (3 * H,)
    assert tuple(a.proj.weight_quant.scale.shape) == (1, 7)
    assert tuple(a.proj.weight_quant.bits.shape) == (H,)
    for q in (a.q_quant, a.k_quant, a.v_quant, a.attn_quant, a.proj.act_quant):
        assert tuple(q.scale.shape) == (1, 7) and tuple(q.bits.shape) == (H,)
    mlp = qm.blocks[0].mlp
    assert tuple(mlp.fc2.act_quant.offset.shape) == (1, 7)
    # qvit_mixed: one table per head
    m2 = _model("qvit_mixed").blocks[0].attn
    assert tuple(m2.qkv.weight_quant.scale.shape) == (3 * H, 7)
    assert tuple(m2.q_quant.scale.shape) == (H, 7)


def test_official_initial_weight_scales():
    qm = _model("qvit_official")
    a = qm.blocks[1].attn
    w = a.qkv.weight.detach()
    for s in range(3):  # W_q, W_k, W_v: one whole-tensor fit each
        want = _research_table(w[s * C:(s + 1) * C])
        torch.testing.assert_close(a.qkv.weight_quant.scale[s].detach().double(), want.double(),
                                   rtol=1e-5, atol=0)
    want = _research_table(a.proj.weight.detach())
    torch.testing.assert_close(a.proj.weight_quant.scale[0].detach().double(), want.double(),
                               rtol=1e-5, atol=0)
    # qvit's own init differs (grid start, per head), so the comparison can fail
    m2 = _model("qvit_mixed").blocks[1].attn
    assert not torch.allclose(m2.qkv.weight_quant.scale[0].detach().double(),
                              _research_table(w[:C]).double(), rtol=1e-3)


def test_official_initial_activation_scales():
    """Activation tables from the calibration batch: whole tensor, all heads (offset for GELU)."""
    torch.manual_seed(0)
    m = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=C,
                          depth=2, num_heads=H, num_classes=10)
    qm = quantize_model(m, preset("qvit_official"))
    seen = {}
    blk = qm.blocks[0]
    hooks = [blk.mlp.fc2.register_forward_pre_hook(lambda mod, inp: seen.__setitem__("gelu", inp[0])),
             blk.attn.proj.register_forward_pre_hook(lambda mod, inp: seen.__setitem__("av", inp[0]))]
    calibrate(qm, [torch.randn(8, 3, 32, 32)])
    for h in hooks:
        h.remove()
    q = blk.mlp.fc2.act_quant
    for j, n in enumerate(range(2, 9)):
        alpha, beta = _research_mse_offset(seen["gelu"], n)
        assert float(q.scale[0, j].detach()) == pytest.approx(alpha, rel=1e-5)
        assert float(q.offset[0, j].detach()) == pytest.approx(beta, rel=1e-5, abs=1e-7)
    torch.testing.assert_close(blk.attn.proj.act_quant.scale[0].detach().double(),
                               _research_table(seen["av"]).double(), rtol=1e-5, atol=0)


def test_official_init_per_head_tables_copy_one_fit():
    """init='official' with per-head tables: every head's row is the one whole-tensor fit."""
    x = torch.randn(4, 6, 50) * torch.tensor([0.5, 1, 2, 3, 4, 8]).reshape(1, 6, 1)
    q = Quantizer(QuantizerConfig(bits=4, init="official"), groups=6, dim=1, units=2)
    q.init_from(x)
    for u in range(2):
        want = _research_table(x[:, 3 * u:3 * u + 3])
        for g in range(3 * u, 3 * u + 3):
            torch.testing.assert_close(q.scale[g].double(), want.double(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("name", ["qvit_official", "qvit_mixed"])
def test_weight_groups(name):
    """Per-head bits act on the research code's groups (official) or on real heads (mixed)."""
    qm = _model(name)
    a = qm.blocks[0].attn
    torch.manual_seed(1)
    bq = torch.randint(2, 9, (3 * H,)).float()
    bp = torch.randint(2, 9, (H,)).float()
    a.qkv.weight_quant.set_bits_(bq)
    a.proj.weight_quant.set_bits_(bp)
    wq, wp = a.qkv.weight.detach(), a.proj.weight.detach()
    got_qkv, got_proj = _effective_weight(a.qkv), _effective_weight(a.proj)
    s_qkv = a.qkv.weight_quant.scale.detach()
    s_proj = a.proj.weight_quant.scale.detach()
    for s in range(3):
        b = bq[s * H:(s + 1) * H]
        if name == "qvit_official":  # research: weight.reshape(Cin, H, Cout // H) of the (out, in) weight
            alpha = s_qkv[s][b.long() - 2]
            want = _research_head_quant(wq[s * C:(s + 1) * C].reshape(C, H, D), alpha, b).reshape(C, C)
        else:  # rows of head h: [h*D, (h+1)*D)
            alpha = s_qkv[s * H:(s + 1) * H].gather(1, (b.long() - 2)[:, None])[:, 0]
            want = _research_head_quant(wq[s * C:(s + 1) * C].reshape(1, H, D * C), alpha, b).reshape(C, C)
        torch.testing.assert_close(got_qkv[s * C:(s + 1) * C], want, atol=1e-6, rtol=0)
    if name == "qvit_official":  # research: weight.reshape(H, Cin // H, Cout): output rows
        alpha = s_proj[0][bp.long() - 2]
        want = _research_head_quant(wp.reshape(1, H, D * C), alpha, bp).reshape(C, C)
    else:  # input columns of head h
        alpha = s_proj.gather(1, (bp.long() - 2)[:, None])[:, 0]
        want = _research_head_quant(wp.reshape(C, H, D), alpha, bp).reshape(C, C)
    torch.testing.assert_close(got_proj, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["qvit_official", "qvit_mixed"])
def test_attention_bitops(name):
    """qkv and proj BitOPs per image: the research code's formulas (official) or per head (mixed)."""
    qm = _model(name)
    a = qm.blocks[0].attn
    torch.manual_seed(2)
    for q in (a.qkv.weight_quant, a.proj.weight_quant, a.proj.act_quant, a.qkv.act_quant):
        q.set_bits_(torch.randint(2, 9, (q.groups,)).float())
    qm(torch.randn(1, 3, 32, 32))
    n = a.attn_shape[2]
    per = budget.layer_bitops(qm)
    b_in = float(a.qkv.act_quant.rounded_bits()[0])
    bw = a.qkv.weight_quant.rounded_bits().reshape(3, H)
    want_qkv = n * C * C * float(bw.sum(0).mean()) * b_in  # N C^2 mean(b_q + b_k + b_v) b_in
    assert float(per["blocks.0.attn.qkv"].detach()) == pytest.approx(want_qkv, rel=1e-6)
    bo, bpw = a.proj.act_quant.rounded_bits(), a.proj.weight_quant.rounded_bits()
    if name == "qvit_official":
        want_proj = n * C * C * float(bo.mean()) * float(bpw.mean())
    else:
        want_proj = n * C * D * float((bo * bpw).sum())
    assert float(per["blocks.0.attn.proj"].detach()) == pytest.approx(want_proj, rel=1e-6)
    # size: every weight element counted once at its group's bits
    size = float(budget.layer_size_bits(a.qkv).detach())
    assert size == pytest.approx(float(bw.sum()) * C * D, rel=1e-6)


def test_shared_table_gradient_and_grid_init():
    """Shared tables (grid init) fit the whole unit; heads at one bit-width share a scale's gradient."""
    x = torch.randn(2, 6, 40)
    q = Quantizer(QuantizerConfig(bits=4, shared_scale=True), groups=6, dim=1, units=3)
    q.init_from(x)
    assert tuple(q.scale.shape) == (3, 7)
    q(x).sum().backward()
    assert q.scale.grad[:, 2].abs().sum() > 0 and q.scale.grad[:, [0, 1, 3, 4, 5, 6]].abs().sum() == 0
    with pytest.raises(ValueError, match="units"):
        Quantizer(QuantizerConfig(), groups=6, units=4)


def test_official_train_step_runs():
    qm = _model("qvit_official")
    opt = torch.optim.SGD(qm.parameters(), lr=1e-3)
    loss = nn.functional.cross_entropy(qm(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    loss = loss + budget.budget_loss(qm, budget.uniform_bitops(qm, 3) / 1e9)
    loss.backward()
    assert qm.blocks[0].attn.qkv.weight_quant.bits.grad is not None
    assert qm.blocks[0].attn.qkv.weight_quant.scale.grad.shape == (3, 7)
    opt.step()


def test_paired_verdict_rule():
    """win / loss only when the 95 % t interval of the mean paired difference excludes 0."""
    from qvit.train.demo import paired_verdict

    # d = [1, 2, 3]: mean 2, sd 1, half-width 4.303 / sqrt(3) = 2.484 -> level
    assert paired_verdict([11, 12, 13], [10, 10, 10]) == (2.0, 1.0, "level")
    # d = [2, 2.1, 1.9]: mean 2, sd 0.1, half-width 0.248 -> win
    m, sd, v = paired_verdict([12, 12.1, 11.9], [10, 10, 10])
    assert v == "win" and m == pytest.approx(2.0) and sd == pytest.approx(0.1)
    assert paired_verdict([8, 7.9, 8.1], [10, 10, 10])[2] == "loss"
    assert paired_verdict([5.0], [1.0])[2] == "level"
    with pytest.raises(ValueError, match="paired_verdict"):
        paired_verdict([1.0], [1.0, 2.0])
