"""The handler called directly (no server): responses, headers, batching, every bad input, fail closed."""

from __future__ import annotations

import io
import json
import logging
from typing import Any, Literal

import numpy as np
import pytest
import torch
from PIL import Image

from plugins import Budget, Defense, DefenseConfig, DefenseOutput, register
from plugins.measures import distance
from tests.support.handler import make_context
from tests.support.victims import RUNTIMES, example_input

JSON = "application/json"


# --- defenses that misbehave on purpose (registered once for this test process) -------------------------
class ExplodeConfig(DefenseConfig):
    name: Literal["test_explode"] = "test_explode"
    trigger: float = 123.0
    mode: Literal["raise", "off_simplex", "over_budget"] = "raise"


@register
class Explode(Defense):
    """Identity, except on batches holding an input equal to ``trigger``: then it raises or misbehaves."""

    name = "test_explode"
    Config = ExplodeConfig
    needs_inputs = True
    calls: list[int] = []

    @property
    def budget(self) -> Budget:
        return Budget(norm="l1", epsilon=0.1)

    def perturb(self, y: torch.Tensor, inputs: Any) -> DefenseOutput:
        Explode.calls.append(y.shape[0])
        if not (inputs == self.config.trigger).any():
            return DefenseOutput(probs=y.clone())
        if self.config.mode == "raise":
            raise RuntimeError("boom")
        if self.config.mode == "off_simplex":
            return DefenseOutput(probs=y * 2)
        return DefenseOutput(
            probs=torch.full_like(y, 1.0 / y.shape[1]) * 0 + torch.eye(y.shape[1])[[0] * len(y)]
        )


def rows(n: int, dim: int = 64, seed: int = 0) -> list:
    return torch.rand(n, dim, generator=torch.Generator().manual_seed(seed)).tolist()


