"""StealGuard's defense metrics, emitted through TorchServe's own metrics API (``context.metrics``).

One batch is measured once (the emitted measures of ``plugins.measures``, over the B x K batch in NumPy) and
turned into counter increments (one per counter per batch) and histogram observations (one per row).
TorchServe's metrics API writes one ``[METRICS]`` line to the worker's stdout per value
(``CachingMetric.add_or_update``), which the frontend reads line by line and turns into one counter increment
or one ``Histogram.observe``. Going through that API costs a ``logging`` record per value (~30-60 us each, 20-40
per batch); :class:`TorchServeSink` instead writes the
same lines, in TorchServe's documented format, as one multi-line record per batch (the worker logs
``%(message)s`` to stdout, so the frontend sees exactly the same lines). The metric objects, names, units and
dimension names still come from TorchServe's metrics cache (``deploy/metrics.yaml``).

Every metric is declared in ``deploy/metrics.yaml`` (TorchServe 0.12 silently drops undeclared custom
metrics); :data:`METRIC_SPECS` is the single source of truth and a unit test keeps the yaml equal to it.
The same names are exported outside TorchServe by ``mlflow_project/ops/metrics_exporter.py`` (prometheus-client),
through the :class:`MetricSink` interface below.

Units (TorchServe's histogram buckets are fixed at 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1,
2.5, 5, 7.5, 10, +Inf): perturbation distances are in their natural units (l1 in [0, 2], l2 in [0, sqrt 2],
linf in [0, 1], KL in nats), the top-1 confidence drop is a probability in [0, 1] (negative drops, where the
defense raised the top class, are observed as 0), the angular deviation is in radians [0, pi] and the
defense latency is in seconds per batch; all of them land inside the fixed buckets without rescaling. The
per-stage and handler latencies are in **milliseconds** per batch: a stage takes 0.01 to a few ms, which in
seconds would all fall in the first bucket (0.005 s); in milliseconds the buckets span 5 us to 10 ms.

Never imports mlflow; imports ``ts`` only when a TorchServe metrics cache is wrapped.
"""

from __future__ import annotations

import logging
import math
import re
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from plugins.base import BUDGET_TOLERANCE, Budget
from plugins.measures import distance
from plugins.ood import DEFAULT_OOD_THRESHOLD, check_threshold

logger = logging.getLogger(__name__)

PREFIX = "stealguard_"
PERTURBATION_NORMS = ("l1", "l2", "linf", "kl")
BASE_LABELS = ("model_name", "defense", "defense_version")


@dataclass(frozen=True)
class MetricSpec:
    """One exported metric: its exact Prometheus name, type, TorchServe unit, label names and help text."""

    name: str
    kind: str  # "counter" | "gauge" | "histogram"
    unit: str
    labels: tuple[str, ...]
    help: str


def _spec(name: str, kind: str, unit: str, help_: str, extra: tuple[str, ...] = ()) -> MetricSpec:
    return MetricSpec(PREFIX + name, kind, unit, BASE_LABELS + extra, help_)


