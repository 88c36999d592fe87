"""Serving cost of the defense: the same LeNet archived with ``identity`` (the undefended twin), with the
bench-only ``surrogate_only`` "defense" (MAD's surrogate forward pass and nothing else: the floor of any
last-layer MAD-family defense) and with last-layer ``mad_argmax`` as ``package`` builds it by default (surrogate
as ONNX), served by one TorchServe on 127.0.0.1, driven over HTTP by 1 client and by 8 concurrent clients.
Prints throughput, p50/p99 latency, where the CPU went per request (the Java frontend, the Python workers, this
process's HTTP clients), the per-stage handler latency the workers reported (stealguard_stage_latency_
milliseconds, scraped from TorchServe's metrics endpoint) and the throughput ratios: defended/undefended (target
>= 0.90), surrogate-only/undefended (the limit) and defended/surrogate-only (what the defense adds beyond the
one forward pass it needs).

    .venv/bin/python bench/bench_serve.py [--seconds 4] [--rounds 7] [--eager]

``surrogate_only`` is a third-party distribution (bench/surrogate_only/, entry point ``stealguard.defenses``),
pip-installed into a temporary directory and shipped in its archive with ``--extra-dist``
(docs/configuration.md, "Third-party defenses"): no product code path knows it. ``--eager`` adds mad_argmax with
the eager surrogate. All archives get the same victim, batch size (8), batch delay (5 ms) and workers
(--workers); the phases alternate (identity, surrogate_only, mad_argmax_onnx, identity, ...) so drift on the
shared machine hits all alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import requests
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mlflow_project.lifecycle.package import build_archive, stage  # noqa: E402
from tests.support.torchserve import TorchServe  # noqa: E402
from tests.support.victims import export, make_net  # noqa: E402

MAD = {"name": "mad_argmax", "epsilon": 0.5, "norm": "l1", "jacobian": "last_layer"}
SURROGATE_ONLY_DIST = "stealguard-surrogate-only"
SURROGATE_ONLY_SRC = ROOT / "bench" / "surrogate_only"
BASE = "identity"
DEFAULT = "mad_argmax_onnx"  # what `package` builds by default for last-layer mad_argmax
LIMIT = "surrogate_only"
TARGET = 0.90
# archive name -> (defense, surrogate runtime). Last-layer MAD needs only the surrogate's softmax, so the
# surrogate may ship in any runtime: the same random-init LeNet as ONNX (package's default) and as eager.
MODELS = {
    BASE: ({"name": "identity"}, None),
    LIMIT: ({"name": "surrogate_only"}, "onnx"),
    DEFAULT: (MAD, "onnx"),
}
EAGER = {"mad_argmax": (MAD, "eager")}
STAGES = ("decode", "victim", "surrogate", "defense", "monitor", "encode", "metrics")


def install_surrogate_only(root: Path) -> None:
    """pip-install the bench-only distribution into ``root/site`` and put it on this process's sys.path, so
    ``stage(extra_dists=...)`` finds and ships it (the workers see it only through the archive)."""
    site = root / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(SURROGATE_ONLY_SRC)], check=True)
    sys.path.insert(0, str(site))
    import plugins

    plugins.available_defenses()
    plugins.load_entry_points()


def build(root: Path, workers: int, models: dict) -> Path:
    install_surrogate_only(root)
    victim = export(make_net("lenet", seed=0), "eager", root / "src" / "victim", "lenet")
    surrogate_net = make_net("lenet", seed=1)
    store = root / "store"
    for name, (defense, surrogate_runtime) in models.items():
        surrogate = None
        if surrogate_runtime is not None:
            surrogate = export(surrogate_net, surrogate_runtime, root / "src" / f"surrogate_{name}", "lenet")
        staged = stage(
            root / "stage" / name,
            victim=victim,
            defense=defense,
            surrogate=surrogate,
            input_spec={"shape": [1, 28, 28], "max_rows": 64},
            batch_size=8,
            max_batch_delay_ms=5,
            workers=workers,
            extra_dists=[SURROGATE_ONLY_DIST] if defense["name"] == "surrogate_only" else [],
        )
        build_archive(f"bench_{name}", staged, store)
    return store


def stage_means(metrics_url: str) -> dict[str, dict[str, float]]:
    """Per archive, the mean milliseconds per batch of every handler stage and of the handler's total, and the
    mean rows per batch, from TorchServe's Prometheus endpoint (cumulative over the whole run)."""
    from prometheus_client.parser import text_string_to_metric_families

    sums: dict[tuple[str, str], list[float]] = {}
    rows: dict[str, float] = {}
    for family in text_string_to_metric_families(requests.get(f"{metrics_url}/metrics", timeout=30).text):
        for sample in family.samples:
            model = sample.labels.get("model_name", "").removeprefix("bench_")
            if sample.name == "stealguard_rows_total":
                rows[model] = rows.get(model, 0.0) + sample.value
            if family.name not in ("stealguard_stage_latency_milliseconds", "stealguard_handler_latency_milliseconds"):
                continue
            key = (model, sample.labels.get("stage", "handler"))
            acc = sums.setdefault(key, [0.0, 0.0])
            if sample.name.endswith("_sum"):
                acc[0] += sample.value
            elif sample.name.endswith("_count"):
                acc[1] += sample.value
    out: dict[str, dict[str, float]] = {}
    for (model, stage_), (total, count) in sums.items():
        if count:
            out.setdefault(model, {})[stage_] = total / count
            if stage_ == "handler":
                out[model]["rows_per_batch"] = rows.get(model, 0.0) / count
    return out


