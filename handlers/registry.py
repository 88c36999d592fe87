"""Opt-in ``resolve_at_start``: once, when the worker starts, ask the MLflow server which version of the
registered defense an alias points to, and if it is not the version embedded in the archive, download that
version's bundle and serve it.

This talks to an ``mlflow server`` over its REST API with ``requests`` (handlers never import mlflow):

    GET <MLFLOW_TRACKING_URI>/api/2.0/mlflow/registered-models/alias?name=&alias=      -> the version
    GET <MLFLOW_TRACKING_URI>/model-versions/get-artifact?name=&version=&path=         -> MLmodel, bundle files

so MLFLOW_TRACKING_URI must be the server's http(s) URI (a ``sqlite:``/file store cannot be reached this way).
Authentication, when the server needs it: MLFLOW_TRACKING_TOKEN (bearer) or MLFLOW_TRACKING_USERNAME and
MLFLOW_TRACKING_PASSWORD (basic). Only the files the worker needs are downloaded: the bundle document, the surrogate
weights, the misinformation model's weights (adaptive_misinformation: the version's own, never the archive's)
and, when the archive's victim came from the embedded bundle, the victim's input spec and weights.

Every failure raises :class:`ResolveError`; the handler then applies ``stealguard.version.fallback``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import requests
import yaml

from handlers import bundle_document
from handlers.errors import ConfigError
from handlers.victim_export import INPUT_SPEC, VictimExport
from plugins import needs

log = logging.getLogger(__name__)

FIELD = "stealguard.version.resolve_at_start"
MODELS_FILE = "registry_models.py"  # the architectures (mlflow_project/lab/models.py), shipped by package
TIMEOUT_S = 10.0


class ResolveError(ConfigError):
    """The alias could not be resolved, or the version it names could not be downloaded or used."""


@dataclass(frozen=True)
class Resolution:
    """What happened at start: the version served and where it came from."""

    section: dict[str, Any]  # the stealguard section to serve (the embedded one when unchanged)
    version: str
    changed: bool  # True when the alias named another version than the embedded one


class Client:
    """The few REST calls of an ``mlflow server`` that resolve_at_start needs."""

    def __init__(self, tracking_uri: str | None, timeout: float = TIMEOUT_S) -> None:
        uri = (tracking_uri or "").strip()
        if not uri.startswith(("http://", "https://")):
            raise ResolveError(
                f"{FIELD}: needs MLFLOW_TRACKING_URI to be an `mlflow server` URI (http:// or https://), "
                f"reached over REST; got {uri or 'nothing'!r}"
            )
        self.base = uri.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()
        token = os.environ.get("MLFLOW_TRACKING_TOKEN")
        user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"
        elif user and password:
            self.session.auth = (user, password)

    def _get(self, path: str, params: dict[str, str]) -> requests.Response:
        url = self.base + path
        try:
            r = self.session.get(url, params=params, timeout=self.timeout)
        except requests.RequestException as exc:
            raise ResolveError(f"{FIELD}: MLflow server {self.base} cannot be reached: {exc}") from exc
        if r.status_code != 200:
            try:
                detail = r.json().get("message", r.text[:300])
            except ValueError:
                detail = r.text[:300]
            raise ResolveError(f"{FIELD}: GET {path} {params} answered HTTP {r.status_code}: {detail}")
        return r

    def alias_version(self, name: str, alias: str) -> dict[str, Any]:
        r = self._get("/api/2.0/mlflow/registered-models/alias", {"name": name, "alias": alias})
        try:
            return r.json()["model_version"]
        except (ValueError, KeyError) as exc:
            raise ResolveError(f"{FIELD}: unexpected answer for {name}@{alias}: {r.text[:300]}") from exc

    def artifact(self, name: str, version: str, path: str) -> bytes:
        params = {"name": name, "version": version, "path": path}
        return self._get("/model-versions/get-artifact", params).content


def _bundle_path(client: Client, name: str, version: str) -> str:
    """Where the pyfunc keeps its ``bundle`` artifact inside the model version (from its MLmodel file)."""
    try:
        mlmodel = yaml.safe_load(client.artifact(name, version, "MLmodel")) or {}
        return str(mlmodel["flavors"]["python_function"]["artifacts"]["bundle"]["path"]).strip("/")
    except (KeyError, TypeError, yaml.YAMLError) as exc:
        raise ResolveError(
            f"{FIELD}: {name} version {version} is not a StealGuard defense (its MLmodel has no pyfunc "
            "artifact 'bundle'; register it with mlflow_project.lifecycle.register)"
        ) from exc


def _architectures(model_dir: str) -> dict[str, type]:
    path = os.path.join(model_dir, MODELS_FILE)
    if not os.path.isfile(path):
        raise ResolveError(
            f"{FIELD}: the archive has no {MODELS_FILE} to build another version's networks from; rebuild it "
            "with `package --defense models:/<name>@<alias> --resolve-at-start`"
        )
    spec = importlib.util.spec_from_file_location("stealguard_registry_models", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return dict(module.ARCHITECTURES)


def _eager(rel_file: str, arch: str, num_classes: int, model_dir: str) -> dict[str, Any]:
    archs = _architectures(model_dir)
    if arch not in archs:
        raise ResolveError(f"{FIELD}: architecture {arch!r} is not in {MODELS_FILE} ({', '.join(archs)})")
    return {"runtime": "eager", "file": rel_file, "model_file": MODELS_FILE, "class": archs[arch].__name__,
            "kwargs": {"num_classes": int(num_classes)}}


def _needs_misinformation(defense: dict[str, Any]) -> bool:
    try:
        return needs(defense, "misinformation")
    except ValueError:  # an unknown defense: parse() says so with the allowed names
        return False


def resolve(section: dict[str, Any], model_dir: str, tracking_uri: str | None) -> Resolution:
    """Resolve ``section['version']['alias']``; return the stealguard section to serve.

    ``section`` is the archive's validated ``stealguard`` section (dumped by alias). Raises ResolveError.
    """
    embedded = dict(section["version"])
    name, alias = embedded["name"], embedded["alias"]
    client = Client(tracking_uri)
    mv = client.alias_version(name, alias)
    version = str(mv.get("version", ""))
    if not version:
        raise ResolveError(f"{FIELD}: the server's answer for {name}@{alias} names no version")
    if version == str(embedded.get("version")):
        return Resolution(section=section, version=version, changed=False)

    bundle = _bundle_path(client, name, version)
    try:
        doc = bundle_document.parse(client.artifact(name, version, f"{bundle}/{bundle_document.DOCUMENT}"),
                                    f"{name} version {version}")
    except ValueError as exc:
        raise ResolveError(f"{FIELD}: {exc}") from None
    defense = dict(doc["defense"])
    dest = tempfile.mkdtemp(prefix=f"registry-v{version}-", dir=model_dir)  # private to this worker
    rel = os.path.relpath(dest, model_dir)

    def fetch(path: str) -> str:
        data = client.artifact(name, version, f"{bundle}/{path}")
        local = os.path.join(dest, path)
        os.makedirs(os.path.dirname(local), exist_ok=True)
        with open(local, "wb") as fh:
            fh.write(data)
        return os.path.join(rel, path)

    new = {k: v for k, v in section.items() if k not in ("defense", "surrogate", "misinformation", "version")}
    new["defense"] = defense
    surrogate = doc.get("surrogate")
    if surrogate:
        new["surrogate"] = _eager(fetch(surrogate["file"]), surrogate["arch"], surrogate["num_classes"], model_dir)
    misinformation = doc.get("misinformation")
    if misinformation:
        new["misinformation"] = _eager(fetch(misinformation["file"]), misinformation["arch"],
                                       misinformation["num_classes"], model_dir)
    elif _needs_misinformation(defense):
        raise ResolveError(
            f"{FIELD}: {name} version {version}'s defense '{defense.get('name')}' needs a misinformation model but "
            "its bundle carries none; register it again with `register --misinformation <train_misinformation "
            "export>`"
        )
    if embedded.get("victim_source") == "bundle":
        spec_path = f"{bundle_document.VICTIM_DIR}/{INPUT_SPEC}"
        try:
            victim_doc = VictimExport.parse_spec(client.artifact(name, version, f"{bundle}/{spec_path}"),
                                                 f"{name} version {version}'s {spec_path}")
        except ValueError as exc:
            raise ResolveError(f"{FIELD}: {exc}") from None
        shape = [int(d) for d in victim_doc["shape"]]
        if shape != list(section["input"]["shape"]):
            raise ResolveError(
                f"{FIELD}: {name} version {version}'s victim takes rows of shape {shape}, but this archive's "
                f"stealguard.input.shape is {list(section['input']['shape'])}; package that version instead"
            )
        runtime = section["victim"]["runtime"]
        file = fetch(f"{bundle_document.VICTIM_DIR}/{VictimExport.relative(runtime)}")
        if runtime == "eager":
            new["victim"] = _eager(file, victim_doc["arch"], victim_doc["num_classes"], model_dir)
        else:
            new["victim"] = {**section["victim"], "file": file}
    new["version"] = {**embedded, "version": version, "run_id": mv.get("run_id") or None,
                      "embedded_version": embedded.get("version"), "resolved_at_start": True}
    return Resolution(section=new, version=version, changed=True)


def load(cfg: Any, model_dir: str, build: Any, tracking_uri: str | None = None) -> tuple[Any, Any, str]:
    """(config served, ``build(config)``, a note for the start log) under ``stealguard.version``'s rules.

    Without ``resolve_at_start`` the embedded config is built. With it, the alias is resolved; another version
    is downloaded, validated and built (warm-up included). Any failure (server down, alias missing, download,
    an unusable version) applies ``fallback``: ``embedded`` builds the embedded config, ``fail`` raises.
    Either way the worker serves a defense or does not load: never undefended.
    """
    from handlers.config import SECTION, parse

    version = cfg.version
    if version is None or not version.resolve_at_start:
        return cfg, build(cfg), "embedded"
    where = f"{version.name}@{version.alias}"
    uri = tracking_uri if tracking_uri is not None else os.environ.get("MLFLOW_TRACKING_URI")
    try:
        res = resolve(cfg.model_dump(by_alias=True), model_dir, uri)
        if not res.changed:
            return cfg, build(cfg), f"resolved at start: {where} -> version {res.version}, the embedded one"
        resolved = parse({SECTION: res.section}, model_dir)
        model = build(resolved)
        return resolved, model, (
            f"resolved at start: {where} -> version {res.version} (embedded version {version.version} not used)"
        )
    except Exception as exc:
        reason = str(exc) if isinstance(exc, ConfigError) else f"{type(exc).__name__}: {exc}"
        if version.fallback != "embedded":
            raise ConfigError(
                f"stealguard.version.fallback is 'fail' and resolving {where} failed, so the model does not "
                f"load (set fallback: embedded to serve embedded version {version.version} instead): {reason}"
            ) from exc
        log.error("StealGuard: resolving %s failed; fallback 'embedded' serves embedded version %s: %s",
                  where, version.version, reason)
        return cfg, build(cfg), f"embedded version {version.version} (fallback: resolving {where} failed)"
