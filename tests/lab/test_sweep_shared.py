"""Shared query work (mlflow_project.sweep.shared): a point evaluated with the sweep's precomputed victim and
surrogate outputs gives the attacker bit-identical defended answers, the same test-set perturbation and the same
metrics as the point computed on its own; the memo is really used; the local executor's cache file round-trips."""

from __future__ import annotations

import pytest
import torch

from mlflow_project.lab import attacks
from mlflow_project.lab.evaluate import EvalConfig, evaluate, load_victim
from mlflow_project.sweep import run as sw
from mlflow_project.sweep.presets import get_preset
from mlflow_project.sweep.shared import SharedWork, build_shared, shared_key, surrogate_shareable

PRESET = get_preset("tiny", epochs=1)
DEFENSES = [{"name": "mad", "epsilon": 0.5}, {"name": "mad_argmax", "epsilon": 0.5},
            {"name": "reverse_sigmoid", "beta": 0.1, "gamma": 0.2}, {"name": "label_only"},
            {"name": "ood_gated", "tau": 0.9, "inside": {"name": "mad_argmax", "epsilon": 1.0},
             "outside": {"name": "label_only"}}]


@pytest.fixture(scope="module")
def victim(digits_victim_dir):
    return load_victim(digits_victim_dir)


def answers_of(cfg, victim, monkeypatch, shared=None):
    """The point's metrics, test-set per-row measures and every batch of defended answers the attacker got."""
    got: list[torch.Tensor] = []
    real = attacks.query_in_batches

    def spy(*a, **kw):
        y = real(*a, **kw)
        got.append(y.clone())
        return y

    monkeypatch.setattr(attacks, "query_in_batches", spy)
    result = evaluate(cfg, victim=victim, progress=False, shared=shared)
    monkeypatch.setattr(attacks, "query_in_batches", real)
    return result, torch.cat(got)


@pytest.mark.parametrize("attack", ["knockoff", "knockoff_argmax"])
def test_shared_work_gives_bit_identical_defended_answers(victim, digits_victim_dir, monkeypatch, attack):
    preset = get_preset("tiny", epochs=1, attack=attack)
    work = build_shared(victim, preset, 0, shared_key(sw.weights_hash(victim.model), preset, 0, 1))
    assert work.victim_table and work.surrogate_table
    for defense in DEFENSES:
        cfg = EvalConfig(dataset=preset.dataset, victim=digits_victim_dir, defense=defense, attack=attack,
                         queryset=preset.queryset, budget=preset.budget, epochs=preset.epochs, seed=0)
        before = dict(work.victim_stats), dict(work.surrogate_stats)
        alone, y_alone = answers_of(cfg, victim, monkeypatch)
        shared, y_shared = answers_of(cfg, victim, monkeypatch, shared=work)
        assert y_alone.dtype == y_shared.dtype and torch.equal(y_alone, y_shared), defense
        for k in alone.per_row:
            assert torch.equal(alone.per_row[k], shared.per_row[k]), (defense, k)
        assert alone.metrics == shared.metrics, defense
        # the victim never ran for the point: the test set, every query batch and the flip-rate pass were hits
        assert work.victim_stats["misses"] == before[0]["misses"], defense
        assert work.victim_stats["hits"] >= before[0]["hits"] + 3, defense
        if defense["name"] in ("mad", "mad_argmax"):  # the query batches' surrogate passes came from the memo
            assert work.surrogate_stats["hits"] > before[1]["hits"], defense


def test_which_defenses_share_the_surrogate():
    assert surrogate_shareable({"name": "mad", "epsilon": 0.5})
    assert surrogate_shareable({"name": "mad_argmax", "epsilon": 0.5, "jacobian": "last_layer"})
    assert not surrogate_shareable({"name": "mad", "epsilon": 0.5, "jacobian": "all"})  # torch.func over params
    assert not surrogate_shareable({"name": "label_only"})
    assert not surrogate_shareable({"name": "gradient_redirection", "epsilon": 0.5})
    assert surrogate_shareable(DEFENSES[-1])


def test_the_local_cache_file_round_trips_and_is_keyed(victim, tmp_path):
    vh = sw.weights_hash(victim.model)
    local = sw.LocalShared(tmp_path, victim, PRESET, vh)
    work = local.get(0)
    files = list(tmp_path.glob("*.pt"))
    assert [f.stem for f in files] == [work.key]
    back = SharedWork.from_file(files[0])
    assert back.victim_table.keys() == work.victim_table.keys()
    assert all(torch.equal(back.victim_table[k], work.victim_table[k]) for k in work.victim_table)
    keys = {shared_key(vh, PRESET, 0, 1), shared_key(vh, PRESET, 1, 1), shared_key(vh, PRESET, 0, 2),
            shared_key(vh, get_preset("tiny", budget=200), 0, 1), shared_key("0" * 16, PRESET, 0, 1)}
    assert len(keys) == 5  # seed, threads, budget and victim each change the key
