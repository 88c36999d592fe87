"""What ``mad`` and ``mad_argmax`` share: the config fields and the batched pipeline

    surrogate view of x -> Geometry (c, M) -> candidates scored by angle -> target y* -> mixing a -> y~

Decisions (the method itself: docs/concepts.md, "Solving it" to "All parameters"):
- Both defenses need the inputs and a surrogate (``needs_inputs = needs_surrogate = True``) for every
  ``jacobian`` mode, so one deployment serves every config of the family. With ``jacobian="identity"`` the
  surrogate is accepted but never run, and the inputs only seed the ``random`` oracle.
- ``epsilon = 0`` returns y unchanged (no surrogate call). Otherwise each row is first rescaled to sum to 1
  (``check_probs`` lets rows be off by up to 1e-4) and the budget holds w.r.t. that row.
- A row whose target is within epsilon gets the target itself (a = 1); mad_argmax caps a so that the
  victim's top class stays strictly on top by TOP_MARGIN (plugins.mad.mixing.top_margin_cap).
- The surrogate is put in eval mode when the defense is built and is only run under ``torch.no_grad`` (or
  inside torch.func transforms for ``jacobian="all"``): no gradient reaches its parameters or the output.
- ``angular_deviation`` is the angle (radians, float64, one per row) between the attacker's update under the
  returned y~ and under y: ``angle(G^T y~, G^T y)``.
- Per-call cost (a server calls this on every batch, often of a few rows): constant tables are built once per
  K (``candidates.exhaustive_tables``), the last-layer check runs on the first non-empty batch only, the
  input dtype is read from a kept parameter, and the candidate scoring and the KL bisection run under
  ``torch.inference_mode`` (only indices and coefficients leave those blocks, so every returned tensor is an
  ordinary one). The arithmetic stays float64 and gives bit-for-bit the results of the unoptimised code.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, SecretStr, model_validator
from torch import nn

from plugins import seeding
from plugins.base import Budget, Defense, DefenseConfig, DefenseOutput, secret_field
from plugins.mad import euclidean, mixing
from plugins.mad.geometry import Geometry, Reference, SurrogateGeometry, angle


class MADFields(DefenseConfig):
    """Config fields common to mad and mad_argmax."""

    epsilon: float = Field(
        default=0.5,
        ge=0,
        le=1000,
        description="distance budget per row: dist(y~, y) <= epsilon (0 <= epsilon <= 1000)",
    )
    norm: Literal["l1", "l2", "kl"] = Field(
        default="l1", description="budget distance: l1, l2 or kl (KL(y || y~))"
    )
    jacobian: Literal["last_layer", "all", "identity"] = Field(
        default="last_layer",
        description="G over the surrogate's last linear layer, all its parameters, or G = I",
    )
    params: tuple[str, ...] | None = Field(
        default=None, min_length=1, description="jacobian='all' only: restrict G to these parameter names"
    )
    oracle: Literal["extreme", "random", "argmin"] = Field(
        default="extreme", description="which candidate is the target: max deviation, random, min deviation"
    )
    secret: SecretStr | None = secret_field("the random oracle (oracle='random' only)")
    jacobian_memory_mb: int = Field(
        default=256,
        ge=1,
        le=65536,
        description="jacobian='all': memory budget (MiB) for one chunk's Jacobian",
    )

    @model_validator(mode="after")
    def _params_need_all(self):
        if self.params is not None and self.jacobian != "all":
            raise ValueError(f"params: only used with jacobian='all'; got jacobian={self.jacobian!r}")
        return self

    @property
    def needs_secret(self) -> bool:
        return self.oracle == "random"


class MADBase(Defense):
    """The MAD pipeline; subclasses choose the candidate set (``choose_target``)."""

    needs_inputs = True
    needs_surrogate = True

    def __init__(
        self,
        config: MADFields,
        surrogate: nn.Module | None = None,
        num_classes: int | None = None,
        **resources: Any,
    ) -> None:
        super().__init__(config)
        self.view = SurrogateGeometry(
            surrogate, num_classes, config.jacobian, config.params, config.jacobian_memory_mb, self.name
        )
        self.surrogate = self.view.surrogate
        self.num_classes = num_classes
        self.last_layer_name, self.last_layer = self.view.last_layer_name, self.view.last_layer

    @property
    def budget(self) -> Budget:
        return Budget(norm=self.config.norm, epsilon=self.config.epsilon)

    # -- the pipeline -------------------------------------------------------------------------------------

    def geometry(self, y: torch.Tensor, inputs: Any) -> Geometry:
        """Per-row centre and Gram matrix for this batch (runs the surrogate unless jacobian='identity')."""
        return self.view.of(y, inputs)[0]

    def choose_target(self, ref: Reference, y: torch.Tensor, top: torch.Tensor, inputs: Any) -> torch.Tensor:
        raise NotImplementedError

    def cap(self, y: torch.Tensor, target: torch.Tensor, top: torch.Tensor) -> torch.Tensor | None:
        """An extra per-row upper bound on the mixing coefficient, or None."""
        return None

    def euclidean_kind(self, num_classes: int) -> str | None:
        """The candidate set plugins.mad.euclidean can search for this config when M = I, or None (the torch
        pipeline: random oracle, KL budget, or candidates it does not enumerate)."""
        return None

    def _perturb_euclidean(self, y: torch.Tensor, geometry: Geometry, kind: str) -> DefenseOutput:
        cfg = self.config
        sol = euclidean.solve(
            y.detach().numpy(), geometry.centre.detach().numpy(), cfg.epsilon, cfg.norm, cfg.oracle, kind
        )
        return DefenseOutput(
            probs=torch.from_numpy(sol.y_tilde),
            angular_deviation=torch.from_numpy(sol.deviation),
            extras={
                "target": torch.from_numpy(sol.target),
                "mixing": torch.from_numpy(sol.mixing),
                "target_angular_deviation": torch.from_numpy(sol.target_deviation),
            },
        )

    def seeds(self, inputs: Any):
        return seeding.query_seeds(inputs, self.config.secret)

    def perturb(self, y: torch.Tensor, inputs: Any) -> DefenseOutput:
        b = y.shape[0]
        if self.config.epsilon == 0 or b == 0:
            zeros = torch.zeros(b, dtype=torch.float64)
            extras = {"target": y.clone(), "mixing": zeros, "target_angular_deviation": zeros.clone()}
            return DefenseOutput(probs=y.clone(), angular_deviation=zeros.clone(), extras=extras)
        y = y / y.sum(dim=1, keepdim=True)
        geometry = self.geometry(y, inputs)
        kind = self.euclidean_kind(y.shape[1]) if geometry.gram is None else None
        if kind is not None:
            return self._perturb_euclidean(y, geometry, kind)
        return self._perturb_torch(y, geometry, inputs)

    def _perturb_torch(self, y: torch.Tensor, geometry: Geometry, inputs: Any) -> DefenseOutput:
        """The general pipeline (any Gram matrix, every oracle and norm) on rows ``y`` already summing to 1."""
        ref = Reference.of(geometry, y)
        top = y.argmax(dim=1)
        target = self.choose_target(ref, y, top, inputs)
        a = mixing.coefficient(y, target, self.config.epsilon, self.config.norm)
        cap = self.cap(y, target, top)
        if cap is not None:
            a = torch.minimum(a, cap)
        y_tilde = mixing.mix(y, target, a)
        deviation, target_deviation = angle(ref.cosines((y_tilde, target))).unbind(1)
        return DefenseOutput(
            probs=y_tilde,
            angular_deviation=deviation,
            extras={"target": target, "mixing": a, "target_angular_deviation": target_deviation},
        )
