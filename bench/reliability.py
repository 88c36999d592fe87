"""Reliability under load and faults: a defended archive served by a real TorchServe on 127.0.0.1.

    .venv/bin/python bench/reliability.py [--seconds 60] [--clients 16] [--workers 2] [--kill-seconds 30]
        [--averaging] [--markdown RELIABILITY.md]

Phases (one TorchServe, its own process group, private ports and TMPDIR; stopped by pid):

1. load: ``--clients`` threads POST 1-4 rows each to the mad_argmax archive (``--workers`` workers) for
   ``--seconds``. Every 200 answer is checked row by row against the victim's own undefended posterior and the
   defended posterior, both computed locally for the same input (a row that equals the undefended posterior is
   a leak; one that differs from the locally defended posterior is a mismatch). Reports requests/s, p50/p99
   latency, errors, and stealguard_rows_total scraped from TorchServe's metrics endpoint against the rows
   served.
2. fault: the same load while one worker (a process of the group this script started, found by its pid in
   TorchServe's management API) is SIGKILLed; reports when TorchServe had it back, the requests that failed in
   that window, and the same leak/mismatch checks.
3. averaging (``--averaging``): mlflow_project.lab.averaging in the lab (in-process), against mad_argmax and
   random_noise, with the trained Fashion-MNIST victim (artifacts/victims/fashion_mnist_lenet).

The load driver is reused by tests/integration/test_reliability.py with short bounds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import requests
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mlflow_project.lifecycle.package import build_archive, stage  # noqa: E402
from tests.dev_secret import build_defense  # noqa: E402  (DEV_SECRET, the test servers' secret)
from tests.support.torchserve import TorchServe  # noqa: E402
from tests.support.victims import export, make_net  # noqa: E402

MAD = {"name": "mad_argmax", "epsilon": 0.5, "norm": "l1", "jacobian": "last_layer"}
NOISE = {"name": "random_noise", "epsilon": 2.0, "norm": "l2"}
IMAGE = {"size": [28, 28], "mode": "L", "mean": [0.5], "std": [0.5], "max_bytes": 20_000, "max_pixels": 1_000_000}
INPUT = {"shape": [1, 28, 28], "max_rows": 16, "image": IMAGE}
TOL = 1e-4  # max |difference| for "the same posterior" (the JSON carries float64; runtimes compute in float32)
K = 10


@dataclass
class Store:
    path: Path
    victim: nn.Module
    surrogate: nn.Module
    defenses: dict[str, dict]


def build_store(root: Path, workers: int = 2, batch_size: int = 8, max_batch_delay_ms: int = 5) -> Store:
    """Archives: ``rel_mad`` (LeNet + mad_argmax, ``workers`` workers) and ``rel_noise`` (random_noise, 1)."""
    victim, surrogate = make_net("lenet", seed=0), make_net("lenet", seed=11)
    victim_files = export(victim, "eager", root / "src" / "victim", "lenet")
    surrogate_files = export(surrogate, "eager", root / "src" / "surrogate", "lenet")
    store = root / "store"
    common = dict(victim=victim_files, input_spec=INPUT, batch_size=batch_size, max_batch_delay_ms=max_batch_delay_ms)
    build_archive("rel_mad", stage(root / "stage" / "rel_mad", defense=MAD, surrogate=surrogate_files,
                                   workers=workers, **common), store)
    build_archive("rel_noise", stage(root / "stage" / "rel_noise", defense=NOISE, workers=1, **common), store)
    return Store(store, victim, surrogate, {"rel_mad": MAD, "rel_noise": NOISE})


class Expectation:
    """A pool of inputs with their undefended and defended posteriors computed locally, and request bodies
    of 1-4 of those inputs. Only inputs whose defended answer is far (L1 > 0.05) from the undefended one are
    kept, so that a leak cannot pass for a defended answer."""

    def __init__(self, store: Store, model: str, pool: int = 48, bodies: int = 64, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        x = torch.rand((pool * 2, 1, 28, 28), generator=g) * 2 - 1
        defense = build_defense(store.defenses[model], surrogate=store.surrogate, num_classes=K)
        with torch.no_grad():
            y = torch.softmax(store.victim(x).double(), dim=1)
        defended = defense(y, x).probs.double()
        keep = ((defended - y).abs().sum(1) > 0.05).nonzero().flatten()[:pool]
        if len(keep) < 8:
            raise RuntimeError(f"only {len(keep)} inputs where {model}'s defense moves the answer")
        self.x, self.y, self.defended = x[keep], y[keep], defended[keep]
        n = len(keep)
        self.bodies: list[tuple[bytes, list[int]]] = []
        for i in range(bodies):
            idx = [(i + j) % n for j in range(1 + i % 4)]
            self.bodies.append((json.dumps({"instances": self.x[idx].tolist()}).encode(), idx))

    def check(self, content: bytes, idx: list[int]) -> tuple[int, int]:
        """(leaked rows, mismatched rows) of one 200 answer to the body with rows ``idx``."""
        preds = json.loads(content)["predictions"]
        if len(preds) != len(idx):
            return 0, len(idx)
        got = torch.tensor([p["probabilities"] for p in preds], dtype=torch.float64)
        leak = ((got - self.y[idx]).abs().max(1).values < TOL).sum().item()
        mismatch = ((got - self.defended[idx]).abs().max(1).values > TOL).sum().item()
        return int(leak), int(mismatch)


@dataclass
class Sample:
    start: float
    end: float
    status: int  # 0: no HTTP answer (connection error or timeout)
    rows: int
    leak: int = 0
    mismatch: int = 0
    error: str = ""


@dataclass
class LoadResult:
    samples: list[Sample]
    seconds: float
    events: dict = field(default_factory=dict)

    @property
    def ok(self) -> list[Sample]:
        return [s for s in self.samples if s.status == 200]

    @property
    def failed(self) -> list[Sample]:
        return [s for s in self.samples if s.status != 200]

    def summary(self) -> dict:
        lat = sorted((s.end - s.start) * 1000 for s in self.samples)
        ok = self.ok
        return {
            "requests": len(self.samples),
            "ok": len(ok),
            "errors": len(self.failed),
            "error_statuses": dict(Counter(s.status for s in self.failed)),
            "rows_served": sum(s.rows for s in ok),
            "requests_per_s": round(len(ok) / self.seconds, 1),
            "rows_per_s": round(sum(s.rows for s in ok) / self.seconds, 1),
            "p50_ms": round(percentile(lat, 50), 1),
            "p99_ms": round(percentile(lat, 99), 1),
            "leaked_rows": sum(s.leak for s in ok),
            "mismatched_rows": sum(s.mismatch for s in ok),
        }


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, round(q / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[k]


def run_load(url: str, expect: Expectation, clients: int, seconds: float, during=None, tail: float = 0.0,
             timeout: float = 60.0, client_header: str | None = None) -> LoadResult:
    """``clients`` threads post ``expect``'s bodies for ``seconds``; ``during(t0, events)`` runs alongside
    (e.g. to kill a worker and wait for its restart, bounded by itself); the load then goes on for at least
    ``tail`` more seconds. ``client_header`` (e.g. X-Client-Id): thread i sends it as ``client-i``."""
    samples: list[Sample] = []
    lock = threading.Lock()
    stop = threading.Event()
    events: dict = {}

    def client(cid: int) -> None:
        rng = random.Random(cid)
        session = requests.Session()
        headers = {"Content-Type": "application/json"}
        if client_header:
            headers[client_header] = f"client-{cid}"
        local: list[Sample] = []
        while not stop.is_set():
            body, idx = expect.bodies[rng.randrange(len(expect.bodies))]
            t0 = time.monotonic()
            try:
                r = session.post(url, data=body, headers=headers, timeout=timeout)
                status, content = r.status_code, r.content
            except requests.RequestException as exc:
                status, content = 0, str(exc).encode()
            t1 = time.monotonic()
            s = Sample(t0, t1, status, len(idx))
            if status == 200:
                s.leak, s.mismatch = expect.check(content, idx)
            else:
                s.error = content[:200].decode(errors="replace")
            local.append(s)
        with lock:
            samples.extend(local)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    start = time.monotonic()
    for t in threads:
        t.start()
    if during is not None:
        during(start, events)
    remaining = max(seconds - (time.monotonic() - start), tail)
    if remaining > 0:
        time.sleep(remaining)
    stop.set()
    for t in threads:
        t.join(timeout + 5)
    return LoadResult(samples, time.monotonic() - start, events)


# ------------------------------------------------------------------------------------------ TorchServe views


def scrape(server: TorchServe, metric: str, model: str) -> float:
    """Sum of ``metric``'s samples for ``model`` on TorchServe's Prometheus endpoint."""
    text = requests.get(f"{server.metrics_url}/metrics", timeout=10).text
    pattern = re.compile(rf'^{re.escape(metric)}\{{[^}}]*model_name="{re.escape(model)}"[^}}]*\}} (\S+)$')
    return sum(float(m.group(1)) for line in text.splitlines() if (m := pattern.match(line)))


def wait_counter(server: TorchServe, metric: str, model: str, want: float, timeout: float = 20.0) -> float:
    """The counter once it reaches ``want`` (the frontend folds workers' metric lines in asynchronously) or
    its value after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = scrape(server, metric, model)
        if value >= want or time.monotonic() > deadline:
            return value
        time.sleep(0.5)


def workers(server: TorchServe, model: str) -> list[dict]:
    r = requests.get(f"{server.management_url}/models/{model}", timeout=10)
    r.raise_for_status()
    return [w for m in r.json() for w in m.get("workers", [])]


def ready_pids(server: TorchServe, model: str) -> list[int]:
    return sorted(int(w["pid"]) for w in workers(server, model) if w.get("status") == "READY" and w.get("pid"))


def kill_worker(server: TorchServe, model: str) -> int:
    """SIGKILL one READY worker of ``model``; only a process of the group this TorchServe was started in."""
    pid = ready_pids(server, model)[0]
    if server.proc is None or os.getpgid(pid) != server.proc.pid:
        raise RuntimeError(f"worker pid {pid} is not in the process group of the TorchServe started here")
    os.kill(pid, signal.SIGKILL)
    return pid


def killer(server: TorchServe, model: str, after: float, expect_workers: int, restart_timeout: float = 120.0):
    """A ``during`` callback for :func:`run_load`: kill a worker ``after`` seconds in, then wait until
    ``expect_workers`` READY workers are back (none of them the killed one)."""

    def during(start: float, events: dict) -> None:
        time.sleep(max(0.0, after - (time.monotonic() - start)))
        events["pids_before"] = ready_pids(server, model)
        events["killed_pid"] = kill_worker(server, model)
        events["t_kill"] = time.monotonic()
        deadline = events["t_kill"] + restart_timeout
        while time.monotonic() < deadline:
            try:
                pids = ready_pids(server, model)
            except requests.RequestException:
                pids = []
            if len(pids) >= expect_workers and events["killed_pid"] not in pids:
                events["t_restarted"] = time.monotonic()
                events["pids_after"] = pids
                return
            time.sleep(0.2)

    return during


def fault_summary(res: LoadResult) -> dict:
    ev = res.events
    t_kill, t_back = ev.get("t_kill"), ev.get("t_restarted")
    out = res.summary()
    out.update(killed_pid=ev.get("killed_pid"), pids_before=ev.get("pids_before"), pids_after=ev.get("pids_after"))
    if t_kill is None:
        return out
    window_end = t_back if t_back is not None else float("inf")
    in_window = [s for s in res.failed if s.end >= t_kill and s.start <= window_end]
    out.update(
        restarted=t_back is not None,
        restart_seconds=round(t_back - t_kill, 1) if t_back is not None else None,
        failed_in_window=len(in_window),
        failed_outside_window=len(res.failed) - len(in_window),
        failed_examples=sorted({f"{s.status}: {s.error[:120]}" for s in res.failed})[:3],
        ok_after_restart=sum(1 for s in res.ok if t_back is not None and s.start > t_back),
    )
    return out


# --------------------------------------------------------------------------------------------------- report


def machine() -> dict:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"host": platform.node(), "os": f"{platform.system()} {platform.release()}", "cpu": cpu,
            "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__}


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


BEGIN, END = "<!-- reliability:begin (written by make reliability) -->", "<!-- reliability:end -->"


def render(report: dict) -> str:
    """The figures as the Markdown block `make reliability` prints and writes into RELIABILITY.md."""
    m, st = report["machine"], report["settings"]
    lines = [
        f"Run: {report['date']} on {m['host']} ({m['os']}; {m['cpu']}; {m['cores']} cores; "
        f"Python {m['python']}, torch {m['torch']}).",
        f"Load average (1/5/15 min): before {report['loadavg_before']}, after the load phase "
        f"{report['load']['loadavg_after']}, after the fault phase {report['fault']['loadavg_after']}, "
        f"at the end {report['loadavg_end']}.",
        "",
    ]
    ld = report["load"]
    lines += [
        f"Load: mad_argmax archive (eager LeNet, last-layer MAD-argmax, epsilon 0.5 l1), {ld['workers']} "
        f"workers, batch size 8, max batch delay 5 ms; {st['clients']} concurrent clients for "
        f"{st['seconds']:.0f} s, each request 1-4 rows.",
        "",
        "| requests | ok | errors | requests/s | rows/s | p50 ms | p99 ms | leaked rows | mismatched rows "
        "| rows served | stealguard_rows_total delta |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {ld['requests']} | {ld['ok']} | {ld['errors']} {ld['error_statuses'] or ''} | {ld['requests_per_s']} "
        f"| {ld['rows_per_s']} | {ld['p50_ms']} | {ld['p99_ms']} | {ld['leaked_rows']} | {ld['mismatched_rows']} "
        f"| {ld['rows_served']} | {ld['stealguard_rows_total_delta']:.0f} |",
        "",
    ]
    ft = report["fault"]
    lines += [
        f"Fault: the same load for {st['kill_seconds']:.0f} s (plus 5 s after the restart); "
        f"{st['kill_after']:.0f} s in, worker pid {ft['killed_pid']} (of {ft['pids_before']}) SIGKILLed.",
        "",
        "| restarted | restart s | requests | ok | failed in window | failed outside | leaked rows "
        "| mismatched rows | ok after restart | rows served | stealguard_rows_total delta |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {ft.get('restarted')} (pids now {ft.get('pids_after')}) | {ft.get('restart_seconds')} "
        f"| {ft['requests']} | {ft['ok']} | {ft.get('failed_in_window')} {ft['error_statuses'] or ''} "
        f"| {ft.get('failed_outside_window')} | {ft['leaked_rows']} | {ft['mismatched_rows']} "
        f"| {ft.get('ok_after_restart')} | {ft['rows_served']} | {ft['stealguard_rows_total_delta']:.0f} |",
        "",
        "Failed answers (distinct): " + ("; ".join(e.replace("\n", " ") for e in ft.get("failed_examples") or [])
                                        or "none"),
        "",
    ]
    av = report.get("averaging")
    if av:
        c = av["config"]
        lines += [
            f"Averaging attack (lab, in-process; victim {av['victim']}): {c['images']} Fashion-MNIST train "
            f"images, {c['repeats']} augmented queries each (random shift up to {c['shift']} px, Gaussian "
            f"pixel noise std {c['noise']}); clone LeNet, {c['epochs']} epochs, SGD lr {c['lr']}, batch "
            f"{c['batch_size']}, seed {c['seed']}; clone accuracy on the 10,000 test images.",
            "",
            f"| oracle | single (budget {c['images']}) | augmented, own answers (budget {c['images'] * c['repeats']}) "
            f"| augmented, averaged answers (budget {c['images'] * c['repeats']}) | {c['repeats']} unaugmented "
            "repeats identical | mean L1 perturbation: one answer / average of an image's answers |",
            "|---|---|---|---|---|---|",
        ]
        for name, arm in av["arms"].items():
            if name == "undefended":
                lines.append(f"| undefended | {arm['single']:.4f} | {arm['augmented']:.4f} | - | - | - |")
            else:
                lines.append(
                    f"| {name} | {arm['single']:.4f} | {arm['augmented']:.4f} | {arm['averaged']:.4f} "
                    f"| {arm['identical_repeats']} | {arm['l1_answer']:.3f} / {arm['l1_average']:.3f} |"
                )
        lines.append("")
    return "\n".join(lines)


def write_markdown(path: Path, block: str) -> None:
    text = path.read_text(encoding="utf-8") if path.is_file() else f"# Reliability\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        text = text.rstrip("\n") + f"\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{BEGIN}\n{block}\n{END}{tail}", encoding="utf-8")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--kill-seconds", type=float, default=30.0, help="length of the fault phase")
    p.add_argument("--kill-after", type=float, default=8.0)
    p.add_argument("--averaging", action="store_true", help="also run the lab averaging attack")
    p.add_argument("--victim", default="artifacts/victims/fashion_mnist_lenet")
    p.add_argument("--json", help="write all figures here")
    p.add_argument("--markdown", help="replace the figures block of this Markdown file (RELIABILITY.md)")
    a = p.parse_args(argv)

    report: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "machine": machine(),
                    "settings": vars(a)}
    with tempfile.TemporaryDirectory(prefix="sg-reliability-") as tmp:
        root = Path(tmp)
        store = build_store(root, workers=a.workers)
        server = TorchServe(store.path, root / "ts", models=["rel_mad"])
        report["loadavg_before"] = loadavg()
        server.start(timeout=300)
        try:
            url = f"{server.inference_url}/predictions/rel_mad"
            expect = Expectation(store, "rel_mad")
            ready = ready_pids(server, "rel_mad")
            print(f"TorchServe ready: rel_mad workers {ready}; load {a.clients} clients x {a.seconds:.0f}s",
                  flush=True)
            before = scrape(server, "stealguard_rows_total", "rel_mad")
            res = run_load(url, expect, a.clients, a.seconds)
            load = res.summary()
            counted = wait_counter(server, "stealguard_rows_total", "rel_mad", before + load["rows_served"])
            load["stealguard_rows_total_delta"] = counted - before
            load["loadavg_after"] = loadavg()
            load["workers"] = len(ready)
            report["load"] = load
            print("LOAD " + json.dumps(load), flush=True)

            print(f"fault: kill one worker {a.kill_after:.0f}s into a {a.kill_seconds:.0f}s load", flush=True)
            before = scrape(server, "stealguard_rows_total", "rel_mad")
            res = run_load(url, expect, a.clients, a.kill_seconds,
                           during=killer(server, "rel_mad", a.kill_after, a.workers), tail=5.0)
            fault = fault_summary(res)
            counted = wait_counter(server, "stealguard_rows_total", "rel_mad", before + fault["rows_served"])
            fault["stealguard_rows_total_delta"] = counted - before
            fault["loadavg_after"] = loadavg()
            report["fault"] = fault
            print("FAULT " + json.dumps(fault), flush=True)
        finally:
            server.stop()
    if a.averaging:
        from mlflow_project.lab.averaging import AveragingConfig, run
        from mlflow_project.lab.evaluate import load_victim

        torch.set_num_threads(1)
        cfg = AveragingConfig()
        report["averaging"] = run(load_victim(a.victim), cfg, log=lambda m: print("AVERAGING " + m, flush=True))
        report["averaging"]["victim"] = a.victim
    report["loadavg_end"] = loadavg()
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(report, indent=2))
    block = render(report)
    print("\n" + block, flush=True)
    if a.markdown:
        write_markdown(Path(a.markdown), block)
        print(f"figures written to {a.markdown}", flush=True)
    return report


if __name__ == "__main__":
    main()
