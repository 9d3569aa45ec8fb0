"""Metrics against scikit-image and their definitions."""

import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from geodiff import Grid, Mesh, Sphere
from geodiff.metrics import area_rmse, coverage, mse, psnr, ssim


def test_psnr_and_ssim_agree_with_scikit_image():
    g = Grid(24, 20, channels=2)
    rng = np.random.default_rng(0)
    ref = rng.uniform(size=(3, g.n_vertices, 2))
    x = np.clip(ref + 0.1 * rng.normal(size=ref.shape), 0, 1)
    got_p, got_s = psnr(x, ref), ssim(x, ref, g)
    assert got_p.shape == (3,) and got_s.shape == (3,)
    for b in range(3):
        a, r = g.to_layout(x[b]), g.to_layout(ref[b])
        np.testing.assert_allclose(got_p[b], peak_signal_noise_ratio(r, a, data_range=1.0), rtol=1e-10)
        want = structural_similarity(r, a, data_range=1.0, channel_axis=-1, gaussian_weights=True,
                                     sigma=1.5, use_sample_covariance=False)
        np.testing.assert_allclose(got_s[b], want, rtol=1e-6)


def test_ssim_on_latlon_and_errors():
    s = Sphere.latlon(16, 24)
    x = np.random.default_rng(1).uniform(size=(s.n_vertices, 1))
    np.testing.assert_allclose(ssim(x, x, s), 1.0)
    with pytest.raises(ValueError, match="2-D layout"):
        ssim(x[:453], x[:453], Mesh.bunny(4))
    with pytest.raises(ValueError, match="broadcastable"):
        mse(x, x[:10])


def test_area_rmse_weights_by_mass():
    s = Sphere.latlon(16, 24)
    err = np.zeros((s.n_vertices, 1))
    err[:24] = 1.0  # the north pole copies: a tiny area
    np.testing.assert_allclose(area_rmse(err, 0 * err, s), np.sqrt(s.mass[:24].sum() / s.area))
    assert area_rmse(err, 0 * err, s) < 0.25 * np.sqrt(mse(err, 0 * err))
    np.testing.assert_allclose(area_rmse(err + 2.0, err, s), 2.0)


def test_coverage_of_exact_gaussian_samples_is_nominal():
    rng = np.random.default_rng(2)
    mean, std = rng.normal(size=(50, 1)), rng.uniform(0.5, 2, size=(50, 1))
    truth = mean + std * rng.normal(size=(400, 50, 1))
    samples = mean + std * rng.normal(size=(2000, 400, 50, 1))
    cov = coverage(samples, truth)
    assert cov.shape == (400,)
    np.testing.assert_allclose(cov.mean(), 0.9, atol=0.01)


def test_time_call_excludes_warmup():
    import time

    from geodiff.timing import time_call

    calls = []

    def slow_first(x):
        calls.append(x)
        time.sleep(0.3 if len(calls) == 1 else 0.01)
        return x

    t, out = time_call(slow_first, 5, repeats=3)
    assert out == 5 and len(calls) == 4 and t < 0.2
    with pytest.raises(ValueError, match="repeats must be"):
        time_call(slow_first, 1, repeats=0)


def test_crps_matches_the_gaussian_closed_form():
    from scipy.stats import norm as N

    from geodiff.metrics import crps

    rng = np.random.default_rng(3)
    mu, sd = rng.normal(size=(20, 1)), rng.uniform(0.5, 2, size=(20, 1))
    y = rng.normal(size=(20, 1))
    samples = mu + sd * rng.normal(size=(20000, 20, 1))
    z = (y - mu) / sd
    exact = sd * (z * (2 * N.cdf(z) - 1) + 2 * N.pdf(z) - 1 / np.sqrt(np.pi))
    np.testing.assert_allclose(crps(samples, y), exact.mean(), rtol=0.01)
    # a point mass at the truth scores 0
    np.testing.assert_allclose(crps(np.repeat(y[None], 5, 0), y), 0.0, atol=1e-12)
    with pytest.raises(ValueError, match="samples must have shape"):
        crps(samples[:1], y)


def test_coverage_of_exact_posterior_samples_is_nominal():
    """Truths drawn from a Gaussian prior, measured with a mask; the exact posterior's central 90%
    intervals contain ≈ 90% of the true values (averaged over many measurements)."""
    import jax

    from geodiff import GaussianPrior
    from geodiff.operators import RandomMask

    g = Grid(6, 6)
    prior = GaussianPrior.matern(g, variance=0.02, length_scale=0.3, mean=0.5, nugget=1e-3)
    truth = prior.sample(jax.random.key(0), 200)
    op = RandomMask(0.5, 0.05).on(g)
    meas = op.measure(jax.random.key(1), truth)
    samples = prior.posterior_sample(jax.random.key(2), op, meas, 400)
    cov = coverage(np.asarray(samples), np.asarray(truth))
    assert cov.shape == (200,)
    np.testing.assert_allclose(cov.mean(), 0.9, atol=0.015)


