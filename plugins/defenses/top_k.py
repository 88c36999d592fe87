"""``top_k``: keep each row's k largest probabilities, zero the rest, renormalise (the paper's top-k baseline)."""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from plugins.base import Defense, DefenseConfig, DefenseOutput
from plugins.registry import register


class TopKConfig(DefenseConfig):
    name: Literal["top_k"] = "top_k"
    k: int = Field(default=1, ge=1, description="how many of each row's largest probabilities to keep (1 <= k <= K)")


def check_k_fits(k: int, num_classes: int | None) -> None:
    if num_classes is not None and k > num_classes:
        raise ValueError(f"k: must be <= the number of classes K={num_classes}; got k={k}")


@register
class TopK(Defense):
    name = "top_k"
    Config = TopKConfig

    def __init__(self, config: TopKConfig, num_classes: int | None = None, **resources: Any) -> None:
        super().__init__(config)
        check_k_fits(config.k, num_classes)

    def perturb(self, y: torch.Tensor, inputs: Any) -> DefenseOutput:
        k = self.config.k
        check_k_fits(k, y.shape[1])
        # Per row: each row keeps its own top-k. A stable sort breaks ties toward the lower class index, as
        # argmax does, so every row keeps exactly the class that argmax calls its top-1.
        index = y.argsort(dim=1, descending=True, stable=True)[:, :k]
        kept = torch.zeros_like(y).scatter_(1, index, y.gather(1, index))
        total = kept.sum(dim=1, keepdim=True)
        # A row whose top-k mass is 0 cannot exist (its top-1 is >= 1/K), so the division is safe.
        return DefenseOutput(probs=kept / total)
