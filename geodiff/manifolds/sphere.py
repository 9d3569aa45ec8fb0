"""The sphere: a regular latitude–longitude grid (GASP/ERA5 layout) or HEALPix.

Dimension letters: nlat latitudes, nlon longitudes, V = nlat·nlon layout vertices,
N = (nlat − 2)·nlon + 2 geometry-mesh vertices (each pole once), C channels, S samples.
"""

from __future__ import annotations

import numpy as np
import robust_laplacian
import scipy.sparse as sp

from geodiff._cache import content_hash
from geodiff.manifolds.base import GEOMETRY_VERSION, Manifold


def _check_radius(radius) -> None:
    if isinstance(radius, (bool, np.bool_)) or not isinstance(radius, (int, float, np.integer, np.floating)):
        raise TypeError(f"radius must be a number, got {radius!r}")
    if not (np.isfinite(radius) and radius > 0):
        raise ValueError(f"radius must be finite and > 0, got {radius!r}")


def _xyz(lat_deg: np.ndarray, lon_deg: np.ndarray, radius: float) -> np.ndarray:
    lat, lon = np.deg2rad(lat_deg), np.deg2rad(lon_deg)
    return radius * np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], -1)


def latlon_mesh(nlat: int, nlon: int) -> tuple[np.ndarray, np.ndarray]:
    """Faces of the deduplicated lat-lon mesh and the layout → mesh vertex index.

    Mesh vertex 0 is the north pole, then rows 1 … nlat − 2 (nlon each), then the south pole.

    Returns:
        faces (F, 3) outward-oriented, index (V,) into the N mesh vertices.
    """
    n = (nlat - 2) * nlon + 2
    row = lambda i: 1 + (i - 1) * nlon + np.arange(nlon)  # noqa: E731  mesh ids of interior row i
    faces = []
    a = row(1)
    faces.append(np.stack([np.zeros(nlon, int), a, np.roll(a, -1)], 1))
    for i in range(1, nlat - 2):
        a, b = row(i), row(i + 1)
        a1, b1 = np.roll(a, -1), np.roll(b, -1)
        faces += [np.stack([a, b, b1], 1), np.stack([a, b1, a1], 1)]
    b = row(nlat - 2)
    faces.append(np.stack([np.full(nlon, n - 1), np.roll(b, -1), b], 1))
    index = np.concatenate([np.zeros(nlon, int), 1 + np.arange((nlat - 2) * nlon),
                            np.full(nlon, n - 1)])
    return np.concatenate(faces).astype(np.int64), index


def latlon_cell_mesh(nlat: int, nlon: int) -> np.ndarray:
    """Faces of a cell-centred lat-lon grid (no pole rows; every grid point a mesh vertex).

    Rows 0 … nlat − 1 (nlon each, row-major) are joined by strips; each polar cap is closed by a
    fan of triangles over its ring (the robust Laplacian's intrinsic Delaunay flips them into
    good ones), so the mesh is closed with no vertex that is not a grid point.

    Returns:
        faces (F, 3), outward-oriented.
    """
    row = lambda i: i * nlon + np.arange(nlon)  # noqa: E731
    faces = []
    for i in range(nlat - 1):
        a, b = row(i), row(i + 1)
        a1, b1 = np.roll(a, -1), np.roll(b, -1)
        faces += [np.stack([a, b, b1], 1), np.stack([a, b1, a1], 1)]
    k = np.arange(1, nlon - 1)
    top, bottom = row(0), row(nlat - 1)
    faces.append(np.stack([np.full(nlon - 2, top[0]), top[k], top[k + 1]], 1))
    faces.append(np.stack([np.full(nlon - 2, bottom[0]), bottom[k + 1], bottom[k]], 1))
    return np.concatenate(faces).astype(np.int64)