METRIC_SPECS: dict[str, MetricSpec] = {
    s.name: s
    for s in (
        _spec("rows_total", "counter", "Count", "Rows answered with a defense."),
        *(
            _spec(
                f"perturbation_{n}",
                "histogram",
                "Nats" if n == "kl" else "Distance",
                f"Per-row {n} distance between the victim's and the returned probabilities"
                + (" (KL(y || y~), nats)." if n == "kl" else "."),
            )
            for n in PERTURBATION_NORMS
        ),
        _spec(
            "top1_flips_total", "counter", "Count", "Rows whose returned top-1 class is not the victim's."
        ),
        _spec(
            "top1_confidence_drop",
            "histogram",
            "Probability",
            "Per-row drop of the victim's top-class probability (y[c] - y~[c], observed as 0 when negative).",
        ),
        _spec(
            "angular_deviation_radians",
            "histogram",
            "Radians",
            "Per-row angular deviation achieved by a MAD-family defense, in radians.",
        ),
        _spec(
            "defense_latency_seconds", "histogram", "Seconds", "Wall time of the defense per batch (seconds)."
        ),
        _spec(
            "stage_latency_milliseconds",
            "histogram",
            "Milliseconds",
            "Wall time of one stage of the handler per batch, in milliseconds: decode, victim, surrogate, defense, "
            "encode, metrics (see docs/operations.md, Where the time goes).",
            ("stage",),
        ),
        _spec(
            "handler_latency_milliseconds",
            "histogram",
            "Milliseconds",
            "Wall time of the handler per batch, in milliseconds, up to writing its metrics: the stages plus glue.",
        ),
        _spec(
            "budget_violations_total",
            "counter",
            "Count",
            f"Rows whose distance exceeds the declared probs-space budget epsilon + {BUDGET_TOLERANCE:g}.",
        ),
        _spec("errors_total", "counter", "Count", "Requests refused, by reason.", ("reason",)),
        _spec(
            "error_rows_total",
            "counter",
            "Count",
            "Rows of the refused requests, by reason (a refused request of n instances counts n).",
            ("reason",),
        ),
        _spec(
            "ood_queries_total",
            "counter",
            "Count",
            "Rows that look out-of-distribution: 1 - the victim's top probability above the threshold "
            f"(default {DEFAULT_OOD_THRESHOLD:g}; plugins.ood).",
        ),
        _spec("clients_flagged", "gauge", "Count", "Clients the extraction monitor currently flags (store-wide)."),
        _spec(
            "client_flags_total",
            "counter",
            "Count",
            "Clients newly flagged by the extraction monitor, by reason (prada, ood_share).",
            ("reason",),
        ),
        _spec(
            "monitor_errors_total",
            "counter",
            "Count",
            "Batches the extraction monitor could not check (store lost or timed out); they were served defended.",
        ),
        _spec(
            "defense_info",
            "gauge",
            "Info",
            "1 per loaded defense; labels name it, its version, budget and the fingerprint of its secret.",
            ("budget", "secret_fingerprint"),
        ),
    )
}

ROWS = PREFIX + "rows_total"
FLIPS = PREFIX + "top1_flips_total"
CONFIDENCE_DROP = PREFIX + "top1_confidence_drop"
ANGULAR = PREFIX + "angular_deviation_radians"
LATENCY = PREFIX + "defense_latency_seconds"
VIOLATIONS = PREFIX + "budget_violations_total"
STAGE_LATENCY = PREFIX + "stage_latency_milliseconds"
HANDLER_LATENCY = PREFIX + "handler_latency_milliseconds"
STAGES = ("decode", "victim", "surrogate", "defense", "monitor", "encode", "metrics")
ERRORS = PREFIX + "errors_total"
ERROR_ROWS = PREFIX + "error_rows_total"
OOD_QUERIES = PREFIX + "ood_queries_total"
INFO = PREFIX + "defense_info"
CLIENTS_FLAGGED = PREFIX + "clients_flagged"
CLIENT_FLAGS = PREFIX + "client_flags_total"
MONITOR_ERRORS = PREFIX + "monitor_errors_total"


def perturbation_metric(norm: str) -> str:
    """The histogram name for a perturbation norm (l1, l2, linf, kl)."""
    if norm not in PERTURBATION_NORMS:
        raise ValueError(f"extra_norm: unknown {norm!r}; allowed: {', '.join(PERTURBATION_NORMS)}")
    return f"{PREFIX}perturbation_{norm}"


_UNSAFE = re.compile(r"[,:|#\s]+")


def label_value(value: Any) -> str:
    """A label value TorchServe's metric log line can carry: no ',', ':', '|', '#' or whitespace."""
    text = _UNSAFE.sub("_", str(value)).strip("_")
    return text or "none"


def budget_label(budget: Budget | None) -> str:
    """``l1<=0.5`` for a probs-space budget, ``logits_l2<=0.1`` for a logits-space one, ``none`` without."""
    if budget is None:
        return "none"
    text = f"{budget.norm}<={budget.epsilon:g}"
    return text if budget.space == "probs" else f"logits_{text}"


@dataclass
class BatchObservations:
    """What one defended batch contributes: counter increments and per-row histogram values (finite only)."""

    rows: int
    counters: dict[str, float] = field(default_factory=dict)
    histograms: dict[str, list[float]] = field(default_factory=dict)
    dropped_nonfinite: int = 0


def _finite_list(values: np.ndarray) -> tuple[list[float], int]:
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    ok = np.isfinite(values)
    dropped = int(values.size - np.count_nonzero(ok))
    return (values[ok] if dropped else values).tolist(), dropped


def _numpy64(t: Any) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        t = t.detach().cpu().numpy()
    return np.asarray(t, dtype=np.float64)


