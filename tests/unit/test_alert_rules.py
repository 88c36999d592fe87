"""deploy/alerts.yml: promtool checks and unit-tests it; every alert is documented, tested both ways."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from handlers.metrics import METRIC_SPECS

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
ALERTS = DEPLOY / "alerts.yml"
ALERTS_TEST = DEPLOY / "alerts_test.yml"
PROMETHEUS_YML = DEPLOY / "prometheus.yml"
OPERATIONS = ROOT / "docs" / "operations.md"
EXPECTED_ALERTS = {
    "StealGuardBudgetViolated",
    "StealGuardUtilityLossHigh",
    "StealGuardFailClosedErrors",
    "StealGuardDefenseMissing",
    "StealGuardQueryVolumeSurge",
    "StealGuardOODQueryRatioHigh",
    "StealGuardExtractionSuspected",
}
TORCHSERVE_METRICS = {"ts_inference_requests_total"}


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found: install the Debian package 'prometheus' (make setup does)")
    return path


def _run(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([_promtool(), *args], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, f"promtool {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def _rules() -> list[dict]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def test_promtool_check_rules():
    out = _run("check", "rules", str(ALERTS)).stdout
    assert f"SUCCESS: {len(_rules())} rules found" in out


def test_promtool_check_config_loads_the_rules():
    out = _run("check", "config", str(PROMETHEUS_YML)).stdout
    assert "alerts.yml" in out
    cfg = yaml.safe_load(PROMETHEUS_YML.read_text())
    targets = [t for sc in cfg["scrape_configs"] for st in sc["static_configs"] for t in st["targets"]]
    assert targets == ["127.0.0.1:8082"]


def test_promtool_test_rules():
    out = _run("test", "rules", str(ALERTS_TEST))
    assert "SUCCESS" in out.stdout + out.stderr


def test_every_alert_is_tested_firing_and_not_firing():
    doc = yaml.safe_load(ALERTS_TEST.read_text())
    firing: set[str] = set()
    silent: set[str] = set()
    for case in doc["tests"]:
        for t in case.get("alert_rule_test", []):
            (firing if t["exp_alerts"] else silent).add(t["alertname"])
    assert firing == EXPECTED_ALERTS
    assert silent == EXPECTED_ALERTS


def _slug(heading: str) -> str:
    s = heading.strip().lower()
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def test_every_alert_has_summary_description_and_an_existing_runbook_section():
    alerts = {r["alert"]: r for r in _rules() if "alert" in r}
    assert set(alerts) == EXPECTED_ALERTS
    text = OPERATIONS.read_text()
    anchors = {_slug(h) for h in re.findall(r"^#+\s+(.+)$", text, flags=re.M)}
    assert "metrics" in anchors and "alerts-and-runbooks" in anchors
    for name, rule in alerts.items():
        ann = rule["annotations"]
        assert ann.get("summary") and ann.get("description"), name
        assert ann["runbook_url"] == f"docs/operations.md#{name.lower()}", name
        assert name.lower() in anchors, f"docs/operations.md has no section for {name}"
        assert rule["labels"]["severity"] in {"page", "ticket"}


def test_rules_only_query_declared_metrics():
    declared = set(METRIC_SPECS) | TORCHSERVE_METRICS
    recorded = {r["record"] for r in _rules() if "record" in r}
    for r in _rules():
        for name in re.findall(r"\b(stealguard_\w+|ts_\w+)", r["expr"]):
            base = re.sub(r"_(bucket|count|sum)$", "", name)
            rule = r.get("alert") or r.get("record")
            assert name in declared or base in declared, f"{rule}: unknown {name}"
        for name in re.findall(r"\b(stealguard:[\w:]+)", r["expr"]):
            assert name in recorded, name