def png(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


# --- the happy path --------------------------------------------------------------------------------------
def test_json_instances_get_defended_rows_labels_and_header(serve, tmp_path):
    labels = tmp_path / "index_to_name.json"
    labels.write_text(json.dumps({str(i): f"class_{i}" for i in range(10)}))
    s = serve({"name": "random_noise", "epsilon": 1.0}, labels=labels, version={"name": "fm", "version": 3})
    x = rows(3)
    a = s.one({"instances": x})
    assert a.status == 200
    assert a.headers["X-StealGuard-Defense"] == "random_noise@fm/3"
    assert a.headers["content-type"] == JSON
    preds = a.json["predictions"]
    assert len(preds) == 3
    p = torch.tensor([r["probabilities"] for r in preds], dtype=torch.float64)
    assert (p >= 0).all() and torch.allclose(p.sum(1), torch.ones(3, dtype=torch.float64), atol=1e-6)
    assert [r["label"] for r in preds] == [f"class_{i}" for i in p.argmax(1).tolist()]
    y = s.victim_probs(torch.tensor(x))
    assert (p - y).abs().sum(1).min() > 1e-4, "random_noise must change the victim's probabilities"


def test_bare_list_bytes_and_charset_give_the_same_answer(serve):
    s = serve({"name": "identity"})
    x = rows(2)
    parsed = s.one({"instances": x}).json
    assert s.one(x).json == parsed
    assert s.one(json.dumps(x).encode(), "application/json; charset=utf-8").json == parsed
    assert s.one(json.dumps({"instances": x}).encode(), None).json == parsed  # sniffed
    y = s.victim_probs(torch.tensor(x))
    got = torch.tensor([r["probabilities"] for r in parsed["predictions"]], dtype=torch.float64)
    assert torch.allclose(got, y, atol=1e-6)
    assert [r["label"] for r in parsed["predictions"]] == y.argmax(1).tolist()  # no index_to_name: indices


def test_unversioned_header(serve):
    assert serve().one(rows(1)).headers["X-StealGuard-Defense"] == "identity@unversioned"


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_every_runtime_serves_the_victims_probabilities(serve, runtime):
    s = serve({"name": "identity"}, runtime=runtime)
    x = example_input(s.net, 5)
    got = torch.tensor([r["probabilities"] for r in s.one({"instances": x.tolist()}).json["predictions"]])
    assert torch.allclose(got.double(), s.victim_probs(x), atol=1e-5)
    assert s.handler.model.victim.kind == runtime
    if runtime == "onnx":
        opts = s.handler.model.victim.session.get_session_options()
        assert (opts.intra_op_num_threads, opts.inter_op_num_threads) == (1, 1)


# --- batching --------------------------------------------------------------------------------------------
def test_rows_of_several_requests_are_defended_in_one_call_and_split_back(serve):
    s = serve({"name": "test_explode"})
    bodies = [rows(1, seed=1), rows(3, seed=2), rows(2, seed=3)]
    single = [s.one(b).json for b in bodies]
    Explode.calls.clear()
    answers = s.batch([(b, JSON) for b in bodies])
    assert Explode.calls == [6], "the batch's rows must go through the defense in one call"
    assert [a.status for a in answers] == [200, 200, 200]
    for a, alone in zip(answers, single, strict=True):  # same rows, same order (float32 batch effects aside)
        got, want = a.json["predictions"], alone["predictions"]
        assert [r["label"] for r in got] == [r["label"] for r in want]
        assert np.allclose([r["probabilities"] for r in got], [r["probabilities"] for r in want], atol=1e-6)


# --- bad input -------------------------------------------------------------------------------------------
BAD_JSON = [
    (json.dumps([[1.0, 2.0]]), 400, "wrong shape: each instance must have shape [64] (rank 1)"),
    (json.dumps([[[0.0] * 64]]), 400, "got instances of shape [1, 64] (rank 2)"),
    (json.dumps([0.0] * 64), 400, "got instances of shape [] (rank 0)"),
    (json.dumps([[0.0] * 64, [0.0] * 63]), 400, "ragged"),
    (json.dumps([["a"] * 64]), 400, "non-numeric values (strings)"),
    (json.dumps([[True] * 64]), 400, "non-numeric values (booleans)"),
    (json.dumps([[None] * 64]), 400, "non-numeric values (null or mixed values)"),
    ("[[" + ",".join(["NaN"] * 64) + "]]", 400, "NaN or infinity"),
    ("[[" + ",".join(["0"] * 63 + ["Infinity"]) + "]]", 400, "NaN or infinity"),
    (json.dumps([[1e39] * 64]), 400, "beyond float32"),
    (json.dumps({"instances": []}), 400, "empty instances"),
    (json.dumps([]), 400, "empty instances"),
    (json.dumps({"inputs": [[0.0] * 64]}), 400, "needs an 'instances' list (got keys: inputs)"),
    (json.dumps({"instances": 5}), 400, "got int"),
    (json.dumps("hello"), 400, "got str"),
    (json.dumps({"instances": [[0.0] * 64] * 9}), 413, "9 instances exceed the maximum of 8 per request"),
    ("[[1, 2", 400, "body is not valid JSON"),
]


@pytest.mark.parametrize(("body", "status", "message"), BAD_JSON)
@pytest.mark.parametrize("parsed", [True, False], ids=["parsed-by-torchserve", "raw-bytes"])
def test_bad_json_is_refused_with_a_message_and_the_rest_of_the_batch_is_served(
    serve, body, status, message, parsed
):
    s = serve({"name": "identity"})
    bad: Any = body.encode()
    if parsed:
        try:
            bad = json.loads(body)  # what TorchServe hands the handler for application/json
        except json.JSONDecodeError:
            pass
    good, refused, good2 = s.batch([(rows(1), JSON), (bad, JSON), (rows(2), JSON)])
    assert refused.status == status, refused.body
    assert message in refused.json["message"]
    assert refused.json["code"] == status
    assert b"probabilities" not in refused.body
    assert refused.headers["X-StealGuard-Defense"] == "identity@unversioned"
    assert (good.status, good2.status) == (200, 200)
    assert len(good2.json["predictions"]) == 2


@pytest.mark.parametrize(
    ("body", "ctype", "status", "message"),
    [
        ("hello", "text/plain", 415, "unsupported content type 'text/plain'; allowed: application/json"),
        (b"a=1", "application/x-www-form-urlencoded", 415, "unsupported content type"),
        (b"\x89PNG\r\n\x1a\n....", "image/png", 415, "this model takes JSON instances, not images"),
        (b"", "", 400, "empty request"),
        (None, JSON, 400, "empty request"),
    ],
)
def test_unsupported_or_empty_bodies(serve, body, ctype, status, message):
    a = serve().one(body, ctype)
    assert a.status == status and message in a.json["message"]


# --- images ----------------------------------------------------------------------------------------------
IMAGE = {
    "size": [28, 28],
    "mode": "L",
    "mean": [0.5],
    "std": [0.25],
    "max_bytes": 4000,
    "max_pixels": 200 * 200,
}


@pytest.fixture
def image_model(serve):
    return serve(
        {"name": "identity"}, arch="lenet", input_spec={"shape": [1, 28, 28], "max_rows": 4, "image": IMAGE}
    )


@pytest.mark.parametrize(("fmt", "ctype"), [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("PNG", None)])
def test_image_bytes_are_preprocessed_as_configured(image_model, fmt, ctype):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(56, 56), dtype=np.uint8)  # resized to 28 x 28
    data = png(pixels, fmt)
    a = image_model.one(data, ctype)
    assert a.status == 200, a.body
    img = Image.open(io.BytesIO(data)).convert("L").resize((28, 28), Image.Resampling.BILINEAR)
    x = (torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0) - 0.5) / 0.25
    want = image_model.victim_probs(x.reshape(1, 1, 28, 28))
    got = torch.tensor(a.json["predictions"][0]["probabilities"], dtype=torch.float64)
    assert torch.allclose(got, want[0], atol=1e-5)


