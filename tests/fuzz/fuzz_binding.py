"""Fuzz harness for the native entry points: ``qvit._C.fq_forward``,
``qvit._C.fq_backward`` and ``qvit.ops.fake_quant`` (forward + autograd backward).

A case is a JSON-able *spec* (a dict) drawn from a byte / random source by
:func:`gen_spec`; :func:`run_spec` builds the inputs it describes, makes the
call and applies the oracle:

* every tensor argument may be a torch tensor, a NumPy array, a hand-built
  DLPack capsule (``dlpack_raw``), ``None`` or some other Python object;
  dtypes include ints, bool, complex; layouts include transposed, strided,
  stride-0, storage offsets, misaligned NumPy views, read-only NumPy arrays,
  meta / sparse torch tensors; raw capsules add negative and overflowing
  sizes, ndim < 0, NULL data, vector lanes, DLPack 2.x, foreign devices,
  read-only flags; values include NaN / +-Inf / denormals / huge numbers in
  x, grad_y, the scale table (also 0 and negatives), bits (outside the range,
  non-finite, halves) and offsets; keyword arguments are dropped, out of
  range, or of the wrong type;
* the generator records every deliberate fault it introduced (``spec["faults"]``,
  each naming the argument). With no fault the call must succeed and equal
  the reference (``qvit.reference`` closed forms: y and grad_x bitwise, NaN
  where the reference has NaN; parameter gradients within the fixed-order
  summation tolerance of tests/helpers.py, relative to the sum of |terms|);
  with a fault it must raise a Python exception (TypeError, ValueError,
  OverflowError, or a producer's BufferError / RuntimeError for tensors that
  cannot be exported at all) whose message names the argument when there is
  one fault. Either way the reference counts of the inputs are unchanged.

Drivers (``python tests/fuzz/fuzz_binding.py --help``):
  --seconds N      random cases for N seconds (or --cases N), seeded by --seed
  --atheris        coverage-guided over Python code with atheris (optional
                   dependency; the C layer is not instrumented, so coverage
                   steers only the Python-side generator / binding outcomes)
  --leak N         the leak check: N calls over a fixed mix of valid and
                   failing cases after a warm-up; RSS and tracemalloc stable
  --save DIR       write one JSON spec per new outcome signature to DIR
The spec of the running case is written to --crash-file first, so a hard
crash leaves the case behind; a per-case faulthandler timeout catches hangs.
"""
from __future__ import annotations

import argparse
import faulthandler
import gc
import json
import math
import os
import random
import sys
import time
import warnings
from typing import Any, Dict, List, Optional

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dlpack_raw import KDL_CPU, RawTensor  # noqa: E402

from qvit.ops import reference, torch_ops as ops  # noqa: E402
from qvit.ops.contract import BITS_LIMIT  # noqa: E402

try:
    from qvit import _C  # noqa: E402
except ImportError:  # pragma: no cover
    _C = None

# a wrong-dtype output made from a complex tensor: the cast is the point
warnings.filterwarnings("ignore", message="Casting complex values to real")

# ---------------------------------------------------------------------------
# sources of randomness: one interface over bytes (atheris) or a seeded RNG
# ---------------------------------------------------------------------------


class Source:
    """Integers drawn from a byte string (zeros when exhausted) or a ``random.Random``."""

    def __init__(self, data: Optional[bytes] = None, rng: Optional[random.Random] = None):
        self.data, self.pos, self.rng = data, 0, rng

    def bits(self, n: int) -> int:
        if self.rng is not None:
            return self.rng.getrandbits(n)
        nbytes = (n + 7) // 8
        chunk = self.data[self.pos:self.pos + nbytes]
        self.pos += nbytes
        return int.from_bytes(chunk.ljust(nbytes, b"\0"), "little") & ((1 << n) - 1)

    def int(self, lo: int, hi: int) -> int:
        """Uniform-ish integer in [lo, hi]."""
        span = hi - lo + 1
        return lo + self.bits(max(span.bit_length(), 1) + 8) % span

    def choice(self, seq):
        return seq[self.int(0, len(seq) - 1)]

    def prob(self, p: float) -> bool:
        return self.bits(16) < p * 65536


# ---------------------------------------------------------------------------
# spec generation
# ---------------------------------------------------------------------------

X_DTYPES = ["float32", "float16", "bfloat16", "float64"]
BAD_DTYPES = ["int32", "uint8", "bool", "complex64", "int64"]
DIM_SIZES = [0, 1, 1, 2, 2, 3, 4, 5, 6, 7, 8, 12, 16, 17, 31, 64, 65, 100, 128, 257, 1000]
SPECIAL_X = ["nan", "inf", "-inf", "0", "-0", "denorm", "huge", "-huge", "65504", "tie"]
SPECIAL_SCALE = ["0", "-0", "neg", "nan", "inf", "-inf", "denorm", "huge", "tiny"]
SPECIAL_BITS = ["nan", "inf", "-inf", "huge", "-huge", "half", "below", "above", "denorm"]
SPECIAL_OFFSET = ["nan", "inf", "-inf", "huge", "denorm"]
NUMEL_CAP = 20000


def _shape(src: Source) -> List[int]:
    if src.prob(0.04):  # a large 1-D tensor: GIL release, several threads, many chunks
        return [src.choice([16384, 32768, 65536 + 17, 100003])]
    ndim = src.choice([0, 1, 1, 2, 2, 2, 3, 3, 4])
    shape = [src.choice(DIM_SIZES) for _ in range(ndim)]
    while math.prod(shape) > NUMEL_CAP:
        shape[src.int(0, ndim - 1)] //= 2
    return shape


def _fault(spec, arg, what, producer=False):
    spec["faults"].append({"arg": arg, "what": what, "producer": producer})


def _tensor_kind(src: Source, spec, default: str) -> str:
    if spec["entry"] == "op":
        return "torch"
    if src.prob(0.75):
        return default
    return src.choice(["torch", "numpy", "raw"])


def _layout_mods(src: Source, spec, arg, kind, output):
    """Layout / container mutations of one tensor argument; records faults."""
    mods: Dict[str, Any] = {}
    if not src.prob(0.12):
        return mods
    opts = ["noncontig", "offset"]
    if kind == "torch":
        opts += ["requires_grad", "expanded", "meta", "sparse"]
    elif kind == "numpy":
        opts += ["readonly", "unaligned", "negstride"]
    else:
        opts += ["legacy", "readonly_flag", "byte_offset", "unaligned", "negdim", "overflow",
                 "ndim_neg", "null", "lanes", "version2", "device", "badcode", "strides_null"]
    m = src.choice(opts)
    if spec["entry"] == "op" and m in ("meta", "sparse"):
        m = "requires_grad"
    mods[m] = True
    return mods


def _values(src: Source, specials, n: int, maxk: int = 3):
    if n == 0 or not src.prob(0.25):
        return []
    picks = {src.int(0, n - 1): src.choice(specials) for _ in range(src.int(1, maxk))}
    return [[i, v] for i, v in sorted(picks.items())]


