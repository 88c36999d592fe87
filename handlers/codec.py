"""The request codec: request bodies in, a float32 batch out; defended probabilities in, the JSON out.

Accepted bodies: JSON ``{"instances": [...]}`` or a bare JSON list of instances (each instance has the input
shape), and, for image models, one PNG or JPEG image per request. Anything else is a :class:`RequestError`
with the status (400, 413, 415) and a message that says what was wrong and what is allowed.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from handlers.config import InputSpec
from handlers.errors import RequestError

JSON_TYPES = ("application/json",)
IMAGE_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG"}
SNIFF_TYPES = ("", "application/octet-stream")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"


def media_type(content_type: str | None) -> str:
    """``"Application/JSON; charset=utf-8"`` -> ``"application/json"``; None -> ``""``."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def _shape(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


class Codec:
    def __init__(self, spec: InputSpec, labels: list[Any] | None = None) -> None:
        self.spec = spec
        self.labels = labels
        self.allowed = "application/json" + (", image/png, image/jpeg" if spec.image is not None else "")

    # ----------------------------------------------------------------- requests
    def decode(self, body: Any, content_type: str | None) -> torch.Tensor:
        """One request body -> an n x <input shape> float32 batch (n >= 1), or RequestError."""
        mtype = media_type(content_type)
        parsed = isinstance(body, (dict, list, int, float))
        parsed = parsed or (isinstance(body, str) and mtype == "application/json")
        if parsed:  # TorchServe already parsed an application/json body (a JSON string arrives as str)
            return self.from_json(body)
        if body is None:
            raise RequestError(
                400, 'empty request: send a JSON body {"instances": [...]}' + self._image_hint()
            )
        if isinstance(body, str):
            body = body.encode("utf-8")
        if not isinstance(body, (bytes, bytearray)):
            raise RequestError(400, f"cannot read a request body of type {type(body).__name__}")
        if mtype in JSON_TYPES or mtype.endswith("+json"):
            return self.from_json(self._parse_json(body))
        if mtype in IMAGE_TYPES:
            return self.from_image(bytes(body))
        if mtype in SNIFF_TYPES:
            if body.startswith(_PNG_MAGIC) or body.startswith(_JPEG_MAGIC):
                return self.from_image(bytes(body))
            if body.lstrip()[:1] in (b"{", b"["):
                return self.from_json(self._parse_json(body))
            if not body.strip():
                raise RequestError(
                    400, 'empty request: send a JSON body {"instances": [...]}' + self._image_hint()
                )
        raise RequestError(415, f"unsupported content type {mtype or 'none'!r}; allowed: {self.allowed}")

    def _image_hint(self) -> str:
        return " or a PNG/JPEG image" if self.spec.image is not None else ""

    @staticmethod
    def _parse_json(body: bytes | bytearray) -> Any:
        try:
            return json.loads(bytes(body).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RequestError(400, f"body is not valid JSON: {exc}") from None
        except RecursionError:  # e.g. 100,000 nested "[": json's decoder gives up before the shape check
            raise RequestError(400, "body is not accepted: JSON nested too deeply") from None
        except ValueError as exc:  # e.g. an integer literal of more than 4300 digits
            raise RequestError(400, f"body is not accepted as JSON: {exc}") from None

    def from_json(self, obj: Any) -> torch.Tensor:
        if isinstance(obj, dict):
            if "instances" not in obj:
                keys = ", ".join(sorted(map(str, obj))) or "none"
                raise RequestError(400, f"JSON object needs an 'instances' list (got keys: {keys})")
            obj = obj["instances"]
        if not isinstance(obj, list):
            raise RequestError(
                400, f'expected {{"instances": [...]}} or a JSON list of instances; got {type(obj).__name__}'
            )
        if not obj:
            raise RequestError(400, "empty instances: send at least one instance")
        try:
            return self._instances(obj)
        except RequestError as exc:  # count every row of the refused request (stealguard_error_rows_total)
            exc.rows = len(obj)
            raise

    def _instances(self, obj: list) -> torch.Tensor:
        shape = self.spec.shape
        if not isinstance(obj[0], list):
            raise RequestError(
                400,
                f"wrong shape: each instance must have shape {_shape(shape)} (rank {len(shape)}); "
                f"got instances of shape [] (rank 0)",
            )
        if len(obj) > self.spec.max_rows:
            raise RequestError(
                413, f"{len(obj)} instances exceed the maximum of {self.spec.max_rows} per request"
            )
        try:
            arr = np.asarray(obj)
        except (ValueError, TypeError):
            raise RequestError(
                400,
                f"instances are ragged or malformed: each instance must be a nested list of shape "
                f"{_shape(shape)}",
            ) from None
        if arr.dtype.kind not in "iuf":
            what = {"b": "booleans", "U": "strings", "S": "strings", "O": "null or mixed values"}.get(
                arr.dtype.kind, ""
            )
            raise RequestError(
                400, f"instances must be numbers; found non-numeric values ({what or arr.dtype})"
            )
        if arr.shape[1:] != tuple(shape):
            raise RequestError(
                400,
                f"wrong shape: each instance must have shape {_shape(shape)} (rank {len(shape)}); "
                f"got instances of shape {_shape(arr.shape[1:])} (rank {arr.ndim - 1})",
            )
        x = arr.astype(np.float32)
        finite = np.isfinite(x).reshape(len(x), -1).all(axis=1)
        if not finite.all():
            row = int(np.flatnonzero(~finite)[0])
            raise RequestError(
                400, f"instances contain NaN or infinity (or values beyond float32), first in instance {row}"
            )
        if self.spec.json_input == "pixels":
            lo, hi = float(x.min()), float(x.max())
            if lo < 0 or hi > 1:
                bad = int(np.flatnonzero(((x < 0) | (x > 1)).reshape(len(x), -1).any(axis=1))[0])
                raise RequestError(
                    400,
                    f"instances must be pixels in [0, 1] for this model (JSON input space 'pixels'; the server "
                    f"normalises them); got values in [{lo:.4g}, {hi:.4g}], first outside in instance {bad}",
                )
            x = self.normalise(x)
        return torch.from_numpy(x)

    def from_image(self, data: bytes) -> torch.Tensor:
        image = self.spec.image
        if image is None:
            raise RequestError(415, f"this model takes JSON instances, not images; allowed: {self.allowed}")
        if len(data) > image.max_bytes:
            raise RequestError(
                413, f"image of {len(data)} bytes exceeds the maximum of {image.max_bytes} bytes"
            )
        from PIL import Image, UnidentifiedImageError

        try:
            img = Image.open(io.BytesIO(data))
        except (UnidentifiedImageError, OSError, ValueError):
            raise RequestError(400, "body is not a decodable PNG or JPEG image") from None
        except Image.DecompressionBombError as exc:
            raise RequestError(413, f"image too large to decode: {exc}") from None
        if img.format not in ("PNG", "JPEG"):
            raise RequestError(415, f"image format {img.format} is not supported; allowed: PNG, JPEG")
        width, height = img.size
        if width * height > image.max_pixels:
            raise RequestError(
                413, f"image of {width}x{height} pixels exceeds the maximum of {image.max_pixels} pixels"
            )
        try:
            img.load()
            img = img.convert(image.mode)
        except (OSError, ValueError, SyntaxError) as exc:
            raise RequestError(400, f"image could not be decoded: {exc}") from None
        h, w = image.size
        if (width, height) != (w, h):
            img = img.resize((w, h), Image.Resampling.BILINEAR)
        arr = np.asarray(img, dtype=np.float32) / np.float32(255.0)
        arr = arr[None, :, :] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        return torch.from_numpy(self.normalise(np.ascontiguousarray(arr).reshape(1, *self.spec.shape)))

    def normalise(self, pixels: np.ndarray) -> np.ndarray:
        """n x <input shape> pixels in [0, 1] (channels first) -> (pixels - mean) / std per channel, float32."""
        image = self.spec.image
        mean = np.asarray(image.mean, dtype=np.float32)
        std = np.asarray(image.std, dtype=np.float32)
        per_channel = pixels.reshape(len(pixels), len(mean), -1)  # 1 value, or one per channel
        out = (per_channel - mean[None, :, None]) / std[None, :, None]
        return np.ascontiguousarray(out.reshape(pixels.shape), dtype=np.float32)

    # ---------------------------------------------------------------- responses
    def encode(self, probs: torch.Tensor) -> bytes:
        """B x K defended probabilities -> ``{"predictions": [{"label": ..., "probabilities": [...]}]}``."""
        return self.encode_many(probs, [probs.shape[0]])[0]

    def encode_many(self, probs: torch.Tensor, sizes: Sequence[int]) -> list[bytes]:
        """The responses of consecutive requests of ``sizes`` rows each, from one B x K batch: one argmax and
        one conversion to Python floats for the whole batch, then one JSON body per request."""
        top = probs.argmax(dim=1).tolist()
        rows = probs.tolist()
        labels = self.labels
        out, start = [], 0
        for n in sizes:
            preds = [
                {"label": labels[t] if labels is not None else t, "probabilities": r}
                for t, r in zip(top[start : start + n], rows[start : start + n], strict=True)
            ]
            out.append(json.dumps({"predictions": preds}, separators=(",", ":")).encode("utf-8"))
            start += n
        if start != len(rows):
            raise ValueError(f"encode_many: request sizes {list(sizes)} do not add up to the batch's {len(rows)} rows")
        return out


def error_body(status: int, kind: str, message: str) -> bytes:
    return json.dumps({"code": status, "type": kind, "message": message}).encode("utf-8")


def load_labels(path: str | None, num_classes: int) -> list[Any] | None:
    """Labels from index_to_name.json ({"0": "name", ...} or a list); None when ``path`` is None."""
    if path is None:
        return None
    name = os.path.basename(path)
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    if isinstance(raw, list):
        labels = list(raw)
    elif isinstance(raw, dict):
        labels = [raw.get(str(i), i) for i in range(num_classes)]
        extra = sorted(set(raw) - {str(i) for i in range(num_classes)})
        if extra:
            raise ValueError(f"{name} has keys outside 0..{num_classes - 1}: {extra[:5]}")
    else:
        raise ValueError(f"{name} must be an object or a list; got {type(raw).__name__}")
    if len(labels) != num_classes:
        raise ValueError(f"{name} names {len(labels)} classes; the victim has {num_classes}")
    return labels
