"""Chunked and sharded posterior sampling over many measurements (geodiff.amortized.batch): the
same draws whatever the chunking or the number of devices, summaries equal to the statistics of
the draws, memory set by the chunk size, clear errors."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from geodiff import AmortizedSampler, GaussianPrior, Grid
from geodiff.operators import Blur, RandomMask

HERE = Path(__file__).parent


def _case(centre: str = "surrogate", op: str = "mask", n_meas: int = 7):
    """A sampler with a random (non-identity) flow, and ``n_meas`` measurements (float64 when
    x64 is on)."""
    grid = Grid(4, 5)
    prior = GaussianPrior.matern(grid, variance=0.05, length_scale=0.3, mean=0.4, nugget=1e-3)
    xs = np.asarray(prior.sample(jax.random.key(3), 200))
    kw = ({"centre": "mixture", "mixture_components": 2, "mixture_rank": 4}
          if centre == "mixture" else {})
    operator = RandomMask(0.5, 0.1) if op == "mask" else Blur(0.1, 0.1)
    s = AmortizedSampler(grid, prior, operator, surrogate=xs, surrogate_rank=8, n_steps=1,
                         hidden=8, n_eig=4, **kw)
    leaves, treedef = jax.tree_util.tree_flatten(s.params)
    rng = np.random.default_rng(0)
    f = jnp.float64 if jax.config.read("jax_enable_x64") else jnp.float32   # all-float64 checks
    s.params = jax.tree_util.tree_unflatten(treedef, [
        jnp.asarray(np.asarray(a) + 0.3 * rng.standard_normal(a.shape) / np.sqrt(max(a.shape[0], 1)),
                    f) for a in leaves])
    cast = lambda t: jax.tree.map(                                      # noqa: E731
        lambda a: jnp.asarray(a, f) if jnp.issubdtype(a.dtype, jnp.floating) else a, t)
    s._consts, s.surrogate, s._shared = cast(s._consts), cast(s.surrogate), cast(s._shared)
    s.mixture, s._mshared = cast(s.mixture), cast(s._mshared)
    x = prior.sample(jax.random.key(1), n_meas)
    return s, s.operator.measure(jax.random.key(2), x)


@pytest.mark.parametrize("centre,op", [("surrogate", "mask"), ("mixture", "mask"),
                                       ("surrogate", "blur")])
def test_chunked_sampling_draws_what_one_call_draws(x64, centre, op):
    """sample(chunk=c) for c ∈ {1, 3} equals sample() (float64: the batched products' summation
    order is all that differs); a lone measurement draws what the first of a batch draws."""
    s, m = _case(centre, op)
    k = jax.random.key(5)
    whole = np.asarray(s.sample(k, m, 16))
    assert whole.shape == (16, 7, 20, 1) and whole.dtype == np.float64
    for chunk in (1, 3):
        np.testing.assert_allclose(np.asarray(s.sample(k, m, 16, chunk=chunk)), whole,
                                   rtol=0, atol=1e-12)
    one = np.asarray(s.sample(k, jax.tree.map(lambda a: a[0], m), 16))
    np.testing.assert_allclose(one, whole[:, 0], rtol=0, atol=1e-12)
    assert np.abs(whole[:, 0] - whole[:, 1]).max() > 1e-3       # measurements draw differently


def test_posterior_summaries_are_the_statistics_of_the_draws(x64):
    """iter_posterior's mean, std (ddof 1), quantiles (numpy's linear rule) and kept samples
    are those of sample()'s draws; start= skips the first measurements; posterior() agrees."""
    s, m = _case()
    k = jax.random.key(5)
    x = np.asarray(s.sample(k, m, 32))
    parts = list(s.iter_posterior(k, m, 32, chunk=2, quantiles=(0.05, 0.5, 0.95),
                                  keep_samples=True, start=3))
    assert [(p.start, p.stop) for p in parts] == [(3, 5), (5, 7)]
    join = lambda name, ax: np.concatenate([getattr(p, name) for p in parts], axis=ax)  # noqa: E731
    tol = {"rtol": 0, "atol": 1e-12}
    np.testing.assert_allclose(join("mean", 0), x[:, 3:].mean(0), **tol)
    np.testing.assert_allclose(join("std", 0), x[:, 3:].std(0, ddof=1), **tol)
    np.testing.assert_allclose(join("quantiles", 1),
                               np.quantile(x[:, 3:], [0.05, 0.5, 0.95], axis=0), **tol)
    np.testing.assert_allclose(join("samples", 1), x[:, 3:], **tol)
    mean, std = s.posterior(k, m, 32, chunk=4)
    np.testing.assert_allclose(mean, x.mean(0), **tol)
    np.testing.assert_allclose(std, x.std(0, ddof=1), **tol)
    assert parts[0].quantiles is not None and s.iter_posterior(k, m, 4).__next__().samples is None


