"""stealguard.version in the handler (no TorchServe, no MLflow server): the version label in the header, the
metrics and the start log; resolve_at_start's validation, and its fallback rule when MLflow cannot be reached
(a closed loopback port, a non-http tracking URI). The success path against a real `mlflow server` is in
tests/integration/test_versions.py; here a stand-in for its two REST endpoints serves bundles written by
mlflow_project.lifecycle.bundle, for the misinformation model of adaptive_misinformation versions."""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import torch
import yaml

from handlers.errors import ConfigError
from mlflow_project.lab import data
from mlflow_project.lab.train_victim import export_victim
from mlflow_project.lifecycle.bundle import write_bundle
from mlflow_project.lifecycle.package import misinformation_files
from plugins import build_defense
from tests.support import metrics_log
from tests.support.torchserve import free_port
from tests.support.victims import make_net

MAD = {"name": "mad_argmax", "epsilon": 0.5, "norm": "l1", "jacobian": "last_layer"}
REGISTERED = {"name": "digits-defense", "version": "3", "run_id": "abc123", "alias": "production"}


def down_uri() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there: connection refused


@pytest.mark.parametrize(
    ("version", "label"),
    [
        (REGISTERED, "digits-defense/3"),
        ({"version": 5}, "5"),
        (None, "unversioned"),
    ],
)
def test_the_version_label_in_the_header_and_every_metric(serve, version, label, caplog):
    caplog.set_level(logging.INFO, logger="ts.metrics.caching_metric")
    s = serve({"name": "random_noise", "epsilon": 1.0}, **({"version": version} if version else {}))
    assert s.one({"instances": [[0.0] * 64]}).headers["X-StealGuard-Defense"] == f"random_noise@{label}"
    emitted = metrics_log.emitted(caplog)
    names = {ln["name"] for ln in emitted}
    assert {"stealguard_defense_info", "stealguard_rows_total"} <= names
    assert {ln["labels"]["defense_version"] for ln in emitted} == {label}


def test_the_start_log_names_version_run_and_alias(serve, caplog):
    with caplog.at_level(logging.INFO, logger="handlers.stealguard_handler"):
        serve(MAD, surrogate="random", version=REGISTERED)
    line = next(r.getMessage() for r in caplog.records if "StealGuard: serving" in r.getMessage())
    assert "mad_argmax@digits-defense/3" in line and "run_id abc123" in line and "alias production" in line
    assert "[version: embedded;" in line


def test_resolve_at_start_without_alias_is_a_config_error_naming_the_field(serve):
    with pytest.raises(ConfigError, match=r"stealguard\.version.*resolve_at_start needs 'name'.*'alias'"):
        serve(MAD, surrogate="random", version={"name": "d", "version": "1", "resolve_at_start": True})
    with pytest.raises(ConfigError, match=r"stealguard\.version\.fallback"):
        serve(MAD, surrogate="random", version={**REGISTERED, "resolve_at_start": True, "fallback": "newest"})


