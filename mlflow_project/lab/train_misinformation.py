"""Train the misinformation model of ``adaptive_misinformation`` (Kariyappa & Qureshi, CVPR 2020), export and log it.

    python -m mlflow_project.lab.train_misinformation --victim artifacts/victims/fashion_mnist_lenet \
        --output-dir artifacts/misinformation/fashion_mnist_lenet
    mlflow run . -e train_misinformation -P victim=artifacts/victims/fashion_mnist_lenet --env-manager local

The model has the victim's architecture and is trained on the victim's training set to be *wrong*: it
minimises ``-log(1 - p_true)`` (the probability it gives the true class is driven to 0, the rest of the mass
is left free). Defended queries that look out-of-distribution get its softmax instead of the victim's.

The dataset and architecture come from a victim export directory (``--victim``, its input spec) or are
given (``--dataset``, ``--arch``). The export directory has the victim's layout
(``handlers.victim_export.VictimExport``, written by :func:`export_victim`), so it ships in an archive exactly
like a surrogate or a victim (any runtime: eager, export, torchscript, onnx); its input spec's
``test_accuracy`` is the misinformation model's agreement with the true labels, near 0. Beside it:

- ``misinformation.json``: ``{"kind": "misinformation", "loss": "-log(1 - p_true)", "arch", "dataset",
  "epochs", "lr", "batch_size", "seed", "test_accuracy", "test_true_class_prob", "train_seconds"}``.

MLflow (experiment ``stealguard``): params, ``epoch_loss`` per epoch, ``test_accuracy`` (agreement with the
truth), ``test_true_class_prob`` (mean p_true on the test split), ``train_seconds``; the export directory as
artifacts under ``misinformation/``; tag ``stealguard.kind=misinformation``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from handlers.victim_export import VictimExport
from mlflow_project.cli import integer
from mlflow_project.lab import data
from mlflow_project.lab.train_victim import export_victim, prepare_training
from mlflow_project.lab.training import TrainConfig, predict_probs, train_classifier

# Fewer epochs than the victim: being wrong is easier than being right.
DEFAULTS = {
    "fashion_mnist": {"epochs": 4, "lr": 0.02, "batch_size": 128},
    "mnist5k": {"epochs": 10, "lr": 0.02, "batch_size": 64},
    "digits": {"epochs": 15, "lr": 0.02, "batch_size": 32},
}
INFO_FILE = "misinformation.json"


@dataclass
class MisinformationResult:
    model: nn.Module
    arch: str
    spec: data.InputSpec
    train_config: TrainConfig
    test_accuracy: float  # agreement with the true labels (the lower, the better)
    test_true_class_prob: float  # mean probability given to the true class on the test split
    losses: list[float]
    seconds: float

    def info(self) -> dict:
        cfg = self.train_config
        return {
            "kind": "misinformation", "loss": "-log(1 - p_true)", "arch": self.arch, "dataset": self.spec.dataset,
            "epochs": cfg.epochs, "lr": cfg.lr, "batch_size": cfg.batch_size, "seed": cfg.seed,
            "test_accuracy": self.test_accuracy, "test_true_class_prob": self.test_true_class_prob,
            "train_seconds": round(self.seconds, 3),
        }


def misinformation_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean of ``-log(1 - softmax(logits)[true])``, computed stably as
    ``logsumexp(all logits) - logsumexp(logits without the true one)``."""
    true = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, labels.unsqueeze(1), True)
    rest = logits.masked_fill(true, -math.inf)
    return (torch.logsumexp(logits, dim=1) - torch.logsumexp(rest, dim=1)).mean()


def train_misinformation(
    dataset: str = "fashion_mnist",
    arch: str | None = None,
    epochs: int | None = None,
    lr: float | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    progress: bool = True,
    on_epoch=None,
) -> MisinformationResult:
    """Train a misinformation model on ``dataset``'s train split (the victim's) and score it (no MLflow)."""
    arch, cfg, vd, model = prepare_training(DEFAULTS, dataset, arch, epochs, lr, seed, batch_size)
    t0 = time.perf_counter()
    losses = train_classifier(model, vd.train.x, vd.train.y, cfg, desc="misinformation", progress=progress,
                              on_epoch=on_epoch, loss_fn=misinformation_loss)
    seconds = time.perf_counter() - t0
    probs = predict_probs(model, vd.test.x)
    return MisinformationResult(
        model=model.eval(), arch=arch, spec=vd.spec, train_config=cfg,
        test_accuracy=(probs.argmax(dim=1) == vd.test.y).float().mean().item(),
        test_true_class_prob=probs.gather(1, vd.test.y.unsqueeze(1)).mean().item(),
        losses=losses, seconds=seconds,
    )


