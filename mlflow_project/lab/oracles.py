"""Black-box oracles the attacks query: the victim behind a defense, in-process or over HTTP.

Every oracle takes a batch of inputs in the victim's input format (normalised tensors, N x shape) and returns
the probabilities the defended API gives back (N x K rows on the simplex). It counts every row it answers and
refuses to answer beyond its budget, so an attack's query count is exact.

- :class:`LocalOracle`: victim module + defense (``plugins.build_defense``), in-process.
- :class:`HTTPOracle`: a TorchServe prediction URL; ``POST {"instances": [...]}``, response
  ``{"predictions": [{"label": ..., "probabilities": [...]}, ...]}``.
- :class:`ArgmaxOracle`: wraps any oracle and returns one-hot rows of its top-1 outputs (the argmax attacker).
- :class:`MonitoredOracle`: the victim behind a defense *and* the server's per-client monitor
  (handlers/monitor.py over an in-process store): the attacker is one client; :func:`serve_benign` scores the
  benign test set as other clients through the same monitor, so the lab measures monitor + harden like a defense.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from plugins import DefenseOutput, build_defense, needs, with_secret

# The lab's explicit development secret for randomised defenses: offline evaluations need some key, and the
# attacks never see it. It is not a server default: an archive or a registered version never carries it, and a
# server without its own deploy-time secret refuses to load a randomised defense (handlers/deployment.py).
LAB_SECRET = "stealguard-lab-dev-secret-not-for-serving"


class BudgetExceeded(RuntimeError):
    """An attack asked an oracle for more rows than its remaining query budget."""


class Oracle:
    """Base: counts answered rows against an optional budget. Subclasses implement :meth:`_answer`."""

    def __init__(self, budget: int | None = None) -> None:
        if budget is not None and budget < 0:
            raise ValueError(f"budget: must be >= 0 (or None for unlimited); got {budget}")
        self.budget = budget
        self.queries = 0
        self.num_classes: int | None = None

    @property
    def remaining(self) -> int | None:
        return None if self.budget is None else self.budget - self.queries

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = len(x)
        if self.remaining is not None and n > self.remaining:
            raise BudgetExceeded(f"query of {n} rows exceeds the remaining budget of {self.remaining} "
                                 f"({self.queries} of {self.budget} spent)")
        if n == 0:
            return torch.empty(0, self.num_classes or 0)
        probs = self._answer(x)
        if probs.shape[0] != n:
            raise RuntimeError(f"oracle answered {probs.shape[0]} rows for a query of {n}")
        self.queries += n
        self.num_classes = probs.shape[1]
        return probs

    def _answer(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


def make_surrogate_for(victim: nn.Module, seed: int = 0) -> nn.Module:
    """The defender's fixed random surrogate of ``victim`` (plugins.surrogate.make_surrogate)."""
    from plugins.surrogate import make_surrogate

    return make_surrogate(victim, seed)


def load_misinformation(misinformation: nn.Module | str | Path) -> nn.Module:
    """A misinformation model: a module as it is, or the eager model of a train_misinformation export dir."""
    if isinstance(misinformation, nn.Module):
        return misinformation.eval()
    from mlflow_project.lab.train_victim import load_exported

    return load_exported(misinformation, "misinformation", "train_misinformation")[0]


def build_victim_defense(victim: nn.Module, config: Mapping[str, Any] | None, num_classes: int,
                         surrogate_seed: int = 0, misinformation: nn.Module | str | Path | None = None,
                         surrogate: nn.Module | None = None):
    """Build the defense ``config`` for ``victim`` (a surrogate is built when the defense needs one, unless
    ``surrogate`` gives it, e.g. the sweep's shared-work memo of that same surrogate; a
    misinformation model, a module or a train_misinformation export directory, is passed when it needs one
    and ignored otherwise)."""
    config = dict(config or {"name": "identity"})
    if "name" not in config:
        raise ValueError("defense: the config needs a 'name' (e.g. {\"name\": \"identity\"})")
    resources: dict[str, Any] = {"num_classes": num_classes}
    if needs(config, "surrogate"):
        resources["surrogate"] = surrogate if surrogate is not None else make_surrogate_for(victim, surrogate_seed)
    if needs(config, "misinformation"):
        if misinformation is None or misinformation == "":
            raise ValueError(
                f"misinformation: defense '{config['name']}' needs a misinformation model "
                "(a train_misinformation export directory)"
            )
        resources["misinformation"] = load_misinformation(misinformation)
    keyed = config if "secret" in config else with_secret(config, LAB_SECRET)
    return build_defense(keyed, **resources)