def gen_spec(src: Source) -> Dict[str, Any]:
    """Draw one case. Everything needed to rebuild it is in the returned dict."""
    entry = src.choice(["fwd", "fwd", "bwd", "bwd", "bwd", "op"])
    spec: Dict[str, Any] = {"entry": entry, "seed": src.int(0, 2**31 - 1), "faults": []}
    xd = src.choice(X_DTYPES)
    if src.prob(0.04):
        xd = src.choice(BAD_DTYPES)
        _fault(spec, "x", "dtype")
    spec["dtype"] = xd
    pd = "float64" if xd == "float64" else "float32"
    spec["param_dtype"] = pd
    shape = _shape(src)
    spec["shape"] = shape
    numel = math.prod(shape)

    # groups: usually a divisor of shape[dim]
    G, dim = 1, src.int(-3, 3)
    if shape and src.prob(0.6):
        dim = src.int(-len(shape), len(shape) - 1)
        size = shape[dim]
        divs = [d for d in range(1, min(size, 300) + 1) if size % d == 0] or [1]
        G = src.choice(divs)
    if src.prob(0.03):
        G = src.choice([2, 3, 7, 1000])
    spec["groups"], spec["dim"] = G, dim
    try:
        reference.group_shape(shape, dim, G)
    except ValueError:
        _fault(spec, "bits", "groups")  # G does not divide, dim out of range or 0-d

    signed = src.prob(0.6)
    spec["signed"] = signed
    bmin = src.choice([2, 2, 2, 3, 4]) if signed else src.choice([1, 2, 2, 4])
    bmax = bmin + src.choice([0, 1, 3, 6, 6, 6, 10])
    bmax = min(bmax, BITS_LIMIT)
    if src.prob(0.03):
        bmin, bmax = src.choice([(0, 8), (8, 2), (2, BITS_LIMIT + 1), (1, 8), (-5, 4), (2, 40)])
        if not (1 <= bmin <= bmax <= BITS_LIMIT and (bmin >= 2 or not signed)):
            _fault(spec, "bits_min", "range")
    spec["bits_min"], spec["bits_max"] = bmin, bmax
    K = max(bmax - bmin + 1, 1)
    spec["scale_rows"] = src.choice([1, G]) if not src.prob(0.03) else G + 1
    spec["K"] = K if not src.prob(0.02) else K + 1
    if spec["scale_rows"] not in (1, G) or spec["K"] != K:
        _fault(spec, "scale", "shape")
    spec["offset"] = src.prob(0.3)
    if src.prob(0.03):
        bad = src.choice(["float16", "float64", "float32", "int32", "bfloat16"])
        arg = src.choice(["scale", "bits", "offset"] if spec["offset"] else ["scale", "bits"])
        if bad != pd:
            spec.setdefault("param_dtype_override", {})[arg] = bad
            _fault(spec, arg, "dtype")
    if spec["offset"] and src.prob(0.03):
        spec["offset_shape_bad"] = True
        _fault(spec, "offset", "shape")
    if src.prob(0.02):
        spec["bits_shape"] = src.choice([[], [G, 1], [0]])
        if not (spec["bits_shape"] == [0] and False):
            _fault(spec, "bits", "shape")

    # values
    spec["x_amp"] = src.choice([1e-3, 0.05, 0.3, 1.0, 10.0, 1e4])
    spec["x_special"] = _values(src, SPECIAL_X, numel)
    spec["gy_amp"] = src.choice([1.0, 1e-3, 30.0])
    spec["gy_special"] = _values(src, ["nan", "inf", "-inf", "0", "denorm"], numel, 2)
    spec["scale_special"] = _values(src, SPECIAL_SCALE, spec["scale_rows"] * spec["K"], 2)
    spec["bits_special"] = _values(src, SPECIAL_BITS, G, 2)
    spec["offset_special"] = _values(src, SPECIAL_OFFSET, spec["scale_rows"] * spec["K"], 1) \
        if spec["offset"] else []
    for _, v in spec["scale_special"]:
        if v in ("0", "-0", "neg", "nan", "inf", "-inf"):
            _fault(spec, "scale", "value")
    for _, v in spec["bits_special"]:
        if v in ("nan", "inf", "-inf"):
            _fault(spec, "bits", "value")
    for _, v in spec["offset_special"]:
        if v in ("nan", "inf", "-inf"):
            _fault(spec, "offset", "value")

    # containers and layouts
    kind = src.choice(["torch", "torch", "numpy", "raw"]) if entry != "op" else "torch"
    if xd == "bfloat16" and kind == "numpy":
        kind = "torch"
    spec["x_kind"] = kind
    args = ["x", "scale", "bits"] + (["offset"] if spec["offset"] else [])
    outs = {"fwd": ["y"], "bwd": ["grad_x", "grad_scale", "grad_bits"]
            + (["grad_offset"] if spec["offset"] else []), "op": []}[entry]
    if entry == "bwd":
        args = ["grad_y"] + args
    spec["tensors"] = {}
    like = {"y": "x", "grad_x": "x", "grad_scale": "scale", "grad_bits": "bits",
            "grad_offset": "offset"}
    for a in args + outs:
        out = a in outs
        k = kind if a == "x" else _tensor_kind(src, spec, kind)
        numpy_like = out and spec["tensors"][like[a]]["kind"] == "numpy"
        if numpy_like and src.prob(0.5):
            k = "auto"  # None: the binding allocates a NumPy output like its input
        if k == "numpy" and (xd == "bfloat16" or spec.get("param_dtype_override", {}).get(a)
                             == "bfloat16"):
            k = "torch"
        t = {"kind": k, "mods": {} if k == "auto" else _layout_mods(src, spec, a, k, out)}
        if src.prob(0.015):
            t["kind"] = src.choice(["none", "int", "str", "list"])
            if a == "offset" and t["kind"] == "none":
                t["kind"] = "int"
            t["mods"] = {}
            if t["kind"] == "none" and numpy_like:
                t["kind"] = "auto"
            else:
                _fault(spec, a, "type")
        if out and t["kind"] != "auto" and src.prob(0.02):
            t["wrong_shape"] = True
            _fault(spec, a, "shape")
        if out and t["kind"] != "auto" and src.prob(0.015):
            t["wrong_dtype"] = True
            _fault(spec, a, "dtype")
        spec["tensors"][a] = t
        _classify_mods(spec, a, t, out)
    if entry == "fwd" and src.prob(0.03) and not spec["tensors"]["y"]["mods"] \
            and spec["tensors"]["y"]["kind"] == spec["tensors"]["x"]["kind"] \
            and spec["tensors"]["x"]["kind"] in ("torch", "numpy") \
            and not spec["tensors"]["x"]["mods"] \
            and not any(f["arg"] in ("x", "y") for f in spec["faults"]):
        spec["alias_y_x"] = True  # in-place: y is x; outputs may not overlap inputs
        if math.prod(shape) > 0:
            _fault(spec, "y", "alias")

    # keywords
    kw: Dict[str, Any] = {}
    if entry == "op":
        kw["grad_scale"] = src.choice([None, None, 1.0, 0.0, 1e-3, -1.0, float("nan"), "1"])
        if kw["grad_scale"] is not None and not (
                isinstance(kw["grad_scale"], float) and kw["grad_scale"] >= 0):
            _fault(spec, "grad_scale", "value")
        spec["requires_grad"] = [src.prob(0.7) for _ in range(4)]
    else:
        kw["num_threads"] = src.choice([0, 0, 0, 1, 2, 3, -1, 64])
        if entry == "bwd":
            kw["lsq_grad_scale"] = src.choice([-1.0, -1.0, 1.0, 0.0, 1e-3, -5.0, 1e3,
                                               float("nan")])
            if kw["lsq_grad_scale"] != kw["lsq_grad_scale"]:
                _fault(spec, "lsq_grad_scale", "value")
        if src.prob(0.03):
            drop = src.choice(["dim", "signed", "bits_min", "bits_max"])
            spec["drop_kw"] = drop
            _fault(spec, drop, "missing")
        if src.prob(0.02):
            spec["dim_raw"] = src.choice([2**40, "0", 1.5])
            _fault(spec, "dim", "type")
        # the argument parser itself; not with a dropped keyword (an extra
        # positional would then fill the missing slot: a different case)
        if src.prob(0.03) and "drop_kw" not in spec:
            spec["parse"] = src.choice(["unknown_kw", "extra_pos", "dup", "missing_pos",
                                        "bits_min_huge", "num_threads_float", "signed_array",
                                        "stream_str"])
            arg = {"unknown_kw": "bogus", "extra_pos": "positional", "dup": "x",
                   "missing_pos": "x" if entry == "fwd" else "grad_y",
                   "bits_min_huge": "bits_min", "num_threads_float": "num_threads",
                   "signed_array": "signed", "stream_str": None}[spec["parse"]]
            if arg is not None:
                _fault(spec, arg, "parse")
    spec["kw"] = kw
    return spec


