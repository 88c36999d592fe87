"""The defended model, framework-free: victim runtime -> probabilities -> defense -> checked perturbed output.

:class:`DefendedPipeline` is that pipeline, the one both the server and the registered pyfunc score through
(mlflow_project/lifecycle/bundle.py's DefendedVictim), output and budget checks included. :class:`DefendedModel`
is what the handler class wraps: it loads everything from the archive at start-up and runs the whole pipeline
once on a warm-up batch, so a victim, surrogate or defense that cannot work makes the worker fail to load
instead of failing (or worse, answering undefended) later.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import torch

from handlers.codec import Codec, load_labels
from handlers.config import LABELS_FILE, ServeConfig, resolve
from handlers.deployment import HOWTO, Secret
from handlers.errors import ConfigError
from handlers.runtimes import LogitsHead, Runtime, load_runtime
from plugins import (
    BUDGET_TOLERANCE,
    Defense,
    DefenseOutput,
    build_defense,
    check_probs,
    distance,
    needs_secret,
    with_secret,
)

log = logging.getLogger(__name__)


class DefenseFailed(RuntimeError):
    """The defense raised or returned something that is not a valid defended batch."""


@dataclass(frozen=True)
class Defended:
    y: torch.Tensor  # B x K victim probabilities (never leave the worker)
    out: DefenseOutput  # the defense's output, checked
    latency_s: float  # wall time of the defense call (its surrogate forward included)
    victim_s: float = 0.0  # wall time of the victim's forward and softmax
    surrogate_s: float = 0.0  # wall time inside the resource networks the defense ran (surrogate, misinformation)


@dataclass(frozen=True)
class Answered:
    """One defended batch as the handler answers it: the pipeline's result, the probabilities to answer (after
    the monitor), which rows the monitor blocks (None: none), the requests it answers with their row counts, and
    the seconds the per-client monitor took on it. It lives here because TorchServe refuses a handler file that
    defines more than one class."""

    result: Defended
    probs: torch.Tensor
    blocked: torch.Tensor | None
    owners: list[int]
    sizes: list[int]
    monitor_s: float = 0.0


class NetworkTimer:
    """Wall time spent inside the resource networks a defense runs, accumulated by forward pre/post hooks on
    the modules it was given (what the defense calls, whatever runtime is behind them); ``take()`` reads and
    resets it. Re-entrant calls (a module calling another hooked one) are counted once."""

    def __init__(self) -> None:
        self.total = 0.0
        self._depth = 0
        self._start = 0.0

    def watch(self, module: torch.nn.Module) -> None:
        module.register_forward_pre_hook(self._enter)
        module.register_forward_hook(self._leave, always_call=True)

    def _enter(self, module, args) -> None:
        if self._depth == 0:
            self._start = time.perf_counter()
        self._depth += 1

    def _leave(self, module, args, output) -> None:
        self._depth -= 1
        if self._depth == 0:
            self.total += time.perf_counter() - self._start

    def take(self) -> float:
        total, self.total, self._depth = self.total, 0.0, 0
        return total


def misinformation_module(runtime: Runtime, num_classes: int) -> torch.nn.Module:
    """adaptive_misinformation's resource: an nn.Module mapping inputs to logits. An eager module returning
    logits is passed as it is; any other runtime (ONNX, torch.export, TorchScript, or a network that returns
    probabilities) is wrapped in :class:`LogitsHead` (an identity head on its logits, run under no_grad)."""
    if runtime.kind == "eager" and runtime.module is not None and runtime.output == "logits":
        return runtime.module
    return LogitsHead(runtime, num_classes)


def keyed_defense(cfg: ServeConfig, secret: Secret | None):
    """The archive's defense config keyed by the deploy-time ``secret`` when it is randomised; a ConfigError
    that says how to supply one when it is missing, or when it is not the one the archive expects."""
    if not needs_secret(cfg.defense):
        return with_secret(cfg.defense, None)
    if secret is None:
        raise ConfigError(
            f"stealguard.defense: '{cfg.defense_name}' is randomised and keyed by a deploy-time secret; none was "
            f"supplied and there is no default, so the model is not loaded; {HOWTO}"
        )
    expected = cfg.secret.fingerprint if cfg.secret is not None else None
    if expected is not None and expected != secret.fingerprint:
        raise ConfigError(
            f"stealguard.secret.fingerprint: the archive expects the secret with fingerprint {expected}, but the "
            f"one from {secret.source} has fingerprint {secret.fingerprint}; supply that secret or repackage "
            "with the new one (`package` records the fingerprint of the secret it finds)"
        )
    try:
        return with_secret(cfg.defense, secret.value)
    except ValueError as exc:
        raise ConfigError(f"{secret.source}: {exc}; {HOWTO}") from None


class DefendedPipeline:
    """A victim runtime and its defense: :meth:`defend` returns the victim's probabilities and the defense's
    output, checked (shape, simplex, probs-space budget), or raises :class:`DefenseFailed`."""

    def __init__(self, victim: Runtime, defense: Defense, timer: NetworkTimer | None = None) -> None:
        self.victim = victim
        self.defense = defense
        self.timer = timer if timer is not None else NetworkTimer()  # watches the defense's resource networks

    def warm_up(self, shape: tuple[int, ...]) -> None:
        """Run a batch of two zero rows of ``shape`` through the pipeline; raise ConfigError if it fails."""
        try:
            self.defend(torch.zeros((2, *shape), dtype=torch.float32))
        except Exception as exc:
            raise ConfigError(
                f"stealguard.defense: '{self.defense.name}' fails on a warm-up batch "
                f"(are the surrogate and misinformation models compatible with the victim?): {exc}"
            ) from exc

    def defend(self, x: torch.Tensor) -> Defended:
        """Victim probabilities for ``x`` and the defense's checked output. Raises DefenseFailed if the
        defense raises or returns anything but a B x K batch on the simplex within its probs-space budget."""
        t0 = time.perf_counter()
        y = self.victim.probabilities(x)
        t1 = time.perf_counter()
        self.timer.take()
        try:
            out = self.defense(y, x)
        except Exception as exc:
            raise DefenseFailed(f"defense '{self.defense.name}' raised {type(exc).__name__}: {exc}") from exc
        t2 = time.perf_counter()
        surrogate = self.timer.take()
        self.check(y, out)
        return Defended(y=y, out=out, latency_s=t2 - t1, victim_s=t1 - t0, surrogate_s=surrogate)

    def check(self, y: torch.Tensor, out: DefenseOutput) -> None:
        probs = out.probs
        if not isinstance(probs, torch.Tensor) or probs.shape != y.shape:
            got = tuple(probs.shape) if isinstance(probs, torch.Tensor) else type(probs).__name__
            raise DefenseFailed(f"defense '{self.defense.name}' returned {got}; expected {tuple(y.shape)}")
        try:
            check_probs(probs)
        except ValueError as exc:
            raise DefenseFailed(
                f"defense '{self.defense.name}' returned rows off the simplex: {exc}"
            ) from exc
        budget = self.defense.budget
        if budget is not None and budget.space == "probs":
            worst = distance(y, probs, budget.norm).max().item()
            if worst > budget.epsilon + BUDGET_TOLERANCE:
                raise DefenseFailed(
                    f"defense '{self.defense.name}' exceeded its budget: {budget.norm} distance {worst:.6g}"
                    f" > epsilon {budget.epsilon:g}"
                )


class DefendedModel(DefendedPipeline):
    """The pipeline of an archive's ``stealguard`` section, loaded from its directory and warmed up."""

    def __init__(self, cfg: ServeConfig, model_dir: str, secret: Secret | None = None) -> None:
        self.cfg = cfg
        self.model_dir = model_dir
        defense_cfg = keyed_defense(cfg, secret)
        self.secret_fingerprint = secret.fingerprint if defense_cfg.needs_secret else None
        threads = cfg.threads
        victim = load_runtime(cfg.victim, model_dir, "stealguard.victim", threads.intra_op, threads.inter_op)
        self.surrogate: Runtime | None = None
        resources: dict[str, object] = {}
        x0 = torch.zeros((2, *cfg.input.shape), dtype=torch.float32)  # the victim's warm-up
        try:
            y0 = check_probs(victim.probabilities(x0))
        except Exception as exc:
            raise ConfigError(
                f"stealguard.victim: a warm-up batch of shape {list(x0.shape)} (stealguard.input.shape "
                f"{list(cfg.input.shape)}) does not run: {type(exc).__name__}: {exc}"
            ) from exc
        self.num_classes = int(y0.shape[1])
        resources["num_classes"] = self.num_classes
        if cfg.surrogate is not None:
            self.surrogate = load_runtime(
                cfg.surrogate, model_dir, "stealguard.surrogate", threads.intra_op, threads.inter_op
            )
            jacobian = cfg.defense.get("jacobian", "last_layer")
            resources["surrogate"] = self.surrogate.as_surrogate(self.num_classes, jacobian)
        self.misinformation: Runtime | None = None
        if cfg.misinformation is not None:
            self.misinformation = load_runtime(
                cfg.misinformation, model_dir, "stealguard.misinformation", threads.intra_op, threads.inter_op
            )
            resources["misinformation"] = misinformation_module(self.misinformation, self.num_classes)
        timer = NetworkTimer()
        for name in ("surrogate", "misinformation"):
            if isinstance(resources.get(name), torch.nn.Module):
                timer.watch(resources[name])
        try:
            defense = build_defense(defense_cfg, **resources)
        except ValueError as exc:
            raise ConfigError(f"stealguard.defense: {exc}") from exc
        super().__init__(victim, defense, timer)
        self.warm_up(cfg.input.shape)
        labels = None
        if cfg.labels is not None:
            default = cfg.labels == LABELS_FILE
            path = resolve(model_dir, cfg.labels, "stealguard.labels", must_exist=False)
            if os.path.isfile(path):
                try:
                    labels = load_labels(path, self.num_classes)
                except (ValueError, OSError) as exc:
                    raise ConfigError(f"stealguard.labels: {cfg.labels}: {exc}") from exc
            elif not default:
                raise ConfigError(f"stealguard.labels: file {cfg.labels!r} is not in the archive")
        self.codec = Codec(cfg.input, labels)

    def contract(self) -> dict:
        """What a client needs to call this model (the describe API's answer): never the secret."""
        spec = self.cfg.input
        image = spec.image
        return {
            "input": {
                "shape": list(spec.shape),
                "dtype": "float32",
                "max_rows": spec.max_rows,
                "json": spec.json_input,
                "mean": list(image.mean) if image else None,
                "std": list(image.std) if image else None,
                "image": {"size": list(image.size), "mode": image.mode} if image else None,
                "content_types": self.codec.allowed.split(", "),
            },
            "classes": self.codec.labels if self.codec.labels is not None else list(range(self.num_classes)),
            "defense": {"name": self.defense.name, "version": self.cfg.version_label},
            "secret_fingerprint": self.secret_fingerprint,
        }

    @property
    def header(self) -> str:
        """``<defense name>@<version>`` for the X-StealGuard-Defense response header."""
        return f"{self.cfg.defense_name}@{self.cfg.version_label}"
