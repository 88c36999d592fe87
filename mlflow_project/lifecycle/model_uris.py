"""Resolving MLflow model URIs (``models:/<name>@<alias>``, ``models:/<name>/<version>``) to versions and files.

Used when something is built (register, package), never per request.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts

from handlers.victim_export import VictimExport

_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))/?$")
VICTIM_EXPORTS = "exports"  # where train_victim logs a victim's export directory in its run


@dataclass(frozen=True)
class ResolvedVersion:
    name: str
    version: str
    run_id: str
    alias: str | None
    source: str

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    def as_dict(self) -> dict[str, str | None]:
        return {"name": self.name, "version": self.version, "run_id": self.run_id, "alias": self.alias,
                "source": self.source}


def is_models_uri(ref: str) -> bool:
    return str(ref).startswith("models:/")


def resolve(uri: str, client: MlflowClient | None = None) -> ResolvedVersion:
    """The registered model version a ``models:/`` URI names (an alias is resolved now)."""
    match = _MODELS_URI.match(uri)
    if not match:
        raise ValueError(f"{uri!r} is not a registered-model URI; allowed: models:/<name>@<alias> or "
                         "models:/<name>/<version>")
    client = client or MlflowClient()
    name, alias, version = match["name"], match["alias"], match["version"]
    mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    return ResolvedVersion(name=name, version=str(mv.version), run_id=mv.run_id or "", alias=alias, source=mv.source)


def victim_export_dir(ref: str, workdir: Path, client: MlflowClient | None = None) -> tuple[Path, dict]:
    """A victim's export directory (a VictimExport) from a path or a ``models:/`` URI.

    For a registered victim, the export directory that train_victim logged in the version's run is downloaded.
    """
    if not is_models_uri(ref):
        path = Path(ref)
        if not VictimExport.is_export(path.parent if path.is_file() else path):
            raise ValueError(f"victim: {ref} is neither a models:/ URI nor an export directory written by "
                             "train_victim")
        path = VictimExport.open(path).root
        return path, {"source": str(path)}
    version = resolve(ref, client)
    if not version.run_id:
        raise ValueError(f"victim: {ref} (version {version.version}) has no run; cannot find its exports")
    local = download_artifacts(run_id=version.run_id, artifact_path=VICTIM_EXPORTS, dst_path=str(workdir))
    return Path(local), {"source": ref, **{f"registered_{k}": v for k, v in version.as_dict().items()}}
