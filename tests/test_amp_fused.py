"""The fused quantize-then-matmul layers under autocast (bf16 on the CPU).

The fused autograd functions keep the float operands and recompute the
quantized ones in the backward; under autocast that backward must run the
matmuls in the forward's lower precision and hand the quantizers gradients in
their own dtype, as the unfused graph (quantizer node, autocast cast, matmul
node) does. Compared here against that unfused graph on the same kernels.
"""
import pytest
import torch
import torch.nn.functional as F

timm = pytest.importorskip("timm")

import qvit  # noqa: E402
from qvit.nn import quantizer  # noqa: E402
from qvit.ops import torch_ops  # noqa: E402

pytestmark = pytest.mark.timm


def _unfused(*args, **kw):
    # the same kernel op, but not `is ops.fake_quant`: the layers take the unfused path
    return torch_ops.fake_quant(*args, **kw)


def _step(qm, x, y, backend, monkeypatch):
    monkeypatch.setattr(quantizer, "_BACKEND", backend)
    qm.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(qm(x), y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in qm.named_parameters()
                           if p.grad is not None}


@pytest.mark.parametrize("name,kw", [
    ("deit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=1)),
    ("swin_tiny_patch4_window7_224", dict(img_size=32, patch_size=2, window_size=4,
                                          embed_dim=24, depths=(1, 1), num_heads=(1, 2))),
])
def test_fused_layers_match_unfused_under_bf16_autocast(name, kw, monkeypatch):
    torch.manual_seed(0)
    qm = qvit.quantize_model(timm.create_model(name, num_classes=5, drop_path_rate=0.0, **kw),
                             qvit.preset("qvit_mixed"))
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))
    qvit.calibrate(qm, [x])
    assert quantizer.fused_ok()
    l_f, g_f = _step(qm, x, y, torch_ops.fake_quant, monkeypatch)
    l_u, g_u = _step(qm, x, y, _unfused, monkeypatch)
    assert torch.equal(l_f, l_u)
    assert g_f.keys() == g_u.keys() and len(g_f) > 10
    for n in g_f:
        assert g_f[n].dtype == g_u[n].dtype == torch.float32, n
        # bf16 matmuls: the two graphs may order a reduction differently
        tol = 2e-2 * g_u[n].abs().max().item() + 1e-6
        assert torch.allclose(g_f[n], g_u[n], rtol=2e-2, atol=tol), n
