"""mlflow_project.ops.prometheus, the one Prometheus launcher (`make monitor` / `make stop`, the demo, the
integration tests): the CLI starts the production deploy/prometheus.yml on a free loopback port with its alert
rules, refuses a second start, stops the whole process group and removes the pid file; a broken config says why
and leaves nothing running; a PromQL error raises with Prometheus' message."""

from __future__ import annotations

import shutil

import pytest
import requests

from mlflow_project.ops import processes
from mlflow_project.ops import prometheus as pl
from mlflow_project.ops.torchserve import free_port

pytestmark = pytest.mark.skipif(shutil.which(pl.BINARY) is None, reason="Debian package prometheus not installed")


def test_cli_start_serves_the_production_config_with_its_rules_and_stop_stops_it(tmp_path, capsys):
    listen = f"127.0.0.1:{free_port()}"
    pid_file = tmp_path / "prometheus.pid"
    argv = ["start", "--config", str(pl.PROD_CONFIG), "--workdir", str(tmp_path / "prom"), "--listen", listen,
            "--pid-file", str(pid_file), "--stop-command", "make stop"]
    assert pl.main(argv) == 0
    pid = processes.read_pid(pid_file)
    try:
        out = capsys.readouterr().out
        assert f"Prometheus ready on http://{listen} (pid {pid}" in out and "stop it with: make stop" in out
        rules = requests.get(f"http://{listen}/api/v1/rules", timeout=10).json()["data"]["groups"]
        names = {r["name"] for g in rules for r in g["rules"]}
        assert {"StealGuardDefenseMissing", "StealGuardExtractionSuspected"} <= names  # alerts.yml, relative path
        assert pl.main(argv) == 0  # already running: says so, starts nothing
        assert f"Prometheus already running (pid {pid})" in capsys.readouterr().out
    finally:
        assert pl.main(["stop", "--pid-file", str(pid_file), "--timeout", "10"]) == 0
    assert f"Prometheus (pid {pid}) stopped" in capsys.readouterr().out
    assert not pid_file.exists() and not processes.group_alive(pid)
    assert pl.main(["stop", "--pid-file", str(pid_file)]) == 0
    assert f"Prometheus is not running (no {pid_file})" in capsys.readouterr().out


def test_a_broken_config_says_why_and_leaves_nothing_running(tmp_path, capsys):
    bad = tmp_path / "bad.yml"
    bad.write_text("scrape_configs:\n  - job_name: x\n    static_configs: [{targets: 7}]\n")
    pid_file = tmp_path / "p.pid"
    argv = ["start", "--config", str(bad), "--workdir", str(tmp_path / "prom"), "--listen",
            f"127.0.0.1:{free_port()}", "--pid-file", str(pid_file), "--timeout", "20"]
    assert pl.main(argv) == 1
    assert "prometheus exited with code" in capsys.readouterr().out
    assert not pid_file.exists()
    assert pl.main([*argv[:2], str(tmp_path / "missing.yml"), *argv[3:]]) == 1
    assert "no such file" in capsys.readouterr().out


def test_queries_and_a_promql_error(tmp_path):
    conf = pl.scrape_config([f"127.0.0.1:{free_port()}"], 1, labels={"environment": "test"})
    assert conf["scrape_configs"][0]["static_configs"] == [{"targets": conf["scrape_configs"][0]["static_configs"]
                                                             [0]["targets"], "labels": {"environment": "test"}}]
    with pl.Prometheus(tmp_path / "prom", conf) as prom:
        assert prom.url.startswith("http://127.0.0.1:")
        assert prom.scalar("vector(3)") == 3.0
        assert prom.scalar("absent_metric_name_xyz") is None
        with pytest.raises(ValueError, match="at most one was expected"):
            prom.scalar('label_replace(vector(1), "a", "x", "", "") or label_replace(vector(2), "a", "y", "", "")')
        with pytest.raises(ValueError, match=r"PromQL 'sum\(': HTTP 400"):
            prom.query("sum(")
        pid = prom.proc.pid
    assert not processes.group_alive(pid)
