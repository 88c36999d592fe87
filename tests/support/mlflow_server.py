"""Start and stop a private ``mlflow server`` on 127.0.0.1 (a free port, a SQLite backend store and a proxied
artifact store in a temp dir, its own process group, stopped by signalling that group only)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import requests

from mlflow_project.ops.processes import stop_group
from tests.support.torchserve import free_port

MLFLOW = Path(sys.executable).with_name("mlflow")


class MlflowServer:
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).resolve()
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180.0) -> MlflowServer:
        return self.launch().wait_ready(timeout)

    def launch(self) -> MlflowServer:
        """Start the process and return at once (call :meth:`wait_ready` before using it)."""
        self.root.mkdir(parents=True, exist_ok=True)
        cmd = [
            str(MLFLOW), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination", str(self.root / "artifacts"), "--serve-artifacts",
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        out = open(self.root / "server.out", "wb")  # noqa: SIM115 (kept open for the process' lifetime)
        self.proc = subprocess.Popen(cmd, cwd=self.root, env=env, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        out.close()
        return self

    def wait_ready(self, timeout: float = 180.0) -> MlflowServer:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if requests.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"mlflow server not ready after {timeout:.0f}s:\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        p = self.root / "server.out"
        return "\n".join(p.read_text(errors="replace").splitlines()[-n:]) if p.is_file() else ""

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc is None:
            return
        stop_group(self.proc.pid, timeout, self.proc)  # start_new_session: the server leads its own group
        self.proc = None
