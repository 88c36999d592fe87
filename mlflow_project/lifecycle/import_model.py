"""Bring your own registered model: turn an MLflow model that knows nothing about StealGuard into files the
worker serves, with its input contract.

``package --victim models:/<name>@<alias>`` (or ``/<version>``) downloads the version; when it is not a
train_victim export or one of the project's own architectures, :func:`import_victim` takes over, by flavor:

- ``pytorch`` (any ``nn.Module``, logged with ``mlflow.pytorch.log_model``): converted now to a ``torch.export``
  .pt2 program with a dynamic batch dimension; if that fails, to TorchScript (``torch.jit.script``, then
  ``torch.jit.trace``), then to ONNX; each failure is logged. MAD's default surrogate is a copy of the victim
  itself with every module re-initialised by ``reset_parameters`` (``plugins.surrogate.make_surrogate``, seeded),
  saved in the same runtime;
- ``onnx`` (``mlflow.onnx.log_model``): shipped as it is; a graph with several outputs keeps only the class-score
  output (named by ``output_name`` in the metadata, else the one floating output of rank 2);
- ``sklearn`` (a classifier with ``predict_proba``, pipelines included): converted now to ONNX with skl2onnx
  (``zipmap=False``, so the probabilities are a plain B x K tensor; the worker runs it with onnxruntime and
  needs no scikit-learn). XGBoost and LightGBM flavors are not converted (onnxmltools is not installed).

For ONNX and scikit-learn victims the default MAD surrogate is :data:`DEFAULT_SURROGATE`: the lab's ``MLP``
(flatten -> 128 -> ReLU -> 128 -> ReLU -> K) on the flattened input, randomly initialised from the seed; pass
``--surrogate FILE`` (with ``--surrogate-arch`` for a state dict) to use another.

The input contract: each piece comes from the first of (1) the command line (``--input-shape``, ``--mean``,
``--std``, ``--class-names``, ``--output``), (2) the registered model's metadata: tags
``stealguard.<key>`` on the model version or the registered model, or a ``stealguard:`` mapping in the MLmodel's
``metadata`` (keys ``shape``, ``mean``, ``std``, ``classes``, ``output``, ``output_name``), (3) the signature
and the input example (shape and dtype; the output kind is detected on the example: non-negative rows summing to
1 are probabilities, a single column in [0, 1] a probability of class 1); the rest fails with one message naming
every missing piece. Serving takes float32 rows; a single-column (binary) model is served as two classes
[1 - p, p] (handlers/runtimes.py).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from handlers.bundle_document import SURROGATE_FILE
from handlers.config import RuntimeSpec, network

log = logging.getLogger("stealguard.package")

FLAVORS = ("pytorch", "onnx", "sklearn")
UNSUPPORTED = {"xgboost": "XGBoost", "lightgbm": "LightGBM", "catboost": "CatBoost"}
CONTRACT_KEYS = ("shape", "mean", "std", "classes", "output", "output_name")
DEFAULT_SURROGATE = "mlp"  # mlflow_project.lab.models.MLP on the flattened input, K outputs
TOLERANCE = 1e-4  # largest |converted - original| accepted on the input example


@dataclass
class Contract:
    """What the server needs to know about the victim's input and output (None: not known yet)."""

    shape: list[int] | None = None
    dtype: str | None = None
    mean: str | None = None
    std: str | None = None
    classes: list[str] | None = None
    output: str | None = None
    output_name: str | None = None
    example: np.ndarray | None = None
    sources: dict[str, str] = field(default_factory=dict)


