"""The HTTP oracle against a real HTTP server on 127.0.0.1 serving a victim behind a defense."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from mlflow_project.lab import data
from mlflow_project.lab import evaluate as ev
from mlflow_project.lab.oracles import BudgetExceeded, HTTPOracle, LocalOracle, build_victim_defense

DEFENSE = {"name": "random_noise", "epsilon": 1.5, "norm": "l2"}


class Served:
    """A tiny prediction server in the TorchServe response shape: {"predictions": [{label, probabilities}]}."""

    def __init__(self, victim, defense):
        self.victim, self.defense = victim, defense
        self.requests = 0
        self.rows = 0
        served = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_POST(self):  # noqa: N802 (http.server's naming)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path == "/predictions/broken":
                    self.send_response(503)
                    self.end_headers()
                    self.wfile.write(b'{"message": "worker died"}')
                    return
                x = torch.tensor(body["instances"], dtype=torch.float32)
                with torch.no_grad():
                    probs = served.defense(torch.softmax(served.victim(x), 1), x).probs
                served.requests += 1
                served.rows += len(x)
                preds = [{"label": str(int(p.argmax())), "probabilities": p.tolist()} for p in probs]
                payload = json.dumps({"predictions": preds}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("X-StealGuard-Defense", "random_noise")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/predictions/victim"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def server(digits_victim):
    defense = build_victim_defense(digits_victim.model, DEFENSE, 10)
    with Served(digits_victim.model, defense) as s:
        yield s


def test_http_oracle_returns_what_the_server_returns_and_counts_rows(server, digits_victim):
    x = data.query_set("digits", digits_victim.spec)[:150]
    oracle = HTTPOracle(server.url, budget=150, batch_size=64)
    got = oracle(x)
    defense = build_victim_defense(digits_victim.model, DEFENSE, 10)
    ref = LocalOracle(digits_victim.model, defense)(x)
    assert torch.allclose(got, ref, atol=1e-6)
    assert oracle.queries == 150 == server.rows and server.requests == 3  # 64 + 64 + 22
    assert oracle.last_headers["X-StealGuard-Defense"] == "random_noise"
    with pytest.raises(BudgetExceeded):
        oracle(x[:1])
    assert server.rows == 150  # the refused query never reached the server


def test_http_errors_are_reported(server, digits_victim):
    bad = HTTPOracle(server.url.replace("/victim", "/broken"), budget=10)
    with pytest.raises(RuntimeError, match="answered HTTP 503.*worker died"):
        bad(torch.zeros(2, 64))
    assert bad.queries == 0


def test_evaluate_attacks_through_http(server, digits_victim):
    cfg = ev.EvalConfig(dataset="digits", defense=DEFENSE, attack="jbself", budget=160, epochs=2, batch_size=32,
                        oracle="http", url=server.url)
    r = ev.evaluate(cfg, victim=digits_victim, progress=False)
    assert r.metrics["queries"] == 160
    n_test = len(data.load_raw("digits", "test")[1])
    assert server.rows == 160 + n_test  # the attack's queries plus the defender-utility pass over the test set
    local = ev.evaluate(ev.EvalConfig(dataset="digits", defense=DEFENSE, attack="jbself", budget=160, epochs=2,
                                      batch_size=32), victim=digits_victim, progress=False)
    for k in ("defender_accuracy", "perturbation_l1_mean", "attacker_accuracy"):
        assert r.metrics[k] == pytest.approx(local.metrics[k], abs=1e-3), k
