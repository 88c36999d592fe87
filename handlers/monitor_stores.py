"""The monitor's shared stores: an embedded SQLite file (the default; no server) and Redis (for replicas).

``open_store("sqlite:///abs/path.sqlite" | "redis://host:port/db" | "memory:", namespace, limits, timeout_ms)``.

SQLite: WAL journal (readers never block the writer; several worker processes share one file on the host),
``busy_timeout = timeout_ms`` (a writer waits that long for another process's write lock, then raises), and
every client update in one ``BEGIN IMMEDIATE`` transaction, so concurrent workers serialise per write. One
connection per process (re-opened after a fork).

Redis (the ``redis`` client, imported only for a redis:// URL): a client's update runs under a per-client lock
(``redis.lock.Lock``, expires after 5 s if its holder dies) and writes in one MULTI pipeline; every key expires
``ttl_seconds`` after the client's last query; live clients are kept in a sorted set by last-seen time, and past
``max_clients`` the least recently seen are evicted. Socket and connect timeouts are ``timeout_ms`` and a
failed command is not retried, so a lost Redis costs one fast error per batch (counted by the caller).

Both bound growing sets to the newest ``max_per_class`` rows and watermark records to the newest
``max_records``.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from plugins.monitor.store import (
    FlaggedClient,
    MemoryStore,
    MonitorStore,
    StoreError,
    StoreLimits,
    UpdateFn,
    WatermarkRecord,
    flagged_from_summary,
    vectors_from_bytes,
    vectors_to_bytes,
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS clients (
    ns TEXT NOT NULL, client TEXT NOT NULL, last_seen REAL NOT NULL, flagged_at REAL, summary TEXT NOT NULL,
    PRIMARY KEY (ns, client));
CREATE INDEX IF NOT EXISTS clients_seen ON clients (ns, last_seen);
CREATE TABLE IF NOT EXISTS growing (
    id INTEGER PRIMARY KEY AUTOINCREMENT, ns TEXT NOT NULL, client TEXT NOT NULL, cls INTEGER NOT NULL,
    vec BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS growing_key ON growing (ns, client, cls, id);
CREATE TABLE IF NOT EXISTS watermarks (
    id INTEGER PRIMARY KEY AUTOINCREMENT, ns TEXT NOT NULL, record TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS watermarks_ns ON watermarks (ns, id);
"""