@dataclass
class ImportedVictim:
    """A converted victim: its archive RuntimeSpec, contract, class count, and how to make its surrogate."""

    flavor: str
    victim: RuntimeSpec
    contract: Contract
    num_classes: int
    module: nn.Module | None = None  # the PyTorch victim (its re-initialised copy is the surrogate)
    notes: list[str] = field(default_factory=list)

    def surrogate(self, seed: int, workdir: Path, runtime: str) -> RuntimeSpec:
        """MAD's surrogate: a re-initialised copy of a PyTorch victim, saved in the victim's runtime; else
        :data:`DEFAULT_SURROGATE` on the flattened input (eager; ``runtime`` onnx/export is converted by
        package)."""
        from plugins.surrogate import make_surrogate

        if self.module is not None:
            net = make_surrogate(self.module, seed) if keeps_classes(self.module) else reset_by_rule(self.module, seed)
            kind, path = save_module(net, self.contract.shape, workdir / "surrogate", prefer=self.victim.runtime)
            if runtime not in ("eager", kind):
                log.info("surrogate: shipped as %s, the runtime the victim converted to (asked: %s)", kind, runtime)
            return network("surrogate", runtime=kind, file=str(path))
        from mlflow_project.lab.models import ARCHITECTURES
        from mlflow_project.lifecycle.package import MODELS_PY

        kwargs = {"num_classes": self.num_classes, "in_features": int(np.prod(self.contract.shape))}
        net = make_surrogate(functools.partial(ARCHITECTURES[DEFAULT_SURROGATE], **kwargs), seed)
        path = workdir / SURROGATE_FILE
        torch.save(net.state_dict(), path)
        return network("surrogate", runtime="eager", file=str(path), model_file=str(MODELS_PY),
                       class_name=ARCHITECTURES[DEFAULT_SURROGATE].__name__, kwargs=kwargs)


# ---------------------------------------------------------------------------------------------- the contract


def registered_tags(record: dict[str, Any] | None) -> dict[str, str]:
    """``stealguard.<key>`` tags of the registered model and of its version (the version's win)."""
    if not record or not record.get("name"):
        return {}
    from mlflow import MlflowClient

    client = MlflowClient()
    tags = dict(client.get_registered_model(record["name"]).tags or {})
    tags.update(client.get_model_version(record["name"], record["version"]).tags or {})
    prefix = "stealguard."
    return {k[len(prefix):]: v for k, v in tags.items() if k.startswith(prefix) and k[len(prefix):] in CONTRACT_KEYS}


def _as_list(value: Any) -> list[str]:
    if isinstance(value, str):
        text = value.strip()
        value = json.loads(text) if text.startswith(("[", "{")) else [v.strip() for v in text.split(",")]
    if isinstance(value, dict):
        value = [value[k] for k in sorted(value, key=int)]
    return [str(v) for v in value]


def _as_csv(value: Any) -> str:
    if isinstance(value, str):
        return value.strip().strip("[]")
    return ",".join(str(v) for v in (value if isinstance(value, (list, tuple)) else [value]))


def _signature_input(model) -> tuple[list[int] | None, str | None]:
    """One row's shape and the dtype from the MLmodel's input schema (None when it does not say)."""
    schema = model.get_input_schema()
    if schema is None:
        return None, None
    if schema.is_tensor_spec():
        inputs = schema.inputs
        if len(inputs) != 1:
            raise ValueError(f"the signature has {len(inputs)} input tensors; StealGuard serves single-input models")
        shape = list(inputs[0].shape)[1:]
        return ([int(d) for d in shape] if shape and all(d > 0 for d in shape) else None), str(inputs[0].type)
    types = {str(t) for t in schema.numpy_types()}
    return [len(schema.inputs)], (types.pop() if len(types) == 1 else "mixed " + "/".join(sorted(types)))


def _example(model, local: Path) -> np.ndarray | None:
    try:
        example = model.load_input_example(str(local))
    except Exception as exc:  # an example the current MLflow cannot read back
        log.info("input example: not readable (%s: %s); not used", type(exc).__name__, exc)
        return None
    if example is None:
        return None
    if isinstance(example, dict) and len(example) == 1:
        example = next(iter(example.values()))
    if hasattr(example, "to_numpy"):
        example = example.to_numpy()
    try:
        return np.asarray(example)
    except (TypeError, ValueError):
        return None


