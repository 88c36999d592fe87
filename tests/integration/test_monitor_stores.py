"""The monitor's stores: one contract over memory, SQLite (WAL) and a real redis-server; several processes
writing one SQLite file (and one Redis) at once lose no update; a Redis killed mid-way never stops answers."""

from __future__ import annotations

import multiprocessing
import sqlite3

import numpy as np
import pytest
import torch

from handlers.monitor import ClientMonitor
from handlers.monitor_stores import open_store
from plugins.monitor import ExtractionMonitor, StoreLimits, WatermarkRecord, parse_monitor
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.usefixtures("one_thread")

LIMITS = StoreLimits(max_per_class=3, ttl_seconds=100.0, max_clients=3, max_records=4)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(params=["memory", "sqlite", "redis"])
def store(request, tmp_path):
    if request.param == "memory":
        url = "memory:"
    elif request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/monitor.sqlite"
    else:
        url = request.getfixturevalue("redis_server").url
    s = open_store(url, f"ns-{request.node.name}", LIMITS, timeout_ms=2000)
    yield s
    s.close()


def _probs(labels, k=4):
    return torch.nn.functional.one_hot(torch.as_tensor(labels).long(), k).double() * 0.9 + 0.1 / k


def test_store_contract(store):
    cfg = parse_monitor({"prada": {"max_per_class": 3, "min_distances": 3, "window": 10}, "max_clients": 3})
    monitor = ExtractionMonitor(cfg, store)
    x = (2.0 ** torch.arange(6, dtype=torch.float32)).reshape(6, 1)  # each row joins the growing set
    monitor.observe(["a"] * 6, x, _probs([0] * 6), now=10.0)
    seen = {}

    def peek(summary, growing):
        seen.update(summary=summary, growing=growing)
        return summary, {}, None

    store.update("a", [0, 1], peek, now=11.0)
    assert seen["summary"]["n"] == 6 and seen["summary"]["D"] == pytest.approx([1, 2, 4, 8, 16])
    assert seen["growing"][0].ravel().tolist() == [8.0, 16.0, 32.0]  # newest max_per_class rows
    assert 1 not in seen["growing"]
    # TTL: 'a' idle for more than 100 s is forgotten
    store.update("a", [0], peek, now=200.0)
    assert seen["summary"] is None and seen["growing"] == {}
    # flags: the OOD share flags 'b'; listing and count see it
    cfg2 = parse_monitor({"ood": {"min_queries": 4, "share": 0.5}, "prada": {"min_distances": 1000}})
    m2 = ExtractionMonitor(cfg2, store)
    v = m2.observe(["b"] * 4, torch.rand(4, 1), torch.full((4, 4), 0.25, dtype=torch.float64), now=300.0)
    assert v.newly_flagged == [("b", "ood_share")]
    flagged = store.flagged(now=301.0)
    assert [(f.client, f.reason, f.queries) for f in flagged] == [("b", "ood_share", 4)]
    assert store.count_flagged(now=301.0) == 1
    assert store.count_flagged(now=500.0) == 0  # expired
    # max_clients 3: a fourth new client evicts the least recently seen
    for i, c in enumerate(["c", "d", "e"]):
        m2.observe([c], torch.rand(1, 1), _probs([0]), now=310.0 + i)
    assert store.count_flagged(now=313.0) == 0  # 'b' (seen at 300) was evicted
    # watermark records: newest max_records kept, round-tripped exactly
    recs = [WatermarkRecord(np.full((1, 2), i, np.float32), i % 4, np.eye(4)[i % 4], float(i)) for i in range(6)]
    store.record_watermarks(recs[:3])
    store.record_watermarks(recs[3:])
    back = store.watermarks()
    assert [r.label for r in back] == [2, 3, 0, 1] and np.array_equal(back[0].query, recs[2].query)
    assert back[-1].probs.tolist() == recs[-1].probs.tolist()


def test_sqlite_is_wal_with_busy_timeout(tmp_path):
    s = open_store(f"sqlite:///{tmp_path}/m.sqlite", "ns", LIMITS, timeout_ms=1234)
    assert s._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert s._conn.execute("PRAGMA busy_timeout").fetchone()[0] == 1234
    s.close()
    allowed = r"monitor\.store: must be sqlite:///<path>, redis://host:port/db or memory:; got .sqlite:relative.$"
    with pytest.raises(ValueError, match=allowed):
        parse_monitor({"store": "sqlite:relative"})


def _writer(url: str, worker: int, rounds: int, queue) -> None:
    torch.set_num_threads(1)
    store = open_store(url, "shared", StoreLimits(max_per_class=1000), timeout_ms=30_000)
    monitor = ExtractionMonitor(parse_monitor({}), store)
    g = torch.Generator().manual_seed(worker)
    for _ in range(rounds):
        x = torch.rand(2, 16, generator=g)
        monitor.observe(["shared", f"own-{worker}"], x, _probs([0, 1]))
    store.close()
    queue.put(worker)


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_concurrent_processes_lose_no_update(backend, tmp_path, request):
    url = f"sqlite:///{tmp_path}/shared.sqlite" if backend == "sqlite" else request.getfixturevalue("redis_server").url
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    workers, rounds = 4, 40
    procs = [ctx.Process(target=_writer, args=(url, w, rounds, queue)) for w in range(workers)]
    for p in procs:
        p.start()
    done = sorted(queue.get(timeout=600) for _ in procs)
    for p in procs:
        p.join()
        assert p.exitcode == 0
    assert done == list(range(workers))
    store = open_store(url, "shared", StoreLimits(max_per_class=1000))
    seen = {}

    def peek(summary, growing):
        seen[summary["n"]] = sum(len(g) for g in growing.values())
        return summary, {}, None

    store.update("shared", [0], peek)
    n_shared = next(iter(seen))
    assert n_shared == workers * rounds  # every process's every update landed, none overwritten
    for w in range(workers):
        seen.clear()
        store.update(f"own-{w}", [1], peek)
        assert next(iter(seen)) == rounds
    if backend == "sqlite":
        with sqlite3.connect(f"{tmp_path}/shared.sqlite") as db:
            rows = db.execute("SELECT COUNT(*) FROM growing WHERE client='shared'").fetchone()[0]
        assert rows == seen_rows_for(store)
    store.close()