def base_spec(entry="fwd", shape=(4, 6), groups=1, dim=0, dtype="float32", kind="torch",
              offset=False, signed=True, bits_range=(2, 8), seed=0, **over) -> Dict[str, Any]:
    """A valid spec to edit by hand (corpus regressions); `over` replaces fields.
    Set ``tensors[arg]["mods"]`` through :func:`with_mods` so faults are recorded."""
    bmin, bmax = bits_range
    spec: Dict[str, Any] = {
        "entry": entry, "seed": seed, "faults": [], "dtype": dtype,
        "param_dtype": "float64" if dtype == "float64" else "float32", "shape": list(shape),
        "groups": groups, "dim": dim, "signed": signed, "bits_min": bmin, "bits_max": bmax,
        "scale_rows": 1, "K": bmax - bmin + 1, "offset": offset, "x_amp": 0.3,
        "x_special": [], "gy_amp": 1.0, "gy_special": [], "scale_special": [],
        "bits_special": [], "offset_special": [], "x_kind": kind,
    }
    args = ["x", "scale", "bits"] + (["offset"] if offset else [])
    outs = {"fwd": ["y"], "bwd": ["grad_x", "grad_scale", "grad_bits"]
            + (["grad_offset"] if offset else []), "op": []}[entry]
    if entry == "bwd":
        args = ["grad_y"] + args
    spec["tensors"] = {a: {"kind": kind, "mods": {}} for a in args + outs}
    spec["kw"] = ({"grad_scale": None} if entry == "op" else
                  {"num_threads": 0, **({"lsq_grad_scale": -1.0} if entry == "bwd" else {})})
    if entry == "op":
        spec["requires_grad"] = [True] * 4
    spec.update(over)
    return spec


def with_mods(spec, arg, *mods, kind=None):
    """Give tensor `arg` the layout mutations `mods` (and record their faults)."""
    t = spec["tensors"][arg]
    if kind is not None:
        t["kind"] = kind
    t["mods"] = {m: True for m in mods}
    out = arg in ("y", "grad_x", "grad_scale", "grad_bits", "grad_offset")
    _classify_mods(spec, arg, t, out)
    return spec


def _classify_mods(spec, a, t, out):
    mods = t["mods"]
    entry = spec["entry"]
    for m in mods:
        if m in ("noncontig", "expanded", "negstride") and entry != "op":
            _fault(spec, a, "contiguous-maybe")
        elif m in ("meta", "sparse"):
            _fault(spec, a, m, producer=True)
        elif m == "readonly" and out:
            _fault(spec, a, "readonly")
        elif m == "readonly_flag" and out:
            _fault(spec, a, "readonly")
        elif m in ("unaligned",):
            _fault(spec, a, "alignment-maybe")
        elif m in ("negdim", "overflow", "ndim_neg", "lanes", "version2", "device", "badcode"):
            _fault(spec, a, m)
        elif m == "null":
            _fault(spec, a, "null-maybe")


# ---------------------------------------------------------------------------
# building the inputs
# ---------------------------------------------------------------------------

TORCH_DT = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
            "float64": torch.float64, "int32": torch.int32, "uint8": torch.uint8,
            "bool": torch.bool, "complex64": torch.complex64, "int64": torch.int64}

SPECIAL_VALUES = {
    "nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"), "0": 0.0, "-0": -0.0,
    "denorm": 1e-45, "huge": 3e38, "-huge": -3e38, "65504": 65504.0, "neg": -0.1,
    "tiny": 1e-30, "half": None, "below": None, "above": None, "tie": None,
}


def _special(name, spec, base=None):
    v = SPECIAL_VALUES[name]
    if name == "half":
        return spec["bits_min"] + 0.5
    if name == "below":
        return spec["bits_min"] - 3.7
    if name == "above":
        return spec["bits_max"] + 5.2
    if name == "tie":
        return 2.5 * (base if base is not None else 0.05)
    if name in ("huge", "-huge") and spec.get("_role") == "bits":
        return 1e30 if name == "huge" else -1e30
    return v


