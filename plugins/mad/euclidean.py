"""MAD and MAD-argmax where the Gram matrix is the identity (``jacobian="last_layer"`` and ``"identity"``), in
NumPy: the serving hot path.

A server calls the defense on every batch, usually of a few rows and K = 10 classes. There the torch pipeline
(plugins.mad.defense, candidates, mixing, geometry) spends its time in per-operator dispatch (about 100 small
ops, ~5 us each), not in arithmetic; the same float64 formulas in NumPy cost ~1 us per op. This module computes,
for M = I, exactly what that pipeline computes, in the same order of operations (so the answers agree to the
last few bits; a target can differ only where two candidates tie to rounding):

- ``vertices`` (``mad``): cos for every one-hot vertex, ``(r_k - c.r) / sqrt((1 - 2 c_k + c.c) r.r)``.
- ``subsets`` (``mad_argmax``, K <= candidates.EXHAUSTIVE_MAX_CLASSES): every subset S containing the row's top
  class c, ranked by ``(sum_S r / |S| - c.r) / sqrt(1 / |S| - 2 sum_S c / |S| + c.c)`` with the cached tables of
  candidates.exhaustive_tables; the mixing coefficient is capped by mixing.top_margin_cap's rule.
- l1 / l2 closed-form mixing ``a = min(1, epsilon / ||y* - y||)``, y~ = (1 - a) y + a y*, and the angles of y~
  and y* to y. The KL budget and the ``random`` oracle stay on the torch path.

Here r = y - c, c the centre (the surrogate's softmax, or 0 for the identity Jacobian). Every array is float64.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from plugins.mad import candidates
from plugins.mad.mixing import TOP_MARGIN

_TINY = np.finfo(np.float64).tiny
KINDS = ("vertices", "subsets")


@dataclass(frozen=True)
class Solution:
    """Per row: the answer y~, its angle to y, the target y*, the mixing coefficient a, the target's angle."""

    y_tilde: np.ndarray
    deviation: np.ndarray
    target: np.ndarray
    mixing: np.ndarray
    target_deviation: np.ndarray


@functools.lru_cache(maxsize=candidates.EXHAUSTIVE_MAX_CLASSES + 1)
def _tables(num_classes: int):
    t = candidates.exhaustive_tables(num_classes)
    return t.others.numpy(), np.ascontiguousarray(t.table.numpy().T), t.size.numpy(), t.targets.numpy()


def _cosine(v_m_r, v_m_v, v_m_c, c_m_r, c_m_c, r_m_r):
    """geometry.Reference.cosine_from_terms for M = I (the per-row terms broadcast along axis 1)."""
    num = v_m_r - c_m_r
    den = np.maximum(v_m_v - 2 * v_m_c + c_m_c, 0) * r_m_r
    return np.minimum(np.maximum(num / np.sqrt(np.maximum(den, _TINY)), -1.0), 1.0)


def solve(y: np.ndarray, c: np.ndarray, epsilon: float, norm: str, oracle: str, kind: str) -> Solution:
    """MAD (``kind="vertices"``) or MAD-argmax (``"subsets"``) for rows ``y`` (B x K, each summing to 1) and
    centres ``c`` (B x K), with an l1 or l2 budget ``epsilon > 0`` and the ``extreme`` or ``argmin`` oracle."""
    if kind not in KINDS:
        raise ValueError(f"kind: {kind!r}; allowed: {', '.join(KINDS)}")
    if norm not in ("l1", "l2"):
        raise ValueError(f"norm: {norm!r}; the NumPy path handles l1 and l2 (kl uses the torch path)")
    if oracle not in ("extreme", "argmin"):
        raise ValueError(f"oracle: {oracle!r}; the NumPy path handles extreme and argmin")
    b, k = y.shape
    rows = np.arange(b)
    r = y - c
    r_m_r = (r * r).sum(1)[:, None]
    c_m_c = (c * c).sum(1)[:, None]
    c_m_r = (c * r).sum(1)[:, None]
    top = y.argmax(1)
    if kind == "vertices":
        score = _cosine(r, 1.0, c, c_m_r, c_m_c, r_m_r)
        best = score.argmin(1) if oracle == "extreme" else score.argmax(1)
        target = np.zeros_like(y)
        target[rows, best] = 1.0
    else:
        if k > candidates.EXHAUSTIVE_MAX_CLASSES:
            raise ValueError(f"subsets: K={k} > {candidates.EXHAUSTIVE_MAX_CLASSES}; use the greedy torch path")
        others_of, table_t, size, targets = _tables(k)
        others = (rows[:, None], others_of[top])
        sum_m_r = r[others] @ table_t + r[rows, top][:, None]
        sum_m_c = c[others] @ table_t + c[rows, top][:, None]
        num = sum_m_r / size - c_m_r
        den = np.maximum((1.0 / size - 2 * sum_m_c / size) + c_m_c, _TINY)
        score = num * (1.0 / np.sqrt(den))
        best = score.argmin(1) if oracle == "extreme" else score.argmax(1)
        target = targets[top, best]
    diff = target - y
    d = np.abs(diff).sum(1) if norm == "l1" else np.sqrt(np.square(diff).sum(1))
    a = np.where(d <= epsilon, 1.0, epsilon / np.maximum(d, _TINY))
    if kind == "subsets":  # keep the top class strictly first (mixing.top_margin_cap)
        gap = y[rows, top][:, None] - y
        in_s = target > 0
        in_s[rows, top] = False
        d_min = np.where(in_s, gap, np.inf).min(1)
        cap = np.minimum(np.maximum(1 - TOP_MARGIN / np.maximum(d_min, TOP_MARGIN), 0.0), 1.0)
        a = np.minimum(a, np.where(np.isinf(d_min), 1.0, cap))
    a2 = a[:, None]
    y_tilde = np.where(a2 >= 1, target, (1 - a2) * y + a2 * target)
    angles = [
        np.arccos(_cosine((v * r).sum(1), (v * v).sum(1), (v * c).sum(1), c_m_r[:, 0], c_m_c[:, 0], r_m_r[:, 0]))
        for v in (y_tilde, target)
    ]
    return Solution(y_tilde, angles[0], target, a, angles[1])
