"""The handler with a monitor: section: client id from the configured header through TorchServe's request
context, observe / harden / block for a flagged client, metrics without a per-client label, a store failure
served defended and counted, config errors at load."""

from __future__ import annotations

import pytest
import torch
from ts.context import RequestProcessor

from handlers.errors import ConfigError
from tests.handler.test_handler import FakeSink
from tests.support.handler import Answer

JSON = "application/json"
# A random-init victim is unsure of random inputs (1 - max prob > 0.5 on every row), so the OOD share flags a
# client once it has sent ood.min_queries rows; PRADA is kept out of the way by a large min_distances.
FLAG_AFTER_8 = {"ood": {"min_queries": 8, "share": 0.5}, "prada": {"min_distances": 5000, "window": 5000}}


def send(served, requests):
    """One TorchServe batch of (client id or None, rows); the id rides in the header TorchServe would pass."""
    data, processors = [], []
    for client, x in requests:
        data.append({"body": {"instances": x.tolist()}})
        props = {"body": {"content-type": JSON}}
        if client is not None:
            props["x-client-id"] = client  # header names arrive as the client sent them: matched case-insensitively
        processors.append(RequestProcessor(props))
    ctx = served.context
    ctx.request_processor = processors
    ctx.request_ids = {i: f"req-{i}" for i in range(len(requests))}
    out = served.handler.handle(data, ctx)
    return [Answer(ctx.get_response_status(i)[0] or 200, dict(ctx.get_response_headers(i)), b) for i, b in
            enumerate(out)]


