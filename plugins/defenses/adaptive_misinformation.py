"""``adaptive_misinformation`` (Kariyappa & Qureshi, "Defending Against Model Stealing Attacks with Adaptive
Misinformation", CVPR 2020).

Queries the victim is confident about get (almost) the truth; queries that look out-of-distribution get the
posterior of a *misinformation model* trained to be wrong (``mlflow_project/lab/train_misinformation.py``:
minimise ``-log(1 - p_true)``):

    h  = sigmoid(nu * (tau - max_k y_k))          the OOD gate, from the victim's own confidence
    y~ = (1 - h) y + h m,    m = softmax(misinformation(x))

With the default ``nu = 1000`` the gate is a step at ``tau`` (h < 0.01 once max_k y_k > tau + 0.0046).
Thieves mostly query with data that is not the victim's, on which the victim is less confident, so their
training labels are mostly the misinformation model's; benign users mostly send in-distribution data.

- ``needs_inputs = True``: the misinformation model sees the query ``x`` (resource ``misinformation=net``,
  an ``nn.Module`` mapping the victim's inputs to K logits; put in eval mode, only run under no_grad).
- No budget is declared: h can be ~1, and then ``||y~ - y||_1 = h ||m - y||_1`` can reach 2.
- Deterministic: no randomness; the same query gets the same answer.
- ``extras``: ``gate`` (h, B), ``ood_score`` (1 - max_k y_k, B; see plugins.ood) and ``misinformation``
  (m, B x K).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from plugins.base import Defense, DefenseConfig, DefenseOutput, check_num_classes, require_network
from plugins.mad.jacobian import as_surrogate_input
from plugins.ood import confidence_gate, ood_score
from plugins.registry import register


class AdaptiveMisinformationConfig(DefenseConfig):
    name: Literal["adaptive_misinformation"] = "adaptive_misinformation"
    tau: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="confidence threshold: rows whose top probability is below tau get misinformation (0 < tau <= 1)",
    )
    nu: float = Field(
        default=1000.0,
        gt=0,
        le=1e6,
        description="sharpness of the gate sigmoid(nu * (tau - max_k y_k)) (0 < nu <= 1e6)",
    )


@register
class AdaptiveMisinformation(Defense):
    name = "adaptive_misinformation"
    Config = AdaptiveMisinformationConfig
    needs_inputs = True
    needs_misinformation = True  # resource ``misinformation=net``: what a server / lab must load for it

    def __init__(
        self,
        config: AdaptiveMisinformationConfig,
        misinformation: nn.Module | None = None,
        num_classes: int | None = None,
        **resources: Any,
    ) -> None:
        super().__init__(config)
        self.misinformation = require_network("misinformation", misinformation, self.name,
                                              usage=", net: inputs -> K logits")
        check_num_classes(num_classes)
        self.num_classes = num_classes

    def misinformation_probs(self, inputs: Any, y: torch.Tensor) -> torch.Tensor:
        """softmax(misinformation(x)) as a float64 B x K batch, checked against the victim's y."""
        x = as_surrogate_input(self.misinformation, inputs)
        if x.dim() == 0 or x.shape[0] != y.shape[0]:
            raise ValueError(
                f"inputs: need one input per row of probabilities ({y.shape[0]}); got shape {tuple(x.shape)}"
            )
        with torch.no_grad():
            logits = self.misinformation(x)
        if not isinstance(logits, torch.Tensor) or logits.shape != y.shape:
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(
                f"misinformation: must map the inputs to B x K logits like the victim ({tuple(y.shape)}); got {got}"
            )
        m = torch.softmax(logits.to(torch.float64), dim=1)
        if not torch.isfinite(m).all():
            raise ValueError("misinformation: the model's logits are not finite")
        return m

    def perturb(self, y: torch.Tensor, inputs: Any) -> DefenseOutput:
        b = y.shape[0]
        if b == 0:
            empty = torch.zeros(0, dtype=torch.float64)
            extras = {"gate": empty, "ood_score": empty.clone(), "misinformation": y.clone()}
            return DefenseOutput(probs=y.clone(), extras=extras)
        y = y / y.sum(dim=1, keepdim=True)
        m = self.misinformation_probs(inputs, y)
        h = confidence_gate(y, self.config.tau, self.config.nu)
        y_tilde = (1 - h).unsqueeze(1) * y + h.unsqueeze(1) * m
        y_tilde = y_tilde / y_tilde.sum(dim=1, keepdim=True)
        return DefenseOutput(
            probs=y_tilde, extras={"gate": h, "ood_score": ood_score(y), "misinformation": m}
        )
