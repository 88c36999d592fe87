"""deploy/grafana/stealguard.json parses, queries only declared metrics, has a panel per metric family and
draws the alert thresholds."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from handlers.metrics import METRIC_SPECS

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "stealguard.json"
METRICS_YAML = ROOT / "deploy" / "metrics.yaml"
ALERTS = ROOT / "deploy" / "alerts.yml"

METRIC_NAME = re.compile(r"\b((?:stealguard|ts)_[A-Za-z0-9_]+)\b")
RECORDED_NAME = re.compile(r"\b(stealguard:[A-Za-z0-9_:]+)")
HISTOGRAM_SUFFIX = re.compile(r"_(bucket|count|sum)$")


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _panels(d: dict) -> list[dict]:
    out = []
    for p in d["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def _queries(d: dict) -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in _panels(d) for t in p.get("targets", [])]


def _declared() -> set[str]:
    doc = yaml.safe_load(METRICS_YAML.read_text())
    names = set()
    for section in ("ts_metrics", "model_metrics"):
        for entries in doc[section].values():
            names |= {e["name"] for e in entries}
    return names


def _records() -> dict[str, str]:
    doc = yaml.safe_load(ALERTS.read_text())
    return {r["record"]: r["expr"] for g in doc["groups"] for r in g["rules"] if "record" in r}


def _alert_threshold(alert: str) -> float:
    doc = yaml.safe_load(ALERTS.read_text())
    expr = next(r["expr"] for g in doc["groups"] for r in g["rules"] if r.get("alert") == alert)
    return float(re.search(r">\s*([0-9.]+)\s*$", expr.strip())[1])


def _metrics_in(expr: str, records: dict[str, str]) -> set[str]:
    names = set(METRIC_NAME.findall(expr))
    for rec in RECORDED_NAME.findall(expr):
        assert rec in records, f"query uses {rec}, which deploy/alerts.yml does not record"
        names |= _metrics_in(records[rec], records)
    return names


def test_dashboard_parses_and_is_well_formed():
    d = _dashboard()
    assert d["title"] and d["uid"] == "stealguard"
    ids = [p["id"] for p in _panels(d)]
    assert len(ids) == len(set(ids))
    assert all(p.get("targets") for p in _panels(d) if p["type"] != "row")
    assert {v["name"] for v in d["templating"]["list"]} >= {"datasource", "model_name"}


def test_every_query_names_a_declared_metric():
    declared = _declared()
    records = _records()
    for title, expr in _queries(_dashboard()):
        names = _metrics_in(expr, records)
        assert names, f"panel {title!r}: query names no metric: {expr}"
        for name in names:
            base = HISTOGRAM_SUFFIX.sub("", name)
            assert name in declared or base in declared, f"panel {title!r}: {name} not in deploy/metrics.yaml"


def test_every_metric_family_has_a_panel():
    records = _records()
    used = set()
    for _, expr in _queries(_dashboard()):
        used |= {HISTOGRAM_SUFFIX.sub("", n) for n in _metrics_in(expr, records)}
    missing = set(METRIC_SPECS) - used
    assert not missing, f"no panel for {sorted(missing)}"


def _threshold_steps(title_part: str) -> list[float]:
    panel = next(p for p in _panels(_dashboard()) if title_part in p["title"])
    steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
    return [s["value"] for s in steps if s["value"] is not None]


def test_alert_thresholds_are_drawn():
    assert _alert_threshold("StealGuardUtilityLossHigh") in _threshold_steps("flip ratio")
    assert _alert_threshold("StealGuardFailClosedErrors") in _threshold_steps("Errors")
    assert _threshold_steps("Budget violations") == [1]  # any violation is red
    surge = next(p for p in _panels(_dashboard()) if p["title"].startswith("Rows answered"))
    assert any("5 * stealguard:rows_by_model:rate1d_baseline" in t["expr"] for t in surge["targets"])
    alerts = yaml.safe_load(ALERTS.read_text())
    rules = [r for g in alerts["groups"] for r in g["rules"]]
    surge_rule = next(r for r in rules if r.get("alert") == "StealGuardQueryVolumeSurge")
    assert "> 5 * stealguard:rows_by_model:rate1d_baseline" in surge_rule["expr"]
    ood_rule = next(r for r in rules if r.get("alert") == "StealGuardOODQueryRatioHigh")
    assert "> 3 * stealguard:ood_query_ratio:rate1d_baseline" in ood_rule["expr"]
    assert _alert_threshold("StealGuardOODQueryRatioHigh") in _threshold_steps("Out-of-distribution")
    ood = next(p for p in _panels(_dashboard()) if p["title"].startswith("Out-of-distribution"))
    assert any("3 * stealguard:ood_query_ratio:rate1d_baseline" in t["expr"] for t in ood["targets"])


def test_flagged_clients_panel_draws_the_extraction_alert():
    rules = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    rule = next(r for r in rules if r.get("alert") == "StealGuardExtractionSuspected")
    assert rule["expr"].strip() == "max by (model_name) (stealguard_clients_flagged) > 0"
    assert _threshold_steps("Flagged clients") == [1]  # one flagged client is red, as the alert fires
    panel = next(p for p in _panels(_dashboard()) if p["title"].startswith("Flagged clients"))
    exprs = [t["expr"] for t in panel["targets"]]
    assert any(e.startswith("max by (model_name) (stealguard_clients_flagged") for e in exprs)
    assert any("stealguard_monitor_errors_total" in e for e in exprs)
