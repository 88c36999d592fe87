"""A StealGuard handler without a server: a real ``ts.context.Context`` (with a ``MetricsCacheYamlImpl`` over
deploy/metrics.yaml) over a staged model directory, and ``Served`` to send it TorchServe batches."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from ts.context import Context, RequestProcessor
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

from handlers.stealguard_handler import StealGuardHandler
from tests.support.torchserve import METRICS_YAML


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
