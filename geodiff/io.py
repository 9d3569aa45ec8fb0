"""Your data in, posterior out: read fields with gaps, write posteriors (docs/your-data.md).

* :func:`read_field` reads one variable on a lat-lon grid (netCDF, zarr or an xarray object)
  or on a triangle mesh (PLY with a per-vertex scalar property). NaN marks a missing value;
  the time dimension, units and attributes are kept in ``meta``.
* :func:`write_posterior` writes the posterior mean, std, quantiles and optionally the samples:
  netCDF with CF attributes for a lat-lon sphere, PLY vertex properties for a mesh. Every file
  is written atomically (a temporary file in the same folder, then a rename).
  :func:`write_summary` writes the same file from summaries already computed (chunk by chunk
  over a long archive: ``AmortizedSampler.iter_posterior``).

Values are kept in the data's own units: the normalisation a prior was trained with is undone
by the caller (the command line records it in the prior file, ``geodiff.cli``).

Dimension letters: T time steps (1 without a time dimension), V vertices, C channels (1 here),
S samples, Q quantiles.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import numpy as np

from geodiff._cache import atomic_write
from geodiff.manifolds import Manifold, Mesh, Sphere

LAT_NAMES = ("lat", "latitude")
LON_NAMES = ("lon", "longitude")
#: Names of the leading field dimension (time steps, or members of an ensemble of fields).
TIME_NAMES = ("time", "valid_time", "sample", "realization", "member")
#: PLY vertex properties that are geometry or appearance, never a field.
_PLY_GEOMETRY = {"x", "y", "z", "nx", "ny", "nz", "red", "green", "blue", "alpha", "s", "t",
                 "u", "v", "texture_u", "texture_v"}


# ------------------------------------------------------------------------------------- reading
def read_field(source, *, var: str | None = None):
    """Read one variable with gaps (NaN = missing) and the manifold it lives on.

    Lat-lon data: a netCDF file, a zarr store (needs the ``zarr`` package), an
    ``xarray.Dataset`` or ``xarray.DataArray``. Coordinates ``lat``/``lon`` or
    ``latitude``/``longitude`` in either order; latitude ascending or descending; longitude in
    [0, 360) or [−180, 180). The grid must be equiangular with ``nlon`` longitudes from 0°: with
    pole rows (90 … −90, :meth:`Sphere.latlon`) or cell-centred (90 − (i + ½)·180/nlat,
    ``Sphere.latlon(..., poles=False)``). An optional field dimension (``time``,
    ``valid_time``, ``sample``, ``realization`` or ``member``) is kept; any other dimension is an
    error (select it first, e.g. ``ds.sel(level=500)``).

    Mesh data: a PLY file whose vertices carry a scalar property (NaN = missing); the mesh is
    read as stored (vertex order kept).

    Args:
        source: a path (``.nc``, ``.zarr``, ``.ply``) or an xarray object.
        var: the variable (netCDF) or vertex property (PLY); None when there is exactly one.

    Returns:
        ``(manifold, x, meta)``: the :class:`~geodiff.Sphere` or :class:`~geodiff.Mesh`;
        x (T, V, 1) float64 in the data's units, NaN where missing, in the manifold's vertex
        layout (lat-lon: north → south, longitude 0 → 360); meta a dict with ``name``,
        ``units`` (None if the data has none), ``attrs`` (the variable's attributes), ``time``
        (the field dimension's coordinate, e.g. the time stamps, as a 1-D xarray.DataArray
        named like the dimension, or None), ``kind`` (``"latlon"`` or
        ``"mesh"``), ``lat_name``/``lon_name`` (lat-lon) and ``source``.

    Raises:
        FileNotFoundError: no file at ``source``.
        ValueError: ``var`` missing or ambiguous, an unsupported dimension, a grid that is not an
            equiangular lat-lon grid, inf values, or a field with no observed value.
        TypeError: a ``source`` of another type.
    """
    try:
        return _read_any(source, var)
    except ValueError as e:              # name the argument: what is wrong is in the source
        if str(e).startswith(("source", "var")):
            raise
        raise ValueError(f"source: {e}") from None


def _read_any(source, var):
    import xarray as xr

    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"source: no file at {str(path)!r}")
        if path.suffix.lower() == ".ply":
            return _read_ply(path, var)
        if path.suffix.lower() == ".obj":
            raise ValueError(f"source: {str(path)!r} is an OBJ file, which has no per-vertex "
                             "scalar property; convert it to PLY with the field as a vertex "
                             "property")
        if path.is_dir() or path.suffix.lower() == ".zarr":
            import importlib.util

            if importlib.util.find_spec("zarr") is None:
                raise ValueError(f"source: {str(path)!r} is a zarr store; reading it needs the "
                                 "zarr package (pip install zarr)")
            with xr.open_zarr(path) as ds:
                return _read_xarray(ds.load(), var, str(path))
        try:
            ds = xr.open_dataset(path)
        except (OSError, ValueError) as e:
            raise ValueError(f"source: {str(path)!r} is not a readable netCDF file ({e})") from None
        with ds:
            return _read_xarray(ds.load(), var, str(path))
    if isinstance(source, (xr.Dataset, xr.DataArray)):
        return _read_xarray(source, var, None)
    raise TypeError(f"source must be a path or an xarray Dataset/DataArray, got "
                    f"{type(source).__name__}")


def _pick(names, dims, what):
    found = [n for n in names if n in dims]
    if len(found) > 1:
        raise ValueError(f"the variable has two {what} dimensions {found}")
    return found[0] if found else None


def _read_xarray(obj, var, source):
    import xarray as xr

    if isinstance(obj, xr.Dataset):
        fields = [str(v) for v in obj.data_vars
                  if _pick(LAT_NAMES, obj[v].dims, "latitude") and _pick(LON_NAMES, obj[v].dims, "longitude")]
        if var is None:
            if not fields:
                dims = {str(v): obj[v].dims for v in obj.data_vars}
                raise ValueError(f"the data is not on a lat-lon grid: no variable has one of "
                                 f"{LAT_NAMES} and one of {LON_NAMES} as dimensions ({dims})")
            if len(fields) != 1:
                raise ValueError(f"var: the data has {len(fields)} variables on a lat-lon grid "
                                 f"{fields}; pass var= to choose one")
            var = fields[0]
        elif var not in obj.data_vars:
            raise ValueError(f"var: {var!r} is not in the data; its variables: "
                             f"{[str(v) for v in obj.data_vars]}")
        da = obj[var]
    else:
        da = obj
        if var is not None and da.name != var:
            raise ValueError(f"var: the DataArray is named {da.name!r}, not {var!r}")
    lat_name = _pick(LAT_NAMES, da.dims, "latitude")
    lon_name = _pick(LON_NAMES, da.dims, "longitude")
    if lat_name is None or lon_name is None:
        raise ValueError(f"{da.name!r} is not on a lat-lon grid: its dims are {da.dims}, expected "
                         f"one of {LAT_NAMES} and one of {LON_NAMES}")
    time_name = _pick(TIME_NAMES, da.dims, "field (time or member)")
    other = [d for d in da.dims if d not in (lat_name, lon_name, time_name)]
    if other:
        raise ValueError(f"{da.name!r} has dimensions {other} besides time, latitude and "
                         f"longitude; select one value of each first (e.g. ds.sel({other[0]}=...))")
    lat = np.asarray(da[lat_name], float)
    nlat, nlon = len(lat), da.sizes[lon_name]
    lat_sorted = np.sort(lat)[::-1]
    if np.allclose(lat_sorted, np.linspace(90.0, -90.0, nlat), atol=1e-4) and nlat >= 3:
        sphere = Sphere.latlon(nlat, nlon)
    elif np.allclose(lat_sorted, 90.0 - (np.arange(nlat) + 0.5) * 180.0 / nlat, atol=1e-4):
        sphere = Sphere.latlon(nlat, nlon, poles=False)
    else:
        raise ValueError(f"{da.name!r}: its {nlat} latitudes ({lat_sorted[0]:g} … "
                         f"{lat_sorted[-1]:g}) are not an equiangular lat-lon grid with pole rows "
                         "or cell-centred; regrid first")
    lon = np.mod(np.asarray(da[lon_name], float), 360.0)
    if not np.allclose(np.sort(lon), np.arange(nlon) * 360.0 / nlon, atol=1e-4):
        raise ValueError(f"{da.name!r}: its {nlon} longitudes are not equally spaced from 0° "
                         f"(0, {360 / nlon:g}, …); regrid or roll first")
    if time_name and time_name not in da.coords:
        da = da.assign_coords({time_name: np.arange(da.sizes[time_name])})
    time = da[time_name].copy() if time_name else None
    ren = {lat_name: "latitude", lon_name: "longitude"} | ({time_name: "sample"} if time_name else {})
    plain = da.reset_coords(drop=True).rename(ren)
    # snap the file's coordinates (often float32) to the grid's exact ones, matched above to 1e-4°
    snap = lambda v, exact: exact[np.abs(np.mod(v[:, None] - exact[None] + 180, 360) - 180  # noqa: E731
                                         ).argmin(1)]
    plain = plain.assign_coords(latitude=snap(lat, sphere.latitude),
                                longitude=snap(lon, sphere.longitude))
    x = sphere.from_xarray(plain)
    x = x[None] if x.ndim == 2 else x
    _check_values(x, str(da.name))
    meta = {"kind": "latlon", "name": str(da.name), "units": da.attrs.get("units"),
            "attrs": dict(da.attrs), "time": time, "lat_name": lat_name, "lon_name": lon_name,
            "source": source}
    return sphere, x, meta


def _check_values(x, name):
    if np.isinf(x).any():
        raise ValueError(f"{name!r} has {int(np.isinf(x).sum())} infinite values (NaN marks a "
                         "missing value; inf is not one)")
    empty = np.isnan(x).all(axis=(1, 2))
    if empty.any():
        raise ValueError(f"{name!r} has no observed value at time step(s) "
                         f"{np.flatnonzero(empty).tolist()} (every vertex NaN)")


def _read_ply(path: Path, var):
    import trimesh

    try:
        tm = trimesh.load(path, process=False, force="mesh")
        table = tm.metadata["_ply_raw"]["vertex"]["data"]
    except Exception as e:            # a truncated or foreign file
        raise ValueError(f"source: {str(path)!r} is not a readable PLY mesh ({e})") from None
    props = [n for n in table.dtype.names if n not in _PLY_GEOMETRY]
    if var is None:
        if len(props) != 1:
            raise ValueError(f"var: {str(path)!r} has {len(props)} per-vertex properties "
                             f"{props}; pass var= to choose one")
        var = props[0]
    elif var not in props:
        raise ValueError(f"var: {var!r} is not a vertex property of {str(path)!r}; its "
                         f"properties: {props}")
    faces = np.asarray(tm.faces)
    if faces.size == 0:
        raise ValueError(f"source: {str(path)!r} holds no triangle faces")
    mesh = Mesh(np.asarray(tm.vertices), faces)
    x = np.asarray(table[var], np.float64)[None, :, None]
    _check_values(x, var)
    meta = {"kind": "mesh", "name": var, "units": None, "attrs": {}, "time": None,
            "source": str(path)}
    return mesh, x, meta


# ------------------------------------------------------------------------------------- writing
def write_posterior(path, manifold: Manifold, samples, *, meta: dict | None = None,
                    quantiles=(0.05, 0.5, 0.95), keep_samples: bool = False,
                    history: str | None = None) -> Path:
    """Write posterior samples as their mean, std and quantiles (and optionally themselves).

    Lat-lon spheres get a CF netCDF file: variables ``<name>_mean``, ``<name>_std``,
    ``<name>_quantile`` (dims ``quantile, time, lat, lon``; the input's names for the field and
    coordinate dimensions) and with ``keep_samples`` ``<name>_samples`` (``realization, time,
    lat, lon``), each with the input's ``units`` and
    ``standard_name`` and a ``cell_methods`` saying what was done over the samples
    (``"realization: mean"`` …); the input's time stamps and coordinate names; global
    ``Conventions = "CF-1.8"`` and ``history``. Meshes get a PLY file whose vertices carry
    ``mean`` and ``std`` properties (``mean_<t>``/``std_<t>`` for several time steps).

    Args:
        path: the output file (``.nc`` for a lat-lon sphere, ``.ply`` for a mesh).
        manifold: the manifold of the samples (from :func:`read_field`).
        samples: (S, T, V, 1) or (S, V, 1) samples in the data's units, S ≥ 2.
        meta: :func:`read_field`'s meta (name, units, attributes, time); None: a variable named
            ``x`` with no units.
        quantiles: levels in (0, 1) written to the netCDF file.
        keep_samples: also write the samples (netCDF only).
        history: a line for the ``history`` attribute (default: the geodiff version and time).

    Returns:
        The path written.

    Raises:
        ValueError: samples of the wrong shape or with non-finite values, quantiles outside
            (0, 1), or a suffix that does not fit the manifold. OSError: the folder is not
            writable (nothing is left behind).
    """
    s = np.asarray(samples, np.float64)
    if s.ndim == 3:
        s = s[:, None]
    V = manifold.n_vertices
    if s.ndim != 4 or s.shape[2] != V or s.shape[3] != 1 or s.shape[0] < 2:
        raise ValueError(f"samples must have shape (S, T, {V}, 1) or (S, {V}, 1) with S ≥ 2, got "
                         f"{np.shape(samples)}")
    if not np.isfinite(s).all():
        raise ValueError("samples contain NaN or infinite values")
    q = _levels(quantiles)
    return write_summary(path, manifold, s.mean(0), s.std(0, ddof=1),
                         quantiles=np.quantile(s, q, axis=0) if q.size else None, levels=q,
                         samples=s if keep_samples else None, meta=meta, history=history)


def _levels(quantiles) -> np.ndarray:
    q = np.asarray(quantiles, float).reshape(-1)
    if q.size and not ((q > 0) & (q < 1)).all():
        raise ValueError(f"quantiles must lie in (0, 1), got {quantiles!r}")
    return q


def write_summary(path, manifold: Manifold, mean, std, *, quantiles=None, levels=(),
                  samples=None, meta: dict | None = None, history: str | None = None) -> Path:
    """Write posterior summaries already computed (what :func:`write_posterior` writes from
    samples; the archive path of ``geodiff impute``, which summarizes chunk by chunk).

    Args:
        path: the file to write, as in :func:`write_posterior`.
        manifold: the manifold the fields live on, as in :func:`write_posterior`.
        mean: (T, V, 1) per-entry posterior mean, in the data's units.
        std: (T, V, 1) per-entry posterior standard deviation, in the data's units.
        quantiles: (Q, T, V, 1) posterior quantiles at ``levels`` (netCDF only), or None.
        levels: the Q quantile levels in (0, 1).
        samples: (S, T, V, 1) samples to write too (netCDF only), or None.
        meta: extra attributes, as in :func:`write_posterior`.
        history: the file's history line, as in :func:`write_posterior`.

    Returns:
        The path written.

    Raises:
        ValueError: arrays of the wrong shape or with non-finite values, levels outside (0, 1)
            or not matching ``quantiles``, or a suffix that does not fit the manifold.
        OSError: the folder is not writable (nothing is left behind).
    """
    from geodiff import __version__

    path = Path(path)
    meta = dict(meta or {})
    V = manifold.n_vertices
    mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    if mean.ndim != 3 or mean.shape[1:] != (V, 1) or std.shape != mean.shape:
        raise ValueError(f"mean and std must both have shape (T, {V}, 1), got {mean.shape} and "
                         f"{std.shape}")
    T = mean.shape[0]
    q = _levels(levels)
    if quantiles is not None:
        quantiles = np.asarray(quantiles, np.float64)
        if quantiles.shape != (q.size, T, V, 1):
            raise ValueError(f"quantiles must have shape ({q.size}, {T}, {V}, 1) (one row per "
                             f"level of levels), got {quantiles.shape}")
    if samples is not None:
        samples = np.asarray(samples, np.float64)
        if samples.ndim != 4 or samples.shape[1:] != (T, V, 1):
            raise ValueError(f"samples must have shape (S, {T}, {V}, 1), got {samples.shape}")
    if not all(np.isfinite(a).all() for a in (mean, std, quantiles, samples) if a is not None):
        raise ValueError("the posterior summaries contain NaN or infinite values")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    history = history or f"{stamp}: posterior written by geodiff {__version__}"
    if isinstance(manifold, Sphere) and manifold.kind == "latlon":
        if path.suffix.lower() != ".nc":
            raise ValueError(f"path: a posterior on a lat-lon sphere is written as netCDF "
                             f"(.nc), got {str(path)!r}")
        ds = _posterior_dataset(manifold, mean, std, quantiles if q.size else None, q, samples,
                                meta, history)
        atomic_write(path, lambda tmp: ds.to_netcdf(tmp, engine="netcdf4"))
        return path
    if isinstance(manifold, Mesh):
        if path.suffix.lower() != ".ply":
            raise ValueError(f"path: a posterior on a mesh is written as PLY (.ply), got "
                             f"{str(path)!r}")
        _write_ply(path, manifold, mean, std)
        return path
    raise ValueError(f"manifold: write_posterior writes lat-lon spheres and meshes, got {manifold!r}")


def _posterior_dataset(sphere, mean, std, quant, q, samples, meta, history):
    import xarray as xr

    name = meta.get("name") or "x"
    lat_name, lon_name = meta.get("lat_name", "lat"), meta.get("lon_name", "lon")
    T = mean.shape[0]
    time = meta.get("time")
    if time is not None and len(time) != T:
        raise ValueError(f"meta: its time coordinate has {len(time)} steps, the samples {T}")
    tname = str(time.name) if time is not None and time.name else "time"
    layout = lambda a: sphere.to_layout(a)[..., 0]   # noqa: E731  (..., V, 1) → (..., nlat, nlon)
    dims = [tname, lat_name, lon_name]
    coords = {lat_name: (lat_name, sphere.latitude, {"units": "degrees_north",
                                                     "standard_name": "latitude", "axis": "Y"}),
              lon_name: (lon_name, sphere.longitude, {"units": "degrees_east",
                                                      "standard_name": "longitude", "axis": "X"})}
    if time is not None:
        coords[tname] = (tname, np.asarray(time.values), dict(time.attrs))
    base = {k: v for k, v in (meta.get("attrs") or {}).items()
            if k in ("standard_name", "long_name", "units")}
    if meta.get("units") is not None:
        base["units"] = meta["units"]

    def var(data, extra_dims, method, what):
        attrs = dict(base, cell_methods=method,
                     long_name=f"{what} of {base.get('long_name', name)}")
        return (extra_dims + dims, data, attrs)

    data = {f"{name}_mean": var(layout(mean), [], "realization: mean", "posterior mean"),
            f"{name}_std": var(layout(std), [], "realization: standard_deviation",
                               "posterior standard deviation")}
    if quant is not None:
        data[f"{name}_quantile"] = var(layout(quant), ["quantile"], "realization: point",
                                       "posterior quantiles")
        coords["quantile"] = ("quantile", q, {"long_name": "quantile level of the posterior samples",
                                              "units": "1"})
    if samples is not None:
        sdim = "realization" if tname != "realization" else "posterior_sample"
        data[f"{name}_samples"] = var(layout(samples), [sdim], "realization: point",
                                      "posterior samples")
        coords[sdim] = (sdim, np.arange(len(samples)), {"long_name": "posterior sample",
                                                        "standard_name": "realization",
                                                        "units": "1"})
    ds = xr.Dataset(data, coords=coords)
    if time is None:
        ds = ds.squeeze(tname, drop=True)
    else:
        ds[tname].encoding.update({k: v for k, v in time.encoding.items()
                                   if k in ("units", "calendar", "dtype")})
    ds.attrs = {"Conventions": "CF-1.8", "history": history,
                "source": f"geodiff posterior of {meta.get('source') or name}"}
    return ds


def _write_ply(path, mesh: Mesh, mean, std):
    import trimesh

    tm = trimesh.Trimesh(mesh.vertices, mesh.faces, process=False)
    T = mean.shape[0]
    for t in range(T):
        suffix = "" if T == 1 else f"_{t}"
        tm.vertex_attributes[f"mean{suffix}"] = mean[t, :, 0]
        tm.vertex_attributes[f"std{suffix}"] = std[t, :, 0]
    data = tm.export(file_type="ply", encoding="binary", include_attributes=True)

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
    atomic_write(path, write)


__all__ = ["read_field", "write_posterior", "write_summary"]
