"""``rounding``: report probabilities with ``decimals`` decimal places (the paper's rounding baseline)."""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from plugins.base import Budget, Defense, DefenseConfig, DefenseOutput
from plugins.registry import register


class RoundingConfig(DefenseConfig):
    name: Literal["rounding"] = "rounding"
    decimals: int = Field(default=2, ge=0, le=8, description="decimal places kept (0 <= decimals <= 8)")


@register
class Rounding(Defense):
    """Round to a grid of step ``10**-decimals`` so that each row still sums to exactly one grid total.

    Plain rounding can make a row sum to 0.99 or 1.01. Instead each row is apportioned by the largest-remainder
    method: every value is first rounded down to the grid, then the units still missing to reach 1 go, one
    each, to the entries with the largest remainders. Every value moves by less than one grid step
    (linf < 10**-decimals), each row sums to 1, and zeros stay zeros.
    """

    name = "rounding"
    Config = RoundingConfig

    @property
    def budget(self) -> Budget:
        return Budget(norm="linf", epsilon=10.0 ** -self.config.decimals)

    def perturb(self, y: torch.Tensor, inputs: Any) -> DefenseOutput:
        scale = 10.0**self.config.decimals
        y = y / y.sum(dim=1, keepdim=True)
        scaled = y * scale
        floor = scaled.floor()
        missing = (scale - floor.sum(dim=1, keepdim=True)).round()  # whole grid units still to hand out
        remainder = scaled - floor
        order = remainder.argsort(dim=1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(y.shape[1]).expand_as(order).contiguous())
        units = floor + (rank < missing).to(y.dtype)
        return DefenseOutput(probs=units / scale)