class LocalOracle(Oracle):
    """The victim behind a defense, in-process: ``defense(softmax(victim(x)), x).probs``."""

    def __init__(self, victim: nn.Module, defense=None, budget: int | None = None, batch_size: int = 512,
                 on_batch: Callable[[dict], None] | None = None) -> None:
        super().__init__(budget)
        self.victim = victim.eval()
        self.defense = defense
        self.batch_size = batch_size
        self.on_batch = on_batch

    @torch.no_grad()
    def _answer(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        for i in range(0, len(x), self.batch_size):
            xb = x[i : i + self.batch_size]
            probs = torch.softmax(self.victim(xb), dim=1)
            t0 = time.perf_counter()
            out = self.defense(probs, xb) if self.defense is not None else DefenseOutput(probs=probs)
            if self.on_batch is not None:
                self.on_batch({"probs": probs, "perturbed": out.probs, "angular_deviation": out.angular_deviation,
                               "latency_s": time.perf_counter() - t0})
            outs.append(out.probs.float())
        return torch.cat(outs)


class ClientBlocked(RuntimeError):
    """The monitor (action block) refused the attacker's client: no more answers."""


def lab_monitor(victim: nn.Module, monitor: Mapping[str, Any], num_classes: int, surrogate_seed: int = 0):
    """The handler's :class:`handlers.monitor.ClientMonitor` over an in-process store (``store: memory:``
    whatever the config says; the lab runs in one process), with its harden defense built for ``victim``."""
    from handlers.monitor import ClientMonitor, limits
    from plugins.monitor import MemoryStore, parse_monitor

    cfg = parse_monitor(monitor)
    cfg.ood.check_classes(num_classes)
    harden = build_victim_defense(victim, cfg.harden, num_classes, surrogate_seed) if cfg.action == "harden" else None
    return ClientMonitor(cfg, MemoryStore("lab", limits(cfg)), harden)


class MonitoredOracle(Oracle):
    """:class:`LocalOracle`'s answers screened by a per-client monitor, all queries from one ``client``, or, with
    ``clients`` > 1, a thief splitting its budget over ``clients`` ids (``<client>-0`` ...): batch i of
    ``batch_size`` rows goes to id ``i % clients``.

    ``flagged_at``: the number of queries answered when the first of its ids was flagged (None while none is);
    ``flagged_ids``: the ids flagged so far. Under action ``block`` a query from a flagged id raises
    :class:`ClientBlocked`."""

    def __init__(self, victim: nn.Module, defense, monitor, client: str = "attacker", budget: int | None = None,
                 batch_size: int = 64, clients: int = 1) -> None:
        super().__init__(budget)
        if clients < 1:
            raise ValueError(f"clients: the thief needs at least one client id; got {clients}")
        self.inner = LocalOracle(victim, defense, batch_size=batch_size)
        self.monitor = monitor
        self.client = client
        self.ids = [client] if clients == 1 else [f"{client}-{i}" for i in range(clients)]
        self.batch_size = batch_size
        self.flagged_at: int | None = None
        self.flagged_ids: set[str] = set()
        self._batches = 0

    @torch.no_grad()
    def _answer(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        for i in range(0, len(x), self.batch_size):
            xb = x[i : i + self.batch_size]
            client = self.ids[self._batches % len(self.ids)]
            self._batches += 1
            y = torch.softmax(self.inner.victim(xb), dim=1)
            answered = self.inner.defense(y, xb).probs if self.inner.defense is not None else y
            screened = self.monitor.screen([client] * len(xb), xb, y, answered)
            if screened.flagged.any():
                self.flagged_ids.add(client)
                if self.flagged_at is None:
                    self.flagged_at = self.queries + sum(len(o) for o in outs) + len(xb)
            if screened.blocked.any():
                raise ClientBlocked(f"client {client!r} blocked after {self.flagged_at} queries")
            outs.append(screened.probs.float())
        return torch.cat(outs)


@torch.no_grad()
def serve_benign(victim: nn.Module, defense, monitor, x: torch.Tensor, clients: int = 20,
                 batch_size: int = 16) -> tuple[torch.Tensor, set[str]]:
    """The benign test set ``x`` answered as ``clients`` clients (``benign-0`` ...), each replaying a contiguous
    share in batches of ``batch_size``, interleaved round-robin as concurrent users would be. Returns the answers
    (in ``x``'s order; blocked rows are NaN) and the set of benign clients the monitor flagged."""
    shares = torch.arange(len(x)).tensor_split(clients)
    out: torch.Tensor | None = None
    flagged: set[str] = set()
    for start in range(0, max(len(s) for s in shares), batch_size):
        for c, share in enumerate(shares):
            idx = share[start : start + batch_size]
            if len(idx) == 0:
                continue
            xb = x[idx]
            y = torch.softmax(victim(xb), dim=1)
            answered = defense(y, xb).probs if defense is not None else y
            screened = monitor.screen([f"benign-{c}"] * len(idx), xb, y, answered)
            if screened.flagged.any():
                flagged.add(f"benign-{c}")
            probs = screened.probs.float().clone()
            probs[torch.from_numpy(screened.blocked)] = float("nan")
            if out is None:
                out = torch.full((len(x), probs.shape[1]), float("nan"))
            out[idx] = probs
    return out, flagged


class HTTPOracle(Oracle):
    """A served model: POST ``{"instances": x.tolist()}`` to ``url`` in batches of ``batch_size`` rows.

    ``send``: ``"normalised"`` posts the model-input tensors as given; ``"pixels"`` posts them mapped back to
    [0, 1] pixels with ``mean``/``std`` (for handlers that normalise themselves).
    """

    def __init__(self, url: str, budget: int | None = None, batch_size: int = 64, timeout: float = 30.0,
                 send: str = "normalised", mean: float = 0.0, std: float = 1.0, session=None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(budget)
        if send not in ("normalised", "pixels"):
            raise ValueError(f"send: unknown {send!r}; allowed: normalised, pixels")
        import requests

        self.url = url
        self.batch_size = batch_size
        self.timeout = timeout
        self.send = send
        self.mean, self.std = mean, std
        self.session = session or requests.Session()
        self.headers = {"Content-Type": "application/json", **(headers or {})}  # e.g. {"X-Client-Id": "thief-1"}
        self.last_headers: Mapping[str, str] = {}

    def _answer(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        for i in range(0, len(x), self.batch_size):
            xb = x[i : i + self.batch_size]
            if self.send == "pixels":
                xb = xb * self.std + self.mean
            outs.append(self._post(xb))
        return torch.cat(outs)

    def _post(self, xb: torch.Tensor) -> torch.Tensor:
        body = json.dumps({"instances": xb.tolist()})
        r = self.session.post(self.url, data=body, headers=self.headers, timeout=self.timeout)
        if r.status_code != 200:
            raise RuntimeError(f"oracle {self.url} answered HTTP {r.status_code}: {r.text[:300]}")
        self.last_headers = r.headers
        return parse_predictions(r.json(), expected_rows=len(xb), source=self.url)


def parse_predictions(doc: Any, expected_rows: int, source: str = "response") -> torch.Tensor:
    """The B x K probabilities of a ``{"predictions": [{"probabilities": [...]}, ...]}`` document."""
    if not isinstance(doc, Mapping) or not isinstance(doc.get("predictions"), list):
        raise RuntimeError(f"{source}: expected a JSON object with a 'predictions' list; got {str(doc)[:200]}")
    preds = doc["predictions"]
    if len(preds) != expected_rows:
        raise RuntimeError(f"{source}: {len(preds)} predictions for {expected_rows} instances")
    try:
        rows = [p["probabilities"] for p in preds]
        probs = torch.tensor(rows, dtype=torch.float32)
    except (KeyError, TypeError, ValueError) as exc:
        raise RuntimeError(f"{source}: every prediction needs a 'probabilities' list of equal length ({exc})") from None
    if probs.dim() != 2 or not torch.isfinite(probs).all() or (probs < 0).any():
        raise RuntimeError(f"{source}: probabilities must be finite, non-negative B x K rows")
    return probs / probs.sum(dim=1, keepdim=True).clamp_min(1e-12)


class ArgmaxOracle:
    """What the argmax attacker keeps of another oracle's answers: one-hot rows of their top-1 class.

    Budget and query count are the inner oracle's.
    """

    def __init__(self, inner: Oracle) -> None:
        self.inner = inner

    @property
    def queries(self) -> int:
        return self.inner.queries

    @property
    def budget(self) -> int | None:
        return self.inner.budget

    @property
    def remaining(self) -> int | None:
        return self.inner.remaining

    @property
    def num_classes(self) -> int | None:
        return self.inner.num_classes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        probs = self.inner(x)
        if len(probs) == 0:
            return probs
        return torch.nn.functional.one_hot(probs.argmax(dim=1), probs.shape[1]).float()
