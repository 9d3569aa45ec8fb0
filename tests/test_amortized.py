"""AmortizedSampler and its Gaussian-surrogate base, checked against exact Gaussian posteriors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from geodiff import (AmortizedSampler, ConditionalRealNVP, DiffusionPrior, GaussianMixturePrior,
                     GaussianPrior, GaussianSurrogate, Grid, Sphere)
from geodiff.amortized.surrogate import (base_forward, base_inverse, base_params, dense_posterior,
                                         selection_shared, solver_kind)
from geodiff.diffusion.prior import NetConfig
from geodiff.operators import Blur, Denoise, RandomMask, SuperResolution


def exact_surrogate(prior: GaussianPrior) -> GaussianSurrogate:
    """The prior's own covariance as a surrogate (tests of the *base*, not of learning)."""
    F = prior.basis * jnp.sqrt(prior.variances)
    return GaussianSurrogate(prior.mean, F, jnp.full(prior.mean.shape, prior.nugget))


@pytest.fixture(scope="module")
def grid():
    return Grid(4, 5)


@pytest.fixture(scope="module")
def gprior(grid):
    return GaussianPrior.matern(grid, variance=0.05, length_scale=0.3, mean=0.4, nugget=1e-3)


def perturbed(sampler, scale=0.3, seed=0):
    """A copy whose flow has random (non-identity) parameters."""
    leaves, treedef = jax.tree_util.tree_flatten(sampler.params)
    rng = np.random.default_rng(seed)   # NumPy: no XLA program to compile per parameter shape
    new = [jnp.asarray(np.asarray(leaf) + scale * rng.standard_normal(leaf.shape)
                       / np.sqrt(max(leaf.shape[0], 1)), leaf.dtype) for leaf in leaves]
    out = AmortizedSampler.__new__(AmortizedSampler)
    out.__dict__.update(sampler.__dict__)
    out.params = jax.tree_util.tree_unflatten(treedef, new)
    return out


# ------------------------------------------------------------------------------ the base
@pytest.mark.parametrize("op", [RandomMask(0.5, 0.3), Denoise(0.2), Blur(0.1, 0.2),
                                SuperResolution(2, 0.1)], ids=lambda o: type(o).__name__)
def test_base_is_the_exact_surrogate_posterior(x64, op):
    """m₀ and L₀L₀ᵀ equal dense Gaussian conditioning; L₀⁻¹ and log|det L₀| are exact."""
    grid = Grid(4, 4, channels=2)
    V, C, R = 16, 2, 5
    rng = np.random.default_rng(0)
    F, d = rng.normal(size=(V * C, R)), rng.uniform(0.1, 0.5, size=(V, C))
    mu = rng.normal(size=(V, C))
    sur = GaussianSurrogate(jnp.asarray(mu), jnp.asarray(F), jnp.asarray(d))
    op = op.on(grid)
    m = op.measure(jax.random.key(1), jnp.asarray(rng.normal(size=(3, V, C))))
    kind = solver_kind(op)
    shared = dense_posterior(op, m, sur) if kind == "dense" else selection_shared(op, sur)
    b = base_params(op, m, sur, shared=shared)
    cov = F @ F.T + np.diag(d.reshape(-1))
    eye = jnp.eye(V * C).reshape(V * C, V, C)
    tol = 1e-10 if kind == "selection" else 1e-5     # the dense solver stores float32 factors
    for i in range(3):
        mi = m[i]
        A = np.asarray(jax.vmap(lambda e: op.forward(e, mi))(eye).reshape(V * C, -1).T)
        post = np.linalg.inv(np.linalg.inv(cov) + A.T @ A / op.sigma**2)
        mean = mu.reshape(-1) + post @ A.T @ (np.asarray(mi.y).reshape(-1) - A @ mu.reshape(-1)) / op.sigma**2
        bi = jax.tree.map(lambda a: jnp.broadcast_to(a[i], (V * C, *a.shape[1:])), b)
        x, ld = base_forward(kind, sur, shared, bi, eye)
        L = np.asarray(x.reshape(V * C, -1) - bi["m0"].reshape(V * C, -1)).T
        np.testing.assert_allclose(bi["m0"][0].reshape(-1), mean, atol=tol * 100, rtol=tol * 10)
        np.testing.assert_allclose(L @ L.T, post, atol=tol)
        np.testing.assert_allclose(ld[0], 0.5 * np.linalg.slogdet(post)[1], atol=tol * 100)
        u, ld_inv = base_inverse(kind, sur, shared, bi, x)
        np.testing.assert_allclose(u, eye, atol=tol * 10)
        np.testing.assert_allclose(ld_inv, ld)