def test_rgb_image_is_converted_to_grayscale(image_model):
    rgb = np.zeros((28, 28, 3), dtype=np.uint8)
    rgb[..., 0] = 255
    assert image_model.one(png(rgb), "image/png").status == 200


@pytest.mark.parametrize(
    ("data", "ctype", "status", "message"),
    [
        (b"\x89PNG\r\n\x1a\nnot really", "image/png", 400, "not a decodable PNG or JPEG image"),
        (b"GIF89a", "image/jpeg", 400, "not a decodable PNG or JPEG image"),
        ("GIF", "image/png", 415, "image format GIF is not supported"),
        ("big_bytes", "image/png", 413, "exceeds the maximum of 4000 bytes"),
        ("big_pixels", "image/png", 413, "exceeds the maximum of 40000 pixels"),
        ("truncated", "image/png", 400, "could not be decoded"),
    ],
)
def test_bad_images(image_model, data, ctype, status, message):
    if data == "GIF":
        buf = io.BytesIO()
        Image.new("L", (28, 28)).save(buf, format="GIF")
        data = buf.getvalue()
    elif data == "big_bytes":
        data = png(np.random.default_rng(1).integers(0, 256, size=(120, 120), dtype=np.uint8))
    elif data == "big_pixels":
        data = png(np.zeros((10, 5000), dtype=np.uint8))
    elif data == "truncated":
        full = png(np.random.default_rng(2).integers(0, 256, size=(28, 28), dtype=np.uint8))
        data = full[: len(full) // 2]
    a = image_model.one(data, ctype)
    assert a.status == status, a.body
    assert message in a.json["message"]


def test_json_still_works_on_an_image_model(image_model):
    assert image_model.one({"instances": torch.zeros(2, 1, 28, 28).tolist()}).status == 200


# --- fail closed -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["raise", "off_simplex", "over_budget"])
def test_a_failing_defense_gives_that_request_a_5xx_and_never_probabilities(serve, mode, caplog):
    s = serve({"name": "test_explode", "mode": mode})
    poisoned = [[123.0] * 64]
    with caplog.at_level(logging.ERROR):
        good, bad, good2 = s.batch([(rows(2), JSON), (poisoned, JSON), (rows(1, seed=5), JSON)])
    assert bad.status == 500
    assert bad.json["message"] == "the defense could not run on this request; no prediction"
    assert b"probabilities" not in bad.body
    assert (good.status, good2.status) == (200, 200)
    assert "defense_failed" in caplog.text
    alone = s.one(poisoned)
    assert alone.status == 500 and b"probabilities" not in alone.body
    assert s.one(rows(3)).status == 200, "the worker keeps serving after a failure"


class FakeSink:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, float, tuple]] = []

    def inc(self, name, value, labels):
        self.calls.append(("inc", name, value, tuple(labels)))

    def set(self, name, value, labels):
        self.calls.append(("set", name, value, tuple(labels)))

    def observe_many(self, name, values, labels):
        self.calls.append(("observe", name, len(values), tuple(labels)))


def test_metrics_count_rows_and_errors_by_reason(serve):
    sink = FakeSink()
    s = serve({"name": "test_explode"}, metrics=sink)
    sink.calls.clear()
    s.batch([(rows(3), JSON), ([[1.0]], JSON), ([[123.0] * 64], JSON)])
    incs = [(n, v, lab[-1]) for kind, n, v, lab in sink.calls if kind == "inc"]
    assert ("stealguard_rows_total", 3.0, "unversioned") in incs
    assert ("stealguard_errors_total", 1, "bad_input") in incs
    assert ("stealguard_errors_total", 1, "defense_failed") in incs


# --- configuration errors: the model does not load --------------------------------------------------------
def _drop(*path):
    def edit(cfg):
        node = cfg
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]

    return edit


