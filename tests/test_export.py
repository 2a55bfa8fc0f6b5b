"""Export to safetensors (integer codes) and the loader that rebuilds the model."""
from __future__ import annotations

import json

import pytest
import torch

from qvit.models.export import (CODES_SUFFIX, ExportError, decode_codes, export, load_exported,
                         read_config, weight_codes)

pytestmark = pytest.mark.timm

INFO = {"name": "deit_tiny_patch16_224",
        "kwargs": {"img_size": 8, "patch_size": 4, "embed_dim": 24, "depth": 2,
                   "num_heads": 3, "num_classes": 5}}


def _model(preset_name: str, seed: int = 0, perturb_bits: bool = False):
    from qvit.models.convert import calibrate, quantizers
    from qvit.models.recipe import apply_quant, create_model

    torch.manual_seed(seed)
    m = create_model(INFO["name"], dict(INFO["kwargs"]))
    spec = {"preset": preset_name, "overrides": {}}
    apply_quant(m, spec)
    g = torch.Generator().manual_seed(seed)
    calibrate(m, [torch.randn(8, 3, 8, 8, generator=g)])
    if perturb_bits:  # learned, mixed per-head bits as after Q-ViT training
        with torch.no_grad():
            for _, q in quantizers(m):
                if q.learn_bits:
                    lo, hi = q.bits_range
                    q.bits.copy_(torch.randint(lo, hi + 1, q.bits.shape, generator=g).float()
                                 + 0.3 * torch.rand(q.bits.shape, generator=g) - 0.15)
    m.eval()
    return m, spec


@pytest.mark.parametrize("preset_name, perturb", [("uniform_w3a3", False),
                                                  ("qvit_mixed", True),
                                                  ("qvit_official", True)])
def test_export_load_reproduces_outputs(tmp_path, preset_name, perturb):
    m, spec = _model(preset_name, perturb_bits=perturb)
    x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = m(x)
    path = str(tmp_path / "m.safetensors")
    export(m, path, model_info=INFO, quant=spec)
    loaded = load_exported(path)
    with torch.no_grad():
        y2 = loaded(x)
    assert torch.equal(y, y2)
    assert read_config(path) == {"model_info": INFO, "quant": spec}


def test_codes_are_integers_in_range_and_decode_to_fake_quant():
    m, _ = _model("qvit_mixed", perturb_bits=True)
    seen = 0
    for name, mod in m.named_modules():
        q = getattr(mod, "weight_quant", None)
        if q is None:
            continue
        codes = weight_codes(mod, q)
        assert codes.dtype == torch.int8 and codes.shape == mod.weight.shape
        # per group: codes inside [Qn, Qp] of that group's rounded bit-width
        from qvit.ops.reference import group_shape
        outer, g, inner = group_shape(tuple(codes.shape), q.dim, q.groups)
        cv = codes.reshape(outer, g, inner).float()
        b = q.rounded_bits()
        qn = -(2 ** (b - 1)) if q.signed else torch.zeros_like(b)
        qp = 2 ** (b - 1) - 1 if q.signed else 2 ** b - 1
        assert bool((cv.amin(dim=(0, 2)) >= qn).all()) and bool((cv.amax(dim=(0, 2)) <= qp).all())
        # the decoded weight is the fake-quantized weight (same grid point)
        with torch.no_grad():
            fq = q.quantize(mod.weight.float())
        torch.testing.assert_close(decode_codes(codes, q), fq, rtol=0, atol=1e-6 * float(fq.abs().max()))
        seen += 1
    assert seen >= 2 * 4 + 2  # qkv, proj, fc1, fc2 per block + patch embed + head


def test_file_holds_codes_not_float_weights(tmp_path):
    from safetensors import safe_open

    m, spec = _model("uniform_w3a3")
    path = str(tmp_path / "m.safetensors")
    export(m, path, model_info=INFO, quant=spec)
    with safe_open(path, framework="pt") as f:
        keys = set(f.keys())
        assert "blocks.0.attn.qkv.weight" not in keys
        assert "blocks.0.attn.qkv.weight" + CODES_SUFFIX in keys
        assert f.get_tensor("blocks.0.attn.qkv.weight" + CODES_SUFFIX).dtype == torch.int8
        assert "blocks.0.attn.qkv.bias" in keys  # float, not quantized
        assert any(k.endswith(".bits") for k in keys) and any(k.endswith(".scale") for k in keys)
        assert json.loads(f.metadata()["config"])["quant"] == spec


def test_load_rejects_bad_files(tmp_path):
    p = tmp_path / "junk.safetensors"
    p.write_bytes(b"\x00" * 64)
    with pytest.raises(ExportError, match="not a readable safetensors"):
        load_exported(str(p))
    from safetensors.torch import save_file
    q = tmp_path / "plain.safetensors"
    save_file({"a": torch.zeros(2)}, str(q))
    with pytest.raises(ExportError, match="not a qvit export"):
        load_exported(str(q))


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_get_the_usual_permissions(tmp_path, umask):
    """Exports and checkpoints are 0o666 & ~umask like any new file (mkstemp alone: 0o600)."""
    import os
    import stat

    from qvit.models import checkpoint as ckpt_io

    m, spec = _model("uniform_w3a3")
    old = os.umask(umask)
    try:
        path = tmp_path / "m.safetensors"
        export(m, str(path), model_info=INFO, quant=spec)
        ck = tmp_path / "c.pth"
        ckpt_io.save({"state_dict": m.state_dict()}, str(ck))
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    assert stat.S_IMODE(path.stat().st_mode) == want
    assert stat.S_IMODE(ck.stat().st_mode) == want
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]