def test_bad_chunking_arguments_get_clear_errors():
    s, m = _case()
    k = jax.random.key(0)
    for kw, match in [({"chunk": 0}, "chunk"), ({"quantiles": (0.5, 1.0)}, "quantiles"),
                      ({"quantiles": ("a",)}, "quantiles"), ({"start": 8}, "start"),
                      ({"start": -1}, "start"), ({"start": 1.5}, "start")]:
        with pytest.raises((ValueError, TypeError), match=match):
            s.iter_posterior(k, m, 8, **kw)               # raised at the call, not at next()
    with pytest.raises(ValueError, match="n"):
        s.iter_posterior(k, m, 1)                         # a std needs two draws
    with pytest.raises(ValueError, match="chunk"):
        s.sample(k, m, 4, chunk=0)


_SHARDED = """
import sys
import jax
import numpy as np
sys.path.insert(0, sys.argv[1])
from test_batch import _case
assert len(jax.devices()) == 3
out = {}
for centre in ("surrogate", "mixture"):
    s, m = _case(centre)
    k = jax.random.key(5)
    out[centre + "/draws"] = np.asarray(s.sample(k, m, 16, chunk=2))   # chunk 2 → 3 (3 devices)
    p = next(s.iter_posterior(k, m, 16, chunk=9, quantiles=(0.1, 0.9)))
    out[centre + "/mean"], out[centre + "/quantiles"] = p.mean, p.quantiles
np.savez(sys.argv[2], **out)
print("SHARDED-OK")
"""


