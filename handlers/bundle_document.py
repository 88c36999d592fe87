"""The one owner of a defense bundle's layout and document (what a registered defense version's ``bundle``
artifact holds; mlflow_project/lifecycle/bundle.py writes and loads bundles through it):

    defense.json              the document: format, defense config, victim / surrogate / misinformation records,
                              provenance
    surrogate_state_dict.pt   the fixed random surrogate's weights (defenses that need a surrogate)
    victim/                   the victim's export directory (handlers.victim_export.VictimExport)
    misinformation/           adaptive_misinformation's model, an export directory of the same layout

It lives in handlers/ because the worker reads bundles too (handlers/registry.py, resolve_at_start); it imports
neither mlflow nor torch.
"""

from __future__ import annotations

import json
from typing import Any

FORMAT = 1
DOCUMENT = "defense.json"
SURROGATE_FILE = "surrogate_state_dict.pt"
VICTIM_DIR = "victim"
MISINFORMATION_DIR = "misinformation"


def dumps(document: dict[str, Any]) -> str:
    """The document's text, with its format number."""
    return json.dumps({**document, "format": FORMAT}, indent=2, sort_keys=True) + "\n"


def parse(text: str | bytes, where: str) -> dict[str, Any]:
    """A bundle document from its text; raise ValueError (naming ``where``) when it is not one of this format."""
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{where}: {DOCUMENT} is not JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("defense"), dict):
        raise ValueError(f"{where}: {DOCUMENT} is not a defense bundle document (no 'defense' mapping)")
    if doc.get("format") != FORMAT:
        raise ValueError(f"{where}: bundle format {doc.get('format')!r} is not supported (expected {FORMAT})")
    return doc
