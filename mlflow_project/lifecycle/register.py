"""Register a defense configuration as a new version of an MLflow registered model (a pyfunc).

    python -m mlflow_project.lifecycle.register --sweep-run <parent run id>            # the run the sweep recommended
    python -m mlflow_project.lifecycle.register --run-id <evaluation run id>
    python -m mlflow_project.lifecycle.register --config defense.yaml --victim models:/fashion_mnist_lenet@production
    mlflow run . -e register -P config=defense.json -P victim=artifacts/victims/fashion_mnist_lenet --env-manager local

The version's artifact is a defense bundle (lifecycle/bundle.py: config, surrogate weights, the victim it was tuned
for and, for adaptive_misinformation, its misinformation model) served through lifecycle/pyfunc.py, so
``mlflow.pyfunc.load_model("models:/<name>@production").predict(x)`` gives the defended probabilities the server
gives. The default registered name is ``<victim>-defense``.

The misinformation model (only for a defense that needs one) is ``--misinformation``: a train_misinformation
export directory or an MLflow artifact URI (``runs:/<train_misinformation run>/misinformation``). With
``--sweep-run`` / ``--run-id`` it defaults to the one the point was evaluated with: a sweep point's
``runs:/<sweep parent>/misinformation`` (the sweep logs the model there), else the run's ``misinformation``
param (a local export directory: register on the machine that ran it, or pass ``--misinformation``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from importlib.metadata import packages_distributions
from modulefinder import ModuleFinder
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.models import infer_signature
from packaging.utils import canonicalize_name

from handlers import bundle_document
from handlers.victim_export import VictimExport
from mlflow_project.lifecycle import distributions, tracking
from mlflow_project.lifecycle.bundle import DefendedVictim, read_bundle, write_bundle
from mlflow_project.lifecycle.model_uris import is_models_uri, victim_export_dir
from mlflow_project.sweep.select import MISINFORMATION_TAG, RECOMMENDED_RUN_TAG
from plugins import needs

PYFUNC_CODE = Path(__file__).with_name("pyfunc.py")
REPO = Path(__file__).resolve().parents[2]
RECOMMENDED_TAG = "stealguard.recommended"
FIRST_PARTY = ("plugins", "handlers", "mlflow_project")
# Shipped whole: plugins.registry imports the built-in defenses by name (BUILTIN_MODULES), which no import
# statement shows.
WHOLE_PACKAGES = ("plugins",)
REQUIREMENTS = (REPO / "requirements" / "serve.txt", REPO / "requirements" / "lab.txt")


def pyfunc_code() -> tuple[list[str], list[str]]:
    """What the pyfunc (lifecycle/pyfunc.py) imports: the first-party modules (``plugins`` whole, the rest module
    by module, packages' ``__init__`` included) and the pinned distributions behind its third-party imports,
    with mlflow (``name==version`` lines from requirements/serve.txt and lab.txt)."""
    finder = ModuleFinder(path=[str(REPO)])  # only first-party modules resolve; everything else is "missing"
    finder.run_script(str(PYFUNC_CODE))
    for package in WHOLE_PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            finder.import_hook(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    modules = sorted(name for name, m in finder.modules.items() if name.split(".")[0] in FIRST_PARTY and m.__file__)
    imported = {name.split(".")[0] for name in finder.badmodules} - set(sys.stdlib_module_names) - set(FIRST_PARTY)
    imported.add("mlflow")
    pinned = distributions.pins(*REQUIREMENTS)
    owners = packages_distributions()
    requirements, unpinned = set(), []
    for top in sorted(imported):
        dists = owners.get(top, [])
        named = [d for d in dists if canonicalize_name(d) == canonicalize_name(top)]  # mlflow, not mlflow-skinny
        for dist in named or dists:
            key = canonicalize_name(dist)
            (requirements.add(pinned[key]) if key in pinned else unpinned.append(f"{dist} (import {top})"))
        if not dists:
            unpinned.append(f"import {top}")
    if unpinned:
        raise ValueError(f"the pyfunc imports what requirements/serve.txt and lab.txt do not pin: "
                         f"{', '.join(unpinned)}")
    return modules, sorted(requirements, key=str.lower)


def stage_code(modules: list[str], dest: Path) -> list[str]:
    """Copy the pyfunc's first-party modules under ``dest`` (one folder per top-level package); return the
    folders, as ``log_model(code_paths=...)`` takes them."""
    for name in modules:
        parts = name.split(".")
        source = REPO.joinpath(*parts)
        source = source / "__init__.py" if source.is_dir() else source.with_suffix(".py")
        target = dest / source.relative_to(REPO)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    return [str(dest / top) for top in sorted({m.split(".")[0] for m in modules})]

FINGERPRINT_TAG = "stealguard.secret_fingerprint"


def default_name(victim_ref: str, victim_dir: Path) -> str:
    """``<victim>-defense``: the victim's registered name, else its export directory's name."""
    if is_models_uri(victim_ref):
        stem = victim_ref[len("models:/"):].split("@")[0].split("/")[0]
    else:
        stem = victim_dir.name
    return f"{stem}-defense"


def recommended_child(client: MlflowClient, parent_run_id: str) -> str:
    """The run id of the sweep point the sweep ``parent_run_id`` recommended: the parent's
    ``stealguard.recommended_run_id`` tag (a point reused from an earlier run of the same sweep may sit under
    another parent), else its child tagged ``stealguard.recommended=true``."""
    parent = client.get_run(parent_run_id)
    if parent.data.tags.get(RECOMMENDED_RUN_TAG):
        return parent.data.tags[RECOMMENDED_RUN_TAG]
    runs = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.`{RECOMMENDED_TAG}` = 'true'",
    )
    if not runs:
        raise ValueError(f"sweep-run: no point of sweep {parent_run_id} is tagged {RECOMMENDED_TAG}=true; "
                         "run the sweep's selection step first")
    return runs[0].info.run_id


def config_from_run(client: MlflowClient, run_id: str, workdir: Path) -> tuple[dict[str, Any], str, dict]:
    """The defense config (its defense.json artifact) and the victim reference (its ``victim`` param) of a run."""
    from mlflow_project.lab.evaluate import DEFENSE_ARTIFACT

    run = client.get_run(run_id)
    params = tracking.run_params(run)
    victim = params.get("victim", "")
    if not victim:
        raise ValueError(f"run-id: run {run_id} has no 'victim' param; register from an evaluate or sweep run")
    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=DEFENSE_ARTIFACT, dst_path=str(workdir))
    config = json.loads(Path(path).read_text())
    tuned = {"run_id": run_id, **{k: v for k, v in run.data.metrics.items()
                                  if k in ("defender_accuracy", "attacker_accuracy", "perturbation_l1_mean")}}
    for key in ("attack", "queryset", "budget", "dataset"):
        if key in params:
            tuned[key] = params[key]
    return config, victim, tuned


def misinformation_of_run(client: MlflowClient, run_id: str) -> str:
    """The misinformation model an evaluate or sweep point run used ("" if none): the artifact URI a sweep
    point is tagged with (``runs:/<sweep parent>/misinformation``, reachable from any machine), else the run's
    ``misinformation`` param (a local export directory, from the machine that ran it)."""
    run = client.get_run(run_id)
    return run.data.tags.get(MISINFORMATION_TAG) or tracking.run_params(run).get("misinformation", "")


def misinformation_export_dir(ref: str, workdir: Path) -> Path:
    """A train_misinformation export directory from a path, or from an MLflow artifact URI downloaded into
    ``workdir`` (``runs:/<id>/misinformation``, where train_misinformation logs it)."""
    if ":/" not in ref:
        if not VictimExport.is_export(Path(ref).parent if Path(ref).is_file() else ref):
            raise ValueError(f"misinformation: {ref} is neither an MLflow artifact URI (runs:/<id>/misinformation) "
                             "nor an export directory written by train_misinformation")
        return VictimExport.open(ref, "misinformation", "train_misinformation").root
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=ref, dst_path=str(workdir)))
    except Exception as exc:  # MlflowException: unknown run, path or model
        raise ValueError(f"misinformation: cannot download {ref}: {getattr(exc, 'message', exc)}") from None
    found = VictimExport.find(local, "misinformation", "train_misinformation")
    if found is None:
        raise ValueError(f"misinformation: {ref} holds no train_misinformation export; give "
                         "runs:/<train_misinformation run id>/misinformation")
    return found.root


def load_config(value: str) -> dict[str, Any]:
    from mlflow_project.lab.evaluate import parse_defense

    return parse_defense(value)


def register(
    config: dict[str, Any],
    victim: str,
    name: str | None = None,
    surrogate_seed: int = 0,
    alias: str | None = None,
    provenance: dict[str, Any] | None = None,
    misinformation: str | None = None,
) -> dict[str, str]:
    """Log a defense bundle as a pyfunc in a new run and register it; return name, version, run id, model URI.

    ``misinformation``: the train_misinformation export directory (or artifact URI) of a defense that needs one
    (adaptive_misinformation); refused for any other defense."""
    from mlflow_project.lifecycle.package import refuse_secret

    refuse_secret(dict(config), "config")
    client = MlflowClient()
    modules, requirements = pyfunc_code()
    with tempfile.TemporaryDirectory(prefix="stealguard-register-") as tmp:
        victim_dir, victim_info = victim_export_dir(victim, Path(tmp) / "victim-download", client)
        name = name or default_name(victim, victim_dir)
        mis_dir = misinformation_export_dir(misinformation, Path(tmp) / "misinformation") if misinformation else None
        bundle = write_bundle(Path(tmp) / "bundle", config, victim_dir, surrogate_seed=surrogate_seed,
                              victim_source=victim, provenance={**(provenance or {}), "victim": victim_info},
                              misinformation_dir=mis_dir, misinformation_source=misinformation or None)
        defended = DefendedVictim(read_bundle(bundle))
        doc = defended.bundle.document
        example = np.zeros((2, *defended.bundle.victim_export.shape), dtype=np.float32)
        signature = infer_signature(example, defended(torch.from_numpy(example)).probs.numpy())
        with tracking.start_or_resume(f"register {name}") as run:  # under `mlflow run`: the run it created
            mlflow.set_tags({"stealguard.kind": "defense-registration", "stealguard.defense": doc["defense"]["name"],
                             "stealguard.victim": victim})
            if defended.secret_fingerprint:  # which secret the signature example was built with; never the secret
                mlflow.set_tag(FINGERPRINT_TAG, defended.secret_fingerprint)
            tracking.log_params({**{f"defense.{k}": v for k, v in doc["defense"].items()},
                                 "victim": victim, "surrogate_seed": surrogate_seed,
                                 **({"misinformation": misinformation} if misinformation else {})})
            mlflow.log_dict(doc, bundle_document.DOCUMENT)
            info = mlflow.pyfunc.log_model(
                name="defense",
                python_model=str(PYFUNC_CODE),
                artifacts={"bundle": str(bundle)},
                code_paths=stage_code(modules, Path(tmp) / "code"),
                registered_model_name=name,
                signature=signature,
                input_example=example,
                metadata={"stealguard": doc},
                pip_requirements=requirements,
            )
            run_id = run.info.run_id
    version = str(info.registered_model_version)
    client.set_model_version_tag(name, version, "stealguard.defense", doc["defense"]["name"])
    client.set_model_version_tag(name, version, "stealguard.defense_config", json.dumps(doc["defense"], sort_keys=True))
    client.set_model_version_tag(name, version, "stealguard.victim", victim)
    if defended.secret_fingerprint:
        client.set_model_version_tag(name, version, FINGERPRINT_TAG, defended.secret_fingerprint)
    if alias:
        client.set_registered_model_alias(name, alias, version)
    return {"name": name, "version": version, "run_id": run_id, "model_uri": f"models:/{name}/{version}",
            "alias": alias or ""}


def main(argv: list[str] | None = None) -> dict[str, str]:
    p = argparse.ArgumentParser(prog="python -m mlflow_project.lifecycle.register", description=__doc__.split("\n")[0])
    p.add_argument("--sweep-run", default="", help="a sweep's parent run id: register its recommended point")
    p.add_argument("--run-id", default="", help="an evaluate (or sweep point) run id: register its defense")
    p.add_argument("--config", default="", help="a defense config: .json/.yaml file or inline JSON")
    p.add_argument("--victim", default="", help="with --config: export directory or models:/<name>@<alias>|/<ver>")
    p.add_argument("--name", default="", help="registered model name (default: <victim>-defense)")
    p.add_argument("--surrogate-seed", type=int, default=0)
    p.add_argument("--alias", default="", help="also point this alias (e.g. candidate) at the new version")
    p.add_argument("--misinformation", default="",
                   help="adaptive_misinformation's model: train_misinformation export directory or runs:/<id>/"
                   "misinformation (default with --sweep-run/--run-id: the one the run was evaluated with)")
    p.add_argument("--tracking-uri", default="")
    a = p.parse_args(argv)
    sources = [flag for flag, value in (("--sweep-run", a.sweep_run), ("--run-id", a.run_id), ("--config", a.config))
               if value]
    if len(sources) != 1:
        given = ", ".join(sources) or "none"
        p.error(f"give exactly one of --sweep-run, --run-id, --config (empty ones are ignored); got {given}")
    tracking.setup(a.tracking_uri or None)
    client = MlflowClient()
    with tempfile.TemporaryDirectory(prefix="stealguard-register-src-") as tmp:
        if a.config:
            if not a.victim:
                p.error("--config needs --victim (an export directory or a models:/ URI)")
            config, victim, tuned = load_config(a.config), a.victim, {"config": a.config}
            misinformation = a.misinformation
        else:
            run_id = recommended_child(client, a.sweep_run) if a.sweep_run else a.run_id
            config, victim, tuned = config_from_run(client, run_id, Path(tmp))
            if a.victim:
                victim = a.victim
            if not a.misinformation and needs(config, "misinformation"):
                misinformation = misinformation_of_run(client, run_id)
            else:  # a run's param is only used by a defense that needs it; an explicit flag is checked as given
                misinformation = a.misinformation
    try:
        result = register(config, victim, name=a.name or None, surrogate_seed=a.surrogate_seed,
                          alias=a.alias or None, provenance={"tuned": tuned}, misinformation=misinformation or None)
    except ValueError as exc:
        print(f"register: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
