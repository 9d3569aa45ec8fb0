"""Manifolds are checked against geometry: areas, orthonormality, known spectra, layouts."""

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse.linalg as spla
import trimesh

import geodiff.manifolds.eigen as eigen
from geodiff import Grid, Mesh, Sphere
from geodiff.manifolds import PaddedManifold, clean_mesh


def icosphere(subdivisions=2):
    m = trimesh.creation.icosphere(subdivisions=subdivisions)
    return Mesh(m.vertices, m.faces)


MANIFOLDS = {
    "grid": lambda: Grid(6, 7, channels=2),
    "latlon": lambda: Sphere.latlon(10, 12),
    "latlon-cells": lambda: Sphere.latlon(8, 12, poles=False),
    "healpix": lambda: Sphere.healpix(2),
    "mesh": lambda: Mesh.bunny(4),
}


@pytest.fixture(params=list(MANIFOLDS))
def manifold(request):
    return MANIFOLDS[request.param]()


def _orthonormality_error(m, evecs):
    gram = evecs.T @ (m.mass[:, None] * evecs)
    return np.abs(gram - np.eye(evecs.shape[1])).max()


# ----------------------------------------------------------------------------- all manifolds
def test_eigenvectors_are_mass_orthonormal_and_solve_the_eigenproblem(manifold):
    evals, evecs = manifold.eigenpairs(8)
    assert evals.shape == (8,) and evecs.shape == (manifold.n_vertices, 8)
    assert np.all(np.diff(evals) >= -1e-12) and abs(evals[0]) < 1e-8
    assert _orthonormality_error(manifold, evecs) < 1e-8
    # L φ = λ M φ in the layout (copies of a pole share its mass, so this holds there too)
    resid = manifold.laplacian @ evecs - manifold.mass[:, None] * evecs * evals
    assert np.abs(resid).max() < 1e-6 * max(1.0, evals.max())


def test_laplacian_is_symmetric_and_kills_constants(manifold):
    L = manifold.laplacian
    assert abs(L - L.T).max() < 1e-10
    assert np.abs(L @ np.ones(manifold.n_vertices)).max() < 1e-8


def test_layout_round_trip(manifold):
    x = np.random.default_rng(0).normal(size=(3, manifold.n_vertices, 2))
    a = manifold.to_layout(x)
    assert a.shape == (3, *manifold.layout_shape, 2)
    np.testing.assert_array_equal(manifold.from_layout(a), x)
    with pytest.raises(ValueError, match="x must have shape"):
        manifold.to_layout(x[:, :-1])
    with pytest.raises(ValueError, match="a must have shape"):
        manifold.from_layout(x[:, 1:])


def test_inner_is_mass_weighted(manifold):
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(2, manifold.n_vertices, 2))
    expected = np.sum(manifold.mass[:, None] * a * b)
    np.testing.assert_allclose(float(manifold.inner(a, b)), expected, rtol=1e-5)
    np.testing.assert_allclose(float(manifold.norm(np.ones((manifold.n_vertices, 1)))),
                               math.sqrt(manifold.area), rtol=1e-5)


def test_check_signal_names_the_argument(manifold):
    good = np.zeros((manifold.n_vertices, 2 if isinstance(manifold, Grid) else 1))
    assert manifold.check_signal(good, "x") is good
    with pytest.raises(ValueError, match="signal must have shape"):
        manifold.check_signal(np.zeros((manifold.n_vertices + 1, 1)), "signal")
    bad = good.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="x contains NaN"):
        manifold.check_signal(bad, "x")


def test_padding_leaves_real_vertices_unchanged(manifold):
    size = manifold.n_vertices + 5
    p = manifold.padded(size)
    assert isinstance(p, PaddedManifold) and p.n_vertices == size
    assert np.all(p.mass[-5:] == 0) and p.valid.sum() == manifold.n_vertices
    np.testing.assert_allclose(p.area, manifold.area)
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(2, manifold.n_vertices, 2))
    pa, pb = p.pad(a), p.pad(b)
    pa_noisy = np.asarray(pa).copy()
    pa_noisy[-5:] = 1e3  # garbage on padding must not leak into inner products
    np.testing.assert_allclose(float(p.inner(pa_noisy, pb)), float(manifold.inner(a, b)), rtol=1e-5)
    ev, V = manifold.eigenpairs(4)
    pev, pV = p.eigenpairs(4)
    np.testing.assert_array_equal(pev, ev)
    np.testing.assert_array_equal(pV[: manifold.n_vertices], V)
    assert np.all(pV[manifold.n_vertices:] == 0)
    assert _orthonormality_error(p, pV) < 1e-8
    np.testing.assert_array_equal(p.laplacian_features(3)[: manifold.n_vertices],
                                  manifold.laplacian_features(3))
    np.testing.assert_array_equal(p.to_layout(pa), manifold.to_layout(a))
    np.testing.assert_array_equal(p.from_layout(manifold.to_layout(a)), pa)
    assert p.laplacian.shape == (size, size)
    with pytest.raises(ValueError, match="size must be"):
        manifold.padded(manifold.n_vertices - 1)


