"""plugins/monitor: PRADA's update and test, the OOD share, the config, the in-process store's bounds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from plugins.monitor import ExtractionMonitor, MemoryStore, StoreLimits, parse_monitor, prada
from plugins.monitor.config import PRADA_DELTA, PradaConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fmnist_test():
    from mlflow_project.lab.data import load_fashion_mnist

    return load_fashion_mnist("test")


def _confident(labels: torch.Tensor, k: int = 10) -> torch.Tensor:
    return torch.nn.functional.one_hot(labels.long(), k).double() * 0.9 + 0.1 / k


def _feed(monitor, client, x, y, batch=16):
    flagged_at = None
    for i in range(0, len(x), batch):
        v = monitor.observe([client] * len(x[i : i + batch]), x[i : i + batch], y[i : i + batch])
        if v.newly_flagged and flagged_at is None:
            flagged_at = (i + len(x[i : i + batch]), v.newly_flagged[0][1])
    return flagged_at


def test_config_defaults_and_errors():
    cfg = parse_monitor(None)
    assert cfg.header == "X-Client-Id" and cfg.action == "observe" and cfg.harden == {"name": "label_only"}
    assert cfg.prada.delta == PRADA_DELTA == 0.95 and cfg.prada.min_distances == 100
    assert cfg.watermark.enabled is False and cfg.watermark.fraction == 0.005
    with pytest.raises(ValueError, match=r"monitor\.prada\.delta: .*less than 1"):
        parse_monitor({"prada": {"delta": 1.5}})
    with pytest.raises(ValueError, match=r"monitor\.actions?: unknown key"):
        parse_monitor({"actions": "block"})
    with pytest.raises(ValueError, match=r"monitor\.action: .*observe.*harden.*block"):
        parse_monitor({"action": "ban"})
    with pytest.raises(ValueError, match=r"unknown defense 'nope'"):
        parse_monitor({"harden": {"name": "nope"}})
    with pytest.raises(ValueError, match=r"monitor\.store: .*sqlite:///"):
        parse_monitor({"store": "postgres://x"})
    with pytest.raises(ValueError, match=r"window \(50\) must be >= min_distances \(100\)"):
        parse_monitor({"prada": {"window": 50}})


def test_update_follows_algorithm_1_by_hand():
    """1-D rows, one class: the first opens G; then d_min joins D, and rows above T join G and raise T."""
    cfg = PradaConfig(min_distances=3, window=10)
    s = prada.new_summary()
    rows = np.array([[0.0], [1.0], [1.5], [4.0], [4.2]], dtype=np.float32)
    appended = prada.update(s, {}, rows, np.zeros(5, dtype=int), cfg)
    # G = {0}; x=1: d=1 > T=0 -> G={0,1}, D_G={1}, T=max(0, 1-0)=1
    # x=1.5: d=0.5 <= 1 -> D only;  x=4: d=3 > 1 -> G={0,1,4}, D_G={1,3}, T=max(1, 2-1)=1
    # x=4.2: d=0.2 -> D only
    assert s["D"] == pytest.approx([1.0, 0.5, 3.0, 0.2], abs=1e-6)
    assert s["T"]["0"] == pytest.approx(1.0)
    assert appended[0].ravel().tolist() == [0.0, 1.0, 4.0]
    # a later batch compares with the stored growing set
    appended2 = prada.update(s, {0: appended[0]}, np.array([[10.0]], dtype=np.float32), np.zeros(1, int), cfg)
    assert s["D"][-1] == pytest.approx(6.0) and appended2[0].ravel().tolist() == [10.0]
    count, total, squares = s["G"]["0"]
    assert count == 3 and total == pytest.approx(10.0) and squares == pytest.approx(46.0)
    assert s["T"]["0"] == pytest.approx(max(1.0, 10 / 3 - math.sqrt(46 / 3 - (10 / 3) ** 2)))


def test_batched_equals_one_at_a_time():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(120, 1, 8, 8, generator=g)
    y = _confident(torch.randint(0, 3, (120,), generator=g), 3)
    cfg = parse_monitor({"prada": {"min_distances": 10, "window": 500}})
    a, b = MemoryStore(), MemoryStore()
    ma, mb = ExtractionMonitor(cfg, a), ExtractionMonitor(cfg, b)
    for i in range(120):
        ma.observe(["c"], x[i : i + 1], y[i : i + 1], now=1.0)
    for i in range(0, 120, 40):
        mb.observe(["c"] * 40, x[i : i + 40], y[i : i + 40], now=1.0)
    sa, sb = a._summaries["c"], b._summaries["c"]
    assert sorted(sa["D"]) == pytest.approx(sorted(sb["D"]))  # within a batch rows go class by class
    assert sa["T"] == pytest.approx(sb["T"]) and sa["n"] == sb["n"] == 120
    for c in range(3):
        assert np.array_equal(a._growing[("c", c)], b._growing[("c", c)])


def test_benign_natural_images_pass_and_synthetic_steps_are_flagged(fmnist_test):
    """Fashion-MNIST test images (natural queries) keep W above delta; JBDA-like sign steps around 50 seeds
    (the synthetic queries PRADA targets) drive W below it."""
    x, labels = fmnist_test
    cfg = parse_monitor({})
    monitor = ExtractionMonitor(cfg, MemoryStore())
    assert _feed(monitor, "benign", x[:1000], _confident(labels[:1000])) is None
    g = torch.Generator().manual_seed(1)
    seeds, queries = x[1000:1050], [x[1000:1050]]
    for _ in range(4):
        queries.append((queries[-1] + 0.1 * torch.sign(torch.randn(seeds.shape, generator=g))).clamp(0, 1))
    steps = torch.cat(queries)
    flagged = _feed(monitor, "thief", steps, _confident(labels[1000:1050].repeat(5)))
    assert flagged is not None and flagged[1] == "prada"
    assert flagged[0] <= 250
    assert [f.client for f in monitor.store.flagged()] == ["thief"]


def test_statistic_needs_min_distances_and_drops_outliers():
    cfg = PradaConfig(min_distances=100, window=1000)
    rng = np.random.default_rng(0)
    assert prada.statistic(rng.normal(size=99), cfg) is None
    normal = rng.normal(10, 1, size=300)
    w = prada.statistic(normal, cfg)
    assert w > 0.98
    with_outliers = np.concatenate([normal, [1000.0, 2000.0]])  # beyond 3 std: dropped
    from scipy.stats import shapiro

    assert shapiro(with_outliers).statistic < 0.2
    assert prada.statistic(with_outliers, cfg) > 0.98
    bimodal = np.concatenate([rng.normal(0, 0.1, 150), rng.normal(5, 0.1, 150)])
    assert prada.statistic(bimodal, cfg) < 0.9
    assert prada.statistic(np.ones(200), cfg) == 1.0


def test_ood_share_flags_after_min_queries():
    cfg = parse_monitor({"ood": {"share": 0.4, "min_queries": 50}, "prada": {"min_distances": 5000, "window": 5000}})
    monitor = ExtractionMonitor(cfg, MemoryStore())
    x = torch.rand(100, 4)
    unsure = torch.full((100, 10), 0.1, dtype=torch.float64)  # ood score 0.9 > 0.5
    sure = _confident(torch.zeros(100))
    v = monitor.observe(["a"] * 40, x[:40], unsure[:40])
    assert not v.flagged_rows.any()  # 40 < min_queries
    v = monitor.observe(["a"] * 10 + ["b"] * 10, x[40:60], torch.cat([unsure[:10], sure[:10]]))
    assert v.newly_flagged == [("a", "ood_share")]
    assert v.flagged_rows.tolist() == [True] * 10 + [False] * 10
    assert monitor.observe(["b"] * 60, x[:60], torch.cat([sure[:40], unsure[:20]])).flagged_rows.sum() == 0


def test_memory_store_bounds():
    limits = StoreLimits(max_per_class=3, ttl_seconds=10, max_clients=2)
    store = MemoryStore(limits=limits)
    cfg = parse_monitor({"prada": {"max_per_class": 3}})
    monitor = ExtractionMonitor(cfg, store)
    x = (2.0 ** torch.arange(10, dtype=torch.float32)).reshape(10, 1)  # each d_min above T: every row joins G
    monitor.observe(["a"] * 10, x, _confident(torch.zeros(10)), now=0.0)
    assert store._growing[("a", 0)].ravel().tolist() == [128.0, 256.0, 512.0]  # newest 3 kept
    monitor.observe(["b"], x[:1], _confident(torch.zeros(1)), now=1.0)
    monitor.observe(["c"], x[:1], _confident(torch.zeros(1)), now=2.0)
    assert list(store._summaries) == ["b", "c"]  # max_clients 2: a (least recently seen) evicted
    monitor.observe(["b"], x[1:2], _confident(torch.zeros(1)), now=20.0)  # b idle 19 s > ttl: forgotten
    assert store._summaries["b"]["n"] == 1


def _jb_like(x, labels, seeds=50, steps=4, seed=1):
    """JBDA-like synthetic queries: 50 natural seeds, then rounds of sign steps around them."""
    g = torch.Generator().manual_seed(seed)
    queries = [x[:seeds]]
    for _ in range(steps):
        queries.append((queries[-1] + 0.1 * torch.sign(torch.randn(queries[-1].shape, generator=g))).clamp(0, 1))
    return torch.cat(queries), labels[:seeds].repeat(steps + 1)


def test_testing_every_k_distances_detects_what_every_query_testing_does(fmnist_test):
    """The same streams one query per batch, W after every distance (the paper's schedule) vs every k: the
    benign stream is flagged by neither, the JB-like stream by both, the k version at most k - 1 distances
    (= queries here: each later query adds one) later."""
    x, labels = fmnist_test
    prada_only = {"ood": {"enabled": False}}
    streams = {"benign": (x[:1000], labels[:1000]), "thief": _jb_like(x[1000:1050], labels[1000:1050])}
    at = {}
    ks = (PradaConfig().test_every, 25)
    for every in (1, *ks):
        cfg = parse_monitor({**prada_only, "prada": {"test_every": every}})
        for name, (qx, ql) in streams.items():
            monitor = ExtractionMonitor(cfg, MemoryStore())
            at[every, name] = _feed(monitor, name, qx, _confident(ql), batch=1)
    assert at[1, "benign"] is None and at[1, "thief"] is not None and at[1, "thief"][1] == "prada"
    for k in ks:
        assert at[k, "benign"] is None, k
        assert at[k, "thief"] is not None and at[k, "thief"][1] == "prada", k
        assert at[1, "thief"][0] <= at[k, "thief"][0] < at[1, "thief"][0] + k, (k, at)


def test_w_is_retested_on_first_fill_and_every_k():
    cfg = PradaConfig(min_distances=5, window=20, test_every=3)
    s, growing, tested = prada.new_summary(), {}, []
    for i in range(14):  # one row per batch: from the second on, each adds one distance
        appended = prada.update(s, growing, np.array([[float(i * i)]], dtype=np.float32), np.zeros(1, int), cfg)
        if 0 in appended:
            growing[0] = np.concatenate([growing.get(0, np.zeros((0, 1), np.float32)), appended[0]])
        pending = s["p"]
        prada.retest(s, cfg)
        if pending and s["p"] == 0:
            tested.append(len(s["D"]))
    assert tested == [5, 8, 11]  # the first fill, then every 3 new distances
    assert s["p"] == 2 and s["w"] == prada.statistic(s["D"][:11], cfg)


def test_summary_codec_round_trips_reads_format_1_and_refuses_others():
    from plugins.monitor.store import StoreError, decode_summary, encode_summary

    cfg = PradaConfig(min_distances=3, window=10)
    s = prada.new_summary()
    prada.update(s, {}, np.random.default_rng(0).random((8, 4), dtype=np.float32), np.zeros(8, int), cfg)
    raw = encode_summary(s)
    back = decode_summary(raw)
    assert back["D"].dtype == np.float64 and np.array_equal(back["D"], s["D"])  # exact, not float32-rounded
    assert '"D":[' not in raw and len(raw) < 200 + 8 * len(s["D"]) * 4 / 3
    old = {**s, "D": [float(d) for d in s["D"]]}  # the first release's JSON list, no "v"
    import json

    assert np.array_equal(decode_summary(json.dumps(old))["D"], s["D"])
    with pytest.raises(StoreError, match=r"summary format 7 is not readable .* reads format 1.* and 2"):
        decode_summary(json.dumps({**old, "v": 7}))


def _posteriors(n: int, scale: float, seed: int, k: int = 10) -> torch.Tensor:
    """softmax(scale * onehot(c) + N(0, 1)) rows, c uniform: a victim's confident posteriors at `scale`."""
    gen = torch.Generator().manual_seed(seed)
    c = torch.randint(0, k, (n,), generator=gen)
    logits = scale * torch.nn.functional.one_hot(c, k).double() + torch.randn(n, k, generator=gen, dtype=torch.float64)
    return torch.softmax(logits, dim=1)


def test_ood_share_with_the_gaussian_score_flags_what_max_prob_calls_confident():
    """ood.score: gaussian. Rows far more confident than the victim ever is on its own data (logit gap 30 where
    its training rows have 5) have max probability ~1, so the max_prob score never calls them OOD; the posterior
    Gaussian does (typicality ~0), and flags the client, while rows like the fitted ones pass."""
    from plugins.ood import fit_posterior_gaussian, gaussian_typicality

    g = fit_posterior_gaussian(_posteriors(4000, 5.0, seed=0))
    extreme, typical = _posteriors(60, 30.0, seed=1), _posteriors(60, 5.0, seed=2)
    assert bool((extreme.max(1).values > 0.999).all()) and bool((gaussian_typicality(extreme, g) < 1e-3).all())
    base = {"share": 0.4, "min_queries": 50}
    prada_off = {"min_distances": 5000, "window": 5000}
    gauss = parse_monitor({"ood": {**base, "threshold": 0.999, "score": "gaussian", "gaussian": g.model_dump()},
                           "prada": prada_off})
    assert gauss.ood.gaussian == g
    x = torch.rand(60, 4)
    # batches of 16: the first to reach min_queries (50) is the last, at 60 rows
    assert _feed(ExtractionMonitor(gauss, MemoryStore()), "thief", x, extreme) == (60, "ood_share")
    assert _feed(ExtractionMonitor(gauss, MemoryStore()), "benign", x, typical) is None
    plain = parse_monitor({"ood": {**base, "threshold": 0.5}, "prada": prada_off})
    assert _feed(ExtractionMonitor(plain, MemoryStore()), "thief", x, extreme) is None


def test_ood_gaussian_score_config_is_validated_with_what_is_allowed():
    from plugins.ood import fit_posterior_gaussian

    g = fit_posterior_gaussian(_posteriors(500, 5.0, seed=0, k=3)).model_dump()
    with pytest.raises(ValueError, match=r"monitor\.ood: score: gaussian needs the fitted statistics in gaussian"):
        parse_monitor({"ood": {"score": "gaussian"}})
    with pytest.raises(ValueError, match=r"monitor\.ood: gaussian: statistics are given but score is max_prob"):
        parse_monitor({"ood": {"gaussian": g}})
    with pytest.raises(ValueError, match=r"monitor\.ood\.score: .*'max_prob' or 'gaussian'"):
        parse_monitor({"ood": {"score": "entropy"}})
    cfg = parse_monitor({"ood": {"score": "gaussian", "gaussian": g, "threshold": 0.999}})
    cfg.ood.check_classes(3)
    with pytest.raises(ValueError, match=r"^serve\.ood\.gaussian: fitted for 3 classes; the model has 10$"):
        cfg.ood.check_classes(10, "serve")
    with pytest.raises(ValueError, match="must be B x 3"):  # the score itself refuses other batches too
        ExtractionMonitor(cfg, MemoryStore()).observe(["a"], torch.rand(1, 4), _posteriors(1, 5.0, seed=3))
