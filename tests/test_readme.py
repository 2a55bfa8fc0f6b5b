"""The README's Python API example runs as written and trains the bit-widths."""
from __future__ import annotations

import os
import re

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.timm


def _section_code(title: str) -> str:
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, f"no python block under '## {title}'"
    return blocks[0]


def test_api_example_runs_and_moves_the_bits(tmp_path, monkeypatch, capsys):
    code = _section_code("Quantizing a timm model")
    assert "qvit.param_groups(" in code  # the documented helper, after quantize_model
    assert code.index("quantize_model(") < code.index("param_groups(")
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    model = ns["model"]
    bits = [p for n, p in model.named_parameters() if n.endswith(".bits") and p.requires_grad]
    moved = [p for p in bits if not bool((p.detach() == 5.0).all()) and not
             bool((p.detach() == 8.0).all())]
    assert bits and len(moved) >= 0.75 * len(bits)
    assert "GBitOPs" in capsys.readouterr().out
    import qvit

    loaded = qvit.export.load_exported(str(tmp_path / "model.safetensors"))
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
