"""Small victims for the serving tests, exported to every runtime the handler loads (eager state dict,
torch.export .pt2, TorchScript, ONNX). Random-init or briefly fitted; never the lab's trained victims."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from handlers.config import RuntimeSpec
from mlflow_project.lab import data
from mlflow_project.lab.models import build_model
from mlflow_project.lab.train_victim import export_victim
from mlflow_project.lifecycle.exports import save_onnx, save_program
from mlflow_project.lifecycle.package import eager_from_arch, model_files

RUNTIMES = ("eager", "export", "torchscript", "onnx")
SUFFIX = {"eager": ".pt", "export": ".pt2", "torchscript": ".ts", "onnx": ".onnx"}


def make_net(arch: str = "mlp", num_classes: int = 10, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(arch, num_classes).eval()


def example_input(net: nn.Module, batch: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand((batch, *net.input_shape), generator=g)


def export(net: nn.Module, runtime: str, directory: Path, arch: str, num_classes: int = 10) -> RuntimeSpec:
    """Save ``net`` for ``runtime`` under ``directory``; return the files the packager stages."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{arch}_{runtime}{SUFFIX[runtime]}"
    x = example_input(net)
    if runtime == "eager":
        torch.save(net.state_dict(), path)
        return eager_from_arch(path, arch, num_classes)
    if runtime == "export":
        save_program(net, x, path)
    elif runtime == "torchscript":
        torch.jit.save(torch.jit.trace(net, x), str(path))
    elif runtime == "onnx":
        save_onnx(net, x, path)
    else:
        raise ValueError(f"runtime: unknown {runtime!r}; allowed: {', '.join(RUNTIMES)}")
    return model_files(runtime, path)


def export_digits_mlp(out: Path, seed: int = 0) -> Path:
    """A random-init digits MLP (torch seeded with ``seed``) as a train_victim export directory at ``out``, with
    the eager state dict only (no other runtime, no check): the victim of the lifecycle and packaging tests."""
    torch.manual_seed(seed)
    export_victim(build_model("mlp", num_classes=10), "mlp", data.input_spec("digits", "mlp"), out, check=False,
                  runtimes=False)
    return out
