"""Hostile input against a real TorchServe serving a defended image archive (LeNet + mad_argmax, JSON and
PNG/JPEG accepted): 40 kinds of malformed payload plus hypothesis-generated JSON documents and raw bodies.
Each gets a 4xx with a message, never a 5xx and never probabilities; the worker survives (same pid) and keeps
serving.

Which layer answers: TorchServe's frontend refuses bodies over max_request_size (6553500 bytes by default, as
in deploy/config.properties) with 413 before any worker sees them; every other payload reaches the
StealGuard handler, whose JSON answers carry ``{"code", "type", "message"}``. The ``layer`` column below
records which one is expected, and the test checks it (TorchServe's own errors have other ``type`` values).
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from collections.abc import Iterator

import numpy as np
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from bench.reliability import build_store, ready_pids
from handlers.codec import Codec
from handlers.config import InputSpec
from handlers.errors import RequestError
from tests.support.torchserve import TorchServe

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "rel_mad"
JSON = "application/json"
ROW = [[0.0] * 28] * 28  # one valid 28x28 plane
GOOD = json.dumps({"instances": [[ROW]]})
HANDLER_TYPES = {"BadRequest", "PayloadTooLarge", "UnsupportedMediaType"}


def png(width: int, height: int, fill: int = 0, mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (width, height), fill).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR claims ``width`` x ``height`` (a bomb's header) with a few bytes of pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1000)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def gif() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (28, 28)).save(buf, format="GIF")
    return buf.getvalue()


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# (id, body, content type, expected status, message fragment, layer)
CASES = [
    ("truncated-json", '{"instances": [[[0.1, ', JSON, 400, "not valid JSON", "handler"),
    ("truncated-object", '{"instances"', JSON, 400, "not valid JSON", "handler"),
    ("empty-body-json", b"", JSON, 400, "not valid JSON", "handler"),
    ("empty-body-no-type", b"", None, 400, "empty request", "handler"),
    ("whitespace-body", b"   \n ", "application/octet-stream", 400, "empty request", "handler"),
    ("json-null", "null", JSON, 400, "empty request", "handler"),
    ("json-string", '"hello"', JSON, 400, "got str", "handler"),
    ("json-number", "42", JSON, 400, "got int", "handler"),
    ("json-true", "true", JSON, 400, "got bool", "handler"),
    ("no-instances-key", '{"inputs": [1]}', JSON, 400, "needs an 'instances' list", "handler"),
    ("instances-string", '{"instances": "abc"}', JSON, 400, "got str", "handler"),
    ("instances-empty", '{"instances": []}', JSON, 400, "empty instances", "handler"),
    ("rank-0-instances", '{"instances": [1, 2, 3]}', JSON, 400, "rank 0", "handler"),
    ("wrong-rank-flat", json.dumps([[0.0] * 784]), JSON, 400, "wrong shape", "handler"),
    ("wrong-rank-4", json.dumps([[[ROW]]]), JSON, 400, "wrong shape", "handler"),
    ("wrong-size", json.dumps([[[[0.0] * 27] * 28]]), JSON, 400, "wrong shape", "handler"),
    ("ragged", json.dumps([[[[0.0] * 28] * 27 + [[0.0] * 29]]]), JSON, 400, "ragged or malformed", "handler"),
    ("strings", json.dumps([[[["a"] * 28] * 28]]), JSON, 400, "non-numeric", "handler"),
    ("nulls", json.dumps([[[[None] * 28] * 28]]), JSON, 400, "non-numeric", "handler"),
    ("booleans", json.dumps([[[[True] * 28] * 28]]), JSON, 400, "non-numeric", "handler"),
    ("objects-inside", json.dumps([[[[{}] * 28] * 28]]), JSON, 400, "non-numeric", "handler"),
    ("nan", json.dumps([[[[float("nan")] * 28] * 28]]), JSON, 400, "NaN or infinity", "handler"),
    ("infinity", json.dumps([[[[float("inf")] * 28] * 28]]), JSON, 400, "NaN or infinity", "handler"),
    ("minus-infinity", json.dumps([[[[float("-inf")] * 28] * 28]]), JSON, 400, "NaN or infinity", "handler"),
    ("1e400", json.dumps([[ROW]]).replace("0.0", "1e400", 1), JSON, 400, "NaN or infinity", "handler"),
    ("beyond-float32", json.dumps([[ROW]]).replace("0.0", "1e39", 1), JSON, 400, "beyond float32", "handler"),
    ("huge-integer", json.dumps([[ROW]]).replace("0.0", "9" * 400, 1), JSON, 400, "non-numeric", "handler"),
    ("5000-digit-integer", "[" + "1" * 5000 + "]", JSON, 400, "not accepted as JSON", "handler"),
    ("deeply-nested-100k", nested(100_000), JSON, 400, "nested too deeply", "handler"),
    ("nested-depth-900", nested(900), JSON, 400, "ragged or malformed", "handler"),
    ("too-many-rows", json.dumps({"instances": [[ROW]] * 17}), JSON, 413, "exceed the maximum of 16", "handler"),
    ("100k-rows", json.dumps({"instances": [[0]] * 100_000}), JSON, 413, "exceed the maximum", "handler"),
    ("huge-array-1M", json.dumps({"instances": [[0] * 1_000_000]}), JSON, 400, "wrong shape", "handler"),
    ("10MB-body", b'{"instances": [[' + b"0," * 5_000_000 + b"0]]}", JSON, 413, "", "torchserve"),
    ("invalid-utf8", b'{"instances": "\xff\xfe"}', JSON, 400, "not valid JSON", "handler"),
    ("utf8-bom", b"\xef\xbb\xbf" + GOOD.encode(), JSON, 400, "not valid JSON", "handler"),
    ("text-plain", GOOD, "text/plain", 415, "unsupported content type 'text/plain'", "handler"),
    ("xml", "<instances/>", "application/xml", 415, "unsupported content type", "handler"),
    ("json-as-png", GOOD, "image/png", 400, "not a decodable PNG or JPEG", "handler"),
    ("gif-as-png", gif(), "image/png", 415, "image format GIF is not supported", "handler"),
    ("garbage-jpeg", b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8, "image/jpeg", 400, "image", "handler"),
    ("truncated-png", png(28, 28, 7)[:-30], "image/png", 400, "image could not be decoded", "handler"),
    ("png-too-many-bytes", np.random.default_rng(0).integers(0, 256, 30_000, dtype=np.uint8).tobytes(),
     "image/png", 413, "exceeds the maximum of 20000 bytes", "handler"),
    ("decompression-bomb-4000x4000", png(4000, 4000), "image/png", 413, "exceeds the maximum of 1000000 pixels",
     "handler"),
    ("bomb-header-100000x100000", png_header_only(100_000, 100_000), "image/png", 413, "too large", "handler"),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory, shared_torchserve) -> Iterator[TorchServe]:
    root = tmp_path_factory.mktemp("hostile")
    store = build_store(root, workers=1)
    shared_torchserve.register(store.path / f"{MODEL}.mar", workers=1)
    try:
        yield shared_torchserve
    finally:
        shared_torchserve.unregister(MODEL)


def post(server: TorchServe, body, content_type: str | None) -> requests.Response:
    data = body.encode() if isinstance(body, str) else body
    headers = {"Content-Type": content_type} if content_type else {}
    if content_type is None:
        # requests sends no Content-Type for bytes bodies; make sure none is sent
        return requests.post(f"{server.inference_url}/predictions/{MODEL}", data=data, timeout=60)
    return requests.post(f"{server.inference_url}/predictions/{MODEL}", data=data, headers=headers, timeout=60)


def assert_refused(r: requests.Response, status: int | None = None, fragment: str = "") -> dict:
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:500])
    if status is not None:
        assert r.status_code == status, (r.status_code, r.text[:500])
    assert "probabilities" not in r.text
    try:
        doc = r.json()
    except ValueError:
        # TorchServe's frontend refuses a body over max_request_size with a 413 that is not JSON: its message
        # is the body text or the status line's reason phrase. The handler always answers JSON.
        assert r.status_code == 413, (r.status_code, r.text[:300])
        doc = {"type": "torchserve", "message": r.text.strip() or r.reason}
    assert doc.get("message"), r.text[:500]
    assert fragment in doc["message"], (fragment, doc)
    return doc


def test_there_are_at_least_30_kinds():
    assert len({c[0] for c in CASES}) == len(CASES) >= 30


def test_every_hostile_payload_gets_its_4xx_from_the_expected_layer_and_the_worker_survives(server):
    pid = ready_pids(server, MODEL)
    answered, wrong = {}, []
    for name, body, ctype, status, fragment, layer in CASES:
        r = post(server, body, ctype)
        try:
            doc = assert_refused(r, status, fragment)
            assert (doc.get("type") in HANDLER_TYPES) == (layer == "handler"), doc
        except (AssertionError, ValueError) as exc:
            wrong.append(f"{name}: {exc}")
            continue
        answered[name] = (r.status_code, doc.get("type"), doc["message"][:80])
    print("\n".join(f"{k}: {v}" for k, v in answered.items()))
    assert not wrong, "\n".join(wrong)
    assert ready_pids(server, MODEL) == pid, "the worker restarted"
    ok = post(server, GOOD, JSON)
    assert ok.status_code == 200 and len(ok.json()["predictions"]) == 1
    png_ok = post(server, png(28, 28, 100), "image/png")
    assert png_ok.status_code == 200, png_ok.text


json_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
)
json_values = st.recursive(
    json_leaves,
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=40,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=json_values, wrap=st.booleans())
def test_generated_json_documents_never_get_a_5xx(server, doc, wrap):
    body = json.dumps({"instances": doc} if wrap else doc)  # NaN/Infinity written as JSON's extensions
    r = post(server, body, JSON)
    assert r.status_code < 500, (body[:300], r.status_code, r.text[:300])
    if r.status_code != 200:
        assert_refused(r)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    body=st.binary(max_size=2000),
    prefix=st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"{", b"["]),
    ctype=st.sampled_from([JSON, "image/png", "image/jpeg", "application/octet-stream", "text/csv", None]),
)
def test_generated_raw_bodies_never_get_a_5xx(server, body, prefix, ctype):
    r = post(server, prefix + body, ctype)
    assert r.status_code < 500, (prefix + body[:100], ctype, r.status_code, r.text[:300])
    if r.status_code != 200:
        assert_refused(r)


def test_worker_still_the_same_after_the_generated_payloads(server):
    assert len(ready_pids(server, MODEL)) == 1
    assert post(server, GOOD, JSON).status_code == 200


@pytest.mark.parametrize("body", [nested(100_000), "[" + "1" * 5000 + "]"], ids=["deep", "digits"])
def test_codec_turns_json_decoder_limits_into_400(body):
    """In-process: the two bodies that made the handler answer 500 before the fix in handlers/codec.py."""
    codec = Codec(InputSpec(shape=(1, 28, 28), max_rows=16))
    with pytest.raises(RequestError) as err:
        codec.decode(body.encode(), JSON)
    assert err.value.status == 400
