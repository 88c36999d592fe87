"""Deterministic, keyed per-query randomness from a standard keyed PRF, and the secret that keys it.

A randomised defense must give the same answer to the same query (so averaging repeated queries gains the
attacker nothing), unrelated noise to different queries, and noise nobody can recompute without the server's
secret (with it, random_noise's answer inverts exactly: softmax(log y~ - n) = y). So:

- the secret (a deploy-time string, never a default) is turned into a 256-bit key by BLAKE2b with a
  domain-separation ``person`` string (:func:`derive_key`); keys for other uses (gradient_redirection's fixed
  random direction) come from the same derivation with another ``person``;
- each row's seed is keyed BLAKE2b (``hashlib.blake2b(key=...)``, 128-bit digest) over the row's canonical
  bytes: the values as little-endian float32, ``-0.0`` written as ``0.0`` (:func:`query_seeds`). A row's seed
  depends on that row only, so answers are batch-invariant;
- a row's noise stream is numpy's counter-based Philox4x64 generator keyed by that 128-bit digest
  (:func:`uniform`, :func:`normal`).

An operator identifies a secret by its :func:`fingerprint` (the first 8 bytes of HMAC-SHA256(secret,
"stealguard"), hex), which is safe to log, tag and show; the secret itself is never written anywhere.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import numpy as np
import torch

KEY_PERSON = b"stealguard-key"  # derive_key: secret -> 256-bit key for the per-query seeds
SEED_PERSON = b"stealguard-seed"  # query_seeds: key + row bytes -> 128-bit seed
MIN_SECRET_LENGTH = 16  # characters; shorter secrets could be guessed offline from one (query, answer) pair
SECRET_HOWTO = (
    "generate one with `python -c 'import secrets; print(secrets.token_urlsafe(32))'` and keep it out of "
    "archives, MLflow and logs"
)


def _secret_bytes(secret: Any) -> bytes:
    value = secret.get_secret_value() if hasattr(secret, "get_secret_value") else secret
    if not isinstance(value, str) or not value:
        raise ValueError("secret: must be a non-empty string")
    return value.encode("utf-8")


def derive_key(secret: Any, person: bytes = KEY_PERSON) -> bytes:
    """A 256-bit key for one use (``person``, at most 16 bytes) derived from ``secret`` (str or SecretStr)."""
    return hashlib.blake2b(_secret_bytes(secret), digest_size=32, person=person).digest()


def fingerprint(secret: Any) -> str:
    """The first 8 bytes of HMAC-SHA256(secret, "stealguard") as 16 hex digits: names a secret, reveals nothing."""
    return hmac.new(_secret_bytes(secret), b"stealguard", hashlib.sha256).digest()[:8].hex()


def canonical_rows(query: Any) -> np.ndarray:
    """The query batch as a B x W little-endian float32 array (-0.0 and 0.0 are the same query)."""
    if isinstance(query, torch.Tensor):
        arr = query.detach().to(torch.float32).cpu().contiguous().numpy()
    else:
        arr = np.ascontiguousarray(np.asarray(query, dtype=np.float32))
    if arr.ndim == 0:
        raise ValueError("a query batch needs a leading batch dimension; got a scalar")
    arr = arr.reshape(arr.shape[0], -1)
    arr = np.where(arr == 0, np.float32(0), arr)
    return np.ascontiguousarray(arr, dtype="<f4")


def query_seeds(query: Any, secret: Any) -> np.ndarray:
    """One 128-bit seed per row of ``query`` (B x 2 uint64): keyed BLAKE2b of the row's canonical bytes."""
    rows = canonical_rows(query)
    key = derive_key(secret)
    seeds = np.empty((rows.shape[0], 2), dtype=np.uint64)
    view = seeds.view(np.uint8).reshape(rows.shape[0], 16)
    for i, row in enumerate(rows):
        view[i] = np.frombuffer(hashlib.blake2b(row.tobytes(), digest_size=16, key=key,
                                                person=SEED_PERSON).digest(), dtype=np.uint8)
    return seeds


def _raw(seeds: np.ndarray, n: int) -> np.ndarray:
    """B x n uint64 words: row i is the first n outputs of Philox4x64 keyed by seeds[i]."""
    seeds = np.asarray(seeds, dtype=np.uint64).reshape(-1, 2)
    out = np.empty((seeds.shape[0], n), dtype=np.uint64)
    for i, key in enumerate(seeds):
        out[i] = np.random.Philox(key=key).random_raw(n)
    return out


def uniform(seeds: np.ndarray, n: int) -> np.ndarray:
    """B x n uniforms in (0, 1) from each row's seed (53-bit resolution, never exactly 0 or 1)."""
    return ((_raw(seeds, n) >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)


def normal(seeds: np.ndarray, n: int) -> torch.Tensor:
    """B x n standard normals (float64 tensor) from each row's seed, by the Box-Muller transform."""
    half = (n + 1) // 2
    u = uniform(seeds, 2 * half)
    u1, u2 = u[:, :half], u[:, half:]
    radius = np.sqrt(-2.0 * np.log(u1))
    z = np.concatenate([radius * np.cos(2 * np.pi * u2), radius * np.sin(2 * np.pi * u2)], axis=1)
    return torch.from_numpy(z[:, :n].copy())


def keyed_generator(secret: Any, person: bytes) -> np.random.Generator:
    """A numpy Generator (Philox4x64, 128-bit key) for a fixed draw keyed by ``secret`` and a use ``person``."""
    key = np.frombuffer(derive_key(secret, person)[:16], dtype=np.uint64)
    return np.random.Generator(np.random.Philox(key=key))
