"""The quantization side of a run: budget, budget loss, bit clamping and freezing, stats."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch

from ..models.recipe import UsageError
from .config import TrainConfig


class QuantState:
    """Budget and bit-width bookkeeping of a (maybe) quantized model.

    Inactive (every method a no-op) for float training.
    """

    def __init__(self, model, cfg: TrainConfig):
        self.active = cfg.quantized
        self.model = model
        self.budget: Optional[float] = None
        self.budget_kind = cfg.budget_kind
        self.budget_weight = cfg.budget_weight
        self.budget_relative = cfg.budget_relative
        self.frozen = False
        self.learn_bits = False
        self._quantizers: List[Any] = []
        if not self.active:
            return
        from ..models.convert import quantizers

        self._quantizers = [q for _, q in quantizers(model)]
        self.learn_bits = any(q.learn_bits for q in self._quantizers)

    def resolve_budget(self, cfg: TrainConfig, example: torch.Tensor) -> Optional[float]:
        """The budget in GBitOPs per image (or Mbit of weights for ``--budget-kind size``)."""
        if not self.active:
            return None
        from ..models.budget import uniform_bitops

        if cfg.budget_gbitops is not None:
            self.budget = float(cfg.budget_gbitops)
        elif cfg.target_bits is not None:
            if self.budget_kind == "size":
                raise UsageError("--target-bits works with the BitOPs budget; for "
                                 "--budget-kind size give --budget-gbitops")
            was = self.model.training
            with torch.no_grad():
                self.model.eval()
                self.model(example)
            self.model.train(was)
            self.budget = float(uniform_bitops(self.model, cfg.target_bits)) / 1e9
        if self.budget is not None and self.budget_kind == "bitops":
            self._check_reachable()
        return self.budget

    def _check_reachable(self) -> None:
        """A BitOPs budget below all-2-bit cannot be met: refuse it up front."""
        from ..models.budget import uniform_bitops

        lo = float(uniform_bitops(self.model, 2)) / 1e9
        if self.budget < lo * (1 - 1e-6):
            raise UsageError(f"budget {self.budget:.4g} GBitOPs is below what 2-bit weights "
                             f"and activations reach ({lo:.4g} GBitOPs)")

    def loss(self) -> Optional[torch.Tensor]:
        """The budget loss of the latest forward (None: no budget, or bits frozen)."""
        if self.budget is None or not self.active or self.frozen:
            return None
        from ..models.budget import budget_loss

        weight = self.budget_weight
        if self.budget_relative:
            # lambda * max(B/budget - 1, 0)^2: the same relative overshoot costs the
            # same whatever the model's size (tiny models have tiny GBitOPs)
            weight = weight / max(self.budget, 1e-30) ** 2
        return budget_loss(self.model, self.budget, weight=weight, kind=self.budget_kind)

    def after_step(self) -> None:
        for q in self._quantizers:
            q.clamp_bits_()

    def freeze(self) -> None:
        if self.active and not self.frozen:
            from ..models.budget import freeze_bits

            freeze_bits(self.model, True)
        self.frozen = True

    def stats(self) -> Dict[str, float]:
        """``gbitops`` (after a forward), ``wbits``, ``abits`` of the model now."""
        if not self.active:
            return {}
        from ..models.budget import average_bits, bitops

        out: Dict[str, float] = {}
        try:
            out["gbitops"] = float(bitops(self.model).detach()) / 1e9
        except RuntimeError:  # before the first forward
            pass
        ab = average_bits(self.model)
        out["wbits"], out["abits"] = float(ab["weights"]), float(ab["activations"])
        return out

    def size_kb(self) -> Optional[float]:
        if not self.active:
            return None
        from ..models.budget import model_size_bits

        return float(model_size_bits(self.model).detach()) / 8.0 / 1024.0
