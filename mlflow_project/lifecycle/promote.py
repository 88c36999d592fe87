"""Move an alias (``production`` or ``candidate``) of a registered defense to a version; rollback = promote the
old version again.

    python -m mlflow_project.lifecycle.promote --name fashion_mnist_lenet-defense --version 2 --alias production
    mlflow run . -e promote -P name=fashion_mnist_lenet-defense -P version=1 --env-manager local
"""

from __future__ import annotations

import argparse
import json
import sys

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from mlflow_project.lifecycle import tracking

ALIASES = ("production", "candidate")


def promote(name: str, version: str | int, alias: str = "production") -> dict[str, str]:
    """Point ``alias`` at ``version`` of ``name``; return the previous and the new version."""
    if alias not in ALIASES:
        raise ValueError(f"alias: {alias!r} is not allowed; allowed: {', '.join(ALIASES)}")
    client = MlflowClient()
    version = str(version)
    try:
        client.get_model_version(name, version)
    except MlflowException as exc:
        raise ValueError(f"version: {name} has no version {version} ({exc.message})") from None
    try:
        previous = str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        previous = ""
    client.set_registered_model_alias(name, alias, version)
    client.set_model_version_tag(name, version, f"stealguard.promoted_{alias}_from", previous or "none")
    return {"name": name, "alias": alias, "version": version, "previous": previous}


def main(argv: list[str] | None = None) -> dict[str, str]:
    p = argparse.ArgumentParser(prog="python -m mlflow_project.lifecycle.promote", description=__doc__.split("\n")[0])
    p.add_argument("--name", required=True, help="registered model name, e.g. fashion_mnist_lenet-defense")
    p.add_argument("--version", required=True, help="the version to point the alias at")
    p.add_argument("--alias", default="production", choices=ALIASES)
    p.add_argument("--tracking-uri", default="")
    a = p.parse_args(argv)
    tracking.setup(a.tracking_uri or None)
    try:
        result = promote(a.name, a.version, a.alias)
    except ValueError as exc:
        print(f"promote: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
