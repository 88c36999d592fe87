"""Train a victim classifier, export it in every runtime format, log and register it in MLflow.

    python -m mlflow_project.lab.train_victim --dataset fashion_mnist --arch lenet --epochs 12 --lr 0.05 --seed 0 \
        --registered-model-name fashion_mnist_lenet --output-dir artifacts/victims/fashion_mnist_lenet
    mlflow run . -e train_victim -P dataset=digits -P arch=mlp --env-manager local

Computation (:func:`train_victim`), export (:func:`export_victim`) and MLflow logging (:func:`log_victim`) are
separate functions. The export directory (its files, input spec and runtimes) is defined by
``handlers.victim_export.VictimExport``, which this module writes through.

Every format returns logits; the served probabilities are their softmax.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from handlers.victim_export import INPUT_SPEC, VictimExport
from mlflow_project.cli import integer
from mlflow_project.lab import data
from mlflow_project.lab.models import ARCHITECTURES, build_model
from mlflow_project.lab.training import TrainConfig, accuracy, train_classifier
from mlflow_project.lifecycle.exports import save_onnx, save_program

# Defaults per dataset, chosen on this 2-core CPU (see the lab's report): LeNet on Fashion-MNIST reaches >= 90%.
DEFAULTS = {
    "fashion_mnist": {"epochs": 12, "lr": 0.05, "batch_size": 128},
    "mnist5k": {"epochs": 20, "lr": 0.05, "batch_size": 64},
    "digits": {"epochs": 30, "lr": 0.05, "batch_size": 32},
}


@dataclass
class VictimResult:
    model: nn.Module
    arch: str
    spec: data.InputSpec
    train_config: TrainConfig
    train_accuracy: float
    test_accuracy: float
    losses: list[float]
    seconds: float


def prepare_training(defaults: dict, dataset: str, arch: str | None, epochs: int | None, lr: float | None,
                     seed: int, batch_size: int | None) -> tuple[str, TrainConfig, data.VictimData, nn.Module]:
    """The architecture, the optimiser settings (``defaults[dataset]`` where not given), the victim's data and a
    freshly seeded model: what training on a victim's data set starts from (the victim and the misinformation
    model alike)."""
    data.check_dataset(dataset)
    arch = arch or data.default_arch(dataset)
    d = defaults[dataset]
    cfg = TrainConfig(
        epochs=d["epochs"] if epochs is None else epochs,
        lr=d["lr"] if lr is None else lr,
        batch_size=d["batch_size"] if batch_size is None else batch_size,
        seed=seed,
    )
    vd = data.victim_data(dataset, arch)
    torch.manual_seed(seed)
    return arch, cfg, vd, build_model(arch, num_classes=vd.spec.num_classes)


def train_victim(
    dataset: str = "fashion_mnist",
    arch: str | None = None,
    epochs: int | None = None,
    lr: float | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    progress: bool = True,
    on_epoch=None,
) -> VictimResult:
    """Train a victim on ``dataset``'s train split and score it on the test split (no MLflow)."""
    arch, cfg, vd, model = prepare_training(DEFAULTS, dataset, arch, epochs, lr, seed, batch_size)
    t0 = time.perf_counter()
    losses = train_classifier(model, vd.train.x, vd.train.y, cfg, desc=f"victim {dataset}/{arch}",
                              progress=progress, on_epoch=on_epoch)
    seconds = time.perf_counter() - t0
    return VictimResult(
        model=model.eval(), arch=arch, spec=vd.spec, train_config=cfg,
        train_accuracy=accuracy(model, vd.train.x, vd.train.y), test_accuracy=accuracy(model, vd.test.x, vd.test.y),
        losses=losses, seconds=seconds,
    )


def spec_document(arch: str, spec: data.InputSpec, test_accuracy: float | None = None) -> dict:
    doc = {"arch": arch, "num_classes": spec.num_classes, "output": "logits", **spec.to_json()}
    if test_accuracy is not None:
        doc["test_accuracy"] = test_accuracy
    return doc


def export_victim(model: nn.Module, arch: str, spec: data.InputSpec, out_dir: str | Path,
                  test_accuracy: float | None = None, check: bool = True, runtimes: bool = True) -> dict[str, Path]:
    """Write the victim in every runtime format into ``out_dir`` (a VictimExport); with ``check``, verify each
    matches eager. ``runtimes=False`` writes only the state dict and the two JSON files (enough for
    :func:`load_exported`). Returns the paths written, by file name."""
    model = model.eval()
    example = torch.randn(3, *spec.shape)
    exporters = {
        "export": lambda m, p: save_program(m, example, p),
        "torchscript": lambda m, p: torch.jit.script(m).save(str(p)),
        "onnx": lambda m, p: save_onnx(m, example, p),
    } if runtimes else {}
    export, paths = VictimExport.write(out_dir, model, spec_document(arch, spec, test_accuracy), list(spec.classes),
                                       exporters)
    if check and runtimes:
        check_exports(export, model, spec)
    return paths


