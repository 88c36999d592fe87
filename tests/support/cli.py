"""The environment a test gives a subprocess that runs this project's commands (`mlflow run`, `python -m ...`):
the test interpreter's bin directory (the venv) first on PATH, since `mlflow run --env-manager local` runs
`python -m mlflow_project...` from PATH and `make test` does not activate the venv."""

from __future__ import annotations

import os
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def venv_env(**extra: str) -> dict[str, str]:
    """os.environ with the venv's bin first on PATH, plus ``extra``."""
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **extra}
