"""Reliability under load and faults, short and bounded (the 60 s figures come from `make reliability`):
16 clients for 8 s against a mad_argmax archive with 2 workers, one worker SIGKILLed mid-load, 100 repeats of
a query to a randomised defense over HTTP, and archives with a corrupt surrogate or config that must not load.

Every answer is checked against the victim's own posterior for the same input, computed locally: no answer
may carry it (a leak), and every answer must equal the locally defended one.
(The booby-trapped defense that raises at request time and the invalid defense config are in
test_serving.py.)"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import torch

from bench.reliability import (
    Expectation,
    Store,
    build_store,
    fault_summary,
    killer,
    ready_pids,
    run_load,
    scrape,
    wait_counter,
)
from mlflow_project.lifecycle.package import build_archive
from tests.support.torchserve import TorchServe

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CLIENTS = 16
SECONDS = 8.0


class Env:
    def __init__(self, root: Path, store: Store, server: TorchServe) -> None:
        self.root, self.store, self.server = root, store, server

    def url(self, model: str) -> str:
        return f"{self.server.inference_url}/predictions/{model}"


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("reliability")
    store = build_store(root, workers=2)
    # The model API is on for this loopback test instance only, to register the corrupt archives on demand.
    server = TorchServe(store.path, root / "ts", models=["rel_mad", "rel_noise"],
                        properties={"enable_model_api": "true"})
    server.start(timeout=240)
    try:
        # /ping is healthy once one worker of a model is up; the tests below need both of rel_mad's workers.
        deadline = time.monotonic() + 120
        while len(ready_pids(server, "rel_mad")) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        yield Env(root, store, server)
    finally:
        server.stop()


def test_load_16_clients_no_errors_no_leaks_and_the_rows_counter_matches(env):
    assert len(ready_pids(env.server, "rel_mad")) == 2
    expect = Expectation(env.store, "rel_mad")
    before = scrape(env.server, "stealguard_rows_total", "rel_mad")
    res = run_load(env.url("rel_mad"), expect, CLIENTS, SECONDS)
    s = res.summary()
    print("LOAD", json.dumps(s))
    assert s["requests"] >= 20, s
    assert s["errors"] == 0, (s, [x.error for x in res.failed][:3])
    assert s["leaked_rows"] == 0 and s["mismatched_rows"] == 0, s
    counted = wait_counter(env.server, "stealguard_rows_total", "rel_mad", before + s["rows_served"])
    assert counted - before == s["rows_served"], (counted - before, s)


def test_a_killed_worker_is_restarted_and_no_answer_is_ever_undefended(env):
    expect = Expectation(env.store, "rel_mad", seed=1)
    res = run_load(env.url("rel_mad"), expect, CLIENTS, SECONDS,
                   during=killer(env.server, "rel_mad", after=1.5, expect_workers=2, restart_timeout=90), tail=1.5)
    s = fault_summary(res)
    print("FAULT", json.dumps(s))
    assert s["killed_pid"] in s["pids_before"]
    assert s["restarted"], f"TorchServe did not bring the worker back: {s}"
    assert s["killed_pid"] not in s["pids_after"] and len(s["pids_after"]) == 2
    assert s["leaked_rows"] == 0 and s["mismatched_rows"] == 0, s
    assert s["failed_outside_window"] == 0, s  # failures only while the worker was down
    assert s["ok_after_restart"] >= 1, s
    assert all(x.status >= 500 or x.status == 0 for x in res.failed), s["failed_examples"]
    assert all("probabilities" not in x.error for x in res.failed)


def test_100_repeats_over_http_to_a_randomised_defense_are_identical(env):
    expect = Expectation(env.store, "rel_noise", seed=2)
    body, idx = expect.bodies[2]  # 3 rows
    session = requests.Session()
    answers = []
    for _ in range(100):
        r = session.post(env.url("rel_noise"), data=body, headers={"Content-Type": "application/json"}, timeout=30)
        assert r.status_code == 200, r.text
        answers.append(torch.tensor([p["probabilities"] for p in r.json()["predictions"]], dtype=torch.float64))
    first = answers[0]
    assert all(torch.equal(a, first) for a in answers), "a repeat got a different answer"
    assert expect.check(json.dumps({"predictions": [{"probabilities": r} for r in first.tolist()]}).encode(),
                        idx) == (0, 0), "the answer is the locally computed random_noise one, not the raw one"
    averaged = torch.stack(answers).mean(0)
    assert (averaged - expect.y[idx]).abs().sum(1).min() > 0.05, "averaging the repeats recovers nothing"


def _corrupt_surrogate(staged: Path) -> str:
    (weights,) = (staged / "surrogate").glob("*.pt")
    weights.write_bytes(weights.read_bytes()[:200])  # a truncated state dict
    return "stealguard.surrogate"


def _no_stealguard_section(staged: Path) -> str:
    cfg = staged / "model-config.yaml"
    text = cfg.read_text()
    cfg.write_text(text[: text.index("stealguard:")])
    return "no 'stealguard:' mapping"


def test_corrupt_archives_fail_to_load_and_are_never_served(env):
    """A truncated surrogate state dict and a model-config.yaml without its stealguard section: registered
    side by side (in parallel, to keep the suite short), neither loads, and each says why in the log."""
    mgmt = env.server.management_url
    cases = {"rel_bad_surrogate": _corrupt_surrogate, "rel_bad_config": _no_stealguard_section}
    why = {}
    for name, corrupt in cases.items():
        staged = env.root / "stage" / name
        shutil.copytree(env.root / "stage" / "rel_mad", staged)
        why[name] = corrupt(staged)
        build_archive(name, staged, env.server.model_store)

    def register(name: str) -> requests.Response:
        params = {"url": f"{name}.mar", "initial_workers": 1, "synchronous": "true"}
        return requests.post(f"{mgmt}/models", params=params, timeout=120)

    try:
        with ThreadPoolExecutor(len(cases)) as pool:
            answers = dict(zip(cases, pool.map(register, cases), strict=True))
        for name, r in answers.items():
            assert r.status_code >= 400, (name, r.text)
            found = env.server.wait_log(rf"StealGuard: model '{name}' NOT loaded.*{why[name]}")
            assert found, env.server.model_log()[-3000:]
            answer = requests.post(env.url(name), json={"instances": [[[[0.0] * 28] * 28]]}, timeout=30)
            assert answer.status_code != 200 and "probabilities" not in answer.text
    finally:
        for name in cases:
            requests.delete(f"{mgmt}/models/{name}", timeout=60)
    ok = requests.post(env.url("rel_mad"), json={"instances": [[[[0.0] * 28] * 28]]}, timeout=30)
    assert ok.status_code == 200, "the other models keep serving"
