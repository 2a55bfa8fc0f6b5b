"""The lean QAT step: fused quantize-then-matmul layers against the composite path.

The fused functions (qvit.nn.functional) must give the losses and the
gradients of every parameter (weights, biases, scales, bits, offsets) that the
layer-by-layer composite gives: fake_quant nodes followed by float matmuls.
Two references: the composite on the kernels (same op, different autograd
graph: only the matmul backward's summation order may differ) and the
composite on the pure-PyTorch reference op (qvit.ops.reference).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

timm = pytest.importorskip("timm")

from qvit.models.convert import calibrate, quantize_model  # noqa: E402
from qvit.nn import quantizer  # noqa: E402
from qvit.nn.attention import QKVColumnGroups  # noqa: E402
from qvit.nn.config import preset  # noqa: E402
from qvit.ops import reference, torch_ops as ops  # noqa: E402
from test_models import MODELS, make, shared_channel, uniform  # noqa: E402

pytestmark = [pytest.mark.timm, pytest.mark.skipif(ops._C is None, reason="qvit._C not built")]

CONFIGS = {"qvit_mixed": lambda: preset("qvit_mixed"), "shared_channel": shared_channel,
           "uniform4": lambda: uniform(4), "qvit_official": lambda: preset("qvit_official")}


def _composite_on_kernels(*a, **k):
    # a backend that is not ops.fake_quant itself: layers take the composite path
    return ops.fake_quant(*a, **k)


def _step(model, x, target, backend):
    saved = quantizer._BACKEND
    quantizer._BACKEND = backend
    try:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)   # timm's Swin trains with drop-path: the same masks each run
        out = model(x)
        out = out[0] + out[1] if isinstance(out, tuple) else out
        loss = F.cross_entropy(out, target)
        loss.backward()
    finally:
        quantizer._BACKEND = saved
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                           if p.grad is not None}


def _models(key, cfg):
    model, x = make(key)
    quantize_model(model, CONFIGS[cfg]())
    calibrate(model, [(x, None)])
    model.train()
    return model, x, torch.tensor([1, 7])


@pytest.mark.parametrize("key, cfg", [("deit", "qvit_mixed"), ("deit_distilled", "uniform4"),
                                      ("swin", "qvit_mixed"), ("swin", "shared_channel"),
                                      ("vit_qknorm", "qvit_mixed"), ("deit", "qvit_official")])
def test_fused_step_matches_composite_and_reference(key, cfg):
    model, x, target = _models(key, cfg)
    fused = _step(model, x, target, ops.fake_quant)
    again = _step(model, x, target, ops.fake_quant)
    composite = _step(model, x, target, _composite_on_kernels)
    ref = _step(model, x, target, reference.fake_quant)
    # bitwise repeatable
    assert torch.equal(fused[0], again[0])
    for name, g in fused[1].items():
        assert torch.equal(g, again[1][name]), name
    assert set(fused[1]) == set(composite[1]) == set(ref[1])
    torch.testing.assert_close(fused[0], composite[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fused[0], ref[0], rtol=1e-5, atol=1e-5)
    for name, g in fused[1].items():
        # relative to the gradient's own scale: summation order only
        tol = 1e-4 * float(composite[1][name].abs().max()) + 1e-7
        torch.testing.assert_close(g, composite[1][name], rtol=1e-4, atol=tol, msg=name)
        tol = 1e-3 * float(ref[1][name].abs().max()) + 1e-6
        torch.testing.assert_close(g, ref[1][name], rtol=1e-3, atol=tol, msg=name)


def _saved_bytes(model, x, target, backend):
    """Bytes the forward keeps for the backward (every saved tensor, parameters included)."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t
    saved = quantizer._BACKEND
    quantizer._BACKEND = backend
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            F.cross_entropy(model(x), target)
    finally:
        quantizer._BACKEND = saved
    return total[0]


@pytest.mark.parametrize("cfg", ["qvit_mixed", "qvit_official"])
def test_fused_paths_are_taken_and_keep_one_copy(cfg):
    """The fused step saves fewer bytes for the backward than the composite one."""
    model, x, target = _models("deit", cfg)
    fused = _saved_bytes(model, x, target, ops.fake_quant)
    assert fused < 0.8 * _saved_bytes(model, x, target, _composite_on_kernels)


def test_column_groups_qkv_keeps_only_x_and_weight():
    """qvit_official's qkv linear (weights grouped by input columns, quantized in a
    permuted copy) runs as one fused node that keeps its float input and the weight
    Parameter and no other tensor beyond the quantizer tables; the composite path
    keeps more (the quantized input, the grouped and the quantized weight)."""
    model, x, target = _models("deit", "qvit_official")
    qkvs = [m for m in model.modules() if isinstance(m, QKVColumnGroups)]
    assert len(qkvs) == 2
    lin = qkvs[0]
    assert lin.weight_quant.ready() and lin.act_quant.ready()
    xin = torch.randn(2, 5, lin.in_features, requires_grad=True)

    def kept(backend):
        big = []

        def pack(t):
            if t.numel() >= min(xin.numel(), lin.weight.numel()):
                big.append(t)
            return t
        saved = quantizer._BACKEND
        quantizer._BACKEND = backend
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                y = lin(xin)
        finally:
            quantizer._BACKEND = saved
        return y, big

    y, big = kept(ops.fake_quant)
    assert type(y.grad_fn).__name__ == "_QLinearBackward"
    assert sorted(t.data_ptr() for t in big) == sorted([xin.data_ptr(), lin.weight.data_ptr()])
    y_c, big_c = kept(_composite_on_kernels)
    assert type(y_c.grad_fn).__name__ != "_QLinearBackward"
    assert len(big_c) >= 4   # x, fq(x), the grouped weight, fq(W) in its layout
    torch.testing.assert_close(y, y_c, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend, cfg", [
    ("aot_eager", "qvit_mixed"), ("aot_eager", "qvit_official"),
    pytest.param("inductor", "qvit_mixed", marks=pytest.mark.slow),
    pytest.param("inductor", "qvit_official", marks=pytest.mark.slow)])
def test_compiled_training_step_matches_eager(backend, cfg):
    """torch.compile(dynamic=True) of a step with backward inside (the fused
    functions' backward traced by AOTAutograd) gives eager's loss and gradients."""
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=10,
                              img_size=32, depth=1)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([1, 7])
    quantize_model(model, preset(cfg))
    calibrate(model, [x])
    model.train()
    twin = copy.deepcopy(model)

    def step(m):
        loss = F.cross_entropy(m(x), target)
        loss.backward()
        return loss.detach()

    torch._dynamo.reset()
    compiled = torch.compile(step, backend=backend, dynamic=True)
    got = compiled(model)
    want = step(twin)
    # inductor generates its own code for the float ops around the quantizers
    tol = dict(rtol=1e-5, atol=1e-6) if backend == "aot_eager" else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got, want, **tol)
    grads = dict(twin.named_parameters())
    n = 0
    for name, p in model.named_parameters():
        g = grads[name].grad
        if g is None:
            assert p.grad is None, name
            continue
        scale = float(g.abs().max()) + 1e-12
        torch.testing.assert_close(p.grad, g, rtol=tol["rtol"] * 10, atol=tol["atol"] * 10 * scale,
                                   msg=name)
        n += name.endswith(("bits", "scale", "offset"))
    assert n > 20   # scales, bits and offsets of every quantizer were compared
