"""Per-layer / per-head bit-widths, BitOPs and size of a quantized model.

``report(model)`` reads the current rounded bits of every quantized layer (and,
when a forward has run, its BitOPs per image) into a :class:`Report`:
``rows`` (one dict per layer), ``table()`` (fixed-width text) and ``to_dict()``
(JSON-ready). ``plot_bits`` draws the learned per-layer and per-head bit-widths
(matplotlib, Agg backend).

Example::

    >>> model(images)
    >>> print(qvit.report(model).table())
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

import torch
from torch import nn

from . import budget as _budget
from ..nn import QAttention, QConv2d, QLinear, QWindowAttention
from ..nn.quantizer import Quantizer

__all__ = ["Report", "report", "plot_bits", "require_matplotlib"]


def _bits(q: Optional[Quantizer]) -> Optional[List[int]]:
    if q is None or not q.enabled:
        return None
    return [int(b) for b in q.rounded_bits().tolist()]


def _mean(b: Optional[List[int]]) -> Optional[float]:
    return sum(b) / len(b) if b else None


@dataclass
class Report:
    """Bit-widths and costs of a quantized model.

    Attributes:
        rows: one dict per quantized layer: ``layer``, ``kind`` (``linear``,
            ``conv``, ``attention``), ``w_bits`` / ``a_bits`` (per group, None if
            float), ``gbitops`` (per image, None before any forward),
            ``weight_kbit``; attention rows add ``heads`` and per-head
            ``q_bits``, ``k_bits``, ``v_bits``, ``probs_bits``, ``head_gbitops``.
        totals: ``gbitops``, ``size_mb`` (weights, 1e6 bytes), ``avg_weight_bits``,
            ``avg_act_bits``.
    """

    rows: List[Dict[str, Any]] = field(default_factory=list)
    totals: Dict[str, Optional[float]] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return {"rows": [dict(r) for r in self.rows], "totals": dict(self.totals)}

    def table(self) -> str:
        """Fixed-width text table, one line per layer, totals last."""
        def fmt_bits(b):
            if b is None:
                return "fp"
            if len(set(b)) == 1:
                return str(b[0]) if len(b) == 1 else f"{b[0]}x{len(b)}"
            return ",".join(str(x) for x in b)

        head = f"{'layer':<34} {'kind':<9} {'W bits':<14} {'A bits':<14} {'GBitOPs':>9} {'kbit':>9}"
        lines = [head, "-" * len(head)]
        for r in self.rows:
            if r["kind"] == "attention":
                w = "q" + fmt_bits(r["q_bits"]) + " k" + fmt_bits(r["k_bits"])
                a = "v" + fmt_bits(r["v_bits"]) + " A" + fmt_bits(r["probs_bits"])
            else:
                w, a = fmt_bits(r["w_bits"]), fmt_bits(r["a_bits"])
            g = "-" if r["gbitops"] is None else f"{r['gbitops']:.4f}"
            kb = "-" if r.get("weight_kbit") is None else f"{r['weight_kbit']:.1f}"
            lines.append(f"{r['layer'][:34]:<34} {r['kind']:<9} {w[:14]:<14} {a[:14]:<14} {g:>9} {kb:>9}")
        t = self.totals
        lines.append("-" * len(head))
        g = "-" if t.get("gbitops") is None else f"{t['gbitops']:.3f}"
        lines.append(f"total: {g} GBitOPs/image, {t.get('size_mb', float('nan')):.3f} MB weights, "
                     f"average bits W {t.get('avg_weight_bits', float('nan')):.2f} / "
                     f"A {t.get('avg_act_bits', float('nan')):.2f}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


@torch.no_grad()
def report(model: nn.Module) -> Report:
    """Collect per-layer / per-head bits, BitOPs per image and weight size of ``model``.

    Raises:
        ValueError: ``model`` has no quantized layers.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    try:
        per_layer = {k: float(v) for k, v in _budget.layer_bitops(model).items()}
        batch = _budget.batch_size(model)
    except RuntimeError:
        per_layer, batch = None, None
    rows = []
    for name, m in model.named_modules():
        if isinstance(m, (QLinear, QConv2d)):
            rows.append({
                "layer": name, "kind": "conv" if isinstance(m, QConv2d) else "linear",
                "first_last": bool(m.first_last),
                "w_bits": _bits(m.weight_quant), "a_bits": _bits(m.act_quant),
                "gbitops": per_layer[name] / 1e9 if per_layer is not None else None,
                "weight_kbit": float(_budget.layer_size_bits(m)) / 1e3,
            })
        elif isinstance(m, (QAttention, QWindowAttention)):
            row = {
                "layer": name, "kind": "attention", "first_last": False,
                "heads": m.num_heads_q,
                "q_bits": _bits(m.q_quant), "k_bits": _bits(m.k_quant),
                "v_bits": _bits(m.v_quant), "probs_bits": _bits(m.attn_quant),
                "w_bits": None, "a_bits": None,
                "gbitops": per_layer[name] / 1e9 if per_layer is not None else None,
                "weight_kbit": None,
            }
            if per_layer is not None:
                row["head_gbitops"] = [float(v) / batch / 1e9
                                       for v in _budget.head_bitops(m)]
            qkv_w = getattr(m.qkv, "weight_quant", None)
            proj_w = getattr(m.proj, "weight_quant", None)
            row["qkv_w_bits"] = _bits(qkv_w)
            row["proj_w_bits"] = _bits(proj_w)
            row["proj_a_bits"] = _bits(getattr(m.proj, "act_quant", None))
            rows.append(row)
    if not rows:
        raise ValueError("model has no quantized layers; call quantize_model first")
    avg = _budget.average_bits(model)
    totals = {
        "gbitops": sum(r["gbitops"] for r in rows) if per_layer is not None else None,
        "size_mb": float(_budget.model_size_bits(model)) / 8e6,
        "avg_weight_bits": avg["weights"],
        "avg_act_bits": avg["activations"],
    }
    return Report(rows, totals)