def bodies(n: int) -> list[bytes]:
    g = torch.Generator().manual_seed(0)
    return [
        json.dumps({"instances": torch.rand(1, 1, 28, 28, generator=g).tolist()}).encode() for _ in range(n)
    ]


def cpu_seconds(server_pid: int) -> dict[str, float]:
    """CPU seconds (user + system) so far of the server's processes, split into the Java frontend and the
    Python workers, and of this process (the HTTP clients)."""
    out = {"frontend": 0.0, "workers": 0.0, "clients": sum(psutil.Process().cpu_times()[:2])}
    root = psutil.Process(server_pid)
    for proc in [root, *root.children(recursive=True)]:
        try:
            used = sum(proc.cpu_times()[:2])
            out["frontend" if "java" in proc.name() else "workers"] += used if proc.pid != server_pid else 0.0
        except psutil.NoSuchProcess:  # a process that ended meanwhile
            pass
    return out


def drive(url: str, payloads: list[bytes], clients: int, seconds: float, server_pid: int) -> dict[str, float]:
    """``clients`` threads, each with its own keep-alive session, posting for ``seconds``."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def client(k: int) -> None:
        session = requests.Session()
        mine: list[float] = []
        i = k
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            r = session.post(
                url, data=payloads[i % len(payloads)], headers={"Content-Type": "application/json"}
            )
            mine.append(time.perf_counter() - t0)
            if r.status_code != 200:
                with lock:
                    errors[0] += 1
            i += clients
        with lock:
            latencies.extend(mine)

    cpu_before = cpu_seconds(server_pid)
    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    cpu_after = cpu_seconds(server_pid)
    if errors[0]:
        raise RuntimeError(f"{errors[0]} requests to {url} failed")
    latencies.sort()
    return {
        "requests": len(latencies),
        "rps": len(latencies) / wall,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        **{f"cpu_{k}_ms": 1000 * (cpu_after[k] - cpu_before[k]) / max(1, len(latencies)) for k in cpu_before},
    }


def paired_ratio(results: dict, top: str, bottom: str, clients: int) -> tuple[float, float, float]:
    """Median (and range) of the per-round throughput ratios ``top``/``bottom`` (each pair from one round)."""
    ratios = sorted(
        r["rps"] / b["rps"] for r, b in zip(results[(top, clients)], results[(bottom, clients)], strict=True)
    )
    return statistics.median(ratios), ratios[0], ratios[-1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=4.0, help="per phase")
    p.add_argument("--rounds", type=int, default=7, help="alternating rounds per concurrency level")
    p.add_argument("--workers", type=int, default=2, help="TorchServe workers per archive (2 = cores)")
    p.add_argument("--eager", action="store_true", help="also mad_argmax with the eager surrogate")
    args = p.parse_args(argv)
    models = {**MODELS, **(EAGER if args.eager else {})}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="sg-bench-serve-") as tmp:
        root = Path(tmp)
        store = build(root, args.workers, models)
        server = TorchServe(store, root / "ts", models=[f"bench_{m}" for m in models]).start(timeout=180)
        try:
            payloads = bodies(64)
            results: dict[tuple[str, int], list[dict[str, float]]] = {}
            for clients in (1, 8):
                for name in models:  # warm-up
                    drive(f"{server.inference_url}/predictions/bench_{name}", payloads, clients, 1.5, server.proc.pid)
                for _ in range(args.rounds):
                    for name in models:
                        url = f"{server.inference_url}/predictions/bench_{name}"
                        results.setdefault((name, clients), []).append(
                            drive(url, payloads, clients, args.seconds, server.proc.pid)
                        )
            stages = stage_means(f"http://127.0.0.1:{server.ports['metrics']}")
        finally:
            server.stop()
    print(
        f"TorchServe 0.12, LeNet 1x28x28, 1 row per request, batchSize 8, maxBatchDelay 5 ms, "
        f"{args.workers} worker(s) per model (1 torch thread each), {args.rounds} alternating rounds x "
        f"{args.seconds:g} s per cell; {os.cpu_count()} cores, load average {load_before:.1f} before / "
        f"{os.getloadavg()[0]:.1f} after"
    )
    print(
        f"{'archive':<16}{'clients':>8}{'requests':>10}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}"
        f"   CPU ms per request: {'frontend':>8}{'workers':>9}{'clients':>9}"
    )
    verdicts = []
    for clients in (1, 8):
        for name in models:
            runs = results[(name, clients)]
            requests_ = sum(r["requests"] for r in runs)

            def med(key: str, runs=runs) -> float:
                return statistics.median(r[key] for r in runs)

            print(
                f"{name:<16}{clients:>8}{requests_:>10}{med('rps'):>10.1f}{med('p50_ms'):>9.2f}{med('p99_ms'):>9.2f}"
                f"{'':>22}{med('cpu_frontend_ms'):>8.2f}{med('cpu_workers_ms'):>9.2f}{med('cpu_clients_ms'):>9.2f}"
            )
        pairs = [(n, BASE) for n in models if n != BASE] + [(n, LIMIT) for n in models if n not in (BASE, LIMIT)]
        for top, bottom in pairs:
            ratio, lo, hi = paired_ratio(results, top, bottom, clients)
            goal = f"; target >= {TARGET:.2f}" if bottom == BASE and top != LIMIT else ""
            if goal:
                verdicts.append((top, clients, ratio))
            print(
                f"  throughput ratio {top}/{bottom}, {clients} client(s): median {ratio:.3f} "
                f"(rounds {lo:.3f}..{hi:.3f}{goal})"
            )
    print("mean handler milliseconds per batch, by stage (stealguard_stage_latency_milliseconds, whole run):")
    print(f"{'archive':<16}{'rows/batch':>11}" + "".join(f"{s_:>10}" for s_ in STAGES) + f"{'sum':>9}{'handler':>9}")
    for name in models:
        st = stages.get(name, {})
        total = sum(st.get(s_, 0.0) for s_ in STAGES)
        print(
            f"{name:<16}{st.get('rows_per_batch', 0.0):>11.2f}"
            + "".join(f"{st[s_]:>10.3f}" if s_ in st else f"{'-':>10}" for s_ in STAGES)  # '-': stage not emitted
            + f"{total:>9.3f}{st.get('handler', 0.0):>9.3f}"
        )
    below = [f"{n} at {c} client(s) ({r:.3f})" for n, c, r in verdicts if r < TARGET]
    print(f"every defended archive meets the {TARGET:.2f} target" if not below
          else f"BELOW {TARGET:.2f}: " + ", ".join(below))
    return 0


if __name__ == "__main__":
    sys.exit(main())
