"""The ``stealguard:`` section of an archive's model-config.yaml: the one schema (:class:`ServeConfig`) that
``package`` writes through (:func:`write_model_config`) and the worker validates when it initialises
(:func:`parse`). A new field is one line in the model that holds it.

    stealguard:
      defense: {name: mad_argmax, epsilon: 0.5, norm: l1, jacobian: last_layer}
      version: {name: fmnist-defense, version: "3", run_id: ..., alias: production}   # optional (see VersionSpec)
      victim: {runtime: eager, file: victim/state_dict.pt, model_file: victim/models.py, class: LeNet,
               kwargs: {num_classes: 10}, output: logits}
      surrogate: {runtime: onnx, file: surrogate/model.onnx}  # required when the defense needs one
      misinformation: {runtime: onnx, file: misinformation/model.onnx}  # required by adaptive_misinformation,
                                                             # refused for defenses that do not use one
      input:
        shape: [1, 28, 28]                                   # one row, without the batch dimension
        max_rows: 64                                         # rows per request
        image: {size: [28, 28], mode: L, mean: [0.286], std: [0.353], max_bytes: 1000000}
        json: normalised                                     # or pixels: JSON in [0, 1], normalised like images
      secret: {fingerprint: 1f0e..., file: /etc/stealguard/secret}  # optional; never the secret (deployment.py)
      threads: {intra_op: 1, inter_op: 1}
      labels: index_to_name.json                             # optional; used when the file is shipped
      monitor: {action: harden, harden: {name: label_only}}  # optional per-client extraction monitor
                                                             # (plugins/monitor/config.py documents it)

Every failure is a :class:`ConfigError` whose message names the field (``stealguard.<path>``) and what is
allowed. File paths are relative to the archive's directory and must stay inside it (before ``package`` stages
them, a network's paths are local files: :func:`network`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from handlers.errors import ConfigError
from plugins import defense_class, needs, validate_config
from plugins.base import describe_validation_error
from plugins.monitor import parse_monitor

SECTION = "stealguard"
CONFIG_FILE = "model-config.yaml"  # TorchServe's per-model config, carrying the section
LABELS_FILE = "index_to_name.json"  # TorchServe's class-name map (an export's labels have the same name)
RUNTIMES = ("eager", "export", "torchscript", "onnx")  # the one list of runtimes a network can ship in
TORCH_RUNTIMES = RUNTIMES[:3]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class RuntimeSpec(_Strict):
    """How to load a network (victim or surrogate) from the archive."""

    runtime: Literal[RUNTIMES]
    file: str = Field(
        min_length=1, description="state dict (eager), .pt2 (export), TorchScript or .onnx file"
    )
    model_file: str | None = Field(default=None, description="eager only: the .py file defining the class")
    class_name: str | None = Field(default=None, alias="class", description="eager only: the nn.Module class")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="eager only: constructor arguments")
    output: Literal["logits", "probabilities"] = "logits"

    @model_validator(mode="after")
    def _eager_needs_class(self) -> RuntimeSpec:
        if self.runtime == "eager" and not (self.model_file and self.class_name):
            raise ValueError(
                "runtime 'eager' needs 'model_file' (a .py file) and 'class' (the nn.Module name)"
            )
        if self.runtime != "eager" and (self.model_file or self.class_name or self.kwargs):
            raise ValueError(
                f"'model_file', 'class' and 'kwargs' apply to runtime 'eager' only, not {self.runtime!r}"
            )
        return self


class ImageSpec(_Strict):
    """Preprocessing for PNG/JPEG request bodies: decode, convert, resize, scale to [0, 1], normalise."""

    size: tuple[int, int] = Field(description="[height, width] the image is resized to")
    mode: Literal["L", "RGB"] = "L"
    mean: list[float] = Field(default_factory=lambda: [0.0])
    std: list[float] = Field(default_factory=lambda: [1.0])
    max_bytes: int = Field(default=2_000_000, gt=0, description="largest accepted encoded image, in bytes")
    max_pixels: int = Field(default=16_000_000, gt=0, description="largest accepted decoded width x height")

    @model_validator(mode="after")
    def _check(self) -> ImageSpec:
        if min(self.size) < 1:
            raise ValueError(f"size must be two positive integers [height, width]; got {list(self.size)}")
        channels = 1 if self.mode == "L" else 3
        for field in ("mean", "std"):
            if len(getattr(self, field)) not in (1, channels):
                raise ValueError(
                    f"{field} needs 1 or {channels} values for mode {self.mode}; got {getattr(self, field)}"
                )
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std values must be > 0; got {self.std}")
        return self

    @property
    def channels(self) -> int:
        return 1 if self.mode == "L" else 3


JSON_INPUTS = ("normalised", "pixels")


class InputSpec(_Strict):
    shape: tuple[int, ...] = Field(min_length=1, description="shape of one row, without the batch dimension")
    max_rows: int = Field(default=256, ge=1, le=100_000, description="most rows one request may carry")
    image: ImageSpec | None = None
    json_input: Literal["normalised", "pixels"] = Field(
        default="normalised",
        alias="json",
        description="JSON instances are the victim's normalised tensors, or pixels in [0, 1] normalised by the "
        "handler with image.mean/std",
    )

    @model_validator(mode="after")
    def _check(self) -> InputSpec:
        if any(d < 1 for d in self.shape):
            raise ValueError(f"shape must be positive integers; got {list(self.shape)}")
        if self.json_input == "pixels" and self.image is None:
            raise ValueError("json 'pixels' needs 'image' (its mean and std normalise the pixels); use 'normalised'")
        if self.image is not None:
            numel = self.image.channels * self.image.size[0] * self.image.size[1]
            want = 1
            for d in self.shape:
                want *= d
            if numel != want:
                raise ValueError(
                    f"image {self.image.mode} {self.image.size[0]}x{self.image.size[1]} has {numel} values "
                    f"but the input shape {list(self.shape)} has {want}"
                )
        return self


class VersionSpec(BaseModel):
    """Where the defense config came from. ``package --defense models:/<name>@<alias>`` fills name, version,
    run_id, alias and source; other keys (e.g. the victim's registered version) are kept as they are.

    ``resolve_at_start: true`` makes the worker ask the MLflow server in MLFLOW_TRACKING_URI, once at start,
    which version ``alias`` points to and use that version's bundle if it is not the embedded one
    (handlers/registry.py); ``fallback`` says what happens when that fails: ``embedded`` serves the embedded
    version, ``fail`` makes the worker fail to load.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    name: str | None = None
    version: str | int | None = None
    run_id: str | None = None
    alias: str | None = None
    resolve_at_start: bool = False
    fallback: Literal["embedded", "fail"] = "fail"

    @model_validator(mode="after")
    def _resolvable(self) -> VersionSpec:
        if self.resolve_at_start and not (self.name and self.alias):
            raise ValueError(
                "resolve_at_start needs 'name' (the registered model) and 'alias' (e.g. production); "
                f"got name={self.name!r}, alias={self.alias!r}"
            )
        return self

    @property
    def label(self) -> str:
        """``<registered name>/<version>``, ``<version>`` without a name, ``unversioned`` without a version."""
        if self.version is None:
            return "unversioned"
        return f"{self.name}/{self.version}" if self.name else str(self.version)


class SecretSpec(_Strict):
    """Where the deployment's secret is and which one it must be; never the secret itself."""

    fingerprint: str | None = Field(
        default=None, pattern=r"^[0-9a-f]{16}$", description="plugins.seeding.fingerprint of the expected secret"
    )
    file: str | None = Field(default=None, min_length=1, description="a file outside the archive holding it")


class Threads(_Strict):
    intra_op: int = Field(default=1, ge=1, le=256)
    inter_op: int = Field(default=1, ge=1, le=256)


class ServeConfig(_Strict):
    defense: dict[str, Any]
    victim: RuntimeSpec
    surrogate: RuntimeSpec | None = None
    misinformation: RuntimeSpec | None = None
    input: InputSpec
    version: VersionSpec | None = None
    secret: SecretSpec | None = None
    threads: Threads = Field(default_factory=Threads)
    labels: str | None = LABELS_FILE
    monitor: dict[str, Any] | None = None  # validated by plugins.monitor.parse_monitor in parse()

    @property
    def defense_name(self) -> str:
        return str(self.defense["name"])

    @property
    def version_label(self) -> str:
        """What the X-StealGuard-Defense header says after the '@' (and the metrics' defense_version label):
        ``<registered name>/<version>``, ``<version>`` when the version has no name, else ``unversioned``."""
        return "unversioned" if self.version is None else self.version.label

    def section(self) -> dict[str, Any]:
        """The section as it is written to model-config.yaml: the fields that were given, by their YAML names."""
        return self.model_dump(mode="json", by_alias=True, exclude_unset=True)


def network(where: str, **fields: Any) -> RuntimeSpec:
    """A :class:`RuntimeSpec` from its fields (``class_name`` for ``class``); a ConfigError names ``where``."""
    try:
        return RuntimeSpec.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, f"invalid {where} config", (where,))) from None


