"""The per-client extraction monitor: PRADA's test and the client's OOD-query share, over a store.

    monitor = ExtractionMonitor(parse_monitor({...}), store)
    verdict = monitor.observe(clients, x, y)   # clients: one id per row; x: the batch; y: victim probabilities
    verdict.flagged_rows                       # (B,) bool: rows whose client is flagged (after this batch)
    verdict.newly_flagged                      # [(client, reason)] flagged by this batch
    verdict.action                             # observe | harden | block, from the config

A client is flagged for ``prada`` when W < delta on its distance window, or for ``ood_share`` when more than
``ood.share`` of its (at least ``ood.min_queries``) queries look OOD (``plugins.ood``: 1 - s above
``ood.threshold``, s the maximum probability or, with ``ood.score: gaussian``, the posterior Gaussian's
typicality). A flag lasts until the client's state expires (``ttl_seconds`` without a query) or is evicted.
Rows are grouped by client, and the whole batch is one ``store.update_many`` call (one SQLite transaction, two
Redis round trips without contention). PRADA's W is recomputed every ``prada.test_every`` new distances
(:func:`plugins.monitor.prada.retest`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from plugins.monitor import prada
from plugins.monitor.config import MonitorConfig
from plugins.monitor.store import MonitorStore
from plugins.ood import in_distribution_score

REASONS = ("prada", "ood_share")


@dataclass
class Verdict:
    action: str
    flagged_rows: np.ndarray
    newly_flagged: list[tuple[str, str]] = field(default_factory=list)
    statistics: dict[str, float | None] = field(default_factory=dict)  # client -> W after this batch


class ExtractionMonitor:
    def __init__(self, config: MonitorConfig, store: MonitorStore) -> None:
        self.config = config
        self.store = store

    def observe(self, clients: Sequence[str], x: torch.Tensor, y: torch.Tensor, now: float | None = None) -> Verdict:
        """Update every client in the batch and say which rows belong to flagged clients. Raises whatever the
        store raises (the caller decides how a store failure is served)."""
        if len(clients) != x.shape[0] or y.shape[0] != x.shape[0]:
            raise ValueError(f"clients ({len(clients)}), x ({x.shape[0]}) and y ({y.shape[0]}) need one row each")
        now = time.time() if now is None else now
        rows = x.detach().to(torch.float32).reshape(x.shape[0], -1).cpu().numpy()
        classes = y.argmax(dim=1).cpu().numpy()
        ood = (1.0 - in_distribution_score(y, self.config.ood.gaussian) > self.config.ood.threshold).cpu().numpy()
        owners = np.asarray(clients, dtype=object)
        flagged_rows = np.zeros(len(clients), dtype=bool)
        verdict = Verdict(action=self.config.action, flagged_rows=flagged_rows)
        order = list(dict.fromkeys(clients))
        members = {client: np.flatnonzero(owners == client) for client in order}

        def step_for(idx):
            cls = classes[idx]
            return lambda summary, growing: self._step(summary, growing, rows[idx], cls, int(ood[idx].sum()), now)

        results = self.store.update_many(
            [(client, np.unique(classes[members[client]]).tolist(), step_for(members[client])) for client in order],
            now,
        )
        for client, (flag, newly, w) in zip(order, results, strict=True):
            flagged_rows[members[client]] = flag is not None
            verdict.statistics[client] = w
            if newly:
                verdict.newly_flagged.append((client, flag))
        return verdict

    def _step(self, summary, growing, rows, classes, ood_count: int, now: float):
        s = summary or prada.new_summary()
        appended = prada.update(s, growing, rows, classes, self.config.prada)
        s["n"] += len(rows)
        s["ood"] += ood_count
        s["last_seen"] = now
        w = prada.retest(s, self.config.prada)
        newly = False
        if s["flag"] is None:
            reason = None
            if w is not None and w < self.config.prada.delta:
                reason = "prada"
            elif self.config.ood.enabled and s["n"] >= self.config.ood.min_queries:
                if s["ood"] / s["n"] > self.config.ood.share:
                    reason = "ood_share"
            if reason is not None:
                s["flag"] = {"reason": reason, "at": now, "w": w, "n": s["n"]}
                newly = True
        flag = s["flag"]["reason"] if s["flag"] else None
        return s, appended, (flag, newly, w)