def test_laplacian_features_are_normalized(manifold):
    f = manifold.laplacian_features(4)
    assert f.shape == (manifold.n_vertices, 4)
    mean_square = (manifold.mass @ f**2) / manifold.area
    np.testing.assert_allclose(mean_square, 1.0, rtol=1e-8)


def test_geometry_pytree_is_jittable(manifold):
    geo = manifold.geometry(5)
    assert geo.evecs.shape == (manifold.n_vertices, 5) and geo.mass.dtype == jnp.float32
    total = jax.jit(lambda g: jnp.sum(g.mass * g.valid))(geo)
    np.testing.assert_allclose(float(total), manifold.area, rtol=1e-5)


def test_eigenpairs_bad_k(manifold):
    with pytest.raises(ValueError, match="k must be an integer"):
        manifold.eigenpairs(0)
    with pytest.raises(ValueError, match="k must be an integer"):
        manifold.eigenpairs(manifold.max_eigenpairs + 1)


# ------------------------------------------------------------------------------------ Grid
def test_grid_layout_and_mass():
    g = Grid(4, 5)
    assert g.n_vertices == 20 and g.layout_shape == (4, 5)
    np.testing.assert_allclose(g.mass.sum(), 1.0)
    # vertex v = i*W + j: row 0 is the top of the image (largest y)
    np.testing.assert_allclose(g.points[0], [0.1, 0.875, 0.0])
    np.testing.assert_allclose(g.points[6], [0.3, 0.625, 0.0])
    with pytest.raises(ValueError, match="height must be a positive integer"):
        Grid(0, 3)
    with pytest.raises(ValueError, match="1 channel"):
        g.check_signal(np.zeros((20, 3)))


def test_grid_eigenvalues_approach_the_continuum():
    g = Grid(64, 48)
    evals, _ = g.eigenpairs(4)
    # Neumann unit square: 0, π², π², 2π² (p, q ∈ {0, 1}) up to O(h²)
    np.testing.assert_allclose(evals[1:], np.pi**2 * np.array([1, 1, 2]), rtol=2e-3)


# ---------------------------------------------------------------------------------- Sphere
def test_latlon_gasp_layout():
    s = Sphere.latlon()
    assert s.n_vertices == 4140 and s.layout_shape == (46, 90)
    assert s.max_eigenpairs == 3962
    np.testing.assert_allclose(s.latitude[[0, 1, -1]], [90, 86, -90])
    np.testing.assert_allclose(s.longitude[[0, 1, -1]], [0, 4, 356])
    np.testing.assert_allclose(s.mass.sum(), 4 * np.pi, rtol=1e-12)
    np.testing.assert_allclose(s.points[0], [0, 0, 1], atol=1e-12)   # north pole first
    np.testing.assert_allclose(s.points[90 + 1], [np.cos(np.deg2rad(86)) * np.cos(np.deg2rad(4)),
                                                  np.cos(np.deg2rad(86)) * np.sin(np.deg2rad(4)),
                                                  np.sin(np.deg2rad(86))])
    # the 90 copies of a pole share its mass and its eigenvector entries
    assert np.ptp(s.mass[:90]) == 0 and np.ptp(s.mass[-90:]) == 0
    _, V = s.eigenpairs(4)
    assert np.ptp(V[:90], axis=0).max() == 0


def test_latlon_mesh_is_a_closed_outward_sphere():
    s = Sphere.latlon(12, 16)
    tm = trimesh.Trimesh(s._mesh_points, s._mesh_faces, process=False)
    assert tm.is_watertight and tm.is_winding_consistent
    assert tm.volume > 0.95 * 4 / 3 * np.pi  # outward orientation gives a positive volume


@pytest.mark.parametrize("build", [lambda: Sphere.latlon(46, 90), lambda: Sphere.healpix(8)],
                         ids=["latlon46x90", "healpix8"])
