"""Runtimes: load a network shipped in the archive and run a float32 batch through it.

Every runtime maps a float32 batch ``x`` (B x input shape) to a float32 B x K tensor of logits (or of
probabilities when the spec says ``output: probabilities``). A network with a single output column is a binary
classifier: its probability p of class 1 (``probabilities``, e.g. after a sigmoid) or its logit z (``logits``) is
served as the two classes [1 - p, p] (the logits [0, z], whose softmax is [1 - sigmoid(z), sigmoid(z)]).
Kinds: ``eager`` (a .py model file + a state dict), ``export`` (a ``torch.export`` .pt2 program),
``torchscript`` and ``onnx`` (onnxruntime, explicit thread counts).
"""

from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np
import torch
from torch import nn

from handlers.config import RuntimeSpec, resolve
from handlers.errors import ConfigError


class Runtime:
    """A loaded network. ``module`` is the torch module (None for ONNX); calling it runs a batch. ``output`` says
    what the network returns: ``logits`` or ``probabilities`` (RuntimeSpec.output)."""

    kind: str = ""
    module: nn.Module | None = None

    def __init__(self, output: str = "logits") -> None:
        self.output = output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """The network's B x K output, a single (binary) column made two classes (module docstring)."""
        return two_classes(self.forward(x), self.output)

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """B x K float64 probabilities (softmax of the logits in float64, so rows sum to 1 tightly)."""
        with torch.inference_mode():
            out = self.scores(x)
        out = out.detach().to(torch.float64)
        if self.output == "logits":
            return torch.softmax(out, dim=1)
        return out / out.sum(dim=1, keepdim=True)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """B x K logits (log-probabilities when the network returns probabilities: same softmax)."""
        out = self.scores(x)
        if self.output == "probabilities":
            out = torch.log(out.clamp_min(torch.finfo(out.dtype).tiny))
        return out

    def as_surrogate(self, num_classes: int, jacobian: str | None) -> nn.Module:
        """What a MAD-family defense gets as its surrogate (an nn.Module mapping inputs to logits).

        An eager module, and any torch module for ``jacobian="all"`` (it differentiates through its
        parameters), is passed as it is (at K = 2 through :class:`TwoClassLogits`, for a one-column binary
        network). Other runtimes, and an eager binary network whose last nn.Linear has one output, are wrapped in
        :class:`LogitsHead`: with ``last_layer`` the angles depend only on the surrogate's softmax.
        """
        if self.module is not None and (self.kind == "eager" or jacobian == "all"):
            if num_classes == 2 and jacobian == "all":  # a binary network may return one column
                return TwoClassLogits(self.module, self.output)
            last = [m for m in self.module.modules() if isinstance(m, nn.Linear)]
            if not (num_classes == 2 and last and last[-1].out_features == 1):
                return self.module
        if jacobian == "all":
            raise ConfigError(
                f"jacobian 'all' needs a torch surrogate (eager, export, torchscript), not {self.kind}"
            )
        return LogitsHead(self, num_classes)


def two_classes(out: torch.Tensor, output: str) -> torch.Tensor:
    """``out`` as it is with two or more columns; one column becomes two classes: [1 - p, p] for probabilities,
    [0, z] for logits."""
    if out.dim() != 2 or out.shape[1] != 1:
        return out
    if output == "probabilities":
        return torch.cat([1.0 - out, out], dim=1)
    return torch.cat([torch.zeros_like(out), out], dim=1)


class TwoClassLogits(nn.Module):
    """A torch surrogate of a binary victim whose network may return one column: its output through
    :func:`two_classes` (a logits network only; a network returning probabilities gives their logarithm), so MAD
    sees K = 2 logits. The wrapped module's parameters stay its own (``module.`` prefix)."""

    def __init__(self, module: nn.Module, output: str = "logits") -> None:
        super().__init__()
        self.module = module
        self.output = output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = two_classes(self.module(x), self.output)
        if self.output == "probabilities":
            out = torch.log(out.clamp_min(torch.finfo(out.dtype).tiny))
        return out


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
    def __init__(self, module: nn.Module, kind: str, output: str = "logits") -> None:
        super().__init__(output)
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

    def __init__(self, path: str, intra_op: int = 1, inter_op: int = 1, output: str = "logits") -> None:
        super().__init__(output)
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


def load_file(kind: str, path: str, intra_op: int = 1, inter_op: int = 1, output: str = "logits") -> Runtime:
    """A network of a runtime that needs no Python class (export, torchscript, onnx) loaded from ``path``."""
    if kind == "export":
        return TorchRuntime(torch.export.load(path).module(), "export", output)
    if kind == "torchscript":
        return TorchRuntime(torch.jit.load(path, map_location="cpu"), "torchscript", output)
    if kind == "onnx":
        return OnnxRuntime(path, intra_op, inter_op, output)
    raise ValueError(f"runtime {kind!r} is not loaded from a file alone; allowed: export, torchscript, onnx")


def load_state_dict(module: nn.Module, path: str | os.PathLike, field: str) -> nn.Module:
    """``module`` with the state dict saved at ``path`` (``torch.save``, loaded with weights_only), in eval mode."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ConfigError(f"{field}.file: {os.path.basename(path)} is not a state dict (got {type(state).__name__})")
    module.load_state_dict(state)
    return module.eval()


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
            return TorchRuntime(load_state_dict(cls(**spec.kwargs), path, field), "eager", spec.output)
        return load_file(spec.runtime, path, intra_op, inter_op, spec.output)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(
            f"{field}: could not load {spec.runtime} model {spec.file!r}: {type(exc).__name__}: {exc}"
        ) from exc