def _logical(spec) -> Dict[str, torch.Tensor]:
    """The logical values of every input (torch, CPU), before containers."""
    g = torch.Generator().manual_seed(spec["seed"])
    shape, G = spec["shape"], spec["groups"]
    xd = TORCH_DT[spec["dtype"]]
    pd = TORCH_DT[spec["param_dtype"]]
    bmin, bmax = spec["bits_min"], spec["bits_max"]
    rows, K = spec["scale_rows"], spec["K"]
    scale = torch.pow(2.0, torch.empty(rows, K, dtype=torch.float64).uniform_(-7, 0, generator=g))
    for i, name in spec["scale_special"]:
        scale.view(-1)[i] = _special(name, spec)
    lo, hi = sorted((bmin - 0.6, bmax + 0.6))
    bits = torch.empty(G, dtype=torch.float64).uniform_(lo, hi, generator=g)
    spec["_role"] = "bits"
    for i, name in spec["bits_special"]:
        bits[i] = _special(name, spec)
    spec.pop("_role")
    offset = None
    if spec["offset"]:
        offset = torch.empty(rows, K, dtype=torch.float64).uniform_(-0.3, 0.3, generator=g)
        for i, name in spec["offset_special"]:
            offset.view(-1)[i] = _special(name, spec)
        if spec.get("offset_shape_bad"):
            offset = torch.zeros(rows + 1, K, dtype=torch.float64)
    x = torch.randn(shape, dtype=torch.float64, generator=g) * spec["x_amp"]
    for i, name in spec["x_special"]:
        x.view(-1)[i] = _special(name, spec, float(scale.view(-1)[0]))
    gy = torch.randn(shape, dtype=torch.float64, generator=g) * spec["gy_amp"]
    for i, name in spec["gy_special"]:
        gy.view(-1)[i] = _special(name, spec)
    if spec["dtype"] in ("int32", "uint8", "int64", "bool"):
        x = x.clamp(-100, 100)
        gy = gy.clamp(-100, 100)
        if spec["dtype"] == "uint8":
            x, gy = x.abs(), gy.abs()
    over = spec.get("param_dtype_override", {})
    out = {
        "x": x.to(xd), "grad_y": gy.to(xd),
        "scale": scale.to(TORCH_DT[over.get("scale", spec["param_dtype"])]),
        "bits": bits.to(TORCH_DT[over.get("bits", spec["param_dtype"])]),
    }
    if "bits_shape" in spec:
        out["bits"] = torch.full(spec["bits_shape"], 4.0, dtype=out["bits"].dtype)
    if offset is not None:
        out["offset"] = offset.to(TORCH_DT[over.get("offset", spec["param_dtype"])])
    del pd
    return out


def _np_buffer(t: torch.Tensor) -> np.ndarray:
    """A NumPy array holding the bytes of t (any dtype, bf16 included), contiguous."""
    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().copy()
    return t.numpy().copy()


class Holder:
    """Keeps every object behind a case alive and knows how to read outputs back."""

    def __init__(self):
        self.keep: List[Any] = []
        self.readers: Dict[str, Any] = {}


def _contain(t: torch.Tensor, desc, name, holder: Holder, spec):
    """The argument object for tensor t described by desc (kind + mods)."""
    kind, mods = desc["kind"], desc["mods"]
    if kind == "numpy" and t.dtype == torch.bfloat16:  # NumPy has no bfloat16
        kind, mods = "torch", {}
    if kind == "none":
        return None
    if kind == "int":
        return 3
    if kind == "str":
        return "x"
    if kind == "list":
        return [1.0, 2.0]
    if kind == "torch":
        if "meta" in mods:
            return torch.empty(t.shape, dtype=t.dtype, device="meta")
        if "sparse" in mods:
            return t.to_sparse() if t.dim() > 0 else t.reshape(1).to_sparse()
        if "noncontig" in mods:
            if t.dim() >= 2:
                u = t.transpose(-1, -2).contiguous().transpose(-1, -2)
            else:
                big = torch.zeros(t.numel() * 2 + 1, dtype=t.dtype)
                big[: 2 * t.numel(): 2] = t.reshape(-1)
                u = big[: 2 * t.numel(): 2].view(t.shape) if t.numel() else t.clone()
            holder.readers[name] = lambda u=u: u
            return u
        if "offset" in mods:
            big = torch.zeros(t.numel() + 3, dtype=t.dtype)
            big[3:] = t.reshape(-1)
            u = big[3:].view(t.shape)
            holder.readers[name] = lambda u=u: u
            return u
        if "expanded" in mods:
            u = t.reshape(-1)[:1].reshape([1] * t.dim()).expand(t.shape) if t.numel() \
                else t.clone()
            holder.readers[name] = lambda u=u: u
            return u
        u = t.clone()
        if "requires_grad" in mods and u.is_floating_point():
            u.requires_grad_(True)
        holder.readers[name] = lambda u=u: u.detach()
        return u
    if kind == "numpy":
        a = t.detach().numpy().copy()
        if "noncontig" in mods and a.ndim >= 2:
            a = np.asfortranarray(a)
        elif "noncontig" in mods:
            big = np.zeros(max(a.size * 2, 1), a.dtype)
            big[: 2 * a.size: 2] = a.reshape(-1)
            a = big[: 2 * a.size: 2].reshape(a.shape)
        elif "offset" in mods:
            big = np.zeros(a.size + 3, a.dtype)
            big[3:] = a.reshape(-1)
            a = big[3:].reshape(a.shape)
        elif "unaligned" in mods:
            raw = np.zeros(a.nbytes + a.itemsize + 1, np.uint8)
            u = np.frombuffer(raw.data, dtype=a.dtype, count=a.size, offset=1).reshape(a.shape)
            u[...] = a
            holder.keep.append(raw)
            a = u
        elif "negstride" in mods:
            if a.ndim >= 1:
                a = np.ascontiguousarray(a[..., ::-1])[..., ::-1]
        if "readonly" in mods:
            a.flags.writeable = False
        holder.readers[name] = lambda a=a: torch.from_numpy(np.array(a))
        return a
    # raw capsule
    buf = _np_buffer(t)
    nbytes = buf.nbytes
    itemsize = t.element_size()
    shape = list(t.shape)
    kw: Dict[str, Any] = {}
    pad = 0
    if "byte_offset" in mods:
        pad = 2 * itemsize
    elif "unaligned" in mods:
        pad = 1
    store = np.zeros(nbytes + pad + 8, np.uint8)
    store[pad:pad + nbytes] = buf.reshape(-1).view(np.uint8)
    holder.keep.append(store)
    dt = {torch.float32: "float32", torch.float16: "float16", torch.float64: "float64",
          torch.bfloat16: "bfloat16", torch.int32: "int32", torch.uint8: "uint8",
          torch.bool: "bool", torch.complex64: "complex64", torch.int64: (0, 64)}[t.dtype]
    strides = None
    if "noncontig" in mods and len(shape) >= 1:
        strides = [0] * len(shape)  # a stride-0 (broadcast) view of the first element
    elif not ("strides_null" in mods):
        strides, acc = [0] * len(shape), 1
        for i in range(len(shape) - 1, -1, -1):
            strides[i] = acc
            acc *= shape[i]
    if "negdim" in mods and not shape:
        shape = [-1]
    elif "negdim" in mods:
        shape[0] = -shape[0] if shape[0] else -1
        if len(shape) > 1:
            shape[1] = -shape[1] if shape[1] else -1
    if "overflow" in mods:
        shape = [2**62 + 1, 4] + shape[2:] if len(shape) >= 2 else [2**62 + 1, 4]
    if "ndim_neg" in mods:
        kw["ndim"] = -1
    if "lanes" in mods:
        kw["lanes"] = 2
    if "version2" in mods:
        kw["version"] = (2, 0)
    if "device" in mods:
        kw["device"] = random.Random(spec["seed"]).choice([(3, 0), (4, 0), (10, 0), (13, 0),
                                                          (1, 5), (99, 0)])
    if "badcode" in mods:
        dt = (7, 32)
    if "legacy" in mods:
        kw["versioned"] = False
    if "readonly_flag" in mods:
        kw["read_only"] = True
    if "null" in mods:
        rt = RawTensor(shape, dt, data=0, strides=strides, **kw)
    else:
        rt = RawTensor(shape, dt, data=store.ctypes.data, strides=strides, byte_offset=pad, **kw)
    rt.buffer = store
    holder.keep.append(rt)

    def read(store=store, pad=pad, nbytes=nbytes, dtype=t.dtype, shape=tuple(t.shape)):
        if not nbytes:
            return torch.empty(shape, dtype=dtype)
        b = torch.frombuffer(bytearray(store[pad:pad + nbytes].tobytes()), dtype=torch.uint8)
        return b.view(dtype).view(shape)
    holder.readers[name] = read
    return rt.capsule