def test_sphere_spectrum_is_l_times_l_plus_1(build):
    s = build()
    evals, _ = s.eigenpairs(16)
    expected = np.array([0] + [2] * 3 + [6] * 5 + [12] * 7, dtype=float)
    assert abs(evals[0]) < 1e-8
    np.testing.assert_allclose(evals[1:9], expected[1:9], rtol=0.03)
    np.testing.assert_allclose(evals[9:], expected[9:], rtol=0.05)


def test_cell_centred_latlon_grid():
    """``poles=False`` (WeatherBench2's 64×32): no pole rows, exact cell areas, a closed outward
    mesh of the grid points alone, and the sphere's spectrum l(l+1) with multiplicity 2l + 1."""
    s = Sphere.latlon(32, 64, poles=False)
    assert s.n_vertices == 2048 and s.layout_shape == (32, 64) and not s.poles
    np.testing.assert_allclose(s.latitude[[0, 1, -1]], [87.1875, 81.5625, -87.1875])
    np.testing.assert_allclose(s.longitude[[0, 1, -1]], [0, 5.625, 354.375])
    np.testing.assert_allclose(s.mass.sum(), 4 * np.pi, rtol=1e-12)
    # the first row's cell reaches the pole: area 2π(1 − sin 84.375°)/64
    np.testing.assert_allclose(s.mass[0], 2 * np.pi * (1 - np.sin(np.deg2rad(84.375))) / 64,
                               rtol=1e-12)
    tm = trimesh.Trimesh(s._mesh_points, s._mesh_faces, process=False)
    assert len(tm.vertices) == s.n_vertices
    assert tm.is_watertight and tm.is_winding_consistent and tm.volume > 0.99 * 4 / 3 * np.pi
    evals, _ = s.eigenpairs(16)
    expected = np.array([0] + [2] * 3 + [6] * 5 + [12] * 7, dtype=float)
    assert abs(evals[0]) < 1e-8
    np.testing.assert_allclose(evals[1:], expected[1:], rtol=0.02)
    assert repr(s) == "Sphere.latlon(32, 64, poles=False, radius=1)"
    with pytest.raises(ValueError, match="nlat must be an integer ≥ 2"):
        Sphere.latlon(1, 8, poles=False)
    with pytest.raises(TypeError, match="poles must be True or False"):
        Sphere.latlon(8, 8, poles="no")


def test_sphere_radius_scales_mass_and_spectrum():
    s = Sphere.latlon(16, 24, radius=2.0)
    np.testing.assert_allclose(s.mass.sum(), 16 * np.pi, rtol=1e-12)
    ev1, _ = Sphere.latlon(16, 24).eigenpairs(4)
    ev2, _ = s.eigenpairs(4)
    np.testing.assert_allclose(ev2[1:], ev1[1:] / 4, rtol=1e-6)


def test_healpix_basics():
    h = Sphere.healpix(4)
    assert h.n_vertices == 192
    np.testing.assert_allclose(h.mass.sum(), 4 * np.pi)
    with pytest.raises(ValueError, match="nside must be a positive power of 2"):
        Sphere.healpix(3)


def test_sphere_bad_arguments():
    with pytest.raises(ValueError, match="nlat must be"):
        Sphere.latlon(2, 10)
    with pytest.raises(ValueError, match="radius must be"):
        Sphere.latlon(10, 10, radius=-1)


@pytest.mark.parametrize("shape", [(4140,), (4140, 2), (3, 4140, 1)])
def test_xarray_round_trip(shape):
    s = Sphere.latlon()
    x = np.random.default_rng(3).normal(280, 20, size=shape)
    da = s.to_xarray(x, name="t2m", units="K")
    assert da.attrs["units"] == "K" and da.name == "t2m"
    assert da.sizes["latitude"] == 46 and da.sizes["longitude"] == 90
    np.testing.assert_allclose(da["latitude"].values, s.latitude)
    np.testing.assert_allclose(da["longitude"].values, s.longitude)
    assert ("sample" in da.dims) == (len(shape) == 3)
    assert ("channel" in da.dims) == (len(shape) > 1)
    back = s.from_xarray(da)
    np.testing.assert_array_equal(back, x if len(shape) > 1 else x[:, None])