def seen_rows_for(store) -> int:
    out = {}
    store.update("shared", [0], lambda s, g: (s, {}, out.update(n=len(g.get(0, [])))))
    return out["n"]


def test_redis_killed_midway_answers_keep_coming_and_errors_are_counted(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    cfg = parse_monitor({"store": server.url, "action": "block", "timeout_ms": 200})
    store = open_store(cfg.store, "kill", StoreLimits())
    mon = ClientMonitor(cfg, store, harden=None)
    x = torch.rand(4, 8)
    y = _probs([0, 1, 2, 3])
    answers = torch.full((4, 4), 0.25, dtype=torch.float64)
    served = 0
    for i in range(30):
        if i == 10:
            server.kill()
        out = mon.screen(["a", "a", "b", "b"], x + i, y, answers)
        assert out.probs is answers  # the defended answer, never anything else
        assert not out.blocked.any()
        served += 1
        if i == 11:
            mon._skip_until = 0.0  # next batch asks the dead store again, and fails fast
    assert served == 30
    assert mon.errors == 20  # every batch after the kill counted (asked or skipped), none before
    server.stop()


def _counting(step):
    """An update fn: n + 1 and one appended row [step] for class 0; the result is the n it wrote."""

    def fn(summary, growing):
        from plugins.monitor import prada

        s = summary or prada.new_summary()
        s["n"] += 1
        s["last_seen"] = 1.0
        return s, {0: np.full((1, 2), step, np.float32)}, s["n"]

    return fn


def test_redis_write_racing_another_worker_is_retried_not_lost(redis_server):
    """Worker B writes the client between worker A's read and A's write: A's compare-and-set fails, A reads
    and computes again, and both updates land once each (no lost update, no duplicated growing rows)."""
    a = open_store(redis_server.url, "race", StoreLimits(max_per_class=10), timeout_ms=2000)
    b = open_store(redis_server.url, "race", StoreLimits(max_per_class=10), timeout_ms=2000)
    calls = []

    def racing(summary, growing):
        calls.append(summary["n"] if summary else 0)
        if len(calls) == 1:
            b.update("x", [0], _counting(2.0), now=1.0)  # lands in between
        return _counting(1.0)(summary, growing)

    assert a.update("x", [0], racing, now=1.0) == 2
    assert calls == [0, 1]  # first on the state before B's write, then on the state after it
    seen = {}
    a.update("x", [0], lambda s, g: (None, {}, seen.update(n=s["n"], rows=g[0].ravel().tolist())), now=1.0)
    assert seen == {"n": 2, "rows": [2.0, 2.0, 1.0, 1.0]}
    a.close()
    b.close()


def test_redis_batch_costs_two_round_trips(redis_server, monkeypatch):
    import redis.connection

    store = open_store(redis_server.url, "trips", StoreLimits(), timeout_ms=2000)
    monitor = ExtractionMonitor(parse_monitor({}), store)
    clients = [f"client-{i}" for i in range(8)]
    g = torch.Generator().manual_seed(3)
    for _ in range(2):  # new clients (eviction check) and the script's first load
        monitor.observe(clients, torch.rand(8, 16, generator=g), _probs([i % 4 for i in range(8)]))
    sent = []
    real = redis.connection.Connection.send_packed_command
    monkeypatch.setattr(redis.connection.Connection, "send_packed_command",
                        lambda self, *a, **k: (sent.append(1), real(self, *a, **k))[1])
    v = monitor.observe(clients, torch.rand(8, 16, generator=g), _probs([i % 4 for i in range(8)]))
    assert len(sent) == 2  # one pipelined read, one scripted write, for 8 clients
    assert set(v.statistics) == set(clients)
    store.close()


def test_sqlite_reads_a_first_release_summary(tmp_path):
    import json

    s = open_store(f"sqlite:///{tmp_path}/old.sqlite", "ns", LIMITS)
    old = {"n": 5, "ood": 0, "D": [1.0, 2.0, 4.0], "T": {"0": 1.0}, "G": {"0": [2, 3.0, 5.0]}, "flag": None,
           "w": None, "last_seen": 10.0}
    s._conn.execute("INSERT INTO clients VALUES ('ns', 'old', 10.0, NULL, ?)", (json.dumps(old),))
    seen = {}
    s.update("old", [0], lambda summary, g: (None, {}, seen.update(summary)), now=11.0)
    assert seen["n"] == 5 and seen["D"].tolist() == [1.0, 2.0, 4.0] and seen["T"] == {"0": 1.0}
    s.close()
