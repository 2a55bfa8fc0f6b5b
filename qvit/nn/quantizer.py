"""The Q-ViT quantizer module: learned bits, switchable scale table, optional offset.

One :class:`Quantizer` holds the state of one quantization site (Li et al.,
"Q-ViT", arXiv 2201.07703, ``docs/design.md`` section 2):

* ``bits [G]``: continuous bit-width per group (learned or fixed);
* ``scale [Gs, K]``: one step size per candidate bit-width (``K = max - min + 1``),
  per group (``Gs = G``) or one per quantizer shared by its groups (``Gs = U``,
  the number of quantizers the module stands for: 3 for the fused W_q/W_k/W_v,
  else 1); the active entry follows the rounded bit-width;
* ``offset [Gs, K]``: LSQ+ offset table (only with ``offset=True``).

Every table entry is initialised by the MSE fixed point for its own bit-width
(``q = round(clamp(x/s)); s <- <x,q>/<q,q>``; with offset alternating
``beta <- mean(x - s q)``, starting from ``beta = min(x)``), on the weights or
on pooled calibration batches (lazily on the first input otherwise). Two
starts (``QuantizerConfig.init``): ``"grid"``, the best point of a grid of
clipping ratios then a few iterations on a subsample, per table row
(:func:`mse_fit`); ``"official"``, the research code's ``max|x|/Qp`` start
iterated to convergence on every element of each quantizer (:func:`official_fit`).
The arithmetic is :func:`qvit.ops.fake_quant` (the pure-PyTorch reference when
the compiled extension cannot be imported).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from .. import ops
from ..ops import contract
from .config import QuantizerConfig
from .init_fit import _subsample, mse_fit, official_fit  # noqa: F401 (re-exported)

__all__ = ["Quantizer", "ste_bits", "mse_fit", "official_fit", "fused_fake_quant", "fake_quant"]

_BACKEND = None


def fake_quant(x, scale, bits, offset=None, **kw):
    """:func:`qvit.ops.fake_quant`, or the pure-PyTorch reference (same contract)
    when the compiled extension is not importable (warned once)."""
    if _BACKEND is None:
        _resolve_backend()
    return _BACKEND(x, scale, bits, offset, **kw)


def _resolve_backend():
    global _BACKEND
    if _BACKEND is None:
        info = ops.backend_info() if hasattr(ops, "backend_info") else {"c_loaded": True}
        if info.get("c_loaded", True):
            _BACKEND = ops.fake_quant
        else:
            import warnings
            from ..ops import reference
            warnings.warn("qvit._C is not available (%s); quantizers run on the pure-PyTorch "
                          "reference op" % info.get("c_import_error"), RuntimeWarning, stacklevel=3)
            _BACKEND = reference.fake_quant


def fused_ok() -> bool:
    """True when quantizers run on the compiled kernels (not the reference op),
    so layers may use the fused functions of :mod:`qvit.nn.functional`."""
    if _BACKEND is None:
        _resolve_backend()
    return _BACKEND is ops.fake_quant


def ste_bits(bits: Tensor, bits_range: Tuple[int, int]) -> Tensor:
    """``round(clamp(bits))`` in the forward, identity gradient in the backward."""
    lo, hi = bits_range
    return bits + (torch.round(bits.clamp(lo, hi)) - bits).detach()


class Quantizer(nn.Module):
    """Learnable fake quantizer of one site.

    Args:
        config: the :class:`~qvit.nn.config.QuantizerConfig`.
        groups: ``G``, the number of bit-width groups.
        dim: the dimension of the input split into ``G`` equal contiguous groups.
        first_last: marks a patch-embed / classifier quantizer (for budgets and reports).
        role: ``"weight"`` (initialised from the weight) or ``"act"`` (from data).
        units: how many quantizers of the research code this one stands for
            (``G % units == 0``, consecutive groups): 3 for the fused W_q/W_k/W_v
            weight. With ``shared_scale`` each unit gets one table; the
            official init fits each unit on its own.

    Shapes: ``x`` of any shape with ``x.shape[dim] % G == 0``; output like ``x``.

    Example::

        >>> q = Quantizer(QuantizerConfig(bits=4))
        >>> y = q(torch.randn(8, 16))   # initialised from this first batch
    """

    def __init__(self, config: QuantizerConfig, groups: int = 1, dim: int = 0,
                 first_last: bool = False, role: str = "act", device=None, units: int = 1):
        super().__init__()
        if not isinstance(config, QuantizerConfig):
            raise TypeError(f"config must be a QuantizerConfig, got {type(config).__name__}")
        if not isinstance(groups, int) or groups < 1:
            raise ValueError(f"groups must be a positive int, got {groups!r}")
        if not isinstance(units, int) or units < 1 or groups % units:
            raise ValueError(f"units must be a positive int dividing groups={groups}, got {units!r}")
        self.units = units
        self.config = config
        self.groups = groups
        self.dim = dim
        self.signed = config.signed
        self.bits_range = config.bits_range
        self.granularity = config.granularity if groups > 1 else "tensor"
        self.first_last = first_last
        if role not in ("weight", "act"):
            raise ValueError(f"role must be 'weight' or 'act', got {role!r}")
        self.role = role
        self.enabled = config.enabled
        k = config.num_scales
        gs = units if config.shared_scale else groups
        dd = dict(device=device, dtype=torch.float32)
        self.bits = nn.Parameter(torch.full((groups,), config.bits, **dd),
                                 requires_grad=config.learn_bits)
        self.scale = nn.Parameter(torch.ones(gs, k, **dd))
        self.offset = nn.Parameter(torch.zeros(gs, k, **dd)) if config.offset else None
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool, device=device))
        self.register_buffer("scale_floor", torch.full((gs, k), 1e-8, **dd))
        self._observing = False
        self._samples: List[Tensor] = []
        self.last_numel = 0
        # Python mirror of the `initialized` buffer, so the forward needs no
        # tensor-to-bool read (no host sync, no graph break under torch.compile)
        self._is_init = False

    # ----------------------------------------------------------------- state
    @property
    def learn_bits(self) -> bool:
        return self.config.learn_bits

    @property
    def num_scale_rows(self) -> int:
        return self.scale.shape[0]

    def rounded_bits(self) -> Tensor:
        """Current integer bit-width per group (no gradient)."""
        lo, hi = self.bits_range
        return torch.round(self.bits.detach().clamp(lo, hi))

    def ste_bits(self) -> Tensor:
        """Rounded bit-widths ``[G]`` with the straight-through gradient to ``bits``."""
        return ste_bits(self.bits, self.bits_range)

    def _expand(self, table: Optional[Tensor]) -> Optional[Tensor]:
        """A ``[Gs, K]`` table as the op takes it: ``[1, K]`` or ``[G, K]``."""
        if table is None or table.shape[0] in (1, self.groups):
            return table
        return table.repeat_interleave(self.groups // table.shape[0], dim=0)

    def expanded_tables(self) -> Tuple[Tensor, Optional[Tensor]]:
        """``scale`` (and ``offset``) as ``[G, K]`` tables, for fusing quantizers in one call."""
        g, k = self.groups, self.scale.shape[1]
        s = self._expand(self.scale).expand(g, k)
        o = self._expand(self.offset).expand(g, k) if self.offset is not None else None
        return s, o

    @torch.no_grad()
    def clamp_bits_(self) -> "Quantizer":
        """Project ``bits`` into ``bits_range`` and floor the scale table (call after each step)."""
        lo, hi = self.bits_range
        self.bits.clamp_(lo, hi)
        torch.maximum(self.scale, self.scale_floor, out=self.scale)
        return self

    @torch.no_grad()
    def set_bits_(self, bits) -> "Quantizer":
        """Set the bit-widths (a number or ``G`` values) in place."""
        value = torch.as_tensor(bits, dtype=self.bits.dtype, device=self.bits.device)
        lo, hi = self.bits_range
        if value.numel() not in (1, self.groups):
            raise ValueError(f"bits must have 1 or {self.groups} values, got {value.numel()}")
        if not bool(((value >= lo) & (value <= hi)).all()):
            raise ValueError(f"bits {value.tolist()} are outside bits_range {self.bits_range}")
        self.bits.copy_(value.expand(self.groups) if value.numel() == 1 else value.reshape(-1))
        return self

    # ------------------------------------------------------------------ init
    @property
    def _official(self) -> bool:
        return self.config.init == "official"

    def _fit_units(self) -> int:
        """Rows fitted at initialisation: one per unit (official) or per table row (grid)."""
        return self.units if self._official else self.scale.shape[0]

    def _grouped(self, x: Tensor) -> Tensor:
        """``x`` as ``[R, M]`` rows, one per fit (see ``_fit_units``); sub-sampled for ``grid``."""
        x = x.detach()
        outer, g, inner = contract.group_shape(x.shape, self.dim, self.groups)
        xv = x.reshape(outer, g, inner).transpose(0, 1).reshape(g, outer * inner)
        r = self._fit_units()
        if r != g:
            xv = xv.reshape(r, -1)
        return xv.float() if self._official else _subsample(xv).float()

    @torch.no_grad()
    def init_from(self, x: Tensor) -> "Quantizer":
        """Fit every scale (and offset) table entry for its own bit-width on ``x``.

        ``x`` is a weight or a batch of activations laid out as this quantizer's
        input. Head-wise / channel-wise quantizers with per-group tables get one
        fit per group; shared tables one fit over all groups.

        Raises:
            ValueError: ``x`` is empty, non-finite, or does not split into ``G`` groups.
        """
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a Tensor, got {type(x).__name__}")
        if x.numel() == 0:
            raise ValueError("x is empty: cannot initialise a quantizer from no data")
        rows = self._grouped(x)
        if not bool(torch.isfinite(rows).all()):
            raise ValueError("x contains non-finite values: cannot initialise the quantizer")
        self._fit_rows(rows)
        return self

    def _fit_rows(self, rows: Tensor) -> None:
        lo, hi = self.bits_range
        use_offset = self.offset is not None
        fit = official_fit if self._official else mse_fit
        rep = self.scale.shape[0] // rows.shape[0]
        for j, b in enumerate(range(lo, hi + 1)):
            s, beta = fit(rows, b, self.signed, use_offset)
            self.scale[:, j].copy_(s.to(self.scale.dtype).repeat_interleave(rep))
            if use_offset:
                self.offset[:, j].copy_(beta.to(self.offset.dtype).repeat_interleave(rep))
        self.scale_floor.copy_((self.scale * 1e-4).clamp_min(1e-8))
        self.initialized.fill_(True)
        self._is_init = True

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._is_init = bool(self.initialized)

    # ------------------------------------------------------------ calibration
    def start_observing(self) -> None:
        """Collect inputs (passed through unquantized) until :meth:`finish_observing`."""
        self._observing = True
        self._samples = []

    @torch.no_grad()
    def finish_observing(self) -> bool:
        """Fit the tables on everything observed; returns False when nothing was seen."""
        self._observing = False
        samples, self._samples = self._samples, []
        if not samples:
            return False
        rows = torch.cat(samples, dim=1)
        self._fit_rows(rows if self._official else _subsample(rows))
        return True

    def prepare(self, x: Tensor) -> bool:
        """Handle observation and lazy initialisation; True when ``x`` should be quantized."""
        self.last_numel = x.numel()
        if not self.enabled:
            return False
        if self._observing:
            self._samples.append(self._grouped(x))
            return False
        if not self._is_init:
            self.init_from(x)
        return True

    # --------------------------------------------------------------- forward
    def quantize(self, x: Tensor) -> Tensor:
        """The fake-quant op alone (no initialisation, ignores ``enabled``)."""
        return fake_quant(x, self._expand(self.scale), self.bits, self._expand(self.offset),
                          signed=self.signed, dim=self.dim, bits_range=self.bits_range)

    def forward(self, x: Tensor) -> Tensor:
        if not self.prepare(x):
            return x
        return self.quantize(x)

    def kernel_args(self, x: Tensor) -> Optional[tuple]:
        """``(scale, bits, offset, (dim, signed, min, max, lsq))`` for the fused
        quantize-then-matmul functions of :mod:`qvit.nn.functional`, or ``None``
        when ``x`` passes unquantized (disabled, observing). Runs :meth:`prepare`.
        """
        if not self.prepare(x):
            return None
        return self.args_for(x)

    def ready(self) -> bool:
        """Quantizing, initialised and not observing: :meth:`args_for` may be used
        without :meth:`prepare` (the input need not exist yet)."""
        return self.enabled and self._is_init and not self._observing

    def args_for(self, like: Tensor) -> tuple:
        """The tables and kernel arguments for inputs shaped like ``like`` (whose
        data is not read). The full argument check of :func:`qvit.ops.fake_quant`
        runs once per shape, dtype and device (the tables' shapes never change)."""
        return self.args_for_shape(like.shape, like.dtype, like.device)

    def args_for_shape(self, shape, dtype, device) -> tuple:
        """:meth:`args_for` an input of this shape, dtype and device (no tensor needed)."""
        scale, offset = self._expand(self.scale), self._expand(self.offset)
        key = (tuple(shape), dtype, device)
        if torch.compiler.is_compiling():   # traced once per graph: no cache to keep
            return scale, self.bits, offset, self._check(self._like(key))
        cached = self.__dict__.get("_kcfg")
        if cached is None or cached[0] != key:
            cached = self.__dict__["_kcfg"] = (key, self._check(self._like(key)))
        return scale, self.bits, offset, cached[1]

    @staticmethod
    def _like(key) -> Tensor:
        """A data-free tensor of that shape, dtype and device, for the argument checks."""
        shape, dtype, device = key
        return torch.empty_strided(shape, (0,) * len(shape), dtype=dtype, device=device)

    def _check(self, x: Tensor) -> tuple:
        bmin, bmax, lsq = ops.torch_ops._validate(x, self._expand(self.scale), self.bits,
                                                  self._expand(self.offset), self.signed,
                                                  self.dim, self.bits_range, None)
        return int(self.dim), self.signed, bmin, bmax, lsq

    def extra_repr(self) -> str:
        b = self.rounded_bits().to(torch.int64).tolist()
        bits = str(b[0]) if len(b) == 1 else str(b)
        parts = [self.role, f"bits={bits}", f"range={self.bits_range[0]}..{self.bits_range[1]}",
                 "learned" if self.learn_bits else "fixed",
                 "signed" if self.signed else "unsigned", self.granularity]
        if self.groups > 1:
            parts.append(f"groups={self.groups}")
            if self.scale.shape[0] < self.groups:
                parts.append("shared_scale" if self.units == 1 else f"shared_scale({self.units})")
        if self.offset is not None:
            parts.append("offset")
        if not self.enabled:
            parts.append("disabled")
        if not bool(self.initialized):
            parts.append("uninitialized")
        return ", ".join(parts)


def fused_fake_quant(x: Tensor, quantizers: List[Quantizer], dim: int = 1) -> Tensor:
    """Fake-quantize consecutive chunks of dimension ``dim`` of ``x`` with several quantizers at once.

    ``x.shape[dim]`` is split in ``len(quantizers)`` equal parts; part ``i`` is
    quantized by ``quantizers[i]`` (its groups subdivide the part). All must share
    signedness, bit range, enabled state and group count. One op call, no copies.
    """
    n = len(quantizers)
    chunks = x.chunk(n, dim=dim)
    use = [q.prepare(c) for q, c in zip(quantizers, chunks)]
    if not any(use):
        return x
    if not all(use):
        return torch.cat([q.quantize(c) if u else c for q, c, u in zip(quantizers, chunks, use)], dim=dim)
    q0 = quantizers[0]
    scales, offsets = zip(*(q.expanded_tables() for q in quantizers))
    bits = torch.cat([q.bits for q in quantizers])
    scale = torch.cat(scales)
    offset = torch.cat(offsets) if q0.offset is not None else None
    return fake_quant(x, scale, bits, offset, signed=q0.signed, dim=dim,
                          bits_range=q0.bits_range)
