"""The monitor's store interface: what every backend (embedded SQLite, Redis, in-process memory) must do.

The monitor keeps, per client, a small *summary* (counters, PRADA's recent distance window, per-class
thresholds and growing-set statistics, the flag; stored as :func:`encode_summary` says) and, per (client,
predicted class), the *growing set*: the client's earlier queries PRADA compares new ones with, as float32 rows.
A backend stores them so that several worker processes (and replicas, for a shared backend) can update one
client atomically:

    store.update(client, classes, fn, now)

loads the client's summary and the growing sets of ``classes`` (a summary last seen more than ``ttl_seconds``
before ``now`` counts as absent: its state and flag are forgotten), calls ``fn(summary, growing)`` which returns
``(new_summary, appended, result)``, persists the new summary and appends ``appended[c]`` (n x D float32) to the
growing sets, and returns ``result``; all of it atomically for that client (a lock, a transaction, or an
optimistic check that retries ``fn`` on fresh state when another worker wrote the client first: ``fn`` must
depend on its arguments only). A ``new_summary`` of None writes nothing (a read-only look).
``store.update_many([(client, classes, fn), ...], now)`` does the same for every client of a batch at once (one
SQLite transaction; for Redis one pipelined read and one scripted write) and returns the results in order.

Summary format (this module owns it): JSON whose distance window ``D`` is packed as base64 of little-endian
float64 bytes, with ``"v": 2``. Format 1 (the first release: ``D`` a JSON list of floats, no ``"v"``) still
loads; any other format is refused with a :class:`StoreError` naming it.

Bounds (documented in docs/configuration.md): a growing set keeps its newest ``max_per_class`` rows (FIFO
eviction), a client unseen for ``ttl_seconds`` expires, and when more than ``max_clients`` clients are live the
least recently seen ones are evicted. Watermark records (DAWN) are bounded to the newest ``max_records``.

A backend raises :class:`StoreError` (or the client library's own error) when it cannot answer; the caller
(the handler's glue) never lets that block or leak an answer.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

UpdateFn = Callable[[dict | None, dict[int, np.ndarray]], tuple[dict, dict[int, np.ndarray], Any]]
UpdateItem = tuple[str, Iterable[int], UpdateFn]
SUMMARY_FORMAT = 2
_WINDOW_DTYPE = np.dtype("<f8")


class StoreError(RuntimeError):
    """The monitor's store could not be read or written."""


@dataclass(frozen=True)
class StoreLimits:
    max_per_class: int = 50
    ttl_seconds: float = 86400.0
    max_clients: int = 10000
    max_records: int = 10000


@dataclass(frozen=True)
class WatermarkRecord:
    """One watermarked query: the row as the victim saw it (float32, row shape), the watermark's top-1 label,
    the answer served, when, and the victim's own top-1 (which the watermark label is not)."""

    query: np.ndarray
    label: int
    probs: np.ndarray
    at: float
    victim_label: int = -1

    def to_json(self) -> dict:
        return {
            "query": self.query.astype(np.float32).tobytes().hex(),
            "shape": list(self.query.shape),
            "label": int(self.label),
            "probs": [float(p) for p in self.probs],
            "at": float(self.at),
            "victim_label": int(self.victim_label),
        }

    @classmethod
    def from_json(cls, d: dict) -> WatermarkRecord:
        q = np.frombuffer(bytes.fromhex(d["query"]), dtype=np.float32).reshape(d["shape"])
        return cls(query=q, label=int(d["label"]), probs=np.asarray(d["probs"], dtype=np.float64), at=float(d["at"]),
                   victim_label=int(d.get("victim_label", -1)))


@dataclass(frozen=True)
class FlaggedClient:
    client: str
    reason: str
    flagged_at: float
    last_seen: float
    queries: int
    statistic: float | None  # PRADA's W when the flag is prada's


def vectors_to_bytes(rows: np.ndarray) -> list[bytes]:
    return [r.tobytes() for r in np.ascontiguousarray(rows, dtype=np.float32)]


def vectors_from_bytes(blobs: Sequence[bytes], dim: int | None = None) -> np.ndarray:
    if not blobs:
        return np.zeros((0, dim or 0), dtype=np.float32)
    return np.stack([np.frombuffer(b, dtype=np.float32) for b in blobs])


def encode_summary(summary: dict) -> str:
    """The stored form of a summary: JSON, with the distance window packed (see the module docstring)."""
    d = dict(summary)
    d["D"] = base64.b64encode(np.ascontiguousarray(summary["D"], dtype=_WINDOW_DTYPE).tobytes()).decode("ascii")
    d["v"] = SUMMARY_FORMAT
    return json.dumps(d, separators=(",", ":"))


