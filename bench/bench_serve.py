"""Serving cost of the defense: the same LeNet archived with ``identity`` (the undefended twin) and with
last-layer ``mad_argmax`` (surrogate shipped as eager and as ONNX), served by one TorchServe on 127.0.0.1,
driven over HTTP by 1 client and by 8 concurrent clients. Prints throughput, p50/p99 latency, where the CPU
went per request (the Java frontend, the Python workers, this process's HTTP clients) and the
defended/undefended throughput ratio (target >= 0.85).

    .venv/bin/python bench/bench_serve.py [--seconds 8] [--rounds 2]

All archives get the same victim, batch size (8), batch delay (5 ms) and workers (--workers); the phases
alternate (identity, mad_argmax, identity, ...) so drift on the shared machine hits both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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
# archive name -> (defense, surrogate runtime). Last-layer MAD needs only the surrogate's softmax, so the
# surrogate may ship in any runtime: the same random-init LeNet as eager (state dict) and as ONNX.
MODELS = {
    "identity": ({"name": "identity"}, None),
    "mad_argmax": (MAD, "eager"),
    "mad_argmax_onnx": (MAD, "onnx"),
}


def build(root: Path, workers: int) -> Path:
    victim = export(make_net("lenet", seed=0), "eager", root / "src" / "victim", "lenet")
    surrogate_net = make_net("lenet", seed=1)
    store = root / "store"
    for name, (defense, surrogate_runtime) in MODELS.items():
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
        )
        build_archive(f"bench_{name}", staged, store)
    return store


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=4.0, help="per phase")
    p.add_argument("--rounds", type=int, default=7, help="alternating rounds per concurrency level")
    p.add_argument("--workers", type=int, default=2, help="TorchServe workers per archive (2 = cores)")
    args = p.parse_args(argv)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="sg-bench-serve-") as tmp:
        root = Path(tmp)
        store = build(root, args.workers)
        server = TorchServe(store, root / "ts", models=[f"bench_{m}" for m in MODELS]).start(timeout=180)
        try:
            payloads = bodies(64)
            results: dict[tuple[str, int], list[dict[str, float]]] = {}
            for clients in (1, 8):
                for name in MODELS:  # warm-up
                    drive(f"{server.inference_url}/predictions/bench_{name}", payloads, clients, 1.5, server.proc.pid)
                for _ in range(args.rounds):
                    for name in MODELS:
                        url = f"{server.inference_url}/predictions/bench_{name}"
                        results.setdefault((name, clients), []).append(
                            drive(url, payloads, clients, args.seconds, server.proc.pid)
                        )
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
        for name in MODELS:
            runs = results[(name, clients)]
            requests_ = sum(r["requests"] for r in runs)

            def med(key: str, runs=runs) -> float:
                return statistics.median(r[key] for r in runs)

            print(
                f"{name:<16}{clients:>8}{requests_:>10}{med('rps'):>10.1f}{med('p50_ms'):>9.2f}{med('p99_ms'):>9.2f}"
                f"{'':>22}{med('cpu_frontend_ms'):>8.2f}{med('cpu_workers_ms'):>9.2f}{med('cpu_clients_ms'):>9.2f}"
            )
        base = results[("identity", clients)]
        for name in MODELS:
            if name == "identity":
                continue
            # paired per round: each defended phase against the identity phase run just before it
            ratios = sorted(r["rps"] / b["rps"] for r, b in zip(results[(name, clients)], base, strict=True))
            ratio = statistics.median(ratios)
            verdicts.append((name, clients, ratio))
            print(
                f"  throughput ratio {name}/identity, {clients} client(s): median {ratio:.3f} "
                f"(rounds {ratios[0]:.3f}..{ratios[-1]:.3f}; target >= 0.85)"
            )
    below = [f"{n} at {c} client(s) ({r:.3f})" for n, c, r in verdicts if r < 0.85]
    print("every defended archive meets the 0.85 target" if not below else "BELOW 0.85: " + ", ".join(below))
    return 0


if __name__ == "__main__":
    sys.exit(main())
