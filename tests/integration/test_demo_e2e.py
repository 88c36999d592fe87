"""`make demo` end to end at tiny settings: digits / MLP victim, the tiny sweep, a tmp SQLite MLflow store, two
archives, a real TorchServe and a real Prometheus on free loopback ports, a 300-query Knockoff attack over HTTP.

The table's numbers must be real: the defended archive's answers differ from its undefended twin's, the twin's
mean L1 is ~0 while the defended one's is not, the header names the registered and promoted version, and
Prometheus scraped stealguard_rows_total > 0. Every server the demo started is stopped here by its pid.
"""

from __future__ import annotations

import os
import shutil

import pytest
from mlflow.tracking import MlflowClient

from mlflow_project.lab.data import load_raw
from mlflow_project.ops.demo import DemoConfig, run
from mlflow_project.ops.processes import stop_group
from tests.support.torchserve import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _kill_group(pid_file) -> None:
    if not pid_file.is_file():
        return
    stop_group(int(pid_file.read_text().strip()), 20.0)


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="Debian package prometheus not installed")
def test_demo_pipeline_tiny(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ports = {free_port() for _ in range(12)}
    assert len(ports) >= 7
    p = sorted(ports)
    cfg = DemoConfig(
        dataset="digits", arch="mlp", victim_dir=str(tmp_path / "victim"), victim_epochs=8, preset="tiny",
        attack_budget=300, attack_epochs=3, tracking_uri=uri, model_store=str(tmp_path / "store"),
        run_dir=str(tmp_path / "run"), results_dir=str(tmp_path / "sweep"), inference_port=p[0],
        management_port=p[1], metrics_port=p[2], grpc_inference_port=p[3], grpc_management_port=p[4],
        worker_port=20000 + p[5] % 20000, prometheus_port=p[6], scrape_interval_s=1, keep_running=True,
        progress=False,
    )
    try:
        res = run(cfg)
        out = capsys.readouterr().out
        # the servers were left running: they answer and their pid files are where `make stop` looks
        assert (tmp_path / "run" / "serve" / "torchserve.pid").is_file()
        assert (tmp_path / "run" / "prometheus.pid").is_file()
        ts_pid = int((tmp_path / "run" / "serve" / "torchserve.pid").read_text())
        os.killpg(ts_pid, 0)
    finally:
        _kill_group(tmp_path / "run" / "prometheus.pid")
        _kill_group(tmp_path / "run" / "serve" / "torchserve.pid")

    reg = res["registered"]
    client = MlflowClient(uri)
    prod = client.get_model_version_by_alias(reg["name"], "production")
    assert str(prod.version) == reg["version"]
    assert client.get_model_version(*res["victim"]).name == "digits_mlp"

    m_def, m_twin = res["metrics"][res["defended"]], res["metrics"][res["twin"]]
    # the twin returns the victim's own probabilities; the defended archive perturbs them
    assert m_twin["perturbation_l1_mean"] < 1e-4
    assert m_def["perturbation_l1_mean"] > 1e-3
    assert m_def["queries"] == m_twin["queries"] == 300
    print(out)
    for m in (m_def, m_twin):
        assert 0.5 < m["defender_accuracy"] <= 1.0
        n_test = len(load_raw("digits", "test")[1])  # the clone's accuracy: a fraction of the test set's images
        assert m["attacker_accuracy"] * n_test == pytest.approx(round(m["attacker_accuracy"] * n_test), abs=1e-3)
    assert m_twin["attacker_accuracy"] > 0.3  # an undefended 300-query Knockoff clone learns something
    assert m_twin["defender_accuracy"] == pytest.approx(m_twin["victim_accuracy"], abs=1e-9)
    defended_probs, header = res["answers"][res["defended"]]
    twin_probs, _ = res["answers"][res["twin"]]
    pairs = zip(defended_probs, twin_probs, strict=True)
    diff = max(abs(a - b) for ra, rb in pairs for a, b in zip(ra, rb, strict=True))
    assert diff > 1e-3
    # the response header and the printed table name the registered version
    assert header.endswith(f"@{reg['name']}/{reg['version']}"), header
    assert f"{reg['name']} version {reg['version']} @production" in res["table"]
    assert res["table"] in out
    for key in ("defender_accuracy", "attacker_accuracy", "perturbation_l1_mean"):
        assert f"{m_def[key]:.4f}" in res["table"] and f"{m_twin[key]:.4f}" in res["table"]
    assert "make stop" in out and "mlflow ui --backend-store-uri " + uri in out
    # Prometheus scraped the rows TorchServe served
    assert res["rows_seen"] is not None and res["rows_seen"] > 0
