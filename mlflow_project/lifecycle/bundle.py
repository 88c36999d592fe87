"""A defense bundle: everything a registered defense version is, in one directory (its layout and document:
handlers/bundle_document.py): the defense config, the fixed random surrogate's weights (saved, not re-derived,
so every consumer of the version uses the very same surrogate), the victim's export directory and, for a defense
that needs one (adaptive_misinformation), the train_misinformation export directory it was tuned with.

The bundle is the artifact of the registered MLflow model version (the pyfunc in lifecycle/pyfunc.py loads it)
and the source from which ``package`` builds a .mar. This module needs torch, handlers and plugins only.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from handlers import bundle_document
from handlers.service import DefendedPipeline
from handlers.victim_export import VictimExport
from mlflow_project.lab.models import ARCHITECTURES, build_model
from plugins import DefenseOutput, build_defense, needs, needs_secret, validate_config, with_secret

BUNDLE_FILE = bundle_document.DOCUMENT


@dataclass
class DefenseBundle:
    """A bundle read back from disk (see :func:`read_bundle`)."""

    root: Path
    defense: dict[str, Any]
    victim: dict[str, Any]
    surrogate: dict[str, Any] | None
    provenance: dict[str, Any] = field(default_factory=dict)
    misinformation: dict[str, Any] | None = None
    document: dict[str, Any] = field(default_factory=dict)  # defense.json as read

    @property
    def victim_dir(self) -> Path:
        return self.root / bundle_document.VICTIM_DIR

    @property
    def misinformation_dir(self) -> Path | None:
        return self.root / self.misinformation["dir"] if self.misinformation else None

    @property
    def victim_export(self) -> VictimExport:
        return VictimExport.open(self.victim_dir)

    @property
    def input_spec(self) -> dict[str, Any]:
        return self.victim_export.spec


def _misinformation_doc(config: dict[str, Any], misinformation_dir: str | Path | None, victim: VictimExport,
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
    mis = VictimExport.open(misinformation_dir, "misinformation", "train_misinformation")
    if mis.num_classes != victim.num_classes:
        raise ValueError(f"misinformation: {misinformation_dir} answers {mis.num_classes} classes but the victim "
                         f"has {victim.num_classes}; train it for this victim (train_misinformation --victim)")
    folder = bundle_document.MISINFORMATION_DIR
    return {"dir": folder, "arch": mis.arch, "num_classes": mis.num_classes, "dataset": mis.dataset,
            "file": f"{folder}/{mis.relative('eager')}", "source": source or str(misinformation_dir)}


def build_victim(victim_dir: str | Path) -> nn.Module:
    """The eager victim from an export directory, in eval mode."""
    return VictimExport.open(victim_dir).eager(ARCHITECTURES)


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
    victim = VictimExport.open(victim_dir)
    victim_dir = victim.root
    misinformation = _misinformation_doc(config, misinformation_dir, victim, misinformation_source)
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shutil.copytree(victim_dir, out / bundle_document.VICTIM_DIR)
    if misinformation is not None:
        shutil.copytree(Path(misinformation_dir), out / bundle_document.MISINFORMATION_DIR)
    surrogate = None
    if needs(config, "surrogate"):
        net = make_surrogate(victim.eager(ARCHITECTURES), seed=surrogate_seed)
        torch.save(net.state_dict(), out / bundle_document.SURROGATE_FILE)
        surrogate = {"arch": victim.arch, "num_classes": victim.num_classes, "seed": surrogate_seed,
                     "file": bundle_document.SURROGATE_FILE}
    document = {
        "defense": config,
        "victim": {"dir": bundle_document.VICTIM_DIR, "arch": victim.arch, "num_classes": victim.num_classes,
                   "dataset": victim.dataset, "source": victim_source or str(victim_dir)},
        "surrogate": surrogate,
        "misinformation": misinformation,
        "provenance": provenance or {},
    }
    (out / BUNDLE_FILE).write_text(bundle_document.dumps(document), encoding="utf-8")
    return out


def read_bundle(path: str | Path) -> DefenseBundle:
    root = Path(path)
    doc_path = root / BUNDLE_FILE
    if not doc_path.is_file():
        raise ValueError(f"{root}: not a defense bundle (no {BUNDLE_FILE})")
    doc = bundle_document.parse(doc_path.read_text(encoding="utf-8"), str(root))
    validate_config(doc["defense"])
    return DefenseBundle(root=root, defense=doc["defense"], victim=doc["victim"], surrogate=doc.get("surrogate"),
                         provenance=doc.get("provenance", {}), misinformation=doc.get("misinformation"), document=doc)


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


class DefendedVictim(DefendedPipeline):
    """A bundle's victim and defense through the server's pipeline (handlers.service.DefendedPipeline: the float64
    softmax of the victim's logits, the defense on that batch and the inputs, then the output and budget checks),
    warmed up at load like a worker; so the pyfunc and the server give the same defended probabilities for the
    same x, and refuse the same broken defenses (ConfigError at load, DefenseFailed on a batch)."""

    def __init__(self, bundle: DefenseBundle, secret: str | None = None) -> None:
        """``secret``: a randomised defense's key; default: the deployment's (handlers/deployment.py sources:
        STEALGUARD_SECRET, STEALGUARD_SECRET_FILE, ...). A bundle never holds one."""
        self.bundle = bundle
        self.secret_fingerprint: str | None = None
        if needs_secret(bundle.defense):
            from handlers.deployment import HOWTO, find_secret

            found = find_secret() if secret is None else None
            secret = secret if secret is not None else (found.value if found else None)
            if secret is None:
                raise ValueError(f"defense '{bundle.defense['name']}' is randomised and needs its secret; {HOWTO}")
            from plugins.seeding import fingerprint

            self.secret_fingerprint = fingerprint(secret)
        export = bundle.victim_export
        self.surrogate = build_surrogate(bundle)
        self.misinformation = build_misinformation(bundle)
        resources: dict[str, Any] = {"surrogate": self.surrogate, "num_classes": int(bundle.victim["num_classes"])}
        if self.misinformation is not None:
            resources["misinformation"] = self.misinformation
        super().__init__(export.runtime("eager", ARCHITECTURES),
                         build_defense(with_secret(bundle.defense, secret), **resources))
        self.warm_up(tuple(export.shape))

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """The victim's (undefended) probabilities: for checks offline, never served."""
        return self.victim.probabilities(x.to(torch.float32))

    def __call__(self, x: torch.Tensor) -> DefenseOutput:
        return self.defend(x.to(torch.float32)).out
