"""``identity``: returns the victim's probabilities unchanged. For comparison only; never for production."""

from __future__ import annotations

from typing import Any, Literal

import torch

from plugins.base import Budget, Defense, DefenseConfig, DefenseOutput
from plugins.registry import register


class IdentityConfig(DefenseConfig):
    name: Literal["identity"] = "identity"


@register
class Identity(Defense):
    name = "identity"
    Config = IdentityConfig

    @property
    def budget(self) -> Budget:
        return Budget(norm="l1", epsilon=0.0)

    def perturb(self, y: torch.Tensor, inputs: Any) -> DefenseOutput:
        return DefenseOutput(probs=y.clone())
