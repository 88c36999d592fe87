"""MLflow set-up shared by the lab's entry points: an explicit tracking URI and the `stealguard` experiment.

The tracking URI is, in order: the ``tracking_uri`` argument, ``MLFLOW_TRACKING_URI``, or the project default
``sqlite:///<repo>/mlflow.db`` (an absolute path, so it does not depend on the working directory). A new
experiment in a SQLite store keeps its artifacts next to the database (``<db dir>/mlartifacts``).
"""

from __future__ import annotations

import os
from pathlib import Path

import mlflow

EXPERIMENT = "stealguard"
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


def start_run(run_name: str, tracking_uri: str | None = None, experiment: str = EXPERIMENT):
    """Start (or, under ``mlflow run``, resume) the run an entry point logs to.

    ``mlflow run`` creates the run itself and passes it in ``MLFLOW_RUN_ID`` (with its own tracking URI and
    experiment); then that run is used as is. Otherwise the tracking URI and experiment are set up here.
    """
    if os.environ.get("MLFLOW_RUN_ID"):
        mlflow.set_tracking_uri(resolve_tracking_uri(tracking_uri))
        return mlflow.start_run(run_id=os.environ["MLFLOW_RUN_ID"])
    setup(tracking_uri, experiment)
    return mlflow.start_run(run_name=run_name)
