"""Handler tests without a server: stage an archive's contents, build a real ``ts.context.Context`` with a
``MetricsCacheYamlImpl`` over deploy/metrics.yaml, call ``initialize``/``handle`` directly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from ts.context import Context

from handlers.config import RuntimeSpec
from handlers.stealguard_handler import StealGuardHandler
from mlflow_project.lifecycle.package import stage
from tests.dev_secret import DEV_SECRET
from tests.support.handler import Served, make_context
from tests.support.torchserve import REPO
from tests.support.victims import export, make_net

DEV_CONFIG = REPO / "deploy" / "config.dev.properties"
PROD_CONFIG = REPO / "deploy" / "config.properties"
SECRET_ENV = ("STEALGUARD_SECRET", "STEALGUARD_SECRET_FILE", "TS_CONFIG_FILE")


@pytest.fixture(autouse=True)
def dev_deployment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every handler test runs in a development deployment unless it says otherwise: the dev TorchServe config
    (X-StealGuard-Defense on) and the tests' explicit dev secret in STEALGUARD_SECRET."""
    for name in SECRET_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("STEALGUARD_SECRET", DEV_SECRET)
    monkeypatch.setenv("TS_CONFIG_FILE", str(DEV_CONFIG))


def initialize(handler: StealGuardHandler, context: Context, monkeypatch: pytest.MonkeyPatch,
               secret: str | None = DEV_SECRET, ts_config: Path | None = DEV_CONFIG) -> None:
    """``handler.initialize(context)`` in a deployment that supplies ``secret`` in STEALGUARD_SECRET (None: no
    secret anywhere) under TorchServe config ``ts_config`` (TS_CONFIG_FILE; the dev config by default)."""
    with monkeypatch.context() as m:
        for name in SECRET_ENV:
            m.delenv(name, raising=False)
        if secret is not None:
            m.setenv("STEALGUARD_SECRET", secret)
        if ts_config is not None:
            m.setenv("TS_CONFIG_FILE", str(ts_config))
        handler.initialize(context)


@pytest.fixture
def serve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """serve(defense=..., arch=..., runtime=..., secret=DEV_SECRET, ts_config=<dev config>, **stage kwargs) ->
    an initialised Served."""
    counter = iter(range(1000))

    def _serve(
        defense: dict | None = None,
        arch: str = "mlp",
        runtime: str = "eager",
        surrogate: RuntimeSpec | str | None = None,
        input_spec: dict | None = None,
        metrics: Any = None,
        edit: Any = None,
        secret: str | None = DEV_SECRET,
        ts_config: Path | None = DEV_CONFIG,
        **kwargs: Any,
    ) -> Served:
        root = tmp_path / f"m{next(counter)}"
        net = make_net(arch)
        victim = export(net, runtime, root / "src", arch)
        if surrogate == "random":
            surrogate = export(make_net(arch, seed=123), "eager", root / "src_sur", arch)
        spec = input_spec or {"shape": list(net.input_shape), "max_rows": 8}
        config = stage(
            root / "model",
            victim=victim,
            defense=defense or {"name": "identity"},
            input_spec=spec,
            surrogate=surrogate,
            **kwargs,
        )
        if edit is not None:  # mutate the staged model-config.yaml (for config-error tests)
            data = yaml.safe_load(config.read_text())
            edit(data)
            config.write_text(yaml.safe_dump(data))
        handler = StealGuardHandler()
        context = make_context(root / "model", config, metrics)
        initialize(handler, context, monkeypatch, secret, ts_config)
        return Served(handler, context, net)

    return _serve