def contract_of(model, local: Path, args: argparse.Namespace, tags: dict[str, str]) -> Contract:
    """The contract pieces the command line, the registered metadata, the signature and the example give."""
    c = Contract()
    meta = (model.metadata or {}).get("stealguard") or {}
    if not isinstance(meta, dict):
        raise ValueError(f"--victim {args.victim}: MLmodel metadata 'stealguard' must be a mapping; got {meta!r}")
    declared = {**{k: v for k, v in meta.items() if k in CONTRACT_KEYS}, **tags}
    where = {k: ("tag stealguard." + k if k in tags else "MLmodel metadata stealguard." + k) for k in declared}
    sig_shape, c.dtype = _signature_input(model)
    c.example = _example(model, local)
    candidates = {
        "shape": [(args.input_shape, "--input-shape"), (declared.get("shape"), where.get("shape")),
                  (sig_shape, "signature"),
                  (list(c.example.shape[1:]) if c.example is not None and c.example.ndim > 1 else None,
                   "input example")],
        "mean": [(args.mean, "--mean"), (declared.get("mean"), where.get("mean"))],
        "std": [(args.std, "--std"), (declared.get("std"), where.get("std"))],
        "classes": [(args.class_names, "--class-names"), (declared.get("classes"), where.get("classes"))],
        "output": [(args.output, "--output"), (declared.get("output"), where.get("output"))],
        "output_name": [(declared.get("output_name"), where.get("output_name"))],
    }
    for key, options in candidates.items():
        value, source = next(((v, s) for v, s in options if v not in (None, "", [])), (None, None))
        if value is None:
            continue
        if key == "shape":
            value = [int(float(d)) for d in _as_list(value)]
        elif key in ("mean", "std"):
            value = _as_csv(value)
        elif key == "classes":
            value = _as_list(value)
        elif key == "output" and value not in ("logits", "probabilities"):
            raise ValueError(f"{source}: output must be logits or probabilities; got {value!r}")
        setattr(c, key, value)
        c.sources[key] = source
    if c.dtype is None and c.example is not None:
        c.dtype, c.sources["dtype"] = str(c.example.dtype), "input example"
    elif c.dtype is not None:
        c.sources["dtype"] = "signature"
    return c


def require(c: Contract, ref: str, flavor: str, need_output: bool) -> None:
    """Fail naming every piece of the contract that nothing gave."""
    missing = []
    if c.shape is None:
        missing.append("input shape (signature, input example, tag stealguard.shape, or --input-shape e.g. 1,28,28)")
    if c.dtype is not None and not (c.dtype.startswith(("float", "int", "uint")) or c.dtype in ("double", "long")):
        missing.append(f"a numeric input dtype (the signature says {c.dtype}; the server sends float32 rows)")
    if need_output and c.output is None and c.example is None:
        missing.append("output kind (no input example to detect it on: tag stealguard.output or --output "
                       "logits|probabilities)")
    if missing:
        raise ValueError(f"--victim {ref} ({flavor} model): cannot serve it without: " + "; ".join(missing))


def detect_output(scores: np.ndarray) -> str:
    """``probabilities`` when every row is non-negative and sums to 1 (one column: every value in [0, 1]),
    else ``logits``."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[0] == 0:
        raise ValueError(f"the model's output must be B x K scores; got shape {list(scores.shape)}")
    if scores.shape[1] == 1:
        return "probabilities" if bool(((scores >= 0) & (scores <= 1)).all()) else "logits"
    ok = (scores >= -1e-6).all() and np.allclose(scores.sum(axis=1), 1.0, atol=1e-4)
    return "probabilities" if bool(ok) else "logits"


def example_batch(c: Contract) -> np.ndarray:
    """The input example as a float32 batch of the contract's shape (two zero rows without an example)."""
    if c.example is None:
        return np.zeros((2, *c.shape), dtype=np.float32)
    x = np.asarray(c.example, dtype=np.float32)
    want = int(np.prod(c.shape))
    if x.size % want:
        raise ValueError(f"input example of shape {list(x.shape)} does not hold rows of shape {c.shape}")
    return x.reshape((-1, *c.shape))


