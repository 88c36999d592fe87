"""Deterministic, keyed per-query randomness, fully batched.

A randomised defense must give the same answer to the same query (so averaging repeated queries gains the
attacker nothing) and unrelated noise to different queries. Each row's seed is a keyed hash of the query's
bytes and a server secret; the noise is then a counter-based stream (splitmix64) of that seed. Everything
is vectorised numpy uint64 arithmetic: no per-row Python loop.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def _secret_key(secret: str) -> np.uint64:
    digest = hashlib.blake2b(secret.encode("utf-8"), digest_size=8, person=b"stealguard").digest()
    return np.frombuffer(digest, dtype=np.uint64)[0]


def _as_rows(query: Any) -> np.ndarray:
    """The query batch as a B x W array of uint64 words (values canonicalised to float32 bits)."""
    if isinstance(query, torch.Tensor):
        arr = query.detach().to(torch.float32).cpu().contiguous().numpy()
    else:
        arr = np.ascontiguousarray(np.asarray(query, dtype=np.float32))
    if arr.ndim == 0:
        raise ValueError("a query batch needs a leading batch dimension; got a scalar")
    arr = arr.reshape(arr.shape[0], -1)
    arr = np.where(arr == 0, np.float32(0), arr)  # -0.0 and 0.0 are the same query
    return arr.view(np.uint32).astype(np.uint64)


def query_seeds(query: Any, secret: str) -> np.ndarray:
    """One 64-bit seed per row of ``query`` (B,), a keyed hash of the row's content and ``secret``."""
    words = _as_rows(query)
    key = _secret_key(secret)
    positions = np.arange(words.shape[1], dtype=np.uint64)
    with np.errstate(over="ignore"):
        position_keys = _splitmix64(positions ^ key)
        mixed = _splitmix64(words ^ position_keys[None, :])
        folded = mixed.sum(axis=1, dtype=np.uint64)
        length = np.uint64(words.shape[1]) * _GOLDEN
        return _splitmix64(folded ^ key ^ length)


def uniform(seeds: np.ndarray, n: int) -> np.ndarray:
    """B x n uniforms in (0, 1), counter-based from each row's seed."""
    counters = np.arange(1, n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        bits = _splitmix64(seeds[:, None] ^ _splitmix64(counters)[None, :])
    return ((bits >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)


def normal(seeds: np.ndarray, n: int) -> torch.Tensor:
    """B x n standard normals (float64 tensor) from each row's seed, by the Box-Muller transform."""
    half = (n + 1) // 2
    u = uniform(seeds, 2 * half)
    u1, u2 = u[:, :half], u[:, half:]
    radius = np.sqrt(-2.0 * np.log(u1))
    z = np.concatenate([radius * np.cos(2 * np.pi * u2), radius * np.sin(2 * np.pi * u2)], axis=1)
    return torch.from_numpy(z[:, :n].copy())
