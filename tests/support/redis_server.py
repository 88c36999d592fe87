"""A private redis-server (Debian's /usr/bin/redis-server) for the monitor's tests: 127.0.0.1 on a free port,
its own working directory, no persistence; stopped (or killed mid-test) by its pid."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from mlflow_project.ops.torchserve import free_port


class RedisServer:
    def __init__(self, workdir: Path | str) -> None:
        self.workdir = Path(workdir)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 30.0) -> RedisServer:
        exe = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not os.path.exists(exe):
            raise RuntimeError("redis-server not found: install the Debian package 'redis-server' (make setup does)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.workdir / "redis.log", "wb")  # noqa: SIM115 - closed with the process
        args = [exe, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.workdir),
                "--save", "", "--appendonly", "no", "--protected-mode", "yes", "--daemonize", "no"]
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        import redis

        deadline = time.monotonic() + timeout
        while True:
            try:
                redis.Redis(port=self.port, socket_timeout=1).ping()
                return self
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    out = (self.workdir / "redis.log").read_text(errors="replace")
                    self.stop()
                    raise RuntimeError(f"redis-server did not start on port {self.port}:\n{out}") from None
                time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL, as a crash would (no shutdown)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None
