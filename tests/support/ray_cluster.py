"""Start and stop a private Ray head for the tests (and bench): ``ray start --head --block`` in its own process
group, its own ``--temp-dir``, free ports, no dashboard, no usage stats; stopped by signalling that group only
(never ``ray stop``, which would stop every Ray process on the machine). It is addressed on 127.0.0.1, but Ray
2.60 binds its GCS and raylet on every interface whatever ``--node-ip-address`` says (docs/operations.md,
"Network exposure"), so the head is reachable from this machine's network while a test runs.

Every head has token authentication on with a token of its own (``RAY_AUTH_MODE=token``, ``RAY_AUTH_TOKEN_PATH``
a 0600 file in its temp dir): a client needs :attr:`RayHead.client_env`. Left to itself, ``ray start --head``
turns token auth on exactly when ``~/.ray/auth_token`` exists (Ray 2.59+ writes it on the first local
``ray.init()``), while a client given an explicit address never turns it on, so the same test passed or failed by
what an earlier Ray program had left in the home directory (CI, 2026-12-03: "ray head not ready after 180s",
the probe refused with "InvalidAuthToken")."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow_project.ops.processes import stop_group
from tests.support.torchserve import free_port

RAY = Path(sys.executable).with_name("ray")


class RayHead:
    def __init__(self, num_cpus: int = 2, object_store_mb: int = 300) -> None:
        self.num_cpus = num_cpus
        self.object_store_mb = object_store_mb
        self.port = free_port()
        # a short path: Ray's socket paths live under the temp dir and must stay under ~107 characters
        self.temp_dir = Path(tempfile.mkdtemp(prefix="sgray", dir="/tmp"))
        self.token_path = self.temp_dir / "auth_token"
        self.proc: subprocess.Popen | None = None
        self._last_probe = ""

    @property
    def client_env(self) -> dict[str, str]:
        """What a client process (driver, ``mlflow run``) needs in its environment to talk to this head."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path)}

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def client_address(self) -> str:
        """The Ray Client address (``ray://``) of this head."""
        return f"ray://127.0.0.1:{self.client_port}"

    def start(self, timeout: float = 180.0) -> RayHead:
        try:
            return self._start(timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout: float) -> RayHead:
        self.client_port = free_port()
        worker_low = free_port()
        cmd = [
            str(RAY), "start", "--head", "--block", "--port", str(self.port), "--node-ip-address", "127.0.0.1",
            "--num-cpus", str(self.num_cpus), "--include-dashboard=false", "--disable-usage-stats",
            "--temp-dir", str(self.temp_dir), "--object-store-memory", str(self.object_store_mb << 20),
            "--ray-client-server-port", str(self.client_port), "--node-manager-port", str(free_port()),
            "--object-manager-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
            "--dashboard-agent-grpc-port", str(free_port()), "--metrics-export-port", str(free_port()),
            "--runtime-env-agent-port", str(free_port()), "--dashboard-port", str(free_port()),
            "--min-worker-port", str(worker_low), "--max-worker-port", str(worker_low + 200),
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        fd = os.open(self.token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        env.update(self.client_env)
        log = open(self.temp_dir / "head.out", "wb")  # noqa: SIM115 (kept open for the process' lifetime)
        self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray head exited with {self.proc.returncode}:\n{self.tail()}")
            if self._ready():
                return self
            time.sleep(1.0)
        raise TimeoutError(f"ray head not ready after {timeout:.0f}s:\n{self.tail()}\n"
                           f"last readiness probe's stderr:\n{self._last_probe}")

    def _ready(self) -> bool:
        try:
            probe = subprocess.run(
                [sys.executable, "-c", "import ray,sys; ray.init(address=sys.argv[1], log_to_driver=False); "
                 "print(int(ray.cluster_resources().get('CPU', 0)))", self.address],
                capture_output=True, text=True, env={**os.environ, **self.client_env}, timeout=90)
        except subprocess.TimeoutExpired as e:
            self._last_probe = f"(timed out after {e.timeout:.0f}s)"
            return False
        self._last_probe = "\n".join(probe.stderr.splitlines()[-15:])
        return probe.returncode == 0 and probe.stdout.strip().endswith(str(self.num_cpus))

    def tail(self, n: int = 40) -> str:
        p = self.temp_dir / "head.out"
        return "\n".join(p.read_text(errors="replace").splitlines()[-n:]) if p.is_file() else ""

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc is not None:
            stop_group(self.proc.pid, timeout, self.proc)  # start_new_session: the head leads its own group
            self.proc = None
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> RayHead:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
