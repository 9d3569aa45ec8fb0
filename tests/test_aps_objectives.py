"""The sampler's centre, the simulated-pair objective and the calibrated temperature, checked
against exact Gaussian posteriors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import multivariate_normal

from geodiff import AmortizedSampler, DiffusionPrior, GaussianPrior, GaussianSurrogate, Grid
from geodiff.baselines import noise2score
from geodiff.diffusion.prior import NetConfig
from geodiff.metrics import coverage
from geodiff.operators import Denoise, RandomMask


@pytest.fixture(scope="module")
def grid():
    return Grid(6, 6)


@pytest.fixture(scope="module")
def prior(grid):
    return GaussianPrior.matern(grid, variance=0.05, length_scale=0.3, mean=0.4, nugget=1e-3)


def surrogate(prior, inflate: float = 1.0) -> GaussianSurrogate:
    """The prior's own covariance (times ``inflate``) as the sampler's surrogate."""
    F = prior.basis * jnp.sqrt(prior.variances * inflate)
    return GaussianSurrogate(prior.mean, F, jnp.full(prior.mean.shape, prior.nugget * inflate))


def small(grid, prior, op, **kw):
    kw = {"n_steps": 2, "hidden": 32, "n_eig": 16} | kw
    return AmortizedSampler(grid, prior, op.on(grid), **kw)


def test_tweedie_centre_is_noise2score_and_auto_picks_it(grid, prior):
    op = Denoise(0.2).on(grid)
    s = small(grid, prior, op, surrogate=surrogate(prior, 2.0))
    assert s.centre == "tweedie"                    # "auto" on Denoise
    assert small(grid, prior, RandomMask(0.5, 0.1), surrogate=surrogate(prior)).centre == "surrogate"
    meas = op.measure(jax.random.key(1), prior.sample(jax.random.key(2), 5))
    # an untrained flow is the identity: at τ → 0 every draw is the centre itself
    x = s.with_temperature(1e-6).sample(jax.random.key(3), meas, 2)
    want = noise2score(prior, op, meas)
    np.testing.assert_allclose(x[0], want, atol=1e-5)
    np.testing.assert_allclose(x[1], want, atol=1e-5)
    # with a mis-scaled surrogate the kriging centre differs; Tweedie of the exact prior does not
    exact_mean, _ = prior.posterior(op, meas)
    np.testing.assert_allclose(want, exact_mean, atol=1e-4)
    krig = small(grid, prior, op, surrogate=surrogate(prior, 2.0), centre="surrogate")
    x_k = krig.with_temperature(1e-6).sample(jax.random.key(3), meas, 1)[0]
    assert float(jnp.max(jnp.abs(x_k - exact_mean))) > 1e-2
    with pytest.raises(ValueError, match="centre='tweedie' needs a Denoise"):
        small(grid, prior, RandomMask(0.5, 0.1), surrogate=surrogate(prior), centre="tweedie")
    with pytest.raises(ValueError, match="centre must be one of"):
        small(grid, prior, op, surrogate=surrogate(prior), centre="kriging")


def test_pairs_learns_the_exact_posterior_spread(grid, prior):
    """A surrogate 3× too wide: the untrained sampler's std is ≈ 1.3× the exact one; 400 steps of
    the pair objective on fresh exact prior draws bring it within 8% with the mean still exact."""
    op = Denoise(0.2).on(grid)
    s = small(grid, prior, op, surrogate=surrogate(prior, 3.0))
    meas = op.measure(jax.random.key(6), prior.sample(jax.random.key(5), 100))  # unseen
    mean, std = prior.posterior(op, meas)

    def errors(sampler):
        xs = sampler.sample(jax.random.key(2), meas, 512)
        return (float(jnp.sqrt(jnp.mean((xs.mean(0) - mean) ** 2))),
                float(jnp.mean(xs.std(0) / std)))

    err0, ratio0 = errors(s)
    assert ratio0 > 1.2
    held_out = prior.sample(jax.random.key(8), 64)                    # clean, not test signals
    trained, hist = s.fit(jax.random.key(1), None, steps=400, objective="pairs", batch_size=64,
                          learning_rate=3e-3, warmup_steps=20, progress=False,
                          validation=held_out)
    assert hist["objective"] == "pairs" and hist["loss"][-1] < hist["loss"][0]
    v = hist["validation"]
    assert v["candidates"] == ["initial", "pairs"] and v["chosen"] == "pairs"
    assert v["loss"][1] < v["loss"][0]
    err, ratio = errors(trained)
    assert abs(ratio - 1) < 0.08, ratio
    # posterior std ≈ 0.15: 512 draws give a Monte Carlo error of ≈ 0.007 on the mean
    assert err < 0.015, err


def test_pairs_on_given_signals_and_pairs_then_reverse(grid, prior):
    op = RandomMask(0.5, 0.1).on(grid)
    s = small(grid, prior, op, surrogate=surrogate(prior), n_steps=1, hidden=8, n_eig=8)
    signals = np.asarray(prior.sample(jax.random.key(0), 16))
    meas = op.measure(jax.random.key(1), prior.sample(jax.random.key(2), 8))
    tr, hist = s.fit(jax.random.key(3), meas, steps=4, objective="pairs+reverse", signals=signals,
                     finetune_steps=2, batch_size=4, log_every=1, progress=False)
    assert hist["stage"] == ["pairs"] * 4 + ["reverse"] * 2
    assert hist["step"] == [1, 2, 3, 4, 5, 6]
    assert np.all(np.diff(hist["time"]) >= 0)
    assert np.isnan(hist["data"][0]) and np.isfinite(hist["data"][-1])
    assert not all(np.array_equal(a, b) for a, b in
                   zip(jax.tree.leaves(tr.params), jax.tree.leaves(s.params)))
    # path gradient: same loss value as the plain estimator for the same key and parameters
    (m, b, c), _ = s._measurement_batch(meas)
    batch = {"m": m, "b": b, "c": c}
    frozen = s._frozen()
    loss = jax.jit(s._loss_reverse, static_argnames="stl")   # one program, not op by op
    plain, _ = loss(tr.params, batch, jax.random.key(9), frozen)
    path, _ = loss(tr.params, batch, jax.random.key(9), frozen, stl=True)
    np.testing.assert_allclose(float(path), float(plain), rtol=1e-4)


def test_return_best_keeps_the_untrained_flow_when_training_hurts(grid, prior):
    """The exact prior as surrogate: the untrained sampler is the exact posterior, so a wild
    learning rate can only hurt; held-out measurements (the paper's loss) keep the initial flow."""
    op = Denoise(0.2).on(grid)
    s = small(grid, prior, op, surrogate=surrogate(prior), n_steps=1, hidden=8, n_eig=8,
              prior_term="exact")
    meas = op.measure(jax.random.key(1), prior.sample(jax.random.key(2), 32))
    held = op.measure(jax.random.key(3), prior.sample(jax.random.key(4), 32))
    tr, hist = s.fit(jax.random.key(0), meas, steps=30, learning_rate=0.3, warmup_steps=0,
                     batch_size=16, progress=False, validation=held)
    v = hist["validation"]
    assert v["chosen"] == "initial" and v["loss"][0] < v["loss"][1]
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(tr.params),
                                                   jax.tree.leaves(s.params)))


