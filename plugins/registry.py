"""Defenses by name: the built-in ones and third-party ones from the entry-point group ``stealguard.defenses``.

``build_defense(config)`` validates the config with the defense's pydantic model; every failure is a
ValueError that names the field and what is allowed.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import Any

from pydantic import ValidationError

from plugins.base import Defense, DefenseConfig, describe_validation_error

ENTRY_POINT_GROUP = "stealguard.defenses"
BUILTIN_MODULES = (
    "plugins.defenses.identity",
    "plugins.defenses.top_k",
    "plugins.defenses.label_only",
    "plugins.defenses.rounding",
    "plugins.defenses.reverse_sigmoid",
    "plugins.defenses.random_noise",
    "plugins.defenses.mad",
    "plugins.defenses.mad_argmax",
    "plugins.defenses.adaptive_misinformation",
    "plugins.defenses.gradient_redirection",
    "plugins.defenses.ood_gated",
)

log = logging.getLogger(__name__)
_REGISTRY: dict[str, type[Defense]] = {}
_loaded = False


def register(cls: type[Defense]) -> type[Defense]:
    """Class decorator: make a Defense subclass buildable by its ``name``."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls.__qualname__} must set a non-empty class attribute 'name'")
    if not (isinstance(getattr(cls, "Config", None), type) and issubclass(cls.Config, DefenseConfig)):
        raise ValueError(f"defense '{name}' must set 'Config' to a subclass of plugins.DefenseConfig")
    existing = _REGISTRY.get(name)
    if existing is not None and existing is not cls:
        owner = f"{existing.__module__}.{existing.__qualname__}"
        raise ValueError(f"defense name '{name}' is already registered by {owner}")
    _REGISTRY[name] = cls
    return cls


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in BUILTIN_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:  # a real import error inside the module
                raise
    load_entry_points()


def load_entry_points() -> list[str]:
    """Register the defenses that installed packages declare under ``stealguard.defenses``; return their names."""
    names = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = ep.load()
        except Exception as exc:  # a broken plugin must not take the built-in defenses down
            log.warning("stealguard: could not load defense entry point %r (%s): %s", ep.name, ep.value, exc)
            continue
        if not (isinstance(cls, type) and issubclass(cls, Defense)):
            log.warning("stealguard: entry point %r does not name a plugins.Defense subclass; ignored", ep.name)
            continue
        if ep.name != cls.name:
            log.warning("stealguard: entry point %r names defense %r; registered as %r", ep.name, cls.name, cls.name)
        register(cls)
        names.append(cls.name)
    return names


def available_defenses() -> list[str]:
    """Names of every defense that ``build_defense`` can build, sorted."""
    _load()
    return sorted(_REGISTRY)


def defense_class(name: str) -> type[Defense]:
    _load()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"name: unknown defense {name!r}; available: {', '.join(available_defenses())}") from None


def validate_config(config: Mapping[str, Any] | DefenseConfig) -> DefenseConfig:
    """Validate a config mapping against its defense's pydantic model; raise ValueError naming the bad field."""
    if isinstance(config, DefenseConfig):
        defense_class(config.name)
        return config
    if not isinstance(config, Mapping):
        raise ValueError(f"a defense config must be a mapping with a 'name'; got {type(config).__name__}")
    if "name" not in config:
        raise ValueError(f"name: missing; a defense config needs a 'name', one of: {', '.join(available_defenses())}")
    cls = defense_class(config["name"])
    try:
        return cls.Config.model_validate(dict(config))
    except ValidationError as exc:
        raise ValueError(_describe(cls.name, exc)) from None


def _describe(defense: str, exc: ValidationError) -> str:
    allowed = ", ".join(defense_class(defense).Config.model_fields)
    return describe_validation_error(
        exc,
        f"invalid config for defense '{defense}'",
        missing=f"missing (required by defense '{defense}')",
        unknown=f"not a parameter of defense '{defense}' (allowed: {allowed})",
    )


def needs_secret(config: Mapping[str, Any] | DefenseConfig) -> bool:
    """True when the (validated) config is randomised and so must be built with a deploy-time secret."""
    return validate_config(config).needs_secret


def with_secret(config: Mapping[str, Any] | DefenseConfig, secret: str | None) -> DefenseConfig:
    """The validated config, keyed by ``secret`` when it needs one (configs that draw no keyed randomness are
    returned unchanged, and ``secret`` may then be None)."""
    cfg = validate_config(config)
    if not cfg.needs_secret or secret is None:
        return cfg
    return validate_config({**cfg.model_dump(), "secret": secret})


def needs(config: Mapping[str, Any] | DefenseConfig, resource: str) -> bool:
    """Whether the defense ``config`` needs ``resource`` (inputs, surrogate, misinformation), its inner
    defenses' needs included (:meth:`plugins.base.Defense.requirements`)."""
    data = config.model_dump() if isinstance(config, DefenseConfig) else config
    if not isinstance(data, Mapping) or "name" not in data:
        raise ValueError("name: a defense config needs a 'name'")
    reqs = defense_class(str(data["name"])).requirements(data)
    if resource not in reqs:
        raise ValueError(f"resource: unknown {resource!r}; allowed: {', '.join(reqs)}")
    return reqs[resource]


def build_defense(config: Mapping[str, Any] | DefenseConfig, **resources: Any) -> Defense:
    """Build a defense from its config. ``resources`` carries what some defenses need, e.g. ``surrogate=net``
    (MAD) or ``num_classes=K`` (to check class-count-dependent parameters at build time)."""
    cfg = validate_config(config)
    cls = defense_class(cfg.name)
    if needs(cfg, "surrogate") and resources.get("surrogate") is None:
        raise ValueError(f"surrogate: defense '{cfg.name}' needs a surrogate model (build_defense(..., surrogate=net))")
    return cls(cfg, **resources)