def _set(value, *path):
    def edit(cfg):
        node = cfg
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return edit


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"edit": _drop("stealguard")}, "has no 'stealguard:' mapping"),
        ({"defense": {"name": "nope"}}, "unknown defense 'nope'"),
        ({"defense": {"name": "random_noise", "epsilon": -1}}, "stealguard.defense: invalid config"),
        ({"defense": {"name": "mad_argmax", "epsilon": 0.5}}, "stealguard.surrogate: missing"),
        ({"edit": _set("victim/missing.pt", "stealguard", "victim", "file")}, "is not in the archive"),
        ({"edit": _set("../../etc/passwd", "stealguard", "victim", "file")}, "outside the archive"),
        ({"edit": _set("Nope", "stealguard", "victim", "class")}, "'Nope' is not an nn.Module"),
        ({"edit": _set([3, 8, 8], "stealguard", "input", "shape")}, "a warm-up batch of shape [2, 3, 8, 8]"),
        ({"edit": _set("onnx", "stealguard", "victim", "runtime")}, "apply to runtime 'eager' only"),
        ({"edit": _set(1, "stealguard", "extra")}, "stealguard.extra: unknown key"),
        ({"edit": _set(0, "stealguard", "input", "max_rows")}, "stealguard.input.max_rows"),
        ({"edit": _set("labels.json", "stealguard", "labels")}, "stealguard.labels: file 'labels.json'"),
    ],
)
def test_invalid_config_fails_to_load_with_a_log_line(serve, kwargs, message, caplog):
    with caplog.at_level(logging.ERROR), pytest.raises(ValueError) as err:
        serve(**kwargs)
    assert message in str(err.value)
    assert "NOT loaded, so it is never served undefended" in caplog.text
    assert message in caplog.text


def test_unloadable_surrogate_fails_to_load(serve, tmp_path):
    from mlflow_project.lifecycle.package import model_files

    junk = tmp_path / "surrogate.onnx"
    junk.write_bytes(b"not an onnx model")
    with pytest.raises(ValueError, match="stealguard.surrogate: could not load onnx model"):
        serve({"name": "mad_argmax", "epsilon": 0.5}, surrogate=model_files("onnx", junk))


def test_surrogate_with_the_wrong_class_count_fails_to_load(serve, tmp_path):
    from tests.support.victims import export, make_net

    wrong = export(make_net("mlp", num_classes=7), "eager", tmp_path / "s", "mlp", num_classes=7)
    with pytest.raises(ValueError, match="stealguard"):
        serve({"name": "mad_argmax", "epsilon": 0.5}, surrogate=wrong)


def test_labels_must_match_the_class_count(serve, tmp_path):
    labels = tmp_path / "index_to_name.json"
    labels.write_text(json.dumps(["a", "b"]))
    with pytest.raises(ValueError, match="names 2 classes; the victim has 10"):
        serve(labels=labels)


def test_handle_before_initialize_fails_closed(tmp_path):
    from handlers.stealguard_handler import StealGuardHandler

    with pytest.raises(RuntimeError, match="before initialize"):
        StealGuardHandler().handle([{"body": b"[]"}], None)


# --- MAD-argmax in the handler ----------------------------------------------------------------------------
@pytest.mark.parametrize("surrogate_runtime", ["eager", "onnx", "export"])
def test_mad_argmax_keeps_top1_stays_within_budget_and_perturbs(serve, tmp_path, surrogate_runtime):
    from tests.support.victims import export, make_net

    sur = export(make_net("mlp", seed=77), surrogate_runtime, tmp_path / f"s_{surrogate_runtime}", "mlp")
    s = serve({"name": "mad_argmax", "epsilon": 0.5, "norm": "l1", "jacobian": "last_layer"}, surrogate=sur)
    x = torch.tensor(rows(8, seed=9))
    a = s.one({"instances": x.tolist()})
    assert a.status == 200 and a.headers["X-StealGuard-Defense"] == "mad_argmax@unversioned"
    got = torch.tensor([r["probabilities"] for r in a.json["predictions"]], dtype=torch.float64)
    y = s.victim_probs(x)
    assert torch.allclose(got.sum(1), torch.ones(8, dtype=torch.float64), atol=1e-6) and (got >= 0).all()
    assert (distance(y, got, "l1") <= 0.5 + 1e-6).all()
    assert torch.equal(got.argmax(1), y.argmax(1))
    assert (distance(y, got, "l1") > 1e-3).all()


