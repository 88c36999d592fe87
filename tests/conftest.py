"""Suite-wide settings: hypothesis profiles and a fixed torch thread count (2-core CI machines)."""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
settings.register_profile("dev", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(int(os.environ.get("STEALGUARD_TEST_THREADS", "2")))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of many tiny ops (faster than two, far faster on a loaded 2-core machine);
    the previous count is restored after the module. Use with ``pytestmark = pytest.mark.usefixtures(...)``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def no_inherited_mlflow_run(monkeypatch):
    """mlflow.set_experiment() exports MLFLOW_EXPERIMENT_ID into os.environ: an in-process test would otherwise
    hand its experiment id to the next test's `mlflow run` subprocess, whose store has no such experiment."""
    for name in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