def test_base_params_in_padded_chunks_equal_one_by_one(grid, gprior, key):
    """N = 70 in chunks of 32 (padded to 96, run in one sequential loop) equals N calls of 1."""
    op = RandomMask(0.5, 0.1).on(grid)
    sur = exact_surrogate(gprior)
    m = op.measure(key, gprior.sample(jax.random.key(1), 70))
    b = base_params(op, m, sur, chunk=32)
    assert b["m0"].shape == (70, 20, 1) and b["W"].shape == (70, 20, 20)
    for i in (0, 31, 32, 69):
        bi = base_params(op, m[i:i + 1], sur)
        for k in ("m0", "r", "a", "s2", "logdet"):
            np.testing.assert_allclose(b[k][i], bi[k][0], rtol=1e-4, atol=1e-5)
        sym = lambda bb, j: (bb["W"][j] * bb["s2"][j]) @ bb["W"][j].T  # noqa: E731  (sign-free)
        np.testing.assert_allclose(sym(b, i), sym(bi, 0), rtol=1e-4, atol=1e-5)


def test_surrogate_fit_recovers_a_low_rank_covariance():
    rng = np.random.default_rng(0)
    F = rng.normal(size=(12, 3))
    x = (rng.normal(size=(20000, 3)) @ F.T + 0.1 * rng.normal(size=(20000, 12))).reshape(-1, 6, 2) + 1.0
    sur = GaussianSurrogate.fit(x, rank=3)
    cov = np.asarray(sur.factor) @ np.asarray(sur.factor).T + np.diag(np.asarray(sur.nugget).reshape(-1))
    np.testing.assert_allclose(cov, F @ F.T + 0.01 * np.eye(12), atol=0.15)
    np.testing.assert_allclose(sur.mean, 1.0, atol=0.05)
    np.testing.assert_allclose(sur.marginal_std ** 2, np.diag(cov).reshape(6, 2), rtol=1e-5)


# ---------------------------------------------------------------------- untrained sampler
def test_untrained_sampler_samples_its_base_exactly(grid, gprior, key):
    op = RandomMask(0.5, 0.1)
    s = AmortizedSampler(grid, gprior, op, prior_term="exact", surrogate=exact_surrogate(gprior),
                         n_steps=2, hidden=16, n_eig=8)
    m = op.on(grid).measure(key, gprior.sample(jax.random.key(1), 3))
    x = s.sample(jax.random.key(2), m, 4)
    assert x.shape == (4, 3, 20, 1)
    b = base_params(s.operator, m, s.surrogate)
    # measurement b's latents come from fold_in(key, b) alone (chunking does not change them)
    z = jnp.stack([jax.random.normal(jax.random.split(jax.random.fold_in(jax.random.key(2), b))[0],
                                     (4, 20, 1)) for b in range(3)], axis=1).reshape(12, 20, 1)
    rep = jax.tree.map(lambda a: jnp.broadcast_to(a[None], (4, *a.shape)).reshape(12, *a.shape[1:]), b)
    want, _ = base_forward("selection", s.surrogate, None, rep, z)
    np.testing.assert_allclose(x, want.reshape(4, 3, 20, 1), atol=1e-5)
    assert s.sample(key, m[0], 5).shape == (5, 20, 1)


