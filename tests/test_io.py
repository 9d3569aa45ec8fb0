"""geodiff.io: gappy fields in (every lat-lon convention, PLY meshes), posteriors out (CF netCDF,
PLY), atomic writes, clear errors."""

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from geodiff import Mesh, Sphere
from geodiff.io import read_field, write_posterior


def _grid(nlat, nlon, poles):
    s = Sphere.latlon(nlat, nlon, poles=poles)
    return s, s.latitude, s.longitude


def _dataset(lat, lon, values, *, lat_name="lat", lon_name="lon", time=True, order=None):
    dims = ("time", lat_name, lon_name) if time else (lat_name, lon_name)
    coords = {lat_name: lat, lon_name: lon}
    if time:
        coords["time"] = pd.date_range("2011-08-01", periods=values.shape[0], freq="MS")
    data = values if time else values[0]
    da = xr.DataArray(data, dims=dims, coords=coords, name="tas",
                      attrs={"units": "K", "standard_name": "air_temperature"})
    if order is not None:
        da = da.transpose(*order)
    # a bounds variable (no lat *and* lon dims) is not a field: read_field must skip it
    return xr.Dataset({"tas": da, "lat_bnds": ((lat_name, "nb"), np.zeros((len(lat), 2)))})


@pytest.mark.parametrize("poles", [True, False], ids=["poles", "cell-centred"])
@pytest.mark.parametrize("names", [("lat", "lon"), ("latitude", "longitude")])
@pytest.mark.parametrize("lat_order", ["descending", "ascending"])
@pytest.mark.parametrize("lon_range", ["0..360", "-180..180"])
def test_read_field_every_coordinate_convention(tmp_path, poles, names, lat_order, lon_range):
    """Whatever the conventions of the file, the field comes back in the manifold's layout
    (north → south, longitude 0 → 360), NaN where missing, with its time stamps and units."""
    nlat, nlon = (13, 24) if poles else (12, 24)
    sphere, lat, lon = _grid(nlat, nlon, poles)
    truth = np.random.default_rng(0).normal(280, 5, (2, nlat, nlon))
    truth[0, 3:6, 4:9] = np.nan                                  # a gap
    lat_f, vals = (lat, truth) if lat_order == "descending" else (lat[::-1], truth[:, ::-1])
    lon_f = lon if lon_range == "0..360" else np.where(lon >= 180, lon - 360, lon)
    if lon_range != "0..360":                                     # stored sorted from −180
        order = np.argsort(lon_f)
        lon_f, vals = lon_f[order], vals[:, :, order]
    ds = _dataset(lat_f, lon_f, vals, lat_name=names[0], lon_name=names[1],
                  order=("time", names[1], names[0]))             # lon before lat on disk
    path = tmp_path / "in.nc"
    ds.to_netcdf(path)
    m, x, meta = read_field(path)
    assert repr(m) == repr(sphere)
    expect = sphere.from_layout(truth[..., None])
    np.testing.assert_array_equal(np.isnan(x), np.isnan(expect))
    np.testing.assert_array_equal(x[~np.isnan(x)], expect[~np.isnan(expect)])
    assert meta["units"] == "K" and meta["attrs"]["standard_name"] == "air_temperature"
    assert list(meta["time"].values) == list(ds.time.values)
    assert (meta["lat_name"], meta["lon_name"]) == names


def test_float32_coordinates_are_snapped_to_the_grid():
    """netCDF files often store coordinates as float32 (error ~4e-6° at 84.13°N)."""
    s, lat, lon = _grid(46, 90, False)
    v = np.random.default_rng(8).normal(size=(1, 46, 90))
    ds = _dataset(lat.astype(np.float32), lon.astype(np.float32), v)
    m, x, _ = read_field(ds)
    assert repr(m) == repr(s)
    np.testing.assert_array_equal(x, s.from_layout(v[..., None]))


def test_read_field_without_time_and_from_xarray_objects():
    s, lat, lon = _grid(7, 12, True)
    v = np.random.default_rng(1).normal(size=(1, 7, 12))
    ds = _dataset(lat, lon, v, time=False)
    for src in (ds, ds["tas"]):
        m, x, meta = read_field(src)
        assert x.shape == (1, 84, 1) and meta["time"] is None and meta["source"] is None
        np.testing.assert_array_equal(x, s.from_layout(v[..., None]))


