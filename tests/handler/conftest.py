"""Handler tests without a server: stage an archive's contents, build a real ``ts.context.Context`` with a
``MetricsCacheYamlImpl`` over deploy/metrics.yaml, call ``initialize``/``handle`` directly."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from ts.context import Context, RequestProcessor
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

from handlers.config import RuntimeSpec
from handlers.stealguard_handler import StealGuardHandler
from mlflow_project.lifecycle.package import stage
from tests.integration.torchserve import METRICS_YAML
from tests.integration.victims import export, make_net


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


class Served:
    """An initialised handler over a staged model directory, with helpers to send it batches."""

    def __init__(self, handler: StealGuardHandler, context: Context, net: torch.nn.Module) -> None:
        self.handler = handler
        self.context = context
        self.net = net

    def batch(self, requests: Sequence[tuple[Any, str | None]]) -> list[Answer]:
        """Send one TorchServe batch: (body, content type) per request, as the worker's Service would."""
        data, processors = [], []
        for body, ctype in requests:
            data.append({"body": body})
            processors.append(RequestProcessor({"body": {"content-type": ctype or ""}}))
        self.context.request_processor = processors
        self.context.request_ids = {i: f"req-{i}" for i in range(len(requests))}
        out = self.handler.handle(data, self.context)
        assert len(out) == len(requests)
        answers = []
        for i, body in enumerate(out):
            code, _ = self.context.get_response_status(i)
            answers.append(Answer(code or 200, dict(self.context.get_response_headers(i)), body))
        return answers

    def one(self, body: Any, ctype: str | None = "application/json") -> Answer:
        return self.batch([(body, ctype)])[0]

    def victim_probs(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.softmax(self.net(x).double(), dim=1)


def metrics_cache() -> MetricsCacheYamlImpl:
    cache = MetricsCacheYamlImpl(str(METRICS_YAML))
    cache.initialize_cache()
    return cache


def make_context(model_dir: Path, config_path: Path, metrics: Any = None, name: str = "victim") -> Context:
    return Context(
        name,
        str(model_dir),
        {"model": {"modelName": name, "handler": "stealguard_handler.py", "configFile": "model-config.yaml"}},
        8,
        None,
        "0.12.0",
        metrics=metrics if metrics is not None else metrics_cache(),
        model_yaml_config=yaml.safe_load(config_path.read_text()),
    )


@pytest.fixture
def serve(tmp_path: Path):
    """serve(defense=..., arch=..., runtime=..., **stage kwargs) -> an initialised Served."""
    counter = iter(range(1000))

    def _serve(
        defense: dict | None = None,
        arch: str = "mlp",
        runtime: str = "eager",
        surrogate: RuntimeSpec | str | None = None,
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
