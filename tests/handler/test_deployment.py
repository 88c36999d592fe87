"""What the deployment supplies (handlers/deployment.py), without a server: the secret of a randomised defense
(no default: an archive refuses to load without one, and says how to supply it), the disclosure header (off in
production), the describe API's contract, the JSON `pixels` input space and the error-row counter."""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from ts.context import RequestProcessor

from handlers.errors import ConfigError
from plugins.seeding import fingerprint
from tests.dev_secret import DEV_SECRET, OTHER_SECRET
from tests.handler.conftest import PROD_CONFIG
from tests.handler.test_handler import FakeSink as CaptureSink
from tests.handler.test_handler import rows

NOISE = {"name": "random_noise", "epsilon": 2.0, "norm": "l2"}
IMAGE = {"size": [28, 28], "mode": "L", "mean": [0.286], "std": [0.353]}


def probs(answer) -> torch.Tensor:
    return torch.tensor([p["probabilities"] for p in answer.json["predictions"]], dtype=torch.float64)


@pytest.mark.parametrize("defense", [NOISE, {"name": "mad_argmax", "epsilon": 0.5, "oracle": "random"},
                                     {"name": "gradient_redirection", "epsilon": 0.5, "target": "random"}])
def test_a_randomised_archive_without_a_secret_refuses_to_load_and_says_how_to_supply_one(serve, defense):
    with pytest.raises(ConfigError) as info:
        serve(defense, surrogate="random", secret=None)
    message = str(info.value)
    assert "no default" in message and "not loaded" in message
    for how in ("STEALGUARD_SECRET", "STEALGUARD_SECRET_FILE", "stealguard_secret_file", "stealguard.secret.file"):
        assert how in message


def test_a_defense_without_keyed_randomness_loads_without_a_secret(serve):
    s = serve({"name": "mad_argmax", "epsilon": 0.5}, surrogate="random", secret=None)
    assert s.one({"instances": rows(2)}).status == 200
    assert s.handler.model.secret_fingerprint is None


def test_the_secret_keys_the_answers_and_only_its_fingerprint_is_shown(serve, caplog):
    caplog.set_level(logging.INFO)
    x = rows(4)
    a, b = serve(NOISE), serve(NOISE, secret=OTHER_SECRET)
    pa, pb = probs(a.one({"instances": x})), probs(b.one({"instances": x}))
    assert not torch.allclose(pa, pb, atol=1e-6)
    torch.testing.assert_close(probs(a.one({"instances": x})), pa, rtol=0, atol=0)  # deterministic per query
    assert a.handler.model.secret_fingerprint == fingerprint(DEV_SECRET)
    contract = json.loads(a.handler.describe_handle())
    assert contract["secret_fingerprint"] == fingerprint(DEV_SECRET)
    assert f"secret fingerprint {fingerprint(DEV_SECRET)} from STEALGUARD_SECRET" in caplog.text
    for text in (caplog.text, a.handler.describe_handle(), repr(a.handler.model.defense),
                 str(a.handler.model.defense.describe())):
        assert DEV_SECRET not in text and OTHER_SECRET not in text


def test_secret_from_the_file_config_properties_names(serve, tmp_path):
    secret_file = tmp_path / "secret"
    secret_file.write_text(OTHER_SECRET + "\n")
    props = tmp_path / "config.properties"
    props.write_text(PROD_CONFIG.read_text() + "stealguard_secret_file=secret\n")  # relative to the config file
    s = serve(NOISE, secret=None, ts_config=props)
    assert s.handler.model.secret_fingerprint == fingerprint(OTHER_SECRET)


def test_secret_file_of_the_model_config_and_its_expected_fingerprint(serve, tmp_path):
    secret_file = tmp_path / "secret"
    secret_file.write_text(DEV_SECRET)

    def expect(fp):
        return lambda cfg: cfg["stealguard"].update(secret={"file": str(secret_file), "fingerprint": fp})

    assert serve(NOISE, secret=None, edit=expect(fingerprint(DEV_SECRET))).handler.model.secret_fingerprint == \
        fingerprint(DEV_SECRET)
    with pytest.raises(ConfigError, match=f"expects the secret with fingerprint {fingerprint(OTHER_SECRET)}"):
        serve(NOISE, secret=None, edit=expect(fingerprint(OTHER_SECRET)))


def test_a_secret_file_inside_the_archive_or_a_short_secret_is_refused(serve):
    with pytest.raises(ConfigError, match="inside the archive"):
        serve(NOISE, secret=None, edit=lambda cfg: cfg["stealguard"].update(secret={"file": "model-config.yaml"}))
    with pytest.raises(ConfigError, match=r"at least 16 .*value not shown") as info:
        serve(NOISE, secret="short-secret")
    assert "short-secret" not in str(info.value)