def test_fit_rejects_bad_objectives_and_signals(grid, prior):
    op = Denoise(0.2).on(grid)
    s = small(grid, prior, op, surrogate=surrogate(prior), n_steps=1, hidden=8, n_eig=8)
    meas = op.measure(jax.random.key(1), prior.sample(jax.random.key(2), 4))
    good = np.asarray(prior.sample(jax.random.key(0), 8))
    with pytest.raises(ValueError, match="objective must be one of"):
        s.fit(jax.random.key(0), meas, steps=1, objective="forward")
    with pytest.raises(ValueError, match="signals must have shape"):
        s.fit(jax.random.key(0), None, steps=1, objective="pairs", signals=good[:, :5])
    bad = good.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="signals contains NaN"):
        s.fit(jax.random.key(0), None, steps=1, objective="pairs", signals=bad)
    with pytest.raises(ValueError, match="pass measurements"):
        s.fit(jax.random.key(0), None, steps=1, objective="pairs+reverse", signals=good)
    with pytest.raises(ValueError, match="used by the pair objectives only"):
        s.fit(jax.random.key(0), meas, steps=1, signals=good)
    with pytest.raises(ValueError, match="batch_size"):
        s.fit(jax.random.key(0), None, steps=1, objective="pairs", signals=good, batch_size=64)
    diff = DiffusionPrior(grid, config=NetConfig(width=4, n_blocks=1, n_eig=4, n_pos=2),
                          params=None, data_mean=np.full((36, 1), 0.5),
                          data_std=np.full((36, 1), 0.2))
    sd = small(grid, diff, op, surrogate=good, surrogate_rank=4, n_steps=1, hidden=8, n_eig=8)
    with pytest.raises(ValueError, match="needs signals= clean prior signals"):
        sd.fit(jax.random.key(0), None, steps=1, objective="pairs")