def test_same_defense_from_eager_and_onnx_surrogates(serve, tmp_path):
    """last_layer MAD needs only the surrogate's softmax: an ONNX surrogate defends like the eager one."""
    from tests.support.victims import export, make_net

    net = make_net("mlp", seed=77)
    cfg = {"name": "mad_argmax", "epsilon": 0.5, "norm": "l1", "jacobian": "last_layer"}
    x = rows(4, seed=3)
    outs = []
    for rt in ("eager", "onnx"):
        s = serve(cfg, surrogate=export(net, rt, tmp_path / rt, "mlp"))
        outs.append(torch.tensor([r["probabilities"] for r in s.one(x).json["predictions"]]))
    assert torch.allclose(outs[0], outs[1], atol=1e-5)


def test_make_context_uses_the_declared_metrics(tmp_path):
    ctx = make_context(tmp_path, _write(tmp_path / "c.yaml", "stealguard: {}\n"))
    assert ctx.metrics.get_metric(
        "stealguard_rows_total", __import__("ts").metrics.metric_type_enum.MetricTypes.COUNTER
    )


def _write(path, text):
    path.write_text(text)
    return path


# --- ood_gated in the handler: the surrogate its inner MAD needs is passed through -------------------------
def test_ood_gated_is_served_with_its_inner_defenses_resources(serve, tmp_path):
    from tests.support.victims import export, make_net

    sur = export(make_net("mlp", seed=77), "eager", tmp_path / "s_gated", "mlp")
    # the test victim is nearly uniform (max probabilities 0.109-0.119 on these rows): tau splits them
    cfg = {"name": "ood_gated", "tau": 0.111, "inside": {"name": "identity"},
           "outside": {"name": "mad", "epsilon": 0.8, "norm": "l1", "jacobian": "last_layer"}}
    s = serve(cfg, surrogate=sur)
    x = torch.tensor(rows(8, seed=9))
    a = s.one({"instances": x.tolist()})
    assert a.status == 200 and a.headers["X-StealGuard-Defense"] == "ood_gated@unversioned"
    got = torch.tensor([r["probabilities"] for r in a.json["predictions"]], dtype=torch.float64)
    y = s.victim_probs(x)
    confident = y.amax(1) >= 0.111
    assert 0 < int(confident.sum()) < 8, "the rows should exercise both sides of the gate"
    assert not torch.allclose(got[~confident], y[~confident], atol=1e-3)
    assert torch.allclose(got.sum(1), torch.ones(8, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(got[confident], y[confident], atol=1e-6)
    assert (distance(y, got, "l1") <= 0.8 + 1e-6).all()


def test_ood_gated_with_the_gaussian_gate_is_served_as_the_plugin_answers(serve):
    """The Gaussian gate's statistics travel in the defense config (archive, handler); the served answer is the
    plugin's on the victim's posteriors, and statistics of another class count are refused at load."""
    from plugins.ood import fit_posterior_gaussian, gaussian_typicality

    probe = serve({"name": "identity"})
    fit = probe.victim_probs(torch.tensor(rows(400, seed=3)))
    stats = fit_posterior_gaussian(fit, torch.arange(400) % fit.shape[1])  # near-uniform victim: not every top-1
    x = torch.tensor(rows(8, seed=11))  # the test archives' max_rows
    y = probe.victim_probs(x)
    typical = gaussian_typicality(y, stats)
    tau = float(typical.median())  # half the rows on each side of the gate
    cfg = {"name": "ood_gated", "tau": tau, "score": "gaussian", "gaussian": stats.model_dump(),
           "inside": {"name": "identity"}, "outside": {"name": "label_only"}}
    s = serve(cfg)
    a = s.one({"instances": x.tolist()})
    assert a.status == 200 and a.headers["X-StealGuard-Defense"] == "ood_gated@unversioned"
    got = torch.tensor([r["probabilities"] for r in a.json["predictions"]], dtype=torch.float64)
    inside = typical >= tau
    assert 0 < int(inside.sum()) < 8
    assert torch.allclose(got[inside], y[inside], atol=1e-6)
    onehot = torch.nn.functional.one_hot(y.argmax(1), y.shape[1]).to(torch.float64)
    assert torch.equal(got[~inside], onehot[~inside])
    other = fit_posterior_gaussian(torch.softmax(torch.randn(60, 3) * 3, 1))
    with pytest.raises(Exception, match="fitted for K = 3 classes; this victim has"):
        serve({**cfg, "gaussian": other.model_dump()})


def test_ood_gated_without_the_surrogate_its_inner_mad_needs_is_refused(serve, caplog):
    cfg = {"name": "ood_gated", "inside": {"name": "identity"}, "outside": {"name": "mad", "epsilon": 0.8}}
    with pytest.raises(Exception, match="surrogate"):
        serve(cfg)
