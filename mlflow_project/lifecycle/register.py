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
import sys
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.models import infer_signature

from mlflow_project.lifecycle import tracking
from mlflow_project.lifecycle.bundle import DefendedVictim, read_bundle, write_bundle
from mlflow_project.lifecycle.model_uris import is_models_uri, victim_export_dir
from mlflow_project.sweep.select import MISINFORMATION_TAG
from plugins import needs

PYFUNC_CODE = Path(__file__).with_name("pyfunc.py")
REPO = Path(__file__).resolve().parents[2]
RECOMMENDED_TAG = "stealguard.recommended"


def default_name(victim_ref: str, victim_dir: Path) -> str:
    """``<victim>-defense``: the victim's registered name, else its export directory's name."""
    if is_models_uri(victim_ref):
        stem = victim_ref[len("models:/"):].split("@")[0].split("/")[0]
    else:
        stem = victim_dir.name
    return f"{stem}-defense"


def recommended_child(client: MlflowClient, parent_run_id: str) -> str:
    """The run id of the sweep point tagged ``stealguard.recommended=true`` under ``parent_run_id``."""
    parent = client.get_run(parent_run_id)
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
    run = client.get_run(run_id)
    victim = run.data.params.get("victim", "")
    if not victim:
        raise ValueError(f"run-id: run {run_id} has no 'victim' param; register from an evaluate or sweep run")
    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="defense.json", dst_path=str(workdir))
    config = json.loads(Path(path).read_text())
    tuned = {"run_id": run_id, **{k: v for k, v in run.data.metrics.items()
                                  if k in ("defender_accuracy", "attacker_accuracy", "perturbation_l1_mean")}}
    for key in ("attack", "queryset", "budget", "dataset"):
        if key in run.data.params:
            tuned[key] = run.data.params[key]
    return config, victim, tuned


def misinformation_of_run(client: MlflowClient, run_id: str) -> str:
    """The misinformation model an evaluate or sweep point run used ("" if none): the artifact URI a sweep
    point is tagged with (``runs:/<sweep parent>/misinformation``, reachable from any machine), else the run's
    ``misinformation`` param (a local export directory, from the machine that ran it)."""
    run = client.get_run(run_id)
    return run.data.tags.get(MISINFORMATION_TAG) or run.data.params.get("misinformation", "")


def misinformation_export_dir(ref: str, workdir: Path) -> Path:
    """A train_misinformation export directory from a path, or from an MLflow artifact URI downloaded into
    ``workdir`` (``runs:/<id>/misinformation``, where train_misinformation logs it)."""
    if ":/" not in ref:
        path = Path(ref)
        path = path.parent if path.is_file() else path
        if not (path / "input_spec.json").is_file():
            raise ValueError(f"misinformation: {ref} is neither an MLflow artifact URI (runs:/<id>/misinformation) "
                             "nor an export directory written by train_misinformation (state_dict.pt, "
                             "input_spec.json)")
        return path
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=ref, dst_path=str(workdir)))
    except Exception as exc:  # MlflowException: unknown run, path or model
        raise ValueError(f"misinformation: cannot download {ref}: {getattr(exc, 'message', exc)}") from None
    found = sorted(local.rglob("input_spec.json")) if local.is_dir() else []
    if not found:
        raise ValueError(f"misinformation: {ref} holds no train_misinformation export (no input_spec.json); give "
                         "runs:/<train_misinformation run id>/misinformation")
    return found[0].parent


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
    client = MlflowClient()
    with tempfile.TemporaryDirectory(prefix="stealguard-register-") as tmp:
        victim_dir, victim_info = victim_export_dir(victim, Path(tmp) / "victim-download", client)
        name = name or default_name(victim, victim_dir)
        mis_dir = misinformation_export_dir(misinformation, Path(tmp) / "misinformation") if misinformation else None
        bundle = write_bundle(Path(tmp) / "bundle", config, victim_dir, surrogate_seed=surrogate_seed,
                              victim_source=victim, provenance={**(provenance or {}), "victim": victim_info},
                              misinformation_dir=mis_dir, misinformation_source=misinformation or None)
        doc = json.loads((bundle / "defense.json").read_text())
        defended = DefendedVictim(read_bundle(bundle))
        example = np.zeros((2, *defended.bundle.input_spec["shape"]), dtype=np.float32)
        signature = infer_signature(example, defended(torch.from_numpy(example)).probs.numpy())
        with mlflow.start_run(run_name=f"register {name}") as run:
            mlflow.set_tags({"stealguard.kind": "defense-registration", "stealguard.defense": doc["defense"]["name"],
                             "stealguard.victim": victim})
            mlflow.log_params({f"defense.{k}": v for k, v in doc["defense"].items()})
            mlflow.log_params({"victim": victim, "surrogate_seed": surrogate_seed})
            if misinformation:
                mlflow.log_param("misinformation", misinformation)
            mlflow.log_dict(doc, "defense.json")
            info = mlflow.pyfunc.log_model(
                name="defense",
                python_model=str(PYFUNC_CODE),
                artifacts={"bundle": str(bundle)},
                code_paths=[str(REPO / "plugins"), str(REPO / "mlflow_project")],
                registered_model_name=name,
                signature=signature,
                input_example=example,
                metadata={"stealguard": doc},
                pip_requirements=[f"-r {REPO / 'requirements.txt'}"],
            )
            run_id = run.info.run_id
    version = str(info.registered_model_version)
    client.set_model_version_tag(name, version, "stealguard.defense", doc["defense"]["name"])
    client.set_model_version_tag(name, version, "stealguard.defense_config", json.dumps(doc["defense"], sort_keys=True))
    client.set_model_version_tag(name, version, "stealguard.victim", victim)
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
