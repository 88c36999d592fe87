"""``surrogate_only``: the serving cost floor of a last-layer MAD-family defense, for bench/bench_serve.py.

It does what last-layer MAD / MAD-argmax must do per batch before any arithmetic, through the same code
(``plugins.mad.geometry.SurrogateGeometry``: the inputs as the surrogate's tensor, one forward pass under
no_grad, the float64 softmax and its checks) and then answers the victim's probabilities unchanged. It is NOT a
defense: it perturbs nothing. It exists only so the benchmark can show what a defense costs beyond the one
surrogate forward pass it needs; it ships only in benchmark archives (``package --extra-dist``).
"""

from __future__ import annotations

from typing import Any

import torch

from plugins import Defense, DefenseConfig, DefenseOutput
from plugins.mad.geometry import SurrogateGeometry


class SurrogateOnlyConfig(DefenseConfig):
    """No parameters: the surrogate is given by the archive, the Jacobian mode is last_layer."""


class SurrogateOnly(Defense):
    name = "surrogate_only"
    Config = SurrogateOnlyConfig
    needs_inputs = True
    needs_surrogate = True

    def __init__(self, config: SurrogateOnlyConfig, surrogate: torch.nn.Module | None = None,
                 num_classes: int | None = None, **resources: Any) -> None:
        super().__init__(config, **resources)
        self.view = SurrogateGeometry(surrogate, num_classes, "last_layer", None, 256, self.name)

    def perturb(self, y: torch.Tensor, inputs: Any) -> DefenseOutput:
        self.view.of(y, inputs)  # the surrogate's forward pass and softmax, as MAD runs it; the result is unused
        return DefenseOutput(probs=y)
