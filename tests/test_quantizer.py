"""Config validation and the Quantizer module (init, forward, gradients, state).

The forward is compared with the closed-form reference ``fake_quant_forward``
given the module's own tables (exact: same op numerics); the MSE initialisation
with an independent brute-force search over step sizes (tolerance: the fit's
MSE within 1 % of the best grid point).
"""
from __future__ import annotations

import pytest
import torch

from qvit.ops import reference
from qvit.nn.config import PRESETS, QuantizerConfig, QViTConfig, preset
from qvit.nn.quantizer import Quantizer, fused_fake_quant, mse_fit

pytestmark = pytest.mark.filterwarnings("ignore:qvit._C is not available")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ----------------------------------------------------------------- config
@pytest.mark.parametrize("kwargs, field", [
    (dict(bits=9), "bits"),
    (dict(bits=1.5), "bits"),
    (dict(bits=float("nan")), "bits"),
    (dict(bits_range=(3, 2)), "bits_range"),
    (dict(bits_range=(1, 8)), "bits_range"),  # signed needs >= 2
    (dict(bits_range=(2.0, 8)), "bits_range"),
    (dict(granularity="row"), "granularity"),
    (dict(learn_bits=1), "learn_bits"),
])
def test_quantizer_config_rejects(kwargs, field):
    with pytest.raises(ValueError, match=f"QuantizerConfig.{field}"):
        QuantizerConfig(**kwargs)


def test_qvit_config_rejects():
    with pytest.raises(ValueError, match="attn_probs"):
        QViTConfig(attn_probs=QuantizerConfig(signed=True))
    with pytest.raises(ValueError, match="first_last_bits"):
        QViTConfig(first_last_bits=12)
    with pytest.raises(ValueError, match="QViTConfig.weight"):
        QViTConfig(weight=4)
    with pytest.raises(ValueError, match="skip"):
        QViTConfig(skip=(1,))
    assert QViTConfig(skip="head").skip == ("head",)


def test_presets():
    assert set(PRESETS) == {"lsq_w4a4", "uniform_w3a3", "uniform_w2a2", "qvit_mixed", "qvit_official"}
    w4 = preset("lsq_w4a4")
    assert w4.weight.bits == 4 and w4.act.bits == 4 and not w4.weight.learn_bits
    assert not w4.head_wise and w4.first_last_bits == 8
    assert preset("uniform_w3a3").attn.bits == 3
    mixed = preset("qvit_mixed")
    assert mixed.head_wise and mixed.weight.learn_bits and mixed.weight.bits == 5
    assert mixed.weight.bits_range == (2, 8) and mixed.gelu.offset and not mixed.gelu.signed
    assert not mixed.attn_probs.signed
    assert preset("qvit_mixed", head_wise=False).head_wise is False
    with pytest.raises(ValueError, match="preset name"):
        preset("w4")
    with pytest.raises(ValueError, match="not fields"):
        preset("lsq_w4a4", wbits=3)


# ---------------------------------------------------------------- mse fit
def _mse(x, s, beta, qn, qp):
    q = torch.round(torch.clamp((x - beta) / s, qn, qp))
    return float((q * s + beta - x).double().pow(2).mean())


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_mse_fit_signed_matches_brute_force(bits):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(1, 20000, generator=g)
    s, _ = mse_fit(x, bits, signed=True, offset=False)
    qn, qp = -2 ** (bits - 1), 2 ** (bits - 1) - 1
    grid = torch.linspace(0.2, 1.2, 2001) * float(x.abs().max()) / qp
    best = min(_mse(x, float(a), 0.0, qn, qp) for a in grid)
    assert _mse(x, float(s), 0.0, qn, qp) <= best * 1.01


def test_mse_fit_gaussian_table_shape():
    # docs/design.md section 2.6: the MSE step size on N(0,1) roughly halves per extra bit
    x = torch.randn(1, 50000, generator=torch.Generator().manual_seed(0))
    scales = [float(mse_fit(x, b, True, False)[0]) for b in range(2, 9)]
    assert scales[0] == pytest.approx(1.05, rel=0.05)
    assert scales[2] == pytest.approx(0.34, rel=0.06)
    for a, b in zip(scales, scales[1:]):
        assert 0.4 < b / a < 0.7


def test_mse_fit_offset_beats_min_anchor():
    x = torch.nn.functional.gelu(torch.randn(1, 20000, generator=torch.Generator().manual_seed(1)))
    s, beta = mse_fit(x, 3, signed=False, offset=True)
    qp = 7
    lo = float(x.min())
    grid = torch.linspace(0.05, 1.0, 400) * (float(x.max()) - lo) / qp
    best_anchor = min(_mse(x, float(a), lo, 0, qp) for a in grid)
    assert _mse(x, float(s), float(beta), 0, qp) <= best_anchor * 1.001


