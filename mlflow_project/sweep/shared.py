"""Shared query work: what every point of a non-adaptive sweep computes alike, computed once.

For Knockoff (and ``knockoff_argmax``, and the ART twins) the attacker's queries do not depend on the defense:
the query rows are drawn from the query set by the seed alone, and the victim's outputs on them (and on the test
set, and the surrogate's where a MAD-family defense needs it) are the same for every point of a seed. A point
then pays only for its defense and its clones.

The mechanism is a memo on the networks, not a second code path: :class:`MemoModel` wraps the victim (and the
defender's surrogate) and answers an input batch it has seen before, byte for byte, with the output it recorded
for that batch; anything else is computed by the wrapped network (and recorded). :func:`build_shared` runs
exactly the calls a Knockoff point makes with the victim and the surrogate (the same functions, the same
batches), so a point's :func:`mlflow_project.lab.evaluate.evaluate` hits the memo on every one of them; a
defended answer is therefore bit-identical to the one the point computed on its own (at the same torch thread
count: the memo is built with the points' thread count, in a Ray task with the ray executor). Attacks whose
queries the memo was not warmed for (the ART twins) still fill it on their first point, which later points of
the same process reuse.

With the local executor the tables are kept in a cache file (``<results>/shared/<key>.pt``) keyed by the victim's
weights hash, query set, budget, seed, surrogate seed, attack, query batch size, torch version and thread count;
with the ray executor they go to the object store once per seed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

# attacks whose queries are chosen without looking at the answers (the memo is worth building for them)
NON_ADAPTIVE = ("knockoff", "knockoff_argmax", "art_knockoff", "art_copycat")
# defenses whose surrogate use is the plain forward pass that the memo can answer (jacobian='last_layer')
SURROGATE_FORWARD_DEFENSES = ("mad", "mad_argmax")


def batch_key(x: torch.Tensor) -> str:
    """Shape, dtype and blake2b of the bytes of one input batch."""
    t = x.detach().contiguous()
    h = hashlib.blake2b(t.numpy().tobytes(), digest_size=16)
    return f"{tuple(t.shape)}:{t.dtype}:{h.hexdigest()}"


class MemoModel(nn.Module):
    """``inner`` with a memo of its outputs per input batch (see the module doc).

    Computed, never looked up: inputs that need gradients, non-CPU or wrapped tensors, and calls while any
    forward hook is registered on ``inner`` (e.g. MAD's check of the surrogate's last linear layer, or
    gradient_redirection's capture of its inputs: the hook must see the real forward pass)."""

    def __init__(self, inner: nn.Module, table: dict[str, torch.Tensor] | None = None, record: bool = True,
                 stats: dict[str, int] | None = None) -> None:
        super().__init__()
        self.inner = inner
        self.table: dict[str, torch.Tensor] = {} if table is None else table
        self.record = record
        self.stats = {"hits": 0, "misses": 0} if stats is None else stats  # shared with its SharedWork
        explicit = getattr(inner, "last_layer", None)
        if explicit is not None:  # keep plugins.mad.jacobian.find_last_linear's answer for the wrapped network
            self.last_layer = f"inner.{explicit}" if isinstance(explicit, str) else explicit

    def _hooked(self) -> bool:
        return any(m._forward_hooks or m._forward_pre_hooks for m in self.inner.modules())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if type(x) is not torch.Tensor or x.requires_grad or x.device.type != "cpu" or self._hooked():
            return self.inner(x)
        key = batch_key(x)
        hit = self.table.get(key)
        if hit is not None:
            self.stats["hits"] += 1
            return hit.clone()
        self.stats["misses"] += 1
        out = self.inner(x)
        if self.record and not out.requires_grad:
            self.table[key] = out.detach().clone()
        return out


@dataclass
class SharedWork:
    """The memo tables of one sweep seed (picklable: what goes to the cache file or the Ray object store)."""

    key: str
    victim_table: dict[str, torch.Tensor] = field(default_factory=dict)
    surrogate_table: dict[str, torch.Tensor] = field(default_factory=dict)
    # memo lookups answered / computed in this process (not saved)
    victim_stats: dict[str, int] = field(default_factory=lambda: {"hits": 0, "misses": 0})
    surrogate_stats: dict[str, int] = field(default_factory=lambda: {"hits": 0, "misses": 0})

    def victim_model(self, victim: nn.Module) -> MemoModel:
        return MemoModel(victim, self.victim_table, stats=self.victim_stats)

    def surrogate_for(self, victim: nn.Module, defense: Mapping[str, Any], surrogate_seed: int,
                      record: bool = False) -> nn.Module | None:
        """The memo'd surrogate for a defense whose every surrogate use is the forward pass, else None (the
        point builds its own, as without shared work)."""
        if not surrogate_shareable(defense):
            return None
        from mlflow_project.lab.oracles import make_surrogate_for

        # recorded only while the memo is built: a point's other surrogate batches (a composite's row subsets)
        # are its own and would only grow the table
        return MemoModel(make_surrogate_for(victim, surrogate_seed), self.surrogate_table, record=record,
                         stats=self.surrogate_stats)

    def to_file(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"key": self.key, "victim": self.victim_table, "surrogate": self.surrogate_table}, tmp)
        tmp.replace(path)
        return path

    @classmethod
    def from_file(cls, path: Path) -> SharedWork:
        doc = torch.load(path, weights_only=True)
        return cls(doc["key"], doc["victim"], doc["surrogate"])


