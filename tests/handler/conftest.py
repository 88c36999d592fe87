"""Handler tests without a server: stage an archive's contents, build a real ``ts.context.Context`` with a
``MetricsCacheYamlImpl`` over deploy/metrics.yaml, call ``initialize``/``handle`` directly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from handlers.stealguard_handler import StealGuardHandler
from mlflow_project.lifecycle.package import ModelFiles, stage
from tests.support.handler import Served, make_context
from tests.support.victims import export, make_net


@pytest.fixture
def serve(tmp_path: Path):
    """serve(defense=..., arch=..., runtime=..., **stage kwargs) -> an initialised Served."""
    counter = iter(range(1000))

    def _serve(
        defense: dict | None = None,
        arch: str = "mlp",
        runtime: str = "eager",
        surrogate: ModelFiles | str | None = None,
        input_spec: dict | None = None,
        metrics: Any = None,
        edit: Any = None,
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
        handler.initialize(context)
        return Served(handler, context, net)

    return _serve