def test_weighted_and_masked_scores_against_hand_computed_values():
    from geodiff.metrics import crps

    x = np.array([[[1.0], [2.0], [4.0]]])          # (1, V=3, C=1)
    ref = np.zeros_like(x)
    w = np.array([1.0, 3.0, 0.0])
    np.testing.assert_allclose(mse(x, ref, weights=w), (1 * 1 + 3 * 4 + 0 * 16) / 4)
    where = np.array([[[True], [False], [True]]])
    np.testing.assert_allclose(mse(x, ref, where=where), (1 + 16) / 2)
    np.testing.assert_allclose(mse(x, ref, weights=w, where=where), 1.0)
    np.testing.assert_allclose(psnr(x, ref, weights=w, where=where), 0.0)
    # coverage: two samples bracket entry 0 only; weighted and restricted fractions
    samples = np.stack([x - 0.5, x + 0.5])
    truth = np.array([[[1.2], [5.0], [9.0]]])
    np.testing.assert_allclose(coverage(samples, truth, weights=w), 1 / 4)
    np.testing.assert_allclose(coverage(samples, truth, where=~where), 0.0)
    # CRPS of the pair per entry: mean |xᵢ − y| − ½·mean|xᵢ − xⱼ| (V-statistic: ½·(2·1)/4 = 0.25)
    per = np.abs(samples - truth).mean(0)[0, :, 0] - 0.25
    np.testing.assert_allclose(crps(samples, truth, weights=w), (per[0] + 3 * per[1]) / 4)
    with pytest.raises(ValueError, match=r"weights must have shape \(3,\)"):
        mse(x, ref, weights=np.ones(4))
    with pytest.raises(ValueError, match="non-negative"):
        mse(x, ref, weights=np.array([1.0, -1.0, 1.0]))
    with pytest.raises(TypeError, match="where must be a boolean"):
        mse(x, ref, where=np.ones((1, 3, 1)))
    with pytest.raises(ValueError, match="select no entry"):
        mse(x, ref, where=np.zeros((1, 3, 1), bool))
    with pytest.raises(ValueError, match="level must be in"):
        coverage(samples, truth, level=1.5)


def test_fair_crps_is_the_u_statistic_and_gaussian_crps_matches_samples():
    from geodiff.metrics import crps, crps_gaussian

    rng = np.random.default_rng(4)
    samples, y = rng.normal(size=(7, 2, 5, 1)), rng.normal(size=(2, 5, 1))
    M = 7
    spread = np.abs(samples[:, None] - samples[None]).sum(axis=(0, 1))   # Σᵢⱼ |xᵢ − xⱼ|
    term1 = np.abs(samples - y).mean(0)
    np.testing.assert_allclose(crps(samples, y, fair=True),
                               (term1 - spread / (2 * M * (M - 1))).mean(axis=(-2, -1)))
    np.testing.assert_allclose(crps(samples, y), (term1 - spread / (2 * M**2)).mean(axis=(-2, -1)))
    # the fair score of a small ensemble is unbiased for the distribution's CRPS
    mu, sd = 0.3, 0.7
    y1 = np.array([[[1.1]]])
    draws = mu + sd * rng.normal(size=(4, 20000, 1, 1, 1))
    fair = crps(draws, np.broadcast_to(y1, (20000, 1, 1, 1)), fair=True).mean()
    exact = crps_gaussian(np.full_like(y1, mu), np.full_like(y1, sd), y1)
    np.testing.assert_allclose(fair, exact[0], rtol=0.02)
    with pytest.raises(ValueError, match="std must be positive"):
        crps_gaussian(y1, 0 * y1, y1)


def test_area_weighted_psnr_discounts_the_poles():
    s = Sphere.latlon(16, 24)
    ref = np.zeros((s.n_vertices, 1))
    x = ref.copy()
    x[:24] = 0.5                                     # only the north-pole row differs
    plain, weighted = psnr(x, ref), psnr(x, ref, weights=s.mass)
    want = 10 * np.log10(1 / (0.25 * s.mass[:24].sum() / s.mass.sum()))
    np.testing.assert_allclose(weighted, want)
    assert weighted > plain + 5
