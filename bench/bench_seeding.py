"""Per-row cost of the per-query seed + noise draw: the keyed PRF (plugins/seeding.py: keyed BLAKE2b over each
row's canonical float32 bytes, then Philox4x64 keyed by the 128-bit digest) against the old hand-rolled
splitmix64 fold (kept below, only here, for the comparison), on LeNet-sized rows (784 float32 values), K = 10
normals per row (what random_noise draws), batch 1, 8 and 256.

    .venv/bin/python bench/bench_seeding.py [--rounds 30]

CPU time per call (time.process_time, minimum over rounds) divided by the batch size. Also shown: random_noise's
whole defense call on the same batch, and the seed alone. Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import hashlib
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from plugins import build_defense, seeding  # noqa: E402

SECRET = "bench-secret-not-for-serving-0001"
ROW = 784
K = 10

# --- the old path (plugins/seeding.py before the keyed PRF), verbatim, for the comparison only ---------------
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def old_query_seeds(query: torch.Tensor, secret: str) -> np.ndarray:
    arr = query.detach().to(torch.float32).cpu().contiguous().numpy().reshape(query.shape[0], -1)
    arr = np.where(arr == 0, np.float32(0), arr)
    words = arr.view(np.uint32).astype(np.uint64)
    key = np.frombuffer(hashlib.blake2b(secret.encode(), digest_size=8, person=b"stealguard").digest(),
                        dtype=np.uint64)[0]
    positions = np.arange(words.shape[1], dtype=np.uint64)
    with np.errstate(over="ignore"):
        position_keys = _splitmix64(positions ^ key)
        folded = _splitmix64(words ^ position_keys[None, :]).sum(axis=1, dtype=np.uint64)
        return _splitmix64(folded ^ key ^ (np.uint64(words.shape[1]) * _GOLDEN))


def old_normal(seeds: np.ndarray, n: int) -> torch.Tensor:
    half = (n + 1) // 2
    counters = np.arange(1, 2 * half + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        bits = _splitmix64(seeds[:, None] ^ _splitmix64(counters)[None, :])
    u = ((bits >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)
    radius = np.sqrt(-2.0 * np.log(u[:, :half]))
    z = np.concatenate([radius * np.cos(2 * np.pi * u[:, half:]), radius * np.sin(2 * np.pi * u[:, half:])], 1)
    return torch.from_numpy(z[:, :n].copy())


def per_row_us(fn, batch: int, rounds: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(rounds):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best / batch * 1e6


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=30)
    a = p.parse_args()
    torch.set_num_threads(1)
    defense = build_defense({"name": "random_noise", "epsilon": 2.0, "norm": "l2", "secret": SECRET})
    print(f"python {platform.python_version()}, numpy {np.__version__}, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}; rows of {ROW} float32, K={K}; CPU us per row (min of "
          f"{a.rounds})")
    print(f"{'batch':>5}  {'old seed+noise':>14}  {'PRF seed+noise':>14}  {'PRF seed only':>13}  "
          f"{'random_noise call':>17}")
    for batch in (1, 8, 256):
        g = torch.Generator().manual_seed(batch)
        x = torch.rand(batch, ROW, generator=g)
        y = torch.softmax(torch.randn(batch, K, generator=g), dim=1)
        old = per_row_us(lambda x=x: old_normal(old_query_seeds(x, SECRET), K), batch, a.rounds)
        new = per_row_us(lambda x=x: seeding.normal(seeding.query_seeds(x, SECRET), K), batch, a.rounds)
        seed = per_row_us(lambda x=x: seeding.query_seeds(x, SECRET), batch, a.rounds)
        call = per_row_us(lambda x=x, y=y: defense(y, x), batch, a.rounds)
        print(f"{batch:>5}  {old:>14.1f}  {new:>14.1f}  {seed:>13.1f}  {call:>17.1f}")


if __name__ == "__main__":
    main()