# ---------------------------------------------------------------------------------------------- the flavors


def load_flavor(flavor: str, local: Path, ref: str) -> Any:
    """``mlflow.<flavor>.load_model``; MLflow's refusal to unpickle (pickle, cloudpickle and skops models run
    code when loaded) becomes a ValueError saying how to allow it for a model one trusts."""
    import importlib

    loader = importlib.import_module(f"mlflow.{flavor}")
    kwargs = {"map_location": "cpu"} if flavor == "pytorch" else {}
    try:
        return loader.load_model(str(local), **kwargs)
    except Exception as exc:
        if "MLFLOW_ALLOW_PICKLE_DESERIALIZATION" in str(exc):
            raise ValueError(
                f"--victim {ref}: MLflow will not deserialize this {flavor} model (loading a pickled or skops model "
                "runs code from it); if you trust the model, set MLFLOW_ALLOW_PICKLE_DESERIALIZATION=true for the "
                "package command (it is read only while the archive is built; the server never unpickles it)"
            ) from None
        raise


def save_module(net: nn.Module, shape: list[int], stem: Path, prefer: str = "export") -> tuple[str, Path]:
    """Save ``net`` for serving: torch.export (dynamic batch), else TorchScript, else ONNX (``prefer`` goes first);
    each failure is logged. Returns (runtime, path)."""
    from mlflow_project.lifecycle.exports import save_onnx, save_program

    stem.parent.mkdir(parents=True, exist_ok=True)
    x = torch.zeros((2, *shape), dtype=torch.float32)

    def torchscript(module: nn.Module, example: torch.Tensor, path: Path) -> None:
        try:
            program = torch.jit.script(module)
        except Exception as exc:  # scripting needs annotated Python; tracing records one path
            log.info("TorchScript: torch.jit.script failed (%s: %s); tracing instead", type(exc).__name__, exc)
            program = torch.jit.trace(module, example)
        torch.jit.save(program, str(path))

    savers = {"export": (save_program, ".pt2"), "torchscript": (torchscript, ".torchscript.pt"),
              "onnx": (save_onnx, ".onnx")}
    order = [prefer] + [k for k in savers if k != prefer] if prefer in savers else list(savers)
    errors = []
    for kind in order:
        save, suffix = savers[kind]
        path = stem.with_name(stem.name + suffix)
        try:
            save(net, x, path)
            return kind, path
        except Exception as exc:
            errors.append(f"{kind}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            log.warning("%s: %s conversion failed (%s); trying the next runtime", stem.name, kind, errors[-1])
    raise ValueError(f"{stem.name}: could not convert the PyTorch model to any runtime: " + " | ".join(errors))


def _from_pytorch(local: Path, net: nn.Module | None, c: Contract, workdir: Path) -> tuple[RuntimeSpec, nn.Module,
                                                                                          np.ndarray]:
    net = net if net is not None else load_flavor("pytorch", local, "victim")
    if isinstance(net, torch.export.ExportedProgram):  # logged with serialization_format="pt2"
        net = net.module()
    if not isinstance(net, nn.Module):
        raise ValueError(f"the pytorch flavor loaded a {type(net).__name__}, not a torch.nn.Module")
    try:
        net.eval()
    except NotImplementedError:  # a torch.export program's module (MLflow's pt2 format) refuses eval(): already so
        pass
    net = net.float()
    with torch.no_grad():
        reference = net(torch.from_numpy(example_batch(c))).numpy()
    kind, path = save_module(net, c.shape, workdir / "victim" / "model")
    log.info("victim: converted the PyTorch %s to %s (%s)", type(net).__name__, kind, path.name)
    return network("victim", runtime=kind, file=str(path)), net, reference


def keep_output(path: Path, want: str | None, where: str) -> str:
    """Keep only the class-score output of an ONNX graph (``want``, else its one floating rank-2 output) so the
    runtime reads it; returns the output's name."""
    import onnx

    model = onnx.load(str(path))
    if len({i.name for i in model.graph.input} - {i.name for i in model.graph.initializer}) > 1:
        raise ValueError(f"{where}: the ONNX graph has several inputs; StealGuard serves single-input models")
    outputs = list(model.graph.output)
    names = [o.name for o in outputs]
    floating = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16)
    if want is not None:
        if want not in names:
            raise ValueError(f"{where}: output_name {want!r} is not an output of the graph; outputs: {names}")
        chosen = want
    else:
        scores = [o.name for o in outputs if o.type.tensor_type.elem_type in floating
                  and len(o.type.tensor_type.shape.dim) == 2]
        if len(outputs) == 1:
            chosen = names[0]
        elif len(scores) == 1:
            chosen = scores[0]
        else:
            raise ValueError(f"{where}: cannot tell which ONNX output holds the class scores among {names}; set "
                             "tag stealguard.output_name")
    if names != [chosen]:
        for extra in [o for o in outputs if o.name != chosen]:
            model.graph.output.remove(extra)
        onnx.save(model, str(path))
        log.info("%s: kept ONNX output %r (dropped %s)", where, chosen, [n for n in names if n != chosen])
    return chosen