def _head_matrix(rep: Report):
    """Per attention layer and head: mean of the head's q, k, v, A, A·V and weight bits."""
    attn = [r for r in rep.rows if r["kind"] == "attention"]
    width = max((r["heads"] for r in attn), default=0)
    mat = []
    for r in attn:
        h = r["heads"]
        cols = []
        for i in range(h):
            vals = []
            for key in ("q_bits", "k_bits", "v_bits", "probs_bits", "proj_a_bits", "proj_w_bits"):
                b = r.get(key)
                if b:
                    vals.append(b[i * len(b) // h] if len(b) > 1 else b[0])
            w = r.get("qkv_w_bits")
            if w:
                per = len(w) // 3
                for s in range(3):
                    part = w[s * per:(s + 1) * per]
                    vals.append(part[i * len(part) // h] if len(part) > 1 else part[0])
            cols.append(sum(vals) / len(vals) if vals else float("nan"))
        mat.append(cols + [float("nan")] * (width - h))
    return [r["layer"] for r in attn], mat


def require_matplotlib() -> None:
    """Raise an ImportError that says how to install matplotlib (the ``demo`` extra)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install 'qvit[demo]' "
                          "(or pip install matplotlib)") from None


def plot_bits(model_or_report: Union[nn.Module, Report], path) -> str:
    """Write a PNG of per-layer weight / activation bits and per-head attention bits.

    Returns:
        ``path`` as a string.
    """
    require_matplotlib()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rep = model_or_report if isinstance(model_or_report, Report) else report(model_or_report)
    lin = [r for r in rep.rows if r["kind"] != "attention"]
    names, heads = _head_matrix(rep)
    nrows = 2 if names else 1
    fig, axes = plt.subplots(nrows, 1, figsize=(max(8, 0.25 * len(lin)), 4 * nrows), squeeze=False)
    ax = axes[0][0]
    xs = range(len(lin))
    ax.plot(xs, [_mean(r["w_bits"]) or float("nan") for r in lin], "o-", label="weights")
    ax.plot(xs, [_mean(r["a_bits"]) or float("nan") for r in lin], "s-", label="inputs")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([r["layer"] for r in lin], rotation=90, fontsize=6)
    ax.set_ylabel("bits (mean over groups)")
    ax.set_title("per-layer bit-widths")
    ax.legend()
    if names:
        ax = axes[1][0]
        im = ax.imshow(heads, aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names, fontsize=6)
        ax.set_xlabel("head")
        ax.set_xticks(range(max(len(r) for r in heads)))
        ax.set_title("per-head bits (mean of q, k, v, softmax, A·V; W_qkv rows, W_proj columns)")
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(str(path), dpi=100)
    plt.close(fig)
    return str(path)
