"""``reverse_sigmoid`` (Lee et al. 2018): y~ proportional to y - beta * (sigmoid(gamma * logit(y)) - 1/2).

Entries below 1/2 are pushed up and entries above 1/2 pushed down, scrambling the log-probabilities an
attacker would regress on while mostly keeping the top-1. Negative results are clipped at 0 and each row is
renormalised. No distance budget is declared: the distortion grows with beta.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from plugins.base import Defense, DefenseConfig, DefenseOutput
from plugins.registry import register
from plugins.simplex import LOG_FLOOR, renormalise


class ReverseSigmoidConfig(DefenseConfig):
    name: Literal["reverse_sigmoid"] = "reverse_sigmoid"
    beta: float = Field(default=0.7, gt=0, le=100, description="strength of the perturbation (0 < beta <= 100)")
    gamma: float = Field(default=0.4, gt=0, le=100, description="slope of the sigmoid (0 < gamma <= 100)")


@register
class ReverseSigmoid(Defense):
    name = "reverse_sigmoid"
    Config = ReverseSigmoidConfig

    def perturb(self, y: torch.Tensor, inputs: Any) -> DefenseOutput:
        beta, gamma = self.config.beta, self.config.gamma
        r = beta * (torch.sigmoid(gamma * torch.logit(y, eps=LOG_FLOOR)) - 0.5)
        return DefenseOutput(probs=renormalise(y - r))
