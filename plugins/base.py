"""The defense contract: what every defense takes, returns and guarantees.

A defense maps a batch of victim probabilities ``y`` (B x K, rows on the simplex) to perturbed probabilities
``y~`` (B x K, rows on the simplex). Defenses that need the query itself (MAD needs the surrogate's view of x)
also receive the batch of inputs. Subclasses implement :meth:`Defense.perturb` on a float64 batch that
:meth:`Defense.__call__` has already checked; the base class restores the caller's dtype.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from plugins.seeding import MIN_SECRET_LENGTH, SECRET_HOWTO

SIMPLEX_TOL = 1e-4  # how far an incoming row may be from summing to 1 before it is refused

# The contract's slack on a probs-space budget (docs/concepts.md, "Guarantees every defense keeps"): a row is
# within budget when dist(y~, y) <= epsilon + BUDGET_TOLERANCE. The server's fail-closed re-check and the
# budget-violation metric both use it. It also covers the output's cast back to the victim's dtype: rounding a
# row of total mass 1 to float32 moves its l1 distance by at most about 2^-24 * 2 ~ 1.2e-7 (less in l2, and
# KL's change is relative to the same rounding), well under 1e-6.
BUDGET_TOLERANCE = 1e-6


def describe_validation_error(
    exc: ValidationError, title: str, prefix: tuple[str, ...] = (), missing: str = "missing",
    unknown: str = "unknown key",
) -> str:
    """One message for a pydantic ValidationError (a defense config, the archive's ``stealguard:`` section):
    ``<title>: <field>: <what is wrong>; ...`` with each field's dotted path under ``prefix``, ``missing`` for
    a required field that is absent, ``unknown`` for a key the schema does not have, else pydantic's message
    and the value given."""
    parts = []
    for err in exc.errors():
        field = ".".join(str(p) for p in (*prefix, *err["loc"])) or "config"
        if err["type"] == "missing":
            parts.append(f"{field}: {missing}")
        elif err["type"] == "extra_forbidden":
            parts.append(f"{field}: {unknown}")
        elif "secret" in (str(p) for p in err["loc"]):  # never echo a secret, even a rejected one
            parts.append(f"{field}: {err['msg']} (value not shown)")
        else:
            parts.append(f"{field}: {err['msg']} (got {err.get('input')!r})")
    return f"{title}: " + "; ".join(parts)


class MissingSecret(ValueError):
    """A randomised defense was built without the deploy-time secret that keys it (there is no default)."""


def secret_field(usage: str) -> Any:
    """The ``secret`` field of a keyed defense: a SecretStr with no default, left out of repr and of every
    dump (so of MLflow params, bundles and archives); the deployment supplies it when the defense is built."""
    return Field(
        default=None,
        exclude=True,
        repr=False,
        min_length=MIN_SECRET_LENGTH,
        description=f"deploy-time secret keying {usage} (>= {MIN_SECRET_LENGTH} characters; no default; "
        "never written to a dump)",
    )


class DefenseConfig(BaseModel):
    """Base of every defense's validated configuration. Unknown fields are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str

    @property
    def needs_secret(self) -> bool:
        """True when this config draws keyed randomness: it then cannot be built without a ``secret``."""
        return False


@dataclass(frozen=True)
class Budget:
    """The distance budget a defense guarantees for every row.

    ``space="probs"``: ``dist(y~, y) <= epsilon`` on the returned probabilities (l1, l2, linf or KL(y || y~)).
    ``space="logits"``: the noise added to the log-probabilities has ``||n||_norm <= epsilon``.
    """

    norm: Literal["l1", "l2", "linf", "kl"]
    epsilon: float
    space: Literal["probs", "logits"] = "probs"


@dataclass(frozen=True)
class DefenseOutput:
    """What a defense returns: the perturbed batch and, for the MAD family, the achieved angular deviation."""

    probs: torch.Tensor
    angular_deviation: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] | None = None


