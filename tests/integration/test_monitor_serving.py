"""The monitor in a real TorchServe: the client id arrives through the request context from the X-Client-Id
header, a flagged client is blocked (429) while others are served, the counters reach Prometheus' endpoint, and a
Redis store killed mid-traffic loses no request (every answer defended, the failures counted)."""

from __future__ import annotations

import re

import pytest
import requests
import torch

from mlflow_project.lifecycle.package import build_archive, stage
from tests.support.redis_server import RedisServer
from tests.support.torchserve import registered
from tests.support.victims import export, make_net

# A random-init MLP is unsure of random inputs (1 - max prob > 0.5 on every row): the OOD share flags a client
# after 8 rows. PRADA is kept out of the way (min_distances 5000) so the test does not depend on its statistic.
FLAG_AFTER_8 = {"ood": {"min_queries": 8, "share": 0.5}, "prada": {"min_distances": 5000, "window": 5000}}


@pytest.fixture(scope="module")
def served(tmp_path_factory, shared_torchserve):
    root = tmp_path_factory.mktemp("monitor_serving")
    redis_server = RedisServer(root / "redis").start()
    net = make_net("mlp", seed=0)
    victim = export(net, "eager", root / "src", "mlp")
    common = {"victim": victim, "defense": {"name": "identity"}, "input_spec": {"shape": [64], "max_rows": 16},
              "batch_size": 4, "max_batch_delay_ms": 20}
    monitors = {
        "mlp_block": {"store": f"sqlite:///{root}/monitor.sqlite", "action": "block", **FLAG_AFTER_8},
        "mlp_redis": {"store": redis_server.url, "action": "observe", "timeout_ms": 200, **FLAG_AFTER_8},
    }
    store = root / "store"
    for name, monitor in monitors.items():
        build_archive(name, stage(root / "stage" / name, monitor=monitor, **common), store)
    try:
        with registered(shared_torchserve, store):
            yield shared_torchserve, net, redis_server
    finally:
        redis_server.stop()


def post(server, model, x, client=None):
    headers = {"Content-Type": "application/json"}
    if client is not None:
        headers["X-Client-Id"] = client
    return requests.post(f"{server.inference_url}/predictions/{model}", json={"instances": x.tolist()},
                         headers=headers, timeout=60)


def metric(server, name: str, **labels) -> float:
    text = requests.get(f"{server.metrics_url}/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_flagged_client_is_blocked_over_http_and_others_are_served(served):
    server, net, _ = served
    g = torch.Generator().manual_seed(0)
    thief = [post(server, "mlp_block", torch.rand(4, 64, generator=g), "thief-1") for _ in range(4)]
    # 8 rows: flagged by the second request, which is already refused (the action applies from that batch on)
    assert [r.status_code for r in thief] == [200, 429, 429, 429]
    assert "too many requests" in thief[3].json()["message"] and "probabilities" not in thief[3].text
    benign = post(server, "mlp_block", torch.rand(4, 64, generator=g), "benign-1")
    anonymous = post(server, "mlp_block", torch.rand(4, 64, generator=g))
    assert benign.status_code == anonymous.status_code == 200
    x = torch.rand(2, 64, generator=g)
    got = torch.tensor([p["probabilities"] for p in post(server, "mlp_block", x, "benign-2").json()["predictions"]])
    with torch.no_grad():
        assert torch.allclose(got, torch.softmax(net(x), dim=1), atol=1e-5)
    log = server.wait_log(r"client 'thief-1' flagged for ood_share")
    assert log, "the flagged client id is in the worker log"
    assert metric(server, "stealguard_client_flags_total", model_name="mlp_block", reason="ood_share") == 1
    assert metric(server, "stealguard_errors_total", model_name="mlp_block", reason="blocked") == 3
    text = requests.get(f"{server.metrics_url}/metrics", timeout=10).text
    assert "thief-1" not in text  # no per-client label


def test_redis_killed_mid_traffic_loses_no_request(served):
    server, net, redis_server = served
    g = torch.Generator().manual_seed(1)
    answered = 0
    for i in range(20):
        if i == 8:
            redis_server.kill()
        x = torch.rand(2, 64, generator=g)
        r = post(server, "mlp_redis", x, f"client-{i % 3}")
        assert r.status_code == 200, r.text
        got = torch.tensor([p["probabilities"] for p in r.json()["predictions"]])
        with torch.no_grad():
            assert torch.allclose(got, torch.softmax(net(x), dim=1), atol=1e-5)  # the defense's (identity) answer
        answered += 1
    assert answered == 20
    errors = metric(server, "stealguard_monitor_errors_total", model_name="mlp_redis")
    assert errors == 12, errors  # every request after the kill: asked and failed, or skipped while paused
    assert re.search(r"store redis://127\.0\.0\.1:\d+/0 failed", server.model_log())