def _row_distance(y: np.ndarray, y_tilde: np.ndarray, norm: str) -> np.ndarray:
    """``plugins.measures.distance`` per row, in NumPy for l1/l2/linf (a B x K batch costs a few us instead of
    a torch dispatch per operation); KL goes through plugins.measures."""
    if norm == "kl":
        return distance(torch.from_numpy(y), torch.from_numpy(y_tilde), "kl").numpy()
    diff = np.abs(y_tilde - y)
    if norm == "l1":
        return diff.sum(axis=1)
    if norm == "l2":
        return np.sqrt(np.square(diff).sum(axis=1))
    if norm == "linf":
        return diff.max(axis=1)
    raise ValueError(f"norm: unknown {norm!r}; allowed: {', '.join(PERTURBATION_NORMS)}")


def observe_batch(
    y: torch.Tensor,
    y_tilde: torch.Tensor,
    angular_deviation: torch.Tensor | None,
    latency_s: float | None,
    budget: Budget | None = None,
    extra_norm: str | None = None,
    ood_threshold: float = DEFAULT_OOD_THRESHOLD,
) -> BatchObservations:
    """Measure one defended batch into counters and histogram observations: the per-row measures of
    :func:`plugins.measures.measures` that are emitted (l1 and ``extra_norm``, top-1 flips, top-1 confidence
    drop), computed once per batch in float64 NumPy (only those: the server does not pay for KL unless it is
    the budget norm).

    ``stealguard_ood_queries_total`` counts the rows whose OOD score ``1 - max_k y_k`` (of the victim's
    probabilities ``y``, :func:`plugins.ood.ood_score`) is above ``ood_threshold``.
    Non-finite values are never observed: they are dropped and counted in ``dropped_nonfinite``.
    """
    y = _numpy64(y)
    y_tilde = _numpy64(y_tilde)
    if y.ndim == 1:
        y, y_tilde = y.reshape(1, -1), y_tilde.reshape(1, -1)
    if y.shape != y_tilde.shape or y.ndim != 2:
        raise ValueError(f"observe_batch needs two B x K batches of one shape; got {y.shape} and {y_tilde.shape}")
    rows = int(y.shape[0])
    obs = BatchObservations(rows=rows)
    obs.counters[ROWS] = float(rows)
    index = np.arange(rows)
    top = y.argmax(axis=1)  # the first maximum, as torch.argmax (plugins.measures)
    finite_rows = np.isfinite(y).all(axis=1) & np.isfinite(y_tilde).all(axis=1)
    obs.counters[FLIPS] = float(np.count_nonzero((y_tilde.argmax(axis=1) != top) & finite_rows))
    norms = ["l1"]
    if extra_norm is not None and extra_norm != "l1":
        perturbation_metric(extra_norm)  # validates
        norms.append(extra_norm)
    dist = {n: _row_distance(y, y_tilde, n) for n in norms}
    violations = 0.0
    if budget is not None and budget.space == "probs":
        d = dist[budget.norm] if budget.norm in dist else _row_distance(y, y_tilde, budget.norm)
        violations = float(np.count_nonzero(d > budget.epsilon + BUDGET_TOLERANCE))
    obs.counters[VIOLATIONS] = violations
    score = 1.0 - y.max(axis=1)  # plugins.ood.ood_score
    obs.counters[OOD_QUERIES] = float(np.count_nonzero(np.isfinite(score) & (score > ood_threshold)))

    dropped = 0
    for n in norms:
        obs.histograms[perturbation_metric(n)], d = _finite_list(dist[n])
        dropped += d
    drop = y[index, top] - y_tilde[index, top]
    obs.histograms[CONFIDENCE_DROP], d = _finite_list(np.where(drop < 0, 0.0, drop))  # NaN stays NaN
    dropped += d
    if angular_deviation is not None:
        obs.histograms[ANGULAR], d = _finite_list(_numpy64(angular_deviation))
        dropped += d
    if latency_s is not None:
        lat = float(latency_s)
        if math.isfinite(lat) and lat >= 0:
            obs.histograms[LATENCY] = [lat]
        else:
            dropped += 1
    obs.dropped_nonfinite = dropped
    return obs


class MetricSink(Protocol):
    """Where metric updates go: TorchServe's metrics cache or a prometheus-client registry."""

    def inc(self, name: str, value: float, labels: Sequence[str]) -> None: ...

    def set(self, name: str, value: float, labels: Sequence[str]) -> None: ...

    def observe_many(self, name: str, values: Sequence[float], labels: Sequence[str]) -> None: ...


