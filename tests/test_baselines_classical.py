"""Kriging against the exact Gaussian posterior mean; harmonic interpolation against its defining
equations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from geodiff import Grid, Sphere
from geodiff.baselines import gaussian_fit, harmonic, kriging
from geodiff.operators import Blur, Denoise, RandomMask, SuperResolution


def dense_posterior_mean(op, meas, mean, F, d):
    """μ + C Aᵀ (A C Aᵀ + σ² I)⁻¹ (y − A μ) with everything materialized in float64."""
    V, Cc = mean.shape
    D = V * Cc
    eye = np.eye(D).reshape(D, V, Cc)
    A = np.stack([np.asarray(op.forward(jnp.asarray(e), meas)).reshape(-1) for e in eye], axis=1)
    Cov = F @ F.T + np.diag(d.reshape(-1))
    K = A @ Cov @ A.T + op.sigma**2 * np.eye(A.shape[0])
    r = np.asarray(meas.y).reshape(-1) - A @ mean.reshape(-1)
    return (mean.reshape(-1) + Cov @ A.T @ np.linalg.solve(K, r)).reshape(V, Cc)


@pytest.mark.parametrize("make_op", [lambda g: RandomMask(0.5, 0.1).on(g),
                                     lambda g: Denoise(0.2).on(g),
                                     lambda g: Blur(0.1, 0.05).on(g),
                                     lambda g: SuperResolution(2, 0.05).on(g)],
                         ids=["mask", "denoise", "blur", "sr"])
def test_kriging_equals_the_exact_gaussian_posterior_mean(make_op, x64):
    g = Grid(4, 6, channels=2)
    op = make_op(g)
    rng = np.random.default_rng(0)
    mean = rng.normal(size=(24, 2))
    F = rng.normal(size=(48, 5))
    d = rng.uniform(0.01, 0.1, size=(24, 2))
    x = jnp.asarray(rng.normal(size=(3, 24, 2)))
    meas = op.measure(jax.random.key(1), x)
    got = kriging(op, meas, mean=mean, cov_factor=F, nugget=d)
    assert got.shape == (3, 24, 2)
    for b in range(3):
        want = dense_posterior_mean(op, meas[b], mean, F, d)
        np.testing.assert_allclose(got[b], want, rtol=1e-8, atol=1e-10)


def test_gaussian_fit_recovers_a_low_rank_covariance():
    rng = np.random.default_rng(1)
    F_true = rng.normal(size=(30, 3))
    samples = (rng.normal(size=(20000, 3)) @ F_true.T + 0.1 * rng.normal(size=(20000, 30)))[..., None]
    mean, F, nugget = gaussian_fit(samples, rank=3)
    assert mean.shape == (30, 1) and F.shape == (30, 3) and nugget.shape == (30, 1)
    cov = F @ F.T + np.diag(nugget.ravel())
    want = F_true @ F_true.T + 0.01 * np.eye(30)
    assert np.abs(cov - want).max() < 0.05 * np.abs(want).max()
    with pytest.raises(ValueError, match="rank must be"):
        gaussian_fit(samples[:3], rank=5)


def test_kriging_bad_input():
    g = Grid(4, 4)
    op = RandomMask(0.5, 0.1).on(g)
    meas = op.measure(jax.random.key(0), jnp.zeros((16, 1)))
    with pytest.raises(ValueError, match="mean must be"):
        kriging(op, meas, mean=np.zeros((15, 1)), cov_factor=np.zeros((16, 2)))
    with pytest.raises(ValueError, match="cov_factor must have shape"):
        kriging(op, meas, mean=0.0, cov_factor=np.zeros((20, 2)))
    with pytest.raises(ValueError, match="nugget must be"):
        kriging(op, meas, mean=0.0, cov_factor=np.zeros((16, 2)), nugget=-1.0)


def test_harmonic_interpolation_solves_laplace_on_missing_vertices(key):
    g = Grid(12, 10)
    op = RandomMask(0.6, 0.05).on(g)
    x = jax.random.uniform(key, (2, g.n_vertices, 1))
    meas = op.measure(key, x)
    u = harmonic(g, op, meas)
    for b in range(2):
        obs = np.asarray(meas.mask[b, :, 0])
        np.testing.assert_allclose(u[b][obs], np.asarray(meas.y[b])[obs], rtol=1e-6)
        assert np.abs((g.laplacian @ u[b])[~obs]).max() < 1e-10
    # a constant field is reproduced exactly from any observed subset
    noiseless = RandomMask(0.6, 0.0).on(g)
    const = noiseless.measure(key, jnp.full((g.n_vertices, 1), 0.3))
    np.testing.assert_allclose(harmonic(g, noiseless, const), 0.3, rtol=1e-5)


def test_harmonic_on_latlon_treats_pole_copies_as_one_vertex(key):
    s = Sphere.latlon(10, 12)
    op = RandomMask(0.5, 0.0).on(s)
    pts = jnp.asarray(s.points[:, 2:3], jnp.float32)  # z: a degree-1 harmonic on the sphere
    meas = op.measure(key, pts)
    u = harmonic(s, op, meas)
    assert np.ptp(u[:12]) < 1e-12 and np.ptp(u[-12:]) < 1e-12  # all copies of a pole agree
    assert np.abs(u - np.asarray(pts)).max() < 0.35


def test_harmonic_bad_input(key):
    g = Grid(4, 4)
    op = Blur(0.1, 0.1).on(g)
    meas = op.measure(key, jnp.zeros((16, 1)))
    with pytest.raises(ValueError, match="needs a masking operator"):
        harmonic(g, op, meas)
    mask_all = RandomMask(1.0, 0.1).on(g)
    with pytest.raises(ValueError, match="observes no vertex"):
        harmonic(g, mask_all, mask_all.measure(key, jnp.zeros((16, 1))))
    with pytest.raises(ValueError, match="measurement.y must have shape"):
        harmonic(Grid(5, 5), mask_all, mask_all.measure(key, jnp.zeros((16, 1))))
