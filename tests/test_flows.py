"""Every bijection: inverse round trip and log-det equal to log|det jax.jacobian| (x64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from geodiff import Grid, Mesh, Sphere
from geodiff.diffusion.network import ring_table
from geodiff.flows import (ActNorm, AffineCoupling, ConditionalRealNVP, SpectralBasis,
                           SpectralConditioner, vertex_partition)


def perturb(module, scale=0.3, seed=0):
    """Give every parameter a random value, so tests see more than the identity."""
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    rng = np.random.default_rng(seed)   # NumPy: no XLA program to compile per parameter shape
    leaves = [jnp.asarray(np.asarray(leaf) + scale * rng.standard_normal(leaf.shape)
                          / np.sqrt(max(leaf.shape[0], 1)), leaf.dtype) for leaf in leaves]
    return nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, leaves), rest)


def check_bijection(layer, x, condition, valid):
    """Round trip and log-det vs the dense Jacobian of one example."""
    # jitted (one program each) rather than op by op: the same float64 computation, compiled once
    y, ld = jax.jit(lambda v, c: layer.forward(v, c))(x, condition)
    x_back, ld_inv = jax.jit(lambda v, c: layer.inverse(v, c))(y, condition)
    np.testing.assert_allclose(x_back, x, atol=1e-9)
    np.testing.assert_allclose(ld_inv, -ld, atol=1e-9)
    shape = x.shape[1:]
    c0 = None if condition is None else condition[:1]
    f = lambda v: layer.forward(v.reshape(1, *shape), c0)[0].reshape(-1)  # noqa: E731
    jac = jax.jit(jax.jacobian(f))(x[0].reshape(-1))
    sign, logabs = jnp.linalg.slogdet(jac)
    assert sign > 0
    np.testing.assert_allclose(ld[0], logabs, atol=1e-8)
    # padding vertices pass through unchanged
    pad = ~np.asarray(valid, bool)
    np.testing.assert_array_equal(np.asarray(y)[:, pad], np.asarray(x)[:, pad])


MANIFOLDS = {"grid": lambda: Grid(3, 4), "sphere": lambda: Sphere.latlon(5, 4),
             "mesh": lambda: Mesh.bunny(4), "padded": lambda: Grid(3, 4).padded(14)}


CASES = [("grid", "spectral", 0), ("grid", "spectral", 2), ("sphere", "spectral", 2),
         ("mesh", "spectral", 2), ("padded", "spectral", 2), ("grid", "dense", 0),
         ("grid", "dense", 2), ("padded", "dense", 2)]


@pytest.mark.parametrize("name,conditioner,cc", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_flow_is_a_bijection_with_exact_logdet(name, conditioner, cc, x64):
    m = MANIFOLDS[name]()
    flow = perturb(ConditionalRealNVP(m, channels=1, condition_channels=cc, n_steps=2,
                                      conditioner=conditioner, hidden=8, n_eig=6))
    key1, key2 = jax.random.split(jax.random.key(1))
    x = jax.random.normal(key1, (2, m.n_vertices, 1), jnp.float64)
    cond = None if cc == 0 else jax.random.normal(key2, (2, m.n_vertices, cc), jnp.float64)
    if name == "mesh":  # the dense Jacobian is 453×453: check the round trip only
        y, ld = flow.forward(x, cond)
        xb, ldi = flow.inverse(y, cond)
        np.testing.assert_allclose(xb, x, atol=1e-8)
        np.testing.assert_allclose(ldi, -ld, atol=1e-8)
        return
    check_bijection(flow, x, cond, m.valid)


@pytest.mark.parametrize("name", ["grid", "sphere", "padded"])
def test_local_mlp_conditioner_keeps_exact_logdet(name, x64):
    """The per-vertex MLP on 1- and 2-ring means (local_hidden > 0) is still a coupling: bijective,
    log-det equal to the dense Jacobian's; it starts at zero (identity) and reads its neighbours."""
    m = MANIFOLDS[name]()
    fresh = ConditionalRealNVP(m, condition_channels=2, n_steps=2, hidden=8, n_eig=6, local_hidden=4)
    x = jax.random.normal(jax.random.key(1), (2, m.n_vertices, 1), jnp.float64)
    cond = jax.random.normal(jax.random.key(2), (2, m.n_vertices, 2), jnp.float64)
    np.testing.assert_array_equal(fresh.forward(x, cond)[0], x)
    flow = perturb(fresh)
    check_bijection(flow, x, cond, m.valid)
    with pytest.raises(ValueError, match="local_hidden"):
        ConditionalRealNVP(m, local_hidden=-1)


