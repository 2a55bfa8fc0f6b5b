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
