"""A real TorchServe serving StealGuard archives (eager, ONNX and torch.export victims): defended outputs,
per-request status codes for bad input and defense failures, batching under concurrent clients, health."""

from __future__ import annotations

import io
import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from plugins.measures import distance
from tests.integration.conftest import LABELS, MAD
from tests.support.booby_model import SENTINEL
from tests.support.torchserve import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HEADER = "X-StealGuard-Defense"


def inputs(model: str, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (1, 28, 28) if model.startswith("lenet") else (64,)
    return torch.rand((n, *shape), generator=g)


def post(dep, model: str, body=None, **kw) -> requests.Response:
    if body is not None:
        kw["json"] = body
    return requests.post(dep.url(model), timeout=60, **kw)


def probs_of(r: requests.Response) -> torch.Tensor:
    return torch.tensor([p["probabilities"] for p in r.json()["predictions"]], dtype=torch.float64)


def scrape(dep, metric: str, model: str) -> float:
    """Sum of a metric's samples for one model on TorchServe's Prometheus endpoint."""
    text = requests.get(f"{dep.server.metrics_url}/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(metric) and f'model_name="{model}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def worker_pid(dep, model: str) -> int:
    r = requests.get(f"{dep.server.management_url}/models/{model}", timeout=10)
    (worker,) = r.json()[0]["workers"]
    assert worker["status"] == "READY"
    return worker["pid"]


@pytest.mark.parametrize("model", ["lenet_mad", "mlp_onnx_mad", "mlp_export_mad"])
def test_defended_outputs_on_simplex_within_budget_top1_kept_and_perturbed(deployment, model):
    x = inputs(model, 12, seed=1)
    r = post(deployment, model, {"instances": x.tolist()})
    assert r.status_code == 200, r.text
    assert r.headers[HEADER] == ("mad_argmax@fmnist-defense/7" if model == "lenet_mad" else "mad_argmax@unversioned")
    got = probs_of(r)
    y = deployment.victim_probs(model, x)  # the same weights, run locally: what the server must never return
    assert (got >= 0).all() and torch.allclose(got.sum(1), torch.ones(len(x), dtype=torch.float64), atol=1e-6)
    l1 = distance(y, got, "l1")
    assert (l1 <= MAD["epsilon"] + 1e-5).all()
    assert (l1 > 1e-3).all(), "defended outputs must differ from the undefended ones"
    assert torch.equal(got.argmax(1), y.argmax(1)), "mad_argmax keeps the top-1 class"
    labels = [p["label"] for p in r.json()["predictions"]]
    if model == "lenet_mad":
        assert labels == [LABELS[i] for i in y.argmax(1).tolist()]
    else:
        assert labels == y.argmax(1).tolist()


def test_workers_run_the_code_shipped_in_their_archive(deployment):
    """Each worker imports handlers/ and plugins/ from its unpacked .mar, not from the repository."""
    pattern = r"StealGuard: serving '(\w+)' .*; code from ([^;)\s]+)[;)]"
    lines = deployment.server.wait_log(pattern, count=len(deployment.victims))
    served = dict(lines)
    assert set(deployment.victims) <= set(served), lines
    for model, root in served.items():
        assert not root.startswith(str(REPO)), f"{model} runs the repository's code ({root})"
        assert root.startswith(str(deployment.server.workdir)), root  # TorchServe unpacks under its TMPDIR


def test_defended_differs_from_the_undefended_twin(deployment):
    x = inputs("lenet_mad", 6, seed=2)
    defended = probs_of(post(deployment, "lenet_mad", {"instances": x.tolist()}))
    twin = post(deployment, "lenet_identity", {"instances": x.tolist()})
    assert twin.headers[HEADER] == "identity@unversioned"
    undefended = probs_of(twin)
    assert torch.allclose(undefended, deployment.victim_probs("lenet_identity", x), atol=1e-5)
    assert (distance(undefended, defended, "l1") > 1e-3).all()
    assert torch.equal(undefended.argmax(1), defended.argmax(1))


def test_png_and_jpeg_images(deployment):
    pixels = np.random.default_rng(0).integers(0, 256, size=(28, 28), dtype=np.uint8)
    for fmt, ctype in (("PNG", "image/png"), ("JPEG", "image/jpeg")):
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format=fmt)
        r = requests.post(
            deployment.url("lenet_mad"), data=buf.getvalue(), headers={"Content-Type": ctype}, timeout=60
        )
        assert r.status_code == 200, r.text
        (pred,) = r.json()["predictions"]
        assert abs(sum(pred["probabilities"]) - 1) < 1e-6 and pred["label"] in LABELS
    x = (torch.from_numpy(pixels.astype(np.float32) / 255.0) - 0.5) / 0.5  # PNG is lossless: same top-1
    y = deployment.victim_probs("lenet_mad", x.reshape(1, 1, 28, 28))
    png = io.BytesIO()
    Image.fromarray(pixels).save(png, format="PNG")
    r = requests.post(
        deployment.url("lenet_mad"), data=png.getvalue(), headers={"Content-Type": "image/png"}, timeout=60
    )
    assert r.json()["predictions"][0]["label"] == LABELS[int(y.argmax())]


def test_concurrent_requests_are_batched_and_each_gets_its_own_rows(deployment):
    model = "lenet_mad"
    xs = [inputs(model, 1 + i % 3, seed=100 + i) for i in range(24)]
    sequential = [probs_of(post(deployment, model, {"instances": x.tolist()})) for x in xs[:6]]
    batches_before = scrape(deployment, "stealguard_defense_latency_seconds_count", model)
    rows_before = scrape(deployment, "stealguard_rows_total", model)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda x: post(deployment, model, {"instances": x.tolist()}), xs))
    assert [a.status_code for a in answers] == [200] * len(xs)
    for x, a in zip(xs, answers, strict=True):
        got = probs_of(a)
        assert got.shape[0] == x.shape[0], "one response per request, with that request's rows"
        y = deployment.victim_probs(model, x)
        assert (distance(y, got, "l1") <= MAD["epsilon"] + 1e-5).all()
        assert torch.equal(got.argmax(1), y.argmax(1))
    for seq, a in zip(sequential, answers[:6], strict=True):
        assert torch.allclose(seq, probs_of(a), atol=1e-5), "batched answers equal the answers given alone"
    time.sleep(1.0)  # the frontend folds the workers' metric lines in asynchronously
    rows = scrape(deployment, "stealguard_rows_total", model) - rows_before
    batches = scrape(deployment, "stealguard_defense_latency_seconds_count", model) - batches_before
    assert rows == sum(len(x) for x in xs)
    assert 1 <= batches < len(xs), f"{len(xs)} concurrent requests were defended in {batches} batches"