def test_from_xarray_reorders_coordinates_but_never_regrids():
    s = Sphere.latlon(10, 12)
    x = np.random.default_rng(4).normal(size=(s.n_vertices, 1))
    da = s.to_xarray(x)
    flipped = da.isel(latitude=slice(None, None, -1))
    shifted = flipped.assign_coords(longitude=((flipped.longitude + 180) % 360) - 180).sortby("longitude")
    np.testing.assert_array_equal(s.from_xarray(shifted), x)
    with pytest.raises(ValueError, match="do not match"):
        s.from_xarray(da.assign_coords(latitude=da.latitude * 0.9))
    with pytest.raises(ValueError, match="grid"):
        Sphere.latlon(12, 12).from_xarray(da)
    with pytest.raises(ValueError, match="must have dims"):
        s.from_xarray(da.rename(latitude="lat"))
    with pytest.raises(TypeError, match="DataArray"):
        s.from_xarray(x)


def test_healpix_xarray_round_trip():
    h = Sphere.healpix(2)
    x = np.arange(h.n_vertices, dtype=float)[:, None]
    da = h.to_xarray(x)
    assert da.dims == ("pixel", "channel") and "latitude" in da.coords
    np.testing.assert_array_equal(h.from_xarray(da), x)


# ------------------------------------------------------------------------------------ Mesh
def test_bunny_is_cleaned_and_scaled():
    b = Mesh.bunny()
    assert b.n_vertices == 1887 and len(b.faces) == 3768
    np.testing.assert_allclose(np.linalg.norm(b.points, axis=1).max(), 1.0)
    area = trimesh.Trimesh(b.vertices, b.faces, process=False).area
    np.testing.assert_allclose(b.mass.sum(), area, rtol=0.02)
    assert Mesh.bunny(4).n_vertices == 453
    with pytest.raises(ValueError, match="resolution must be 2, 3 or 4"):
        Mesh.bunny(5)


def test_mesh_area_of_a_sphere_and_shift_invert_path(monkeypatch):
    ico = icosphere(3)  # 642 vertices: above the dense limit, so ARPACK shift-invert runs
    assert ico.n_vertices > eigen.DENSE_LIMIT
    np.testing.assert_allclose(ico.mass.sum(), 4 * np.pi, rtol=0.01)
    evals, evecs = ico.eigenpairs(9)
    np.testing.assert_allclose(evals[1:], [2, 2, 2, 6, 6, 6, 6, 6], rtol=0.02)
    monkeypatch.setattr(eigen, "DENSE_LIMIT", 10**6)
    dense_vals, _ = eigen.generalized_eigenpairs(*ico._mesh_geometry()[:2], 9)
    np.testing.assert_allclose(evals, dense_vals, atol=1e-8)


def test_eigensolver_failure_is_a_clear_error(monkeypatch):
    def fail(*args, **kwargs):
        raise spla.ArpackNoConvergence("no convergence", np.zeros(0), np.zeros((0, 0)))

    monkeypatch.setattr(eigen.spla, "eigsh", fail)
    ico = icosphere(3)
    L, m, _ = ico._mesh_geometry()
    with pytest.raises(RuntimeError, match="eigsh failed to compute 5 eigenpairs .* after 4 tries"):
        eigen.generalized_eigenpairs(L, m, 5)


def test_eigenpairs_are_cached_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("GEODIFF_CACHE", str(tmp_path))
    ev1, V1 = icosphere(2).eigenpairs(6)
    files = list((tmp_path / "geometry").glob("eig2_*.npz"))
    assert len(files) == 1
    assert not list((tmp_path / "geometry").glob("*.tmp"))
    with monkeypatch.context() as mp:
        mp.setattr(Mesh, "_compute_mesh_eigenpairs", lambda self, k: pytest.fail("solver called"))
        ev2, V2 = icosphere(2).eigenpairs(6)  # a new object: served from disk
    np.testing.assert_array_equal(ev1, ev2)
    np.testing.assert_array_equal(V1, V2)
    icosphere(1).eigenpairs(3)  # a different mesh gets a different key
    assert len(list((tmp_path / "geometry").glob("eig2_*.npz"))) == 2


def test_eigenvector_signs_are_reproducible(tmp_path, monkeypatch):
    monkeypatch.setenv("GEODIFF_CACHE", str(tmp_path / "a"))
    _, V1 = Mesh.bunny(4).eigenpairs(6)
    monkeypatch.setenv("GEODIFF_CACHE", str(tmp_path / "b"))
    _, V2 = Mesh.bunny(4).eigenpairs(6)
    np.testing.assert_allclose(V1, V2, atol=1e-8)


