"""A defense bundle: everything a registered defense version is, in one directory.

    defense.json              the defense config, the surrogate's recipe, the victim it was tuned for, provenance
    surrogate_state_dict.pt   the fixed random surrogate's weights (saved, not re-derived, so every consumer
                              of the version uses the very same surrogate)
    victim/                   the victim's export directory as train_victim wrote it (state_dict.pt,
                              input_spec.json, index_to_name.json, model.pt2, model.torchscript.pt, model.onnx)
    misinformation/           only for a defense that needs a misinformation model (adaptive_misinformation):
                              the train_misinformation export directory it was tuned with (state_dict.pt,
                              input_spec.json, and the other runtimes' files when they were exported)

The bundle is the artifact of the registered MLflow model version (the pyfunc in lifecycle/pyfunc.py loads it)
and the source from which ``package`` builds a .mar. This module needs torch and plugins only.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mlflow_project.lab.models import build_model
from plugins import Defense, DefenseOutput, build_defense, needs, validate_config

BUNDLE_FORMAT = 1
BUNDLE_FILE = "defense.json"
SURROGATE_FILE = "surrogate_state_dict.pt"
VICTIM_DIR = "victim"
VICTIM_REQUIRED = ("state_dict.pt", "input_spec.json")
MISINFORMATION_DIR = "misinformation"


@dataclass
class DefenseBundle:
    """A bundle read back from disk (see :func:`read_bundle`)."""

    root: Path
    defense: dict[str, Any]
    victim: dict[str, Any]
    surrogate: dict[str, Any] | None
    provenance: dict[str, Any] = field(default_factory=dict)
    misinformation: dict[str, Any] | None = None

    @property
    def victim_dir(self) -> Path:
        return self.root / VICTIM_DIR

    @property
    def misinformation_dir(self) -> Path | None:
        return self.root / self.misinformation["dir"] if self.misinformation else None

    @property
    def input_spec(self) -> dict[str, Any]:
        return json.loads((self.victim_dir / "input_spec.json").read_text())


def _victim_doc(victim_dir: Path, role: str = "victim", writer: str = "train_victim") -> dict[str, Any]:
    missing = [name for name in VICTIM_REQUIRED if not (victim_dir / name).is_file()]
    if missing:
        raise ValueError(
            f"{role}: {victim_dir} is not a {role} export directory (missing {', '.join(missing)}); "
            f"expected the directory {writer} writes (state_dict.pt, input_spec.json, ...)"
        )
    return json.loads((victim_dir / "input_spec.json").read_text())


def _misinformation_doc(config: dict[str, Any], misinformation_dir: str | Path | None, victim_doc: dict[str, Any],
                        source: str | None) -> dict[str, Any] | None:
    """The bundle's ``misinformation`` record (None for a defense that needs no such model), after checking that
    it is given exactly when the defense needs one and that it answers with the victim's classes."""
    if not needs(config, "misinformation"):
        if misinformation_dir:
            raise ValueError(f"misinformation: defense '{config['name']}' does not use a misinformation model; "
                             "allowed only with defenses that need one (adaptive_misinformation)")
        return None
    if not misinformation_dir:
        raise ValueError(f"misinformation: defense '{config['name']}' needs a misinformation model; give the "
                         "train_misinformation export directory it was tuned with")
    doc = _victim_doc(Path(misinformation_dir), "misinformation", "train_misinformation")
    if int(doc["num_classes"]) != int(victim_doc["num_classes"]):
        raise ValueError(f"misinformation: {misinformation_dir} answers {doc['num_classes']} classes but the victim "
                         f"has {victim_doc['num_classes']}; train it for this victim (train_misinformation --victim)")
    return {"dir": MISINFORMATION_DIR, "arch": doc["arch"], "num_classes": int(doc["num_classes"]),
            "dataset": doc.get("dataset"), "file": f"{MISINFORMATION_DIR}/state_dict.pt",
            "source": source or str(misinformation_dir)}


def build_victim(victim_dir: Path) -> nn.Module:
    """The eager victim from an export directory, in eval mode."""
    doc = _victim_doc(victim_dir)
    model = build_model(doc["arch"], num_classes=int(doc["num_classes"]))
    model.load_state_dict(torch.load(victim_dir / "state_dict.pt", map_location="cpu", weights_only=True))
    return model.eval()