def test_an_ensemble_dimension_is_the_field_dimension(tmp_path):
    """Fields along ``member`` (an ensemble, no time stamps) read like time steps, and the
    posterior file keeps that dimension and its values."""
    s, lat, lon = _grid(7, 12, True)
    v = np.random.default_rng(6).normal(280, 5, (3, 7, 12))
    da = xr.DataArray(v, dims=("member", "lat", "lon"), name="tas",
                      coords={"lat": lat, "lon": lon}, attrs={"units": "K"})
    m, x, meta = read_field(da)
    assert x.shape == (3, 84, 1) and meta["time"].name == "member"
    np.testing.assert_array_equal(meta["time"].values, [0, 1, 2])
    samples = np.random.default_rng(7).normal(size=(4, 3, 84, 1))
    out = write_posterior(tmp_path / "p.nc", m, samples, meta=meta, keep_samples=True)
    with xr.open_dataset(out) as post:
        assert post["tas_mean"].dims == ("member", "lat", "lon")
        assert post["tas_samples"].dims == ("realization", "member", "lat", "lon")


def test_read_field_bad_input_names_the_problem(tmp_path):
    s, lat, lon = _grid(7, 12, True)
    v = np.random.default_rng(1).normal(size=(2, 7, 12))
    ds = _dataset(lat, lon, v)
    with pytest.raises(FileNotFoundError, match="no file"):
        read_field(tmp_path / "missing.nc")
    with pytest.raises(ValueError, match="var: 'pr' is not in the data"):
        read_field(ds, var="pr")
    two = ds.assign(pr=ds["tas"] * 0)
    with pytest.raises(ValueError, match="pass var="):
        read_field(two)
    with pytest.raises(ValueError, match="not on a lat-lon grid"):
        read_field(ds["tas"].rename(lat="y"))
    with pytest.raises(ValueError, match=r"dimensions \['level'\]"):
        read_field(ds["tas"].expand_dims(level=[500, 850]))
    with pytest.raises(ValueError, match="not an equiangular"):
        read_field(ds.assign_coords(lat=np.linspace(80, -80, 7)))
    with pytest.raises(ValueError, match="longitudes are not equally spaced"):
        read_field(ds.assign_coords(lon=lon + 3.0))
    gap = v.copy()
    gap[1] = np.nan
    with pytest.raises(ValueError, match=r"no observed value at time step\(s\) \[1\]"):
        read_field(_dataset(lat, lon, gap))
    inf = v.copy()
    inf[0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="infinite"):
        read_field(_dataset(lat, lon, inf))
    (tmp_path / "junk.nc").write_bytes(b"not a netCDF file")
    with pytest.raises(ValueError, match="not a readable netCDF"):
        read_field(tmp_path / "junk.nc")
    with pytest.raises(TypeError, match="source must be"):
        read_field(v)


def test_write_posterior_is_a_cf_file_plain_xarray_opens(tmp_path):
    """Mean, std and quantiles of the samples, with the input's units, standard name and time
    stamps, CF cell_methods and Conventions; the samples themselves on request."""
    s, lat, lon = _grid(7, 12, True)
    v = np.random.default_rng(2).normal(280, 5, (2, 7, 12))
    ds = _dataset(lat, lon, v)
    m, x, meta = read_field(ds)
    samples = np.random.default_rng(3).normal(280, 2, (16, 2, m.n_vertices, 1))
    out = write_posterior(tmp_path / "post.nc", m, samples, meta=meta, quantiles=(0.1, 0.9),
                          keep_samples=True)
    with xr.open_dataset(out) as post:
        assert post.attrs["Conventions"] == "CF-1.8" and "geodiff" in post.attrs["history"]
        assert list(post.time.values) == list(ds.time.values)
        mean = post["tas_mean"]
        assert mean.dims == ("time", "lat", "lon")
        assert mean.attrs["units"] == "K" and mean.attrs["standard_name"] == "air_temperature"
        assert mean.attrs["cell_methods"] == "realization: mean"
        assert post["tas_std"].attrs["cell_methods"] == "realization: standard_deviation"
        np.testing.assert_allclose(m.from_layout(mean.values[..., None]), samples.mean(0))
        np.testing.assert_allclose(m.from_layout(post["tas_std"].values[..., None]),
                                   samples.std(0, ddof=1))
        np.testing.assert_allclose(post["quantile"].values, [0.1, 0.9])
        np.testing.assert_allclose(m.from_layout(post["tas_quantile"].values[..., None]),
                                   np.quantile(samples, [0.1, 0.9], axis=0))
        assert post["tas_samples"].dims == ("realization", "time", "lat", "lon")
        assert post.lat.attrs["units"] == "degrees_north"