@pytest.mark.parametrize("op", [RandomMask(0.5, 0.1), Blur(0.1, 0.05)], ids=["mask", "blur"])
def test_untrained_sampler_with_exact_surrogate_is_the_exact_posterior(x64, grid, gprior, op):
    """Its log q is the exact posterior log-density; its moments are the exact ones."""
    s = AmortizedSampler(grid, gprior, op, prior_term="exact", surrogate=exact_surrogate(gprior),
                         n_steps=2, hidden=16, n_eig=8)
    opb = s.operator
    x_true = gprior.sample(jax.random.key(1), 2)
    m = opb.measure(jax.random.key(2), x_true)
    mean, std = gprior.posterior(opb, m)
    x = s.sample(jax.random.key(3), m, 6)
    resid = m.y - opb.forward(x, m)
    n_obs = jnp.sum(m.mask, axis=(-2, -1))
    log_lik = (-0.5 * jnp.sum(resid**2, axis=(-2, -1)) / opb.sigma**2
               - 0.5 * n_obs * np.log(2 * np.pi * opb.sigma**2))
    log_post = log_lik + gprior.log_prob(x) - gprior.log_evidence(opb, m)
    tol = 1e-6 if isinstance(op, RandomMask) else 2e-3   # dense factors are float32
    np.testing.assert_allclose(s.log_prob(x, m), log_post, atol=tol * 100, rtol=tol)
    b = base_params(opb, m, s.surrogate, shared=s._shared)
    np.testing.assert_allclose(b["m0"], mean, atol=tol * 10)
    big = s.sample(jax.random.key(4), m[0], 4000)
    np.testing.assert_allclose(big.std(0), std[0], rtol=0.08)


@pytest.mark.parametrize("encoder_width", [0, 4])
def test_log_prob_is_the_change_of_variables(x64, grid, gprior, key, encoder_width):
    """With a non-identity flow: log q(x) = log N(z) − log|det ∂x/∂z| (dense Jacobian); with a
    condition encoder too (log_prob encodes the condition once, G here inside every call)."""
    op = RandomMask(0.5, 0.1)
    s = AmortizedSampler(grid, gprior, op, prior_term="exact", surrogate_rank=8,
                         surrogate=np.asarray(gprior.sample(key, 64)), n_steps=2, hidden=16, n_eig=8,
                         encoder_width=encoder_width, encoder_blocks=1)
    s = perturbed(s)
    # everything in float64 (surrogate, flow parameters and geometry), so the check is tight
    f64 = lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64)  # noqa: E731
                                 if jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating) else a, t)
    s.surrogate, s.params, s._consts = f64(s.surrogate), f64(s.params), f64(s._consts)
    s._shared = selection_shared(s.operator, s.surrogate)
    m = s.operator.measure(jax.random.key(1), gprior.sample(jax.random.key(2), 1))[0]
    frozen = s._frozen()
    mb = jax.tree.map(lambda a: a[None], m)
    b = s._base(frozen, mb)
    c = s._features(s.surrogate, mb, b)
    flow = s.flow

    def G(z):
        u, _ = flow.forward(z.reshape(1, 20, 1), c)
        return base_forward("selection", frozen["sur"], None, b, u)[0].reshape(-1)

    z = jax.random.normal(jax.random.key(3), (20,), jnp.float64)
    x = G(z).reshape(20, 1)
    want = -0.5 * jnp.sum(z**2) - 10 * np.log(2 * np.pi) - np.linalg.slogdet(jax.jacobian(G)(z))[1]
    lp = s.log_prob(x, m)
    assert np.isfinite(lp)
    np.testing.assert_allclose(lp, want, rtol=1e-10)
    assert abs(float(want) - float(s.log_prob(x + 0.05, m))) > 1e-3   # it does depend on x


# ------------------------------------------------------------------------------ training
def test_tiny_fit_moves_the_posterior_mean_toward_the_exact_one(grid, gprior, key):
    """A deliberately poor surrogate (rank 2 from 40 samples): training on measurements only
    (exact prior term) must bring the mean much closer to the exact posterior mean."""
    op = RandomMask(0.5, 0.05)
    s = AmortizedSampler(grid, gprior, op, prior_term="exact",
                         surrogate=np.asarray(gprior.sample(jax.random.key(5), 40)), surrogate_rank=2,
                         n_steps=4, hidden=64, n_eig=16)
    train = s.operator.measure(jax.random.key(1), gprior.sample(jax.random.key(2), 256))
    test = s.operator.measure(jax.random.key(3), gprior.sample(jax.random.key(4), 32))
    mean_x, _ = gprior.posterior(s.operator, test)

    def err(sampler):
        mean, _ = sampler.posterior(jax.random.key(6), test, n=256)
        return float(jnp.mean(jnp.linalg.norm((mean - mean_x)[..., 0], axis=-1)
                              / jnp.linalg.norm((mean_x - gprior.mean)[..., 0], axis=-1)))

    before = err(s)
    trained, hist = s.fit(jax.random.key(7), train, steps=400, batch_size=32, learning_rate=3e-3,
                          progress=False)
    after = err(trained)
    assert before > 0.3                       # the base alone is poor...
    assert after < 0.6 * before, (before, after)  # ...and training on measurements fixes much of it
    assert hist["loss"][-1] < hist["loss"][0]
    assert set(hist) >= {"data", "prior", "log_q", "base_s"}
    np.testing.assert_array_equal(jax.tree.leaves(s.params)[0], jax.tree.leaves(
        AmortizedSampler(grid, gprior, op, prior_term="exact", surrogate=s.surrogate, n_steps=4,
                         hidden=64, n_eig=16).params)[0])   # the receiver is unchanged