def test_mlflow_down_with_fallback_embedded_serves_the_embedded_version(serve, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", down_uri())
    version = {**REGISTERED, "resolve_at_start": True, "fallback": "embedded"}
    with caplog.at_level(logging.INFO):
        s = serve(MAD, surrogate="random", version=version)
    a = s.one({"instances": [[0.5] * 64, [0.1] * 64]})
    assert a.status == 200 and a.headers["X-StealGuard-Defense"] == "mad_argmax@digits-defense/3"
    messages = [r.getMessage() for r in caplog.records]
    assert any("fallback 'embedded' serves embedded version 3" in m and "cannot be reached" in m for m in messages)
    assert any("[version: embedded version 3 (fallback: resolving digits-defense@production failed)" in m
               for m in messages)


def test_mlflow_down_with_fallback_fail_does_not_load(serve, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", down_uri())
    with pytest.raises(ConfigError, match=r"fallback is 'fail'.*cannot be reached"):
        serve(MAD, surrogate="random", version={**REGISTERED, "resolve_at_start": True, "fallback": "fail"})


@pytest.mark.parametrize("uri", ["sqlite:////tmp/mlflow.db", ""])
def test_a_non_http_tracking_uri_says_resolve_at_start_needs_an_mlflow_server(serve, monkeypatch, uri, caplog):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    version = {**REGISTERED, "resolve_at_start": True}  # fallback defaults to fail
    with pytest.raises(ConfigError, match=r"needs MLFLOW_TRACKING_URI to be an `mlflow server` URI"):
        serve(MAD, surrogate="random", version=version)
    with caplog.at_level(logging.ERROR):
        s = serve(MAD, surrogate="random", version={**version, "fallback": "embedded"})
    assert s.one({"instances": [[0.5] * 64]}).headers["X-StealGuard-Defense"] == "mad_argmax@digits-defense/3"
    assert any("`mlflow server` URI" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------ adaptive_misinformation's model at start

AM = {"name": "adaptive_misinformation", "tau": 1.0}  # tau = 1: every row gets the misinformation model's share
EMBEDDED_AM = {**REGISTERED, "resolve_at_start": True}


class FakeRegistry:
    """The two REST calls handlers/registry.py makes, answered from model-version directories laid out as MLflow
    stores a registered defense (MLmodel + artifacts/bundle/...)."""

    def __init__(self, root: Path) -> None:
        self.root, self.alias = root, {}
        registry = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                url = urlparse(self.path)
                q = {k: v[0] for k, v in parse_qs(url.query).items()}
                if url.path == "/api/2.0/mlflow/registered-models/alias" and q["alias"] in registry.alias:
                    body = json.dumps({"model_version": {"version": registry.alias[q["alias"]], "run_id": "r"}})
                    return self.answer(200, body.encode())
                path = registry.root / q.get("version", "?") / q.get("path", "?")
                if url.path == "/model-versions/get-artifact" and path.is_file():
                    return self.answer(200, path.read_bytes())
                return self.answer(404, json.dumps({"message": f"no {self.path}"}).encode())

            def answer(self, code: int, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add(self, version: str, defense: dict, victim_dir: Path, misinformation_dir: Path | None = None) -> Path:
        root = self.root / version
        (root / "MLmodel").parent.mkdir(parents=True, exist_ok=True)
        (root / "MLmodel").write_text(yaml.safe_dump(
            {"flavors": {"python_function": {"artifacts": {"bundle": {"path": "artifacts/bundle"}}}}}))
        return write_bundle(root / "artifacts" / "bundle", defense, victim_dir, misinformation_dir=misinformation_dir)


def _export(root: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    export_victim(make_net("mlp", seed=seed), "mlp", data.input_spec("digits", "mlp"), root / str(seed), check=False,
                  runtimes=False)
    return root / str(seed)


@pytest.fixture
def am_registry(tmp_path, monkeypatch):
    """A registry whose production alias can be moved, two misinformation exports A and B, and a victim export."""
    fake = FakeRegistry(tmp_path / "versions")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", fake.url)
    exports = tmp_path / "exports"
    yield fake, {"victim": _export(exports, 0), "A": _export(exports, 11), "B": _export(exports, 12)}
    fake.server.shutdown()


def _serve_am(serve, mis_dir: Path, **version):
    return serve(AM, misinformation=misinformation_files(mis_dir, "eager"), version={**EMBEDDED_AM, **version})


def _am_probs(s, mis_dir: Path, x: torch.Tensor) -> torch.Tensor:
    state = torch.load(mis_dir / "state_dict.pt", weights_only=True)
    net = make_net("mlp")
    net.load_state_dict(state)
    return build_defense(AM, misinformation=net.eval(), num_classes=10)(s.victim_probs(x), x).probs


def _answer(s, x: torch.Tensor):
    a = s.one({"instances": x.tolist()})
    assert a.status == 200, a.body
    return a.headers["X-StealGuard-Defense"], torch.tensor([p["probabilities"] for p in a.json["predictions"]],
                                                           dtype=torch.float64)


def test_resolve_at_start_serves_the_versions_own_misinformation_model(serve, am_registry, caplog):
    fake, d = am_registry
    fake.add("4", AM, d["victim"], d["B"])
    fake.alias["production"] = "4"
    with caplog.at_level(logging.INFO):
        s = _serve_am(serve, d["A"])  # the archive embeds version 3 with model A
    x = torch.rand(6, 64, generator=torch.Generator().manual_seed(5))
    header, got = _answer(s, x)
    assert header == "adaptive_misinformation@digits-defense/4"
    torch.testing.assert_close(got, _am_probs(s, d["B"], x), rtol=0, atol=1e-9)
    assert not torch.allclose(got, _am_probs(s, d["A"], x), atol=1e-3)  # never the embedded model
    assert any("-> version 4 (embedded version 3 not used)" in r.getMessage() for r in caplog.records)


def test_a_version_without_misinformation_drops_the_embedded_model(serve, am_registry):
    fake, d = am_registry
    fake.add("5", {"name": "reverse_sigmoid", "beta": 0.5}, d["victim"])
    fake.alias["production"] = "5"
    header, got = _answer(_serve_am(serve, d["A"]), torch.rand(3, 64))
    assert header == "reverse_sigmoid@digits-defense/5"
    torch.testing.assert_close(got.sum(1), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-6)


def test_an_adaptive_misinformation_bundle_without_its_model_fails_or_falls_back(serve, am_registry, caplog):
    fake, d = am_registry
    bundle = fake.add("6", AM, d["victim"], d["B"])
    doc = json.loads((bundle / "defense.json").read_text())
    (bundle / "defense.json").write_text(json.dumps({**doc, "misinformation": None}))  # as if registered without
    fake.alias["production"] = "6"
    with pytest.raises(ConfigError, match=r"fallback is 'fail'.*version 6's defense 'adaptive_misinformation' "
                                          r"needs a misinformation model but its bundle carries none"):
        _serve_am(serve, d["A"], fallback="fail")
    with caplog.at_level(logging.ERROR):
        s = _serve_am(serve, d["A"], fallback="embedded")
    x = torch.rand(4, 64, generator=torch.Generator().manual_seed(6))
    header, got = _answer(s, x)
    assert header == "adaptive_misinformation@digits-defense/3"
    torch.testing.assert_close(got, _am_probs(s, d["A"], x), rtol=0, atol=1e-9)
    assert any("fallback 'embedded' serves embedded version 3" in r.getMessage() for r in caplog.records)
