"""The reference against hand-computed numbers and against itself.

``qvit.reference`` has two independent forms: the autograd composite
``fake_quant`` and the closed forms ``fake_quant_forward/backward``. Both are
checked against numbers written out by hand, against each other, and the
composite against finite differences (float64 ``gradcheck``).
"""
import math

import pytest
import torch

from helpers import LAYOUTS, decode, make_params, surrogate_gradcheck, tie_free_input
from qvit.ops import reference

LN2 = math.log(2.0)
K = 7  # bits_range (2, 8)


def _table(col_values, rows=1):
    """A [rows, 7] table filled with 1.0 except the given {col: value} entries."""
    t = torch.ones(rows, K)
    for (r, c), v in col_values.items():
        t[r, c] = v
    return t


def _both(x, scale, bits, offset, gy, **kw):
    """(y, gx, gs, gb, go) from the closed forms and from autograd of the composite."""
    fwd_kw = {k: v for k, v in kw.items() if k != "grad_scale"}
    closed = (reference.fake_quant_forward(x, scale, bits, offset, **fwd_kw),
              *reference.fake_quant_backward(gy, x, scale, bits, offset, **kw))
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, scale, bits, offset)]
    y = reference.fake_quant(*leaves, **kw)
    y.backward(gy)
    auto = (y.detach(), *[t.grad if t is not None else None for t in leaves])
    return closed, auto


# --- hand-computed cases --------------------------------------------------------------