def test_sharded_sampling_draws_what_one_device_draws(x64, tmp_path):
    """Three forced host devices (each chunk split across them with shard_map) draw what one
    device draws for the same key."""
    env = dict(_compiled_like_this_process(), JAX_ENABLE_X64="1",
               XLA_FLAGS="--xla_force_host_platform_device_count=3")
    res = subprocess.run([sys.executable, "-c", _SHARDED, str(HERE), str(tmp_path / "s.npz")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "SHARDED-OK" in res.stdout, res.stderr[-3000:]
    got = np.load(tmp_path / "s.npz")
    for centre in ("surrogate", "mixture"):
        s, m = _case(centre)
        k = jax.random.key(5)
        x = np.asarray(s.sample(k, m, 16))
        np.testing.assert_allclose(got[centre + "/draws"], x, rtol=0, atol=1e-12)
        np.testing.assert_allclose(got[centre + "/mean"], x.mean(0), rtol=0, atol=1e-12)
        np.testing.assert_allclose(got[centre + "/quantiles"], np.quantile(x, [0.1, 0.9], axis=0),
                                   rtol=0, atol=1e-12)


_MEMORY = """
import resource
import sys
import jax
import numpy as np
from geodiff import AmortizedSampler, GaussianPrior, Grid
from geodiff.operators import RandomMask
N, chunk = int(sys.argv[1]), int(sys.argv[2])
grid = Grid(16, 16)
prior = GaussianPrior.matern(grid, variance=0.05, length_scale=0.3, mean=0.4, nugget=1e-3)
s = AmortizedSampler(grid, prior, RandomMask(0.5, 0.1),
                     surrogate=np.asarray(prior.sample(jax.random.key(3), 64)), surrogate_rank=16,
                     n_steps=1, hidden=8, n_eig=4)
m = s.operator.measure(jax.random.key(2), np.full((N, 256, 1), 0.4, np.float32))
mean = np.empty((N, 256, 1), np.float32)
for p in s.iter_posterior(jax.random.key(0), m, 256, chunk=chunk):
    mean[p.start:p.stop] = p.mean
assert np.isfinite(mean).all()
print("PEAK-KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _compiled_like_this_process() -> dict:
    """Environment for a subprocess that compiles as the tests do (tests/conftest.py:
    optimizations off unless GEODIFF_TEST_XLA_OPT=1, the run's shared compilation cache)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               JAX_DISABLE_MOST_OPTIMIZATIONS=str(bool(jax.config.read(
                   "jax_disable_most_optimizations"))).lower())
    if "GEODIFF_TEST_JAX_CACHE" in os.environ:
        env |= {"JAX_COMPILATION_CACHE_DIR": os.environ["GEODIFF_TEST_JAX_CACHE"],
                "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    return env


def test_memory_is_set_by_the_chunk_not_by_the_number_of_measurements():
    """Peak memory (the process's maximum resident set) of 384 measurements × 256 draws in
    chunks of 32 stays within 30 MB of 32 measurements' (all the draws at once: 100 MB more)."""
    def peak(n):                                  # optimized: 3× faster here, the same memory
        res = subprocess.run([sys.executable, "-c", _MEMORY, str(n), "32"], capture_output=True,
                             text=True, timeout=300, env=_compiled_like_this_process() | {
                                 "JAX_DISABLE_MOST_OPTIMIZATIONS": "false"})
        assert res.returncode == 0, res.stderr[-3000:]
        return int(res.stdout.split("PEAK-KB")[1]) * 1024
    small, large = peak(32), peak(384)
    assert large - small < 30e6, (small, large)


@pytest.mark.parametrize("centre", ["surrogate", "mixture"])
def test_draws_sharing_the_base_equal_the_per_draw_path(x64, centre):
    """sample() gives the n draws of a measurement one copy of its base factors (a batched
    product); each draw equals the training path's ``_draw`` (whose log q is the exact
    change of variables) on the same latent and mixture component, with the base copied."""
    from flax import nnx

    s, m = _case(centre, n_meas=3)
    n, key = 4, jax.random.key(5)
    xs = np.asarray(s.sample(key, m, n))                                # (n, B, V, C)
    frozen = s._frozen()
    mj = jax.tree.map(jnp.asarray, m)
    b = s._base(frozen, mj)
    c = s._features(frozen["sur"], mj, b)
    b = s._strip(b)
    flow = nnx.merge(s._graphdef, s.params, frozen["consts"])
    B, (V, C) = 3, frozen["sur"].mean.shape
    for i in range(B):
        k_z, k_k = jax.random.split(jax.random.fold_in(key, i))
        z = frozen["tau"] * jax.random.normal(k_z, (n, V, C))
        comp = (jax.random.categorical(k_k, b["logw"][i], shape=(n,)) if centre == "mixture"
                else None)
        bi = jax.tree.map(lambda a: jnp.broadcast_to(a[i], (n, *a.shape[1:])), b)
        ci = jnp.broadcast_to(c[i], (n, *c.shape[1:]))
        want, _ = s._draw(flow, frozen, bi, ci, z, None, log_q=False, comp=comp)
        np.testing.assert_allclose(xs[:, i], np.asarray(want), rtol=0, atol=1e-10)


def _with_mask(m, mask):
    """m with another mask (y zeroed where it is not observed)."""
    import dataclasses

    return dataclasses.replace(m, mask=mask, y=jnp.where(mask, m.y, 0.0))


def test_measurements_sharing_a_mask_share_one_base_factor(x64):
    """A chunk whose measurements share one mask (a lone measurement, a station network) uses one
    cached covariance factor for all of them instead of a solve each: the same draws as the
    per-measurement solve (float64; checked against a batch whose masks differ), one factor
    kept per mask, at most ``MASK_FACTORS``; the mixture base keeps its own solves."""
    s, m = _case("surrogate", n_meas=3)
    assert not np.array_equal(np.asarray(m.mask[1]), np.asarray(m.mask[0]))
    same = _with_mask(m, jnp.broadcast_to(m.mask[:1], m.mask.shape))
    # measurements 0 and 1 with mask 0, then measurement 2 with its own: per-measurement solves
    mixed = jax.tree.map(lambda a, b: jnp.concatenate([a[:2], b[2:]]), same, m)
    k = jax.random.key(5)
    want = np.asarray(s.sample(k, mixed, 6))
    assert not getattr(s, "_mask_factors", {})                    # masks differ: no factor
    got = np.asarray(s.sample(k, same[:2], 6))
    assert len(s._mask_factors) == 1
    np.testing.assert_allclose(got, want[:, :2], rtol=0, atol=1e-12)
    mean, _ = s.posterior(k, same[:2], 6)
    np.testing.assert_allclose(mean, want[:, :2].mean(0), rtol=0, atol=1e-12)
    assert len(s._mask_factors) == 1                               # the same mask: reused
    for i in range(s.MASK_FACTORS + 2):                            # lone measurements
        mask = jax.random.bernoulli(jax.random.key(i), 0.5, m.mask.shape[1:])
        s.sample(k, _with_mask(m[0], mask), 1)
    assert len(s._mask_factors) == s.MASK_FACTORS
    mix, mm = _case("mixture", n_meas=2)
    mix.sample(k, mm[:1], 2)
    assert not getattr(mix, "_mask_factors", {})


def test_take_pads_slices_and_passes_a_whole_batch_through():
    """batch.take: rows lo:hi padded by repeating row hi − 1; the whole batch is returned as is
    (no copy: a lone measurement's sample() makes no eager device op for it)."""
    from geodiff.amortized import batch as _batch

    tree = {"a": jnp.arange(5.0), "b": jnp.arange(10.0).reshape(5, 2)}
    assert _batch.take(tree, 0, 5, 5) is tree
    head = _batch.take(tree, 0, 2, 2)                       # a first chunk is sliced
    assert head is not tree and head["a"].shape == (2,) and head["b"].shape == (2, 2)
    part = _batch.take(tree, 1, 3, 2)
    np.testing.assert_array_equal(part["a"], [1.0, 2.0])
    np.testing.assert_array_equal(part["b"], [[2.0, 3.0], [4.0, 5.0]])
    padded = _batch.take(tree, 3, 5, 4)
    np.testing.assert_array_equal(padded["a"], [3.0, 4.0, 4.0, 4.0])