def build(section: Mapping[str, Any]) -> ServeConfig:
    """The schema's check of a section (no files looked at, the defense config not validated: :func:`parse`)."""
    try:
        return ServeConfig.model_validate(dict(section))
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, f"invalid {SECTION} config", (SECTION,))) from None


def write_model_config(root: str | os.PathLike, cfg: ServeConfig, torchserve: Mapping[str, Any]) -> str:
    """Write ``root``/model-config.yaml: TorchServe's keys (``torchserve``, e.g. minWorkers, batchSize) and
    ``cfg`` as the ``stealguard:`` section. Returns the file's path."""
    import yaml

    path = os.path.join(root, CONFIG_FILE)
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump({**dict(torchserve), SECTION: cfg.section()}, fh, sort_keys=False)
    return path


def parse(model_yaml_config: Mapping[str, Any] | None, model_dir: str) -> ServeConfig:
    """Validate the ``stealguard`` section (defense included) and check that every named file exists."""
    section = (model_yaml_config or {}).get(SECTION)
    if not isinstance(section, Mapping):
        raise ConfigError(
            f"{CONFIG_FILE} has no '{SECTION}:' mapping (got {type(section).__name__}); an archive "
            "without a defense config is never served"
        )
    cfg = build(section)
    try:
        defense_cfg = validate_config(cfg.defense)
    except ValueError as exc:
        raise ConfigError(f"{SECTION}.defense: {exc}") from None
    cls = defense_class(defense_cfg.name)
    if needs(defense_cfg, "surrogate") and cfg.surrogate is None:
        raise ConfigError(
            f"{SECTION}.surrogate: missing; defense '{cls.name}' needs a surrogate shipped in the archive"
        )
    needs_misinformation = needs(defense_cfg, "misinformation")
    if needs_misinformation and cfg.misinformation is None:
        raise ConfigError(
            f"{SECTION}.misinformation: missing; defense '{cls.name}' needs a misinformation model shipped in "
            "the archive (package --misinformation <train_misinformation export dir>)"
        )
    if not needs_misinformation and cfg.misinformation is not None:
        raise ConfigError(
            f"{SECTION}.misinformation: defense '{cls.name}' does not use a misinformation model; remove the "
            "field (allowed only for defenses that need one, e.g. adaptive_misinformation)"
        )
    if cfg.monitor is not None:
        try:
            parse_monitor(cfg.monitor, f"{SECTION}.monitor")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    jacobian = getattr(defense_cfg, "jacobian", None)
    if jacobian == "all" and cfg.surrogate is not None and cfg.surrogate.runtime not in TORCH_RUNTIMES:
        raise ConfigError(
            f"{SECTION}.surrogate.runtime: jacobian 'all' needs gradients, so a torch runtime "
            f"({', '.join(TORCH_RUNTIMES)}); got {cfg.surrogate.runtime!r}"
        )
    for role in ("victim", "surrogate", "misinformation"):
        spec = getattr(cfg, role)
        if spec is None:
            continue
        for key in ("file", "model_file"):
            rel = getattr(spec, key)
            if rel is not None:
                resolve(model_dir, rel, f"{SECTION}.{role}.{key}")
    return cfg


def resolve(model_dir: str, rel: str, field: str, must_exist: bool = True) -> str:
    """The absolute path of ``rel`` inside ``model_dir``; refuse paths that leave it or do not exist."""
    root = os.path.realpath(model_dir)
    path = os.path.realpath(os.path.join(root, rel))
    if os.path.commonpath([root, path]) != root:
        raise ConfigError(f"{field}: {rel!r} points outside the archive directory")
    if must_exist and not os.path.isfile(path):
        raise ConfigError(f"{field}: file {rel!r} is not in the archive ({root})")
    return path
