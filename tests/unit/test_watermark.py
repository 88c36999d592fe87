"""plugins/monitor/watermark.py: the keyed selection (rate, determinism, key dependence), the wrong top-1 answer,
the key rules (none by default, never logged), and verify's binomial test."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import binom

from mlflow_project.lifecycle.verify import verify
from plugins.monitor.config import WatermarkConfig
from plugins.monitor.watermark import Watermark, canonical_rows, fingerprint, load_key

KEY = b"k" * 32


def test_no_default_key_and_key_sources(tmp_path, monkeypatch):
    monkeypatch.delenv("STEALGUARD_WATERMARK_KEY", raising=False)
    with pytest.raises(ValueError, match=r"no key: set the environment variable 'STEALGUARD_WATERMARK_KEY'"):
        load_key(WatermarkConfig(enabled=True))
    monkeypatch.setenv("STEALGUARD_WATERMARK_KEY", "short")
    with pytest.raises(ValueError, match="at least 16 bytes; got 5"):
        load_key(WatermarkConfig(enabled=True))
    monkeypatch.setenv("STEALGUARD_WATERMARK_KEY", "an env secret of 24 bytes")
    assert load_key(WatermarkConfig(enabled=True)) == b"an env secret of 24 bytes"
    f = tmp_path / "wm.key"
    f.write_bytes(b"x" * 100 + b"\n")
    assert len(load_key(WatermarkConfig(enabled=True, key_file=str(f)))) == 64  # hashed down to BLAKE2b's max
    with pytest.raises(ValueError, match="key_file: cannot read"):
        load_key(WatermarkConfig(enabled=True, key_file=str(tmp_path / "missing")))
    assert len(fingerprint(KEY)) == 8 and fingerprint(KEY) not in KEY.hex()


def test_selection_rate_determinism_and_key_dependence():
    x = torch.rand(40_000, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    top = torch.randint(0, 10, (40_000,), generator=torch.Generator().manual_seed(1))
    wm = Watermark(KEY, 0.005)
    picked, labels = wm.choose(x, top, 10)
    lo, hi = binom.ppf([1e-6, 1 - 1e-6], 40_000, 0.005)
    assert lo <= picked.sum() <= hi
    again, labels2 = wm.choose(x, top, 10)
    assert np.array_equal(picked, again) and np.array_equal(labels, labels2)
    other, _ = Watermark(b"q" * 32, 0.005).choose(x, top, 10)
    assert (picked & other).sum() < 10  # another key picks other rows
    assert (labels[picked] != top.numpy()[picked]).all() and (labels[~picked] == -1).all()
    # the shift is uniform over the K-1 other classes
    shifts = (labels[picked] - top.numpy()[picked]) % 10
    assert set(shifts.tolist()) <= set(range(1, 10))
    big, big_labels = Watermark(KEY, 0.5).choose(x, top, 10)
    counts = np.bincount((big_labels[big] - top.numpy()[big]) % 10, minlength=10)[1:]
    assert counts.min() > 0.9 * counts.mean()
    # -0.0 and 0.0 are the same query
    z = torch.zeros(1, 4)
    assert canonical_rows(-z).tobytes() == canonical_rows(z).tobytes()


def test_apply_gives_a_valid_vector_with_the_watermark_label_on_top():
    x = torch.rand(4000, 6, generator=torch.Generator().manual_seed(2))
    y = torch.softmax(torch.randn(4000, 5, generator=torch.Generator().manual_seed(3)) * 3, dim=1).double()
    wm = Watermark(KEY, 0.05)
    out, records, rows = wm.apply(x, y, y, now=1.0)
    picked, labels = wm.choose(x, y.argmax(1), 5)
    assert rows == np.flatnonzero(picked).tolist() and len(records) == len(rows) > 100
    assert torch.equal(out[~torch.from_numpy(picked)], y[~torch.from_numpy(picked)])
    sel = torch.from_numpy(picked)
    assert torch.equal(out[sel].argmax(1), torch.from_numpy(labels[picked]))
    assert torch.allclose(out[sel].sum(1), torch.ones(int(sel.sum()), dtype=torch.float64))
    assert torch.equal(out[sel].sort(1).values, y[sel].sort(1).values)  # a permutation of the served answer
    r = records[0]
    assert r.label == labels[rows[0]] and r.victim_label == int(y[rows[0]].argmax())
    assert np.array_equal(r.query, x[rows[0]].numpy()) and np.allclose(r.probs, out[rows[0]].numpy())


def test_verify_binomial_test():
    rng = np.random.default_rng(0)
    k, n = 10, 200
    victim = rng.integers(0, k, n)
    wl = (victim + 1 + rng.integers(0, k - 1, n)) % k
    clone = np.where(rng.random(n) < 0.5, wl, victim)  # learned half of the watermark labels
    r = verify(wl, victim, clone, k)
    assert r["watermark_agreement"] == pytest.approx((clone == wl).mean()) and r["p_value"] < 1e-30
    independent = np.where(rng.random(n) < 0.9, victim, rng.integers(0, k, n))  # 90 % accurate, errors at random
    r = verify(wl, victim, independent, k)
    assert r["p_value"] > 0.01 and r["null_rate"] == pytest.approx((independent != victim).mean() / (k - 1))
    assert verify(wl, victim, independent, k, "conservative")["null_rate"] == pytest.approx(1 / 9)
    with pytest.raises(ValueError, match="no records"):
        verify(wl[:0], victim[:0], clone[:0], k)
    with pytest.raises(ValueError, match="null_rate: unknown 'x'"):
        verify(wl, victim, clone, k, "x")