def test_calibrate_reaches_its_level_and_keeps_log_prob_exact(grid, prior, tmp_path):
    """With the exact prior as surrogate and an identity flow, the sampler at temperature τ is
    N(m₀, τ²Σ): log_prob must equal that density, and calibrated coverage must hold on fresh
    pairs not used to set τ."""
    op = RandomMask(0.5, 0.1).on(grid)
    s = small(grid, prior, op, surrogate=surrogate(prior, 0.4), n_steps=1, hidden=8, n_eig=8)
    cal = s.calibrate(jax.random.key(0), prior.sample(jax.random.key(1), 200), level=0.9)
    assert cal.temperature > 1.2 and abs(cal.calibration["coverage"] - 0.9) < 0.01
    truth = prior.sample(jax.random.key(11), 200)                     # fresh pairs
    meas = op.measure(jax.random.key(12), truth)
    xs = np.asarray(cal.sample(jax.random.key(13), meas, 64))
    where = ~np.asarray(meas.mask)
    cov = float(np.mean(coverage(xs, np.asarray(truth), weights=grid.mass, where=where)))
    assert abs(cov - 0.9) < 0.03, cov
    # log_prob of the tempered base is exact: the dense surrogate posterior with covariance τ²Σ
    with jax.enable_x64(True):
        one = meas[0]
        x = xs[:5, 0]
        F = np.asarray(prior.basis, np.float64) * np.sqrt(0.4 * np.asarray(prior.variances, np.float64))
        cov_p = F @ F.T + 0.4 * float(prior.nugget) * np.eye(36)
        w = np.asarray(one.mask, np.float64).reshape(-1) / op.sigma**2
        post = np.linalg.inv(np.linalg.inv(cov_p) + np.diag(w))
        m0 = np.asarray(prior.mean, np.float64).reshape(-1) + post @ (
            w * (np.asarray(one.y, np.float64).reshape(-1) - np.asarray(prior.mean).reshape(-1)))
        want = multivariate_normal(m0, cal.temperature**2 * post).logpdf(x.reshape(5, -1))
    np.testing.assert_allclose(np.asarray(cal.log_prob(x, one)), want, rtol=2e-4)
    loaded = AmortizedSampler.load(cal.save(tmp_path / "cal.npz"))
    assert loaded.temperature == cal.temperature
    assert loaded.calibration == cal.calibration and loaded.centre == "surrogate"
    np.testing.assert_allclose(np.asarray(loaded.log_prob(x, one)), np.asarray(cal.log_prob(x, one)),
                               rtol=1e-6)
    with pytest.raises(ValueError, match="level must be in"):
        s.calibrate(jax.random.key(0), truth, level=1.0)
    with pytest.raises(ValueError, match="temperature must be"):
        s.with_temperature(0.0)


