"""Real TorchServe (2 workers) + real Prometheus on loopback: what PromQL returns equals what was served.

After N requests carrying R rows in all, Prometheus (scraping TorchServe's metrics address every second and
loading deploy/alerts.yml) must return R for ``stealguard_rows_total`` and for the count of every perturbation
histogram, and for ``stealguard_top1_flips_total`` the number of rows whose returned top-1 class differs from
the victim's own (recomputed here from the same victim weights). The per-stage latency histograms have one
observation per stage and batch, and their sums add up to the handler's total within 10 %. The worker logs
show that both workers served rows and that their per-worker amounts add up to R.
"""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch

from mlflow_project.lifecycle.package import build_archive, stage
from mlflow_project.ops.prometheus import Prometheus, scrape_config
from tests.support.torchserve import REPO, TorchServe
from tests.support.victims import export, make_net

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "sgmetrics"
VERSION = "5"
DEFENSE = {"name": "mad", "epsilon": 0.02, "norm": "l2"}
DASHBOARD = REPO / "deploy" / "grafana" / "stealguard.json"
WORKER_ROWS = re.compile(r"(W-\d+)-[^ ]*-stdout.*\[METRICS\]stealguard_rows_total\.Count:([0-9.]+)")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    work = tmp_path_factory.mktemp("metrics_prom")
    net = make_net("mlp", 10, seed=3)
    victim = export(net, "eager", work / "victim", "mlp")
    staged = work / "staged"
    stage(
        staged,
        victim=victim,
        defense=DEFENSE,
        input_spec={"shape": list(net.input_shape), "max_rows": 64},
        surrogate=export(make_net("mlp", 10, seed=11), "eager", work / "surrogate", "mlp"),
        version={"name": "sg-metrics-test", "version": VERSION},
        batch_size=4,
        max_batch_delay_ms=20,
        workers=2,
    )
    build_archive(MODEL, staged, work / "store")
    # java.io.tmpdir holds the worker sockets (.ts.sock.<port>): private, so parallel instances cannot collide
    (work / "ts" / "tmp").mkdir(parents=True, exist_ok=True)
    vmargs = f"-Xmx512m -XX:+UseSerialGC -XX:-UsePerfData -Djava.io.tmpdir={work / 'ts' / 'tmp'}"
    ts = TorchServe(work / "store", work / "ts", models=[MODEL], properties={"vmargs": vmargs})
    ts.start(timeout=240)
    prom = None
    try:
        prom = Prometheus(work / "prom", scrape_config([f"127.0.0.1:{ts.ports['metrics']}"], 1)).start()
        yield net, ts, prom
    finally:
        if prom is not None:
            prom.stop()
        ts.stop()