def test_elbo_prior_term_trains_and_stays_finite(grid, gprior, key):
    op = RandomMask(0.5, 0.05)
    s = AmortizedSampler(grid, gprior, op, surrogate=exact_surrogate(gprior), n_steps=2, hidden=16,
                         n_eig=8, n_t=2)
    assert s.prior_term == "elbo"
    train = s.operator.measure(jax.random.key(1), gprior.sample(jax.random.key(2), 64))
    trained, hist = s.fit(key, train, steps=20, batch_size=16, progress=False)
    assert np.all(np.isfinite(hist["loss"])) and hist["n_bad"] == 0
    assert np.all(np.isfinite(hist["prior"]))
    moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(s.params),
                                                       jax.tree.leaves(trained.params))]
    assert any(moved)


def test_fit_resumes_exactly(grid, gprior, key, tmp_path):
    op = RandomMask(0.5, 0.05)
    s = AmortizedSampler(grid, gprior, op, prior_term="exact", surrogate=exact_surrogate(gprior),
                         n_steps=2, hidden=16, n_eig=8)
    train = s.operator.measure(jax.random.key(1), gprior.sample(jax.random.key(2), 64))
    full, _ = s.fit(key, train, steps=12, batch_size=8, progress=False)
    s.fit(key, train, steps=6, batch_size=8, progress=False, checkpoint_dir=tmp_path)
    resumed, hist = s.fit(key, train, steps=12, batch_size=8, progress=False, checkpoint_dir=tmp_path)
    assert hist["step"][-1] == 12
    for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(resumed.params)):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------ save/load
@pytest.mark.parametrize("which", ["gaussian", "mixture", "diffusion"])
def test_save_load_round_trip(grid, gprior, key, tmp_path, which):
    if which == "gaussian":
        prior, op = gprior, Blur(0.1, 0.05)
    elif which == "mixture":
        other = GaussianPrior.matern(grid, variance=0.02, length_scale=0.5, mean=0.6, nugget=1e-3)
        prior, op = GaussianMixturePrior([gprior, other], [0.3, 0.7]), RandomMask((0.3, 0.6), 0.05)
    else:
        prior = DiffusionPrior(grid, config=NetConfig(width=8, n_blocks=1, n_eig=8, n_pos=4, emb_dim=8),
                               params=None, data_mean=np.full((20, 1), 0.5), data_std=np.full((20, 1), 0.2))
        op = Denoise(0.1)
    # the diffusion case brings its own flow (other widths, the per-vertex MLP, a condition
    # encoder, another log-scale bound, clipped inputs): the file must rebuild that flow
    flow = (ConditionalRealNVP(grid, condition_channels=4, n_steps=2, hidden=8, n_eig=8, local_hidden=4,
                               encoder_width=3, encoder_blocks=1, max_log_scale=1.5,
                               input_bound=1.5, seed=3)
            if which == "diffusion" else None)
    s = perturbed(AmortizedSampler(grid, prior, op, surrogate=np.asarray(gprior.sample(key, 32)),
                                   surrogate_rank=8, n_steps=2, hidden=16, n_eig=8, flow=flow))
    path = s.save(tmp_path / "sampler.npz")
    t = AmortizedSampler.load(path)
    assert t.flow_config == s.flow_config
    if which == "diffusion":
        assert s.flow_config["local_hidden"] == 4 and s.flow_config["hidden"] == 8
        assert s.flow_config["encoder_width"] == 3 and s.flow_config["encoder_blocks"] == 1
        assert s.flow_config["input_bound"] == 1.5
    assert type(t.prior) is type(prior) and type(t.operator) is type(op)
    assert t.operator.sigma == op.sigma and t.manifold.n_vertices == 20
    m = s.operator.measure(jax.random.key(1), gprior.sample(jax.random.key(2), 2))
    np.testing.assert_array_equal(s.sample(key, m, 3), t.sample(key, m, 3))
    x = s.sample(key, m, 2)
    np.testing.assert_allclose(s.log_prob(x, m), t.log_prob(x, m), rtol=1e-6)
    if which == "diffusion":
        np.testing.assert_allclose(prior.score(x[0], 0.5), t.prior.score(x[0], 0.5), rtol=1e-6)