# ---------------------------------------------------------------------------
# oracle
# ---------------------------------------------------------------------------

ALLOWED = (TypeError, ValueError, OverflowError)
PRODUCER = (BufferError, RuntimeError)
RTOL = {torch.float64: 1e-12}
RTOL_DEFAULT = 1e-5


class OracleError(AssertionError):
    pass


def _same_exact(a: torch.Tensor, b: torch.Tensor, what: str):
    if a.shape != b.shape or a.dtype != b.dtype:
        raise OracleError(f"{what}: shape/dtype {tuple(a.shape)} {a.dtype} vs reference "
                          f"{tuple(b.shape)} {b.dtype}")
    na, nb = torch.isnan(a), torch.isnan(b)
    if not torch.equal(na, nb):
        raise OracleError(f"{what}: NaN positions differ from the reference "
                          f"({int(na.sum())} vs {int(nb.sum())})")
    fa, fb = a[~na], b[~nb]
    if not torch.equal(fa, fb):
        i = int((fa != fb).nonzero()[0, 0])
        raise OracleError(f"{what}: differs from the reference at {i}: {float(fa[i])!r} vs "
                          f"{float(fb[i])!r}")


def _close(a, b, tol, what, floor=1e-37, may_overflow=None):
    """A parameter gradient ``a`` of a kernel against the reference's ``b``.

    The rule for non-finite values: the kernels form each term in the working precision
    (fp32 for fp32 / fp16 / bf16 x: ``u * (round(c) - v)``, and fp32 running sums of ``u``
    over the clipped elements) and combine per-chunk partials in fp64; the reference forms
    terms and sums in fp64 and rounds once. So:

    1. where no working-precision intermediate can overflow (``may_overflow`` false: the
       fp64 bound on every intermediate, see :func:`_abs_sums`, is at most the dtype's
       largest finite value), NaN and +-Inf agree exactly: same positions, same signs;
    2. where one may overflow, the kernel may give +-Inf or NaN where the reference is
       finite, or NaN where the reference is +-Inf (Inf - Inf); a NaN reference still needs
       a NaN, an infinite reference never meets the opposite infinity, and a finite kernel
       value against an infinite reference needs the same sign and to lie within ``tol`` of
       the largest finite value (the exact sum sits at the overflow threshold);
    3. finite against finite: within ``tol`` (always finite) everywhere, overflow or not.
    """
    a64, b64 = a.double(), b.double()
    # An infinite tol: the fp64 error bound itself exceeds the range (a huge LSQ override
    # or scale times a large sum of |terms|); every finite value is then within it.
    tol = torch.nan_to_num(tol.double(), nan=0.0).expand_as(b64)
    ov = (torch.zeros_like(b64, dtype=torch.bool) if may_overflow is None
          else may_overflow.expand_as(b64))
    na, nb = torch.isnan(a64), torch.isnan(b64)
    ia, ib = torch.isinf(a64), torch.isinf(b64)
    fa, fb = ~(na | ia), ~(nb | ib)
    st = ~ov
    if not torch.equal(na[st], nb[st]):
        raise OracleError(f"{what}: NaN positions differ: {a.tolist()} vs {b.tolist()}")
    if not torch.equal(ia[st], ib[st]) or not torch.equal(a64[st & ia], b64[st & ib]):
        raise OracleError(f"{what}: Inf positions differ: {a.tolist()} vs {b.tolist()}")
    big = torch.finfo(a.dtype).max
    bad = ov & nb & ~na
    bad |= ov & ib & ia & (a64 != b64)
    bad |= ov & ib & fa & ~((torch.sign(a64) == torch.sign(b64)) & (big - a64.abs() <= tol))
    if bool(bad.any()):
        raise OracleError(f"{what}: {a.tolist()} vs reference {b.tolist()} where an "
                          f"intermediate may overflow: not an overflow outcome")
    fin = fa & fb
    err = (a64[fin] - b64[fin]).abs()
    bound = tol[fin] + 2.4e-7 * b64[fin].abs() + floor
    if bool((err > bound).any()):
        raise OracleError(f"{what}: {a.tolist()} vs reference {b.tolist()} (tol {tol.tolist()})")


def _abs_sums(spec, L):
    """Per-group sums of |terms| of the backward, in fp64: ``ar`` = sum |u * r| (r = the
    scale-gradient factor of each element, Qp / Qn when clipped) and ``ahl`` = sum |u| over
    the clipped elements. Each comes twice: without NaN / Inf terms (the tolerance scale)
    and with Inf terms kept (``mr``, ``mhl``: bounds on the kernels' intermediates)."""
    x, gy, scale, bits = L["x"], L["grad_y"], L["scale"], L["bits"]
    offset = L.get("offset")
    outer, G, inner = reference.group_shape(x.shape, spec["dim"], bits.numel())
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    bmin, bmax = spec["bits_min"], spec["bits_max"]
    bhat = torch.round(bits.double().clamp(bmin, bmax))
    col = (bhat - bmin).long()
    rows = torch.zeros(G, dtype=torch.long) if scale.shape[0] == 1 else torch.arange(G)
    s = scale.to(work)[rows, col].view(1, G, 1)
    beta = (offset.to(work)[rows, col] if offset is not None else torch.zeros(G, dtype=work)
            ).view(1, G, 1)
    if spec["signed"]:
        qn, qp = -torch.pow(2.0, bhat - 1), torch.pow(2.0, bhat - 1) - 1
    else:
        qn, qp = torch.zeros_like(bhat), torch.pow(2.0, bhat) - 1
    qn3, qp3 = qn.to(work).view(1, G, 1), qp.to(work).view(1, G, 1)
    v = (x.to(work).reshape(outer, G, inner) - beta) / s
    u = gy.to(torch.float64).reshape(outer, G, inner).abs()
    hi, lo = v > qp3, v < qn3
    inside = ~(hi | lo)
    r = torch.round(torch.where(hi, qp3, torch.where(lo, qn3, v))) - torch.where(inside, v, 0)
    t_r, t_hl = u * r.double().abs(), torch.where(hi | lo, u, 0)
    ar = torch.nan_to_num(t_r, nan=0.0, posinf=0.0).sum(dim=(0, 2))
    ahl = torch.nan_to_num(t_hl, nan=0.0, posinf=0.0).sum(dim=(0, 2))
    mr = torch.where(torch.isnan(t_r), 0, t_r).sum(dim=(0, 2))
    mhl = torch.where(torch.isnan(t_hl), 0, t_hl).sum(dim=(0, 2))
    return rows, col, bhat, qp, s.view(G).double(), ar, ahl, mr, mhl, outer * inner


