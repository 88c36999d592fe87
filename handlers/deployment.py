"""What a deployment supplies at start, outside the archive: the defense secret and the disclosure setting.

The secret keys the randomised defenses (random_noise, MAD's ``oracle: random``, gradient_redirection's
``target: random``). There is no default: a worker whose defense needs one and finds none does not load. It is
read, first found wins, from

1. the environment variable ``STEALGUARD_SECRET`` (the secret itself);
2. the file named by the environment variable ``STEALGUARD_SECRET_FILE``;
3. the file named by ``stealguard.secret.file`` in the archive's model-config.yaml (``package --secret-file``);
4. the file named by ``stealguard_secret_file`` in TorchServe's config.properties (the file the environment
   variable ``TS_CONFIG_FILE`` names: TorchServe's own way of locating it; ``make serve`` sets it).

A secret file holds the secret on its first line (surrounding whitespace is stripped) and must lie outside the
archive. Only the secret's fingerprint (plugins.seeding.fingerprint) is ever logged or exported.

``stealguard_defense_header=true`` in config.properties makes every response carry ``X-StealGuard-Defense:
<defense>@<version>`` (deploy/config.dev.properties); anything else, or no config file, keeps it off
(production: clients are told nothing about the defense; metrics and the worker log still carry the version).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from handlers.errors import ConfigError
from plugins.seeding import MIN_SECRET_LENGTH, SECRET_HOWTO, fingerprint

ENV_SECRET = "STEALGUARD_SECRET"
ENV_SECRET_FILE = "STEALGUARD_SECRET_FILE"
ENV_TS_CONFIG = "TS_CONFIG_FILE"
PROPERTY_SECRET_FILE = "stealguard_secret_file"
PROPERTY_HEADER = "stealguard_defense_header"

HOWTO = (
    f"supply it at deploy time: set the environment variable {ENV_SECRET} (the secret) or {ENV_SECRET_FILE} (a "
    f"file holding it), or name such a file outside the archive in config.properties ({PROPERTY_SECRET_FILE}=..., "
    f"found through {ENV_TS_CONFIG}) or in the model's config (stealguard.secret.file, `package --secret-file`); "
    f"it needs >= {MIN_SECRET_LENGTH} characters; {SECRET_HOWTO}"
)


@dataclass(frozen=True)
class Secret:
    """A deploy-time secret and where it came from. ``repr`` shows the fingerprint, never the value."""

    value: str
    source: str

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.value)

    def __repr__(self) -> str:
        return f"Secret(fingerprint={self.fingerprint}, source={self.source!r})"

    __str__ = __repr__


def read_properties(path: str) -> dict[str, str]:
    """key -> value of a .properties file (comments and blank lines skipped; a repeated key: the last wins)."""
    props = {}
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if line and not line.startswith(("#", "!")) and "=" in line:
                key, value = line.split("=", 1)
                props[key.strip()] = value.strip()
    return props


def ts_properties(environ: Mapping[str, str] | None = None) -> tuple[str | None, dict[str, str]]:
    """(path, properties) of the config.properties ``TS_CONFIG_FILE`` names, or (None, {}) when it names none."""
    env = os.environ if environ is None else environ
    path = env.get(ENV_TS_CONFIG)
    if not path:
        return None, {}
    try:
        return path, read_properties(path)
    except OSError as exc:
        raise ConfigError(f"{ENV_TS_CONFIG}={path}: cannot read TorchServe's config file: {exc}") from exc


def defense_header_enabled(properties: Mapping[str, str]) -> bool:
    """``stealguard_defense_header=true`` turns the X-StealGuard-Defense response header on; default off."""
    return str(properties.get(PROPERTY_HEADER, "false")).strip().lower() == "true"


def _read_file(path: str, field: str, model_dir: str | None, base: str | None = None) -> Secret:
    full = os.path.realpath(os.path.join(base or os.getcwd(), os.path.expanduser(path)))
    if model_dir is not None:
        root = os.path.realpath(model_dir)
        if os.path.commonpath([root, full]) == root:
            raise ConfigError(f"{field}: the secret file {path!r} is inside the archive; keep it outside ({HOWTO})")
    try:
        with open(full, encoding="utf-8") as fh:
            value = fh.readline().strip()
    except OSError as exc:
        raise ConfigError(f"{field}: cannot read the secret file {path!r}: {exc.strerror or exc}") from exc
    if not value:
        raise ConfigError(f"{field}: the secret file {path!r} is empty; {HOWTO}")
    return Secret(value, f"{field} ({full})")


def find_secret(
    archive_file: str | None = None,
    model_dir: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> Secret | None:
    """The deploy-time secret from the sources above (``archive_file``: stealguard.secret.file), or None."""
    env = os.environ if environ is None else environ
    if env.get(ENV_SECRET):
        return Secret(env[ENV_SECRET].strip(), ENV_SECRET)
    if env.get(ENV_SECRET_FILE):
        return _read_file(env[ENV_SECRET_FILE], ENV_SECRET_FILE, model_dir)
    if archive_file:
        return _read_file(archive_file, "stealguard.secret.file", model_dir, base=model_dir)
    path, props = ts_properties(env)
    if props.get(PROPERTY_SECRET_FILE):
        return _read_file(props[PROPERTY_SECRET_FILE], f"{path}: {PROPERTY_SECRET_FILE}", model_dir,
                          base=os.path.dirname(os.path.abspath(path)))
    return None