def rows(served, n, seed):
    return torch.rand((n, *served.net.input_shape), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def monitored(serve, tmp_path):
    def _make(action, metrics=None, **extra):
        monitor = {"store": f"sqlite:///{tmp_path}/monitor-{action}.sqlite", "action": action, **FLAG_AFTER_8, **extra}
        return serve({"name": "identity"}, monitor=monitor, metrics=metrics)

    return _make


@pytest.mark.parametrize("action", ["observe", "harden", "block"])
def test_flagged_client_gets_the_action_and_benign_client_does_not(monitored, action, caplog):
    sink = FakeSink()
    s = monitored(action, metrics=sink)
    thief = rows(s, 8, 0)
    benign = rows(s, 4, 1)
    with caplog.at_level("WARNING"):
        first = send(s, [("thief", thief), ("benign", benign)])
    # flagged by this batch: the action applies to this batch already
    assert [a.status for a in first] == [429 if action == "block" else 200, 200]
    assert "client 'thief' flagged for ood_share" in caplog.text and "benign" not in caplog.text
    later = send(s, [("thief", rows(s, 2, 2)), ("benign", rows(s, 2, 3)), (None, rows(s, 2, 4))])
    y_benign = s.victim_probs(rows(s, 2, 3))
    assert later[1].status == 200 and torch.allclose(torch.tensor(
        [p["probabilities"] for p in later[1].json["predictions"]], dtype=torch.float64), y_benign, atol=1e-5)
    assert later[2].status == 200  # no header: client 'anonymous', 2 rows, not flagged
    thief_answer = later[0]
    y_thief = s.victim_probs(rows(s, 2, 2))
    if action == "block":
        assert thief_answer.status == 429
        assert b"too many requests" in thief_answer.body and b"probabilities" not in thief_answer.body
    else:
        got = torch.tensor([p["probabilities"] for p in thief_answer.json["predictions"]], dtype=torch.float64)
        if action == "observe":
            assert torch.allclose(got, y_thief, atol=1e-5)
        else:  # harden -> label_only: the one-hot top-1 and nothing more
            assert torch.equal(got, torch.nn.functional.one_hot(y_thief.argmax(1), got.shape[1]).double())
    flags = [(n, v, lab) for kind, n, v, lab in sink.calls if n == "stealguard_client_flags_total"]
    assert flags == [("stealguard_client_flags_total", 1, ("victim", "identity", "unversioned", "ood_share"))]
    gauges = [v for kind, n, v, _ in sink.calls if n == "stealguard_clients_flagged"]
    assert gauges[-1] == 1
    assert all("thief" not in str(lab) for *_, lab in sink.calls)  # never a per-client label
    listed = s.handler.monitor.store.flagged()
    assert [(f.client, f.reason) for f in listed] == [("thief", "ood_share")]


def test_store_failure_serves_defended_answers_and_counts(monitored, monkeypatch):
    sink = FakeSink()
    s = monitored("block", metrics=sink)
    send(s, [("thief", rows(s, 8, 0))])

    def broken(*a, **k):
        raise OSError("disk I/O error")

    monkeypatch.setattr(s.handler.monitor.store, "update_many", broken)
    answers = send(s, [("thief", rows(s, 2, 5)), ("benign", rows(s, 2, 6))])
    assert [a.status for a in answers] == [200, 200]  # flagged thief is not blocked while the store is lost
    got = torch.tensor([p["probabilities"] for p in answers[0].json["predictions"]], dtype=torch.float64)
    assert torch.allclose(got, s.victim_probs(rows(s, 2, 5)), atol=1e-5)  # identity's own answer
    errors = [v for kind, n, v, _ in sink.calls if n == "stealguard_monitor_errors_total"]
    assert errors == [1]


def test_monitor_config_errors_fail_the_load(serve, tmp_path):
    with pytest.raises(ConfigError, match=r"stealguard\.monitor\.action: .*'observe', 'harden' or 'block'"):
        serve({"name": "identity"}, monitor={"action": "ban"})
    with pytest.raises(ConfigError, match=r"stealguard\.monitor\.key: unknown key"):
        serve({"name": "identity"}, monitor={"key": "s3cret"})


def test_gaussian_ood_score_flags_atypical_clients_and_a_class_count_mismatch_fails_the_load(serve, tmp_path):
    """monitor.ood.score: gaussian, fitted on the served victim's posteriors of its own input distribution
    (uniform rows here): a client sending rows 40 times brighter (posteriors no in-distribution row has) is
    flagged for ood_share, one sending rows like the fitted ones is not; statistics fitted for another class count
    than the archive's model refuse to load, naming the field."""
    from plugins.ood import fit_posterior_gaussian

    plain = serve({"name": "identity"})
    gen = torch.Generator().manual_seed(7)
    y = plain.victim_probs(torch.rand((4000, *plain.net.input_shape), generator=gen))
    # a random-init net's top-1 covers a few classes only: spread the rows over all K so each has a mean
    g = fit_posterior_gaussian(y, labels=torch.arange(len(y)) % y.shape[1])
    ood = {"min_queries": 8, "share": 0.5, "threshold": 0.999, "score": "gaussian", "gaussian": g.model_dump()}
    s = serve({"name": "identity"}, monitor={"store": f"sqlite:///{tmp_path}/monitor-g.sqlite", "action": "observe",
                                             "ood": ood, "prada": FLAG_AFTER_8["prada"]})
    send(s, [("thief", 40 * rows(s, 8, 0)), ("benign", rows(s, 8, 1))])
    assert [(f.client, f.reason) for f in s.handler.monitor.store.flagged()] == [("thief", "ood_share")]
    other = fit_posterior_gaussian(torch.softmax(torch.randn(500, 3, generator=gen) * 3, dim=1)).model_dump()
    with pytest.raises(ConfigError, match=r"stealguard\.monitor\.ood\.gaussian: fitted for 3 classes; the model "
                                          r"has \d+"):
        serve({"name": "identity"}, monitor={"ood": {**ood, "gaussian": other}})


def test_watermark_answers_wrong_top1_records_and_never_leaks_the_key(serve, tmp_path, monkeypatch, caplog):
    secret = "deploy-time watermark secret 0123456789"
    monitor = {"store": f"sqlite:///{tmp_path}/wm.sqlite", "prada": {"min_distances": 5000, "window": 5000},
               "ood": {"enabled": False}, "watermark": {"enabled": True, "fraction": 0.3}}
    monkeypatch.delenv("STEALGUARD_WATERMARK_KEY", raising=False)
    with pytest.raises(ConfigError, match=r"stealguard\.monitor\.watermark: enabled but no key"):
        serve({"name": "identity"}, monitor=monitor)
    monkeypatch.setenv("STEALGUARD_WATERMARK_KEY", secret)
    with caplog.at_level("DEBUG"):
        s = serve({"name": "identity"}, monitor=monitor)
        x = rows(s, 8, 7)
        answers = send(s, [("c1", x), ("c2", rows(s, 8, 8)), ("c1", x)])
    assert [a.status for a in answers] == [200, 200, 200]
    got = torch.tensor([p["probabilities"] for p in answers[0].json["predictions"]], dtype=torch.float64)
    labels = [p["label"] for p in answers[0].json["predictions"]]
    y = s.victim_probs(x)
    records = s.handler.monitor.store.watermarks()
    assert 2 <= len(records) <= 14  # 24 rows at 30 %
    marked = [i for i in range(8) if labels[i] != int(y[i].argmax())]
    assert marked, "some of the 8 rows are watermarked"
    for i in marked:
        assert torch.equal(got[i].sort().values, y[i].sort().values)  # a permutation of the served answer
    assert answers[2].body == answers[0].body  # deterministic per query
    recorded = {(r.query.tobytes(), r.label) for r in records}
    for i in marked:
        assert (x[i].numpy().tobytes(), labels[i]) in recorded
    staged = (tmp_path / "m1" / "model" / "model-config.yaml").read_text()
    assert secret not in staged and secret not in caplog.text and "key fingerprint" in caplog.text


def test_the_monitor_has_its_own_latency_stage(monitored, monkeypatch, caplog):
    """An archive with a monitor emits a `monitor` stage holding the screening's time (a 30 ms store here), and
    the stages still partition the handler's total; an archive without one emits no `monitor` stage."""
    import logging
    import time

    from tests.support import metrics_log

    caplog.set_level(logging.INFO, logger="ts.metrics.caching_metric")
    s = monitored("observe")
    real = s.handler.monitor.store.update_many
    monkeypatch.setattr(s.handler.monitor.store, "update_many", lambda *a, **k: (time.sleep(0.03), real(*a, **k))[1])
    send(s, [("thief", rows(s, 2, 0))])
    emitted = metrics_log.emitted(caplog)
    stages = {ln["labels"]["stage"]: float(ln["value"]) for ln in emitted
              if ln["name"] == "stealguard_stage_latency_milliseconds"}
    (total,) = [float(ln["value"]) for ln in emitted if ln["name"] == "stealguard_handler_latency_milliseconds"]
    assert set(stages) == {"decode", "victim", "surrogate", "defense", "monitor", "encode", "metrics"}
    assert stages["monitor"] >= 30.0 and stages["defense"] < 30.0, stages
    assert 0.999 * total <= sum(stages.values()) <= total * 1.0001, (stages, total)