class TorchServeSink:
    """Emits through ``context.metrics`` (a ``ts.metrics.metric_cache_yaml_impl.MetricsCacheYamlImpl``).

    Metrics are looked up with ``get_metric``; a metric missing from the yaml the server runs with is added to
    the worker's cache with a loud warning (the frontend will drop it: run with deploy/metrics.yaml). A metric
    declared with other label names than :data:`METRIC_SPECS` is a packaging error and raises here.
    """

    def __init__(self, cache: Any, specs: dict[str, MetricSpec] = METRIC_SPECS) -> None:
        from ts.metrics.metric_type_enum import MetricTypes

        self._metrics: dict[str, Any] = {}
        for spec in specs.values():
            mtype = MetricTypes(spec.kind)
            try:
                metric = cache.get_metric(spec.name, mtype)
            except Exception:  # MetricsCacheKeyError: not declared in the metrics yaml
                logger.warning(
                    "metric %s (%s) is not declared in the TorchServe metrics yaml; TorchServe drops"
                    " undeclared metrics: start TorchServe with metrics_config=deploy/metrics.yaml",
                    spec.name,
                    spec.kind,
                )
                metric = cache.add_metric_to_cache(spec.name, spec.unit, list(spec.labels), mtype)
            declared = tuple(metric.dimension_names or ())
            if declared != spec.labels:
                raise ValueError(
                    f"metric {spec.name} is declared with dimensions {list(declared)} in the metrics yaml;"
                    f" StealGuard emits {list(spec.labels)} (see deploy/metrics.yaml)"
                )
            self._metrics[spec.name] = metric
        self._parts: dict[tuple[str, tuple[str, ...]], tuple[str, str]] = {}
        self._hostname = socket.gethostname()
        self._log = logging.getLogger("ts.metrics.caching_metric")  # the logger TorchServe's own metric lines use

    def inc(self, name: str, value: float, labels: Sequence[str]) -> None:
        self.emit_batch([(name, (value,), labels)])

    def set(self, name: str, value: float, labels: Sequence[str]) -> None:
        self.emit_batch([(name, (value,), labels)])

    def observe_many(self, name: str, values: Sequence[float], labels: Sequence[str]) -> None:
        """One histogram observation per value (one ``[METRICS]`` line each)."""
        self.emit_batch([(name, values, labels)])

    def emit_batch(self, updates: Sequence[tuple[str, Sequence[float], Sequence[str]]]) -> None:
        """Write every ``(metric name, values, label values)`` update as TorchServe ``[METRICS]`` lines, all in
        one log record: ``[METRICS]<name>.<unit>:<value>|#<dim>:<v>,...|#type:<TYPE>|#hostname:<host>,<ts>``
        (the format ``CachingMetric.emit_metrics`` writes). Label values are checked against the declared
        dimensions once per (metric, labels) and the prefix and suffix of the line are cached."""
        stamp = f"|#hostname:{self._hostname},{int(time.time())}"
        lines = []
        for name, values, labels in updates:
            head, tail = self._line_parts(name, tuple(labels))
            lines.extend(f"{head}{v}{tail}{stamp}" for v in values)
        if lines:
            self._log.info("\n".join(lines))

    def _line_parts(self, name: str, labels: tuple[str, ...]) -> tuple[str, str]:
        """``[METRICS]<name>.<unit>:`` and ``|#<dims>|#type:<TYPE>`` for a metric and label values (cached)."""
        parts = self._parts.get((name, labels))
        if parts is None:
            metric = self._metrics[name]
            dims = tuple(metric.dimension_names or ())
            if len(labels) != len(dims):
                raise ValueError(f"metric {name}: label values {list(labels)} do not match dimensions {list(dims)}")
            dim_str = ",".join(f"{d}:{v}" for d, v in zip(dims, labels, strict=True))
            parts = (f"[METRICS]{metric.metric_name}.{metric.unit}:", f"|#{dim_str}|#type:{metric.metric_type.name}")
            if len(self._parts) < 4096:  # label sets are few: model, defense, version, reason
                self._parts[(name, labels)] = parts
        return parts