def _inputs(net, n: int, seed: int) -> torch.Tensor:
    """n inputs whose victim top-1 is clear (gap > 1e-4), so recomputing it here cannot disagree."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((4 * n, *net.input_shape), generator=g)
    with torch.inference_mode():
        p = torch.softmax(net(x).to(torch.float64), dim=1)
    top2 = p.topk(2, dim=1).values
    keep = (top2[:, 0] - top2[:, 1]) > 1e-4
    assert int(keep.sum()) >= n
    return x[keep][:n]


def _post(ts: TorchServe, x: torch.Tensor) -> requests.Response:
    return requests.post(
        f"{ts.inference_url}/predictions/{MODEL}",
        data=json.dumps({"instances": x.tolist()}),
        headers={"Content-Type": "application/json"},
        timeout=60,
    )


def _worker_rows(ts: TorchServe) -> dict[str, float]:
    """Rows per worker, from the [METRICS] lines each worker printed, as the frontend's console log shows them
    (torchserve.out: once per line; TorchServe's ts_log.log writes every line twice)."""
    log = ts.workdir / "torchserve.out"
    text = log.read_text(errors="replace") if log.is_file() else ""
    rows: dict[str, float] = {}
    for m in WORKER_ROWS.finditer(text):
        rows[m[1]] = rows.get(m[1], 0.0) + float(m[2])
    return rows


def test_promql_counts_equal_what_was_served(served):
    net, ts, prom = served
    sizes = [1, 3, 2, 5, 4, 1, 2, 3] * 3  # N = 24 requests
    batches = [_inputs(net, n, seed=100 + i) for i, n in enumerate(sizes)]
    served_rows = 0
    flips = 0
    with ThreadPoolExecutor(max_workers=6) as pool:
        responses = list(pool.map(lambda x: _post(ts, x), batches))
    for x, r in zip(batches, responses, strict=True):
        assert r.status_code == 200, r.text
        assert r.headers.get("X-StealGuard-Defense", "").endswith(f"@sg-metrics-test/{VERSION}"), r.headers
        got = torch.tensor([p["probabilities"] for p in r.json()["predictions"]], dtype=torch.float64)
        with torch.inference_mode():
            y = torch.softmax(net(x).to(torch.float64), dim=1)
        served_rows += x.shape[0]
        flips += int((got.argmax(dim=1) != y.argmax(dim=1)).sum())
    # make sure both workers answered some rows (TorchServe picks the worker): keep sending bursts until so
    extra = 0
    while len([w for w, n in _worker_rows(ts).items() if n > 0]) < 2 and extra < 20:
        with ThreadPoolExecutor(max_workers=4) as pool:
            more = [_inputs(net, 2, seed=1000 + extra * 4 + k) for k in range(4)]
            rs = list(pool.map(lambda x: _post(ts, x), more))
        for x, r in zip(more, rs, strict=True):
            assert r.status_code == 200, r.text
            got = torch.tensor([p["probabilities"] for p in r.json()["predictions"]], dtype=torch.float64)
            with torch.inference_mode():
                y = torch.softmax(net(x).to(torch.float64), dim=1)
            served_rows += x.shape[0]
            flips += int((got.argmax(dim=1) != y.argmax(dim=1)).sum())
        extra += 1
        time.sleep(0.5)
    bad = requests.post(
        f"{ts.inference_url}/predictions/{MODEL}", data=b'{"instances": "nope"}',
        headers={"Content-Type": "application/json"}, timeout=30,
    )
    assert 400 <= bad.status_code < 500, bad.text

    assert 0 < flips < served_rows, (flips, served_rows)  # the flip check below distinguishes rows
    sel = f'{{model_name="{MODEL}",defense="mad",defense_version="sg-metrics-test/{VERSION}"}}'
    assert prom.wait_for(f"sum(stealguard_rows_total{sel})", served_rows) == served_rows
    assert prom.wait_for("sum(stealguard_errors_total{reason=\"bad_input\"})", 1) == 1
    assert prom.scalar(f"sum(stealguard_perturbation_l1_count{sel})") == served_rows
    assert prom.scalar(f"sum(stealguard_perturbation_l2_count{sel})") == served_rows  # the configured norm
    assert prom.scalar(f"sum(stealguard_top1_confidence_drop_count{sel})") == served_rows
    assert prom.scalar(f"sum(stealguard_angular_deviation_radians_count{sel})") == served_rows
    assert prom.scalar(f"sum(stealguard_top1_flips_total{sel})") == flips
    assert prom.scalar(f"sum(stealguard_budget_violations_total{sel})") == 0
    # every row is within the l2 budget 0.02: all of them sit in the buckets up to 0.025
    in_budget = f'sum(stealguard_perturbation_l2_bucket{{le="0.025",model_name="{MODEL}"}})'
    assert prom.scalar(in_budget) == served_rows
    # latency: one observation per defended batch; at least one, at most one per row
    batches_seen = prom.scalar(f"sum(stealguard_defense_latency_seconds_count{sel})")
    assert 1 <= batches_seen <= served_rows
    # where the time goes: one observation per stage and per batch, and the stages' sums add up to the handler's
    # total (the handler's glue is the difference) within 10 %
    handler_count = prom.scalar(f"sum(stealguard_handler_latency_milliseconds_count{sel})")
    assert handler_count == batches_seen
    stage_sel = sel[:-1] + ',stage=~".+"}'
    by_stage = prom.query(f"sum by (stage) (stealguard_stage_latency_milliseconds_count{stage_sel})")
    counts = {r["metric"]["stage"]: float(r["value"][1]) for r in by_stage}
    assert counts == dict.fromkeys(("decode", "victim", "surrogate", "defense", "encode", "metrics"), batches_seen)
    stages_ms = prom.scalar(f"sum(stealguard_stage_latency_milliseconds_sum{sel})")
    total_ms = prom.scalar(f"sum(stealguard_handler_latency_milliseconds_sum{sel})")
    assert 0 < stages_ms <= total_ms * 1.0001 and stages_ms >= 0.9 * total_ms, (stages_ms, total_ms)
    sums = {r["metric"]["stage"]: float(r["value"][1])
            for r in prom.query(f"sum by (stage) (stealguard_stage_latency_milliseconds_sum{stage_sel})")}
    assert sums["victim"] > 0 and sums["surrogate"] > 0 and sums["defense"] > 0, sums
    info = prom.query(f"stealguard_defense_info{sel}")
    assert len(info) == 1 and info[0]["value"][1] == "1"
    assert info[0]["metric"]["budget"] == "l2<=0.02"

    # the sums over workers: both workers emitted rows, and their amounts add up to what Prometheus has
    per_worker = _worker_rows(ts)
    assert len([n for n in per_worker.values() if n > 0]) >= 2, per_worker
    assert sum(per_worker.values()) == served_rows

    # deploy/alerts.yml loads in a real Prometheus and evaluates cleanly against the real series
    deadline = time.monotonic() + 30
    while True:
        groups = requests.get(f"{prom.url}/api/v1/rules", timeout=10).json()["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        if rules and all(r.get("lastEvaluation", "").startswith("2") and r["health"] == "ok" for r in rules):
            break
        assert time.monotonic() < deadline, [(r["name"], r["health"], r.get("lastError")) for r in rules]
        time.sleep(0.5)
    assert {r["name"] for r in rules if r["type"] == "alerting"} >= {"StealGuardDefenseMissing"}
    missing = prom.query(
        f'sum by (model_name) (rate(ts_inference_requests_total{{model_name="{MODEL}"}}[5m])) > 0 '
        "unless on (model_name) max by (model_name) (stealguard_defense_info)"
    )
    assert missing == []  # the defended model is not reported as undefended
    assert prom.query(f'ts_inference_requests_total{{model_name="{MODEL}"}}')  # ... though it served requests

    # every Grafana query is valid PromQL for this Prometheus, and the per-model panels show this model
    dash = json.loads(DASHBOARD.read_text())
    # rate() needs two scrapes of the series inside its window
    scrapes = f'count_over_time(stealguard_rows_total{{model_name="{MODEL}"}}[1m]) >= bool 3'
    assert prom.wait_for(scrapes, 1) == 1
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$model_name", MODEL).replace("$__rate_interval", "1m")
            result = prom.query(expr)  # raises on a PromQL error
            if "stealguard_rows_total" in expr and "rate(" in expr:
                assert result, f"panel {panel['title']!r}: no data for {expr}"