def check_exports(export: VictimExport | str | Path, model: nn.Module, spec: data.InputSpec,
                  atol: float = 1e-4) -> None:
    """Load every exported runtime and check it agrees with ``model`` on a fresh batch (raise if not)."""
    export = export if isinstance(export, VictimExport) else VictimExport.open(export)
    x = torch.randn(5, *spec.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
        for runtime in ("export", "torchscript", "onnx"):
            err = (export.runtime(runtime)(x) - ref).abs().max().item()
            if err > atol:
                raise RuntimeError(f"export {export.relative(runtime)} disagrees with the eager model "
                                   f"(max |diff| {err:.3g} > {atol})")


def load_exported(out_dir: str | Path, role: str = "victim",
                  writer: str = "train_victim") -> tuple[nn.Module, str, data.InputSpec]:
    """(eager module, arch, input spec) of an export directory (a VictimExport)."""
    export = VictimExport.open(out_dir, role, writer)
    return export.eager(ARCHITECTURES), export.arch, data.InputSpec.from_json(export.spec)


def log_victim(result: VictimResult, export_dir: str | Path, registered_model_name: str | None) -> dict:
    """Log params, metrics, the MLflow pytorch model (registered) and the export artifacts to the active run."""
    import mlflow

    from mlflow_project.lifecycle import tracking

    cfg = result.train_config
    tracking.log_params({
        "dataset": result.spec.dataset, "arch": result.arch, "epochs": cfg.epochs, "lr": cfg.lr,
        "batch_size": cfg.batch_size, "momentum": cfg.momentum, "weight_decay": cfg.weight_decay, "seed": cfg.seed,
        "optimizer": "sgd+cosine", "registered_model_name": registered_model_name or "",
    })
    for step, loss in enumerate(result.losses):
        mlflow.log_metric("train_loss", loss, step=step)
    mlflow.log_metrics({"train_accuracy": result.train_accuracy, "test_accuracy": result.test_accuracy,
                        "train_seconds": result.seconds})
    doc = spec_document(result.arch, result.spec, result.test_accuracy)
    info = mlflow.pytorch.log_model(
        result.model, name="model", registered_model_name=registered_model_name or None,
        input_example=torch.zeros(1, *result.spec.shape).numpy(), metadata={"stealguard": doc},
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"], serialization_format="pickle",
    )
    mlflow.log_artifacts(str(export_dir), artifact_path="exports")
    mlflow.log_dict(doc, INPUT_SPEC)
    mlflow.set_tags({"stealguard.kind": "victim", "stealguard.model_uri": info.model_uri})
    return {"model_uri": info.model_uri, "registered_model_version": getattr(info, "registered_model_version", None)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m mlflow_project.lab.train_victim", description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="fashion_mnist", choices=data.DATASETS)
    p.add_argument("--arch", default="", help="lenet or mlp (default: lenet for 28x28 data, mlp for digits)")
    p.add_argument("--epochs", type=integer, default=None, help="default per dataset: " + json.dumps(DEFAULTS))
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--batch-size", type=integer, default=None)
    p.add_argument("--seed", type=integer, default=0)
    p.add_argument("--registered-model-name", default="", help="register the MLflow model under this name")
    p.add_argument("--output-dir", default="", help="also keep the exports here (default: a temporary directory)")
    p.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI or sqlite:///<repo>/mlflow.db")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--threads", type=integer, default=0,
                   help="torch threads (0: torch's default; 1 is fastest on a busy 2-core machine)")
    a = p.parse_args(argv)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    # MLproject passes every parameter; empty strings and non-positive numbers mean "the dataset's default".
    epochs = a.epochs if a.epochs is not None and a.epochs > 0 else None
    lr = a.lr if a.lr is not None and a.lr > 0 else None
    batch_size = a.batch_size if a.batch_size is not None and a.batch_size > 0 else None

    import tempfile

    import mlflow

    from mlflow_project.lifecycle import tracking

    with tracking.start_run(f"victim-{a.dataset}-{a.arch or data.default_arch(a.dataset)}", a.tracking_uri) as run:
        def on_epoch(epoch: int, loss: float) -> None:
            mlflow.log_metric("epoch_loss", loss, step=epoch)

        result = train_victim(a.dataset, a.arch or None, epochs, lr, a.seed, batch_size,
                              progress=not a.no_progress, on_epoch=on_epoch)
        with tempfile.TemporaryDirectory() as tmp:
            export_dir = Path(a.output_dir) if a.output_dir else Path(tmp)
            export_victim(result.model, result.arch, result.spec, export_dir, result.test_accuracy)
            logged = log_victim(result, export_dir, a.registered_model_name or None)
        summary = {"run_id": run.info.run_id, "test_accuracy": result.test_accuracy,
                   "train_accuracy": result.train_accuracy, "train_seconds": round(result.seconds, 1), **logged}
        if a.output_dir:
            summary["export_dir"] = str(Path(a.output_dir).resolve())
    print(json.dumps(summary, indent=2, default=str))
    return summary


if __name__ == "__main__":
    main()
