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
