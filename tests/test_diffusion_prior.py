"""The VPSDE and the learned DiffusionPrior, checked against closed forms where they exist."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.integrate import quad
from scipy.stats import norm

from geodiff import Grid, Sphere
from geodiff.diffusion import VPSDE, DiffusionPrior, NetConfig

TINY = NetConfig(width=8, n_blocks=2, n_eig=16, n_pos=4, emb_dim=8)


def untrained(manifold, mean, std, config=TINY):
    return DiffusionPrior(manifold, config=config, params=None, data_mean=mean, data_std=std)


# ------------------------------------------------------------------------------------ VPSDE
def test_vpsde_schedule_identities():
    sde = VPSDE()
    t = jnp.linspace(0.0, 1.0, 11)
    np.testing.assert_allclose(sde.alpha(t) ** 2 + sde.sigma(t) ** 2, 1.0, rtol=1e-6)
    np.testing.assert_allclose(sde.noise_ratio(t), sde.sigma(t) / jnp.maximum(sde.alpha(t), 1e-30), rtol=1e-5)
    np.testing.assert_allclose(sde.t_from_noise_ratio(sde.noise_ratio(t[1:])), t[1:], rtol=1e-5)
    # α_t = exp(−½∫β): check the integral numerically
    np.testing.assert_allclose(float(sde.int_beta(0.7)), quad(lambda s: float(sde.beta(s)), 0, 0.7)[0], rtol=1e-10)
    with pytest.raises(ValueError, match="beta_min < beta_max"):
        VPSDE(beta_min=1.0, beta_max=0.5)


def test_likelihood_weighting_distribution(x64):
    sde = VPSDE()
    z = quad(lambda s: float(sde.beta(s) / sde.sigma(s) ** 2), sde.t0, 1.0, limit=200)[0]
    np.testing.assert_allclose(float(sde.likelihood_weight_total()), z, rtol=1e-6)
    # the inverse CDF: P(t ≤ t*) = ∫_{t0}^{t*} g²/σ² / Z
    u = jnp.linspace(0.0, 1.0, 7)
    t = sde.sample_likelihood_t(u)
    np.testing.assert_allclose([t[0], t[-1]], [sde.t0, 1.0], rtol=1e-9)
    for ui, ti in zip(u[1:-1], t[1:-1]):
        cdf = quad(lambda s: float(sde.beta(s) / sde.sigma(s) ** 2), sde.t0, float(ti), limit=200)[0] / z
        np.testing.assert_allclose(cdf, float(ui), atol=1e-7)
    strata = sde.stratified_u(jax.random.key(0), 8, (3,))
    assert strata.shape == (3, 8) and jnp.all(jnp.floor(strata * 8) == jnp.arange(8))


# ------------------------------------------------------------------------ DiffusionPrior
@pytest.fixture(scope="module")
def sphere_stats():
    s = Sphere.latlon(8, 10)
    rng = np.random.default_rng(0)
    return s, rng.uniform(0.3, 0.7, (s.n_vertices, 1)), rng.uniform(0.05, 0.2, (s.n_vertices, 1))


def test_untrained_prior_is_the_per_vertex_gaussian(sphere_stats):
    """The output layer starts at zero, so the preconditioned score is exactly that of N(m, s²)."""
    s, mean, std = sphere_stats
    prior = untrained(s, mean, std)
    x = jax.random.normal(jax.random.key(1), (3, s.n_vertices, 1))
    for t in [0.002, 0.3, jnp.array([0.01, 0.5, 0.99])]:
        tt = jnp.asarray(t)[..., None, None]
        a, sg = prior.sde.alpha(tt), prior.sde.sigma(tt)
        exact = -(x - a * mean) / (a**2 * std**2 + sg**2)
        np.testing.assert_allclose(prior.score(x, t), exact, rtol=2e-4, atol=1e-6 * float(jnp.abs(exact).max()))
    # Tweedie from the base class
    t = 0.2
    a, sg = prior.sde.alpha(t), prior.sde.sigma(t)
    want = mean + a * std**2 / (a**2 * std**2 + sg**2) * (x - a * mean)
    np.testing.assert_allclose(prior.denoise(x, t), want, rtol=1e-4, atol=1e-5)


def test_elbo_lower_bounds_the_exact_log_density(sphere_stats):
    """ELBO ≤ log p (the untrained prior is an exactly known Gaussian) and close to it."""
    s, mean, std = sphere_stats
    prior = untrained(s, mean, std)
    rng = np.random.default_rng(1)
    x = mean + std * rng.normal(size=(300, s.n_vertices, 1))
    elbo = np.asarray(prior.elbo(jax.random.key(0), jnp.asarray(x, jnp.float32), n_t=32))
    logp = norm.logpdf(x, mean, std).sum(axis=(1, 2))
    gap = logp - elbo
    se = gap.std() / np.sqrt(len(gap))
    print(f"ELBO gap: mean {gap.mean():.3f} ± {se:.3f} nats (D = {s.n_vertices}), "
          f"mean squared error {np.mean(gap**2):.2f}")
    assert gap.mean() > -3 * se                      # a lower bound, up to Monte-Carlo noise
    assert gap.mean() < 0.02 * s.n_vertices          # and tight: < 0.02 nats per dimension here
    # more t draws only reduce the variance
    e1 = np.asarray(prior.elbo(jax.random.key(2), jnp.asarray(x[:50], jnp.float32), n_t=1))
    assert (logp[:50] - e1).std() > (gap[:50]).std()


def test_pf_ode_log_density_of_the_untrained_prior(sphere_stats):
    """The PF-ODE log-density of a DiffusionPrior (reverse-mode divergence: the network's ring
    mean has no forward-mode rule) equals the exact log-density of its per-vertex Gaussian at t0,
    N(α m, α²s² + σ²), with the exact trace; the drift's Jacobian is diagonal here, so the
    Hutchinson estimate with Rademacher probes (εᵢ² = 1) equals the exact trace."""
    s, mean, std = sphere_stats
    prior = untrained(s, mean, std)
    a, sg = float(prior.sde.alpha(prior.sde.t0)), float(prior.sde.sigma(prior.sde.t0))
    rng = np.random.default_rng(2)
    x = mean + std * rng.normal(size=(3, s.n_vertices, 1))
    exact = norm.logpdf(x, a * mean, np.sqrt(a**2 * std**2 + sg**2)).sum(axis=(1, 2))
    ode = np.asarray(prior.log_prob_ode(jnp.asarray(x, jnp.float32), exact_trace=True, steps=50))
    np.testing.assert_allclose(ode, exact, atol=0.05)     # of log p ≈ 45–65 nats; RK4, float32
    hutch = np.asarray(prior.log_prob_ode(jnp.asarray(x, jnp.float32), key=jax.random.key(0),
                                          steps=50))
    np.testing.assert_allclose(hutch, ode, atol=1e-4)


def test_elbo_is_differentiable_in_x(sphere_stats):
    """∇ₓ ELBO flows through the score. For N(m, s²) with the decoder at t0 its expectation is
    −(x − m)/(s² + λ²_{t0}); per-draw noise is large (≈ 0.9 relative at 64 draws, METHOD.md §9),
    so 1024 stratified draws are used and the median over vertices is compared."""
    s, mean, std = sphere_stats
    prior = untrained(s, mean, std)
    x = jnp.asarray(mean, jnp.float32)[None]
    g = jax.grad(lambda z: prior.elbo(jax.random.key(0), z, n_t=1024).sum())(x + 0.05)
    assert g.shape == x.shape
    lam0 = float(prior.sde.noise_ratio(prior.sde.t0))
    want = -0.05 / (std**2 + lam0**2)
    np.testing.assert_allclose(np.median(np.asarray(g[0]) / want), 1.0, atol=0.05)


def test_padding_does_not_change_the_score_on_real_vertices(sphere_stats):
    s, mean, std = sphere_stats
    prior = untrained(s, mean, std)
    # give the network non-zero output weights so the test sees more than the Gaussian part
    leaves, treedef = jax.tree_util.tree_flatten(prior.params)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    prior.params = jax.tree_util.tree_unflatten(
        treedef, [leaf + 0.1 * jax.random.normal(k, leaf.shape) for leaf, k in zip(leaves, keys)])
    p = s.padded(s.n_vertices + 7)
    padded = DiffusionPrior(p, config=TINY, params=prior.params, data_mean=p.pad(mean),
                            data_std=np.pad(std, ((0, 7), (0, 0)), constant_values=1.0))
    x = jax.random.normal(jax.random.key(4), (2, s.n_vertices, 1))
    xp = jnp.concatenate([x, 5.0 * jnp.ones((2, 7, 1))], axis=1)  # garbage on padding
    np.testing.assert_allclose(padded.score(xp, 0.3)[:, : s.n_vertices], prior.score(x, 0.3),
                               rtol=1e-4, atol=1e-4)
    assert jnp.all(padded.score(xp, 0.3)[:, s.n_vertices:] == 0)


def test_bad_input_raises(sphere_stats):
    s, mean, std = sphere_stats
    prior = untrained(s, mean, std)
    x = jnp.zeros((2, s.n_vertices, 1))
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 80, C\)"):
        prior.score(jnp.zeros((2, 81, 1)), 0.5)
    with pytest.raises(ValueError, match="t must be in"):
        prior.score(x, 1.5)
    with pytest.raises(ValueError, match="t must be in"):
        prior.score(x, jnp.array([0.1, -0.2]))
    with pytest.raises(ValueError, match="contains NaN"):
        prior.elbo(jax.random.key(0), x.at[0, 0, 0].set(jnp.nan))
    with pytest.raises(ValueError, match="n_t must be"):
        prior.elbo(jax.random.key(0), x, n_t=0)
    with pytest.raises(ValueError, match="needs key"):
        prior.log_prob(x)
    with pytest.raises(ValueError, match="1 channel"):
        prior.score(jnp.zeros((s.n_vertices, 2)), 0.5)


def _structured_data(g, n, seed=0):
    """Smooth random fields on a grid: a few DCT modes with decaying amplitudes."""
    _, V = g.eigenpairs(10)
    rng = np.random.default_rng(seed)
    coef = rng.normal(size=(n, 10)) * (0.3 / (1 + np.arange(10)))
    return (0.5 + coef @ V.T)[..., None].astype(np.float32)


@pytest.mark.slow
def test_tiny_prior_trains_saves_loads_and_resumes(tmp_path):
    g = Grid(8, 8)
    data = _structured_data(g, 512)
    data, held_out = data[:256], data[256:]
    prior, hist = DiffusionPrior.train(jax.random.key(0), g, data, steps=150, batch_size=32,
                                       config=TINY, learning_rate=3e-3, warmup_steps=10,
                                       progress=False)
    loss = np.asarray(hist["loss"])
    assert loss[-5:].mean() < loss[:5].mean()  # the DSM loss falls (most of it is irreducible)
    # the start is the exact per-vertex Gaussian; training must learn the spatial correlations:
    # on held-out data its Tweedie denoiser at λ = 0.3 beats the per-vertex Gaussian's clearly
    gauss = untrained(g, prior.data_mean, prior.data_std)
    t = float(prior.sde.t_from_noise_ratio(0.3))
    x_t, _ = prior.sde.perturb(jax.random.key(1), jnp.asarray(held_out), jnp.full(len(held_out), t))
    mse_trained = float(jnp.mean((prior.denoise(x_t, t) - held_out) ** 2))
    mse_gauss = float(jnp.mean((gauss.denoise(x_t, t) - held_out) ** 2))
    assert mse_trained < 0.7 * mse_gauss, (mse_trained, mse_gauss)
    samples = prior.sample(jax.random.key(1), 8, steps=50)
    assert samples.shape == (8, 64, 1) and jnp.all(jnp.isfinite(samples))
    # save / load round trip: identical scores
    path = prior.save(tmp_path / "prior.npz")
    again = DiffusionPrior.load(path)  # rebuilds Grid(8, 8) from the file
    assert isinstance(again.manifold, Grid) and again.manifold.layout_shape == (8, 8)
    x = jnp.asarray(data[:4])
    np.testing.assert_array_equal(again.score(x, 0.1), prior.score(x, 0.1))
    np.testing.assert_array_equal(DiffusionPrior.load(path, g).score(x, 0.1), prior.score(x, 0.1))
    with pytest.raises(ValueError, match="vertices"):
        DiffusionPrior.load(path, Grid(4, 4))
    with pytest.raises(FileNotFoundError, match="no saved prior"):
        DiffusionPrior.load(tmp_path / "missing.npz", g)
    # resume: 10 steps + 10 more from the checkpoint == 20 uninterrupted steps
    kw = dict(batch_size=16, config=TINY, warmup_steps=0, progress=False, ema_decay=None)
    ck = tmp_path / "ckpt"
    DiffusionPrior.train(jax.random.key(5), g, data, steps=10, checkpoint_dir=ck, **kw)
    resumed, _ = DiffusionPrior.train(jax.random.key(5), g, data, steps=20, checkpoint_dir=ck, **kw)
    straight, _ = DiffusionPrior.train(jax.random.key(5), g, data, steps=20, **kw)
    for a, b in zip(jax.tree_util.tree_leaves(resumed.params), jax.tree_util.tree_leaves(straight.params)):
        np.testing.assert_array_equal(a, b)


def _dense(index, weight, V):
    A = np.zeros((V, V))
    np.add.at(A, (np.repeat(np.arange(V), index.shape[1]), np.asarray(index).ravel()),
              np.asarray(weight).ravel())
    return A


@pytest.mark.parametrize("name", ["grid", "sphere", "mesh", "padded"])
def test_ring_table_transpose_and_ring_mean_gradient(name, x64):
    """The transposed table (plus the hubs read by > J vertices: lat-lon poles, some mesh
    vertices) is exactly Aᵀ
    of the ring-mean operator A, and ring_mean's custom backward pass equals autodiff of the
    plain gather (a vector-Jacobian product with Aᵀ) on every manifold kind."""
    from geodiff import Mesh
    from geodiff.diffusion.network import _gather_sum, ring_table, ring_mean

    m = {"grid": lambda: Grid(5, 6), "sphere": lambda: Sphere.latlon(6, 8),
         "mesh": lambda: Mesh.bunny(4), "padded": lambda: Grid(3, 4).padded(14)}[name]()
    V = m.n_vertices
    t = ring_table(m.laplacian, np.asarray(m.valid))
    A = _dense(t.index, t.weight, V)
    At = _dense(t.t_index, t.t_weight, V)
    for h, row in enumerate(np.asarray(t.hub)):
        np.add.at(At[row], np.asarray(t.hub_index[h]), np.asarray(t.hub_weight[h]))
    np.testing.assert_allclose(At, A.T, atol=1e-7)
    if name in ("grid", "padded"):
        assert t.hub.shape[0] == 0
    if name == "sphere":
        assert t.hub.shape[0] > 0                       # the poles' rings: the hub path is tested
    h = jax.random.normal(jax.random.key(0), (2, V, 3), jnp.float64)
    g = jax.random.normal(jax.random.key(1), (2, V, 3), jnp.float64)
    np.testing.assert_allclose(ring_mean(h, t), np.einsum("uv,bvw->buw", A, h), atol=1e-6)
    _, vjp = jax.vjp(lambda h: ring_mean(h, t), h)
    np.testing.assert_allclose(vjp(g)[0], np.einsum("uv,buw->bvw", A, g), atol=1e-6)
    loss = lambda f: jax.jit(jax.grad(lambda h: jnp.sum(jnp.sin(f(h)) * h)))  # noqa: E731
    np.testing.assert_allclose(loss(lambda h: ring_mean(ring_mean(h, t), t))(h),
                               loss(lambda h: _gather_sum(_gather_sum(h, t.index, t.weight),
                                                          t.index, t.weight))(h), atol=1e-6)


def _csr_dense(data, indices, indptr, V):
    import scipy.sparse as sp

    return sp.csr_matrix((np.asarray(data), np.asarray(indices), np.asarray(indptr)),
                         shape=(V, V)).toarray()


@pytest.mark.parametrize("name", ["sphere", "mesh", "padded"])
def test_ring_mean_sparse_and_gather_paths_apply_the_same_operator(name, x64):
    """Both ways ring_mean applies the operator A — per-slot gathers (wide activations, small
    batches) and the compressed-sparse-row product (narrow activations with many columns, a
    flow's samples) — equal the dense A h, their backward passes Aᵀ g, also under vmap (whose
    batching folds the draws into the batch, which switches the path) and to second order (a
    Hessian-vector product, the backward pass being differentiable in turn)."""
    from geodiff import Mesh
    from geodiff.diffusion import network
    from geodiff.diffusion.network import ring_mean, ring_table

    m = {"sphere": lambda: Sphere.latlon(6, 8), "mesh": lambda: Mesh.bunny(4),
         "padded": lambda: Grid(3, 4).padded(14)}[name]()
    V = m.n_vertices
    t = ring_table(m.laplacian, np.asarray(m.valid))
    A = _dense(t.index, t.weight, V)
    np.testing.assert_allclose(_csr_dense(t.csr_data, t.csr_indices, t.csr_indptr, V), A, atol=1e-7)
    np.testing.assert_allclose(_csr_dense(t.csr_t_data, t.csr_t_indices, t.csr_t_indptr, V), A.T,
                               atol=1e-7)
    dense = lambda M, h: np.einsum("uv,bvw->buw", M, h)  # noqa: E731
    for shape, sparse in (((1, V, 1), False), ((2, V, 9), False), ((32, V, 1), True),
                          ((8, V, 3), True)):
        assert (shape[2] < network._CSR_MAX_WIDTH
                and shape[0] * shape[2] >= network._CSR_MIN_COLUMNS) == sparse
        text = jax.jit(lambda h: ring_mean(h, t)).lower(jnp.ones(shape)).as_text().lower()
        assert ("csr_sparse_dense" in text) == sparse and ("gather" in text) != sparse, shape
        h = jax.random.normal(jax.random.key(0), shape, jnp.float64)
        g = jax.random.normal(jax.random.key(1), shape, jnp.float64)
        np.testing.assert_allclose(ring_mean(h, t), dense(A, h), atol=1e-12)
        _, vjp = jax.vjp(lambda h: ring_mean(h, t), h)
        np.testing.assert_allclose(vjp(g)[0], dense(A.T, g), atol=1e-12)
        one = lambda x: ring_mean(x[None], t)[0]  # noqa: E731
        np.testing.assert_allclose(jax.jit(jax.vmap(one))(h), dense(A, h), atol=1e-12)
        grad = jax.jit(jax.vmap(jax.grad(lambda x: jnp.sum(jnp.sin(one(x))))))(h)
        np.testing.assert_allclose(grad, dense(A.T, np.cos(dense(A, h))), atol=1e-12)
        f = lambda x: jnp.sum(jnp.sin(ring_mean(x, t)))  # noqa: E731
        hvp = jax.grad(lambda x: jnp.vdot(jax.grad(f)(x), g))(h)
        np.testing.assert_allclose(hvp, dense(A.T, -np.sin(dense(A, h)) * dense(A, g)), atol=1e-12)
    vmapped = jax.jit(jax.vmap(one)).lower(jnp.ones((32, V, 1))).as_text().lower()
    assert "csr_sparse_dense" in vmapped                       # 32 draws of one signal: the sparse product


def test_load_refuses_a_prior_whose_eigenvector_inputs_changed(sphere_stats, tmp_path, monkeypatch):
    """A saved prior records a digest of its network inputs; if the manifold's Laplacian
    features come out otherwise on load (a flipped sign, another basis of a degenerate
    eigenspace), loading fails instead of feeding the network inputs it never saw."""
    s, mean, std = sphere_stats
    path = untrained(s, mean, std).save(tmp_path / "p.npz")
    assert DiffusionPrior.load(path).features.shape == (s.n_vertices, TINY.n_pos + 2)
    orig = Sphere.laplacian_features
    monkeypatch.setattr(Sphere, "laplacian_features", lambda self, k=16: -orig(self, k))
    with pytest.raises(ValueError, match="network inputs rebuilt from .* differ"):
        DiffusionPrior.load(path)
