"""DPS, MCG and Noise2Score against the exact posterior of a Gaussian prior."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from geodiff import GaussianPrior, Grid
from geodiff.baselines import dps, mcg, noise2score, tune_zeta
from geodiff.operators import Blur, Denoise, RandomMask


@pytest.fixture(scope="module")
def setup():
    g = Grid(6, 6)
    prior = GaussianPrior.matern(g, variance=0.02, length_scale=0.3, mean=0.5, nugget=1e-3)
    x = prior.sample(jax.random.key(0), 4)
    return g, prior, x


def test_noise2score_is_the_exact_posterior_mean_for_denoising(setup, x64):
    g, _, _ = setup
    prior = GaussianPrior.matern(g, variance=0.02, length_scale=0.3, mean=0.5, nugget=1e-3)
    op = Denoise(0.1).on(g)
    x = prior.sample(jax.random.key(0), 4)
    meas = op.measure(jax.random.key(1), x)
    mean, _ = prior.posterior(op, meas)
    np.testing.assert_allclose(noise2score(prior, op, meas), mean, rtol=1e-6, atol=1e-8)


def test_dps_mean_approaches_the_exact_posterior_mean(setup):
    """DPS is biased (x̂₀ replaces x₀ in the guidance, a fixed ζ is not the likelihood score), so
    its sample mean is compared with how far the prior mean is: it must remove most of that gap."""
    g, prior, x = setup
    op = RandomMask(0.5, 0.05).on(g)
    meas = op.measure(jax.random.key(2), x)
    exact, _ = prior.posterior(op, meas)
    samples = dps(jax.random.key(3), prior, op, meas, n=64, steps=200, zeta=0.3)
    assert samples.shape == (64, 4, 36, 1)
    err = float(jnp.linalg.norm(samples.mean(0) - exact))
    err_prior = float(jnp.linalg.norm(prior.mean - exact))
    print(f"DPS mean error {err:.4f} vs prior-mean error {err_prior:.4f}")
    assert err < 0.5 * err_prior


def test_dps_on_a_single_measurement_and_a_nonmask_operator(setup):
    g, prior, x = setup
    op = Blur(0.1, 0.05).on(g)
    meas = op.measure(jax.random.key(4), x[0])
    samples = dps(jax.random.key(5), prior, op, meas, n=3, steps=20, zeta=0.3)
    assert samples.shape == (3, 36, 1) and jnp.all(jnp.isfinite(samples))


def test_mcg_keeps_observed_entries(setup):
    g, prior, x = setup
    op = RandomMask(0.5, 0.05).on(g)
    meas = op.measure(jax.random.key(6), x)
    samples = mcg(jax.random.key(7), prior, op, meas, n=8, steps=100, zeta=0.3)
    obs = np.broadcast_to(np.asarray(meas.mask), (8, 4, 36, 1))
    np.testing.assert_array_equal(np.asarray(samples)[obs], np.broadcast_to(np.asarray(meas.y), obs.shape)[obs])
    exact, _ = prior.posterior(op, meas)
    miss = ~obs[0]
    err = np.abs(np.asarray(samples.mean(0))[miss] - np.asarray(exact)[miss]).mean()
    err_prior = np.abs(np.asarray(prior.mean)[None].repeat(4, 0)[miss] - np.asarray(exact)[miss]).mean()
    assert err < err_prior


def test_tune_zeta_picks_a_candidate(setup):
    g, prior, x = setup
    op = RandomMask(0.5, 0.05).on(g)
    meas = op.measure(jax.random.key(8), x)
    best, scores = tune_zeta(jax.random.key(9), prior, op, meas, x, zetas=(0.01, 0.3), steps=50)
    assert best in (0.01, 0.3) and set(scores) == {0.01, 0.3}
    assert scores[best] == max(scores.values())


def test_bad_input(setup):
    g, prior, x = setup
    op = RandomMask(0.5, 0.05).on(g)
    meas = op.measure(jax.random.key(0), x)
    with pytest.raises(ValueError, match="zeta must be"):
        dps(jax.random.key(0), prior, op, meas, zeta=0.0)
    with pytest.raises(ValueError, match="n must be"):
        dps(jax.random.key(0), prior, op, meas, n=0, zeta=0.3)
    with pytest.raises(ValueError, match="but the prior lives on"):
        dps(jax.random.key(0), prior, RandomMask(0.5, 0.05).on(Grid(4, 4)), meas, zeta=0.3)
    with pytest.raises(ValueError, match="masking operator"):
        mcg(jax.random.key(0), prior, Denoise(0.1).on(g), meas, zeta=0.3)
    with pytest.raises(ValueError, match="for denoising"):
        noise2score(prior, op, meas)
    bad = type(meas)(y=meas.y.at[0, 0, 0].set(jnp.nan), mask=meas.mask, params=meas.params)
    with pytest.raises(ValueError, match="NaN"):
        dps(jax.random.key(0), prior, op, bad, zeta=0.3)