def _from_onnx(local: Path, conf: dict[str, Any], c: Contract, workdir: Path) -> tuple[RuntimeSpec, np.ndarray]:

    src = local / str(conf.get("data") or "")  # the flavor's file, as its MLmodel names it
    if not src.is_file():
        found = sorted(local.rglob("*.onnx"))
        if len(found) != 1:
            raise ValueError(f"the onnx flavor names {conf.get('data')!r} but the model holds {found}")
        src = found[0]
    dest = workdir / "victim" / "imported.onnx"  # a build file, not an export
    dest.parent.mkdir(parents=True, exist_ok=True)
    import onnx

    onnx.save(onnx.load(str(src)), str(dest), save_as_external_data=False)  # external data folded in
    keep_output(dest, c.output_name, "victim")
    spec = network("victim", runtime="onnx", file=str(dest))
    return spec, _served_scores(spec, example_batch(c))


def sklearn_to_onnx(model: Any, features: int, path: Path) -> None:
    """A scikit-learn classifier (or a pipeline ending in one) as ONNX: float32 input ``x`` of ``features``
    columns, probabilities as a plain B x K tensor (zipmap off), nothing else as output."""
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    final = model.steps[-1][1] if hasattr(model, "steps") else model
    onx = to_onnx(model, initial_types=[("x", FloatTensorType([None, features]))],
                  options={id(final): {"zipmap": False}})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(onx.SerializeToString())
    keep_output(path, "probabilities", "victim")


def _from_sklearn(local: Path, c: Contract, workdir: Path) -> tuple[RuntimeSpec, np.ndarray, list[str]]:
    model = load_flavor("sklearn", local, "victim")
    if not callable(getattr(model, "predict_proba", None)):
        raise ValueError(f"the sklearn model is a {type(model).__name__} without predict_proba; StealGuard defends "
                         "classifiers' probabilities (allowed: classifiers and pipelines ending in one)")
    if len(c.shape) != 1:
        raise ValueError(f"a scikit-learn model takes rows of features: input shape must be [D]; got {c.shape}")
    dest = workdir / "victim" / "imported.onnx"  # a build file, not an export
    try:
        sklearn_to_onnx(model, c.shape[0], dest)
    except Exception as exc:
        raise ValueError(f"skl2onnx cannot convert {type(model).__name__}: {type(exc).__name__}: {exc}") from None
    reference = model.predict_proba(example_batch(c).astype(np.float64))
    log.info("victim: converted the scikit-learn %s to ONNX with skl2onnx", type(model).__name__)
    return network("victim", runtime="onnx", file=str(dest)), reference, [str(k) for k in model.classes_]


