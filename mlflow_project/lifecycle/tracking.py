"""MLflow set-up shared by the lab's entry points: an explicit tracking URI and the `stealguard` experiment.

The tracking URI is, in order: the ``tracking_uri`` argument, ``MLFLOW_TRACKING_URI``, or the project default
``sqlite:///<repo>/mlflow.db`` (an absolute path, so it does not depend on the working directory). A new
experiment in a SQLite store keeps its artifacts next to the database (``<db dir>/mlartifacts``).

Under ``mlflow run`` the run already exists (``MLFLOW_RUN_ID``) and holds every entry-point parameter as MLflow
received it (defaults included, shell-quoted: ``''`` for an empty string). The entry points log what they
resolved through :func:`log_params`: a key MLflow already logged with another value gets its resolved value
under ``resolved.<key>``; :func:`run_params` reads a run's params back with the resolved values on top.
A value longer than MLflow allows for a param (``MAX_PARAM_VAL_LENGTH``, 6,000 characters: e.g. an ood_gated
config whose Gaussian gate has K x K statistics for K >= 14 classes) is logged as its SHA-256 digest
(:func:`param_text`); the entry points keep the full value in an artifact (defense.json).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow

EXPERIMENT = "stealguard"
RESOLVED_PREFIX = "resolved."
REPO_ROOT = Path(__file__).resolve().parents[2]


def default_tracking_uri() -> str:
    return f"sqlite:///{(REPO_ROOT / 'mlflow.db').resolve()}"


def resolve_tracking_uri(tracking_uri: str | None = None) -> str:
    return tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def setup(tracking_uri: str | None = None, experiment: str = EXPERIMENT) -> str:
    """Point MLflow at the resolved tracking URI and experiment (created if needed); return the experiment id."""
    uri = resolve_tracking_uri(tracking_uri)
    mlflow.set_tracking_uri(uri)
    if os.environ.get("MLFLOW_RUN_ID") and os.environ.get("MLFLOW_EXPERIMENT_ID"):
        # Launched by `mlflow run`: the run already exists in the experiment it chose (--experiment-name).
        return os.environ["MLFLOW_EXPERIMENT_ID"]
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        artifact_location = None
        if uri.startswith("sqlite:///"):
            db = Path(uri[len("sqlite:///") :])
            artifact_location = (db.parent / "mlartifacts").resolve().as_uri()
        exp_id = mlflow.create_experiment(experiment, artifact_location=artifact_location)
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def launched_run_id() -> str | None:
    """The run ``mlflow run`` created for this process (``MLFLOW_RUN_ID``), or None outside ``mlflow run``."""
    return os.environ.get("MLFLOW_RUN_ID") or None


def start_or_resume(run_name: str, run_id: str | None = None):
    """In the tracking URI and experiment already set: the run ``mlflow run`` created, else ``run_id``
    resumed, else a new run named ``run_name``. Runs started inside it with ``nested=True`` nest under it."""
    launched = launched_run_id()
    if launched:
        # taken once, as mlflow.start_run does: a later start_run(nested=True) must create a child, not resume it
        del os.environ["MLFLOW_RUN_ID"]
        return mlflow.start_run(run_id=launched)
    if run_id:
        return mlflow.start_run(run_id=run_id)
    return mlflow.start_run(run_name=run_name)


def start_run(run_name: str, tracking_uri: str | None = None, experiment: str = EXPERIMENT):
    """Start (or, under ``mlflow run``, resume) the run an entry point logs to.

    ``mlflow run`` creates the run itself and passes it in ``MLFLOW_RUN_ID`` (with its own tracking URI and
    experiment); then that run is used as is. Otherwise the tracking URI and experiment are set up here.
    """
    if launched_run_id():
        mlflow.set_tracking_uri(resolve_tracking_uri(tracking_uri))
    else:
        setup(tracking_uri, experiment)
    return start_or_resume(run_name)


def param_text(value: Any) -> str:
    """``str(value)``, or for a value too long for an MLflow param its digest and length (what a reader needs to
    match it against the run's artifact): ``sha256:<hex> (<n> characters; ...)``."""
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    text = str(value)
    if len(text) <= MAX_PARAM_VAL_LENGTH:
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()
    return f"sha256:{digest} ({len(text)} characters, over MLflow's {MAX_PARAM_VAL_LENGTH} for a param; the run's " \
           f"artifacts hold the value)"


def log_params(params: Mapping[str, Any]) -> dict[str, str]:
    """Log resolved parameter values to the active run; return what was logged (key -> string).

    A key the run does not hold yet is logged as is. A key it already holds (``mlflow run`` logs every
    entry-point parameter as given, before the code runs) is not logged again when the value is the same
    string, and goes under ``resolved.<key>`` otherwise (MLflow refuses to change a param)."""
    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("log_params: no active MLflow run; start one with tracking.start_run")
    existing = mlflow.MlflowClient().get_run(run.info.run_id).data.params
    todo: dict[str, str] = {}
    for key, value in params.items():
        text = param_text(value)
        if key not in existing:
            todo[key] = text
        elif existing[key] != text:
            todo[RESOLVED_PREFIX + key] = text
    if todo:
        mlflow.log_params(todo)
    return todo


def run_params(run) -> dict[str, str]:
    """A run's params with resolved values in place of the given ones (``resolved.<key>`` wins over ``<key>``)."""
    params = dict(run.data.params)
    given = {k: v for k, v in params.items() if not k.startswith(RESOLVED_PREFIX)}
    resolved = {k[len(RESOLVED_PREFIX):]: v for k, v in params.items() if k.startswith(RESOLVED_PREFIX)}
    return {**given, **resolved}
