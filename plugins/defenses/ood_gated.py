"""``ood_gated``: one configured defense for the queries the victim is confident on, another for the rest.

The gate thresholds an in-distribution score ``s(y)`` of the victim's own posterior ``y`` (plugins.ood), by
``score``:

- ``max_prob`` (default): adaptive misinformation's (Kariyappa & Qureshi, CVPR 2020) ``s = max_k y_k``;
- ``gaussian``: ``s`` = the chi-square typicality of the posterior's log-ratios under a class-conditional
  Gaussian fitted on the victim's training posteriors (:func:`plugins.ood.fit_posterior_gaussian`; the fitted
  statistics are the config's ``gaussian``). It separates out-of-distribution queries far better than the
  maximum probability (RESULTS.md, "A better OOD score"); ``tau`` is then a small typicality such as 1e-4.

- hard gate (``nu`` unset): a row with ``s >= tau`` is in-distribution and gets ``inside(y)``; the
  other rows get ``outside(y)``. Each inner defense runs once on its own rows (batched, no per-row loop);
- soft gate (``nu`` set): ``h = sigmoid(nu * (tau - s))`` and ``y~ = (1 - h) inside(y) + h outside(y)``
  (both inner defenses run on every row).

E.g. ``{"name": "ood_gated", "tau": 0.9, "inside": {"name": "identity"}, "outside": {"name": "mad", "epsilon":
1.0, "norm": "l1"}}``: benign, confident queries get the truth, thieves' uncertain
out-of-distribution queries get MAD (whose top-1 may move). ``inside`` and ``outside`` are full defense configs,
validated by the registry (errors name ``inside.<field>`` / ``outside.<field>``); ood_gated cannot nest itself.
``secret`` (deploy-time, no default, never dumped) keys every randomised inner defense; an inner config never
holds one, and a randomised inner defense without it refuses to build (plugins.base.MissingSecret).

- Needs what its inner defenses need (the batch of inputs, a surrogate, a misinformation model): the builders
  ask :meth:`OodGated.requirements` and pass the resources through to both.
- Budget: when both inner defenses declare one in the same norm and space, ``max`` of the two epsilons (a row
  gets one of them, or with the soft gate a convex combination, which stays in a norm ball or KL ball around
  ``y``); otherwise none (e.g. label_only declares none). Soft gate with a logit-space budget: none.
- ``extras``: ``gate`` (B: 1 for an outside row; h with the soft gate) and ``ood_score`` (B: ``1 - s``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, SecretStr, field_validator, model_validator

from plugins.base import Budget, Defense, DefenseConfig, DefenseOutput, check_num_classes, secret_field
from plugins.ood import PosteriorGaussian, in_distribution_score
from plugins.registry import build_defense, defense_class, register, validate_config, with_secret

INNER = ("inside", "outside")


class OodGatedConfig(DefenseConfig):
    name: Literal["ood_gated"] = "ood_gated"
    tau: float = Field(
        default=0.9, gt=0, le=1,
        description="threshold on the in-distribution score s: rows with s >= tau get 'inside', the rest 'outside' "
                    "(0 < tau <= 1)",
    )
    nu: float | None = Field(
        default=None, gt=0, le=1e6,
        description="unset: a hard gate; set: the soft gate h = sigmoid(nu * (tau - s)) mixing both answers",
    )
    score: Literal["max_prob", "gaussian"] = Field(
        default="max_prob",
        description="the in-distribution score s: max_prob (max_k y_k) or gaussian (the chi-square typicality of the "
                    "posterior under the fitted class-conditional Gaussian 'gaussian')",
    )
    gaussian: PosteriorGaussian | None = Field(
        default=None,
        description="score 'gaussian': the statistics plugins.ood.fit_posterior_gaussian fitted on the victim's "
                    "training posteriors (required with it, refused without it)",
    )
    inside: dict[str, Any] = Field(description="defense config for confident (in-distribution) rows")
    outside: dict[str, Any] = Field(description="defense config for the other (out-of-distribution) rows")
    secret: SecretStr | None = secret_field("its inner defenses' keyed randomness (given to each one that takes it)")

    @field_validator(*INNER)
    @classmethod
    def _validate_inner(cls, value: dict[str, Any]) -> dict[str, Any]:
        if value.get("name") == "ood_gated":
            raise ValueError("an ood_gated defense cannot nest another ood_gated")
        if "secret" in value:
            raise ValueError("give the secret once, as ood_gated's own 'secret' (it keys every inner defense that "
                             "takes one); an inner config never holds it")
        return validate_config(value).model_dump()

    @model_validator(mode="after")
    def _check_score(self) -> OodGatedConfig:
        if self.score == "gaussian" and self.gaussian is None:
            raise ValueError("gaussian: score 'gaussian' needs the fitted statistics (plugins.ood."
                             "fit_posterior_gaussian on the victim's training posteriors; lab.screen --fit-gaussian "
                             "writes them)")
        if self.score != "gaussian" and self.gaussian is not None:
            raise ValueError(f"gaussian: statistics are used only with score 'gaussian'; got score {self.score!r}")
        return self

    @property
    def needs_secret(self) -> bool:
        return any(validate_config(inner).needs_secret for inner in (self.inside, self.outside))


def _rows(inputs: Any, mask: torch.Tensor) -> Any:
    """The rows of ``inputs`` (a tensor, an array or a sequence of per-row inputs) where ``mask`` is True."""
    if inputs is None:
        return None
    if isinstance(inputs, torch.Tensor):
        return inputs[mask]
    if isinstance(inputs, np.ndarray):
        return inputs[mask.numpy()]
    idx = mask.nonzero().squeeze(1).tolist()
    return [inputs[i] for i in idx]


@register
class OodGated(Defense):
    name = "ood_gated"
    Config = OodGatedConfig

    @classmethod
    def requirements(cls, config: Mapping[str, Any]) -> dict[str, bool]:
        cfg = validate_config(config)
        needs = [defense_class(inner["name"]).requirements(inner) for inner in (cfg.inside, cfg.outside)]
        return {k: any(n[k] for n in needs) for k in needs[0]}

    def __init__(self, config: OodGatedConfig, **resources: Any) -> None:
        super().__init__(config)
        num_classes = resources.get("num_classes")
        check_num_classes(num_classes)
        if config.gaussian is not None and num_classes is not None and config.gaussian.num_classes != num_classes:
            raise ValueError(f"gaussian: fitted for K = {config.gaussian.num_classes} classes; this victim has "
                             f"{num_classes} (fit it on this victim's training posteriors)")
        secret = config.secret.get_secret_value() if config.secret is not None else None
        self.inside = build_defense(with_secret(config.inside, secret), **resources)
        self.outside = build_defense(with_secret(config.outside, secret), **resources)
        self.needs_inputs = self.inside.needs_inputs or self.outside.needs_inputs

    @property
    def budget(self) -> Budget | None:
        a, b = self.inside.budget, self.outside.budget
        if a is None or b is None or (a.norm, a.space) != (b.norm, b.space):
            return None
        if self.config.nu is not None and a.space != "probs":
            return None
        return Budget(norm=a.norm, epsilon=max(a.epsilon, b.epsilon), space=a.space)

    def perturb(self, y: torch.Tensor, inputs: Any) -> DefenseOutput:
        b = y.shape[0]
        conf = in_distribution_score(y, self.config.gaussian) if b else torch.zeros(0, dtype=torch.float64)
        score = 1.0 - conf
        if self.config.nu is not None:
            h = torch.sigmoid(self.config.nu * (self.config.tau - conf))
            a, o = self.inside(y, inputs), self.outside(y, inputs)
            tilde = (1 - h).unsqueeze(1) * a.probs.to(torch.float64) + h.unsqueeze(1) * o.probs.to(torch.float64)
            tilde = tilde / tilde.sum(dim=1, keepdim=True)
            return DefenseOutput(probs=tilde, extras={"gate": h, "ood_score": score})
        outside = conf < self.config.tau
        tilde = y.clone()
        deviation = torch.zeros(b, dtype=torch.float64)
        have_deviation = True
        for mask, defense in ((~outside, self.inside), (outside, self.outside)):
            if not mask.any():
                continue
            out = defense(y[mask], _rows(inputs, mask))
            tilde[mask] = out.probs.to(torch.float64)
            if out.angular_deviation is None:
                have_deviation = False
            else:
                deviation[mask] = out.angular_deviation.to(torch.float64)
        return DefenseOutput(probs=tilde, angular_deviation=deviation if have_deviation and b else None,
                             extras={"gate": outside.to(torch.float64), "ood_score": score})