def import_victim(local: Path, args: argparse.Namespace, workdir: Path, net: nn.Module | None = None) -> ImportedVictim:
    """Convert the MLflow model downloaded at ``local`` (``net``: its PyTorch module, when already loaded) and
    gather its contract; raise ValueError saying what is missing or not supported."""
    from mlflow.models import Model

    model = Model.load(str(local))
    flavors = dict(model.flavors or {})
    ref = args.victim
    flavor = next((f for f in FLAVORS if f in flavors), None)
    if flavor is None:
        known = [UNSUPPORTED[f] for f in flavors if f in UNSUPPORTED]
        extra = (f" ({', '.join(known)} models need onnxmltools, which is not installed: convert to ONNX and "
                 "register it with mlflow.onnx)" if known else "")
        raise ValueError(f"--victim {ref}: flavors {sorted(flavors)} are not supported{extra}; allowed: "
                         f"{', '.join(FLAVORS)}")
    tags = registered_tags(getattr(args, "victim_record", None))
    c = contract_of(model, local, args, tags)
    require(c, ref, flavor, need_output=flavor == "onnx" or flavor == "pytorch")
    module = None
    classes = None
    if flavor == "pytorch":
        spec, module, reference = _from_pytorch(local, net, c, workdir)
    elif flavor == "onnx":
        spec, reference = _from_onnx(local, flavors["onnx"], c, workdir)
    else:
        spec, reference, classes = _from_sklearn(local, c, workdir)
        if c.output not in (None, "probabilities"):
            raise ValueError(f"{c.sources['output']}: a scikit-learn model's predict_proba gives probabilities, "
                             f"not {c.output}")
        c.output, c.sources["output"] = "probabilities", "predict_proba"
    if c.output is None:
        c.output, c.sources["output"] = detect_output(reference), "detected on the input example"
    spec = spec.model_copy(update={"output": c.output})
    converted = _served_scores(spec, example_batch(c))
    worst = float(np.abs(converted - np.asarray(reference, dtype=np.float64)).max())
    if worst > TOLERANCE:
        raise ValueError(f"--victim {ref}: the converted {spec.runtime} model differs from the original by {worst:.3g}"
                         f" on the input example (> {TOLERANCE:g}); not packaged")
    num_classes = max(2, int(np.asarray(reference).shape[1]))
    if c.classes is None and classes is not None:
        c.classes, c.sources["classes"] = classes, "the classifier's classes_"
    if c.classes is not None and len(c.classes) != num_classes:
        raise ValueError(f"{c.sources['classes']}: {len(c.classes)} class names for a model with {num_classes} "
                         "classes")
    imported = ImportedVictim(flavor, spec, c, num_classes, module)
    imported.notes.append(surrogate_note(imported))
    pieces = ", ".join(f"{k} from {v}" for k, v in c.sources.items())
    log.info("victim %s: %s flavor, %d classes, %s output; %s; converted equals the original within %.2g", ref,
             flavor, num_classes, c.output, pieces, worst)
    return imported


def _served_scores(spec: RuntimeSpec, x: np.ndarray) -> np.ndarray:
    """The converted model's raw scores as the server reads them (before the two-class expansion)."""
    from handlers.runtimes import load_file

    return load_file(spec.runtime, spec.file, output=spec.output).forward(torch.from_numpy(x)).detach().numpy()


def keeps_classes(module: nn.Module) -> bool:
    """Whether every submodule owning parameters is still its own class (so ``reset_parameters`` exists); a
    ``torch.export`` program's module (MLflow's default pt2 format) keeps only plain ``nn.Module`` holders."""
    return not any(type(sub) is nn.Module and list(sub.parameters(recurse=False)) for sub in module.modules())


