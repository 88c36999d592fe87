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


WORKER_PORTS = 200  # the size of the head's worker port range


def distinct_ports(n: int, taken: set[int]) -> list[int]:
    """``n`` free ports, none in ``taken`` and no two the same."""
    out: list[int] = []
    while len(out) < n:
        port = free_port()
        if port not in taken and port not in out:
            out.append(port)
    return out


def worker_range_start(size: int, taken: set[int]) -> int:
    """A free port ``p`` such that ``[p, p + size]`` holds none of ``taken``: Ray refuses to start when its
    worker range contains a port given to another component (a CI run, 2026-12-03, drew a dashboard-agent port
    inside the range; the ports were picked independently)."""
    while True:
        low = free_port()
        if low + size <= 65535 and not any(low <= p <= low + size for p in taken):
            return low


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
        flags = ("--ray-client-server-port", "--node-manager-port", "--object-manager-port",
                 "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--metrics-export-port",
                 "--runtime-env-agent-port", "--dashboard-port")
        ports = distinct_ports(len(flags), taken={self.port})
        self.client_port = ports[0]
        worker_low = worker_range_start(WORKER_PORTS, taken={self.port, *ports})
        cmd = [
            str(RAY), "start", "--head", "--block", "--port", str(self.port), "--node-ip-address", "127.0.0.1",
            "--num-cpus", str(self.num_cpus), "--include-dashboard=false", "--disable-usage-stats",
            "--temp-dir", str(self.temp_dir), "--object-store-memory", str(self.object_store_mb << 20),
            *(x for flag, port in zip(flags, ports, strict=True) for x in (flag, str(port))),
            "--min-worker-port", str(worker_low), "--max-worker-port", str(worker_low + WORKER_PORTS),
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