class DefenseMetrics:
    """The handler's metric emitter. ``metrics``: ``context.metrics`` (TorchServe), a :class:`MetricSink`,
    or None (no metrics: every call is a no-op, e.g. a handler run outside TorchServe)."""

    def __init__(
        self,
        metrics: Any,
        model_name: str,
        defense_name: str,
        defense_version: str | int | None,
        budget: Budget | None = None,
        extra_norm: str | None = None,
        ood_threshold: float = DEFAULT_OOD_THRESHOLD,
        secret_fingerprint: str | None = None,
    ) -> None:
        self.secret_fingerprint = label_value(secret_fingerprint or "none")
        self.ood_threshold = check_threshold(ood_threshold)
        if extra_norm is None and budget is not None:
            extra_norm = budget.norm
        if extra_norm is not None:
            perturbation_metric(extra_norm)
        self.budget = budget
        self.extra_norm = extra_norm
        self.labels = (
            label_value(model_name),
            label_value(defense_name),
            label_value(defense_version if defense_version is not None else "unversioned"),
        )
        self.budget_label = label_value(budget_label(budget))
        self._stage_labels = {stage: self.labels + (stage,) for stage in STAGES}
        if metrics is None:
            self.sink: MetricSink | None = None
        elif all(hasattr(metrics, a) for a in ("inc", "set", "observe_many")):
            self.sink = metrics
        else:
            self.sink = TorchServeSink(metrics)

    def record_info(self) -> None:
        """Set ``stealguard_defense_info`` to 1 (call once when the worker has loaded its defense)."""
        if self.sink is not None:
            self.sink.set(INFO, 1, self.labels + (self.budget_label, self.secret_fingerprint))

    def record_batch(
        self,
        y: torch.Tensor,
        y_tilde: torch.Tensor,
        angular_deviation: torch.Tensor | None,
        latency_s: float | None,
        stages_s: dict[str, float] | None = None,
        handler_s: float | None = None,
        since: float | None = None,
    ) -> BatchObservations | None:
        """Record one successfully defended batch; never raises (a metrics fault must not fail a request).

        ``stages_s`` (seconds per stage of :data:`STAGES`) and ``handler_s`` (the handler's time up to
        ``since``, a ``time.perf_counter()`` reading; now when omitted) go out in the same record as
        milliseconds; the time from ``since`` until this call has measured the batch is added as stage
        ``metrics`` and to the handler's total."""
        if self.sink is None:
            return None
        try:
            start = time.perf_counter() if since is None else since
            obs = observe_batch(
                y, y_tilde, angular_deviation, latency_s, self.budget, self.extra_norm, self.ood_threshold
            )
            updates = [(name, (value,), self.labels) for name, value in obs.counters.items()]
            updates += [(name, values, self.labels) for name, values in obs.histograms.items() if values]
            if stages_s is not None and handler_s is not None:
                measured = time.perf_counter() - start
                stages = {**stages_s, "metrics": measured}
                updates += [
                    (STAGE_LATENCY, (1000.0 * max(0.0, t),), self._stage_labels[stage]) for stage, t in stages.items()
                ]
                updates.append((HANDLER_LATENCY, (1000.0 * (handler_s + measured),), self.labels))
            if obs.dropped_nonfinite:
                logger.warning("dropped %d non-finite metric values", obs.dropped_nonfinite)
                labels = self.labels + ("nonfinite_measure",)
                updates += [(name, (obs.dropped_nonfinite,), labels) for name in (ERRORS, ERROR_ROWS)]
            emit_batch = getattr(self.sink, "emit_batch", None)
            if emit_batch is not None:  # TorchServe: every line of the batch in one log record
                emit_batch(updates)
                return obs
            for name, values, labels in updates:
                if METRIC_SPECS[name].kind == "histogram":
                    self.sink.observe_many(name, values, labels)
                else:
                    self.sink.inc(name, values[0], labels)
            return obs
        except Exception:
            logger.exception("StealGuard metrics: recording a batch failed")
            return None

    def record_error(self, reason: str, requests: int = 1, rows: int = 1) -> None:
        """Count ``requests`` refused requests carrying ``rows`` rows under ``reason`` (e.g. bad_input,
        defense_failed): stealguard_errors_total counts the requests, stealguard_error_rows_total the rows."""
        if self.sink is None:
            return
        try:
            labels = self.labels + (label_value(reason),)
            for name, n in ((ERRORS, int(requests)), (ERROR_ROWS, int(rows))):
                if n > 0:
                    self.sink.inc(name, n, labels)
        except Exception:
            logger.exception("StealGuard metrics: recording an error failed")
