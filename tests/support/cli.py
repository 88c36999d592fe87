"""The environment a test gives a subprocess that runs this project's commands (`mlflow run`, `python -m ...`):
the test interpreter's bin directory (the venv) first on PATH, since `mlflow run --env-manager local` runs
`python -m mlflow_project...` from PATH and `make test` does not activate the venv; and no MLflow setting inherited
from the test process (MLFLOW_*: mlflow.set_experiment() exports MLFLOW_EXPERIMENT_ID into os.environ, and a
subprocess pointed at another store would look for that experiment there: "No Experiment with id=N exists"); the
caller passes the ones the subprocess needs, e.g. MLFLOW_TRACKING_URI."""

from __future__ import annotations

import os
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def venv_env(**extra: str) -> dict[str, str]:
    """os.environ without its MLFLOW_* variables, with the venv's bin first on PATH, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return {**env, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **extra}
