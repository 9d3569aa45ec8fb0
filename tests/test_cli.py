"""The ``geodiff`` command line end to end (``geodiff.cli.main``, in-process, so the four steps
share their compiled programs with the API call that checks them) and its errors, in-process and
through the console script in a subprocess."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pandas as pd
import pytest
import xarray as xr

import geodiff.cli
from geodiff.cli import main, posterior_chunks

NLAT, NLON = 12, 24                                   # a cell-centred 15° grid


def _fields(n, seed):
    """Smooth temperature-like fields in K: a zonal profile plus random l = 1 modes and noise."""
    r = np.random.default_rng(seed)
    lat = np.deg2rad(90 - (np.arange(NLAT) + 0.5) * 180 / NLAT)[:, None]
    lon = np.deg2rad(np.arange(NLON) * 360 / NLON)[None]
    a = r.normal(size=(n, 3, 1, 1))
    l1 = a[:, 0] * np.cos(lon) * np.cos(lat) + a[:, 1] * np.sin(lon) * np.cos(lat) + a[:, 2] * np.sin(lat)
    return 250 + 40 * np.cos(lat) + 5 * l1 + r.normal(0, 0.3, (n, NLAT, NLON))


def _save(values, path, start, *, lat=None):
    lat = 90 - (np.arange(NLAT) + 0.5) * 180 / NLAT if lat is None else lat
    time = pd.date_range(start, periods=len(values), freq="D")
    xr.Dataset({"tas": (("time", "lat", "lon"), values,
                        {"units": "K", "standard_name": "air_temperature"})},
               coords={"time": time, "lat": lat, "lon": np.arange(values.shape[2]) * 360 / values.shape[2]}
               ).to_netcdf(path)
    return path


def _geodiff(*args, cwd):
    """Run the console script, compiling like the tests (tests/conftest.py: optimizations off
    unless GEODIFF_TEST_XLA_OPT=1, the run's shared compilation cache)."""
    exe = Path(sys.executable).with_name("geodiff")
    cmd = [str(exe)] if exe.exists() else [shutil.which("geodiff") or "geodiff"]
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=os.environ["GEODIFF_TEST_JAX_CACHE"],
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
               JAX_DISABLE_MOST_OPTIMIZATIONS=str(bool(jax.config.read(
                   "jax_disable_most_optimizations"))).lower())
    return subprocess.run(cmd + [str(a) for a in args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env=env)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """train-prior → fit (its defaults: the calibrated base, no training; training is
    sampler.fit, tested in tests/test_amortized.py) → impute → plot on a 12×24 netCDF with two
    gappy time steps."""
    d = tmp_path_factory.mktemp("cli")
    _save(_fields(48, 1), d / "train.nc", "2000-01-01")
    gappy = _fields(2, 2)
    gappy[0, 2:7, 3:12] = np.nan                      # a block
    gappy[1, :, 10:14] = np.nan                       # a swath from pole to pole
    _save(gappy, d / "gappy.nc", "2011-08-01")
    steps = [("train-prior", "train.nc", "--out", "prior.npz", "--steps", 10, "--batch", 16,
              "--width", 8, "--blocks", 1, "--n-eig", 8, "--quiet"),
             ("fit", "gappy.nc", "--prior", "prior.npz", "--signals", "train.nc", "--out",
              "sampler.npz", "--rank", 8, "--couplings", 1, "--hidden", 16,
              "--calib-samples", 16, "--quiet"),
             ("impute", "gappy.nc", "--sampler", "sampler.npz", "--out", "post.nc",
              "--samples", 16, "--quantiles", 0.05, 0.95),
             ("plot", "post.nc", "--out", "map.png")]
    for command, *args in steps:          # in-process: the console script is main(argv) plus a
        argv = [command] + [str(d / a) if str(a).endswith((".nc", ".npz", ".png")) else str(a)
                            for a in args]   # wrapper, run as a subprocess below
        assert main(argv) == 0, f"geodiff {command} failed"
    return d, gappy


def test_cli_end_to_end_and_bad_input(run, capsys, tmp_path):
    """The file's mean is the Python API's mean on the same inputs; observed cells stay close to
    the data; time stamps and units survive; plain xarray opens the file; the map is drawn.
    Then bad input: a one-line error, exit code 1, no output file (in-process and through the
    console script). One test, so the module's fixture runs once whichever xdist worker runs it."""
    from geodiff import AmortizedSampler
    from geodiff.io import read_field
    from geodiff.operators import Mask

    d, gappy = run
    sampler = AmortizedSampler.load(d / "sampler.npz")
    info = sampler.prior.data_info
    assert info["units"] == "K" and info["name"] == "tas"
    sphere, x, _ = read_field(d / "gappy.nc")
    meas = Mask(sampler.operator.sigma).on(sphere).observe((x - info["offset"]) / info["scale"])
    (part,) = posterior_chunks(sampler, meas, 16, chunk=16, quantiles=(0.05, 0.95))
    api_mean = info["offset"] + info["scale"] * np.asarray(part.mean, np.float64)
    draws = np.asarray(sampler.sample(jax.random.key(0), meas, 16), np.float64)
    with xr.open_dataset(d / "post.nc") as post:
        mean = sphere.from_layout(post["tas_mean"].values[..., None])
        # the same compiled program as the API's, then the same float64 affine map
        np.testing.assert_array_equal(mean, api_mean)
        # and those are the API's draws (float32 means of 16 draws: rounding only)
        np.testing.assert_allclose(mean, info["offset"] + info["scale"] * draws.mean(0),
                                   rtol=0, atol=1e-5 * info["scale"])
        assert list(post.time.values) == list(pd.date_range("2011-08-01", periods=2, freq="D"))
        assert post["tas_mean"].attrs["units"] == "K"
        assert post["tas_quantile"].sizes["quantile"] == 2
        assert post.attrs["Conventions"] == "CF-1.8"
    observed = ~np.isnan(x)
    sigma_k = sampler.operator.sigma * info["scale"]
    assert np.abs(mean - x)[observed].max() < 3 * sigma_k
    assert (d / "map.png").stat().st_size > 10_000
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
    check_bad_input_one_line_error_no_output(run, capsys, tmp_path / "a")
    check_error_exit_code_in_a_subprocess(run, tmp_path / "b")


def test_impute_resumes_where_a_stopped_run_stopped(run, capsys, monkeypatch, tmp_path):
    """A run stopped after its first chunk leaves that chunk in OUT.parts/; the rerun computes
    only the rest and writes the same file as a run never stopped; a rerun with other options
    is refused (one line, nothing written); a finished run leaves no parts folder."""
    d, _ = run
    args = ["impute", d / "gappy.nc", "--sampler", d / "sampler.npz", "--samples", 8, "--chunk",
            1, "--keep-samples", "--quiet", "--out"]
    assert main([str(a) for a in args + [tmp_path / "whole.nc"]]) == 0
    assert not (tmp_path / "whole.nc.parts").exists()
    real, starts = posterior_chunks, []

    def stopped(*a, start=0, **kw):                 # the first chunk, then the user's Ctrl-C
        it = real(*a, start=start, **kw)
        yield next(it)
        raise KeyboardInterrupt

    monkeypatch.setattr(geodiff.cli, "posterior_chunks", stopped)
    out = tmp_path / "resumed.nc"
    with pytest.raises(KeyboardInterrupt):
        main([str(a) for a in args + [out]])
    assert not out.exists() and len(list((tmp_path / "resumed.nc.parts").glob("*.npz"))) == 1

    def counted(*a, start=0, **kw):
        starts.append(start)
        return real(*a, start=start, **kw)

    monkeypatch.setattr(geodiff.cli, "posterior_chunks", counted)
    other = [str(a) for a in args + [out]]
    other[other.index("--samples") + 1] = "16"
    assert main(other) != 0
    assert "other inputs or options" in capsys.readouterr().err and not out.exists()
    assert main([str(a) for a in args + [out]]) == 0
    assert starts == [1] and not (tmp_path / "resumed.nc.parts").exists()
    with xr.open_dataset(tmp_path / "whole.nc") as a, xr.open_dataset(out) as b:
        assert a.identical(b)
        assert b["tas_samples"].sizes["realization"] == 8


def _fails(capsys, argv, match, out):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert match in err, err
    assert not Path(out).exists()


def check_bad_input_one_line_error_no_output(run, capsys, tmp_path):
    d, _ = run
    out = tmp_path / "post.nc"
    common = ["--sampler", d / "sampler.npz", "--out", out]
    _fails(capsys, ["impute", d / "gappy.nc", "--var", "pr", *common], "var: 'pr' is not in the data", out)
    xr.Dataset({"tas": (("y", "x"), np.zeros((4, 5)))}).to_netcdf(tmp_path / "plane.nc")
    _fails(capsys, ["impute", tmp_path / "plane.nc", *common], "not on a lat-lon grid", out)
    empty = _fields(1, 3)
    empty[:] = np.nan
    _save(empty, tmp_path / "empty.nc", "2012-01-01")
    _fails(capsys, ["impute", tmp_path / "empty.nc", *common], "no observed value", out)
    other = np.full((1, 7, 12), 280.0)
    _save(other, tmp_path / "other.nc", "2012-01-01", lat=np.linspace(90, -90, 7))
    _fails(capsys, ["impute", tmp_path / "other.nc", *common], "the sampler was trained on", out)
    blocked = tmp_path / "file"
    blocked.write_text("")
    _fails(capsys, ["impute", d / "gappy.nc", "--sampler", d / "sampler.npz", "--out",
                    blocked / "post.nc"], "does not exist", blocked / "post.nc")
    _fails(capsys, ["impute", d / "gappy.nc", "--sampler", tmp_path / "none.npz", "--out", out],
           "no such file", out)
    _fails(capsys, ["fit", d / "gappy.nc", "--prior", d / "post.nc", "--out", tmp_path / "s.npz"],
           "not a saved geodiff prior", tmp_path / "s.npz")
    _fails(capsys, ["train-prior", d / "gappy.nc", "--out", tmp_path / "p.npz"],
           "have missing values", tmp_path / "p.npz")


def check_error_exit_code_in_a_subprocess(run, tmp_path):
    """The console script itself: one line on stderr, exit code 1."""
    d, _ = run
    res = _geodiff("impute", "gappy.nc", "--sampler", "sampler.npz", "--var", "pr", "--out",
                   tmp_path / "x.nc", cwd=d)
    assert res.returncode == 1 and res.stderr.strip().count("\n") == 0
    assert res.stderr.startswith("geodiff impute: error: var: 'pr'")
    assert not (tmp_path / "x.nc").exists()

