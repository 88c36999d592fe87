"""stealguard.version in the handler (no TorchServe, no MLflow server): the version label in the header, the
metrics and the start log; resolve_at_start's validation, and its fallback rule when MLflow cannot be reached
(a closed loopback port, a non-http tracking URI). The success path against a real `mlflow server` is in
tests/integration/test_versions.py."""

from __future__ import annotations

import logging

import pytest

from handlers.errors import ConfigError
from tests.integration.torchserve import free_port
from tests.unit.test_metrics import _emitted

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
    emitted = _emitted(caplog)
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
