"""Writes tests/fuzz_corpus/: hand-made regression cases and one case per
outcome class of a fuzz run.

    python tests/fuzz/make_corpus.py [--from DIR ...]   # DIR: fuzz_binding.py --save output

regressions.json  the bugs found by fuzzing / sanitizers and the pinned
                  non-finite behaviour, each with the reason it is there;
classes.json      one small case per (entry, outcome, fault kinds) class seen
                  by the fuzzer (inputs kept small so the replay stays fast).
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fuzz_binding import base_spec, run_spec, with_mods, _fault  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(os.path.dirname(HERE), "fuzz_corpus")


def regressions():
    R = []

    def add(name, why, spec):
        R.append({"name": name, "why": why, "spec": spec})

    # --- bugs found (fixed in csrc/module.c) ---
    why = ("misaligned NumPy view (offset 1 byte) reached the kernels: UBSan misaligned load; "
           "now ValueError 'not aligned'")
    add("unaligned-numpy-x-fwd", why, with_mods(base_spec("fwd", kind="numpy"), "x", "unaligned"))
    add("unaligned-numpy-x-fp16-bwd", why, with_mods(
        base_spec("bwd", (3, 40), kind="numpy", dtype="float16"), "grad_y", "unaligned"))
    add("unaligned-numpy-grad-scale", why, with_mods(
        base_spec("bwd", (5, 8), groups=5, kind="numpy"), "grad_scale", "unaligned"))
    add("unaligned-raw-y", why, with_mods(base_spec("fwd", (9,), kind="raw"), "y", "unaligned"))
    why = "raw capsule with negative sizes was accepted (product of two negatives > 0)"
    add("raw-negative-sizes", why, with_mods(base_spec("fwd", (2, 3), kind="raw"), "x", "negdim"))
    add("raw-negative-sizes-bwd", why, with_mods(base_spec("bwd", (2, 3), kind="raw"),
                                                 "grad_x", "negdim"))
    why = "raw capsule whose element count overflows int64 was accepted (UB, wrapped to 4)"
    add("raw-overflow-sizes", why, with_mods(base_spec("fwd", (2, 4), kind="raw"), "x",
                                             "overflow"))
    add("raw-overflow-bits", why, with_mods(base_spec("bwd", (2, 4), kind="raw"), "bits",
                                            "overflow"))
    add("raw-ndim-negative", "ndim < 0 was read as a 0-d tensor",
        with_mods(base_spec("fwd", (3,), kind="raw"), "x", "ndim_neg"))
    why = "empty NumPy arrays have all-zero strides and were rejected as non-contiguous"
    add("numpy-empty-middle-fwd", why, base_spec("fwd", (2, 0, 3, 8), kind="numpy",
                                                 dtype="float16"))
    s = base_spec("bwd", (5, 0), groups=5, kind="numpy")
    for a in ("grad_x", "grad_scale", "grad_bits"):
        s["tensors"][a]["kind"] = "auto"
    add("numpy-empty-bwd-auto-outputs", why, s)
    s = base_spec("fwd", (4, 6), kind="torch")
    s["alias_y_x"] = True
    _fault(s, "y", "alias")
    add("alias-y-is-x", "outputs may not overlap inputs (restrict pointers): ValueError", s)

    # --- pinned non-finite behaviour ---
    for entry in ("fwd", "bwd", "op"):
        s = base_spec(entry, (4, 3, 10), groups=3, dim=1, offset=True, scale_rows=3)
        s["x_special"] = [[0, "nan"], [17, "inf"], [45, "-inf"], [70, "nan"]]
        s["gy_special"] = [[3, "nan"], [90, "inf"]]
        add(f"nonfinite-x-{entry}", "NaN / Inf in x and grad_y against the reference", s)
    for dt in ("float16", "bfloat16", "float64"):
        s = base_spec("bwd", (6, 33), groups=3, dim=1, dtype=dt, scale_rows=3)
        s["x_special"] = [[1, "nan"], [2, "inf"], [5, "-inf"], [8, "-0"], [9, "tie"],
                          [10, "65504"], [11, "denorm"]]
        add(f"specials-{dt}", "special x values in each dtype", s)
    for v in ("denorm", "huge", "tiny"):
        s = base_spec("bwd", (7, 20))
        s["scale_special"] = [[2, v]]
        s["bits_special"] = [[0, "below"]]
        add(f"scale-{v}-valid", "extreme but valid (finite, > 0) scales", s)
    for v in ("0", "-0", "neg", "nan", "inf", "-inf"):
        s = base_spec("fwd", (7, 20), kind="numpy")
        s["scale_special"] = [[4, v]]
        add(f"scale-{v}-rejected", "scale must be finite and > 0, even inactive entries", s)
    for v in ("nan", "inf", "-inf"):
        s = base_spec("bwd", (8, 4), groups=4, dim=1, kind="raw", scale_rows=4)
        s["bits_special"] = [[2, v]]
        add(f"bits-{v}-rejected", "bits must be finite", s)
    for v in ("huge", "-huge", "half", "above"):
        s = base_spec("bwd", (8, 4), groups=4, dim=1, scale_rows=4)
        s["bits_special"] = [[1, v]]
        add(f"bits-{v}-clamped", "finite bits outside the range clamp; .5 rounds to even", s)
    s = base_spec("op", (0, 17, 2))
    s["scale_special"] = [[0, "nan"]]
    add("op-empty-x-bad-scale", "ops.fake_quant answers an empty x before the kernel reads "
        "the tables: no error (pinned current behaviour, reported)", s)
    # --- sizes, threads ---
    add("large-1d-bwd-threads", "> 16384 elements: GIL released, several OpenMP chunks",
        base_spec("bwd", (100003,), kw={"num_threads": 2, "lsq_grad_scale": -1.0}))
    add("large-many-groups-bwd", "many groups: bounded partial-sum budget",
        base_spec("bwd", (64, 1000), groups=1000, dim=1, scale_rows=1000))
    add("num-threads-64", "more threads than chunks",
        base_spec("fwd", (33000,), kw={"num_threads": 64}))
    # --- the argument parser (METH_FASTCALL, hand-written) ---
    for how, arg in (("unknown_kw", "bogus"), ("extra_pos", "positional"), ("dup", "x"),
                     ("missing_pos", "x"), ("bits_min_huge", "bits_min"),
                     ("num_threads_float", "num_threads"), ("signed_array", "signed"),
                     ("stream_str", None)):
        for entry in ("fwd", "bwd"):
            s = base_spec(entry, (3, 5), kind="numpy" if entry == "fwd" else "torch")
            s["parse"] = how
            if arg:
                _fault(s, "grad_y" if (how == "missing_pos" and entry == "bwd") else arg,
                       "parse")
            add(f"parse-{how}-{entry}", "argument parsing: a TypeError / ValueError naming "
                "the argument (stream is ignored on the CPU)", s)
    # --- producers that cannot export ---
    add("torch-meta-x", "meta tensor: torch refuses to export (RuntimeError from torch)",
        with_mods(base_spec("fwd"), "x", "meta"))
    add("torch-sparse-scale", "sparse tensor: torch refuses to export",
        with_mods(base_spec("bwd"), "scale", "sparse"))
    add("numpy-readonly-y", "read-only output", with_mods(base_spec("fwd", kind="numpy"), "y",
                                                          "readonly"))
    add("raw-readonly-flag-grad-x", "DLPack read-only flag on an output",
        with_mods(base_spec("bwd", kind="raw"), "grad_x", "readonly_flag"))
    add("raw-version-2", "DLPack 2.x capsule", with_mods(base_spec("fwd", kind="raw"), "x",
                                                         "version2"))
    add("raw-foreign-device", "device other than CPU / CUDA",
        with_mods(base_spec("fwd", kind="raw", seed=3), "x", "device"))
    add("raw-lanes-2", "vector dtype", with_mods(base_spec("fwd", kind="raw"), "scale", "lanes"))
    add("raw-null-data", "NULL data with elements", with_mods(base_spec("fwd", kind="raw"),
                                                              "x", "null"))
    add("raw-legacy-capsule", "legacy 'dltensor' capsule (valid)",
        with_mods(base_spec("bwd", kind="raw"), "x", "legacy"))
    add("raw-byte-offset", "aligned byte_offset (valid)",
        with_mods(base_spec("bwd", kind="raw"), "grad_y", "byte_offset"))
    add("torch-noncontig-x", "non-contiguous input to the raw binding: ValueError",
        with_mods(base_spec("fwd"), "x", "noncontig"))
    add("op-noncontig-x", "ops.fake_quant makes inputs contiguous (valid)",
        with_mods(base_spec("op", (6, 5)), "x", "noncontig"))
    return R


def classes(dirs, limit=250, max_numel=4096):
    """One case per outcome class (small inputs), thinned evenly to `limit`."""
    seen, out = set(), []
    files = sorted(f for d in dirs for f in glob.glob(os.path.join(d, "case_*.json")))
    for f in files:
        with open(f) as fh:
            case = json.load(fh)
        spec = case["spec"]
        if math.prod(spec["shape"]) > max_numel or case["name"] in seen:
            continue
        seen.add(case["name"])
        out.append({"name": case["name"], "spec": spec})
    out.sort(key=lambda c: c["name"])
    if len(out) > limit:
        step = len(out) / limit
        out = [out[int(i * step)] for i in range(limit)]
    return out


def _dump(cases, path):
    """One case per line: small diffs, compact file."""
    with open(path, "w") as f:
        f.write("[\n")
        f.write(",\n".join(json.dumps(c, separators=(",", ":")) for c in cases))
        f.write("\n]\n")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--from", dest="dirs", nargs="*", default=[])
    a = p.parse_args()
    os.makedirs(OUT, exist_ok=True)
    reg = regressions()
    for c in reg:  # every regression must pass its oracle now
        c["outcome"] = run_spec(c["spec"])
    _dump(reg, os.path.join(OUT, "regressions.json"))
    print(f"{len(reg)} regression cases")
    if a.dirs:
        cls = classes(a.dirs)
        for c in cls:
            c["outcome"] = run_spec(c["spec"])
        _dump(cls, os.path.join(OUT, "classes.json"))
        print(f"{len(cls)} outcome-class cases")


if __name__ == "__main__":
    main()
