"""Tests for geodiff.data.era5: PP reader, GloSea4 fields and splits, the ERA5-like generator,
and the GASP / xarray ERA5 loaders (on tiny files the tests write)."""

from __future__ import annotations

import numpy as np
import pytest

from geodiff import Sphere
from geodiff.data import era5
from geodiff.data.era5 import (
    GASP_TMAX,
    GASP_TMIN,
    denormalize,
    era5_like,
    glosea4_fields,
    glosea4_split,
    glosea4_split_info,
    load_era5_xarray,
    load_gasp_era5,
    normalize,
    read_pp,
)


# ------------------------------------------------------------------------------ helpers
def _record(payload: bytes) -> bytes:
    n = np.array([len(payload)], ">i4").tobytes()
    return n + payload + n


def _write_pp(path, fields, *, lbpack=0):
    """Write fields (dicts with stash, year, month, data (rows, cols), bzy, bdy, bzx, bdx) as PP."""
    out = b""
    for f in fields:
        rows, cols = f["data"].shape
        ints = np.zeros(45, ">i4")
        ints[0], ints[1], ints[17], ints[18], ints[20] = f["year"], f["month"], rows, cols, lbpack
        ints[38], ints[41] = 1, f["stash"]
        reals = np.zeros(19, ">f4")
        reals[13:18] = f["bzy"], f["bdy"], f["bzx"], f["bdx"], -1.0e30
        out += _record(ints.tobytes() + reals.tobytes())
        out += _record(np.asarray(f["data"], ">f4").tobytes())
    path.write_bytes(out)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One cache folder for the module, so GloSea4 is regridded once."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def use_cache(cache, monkeypatch):
    monkeypatch.setenv("GEODIFF_CACHE", str(cache))
    return cache


# --------------------------------------------------------------------------- normalisation
def test_normalize_round_trip():
    t = np.array([GASP_TMIN, GASP_TMAX, 190.0, 330.0, 280.0])
    x = normalize(t)
    np.testing.assert_allclose(x[:2], [0.0, 1.0])
    assert x[2] < 0 and x[3] > 1  # slightly outside [0, 1] is fine, never clipped
    np.testing.assert_allclose(denormalize(x), t, rtol=0, atol=1e-10)