def test_load_rejects_other_files(tmp_path):
    np.savez(tmp_path / "x.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="not a (readable )?saved AmortizedSampler"):
        AmortizedSampler.load(tmp_path / "x.npz")
    with pytest.raises(FileNotFoundError, match="path"):
        AmortizedSampler.load(tmp_path / "missing.npz")


# ------------------------------------------------------------------------------ bad input
def test_bad_measurements_raise(grid, gprior, key):
    op = RandomMask(0.5, 0.05)
    s = AmortizedSampler(grid, gprior, op, surrogate=exact_surrogate(gprior), n_steps=1, hidden=8,
                         n_eig=4)
    x = gprior.sample(key, 2)
    m = s.operator.measure(key, x)
    with pytest.raises(ValueError, match="n must be"):
        s.sample(key, m, 0)
    sr = SuperResolution(2, 0.05).on(grid.__class__(4, 6))
    with pytest.raises(ValueError, match="another operator"):
        s.sample(key, sr.measure(key, jnp.zeros((24, 1))), 1)
    other = RandomMask(0.5, 0.05).on(Grid(5, 5)).measure(key, jnp.zeros((25, 1)))
    with pytest.raises(ValueError, match=r"measurement.y must have shape \(\.\.\., 20, 1\)"):
        s.sample(key, other, 1)
    bad = type(m)(y=m.y.at[0, 0, 0].set(jnp.nan), mask=m.mask, params=m.params)
    with pytest.raises(ValueError, match="NaN"):
        s.sample(key, bad, 1)
    with pytest.raises(ValueError, match="batch shape"):
        s.sample(key, jax.tree.map(lambda a: a[None], m), 1)
    with pytest.raises(ValueError, match="batch shape"):
        s.fit(key, m[0], steps=1)
    with pytest.raises(TypeError, match="Measurement"):
        s.sample(key, m.y, 1)
    dn = AmortizedSampler(grid, gprior, Denoise(0.1), surrogate=exact_surrogate(gprior), n_steps=1,
                          hidden=8, n_eig=4)
    with pytest.raises(ValueError, match="another operator"):
        dn.sample(key, m, 1)
    with pytest.raises(ValueError, match="x must have shape"):
        s.log_prob(jnp.zeros((3, 20, 1)), m)


def test_bad_construction_raises(grid, gprior):
    sur = exact_surrogate(gprior)
    with pytest.raises(ValueError, match="prior_term"):
        AmortizedSampler(grid, gprior, Denoise(0.1), prior_term="score", surrogate=sur)
    with pytest.raises(ValueError, match="sigma must be > 0"):
        AmortizedSampler(grid, gprior, Denoise(0.0), surrogate=sur)
    with pytest.raises(ValueError, match="vertices"):
        AmortizedSampler(Grid(5, 5), gprior, Denoise(0.1), surrogate=sur)
    with pytest.raises(ValueError, match="condition_channels"):
        AmortizedSampler(grid, gprior, Denoise(0.1), surrogate=sur,
                         flow=ConditionalRealNVP(grid, condition_channels=1, n_steps=1, hidden=8))
    with pytest.raises(ValueError, match=r"surrogate must be .* shape \(S, 20, 1\)"):
        AmortizedSampler(grid, gprior, Denoise(0.1), surrogate=np.zeros((10, 21, 1)))
    with pytest.raises(ValueError, match="exact log_prob"):
        prior = DiffusionPrior(grid, config=NetConfig(width=8, n_blocks=1, n_eig=8, n_pos=4, emb_dim=8),
                               params=None, data_mean=np.full((20, 1), 0.5), data_std=np.full((20, 1), 0.2))
        AmortizedSampler(grid, prior, Denoise(0.1), prior_term="exact", surrogate=sur)
    sph = Sphere.latlon(6, 12)
    with pytest.raises(TypeError, match="operator"):
        AmortizedSampler(sph, GaussianPrior.matern(sph, variance=0.01, length_scale=0.3),
                         lambda x: x, surrogate=None)


def test_top_level_import_matches_the_readme():
    import geodiff

    assert geodiff.AmortizedSampler is AmortizedSampler
    assert geodiff.ConditionalRealNVP is ConditionalRealNVP


def test_flow_per_y_fits_one_measurement(grid, gprior, key):
    """FlowPerY: the same sampler trained on a single y gets closer to that y's exact posterior."""
    from geodiff.baselines import flow_per_y

    op = RandomMask(0.5, 0.05)
    s = AmortizedSampler(grid, gprior, op, prior_term="exact",
                         surrogate=np.asarray(gprior.sample(jax.random.key(5), 40)), surrogate_rank=2,
                         n_steps=4, hidden=64, n_eig=16)
    m = s.operator.measure(jax.random.key(1), gprior.sample(jax.random.key(2), 1))[0]
    mean_x, _ = gprior.posterior(s.operator, m)
    err = lambda x: float(jnp.linalg.norm(x.mean(0) - mean_x) / jnp.linalg.norm(mean_x - gprior.mean))  # noqa: E731
    before = err(s.sample(jax.random.key(3), m, 512))
    x, trained, hist = flow_per_y(key, s, m, n=512, steps=300, learning_rate=3e-3, progress=False)
    assert x.shape == (512, 20, 1) and hist["step"][-1] == 300
    assert err(x) < 0.6 * before, (before, err(x))
    with pytest.raises(ValueError, match="batch shape"):
        flow_per_y(key, s, s.operator.measure(key, gprior.sample(key, 2)), steps=1)


def test_denoise_base_is_factored_once_and_equals_the_per_measurement_solve(grid, gprior, key):
    """Denoise observes every entry, so the covariance factor is shared (computed once); the bases
    it gives equal the full per-measurement solve. A RandomMask keeps its per-measurement solve."""
    from geodiff.amortized.surrogate import _selection_one

    sur = exact_surrogate(gprior)
    assert selection_shared(RandomMask(0.5, 0.1).on(grid), sur)["fixed"] is None
    op = Denoise(0.1).on(grid)
    shared = selection_shared(op, sur)
    assert shared["fixed"] is not None
    m = op.measure(key, gprior.sample(jax.random.key(1), 5))
    b = base_params(op, m, sur, shared=shared)
    assert set(b) == {"m0"} and b["m0"].shape == (5, 20, 1)  # the factor is not copied per y
    fixed = shared["fixed"]
    u = jax.random.normal(jax.random.key(2), (5, 20, 1))
    x, ld = base_forward("selection", sur, shared, b, u)
    for i in range(5):
        bi = _selection_one(sur, shared["gram"], m.y[i], m.mask[i], sigma=0.1)
        np.testing.assert_allclose(b["m0"][i], bi["m0"], rtol=1e-5, atol=1e-6)
        for k in ("r", "a", "s2", "logdet"):
            np.testing.assert_allclose(fixed[k], bi[k], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose((fixed["W"] * fixed["s2"]) @ fixed["W"].T, (bi["W"] * bi["s2"]) @ bi["W"].T,
                                   rtol=1e-4, atol=1e-5)
        # the shared path maps u as the per-measurement solve does, and inverts it
        bi1 = jax.tree.map(lambda a: a[None], bi)
        xi, ldi = base_forward("selection", sur, None, bi1, u[i:i + 1])
        np.testing.assert_allclose(x[i], xi[0], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(ld[i], ldi[0], rtol=1e-5)
    back, ld_inv = base_inverse("selection", sur, shared, b, x)
    np.testing.assert_allclose(back, u, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ld_inv, ld, rtol=1e-6)
    assert not np.allclose(b["m0"][0], b["m0"][1])          # the means do follow y
    with pytest.raises(ValueError, match="shared factor"):
        base_forward("selection", sur, None, b, u)
