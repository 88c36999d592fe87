"""``package`` entry point: build ``model_store/<name>.mar`` from a victim and a defense config.

    python -m mlflow_project.lifecycle.package --name fmnist_mad --victim artifacts/victims/fashion_mnist_lenet \
        --defense mad_argmax.yaml [--runtime onnx]

The victim is given as files: a ``train_victim`` export directory (input_spec.json supplies the architecture,
input shape, image normalisation and labels), a state dict with ``--arch`` (or ``--model-file`` and
``--model-class``), a ``torch.export`` .pt2, a TorchScript file or an .onnx file (the runtime follows the
extension unless ``--runtime`` says); or as an MLflow URI (``models:/name/3``, ``runs:/<id>/exports``)
downloaded with ``mlflow.artifacts.download_artifacts``. The defense config is a YAML or JSON file (or inline
JSON): a defense config (``{name: mad_argmax, epsilon: 0.5, ...}``) or ``{defense: {...}, version: {...}}``.
A defense that needs a surrogate gets ``--surrogate FILE`` or, by default, a randomly initialised copy of the
victim's architecture (``plugins.surrogate.make_surrogate``, seeded by ``--surrogate-seed``). The archive
carries ``handlers/`` and ``plugins/`` and a ``model-config.yaml`` whose ``stealguard:`` section the handler
validates when the worker starts. The undefended twin of an archive is the same victim packaged with
``{name: identity}``. A defense that needs a misinformation model (``adaptive_misinformation``) gets
``--misinformation DIR`` (a ``train_misinformation`` export directory, shipped in ``--misinformation-runtime``,
eager by default) under ``misinformation/``; passing it for any other defense is refused. A third-party defense
(an installed distribution declaring a ``stealguard.defenses`` entry point) reaches the server with ``--extra-dist
NAME``: its files and metadata go into the archive's ``pylib/`` (lifecycle/distributions.py).

A registered defense (``--defense models:/<name>@<alias>`` or ``models:/<name>/<version>``, see register.py) is
resolved now, when the archive is built: its bundle supplies the defense config, the surrogate's weights, the
misinformation model (adaptive_misinformation; unless ``--misinformation`` is given) and, unless ``--victim`` is
given, the victim it was tuned for, so ``package --name m --defense
models:/digits_mlp-defense@production`` alone builds a complete archive. The registered name, version, run id
and alias go into model-config.yaml (``stealguard.version``); the response header then reads
``<defense>@<name>/<version>``. ``--resolve-at-start`` (with ``--fallback embedded|fail``) lets the worker
re-resolve the alias once when it starts (handlers/registry.py). A registered victim (``--victim
models:/<victim>@<alias>``) is taken from the export directory train_victim logged in its run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch
import yaml

from handlers.bundle_document import SURROGATE_FILE  # the random surrogate's weights, named as in a bundle
from handlers.config import CONFIG_FILE, LABELS_FILE, RUNTIMES, RuntimeSpec, network, write_model_config
from handlers.config import build as build_section
from handlers.victim_export import VictimExport
from mlflow_project.cli import integer
from mlflow_project.lifecycle.import_model import (
    ImportedVictim,
    apply_contract,
    import_victim,
    load_flavor,
    mlmodel_flavors,
)

REPO = Path(__file__).resolve().parents[2]
CODE_PACKAGES = ("handlers", "plugins")
HANDLER = REPO / "handlers" / "stealguard_handler.py"
MODELS_PY = REPO / "mlflow_project" / "lab" / "models.py"
EXTENSIONS = {
    ".pt2": "export",
    ".onnx": "onnx",
    ".ts": "torchscript",
    ".torchscript": "torchscript",
    ".pt": "eager",
    ".pth": "eager",
}
_ARCHIVER_LOCK = threading.Lock()
log = logging.getLogger(__name__)


def model_files(runtime: str, file: str | Path, model_file: str | Path | None = None, class_name: str | None = None,
                kwargs: dict[str, Any] | None = None, output: str = "logits") -> RuntimeSpec:
    """A network given as local files, as the archive's RuntimeSpec (local paths until :func:`stage_network`
    copies them into the archive); raise ValueError when a file is missing or the spec is not valid."""
    for key, path in (("file", file), ("model_file", model_file)):
        if path is not None and not Path(path).is_file():
            raise ValueError(f"{key}: {path} does not exist")
    return network("network", runtime=runtime, file=str(file), model_file=str(model_file) if model_file else None,
                   class_name=class_name, kwargs=dict(kwargs) if kwargs else None,
                   output=None if output == "logits" else output)


def stage_network(spec: RuntimeSpec, dest: Path) -> RuntimeSpec:
    """Copy a network's local files under ``dest`` (a folder inside the archive); return its spec in the archive
    (paths relative to the archive's root)."""
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.parent
    file = Path(spec.file)
    shutil.copy2(file, dest / file.name)
    sidecar = file.with_name(file.name + ".data")  # ONNX external data, when exported so
    if spec.runtime == "onnx" and sidecar.is_file():
        shutil.copy2(sidecar, dest / sidecar.name)
    update = {"file": str((dest / file.name).relative_to(root))}
    if spec.model_file is not None:
        model_file = Path(spec.model_file)
        shutil.copy2(model_file, dest / model_file.name)
        update["model_file"] = str((dest / model_file.name).relative_to(root))
    return spec.model_copy(update=update)


def runtime_for(path: Path) -> str:
    try:
        return EXTENSIONS[path.suffix.lower()]
    except KeyError:
        raise ValueError(
            f"cannot tell the runtime of {path.name} from its extension; pass --runtime "
            f"(extensions: {', '.join(sorted(EXTENSIONS))})"
        ) from None


def read_defense_file(path: str | Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(defense config, version info or None) from a YAML/JSON file; validated with plugins."""
    from plugins import validate_config

    if not Path(path).is_file() and str(path).lstrip().startswith("{"):
        text = str(path)  # inline JSON, e.g. from `make archive ARCHIVE_DEFENSE='{"name": ...}'`
    else:
        text = Path(path).read_text(encoding="utf-8")
    data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a defense config file must hold a mapping; got {type(data).__name__}")
    version = None
    if "defense" in data:
        unknown = set(data) - {"defense", "version"}
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}; allowed: defense, version")
        version, data = data.get("version"), data["defense"]
    validate_config(data)
    refuse_secret(data, str(path))
    return dict(data), version


def refuse_secret(defense: dict[str, Any], where: str) -> None:
    """An archive never holds a defense secret: refuse a config that carries one (the server reads it at deploy
    time; handlers/deployment.py)."""
    if "secret" in defense:
        from handlers.deployment import HOWTO

        raise ValueError(
            f"{where}: 'secret' is not allowed in an archived defense config (an archive never holds the secret); "
            f"remove it and {HOWTO}"
        )


def secret_section(defense: dict[str, Any], secret_file: str | None) -> dict[str, Any] | None:
    """The archive's ``stealguard.secret``: the secret file to read at deploy time (when given) and the
    fingerprint of the secret found now (STEALGUARD_SECRET, STEALGUARD_SECRET_FILE or ``secret_file``), never
    the secret. None for a defense that draws no keyed randomness."""
    from handlers.deployment import find_secret
    from plugins import needs_secret

    if not needs_secret(defense):
        if secret_file:
            raise ValueError(f"--secret-file: defense '{defense['name']}' with this config uses no secret")
        return None
    section: dict[str, Any] = {}
    if secret_file:
        section["file"] = os.path.abspath(secret_file)
    found = find_secret(section.get("file"))
    if found is not None:
        section["fingerprint"] = found.fingerprint
    return section or None


def read_monitor_file(path: str) -> dict[str, Any]:
    """The ``monitor:`` section from a YAML/JSON file (a top-level ``monitor:`` key is unwrapped) or inline
    JSON, validated; it names where the watermark key lives, never the key (an unknown ``key`` field is refused)."""
    from plugins.monitor import parse_monitor

    text = str(path) if not Path(path).is_file() and str(path).lstrip().startswith("{") else None
    data = yaml.safe_load(text if text is not None else Path(path).read_text(encoding="utf-8"))
    if isinstance(data, dict) and set(data) == {"monitor"}:
        data = data["monitor"]
    if not isinstance(data, dict):
        raise ValueError(f"--monitor {path}: must hold a mapping (the monitor: section); got {type(data).__name__}")
    parse_monitor(data, "--monitor")
    return data


def eager_from_arch(weights: Path, arch: str, num_classes: int) -> RuntimeSpec:
    from mlflow_project.lab.models import ARCHITECTURES

    if arch not in ARCHITECTURES:
        raise ValueError(f"arch: unknown {arch!r}; allowed: {', '.join(ARCHITECTURES)}")
    return model_files("eager", weights, MODELS_PY, ARCHITECTURES[arch].__name__, {"num_classes": num_classes})


def harden_needs_surrogate(monitor: dict[str, Any] | None) -> bool:
    """True when the monitor's ``harden`` defense (action harden) needs a surrogate: the archive then ships one
    even if its main defense does not (the worker builds the harden defense from the archive's surrogate)."""
    from plugins import needs
    from plugins.monitor import parse_monitor

    if monitor is None:
        return False
    cfg = parse_monitor(monitor, "--monitor")
    return cfg.action == "harden" and needs(cfg.harden, "surrogate")


def random_surrogate(victim: RuntimeSpec, seed: int, workdir: Path) -> RuntimeSpec:
    """A randomly initialised network of the victim's (eager) architecture: the paper's MAD surrogate."""
    if victim.runtime != "eager":
        raise ValueError(
            "the defense needs a surrogate: pass --surrogate FILE or --surrogate-arch (the victim's runtime "
            f"{victim.runtime!r} does not carry its architecture)"
        )
    import importlib.util

    spec = importlib.util.spec_from_file_location("stealguard_package_model", victim.model_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    victim_net = getattr(module, victim.class_name)(**victim.kwargs)
    from plugins.surrogate import make_surrogate

    net = make_surrogate(victim_net, seed)
    path = workdir / SURROGATE_FILE
    torch.save(net.state_dict(), path)
    return model_files("eager", path, victim.model_file, victim.class_name, dict(victim.kwargs))


def _load_eager(files: RuntimeSpec) -> torch.nn.Module:
    import importlib.util

    spec = importlib.util.spec_from_file_location("stealguard_package_model", files.model_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    net = getattr(module, files.class_name)(**files.kwargs)
    net.load_state_dict(torch.load(files.file, map_location="cpu", weights_only=True))
    return net.eval()


SURROGATE_RUNTIMES = ("auto", "eager", "onnx", "export")
CHECK_ROWS = 16  # random inputs of the declared shape the converted surrogate is checked on
CHECK_ATOL = 1e-4  # largest |logit difference| accepted, relative to max(1, |logit|)


def onnx_equivalent(defense: dict[str, Any]) -> bool:
    """True when the defense needs only the surrogate's logits, so an ONNX surrogate defends the same as the eager
    one: last-layer MAD and MAD-argmax (angles from the softmax alone) and last-layer gradient_redirection except
    ``target: random`` (its fixed direction is over the real last layer's weights, whose input ONNX hides)."""
    from plugins import validate_config

    cfg = validate_config(defense)
    if cfg.name not in ("mad", "mad_argmax", "gradient_redirection") or getattr(cfg, "jacobian", None) != "last_layer":
        return False
    return not (cfg.name == "gradient_redirection" and cfg.target == "random")


def surrogate_runtime(requested: str, defense: dict[str, Any], surrogate: RuntimeSpec) -> str:
    """The runtime to ship the surrogate in: ``auto`` is ONNX for an eager surrogate of a defense that needs only
    its logits (:func:`onnx_equivalent`), else the surrogate's own runtime; an explicit runtime is checked."""
    if requested == "auto":
        return "onnx" if surrogate.runtime == "eager" and onnx_equivalent(defense) else surrogate.runtime
    from plugins import validate_config

    if requested == "onnx" and getattr(validate_config(defense), "jacobian", None) == "all":
        raise ValueError("--surrogate-runtime onnx: jacobian 'all' needs a torch surrogate (eager or export)")
    return requested


def check_converted(net: torch.nn.Module, files: RuntimeSpec, input_shape: list[int], seed: int = 0) -> float:
    """Run the converted surrogate and the eager one on :data:`CHECK_ROWS` seeded random inputs of the declared
    shape; return the largest logit difference (relative to max(1, |logit|)), or raise ValueError above
    :data:`CHECK_ATOL`."""
    x = torch.randn((CHECK_ROWS, *input_shape), generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        want = net(x).to(torch.float32)
    if files.runtime == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(files.file), providers=["CPUExecutionProvider"])
        (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        got = torch.from_numpy(got)
    else:
        with torch.inference_mode():
            got = torch.export.load(str(files.file)).module()(x)
    if tuple(got.shape) != tuple(want.shape):
        raise ValueError(f"the {files.runtime} surrogate returns shape {tuple(got.shape)}; eager {tuple(want.shape)}")
    worst = float(((got - want).abs() / want.abs().clamp_min(1.0)).max())
    if not worst <= CHECK_ATOL:  # also catches NaN
        raise ValueError(
            f"the {files.runtime} surrogate's logits differ from the eager surrogate's by up to {worst:.3g} "
            f"(relative) on {CHECK_ROWS} random inputs of shape {input_shape}; at most {CHECK_ATOL:g} is accepted"
        )
    return worst


def convert(
    files: RuntimeSpec, runtime: str, input_shape: list[int], workdir: Path
) -> tuple[RuntimeSpec, float | None]:
    """An eager network re-saved for ``runtime`` (ONNX or torch.export, dynamic batch dimension) and checked
    against the eager network (:func:`check_converted`); returns the spec and the check's largest logit
    difference (None when nothing was converted). With ``jacobian: last_layer`` MAD needs only the
    surrogate's softmax, so an ONNX surrogate defends the same and runs faster (see BENCHMARKS.md, Serving)."""
    if runtime == files.runtime:
        return files, None
    if files.runtime != "eager" or runtime not in ("onnx", "export"):
        raise ValueError(
            f"--surrogate-runtime: can convert an eager surrogate to onnx or export, not {runtime!r}"
        )
    from mlflow_project.lifecycle.exports import save_onnx, save_program

    net = _load_eager(files)
    x = torch.zeros((2, *input_shape))
    path = workdir / ("surrogate.pt2" if runtime == "export" else "surrogate.onnx")
    (save_program if runtime == "export" else save_onnx)(net, x, path)
    converted = model_files(runtime, path)
    return converted, check_converted(net, converted, input_shape)


def ship_surrogate(
    surrogate: RuntimeSpec, requested: str, defense: dict[str, Any], input_shape: list[int], workdir: Path
) -> tuple[RuntimeSpec, float | None]:
    """The surrogate in the runtime it ships in, and its conversion check's error (:func:`convert`). With
    ``auto`` a conversion that fails, or whose logits differ
    from the eager surrogate's, is logged and the eager surrogate is shipped instead; an explicit
    ``--surrogate-runtime`` that cannot be honoured is an error."""
    runtime = surrogate_runtime(requested, defense, surrogate)
    if runtime == surrogate.runtime:
        return surrogate, None
    try:
        return convert(surrogate, runtime, input_shape, workdir)
    except Exception as exc:
        if requested != "auto":
            raise ValueError(f"--surrogate-runtime {requested}: {exc}") from exc
        log.warning(
            "package: shipping the surrogate as eager (--surrogate-runtime auto could not use onnx: %s: %s)",
            type(exc).__name__,
            exc,
        )
        return surrogate, None


def apply_spec_document(args: argparse.Namespace, doc: dict[str, Any], labels: Path | None) -> None:
    """Fill unset arguments from a victim's input spec (a VictimExport's, or the one train_victim puts in its MLflow
    model's metadata): arch, classes, input shape, image normalisation; and the labels file given."""
    args.arch = args.arch or doc.get("arch")
    args.num_classes = int(doc.get("num_classes", args.num_classes))
    if not args.input_shape and doc.get("shape"):
        args.input_shape = ",".join(str(int(d)) for d in doc["shape"])
    if args.mean is None and "mean" in doc:
        args.mean = str(doc["mean"])
    if args.std is None and "std" in doc:
        args.std = str(doc["std"])
    shape = list(doc.get("shape", []))
    if args.image is None and len(shape) == 3 and shape[0] in (1, 3):
        args.image = True
    if labels is not None and not args.labels:
        args.labels = str(labels)
    if doc.get("output") in ("logits", "probabilities"):
        args.output = doc["output"]


def _from_export_dir(export: VictimExport, args: argparse.Namespace) -> Path:
    apply_spec_document(args, export.spec, export.labels)
    args.runtime = args.runtime or "eager"
    return export.file(args.runtime)


def misinformation_files(directory: Path, runtime: str) -> RuntimeSpec:
    """The misinformation model of a ``train_misinformation`` export directory, as files for ``runtime``."""
    if not VictimExport.is_export(directory):
        raise ValueError(f"--misinformation: {directory} is not a train_misinformation export directory")
    export = VictimExport.open(directory, "--misinformation", "train_misinformation")
    path = export.file(runtime)
    if runtime != "eager":
        return model_files(runtime, path)
    return eager_from_arch(path, export.arch, export.num_classes)


def arch_surrogate(arch: str, num_classes: int, seed: int, workdir: Path) -> RuntimeSpec:
    """A randomly initialised ``arch`` from mlflow_project.lab.models (``make_surrogate``), as eager files."""
    import functools

    from mlflow_project.lab.models import ARCHITECTURES
    from plugins.surrogate import make_surrogate

    net = make_surrogate(functools.partial(ARCHITECTURES[arch], num_classes=num_classes), seed)
    path = workdir / SURROGATE_FILE
    torch.save(net.state_dict(), path)
    return eager_from_arch(path, arch, num_classes)


REGISTRY_MODELS = "registry_models.py"  # handlers/registry.py builds another version's networks from it


def registered_defense(uri: str, workdir: Path) -> tuple[Any, dict[str, Any]]:
    """The bundle of a registered defense version (``models:/<name>@<alias>`` or ``/<version>``), downloaded into
    ``workdir``, and the ``stealguard.version`` record: registered name, version, run id, alias, source."""
    import mlflow.artifacts

    from mlflow_project.lifecycle.bundle import BUNDLE_FILE, read_bundle
    from mlflow_project.lifecycle.model_uris import resolve

    try:
        version = resolve(uri)
    except ValueError as exc:
        raise ValueError(f"--defense: {exc}") from None
    except Exception as exc:  # MlflowException: unknown name, alias or version
        raise ValueError(f"--defense: cannot resolve {uri}: {getattr(exc, 'message', exc)}") from None
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=version.uri, dst_path=str(workdir / "defense")))
    found = sorted(local.rglob(BUNDLE_FILE))
    if not found:
        raise ValueError(f"--defense: {uri} (version {version.version}) is not a StealGuard defense bundle "
                         f"(no {BUNDLE_FILE}); register defenses with mlflow_project.lifecycle.register")
    record = {"name": version.name, "version": version.version, "run_id": version.run_id or None,
              "alias": version.alias, "source": uri}
    return read_bundle(found[0].parent), record


def resolve_victim(args: argparse.Namespace, workdir: Path) -> RuntimeSpec:
    """The victim as files: a file, a train_victim export directory (input_spec.json + one file per runtime),
    or an MLflow model/artifact URI downloaded into ``workdir`` (a registered victim: the export directory its
    run logged, else its MLflow pytorch model)."""
    source = args.victim
    if source.startswith("models:/"):
        from mlflow_project.lifecycle.model_uris import resolve, victim_export_dir

        try:
            registered = resolve(source)
        except Exception as exc:  # a malformed URI (ValueError) or MlflowException: unknown name/alias/version
            raise ValueError(f"--victim: cannot resolve {source}: {getattr(exc, 'message', exc)}") from None
        args.victim_record = {k: v for k, v in registered.as_dict().items() if k != "source"}
        try:
            source = str(victim_export_dir(source, workdir / "victim-exports")[0])
        except Exception:  # no exports logged in the version's run: use the registered model itself
            source = args.victim
    if source == args.victim and ("://" in source or source.startswith(("models:/", "runs:/"))):
        import mlflow.artifacts

        local = Path(
            mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(workdir / "download"))
        )
        picked = _pick_model_file(local, args, workdir)
        if isinstance(picked, ImportedVictim):  # a model registered with plain MLflow calls, converted now
            args.imported = picked
            apply_contract(args, picked, workdir)
            return picked.victim
        source = str(picked)
    path = Path(source)
    if path.is_dir():
        exports = path if VictimExport.is_export(path) else path / "exports"  # an export, or a victim run's artifacts
        if not VictimExport.is_export(exports):
            raise ValueError(f"{path}: a victim directory must be a train_victim export directory (a VictimExport)")
        path = _from_export_dir(VictimExport.open(exports), args)
    runtime = args.runtime or runtime_for(path)
    if runtime == "eager":
        if args.model_file:
            kwargs = json.loads(args.model_kwargs) if args.model_kwargs else {}
            return model_files("eager", path, Path(args.model_file), args.model_class, kwargs)
        if not args.arch:
            raise ValueError(
                "an eager state dict needs --arch (lenet, mlp) or --model-file and --model-class"
            )
        return eager_from_arch(path, args.arch, args.num_classes)
    return model_files(runtime, path, output=args.output or "logits")


def _pick_model_file(local: Path, args: argparse.Namespace, workdir: Path) -> Path | ImportedVictim:
    if local.is_file():
        return local
    if VictimExport.is_export(local) or VictimExport.is_export(local / "exports"):
        return local  # a train_victim export directory (or a victim run's artifact root)
    if (local / "MLmodel").is_file():  # an MLflow model: one of the project's architectures, or imported
        if "pytorch" not in mlmodel_flavors(local):
            return import_victim(local, args, workdir)
        from mlflow_project.lab.models import ARCHITECTURES

        meta = (yaml.safe_load((local / "MLmodel").read_text()) or {}).get("metadata") or {}
        net = load_flavor("pytorch", local, args.victim)
        arch = next((k for k, cls in ARCHITECTURES.items() if type(net) is cls), None)
        if arch is None:  # any other nn.Module: converted (torch.export, else TorchScript/ONNX)
            return import_victim(local, args, workdir, net)
        if isinstance(meta.get("stealguard"), dict):
            apply_spec_document(args, meta["stealguard"], None)
        args.arch, args.num_classes = arch, int(getattr(net, "num_classes", args.num_classes))
        out = workdir / "victim_state_dict.pt"
        torch.save(net.state_dict(), out)
        return out
    found = sorted(p for p in local.rglob("*") if p.suffix.lower() in EXTENSIONS)
    if len(found) != 1:
        raise ValueError(f"{args.victim}: expected one model file ({', '.join(EXTENSIONS)}); found {found}")
    return found[0]


def stage(
    root: Path,
    *,
    victim: RuntimeSpec,
    defense: dict[str, Any],
    input_spec: dict[str, Any],
    surrogate: RuntimeSpec | None = None,
    misinformation: RuntimeSpec | None = None,
    version: dict[str, Any] | None = None,
    labels: Path | None = None,
    secret: dict[str, Any] | None = None,
    batch_size: int = 8,
    max_batch_delay_ms: int = 5,
    workers: int = 1,
    response_timeout_s: int = 60,
    threads: dict[str, int] | None = None,
    extra_dists: list[str] | tuple[str, ...] = (),
    monitor: dict[str, Any] | None = None,
) -> Path:
    """Lay out an archive's contents in ``root`` (what TorchServe unpacks to model_dir); return the
    model-config.yaml path, whose ``stealguard:`` section is written through handlers.config.ServeConfig. Used by
    :func:`build_archive` and by the handler tests (no archive needed). ``extra_dists``: installed distributions
    to ship under ``pylib/`` (lifecycle/distributions.py)."""
    root.mkdir(parents=True, exist_ok=True)
    from handlers import EXTRA_CODE_DIR
    from mlflow_project.lifecycle import distributions

    if (root / EXTRA_CODE_DIR).exists():
        shutil.rmtree(root / EXTRA_CODE_DIR)
    shipped = distributions.ship(list(extra_dists), root / EXTRA_CODE_DIR)
    distributions.report(defense["name"], shipped)
    section: dict[str, Any] = {"defense": dict(defense), "victim": stage_network(victim, root / "victim")}
    for role, spec in (("surrogate", surrogate), ("misinformation", misinformation)):
        if spec is not None:
            section[role] = stage_network(spec, root / role)
    section["input"] = dict(input_spec)
    if version:
        section["version"] = dict(version)
        if version.get("resolve_at_start"):
            shutil.copy2(MODELS_PY, root / REGISTRY_MODELS)
    if secret:
        section["secret"] = dict(secret)  # a fingerprint and a file path outside the archive, never the secret
    section["threads"] = dict(threads or {"intra_op": 1, "inter_op": 1})
    if monitor is not None:
        section["monitor"] = dict(monitor)
    cfg = build_section(section)
    if labels is not None:
        shutil.copy2(labels, root / str(cfg.labels))
    for pkg in CODE_PACKAGES:
        dest = root / pkg
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(REPO / pkg, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy2(HANDLER, root / HANDLER.name)
    torchserve = {"minWorkers": workers, "maxWorkers": workers, "batchSize": batch_size,
                  "maxBatchDelay": max_batch_delay_ms, "responseTimeout": response_timeout_s}
    return Path(write_model_config(root, cfg, torchserve))


def build_archive(name: str, staged: Path, export_path: Path, version: str = "1.0") -> Path:
    """Archive a staged directory (or its model-config.yaml, as :func:`stage` returns it) as
    ``export_path/<name>.mar`` with torch-model-archiver's Python API."""
    staged = Path(staged)
    if staged.is_file():
        staged = staged.parent
    from model_archiver.model_archiver_config import ModelArchiverConfig
    from model_archiver.model_packaging import generate_model_archive

    export_path.mkdir(parents=True, exist_ok=True)
    cfg = ModelArchiverConfig(
        model_name=name,
        handler=str(staged / HANDLER.name),
        version=version,
        extra_files=str(staged),
        export_path=str(export_path),
        archive_format="default",
        force=True,
        config_file=str(staged / CONFIG_FILE),
    )
    # The archiver copies into tempfile.gettempdir()/<name> and deletes it: give it a private temp dir.
    with _ARCHIVER_LOCK, tempfile.TemporaryDirectory(prefix="sg-archiver-") as tmp:
        saved = tempfile.tempdir
        tempfile.tempdir = tmp
        try:
            generate_model_archive(cfg)
        finally:
            tempfile.tempdir = saved
    mar = export_path / f"{name}.mar"
    if not mar.is_file():
        raise RuntimeError(f"torch-model-archiver did not write {mar}")
    return mar


def input_spec_from_args(args: argparse.Namespace) -> dict[str, Any]:
    if args.input_shape:
        shape = [int(d) for d in args.input_shape.split(",")]
    elif args.arch:
        from mlflow_project.lab.models import ARCHITECTURES

        shape = list(ARCHITECTURES[args.arch].input_shape)
    else:
        raise ValueError("--input-shape is required (e.g. 1,28,28) when --arch is not given")
    spec: dict[str, Any] = {"shape": shape, "max_rows": args.max_rows}
    if args.image:
        args.mean, args.std = args.mean or "0.0", args.std or "1.0"
        if len(shape) != 3 or shape[0] not in (1, 3):
            raise ValueError(f"--image needs an input shape C,H,W with C in 1 or 3; got {shape}")
        spec["image"] = {
            "size": shape[1:],
            "mode": "L" if shape[0] == 1 else "RGB",
            "mean": [float(v) for v in args.mean.split(",")],
            "std": [float(v) for v in args.std.split(",")],
        }
    spec["json"] = args.json_input
    if args.json_input == "pixels" and "image" not in spec:
        raise ValueError("--json-input pixels: needs an image input (--image, with --mean/--std) whose mean and std "
                         "normalise the pixels; use --json-input normalised for other victims")
    return spec


def missing_victim(victim: str) -> str | None:
    """What to say when ``--victim`` names a local path that does not exist (None if it exists or is a URI):
    no victim was trained there yet, and how to train one (``make demo``, or train_victim's exact command for
    an ``artifacts/victims/<dataset>_<arch>`` name)."""
    if "://" in victim or victim.startswith(("models:/", "runs:/")) or Path(victim).exists():
        return None
    from mlflow_project.lab.data import DATASETS
    from mlflow_project.lab.models import ARCHITECTURES

    name = Path(victim).name
    dataset, arch = next(((d, name[len(d) + 1:]) for d in DATASETS if name.startswith(d + "_")), ("", ""))
    if arch not in ARCHITECTURES:
        dataset, arch = "fashion_mnist", "lenet"
    return (f"--victim: {victim} does not exist: no victim has been trained there yet. Train and export one with "
            f"`make demo` (its victim goes to artifacts/victims/<dataset>_<arch>, fashion_mnist_lenet by default) "
            f"or `python -m mlflow_project.lab.train_victim --dataset {dataset} --arch {arch} --output-dir "
            f"{victim}`, or give --victim (make archive: ARCHIVE_VICTIM=...) an existing export directory, model "
            "file or MLflow model URI")


def _output(value: str) -> str | None:
    if value in ("", "auto"):
        return None
    if value not in ("logits", "probabilities"):
        raise argparse.ArgumentTypeError(f"unknown output {value!r}; allowed: logits, probabilities")
    return value


def _runtime(value: str) -> str | None:
    if value in ("", "auto"):
        return None
    if value not in RUNTIMES:
        raise argparse.ArgumentTypeError(f"unknown runtime {value!r}; allowed: {', '.join(RUNTIMES)}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="package", description=__doc__.split("\n\n")[0])
    p.add_argument("--name", required=True, help="model name: model_store/<name>.mar, /predictions/<name>")
    p.add_argument(
        "--victim",
        help="victim file or export directory, or an MLflow URI (models:/..., runs:/...); default with a "
        "registered --defense: the victim in its bundle",
    )
    p.add_argument("--runtime", type=_runtime, help="default: by extension")
    p.add_argument("--arch", choices=["lenet", "mlp"], help="architecture of an eager state dict")
    p.add_argument("--num-classes", type=integer, default=10)
    p.add_argument("--model-file", help="eager: .py file defining the victim class (instead of --arch)")
    p.add_argument("--model-class", help="eager: class name in --model-file")
    p.add_argument("--model-kwargs", help="eager: JSON constructor arguments")
    p.add_argument(
        "--output", type=_output, default=None,
        help="what the victim returns: logits or probabilities (default: logits; a registered model's is "
        "declared by tag stealguard.output or detected on its input example)",
    )
    p.add_argument(
        "--class-names", default=None,
        help="a registered model's class names, comma-separated or a JSON list (default: tag stealguard.classes, "
        "a scikit-learn classifier's classes_)",
    )
    p.add_argument(
        "--defense",
        required=True,
        help="defense config file (YAML or JSON), inline JSON, or a registered defense models:/<name>@<alias> "
        "or models:/<name>/<version>",
    )
    p.add_argument(
        "--resolve-at-start",
        action="store_true",
        help="with --defense models:/<name>@<alias>: the worker re-resolves the alias once at start "
        "(MLFLOW_TRACKING_URI must be an mlflow server)",
    )
    p.add_argument(
        "--fallback",
        choices=["embedded", "fail"],
        default="fail",
        help="with --resolve-at-start: when MLflow cannot be reached, serve the embedded version or fail to load",
    )
    p.add_argument("--tracking-uri", default="", help="MLflow tracking URI for models:/ (default: as mlflow)")
    p.add_argument(
        "--surrogate", help="surrogate file (any runtime; by extension); default: random victim arch"
    )
    p.add_argument("--surrogate-arch", choices=["lenet", "mlp"], help="random-init surrogate of this arch")
    p.add_argument("--surrogate-seed", type=integer, default=0)
    p.add_argument(
        "--surrogate-runtime",
        choices=list(SURROGATE_RUNTIMES),
        default="auto",
        help="ship an eager surrogate in this runtime; auto: onnx for defenses that need only its logits "
        "(last-layer mad, mad_argmax, gradient_redirection except target random), checked against the eager "
        "surrogate, else (or when the check fails, logged) eager",
    )
    p.add_argument(
        "--misinformation",
        help="train_misinformation export directory (required by adaptive_misinformation, refused otherwise; "
        "default with a registered --defense: the one in its bundle)",
    )
    p.add_argument(
        "--misinformation-runtime",
        choices=list(RUNTIMES),
        default="eager",
        help="ship the misinformation model in this runtime (from the export directory's files)",
    )
    p.add_argument("--input-shape", help="one row's shape, e.g. 1,28,28 (default: the --arch input shape)")
    p.add_argument("--max-rows", type=integer, default=256, help="most instances per request")
    p.add_argument(
        "--image",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also accept PNG/JPEG bodies (C,H,W input; on by default for image victims with an input_spec)",
    )
    p.add_argument("--mean", default=None, help="image normalisation mean(s), comma-separated (default 0)")
    p.add_argument("--std", default=None, help="image normalisation std(s), comma-separated (default 1)")
    p.add_argument(
        "--json-input",
        choices=["normalised", "pixels"],
        default="normalised",
        help="what JSON instances are: the victim's normalised tensors, or pixels in [0, 1] that the server "
        "normalises with the image mean/std (as it does PNG/JPEG bodies)",
    )
    p.add_argument(
        "--secret-file",
        default="",
        help="randomised defenses: a file outside the archive holding the secret, read by the worker at start "
        "(recorded as a path; the secret itself is never archived, only its fingerprint)",
    )
    p.add_argument("--labels", help=f"class-name map to ship as {LABELS_FILE} ({{\"0\": name, ...}} or a list)")
    p.add_argument(
        "--extra-dist",
        action="append",
        default=[],
        metavar="NAME[,NAME...]",
        help="ship this installed distribution (e.g. a third-party defense declaring a stealguard.defenses entry "
        "point) in the archive's pylib/, with its metadata; repeatable, or comma-separated",
    )
    p.add_argument("--version-name", help="registered name of the defense config (MLflow)")
    p.add_argument("--version", help="version of the defense config (header X-StealGuard-Defense)")
    p.add_argument("--batch-size", type=integer, default=8)
    p.add_argument("--max-batch-delay", type=integer, default=5, help="milliseconds")
    p.add_argument("--workers", type=integer, default=1)
    p.add_argument("--threads", type=integer, default=1, help="intra-op threads per worker")
    p.add_argument("--export-path", default=str(REPO / "model_store"))
    p.add_argument(
        "--monitor",
        default="",
        help="YAML/JSON file (or inline JSON) with the per-client monitor: section (plugins/monitor/config.py)",
    )
    return p


def main(argv: list[str] | None = None) -> Path:
    p = parser()
    args = p.parse_args(argv)
    registered = args.defense.startswith("models:/")
    if registered and (args.version is not None or args.version_name is not None):
        p.error("--version/--version-name: not with a registered --defense models:/... (the registry names it)")
    if not registered and not args.victim:
        p.error("--victim is required unless --defense is a registered defense (models:/<name>@<alias>)")
    if args.resolve_at_start and not (registered and "@" in args.defense):
        p.error("--resolve-at-start needs --defense models:/<name>@<alias> (an alias to re-resolve)")
    if args.defense.startswith("models:/") or (args.victim or "").startswith(("models:/", "runs:/")):
        import mlflow

        from mlflow_project.lifecycle.tracking import resolve_tracking_uri

        mlflow.set_tracking_uri(resolve_tracking_uri(args.tracking_uri or None))
    from plugins import needs, needs_secret

    with tempfile.TemporaryDirectory(prefix="sg-package-") as tmp:
        work = Path(tmp)
        bundle = None
        if registered:
            bundle, version = registered_defense(args.defense, work)
            defense = dict(bundle.defense)
            refuse_secret(defense, args.defense)
            version["victim_source"] = args.victim or "bundle"
            if args.resolve_at_start:
                version.update(resolve_at_start=True, fallback=args.fallback)
            args.victim = args.victim or str(bundle.victim_dir)
        else:
            defense, version = read_defense_file(args.defense)
            if args.version is not None or args.version_name is not None:
                version = {**(version or {}), "name": args.version_name, "version": args.version}
        args.victim_record = None
        args.imported = None
        if missing := missing_victim(args.victim):
            raise ValueError(missing)
        victim = resolve_victim(args, work)
        if args.victim_record:
            version = {**(version or {}), "victim": args.victim_record}
        monitor = read_monitor_file(args.monitor) if args.monitor else None
        surrogate, surrogate_check = None, None
        if bundle is not None and bundle.surrogate is not None and not args.surrogate:
            spec = bundle.surrogate  # the registered version's own weights, never re-derived
            surrogate = eager_from_arch(bundle.root / spec["file"], spec["arch"], int(spec["num_classes"]))
        elif args.surrogate:
            s = Path(args.surrogate)
            runtime = runtime_for(s)
            surrogate = (
                eager_from_arch(s, args.surrogate_arch or args.arch, args.num_classes)
                if runtime == "eager"
                else model_files(runtime, s)
            )
        elif needs(defense, "surrogate") or harden_needs_surrogate(monitor):
            arch = args.surrogate_arch or (args.arch if victim.runtime != "eager" else None)
            if args.imported is not None and not args.surrogate_arch:  # a registered model imported now
                surrogate = args.imported.surrogate(args.surrogate_seed, work, args.surrogate_runtime)
                if surrogate.runtime != "eager":  # a PyTorch victim's re-initialised copy, in the victim's runtime
                    args.surrogate_runtime = surrogate.runtime
            elif arch:
                surrogate = arch_surrogate(arch, args.num_classes, args.surrogate_seed, work)
            else:
                surrogate = random_surrogate(victim, args.surrogate_seed, work)
        if surrogate is not None:
            shape = input_spec_from_args(args)["shape"]
            surrogate, surrogate_check = ship_surrogate(surrogate, args.surrogate_runtime, defense, shape, work)
        needs_misinformation = needs(defense, "misinformation")
        if bundle is not None and bundle.misinformation is not None and not args.misinformation:
            args.misinformation = str(bundle.misinformation_dir)  # the registered version's own model
        if needs_misinformation and not args.misinformation:
            raise ValueError(
                f"--misinformation: defense '{defense['name']}' needs a misinformation model "
                "(a train_misinformation export directory"
                + ("; this registered version carries none: re-register it with register --misinformation)"
                   if bundle is not None else ")")
            )
        if args.misinformation and not needs_misinformation:
            raise ValueError(
                f"--misinformation: defense '{defense['name']}' does not use a misinformation model; "
                "allowed only with defenses that need one (adaptive_misinformation)"
            )
        misinformation = (
            misinformation_files(Path(args.misinformation), args.misinformation_runtime)
            if args.misinformation
            else None
        )
        secret = secret_section(defense, args.secret_file or None)
        staged = work / "stage"
        stage(
            staged,
            victim=victim,
            defense=defense,
            input_spec=input_spec_from_args(args),
            surrogate=surrogate,
            misinformation=misinformation,
            version=version,
            labels=Path(args.labels) if args.labels else None,
            secret=secret,
            batch_size=args.batch_size,
            max_batch_delay_ms=args.max_batch_delay,
            workers=args.workers,
            threads={"intra_op": args.threads, "inter_op": 1},
            extra_dists=[n for value in args.extra_dist for n in value.split(",") if n.strip()],
            monitor=monitor,
        )
        mar_version = (version or {}).get("version") if registered else args.version
        mar = build_archive(args.name, staged, Path(args.export_path), str(mar_version or "1.0"))
    label = f", version {version['name']}/{version['version']}" if registered else ""
    shipped = "" if surrogate is None else f", surrogate {surrogate.runtime}" + (
        f" (logits within {surrogate_check:.2g} of the eager surrogate's)"
        if surrogate_check is not None else ""
    )
    print(f"wrote {mar} ({os.path.getsize(mar)} bytes): defense {defense['name']}{label}, victim {victim.runtime}"
          f"{shipped}")
    if secret is not None or needs_secret(defense):
        found = secret or {}
        print(f"defense '{defense['name']}' is randomised: the server needs its secret at deploy time "
              f"(STEALGUARD_SECRET, STEALGUARD_SECRET_FILE, stealguard_secret_file or --secret-file); "
              + (f"archived fingerprint {found['fingerprint']}" if "fingerprint" in found
                 else "no secret found now, so no fingerprint was archived"))
    return mar


if __name__ == "__main__":
    try:
        main()
    except ValueError as exc:  # a bad argument or reference: say which, without a traceback
        import sys

        print(f"package: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