def surrogate_shareable(defense: Mapping[str, Any]) -> bool:
    """True when the config (inner configs of a composite too) uses a surrogate only through MAD's
    ``jacobian='last_layer'`` forward pass, and uses one at all."""
    from plugins import needs

    if not needs(defense, "surrogate"):
        return False
    inner = [v for v in defense.values() if isinstance(v, Mapping) and "name" in v]
    if inner:
        return all(surrogate_shareable(v) or not needs(v, "surrogate") for v in inner)
    return defense["name"] in SURROGATE_FORWARD_DEFENSES and defense.get("jacobian", "last_layer") == "last_layer"


def shared_key(victim_hash: str, preset, seed: int, threads: int) -> str:
    from mlflow_project.lab.attacks import AttackConfig
    from mlflow_project.sweep.run import stable_hash

    qbs = dict(preset.attack_options).get("query_batch_size", AttackConfig.query_batch_size)
    return stable_hash({"victim": victim_hash, "dataset": preset.dataset, "queryset": preset.queryset,
                        "budget": preset.budget, "seed": seed, "surrogate_seed": preset.surrogate_seed,
                        "attack": preset.attack, "query_batch_size": qbs, "torch": torch.__version__,
                        "threads": threads, "format": 1})


def build_shared(victim, preset, seed: int, key: str, threads: int = 0) -> SharedWork:
    """Run a Knockoff point's victim- and surrogate-side calls once (the same functions and batches as
    :func:`mlflow_project.lab.evaluate.evaluate`) and return the recorded tables. ``victim`` is an
    ``evaluate.Victim``; ``threads`` > 0 sets torch's thread count first (a Ray task's CPU share)."""
    from mlflow_project.lab import data
    from mlflow_project.lab.attacks import AttackConfig, knockoff_queries, query_in_batches
    from mlflow_project.lab.oracles import LocalOracle
    from mlflow_project.lab.training import predict_probs

    if threads > 0:
        torch.set_num_threads(threads)
    shared = SharedWork(key)
    spec = victim.spec
    memo = shared.victim_model(victim.model)
    surrogate = shared.surrogate_for(victim.model, {"name": "mad"}, preset.surrogate_seed, record=True)
    test_x, _ = data.load_raw(preset.dataset, "test")
    test_x = data.adapt(test_x, spec)
    predict_probs(memo, test_x)
    # (the surrogate's test-set pass is not recorded: it is each defense's first batch, on which MAD checks the
    # surrogate's last layer through a forward hook, so the memo must compute it anyway)
    if preset.attack.removesuffix("_argmax") != "knockoff":
        return shared  # the ART twins choose their queries themselves: their first point fills the memo
    acfg = AttackConfig(name=preset.attack, budget=preset.budget, seed=seed, **{
        k: v for k, v in dict(preset.attack_options).items() if k == "query_batch_size"})
    pool = data.query_set(preset.queryset, spec, victim_dataset=preset.dataset)
    x = knockoff_queries(pool, acfg)
    oracle = LocalOracle(memo, None)
    query_in_batches(_SurrogateTap(oracle, surrogate), x, acfg.query_batch_size, False, "")
    predict_probs(memo, x)  # query_top1_flip_rate's pass
    return shared


def _surrogate_forward(surrogate: nn.Module, x: torch.Tensor) -> None:
    from plugins.mad.jacobian import as_surrogate_input

    with torch.no_grad():
        surrogate(as_surrogate_input(surrogate, x))


class _SurrogateTap:
    """An oracle that also runs the surrogate on each batch it answers (as the defense would)."""

    def __init__(self, oracle, surrogate: nn.Module) -> None:
        self.oracle, self.surrogate = oracle, surrogate

    def __call__(self, xb: torch.Tensor) -> torch.Tensor:
        for i in range(0, len(xb), self.oracle.batch_size):  # LocalOracle's inner batches
            _surrogate_forward(self.surrogate, xb[i : i + self.oracle.batch_size])
        return self.oracle(xb)