def test_write_posterior_bad_input_leaves_nothing(tmp_path, monkeypatch):
    s = Sphere.latlon(7, 12)
    good = np.zeros((4, s.n_vertices, 1))
    with pytest.raises(ValueError, match="samples must have shape"):
        write_posterior(tmp_path / "a.nc", s, good[:1])
    with pytest.raises(ValueError, match="NaN or infinite"):
        write_posterior(tmp_path / "a.nc", s, good + np.nan)
    with pytest.raises(ValueError, match="quantiles must lie in"):
        write_posterior(tmp_path / "a.nc", s, good, quantiles=(0.5, 1.0))
    with pytest.raises(ValueError, match="netCDF"):
        write_posterior(tmp_path / "a.ply", s, good)
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(OSError):                          # unwritable: its folder is a file
        write_posterior(tmp_path / "file" / "post.nc", s, good)
    # a writer killed half-way leaves the previous file as it was and no temporary behind
    (tmp_path / "post.nc").write_bytes(b"previous")

    def crash(self, target, **kw):
        with open(target, "wb") as f:
            f.write(b"half a netCDF")
        raise OSError("disk full")
    monkeypatch.setattr(xr.Dataset, "to_netcdf", crash)
    with pytest.raises(OSError, match="disk full"):
        write_posterior(tmp_path / "post.nc", s, good)
    assert (tmp_path / "post.nc").read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "post.nc"]


def test_mesh_round_trip_ply(tmp_path):
    """PLY with NaN vertices in (vertex order kept), PLY with mean and std properties out."""
    import trimesh

    bunny = Mesh.bunny(4)
    values = np.random.default_rng(4).normal(size=bunny.n_vertices)
    values[:40] = np.nan
    tm = trimesh.Trimesh(bunny.vertices, bunny.faces, process=False)
    tm.vertex_attributes["height"] = values
    path = tmp_path / "bunny.ply"
    path.write_bytes(tm.export(file_type="ply", include_attributes=True))
    m, x, meta = read_field(path)
    assert isinstance(m, Mesh) and m.n_vertices == bunny.n_vertices and meta["name"] == "height"
    np.testing.assert_allclose(m.vertices, bunny.vertices, rtol=1e-6)
    np.testing.assert_array_equal(np.isnan(x[0, :, 0]), np.isnan(values))
    samples = np.random.default_rng(5).normal(size=(8, 1, m.n_vertices, 1))
    out = write_posterior(tmp_path / "post.ply", m, samples)
    back = trimesh.load(out, process=False)
    table = back.metadata["_ply_raw"]["vertex"]["data"]
    np.testing.assert_allclose(table["mean"], samples.mean(0)[0, :, 0])
    np.testing.assert_allclose(table["std"], samples.std(0, ddof=1)[0, :, 0])
    with pytest.raises(ValueError, match="var: 'depth' is not a vertex property"):
        read_field(path, var="depth")
    with pytest.raises(ValueError, match="OBJ"):
        (tmp_path / "b.obj").write_text("v 0 0 0\n")
        read_field(tmp_path / "b.obj")
    (tmp_path / "bad.ply").write_bytes(b"ply\nformat binary_little_endian 1.0\nelement vertex 9\n")
    with pytest.raises(ValueError, match="not a readable PLY"):
        read_field(tmp_path / "bad.ply")