BAD = [
    ("mlp_export_mad", json.dumps([[1.0, 2.0]]), "application/json", 400, "wrong shape"),
    ("mlp_export_mad", json.dumps([[[0.0] * 64]]), "application/json", 400, "(rank 2)"),
    ("mlp_export_mad", json.dumps([["x"] * 64]), "application/json", 400, "non-numeric"),
    ("mlp_export_mad", "[[" + ",".join(["NaN"] * 64) + "]]", "application/json", 400, "NaN or infinity"),
    ("mlp_export_mad", "[[" + ",".join(["Infinity"] * 64) + "]]", "application/json", 400, "NaN or infinity"),
    ("mlp_export_mad", json.dumps({"instances": []}), "application/json", 400, "empty instances"),
    (
        "mlp_export_mad",
        json.dumps({"instances": [[0.0] * 64] * 17}),
        "application/json",
        413,
        "17 instances exceed the maximum of 16",
    ),
    ("mlp_export_mad", "[[1,", "application/json", 400, "not valid JSON"),
    ("mlp_export_mad", "hello", "text/plain", 415, "unsupported content type 'text/plain'"),
    ("mlp_onnx_mad", b"\x89PNG\r\n\x1a\n", "image/png", 415, "not images"),
    ("lenet_mad", b"\x89PNG\r\n\x1a\nbroken", "image/png", 400, "not a decodable PNG or JPEG image"),
    ("lenet_mad", b"\xff\xd8\xff" + b"\0" * 30_000, "image/jpeg", 413, "exceeds the maximum of 20000 bytes"),
]


