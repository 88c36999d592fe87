"""A private TorchServe instance for the serving, metrics and reliability tests and bench/bench_serve.py: the
product launcher (mlflow_project/ops/torchserve.py) with the tests' settings.

Each instance gets its own work directory, five free loopback ports, a free initial_worker_port, token auth off
unless asked, and settings sized for a 2-core machine (1 OMP thread, 2 netty threads, no system metrics).
"""

from __future__ import annotations

import contextlib
import re
import shutil
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import requests

from mlflow_project.ops.torchserve import METRICS_YAML, REPO, free_port
from mlflow_project.ops.torchserve import TorchServe as Launcher
from tests.dev_secret import DEV_SECRET

__all__ = ["METRICS_YAML", "REPO", "TEST_PROPERTIES", "TorchServe", "free_port", "registered"]

TEST_PROPERTIES = {
    "metrics_mode": "prometheus",
    "enable_model_api": "false",
    "default_workers_per_model": "1",
    "number_of_netty_threads": "2",
    "netty_client_threads": "2",
    "job_queue_size": "200",
    "stealguard_defense_header": "true",  # a test instance is a development deployment
}


class TorchServe(Launcher):
    """A TorchServe process serving ``models`` (names of .mar files in ``model_store``, or "all")."""

    def __init__(
        self,
        model_store: Path | str,
        workdir: Path | str,
        models: Iterable[str] | str = "all",
        properties: Mapping[str, str] | None = None,
        metrics_config: Path | str | None = None,
        token_auth: bool = False,
        env: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(
            model_store,
            workdir,
            models,
            properties={**TEST_PROPERTIES, **(properties or {})},
            metrics_config=metrics_config or (METRICS_YAML if METRICS_YAML.is_file() else None),
            token_auth=token_auth,
            worker_port=20000 + free_port() % 20000,
            jvm_args="-Xmx512m -XX:+UseSerialGC -XX:-UsePerfData",
            env={"OMP_NUM_THREADS": "1", "TS_DISABLE_SYSTEM_METRICS": "true", "STEALGUARD_SECRET": DEV_SECRET,
                 **(env or {})},
        )

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

    def register(self, mar: Path | str, workers: int = 1, timeout: float = 240.0) -> str:
        """Add the archive ``mar`` to this running instance (copied into its model store, registered through the
        management API, which must be on) and wait for its ``workers``; returns the model's name. The
        archive's own batch size and delay (its model-config.yaml) apply."""
        mar = Path(mar)
        if mar.parent.resolve() != self.model_store:
            shutil.copy(mar, self.model_store / mar.name)
        params = {"url": mar.name, "initial_workers": str(workers), "synchronous": "true"}
        r = requests.post(f"{self.management_url}/models", params=params, headers=self.token_header("management"),
                          timeout=timeout)
        if r.status_code != 200:
            raise RuntimeError(f"registering {mar.name}: {r.status_code} {r.text}\n{self.tail()}")
        name = mar.name.removesuffix(".mar")
        self.models = sorted({*(self.models or []), name} - {"all"})
        self.wait_ready(timeout)
        return name

    def unregister(self, name: str, timeout: float = 60.0) -> None:
        """Remove model ``name`` (its workers stop); a model that is not registered is not an error."""
        r = requests.delete(f"{self.management_url}/models/{name}", headers=self.token_header("management"),
                            timeout=timeout)
        if r.status_code not in (200, 404):
            raise RuntimeError(f"unregistering {name}: {r.status_code} {r.text}")
        self.models = [m for m in self.models or [] if m.removesuffix(".mar") != name]


@contextlib.contextmanager
def registered(server: TorchServe, store: Path, workers: int = 1) -> Iterator[list[str]]:
    """Every archive in ``store`` registered on ``server`` for the duration, then unregistered."""
    names: list[str] = []
    try:
        for mar in sorted(store.glob("*.mar")):
            names.append(server.register(mar, workers=workers))
        yield names
    finally:
        for name in names:
            server.unregister(name)