# -------------------------------------------------------------------------------- PP reader
def test_read_pp_tiny(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.normal(280, 10, (3, 4)).astype(np.float32)
    b = rng.normal(270, 10, (3, 4)).astype(np.float32)
    b[1, 2] = -1.0e30  # missing
    geo = dict(bzy=-120.0, bdy=60.0, bzx=-90.0, bdx=90.0)
    path = tmp_path / "tiny.pp"
    _write_pp(path, [dict(stash=24, year=2011, month=8, data=a, **geo),
                     dict(stash=16, year=2012, month=1, data=b, **geo)])
    recs = read_pp(path)
    assert len(recs) == 2
    assert (recs[0]["stash"], recs[0]["year"], recs[0]["month"]) == (24, 2011, 8)
    assert (recs[1]["stash"], recs[1]["year"], recs[1]["month"]) == (16, 2012, 1)
    np.testing.assert_array_equal(recs[0]["lat"], [-60.0, 0.0, 60.0])
    np.testing.assert_array_equal(recs[0]["lon"], [0.0, 90.0, 180.0, 270.0])
    assert recs[0]["data"].dtype == np.float64
    np.testing.assert_array_equal(recs[0]["data"], a)
    assert np.isnan(recs[1]["data"][1, 2]) and np.isnan(recs[1]["data"]).sum() == 1


def test_read_pp_errors(tmp_path):
    bad = tmp_path / "garbage.pp"
    bad.write_bytes(b"this is not a PP file at all, just text")
    with pytest.raises(ValueError, match="not a PP file"):
        read_pp(bad)
    header_only = tmp_path / "short.pp"
    header_only.write_bytes(_record(np.zeros(10, ">i4").tobytes()))
    with pytest.raises(ValueError, match="not a PP file"):
        read_pp(header_only)
    packed = tmp_path / "packed.pp"
    _write_pp(packed, [dict(stash=24, year=2011, month=8, data=np.zeros((2, 2)), bzy=0, bdy=1,
                            bzx=0, bdx=1)], lbpack=1)
    with pytest.raises(ValueError, match="LBPACK"):
        read_pp(packed)
    with pytest.raises(FileNotFoundError, match="path"):
        read_pp(tmp_path / "missing.pp")


def test_read_pp_real_file():
    files = era5._glosea4_files()
    assert len(files) == 13
    recs = read_pp(files[0])
    assert len(recs) == 6
    r = recs[0]
    assert r["stash"] == 24 and (r["year"], r["month"]) == (2011, 8)
    assert r["data"].shape == (145, 192)
    np.testing.assert_allclose(r["lat"][[0, -1]], [-90.0, 90.0])
    np.testing.assert_allclose(r["lon"][[0, -1]], [0.0, 358.125])
    assert 180 < np.nanmin(r["data"]) and np.nanmax(r["data"]) < 340  # Kelvin


# --------------------------------------------------------------------------------- GloSea4
def test_glosea4_fields_stats_and_cache(use_cache):
    f = glosea4_fields()
    k = f["kelvin"]
    assert k.shape == (13, 6, 46, 90) and k.dtype == np.float64
    assert abs(k.mean() - 278.6) < 0.1 and abs(k.std() - 21.6) < 0.1
    assert abs(k.min() - 202.5) < 0.2 and abs(k.max() - 315.8) < 0.2
    assert f["members"].tolist() == [0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 12, 13]
    assert [str(m) for m in f["months"]] == ["2011-08", "2011-09", "2011-10", "2011-11", "2011-12",
                                             "2012-01"]
    sphere = Sphere.latlon()
    np.testing.assert_array_equal(f["latitude"], sphere.latitude)
    np.testing.assert_array_equal(f["longitude"], sphere.longitude)
    cached = list((use_cache / "data").glob("glosea4_46x90_*.npz"))
    assert len(cached) == 1
    again = glosea4_fields()  # from the cache
    np.testing.assert_array_equal(again["kelvin"], k)
    # Where target and source grid points coincide, bilinear regridding returns the source value:
    # 90°N (source row 144), and 70°N 60°E (source row 128, column 32).
    src = read_pp(era5._glosea4_files()[0])[0]["data"]
    np.testing.assert_allclose(k[0, 0, 0], src[144, 0])
    np.testing.assert_allclose(k[0, 0, 5, 15], src[128, 32])
    # Between grid points: 356°E lies between the source's 354.375°E and 356.25°E.
    w = (356.0 - 354.375) / 1.875
    np.testing.assert_allclose(k[0, 0, 5, 89], (1 - w) * src[128, 189] + w * src[128, 190])


def test_regrid_periodic_in_longitude():
    # Source: 4 longitudes 0, 90, 180, 270; a target at 315°E interpolates 270°E and 360° = 0°E.
    lat, lon = np.array([-90.0, 0.0, 90.0]), np.array([0.0, 90.0, 180.0, 270.0])
    data = np.tile(np.array([0.0, 1.0, 2.0, 3.0]), (3, 1))
    out = era5._regrid_bilinear(data, lat, lon, Sphere.latlon(3, 8))
    np.testing.assert_allclose(out[1], [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 1.5])


def test_glosea4_missing_package(monkeypatch):
    monkeypatch.setattr(era5, "_find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install iris-sample-data"):
        glosea4_fields()


def test_glosea4_splits(use_cache):
    sizes = {s: glosea4_split(s).shape for s in ("train", "val", "test", "all")}
    assert sizes == {"train": (54, 4140, 1), "val": (6, 4140, 1), "test": (18, 4140, 1),
                     "all": (78, 4140, 1)}
    info = {s: glosea4_split_info(s) for s in ("train", "val", "test")}
    members = {s: {m for m, _ in v} for s, v in info.items()}
    assert members == {"train": {0, 1, 2, 3, 4, 5, 7, 8, 9}, "val": {10}, "test": {11, 12, 13}}
    assert info["val"][0] == (10, "2011-08") and info["test"][-1] == (13, "2012-01")
    x_all, x_test = glosea4_split("all"), glosea4_split("test")
    assert x_all.dtype == np.float32
    np.testing.assert_array_equal(x_all[60:], x_test)  # member-major, month-minor
    with pytest.raises(ValueError, match="split"):
        glosea4_split("validation")


# ------------------------------------------------------------------------------- ERA5-like
def test_era5_like(use_cache):
    x = era5_like(0, 300)
    assert x.shape == (300, 4140, 1) and x.dtype == np.float32
    np.testing.assert_array_equal(x, era5_like(0, 300))  # deterministic
    np.testing.assert_array_equal(era5_like(np.random.default_rng(3), 5),
                                  era5_like(np.random.default_rng(3), 5))
    assert not np.array_equal(x, era5_like(1, 300))
    train = glosea4_split("train")
    assert abs(x.mean() - train.mean()) < 0.005  # 0.6 K
    assert abs(x.std() - train.std()) < 0.005
    assert np.abs(x[0] - x[1]).mean() > 0.01  # samples differ (0.01 ≈ 1.2 K)
    # Anomalies about the seasonal mean have about the size of the real ones (≈ 0.014).
    assert 0.005 < np.std(x - x.mean(0)) < 0.1
    # Small grid, no EOFs, only noise: the noise has the requested RMS std.
    y = era5_like(2, 200, nlat=10, nlon=20, n_eofs=0, eof_scale=0.0, noise_std=0.01)
    z = era5_like(2, 200, nlat=10, nlon=20, n_eofs=0, eof_scale=0.0, noise_std=0.0)
    assert y.shape == (200, 200, 1)
    assert abs(np.std(y - z) - 0.01) < 0.002


def test_era5_like_errors(use_cache):
    with pytest.raises(ValueError, match="seed"):
        era5_like(-1, 3)
    with pytest.raises(ValueError, match="n must"):
        era5_like(0, 2.5)
    with pytest.raises(ValueError, match="n_eofs"):
        era5_like(0, 3, n_eofs=49)
    with pytest.raises(ValueError, match="noise_length"):
        era5_like(0, 3, noise_length=0.0)
    with pytest.raises(ValueError, match="noise_std"):
        era5_like(0, 3, noise_std=-1.0)


# ----------------------------------------------------------------------------- GASP loader
def _gasp_fields(n, seed=0):
    rng = np.random.default_rng(seed)
    return 250.0 + 40.0 * rng.random((n, 46, 90))


def test_load_gasp_era5(tmp_path):
    sphere = Sphere.latlon()
    temps = _gasp_fields(3)
    folder = tmp_path / "era5_temp2m_16x_test"
    folder.mkdir()
    for i, t in enumerate(temps):
        np.savez(folder / f"era5_temp2m_16x_{i}.npz", latitude=sphere.latitude.astype(np.float32),
                 longitude=sphere.longitude.astype(np.float32), temperature=t.astype(np.float32))
    x = load_gasp_era5(folder)
    assert x.shape == (3, 4140, 1) and x.dtype == np.float32
    expected = normalize(temps.astype(np.float32).astype(np.float64)).reshape(3, 4140, 1)
    np.testing.assert_allclose(x, expected, rtol=0, atol=1e-6)
    k = load_gasp_era5(folder, normalized=False)
    np.testing.assert_allclose(k, temps.reshape(3, 4140, 1), rtol=1e-6)
    # Wrong coordinates: the error names the file.
    np.savez(folder / "era5_temp2m_16x_9.npz", latitude=sphere.latitude[::-1],
             longitude=sphere.longitude, temperature=temps[0])
    with pytest.raises(ValueError, match="era5_temp2m_16x_9.npz.*latitude"):
        load_gasp_era5(folder)


def test_load_gasp_era5_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="folder"):
        load_gasp_era5(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no .npz"):
        load_gasp_era5(tmp_path)


# --------------------------------------------------------------------------- xarray loader
def test_load_era5_xarray(tmp_path):
    xr = pytest.importorskip("xarray")
    sphere = Sphere.latlon()
    temps = _gasp_fields(2, seed=1)  # (2, 46, 90) on the GASP grid
    direct = normalize(temps).reshape(2, 4140, 1).astype(np.float32)
    # Same fields with latitude ascending and longitude in [−180, 180), as ERA5 often comes.
    lon = (sphere.longitude + 180.0) % 360.0 - 180.0
    order = np.argsort(lon)
    data = temps[:, ::-1, :][:, :, order]
    ds = xr.Dataset({"t2m": (("time", "lat", "lon"), data, {"units": "K"})},
                    coords={"time": np.arange(2), "lat": sphere.latitude[::-1], "lon": lon[order]})
    path = tmp_path / "era5.nc"
    ds.to_netcdf(path, engine="netcdf4")
    np.testing.assert_array_equal(load_era5_xarray(path), direct)
    np.testing.assert_array_equal(load_era5_xarray(ds, sphere=sphere), direct)
    np.testing.assert_allclose(load_era5_xarray(ds["t2m"].isel(time=0), normalized=False),
                               temps[:1].reshape(1, 4140, 1), rtol=1e-6)
    two = ds.assign(sst=ds["t2m"])
    with pytest.raises(ValueError, match="t2m.*sst|sst.*t2m"):
        load_era5_xarray(two)
    with pytest.raises(ValueError, match="do not match"):
        load_era5_xarray(ds.assign_coords(lat=ds["lat"] + 0.5))
    with pytest.raises(FileNotFoundError, match="source"):
        load_era5_xarray(tmp_path / "missing.nc")
