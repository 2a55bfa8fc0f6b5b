"""`qvit train` applies the BitOPs budget: a Q-ViT run through the CLI and the training loop
(not a hand-written loop) ends under its budget while its loss falls.

The budget and the final BitOPs are recomputed here from the saved checkpoint with
qvit.models.budget, independently of the numbers the run logs.
"""
from __future__ import annotations

import csv
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from test_cli import TINY  # noqa: E402
from test_data import make_folder  # noqa: E402

pytestmark = pytest.mark.timm


@pytest.mark.slow
def test_qvit_train_ends_under_budget_while_loss_falls(tmp_path):
    from qvit.models.budget import average_bits, bitops, uniform_bitops
    from qvit.train.cli import _load_model, main

    data = make_folder(tmp_path / "data", classes=3, per_class=(16, 6))
    out = tmp_path / "run"
    # qvit_mixed starts at W5A5, far above the 3-bit budget (25/9 of it in the matmuls)
    assert main(["train", data, *TINY, "--device", "cpu", "--quant", "qvit_mixed",
                 "--target-bits", "3", "--budget-relative", "--budget-weight", "10",
                 "--bit-lr", "100", "--epochs", "4", "--output", str(out)]) == 0
    with open(out / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2, 3]
    first, last = rows[0], rows[-1]
    assert float(last["train_loss"]) < float(first["train_loss"]), rows
    assert float(last["val_loss"]) < float(first["val_loss"]), rows  # the task loss alone

    model, _ = _load_model(str(out / "last.pth"))
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, 8, 8))  # records the token counts BitOPs need
        budget = uniform_bitops(model, 3) / 1e9
        start = uniform_bitops(model, 5) / 1e9
        final = float(bitops(model)) / 1e9
    ab = average_bits(model)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["budget"] == pytest.approx(budget, rel=1e-6)  # the run used this budget
    assert start > budget
    assert final <= budget * (1 + 1e-6), f"ends over budget: {final} > {budget} GBitOPs"
    assert ab["weights"] < 5 and ab["activations"] < 5, ab  # the bits moved, down
