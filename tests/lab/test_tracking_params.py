"""tracking.log_params: a value too long for an MLflow param (an ood_gated config whose Gaussian gate has K x K
statistics, K >= 14) is logged as its digest instead of failing the run."""

from __future__ import annotations

import hashlib
import json

import mlflow
import torch
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

from mlflow_project.lifecycle import tracking
from plugins.ood import fit_posterior_gaussian


def test_a_long_value_is_logged_as_its_digest(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    uri = f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}"
    k = 20
    stats = fit_posterior_gaussian(torch.softmax(torch.randn(40 * k, k) * 3, 1), torch.arange(40 * k) % k)
    config = json.dumps({"name": "ood_gated", "tau": 1e-4, "score": "gaussian", "gaussian": stats.model_dump(),
                         "inside": {"name": "label_only"}, "outside": {"name": "label_only"}}, sort_keys=True)
    assert len(config) > MAX_PARAM_VAL_LENGTH  # the realistic case: 20 classes
    with tracking.start_run("long-param", uri) as run:
        logged = tracking.log_params({"defense_config": config, "short": "x"})
    params = mlflow.MlflowClient(uri).get_run(run.info.run_id).data.params
    assert params["short"] == "x" and logged["short"] == "x"
    digest = hashlib.sha256(config.encode()).hexdigest()
    assert params["defense_config"].startswith(f"sha256:{digest} ({len(config)} characters")
    assert len(params["defense_config"]) <= MAX_PARAM_VAL_LENGTH
    assert tracking.param_text("y" * MAX_PARAM_VAL_LENGTH) == "y" * MAX_PARAM_VAL_LENGTH
