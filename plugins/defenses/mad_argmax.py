"""``mad_argmax``: MAD restricted to targets that keep the victim's top-1 label (Orekondy et al., ICLR 2020).

Candidates are the uniform distributions over class subsets that contain the row's top class c: all
2^(K-1) of them when K <= 10, a greedy search scoring at most ``max_candidates`` per row when K > 10 (see
plugins.mad.candidates). The mixing coefficient is capped so that c stays strictly on top
(plugins.mad.mixing.top_margin_cap): a row whose target is within epsilon but ties c with other classes
gets the target moved back towards y just enough to keep c first by 1e-6.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from plugins.mad import candidates, mixing
from plugins.mad.defense import MADBase, MADFields
from plugins.mad.geometry import Reference
from plugins.registry import register


class MADArgmaxConfig(MADFields):
    name: Literal["mad_argmax"] = "mad_argmax"
    max_candidates: int = Field(
        default=4096,
        ge=1,
        le=10_000_000,
        description="K > 10: at most this many candidate subsets scored per row by the greedy search (>= 1)",
    )


@register
class MADArgmax(MADBase):
    name = "mad_argmax"
    Config = MADArgmaxConfig

    def euclidean_kind(self, num_classes: int) -> str | None:
        exhaustive = num_classes <= candidates.EXHAUSTIVE_MAX_CLASSES
        ok = exhaustive and self.config.oracle != "random" and self.config.norm != "kl"
        return "subsets" if ok else None

    def choose_target(self, ref: Reference, y: torch.Tensor, top: torch.Tensor, inputs: Any) -> torch.Tensor:
        k = y.shape[1]
        if self.config.oracle == "random":
            return candidates.random_subset(self.seeds(inputs), top, k)
        if k <= candidates.EXHAUSTIVE_MAX_CLASSES:
            return candidates.subset_target_exhaustive(ref, top, self.config.oracle)
        return candidates.subset_target_greedy(ref, top, self.config.oracle, self.config.max_candidates)

    def cap(self, y: torch.Tensor, target: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
        return mixing.top_margin_cap(y, target, top)
