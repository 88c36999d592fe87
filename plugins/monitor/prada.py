"""PRADA's per-client test (Juuti, Szyller, Marchal, Asokan: "PRADA: Protecting against DNN Model Stealing
Attacks", EuroS&P 2019, arXiv 1805.02628, Algorithm 1), on one client's stream of queries.

For each new query x with predicted class c (the victim's top-1):

- if the client's growing set G_c is empty, x joins it (no distance yet);
- else d_min = min over y in G_c of ||x - y||_2 joins the client's distance set D, and if d_min > T_c
  (the class's threshold) x joins G_c, d_min joins D_{G_c}, and T_c <- max(T_c, mean(D_{G_c}) - std(D_{G_c}));
- once |D| >= ``min_distances`` (the paper tests once |D| > 100), the distances beyond ``outlier_std`` (3)
  standard deviations of their mean are dropped and the Shapiro-Wilk statistic W of the rest is computed
  (``scipy.stats.shapiro``); the client is flagged when W < delta (0.95, the paper's MNIST value).

When the test runs (``test_every``, k, default 10): the paper tests after every query; here W is recomputed
the first time the window holds ``min_distances`` distances and then once at least k new distances have joined
it since the last test (:func:`due`). Between tests the client's last W stands; a flag is raised on the first
test with W < delta, so at most k - 1 distances later than the every-query test would raise it (k = 1 is the
paper's schedule). One new distance moves a 1,000-distance window's W very little, and Shapiro-Wilk is most of
the monitor's cost per query.

Benign queries are natural samples whose nearest-neighbour distances look normal; synthetic extraction queries
(JBDA's Jacobian steps, small perturbations of earlier queries) give a skewed, multi-modal distance set.

Bounded state (what this module works on, persisted by a :mod:`plugins.monitor.store` backend): D keeps its
newest ``window`` values (the test runs over that window; a float64 array, packed in the stored summary by
:mod:`plugins.monitor.store`), G_c keeps the newest ``max_per_class`` rows (the
store evicts the oldest), and D_{G_c} is kept as running (count, sum, sum of squares), which gives its mean and
standard deviation exactly over every addition. Distances are L2 over the row as the victim saw it (float32).

Batched: every distance of a batch is computed by two ``torch.cdist`` calls per class (batch x growing set,
batch x batch); the remaining per-row step is PRADA's sequential scalar update, which is inherently ordered
(whether row i joins G_c decides row i+1's d_min). Rows of one batch are taken class by class, in order.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from scipy.stats import shapiro

from plugins.monitor.config import PradaConfig


def new_summary() -> dict:
    """``D``: the distance window; ``p``: distances added since the last test; ``w``: the last test's W."""
    return {
        "n": 0, "ood": 0, "D": np.zeros(0, dtype=np.float64), "p": 0, "T": {}, "G": {}, "flag": None, "w": None,
        "last_seen": 0.0,
    }


def update(
    summary: dict, growing: dict[int, np.ndarray], rows: np.ndarray, classes: np.ndarray, cfg: PradaConfig
) -> dict[int, np.ndarray]:
    """Run PRADA's update over one client's batch (``rows``: n x D float32, ``classes``: n predicted classes),
    in place on ``summary``; return the rows that join each growing set (to be appended by the store)."""
    dists: list[float] = []  # this batch's new distances, in order
    appended: dict[int, np.ndarray] = {}
    for c in np.unique(classes):
        c = int(c)
        idx = np.flatnonzero(classes == c)
        x = torch.from_numpy(rows[idx]).to(torch.float64)
        old = growing.get(c)
        d_old = (
            torch.cdist(x, torch.from_numpy(old).to(torch.float64)).min(dim=1).values.numpy()
            if old is not None and len(old)
            else None
        )
        d_new = torch.cdist(x, x).numpy()
        key = str(c)
        t = float(summary["T"].get(key, 0.0))
        count, total, squares = summary["G"].get(key, (0, 0.0, 0.0))
        joined: list[int] = []
        for j in range(len(idx)):
            cands = []
            if d_old is not None:
                cands.append(float(d_old[j]))
            if joined:
                cands.append(float(d_new[j, joined].min()))
            if not cands:  # the class's first query: it opens G_c
                joined.append(j)
                continue
            d_min = min(cands)
            dists.append(d_min)
            if d_min > t:
                joined.append(j)
                count, total, squares = count + 1, total + d_min, squares + d_min * d_min
                mean = total / count
                std = math.sqrt(max(squares / count - mean * mean, 0.0))
                t = max(t, mean - std)
        summary["T"][key] = t
        summary["G"][key] = (count, total, squares)
        if joined:
            appended[c] = np.ascontiguousarray(rows[idx[joined]], dtype=np.float32)
    window = np.concatenate([np.asarray(summary["D"], dtype=np.float64), np.asarray(dists, dtype=np.float64)])
    summary["D"] = window[max(0, len(window) - cfg.window) :]
    summary["p"] = int(summary.get("p", 0)) + len(dists)
    return appended


def due(summary: dict, cfg: PradaConfig) -> bool:
    """Whether W is to be (re)computed now: the window holds ``min_distances`` distances and either no W has
    been computed over it yet or at least ``test_every`` distances joined since the last test."""
    if len(summary["D"]) < cfg.min_distances:
        return False
    return summary.get("w") is None or int(summary.get("p", 0)) >= cfg.test_every


def retest(summary: dict, cfg: PradaConfig) -> float | None:
    """Run the test when :func:`due` (in place: ``w`` and the pending count); return the client's current W."""
    if due(summary, cfg):
        summary["w"] = statistic(summary["D"], cfg)
        summary["p"] = 0
    return summary.get("w")


def statistic(dists: list[float] | np.ndarray, cfg: PradaConfig) -> float | None:
    """Shapiro-Wilk W of the distance window after dropping outliers, or None before ``min_distances`` (or
    when fewer than 3 distances remain). A constant window (the same query repeated) has W = 1."""
    d = np.asarray(dists, dtype=np.float64)
    if d.size < cfg.min_distances:
        return None
    mean, std = d.mean(), d.std()
    if std > 0:
        d = d[np.abs(d - mean) <= cfg.outlier_std * std]
    if d.size < 3:
        return None
    if np.ptp(d) == 0:
        return 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns that p-values are approximate for n > 5000
        return float(shapiro(d).statistic)
