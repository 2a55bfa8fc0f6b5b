"""Replays the fuzz corpus (tests/fuzz_corpus/*.json) through the fuzz oracle.

Every case either matches the reference closed forms (y, grad_x bitwise;
parameter gradients within the fixed-order sum tolerance) or raises a Python
exception that names the argument, with input reference counts unchanged
(tests/fuzz/fuzz_binding.py). ``regressions.json`` holds the bugs the fuzzer
and the sanitizer run found, and the pinned non-finite behaviour: for those
the outcome (success, or the exception type) is also fixed. ``classes.json``
holds one small case per outcome class a fuzz run reached. Regenerate with
``python tests/fuzz/make_corpus.py --from <fuzz --save dirs>``.
"""
from __future__ import annotations

import json
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "fuzz"))
import fuzz_binding  # noqa: E402

CORPUS = os.path.join(HERE, "fuzz_corpus")


def _load(name):
    path = os.path.join(CORPUS, name)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)


REGRESSIONS = _load("regressions.json")
CLASSES = _load("classes.json")

needs_c = pytest.mark.skipif(fuzz_binding._C is None, reason="qvit._C not built")


def _kind(outcome):
    """'fwd:raised:ValueError:unnamed' -> 'fwd:raised:ValueError'."""
    return ":".join(outcome.split(":")[:3])


def test_corpus_present():
    assert len(REGRESSIONS) >= 40 and len(CLASSES) >= 50


@needs_c
@pytest.mark.parametrize("case", REGRESSIONS, ids=[c["name"] for c in REGRESSIONS])
def test_regression(case):
    got = fuzz_binding.run_spec(case["spec"])
    assert _kind(got) == _kind(case["outcome"]), case["why"]


@needs_c
@pytest.mark.parametrize("case", CLASSES, ids=[f"{i:03d}" for i in range(len(CLASSES))])
def test_outcome_class(case):
    fuzz_binding.run_spec(case["spec"])


def test_oracle_non_finite_rule():
    """The oracle's rule for non-finite parameter gradients (fuzz_binding._close): exact
    NaN / Inf agreement where no fp32 intermediate can overflow; where one can, an
    overflow outcome is accepted but a wrong finite value is not."""
    import torch

    spec = {"kw": {"lsq_grad_scale": 0.01}, "entry": "bwd", "signed": True, "dim": 0,
            "bits_min": 2, "bits_max": 8}
    scale, bits = torch.ones(1, 7), torch.full((1,), 2.0)
    check = fuzz_binding.check_backward

    def L(x, gy):
        return {"x": x, "grad_y": gy, "scale": scale, "bits": bits}

    # both elements clip above; the fp32 running sum of grad_y (6e38) overflows while the
    # fp64 reference, 0.01 * Qp * 6e38, is finite
    x, gy = torch.full((2,), 100.0), torch.full((2,), 3e38)
    ref = 0.01 * 6e38
    gx = torch.zeros(2)
    inf = torch.tensor([float("inf")])
    gs = torch.zeros(1, 7)
    gs[0, 0] = float("inf")
    check(spec, L(x, gy), gx, gs, inf, None)  # the kernel's overflow: accepted
    gs[0, 0] = -ref
    with pytest.raises(fuzz_binding.OracleError):  # a wrong finite value: rejected
        check(spec, L(x, gy), gx, gs, inf, None)
    gs[0, 0] = ref
    check(spec, L(x, gy), gx, gs, inf, None)
    # small sums: nothing can overflow, so an Inf where the reference is finite is wrong
    gy = torch.full((2,), 3.0)
    gs = torch.zeros(1, 7)
    gs[0, 0] = float("inf")
    with pytest.raises(fuzz_binding.OracleError, match="Inf positions differ"):
        check(spec, L(x, gy), gx, gs, torch.tensor([2 * 3.0 * 1.0 * 0.6931471805599453 * 2]), None)
