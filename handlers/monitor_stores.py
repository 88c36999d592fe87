"""The monitor's shared stores: an embedded SQLite file (the default; no server) and Redis (for replicas).

``open_store("sqlite:///abs/path.sqlite" | "redis://host:port/db" | "memory:", namespace, limits, timeout_ms)``.

SQLite: WAL journal (readers never block the writer; several worker processes share one file on the host),
``busy_timeout = timeout_ms`` (a writer waits that long for another process's write lock, then raises), and
a batch's client updates in one ``BEGIN IMMEDIATE`` transaction, so concurrent workers serialise per write. One
connection per process (re-opened after a fork).

Redis (the ``redis`` client, imported only for a redis:// URL; one server, not Redis Cluster): a batch costs two
round trips. One pipelined read fetches every client's summary, its version counter and the growing sets of the
batch's classes; the monitor computes; one Lua script (EVALSHA, atomic on the server) writes every client whose
version is still the one read (optimistic concurrency: compare-and-set on the version, no lock) and returns the
others, which another worker wrote in between: those are read and computed again (more round trips only under
contention; a client update is never lost or applied twice). Every key expires ``ttl_seconds`` after the client's
last query; live clients are kept in a sorted set by last-seen time, and past ``max_clients`` the least recently
seen are evicted (inside the same script). Socket and connect timeouts are ``timeout_ms`` and a failed command
is not retried, so a lost Redis costs one fast error per batch (counted by the caller). The key layout (``c:``
summary, ``g:<client>:<class>`` lists of float32 rows) is the first release's, plus ``v:<client>``; its
summaries still load (see plugins/monitor/store.py).

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
    UpdateItem,
    WatermarkRecord,
    decode_summary,
    encode_summary,
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

    def update_many(self, items: Sequence[UpdateItem], now: float | None = None) -> list[Any]:
        now = time.time() if now is None else now
        with self._tx() as db:
            done = [self._update(db, client, classes, fn, now) for client, classes, fn in items]
            if any(new_client for _, new_client in done):
                self._evict(db, now)
            return [result for result, _ in done]

    def _update(self, db: sqlite3.Connection, client: str, classes: Iterable[int], fn: UpdateFn, now: float):
        """One client's update inside the batch's transaction: (fn's result, whether the client was new)."""
        ns, lim = self.namespace, self.limits
        row = db.execute("SELECT last_seen, summary FROM clients WHERE ns=? AND client=?", (ns, client)).fetchone()
        summary = None
        if row is not None and row[0] < now - lim.ttl_seconds:
            self._forget(db, client)
        elif row is not None:
            summary = decode_summary(row[1])
        growing: dict[int, list[bytes]] = {}
        classes = [int(c) for c in classes]
        if summary is not None and classes:
            marks = ",".join("?" * len(classes))
            for cls, vec in db.execute(
                f"SELECT cls, vec FROM growing WHERE ns=? AND client=? AND cls IN ({marks}) ORDER BY id",  # noqa: S608
                (ns, client, *classes),
            ):
                growing.setdefault(int(cls), []).append(vec)
        new, appended, result = fn(summary, {c: vectors_from_bytes(b) for c, b in growing.items()})
        if new is None:
            return result, False
        flag = new.get("flag")
        db.execute(
            "INSERT INTO clients (ns, client, last_seen, flagged_at, summary) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (ns, client) DO UPDATE SET last_seen=excluded.last_seen, "
            "flagged_at=excluded.flagged_at, summary=excluded.summary",
            (ns, client, float(new["last_seen"]), flag["at"] if flag else None, encode_summary(new)),
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
        return result, row is None

    def _evict(self, db: sqlite3.Connection, now: float) -> None:
        """After a new client: expire the idle, then evict the least recently seen past ``max_clients``."""
        ns, lim = self.namespace, self.limits
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
        return [flagged_from_summary(c, decode_summary(s)) for c, s in rows]

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


# The write half of a Redis batch, atomic on the server. KEYS: none (one server; keys are built from the prefix).
# ARGV: prefix, cutoff (idle before it: expired), max_clients, ttl, max_per_class, n, then per client:
#   client, expected version ('' = absent), summary, last_seen, flagged (0/1), n_reset, reset classes...,
#   n_lists, per list: class, n_rows, rows...
# Writes each client whose version is still the expected one; returns the 1-based positions of the others.
_WRITE_LUA = """
local p = ARGV[1]
local cutoff, max_clients, ttl, keep = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local n, i = tonumber(ARGV[6]), 7
local conflicts, fresh = {}, false
for k = 1, n do
  local client, expected, summary, seen, flagged = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  local n_reset = tonumber(ARGV[i + 5])
  local resets = i + 6
  i = resets + n_reset
  local n_lists = tonumber(ARGV[i])
  i = i + 1
  local ok = (redis.call('GET', p .. 'v:' .. client) or '') == expected
  if ok then
    if expected == '' then fresh = true end
    for r = resets, resets + n_reset - 1 do redis.call('DEL', p .. 'g:' .. client .. ':' .. ARGV[r]) end
    redis.call('SET', p .. 'c:' .. client, summary, 'EX', ttl)
    redis.call('INCR', p .. 'v:' .. client)
    redis.call('EXPIRE', p .. 'v:' .. client, ttl)
    redis.call('ZADD', p .. 'seen', seen, client)
    if flagged == '1' then redis.call('ZADD', p .. 'flagged', seen, client) end
  else
    conflicts[#conflicts + 1] = k
  end
  for l = 1, n_lists do
    local key, n_rows = p .. 'g:' .. client .. ':' .. ARGV[i], tonumber(ARGV[i + 1])
    if ok then
      redis.call('RPUSH', key, unpack(ARGV, i + 2, i + 1 + n_rows))
      redis.call('LTRIM', key, -keep, -1)
      redis.call('EXPIRE', key, ttl)
    end
    i = i + 2 + n_rows
  end
end
if fresh then
  redis.call('ZREMRANGEBYSCORE', p .. 'seen', '-inf', '(' .. cutoff)
  redis.call('ZREMRANGEBYSCORE', p .. 'flagged', '-inf', '(' .. cutoff)
  local extra = redis.call('ZCARD', p .. 'seen') - max_clients
  if extra > 0 then
    local popped = redis.call('ZPOPMIN', p .. 'seen', extra)
    for e = 1, #popped, 2 do
      local client = popped[e]
      redis.call('DEL', p .. 'c:' .. client, p .. 'v:' .. client)
      redis.call('ZREM', p .. 'flagged', client)
      local cursor = '0'
      repeat
        local page = redis.call('SCAN', cursor, 'MATCH', p .. 'g:' .. client .. ':*', 'COUNT', 100)
        cursor = page[1]
        if #page[2] > 0 then redis.call('DEL', unpack(page[2])) end
      until cursor == '0'
    end
  end
end
return conflicts
"""


class RedisStore(MonitorStore):
    MAX_ATTEMPTS = 50  # a batch's clients lost to concurrent writers this often in a row: StoreError

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
        self._write = self.redis.register_script(_WRITE_LUA)

    def _k(self, *parts: object) -> str:
        return self._p + ":".join(str(p) for p in parts)

    def update_many(self, items: Sequence[UpdateItem], now: float | None = None) -> list[Any]:
        now = time.time() if now is None else now
        work = [(client, [int(c) for c in classes], fn) for client, classes, fn in items]
        results: list[Any] = [None] * len(work)
        pending = list(range(len(work)))
        for _ in range(self.MAX_ATTEMPTS):
            pending = self._attempt(work, pending, results, now)
            if not pending:
                return results
        raise StoreError(
            f"store: {len(pending)} client(s) kept being written by other workers ({self.MAX_ATTEMPTS} attempts)"
        )

    def _attempt(self, work, pending: list[int], results: list[Any], now: float) -> list[int]:
        """One read round trip and one write round trip for ``pending``; the positions to try again."""
        lim = self.limits
        pipe = self.redis.pipeline(transaction=False)
        for i in pending:
            client, classes, _ = work[i]
            pipe.get(self._k("c", client))
            pipe.get(self._k("v", client))
            for c in classes:
                pipe.lrange(self._k("g", client, c), 0, -1)
        replies = iter(pipe.execute())
        args: list[Any] = []
        written: list[int] = []
        for i in pending:
            client, classes, fn = work[i]
            raw, version = next(replies), next(replies)
            lists = [next(replies) for _ in classes]
            summary = decode_summary(raw) if raw else None
            if summary is not None and summary["last_seen"] < now - lim.ttl_seconds:
                summary = None
            growing = {c: vectors_from_bytes(b) for c, b in zip(classes, lists, strict=True) if b and summary}
            new, appended, result = fn(summary, growing)
            results[i] = result
            if new is None:
                continue
            written.append(i)
            resets = classes if summary is None else []
            lists_out = [(int(c), vectors_to_bytes(rows)) for c, rows in appended.items() if len(rows)]
            args += [client, (version or b"").decode(), encode_summary(new), float(new["last_seen"]),
                     1 if new.get("flag") else 0, len(resets), *resets, len(lists_out)]
            for c, blobs in lists_out:
                args += [c, len(blobs), *blobs]
        if not written:
            return []
        ttl = max(1, int(np.ceil(lim.ttl_seconds)))
        head = [self._p, now - lim.ttl_seconds, lim.max_clients, ttl, lim.max_per_class, len(written)]
        conflicts = self._write(keys=[], args=head + args)
        return [written[int(k) - 1] for k in conflicts]

    def flagged(self, now: float | None = None) -> list[FlaggedClient]:
        now = time.time() if now is None else now
        names = self.redis.zrangebyscore(self._k("flagged"), now - self.limits.ttl_seconds, "+inf")
        out = []
        for name in names:
            raw = self.redis.get(self._k("c", name.decode()))
            if raw:
                s = decode_summary(raw)
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