class SQLiteStore(MonitorStore):
    def __init__(self, path: str, namespace: str, limits: StoreLimits, timeout_ms: int = 250) -> None:
        super().__init__(namespace, limits)
        if not os.path.isabs(path):
            raise StoreError(f"store: a SQLite path must be absolute; got {path!r}")
        self.path = path
        self.url = f"sqlite:///{path}"
        self.timeout_ms = int(timeout_ms)
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._pid = -1
        self._connect()

    def _connect(self) -> sqlite3.Connection:
        if self._conn is not None and self._pid == os.getpid():
            return self._conn
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        conn = sqlite3.connect(
            self.path, timeout=self.timeout_ms / 1000, isolation_level=None, check_same_thread=False
        )
        conn.execute(f"PRAGMA busy_timeout = {self.timeout_ms}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreError(f"store: {self.path} cannot use WAL journalling (got {mode!r}); use a local disk")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.executescript(_SCHEMA)
        self._conn, self._pid = conn, os.getpid()
        return conn

    def _tx(self):
        return _Transaction(self)

    def update(self, client: str, classes: Iterable[int], fn: UpdateFn, now: float | None = None) -> Any:
        now = time.time() if now is None else now
        ns, lim = self.namespace, self.limits
        with self._tx() as db:
            row = db.execute("SELECT last_seen, summary FROM clients WHERE ns=? AND client=?", (ns, client)).fetchone()
            summary = None
            if row is not None and row[0] < now - lim.ttl_seconds:
                self._forget(db, client)
            elif row is not None:
                summary = json.loads(row[1])
            growing = {}
            if summary is not None:
                for c in classes:
                    blobs = db.execute(
                        "SELECT vec FROM growing WHERE ns=? AND client=? AND cls=? ORDER BY id",
                        (ns, client, int(c)),
                    ).fetchall()
                    if blobs:
                        growing[int(c)] = vectors_from_bytes([b[0] for b in blobs])
            new, appended, result = fn(summary, growing)
            if new is None:
                return result
            flag = new.get("flag")
            db.execute(
                "INSERT INTO clients (ns, client, last_seen, flagged_at, summary) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (ns, client) DO UPDATE SET last_seen=excluded.last_seen, "
                "flagged_at=excluded.flagged_at, summary=excluded.summary",
                (ns, client, float(new["last_seen"]), flag["at"] if flag else None, json.dumps(new)),
            )
            for c, rows in appended.items():
                if not len(rows):
                    continue
                db.executemany(
                    "INSERT INTO growing (ns, client, cls, vec) VALUES (?, ?, ?, ?)",
                    [(ns, client, int(c), b) for b in vectors_to_bytes(rows)],
                )
                db.execute(
                    "DELETE FROM growing WHERE ns=? AND client=? AND cls=? AND id NOT IN (SELECT id FROM growing "
                    "WHERE ns=? AND client=? AND cls=? ORDER BY id DESC LIMIT ?)",
                    (ns, client, int(c), ns, client, int(c), lim.max_per_class),
                )
            if row is None:  # a new client: expire the idle, then evict the least recently seen past the cap
                for (old,) in db.execute(
                    "SELECT client FROM clients WHERE ns=? AND last_seen < ?", (ns, now - lim.ttl_seconds)
                ).fetchall():
                    self._forget(db, old)
                extra = db.execute("SELECT COUNT(*) FROM clients WHERE ns=?", (ns,)).fetchone()[0] - lim.max_clients
                if extra > 0:
                    for (old,) in db.execute(
                        "SELECT client FROM clients WHERE ns=? ORDER BY last_seen LIMIT ?", (ns, extra)
                    ).fetchall():
                        self._forget(db, old)
            return result

    def _forget(self, db: sqlite3.Connection, client: str) -> None:
        db.execute("DELETE FROM clients WHERE ns=? AND client=?", (self.namespace, client))
        db.execute("DELETE FROM growing WHERE ns=? AND client=?", (self.namespace, client))

    def flagged(self, now: float | None = None) -> list[FlaggedClient]:
        now = time.time() if now is None else now
        with self._tx() as db:
            rows = db.execute(
                "SELECT client, summary FROM clients WHERE ns=? AND flagged_at IS NOT NULL AND last_seen >= ? "
                "ORDER BY flagged_at DESC",
                (self.namespace, now - self.limits.ttl_seconds),
            ).fetchall()
        return [flagged_from_summary(c, json.loads(s)) for c, s in rows]

    def count_flagged(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        with self._tx() as db:
            return int(
                db.execute(
                    "SELECT COUNT(*) FROM clients WHERE ns=? AND flagged_at IS NOT NULL AND last_seen >= ?",
                    (self.namespace, now - self.limits.ttl_seconds),
                ).fetchone()[0]
            )

    def record_watermarks(self, records: Sequence[WatermarkRecord]) -> None:
        if not records:
            return
        with self._tx() as db:
            db.executemany(
                "INSERT INTO watermarks (ns, record) VALUES (?, ?)",
                [(self.namespace, json.dumps(r.to_json())) for r in records],
            )
            db.execute(
                "DELETE FROM watermarks WHERE ns=? AND id NOT IN "
                "(SELECT id FROM watermarks WHERE ns=? ORDER BY id DESC LIMIT ?)",
                (self.namespace, self.namespace, self.limits.max_records),
            )

    def watermarks(self) -> list[WatermarkRecord]:
        with self._tx() as db:
            rows = db.execute("SELECT record FROM watermarks WHERE ns=? ORDER BY id", (self.namespace,)).fetchall()
        return [WatermarkRecord.from_json(json.loads(r[0])) for r in rows]

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on error) under the store's thread lock."""

    def __init__(self, store: SQLiteStore) -> None:
        self.store = store

    def __enter__(self) -> sqlite3.Connection:
        self.store._lock.acquire()
        try:
            self.conn = self.store._connect()
            self.conn.execute("BEGIN IMMEDIATE")
        except BaseException:
            self.store._lock.release()
            raise
        return self.conn

    def __exit__(self, kind, exc, tb) -> None:
        try:
            self.conn.execute("COMMIT" if kind is None else "ROLLBACK")
        finally:
            self.store._lock.release()


class RedisStore(MonitorStore):
    LOCK_EXPIRY_S = 5.0

    def __init__(self, url: str, namespace: str, limits: StoreLimits, timeout_ms: int = 250) -> None:
        super().__init__(namespace, limits)
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self.url = url
        self.timeout_s = timeout_ms / 1000
        self.redis = redis.Redis.from_url(
            url,
            socket_timeout=self.timeout_s,
            socket_connect_timeout=self.timeout_s,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )
        self._p = f"stealguard:{namespace}:"

    def _k(self, *parts: object) -> str:
        return self._p + ":".join(str(p) for p in parts)

    def update(self, client: str, classes: Iterable[int], fn: UpdateFn, now: float | None = None) -> Any:
        now = time.time() if now is None else now
        lim = self.limits
        classes = [int(c) for c in classes]
        ttl = max(1, int(np.ceil(lim.ttl_seconds)))
        lock = self.redis.lock(self._k("lock", client), timeout=self.LOCK_EXPIRY_S, blocking_timeout=self.timeout_s)
        if not lock.acquire():
            raise StoreError(f"store: client {client!r} stayed locked for {self.timeout_s:g} s")
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.get(self._k("c", client))
            for c in classes:
                pipe.lrange(self._k("g", client, c), 0, -1)
            raw, *lists = pipe.execute()
            summary = json.loads(raw) if raw else None
            if summary is not None and summary["last_seen"] < now - lim.ttl_seconds:
                summary = None
            growing = {c: vectors_from_bytes(b) for c, b in zip(classes, lists, strict=True) if b and summary}
            new, appended, result = fn(summary, growing)
            if new is None:
                return result
            tx = self.redis.pipeline(transaction=True)
            if summary is None:
                tx.delete(*(self._k("g", client, c) for c in classes))
            tx.set(self._k("c", client), json.dumps(new), ex=ttl)
            for c, rows in appended.items():
                if len(rows):
                    key = self._k("g", client, c)
                    tx.rpush(key, *vectors_to_bytes(rows))
                    tx.ltrim(key, -lim.max_per_class, -1)
                    tx.expire(key, ttl)
            tx.zadd(self._k("seen"), {client: float(new["last_seen"])})
            if new.get("flag"):
                tx.zadd(self._k("flagged"), {client: float(new["last_seen"])})
            tx.execute()
        finally:
            try:
                lock.release()
            except Exception:  # noqa: S110 - an expired lock is released by its expiry
                pass
        if summary is None:
            self._evict(now)
        return result

    def _evict(self, now: float) -> None:
        """Drop clients idle past the TTL and, past ``max_clients``, the least recently seen."""
        seen, flagged = self._k("seen"), self._k("flagged")
        cutoff = now - self.limits.ttl_seconds
        self.redis.zremrangebyscore(seen, "-inf", f"({cutoff}")
        self.redis.zremrangebyscore(flagged, "-inf", f"({cutoff}")
        extra = self.redis.zcard(seen) - self.limits.max_clients
        if extra > 0:
            for raw in self.redis.zpopmin(seen, extra):
                client = raw[0].decode()
                keys = [self._k("c", client), *self.redis.scan_iter(match=self._k("g", client, "*"))]
                self.redis.delete(*keys)
                self.redis.zrem(flagged, client)

    def flagged(self, now: float | None = None) -> list[FlaggedClient]:
        now = time.time() if now is None else now
        names = self.redis.zrangebyscore(self._k("flagged"), now - self.limits.ttl_seconds, "+inf")
        out = []
        for name in names:
            raw = self.redis.get(self._k("c", name.decode()))
            if raw:
                s = json.loads(raw)
                if s.get("flag"):
                    out.append(flagged_from_summary(name.decode(), s))
        return sorted(out, key=lambda f: -f.flagged_at)

    def count_flagged(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        return int(self.redis.zcount(self._k("flagged"), now - self.limits.ttl_seconds, "+inf"))

    def record_watermarks(self, records: Sequence[WatermarkRecord]) -> None:
        if not records:
            return
        tx = self.redis.pipeline(transaction=True)
        tx.rpush(self._k("watermarks"), *(json.dumps(r.to_json()) for r in records))
        tx.ltrim(self._k("watermarks"), -self.limits.max_records, -1)
        tx.execute()

    def watermarks(self) -> list[WatermarkRecord]:
        return [WatermarkRecord.from_json(json.loads(r)) for r in self.redis.lrange(self._k("watermarks"), 0, -1)]

    def close(self) -> None:
        self.redis.close()


def sqlite_path(url: str) -> str:
    """``sqlite:///var/tmp/x.sqlite`` and ``sqlite:////var/tmp/x.sqlite`` both name /var/tmp/x.sqlite: the
    monitor's SQLite path is always absolute (workers run in TorchServe's own working directory)."""
    return "/" + url[len("sqlite:///") :].lstrip("/")


def open_store(url: str, namespace: str, limits: StoreLimits | None = None, timeout_ms: int = 250) -> MonitorStore:
    """The backend a store URL names: ``sqlite:///<absolute path>``, ``redis://host:port/db`` or ``memory:``."""
    limits = limits or StoreLimits()
    if url.startswith("sqlite:///"):
        return SQLiteStore(sqlite_path(url), namespace, limits, timeout_ms)
    if url.startswith(("redis://", "rediss://")):
        return RedisStore(url, namespace, limits, timeout_ms)
    if url == "memory:":
        return MemoryStore(namespace, limits)
    raise StoreError(f"store: unknown URL {url!r}; allowed: sqlite:///<path>, redis://host:port/db, memory:")
