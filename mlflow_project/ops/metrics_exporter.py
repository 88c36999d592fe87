"""StealGuard's defense metrics outside TorchServe, from prometheus-client, under the server's exact names.

The offline lab (``evaluate --metrics-port``) and anything else that runs a defense in-process use this so
that the lab and the server are observed alike: the same metric names, types, label names (plus the
``Hostname`` label TorchServe adds) and the same histogram buckets as TorchServe's fixed ones. The
measurement itself is shared with the handler (:func:`handlers.metrics.observe_batch`).

    exporter = MetricsExporter(port=9108)            # serves http://127.0.0.1:9108/metrics
    m = exporter.defense_metrics(model_name="mnist", defense_name="mad", defense_version="3",
                                 budget=defense.budget)
    m.record_batch(y, out.probs, out.angular_deviation, latency_s)
    exporter.close()

One exporter can carry several defenses (one ``defense_metrics`` per defense). ``port=0`` picks a free port
(``exporter.port`` tells which). Binds to 127.0.0.1 unless told otherwise.

``evaluate --metrics-port PORT`` uses :func:`evaluation_observer` (the hook ``mlflow_project/lab/evaluate.py``
calls): every batch the in-process defense answers (the test-set pass and the attacker's queries) is recorded
with ``model_name`` = the victim, ``defense`` = the defense's name and ``defense_version="lab"``. The endpoint
lives as long as the evaluation process.
"""

from __future__ import annotations

import logging
import math
import socket
from collections.abc import Callable, Mapping, Sequence
from pathlib import PurePosixPath
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from handlers.metrics import METRIC_SPECS, DefenseMetrics, MetricSpec
from plugins.base import Budget
from plugins.ood import DEFAULT_OOD_THRESHOLD

logger = logging.getLogger(__name__)
LAB_VERSION = "lab"

# TorchServe 0.12's fixed histogram buckets (the Java simpleclient defaults), repeated so both match.
TORCHSERVE_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, math.inf,
)
HOSTNAME_LABEL = "Hostname"


class PrometheusClientSink:
    """A :class:`handlers.metrics.MetricSink` over a prometheus-client registry."""

    def __init__(self, registry: CollectorRegistry | None = None, hostname: str | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.hostname = hostname or socket.gethostname()
        self._metrics: dict[str, Any] = {n: self._make(s) for n, s in METRIC_SPECS.items()}

    def _make(self, spec: MetricSpec) -> Any:
        labels = list(spec.labels) + [HOSTNAME_LABEL]
        if spec.kind == "counter":
            # prometheus-client strips a trailing _total and writes it back on exposition: same name out.
            return Counter(spec.name, spec.help, labels, registry=self.registry)
        if spec.kind == "gauge":
            return Gauge(spec.name, spec.help, labels, registry=self.registry)
        if spec.kind == "histogram":
            return Histogram(spec.name, spec.help, labels, registry=self.registry, buckets=TORCHSERVE_BUCKETS)
        raise ValueError(f"metric {spec.name}: unknown kind {spec.kind!r}")

    def _child(self, name: str, labels: Sequence[str]) -> Any:
        return self._metrics[name].labels(*labels, self.hostname)

    def inc(self, name: str, value: float, labels: Sequence[str]) -> None:
        self._child(name, labels).inc(value)

    def set(self, name: str, value: float, labels: Sequence[str]) -> None:
        self._child(name, labels).set(value)

    def observe_many(self, name: str, values: Sequence[float], labels: Sequence[str]) -> None:
        child = self._child(name, labels)
        for v in values:
            child.observe(v)


class MetricsExporter:
    """An HTTP /metrics endpoint on ``addr:port`` serving StealGuard's metrics from this process."""

    def __init__(self, port: int, addr: str = "127.0.0.1", registry: CollectorRegistry | None = None) -> None:
        if not 0 <= int(port) <= 65535:
            raise ValueError(f"metrics port: must be in 0..65535 (0 = any free port); got {port}")
        self.sink = PrometheusClientSink(registry)
        self.addr = addr
        self._server, self._thread = start_http_server(int(port), addr=addr, registry=self.sink.registry)
        self.port = int(self._server.server_port)

    @property
    def url(self) -> str:
        return f"http://{self.addr}:{self.port}/metrics"

    def defense_metrics(
        self,
        model_name: str,
        defense_name: str,
        defense_version: str | int | None,
        budget: Budget | None = None,
        extra_norm: str | None = None,
        ood_threshold: float = DEFAULT_OOD_THRESHOLD,
    ) -> DefenseMetrics:
        """A :class:`DefenseMetrics` recording into this exporter; its ``stealguard_defense_info`` is set.
        ``ood_threshold``: rows with ``1 - max_k y_k`` above it count in ``stealguard_ood_queries_total``."""
        m = DefenseMetrics(self.sink, model_name, defense_name, defense_version, budget, extra_norm, ood_threshold)
        m.record_info()
        return m

    def close(self) -> None:
        """Stop serving (idempotent)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = None

    def __enter__(self) -> MetricsExporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def budget_of(defense_config: Mapping[str, Any]) -> Budget | None:
    """The budget a defense config declares, without building the defense (no surrogate needed).

    Every registered defense derives ``budget`` from its validated config alone; a defense whose ``budget``
    needs more than its config gets None (no violation count, ``budget="none"``) and a warning.
    """
    from plugins import defense_class, validate_config

    conf = validate_config(defense_config)
    cls = defense_class(conf.name)
    bare = cls.__new__(cls)
    bare.config = conf
    try:
        return bare.budget
    except Exception as exc:  # a budget computed from resources the defense is built with
        logger.warning("defense %r: budget not known from its config alone (%s); not checked", conf.name, exc)
        return None


def victim_label(victim: str) -> str:
    """A short model_name for a victim given as an export directory or an MLflow model URI."""
    text = str(victim).rstrip("/")
    if text.startswith(("models:/", "runs:/")):
        return text.split(":/", 1)[1].strip("/") or text
    return PurePosixPath(text).name or text or "victim"


def evaluation_observer(port: int, cfg: Any, addr: str = "127.0.0.1") -> Callable[[str, dict], None]:
    """Start an exporter on ``addr:port`` and return an ``evaluate`` observer that records every
    ``defense_batch`` payload (``probs``, ``perturbed``, ``angular_deviation``, ``latency_s``).

    ``cfg`` is the evaluation's config (``victim`` and ``defense`` are used). The observer's ``exporter``
    attribute is the :class:`MetricsExporter` (its ``port``/``url``/``close``).
    """
    defense_config = dict(cfg.defense)
    budget = budget_of(defense_config)
    exporter = MetricsExporter(port, addr=addr)
    metrics = exporter.defense_metrics(
        model_name=victim_label(cfg.victim),
        defense_name=str(defense_config["name"]),
        defense_version=LAB_VERSION,
        budget=budget,
        extra_norm=budget.norm if budget is not None else None,
    )
    logger.info("StealGuard metrics of this evaluation: %s", exporter.url)

    def observe(stage: str, payload: dict) -> None:
        if stage == "defense_batch":
            deviation, latency = payload.get("angular_deviation"), payload.get("latency_s")
            metrics.record_batch(payload["probs"], payload["perturbed"], deviation, latency)

    observe.exporter = exporter  # type: ignore[attr-defined]
    observe.metrics = metrics  # type: ignore[attr-defined]
    return observe
