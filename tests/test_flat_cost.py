"""The flat budget: a whole model's BitOPs / size over one flat view of all bit-widths.

Reference: the per-layer formulas written out here again the way the layers
used to compute them, op by op (every channel's bits expanded with
``repeat_interleave``, disabled quantizers at 32 bits, STE rounding per
quantizer). Values and every bit-width gradient must agree to float32
rounding (rel 1e-6; the flat path sums in float64). The flat path must be
bitwise repeatable, rebuild itself when shapes or quantizers change, and cost
the same number of ops whatever the depth of the model.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

timm = pytest.importorskip("timm")

import qvit  # noqa: E402
from qvit.models import budget  # noqa: E402
from qvit.models.flat_cost import flat_cost  # noqa: E402
from qvit.nn.attention import QKVColumnGroups, _QAttentionBase  # noqa: E402
from qvit.nn.config import QuantizerConfig  # noqa: E402
from qvit.nn.linear import QConv2d, QLinear  # noqa: E402
from qvit.nn.quantizer import Quantizer  # noqa: E402

pytestmark = [pytest.mark.timm]


# ------------------------------------------------------------------ reference
def _bits(q, size):
    """Bits of each of ``size`` channels, STE-rounded; 32 for no / a disabled quantizer."""
    if q is None or not q.enabled:
        return torch.full((size,), 32.0)
    lo, hi = q.bits_range
    b = q.bits + (torch.round(q.bits.clamp(lo, hi)) - q.bits).detach()
    return b.repeat_interleave(size // b.numel())


def _ref_layer(m):
    """(BitOPs of the latest forward, weight bits) of one layer, as the old code had them."""
    if isinstance(m, QKVColumnGroups):
        h = m.heads
        col = _bits(m.weight_quant, 3 * h).reshape(3, h).repeat_interleave(m.in_features // h, 1)
        ba = _bits(m.act_quant, m.in_features)
        c = m.out_features // 3
        return c * (col * ba).sum() * m.positions, col.sum() * c
    if isinstance(m, QLinear):
        ba = _bits(m.act_quant, m.in_features)
        if m.weight_dim == 0:
            bw = _bits(m.weight_quant, m.out_features)
            ops = bw.sum() * ba.sum()
            size = bw.sum() * m.in_features
        else:
            bw = _bits(m.weight_quant, m.in_features)
            ops = m.out_features * (bw * ba).sum()
            size = bw.sum() * m.out_features
        return ops * m.positions, size
    if isinstance(m, QConv2d):
        bw = _bits(m.weight_quant, m.out_channels)
        ba = _bits(m.act_quant, m.in_channels)
        kernel = m.weight[0, 0].numel() / m.groups
        return bw.sum() * ba.sum() * kernel * m.positions, \
            bw.sum() * (m.weight.numel() // m.out_channels)
    if isinstance(m, _QAttentionBase):
        b_, h, n, d = m.attn_shape
        bq, bk, bv, bp = (_bits(q, h) for q in (m.q_quant, m.k_quant, m.v_quant, m.attn_quant))
        return b_ * n * n * d * ((bq * bk).sum() + (bp * bv).sum()), None
    return None


def _ref(model, kind):
    vals = []
    for m in model.modules():
        r = _ref_layer(m)
        if r is not None:
            v = r[0] if kind == "bitops" else r[1]
            if v is not None:
                vals.append(v)
    total = torch.stack([v.reshape(()) for v in vals]).sum()
    return total / budget.batch_size(model) if kind == "bitops" else total


# ------------------------------------------------------------------- models
def _model(name, cfg, seed=0, disable_every=0):
    torch.manual_seed(seed)
    px = 32 if name.startswith("deit") else 64
    kw = dict(pretrained=False, num_classes=10, img_size=px)
    if name.startswith("swin"):
        kw.update(window_size=2, embed_dim=24, depths=(1, 1, 2, 1), num_heads=(1, 2, 3, 6))
    else:
        kw.update(depth=2)
    model = timm.create_model(name, **kw)
    qm = qvit.quantize_model(model, cfg)
    qvit.calibrate(qm, [torch.randn(2, 3, px, px)])
    g = torch.Generator().manual_seed(seed + 1)
    for i, q in enumerate(m for m in qm.modules() if isinstance(m, Quantizer)):
        lo, hi = q.bits_range
        # continuous bits that round to anywhere in the range (and a little outside)
        q.bits.data = torch.rand(q.groups, generator=g) * (hi - lo + 1.0) + lo - 0.5
        if disable_every and i % disable_every == 1:
            q.enabled = False
    qm(torch.randn(3, 3, px, px))
    return qm


def _channel_cfg():
    cfg = qvit.preset("qvit_mixed")
    return cfg.replace(weight=cfg.weight.replace(granularity="channel"))


CASES = {
    "deit-mixed": ("deit_tiny_patch16_224", lambda: qvit.preset("qvit_mixed"), 0),
    "deit-official": ("deit_tiny_patch16_224", lambda: qvit.preset("qvit_official"), 0),
    "deit-w2a2": ("deit_tiny_patch16_224", lambda: qvit.preset("uniform_w2a2"), 0),
    "deit-channel": ("deit_tiny_patch16_224", _channel_cfg, 0),
    "deit-disabled": ("deit_tiny_patch16_224", lambda: qvit.preset("qvit_mixed"), 4),
    "swin-mixed": ("swin_tiny_patch4_window7_224", lambda: qvit.preset("qvit_mixed"), 0),
    "swin-official": ("swin_tiny_patch4_window7_224", lambda: qvit.preset("qvit_official"), 3),
}


def _grads(model, value):
    for p in model.parameters():
        p.grad = None
    if value.requires_grad:
        value.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


_BUILT = {}


def _case_model(case):
    if case not in _BUILT:
        name, cfg, disable = CASES[case]
        _BUILT[case] = _model(name, cfg(), disable_every=disable)
    return _BUILT[case]


@pytest.mark.parametrize("kind", ["bitops", "size"])
@pytest.mark.parametrize("case", list(CASES))
def test_flat_matches_per_layer_reference(case, kind):
    qm = _case_model(case)
    want = _ref(qm, kind)
    g_want = _grads(qm, want)
    got = budget.bitops(qm) if kind == "bitops" else budget.model_size_bits(qm)
    g_got = _grads(qm, got)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-6)
    assert g_got.keys() == g_want.keys()
    assert all(n.endswith(".bits") for n in g_got)
    for n in g_want:
        torch.testing.assert_close(g_got[n], g_want[n], rtol=1e-6, atol=0, msg=n)
    # the per-layer path (reports, uniform budgets) evaluates the same terms
    if kind == "bitops":
        per = sum(float(v.detach()) for v in budget.layer_bitops(qm).values())
        assert per == pytest.approx(float(want.detach()), rel=1e-6)


def test_flat_is_bitwise_repeatable_and_follows_the_bits():
    qm = _model(*CASES["deit-mixed"][:1], qvit.preset("qvit_mixed"))
    a, ga = budget.bitops(qm), None
    ga = _grads(qm, a)
    b = budget.bitops(qm)
    gb = _grads(qm, b)
    assert torch.equal(a, b) and all(torch.equal(ga[n], gb[n]) for n in ga)
    # the plan reads the Parameters at call time: new bits give the reference's new value
    q = next(m for m in qm.modules() if isinstance(m, Quantizer) and m.learn_bits)
    with torch.no_grad():
        q.bits.add_(1.0)
    assert float(budget.bitops(qm).detach()) == pytest.approx(float(_ref(qm, "bitops").detach()), rel=1e-6)
    assert float(budget.bitops(qm).detach()) != float(a.detach())


def test_plan_is_rebuilt_when_shapes_or_quantizers_change():
    qm = _model("deit_tiny_patch16_224", qvit.preset("qvit_mixed"))
    plan = flat_cost(qm, "bitops", budget.batch_size(qm))
    assert flat_cost(qm, "bitops", budget.batch_size(qm)) is plan   # cached
    qm(torch.randn(1, 3, 32, 32))                                     # new batch, positions
    assert float(budget.bitops(qm).detach()) == pytest.approx(float(_ref(qm, "bitops").detach()), rel=1e-6)
    q = next(m for m in qm.modules() if isinstance(m, Quantizer))
    q.enabled = False                                                 # counts as float now
    assert float(budget.bitops(qm).detach()) == pytest.approx(float(_ref(qm, "bitops").detach()), rel=1e-6)
    assert flat_cost(qm, "bitops", budget.batch_size(qm)) is not plan


def test_frozen_bits_get_no_gradient():
    qm = _model("deit_tiny_patch16_224", qvit.preset("qvit_mixed"))
    budget.freeze_bits(qm)
    v = budget.bitops(qm)
    assert not v.requires_grad
    assert float(v) == pytest.approx(float(_ref(qm, "bitops")), rel=1e-6)


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def _budget_ops(depth):
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=10,
                              img_size=32, depth=depth)
    qm = qvit.quantize_model(model, qvit.preset("qvit_mixed"))
    qvit.calibrate(qm, [torch.randn(2, 3, 32, 32)])
    qm(torch.randn(2, 3, 32, 32))
    target = qvit.uniform_bitops(qm, 3) / 1e9
    budget.budget_loss(qm, target)                  # warm-up: builds and caches the plan
    n_bits = sum(1 for m in qm.modules() if isinstance(m, Quantizer) and m.bits.requires_grad)
    with _Count() as fwd:
        loss = budget.budget_loss(qm, target)
    with _Count() as bwd:
        loss.backward()
    return fwd.n, bwd.n, n_bits


def test_budget_ops_do_not_grow_with_depth():
    """A few ops for the whole model: the forward count is the same at depth 1 and 4,
    and the backward grows only by the one gradient accumulation per bits Parameter."""
    f1, b1, n1 = _budget_ops(1)
    f4, b4, n4 = _budget_ops(4)
    assert n4 > n1
    assert f1 == f4 and f1 <= 25
    assert b4 - b1 == n4 - n1


def test_channel_terms_pair_overlapping_groups():
    """cost.columns pairs the overlapping groups of two partitions of the channels."""
    from qvit.nn import cost
    a = Quantizer(QuantizerConfig(bits=4), groups=2)
    b = Quantizer(QuantizerConfig(bits=4), groups=3)
    with torch.no_grad():
        a.bits.copy_(torch.tensor([2.0, 5.0]))
        b.bits.copy_(torch.tensor([3.0, 4.0, 7.0]))
    terms = cost.columns(10.0, a, b, 6)

    def bits_of(q):
        return q.bits
    got = float(cost.evaluate(terms, bits_of, a.bits))
    # channels 0..5: a = 2 2 2 5 5 5, b = 3 3 4 4 7 7
    want = 10.0 * (2 * 3 + 2 * 3 + 2 * 4 + 5 * 4 + 5 * 7 + 5 * 7)
    assert got == want


def test_plan_survives_training_steps_and_follows_structure_changes():
    """One plan for a whole training run; a new layer or bits Parameter forces a new one."""
    qm = _model("deit_tiny_patch16_224", qvit.preset("qvit_mixed"))
    opt = torch.optim.SGD(qm.parameters(), lr=1e-3)
    x, y = torch.randn(3, 3, 32, 32), torch.randint(0, 10, (3,))
    target = qvit.uniform_bitops(qm, 3) / 1e9
    plans = []
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(qm(x), y) + budget.budget_loss(qm, target)
        loss.backward()
        opt.step()
        opt.zero_grad()
        plans.append(flat_cost(qm, "bitops", budget.batch_size(qm)))
    assert plans[0] is plans[1] is plans[2]
    # replace a bits Parameter: the old plan would read the stale one
    q = next(m for m in qm.modules() if isinstance(m, Quantizer) and m.learn_bits)
    q.bits = torch.nn.Parameter(q.bits.detach() + 1.0)
    assert flat_cost(qm, "bitops", budget.batch_size(qm)) is not plans[0]
    assert float(budget.bitops(qm).detach()) == pytest.approx(float(_ref(qm, "bitops").detach()), rel=1e-6)
    # a layer taken out of the model (replaced by a float one) stops counting
    qm.blocks[1].mlp.fc2 = qm.blocks[1].mlp.fc2.to_float()
    assert float(budget.bitops(qm).detach()) == pytest.approx(float(_ref(qm, "bitops").detach()), rel=1e-6)