def test_hand_signed_per_tensor():
    # bits 4 -> column 2 (bits_min 2), s = 0.5, Qn = -8, Qp = 7.
    scale = _table({(0, 2): 0.5})
    bits = torch.tensor([4.0])
    x = torch.tensor([1.3, -0.2, 4.0, -5.0, 0.75])
    gy = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    # v = [2.6, -0.4, 8 (> Qp), -10 (< Qn), 1.5 (tie -> 2)]
    y_want = torch.tensor([1.5, 0.0, 3.5, -4.0, 1.0])
    gx_want = torch.tensor([1.0, 2.0, 0.0, 0.0, 5.0])
    # sum u*(round(v)-v) inside + u*Qp above + u*Qn below
    #   = 1*0.4 + 2*0.4 + 5*0.5 + 3*7 + 4*(-8) = -7.3, LSQ factor 1/sqrt(N*Qp) = 1/sqrt(35)
    gs_want = torch.zeros(1, K)
    gs_want[0, 2] = -7.3 / math.sqrt(35.0)
    # s ln2 2^(b-1) (sum_H u - sum_L u) = 0.5 ln2 8 (3 - 4)
    gb_want = torch.tensor([-4.0 * LN2])
    for form in _both(x, scale, bits, None, gy):
        y, gx, gs, gb, go = form
        torch.testing.assert_close(y, y_want, rtol=0, atol=0)
        torch.testing.assert_close(gx, gx_want, rtol=0, atol=0)
        torch.testing.assert_close(gs, gs_want, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(gb, gb_want, rtol=1e-6, atol=1e-7)
        assert go is None


def test_hand_signed_grad_scale_override():
    scale = _table({(0, 2): 0.5})
    bits = torch.tensor([4.0])
    x = torch.tensor([1.3, -0.2, 4.0, -5.0, 0.75])
    gy = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    for form in _both(x, scale, bits, None, gy, grad_scale=1.0):
        torch.testing.assert_close(form[2][0, 2], torch.tensor(-7.3), rtol=1e-6, atol=1e-6)
    for form in _both(x, scale, bits, None, gy, grad_scale=0.0):
        assert float(form[2].abs().sum()) == 0.0


def test_hand_unsigned_offset():
    # bits 2.6 -> 3 -> column 1; s = 0.25, beta = -0.5, Qn = 0, Qp = 7.
    scale = _table({(0, 1): 0.25})
    offset = torch.zeros(1, K)
    offset[0, 1] = -0.5
    bits = torch.tensor([2.6])
    x = torch.tensor([0.0, 1.4, -0.8, 2.0, 0.3])
    gy = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    # v = (x + 0.5) / 0.25 = [2, 7.6 (H), -1.2 (L), 10 (H), 3.2]
    y_want = torch.tensor([0.0, 1.25, -0.5, 1.25, 0.25])
    gx_want = torch.tensor([1.0, 0.0, 0.0, 0.0, 5.0])
    gs_want = torch.zeros(1, K)
    gs_want[0, 1] = (0.0 + 5 * (3 - 3.2) + 2 * 7 + 4 * 7 + 3 * 0) / math.sqrt(35.0)  # 41/sqrt(35)
    gb_want = torch.tensor([0.25 * LN2 * 8 * (2 + 4)])  # s ln2 2^b sum_H u
    go_want = torch.zeros(1, K)
    go_want[0, 1] = 2 + 3 + 4  # sum of u outside the range
    for form in _both(x, scale, bits, offset, gy, signed=False):
        y, gx, gs, gb, go = form
        torch.testing.assert_close(y, y_want, rtol=0, atol=0)
        torch.testing.assert_close(gx, gx_want, rtol=0, atol=0)
        torch.testing.assert_close(gs, gs_want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(gb, gb_want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(go, go_want, rtol=0, atol=1e-6)


def test_hand_per_group_tables():
    # [2, 2] per-channel (dim -1, G = 2), one table row per group.
    # group 0: bits 2 -> col 0, s = 1,  Qn = -2, Qp = 1
    # group 1: bits 3 -> col 1, s = .5, Qn = -4, Qp = 3
    scale = torch.ones(2, K)
    scale[1, 1] = 0.5
    bits = torch.tensor([2.0, 3.0])
    x = torch.tensor([[1.2, 1.2], [-3.0, -3.0]])
    gy = torch.ones(2, 2)
    # group 0: v = [1.2 (H), -3 (L)];  group 1: v = [2.4 -> 2, -6 (L)]
    y_want = torch.tensor([[1.0, 1.0], [-2.0, -2.0]])
    gx_want = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    gs_want = torch.zeros(2, K)
    gs_want[0, 0] = (1 * 1 + 1 * -2) / math.sqrt(2 * 1)
    gs_want[1, 1] = ((2 - 2.4) + -4) / math.sqrt(2 * 3)
    gb_want = torch.tensor([1.0 * LN2 * 2 * (1 - 1), 0.5 * LN2 * 4 * (0 - 1)])
    for form in _both(x, scale, bits, None, gy, dim=-1):
        y, gx, gs, gb, _ = form
        torch.testing.assert_close(y, y_want, rtol=0, atol=0)
        torch.testing.assert_close(gx, gx_want, rtol=0, atol=0)
        torch.testing.assert_close(gs, gs_want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(gb, gb_want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bits,col", [(1.2, 0), (2.5, 0), (3.5, 2), (4.49, 2), (4.5, 2),
                                      (4.51, 3), (5.5, 4), (8.4, 6), (9.7, 6)])
def test_bits_round_half_even_and_clamp(bits, col):
    scale = torch.ones(1, K)
    scale[0, col] = 0.125  # only the expected column gives a different y
    x = torch.tensor([0.1])
    y = reference.fake_quant_forward(x, scale, torch.tensor([bits]))
    assert float(y) == 0.125  # s = 0.125: v = 0.8 -> code 1; any other column: v = 0.1 -> 0


def test_group_shape_layouts():
    assert reference.group_shape((3, 7, 5), 0, 1) == (1, 1, 105)
    assert reference.group_shape((11, 6), -1, 6) == (11, 6, 1)
    assert reference.group_shape((2, 3, 5, 4), 1, 3) == (2, 3, 20)
    assert reference.group_shape((12, 5), 0, 3) == (1, 3, 20)
    assert reference.group_shape((5, 12), 1, 3) == (5, 3, 4)
    with pytest.raises(ValueError, match="not divisible"):
        reference.group_shape((5, 12), 1, 5)


# --- the two forms agree, and the composite against finite differences ----------------

CASES = [(lay, signed, off, rows)
         for lay in LAYOUTS for signed in (True, False) for off in (False, True)
         for rows in ("one", "per_group")]


@pytest.mark.parametrize("layout,signed,with_offset,rows", CASES)
def test_closed_form_matches_autograd_of_composite(layout, signed, with_offset, rows):
    shape, dim, g = LAYOUTS[layout]
    br = (2, 8) if signed else (1, 8)
    scale, bits, offset = make_params(g, scale_rows=1 if rows == "one" else g, bits_range=br,
                                      offset=with_offset, dtype=torch.float64, seed=g)
    x = tie_free_input(shape, dim, scale, bits, offset, signed=signed, bits_range=br,
                       dtype=torch.float64, seed=1)
    gy = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    closed, auto = _both(x, scale, bits, offset, gy, signed=signed, dim=dim, bits_range=br)
    for name, c, a in zip(("y", "grad_x", "grad_scale", "grad_bits", "grad_offset"), closed, auto):
        if c is None:
            assert a is None, name
            continue
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("signed", [True, False])
def test_gradcheck_composite(layout, signed):
    """float64 gradcheck of the composite's x / scale / offset gradients
    against the frozen-residual surrogate (see ``helpers.surrogate_gradcheck``;
    the default LSQ factor is covered by the closed-form comparison above)."""
    assert surrogate_gradcheck(reference.fake_quant, layout, signed)


@pytest.mark.parametrize("signed", [True, False])
def test_bits_gradient_closed_form(signed):
    # Independent of the reference: sum over clipped elements of u * s * dQ/db^.
    shape, dim, g = LAYOUTS["per_head_act"]
    scale, bits, _ = make_params(g, scale_rows=g, dtype=torch.float64, seed=5)
    x = tie_free_input(shape, dim, scale, bits, None, signed=signed, dtype=torch.float64, seed=6)
    gy = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    b = bits.clone().requires_grad_()
    reference.fake_quant(x, scale, b, signed=signed, dim=dim).backward(gy)
    s, _, qn, qp = decode(scale, bits, None, signed, (2, 8))
    v = x.reshape(2, g, -1) / s.view(1, g, 1)
    u = gy.reshape(2, g, -1)
    want = []
    for i in range(g):
        bh = round(min(max(float(bits[i]), 2), 8))
        hi = (u[:, i][v[:, i] > qp[i]]).sum()
        lo = (u[:, i][v[:, i] < qn[i]]).sum()
        if signed:
            want.append(float(s[i]) * LN2 * 2 ** (bh - 1) * float(hi - lo))
        else:
            want.append(float(s[i]) * LN2 * 2 ** bh * float(hi))
    torch.testing.assert_close(b.grad, torch.tensor(want, dtype=torch.float64), rtol=1e-10, atol=1e-12)
    want_t = torch.tensor(want, dtype=torch.float64)
    assert float(want_t.abs().sum()) > 0  # the input does clip


def test_nan_stays_in_its_element_and_group():
    scale = torch.ones(2, K)
    bits = torch.tensor([4.0, 4.0])
    x = torch.tensor([[0.3, float("nan")], [1.2, 2.7]])
    gy = torch.ones(2, 2)
    y = reference.fake_quant_forward(x, scale, bits, dim=-1)
    gx, gs, gb, _ = reference.fake_quant_backward(gy, x, scale, bits, dim=-1)
    assert torch.isnan(y[0, 1]) and not torch.isnan(y[[0, 1, 1], [0, 0, 1]]).any()
    assert torch.isnan(gx[0, 1]) and not torch.isnan(gx[[0, 1, 1], [0, 0, 1]]).any()
    assert torch.isnan(gs[1, 2]) and not torch.isnan(gs[0]).any()
    assert not torch.isnan(gb).any()
