"""The explicit development secrets the tests key randomised defenses with (there is no default secret).

``build_defense`` here is plugins.build_defense with DEV_SECRET passed to every config that needs a secret and
names none (a config that names one keeps it)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import plugins

DEV_SECRET = "stealguard-tests-dev-secret-0001"
OTHER_SECRET = "stealguard-tests-other-secret-02"


def keyed(config: Mapping[str, Any], secret: str = DEV_SECRET) -> dict[str, Any]:
    """``config`` with ``secret`` added when it is randomised and names no secret."""
    config = dict(config)
    if "secret" not in config and plugins.needs_secret(config):
        config["secret"] = secret
    return config


def build_defense(config: Mapping[str, Any] | plugins.DefenseConfig, **resources: Any) -> plugins.Defense:
    if isinstance(config, Mapping):
        config = keyed(config)
    return plugins.build_defense(config, **resources)
