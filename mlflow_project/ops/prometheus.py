"""Run one local Prometheus: its prometheus.yml (a file, or scrape targets and rule files rendered into one), start
it on a loopback address, wait until it is ready, query it, stop it.

Used by `make monitor` / `make stop` (through the CLI below), by `make demo` (mlflow_project/ops/demo.py) and by the
integration tests that scrape a real TorchServe (tests/integration/test_metrics_prometheus.py,
test_extraction_alert.py). An instance owns a work directory (``prometheus.yml`` when rendered, ``data/``,
``prometheus.log``), runs in its own process group and is stopped by signalling that group
(mlflow_project.ops.processes), never by name.

CLI (a detached server and its pid file)::

    python -m mlflow_project.ops.prometheus start --config deploy/prometheus.yml --workdir .run/prometheus \
        --listen 127.0.0.1:9090
    python -m mlflow_project.ops.prometheus stop --pid-file .run/prometheus/prometheus.pid
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import requests
import yaml

from mlflow_project.ops.processes import DetachedServer, running_pid, stop_pid_file
from mlflow_project.ops.torchserve import REPO, free_port

ALERTS = REPO / "deploy" / "alerts.yml"
PROD_CONFIG = REPO / "deploy" / "prometheus.yml"
BINARY = "prometheus"  # Debian package `prometheus` (make setup installs it)


def scrape_config(targets: Sequence[str], interval_s: float = 15.0, labels: Mapping[str, str] | None = None,
                  rule_files: Sequence[Path | str] = (ALERTS,)) -> dict[str, Any]:
    """A prometheus.yml (as a dict) scraping TorchServe's metrics endpoint at ``targets`` every ``interval_s``
    seconds (rules evaluated as often), with ``labels`` on every series and ``rule_files`` loaded."""
    static: dict[str, Any] = {"targets": list(targets)}
    if labels:
        static["labels"] = dict(labels)
    interval = f"{interval_s:g}s"
    return {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": [{"job_name": "torchserve", "metrics_path": "/metrics", "static_configs": [static]}],
    }


class Prometheus(DetachedServer):
    """A Prometheus process listening on ``listen`` (``host:port``; default a free loopback port) with ``config``
    (a prometheus.yml path, used as it is, or a dict written to ``<workdir>/prometheus.yml``)."""

    name = "prometheus"

    def __init__(self, workdir: Path | str, config: Path | str | Mapping[str, Any], listen: str | None = None,
                 retention: str = "2d", pid_file: Path | str | None = None) -> None:
        self.workdir = Path(workdir).resolve()
        self.config = config
        self.listen = listen or f"127.0.0.1:{free_port()}"
        self.url = f"http://{self.listen}"
        self.retention = retention
        self.pid_file = Path(pid_file) if pid_file is not None else None
        self.log = self.workdir / "prometheus.log"
        self.proc: subprocess.Popen | None = None

    def config_file(self) -> Path:
        if isinstance(self.config, Mapping):
            path = self.workdir / "prometheus.yml"
            path.write_text(yaml.safe_dump(dict(self.config)), encoding="utf-8")
            return path
        return Path(self.config).resolve()

    def launch(self) -> subprocess.Popen:
        binary = shutil.which(BINARY)
        if binary is None:
            raise RuntimeError(f"{BINARY} not found on PATH: install the Debian package 'prometheus' (make setup "
                               "does, as root)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        cmd = [binary, f"--config.file={self.config_file()}", f"--storage.tsdb.path={self.workdir / 'data'}",
               f"--web.listen-address={self.listen}", f"--storage.tsdb.retention.time={self.retention}"]
        return self.spawn(cmd, self.log)

    def start(self, timeout: float = 60.0) -> Prometheus:
        return super().start(timeout)

    def not_ready(self) -> str:
        try:
            if requests.get(f"{self.url}/-/ready", timeout=2).status_code == 200:
                return ""
        except requests.RequestException:
            pass
        return f"no 200 from {self.url}/-/ready"

    def tail(self, n: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:]) if self.log.is_file() else ""

    def query(self, promql: str) -> list[dict]:
        """The instant-query result vector; raises if Prometheus refuses the expression."""
        r = requests.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=10)
        body = r.json() if r.headers.get("Content-Type", "").startswith("application/json") else {}
        if r.status_code != 200 or body.get("status") != "success":
            raise ValueError(f"PromQL {promql!r}: HTTP {r.status_code} {body.get('error', r.text[:300])}")
        return body["data"]["result"]

    def scalar(self, promql: str) -> float | None:
        """The value of a query that returns at most one series (None when it returns none)."""
        res = self.query(promql)
        if len(res) > 1:
            raise ValueError(f"PromQL {promql!r}: {len(res)} series where at most one was expected: {res}")
        return float(res[0]["value"][1]) if res else None

    def wait_for(self, promql: str, expected: float, timeout: float = 60.0) -> float | None:
        """Poll until ``promql`` returns ``expected``; return the last value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.scalar(promql)
            if value == expected or time.monotonic() >= deadline:
                return value
            time.sleep(0.5)


# ------------------------------------------------------------------------------------------------------ CLI


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mlflow_project.ops.prometheus", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("start", help="start a detached Prometheus, wait until ready, write its pid file")
    s.add_argument("--config", default=str(PROD_CONFIG), help="prometheus.yml (default: deploy/prometheus.yml)")
    s.add_argument("--workdir", required=True, help="data/ and prometheus.log")
    s.add_argument("--listen", default="127.0.0.1:9090", help="host:port of its web UI and API")
    s.add_argument("--pid-file", help="default: <workdir>/prometheus.pid")
    s.add_argument("--retention", default="2d", help="--storage.tsdb.retention.time")
    s.add_argument("--timeout", type=float, default=30.0, help="seconds to wait until ready")
    s.add_argument("--stop-command", help="what to tell the user to run to stop it (default: this CLI's stop)")
    t = sub.add_parser("stop", help="stop the Prometheus of a pid file (its whole process group)")
    t.add_argument("--pid-file", required=True)
    t.add_argument("--timeout", type=float, default=30.0, help="seconds after SIGTERM before SIGKILL")
    return p


def cmd_start(a: argparse.Namespace) -> int:
    pid_file = Path(a.pid_file or Path(a.workdir) / "prometheus.pid")
    stop_cmd = a.stop_command or f"python -m mlflow_project.ops.prometheus stop --pid-file {pid_file}"
    running = running_pid(pid_file)
    if running is not None:
        print(f"Prometheus already running (pid {running}) on http://{a.listen}; {stop_cmd} stops it")
        return 0
    if not Path(a.config).is_file():
        print(f"--config {a.config}: no such file")
        return 1
    prom = Prometheus(a.workdir, a.config, listen=a.listen, retention=a.retention, pid_file=pid_file)
    try:
        prom.launch()
        prom.wait_ready(a.timeout)
    except (RuntimeError, TimeoutError) as e:
        print(e)
        prom.stop()
        return 1
    except BaseException:
        prom.stop()
        raise
    print(f"Prometheus ready on {prom.url} (pid {prom.proc.pid}, log {prom.log}); stop it with: {stop_cmd}")
    return 0


def cmd_stop(a: argparse.Namespace) -> int:
    return stop_pid_file(a.pid_file, "Prometheus", a.timeout)


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    return cmd_start(a) if a.command == "start" else cmd_stop(a)


if __name__ == "__main__":
    sys.exit(main())