def test_local_mlp_reaches_exactly_two_rings():
    """With the global and linear parts zeroed, a bump of the input at one vertex moves the
    conditioner's output at that vertex and within two rings of it, and nowhere else."""
    import scipy.sparse.csgraph as csgraph

    g = Grid(6, 6)
    _, evecs = g.eigenpairs(5)
    ring = ring_table(g.laplacian, g.valid)
    index, weight = np.asarray(ring.index), np.asarray(ring.weight)
    cond = perturb(SpectralConditioner(evecs, g.mass, 1, 1, hidden=8, rngs=nnx.Rngs(0),
                                       ring=ring, local_hidden=6))
    for layer in (cond.g3, cond.local):
        layer.kernel[...] = jnp.zeros_like(layer.kernel[...])
        layer.bias[...] = jnp.zeros_like(layer.bias[...])
    u = jax.random.normal(jax.random.key(0), (1, 36, 2))
    v = 14
    moved = np.abs(np.asarray(cond(u.at[0, v].add(1.0)) - cond(u)))[0].max(axis=1)
    adjacency = np.zeros((36, 36))
    for i in range(36):
        adjacency[i, index[i][weight[i] > 0]] = 1
    hops = csgraph.shortest_path(adjacency, unweighted=True)[:, v]   # j → v: j reads v within 2 hops
    assert np.all(moved[hops > 2] == 0)
    assert np.all(moved[hops <= 2] > 0)
    with pytest.raises(ValueError, match="neighbour table"):
        SpectralConditioner(evecs, g.mass, 1, 1, hidden=8, rngs=nnx.Rngs(0), local_hidden=6)


def test_channels_after_global_channels_are_read_at_their_vertex_only():
    """Channels past ``global_channels`` (the encoder's features) skip the global part and the
    ring means: a bump of one at a vertex moves the conditioner's output at that vertex only,
    while a bump of a leading channel moves it at the 2-ring too."""
    g = Grid(6, 6)
    _, evecs = g.eigenpairs(5)
    cond = perturb(SpectralConditioner(evecs, g.mass, 1, 3, hidden=8, rngs=nnx.Rngs(0),
                                       ring=ring_table(g.laplacian, g.valid), local_hidden=6,
                                       global_channels=2))
    assert cond.l1.kernel.shape == (2 * 2 + 4, 6)
    u = jax.random.normal(jax.random.key(0), (1, 36, 4))
    v = 14
    for ch, n_moved in ((3, 1), (1, None)):
        moved = np.abs(np.asarray(cond(u.at[0, v, ch].add(1.0)) - cond(u)))[0].max(axis=1) > 0
        if n_moved is None:
            assert moved.sum() > 5          # the global part and the 2 rings
        else:
            assert np.flatnonzero(moved).tolist() == [v]


@pytest.mark.parametrize("name", ["grid", "sphere", "padded"])
def test_condition_encoder_keeps_exact_logdet(name, x64):
    """A flow whose couplings also see the ConditionEncoder's features of the condition: still the
    identity at creation, bijective with log-det equal to the dense Jacobian's, and the encoded
    path (encode once, ``encoded=True``) gives the same map as encoding inside the call."""
    m = MANIFOLDS[name]()
    fresh = ConditionalRealNVP(m, condition_channels=2, n_steps=2, hidden=8, n_eig=6,
                               local_hidden=4, encoder_width=5, encoder_blocks=2)
    x = jax.random.normal(jax.random.key(1), (2, m.n_vertices, 1), jnp.float64)
    cond = jax.random.normal(jax.random.key(2), (2, m.n_vertices, 2), jnp.float64)
    np.testing.assert_array_equal(fresh.forward(x, cond)[0], x)
    flow = perturb(fresh)
    check_bijection(flow, x, cond, m.valid)
    enc = flow.encode(cond)
    assert enc.shape == (2, m.n_vertices, 2 + 5)
    y, ld = flow.forward(x, cond)
    y2, ld2 = flow.forward(x, enc, encoded=True)
    np.testing.assert_allclose(y2, y, atol=1e-12)
    np.testing.assert_allclose(ld2, ld, atol=1e-12)
    np.testing.assert_allclose(flow.log_prob(y, enc, encoded=True), flow.log_prob(y, cond), atol=1e-10)
    assert np.all(np.asarray(enc)[:, ~np.asarray(m.valid, bool), 2:] == 0)   # nothing on padding


