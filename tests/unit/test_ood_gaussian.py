"""The Gaussian OOD score (plugins.ood.PosteriorGaussian): against a slow numpy/scipy reference, invariant to which
class the log-ratios are taken against, its validation, and the ood_gated gate built on it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.distance import mahalanobis
from scipy.stats import chi2

from plugins import build_defense, validate_config
from plugins.ood import (
    LOG_FLOOR,
    PosteriorGaussian,
    fit_posterior_gaussian,
    gaussian_typicality,
    log_ratios,
    mahalanobis_sq,
)
from tests.unit.strategies import prob_batches


def class_posteriors(k: int, n: int, seed: int, spread: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax of logits drawn around one centre per class: n rows, every class present."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=spread, size=(k, k))
    labels = np.arange(n) % k
    logits = centres[labels] + rng.normal(size=(n, k))
    y = np.exp(logits - logits.max(1, keepdims=True))
    return torch.from_numpy(y / y.sum(1, keepdims=True)), torch.from_numpy(labels)


def reference_distances(fit_y: np.ndarray, labels: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Slow and plain: centred log-probabilities (the logits up to a shift) in K dimensions, class means, the
    shared covariance's pseudo-inverse (it is singular: centred logits sum to 0), scipy's mahalanobis per
    row and class, the smallest per row."""
    def centred(p):
        z = np.log(np.clip(p, LOG_FLOOR, None))
        return z - z.mean(1, keepdims=True)
    zf, zq = centred(fit_y), centred(y)
    k = fit_y.shape[1]
    means = np.stack([zf[labels == c].mean(0) for c in range(k)])
    res = zf - means[labels]
    cov = res.T @ res / len(zf)
    # the same ridge as the fit, on the K-1 dimensional subspace the data live in
    basis = np.linalg.svd(np.eye(k) - 1.0 / k)[0][:, : k - 1]
    cov_sub = basis.T @ cov @ basis
    cov_sub = cov_sub + 1e-6 * np.trace(cov_sub) / (k - 1) * np.eye(k - 1)
    inv = np.linalg.inv(cov_sub)
    return np.array([min(mahalanobis(basis.T @ q, basis.T @ m, inv) ** 2 for m in means) for q in zq])


@pytest.mark.parametrize("k", [2, 3, 10])
def test_distances_and_typicality_match_the_slow_reference(k):
    fit_y, labels = class_posteriors(k, 400, seed=k)
    queries, _ = class_posteriors(k, 50, seed=100 + k, spread=6.0)
    g = fit_posterior_gaussian(fit_y, labels)
    ours = mahalanobis_sq(queries, g).numpy()
    # the ridge is 1e-6 of the mean variance in either basis only up to the basis change; the statistics keep 8
    # significant digits: a relative tolerance of 1e-4 covers both
    np.testing.assert_allclose(ours, reference_distances(fit_y.numpy(), labels.numpy(), queries.numpy()),
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(gaussian_typicality(queries, g).numpy(), chi2.sf(ours, df=k - 1),
                               rtol=1e-9, atol=1e-300)


@settings(max_examples=30, deadline=None)
@given(k=st.integers(2, 12), seed=st.integers(0, 10_000), data=st.data())
def test_the_reference_class_of_the_log_ratios_does_not_matter(k, seed, data):
    """Permuting the classes (so another class is the log-ratios' reference) and fitting again gives the same
    distances: the score is a property of the posterior, not of the class order."""
    fit_y, labels = class_posteriors(k, 300, seed)
    queries = data.draw(prob_batches(max_batch=20, min_classes=k, max_classes=k)).to(torch.float64)
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(k))
    inverse = torch.argsort(perm)
    g = fit_posterior_gaussian(fit_y, labels)
    gp = fit_posterior_gaussian(fit_y[:, perm], inverse[labels])
    a, b = mahalanobis_sq(queries, g), mahalanobis_sq(queries[:, perm], gp)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    t = gaussian_typicality(queries, g)
    assert ((t >= 0) & (t <= 1)).all()


def test_in_distribution_rows_are_typical_and_far_rows_are_not():
    y, _ = class_posteriors(10, 2500, seed=1)  # one set of class centres: fit on 2,000 rows, score the other 500
    g = fit_posterior_gaussian(y[:2000])  # labels: each row's top-1
    inside = gaussian_typicality(y[2000:], g)
    elsewhere = gaussian_typicality(class_posteriors(10, 500, seed=2, spread=8.0)[0], g)  # other class centres
    assert inside.median() > 0.3 and elsewhere.median() < 1e-3