def reset_by_rule(module: nn.Module, seed: int) -> nn.Module:
    """A re-initialised copy of a module whose layers lost their classes, with the rules of ``reset_parameters``
    of nn.Linear / nn.ConvNd (weight: kaiming_uniform(a=sqrt(5)); bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in))) and
    of the norm layers (1-D weight 1, bias 0, running_mean 0, running_var 1, num_batches_tracked 0); seeded, eval
    mode, no grad. Any other parameter raises ValueError naming it (pass --surrogate instead)."""
    import copy
    import math

    copied = copy.deepcopy(module)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        unknown = []
        for prefix, sub in copied.named_modules():
            params = dict(sub.named_parameters(recurse=False))
            weight = params.get("weight")
            for name, p in params.items():
                if name == "weight" and p.dim() >= 2:
                    nn.init.kaiming_uniform_(p, a=math.sqrt(5))
                elif name == "weight" and p.dim() == 1:
                    p.fill_(1.0)
                elif name == "bias" and weight is not None and weight.dim() >= 2:
                    bound = 1.0 / math.sqrt(max(1, weight[0].numel()))
                    nn.init.uniform_(p, -bound, bound)
                elif name == "bias":
                    p.zero_()
                else:
                    unknown.append(f"{prefix}.{name}" if prefix else name)
            for name, b in sub.named_buffers(recurse=False):
                if name in ("running_var",):
                    b.fill_(1.0)
                elif name in ("running_mean", "num_batches_tracked"):
                    b.zero_()
        if unknown:
            raise ValueError(f"surrogate: cannot re-initialise parameters {unknown} of the victim (its layers lost "
                             "their classes in torch.export); pass --surrogate FILE")
    copied.requires_grad_(False)
    return copied


def surrogate_note(imported: ImportedVictim) -> str:
    """What MAD's jacobian options are with this victim's default surrogate."""
    if imported.module is None:
        return (f"MAD surrogate (default): {DEFAULT_SURROGATE} on the flattened input with {imported.num_classes} "
                "outputs, randomly initialised; its last nn.Linear serves jacobian last_layer, and 'all' works too")
    if not keeps_classes(imported.module):
        return ("MAD surrogate: the victim (registered as a torch.export program, its layers no longer nn.Linear) "
                "re-initialised by reset_parameters' rules, seeded; it has no final nn.Linear, so jacobian last_layer "
                "runs on the surrogate's softmax through an identity head (handlers.runtimes.LogitsHead, the same "
                "angles); jacobian 'all' (gradients of every parameter) and 'identity' remain")
    last = [m for m in imported.module.modules() if isinstance(m, nn.Linear)]
    if not last or last[-1].out_features != imported.num_classes:
        return (f"MAD surrogate: the victim {type(imported.module).__name__} has no final nn.Linear with "
                f"{imported.num_classes} outputs, so jacobian last_layer runs on the surrogate's softmax through an "
                "identity head (handlers.runtimes.LogitsHead, the same angles); jacobian 'all' (gradients of every "
                "parameter) and 'identity' remain")
    return (f"MAD surrogate: the victim {type(imported.module).__name__} re-initialised (reset_parameters, seeded); "
            f"its final nn.Linear has {imported.num_classes} outputs; jacobian last_layer, all and identity work")


def apply_contract(args: argparse.Namespace, imported: ImportedVictim, workdir: Path) -> None:
    """Fill package's arguments from the imported contract (input shape, mean/std, output, labels, classes)."""
    c = imported.contract
    args.input_shape = ",".join(str(d) for d in c.shape)
    args.mean, args.std = c.mean if c.mean is not None else args.mean, c.std if c.std is not None else args.std
    args.output = c.output
    args.num_classes = imported.num_classes
    if args.image is None:
        args.image = len(c.shape) == 3 and c.shape[0] in (1, 3)
    if c.classes is not None and not args.labels:
        path = workdir / "imported_labels.json"
        path.write_text(json.dumps({str(i): n for i, n in enumerate(c.classes)}), encoding="utf-8")
        args.labels = str(path)
    for note in imported.notes:
        log.info("%s", note)
        print(f"package: {note}")


def mlmodel_flavors(local: Path) -> dict[str, Any]:
    """The flavors an MLmodel file declares."""
    return dict((yaml.safe_load((local / "MLmodel").read_text(encoding="utf-8")) or {}).get("flavors") or {})