def test_condition_encoder_sees_the_whole_manifold():
    """Unlike the 2-ring MLP, the encoder's features at a vertex depend on the condition far away
    (its spectral diffusion is global): a bump of c at one corner of a 8×8 grid moves e(c) at the
    opposite corner (graph distance 14)."""
    g = Grid(8, 8)
    flow = perturb(ConditionalRealNVP(g, condition_channels=1, n_steps=1, hidden=8, n_eig=16,
                                      encoder_width=4, encoder_blocks=1))
    c = jax.random.normal(jax.random.key(0), (1, 64, 1))
    moved = np.abs(np.asarray(flow.encoder(c.at[0, 0].add(1.0)) - flow.encoder(c)))[0].max(axis=1)
    assert moved[63] > 1e-6


def test_condition_encoder_bad_input():
    g = Grid(3, 4)
    with pytest.raises(ValueError, match="encoder_width must be an integer"):
        ConditionalRealNVP(g, condition_channels=1, encoder_width=-1)
    with pytest.raises(ValueError, match="encoder_width > 0 needs a conditional flow"):
        ConditionalRealNVP(g, encoder_width=4)
    with pytest.raises(ValueError, match="conditioner='spectral'"):
        ConditionalRealNVP(g, condition_channels=1, conditioner="dense", encoder_width=4)
    flow = ConditionalRealNVP(g, condition_channels=2, n_steps=1, hidden=4, n_eig=4, encoder_width=3)
    with pytest.raises(ValueError, match="encoded condition must have .* 5 channels"):
        flow.forward(jnp.zeros((2, 12, 1)), jnp.zeros((2, 12, 2)), encoded=True)


@pytest.mark.parametrize("kw", [{}, {"local_hidden": 4},
                                {"local_hidden": 4, "encoder_width": 4, "encoder_blocks": 1},
                                {"conditioner": "dense"}, {"local_hidden": 4, "input_bound": 1.5}],
                         ids=["spectral", "ring", "encoder", "dense", "bounded"])
def test_prepared_condition_is_the_same_flow(kw, x64):
    """forward/inverse with prepare(c) (the condition's share once per condition, n draws of
    each) equal forward/inverse with c repeated per draw; a wrong row count is refused."""
    flow = perturb(ConditionalRealNVP(Grid(4, 5), channels=1, condition_channels=4, n_steps=2,
                                      hidden=8, n_eig=4, **kw))
    rng = np.random.default_rng(1)
    c = jnp.asarray(rng.normal(size=(3, 20, 4)))
    z = jnp.asarray(rng.normal(size=(6, 20, 1)))          # 2 draws of each of 3 conditions
    c_rep = jnp.concatenate([c, c])                       # row s·B + b ↦ condition b
    prepared = flow.prepare(c)
    x, ld = flow.forward(z, c_rep)
    x_p, ld_p = flow.forward(z, prepared=prepared)
    np.testing.assert_allclose(x_p, x, rtol=0, atol=1e-12)
    np.testing.assert_allclose(ld_p, ld, rtol=0, atol=1e-12)
    z_p, ldi_p = flow.inverse(x, prepared=prepared)
    np.testing.assert_allclose(z_p, z, rtol=0, atol=1e-9)
    np.testing.assert_allclose(ldi_p, -ld, rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="n·B rows"):
        flow.forward(z[:5], prepared=prepared)
    with pytest.raises(ValueError, match="prepare"):
        flow.forward(z, prepared=prepared[:-1])


