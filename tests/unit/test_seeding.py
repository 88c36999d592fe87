"""plugins.seeding: the keyed per-query PRF (determinism, batch invariance, key dependence), the secret's
fingerprint, and what the secret protects: random_noise's answer inverts exactly with it and not without it."""

from __future__ import annotations

import hashlib
import hmac

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from plugins import MissingSecret, build_defense, seeding, validate_config
from tests.dev_secret import DEV_SECRET, OTHER_SECRET

finite32 = st.floats(allow_nan=False, allow_infinity=False, width=32)
batches = arrays(np.float32, st.tuples(st.integers(1, 12), st.integers(1, 20)), elements=finite32)


@settings(max_examples=60, deadline=None)
@given(x=batches, secret=st.text(min_size=16, max_size=40))
def test_seeds_are_deterministic_and_batch_invariant(x, secret):
    seeds = seeding.query_seeds(x, secret)
    assert seeds.shape == (len(x), 2) and seeds.dtype == np.uint64
    np.testing.assert_array_equal(seeds, seeding.query_seeds(x.copy(), secret))
    for i in range(len(x)):  # each row alone, and in another position of another batch
        np.testing.assert_array_equal(seeding.query_seeds(x[i : i + 1], secret)[0], seeds[i])
    perm = np.arange(len(x))[::-1]
    np.testing.assert_array_equal(seeding.query_seeds(np.concatenate([x[perm], x[:1]]), secret)[:-1], seeds[perm])
    u = seeding.uniform(seeds, 7)
    assert ((u > 0) & (u < 1)).all()
    np.testing.assert_array_equal(seeding.uniform(seeds[perm], 7), u[perm])


@settings(max_examples=60, deadline=None)
@given(x=batches)
def test_minus_zero_is_the_same_query_and_a_torch_batch_the_same_as_numpy(x):
    flipped = np.where(x == 0, np.float32(-0.0), x)
    np.testing.assert_array_equal(seeding.query_seeds(flipped, DEV_SECRET), seeding.query_seeds(x, DEV_SECRET))
    np.testing.assert_array_equal(seeding.query_seeds(torch.from_numpy(x), DEV_SECRET),
                                  seeding.query_seeds(x, DEV_SECRET))


@settings(max_examples=40, deadline=None)
@given(x=arrays(np.float32, st.tuples(st.integers(2, 8), st.integers(1, 6)), elements=finite32, unique=True))
def test_different_rows_and_different_secrets_get_different_seeds(x):
    x = np.unique(np.where(x == 0, np.float32(0), x), axis=0)
    seeds = seeding.query_seeds(x, DEV_SECRET)
    assert len({tuple(s) for s in seeds}) == len(x)
    assert not (seeds == seeding.query_seeds(x, OTHER_SECRET)).all(axis=1).any()


def test_seed_is_keyed_blake2b_of_the_canonical_row_bytes():
    x = np.array([[0.25, -0.0, 3.0]], dtype=np.float32)
    key = hashlib.blake2b(DEV_SECRET.encode(), digest_size=32, person=b"stealguard-key").digest()
    want = hashlib.blake2b(np.array([0.25, 0.0, 3.0], dtype="<f4").tobytes(), digest_size=16, key=key,
                           person=b"stealguard-seed").digest()
    assert seeding.query_seeds(x, DEV_SECRET)[0].tobytes() == want
    raw = np.random.Philox(key=np.frombuffer(want, dtype=np.uint64)).random_raw(3)
    np.testing.assert_array_equal(seeding.uniform(seeding.query_seeds(x, DEV_SECRET), 3)[0],
                                  ((raw >> np.uint64(11)).astype(np.float64) + 0.5) / 2.0**53)


def test_fingerprint_is_the_first_8_bytes_of_hmac_sha256():
    want = hmac.new(DEV_SECRET.encode(), b"stealguard", hashlib.sha256).hexdigest()[:16]
    assert seeding.fingerprint(DEV_SECRET) == want and len(want) == 16
    assert seeding.fingerprint(OTHER_SECRET) != want


def noisy_answer(secret: str):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 20, generator=g)
    y = torch.softmax(3 * torch.randn(64, 10, generator=g, dtype=torch.float64), dim=1)
    config = {"name": "random_noise", "epsilon": 4.0, "norm": "l2", "scale": 2.0}
    return config, x, y, build_defense({**config, "secret": secret})(y, x).probs


def invert(config: dict, secret: str, x: torch.Tensor, y_tilde: torch.Tensor) -> torch.Tensor:
    """The attack: recompute the noise with ``secret`` and undo it, softmax(log y~ - n)."""
    noise = build_defense({**config, "secret": secret}).logit_noise(y_tilde, x)
    return torch.softmax(torch.log(y_tilde) - noise, dim=1)


def test_the_known_secret_inverts_random_noise_exactly_and_a_wrong_one_does_not():
    config, x, y, y_tilde = noisy_answer(DEV_SECRET)
    assert (y_tilde - y).abs().max() > 0.05  # the defense did change the answers
    recovered = invert(config, DEV_SECRET, x, y_tilde)
    assert (recovered - y).abs().max().item() < 1e-6
    wrong = invert(config, OTHER_SECRET, x, y_tilde)
    assert (wrong - y).abs().max().item() > 0.05
    assert (wrong - y).abs().sum(1).min().item() > 1e-3  # no row recovered by chance


def test_no_default_secret_and_the_secret_never_appears_in_dumps_or_reprs():
    for config in ({"name": "random_noise"}, {"name": "mad", "oracle": "random"},
                   {"name": "gradient_redirection", "target": "random"}):
        cfg = validate_config(config)
        assert cfg.needs_secret and cfg.secret is None
        with pytest.raises(MissingSecret, match="secret: missing.*no default"):
            build_defense(config, surrogate=torch.nn.Sequential(torch.nn.Linear(4, 3)), num_classes=3)
        keyed = validate_config({**config, "secret": DEV_SECRET})
        assert keyed.secret.get_secret_value() == DEV_SECRET
        for text in (repr(keyed), str(keyed), str(keyed.model_dump()), keyed.model_dump_json()):
            assert DEV_SECRET not in text and "secret" not in text.replace("SecretStr", "")
    assert not validate_config({"name": "mad"}).needs_secret
    with pytest.raises(ValueError, match=r"secret: .*at least 16.*\(value not shown\)") as info:
        validate_config({"name": "random_noise", "secret": "short-secret"})
    assert "short-secret" not in str(info.value)
