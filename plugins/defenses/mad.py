"""``mad``: Prediction Poisoning by Maximizing Angular Deviation (Orekondy et al., ICLR 2020).

Each row's target y* is the one-hot vertex whose attacker update ``G^T y*`` makes the largest angle with
``G^T y`` (G from a fixed surrogate, see plugins.mad.geometry); the answer is ``(1 - a) y + a y*`` with the
largest a in [0, 1] keeping ``dist(y~, y) <= epsilon``. The top-1 label may change; ``mad_argmax`` keeps it.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from plugins.mad import candidates
from plugins.mad.defense import MADBase, MADFields
from plugins.mad.geometry import Reference
from plugins.registry import register


class MADConfig(MADFields):
    name: Literal["mad"] = "mad"


@register
class MAD(MADBase):
    name = "mad"
    Config = MADConfig

    def euclidean_kind(self, num_classes: int) -> str | None:
        return "vertices" if self.config.oracle != "random" and self.config.norm != "kl" else None

    def choose_target(self, ref: Reference, y: torch.Tensor, top: torch.Tensor, inputs: Any) -> torch.Tensor:
        if self.config.oracle == "random":
            return candidates.random_vertex(self.seeds(inputs), y.shape[1])
        return candidates.vertex_target(ref, self.config.oracle)