class Defense(ABC):
    """A batched perturbation of probability vectors. One subclass per defense, registered by ``name``."""

    name: ClassVar[str]
    Config: ClassVar[type[DefenseConfig]]
    needs_inputs: ClassVar[bool] = False
    needs_surrogate: ClassVar[bool] = False
    needs_misinformation: ClassVar[bool] = False  # resource ``misinformation=net``

    def __init__(self, config: DefenseConfig, **resources: Any) -> None:
        if config.needs_secret and getattr(config, "secret", None) is None:
            raise MissingSecret(
                f"secret: missing; defense '{config.name}' with this config is randomised, keyed by a deploy-time "
                f"secret of >= {MIN_SECRET_LENGTH} characters, and has no default (build it with "
                f"secret=...; a server reads it from STEALGUARD_SECRET or a secret file); {SECRET_HOWTO}"
            )
        self.config = config

    @classmethod
    def requirements(cls, config: Any) -> dict[str, bool]:
        """What building and serving ``config`` needs: ``inputs`` (the batch of queries), ``surrogate`` and
        ``misinformation`` (resource networks). The class flags by default; a composite defense (ood_gated)
        answers for its inner defenses. Builders ask :func:`plugins.registry.needs`."""
        return {"inputs": cls.needs_inputs, "surrogate": cls.needs_surrogate,
                "misinformation": cls.needs_misinformation}

    @property
    def budget(self) -> Budget | None:
        """The budget this defense guarantees, or None when it declares none."""
        return None

    def __call__(self, probs: torch.Tensor, inputs: Any = None) -> DefenseOutput:
        y = check_probs(probs)
        if self.needs_inputs and inputs is None:
            raise ValueError(f"defense '{self.name}' needs the batch of inputs the victim saw; got inputs=None")
        out = self.perturb(y.to(torch.float64), inputs)
        tilde = out.probs.to(y.dtype)
        deviation = out.angular_deviation
        return DefenseOutput(probs=tilde, angular_deviation=deviation, extras=out.extras)

    @abstractmethod
    def perturb(self, y: torch.Tensor, inputs: Any) -> DefenseOutput:
        """Perturb a checked float64 batch ``y`` (B x K). Must return rows on the simplex within the budget."""

    def describe(self) -> dict[str, Any]:
        """The configuration as a plain dict (what MLflow logs and the server reports)."""
        return self.config.model_dump()

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.describe().items() if k != "name")
        return f"{type(self).__name__}({params})"


def require_network(field: str, value: Any, defense: str, usage: str = "") -> torch.nn.Module:
    """A resource network (``surrogate=net``, ``misinformation=net``) in eval mode, or a ValueError naming the
    field: it must be given and be a torch.nn.Module mapping inputs to logits."""
    if value is None:
        raise ValueError(
            f"{field}: defense '{defense}' needs a {field} model (build_defense(..., {field}=net){usage})"
        )
    if not isinstance(value, torch.nn.Module):
        raise ValueError(f"{field}: must be a torch.nn.Module mapping inputs to logits; got {type(value).__name__}")
    return value.eval()


def check_num_classes(num_classes: int | None) -> None:
    """A class count given at build time must be at least 2."""
    if num_classes is not None and num_classes < 2:
        raise ValueError(f"num_classes: must be >= 2; got {num_classes}")


def check_probs(probs: Any) -> torch.Tensor:
    """Return ``probs`` as a floating B x K tensor whose rows lie on the simplex, or raise ValueError."""
    if not isinstance(probs, torch.Tensor):
        probs = torch.as_tensor(probs)
    if not torch.is_floating_point(probs):
        raise ValueError(f"probabilities must be a floating-point tensor; got dtype {probs.dtype}")
    if probs.dim() != 2:
        raise ValueError(f"probabilities must be a B x K batch (2 dimensions); got shape {tuple(probs.shape)}")
    if probs.shape[1] < 2:
        raise ValueError(f"probabilities need at least 2 classes; got K={probs.shape[1]}")
    if probs.shape[0] == 0:
        return probs
    lo, hi = (v.item() for v in torch.aminmax(probs))  # one pass; NaN propagates into both
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("probabilities contain NaN or inf")
    if lo < 0:
        raise ValueError(f"probabilities must be non-negative; smallest value {lo:.3g}")
    sums = probs.to(torch.float64).sum(dim=1)
    worst = (sums - 1).abs().max().item()
    if worst > SIMPLEX_TOL:
        raise ValueError(
            f"each row of probabilities must sum to 1 (within {SIMPLEX_TOL}); worst row is off by {worst:.3g}"
        )
    return probs