def test_couplings_share_one_copy_of_the_spectral_tables():
    """Every coupling of a flow reads one SpectralBasis: its state holds Φ, Φᵀ M and the ring
    table once, whatever the number of couplings (a copy per coupling made one sphere draw read
    16 × 2.1 MB of tables), and a split/merge round trip keeps the sharing."""
    g = Grid(6, 6)
    for n_steps in (1, 3):
        flow = ConditionalRealNVP(g, condition_channels=2, n_steps=n_steps, hidden=8, n_eig=5,
                                  local_hidden=4)
        gd, params, rest = nnx.split(flow, nnx.Param, ...)
        tables = [leaf for leaf in jax.tree.leaves(rest) if leaf.shape in ((36, 5), (5, 36))]
        assert len(tables) == 2
        ring = ring_table(g.laplacian, g.valid)
        n_ring = len(jax.tree.leaves(ring))
        ring_shapes = {np.shape(a) for a in jax.tree.leaves(ring)}
        assert n_ring and len([leaf for leaf in jax.tree.leaves(rest)
                               if leaf.shape in ring_shapes]) == n_ring
        merged = nnx.merge(gd, params, rest)
        conds = [layer.conditioner for layer in merged.layers if isinstance(layer, AffineCoupling)]
        assert len(conds) == 2 * n_steps and all(c.basis is conds[0].basis for c in conds)
    _, evecs = g.eigenpairs(5)
    basis = SpectralBasis(evecs, g.mass)
    with pytest.raises(ValueError, match="mass=None and ring=None"):
        SpectralConditioner(basis, g.mass, 1, 1, hidden=8, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="evecs must be"):
        SpectralBasis(evecs, g.mass[:-1])


def test_each_layer_alone(x64):
    g = Grid(3, 4)
    valid = g.valid
    act = perturb(ActNorm(12, 2, valid))
    x = jax.random.normal(jax.random.key(0), (3, 12, 2), jnp.float64)
    check_bijection(act, x, None, valid)
    ev, V = g.eigenpairs(5)
    cond = SpectralConditioner(V, g.mass, 2, 1, hidden=8, rngs=nnx.Rngs(0))
    coup = perturb(AffineCoupling(cond, vertex_partition(g), valid))
    check_bijection(coup, x, jax.random.normal(jax.random.key(1), (3, 12, 1), jnp.float64), valid)


def test_untrained_flow_is_the_identity():
    m = Sphere.latlon(5, 4)
    flow = ConditionalRealNVP(m, condition_channels=2, n_steps=3, hidden=8, n_eig=6)
    z = jax.random.normal(jax.random.key(0), (4, m.n_vertices, 1))
    c = jax.random.normal(jax.random.key(1), (4, m.n_vertices, 2))
    x, ld = flow.forward(z, c)
    np.testing.assert_array_equal(x, z)
    np.testing.assert_array_equal(ld, 0.0)


def test_log_prob_is_the_change_of_variables_and_samples_are_finite():
    m = Grid(3, 4).padded(14)
    flow = perturb(ConditionalRealNVP(m, condition_channels=1, n_steps=2, hidden=8, n_eig=6))
    c = jax.random.normal(jax.random.key(1), (2, 14, 1))
    x = flow.sample(jax.random.key(2), c, n=5)
    assert x.shape == (5, 2, 14, 1) and jnp.all(jnp.isfinite(x))
    assert jnp.all(x[..., 12:, :] == 0)  # padding stays zero
    z = jax.random.normal(jax.random.key(3), (2, 14, 1)) * jnp.asarray(m.valid, jnp.float32)[:, None]
    x, ld = flow.forward(z, c)
    want = jax.scipy.stats.norm.logpdf(z[:, :12]).sum(axis=(1, 2)) - ld
    np.testing.assert_allclose(flow.log_prob(x, c), want, rtol=1e-5)


