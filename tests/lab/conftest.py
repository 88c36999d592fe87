"""Shared fixtures for the lab tests: one small digits MLP victim, trained once per session."""

from __future__ import annotations

import mlflow
import pytest
import torch

from mlflow_project.lab.train_victim import export_victim, train_victim
from tests.dev_secret import DEV_SECRET


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread(one_thread):
    """The lab's tiny models run faster on one thread on a shared 2-core machine (no intra-op contention)."""
    yield


@pytest.fixture(autouse=True)
def _dev_secret(monkeypatch):
    """register / the pyfunc / package build randomised defenses with the deployment's secret: the tests' dev one."""
    monkeypatch.delenv("STEALGUARD_SECRET_FILE", raising=False)
    monkeypatch.delenv("TS_CONFIG_FILE", raising=False)
    monkeypatch.setenv("STEALGUARD_SECRET", DEV_SECRET)


@pytest.fixture(scope="session")
def digits_victim_dir(tmp_path_factory):
    """A digits MLP victim (8 epochs: ~97% test accuracy), state dict + input spec."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = train_victim("digits", "mlp", epochs=8, lr=0.05, seed=0, batch_size=32, progress=False)
    finally:
        torch.set_num_threads(before)
    assert result.test_accuracy > 0.9, f"the digits victim should learn; got {result.test_accuracy:.3f}"
    out = tmp_path_factory.mktemp("digits_victim")
    export_victim(result.model, result.arch, result.spec, out, result.test_accuracy, runtimes=False)
    return out


@pytest.fixture(scope="session")
def digits_victim(digits_victim_dir):
    from mlflow_project.lab.evaluate import load_victim

    return load_victim(digits_victim_dir)


@pytest.fixture
def tracking_uri(tmp_path, monkeypatch):
    uri = f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # this process's MLflow client state too: an earlier test's set_experiment() leaves its experiment active
    # in-process, which this store does not have ("No Experiment with id=N exists")
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("Default")
    return uri