def test_every_bad_input_gets_its_4xx_and_the_worker_keeps_serving(deployment):
    pids = {m: worker_pid(deployment, m) for m in {b[0] for b in BAD}}
    for model, body, ctype, status, message in BAD:
        r = requests.post(deployment.url(model), data=body, headers={"Content-Type": ctype}, timeout=60)
        assert r.status_code == status, (message, r.status_code, r.text)
        assert message in r.json()["message"], r.text
        assert "probabilities" not in r.text
    assert requests.get(f"{deployment.server.inference_url}/ping", timeout=10).status_code == 200
    for model, pid in pids.items():
        assert worker_pid(deployment, model) == pid, f"{model}'s worker restarted"
        assert post(deployment, model, {"instances": inputs(model, 2).tolist()}).status_code == 200


def test_a_failing_defense_answers_5xx_without_probabilities(deployment):
    model = "mlp_explode"
    pid = worker_pid(deployment, model)
    trap = torch.zeros(1, 64)
    trap[0, 0] = SENTINEL
    alone = post(deployment, model, {"instances": trap.tolist()})
    assert alone.status_code == 500
    assert alone.json()["message"] == "the defense could not run on this request; no prediction"
    assert "probabilities" not in alone.text
    good = [inputs(model, 2, seed=s) for s in range(7)]
    with ThreadPoolExecutor(8) as pool:  # the trapped request shares a batch with good ones
        answers = list(pool.map(lambda x: post(deployment, model, {"instances": x.tolist()}), [trap, *good]))
    assert answers[0].status_code == 500 and "probabilities" not in answers[0].text
    assert [a.status_code for a in answers[1:]] == [200] * len(good)
    assert worker_pid(deployment, model) == pid
    assert deployment.server.wait_log(r"request \S+ refused, defense_failed")


def test_invalid_defense_config_fails_to_load_and_says_why(deployment):
    mgmt = deployment.server.management_url
    shutil.copy(deployment.broken_mar, deployment.server.model_store / deployment.broken_mar.name)
    try:
        r = requests.post(
            f"{mgmt}/models",
            params={"url": deployment.broken_mar.name, "initial_workers": 1, "synchronous": "true"},
            timeout=120,
        )
        assert r.status_code >= 400, r.text
        why = r"StealGuard: model 'mlp_broken' NOT loaded.*stealguard\.defense.*epsilon"
        assert deployment.server.wait_log(why), deployment.server.model_log()[-3000:]
        assert requests.post(deployment.url("mlp_broken"), json=[[0.0] * 64], timeout=30).status_code != 200
    finally:
        requests.delete(f"{mgmt}/models/mlp_broken", timeout=60)


def test_describe_api_and_pixels_json_through_torchserve(deployment):
    """GET /models/<name>?customized=true answers the handler's describe_handle; a pixels archive answers [0, 1]
    JSON with the top-1 of the same images sent as PNG."""
    r = requests.get(f"{deployment.server.management_url}/models/lenet_pixels?customized=true", timeout=30)
    assert r.status_code == 200, r.text
    meta = r.json()[0]["customizedMetadata"]
    contract = json.loads(meta) if isinstance(meta, str) else meta
    assert contract["input"]["json"] == "pixels" and contract["input"]["shape"] == [1, 28, 28]
    assert contract["input"]["mean"] == [0.5] and contract["input"]["std"] == [0.5]
    assert contract["classes"] == LABELS and contract["defense"]["name"] == "identity"
    imgs = (inputs("lenet", 4, seed=7).numpy() * 255).round().astype(np.uint8)
    by_png = []
    for img in imgs:
        buf = io.BytesIO()
        Image.fromarray(img[0], mode="L").save(buf, format="PNG")
        by_png.append(probs_of(post(deployment, "lenet_pixels", data=buf.getvalue(),
                                    headers={"Content-Type": "image/png"})))
    by_json = probs_of(post(deployment, "lenet_pixels", {"instances": (imgs / 255.0).tolist()}))
    assert torch.equal(by_json.argmax(1), torch.cat(by_png).argmax(1))
    bad = post(deployment, "lenet_pixels", {"instances": (imgs * 1.0).tolist()})
    assert bad.status_code == 400 and "pixels in [0, 1]" in bad.json()["message"]