def _pnp_reference(prior, S, A, sigma, y, schedule):
    """Half-quadratic splitting in NumPy float64 with the Gaussian prior's closed forms: the start
    is the kriging mean under the covariance S, each step the exact Tweedie denoiser of N(μ, Σ) at
    noise ratio ρ (μ + Σ(Σ + ρ²I)⁻¹(x − μ)) then argmin_x ‖Ax − y‖²/σ² + ‖x − x̂‖²/ρ²."""
    mu = np.asarray(prior.mean, np.float64).reshape(-1)
    U = np.asarray(prior.basis, np.float64)
    Sigma = U @ np.diag(np.asarray(prior.variances, np.float64)) @ U.T \
        + float(prior.nugget) * np.eye(len(mu))
    x = mu + S @ A.T @ np.linalg.solve(A @ S @ A.T + sigma**2 * np.eye(len(A)), y - A @ mu)
    start = x
    for rho in schedule:
        xhat = mu + Sigma @ np.linalg.solve(Sigma + rho**2 * np.eye(len(mu)), x - mu)
        x = np.linalg.solve(A.T @ A / sigma**2 + np.eye(len(mu)) / rho**2,
                            A.T @ y / sigma**2 + xhat / rho**2)
    exact = mu + Sigma @ A.T @ np.linalg.solve(A @ Sigma @ A.T + sigma**2 * np.eye(len(A)),
                                               y - A @ mu)
    return start, x, exact


def test_pnp_centre_is_half_quadratic_splitting_with_the_prior_denoiser(x64):
    """centre="pnp" on a blur: the untrained sampler's mean equals plug-and-play HQS computed in
    float64 from the Gaussian prior's closed forms, and a long schedule to small noise ratios
    lands on the exact posterior mean from a kriging start with a 2×-wide surrogate."""
    from geodiff.operators import Blur

    grid = Grid(6, 6)
    prior = GaussianPrior.matern(grid, variance=0.05, length_scale=0.3, mean=0.4, nugget=1e-3)
    sur = surrogate(prior, 2.0)
    op = Blur(0.1, 0.1).on(grid)
    x = prior.sample(jax.random.key(2), 4)
    meas = op.measure(jax.random.key(1), x)
    A = np.stack([np.asarray(op.forward(e.reshape(36, 1), meas[0])).reshape(-1)
                  for e in np.eye(36)], axis=1)                        # (Vy, V)
    S = np.asarray(sur.factor @ sur.factor.T) + np.diag(np.asarray(sur.nugget).reshape(-1))
    rms = {}
    for steps, noise in ((6, (0.3, 0.03)), (8, (0.3, 0.011)), (80, (0.3, 0.011))):
        s = small(grid, prior, op, surrogate=sur, centre="pnp", pnp_steps=steps, pnp_noise=noise,
                  pnp_cg=40)
        assert s.pnp == {"steps": steps, "noise": noise, "cg": 40}
        got = np.asarray(s.base_moments(meas)[0], np.float64).reshape(4, -1)
        err, err0 = [], []
        for b in range(4):
            y = np.asarray(meas.y[b], np.float64).reshape(-1)
            start, want, exact = _pnp_reference(prior, S, A, 0.1, y, np.geomspace(*noise, steps))
            np.testing.assert_allclose(got[b], want, atol=1e-9)
            err.append(np.sqrt(np.mean((got[b] - exact) ** 2)))
            err0.append(np.sqrt(np.mean((start - exact) ** 2)))
        rms[steps], rms["start"] = np.mean(err), np.mean(err0)
    # HQS tends to the posterior mean (= MAP here) as ρ → 0 with enough steps: from the kriging
    # start (rms error ≈ 0.020) 8 steps remove ≈ 20%, 80 steps ≈ 90%
    assert rms["start"] > 0.015
    assert rms[80] < 0.15 * rms["start"] and rms[80] < 0.2 * rms[8]
    # an untrained sampler draws around its centre; the base spread stays the surrogate's
    krig = small(grid, prior, op, surrogate=sur, centre="surrogate")
    np.testing.assert_allclose(s.base_moments(meas)[1], krig.base_moments(meas)[1], rtol=1e-12)