def _per_slot(shape, rows, col, per_group):
    """Group values summed into their scale-table slots (a shared table sums groups)."""
    out = torch.zeros(shape, dtype=torch.float64)
    out.index_put_((rows, col), per_group.double(), accumulate=True)
    return out


def check_backward(spec, L, gx, gs, gb, go):
    """Compare a backward result with the closed forms of qvit.reference."""
    lsq = spec["kw"].get("lsq_grad_scale", -1.0) if spec["entry"] == "bwd" \
        else spec["kw"].get("grad_scale")
    gscale = None if lsq is None or lsq < 0 else lsq
    r = reference.fake_quant_backward(
        L["grad_y"], L["x"], L["scale"], L["bits"], L.get("offset"), signed=spec["signed"],
        dim=spec["dim"], bits_range=(spec["bits_min"], spec["bits_max"]), grad_scale=gscale)
    if L["x"].numel() == 0:
        # Contract (ops.fake_quant docstring, fq_cpu.c): an empty x has all-zero
        # gradients. The reference's LSQ factor 1/sqrt(0 * Qp) makes its scale
        # gradient NaN there (reported); the kernels are held to the contract.
        r = (r[0], torch.zeros_like(r[1]), torch.zeros_like(r[2]),
             None if r[3] is None else torch.zeros_like(r[3]))
    if gx is not None:
        _same_exact(gx, r[0], "grad_x")
    rows, col, bhat, qp, s, ar, ahl, mr, mhl, n_group = _abs_sums(spec, L)
    rtol = RTOL.get(L["x"].dtype, RTOL_DEFAULT)
    big = torch.finfo(L["scale"].dtype).max
    factor = (torch.full_like(qp, gscale) if gscale is not None
              else 1.0 / torch.sqrt(n_group * qp)) if n_group else torch.zeros_like(qp)
    shape = L["scale"].shape
    # bounds on the intermediates: the running sums, then the scaled result
    m_s = torch.maximum(mr, mhl) * torch.clamp(factor, min=1.0)
    if gs is not None:
        # floor: fp32 products that underflow in the kernel but not in fp64
        _close(gs, r[1], _per_slot(shape, rows, col, factor * ar * rtol), "grad_scale",
               floor=1e-36 * (1.0 + float(factor.max())),
               may_overflow=~(_per_slot(shape, rows, col, m_s) <= big))
    coef = s.abs() * math.log(2) * torch.pow(2.0, bhat - 1 if spec["signed"] else bhat)
    if gb is not None:
        m_b = mhl * torch.clamp(coef, min=1.0)
        _close(gb, r[2], coef * ahl * rtol, "grad_bits", may_overflow=~(m_b <= big))
    if L.get("offset") is not None and go is not None:
        _close(go, r[3], _per_slot(shape, rows, col, ahl * rtol), "grad_offset",
               may_overflow=~(_per_slot(shape, rows, col, mhl) <= big))


def check_forward(spec, L, y):
    r = reference.fake_quant_forward(L["x"], L["scale"], L["bits"], L.get("offset"),
                                     signed=spec["signed"], dim=spec["dim"],
                                     bits_range=(spec["bits_min"], spec["bits_max"]))
    _same_exact(y, r, "y")


def _as_torch(obj) -> torch.Tensor:
    if isinstance(obj, torch.Tensor):
        return obj.detach()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.array(obj))
    raise OracleError(f"unexpected output object {type(obj).__name__}")


# ---------------------------------------------------------------------------
# running one case
# ---------------------------------------------------------------------------

def _value_faults(spec, L):
    """Faults in the parameter *values* as finally built (not as drawn: an
    expanded view or a later special can overwrite a drawn one)."""
    out = []
    checks = {"scale": lambda t: bool((~torch.isfinite(t) | (t <= 0)).any()),
              "bits": lambda t: bool((~torch.isfinite(t)).any()),
              "offset": lambda t: bool((~torch.isfinite(t)).any())}
    for arg, bad in checks.items():
        t = L.get(arg)
        if t is not None and t.is_floating_point() and t.numel() and bad(t.double()):
            out.append({"arg": arg, "what": "value", "producer": False})
    return out


def _faults_definite(spec, L):
    """Faults that must be rejected (the '-maybe' ones depend on the exact layout)."""
    out = [f for f in spec["faults"] if not f["what"].endswith("-maybe")
           and not (f["what"] == "value" and f["arg"] in ("scale", "bits", "offset"))]
    out += _value_faults(spec, L)
    if spec["entry"] == "op" and math.prod(spec["shape"]) == 0:
        # qvit.ops returns an empty result before the kernel reads the
        # parameter tables, so bad table *values* pass with an empty x (reported).
        out = [f for f in out if f["what"] != "value" or f["arg"] == "grad_scale"]
    return out


def _maybe_faults_real(spec, objs):
    """Whether a '-maybe' fault really produced an invalid tensor."""
    real = []
    for f in spec["faults"]:
        if not f["what"].endswith("-maybe"):
            continue
        obj = objs.get(f["arg"])
        what = f["what"]
        if what == "contiguous-maybe":
            if isinstance(obj, torch.Tensor) and not obj.is_contiguous():
                real.append(f)
            elif isinstance(obj, np.ndarray) and not obj.flags.c_contiguous:
                real.append(f)
            elif spec["tensors"][f["arg"]]["kind"] == "raw":
                shape = [d for d in _logical_shape(spec, f["arg"]) if True]
                if math.prod(shape) > 1:
                    real.append(f)
        elif what == "alignment-maybe":
            dt = spec["dtype"] if f["arg"] in ("x", "grad_y", "y", "grad_x") \
                else spec["param_dtype"]
            if TORCH_DT[dt].itemsize > 1 and _numel(spec, f["arg"]) > 0:
                real.append(f)
        elif what == "null-maybe":
            if _numel(spec, f["arg"]) > 0:
                real.append(f)
    return real


def _logical_shape(spec, arg):
    return spec.get("_shapes", {}).get(arg, [])


def _numel(spec, arg):
    return math.prod(_logical_shape(spec, arg))


