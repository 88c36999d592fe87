"""StealGuard's framework-free core: defenses against model stealing (torch + numpy; no TorchServe, no MLflow).

    from plugins import available_defenses, build_defense, measures
    defense = build_defense({"name": "mad_argmax", "epsilon": 0.5, "norm": "l1"}, surrogate=net)
    out = defense(probs, inputs)        # out.probs, out.angular_deviation
    measures(probs, out.probs)          # per-row l1, l2, kl, top1_flip, top1_confidence_drop
"""

from plugins.base import BUDGET_TOLERANCE, Budget, Defense, DefenseConfig, DefenseOutput, MissingSecret, check_probs
from plugins.measures import distance, kl_divergence, measures
from plugins.registry import (
    ENTRY_POINT_GROUP,
    available_defenses,
    build_defense,
    defense_class,
    load_entry_points,
    needs,
    needs_secret,
    register,
    validate_config,
    with_secret,
)

__all__ = [
    "BUDGET_TOLERANCE",
    "ENTRY_POINT_GROUP",
    "Budget",
    "Defense",
    "DefenseConfig",
    "DefenseOutput",
    "MissingSecret",
    "available_defenses",
    "build_defense",
    "check_probs",
    "defense_class",
    "distance",
    "kl_divergence",
    "load_entry_points",
    "measures",
    "needs",
    "needs_secret",
    "register",
    "validate_config",
    "with_secret",
]
