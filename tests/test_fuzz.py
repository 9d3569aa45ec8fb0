"""Property-based fuzzing (hypothesis) of the public entry points: manifold constructors, each
operator's measure / forward / adjoint, the sampler's sample / log_prob / fit, the metrics and
the readers, fed wrong shapes and dtypes, NaN/inf, empty arrays and mismatched manifolds. Every
input must either work or raise a ValueError / TypeError whose message names the argument;
never a bare JAX or NumPy error, a hang or a crash.

``GEODIFF_FUZZ_REPORT=path.json`` writes how many inputs each entry point was tried with and how
they ended (docs/reliability.md has the table).
"""

import collections
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from geodiff import AmortizedSampler, GaussianPrior, Grid, Mesh, Sphere
from geodiff.metrics import coverage, crps, mse, psnr, ssim
from geodiff.operators import Blur, Denoise, Measurement, RandomMask, SuperResolution

# a complex input silently cast to real would be a wrong answer, not an error
pytestmark = pytest.mark.filterwarnings("error::numpy.exceptions.ComplexWarning")
FUZZ = settings(max_examples=30, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
COUNTS: dict = collections.defaultdict(collections.Counter)


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    path = os.environ.get("GEODIFF_FUZZ_REPORT")
    if path:
        old = json.loads(open(path).read()) if os.path.exists(path) else {}
        old.update({k: dict(v) for k, v in COUNTS.items()})
        with open(path, "w") as f:
            json.dump(old, f, indent=1, sort_keys=True)


def attempt(entry: str, names, fn, *args, **kwargs):
    """Call ``fn``: it works, or raises ValueError/TypeError naming one of ``names``."""
    try:
        out = fn(*args, **kwargs)
    except (ValueError, TypeError) as e:
        msg = str(e)
        assert any(re.search(rf"\b{re.escape(n)}\b", msg) for n in names), \
            f"{entry}: {type(e).__name__} does not name any of {names}: {msg}"
        assert not type(e).__module__.startswith(("jax", "jaxlib")), f"{entry}: {type(e)}: {msg}"
        COUNTS[entry]["clear error"] += 1
        return None
    COUNTS[entry]["worked"] += 1
    return out


# ------------------------------------------------------------------------------- strategies
SPECIAL = st.sampled_from([0.0, 1.0, -1.0, np.nan, np.inf, -np.inf, 1e30])


@st.composite
def arrays(draw, shape=None, *, max_dims=4):
    """Arrays of random shape (sometimes empty) and dtype, sometimes with NaN/inf."""
    if shape is None:
        shape = tuple(draw(st.lists(st.integers(0, 6), min_size=0, max_size=max_dims)))
    dtype = draw(st.sampled_from([np.float32, np.float64, np.int32, np.bool_, np.complex64]))
    a = np.asarray(np.random.default_rng(draw(st.integers(0, 99))).normal(size=shape)).astype(dtype)
    if a.size and draw(st.booleans()) and np.issubdtype(dtype, np.floating):
        a.flat[draw(st.integers(0, a.size - 1))] = draw(SPECIAL)
    return a


def near(shape):
    """Shapes near ``shape``: itself, one entry off, a missing or an extra axis."""
    shape = tuple(shape)
    return st.one_of(
        st.just(shape),
        st.integers(0, len(shape) - 1).flatmap(
            lambda i: st.integers(0, shape[i] + 2).map(lambda n: shape[:i] + (n,) + shape[i + 1:])),
        st.just(shape[1:]), st.just((2,) + shape), st.just(shape + (1,)))


def signal_like(shape):
    return near(shape).flatmap(lambda s: arrays(shape=s))


# ------------------------------------------------------------------------------ manifolds
INTS = st.one_of(st.integers(3, 12), st.integers(-3, 2),
                 st.sampled_from([0.5, 3.0, "4", None, np.int64(5), True]))


@FUZZ
@given(h=INTS, w=INTS, channels=INTS)
def test_grid_constructor(h, w, channels):
    attempt("Grid(height, width, channels=)", ["height", "width", "channels"], Grid, h, w,
            channels=channels)


@FUZZ
@given(nlat=INTS, nlon=INTS, radius=st.one_of(st.floats(0.5, 10), SPECIAL, st.just("1")),
       poles=st.booleans())
def test_sphere_constructors(nlat, nlon, radius, poles):
    attempt("Sphere.latlon(nlat, nlon, poles=, radius=)", ["nlat", "nlon", "radius", "poles"],
            Sphere.latlon, nlat, nlon, poles=poles, radius=radius)
    attempt("Sphere.healpix(nside)", ["nside", "radius"], Sphere.healpix,
            nlat if isinstance(nlat, str) or nlat is None or nlat % 3 else 2 ** (nlat % 4),
            radius=radius)


@FUZZ
@given(vertices=arrays(max_dims=3), faces=arrays(max_dims=3))
def test_mesh_constructor(vertices, faces):
    attempt("Mesh(vertices, faces)", ["vertices", "faces"], Mesh, vertices, faces)


# ------------------------------------------------------------------------------ operators
GRID = Grid(4, 4)
OPS = {"Denoise": Denoise(0.1), "RandomMask": RandomMask(0.5, 0.1), "Blur": Blur(0.2, 0.1),
       "SuperResolution": SuperResolution(2, 0.1)}


@pytest.mark.parametrize("name", sorted(OPS))
@settings(FUZZ, max_examples=20)
@given(x=signal_like((16, 1)), v=signal_like((16, 1)), other=st.booleans())
def test_operators(name, x, v, other):
    op = OPS[name].on(GRID)
    good = op.measure(jax.random.key(0), jnp.zeros((16, 1)))
    v = v if name != "SuperResolution" or v.shape != (16, 1) else v[:4]   # SR×2: 4 entries
    attempt(f"{name}.measure(key, x)", ["x"], op.measure, jax.random.key(1), x)
    attempt(f"{name}.forward(x, measurement)", ["x", "measurement"], op.forward, x, good)
    if other:                                    # a measurement of another manifold's operator
        good = OPS[name].on(Grid(2, 8)).measure(jax.random.key(0), jnp.zeros((16, 1)))
    if hasattr(op, "adjoint"):
        attempt(f"{name}.adjoint(v, measurement)", ["v", "measurement"], op.adjoint, v, good)


@FUZZ
@given(sigma=st.one_of(SPECIAL, st.just("0.1"), st.just(None)),
       ratio=st.one_of(SPECIAL, st.just((0.3, 0.2)), st.just((0.1, 0.5, 0.9))))
def test_operator_constructors(sigma, ratio):
    attempt("Denoise(sigma)", ["sigma"], Denoise, sigma)
    attempt("RandomMask(ratio, sigma)", ["ratio", "sigma"], RandomMask, ratio, 0.1)
    attempt("Blur(width, sigma)", ["width", "sigma", "kernel_width"], Blur, sigma, 0.1)
    attempt("SuperResolution(factor, sigma)", ["factor", "sigma"], SuperResolution, ratio, 0.1)


# ------------------------------------------------------------------------------- sampler
@pytest.fixture(scope="module")
def sampler():
    prior = GaussianPrior.matern(GRID, variance=0.05, length_scale=0.3, mean=0.4, nugget=1e-3)
    s = AmortizedSampler(GRID, prior, RandomMask(0.5, 0.1), prior_term="exact",
                         surrogate=np.asarray(prior.sample(jax.random.key(0), 32)),
                         surrogate_rank=4, n_steps=1, hidden=8, n_eig=8)
    return s, s.operator.measure(jax.random.key(1), prior.sample(jax.random.key(2), 3))


@FUZZ
@given(y=signal_like((16, 1)), mask=signal_like((16, 1)), x=signal_like((16, 1)),
       n=st.one_of(st.integers(-2, 3), st.sampled_from([1.5, "2", None])),
       steps=st.one_of(st.integers(-2, 1), st.sampled_from([0.5, None])),
       batch=st.one_of(st.integers(-1, 2), st.just(2.5)))
def test_sampler_entry_points(sampler, y, mask, x, n, steps, batch):
    s, good = sampler
    meas = Measurement(y=y, mask=mask, params={"ratio": np.float32(0.5)})
    attempt("sampler.sample(key, measurement, n)", ["measurement", "n"], s.sample,
            jax.random.key(0), meas, 1)
    attempt("sampler.sample(key, measurement, n)", ["measurement", "n"], s.sample,
            jax.random.key(0), good[0], n)
    attempt("sampler.log_prob(x, measurement)", ["x", "measurement"], s.log_prob, x, good[0])
    attempt("sampler.log_prob(x, measurement)", ["x", "measurement"], s.log_prob, x, meas)
    if not (isinstance(steps, int) and steps >= 1 and isinstance(batch, int) and batch >= 1):
        attempt("sampler.fit(key, measurements, steps=, batch_size=)",
                ["steps", "batch_size", "measurements"], s.fit, jax.random.key(0), good,
                steps=steps, batch_size=batch, progress=False)


ODD = st.sampled_from([1.5, "2", None, True, np.nan])


@FUZZ
@given(n=st.one_of(st.integers(-1, 4), ODD), chunk=st.one_of(st.integers(-1, 4), ODD),
       start=st.one_of(st.integers(-1, 4), ODD),
       quantiles=st.one_of(st.lists(st.one_of(st.floats(-0.5, 1.5), st.just(np.nan)), max_size=3),
                           st.sampled_from([("a",), 0.5, None])))
@example(n=3, chunk=2, start=1, quantiles=[0.1, 0.9])
@example(n=2, chunk=4, start=0, quantiles=[])
def test_chunked_posterior_entry_points(sampler, n, chunk, start, quantiles):
    s, good = sampler
    out = attempt("sampler.iter_posterior(key, measurements, n, chunk=, quantiles=, start=)",
                  ["n", "chunk", "quantiles", "start"], s.iter_posterior, jax.random.key(0),
                  good, n, chunk=chunk, quantiles=() if quantiles is None else quantiles,
                  start=start)
    if out is not None:                               # valid arguments: the chunks cover start:B
        parts = list(out)
        assert [p.start for p in parts][:1] in ([start], []) and (not parts or parts[-1].stop == 3)
    attempt("sampler.sample(key, measurement, n, chunk=)", ["n", "chunk"], s.sample,
            jax.random.key(0), good, 2, chunk=chunk)


# ------------------------------------------------------------------------------- metrics
@FUZZ
@given(x=signal_like((3, 16, 1)), ref=signal_like((3, 16, 1)), samples=signal_like((5, 3, 16, 1)),
       weights=st.one_of(st.none(), signal_like((16,))), where=st.one_of(st.none(), signal_like((3, 16, 1))))
def test_metrics(x, ref, samples, weights, where):
    names = ["x", "ref", "weights", "where", "samples"]
    attempt("mse(x, ref, weights=, where=)", names, mse, x, ref, weights=weights, where=where)
    attempt("psnr(x, ref, weights=, where=)", names, psnr, x, ref, weights=weights, where=where)
    attempt("ssim(x, ref, manifold)", names + ["manifold"], ssim, x, ref, GRID)
    attempt("coverage(samples, ref, weights=, where=)", names, coverage, samples, ref,
            weights=weights, where=where)
    attempt("crps(samples, ref, weights=, where=)", names, crps, samples, ref, weights=weights,
            where=where)


# ------------------------------------------------------------------------------- readers
@FUZZ
@given(content=st.one_of(st.binary(max_size=300), st.just(b"CDF\x01" + bytes(40)),
                         st.just(b"ply\nformat ascii 1.0\nend_header\n")),
       suffix=st.sampled_from([".nc", ".ply", ".zarr", ".txt", ".obj"]))
def test_read_field_on_junk_files(tmp_path_factory, content, suffix):
    from geodiff.io import read_field

    path = tmp_path_factory.mktemp("junk") / f"field{suffix}"
    path.write_bytes(content)
    attempt("read_field(source)", ["source"], read_field, path)


@FUZZ
@given(dims=st.lists(st.sampled_from(["time", "lat", "lon", "latitude", "x", "member"]),
                     min_size=0, max_size=4, unique=True),
       size=st.integers(0, 5), fill=SPECIAL, var=st.sampled_from([None, "tas", "pr"]))
def test_read_field_on_odd_datasets(dims, size, fill, var):
    import xarray as xr

    from geodiff.io import read_field

    shape = tuple(size + (3 if d in ("lon",) else 0) for d in dims)
    coords = {d: np.linspace(-80, 80, n) if d in ("lat", "latitude") else np.arange(n) * 360.0 / max(n, 1)
              for d, n in zip(dims, shape) if d != "time" and d != "member"}
    ds = xr.Dataset({"tas": (dims, np.full(shape, fill))}, coords=coords)
    attempt("read_field(source, var=)", ["source", "var", "lat", "lon", "latitude"], read_field,
            ds, var=var)
