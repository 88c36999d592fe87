"""The environment a test gives a subprocess that runs this project's commands (`mlflow run`, `python -m ...`):
the test interpreter's bin directory (the venv) first on PATH, since `mlflow run --env-manager local` runs
`python -m mlflow_project...` from PATH and `make test` does not activate the venv; and no MLflow experiment or
run id inherited from the test process (mlflow.set_experiment() exports MLFLOW_EXPERIMENT_ID into os.environ, and a
subprocess pointed at another store would look for that experiment there: "No Experiment with id=N exists")."""

from __future__ import annotations

import os
import sys
from pathlib import Path

BIN = Path(sys.executable).parent
INHERITED_RUN_STATE = ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID")


def venv_env(**extra: str) -> dict[str, str]:
    """os.environ without MLflow experiment/run ids, with the venv's bin first on PATH, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in INHERITED_RUN_STATE}
    return {**env, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **extra}
