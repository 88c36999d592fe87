"""``random_noise``: noise in logit space, projected onto an l1 or l2 ball of radius epsilon, then softmax.

The noise is deterministic per query: each row's Gaussian draw is seeded by a keyed hash of the query (the
input the victim saw, or the probabilities when no input is given) and ``secret`` (plugins.seeding: keyed
BLAKE2b, then Philox), so the same query always gets the same answer and averaging repeats of it gains nothing.
There is no default secret: whoever knows it recomputes the noise and inverts the answer exactly.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, SecretStr

from plugins import seeding
from plugins.base import Budget, Defense, DefenseConfig, DefenseOutput, secret_field
from plugins.registry import register
from plugins.simplex import project_l1_ball, project_l2_ball, safe_log


class RandomNoiseConfig(DefenseConfig):
    name: Literal["random_noise"] = "random_noise"
    epsilon: float = Field(default=0.5, ge=0, le=1000, description="logit-noise ball radius (0 <= epsilon <= 1000)")
    norm: Literal["l1", "l2"] = Field(default="l2", description="norm of the logit-noise ball: l1 or l2")
    scale: float = Field(default=1.0, gt=0, le=1000, description="std of the Gaussian drawn before projection (> 0)")
    secret: SecretStr | None = secret_field("the per-query noise")

    @property
    def needs_secret(self) -> bool:
        return True


@register
class RandomNoise(Defense):
    name = "random_noise"
    Config = RandomNoiseConfig

    @property
    def budget(self) -> Budget:
        return Budget(norm=self.config.norm, epsilon=self.config.epsilon, space="logits")

    def logit_noise(self, y: torch.Tensor, inputs: Any = None) -> torch.Tensor:
        """The (B x K, float64) noise added to log y for this batch: a pure function of the queries and the secret."""
        query = y if inputs is None else inputs
        seeds = seeding.query_seeds(query, self.config.secret)
        noise = seeding.normal(seeds, y.shape[1]) * self.config.scale
        project = project_l1_ball if self.config.norm == "l1" else project_l2_ball
        return project(noise, self.config.epsilon)

    def perturb(self, y: torch.Tensor, inputs: Any) -> DefenseOutput:
        if self.config.epsilon == 0:
            return DefenseOutput(probs=y.clone())
        noisy = safe_log(y) + self.logit_noise(y, inputs)
        return DefenseOutput(probs=torch.softmax(noisy, dim=1))