def test_statistics_round_trip_through_json_and_are_validated():
    g = fit_posterior_gaussian(*class_posteriors(4, 200, seed=3))
    again = PosteriorGaussian.model_validate(json.loads(json.dumps(g.model_dump())))
    assert again == g and again.num_classes == 4 and len(again.precision_tril) == 3
    tril = [row[:] for row in g.precision_tril]
    with pytest.raises(ValueError, match="lower-triangular"):
        PosteriorGaussian(means=g.means, precision_tril=[[1.0, 0.5, 0.0], tril[1], tril[2]])
    with pytest.raises(ValueError, match="diagonal must be positive"):
        PosteriorGaussian(means=g.means, precision_tril=[[-1.0, 0.0, 0.0], tril[1], tril[2]])
    with pytest.raises(ValueError, match=r"K-1 = 3 floats; rows \[1\]"):
        PosteriorGaussian(means=[g.means[0], g.means[1][:2], g.means[2], g.means[3]], precision_tril=tril)
    with pytest.raises(ValueError, match=r"\(K-1\) x \(K-1\) = 3 x 3"):
        PosteriorGaussian(means=g.means, precision_tril=tril[:2])
    with pytest.raises(ValueError, match="finite"):
        PosteriorGaussian(means=[[float("nan")] * 3] + g.means[1:], precision_tril=tril)
    with pytest.raises(ValueError, match=r"B x 4"):
        mahalanobis_sq(torch.full((2, 3), 1 / 3), g)
    y, _ = class_posteriors(3, 30, seed=4)
    with pytest.raises(ValueError, match=r"needs rows; none for \[2\]"):
        fit_posterior_gaussian(y, torch.arange(30) % 2)
    assert log_ratios(torch.tensor([[1.0, 0.0]])).item() == pytest.approx(-np.log(LOG_FLOOR))


def gaussian_gated(g: PosteriorGaussian, tau: float, **extra) -> dict:
    return {"name": "ood_gated", "tau": tau, "score": "gaussian", "gaussian": g.model_dump(),
            "inside": {"name": "identity"}, "outside": {"name": "label_only"}, **extra}


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), tau=st.sampled_from([1e-8, 1e-3, 0.05, 0.5]),
       nu=st.sampled_from([None, 10.0, 1e4]), data=st.data())
def test_the_gaussian_gate_sends_atypical_rows_outside(seed, tau, nu, data):
    k = data.draw(st.integers(2, 10))
    g = fit_posterior_gaussian(*class_posteriors(k, 200, seed))
    y = data.draw(prob_batches(max_batch=16, min_classes=k, max_classes=k))
    config = gaussian_gated(g, tau, **({} if nu is None else {"nu": nu}))
    out = build_defense(config, num_classes=k)(y)
    s = gaussian_typicality(y.to(torch.float64), g)
    torch.testing.assert_close(out.extras["ood_score"], 1 - s, atol=1e-12, rtol=0)
    y64 = y.to(torch.float64)
    onehot = torch.nn.functional.one_hot(y64.argmax(1), k).to(torch.float64)
    if nu is None:
        gate = s < tau
        assert torch.equal(out.extras["gate"], gate.to(torch.float64))
        expected = torch.where(gate.unsqueeze(1), onehot, y64)
    else:
        h = torch.sigmoid(nu * (tau - s))
        torch.testing.assert_close(out.extras["gate"], h, atol=1e-12, rtol=0)
        expected = (1 - h).unsqueeze(1) * y64 + h.unsqueeze(1) * onehot
        expected = expected / expected.sum(1, keepdim=True)
    torch.testing.assert_close(out.probs.to(torch.float64), expected, atol=1e-5, rtol=0)


def test_the_gaussian_gate_config_is_checked():
    g = fit_posterior_gaussian(*class_posteriors(3, 90, seed=5))
    cfg = validate_config(gaussian_gated(g, 1e-3))
    assert validate_config(cfg.model_dump()) == cfg and cfg.gaussian == g
    plain = {k: v for k, v in gaussian_gated(g, 1e-3).items() if k not in ("score", "gaussian")}
    assert validate_config(plain).score == "max_prob"
    with pytest.raises(ValueError, match="gaussian: score 'gaussian' needs the fitted statistics"):
        validate_config({**plain, "score": "gaussian"})
    with pytest.raises(ValueError, match="statistics are used only with score 'gaussian'"):
        validate_config({**plain, "gaussian": g.model_dump()})
    with pytest.raises(ValueError, match="score"):
        validate_config({**plain, "score": "energy"})
    with pytest.raises(ValueError, match="fitted for K = 3 classes; this victim has 4"):
        build_defense(gaussian_gated(g, 1e-3), num_classes=4)
    with pytest.raises(ValueError, match=r"B x 3"):
        build_defense(gaussian_gated(g, 1e-3))(torch.full((2, 4), 0.25))