def build(spec):
    """(args, kwargs, holder, logical values, objects by name) of a binding / op call."""
    L = _logical(spec)
    holder = Holder()
    entry = spec["entry"]
    objs: Dict[str, Any] = {}
    like = {"y": "x", "grad_x": "x", "grad_scale": "scale", "grad_bits": "bits",
            "grad_offset": "offset"}
    shapes = {}
    for name, desc in spec["tensors"].items():
        if name in L:
            t = L[name]
        else:
            t = torch.zeros_like(L[like[name]])
            if desc.get("wrong_shape"):
                t = torch.zeros(list(t.shape) + [2], dtype=t.dtype) if t.dim() < 3 \
                    else t.reshape(-1)
            if desc.get("wrong_dtype"):
                t = t.to(torch.float64 if t.dtype != torch.float64 else torch.float32)
            t.fill_(-7.0 if t.is_floating_point() else 1)  # poison: outputs must be fully written
        shapes[name] = list(t.shape)
        if desc["kind"] == "auto":
            objs[name] = None
            continue
        objs[name] = _contain(t, desc, name, holder, spec)
        if name in L and "expanded" in desc["mods"] and isinstance(objs[name], torch.Tensor):
            L[name] = objs[name].detach().contiguous()  # expanding changed the values
    spec["_shapes"] = shapes
    if spec.get("alias_y_x") and isinstance(objs.get("x"), (torch.Tensor, np.ndarray)) \
            and spec["tensors"]["y"]["kind"] == spec["tensors"]["x"]["kind"]:
        objs["y"] = objs["x"]
        holder.readers["y"] = holder.readers.get("x")
    return L, holder, objs


def call(spec, objs):
    entry = spec["entry"]
    kw = {"dim": spec.get("dim_raw", spec["dim"]), "signed": spec["signed"],
          "bits_min": spec["bits_min"], "bits_max": spec["bits_max"]}
    if entry == "op":
        x, scale, bits = objs["x"], objs["scale"], objs["bits"]
        offset = objs.get("offset")
        rg = spec.get("requires_grad", [False] * 4)
        leaves = []
        for i, t in enumerate((x, scale, bits, offset)):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and rg[i] and t.is_leaf:
                t.requires_grad_(True)
            leaves.append(t)
        y = ops.fake_quant(x, scale, bits, offset, signed=spec["signed"], dim=kw["dim"],
                           bits_range=(spec["bits_min"], spec["bits_max"]),
                           grad_scale=spec["kw"]["grad_scale"])
        grads = None
        if y.requires_grad:
            gy = objs.get("_gy")
            wrt = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
            grads = torch.autograd.grad(y, wrt, gy, allow_unused=True)
            grads = dict(zip([i for i, t in enumerate(leaves)
                              if isinstance(t, torch.Tensor) and t.requires_grad], grads))
        return y, grads
    kw.update({k: v for k, v in spec["kw"].items()})
    if "drop_kw" in spec:
        kw.pop(spec["drop_kw"])
    if entry == "fwd":
        pos = [objs["x"], objs["scale"], objs["bits"], objs.get("offset"), objs["y"]]
        fn = _C.fq_forward
    else:
        pos = [objs["grad_y"], objs["x"], objs["scale"], objs["bits"], objs.get("offset"),
               objs["grad_x"], objs["grad_scale"], objs["grad_bits"], objs.get("grad_offset")]
        fn = _C.fq_backward
    how = spec.get("parse")
    if how == "unknown_kw":
        kw["bogus"] = 1
    elif how == "extra_pos":
        pos.append(kw.pop("dim"))
    elif how == "dup":
        kw["x"] = objs["x"]
    elif how == "missing_pos":
        pos = pos[1:]
        kw.pop("dim", None)
    elif how == "bits_min_huge":
        kw["bits_min"] = 2**40
    elif how == "num_threads_float":
        kw["num_threads"] = 2.0
    elif how == "signed_array":
        kw["signed"] = np.array([1, 0])
    elif how == "stream_str":
        kw["stream"] = "not a stream"  # ignored on the CPU
    return fn(*pos, **kw), None


def run_spec(spec: Dict[str, Any]) -> str:
    """Build, call, check. Returns an outcome signature; raises OracleError on a violation."""
    spec = json.loads(json.dumps(spec))  # private copy (build() annotates it)
    if spec["entry"] != "op" and _C is None:
        return "skip:no-C"
    L, holder, objs = build(spec)
    if spec["entry"] == "op":
        objs["_gy"] = L["grad_y"]
    # tensors only: shared objects (None, small ints, interned str) have
    # refcounts that other code may move at any time
    tracked = [o for k, o in objs.items() if not k.startswith("_")
               and (isinstance(o, (torch.Tensor, np.ndarray))
                    or type(o).__name__ == "PyCapsule")]
    ref0 = [sys.getrefcount(o) for o in tracked]
    faults = _faults_definite(spec, L) + _maybe_faults_real(spec, objs)
    result, grads, exc = None, None, None
    try:
        result, grads = call(spec, objs)
    except ALLOWED + PRODUCER + (MemoryError,) as e:  # noqa: B014
        exc = (type(e).__name__, str(e))
    if exc is not None:
        etype, msg = exc
        if not faults:
            raise OracleError(f"valid case raised {etype}: {msg}")
        producer = any(f["producer"] for f in faults)
        if etype in ("BufferError", "RuntimeError") and not producer and not any(
                spec["tensors"].get(f["arg"], {}).get("kind") == "numpy" for f in faults):
            raise OracleError(f"{etype} for a non-producer fault {faults}: {msg}")
        if etype == "MemoryError":
            raise OracleError(f"MemoryError: {msg}")
        outcome = f"raised:{etype}"
        if len({f["arg"] for f in faults}) == 1 and not producer:
            arg = faults[0]["arg"]
            names = {arg, arg.replace("_", " "), "bits_range" if arg == "bits_min" else arg,
                     "grad_scale" if arg == "lsq_grad_scale" else arg}
            if faults[0]["what"] == "groups":
                names |= {"dim", "x", "groups"}
            if not any(n in msg for n in names) and etype != "OverflowError" \
                    and "DLPack" not in msg:
                outcome += ":unnamed"  # soft finding: the message does not name the argument
    else:
        if faults:
            raise OracleError(f"accepted a faulty case {faults}")
        _check_result(spec, L, holder, objs, result, grads)
        outcome = "ok"
    del result, grads
    ref1 = [sys.getrefcount(o) for o in tracked]
    if ref0 != ref1:
        raise OracleError(f"input reference counts changed: {ref0} -> {ref1}")
    return f"{spec['entry']}:{outcome}"