def test_production_sends_no_defense_header_but_metrics_and_log_carry_the_version(serve, caplog):
    caplog.set_level(logging.INFO)
    sink = CaptureSink()
    s = serve(NOISE, version={"name": "fm", "version": 3}, metrics=sink, ts_config=PROD_CONFIG)
    answer = s.one({"instances": rows(2)})
    assert answer.status == 200
    assert not any(k.lower() == "x-stealguard-defense" for k in answer.headers)
    refused = s.one({"instances": [[1.0]]})
    assert refused.status == 400 and not any(k.lower() == "x-stealguard-defense" for k in refused.headers)
    assert "random_noise@fm/3" in caplog.text and "X-StealGuard-Defense header off" in caplog.text
    assert sink.calls and all(labels[2] == "fm/3" for _, _, _, labels in sink.calls)
    dev = serve(NOISE, version={"name": "fm", "version": 3})
    assert dev.one({"instances": rows(2)}).headers["X-StealGuard-Defense"] == "random_noise@fm/3"


def test_describe_api_reports_the_input_contract(serve, tmp_path):
    labels = tmp_path / "index_to_name.json"
    labels.write_text(json.dumps({str(i): f"c{i}" for i in range(10)}))
    s = serve({"name": "identity"}, arch="lenet", input_spec={"shape": [1, 28, 28], "image": IMAGE, "json": "pixels"},
              labels=labels)
    contract = json.loads(s.handler.describe_handle())
    assert contract["input"] == {"shape": [1, 28, 28], "dtype": "float32", "max_rows": 256, "json": "pixels",
                                 "mean": [0.286], "std": [0.353], "image": {"size": [28, 28], "mode": "L"},
                                 "content_types": ["application/json", "image/png", "image/jpeg"]}
    assert contract["classes"] == [f"c{i}" for i in range(10)]
    assert contract["defense"] == {"name": "identity", "version": "unversioned"}
    assert contract["secret_fingerprint"] is None
    # TorchServe asks through handle() with the request header describe=True
    s.context.request_processor = [RequestProcessor({"describe": "True"})]
    assert s.handler.handle([{"body": b""}], s.context) == [s.handler.describe_handle()]


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def test_pixels_json_answers_like_the_image_path_and_refuses_values_outside_0_1(serve):
    s = serve({"name": "identity"}, arch="lenet", input_spec={"shape": [1, 28, 28], "image": IMAGE, "json": "pixels"})
    imgs = np.random.default_rng(0).integers(0, 256, size=(6, 28, 28), dtype=np.uint8)
    by_image = torch.cat([probs(s.one(png(i), "image/png")) for i in imgs])
    by_json = probs(s.one({"instances": (imgs[:, None] / 255.0).tolist()}))
    assert torch.equal(by_json.argmax(1), by_image.argmax(1))
    torch.testing.assert_close(by_json, by_image, rtol=0, atol=1e-5)
    normalised = serve({"name": "identity"}, arch="lenet", input_spec={"shape": [1, 28, 28], "image": IMAGE})
    x = (imgs[:, None] / 255.0 - 0.286) / 0.353
    torch.testing.assert_close(probs(normalised.one({"instances": x.tolist()})), by_image, rtol=0, atol=1e-5)
    bad = s.one({"instances": x.tolist()})
    assert bad.status == 400
    assert "pixels in [0, 1]" in bad.json["message"] and "first outside in instance 0" in bad.json["message"]


def test_pixels_needs_an_image_spec(serve):
    with pytest.raises(ConfigError, match="json 'pixels' needs 'image'"):
        serve({"name": "identity"}, input_spec={"shape": [64], "json": "pixels"})


def test_a_multi_row_failing_request_counts_all_its_rows(serve):
    sink = CaptureSink()
    s = serve({"name": "test_explode", "trigger": 123.0}, metrics=sink)
    boom = rows(5)
    boom[3][0] = 123.0
    bad_shape = rows(4)
    bad_shape[2] = bad_shape[2][:10]
    answers = s.batch([({"instances": boom}, "application/json"), ({"instances": bad_shape}, "application/json"),
                       ({"instances": rows(2)}, "application/json")])
    assert [a.status for a in answers] == [500, 400, 200]

    def counted(name):
        return {labels[3]: value for kind, n, value, labels in sink.calls if n == name}

    assert counted("stealguard_errors_total") == {"defense_failed": 1, "bad_input": 1}
    assert counted("stealguard_error_rows_total") == {"defense_failed": 5, "bad_input": 4}