def export_misinformation(result: MisinformationResult, out_dir: str | Path, runtimes: bool = True) -> dict[str, Path]:
    """The victim's export layout (every runtime) plus ``misinformation.json``."""
    paths = export_victim(result.model, result.arch, result.spec, out_dir, result.test_accuracy, runtimes=runtimes)
    paths[INFO_FILE] = Path(out_dir) / INFO_FILE
    paths[INFO_FILE].write_text(json.dumps(result.info(), indent=2) + "\n")
    return paths


def victim_dataset_and_arch(victim_dir: str | Path) -> tuple[str, str]:
    """(dataset, arch) from a victim export directory's input spec."""
    victim = VictimExport.open(victim_dir)
    return victim.dataset, victim.arch


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m mlflow_project.lab.train_misinformation",
                                description=__doc__.split("\n")[0])
    p.add_argument("--victim", default="", help="a train_victim export directory (gives dataset and arch)")
    p.add_argument("--dataset", default="", help=f"one of {', '.join(data.DATASETS)} (default: the victim's)")
    p.add_argument("--arch", default="", help="lenet or mlp (default: the victim's, else the dataset's default)")
    p.add_argument("--epochs", type=integer, default=None, help="default per dataset: " + json.dumps(DEFAULTS))
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--batch-size", type=integer, default=None)
    p.add_argument("--seed", type=integer, default=0)
    p.add_argument("--output-dir", default="", help="also keep the exports here (default: a temporary directory)")
    p.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI or sqlite:///<repo>/mlflow.db")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    dataset, arch = a.dataset, a.arch
    if a.victim:
        v_dataset, v_arch = victim_dataset_and_arch(a.victim)
        dataset, arch = dataset or v_dataset, arch or v_arch
    if not dataset:
        raise SystemExit("give --victim (an export directory) or --dataset")
    data.check_dataset(dataset)
    # MLproject passes every parameter; non-positive numbers mean "the dataset's default".
    epochs = a.epochs if a.epochs is not None and a.epochs > 0 else None
    lr = a.lr if a.lr is not None and a.lr > 0 else None
    batch_size = a.batch_size if a.batch_size is not None and a.batch_size > 0 else None

    import tempfile

    import mlflow

    from mlflow_project.lifecycle import tracking

    with tracking.start_run(f"misinformation-{dataset}-{arch or data.default_arch(dataset)}", a.tracking_uri) as run:
        def on_epoch(epoch: int, loss: float) -> None:
            mlflow.log_metric("epoch_loss", loss, step=epoch)

        result = train_misinformation(dataset, arch or None, epochs, lr, a.seed, batch_size,
                                      progress=not a.no_progress, on_epoch=on_epoch)
        cfg = result.train_config
        tracking.log_params({
            "dataset": dataset, "arch": result.arch, "epochs": cfg.epochs, "lr": cfg.lr,
            "batch_size": cfg.batch_size, "seed": cfg.seed, "loss": "-log(1 - p_true)", "victim": a.victim,
        })
        mlflow.log_metrics({"test_accuracy": result.test_accuracy,
                            "test_true_class_prob": result.test_true_class_prob,
                            "train_seconds": result.seconds})
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(a.output_dir) if a.output_dir else Path(tmp)
            export_misinformation(result, out)
            mlflow.log_artifacts(str(out), artifact_path="misinformation")
        mlflow.set_tags({"stealguard.kind": "misinformation"})
        summary = {"run_id": run.info.run_id, **result.info(),
                   "artifact_uri": f"runs:/{run.info.run_id}/misinformation"}
        if a.output_dir:
            summary["export_dir"] = str(Path(a.output_dir).resolve())
    print(json.dumps(summary, indent=2, default=str))
    return summary


if __name__ == "__main__":
    main()