def test_mse_fit_constant_rows():
    s, beta = mse_fit(torch.zeros(2, 10), 4, True, False)
    assert torch.equal(s, torch.ones(2))


# ---------------------------------------------------------------- module
def test_forward_matches_reference_and_lazy_init():
    q = Quantizer(QuantizerConfig(bits=4))
    x = torch.randn(64, 32)
    assert not bool(q.initialized)
    y = q(x)
    assert bool(q.initialized)
    ref = reference.fake_quant_forward(x, q.scale.detach(), q.bits.detach(), None, signed=True)
    torch.testing.assert_close(y, ref, atol=0, rtol=0)
    assert len(torch.unique(y)) <= 16


def test_every_table_entry_fitted_for_its_bits():
    q = Quantizer(QuantizerConfig(bits=4))
    x = torch.randn(4096)
    q.init_from(x)
    for j, b in enumerate(range(2, 9)):
        s, _ = mse_fit(q._grouped(x), b, True, False)
        assert float(q.scale.detach()[0, j]) == pytest.approx(float(s), rel=1e-6)
    assert bool((q.scale[0, 1:] < q.scale[0, :-1]).all())


def test_channel_groups_fit_per_row():
    cfg = QuantizerConfig(bits=4, granularity="channel")
    q = Quantizer(cfg, groups=4, dim=0, role="weight")
    w = torch.randn(4, 4096, generator=torch.Generator().manual_seed(0)) * torch.tensor([[1.0], [10.0], [0.1], [3.0]])
    q.init_from(w)
    for r in range(4):  # each row's table is that row's own fit
        s, _ = mse_fit(w[r:r + 1], 4, True, False)
        assert float(q.scale.detach()[r, 2]) == pytest.approx(float(s), rel=1e-6)
    ratio = q.scale.detach()[:, 2] / q.scale.detach()[0, 2]
    torch.testing.assert_close(ratio, torch.tensor([1.0, 10.0, 0.1, 3.0]), rtol=0.1, atol=0)
    shared = Quantizer(cfg.replace(shared_scale=True), groups=4, dim=0)
    shared.init_from(w)
    assert shared.scale.shape == (1, 7)


def test_disabled_is_identity():
    q = Quantizer(QuantizerConfig(bits=2, enabled=False))
    x = torch.randn(10)
    assert q(x) is x
    assert not bool(q.initialized)


def test_gradients_active_entries_only():
    cfg = QuantizerConfig(bits=3.4, learn_bits=True, signed=False, offset=True)
    q = Quantizer(cfg)
    x = torch.nn.functional.gelu(torch.randn(512, 16) * 2).requires_grad_()
    q.init_from(x)
    with torch.no_grad():  # make the range clip so the bit-width gradient is non-zero
        q.scale.mul_(0.5)
    y = q(x)
    (y * torch.randn_like(y)).sum().backward()
    active = 3 - 2
    for t in (q.scale.grad, q.offset.grad):
        assert torch.isfinite(t).all()
        assert t[0, active] != 0
        assert torch.count_nonzero(t) == 1
    assert torch.isfinite(q.bits.grad).all() and q.bits.grad.abs().sum() > 0
    assert torch.isfinite(x.grad).all()


def test_fixed_bits_get_no_gradient():
    q = Quantizer(QuantizerConfig(bits=4))
    q(torch.randn(8, 8, requires_grad=True)).sum().backward()
    assert q.bits.grad is None and not q.bits.requires_grad


def test_clamp_bits_and_scale_floor():
    q = Quantizer(QuantizerConfig(bits=4, learn_bits=True), groups=3, dim=0)
    q.init_from(torch.randn(3, 100))
    with torch.no_grad():
        q.bits.copy_(torch.tensor([1.0, 5.2, 11.0]))
        q.scale[1, 3] = -1.0
    q.clamp_bits_()
    assert q.bits.tolist() == pytest.approx([2.0, 5.2, 8.0])
    assert float(q.scale.detach()[1, 3]) > 0
    assert q.rounded_bits().tolist() == [2.0, 5.0, 8.0]


def test_set_bits_validates():
    q = Quantizer(QuantizerConfig(bits=4), groups=2, dim=0)
    q.set_bits_([3, 5])
    assert q.rounded_bits().tolist() == [3.0, 5.0]
    with pytest.raises(ValueError, match="outside"):
        q.set_bits_(9)
    with pytest.raises(ValueError, match="values"):
        q.set_bits_([3, 4, 5])


