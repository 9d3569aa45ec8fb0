"""Forward operators: adjointness in the Euclidean inner product, noise model, masks, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from geodiff import Grid, Mesh, Sphere
from geodiff.operators import Blur, Denoise, Measurement, RandomMask, SuperResolution

MANIFOLDS = {
    "grid": lambda: Grid(8, 6, channels=2),
    "latlon": lambda: Sphere.latlon(8, 10),
    "healpix": lambda: Sphere.healpix(2),
    "mesh": lambda: Mesh.bunny(4),
}


def operators_for(m):
    ops = [Denoise(0.1), RandomMask(0.6, 0.05), RandomMask((0.3, 0.6), 0.05), Blur(0.15, 0.02)]
    if isinstance(m, Grid):
        ops.append(SuperResolution(2, 0.1))
    return [op.on(m) for op in ops]


CASES = [(name, i) for name in MANIFOLDS for i in range(5 if name == "grid" else 4)]


@pytest.fixture(params=CASES, ids=[f"{n}-{i}" for n, i in CASES])
def case(request):
    name, i = request.param
    m = MANIFOLDS[name]()
    return m, operators_for(m)[i]


def test_adjoint_matches_forward(case, x64):
    """⟨A x, v⟩ = ⟨x, Aᵀ v⟩ for every linear operator on every manifold (float64)."""
    m, op = case
    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(k1, (3, m.n_vertices, 2), jnp.float64)
    meas = op.measure(k2, x)
    v = jax.random.normal(k3, meas.y.shape, jnp.float64)
    lhs = jnp.sum(op.forward(x, meas) * v)
    rhs = jnp.sum(x * op.adjoint(v, meas))
    np.testing.assert_allclose(float(lhs), float(rhs), rtol=1e-10)


def test_shapes_batching_and_sample_dims(case, key):
    m, op = case
    x = jax.random.uniform(key, (2, 3, m.n_vertices, 2))
    meas = op.measure(key, x)
    vy = meas.y.shape[-2]
    assert meas.y.shape == (2, 3, vy, 2) and meas.mask.shape == (2, 3, vy, 1)
    assert meas.mask.dtype == jnp.bool_ and meas.batch_shape == (2, 3)
    # forward broadcasts over leading sample dims
    assert op.forward(jnp.stack([x] * 4), meas).shape == (4, 2, 3, vy, 2)
    assert op.adjoint(meas.y, meas).shape == x.shape
    # one example of a batch equals the unbatched operator with that example's parameters
    one = meas[1, 2]
    # (float32: batched and unbatched matmuls may sum in another order; a length-n dot product
    # then differs by up to ≈ n·eps·Σ|aᵢxᵢ|, so the bound is set by eps·n, not by a fixed rtol)
    a, b = np.asarray(op.forward(x[1, 2], one)), np.asarray(op.forward(x, meas)[1, 2])
    bound = x.shape[-2] * np.finfo(np.float32).eps * float(np.max(np.abs(x[1, 2])))
    assert np.max(np.abs(a - b)) <= bound, (np.max(np.abs(a - b)), bound)
    # unobserved entries are exactly zero; jit gives the same measurement
    assert jnp.all(jnp.where(meas.mask, 0.0, meas.y) == 0)
    jitted = jax.jit(op.measure)(key, x)
    np.testing.assert_allclose(jitted.y, meas.y, rtol=1e-5, atol=1e-6)


def test_noise_is_gaussian_with_sigma_on_observed_entries(key):
    m = Grid(32, 32)
    x = jnp.full((16, m.n_vertices, 1), 0.5)
    for op in [Denoise(0.1).on(m), RandomMask(0.5, 0.2).on(m)]:
        meas = op.measure(key, x)
        resid = (meas.y - op.forward(x, meas))[meas.mask[..., 0]]
        assert abs(float(resid.mean())) < 4 * op.sigma / np.sqrt(resid.size)
        np.testing.assert_allclose(float(resid.std()), op.sigma, rtol=0.03)


def test_random_mask_ratio_is_exact_and_masks_differ(key):
    m = Sphere.latlon(10, 12)
    op = RandomMask(0.6, 0.0).on(m)
    meas = op.measure(key, jnp.ones((5, m.n_vertices, 3)))
    missing = (~meas.mask[..., 0]).sum(-1)
    assert np.all(missing == round(0.6 * m.n_vertices))
    assert not jnp.all(meas.mask[0] == meas.mask[1])
    # shared by all channels: y is 1 exactly on observed vertices in every channel (σ = 0)
    assert jnp.all(meas.y == meas.mask)
    # same key → same masks; another key → other masks
    again = op.measure(key, jnp.ones((5, m.n_vertices, 3)))
    assert jnp.all(again.mask == meas.mask)


def test_blind_mask_draws_ratio_in_range(key):
    m = Grid(16, 16)
    op = RandomMask((0.3, 0.6), 0.05).on(m)
    meas = op.measure(key, jnp.zeros((64, m.n_vertices, 1)))
    r = np.asarray(meas.params["ratio"])
    assert r.shape == (64,) and r.min() >= 0.3 and r.max() <= 0.6 and r.std() > 0.05
    missing = (~meas.mask[..., 0]).sum(-1)
    np.testing.assert_array_equal(missing, np.round(r * m.n_vertices))


@pytest.mark.parametrize("m", [Grid(16, 12), Sphere.latlon(12, 16), Mesh.bunny(4)],
                         ids=["grid", "sphere", "mesh"])
def test_blur_preserves_constants_and_smooths(m):
    op = Blur(0.1, 0.0).on(m)
    ones = jnp.ones((m.n_vertices, 1))
    meas = op.measure(jax.random.key(0), ones)
    np.testing.assert_allclose(op.forward(ones, meas), ones, rtol=1e-4)
    rough = jax.random.normal(jax.random.key(1), (m.n_vertices, 1))
    assert float(m.norm(op.forward(rough, meas) - rough.mean())) < float(m.norm(rough - rough.mean()))


def test_heat_kernel_blur_damps_each_eigenmode_by_its_heat_factor():
    s = Sphere.latlon(16, 24)
    evals, evecs = s.eigenpairs(9)
    op = Blur(0.3, 0.0).on(s)
    meas = op.measure(jax.random.key(0), jnp.zeros((s.n_vertices, 1)))
    out = op.forward(jnp.asarray(evecs[:, 5:6], jnp.float32), meas)
    np.testing.assert_allclose(out[:, 0], np.exp(-0.045 * evals[5]) * evecs[:, 5], atol=1e-5)


def test_grid_blur_matches_a_gaussian_away_from_borders():
    g = Grid(33, 33)
    op = Blur(2.0 / 33, 0.0).on(g)  # std 2 px
    delta = np.zeros((33, 33, 1))
    delta[16, 16] = 1.0
    x = jnp.asarray(g.from_layout(delta), jnp.float32)
    out = g.to_layout(op.forward(x, op.measure(jax.random.key(0), x)))[..., 0]
    i = np.arange(33) - 16
    w = np.where(np.abs(i) <= 6, np.exp(-0.5 * (i / 2.0) ** 2), 0.0)  # truncated at 3 std
    w /= w.sum()
    np.testing.assert_allclose(out, np.outer(w, w), atol=1e-6)


def test_super_resolution_averages_blocks():
    g = Grid(4, 6)
    op = SuperResolution(2, 0.0).on(g)
    img = np.arange(24, dtype=np.float32).reshape(4, 6, 1)
    x = jnp.asarray(g.from_layout(img))
    y = op.forward(x, op.measure(jax.random.key(0), x))
    expected = img.reshape(2, 2, 3, 2, 1).mean(axis=(1, 3)).reshape(6, 1)
    np.testing.assert_allclose(y, expected)


def test_bad_input_raises_clear_errors(key):
    g = Grid(8, 8)
    for bad in [-0.1, 1.5, (0.6, 0.3), (0.1, 1.2), "half"]:
        with pytest.raises(ValueError, match="ratio must be"):
            RandomMask(bad, 0.1)
    for bad in [-1.0, float("nan"), "0.1"]:
        with pytest.raises(ValueError, match="sigma must be"):
            Denoise(bad)
    with pytest.raises(ValueError, match="width must be"):
        Blur(0.0, 0.1)
    with pytest.raises(ValueError, match="factor must be"):
        SuperResolution(1, 0.1)
    with pytest.raises(ValueError, match="SuperResolution acts on a Grid"):
        SuperResolution(2, 0.1).on(Sphere.latlon(8, 8))
    with pytest.raises(ValueError, match="must divide"):
        SuperResolution(3, 0.1).on(g)
    with pytest.raises(ValueError, match="Blur needs a manifold"):
        Blur(0.1, 0.1).measure(key, jnp.zeros((64, 1)))
    with pytest.raises(ValueError, match="n_modes"):
        Blur(0.01, 0.1, n_modes=32).on(Sphere.latlon(20, 30))
    op = RandomMask(0.5, 0.1).on(g)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 64, C\)"):
        op.measure(key, jnp.zeros((63, 1)))
    with pytest.raises(ValueError, match="x contains NaN"):
        op.measure(key, jnp.full((64, 1), jnp.nan))
    with pytest.raises(ValueError, match="key must be a single PRNG key"):
        op.measure(jnp.zeros(3), jnp.zeros((64, 1)))
    meas = op.measure(key, jnp.zeros((2, 64, 1)))
    wrong_mask = Measurement(y=meas.y, mask=meas.mask[:, :10], params=meas.params)
    with pytest.raises(ValueError, match="measurement.mask must have shape"):
        op.forward(jnp.zeros((2, 64, 1)), wrong_mask)
    with pytest.raises(ValueError, match="to match the measurement's batch shape"):
        op.forward(jnp.zeros((3, 64, 1)), meas)
    with pytest.raises(ValueError, match="measurement.y has 64 entries"):
        SuperResolution(2, 0.1).on(g).forward(jnp.zeros((2, 64, 1)), meas)
    with pytest.raises(TypeError, match="Measurement"):
        op.forward(jnp.zeros((64, 1)), {"y": 0})


# ------------------------------------------------------------------- Mask (data-given gaps)
def _gappy(m, n=2, seed=0):
    """(n, V, 1) float32 fields with NaN on a band of vertices (a different band per field)."""
    x = np.random.default_rng(seed).normal(size=(n, m.n_vertices, 1)).astype(np.float32)
    for i in range(n):
        x[i, 10 * i: 10 * i + m.n_vertices // 3] = np.nan
    return x


def test_mask_observe_reads_the_gaps_from_nan():
    """NaN = missing, values kept as given (no noise, no draw), ratio = fraction missing."""
    from geodiff.operators import Mask

    m = Sphere.latlon(8, 10)
    x = _gappy(m)
    meas = Mask(0.1).on(m).observe(x)
    nan = np.isnan(x)
    np.testing.assert_array_equal(np.asarray(meas.mask), ~nan)
    np.testing.assert_array_equal(np.asarray(meas.y), np.where(nan, 0, x))
    np.testing.assert_allclose(np.asarray(meas.params["ratio"]), nan.mean(axis=(1, 2)), rtol=1e-6)
    assert meas.batch_shape == (2,) and Mask(0.1).observe(x[0]).batch_shape == ()
    # adjointness with a real gap pattern (Aᵀ zero-fills the gaps)
    v = np.random.default_rng(1).normal(size=x.shape)
    z = np.nan_to_num(x)
    np.testing.assert_allclose(float(jnp.sum(Mask(0.1).forward(z, meas) * v)),
                               float(jnp.sum(z * Mask(0.1).adjoint(v, meas))), rtol=1e-5)


def test_mask_measure_adds_noise_on_observed_vertices_only(key):
    from geodiff.operators import Mask

    m = Mesh.bunny(4)
    x = _gappy(m, n=400)
    x[:, :, :] = np.where(np.isnan(x), np.nan, 0.5)
    meas = Mask(0.2).on(m).measure(key, x)
    obs = np.asarray(meas.mask)[..., 0]
    y = np.asarray(meas.y)[..., 0]
    assert np.all(y[~obs] == 0)
    assert abs(np.std(y[obs]) - 0.2) < 0.005 and abs(np.mean(y[obs]) - 0.5) < 0.005


def test_mask_bad_input_names_the_problem():
    from geodiff.operators import Mask

    m = Sphere.latlon(8, 10)
    op = Mask(0.1).on(m)
    x = _gappy(m)
    with pytest.raises(ValueError, match="no observed value"):
        op.observe(np.full((1, m.n_vertices, 1), np.nan, np.float32))
    with pytest.raises(ValueError, match="infinite"):
        op.observe(np.where(np.isnan(x), np.inf, x))
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 80, C\)"):
        op.observe(x[:, :50])
    with pytest.raises(TypeError, match="float array"):
        op.observe(np.zeros((m.n_vertices, 1), int))
    two = np.concatenate([x, x], -1)
    two[0, 70, 1] = np.nan
    with pytest.raises(ValueError, match="some channels but not all"):
        op.observe(two)
    with pytest.raises(ValueError, match="sigma must be"):
        Mask(-1.0)


def test_mask_measurements_go_where_random_mask_ones_go(x64):
    """kriging, dps, mcg and a sampler built with RandomMask take Mask measurements, and give
    what they give for the RandomMask measurement with the same mask and values; a measurement
    built by hand from (y, mask) alone, without params, is accepted too."""
    from geodiff import AmortizedSampler, GaussianPrior
    from geodiff.baselines import dps, kriging, mcg
    from geodiff.operators import Mask

    s = Sphere.latlon(8, 10)
    rng = np.random.default_rng(2)
    U, _ = np.linalg.qr(rng.normal(size=(s.n_vertices, 6)))
    d = np.linspace(0.5, 0.1, 6)
    prior = GaussianPrior(s, 0.0, U, d, 0.05)
    F = U * np.sqrt(d)
    rand = RandomMask(0.4, 0.1).on(s)
    x = _gappy(s).astype(np.float64)
    mask = Mask(0.1).on(s).observe(x)
    same = Measurement(y=mask.y, mask=mask.mask, params={"ratio": mask.params["ratio"]})
    bare = Measurement(y=mask.y, mask=mask.mask)
    kw = dict(mean=0.0, cov_factor=F, nugget=0.05)
    np.testing.assert_array_equal(np.asarray(kriging(Mask(0.1).on(s), mask, **kw)),
                                  np.asarray(kriging(rand, same, **kw)))
    for fn in (dps, mcg):
        a = fn(jax.random.key(0), prior, Mask(0.1).on(s), mask, steps=2, zeta=0.3)
        b = fn(jax.random.key(0), prior, rand, same, steps=2, zeta=0.3)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    sampler = AmortizedSampler(s, prior, rand, n_steps=1, hidden=8, n_eig=8)
    ref = np.asarray(sampler.sample(jax.random.key(3), same, 4))
    for m in (mask, bare):
        np.testing.assert_array_equal(np.asarray(sampler.sample(jax.random.key(3), m, 4)), ref)
    own = AmortizedSampler(s, prior, Mask(0.1), n_steps=1, hidden=8, n_eig=8)
    np.testing.assert_array_equal(np.asarray(own.sample(jax.random.key(3), mask, 4)), ref)
    with pytest.raises(ValueError, match="params has entries"):
        sampler.sample(jax.random.key(3), Measurement(y=mask.y, mask=mask.mask,
                                                      params={"width": mask.params["ratio"]}), 4)
