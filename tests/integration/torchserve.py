"""Start, wait for and stop a private TorchServe instance (reused by the serving, metrics and reliability
tests and by bench/bench_serve.py).

Each instance gets its own work directory (TMPDIR, logs, config.properties, the cwd where TorchServe writes
key_file.json), free loopback ports and its own process group; it is stopped by signalling that group (the
launcher, the Java frontend and its Python workers), never with ``torchserve --stop``, which could hit another
instance.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[2]
TORCHSERVE = Path(sys.executable).with_name("torchserve")
METRICS_YAML = REPO / "deploy" / "metrics.yaml"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TorchServe:
    """A TorchServe process serving ``models`` (names of .mar files in ``model_store``, or "all")."""

    def __init__(
        self,
        model_store: Path | str,
        workdir: Path | str,
        models: Iterable[str] | str = "all",
        properties: Mapping[str, str] | None = None,
        metrics_config: Path | str | None = None,
        token_auth: bool = False,
    ) -> None:
        self.model_store = Path(model_store).resolve()
        self.workdir = Path(workdir).resolve()
        self.models = [models] if isinstance(models, str) else list(models)
        self.ports = {
            name: free_port()
            for name in ("inference", "management", "metrics", "grpc_inference", "grpc_management")
        }
        self.metrics_config = (
            Path(metrics_config) if metrics_config else (METRICS_YAML if METRICS_YAML.is_file() else None)
        )
        self.token_auth = token_auth
        self.worker_port = 20000 + free_port() % 20000
        self.properties = dict(properties or {})
        self.proc: subprocess.Popen | None = None
        self.log_dir = self.workdir / "logs"

    @property
    def inference_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['inference']}"

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['management']}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['metrics']}"

    def write_config(self) -> Path:
        props = {
            "inference_address": self.inference_url,
            "management_address": self.management_url,
            "metrics_address": self.metrics_url,
            "model_store": str(self.model_store),
            "load_models": ",".join(
                m if m == "all" or m.endswith(".mar") else f"{m}.mar" for m in self.models
            ),
            "metrics_mode": "prometheus",
            "disable_token_authorization": "false" if self.token_auth else "true",
            "enable_model_api": "false",
            "default_workers_per_model": "1",
            "number_of_netty_threads": "2",
            "netty_client_threads": "2",
            "job_queue_size": "200",
            # gRPC is always started: give it free ports too. Workers talk to the frontend over Unix sockets
            # named <java.io.tmpdir>/.ts.sock.<initial_worker_port + n>: with the default /tmp and 9000, two
            # instances on one machine would take each other's sockets, so both are private here.
            "grpc_inference_port": str(self.ports["grpc_inference"]),
            "grpc_management_port": str(self.ports["grpc_management"]),
            "initial_worker_port": str(self.worker_port),
            "vmargs": f"-Xmx512m -XX:+UseSerialGC -XX:-UsePerfData -Djava.io.tmpdir={self.workdir / 'tmp'}",
        }
        if self.metrics_config is not None:
            props["metrics_config"] = str(Path(self.metrics_config).resolve())
        props.update(self.properties)
        path = self.workdir / "config.properties"
        path.write_text("".join(f"{k}={v}\n" for k, v in props.items()), encoding="utf-8")
        return path

    def start(self, timeout: float = 120.0) -> TorchServe:
        (self.workdir / "tmp").mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        config = self.write_config()
        env = dict(os.environ)
        env.update(
            TMPDIR=str(self.workdir / "tmp"),
            LOG_LOCATION=str(self.log_dir),
            METRICS_LOCATION=str(self.log_dir),
            OMP_NUM_THREADS="1",
            TS_DISABLE_SYSTEM_METRICS="true",
        )
        cmd = [
            str(TORCHSERVE),
            "--start",
            "--foreground",
            "--ncs",
            "--ts-config",
            str(config),
            "--model-store",
            str(self.model_store),
        ]
        if not self.token_auth:
            cmd.append("--disable-token-auth")
        out = open(self.workdir / "torchserve.out", "wb")  # noqa: SIM115 (kept open for the process' lifetime)
        self.proc = subprocess.Popen(
            cmd, cwd=self.workdir, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        out.close()
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float) -> None:
        """Wait for /ping and for every model in ``models`` to have a READY worker."""
        deadline = time.monotonic() + timeout
        names = [m.removesuffix(".mar") for m in self.models if m != "all"]
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"torchserve exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if requests.get(f"{self.inference_url}/ping", timeout=2).status_code == 200 and all(
                    self.model_ready(n) for n in names
                ):
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"torchserve not ready after {timeout:.0f}s:\n{self.tail()}")

    def model_ready(self, name: str) -> bool:
        try:
            r = requests.get(f"{self.management_url}/models/{name}", timeout=2)
        except requests.RequestException:
            return False
        if r.status_code != 200:
            return False
        workers = [w for m in r.json() for w in m.get("workers", [])]
        return any(w.get("status") == "READY" for w in workers)

    def tail(self, n: int = 60) -> str:
        lines: list[str] = []
        for name in ("torchserve.out", "logs/model_log.log", "logs/ts_log.log"):
            p = self.workdir / name
            if p.is_file():
                lines.append(f"--- {name}")
                lines.extend(p.read_text(errors="replace").splitlines()[-n:])
        return "\n".join(lines)

    def wait_log(self, pattern: str, count: int = 1, timeout: float = 20.0) -> list:
        """``re.findall(pattern)`` over model_log.log once it has ``count`` matches (log4j writes lazily)."""
        deadline = time.monotonic() + timeout
        while True:
            found = re.findall(pattern, self.model_log())
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.5)

    def model_log(self) -> str:
        p = self.log_dir / "model_log.log"
        return p.read_text(errors="replace") if p.is_file() else ""

    def stop(self, timeout: float = 30.0) -> None:
        """Stop this instance: SIGTERM to its process group, SIGKILL if it outlives ``timeout``."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the launcher leads its own group
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
            # the launcher exited; make sure no worker of the group survives it
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and _group_alive(pgid):
                time.sleep(0.2)
            if not _group_alive(pgid):
                break
        self.proc = None

    def __enter__(self) -> TorchServe:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