class Sphere(Manifold):
    """A sphere of given radius, discretized by a lat-lon grid or by HEALPix.

    Build with :meth:`latlon` or :meth:`healpix`, not directly.

    Attributes:
        kind: ``"latlon"`` or ``"healpix"``.
        radius: sphere radius (the mass sums to 4π·radius²).
        latitude: lat-lon: (nlat,) degrees, north → south; HEALPix: (V,) per pixel.
        poles: lat-lon: whether the first and last rows lie on the poles (see :meth:`latlon`).
        longitude: lat-lon: (nlon,) degrees, 0 → 360 − 360/nlon; HEALPix: (V,) per pixel.
    """

    def __init__(self, *, kind, points, mass, layout_shape, index, mesh_points, mesh_faces,
                 mesh_mass, radius, latitude, longitude, nside=None, poles=True):
        self.kind, self.radius, self.nside, self.poles = kind, float(radius), nside, poles
        self.latitude, self.longitude = latitude, longitude
        self._mesh_points, self._mesh_faces, self._mesh_mass = mesh_points, mesh_faces, mesh_mass
        super().__init__(points, mass, layout_shape, index)

    @classmethod
    def latlon(cls, nlat: int = 46, nlon: int = 90, *, poles: bool = True,
               radius: float = 1.0) -> "Sphere":
        """A regular (equiangular) lat-lon grid.

        ``poles=True`` (the GASP/ERA5 layout): latitudes 90 → −90 in steps of 180/(nlat − 1), both
        pole rows included. Each pole row holds ``nlon`` copies of one point: geometry is built
        on the deduplicated mesh, every pole copy carries 1/nlon of the pole's mass and a copy of
        its eigenvector entries.

        ``poles=False`` (cell-centred grids such as WeatherBench2's 64×32 and 512×256):
        latitudes 90 − (i + ½)·180/nlat, i = 0 … nlat − 1, so no row sits on a pole; every grid
        point is its own mesh vertex and each polar cap is closed by triangles over its ring.

        Either way vertices are all ``nlat·nlon`` grid points, row-major, latitude north → south,
        longitude 0 → 360 − 360/nlon, and the mass of a vertex is the exact spherical area of its
        grid cell (half-way to the neighbouring latitudes, up to the pole for the first and last
        rows), so ``mass.sum()`` is 4π·radius² exactly.

        Args:
            nlat: number of latitudes: ≥ 3 with poles (both pole rows counted), ≥ 2 without.
            nlon: number of longitudes, ≥ 3.
            poles: whether the first and last rows lie on the poles.
            radius: sphere radius (> 0).
        """
        if not isinstance(poles, (bool, np.bool_)):
            raise TypeError(f"poles must be True or False, got {poles!r}")
        least = 3 if poles else 2
        if not isinstance(nlat, (int, np.integer)) or nlat < least:
            raise ValueError(f"nlat must be an integer ≥ {least} (poles={bool(poles)}), got {nlat!r}")
        if not isinstance(nlon, (int, np.integer)) or nlon < 3:
            raise ValueError(f"nlon must be an integer ≥ 3, got {nlon!r}")
        _check_radius(radius)
        if poles:
            lat = np.linspace(90.0, -90.0, nlat)
        else:
            lat = 90.0 - (np.arange(nlat) + 0.5) * 180.0 / nlat
        lon = np.arange(nlon) * 360.0 / nlon
        lat_grid, lon_grid = np.meshgrid(lat, lon, indexing="ij")
        points = _xyz(lat_grid.ravel(), lon_grid.ravel(), radius)
        # Exact cell areas: band between the mid-latitudes, width 2π/nlon.
        edges = np.deg2rad(np.clip(np.concatenate([[90.0], (lat[:-1] + lat[1:]) / 2, [-90.0]]), -90, 90))
        band = 2 * np.pi * radius**2 * (np.sin(edges[:-1]) - np.sin(edges[1:]))  # (nlat,)
        mass = np.repeat(band / nlon, nlon)
        if poles:
            faces, index = latlon_mesh(nlat, nlon)
            mesh_mass = np.concatenate([[band[0]], mass[nlon:-nlon], [band[-1]]])
            mesh_points = np.concatenate([points[:1], points[nlon:-nlon], points[-1:]])
        else:
            faces, index = latlon_cell_mesh(nlat, nlon), None
            mesh_mass, mesh_points = mass, points
        return cls(kind="latlon", points=points, mass=mass, layout_shape=(nlat, nlon), index=index,
                   mesh_points=mesh_points, mesh_faces=faces, mesh_mass=mesh_mass, radius=radius,
                   latitude=lat, longitude=lon, poles=bool(poles))

    @classmethod
    def healpix(cls, nside: int, *, radius: float = 1.0) -> "Sphere":
        """A HEALPix sphere (RING ordering, ``V = 12·nside²`` equal-area pixels).

        The mesh is the convex hull of the pixel centres; every pixel has mass 4π·radius²/V.

        Args:
            nside: HEALPix resolution, a power of 2.
            radius: sphere radius (> 0).
        """
        import healpy
        from scipy.spatial import ConvexHull

        if not isinstance(nside, (int, np.integer)) or nside < 1 or nside & (nside - 1):
            raise ValueError(f"nside must be a positive power of 2, got {nside!r}")
        _check_radius(radius)
        npix = 12 * nside**2
        points = radius * np.stack(healpy.pix2vec(nside, np.arange(npix)), axis=1)
        lon, lat = healpy.pix2ang(nside, np.arange(npix), lonlat=True)
        faces = ConvexHull(points).simplices.astype(np.int64)
        mass = np.full(npix, 4 * np.pi * radius**2 / npix)
        return cls(kind="healpix", points=points, mass=mass, layout_shape=(npix,), index=None,
                   mesh_points=points, mesh_faces=faces, mesh_mass=mass, radius=radius,
                   latitude=lat, longitude=lon, nside=int(nside))

    def __repr__(self) -> str:
        if self.kind == "latlon":
            poles = "" if self.poles else ", poles=False"
            return (f"Sphere.latlon({self.layout_shape[0]}, {self.layout_shape[1]}{poles}, "
                    f"radius={self.radius:g})")
        return f"Sphere.healpix({self.nside}, radius={self.radius:g})"

    def _build_mesh_geometry(self):
        L, _ = robust_laplacian.mesh_laplacian(self._mesh_points, self._mesh_faces)
        return sp.csr_matrix(L), self._mesh_mass, self._mesh_points

    def _cache_key(self) -> str:
        return content_hash(self._mesh_points, self._mesh_faces, self._mesh_mass,
                            salt=f"sphere-robust-{GEOMETRY_VERSION}")

    # ------------------------------------------------------------------ xarray I/O
    def to_xarray(self, x, *, name: str = "signal", units: str = "1", attrs: dict | None = None):
        """A signal as an ``xarray.DataArray`` with ``latitude``/``longitude`` coordinates.

        Values are kept as given (no unit change); ``units`` is recorded in ``attrs``.

        Args:
            x: (V,), (V, C) or (S, V, C) array in the vertex layout (NaN: missing).
            name: the DataArray's name.
            units: the units of the values, e.g. ``"K"`` or ``"1"`` (normalized).
            attrs: further attributes.

        Returns:
            lat-lon: DataArray with dims ``([sample,] latitude, longitude[, channel])``;
            HEALPix: dims ``([sample,] pixel[, channel])`` with per-pixel latitude/longitude coords.
            ``channel`` is present when x has a channel axis.
        """
        import xarray as xr

        x = np.asarray(x)
        if x.ndim == 1:
            x = x[:, None]
            squeeze = True
        else:
            squeeze = False
        if x.ndim not in (2, 3):
            raise ValueError(f"x must have shape (V,), (V, C) or (S, V, C), got {x.shape}")
        self.check_signal(x, "x", missing=True)
        a = self.to_layout(x)
        spatial = ["latitude", "longitude"] if self.kind == "latlon" else ["pixel"]
        dims = (["sample"] if x.ndim == 3 else []) + spatial + ["channel"]
        coords = {}
        if self.kind == "latlon":
            coords.update(latitude=("latitude", self.latitude), longitude=("longitude", self.longitude))
        else:
            coords.update(pixel=("pixel", np.arange(self.n_vertices)),
                          latitude=("pixel", self.latitude), longitude=("pixel", self.longitude))
        coords["channel"] = ("channel", np.arange(x.shape[-1]))
        if x.ndim == 3:
            coords["sample"] = ("sample", np.arange(x.shape[0]))
        da = xr.DataArray(a, dims=dims, coords=coords, name=name,
                          attrs={"units": units, "geodiff_grid": repr(self), **(attrs or {})})
        da["latitude"].attrs["units"] = "degrees_north"
        da["longitude"].attrs["units"] = "degrees_east"
        return da.isel(channel=0, drop=True) if squeeze else da

    def from_xarray(self, da) -> np.ndarray:
        """A DataArray on this grid → array in the vertex layout (values kept as given).

        Latitude may run either way and longitude may be in [−180, 180): both are matched to this
        grid's coordinates (within 1e-6 degree); any other mismatch is an error, never a regrid.

        Args:
            da: DataArray with dims ``latitude`` and ``longitude`` (lat-lon) or ``pixel``
                (HEALPix), optionally ``sample`` and ``channel`` (others are not allowed).

        Returns:
            (V, C) or (S, V, C) float array; C = 1 when ``da`` has no ``channel`` dim.
        """
        import xarray as xr

        if not isinstance(da, xr.DataArray):
            raise TypeError(f"da must be an xarray.DataArray, got {type(da).__name__}")
        spatial = ["latitude", "longitude"] if self.kind == "latlon" else ["pixel"]
        missing = [d for d in spatial if d not in da.dims]
        extra = [d for d in da.dims if d not in spatial + ["sample", "channel"]]
        if missing or extra:
            raise ValueError(f"da must have dims {spatial} (+ optional 'sample', 'channel'); "
                             f"missing {missing}, unexpected {extra}")
        if self.kind == "latlon":
            lat = np.asarray(da["latitude"], dtype=float)
            lon = np.mod(np.asarray(da["longitude"], dtype=float), 360.0)
            if len(lat) != len(self.latitude) or len(lon) != len(self.longitude):
                raise ValueError(f"da has a {len(lat)}×{len(lon)} grid, expected "
                                 f"{len(self.latitude)}×{len(self.longitude)} (no regridding here)")
            ilat = np.argsort(-lat, kind="stable")
            ilon = np.argsort(lon, kind="stable")
            if not (np.allclose(lat[ilat], self.latitude, atol=1e-6)
                    and np.allclose(lon[ilon], self.longitude, atol=1e-6)):
                raise ValueError("da's latitude/longitude coordinates do not match this grid "
                                 f"({self!r}); regrid first")
            da = da.isel(latitude=ilat, longitude=ilon)
        elif da.sizes["pixel"] != self.n_vertices:
            raise ValueError(f"da has {da.sizes['pixel']} pixels, expected {self.n_vertices}")
        if "channel" not in da.dims:
            da = da.expand_dims("channel", axis=-1)
        order = (["sample"] if "sample" in da.dims else []) + spatial + ["channel"]
        a = np.asarray(da.transpose(*order).values, dtype=np.float64)
        return self.from_layout(a)