def decode_summary(raw: str | bytes) -> dict:
    """A stored summary back (format 2, or format 1 with ``D`` as a JSON list); ``D`` as a float64 array."""
    try:
        d = json.loads(raw)
    except ValueError as exc:
        raise StoreError(f"store: a client summary is not JSON ({exc}); it was not written by StealGuard") from None
    version = d.pop("v", 1) if isinstance(d, dict) else None
    if version == SUMMARY_FORMAT and isinstance(d.get("D"), str):
        d["D"] = np.frombuffer(base64.b64decode(d["D"]), dtype=_WINDOW_DTYPE).astype(np.float64)
    elif version == 1 and isinstance(d.get("D"), list):
        d["D"] = np.asarray(d["D"], dtype=np.float64)
    else:
        raise StoreError(
            f"store: client summary format {version!r} is not readable by this StealGuard (it reads format 1, "
            f"a JSON distance list, and {SUMMARY_FORMAT}, packed float64); clear the store or use the version "
            "that wrote it"
        )
    return d


def flagged_from_summary(client: str, summary: dict) -> FlaggedClient:
    flag = summary["flag"]
    return FlaggedClient(
        client=client,
        reason=flag["reason"],
        flagged_at=float(flag["at"]),
        last_seen=float(summary["last_seen"]),
        queries=int(summary.get("n", 0)),
        statistic=flag.get("w"),
    )


class MonitorStore(ABC):
    """A backend for the per-client monitor and the watermark records. ``url`` names it in logs and the CLI."""

    url: str

    def __init__(self, namespace: str, limits: StoreLimits) -> None:
        self.namespace = namespace
        self.limits = limits

    def update(self, client: str, classes: Iterable[int], fn: UpdateFn, now: float | None = None) -> Any:
        """Atomically load, transform (``fn``) and persist one client's state; return ``fn``'s result."""
        return self.update_many([(client, classes, fn)], now)[0]

    @abstractmethod
    def update_many(self, items: Sequence[UpdateItem], now: float | None = None) -> list[Any]:
        """:meth:`update` for several distinct clients at once (one batch); the results in ``items``' order."""

    @abstractmethod
    def flagged(self, now: float | None = None) -> list[FlaggedClient]:
        """Every live flagged client, most recently flagged first."""

    @abstractmethod
    def count_flagged(self, now: float | None = None) -> int:
        """How many live clients are flagged (the ``stealguard_clients_flagged`` gauge)."""

    @abstractmethod
    def record_watermarks(self, records: Sequence[WatermarkRecord]) -> None:
        """Append watermark records, keeping the newest ``max_records``."""

    @abstractmethod
    def watermarks(self) -> list[WatermarkRecord]:
        """Every kept watermark record, oldest first."""

    def close(self) -> None:  # noqa: B027 - optional for backends without resources
        """Release connections."""


class MemoryStore(MonitorStore):
    """An in-process backend (one process only: the lab's oracles and tests). Same semantics and bounds as the
    shared backends; a lock makes it safe across threads."""

    url = "memory:"

    def __init__(self, namespace: str = "default", limits: StoreLimits | None = None) -> None:
        super().__init__(namespace, limits or StoreLimits())
        self._lock = threading.Lock()
        self._summaries: OrderedDict[str, dict] = OrderedDict()  # least recently seen first
        self._growing: dict[tuple[str, int], np.ndarray] = {}
        self._records: list[WatermarkRecord] = []

    def _live(self, client: str, now: float) -> dict | None:
        s = self._summaries.get(client)
        if s is not None and s["last_seen"] < now - self.limits.ttl_seconds:
            self._forget(client)
            return None
        return s

    def _forget(self, client: str) -> None:
        self._summaries.pop(client, None)
        for key in [k for k in self._growing if k[0] == client]:
            del self._growing[key]

    def update_many(self, items: Sequence[UpdateItem], now: float | None = None) -> list[Any]:
        now = time.time() if now is None else now
        with self._lock:
            return [self._update(client, classes, fn, now) for client, classes, fn in items]

    def _update(self, client: str, classes: Iterable[int], fn: UpdateFn, now: float) -> Any:
        summary = self._live(client, now)
        growing = {int(c): self._growing[(client, int(c))] for c in classes if (client, int(c)) in self._growing}
        # the stored form round-trips, as in the shared backends (fn gets its own copy)
        new, appended, result = fn(decode_summary(encode_summary(summary)) if summary else None, growing)
        if new is None:
            return result
        self._summaries[client] = new
        self._summaries.move_to_end(client)
        for c, rows in appended.items():
            if len(rows):
                old = self._growing.get((client, int(c)))
                both = rows if old is None else np.concatenate([old, rows])
                self._growing[(client, int(c))] = np.ascontiguousarray(both[-self.limits.max_per_class :])
        while len(self._summaries) > self.limits.max_clients:
            self._forget(next(iter(self._summaries)))
        return result

    def flagged(self, now: float | None = None) -> list[FlaggedClient]:
        now = time.time() if now is None else now
        with self._lock:
            out = [
                flagged_from_summary(c, s)
                for c, s in self._summaries.items()
                if s.get("flag") and s["last_seen"] >= now - self.limits.ttl_seconds
            ]
        return sorted(out, key=lambda f: -f.flagged_at)

    def count_flagged(self, now: float | None = None) -> int:
        return len(self.flagged(now))

    def record_watermarks(self, records: Sequence[WatermarkRecord]) -> None:
        with self._lock:
            self._records.extend(records)
            del self._records[: max(0, len(self._records) - self.limits.max_records)]

    def watermarks(self) -> list[WatermarkRecord]:
        with self._lock:
            return list(self._records)