def test_pnp_settings_are_checked_and_saved(grid, prior, tmp_path):
    from geodiff.operators import Blur

    op = Blur(0.1, 0.1)
    s = small(grid, prior, op, surrogate=surrogate(prior), centre="pnp")
    hi, lo = s.pnp["noise"]                 # the default: (rms prior std, 0.4 σ)
    assert hi == pytest.approx(float(jnp.sqrt(jnp.mean(surrogate(prior).marginal_std ** 2))))
    assert lo == pytest.approx(0.04) and s.pnp["steps"] == 8
    back = AmortizedSampler.load(s.save(tmp_path / "s.npz"))
    assert back.centre == "pnp" and back.pnp == s.pnp
    meas = op.on(grid).measure(jax.random.key(1), prior.sample(jax.random.key(2), 3))
    np.testing.assert_array_equal(back.base_moments(meas)[0], s.base_moments(meas)[0])
    for bad, match in (({"pnp_noise": (0.01, 0.1)}, "ρ_max ≥ ρ_min > 0"),
                       ({"pnp_noise": (0.3, 0.0)}, "ρ_max ≥ ρ_min > 0"),
                       ({"pnp_noise": (0.3, float("nan"))}, "ρ_max ≥ ρ_min > 0"),
                       ({"pnp_noise": 0.3}, "pair"),
                       ({"pnp_noise": (500.0, 0.1)}, "inside the prior's noise range"),
                       ({"pnp_noise": (0.3, 1e-5)}, "inside the prior's noise range"),
                       ({"pnp_steps": 0}, "pnp_steps"), ({"pnp_cg": 1.5}, "pnp_cg")):
        with pytest.raises(ValueError, match=match):
            small(grid, prior, op, surrogate=surrogate(prior), centre="pnp", **bad)
    with pytest.raises(ValueError, match="centre='pnp' only"):
        small(grid, prior, op, surrogate=surrogate(prior), pnp_noise=(0.3, 0.04))


@pytest.mark.parametrize("op", [RandomMask(0.5, 0.3), Denoise(0.3)], ids=lambda o: type(o).__name__)
def test_condition_residual_has_unit_predictive_variance(grid, prior, op):
    """The residual channel of c(y) is Aᵀ(y − Aμ)/√(s² + σ²): unit variance at every measured
    vertex for signals drawn from the surrogate, including vertices where the prior hardly varies
    (s at the fit's floor, 1e-3), where a residual over s alone would have variance ≈ σ²/s² = 9e4
    and a test signal outside the training range would send the conditioner far out of range."""
    V = grid.n_vertices
    F = np.asarray(prior.basis * jnp.sqrt(prior.variances), np.float64)
    nugget = np.full((V, 1), float(prior.nugget))
    flat = np.arange(0, V, 5)                     # vertices the "training signals" never leave
    F[flat] = 0.0
    nugget[flat] = 1e-6
    sur = GaussianSurrogate(jnp.asarray(prior.mean), jnp.asarray(F, jnp.float32),
                            jnp.asarray(nugget, jnp.float32))
    s = small(grid, prior, op, surrogate=sur, centre="surrogate")
    rng = np.random.default_rng(0)
    n = 4000
    x = (np.asarray(prior.mean)[None] + (rng.standard_normal((n, F.shape[1])) @ F.T)[..., None]
         + np.sqrt(nugget)[None] * rng.standard_normal((n, V, 1)))
    m = s.operator.measure(jax.random.key(1), jnp.asarray(x, jnp.float32))
    b = s._base(s._frozen(), m)
    c = np.asarray(s._features(s.surrogate, m, b), np.float64)
    seen = (np.asarray(m.mask, bool)[..., 0] if s.kind == "selection"
            else np.ones((n, V), bool))
    resid = c[..., 1]
    ms = np.array([np.mean(resid[seen[:, v], v] ** 2) for v in range(V)])
    assert np.all(np.abs(ms - 1) < 0.15), ms          # ≥ 1,800 draws per vertex: ≈ 3% noise
    assert np.all(resid[~seen] == 0)
    # a signal with ink where the training signals have none: the channel stays O(value / σ)
    out = np.asarray(prior.mean).copy()
    out[flat] += 1.0
    mo = s.operator.measure(jax.random.key(2), jnp.asarray(out[None], jnp.float32))
    co = np.asarray(s._features(s.surrogate, mo, s._base(s._frozen(), mo)))
    assert np.abs(co[..., 1]).max() < (1.0 + 5 * op.sigma) / op.sigma
