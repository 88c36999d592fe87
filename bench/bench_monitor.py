"""The per-client monitor's cost and its Redis failure mode, through one real TorchServe on 127.0.0.1 (issue 19.7).

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_monitor.py [--seconds 10] [--rounds 2] [--clients 8]

One TorchServe serves three archives of the same LeNet + mad_argmax (1 worker each, batch 8): ``mon_off`` (no
monitor), ``mon_sqlite`` (monitor, action observe, the embedded SQLite store) and ``mon_redis`` (the same on a
private redis-server, tests/support/redis_server.py). Each thread of the load driver (bench/reliability.py) is
one client (``X-Client-Id: client-<i>``). Phases:

1. throughput: ``--rounds`` rounds of ``--seconds`` per archive, interleaved (off, sqlite, redis, off, ...) so a
   load change on the shared machine hits all three alike; requests/s and the ratio monitor-on / off. Every
   answer is checked against the locally defended posterior (mismatch) and the undefended one (leak); the
   monitor-error counters must stay 0 and stealguard_rows_total must equal the rows served.
2. Redis killed mid-load: ``mon_redis`` under load, redis-server SIGKILLed ``--kill-at`` s in: every request must
   still get 200 with the defended answer (0 leaks, 0 mismatches).
3. counters exact: with Redis dead, another load; the increase of stealguard_monitor_errors_total must equal the
   batches served in it (the increase of stealguard_defense_latency_seconds_count: one observation per batch):
   every batch is counted once, asked-and-failed or skipped while the monitor pauses.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.reliability import INPUT, MAD, Expectation, Store, loadavg, run_load, scrape  # noqa: E402
from mlflow_project.lifecycle.package import build_archive, stage  # noqa: E402
from tests.support.redis_server import RedisServer  # noqa: E402
from tests.support.torchserve import TorchServe  # noqa: E402
from tests.support.victims import export, make_net  # noqa: E402

MODELS = ("mon_off", "mon_sqlite", "mon_redis")
HEADER = "X-Client-Id"
ERRORS, BATCHES, ROWS = ("stealguard_monitor_errors_total", "stealguard_defense_latency_seconds_count",
                         "stealguard_rows_total")


def build(root: Path, redis_url: str) -> Store:
    victim, surrogate = make_net("lenet", seed=0), make_net("lenet", seed=11)
    common = dict(victim=export(victim, "eager", root / "src" / "victim", "lenet"), input_spec=INPUT,
                  surrogate=export(surrogate, "eager", root / "src" / "surrogate", "lenet"), defense=MAD,
                  batch_size=8, max_batch_delay_ms=5, workers=1)
    monitors = {"mon_off": None,
                "mon_sqlite": {"store": f"sqlite:///{root / 'monitor.sqlite'}", "action": "observe"},
                "mon_redis": {"store": redis_url, "action": "observe", "timeout_ms": 200}}
    store = root / "store"
    for name, monitor in monitors.items():
        extra = {"monitor": monitor} if monitor is not None else {}
        build_archive(name, stage(root / "stage" / name, **common, **extra), store)
    return Store(store, victim, surrogate, dict.fromkeys(MODELS, MAD))


def settled(server: TorchServe, model: str, names: tuple[str, ...], quiet: float = 3.0, timeout: float = 60.0):
    """The counters once they stop moving for ``quiet`` seconds (the frontend folds workers' lines in late)."""
    deadline = time.monotonic() + timeout
    last, since = None, time.monotonic()
    while time.monotonic() < deadline:
        now = tuple(scrape(server, n, model) for n in names)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            break
        time.sleep(0.5)
    return dict(zip(names, last, strict=True))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=10.0, help="per archive per round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--kill-seconds", type=float, default=12.0, help="length of the Redis-kill load")
    p.add_argument("--kill-at", type=float, default=4.0)
    p.add_argument("--dead-seconds", type=float, default=8.0, help="length of the load with Redis dead")
    a = p.parse_args()
    report: dict = {"loadavg_before": loadavg()}
    with tempfile.TemporaryDirectory(prefix="bench_monitor_") as tmp:
        root = Path(tmp)
        redis = RedisServer(root / "redis").start()
        server = None
        try:
            store = build(root, redis.url)
            server = TorchServe(store.path, root / "ts", models="all")
            server.start(timeout=300)
            expect = Expectation(store, "mon_off")  # the same victim and defense behind all three
            url = {m: f"{server.inference_url}/predictions/{m}" for m in MODELS}
            for m in MODELS:  # warm-up: worker caches, the store's schema
                run_load(url[m], expect, 2, 2.0, client_header=HEADER)
            base = {m: settled(server, m, (ERRORS, ROWS)) for m in MODELS}
            tally = {m: {"ok": 0, "seconds": 0.0, "rows": 0, "errors": 0, "leaked": 0, "mismatched": 0}
                     for m in MODELS}
            for _ in range(a.rounds):
                for m in MODELS:
                    s = run_load(url[m], expect, a.clients, a.seconds, client_header=HEADER)
                    sm, t = s.summary(), tally[m]
                    t["ok"] += sm["ok"]
                    t["seconds"] += s.seconds
                    t["rows"] += sm["rows_served"]
                    t["errors"] += sm["errors"]
                    t["leaked"] += sm["leaked_rows"]
                    t["mismatched"] += sm["mismatched_rows"]
            report["loadavg_after_throughput"] = loadavg()
            for m in MODELS:
                c = settled(server, m, (ERRORS, ROWS))
                t = tally[m]
                t["requests_per_s"] = round(t["ok"] / t["seconds"], 1)
                t["monitor_errors"] = c[ERRORS] - base[m][ERRORS]
                t["rows_counted"] = c[ROWS] - base[m][ROWS]
            off = tally["mon_off"]["requests_per_s"]
            for m in ("mon_sqlite", "mon_redis"):
                tally[m]["ratio_vs_off"] = round(tally[m]["requests_per_s"] / off, 3) if off else None
            report["throughput"] = tally

            # Redis killed mid-load
            def kill(start: float, events: dict) -> None:
                time.sleep(max(0.0, a.kill_at - (time.monotonic() - start)))
                redis.kill()
                events["t_kill"] = time.monotonic() - start

            s = run_load(url["mon_redis"], expect, a.clients, a.kill_seconds, during=kill, client_header=HEADER)
            sm = s.summary()
            after = [x for x in s.ok if x.start - s.samples[0].start > s.events["t_kill"]] if s.samples else []
            report["redis_kill"] = {**{k: sm[k] for k in ("requests", "ok", "errors", "error_statuses",
                                                         "leaked_rows", "mismatched_rows", "requests_per_s")},
                                    "killed_at_s": round(s.events["t_kill"], 1), "ok_after_kill": len(after)}
            # counters exact with Redis dead
            c0 = settled(server, "mon_redis", (ERRORS, BATCHES))
            s = run_load(url["mon_redis"], expect, a.clients, a.dead_seconds, client_header=HEADER)
            c1 = settled(server, "mon_redis", (ERRORS, BATCHES))
            sm = s.summary()
            report["redis_dead"] = {"ok": sm["ok"], "errors": sm["errors"], "leaked_rows": sm["leaked_rows"],
                                    "mismatched_rows": sm["mismatched_rows"],
                                    "monitor_errors_delta": c1[ERRORS] - c0[ERRORS],
                                    "batches_delta": c1[BATCHES] - c0[BATCHES]}
        finally:
            if server is not None:
                server.stop()
            redis.stop()
    report["loadavg_end"] = loadavg()
    print(json.dumps(report, indent=1))
    t = report["throughput"]
    print(f"requests/s off {t['mon_off']['requests_per_s']}, sqlite {t['mon_sqlite']['requests_per_s']} "
          f"(ratio {t['mon_sqlite']['ratio_vs_off']}), redis {t['mon_redis']['requests_per_s']} "
          f"(ratio {t['mon_redis']['ratio_vs_off']}); load average {report['loadavg_before']} -> "
          f"{report['loadavg_end']}")


if __name__ == "__main__":
    main()
