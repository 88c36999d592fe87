"""Runtimes: load a network shipped in the archive and run a float32 batch through it.

Every runtime maps a float32 batch ``x`` (B x input shape) to a float32 B x K tensor of logits (or of
probabilities when the spec says ``output: probabilities``). Kinds: ``eager`` (a .py model file + a state
dict), ``export`` (a ``torch.export`` .pt2 program), ``torchscript`` and ``onnx`` (onnxruntime, explicit
thread counts).
"""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import torch
from torch import nn

from handlers.config import RuntimeSpec, resolve
from handlers.errors import ConfigError


class Runtime:
    """A loaded network. ``module`` is the torch module (None for ONNX); calling it runs a batch."""

    kind: str = ""
    module: nn.Module | None = None

    def __init__(self, spec: RuntimeSpec) -> None:
        self.spec = spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """B x K float64 probabilities (softmax of the logits in float64, so rows sum to 1 tightly)."""
        with torch.inference_mode():
            out = self.forward(x)
        out = out.detach().to(torch.float64)
        if self.spec.output == "logits":
            return torch.softmax(out, dim=1)
        return out / out.sum(dim=1, keepdim=True)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """B x K logits (log-probabilities when the network returns probabilities: same softmax)."""
        out = self.forward(x)
        if self.spec.output == "probabilities":
            out = torch.log(out.clamp_min(torch.finfo(out.dtype).tiny))
        return out

    def as_surrogate(self, num_classes: int, jacobian: str | None) -> nn.Module:
        """What a MAD-family defense gets as its surrogate (an nn.Module mapping inputs to logits).

        An eager module, and any torch module for ``jacobian="all"`` (it differentiates through its
        parameters), is passed as it is. Other runtimes are wrapped in :class:`LogitsHead`: with
        ``last_layer`` the angles depend only on the surrogate's softmax.
        """
        if self.module is not None and (self.kind == "eager" or jacobian == "all"):
            return self.module
        if jacobian == "all":
            raise ConfigError(
                f"jacobian 'all' needs a torch surrogate (eager, export, torchscript), not {self.kind}"
            )
        return LogitsHead(self, num_classes)


class LogitsHead(nn.Module):
    """A surrogate runtime seen as an nn.Module whose last nn.Linear is an identity on its logits.

    MAD over the last linear layer needs only the surrogate's softmax p (docs/concepts.md: the angle is
    ``cos = <v - p, y - p> / (|v - p| |y - p|)``), so a frozen identity head on the logits gives the same
    defense as the network's own last layer, for any runtime (ONNX, torch.export, TorchScript).
    """

    def __init__(self, runtime: Runtime, num_classes: int) -> None:
        super().__init__()
        self.runtime = runtime  # not an nn.Module: kept as a plain attribute
        self.head = nn.Linear(num_classes, num_classes, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.eye(num_classes))
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            z = self.runtime.logits(x).to(self.head.weight.dtype)
            return self.head(z)


class TorchRuntime(Runtime):
    def __init__(self, spec: RuntimeSpec, module: nn.Module, kind: str) -> None:
        super().__init__(spec)
        self.kind = kind
        if hasattr(module, "eval"):
            try:
                module.eval()
            except (NotImplementedError, RuntimeError):  # exported programs' modules refuse eval()
                pass
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


class OnnxRuntime(Runtime):
    kind = "onnx"

    def __init__(self, spec: RuntimeSpec, path: str, intra_op: int, inter_op: int) -> None:
        super().__init__(spec)
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op
        options.inter_op_num_threads = inter_op
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.session = ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ConfigError(
                f"onnx model {path} has {len(inputs)} inputs; StealGuard serves single-input models"
            )
        self.input_name = inputs[0].name
        self.output_name = self.session.get_outputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        arr = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        (out,) = self.session.run([self.output_name], {self.input_name: arr})
        return torch.from_numpy(np.asarray(out, dtype=np.float32))


def _load_class(model_file: str, class_name: str, field: str) -> type:
    name = f"stealguard_model_{abs(hash(model_file))}"
    spec = importlib.util.spec_from_file_location(name, model_file)
    if spec is None or spec.loader is None:
        raise ConfigError(f"{field}.model_file: cannot import {model_file}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        found = sorted(k for k, v in vars(module).items() if isinstance(v, type) and issubclass(v, nn.Module))
        raise ConfigError(
            f"{field}.class: {class_name!r} is not an nn.Module in {model_file}; found: {found}"
        )
    return cls


def load_runtime(
    spec: RuntimeSpec, model_dir: str, field: str, intra_op: int = 1, inter_op: int = 1
) -> Runtime:
    """Load ``spec`` from the archive directory; any failure is a ConfigError naming ``field`` and why."""
    path = resolve(model_dir, spec.file, f"{field}.file")
    try:
        if spec.runtime == "eager":
            cls = _load_class(
                resolve(model_dir, spec.model_file, f"{field}.model_file"), spec.class_name, field
            )
            module = cls(**spec.kwargs)
            state = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(state, dict):
                raise ConfigError(
                    f"{field}.file: {spec.file} is not a state dict (got {type(state).__name__})"
                )
            module.load_state_dict(state)
            return TorchRuntime(spec, module, "eager")
        if spec.runtime == "export":
            program = torch.export.load(path)
            return TorchRuntime(spec, program.module(), "export")
        if spec.runtime == "torchscript":
            return TorchRuntime(spec, torch.jit.load(path, map_location="cpu"), "torchscript")
        return OnnxRuntime(spec, path, intra_op, inter_op)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(
            f"{field}: could not load {spec.runtime} model {spec.file!r}: {type(exc).__name__}: {exc}"
        ) from exc