def test_actnorm_data_dependent_init():
    act = ActNorm(6, 1, np.ones(6, bool))
    x = 3.0 + 2.0 * jax.random.normal(jax.random.key(0), (500, 6, 1))
    act.initialize(x)
    y, _ = act.forward(x)
    np.testing.assert_allclose(y.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(y.std(0), 1.0, atol=1e-4)


def test_partition_interleaves():
    g = Grid(4, 4)
    p = vertex_partition(g).reshape(4, 4)
    assert p.sum() == 8 and np.all(p[:, 1:] != p[:, :-1])
    b = Mesh.bunny(4)
    part = vertex_partition(b)
    L = b.laplacian.tocoo()
    off = L.row != L.col
    different = np.mean(part[L.row[off]] != part[L.col[off]])
    assert 0.4 < part.mean() < 0.6 and different > 0.6  # most edges cross the partition


def test_bad_input():
    g = Grid(3, 4)
    flow = ConditionalRealNVP(g, condition_channels=2, n_steps=1, hidden=4, n_eig=4)
    with pytest.raises(ValueError, match=r"z must have shape \(B, 12, 1\)"):
        flow.forward(jnp.zeros((2, 11, 1)), jnp.zeros((2, 11, 2)))
    with pytest.raises(ValueError, match="condition must have shape"):
        flow.forward(jnp.zeros((2, 12, 1)))
    with pytest.raises(ValueError, match="unconditional"):
        ConditionalRealNVP(g, n_steps=1, hidden=4, n_eig=4).forward(jnp.zeros((2, 12, 1)), jnp.zeros((2, 12, 2)))
    with pytest.raises(ValueError, match="conditioner must be"):
        ConditionalRealNVP(g, conditioner="conv")
    with pytest.raises(ValueError, match="n must be"):
        flow.sample(jax.random.key(0), jnp.zeros((1, 12, 2)), n=0)


@pytest.mark.parametrize("conditioner", ["spectral", "dense"])
def test_input_bound_keeps_the_exact_logdet_and_saturates(conditioner, x64):
    """input_bound = b: the conditioners see b·tanh(v/b) of x_a and of the condition. The flow
    stays a bijection with the dense Jacobian's log-det, starts as the identity, and a condition
    (or an untransformed half) far out of range gives what a farther one gives: nothing the
    conditioners see exceeds b, so they cannot extrapolate."""
    g = Grid(3, 4)
    fresh = ConditionalRealNVP(g, condition_channels=2, n_steps=2, hidden=8, n_eig=6,
                               conditioner=conditioner, input_bound=1.5)
    x = jax.random.normal(jax.random.key(1), (2, 12, 1), jnp.float64)
    cond = jax.random.normal(jax.random.key(2), (2, 12, 2), jnp.float64)
    np.testing.assert_array_equal(fresh.forward(x, cond)[0], x)
    flow = perturb(fresh)
    check_bijection(flow, x, cond, g.valid)
    sign = jnp.sign(cond)
    far, farther = flow.forward(x, 1e3 * sign), flow.forward(x, 1e5 * sign)
    np.testing.assert_allclose(far[0], farther[0], rtol=0, atol=1e-12)
    np.testing.assert_allclose(far[1], farther[1], rtol=0, atol=1e-12)
    unbounded = nnx.merge(*nnx.split(perturb(ConditionalRealNVP(
        g, condition_channels=2, n_steps=2, hidden=8, n_eig=6, conditioner=conditioner))))
    assert float(jnp.max(jnp.abs(unbounded.forward(x, 1e3 * sign)[0]
                                 - unbounded.forward(x, 1e5 * sign)[0]))) > 1.0
    coup = next(layer for layer in flow.layers if isinstance(layer, AffineCoupling))
    s1, t1 = coup._st(1e3 * x, cond)
    s2, t2 = coup._st(1e5 * x, cond)
    np.testing.assert_allclose(s1, s2, rtol=0, atol=1e-12)
    np.testing.assert_allclose(t1, t2, rtol=0, atol=1e-12)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), True, "2"])
def test_input_bound_must_be_a_positive_number(bad):
    with pytest.raises(ValueError, match="input_bound must be None or a finite number > 0"):
        ConditionalRealNVP(Grid(3, 4), condition_channels=1, n_steps=1, hidden=4, n_eig=4,
                           input_bound=bad)
