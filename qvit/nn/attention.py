"""Quantized multi-head attention for timm ViT/DeiT ``Attention`` and Swin ``WindowAttention``.

Quantized (Q-ViT, Li et al. 2022, ``docs/design.md`` section 5.2): the qkv
input and weights, q, k, v, the softmax output (unsigned, after attention
dropout), the A·V output (the proj input) and the proj weights. Float: the
1/sqrt(d) scaling, the relative position bias, masks, softmax and any q/k norm.

Head-wise groups follow the memory layout of timm's fused qkv: output row
``r`` of the qkv weight belongs to (s, h) = (r // A, (r % A) // d) with
``A = heads * d``, so W_q/W_k/W_v are grouped by **output rows** per head
(3H groups along dim 0) and W_proj by **input columns** per head (H groups
along dim 1). ``QViTConfig.weight_grouping="transposed"`` reproduces the
released research code instead, which groups the transposed axis (input
columns of W_q/W_k/W_v, output rows of W_proj; not head-aligned). The qkv
weight quantizer stands for three (W_q, W_k, W_v: ``units=3``). q, k and v are fake-quantized in one op call on the qkv
output viewed as ``[B*N, 3H, d]`` (contiguous, no copies), with the three
quantizers' bit and scale tables concatenated.

The explicit attention path is always taken (never SDPA), since the softmax
output must be quantized.

Both classes are built from the constructor arguments of the timm layer they
replace plus ``qconfig=`` (``QAttention(dim, num_heads=6, qkv_bias=True,
qconfig=cfg)``; see :mod:`._dropin`), or from a timm module with ``from_float``.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor, nn

from .config import QuantizerConfig
from .quantizer import Quantizer, fused_fake_quant, fused_ok
from . import functional as QF
from ._adopt import adopt, to_float
from ._dropin import DropIn, resolve_qconfig, timm_class
from .linear import QLinear, _args
from .cost import Operand, Term, columns, total

__all__ = ["QAttention", "QWindowAttention", "QKVColumnGroups"]


class QKVColumnGroups(QLinear):
    """The fused qkv linear with the research code's weight grouping.

    Group ``(s, h)`` of the ``[3C, C_in]`` weight is the ``h``-th block of
    ``C_in / H`` **input columns** of W_s (s = q, k, v), 3H groups; the
    quantizer sees the weight as ``[C, 3H, C_in / H]`` (``dim=1``), a copy
    (:meth:`weight_layout`). On the kernels the layer is one
    :func:`~qvit.nn.functional.qlinear` node that keeps ``x`` and the weight
    Parameter only. BitOPs: ``C * sum_s sum_j b_w[s, j] b_a[j]`` per position.
    """

    heads: int

    def weight_layout(self) -> QF.WeightLayout:
        """``[3C, C_in]`` -> ``[C, 3H, C_in / H]`` (group index ``s*H + h``)."""
        c3, cin = self.weight.shape
        h = self.heads
        return QF.WeightLayout((c3, cin), (3, c3 // 3, h, cin // h), (1, 0, 2, 3),
                               (c3 // 3, 3 * h, cin // h))

    def weight_to_groups(self, w: Tensor) -> Tensor:
        """``[3C, C_in]`` -> ``[C, 3H, C_in / H]`` (group index ``s*H + h``)."""
        return QF.to_groups(w, self.weight_layout())

    def weight_from_groups(self, wg: Tensor) -> Tensor:
        return QF.from_groups(wg, self.weight_layout())

    def forward(self, x: Tensor) -> Tensor:
        self.positions = x.numel() // self.in_features
        wq = self.weight_quant
        if fused_ok() and (wq is None or wq.ready() or not wq.enabled):
            # one autograd node that keeps only the float x (and the weight Parameter)
            lay = self.weight_layout()
            wargs = None
            if wq is not None and wq.enabled:
                wq.last_numel = self.weight.numel()
                wargs = wq.args_for_shape(lay.grouped, self.weight.dtype, self.weight.device)
            return QF.qlinear(x, self.weight, self.bias, _args(self.act_quant, x), wargs, lay)
        # composite: the reference op, or a weight quantizer still to be fitted or observing
        if self.act_quant is not None:
            x = self.act_quant(x)
        w = self.weight
        if wq is not None:
            w = self.weight_from_groups(wq(self.weight_to_groups(w)))
        return torch.nn.functional.linear(x, w, self.bias)

    @torch.no_grad()
    def init_weight_quantizers(self) -> None:
        if self.weight_quant is not None and self.weight_quant.enabled:
            self.weight_quant.init_from(self.weight_to_groups(self.weight))

    def _rows(self):
        """``(first group, groups)`` of W_q, W_k, W_v in the weight quantizer (3H groups)."""
        if self.weight_quant is None:
            return [(0, None)] * 3
        per = self.weight_quant.groups // 3
        return [(s * per, per) for s in range(3)]

    def qvit_bitops_terms(self) -> List[Term]:
        coef = float(self.out_features // 3 * self.positions)
        return [t for lo, n in self._rows()
                for t in columns(coef, self.weight_quant, self.act_quant, self.in_features, lo, n)]

    def qvit_size_terms(self) -> List[Term]:
        c = float(self.out_features // 3)
        return [Term(c, total(self.weight_quant, self.in_features, lo, n)) for lo, n in self._rows()]


class _QAttentionBase(DropIn, nn.Module):
    """Shared construction and accounting; subclasses write ``forward``."""

    _OPTIONS = ("keep_float",)
    _TIMM = ""  # "module:Class" of the timm layer replaced
    _WINDOW = False  # Swin window attention (relative position bias)

    @classmethod
    def _float_cls(cls) -> type:
        return timm_class(cls._TIMM)

    @classmethod
    def from_float(cls, attn: nn.Module, qconfig=None, *, keep_float=()) -> "_QAttentionBase":
        """``attn`` (same Parameters and buffers) with the attention quantizers of ``qconfig``.

        Args:
            attn: a timm attention module (``qkv`` and ``proj`` linears, ``num_heads``).
            qconfig: a :class:`~qvit.nn.config.QViTConfig` or preset name (``None``:
                the current :func:`~qvit.nn.default_qconfig`): ``weight`` / ``act``
                for the qkv, proj (and gate) linears, ``attn`` for q, k, v and the
                proj input, ``attn_probs`` for the softmax output, ``head_wise``.
            keep_float: names among ``"qkv"``, ``"proj"``, ``"gate"`` left in float.

        Raises:
            TypeError: ``attn`` is not a timm attention module, or ``qconfig`` is
                not a model-wide config (this layer has five quantizer sites).
        """
        heads = getattr(attn, "num_heads", None)
        if not (isinstance(getattr(attn, "qkv", None), nn.Linear)
                and isinstance(getattr(attn, "proj", None), nn.Linear)
                and isinstance(heads, int) and not isinstance(attn, _QAttentionBase)
                and hasattr(attn, "relative_position_bias_table") == cls._WINDOW):
            kind = "window attention module (relative position bias)" if cls._WINDOW else \
                "attention module without relative position bias"
            raise TypeError(f"{cls.__name__}.from_float needs a float timm {kind}, qkv and proj "
                            f"linears and num_heads; got {type(attn).__name__}")
        name = f"{cls.__name__}(dim={attn.qkv.in_features}, num_heads={heads})"
        cfg = resolve_qconfig(qconfig, name)
        keep = set(keep_float)
        if not keep <= {"qkv", "proj", "gate"}:
            raise ValueError(f"{name}: keep_float={sorted(keep)}; expected names among qkv, proj, gate")
        new = cls.from_attention(attn, weight=cfg.weight, act=cfg.act, attn_cfg=cfg.attn,
                                 probs=cfg.attn_probs, head_wise=cfg.head_wise,
                                 weight_grouping=cfg.weight_grouping,
                                 quantize_qkv="qkv" not in keep, quantize_proj="proj" not in keep)
        gate = getattr(new, "gate", None)
        if isinstance(gate, nn.Linear) and not isinstance(gate, QLinear) and "gate" not in keep:
            new.gate = QLinear.from_float(gate, cfg)
        return new

    q_quant: Quantizer
    k_quant: Quantizer
    v_quant: Quantizer
    attn_quant: Quantizer

    @classmethod
    def from_attention(cls, attn: nn.Module, *, weight: Optional[QuantizerConfig],
                       act: Optional[QuantizerConfig], attn_cfg: Optional[QuantizerConfig],
                       probs: Optional[QuantizerConfig], head_wise: bool = False,
                       quantize_qkv: bool = True, quantize_proj: bool = True,
                       weight_grouping: str = "head"):
        """Wrap a timm attention module; ``None`` configs leave that site in float.

        ``quantize_qkv`` / ``quantize_proj`` False keep those linears plain float.
        ``weight_grouping``: see :class:`~qvit.nn.config.QViTConfig`.
        """
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        adopt(self, attn)
        heads = int(attn.num_heads)
        qkv, proj = attn.qkv, attn.proj
        if qkv.out_features % (3 * heads):
            raise ValueError(f"qkv.out_features={qkv.out_features} is not 3 x num_heads={heads} heads")
        d = qkv.out_features // (3 * heads)
        self.num_heads_q = heads
        self.head_dim_q = d
        self.head_wise = head_wise
        dev = qkv.weight.device

        def gran(cfg):
            if cfg is None:
                return None
            return cfg.replace(granularity="head") if head_wise else (
                cfg.replace(granularity="tensor") if cfg.granularity == "head" else cfg)

        w_att = gran(weight)
        a_att = gran(attn_cfg)
        p_att = gran(probs)
        transposed = (weight_grouping == "transposed" and w_att is not None
                      and w_att.granularity == "head")
        if quantize_qkv:
            wg = None
            if w_att is not None:
                wg = {"head": 3 * heads, "tensor": 3, "channel": qkv.out_features}[w_att.granularity]
            a_in = act.replace(granularity="tensor") if act is not None and act.granularity == "head" else act
            if transposed:
                if qkv.in_features % heads:
                    raise ValueError(f"qkv.in_features={qkv.in_features} is not divisible by "
                                     f"num_heads={heads} (weight_grouping='transposed')")
                self.qkv = QKVColumnGroups.from_linear(qkv, None, a_in)
                self.qkv.heads = heads
                self.qkv.weight_quant = Quantizer(w_att, 3 * heads, 1, role="weight",
                                                  device=dev, units=3)
                self.qkv.weight_dim = 1
            else:
                self.qkv = QLinear.from_linear(qkv, w_att, a_in, weight_groups=wg, weight_dim=0,
                                               weight_units=3)
        else:
            self.qkv = qkv
        if quantize_proj:
            wg, wdim = None, 0
            if w_att is not None and w_att.granularity == "head":
                wg, wdim = heads, (0 if transposed else 1)
            ag = None
            if a_att is not None:
                ag = {"head": heads, "tensor": 1, "channel": proj.in_features}[a_att.granularity]
            self.proj = QLinear.from_linear(proj, w_att, a_att, weight_groups=wg, weight_dim=wdim,
                                            act_groups=ag)
        else:
            self.proj = proj

        def act_q(cfg):
            if cfg is None:
                return None
            g = heads if cfg.granularity in ("head", "channel") else 1
            return Quantizer(cfg.replace(granularity="head") if g > 1 else cfg, g, 1, device=dev)

        self.q_quant = act_q(a_att)
        self.k_quant = act_q(a_att)
        self.v_quant = act_q(a_att)
        self.attn_quant = act_q(p_att)
        self.attn_shape = (0, heads, 0, d)
        return self

    def to_float(self) -> nn.Module:
        """The timm module this was made from (same Parameters and buffers)."""
        return to_float(self)

    def _quant_qkv(self, qkv: Tensor, n_rows: int) -> Tensor:
        """Fake-quantize q, k, v in one call on the contiguous ``[rows, 3H, d]`` view."""
        qs = [self.q_quant, self.k_quant, self.v_quant]
        if any(q is None for q in qs):
            return qkv
        view = qkv.reshape(n_rows, 3 * self.num_heads_q, self.head_dim_q)
        return fused_fake_quant(view, qs, dim=1)

    def _fused_args(self, qkv: Tensor, n_rows: int):
        """Arguments of :func:`qvit.nn.functional.qattention`, or None when the
        composite path must run (reference op, a quantizer not ready, tables
        of different shapes, attention dropout)."""
        qs = (self.q_quant, self.k_quant, self.v_quant)
        p = self.attn_quant
        if not fused_ok() or any(q is None or not q.ready() for q in qs):
            return None
        if p is not None and not (p.ready() or not p.enabled):
            return None
        q0 = qs[0]
        if any(q.scale.shape != q0.scale.shape or q.groups != q0.groups
               or (q.offset is None) != (q0.offset is None) or q.signed != q0.signed
               or q.bits_range != q0.bits_range for q in qs):
            return None
        if self.training and getattr(self.attn_drop, "p", 0.0) > 0:
            return None
        H, d = self.num_heads_q, self.head_dim_q
        b_, n = n_rows // qkv.shape[1], qkv.shape[1]
        dt, dev = qkv.dtype, qkv.device
        for q in qs:
            q.last_numel = n_rows * H * d
        args = [q.args_for_shape((n_rows, H, d), dt, dev) for q in qs]
        pargs = None
        if p is not None:
            p.last_numel = b_ * H * n * n
            if p.enabled:
                pargs = p.args_for_shape((b_, H, n, n), dt, dev)
        return args, pargs

    def _maybe(self, q: Optional[Quantizer], x: Tensor) -> Tensor:
        return q(x) if q is not None else x

    def qvit_bitops_terms(self) -> List[Term]:
        """BitOPs of QK^T and A·V (the qkv and proj linears count themselves)."""
        b_, h, n, d = self.attn_shape
        macs = float(b_ * n * n * d)
        return (columns(macs, self.q_quant, self.k_quant, h)
                + columns(macs, self.attn_quant, self.v_quant, h))

    def qvit_head_terms(self) -> List[List[Term]]:
        """The BitOPs of QK^T + A·V of each head, as cost terms."""
        b_, h, n, d = self.attn_shape
        macs = float(b_ * n * n * d)

        def op(q, j):
            if q is None:
                return Operand(None, 0, 1, 1.0)
            g = j * q.groups // h
            return Operand(q, g, g + 1, 1.0)
        return [[Term(macs, op(self.q_quant, j), op(self.k_quant, j)),
                 Term(macs, op(self.attn_quant, j), op(self.v_quant, j))] for j in range(h)]

def _add_mask(attn: Tensor, attn_mask: Optional[Tensor], is_causal: bool) -> Tensor:
    n = attn.shape[-1]
    if is_causal:
        bias = attn.new_full((n, n), float("-inf")).triu_(1)
    elif attn_mask is None:
        return attn
    elif attn_mask.dtype == torch.bool:
        bias = torch.zeros_like(attn_mask, dtype=attn.dtype).masked_fill_(~attn_mask, float("-inf"))
    else:
        bias = attn_mask
    return attn + bias


class QAttention(_QAttentionBase):
    """Quantized timm ``Attention`` (ViT / DeiT). ``x: (B, N, C)``.

    Takes ``timm.layers.Attention``'s arguments (``dim, num_heads, qkv_bias,
    qk_norm, proj_drop, norm_layer, ...``, whatever the installed timm accepts)
    plus ``qconfig=``; timm's ``attn_layer`` slot needs a class, so pass
    ``QAttention`` (config from :func:`~qvit.nn.default_qconfig`) or
    ``QAttention.with_qconfig(cfg)``.
    """

    _TIMM = "timm.layers:Attention"

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None,
                is_causal: bool = False) -> Tensor:
        B, N, _ = x.shape
        H, d = self.num_heads_q, self.head_dim_q
        gate_mod = getattr(self, "gate", None)
        gate = gate_mod(x).sigmoid() if gate_mod is not None else None
        qkv = self.qkv(x)
        q_norm = getattr(self, "q_norm", None)
        k_norm = getattr(self, "k_norm", None)
        plain = ((q_norm is None or isinstance(q_norm, nn.Identity))
                 and (k_norm is None or isinstance(k_norm, nn.Identity)))
        fused = (self._fused_args(qkv, B * N) if plain and attn_mask is None and not is_causal
                 else None)
        if fused is not None:
            x = QF.qattention(qkv, H, self.scale, None, None, *fused)
            return self._out(x, B, N, gate)
        if plain:
            qkv = self._quant_qkv(qkv, B * N)
        q, k, v = qkv.reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)
        if not plain:
            q, k = q_norm(q), k_norm(k)
            q, k, v = (self._maybe(self.q_quant, q), self._maybe(self.k_quant, k),
                       self._maybe(self.v_quant, v))
        q = q * self.scale
        attn = q @ k.transpose(-2, -1)
        attn = _add_mask(attn, attn_mask, is_causal)
        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)
        attn = self._maybe(self.attn_quant, attn)
        return self._out(attn @ v, B, N, gate)

    def _out(self, x: Tensor, B: int, N: int, gate: Optional[Tensor]) -> Tensor:
        """``[B, H, N, d]`` attention output through norm, gate, proj and dropout."""
        H, d = self.num_heads_q, self.head_dim_q
        x = x.transpose(1, 2).reshape(B, N, H * d)
        norm = getattr(self, "norm", None)
        if norm is not None:
            x = norm(x)
        if gate is not None:
            x = x * gate
        x = self.proj(x)
        x = self.proj_drop(x)
        self.attn_shape = (B, H, N, d)
        return x


class QWindowAttention(_QAttentionBase):
    """Quantized Swin ``WindowAttention``; relative position bias and shift mask kept exactly.

    ``x: (num_windows*B, N, C)``, ``mask: (num_windows, N, N)`` or None.
    Takes the arguments of timm's Swin ``WindowAttention`` (``dim, num_heads,
    head_dim, window_size, qkv_bias, attn_drop, proj_drop``) plus ``qconfig=``.
    (timm's Swin block builds its ``WindowAttention`` itself: no slot takes a
    class; convert a Swin model with :func:`~qvit.quantize_model`.)
    """

    _TIMM = "timm.models.swin_transformer:WindowAttention"
    _WINDOW = True

    def _rel_pos_bias(self) -> Tensor:
        n = self.window_area
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(n, n, -1).permute(2, 0, 1).contiguous().unsqueeze(0)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        B_, N, _ = x.shape
        H, d = self.num_heads_q, self.head_dim_q
        qkv = self.qkv(x)
        fused = self._fused_args(qkv, B_ * N)
        if fused is not None:
            x = QF.qattention(qkv, H, self.scale, self._rel_pos_bias(), mask, *fused)
            x = self.proj_drop(self.proj(x.transpose(1, 2).reshape(B_, N, H * d)))
            self.attn_shape = (B_, H, N, d)
            return x
        qkv = self._quant_qkv(qkv, B_ * N)
        q, k, v = qkv.reshape(B_, N, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)
        q = q * self.scale
        attn = q @ k.transpose(-2, -1)
        attn = attn + self._rel_pos_bias()
        if mask is not None:
            num_win = mask.shape[0]
            attn = attn.view(-1, num_win, H, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, H, N, N)
        attn = self.softmax(attn)
        attn = self.attn_drop(attn)
        attn = self._maybe(self.attn_quant, attn)
        x = attn @ v
        x = x.transpose(1, 2).reshape(B_, N, H * d)
        x = self.proj(x)
        x = self.proj_drop(x)
        self.attn_shape = (B_, H, N, d)
        return x
