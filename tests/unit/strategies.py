"""Hypothesis strategies for batches of probability vectors: random, near-one-hot, uniform, with zeros."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import strategies as st

DTYPES = st.sampled_from([torch.float32, torch.float64])


@st.composite
def prob_batches(draw, max_batch: int = 64, min_classes: int = 2, max_classes: int = 100):
    """A B x K batch on the simplex (B <= max_batch, K in [min_classes, max_classes]) of a chosen dtype.

    Rows are a mix of kinds: softmax of random logits at a random temperature (from near-uniform to
    near-one-hot), exact uniform rows, exact one-hot rows, and rows with exact zeros.
    """
    b = draw(st.integers(1, max_batch))
    k = draw(st.integers(min_classes, max_classes))
    dtype = draw(DTYPES)
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    temperature = 10.0 ** rng.uniform(-2, 2, size=(b, 1))
    logits = rng.normal(size=(b, k)) / temperature
    y = np.exp(logits - logits.max(axis=1, keepdims=True))
    kind = rng.integers(0, 5, size=b)
    y[kind == 1] = 1.0  # uniform
    onehot = np.zeros((b, k))
    onehot[np.arange(b), rng.integers(0, k, size=b)] = 1.0
    y[kind == 2] = onehot[kind == 2]
    zeros = (rng.random((b, k)) < 0.5) & (kind == 3)[:, None]
    zeros[np.arange(b), y.argmax(axis=1)] = False
    y[zeros] = 0.0
    y = y / y.sum(axis=1, keepdims=True)
    return torch.from_numpy(y).to(dtype)


def row_sums(y: torch.Tensor) -> torch.Tensor:
    return y.to(torch.float64).sum(dim=1)
