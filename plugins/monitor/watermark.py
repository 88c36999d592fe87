"""DAWN's output watermark (Szyller, Atli, Marchal, Asokan: "DAWN: Dynamic Adversarial Watermarking of Neural
Networks", ACM MM 2021): a keyed fraction of queries is answered with a deterministic wrong top-1, and those
queries are recorded, so that a model trained on the answers (a clone) can later be shown to have learned the
wrong labels, which an independently trained model agrees with only by chance (``mlflow_project.lifecycle.verify``).

Per row, ``d = BLAKE2b(key=secret, person="sg-dawn")(canonical float32 row bytes)`` (hashlib's keyed BLAKE2b, a
standard PRF): the row is watermarked when the first 8 bytes, as a fraction of 2^64, are below ``fraction``
(default 0.005); its watermark label is the victim's top-1 ``c`` shifted by ``1 + (next 8 bytes mod (K - 1))``
modulo K, i.e. a keyed choice among the K - 1 other classes. Deterministic per query: the same query always gets
the same answer (repeating it reveals nothing). The answer is the served probability vector with the values of
its top class and the watermark label swapped: still on the simplex, the watermark label holding the largest
value (a permutation of what the defense answered, so the defense's budget shape is kept).

The key comes from a deploy-time secret (an environment variable or a file outside the archive): there is no
default key, and only :func:`fingerprint` (a keyed-hash digest, 8 hex characters) may be logged.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import torch

from plugins.monitor.config import WatermarkConfig
from plugins.monitor.store import WatermarkRecord

PERSON = b"sg-dawn"
MIN_KEY_BYTES = 16


def load_key(cfg: WatermarkConfig, field: str = "monitor.watermark") -> bytes:
    """The watermark key from ``cfg.key_file`` or the environment variable ``cfg.key_env``; ValueError when
    neither holds one (there is no default key) or it is shorter than 16 bytes. BLAKE2b takes at most 64 key
    bytes: a longer secret is hashed down to 64."""
    secret = None
    if cfg.key_file:
        try:
            with open(cfg.key_file, "rb") as f:
                secret = f.read().strip()
        except OSError as exc:
            raise ValueError(f"{field}.key_file: cannot read {cfg.key_file!r}: {exc.strerror}") from None
    elif cfg.key_env:
        value = os.environ.get(cfg.key_env)
        secret = value.encode("utf-8") if value else None
    if not secret:
        where = f"file {cfg.key_file!r}" if cfg.key_file else f"environment variable {cfg.key_env!r}"
        raise ValueError(
            f"{field}: enabled but no key: set the {where} to a secret of at least {MIN_KEY_BYTES} bytes "
            "(there is no default key)"
        )
    if len(secret) < MIN_KEY_BYTES:
        raise ValueError(f"{field}: the key must be at least {MIN_KEY_BYTES} bytes; got {len(secret)}")
    return secret if len(secret) <= 64 else hashlib.blake2b(secret, digest_size=64).digest()


def fingerprint(key: bytes) -> str:
    """8 hex characters identifying the key in logs (never the key)."""
    return hashlib.blake2b(b"stealguard key fingerprint", key=key, digest_size=4).hexdigest()


def canonical_rows(x: torch.Tensor) -> np.ndarray:
    """The batch as C-contiguous float32 rows (B x D), -0.0 folded into 0.0: the bytes the PRF reads."""
    arr = np.ascontiguousarray(x.detach().to(torch.float32).cpu().reshape(x.shape[0], -1).numpy())
    return np.where(arr == 0, np.float32(0), arr)


class Watermark:
    def __init__(self, key: bytes, fraction: float) -> None:
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"fraction: must be in (0, 1); got {fraction}")
        self._key = key
        self.fraction = fraction
        self._cut = int(fraction * 2**64)

    def choose(self, x: torch.Tensor, top1: torch.Tensor, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
        """(B,) bool: rows to watermark; (B,) int: their watermark labels (-1 elsewhere)."""
        rows = canonical_rows(x)
        picked = np.zeros(len(rows), dtype=bool)
        labels = np.full(len(rows), -1, dtype=np.int64)
        top = top1.cpu().numpy()
        for i, row in enumerate(rows):  # hashlib hashes one message per call
            d = hashlib.blake2b(row.tobytes(), key=self._key, digest_size=16, person=PERSON).digest()
            if int.from_bytes(d[:8], "big") < self._cut:
                picked[i] = True
                labels[i] = (int(top[i]) + 1 + int.from_bytes(d[8:], "big") % (num_classes - 1)) % num_classes
        return picked, labels

    def apply(self, x: torch.Tensor, y: torch.Tensor, probs: torch.Tensor, now: float):
        """Watermark the answers ``probs`` of batch ``x`` (``y``: the victim's probabilities, whose top-1 is c).
        Returns (answers, records of the watermarked rows, their row indices)."""
        c = y.argmax(dim=1)
        picked, labels = self.choose(x, c, probs.shape[1])
        if not picked.any():
            return probs, [], []
        out = probs.clone()
        idx = torch.from_numpy(np.flatnonzero(picked))
        wl = torch.from_numpy(labels[picked])
        rows = out[idx]
        ar = torch.arange(len(idx))
        top = rows.argmax(dim=1)  # the served answer's top (c, unless the defense moved it)
        top_vals, w_vals = rows[ar, top].clone(), rows[ar, wl].clone()
        rows[ar, top] = w_vals  # swap: the answer stays a permutation of the served vector, on the simplex
        rows[ar, wl] = top_vals
        out[idx] = rows
        flat = x.detach().to(torch.float32).cpu()
        records = [
            WatermarkRecord(
                query=flat[i].numpy().copy(),
                label=int(labels[i]),
                probs=out[i].to(torch.float64).numpy().copy(),
                at=now,
                victim_label=int(c[i]),
            )
            for i in idx.tolist()
        ]
        return out, records, idx.tolist()
