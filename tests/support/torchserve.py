"""A private TorchServe instance for the serving, metrics and reliability tests and bench/bench_serve.py: the
product launcher (mlflow_project/ops/torchserve.py) with the tests' settings.

Each instance gets its own work directory, five free loopback ports, a free initial_worker_port, token auth off
unless asked, and settings sized for a 2-core machine (1 OMP thread, 2 netty threads, no system metrics).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from mlflow_project.ops.torchserve import METRICS_YAML, REPO, free_port
from mlflow_project.ops.torchserve import TorchServe as Launcher
from tests.dev_secret import DEV_SECRET

__all__ = ["METRICS_YAML", "REPO", "TEST_PROPERTIES", "TorchServe", "free_port"]

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