@pytest.mark.parametrize("nlat,nlon", [(8, 10), (24, 48)])     # the dense and the ARPACK path
def test_degenerate_eigenspaces_get_one_basis_whatever_k_or_solver(nlat, nlon, monkeypatch):
    """The lat-lon grid's cos mφ / sin mφ pairs are exactly degenerate, so a solver may return
    any rotation of them. eigenpairs(k) is the first k columns of eigenpairs(k') for k' > k (even
    when k splits a pair: the space is completed first), and any rotation of a degenerate pair
    gives back the same basis."""
    s = Sphere.latlon(nlat, nlon)
    L, m, _ = s.geometry_mesh()
    pts = s._mesh_geometry()[2]
    ev, V = eigen.generalized_eigenpairs(L, m, 40, points=pts)
    pairs = [(a, b) for a, b in eigen.eigen_clusters(ev) if b - a == 2]
    assert len(pairs) >= 10                                  # the test sees degenerate spaces
    cut = pairs[2][0] + 1                                    # k that splits a pair
    for k in (cut, 16):
        evk, Vk = eigen.generalized_eigenpairs(L, m, k, points=pts)
        np.testing.assert_allclose(evk, ev[:k], rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(Vk, V[:, :k], atol=1e-8)
    rotated = V.copy()
    for i, (a, b) in enumerate(pairs):
        c, sn = np.cos(0.3 + i), np.sin(0.3 + i)
        rotated[:, a:b] = V[:, a:b] @ np.array([[c, -sn], [sn, c]])
    rotated[:, 5] *= -1
    np.testing.assert_allclose(eigen.fix_signs(rotated, m, pts, ev), V, atol=1e-10)
    # still eigenvectors, M-orthonormal
    np.testing.assert_allclose(V.T @ (m[:, None] * V), np.eye(40), atol=1e-9)
    np.testing.assert_allclose(L @ V, m[:, None] * V * ev, atol=1e-7 * ev.max())


def test_mesh_validation():
    v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], float)
    f = np.array([[0, 1, 2], [0, 1, 3], [0, 2, 3], [1, 2, 3]])
    Mesh(v, f)
    with pytest.raises(ValueError, match=r"vertices must have shape \(V, 3\)"):
        Mesh(v[:, :2], f)
    with pytest.raises(ValueError, match="faces must have shape"):
        Mesh(v, f[:, :2])
    with pytest.raises(ValueError, match="faces must index vertices"):
        Mesh(v, f + 1)
    with pytest.raises(ValueError, match="faces must be integer"):
        Mesh(v, f.astype(float))
    bad = v.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="vertices contains NaN"):
        Mesh(bad, f)
    extra = np.vstack([v, [[5, 5, 5]]])
    with pytest.raises(ValueError, match="1 vertices are referenced by no face"):
        Mesh(extra, f)
    assert Mesh(extra, f, clean=True).n_vertices == 4


def test_clean_mesh_drops_duplicates_and_unused():
    v = np.arange(18, dtype=float).reshape(6, 3)
    f = np.array([[0, 1, 2], [2, 1, 0], [1, 2, 4], [4, 4, 1]])
    v2, f2 = clean_mesh(v, f)
    assert len(f2) == 2 and len(v2) == 4  # vertex 3 and 5 unused, one duplicate, one degenerate
    np.testing.assert_array_equal(v2[f2], v[f[[0, 2]]])


def test_mesh_from_file(tmp_path):
    tm = trimesh.creation.icosphere(subdivisions=1)
    path = tmp_path / "ico.obj"
    tm.export(path)
    m = Mesh.from_file(path)
    assert m.n_vertices == len(tm.vertices)
    with pytest.raises(FileNotFoundError, match="no mesh file"):
        Mesh.from_file(tmp_path / "missing.ply")
    (tmp_path / "empty.obj").write_text("v 0 0 0\nv 1 0 0\n")
    with pytest.raises(ValueError, match="no triangle faces"):
        Mesh.from_file(tmp_path / "empty.obj")
    assert Path(path).exists()


def test_manifold_spec_round_trip(manifold):
    from geodiff.manifolds.spec import manifold_from_spec, manifold_spec

    for m in [manifold, manifold.padded(manifold.n_vertices + 3)]:
        meta, arrays = manifold_spec(m)
        again = manifold_from_spec(meta, arrays)
        assert type(again) is type(m) and again.n_vertices == m.n_vertices
        np.testing.assert_array_equal(again.points, m.points)
        np.testing.assert_array_equal(again.mass, m.mass)
