"""package's import of a model registered with plain MLflow calls: what it refuses and why (the served path is
tests/integration/test_own_models.py)."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
import torch
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression
from torch import nn

from mlflow_project.lifecycle import package
from mlflow_project.lifecycle.import_model import detect_output, reset_by_rule


def test_detect_output():
    assert detect_output(np.array([[0.2, 0.8], [1.0, 0.0]])) == "probabilities"
    assert detect_output(np.array([[2.0, -1.0], [0.3, 0.7]])) == "logits"
    assert detect_output(np.array([[0.1], [0.9]])) == "probabilities"
    assert detect_output(np.array([[3.5], [-0.2]])) == "logits"


def test_reset_by_rule_redraws_a_pt2_module_like_reset_parameters():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    program = torch.export.export(net.eval(), (torch.zeros(2, 1, 8, 8),)).module()
    a, b = reset_by_rule(program, 1), reset_by_rule(program, 1)
    for (name, p), q, original in zip(a.named_parameters(), b.parameters(), program.parameters(), strict=True):
        assert torch.equal(p, q), name  # seeded
        assert not torch.equal(p, original) or name.endswith(("1.weight", "1.bias")), name
    bn = dict(a.named_parameters())
    assert torch.equal(bn["1.weight"], torch.ones(4)) and torch.equal(bn["1.bias"], torch.zeros(4))
    bound = 1 / (4 * 6 * 6) ** 0.5
    assert bn["3.bias"].abs().max() <= bound
    assert program(torch.zeros(2, 1, 8, 8)).shape == a(torch.zeros(2, 1, 8, 8)).shape == (2, 3)


def test_a_missing_contract_piece_is_named(tracking_uri, tmp_path):
    x, y = load_iris(return_X_y=True)
    model = LogisticRegression(max_iter=500).fit(x, y)
    with mlflow.start_run():
        mlflow.sklearn.log_model(model, name="model", registered_model_name="no_example")  # no signature, no example
    argv = ["--name", "n", "--victim", "models:/no_example/1", "--defense", '{"name": "identity"}',
            "--export-path", str(tmp_path / "store")]
    with pytest.raises(ValueError, match=r"cannot serve it without: input shape .*--input-shape"):
        package.main(argv)
    mar = package.main([*argv, "--input-shape", "4", "--class-names", "setosa,versicolor,virginica"])
    assert mar.is_file()
    with pytest.raises(ValueError, match="2 class names for a model with 3 classes"):
        package.main([*argv, "--input-shape", "4", "--class-names", "a,b"])