def write_bundle(
    out_dir: str | Path,
    defense_config: dict[str, Any],
    victim_dir: str | Path,
    surrogate_seed: int = 0,
    victim_source: str | None = None,
    provenance: dict[str, Any] | None = None,
    misinformation_dir: str | Path | None = None,
    misinformation_source: str | None = None,
) -> Path:
    """Validate ``defense_config``, build the fixed surrogate when the defense needs one, copy the misinformation
    model (``misinformation_dir``, a train_misinformation export directory) when it needs one, write a bundle."""
    from plugins.surrogate import make_surrogate

    config = validate_config(defense_config).model_dump()
    victim_dir = Path(victim_dir)
    doc = _victim_doc(victim_dir)
    misinformation = _misinformation_doc(config, misinformation_dir, doc, misinformation_source)
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shutil.copytree(victim_dir, out / VICTIM_DIR)
    if misinformation is not None:
        shutil.copytree(Path(misinformation_dir), out / MISINFORMATION_DIR)
    surrogate = None
    if needs(config, "surrogate"):
        net = make_surrogate(build_victim(victim_dir), seed=surrogate_seed)
        torch.save(net.state_dict(), out / SURROGATE_FILE)
        surrogate = {"arch": doc["arch"], "num_classes": int(doc["num_classes"]), "seed": surrogate_seed,
                     "file": SURROGATE_FILE}
    document = {
        "format": BUNDLE_FORMAT,
        "defense": config,
        "victim": {"dir": VICTIM_DIR, "arch": doc["arch"], "num_classes": int(doc["num_classes"]),
                   "dataset": doc.get("dataset"), "source": victim_source or str(victim_dir)},
        "surrogate": surrogate,
        "misinformation": misinformation,
        "provenance": provenance or {},
    }
    (out / BUNDLE_FILE).write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    return out


def read_bundle(path: str | Path) -> DefenseBundle:
    root = Path(path)
    doc_path = root / BUNDLE_FILE
    if not doc_path.is_file():
        raise ValueError(f"{root}: not a defense bundle (no {BUNDLE_FILE})")
    doc = json.loads(doc_path.read_text())
    if doc.get("format") != BUNDLE_FORMAT:
        raise ValueError(f"{doc_path}: bundle format {doc.get('format')!r} is not supported (expected {BUNDLE_FORMAT})")
    validate_config(doc["defense"])
    return DefenseBundle(root=root, defense=doc["defense"], victim=doc["victim"], surrogate=doc.get("surrogate"),
                         provenance=doc.get("provenance", {}), misinformation=doc.get("misinformation"))


def _frozen(bundle: DefenseBundle, spec: dict[str, Any] | None) -> nn.Module | None:
    """The eager network a bundle record (arch, num_classes, file) describes, frozen in eval mode."""
    if spec is None:
        return None
    net = build_model(spec["arch"], num_classes=int(spec["num_classes"]))
    net.load_state_dict(torch.load(bundle.root / spec["file"], map_location="cpu", weights_only=True))
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def build_surrogate(bundle: DefenseBundle) -> nn.Module | None:
    return _frozen(bundle, bundle.surrogate)


def build_misinformation(bundle: DefenseBundle) -> nn.Module | None:
    """The bundled misinformation model (adaptive_misinformation's), or None when the defense needs none."""
    return _frozen(bundle, bundle.misinformation)


class DefendedVictim:
    """The victim and its defense, as the server runs them: the float64 softmax of the victim's logits, then the
    defense on that batch and the inputs (the same computation as handlers/service.py, so the pyfunc and the
    server give the same defended probabilities for the same x)."""

    def __init__(self, bundle: DefenseBundle) -> None:
        self.bundle = bundle
        self.victim = build_victim(bundle.victim_dir)
        self.surrogate = build_surrogate(bundle)
        self.misinformation = build_misinformation(bundle)
        resources: dict[str, Any] = {"surrogate": self.surrogate, "num_classes": int(bundle.victim["num_classes"])}
        if self.misinformation is not None:
            resources["misinformation"] = self.misinformation
        self.defense: Defense = build_defense(bundle.defense, **resources)

    @torch.no_grad()
    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.victim(x.to(torch.float32)).to(torch.float64), dim=1)

    def __call__(self, x: torch.Tensor) -> DefenseOutput:
        x = x.to(torch.float32)
        return self.defense(self.probabilities(x), x)