def test_init_from_rejects_bad_input():
    q = Quantizer(QuantizerConfig())
    with pytest.raises(ValueError, match="empty"):
        q.init_from(torch.empty(0))
    with pytest.raises(ValueError, match="non-finite"):
        q.init_from(torch.tensor([1.0, float("inf")]))
    with pytest.raises(ValueError, match="divisible"):
        Quantizer(QuantizerConfig(), groups=3, dim=0).init_from(torch.randn(4, 2))
    with pytest.raises(TypeError, match="config"):
        Quantizer({"bits": 4})
    with pytest.raises(ValueError, match="groups"):
        Quantizer(QuantizerConfig(), groups=0)


def test_extra_repr_shows_group_bits():
    q = Quantizer(QuantizerConfig(bits=5, learn_bits=True, granularity="head"), groups=3, dim=1)
    q.set_bits_([5, 2.6, 8])
    text = repr(q)
    assert "bits=[5, 3, 8]" in text and "learned" in text and "signed" in text and "head" in text
    assert "bits=4" in repr(Quantizer(QuantizerConfig(bits=4)))


def test_state_dict_round_trip():
    cfg = QuantizerConfig(bits=5, learn_bits=True, signed=False, offset=True, granularity="head")
    a = Quantizer(cfg, groups=2, dim=1)
    x = torch.rand(16, 2, 32)
    a.init_from(x)
    a.set_bits_([3, 6])
    b = Quantizer(cfg, groups=2, dim=1)
    b.load_state_dict(a.state_dict())
    assert bool(b.initialized)
    torch.testing.assert_close(b(x), a(x), atol=0, rtol=0)
    assert set(a.state_dict()) == {"bits", "scale", "offset", "initialized", "scale_floor"}


def test_observe_then_fit_pools_batches():
    q = Quantizer(QuantizerConfig(bits=4))
    q.start_observing()
    small, large = torch.randn(1000) * 0.1, torch.randn(1000) * 10
    assert q(small) is small and q(large) is large
    assert q.finish_observing()
    pooled = Quantizer(QuantizerConfig(bits=4)).init_from(torch.cat([small, large]))
    torch.testing.assert_close(q.scale, pooled.scale)


def test_fused_equals_separate():
    """One fused op over three quantizers equals the three quantizers run one by one:
    the output and every gradient (x, bits, scale table)."""
    torch.manual_seed(0)
    cfg = QuantizerConfig(bits=4, learn_bits=True, granularity="head")
    qs = [Quantizer(cfg, groups=2, dim=1) for _ in range(3)]
    x = torch.randn(10, 6, 4)
    for i, q in enumerate(qs):
        q.init_from(x[:, 2 * i:2 * i + 2])
        q.set_bits_([3 + i, 5])
    u = torch.randn(10, 6, 4)

    def run(f):
        xg = x.clone().requires_grad_(True)
        for q in qs:
            q.zero_grad(set_to_none=True)
        y = f(xg)
        (y * u).sum().backward()
        grads = [(q.bits.grad.clone(), q.scale.grad.clone()) for q in qs]
        return y.detach(), xg.grad, grads

    fused, fgx, fgp = run(lambda t: fused_fake_quant(t, qs, dim=1))
    sep, sgx, sgp = run(lambda t: torch.cat([q(t[:, 2 * i:2 * i + 2]) for i, q in enumerate(qs)],
                                            dim=1))
    torch.testing.assert_close(fused, sep, atol=0, rtol=0)
    torch.testing.assert_close(fgx, sgx, atol=0, rtol=0)
    for i, ((fb, fs), (sb, ss)) in enumerate(zip(fgp, sgp)):
        assert fb.abs().sum() > 0 and fs.abs().sum() > 0, i  # the gradients are not vacuous
        # parameter sums: same terms, possibly another partial-sum order (fp32)
        torch.testing.assert_close(fb, sb, rtol=1e-5, atol=1e-6, msg=f"bits grad {i}")
        torch.testing.assert_close(fs, ss, rtol=1e-5, atol=1e-6, msg=f"scale grad {i}")
    qs[1].enabled = False
    part = fused_fake_quant(x, qs, dim=1)
    torch.testing.assert_close(part[:, 2:4], x[:, 2:4], atol=0, rtol=0)
    torch.testing.assert_close(part[:, :2], sep[:, :2], atol=0, rtol=0)
