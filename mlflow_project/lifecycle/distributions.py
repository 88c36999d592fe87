"""Ship installed Python distributions (third-party defenses) inside a TorchServe archive: ``package --extra-dist``.

A third-party defense is a distribution that declares its class under the entry-point group
``stealguard.defenses`` (plugins/registry.py). ``package --extra-dist NAME`` copies what pip installed for
``NAME`` (its importable files and its ``*.dist-info`` directory, entry_points.txt included, as listed in the
distribution's RECORD) into the archive's ``pylib/`` directory (``handlers.EXTRA_CODE_DIR``). The handler puts
that directory on ``sys.path`` before it reads its config, so ``importlib.metadata`` in the worker sees the
distribution and ``build_defense({"name": ...})`` finds the defense by name, as it does where it was installed.

Dependencies are not shipped implicitly: a requirement that the server's environment (requirements/serve.txt)
does not pin must be shipped with its own ``--extra-dist`` (or installed on the server); package warns otherwise.
"""

from __future__ import annotations

import json
import shutil
import sys
from importlib.metadata import (
    Distribution,
    PackageNotFoundError,
    distribution,
    entry_points,
    packages_distributions,
)
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from plugins import ENTRY_POINT_GROUP, defense_class

REPO = Path(__file__).resolve().parents[2]
SERVE_REQUIREMENTS = REPO / "requirements" / "serve.txt"
# Top-level names an archive already uses for its own code: a shipped distribution must not shadow them.
RESERVED = frozenset({"handlers", "plugins", "mlflow_project", "stealguard_handler", "registry_models"})


def _installed(name: str) -> Distribution:
    try:
        return distribution(name)
    except PackageNotFoundError:
        providers = sorted({ep.dist.name for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.dist is not None})
        hint = f"; installed distributions declaring {ENTRY_POINT_GROUP}: {', '.join(providers)}" if providers else ""
        raise ValueError(f"--extra-dist: no installed distribution named {name!r} (pip install it first){hint}"
                         ) from None


def _editable(dist: Distribution) -> bool:
    text = dist.read_text("direct_url.json")
    return bool(text) and bool(json.loads(text).get("dir_info", {}).get("editable"))


def ship(names: list[str], dest: Path) -> list[dict[str, Any]]:
    """Copy each installed distribution's files under ``dest`` (the archive's ``pylib/``); return one record per
    distribution: name, version, top-level names and the defenses it declares."""
    records: list[dict[str, Any]] = []
    owners: dict[str, str] = {}
    for name in dict.fromkeys(n.strip() for n in names if n.strip()):
        if canonicalize_name(name) == "stealguard":
            raise ValueError("--extra-dist: stealguard itself is always in the archive (handlers/, plugins/)")
        dist = _installed(name)
        dist_name = dist.metadata["Name"]
        if _editable(dist):
            raise ValueError(
                f"--extra-dist: {dist_name} is installed in editable mode (its code stays in its source tree); "
                "install it normally (pip install PATH, not -e) to ship it"
            )
        if dist.files is None:
            raise ValueError(f"--extra-dist: {dist_name} has no RECORD of its files; reinstall it with pip")
        files = [f for f in dist.files if f.parts[0] != ".." and "__pycache__" not in f.parts
                 and f.suffix not in (".pyc", ".pth")]
        top = sorted({f.parts[0].removesuffix(".py") for f in files
                      if not f.parts[0].endswith((".dist-info", ".egg-info"))})
        for t in top:
            if t in RESERVED:
                raise ValueError(f"--extra-dist: {dist_name} installs top-level {t!r}, which the archive's own code "
                                 f"uses (reserved: {', '.join(sorted(RESERVED))})")
            if t in owners and owners[t] != dist_name:
                raise ValueError(f"--extra-dist: {dist_name} and {owners[t]} both install top-level {t!r}")
            owners[t] = dist_name
        for f in files:
            src = Path(dist.locate_file(f))
            if src.is_file():
                target = dest / f
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, target)
        defenses = sorted(ep.name for ep in dist.entry_points if ep.group == ENTRY_POINT_GROUP)
        records.append({"name": dist_name, "version": dist.version, "top_level": top, "defenses": defenses})
    return records


def pins(*files: Path) -> dict[str, str]:
    """``{canonical name: "name==version"}`` of the pins in requirements files (``-r`` lines are not followed)."""
    found = {}
    for path in files:
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            line = line.split("#", 1)[0].strip()
            if line and not line.startswith("-"):
                found[canonicalize_name(Requirement(line).name)] = line
    return found


def serve_pins() -> set[str]:
    """Canonical names of the distributions the server's environment pins (requirements/serve.txt)."""
    return set(pins(SERVE_REQUIREMENTS))


def warnings_for(defense: str, shipped: list[dict[str, Any]]) -> list[str]:
    """What the server may lack: the defense's own distribution when it is not shipped, and requirements of the
    shipped distributions that neither requirements/serve.txt nor another --extra-dist provides."""
    notes = []
    shipped_names = {canonicalize_name(r["name"]) for r in shipped}
    try:
        top = defense_class(defense).__module__.split(".")[0]
    except ValueError:  # an unknown name: the archive's config check refuses it (handlers/config.py), not this
        top = "plugins"
    if top not in RESERVED:
        for dist_name in packages_distributions().get(top, []):
            if canonicalize_name(dist_name) not in shipped_names:
                notes.append(f"defense '{defense}' comes from distribution {dist_name}, which this archive does not "
                             f"ship: the server must have it installed, or pass --extra-dist {dist_name}")
    available = serve_pins() | shipped_names | {"stealguard"}
    for record in shipped:
        for text in distribution(record["name"]).requires or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            if canonicalize_name(req.name) not in available:
                notes.append(f"{record['name']} requires {req}, which requirements/serve.txt does not pin: ship it "
                             f"with --extra-dist {req.name} or install it on the server")
    return notes


def report(defense: str, shipped: list[dict[str, Any]]) -> None:
    for note in warnings_for(defense, shipped):
        print(f"package: warning: {note}", file=sys.stderr)
