"""The handler's glue for the per-client extraction monitor (plugins/monitor) and its actions.

``ClientMonitor.from_config(cfg, model, metrics, model_name)`` is None when the archive has no ``monitor:``
section. Per batch the handler asks ``client_id(context, idx)`` for each request (the configured header through
TorchServe's request context, case-insensitive; absent or empty -> ``anonymous``) and then ``screen(...)``:

- the monitor updates each client's state in the store and says which rows belong to flagged clients;
- ``observe``: nothing changes for the client (metrics and the worker log only);
  ``harden``: a flagged client's rows are answered by the configured stronger defense (applied to the victim's
  probabilities, checked like the main defense); ``block``: its requests get 429 with a message;
- a store failure (lost, timed out, anything raised) never blocks or leaks an answer: the batch is served with
  its normal defense, ``stealguard_monitor_errors_total`` increments, and the store is not asked again for
  ``RETRY_AFTER_S`` (those batches count as errors too), so a dead store costs no time per request.

Watermark (``monitor.watermark.enabled``, plugins/monitor/watermark.py): after the action, the keyed rows of
every client get their deterministic wrong top-1 and are recorded in the store (bounded); a recording failure is
a monitor error like any other. The key's fingerprint is logged, never the key.

Metrics (no per-client label): ``stealguard_client_flags_total{reason}`` per newly flagged client,
``stealguard_clients_flagged`` (the store's live flagged count, refreshed at most every ``GAUGE_EVERY_S``),
``stealguard_monitor_errors_total``. Flagged client ids go to the worker log (WARNING) and stay in the store,
where ``python -m mlflow_project.ops.monitor_clients --store URL`` lists them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from handlers.errors import ConfigError
from handlers.metrics import CLIENT_FLAGS, CLIENTS_FLAGGED, MONITOR_ERRORS, DefenseMetrics, label_value
from handlers.monitor_stores import open_store
from plugins import Defense, build_defense, check_probs, distance
from plugins.monitor import ExtractionMonitor, MonitorConfig, MonitorStore, StoreLimits, parse_monitor
from plugins.monitor.watermark import Watermark, fingerprint, load_key

log = logging.getLogger(__name__)

ANONYMOUS = "anonymous"
MAX_CLIENT_ID = 256
RETRY_AFTER_S = 1.0
GAUGE_EVERY_S = 10.0
BLOCK_MESSAGE = "too many requests from this client; contact the service operator"


def limits(cfg: MonitorConfig) -> StoreLimits:
    return StoreLimits(
        max_per_class=cfg.prada.max_per_class,
        ttl_seconds=cfg.ttl_seconds,
        max_clients=cfg.max_clients,
        max_records=cfg.watermark.max_records,
    )


def open_monitor_store(cfg: MonitorConfig, namespace: str) -> MonitorStore:
    return open_store(cfg.store, cfg.namespace or namespace, limits(cfg), cfg.timeout_ms)


@dataclass
class Screened:
    probs: torch.Tensor  # B x K answers after the action (harden applied)
    blocked: np.ndarray  # (B,) bool rows whose request is refused with 429
    flagged: np.ndarray  # (B,) bool rows of flagged clients (under any action)


class ClientMonitor:
    def __init__(
        self,
        cfg: MonitorConfig,
        store: MonitorStore,
        harden: Defense | None,
        metrics: DefenseMetrics | None = None,
        watermark: Watermark | None = None,
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.monitor = ExtractionMonitor(cfg, store)
        self.harden = harden
        self.metrics = metrics
        self.watermark = watermark
        self.errors = 0
        self._skip_until = 0.0
        self._gauge_at = 0.0

    @classmethod
    def from_config(cls, section: Any, model: Any, metrics: DefenseMetrics | None, model_name: str):
        """None without a ``monitor:`` section; else the monitor over its store, with the harden defense built
        with the model's resources (num_classes, its surrogate when the harden defense needs one)."""
        if section is None:
            return None
        try:
            cfg = parse_monitor(section, "stealguard.monitor")
            cfg.ood.check_classes(model.num_classes, "stealguard.monitor")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        harden = None
        if cfg.action == "harden":
            resources: dict[str, Any] = {"num_classes": model.num_classes}
            if getattr(model, "surrogate", None) is not None:
                jacobian = cfg.harden.get("jacobian", "last_layer")
                resources["surrogate"] = model.surrogate.as_surrogate(model.num_classes, jacobian)
            try:
                harden = build_defense(cfg.harden, **resources)
            except ValueError as exc:
                raise ConfigError(f"stealguard.monitor.harden: {exc}") from exc
        watermark = None
        if cfg.watermark.enabled:
            try:
                key = load_key(cfg.watermark, "stealguard.monitor.watermark")
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
            watermark = Watermark(key, cfg.watermark.fraction)
            log.info(
                "StealGuard monitor: DAWN watermark on %.3g%% of queries, key fingerprint %s",
                100 * cfg.watermark.fraction, fingerprint(key),
            )
        try:
            store = open_monitor_store(cfg, model_name)
        except Exception as exc:
            raise ConfigError(f"stealguard.monitor.store: cannot open {cfg.store!r}: {exc}") from exc
        log.info(
            "StealGuard monitor: action %s%s, client header %r, store %s (PRADA delta %g)",
            cfg.action,
            f" -> {harden.name}" if harden is not None else "",
            cfg.header,
            store.url.split("@")[-1],  # no credentials from a redis://user:pass@host URL
            cfg.prada.delta,
        )
        return cls(cfg, store, harden, metrics, watermark)

    def client_id(self, context: Any, idx: int) -> str:
        """The request's client id from the configured header; ``anonymous`` when absent or empty."""
        value = None
        try:
            value = context.get_request_header(idx, self.cfg.header)
            if value is None:
                want = self.cfg.header.lower()
                for key, v in (context.get_all_request_header(idx) or {}).items():
                    if isinstance(key, str) and key.lower() == want:
                        value = v
                        break
        except (TypeError, IndexError, AttributeError, KeyError):
            value = None
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        if not isinstance(value, str) or not value.strip():
            return ANONYMOUS
        return value.strip()[:MAX_CLIENT_ID]

    def screen(self, clients: list[str], x: torch.Tensor, y: torch.Tensor, probs: torch.Tensor) -> Screened:
        """Run the monitor on one defended batch (``y``: victim probabilities, ``probs``: the defense's answers),
        apply the configured action, then the watermark. Never raises because of the store."""
        now = time.time()
        none = np.zeros(len(clients), dtype=bool)
        verdict = self._observe(clients, x, y, now)
        flagged = none if verdict is None else verdict.flagged_rows
        out, blocked = probs, none
        if flagged.any() and self.cfg.action == "block":
            blocked = flagged
        elif flagged.any() and self.cfg.action == "harden":
            out = probs.clone()
            rows = torch.from_numpy(np.flatnonzero(flagged))
            out[rows] = self._harden(y[rows], x[rows]).to(out.dtype)
        if self.watermark is not None:
            out = self._watermark(x, y, out, blocked, now)
        return Screened(out, blocked, flagged)

    def _observe(self, clients, x, y, now):
        if now < self._skip_until:
            self._error(None)
            return None
        try:
            verdict = self.monitor.observe(clients, x, y, now)
        except Exception as exc:
            self._skip_until = now + RETRY_AFTER_S
            self._error(exc)
            return None
        for client, reason in verdict.newly_flagged:
            w = verdict.statistics.get(client)
            log.warning(
                "StealGuard monitor: client %r flagged for %s (PRADA W=%s); action %s",
                client, reason, "n/a" if w is None else f"{w:.4f}", self.cfg.action,
            )
            self._inc(CLIENT_FLAGS, 1, (label_value(reason),))
        if verdict.newly_flagged or now >= self._gauge_at:
            self._refresh_gauge(now)
        return verdict

    def _watermark(self, x, y, probs, blocked, now) -> torch.Tensor:
        """DAWN: the keyed rows get their wrong top-1; the answered (not blocked) ones are recorded."""
        out, records, rows = self.watermark.apply(x, y, probs, now)
        records = [r for r, i in zip(records, rows, strict=True) if not blocked[i]]
        if records and now >= self._skip_until:
            try:
                self.store.record_watermarks(records)
            except Exception as exc:
                self._skip_until = now + RETRY_AFTER_S
                self._error(exc)
        return out

    def _harden(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The harden defense's answer, checked like the main defense's (on the simplex, within its budget);
        raises if it is not (the handler then refuses the rows: fail closed)."""
        hardened = check_probs(self.harden(y, x).probs)
        budget = self.harden.budget
        if budget is not None and budget.space == "probs":
            worst = float(distance(y, hardened.to(y.dtype), budget.norm).max())
            if worst > budget.epsilon + 1e-5:
                raise RuntimeError(f"harden defense '{self.harden.name}' exceeded its budget ({worst:.4g})")
        return hardened

    def _refresh_gauge(self, now: float) -> None:
        self._gauge_at = now + GAUGE_EVERY_S
        try:
            n = self.store.count_flagged(now)
        except Exception as exc:
            self._error(exc)
            return
        if self.metrics is not None and self.metrics.sink is not None:
            try:
                self.metrics.sink.set(CLIENTS_FLAGGED, n, self.metrics.labels)
            except Exception:
                log.exception("StealGuard monitor: setting %s failed", CLIENTS_FLAGGED)

    def _error(self, exc: BaseException | None) -> None:
        self.errors += 1
        if exc is not None:
            log.warning(
                "StealGuard monitor: store %s failed (%s: %s); serving with the defense, monitor paused %g s",
                self.store.url.split("@")[-1], type(exc).__name__, exc, RETRY_AFTER_S,
            )
        self._inc(MONITOR_ERRORS, 1, ())

    def _inc(self, name: str, value: float, extra: tuple[str, ...]) -> None:
        if self.metrics is None or self.metrics.sink is None:
            return
        try:
            self.metrics.sink.inc(name, value, self.metrics.labels + extra)
        except Exception:
            log.exception("StealGuard monitor: recording %s failed", name)

    def close(self) -> None:
        try:
            self.store.close()
        except Exception:  # noqa: S110 - closing a lost connection
            pass
