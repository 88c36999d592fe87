"""A user's own models, registered with plain MLflow calls: this script knows nothing about StealGuard.

    MLFLOW_TRACKING_URI=sqlite:///... python tests/support/register_own_models.py OUT_DIR

Registers, each with an input example and alias ``production``:
  own_cnn        a small residual CNN on scikit-learn's 8x8 digits (mlflow.pytorch), logits out
  own_onnx       an ONNX graph (standardise, Gemm, ReLU, Gemm) trained on wine (mlflow.onnx), logits out
  own_logreg     LogisticRegression on digits (mlflow.sklearn)
  own_gbc        GradientBoostingClassifier on breast cancer, binary (mlflow.sklearn)
  own_forest     RandomForestClassifier on iris, three classes (mlflow.sklearn)
and writes OUT_DIR/<name>.npz: held-out rows ``x`` (float32) and the original model's probabilities ``p`` on them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow import MlflowClient
from sklearn.datasets import load_breast_cancer, load_digits, load_iris, load_wine
from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from torch import nn


class Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(h)))


class TinyResNet(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.blocks = nn.Sequential(Block(8), Block(8))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        h = self.blocks(torch.relu(self.stem(x)))
        return self.fc(torch.flatten(self.pool(h), 1))


def split(load):
    x, y = load(return_X_y=True)
    return train_test_split(x.astype(np.float32), y, test_size=0.25, random_state=0, stratify=y)


def production(name: str) -> None:
    client = MlflowClient()
    version = max(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
    client.set_registered_model_alias(name, "production", str(version))


def cnn(out: Path) -> None:
    xtr, xte, ytr, yte = split(load_digits)
    xtr, xte = (xtr / 16.0).reshape(-1, 1, 8, 8), (xte / 16.0).reshape(-1, 1, 8, 8)
    torch.manual_seed(0)
    net = TinyResNet()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(xtr), torch.from_numpy(ytr).long()
    for _ in range(15):
        for i in range(0, len(xt), 64):
            opt.zero_grad()
            nn.functional.cross_entropy(net(xt[i:i + 64]), yt[i:i + 64]).backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        p = torch.softmax(net(torch.from_numpy(xte)).double(), dim=1).numpy()
    mlflow.pytorch.log_model(net, name="model", input_example=xte[:4], registered_model_name="own_cnn")
    np.savez(out / "own_cnn.npz", x=xte, p=p)


def onnx_model(out: Path) -> None:
    import onnx
    import onnxruntime
    from onnx import TensorProto, helper, numpy_helper

    xtr, xte, ytr, yte = split(load_wine)
    mean, std = xtr.mean(axis=0), xtr.std(axis=0)
    rng = np.random.default_rng(0)
    w1 = torch.tensor(rng.normal(0, 0.3, (13, 16)), dtype=torch.float32, requires_grad=True)
    b1 = torch.zeros(16, requires_grad=True)
    w2 = torch.tensor(rng.normal(0, 0.3, (16, 3)), dtype=torch.float32, requires_grad=True)
    b2 = torch.zeros(3, requires_grad=True)
    opt = torch.optim.Adam([w1, b1, w2, b2], lr=1e-2)
    xt, yt = torch.from_numpy((xtr - mean) / std), torch.from_numpy(ytr).long()
    for _ in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(torch.relu(xt @ w1 + b1) @ w2 + b2, yt).backward()
        opt.step()
    weights = {"mean": mean, "std": std, "w1": w1.detach().numpy(), "b1": b1.detach().numpy(),
               "w2": w2.detach().numpy(), "b2": b2.detach().numpy()}
    nodes = [helper.make_node("Sub", ["features", "mean"], ["c"]), helper.make_node("Div", ["c", "std"], ["z"]),
             helper.make_node("Gemm", ["z", "w1", "b1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["scores"])]
    graph = helper.make_graph(
        nodes, "wine", [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 13])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(np.asarray(v, dtype=np.float32), k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    z = session.run(None, {"features": xte})[0].astype(np.float64)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    mlflow.onnx.log_model(model, name="model", input_example=xte[:4], registered_model_name="own_onnx")
    np.savez(out / "own_onnx.npz", x=xte, p=p / p.sum(axis=1, keepdims=True))


def sklearn_model(out: Path, name: str, load, model) -> None:
    import skops.io

    xtr, xte, ytr, yte = split(load)
    model.fit(xtr, ytr)
    trusted = skops.io.get_untrusted_types(data=skops.io.dumps(model))  # our own model: we trust what it holds
    mlflow.sklearn.log_model(model, name="model", input_example=xte[:4], registered_model_name=name,
                             skops_trusted_types=trusted)
    np.savez(out / f"{name}.npz", x=xte, p=model.predict_proba(xte))


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    mlflow.set_experiment("own-models")
    jobs = {
        "own_cnn": lambda: cnn(out),
        "own_onnx": lambda: onnx_model(out),
        "own_logreg": lambda: sklearn_model(out, "own_logreg", load_digits, LogisticRegression(max_iter=3000)),
        "own_gbc": lambda: sklearn_model(out, "own_gbc", load_breast_cancer,
                                         GradientBoostingClassifier(n_estimators=40, random_state=0)),
        "own_forest": lambda: sklearn_model(out, "own_forest", load_iris,
                                            RandomForestClassifier(n_estimators=25, random_state=0)),
    }
    for name, job in jobs.items():
        with mlflow.start_run(run_name=name):
            job()
        production(name)
        print(f"registered {name}@production")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