def _check_result(spec, L, holder, objs, result, grads):
    entry = spec["entry"]
    if entry == "op" and L["x"].numel() == 0:
        # ops.py answers an empty x without the kernel: empty y, zero gradients
        y = result.detach()
        if y.shape != L["x"].shape or y.dtype != L["x"].dtype:
            raise OracleError(f"empty x: y is {tuple(y.shape)} {y.dtype}")
        for i, g in (grads or {}).items():
            if g is not None and bool((g != 0).any()):
                raise OracleError(f"empty x: gradient {i} is not zero: {g}")
        return
    if entry == "op":
        check_forward(spec, L, result.detach())
        if grads:
            check_backward(spec, L, *[grads.get(i) for i in range(4)])
        return
    if entry == "fwd":
        y = result if spec["tensors"]["y"]["kind"] == "auto" else None
        if y is None:
            if result is not objs["y"]:
                raise OracleError("fq_forward did not return the y it was given")
            y = holder.readers["y"]()
        check_forward(spec, L, _as_torch(y).view(L["x"].shape))
        return
    if not isinstance(result, tuple) or len(result) != 4:
        raise OracleError(f"fq_backward returned {type(result).__name__}")
    names = ["grad_x", "grad_scale", "grad_bits", "grad_offset"]
    outs = []
    for name, got in zip(names, result):
        if name not in spec["tensors"]:
            if got is not None:
                raise OracleError("grad_offset returned without an offset")
            outs.append(None)
            continue
        if spec["tensors"][name]["kind"] == "auto":
            outs.append(_as_torch(got))
        else:
            if got is not objs[name]:
                raise OracleError(f"fq_backward did not return the {name} it was given")
            outs.append(holder.readers[name]())
    like = {"grad_x": "x", "grad_scale": "scale", "grad_bits": "bits", "grad_offset": "offset"}
    outs = [o if o is None else o.reshape(L[like[n]].shape) for n, o in zip(names, outs)]
    check_backward(spec, L, *outs)


# ---------------------------------------------------------------------------
# drivers
# ---------------------------------------------------------------------------

def fuzz(seconds: float, cases: Optional[int], seed: int, save: Optional[str],
         crash_file: Optional[str], hang_s: float = 60.0, verbose: bool = False) -> int:
    rng = random.Random(seed)
    t0 = time.time()
    n, sigs, failures = 0, {}, 0
    while (cases is None or n < cases) and (cases is not None or time.time() - t0 < seconds):
        spec = gen_spec(Source(rng=rng))
        if crash_file:
            with open(crash_file, "w") as f:
                json.dump(spec, f)
        faulthandler.dump_traceback_later(hang_s, exit=True)
        try:
            sig = run_spec(spec)
        except OracleError as e:
            failures += 1
            sig = "FAIL:" + str(e).split(":")[0]
            print(f"FAIL {e}\n  spec: {json.dumps(spec)}", flush=True)
            if save:
                os.makedirs(save, exist_ok=True)
                with open(os.path.join(save, f"fail_{failures:04d}.json"), "w") as f:
                    json.dump({"name": str(e)[:200], "spec": spec}, f, indent=1)
        finally:
            faulthandler.cancel_dump_traceback_later()
        n += 1
        key = sig + "|" + ",".join(sorted({f["what"] for f in spec["faults"]}))
        if sig.endswith(":ok"):  # valid cases: one per feature combination
            t = spec["tensors"]
            key += "|" + ",".join(str(v) for v in (
                spec["dtype"], spec["groups"] > 1, spec["scale_rows"] > 1, spec["offset"],
                spec["signed"], bool(spec["x_special"]), bool(spec["gy_special"]),
                "-".join(sorted({d["kind"] for d in t.values()})),
                "-".join(sorted({m for d in t.values() for m in d["mods"]}))))
        if key not in sigs:
            sigs[key] = 0
            if verbose:
                print(f"new outcome {key}", flush=True)
            if save:
                os.makedirs(save, exist_ok=True)
                with open(os.path.join(save, f"case_{len(sigs):04d}.json"), "w") as f:
                    json.dump({"name": key, "spec": spec}, f, indent=1)
        sigs[key] += 1
        if n % 2000 == 0:
            gc.collect()  # slow with torch loaded (~0.3 s): rarely
    dt = time.time() - t0
    by = {}
    for k, c in sigs.items():
        head = k.split("|")[0]
        by[head] = by.get(head, 0) + c
    print(f"fuzz: {n} cases in {dt:.1f} s, {len(sigs)} outcome classes, {failures} failures")
    for k in sorted(by):
        print(f"  {k:40s} {by[k]}")
    return failures


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def leak_check(calls: int, seed: int = 1, max_rss_mb: float = 8.0,
               max_traced_kb: float = 256.0, max_numel: int = 4096) -> bool:
    """Run a fixed mix of cases `calls` times after a warm-up; RSS / tracemalloc must not grow."""
    import tracemalloc
    rng = random.Random(seed)
    mix = []
    while len(mix) < 60:
        s = gen_spec(Source(rng=rng))
        if math.prod(s["shape"]) <= max_numel and s["entry"] != "op":
            mix.append(s)
    for s in mix * 2:  # warm-up: caches, allocator pools, lazy imports
        try:
            run_spec(s)
        except OracleError:
            pass
    gc.collect()
    tracemalloc.start()
    rss0, tm0 = _rss_mb(), tracemalloc.get_traced_memory()[0]
    for i in range(calls):
        try:
            run_spec(mix[i % len(mix)])
        except OracleError:
            pass
    gc.collect()
    rss1, tm1 = _rss_mb(), tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    d_rss, d_tm = rss1 - rss0, (tm1 - tm0) / 1024
    ok = d_rss <= max_rss_mb and d_tm <= max_traced_kb
    print(f"leak: {calls} calls, RSS {rss0:.1f} -> {rss1:.1f} MiB ({d_rss:+.2f}), "
          f"tracemalloc {d_tm:+.1f} KiB: {'ok' if ok else 'GROWING'}")
    return ok


def _atheris_main(argv):  # pragma: no cover - optional dependency
    import atheris

    def one(data: bytes):
        spec = gen_spec(Source(data=data))
        try:
            run_spec(spec)
        except OracleError as e:
            raise AssertionError(f"{e}\nspec: {json.dumps(spec)}") from None

    # Coverage of the Python side: this harness (the generator's branches are
    # the input classes) and the op layer. The C layer is not instrumented.
    import types
    for mod in (sys.modules[__name__], ops, reference):
        for obj in list(vars(mod).values()):
            if isinstance(obj, types.FunctionType) and obj.__module__ == mod.__name__:
                atheris.instrument_func(obj)
    atheris.Setup(argv, one)
    atheris.Fuzz()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--cases", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", default=None)
    p.add_argument("--crash-file", default=None)
    p.add_argument("--leak", type=int, default=0, metavar="N")
    p.add_argument("--atheris", action="store_true")
    p.add_argument("--replay", nargs="*", default=None, metavar="JSON")
    p.add_argument("-v", "--verbose", action="store_true")
    a, rest = p.parse_known_args(argv)
    torch.manual_seed(a.seed)
    if a.atheris:
        _atheris_main([sys.argv[0]] + rest)
        return 0
    rc = 0
    if a.replay is not None:
        for path in a.replay:
            with open(path) as f:
                case = json.load(f)
            spec = case.get("spec", case)
            try:
                print(path, run_spec(spec))
            except OracleError as e:
                print(path, "FAIL", e)
                rc = 1
        return rc
    if a.leak:
        rc |= 0 if leak_check(a.leak) else 1
    if a.seconds > 0 or a.cases:
        rc |= 1 if fuzz(a.seconds, a.cases, a.seed, a.save, a.crash_file,
                        verbose=a.verbose) else 0
    return rc


if __name__ == "__main__":
    sys.exit(main())
