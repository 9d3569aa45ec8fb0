"""Global 2 m / surface temperature on the sphere: GloSea4 fields (offline), the "ERA5-like
(GloSea4-anchored)" training set built from them, and loaders for the real ERA5 data of the paper.

Offline, the only real global temperature fields are the 78 GloSea4 monthly means shipped in the
``iris-sample-data`` package (13 ensemble members × 6 months, Aug 2011 – Jan 2012, 145×192, Kelvin).
They are read with a small numpy PP reader (:func:`read_pp`), regridded to the GASP lat-lon grid
(:func:`glosea4_fields`) and split by ensemble member (:func:`glosea4_split`). 78 fields are too few
to train a prior on, so :func:`era5_like` draws an "ERA5-like (GloSea4-anchored)" training set from
the *train* members only (month means + leading EOFs + small smooth noise on the sphere). Always
label results on it as such, and evaluate on the held-out real fields.

The paper's real ERA5 set (GASP's ``era5_temp2m_16x_*`` folders) needs the internet to obtain (see
``data_recipes/download_gasp_era5.md``); :func:`load_gasp_era5` reads it and
:func:`load_era5_xarray` reads ERA5 from other sources (netCDF / xarray) on a matching grid.

Normalisation follows GASP: ``x = (T − 202.66 K) / (320.93 K − 202.66 K)``, the min and max of the
GASP ERA5 training set. Other data may fall slightly outside [0, 1]; that is never rejected.

Dimension letters: N samples (fields), V = nlat·nlon vertices of ``Sphere.latlon(nlat, nlon)``
(4140 by default), M ensemble members (13), T months (6), K EOFs or eigenpairs.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import re
from pathlib import Path

import numpy as np

from geodiff._cache import atomic_savez, cache_dir, content_hash
from geodiff.manifolds.sphere import Sphere

__all__ = [
    "GASP_TMAX",
    "GASP_TMIN",
    "denormalize",
    "era5_like",
    "glosea4_fields",
    "glosea4_split",
    "glosea4_split_info",
    "load_era5_xarray",
    "load_gasp_era5",
    "normalize",
    "read_pp",
]

#: Minimum and maximum temperature (K) of GASP's ERA5 training set; the normalisation constants.
GASP_TMIN = 202.66
GASP_TMAX = 320.93

#: Bump when a change to the GloSea4 regridding invalidates cached fields.
_GLOSEA4_VERSION = "1"
#: Member positions (in the sorted file list) of each split.
_SPLITS = {"train": tuple(range(0, 9)), "val": (9,), "test": (10, 11, 12), "all": tuple(range(13))}
#: Eigenpairs used for the smooth noise of :func:`era5_like` (complete shells l ≤ 15 on a fine grid).
_NOISE_MODES = 256
#: Sample chunk size in :func:`era5_like` (bounds the float64 work memory to ~35 MB at V = 4140).
_CHUNK = 1024

# Indirection so tests can simulate a missing package.
_find_spec = importlib.util.find_spec


# ----------------------------------------------------------------------------- normalisation
def normalize(kelvin):
    """Temperature in Kelvin → GASP-normalized units ``(T − 202.66) / (320.93 − 202.66)``.

    Args:
        kelvin: array (any shape) in K.

    Returns:
        Array of the same shape, dimensionless; not clipped (values may leave [0, 1] slightly).
    """
    return (np.asarray(kelvin) - GASP_TMIN) / (GASP_TMAX - GASP_TMIN)


def denormalize(x):
    """GASP-normalized units → Kelvin; the inverse of :func:`normalize`.

    Args:
        x: array (any shape), dimensionless.

    Returns:
        Array of the same shape in K.
    """
    return np.asarray(x) * (GASP_TMAX - GASP_TMIN) + GASP_TMIN


# ------------------------------------------------------------------------------ PP reader
def _records(path: Path, buf: bytes):
    """Yield the payloads of the Fortran unformatted (big-endian, 4-byte markers) records."""
    pos, n = 0, len(buf)
    while pos < n:
        if pos + 4 > n:
            raise ValueError(f"{path}: truncated record marker at byte {pos}; not a PP file "
                             "(Fortran unformatted big-endian records expected)")
        size = int(np.frombuffer(buf, ">i4", 1, pos)[0])
        end = pos + 4 + size
        if size < 0 or end + 4 > n:
            raise ValueError(f"{path}: record at byte {pos} claims {size} bytes but the file has "
                             f"{n} bytes; not a PP file (Fortran unformatted big-endian records expected)")
        if int(np.frombuffer(buf, ">i4", 1, end)[0]) != size:
            raise ValueError(f"{path}: record at byte {pos} has mismatched leading/trailing length "
                             "markers; not a PP file (Fortran unformatted big-endian records expected)")
        yield pos, buf[pos + 4:end]
        pos = end + 4


def read_pp(path) -> list[dict]:
    """Read an unpacked UM "PP" file (e.g. the GloSea4 sample data) with numpy only.

    A PP file is a sequence of Fortran unformatted big-endian records, alternating a 64-word header
    (45 ``>i4`` then 19 ``>f4``) and a ``>f4`` data record of ``LBROW·LBNPT`` values. Used header
    words (1-based): LBYR 1, LBMON 2, LBROW 18, LBNPT 19, LBPACK 21 (must be 0, unpacked), LBUSER1 39
    (data type; integer/logical data are rejected), STASH (LBUSER4) 42, BZY 59, BDY 60, BZX 61,
    BDX 62, BMDI 63 (missing-data value).

    Args:
        path: path of the ``.pp`` file.

    Returns:
        One dict per field, in file order, with keys ``stash`` (int), ``year`` (int), ``month``
        (int, 1–12), ``lat`` (rows,) float64 degrees ``BZY + BDY·(1..rows)``, ``lon`` (cols,)
        float64 degrees ``BZX + BDX·(1..cols)``, ``data`` (rows, cols) float64 in the file's units,
        with missing values (``BMDI``) as NaN.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a PP file (bad record structure, header length, or data length),
            is packed (LBPACK ≠ 0), holds integer/logical data, or has no field.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path {str(path)!r} does not exist or is not a file")
    buf = path.read_bytes()
    fields, header = [], None
    for pos, rec in _records(path, buf):
        if header is None:
            if len(rec) != 256:
                raise ValueError(f"{path}: header record at byte {pos} has {len(rec)} bytes, expected "
                                 "256 (45 int32 + 19 float32 words); not a PP file")
            ints = np.frombuffer(rec, ">i4", 45, 0)
            reals = np.frombuffer(rec, ">f4", 19, 180)
            header = (pos, ints, reals)
            continue
        hpos, ints, reals = header
        header = None
        rows, cols, pack = int(ints[17]), int(ints[18]), int(ints[20])
        if pack != 0:
            raise ValueError(f"{path}: field at byte {hpos} is packed (LBPACK={pack}); only unpacked "
                             "(LBPACK=0) PP files are supported")
        if int(ints[38]) in (2, 3):
            raise ValueError(f"{path}: field at byte {hpos} holds integer/logical data "
                             f"(LBUSER1={int(ints[38])}); only real data are supported")
        if rows <= 0 or cols <= 0 or len(rec) != 4 * rows * cols:
            raise ValueError(f"{path}: data record after the header at byte {hpos} has {len(rec)} "
                             f"bytes, expected 4·LBROW·LBNPT = 4·{rows}·{cols}; not a PP file or an "
                             "unsupported grid")
        raw = np.frombuffer(rec, ">f4").reshape(rows, cols)
        bzy, bdy, bzx, bdx, bmdi = (float(v) for v in reals[13:18])
        data = raw.astype(np.float64)
        data[raw == np.float32(bmdi)] = np.nan
        fields.append({
            "stash": int(ints[41]),
            "year": int(ints[0]),
            "month": int(ints[1]),
            "lat": bzy + bdy * np.arange(1, rows + 1, dtype=np.float64),
            "lon": bzx + bdx * np.arange(1, cols + 1, dtype=np.float64),
            "data": data,
        })
    if header is not None:
        raise ValueError(f"{path}: header record at byte {header[0]} has no data record; "
                         "truncated or not a PP file")
    if not fields:
        raise ValueError(f"{path}: no records; not a PP file")
    return fields


# ------------------------------------------------------------------------------- GloSea4
def _glosea4_files() -> list[Path]:
    """The 13 GloSea4 ensemble files in ``iris-sample-data``, sorted by name."""
    spec = _find_spec("iris_sample_data")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "The GloSea4 temperature fields come from the 'iris-sample-data' package, which is not "
            "installed: pip install iris-sample-data")
    folder = Path(list(spec.submodule_search_locations)[0]) / "sample_data" / "GloSea4"
    files = sorted(folder.glob("ensemble_*.pp"))
    if len(files) != 13:
        raise FileNotFoundError(f"expected 13 GloSea4 files ensemble_*.pp in {folder}, found "
                                f"{len(files)}; reinstall with: pip install --force-reinstall "
                                "iris-sample-data")
    return files


def _member_id(path: Path) -> int:
    m = re.fullmatch(r"ensemble_(\d+)\.pp", path.name)
    if m is None:
        raise ValueError(f"{path}: unexpected GloSea4 file name (expected ensemble_NNN.pp)")
    return int(m.group(1))


def _linear_weights(src: np.ndarray, dst: np.ndarray, *, period: float | None = None):
    """Indices and weights of 1-D linear interpolation from ascending ``src`` to ``dst`` points.

    With ``period`` the axis is periodic (``src`` covers one period, ``dst`` is taken modulo it).

    Returns:
        i0, i1 (len(dst),) int indices into ``src`` and w (len(dst),) weights; the interpolant is
        ``(1−w)·f[i0] + w·f[i1]``.
    """
    n = len(src)
    if period is not None:
        ext = np.concatenate([src, [src[0] + period]])
        d = np.mod(dst - src[0], period) + src[0]
    else:
        ext = src
        d = dst
        if d.min() < src[0] - 1e-9 or d.max() > src[-1] + 1e-9:
            raise ValueError("target latitudes fall outside the source grid")
    i0 = np.clip(np.searchsorted(ext, d, side="right") - 1, 0, len(ext) - 2)
    w = np.clip((d - ext[i0]) / (ext[i0 + 1] - ext[i0]), 0.0, 1.0)
    i1 = i0 + 1
    if period is not None:
        i1 = i1 % n
    return i0, i1, w


def _regrid_bilinear(data: np.ndarray, lat: np.ndarray, lon: np.ndarray, sphere: Sphere) -> np.ndarray:
    """Bilinear regrid (..., rows, cols) on ascending lat/lon to the sphere's (..., nlat, nlon)."""
    if not (np.all(np.diff(lat) > 0) and np.all(np.diff(lon) > 0)):
        raise ValueError("source latitudes and longitudes must be strictly ascending")
    period = 360.0
    if lon[-1] - lon[0] >= period:
        raise ValueError("source longitudes span a full period or more")
    a0, a1, wa = _linear_weights(lat, sphere.latitude)
    o0, o1, wo = _linear_weights(lon, sphere.longitude, period=period)
    rows = data[..., a0, :] * (1 - wa)[:, None] + data[..., a1, :] * wa[:, None]
    return rows[..., o0] * (1 - wo) + rows[..., o1] * wo


def glosea4_fields(*, nlat: int = 46, nlon: int = 90) -> dict:
    """The 78 GloSea4 surface-temperature fields regridded to the GASP lat-lon grid.

    Source: ``iris-sample-data``'s ``GloSea4/ensemble_{000..005,007..013}.pp`` (13 ensemble members ×
    6 monthly means, Aug 2011 – Jan 2012, STASH 24 surface temperature, 145×192 grid, K). Regridding
    is bilinear in (latitude, longitude) degrees onto ``Sphere.latlon(nlat, nlon)``: linear in
    latitude (the source includes both poles, so no extrapolation), linear and *periodic* in
    longitude (the target's last longitudes interpolate between the source's last column and its
    first column + 360°). Bilinear, not conservative: at 4° target spacing vs 1.25°/1.875° source
    spacing it slightly smooths but keeps the range; it is our choice, the paper does not regrid.

    The result is cached as ``.npz`` in ``cache_dir("data")``, keyed by a hash of the source files'
    names and sizes and of ``nlat, nlon`` (written atomically).

    Args:
        nlat: number of target latitudes (90 → −90, poles included), ≥ 3.
        nlon: number of target longitudes (0 → 360 − 360/nlon), ≥ 3.

    Returns:
        dict with ``kelvin`` (M=13, T=6, nlat, nlon) float64 in K, ``members`` (13,) int file ids
        (0..5, 7..13), ``months`` (6,) str ``'YYYY-MM'``, ``latitude`` (nlat,) and ``longitude``
        (nlon,) degrees.

    Raises:
        ModuleNotFoundError: ``iris-sample-data`` is not installed.
        FileNotFoundError: its GloSea4 files are missing.
        ValueError: ``nlat``/``nlon`` invalid, or the files are not the expected fields.
    """
    sphere = Sphere.latlon(nlat, nlon)  # validates nlat, nlon
    files = _glosea4_files()
    key = content_hash(np.array([f.name for f in files]), np.array([f.stat().st_size for f in files]),
                       np.array([nlat, nlon]), salt=f"glosea4-v{_GLOSEA4_VERSION}")
    path = cache_dir("data") / f"glosea4_{nlat}x{nlon}_{key}.npz"
    if path.exists():
        with np.load(path) as f:
            return {k: f[k] for k in ("kelvin", "members", "months", "latitude", "longitude")}
    kelvin, months = [], None
    for file in files:
        recs = read_pp(file)
        these = [f"{r['year']:04d}-{r['month']:02d}" for r in recs]
        if months is None:
            months = these
            lat, lon = recs[0]["lat"], recs[0]["lon"]
        if these != months or len(recs) != 6:
            raise ValueError(f"{file}: months {these} differ from the other members' {months} "
                             "(6 monthly fields expected)")
        for r in recs:
            if r["stash"] != 24 or r["data"].shape != (len(lat), len(lon)):
                raise ValueError(f"{file}: field STASH {r['stash']} shape {r['data'].shape}, expected "
                                 f"STASH 24 (surface temperature) on a {len(lat)}×{len(lon)} grid")
            if not np.all(np.isfinite(r["data"])):
                raise ValueError(f"{file}: field {r['year']}-{r['month']:02d} has missing values")
        kelvin.append(np.stack([r["data"] for r in recs]))
    kelvin = _regrid_bilinear(np.stack(kelvin), lat, lon, sphere)
    out = {"kelvin": kelvin, "members": np.array([_member_id(f) for f in files], dtype=np.int64),
           "months": np.array(months), "latitude": sphere.latitude, "longitude": sphere.longitude}
    atomic_savez(path, **out)
    return out


def _split_positions(split: str) -> tuple[int, ...]:
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {sorted(_SPLITS)}, got {split!r}")
    return _SPLITS[split]


def glosea4_split(split: str, *, nlat: int = 46, nlon: int = 90) -> np.ndarray:
    """Real GloSea4 fields of one split, normalized, in the vertex layout of ``Sphere.latlon``.

    Splits are by whole ensemble member (position in the sorted file list): ``"train"`` = positions
    0–8 (files 000–005, 007–009; 54 fields), ``"val"`` = 9 (file 010; 6 fields), ``"test"`` = 10–12
    (files 011–013; 18 fields), ``"all"`` = all 78. Order: member-major, month-minor (see
    :func:`glosea4_split_info`).

    Args:
        split: ``"train"``, ``"val"``, ``"test"`` or ``"all"``.
        nlat: target grid rows (see :func:`glosea4_fields`).
        nlon: target grid columns.

    Returns:
        (N, V, 1) float32, GASP-normalized (:func:`normalize`), V = nlat·nlon.

    Raises:
        ValueError: unknown ``split``.
    """
    pos = list(_split_positions(split))
    kelvin = glosea4_fields(nlat=nlat, nlon=nlon)["kelvin"][pos]  # (m, 6, nlat, nlon)
    return normalize(kelvin.reshape(-1, nlat * nlon, 1)).astype(np.float32)


def glosea4_split_info(split: str) -> list[tuple[int, str]]:
    """Which field is which in :func:`glosea4_split`: ``(member_file_id, 'YYYY-MM')`` per row.

    Args:
        split: ``"train"``, ``"val"``, ``"test"`` or ``"all"``.

    Returns:
        List of N tuples, member-major and month-minor, e.g. ``(10, '2011-08')`` for the first
        validation field.

    Raises:
        ValueError: unknown ``split``.
    """
    pos = _split_positions(split)
    f = glosea4_fields()
    members, months = f["members"].tolist(), [str(m) for m in f["months"]]
    return [(members[p], m) for p in pos for m in months]


# ------------------------------------------------------------------- ERA5-like training set
@functools.lru_cache(maxsize=8)
def _era5_like_model(nlat: int, nlon: int, n_eofs: int, noise_length: float):
    """Month means (6, V), scaled EOFs (K, V) and noise basis (Kn, V) with unit RMS pointwise std.

    Built only from the train split, in normalized units (float64, read-only arrays).
    """
    x = glosea4_split("train", nlat=nlat, nlon=nlon).astype(np.float64)[..., 0]  # (54, V)
    n_members = len(_SPLITS["train"])
    x = x.reshape(n_members, 6, -1)
    means = x.mean(axis=0)  # (6, V)
    anom = (x - means).reshape(n_members * 6, -1)
    _, s, vt = np.linalg.svd(anom, full_matrices=False)
    scale = s[:n_eofs] / math.sqrt(anom.shape[0] - 6)  # std of the anomaly along each EOF
    eofs = scale[:, None] * vt[:n_eofs]  # (K, V)
    sphere = Sphere.latlon(nlat, nlon)
    k = min(_NOISE_MODES, sphere.max_eigenpairs // 2)
    evals, evecs = sphere.eigenpairs(k)  # evecsᵀ M evecs = I
    amp = (1.0 + noise_length**2 * evals) ** -2.0  # Matérn-like (ν = 3 on a 2-D surface) amplitudes
    # Mean pointwise variance over the area: Σ amp² ∫φ² / area = Σ amp² / area → scale to 1.
    amp = amp / math.sqrt(np.sum(amp**2) / sphere.area)
    noise = amp[:, None] * evecs.T  # (Kn, V)
    for a in (means, eofs, noise):
        a.setflags(write=False)
    return means, eofs, noise


def _check_nonneg(name: str, value, *, positive: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v < 0 or (positive and v == 0):
        raise ValueError(f"{name} must be {'> 0' if positive else '≥ 0'} and finite, got {value!r}")
    return v


def era5_like(seed, n: int, *, nlat: int = 46, nlon: int = 90, n_eofs: int = 20,
              eof_scale: float = 1.0, noise_std: float = 0.004,
              noise_length: float = 0.15) -> np.ndarray:
    """Draw the "ERA5-like (GloSea4-anchored)" training set (label it so everywhere).

    Built ONLY from the 54 train fields of :func:`glosea4_split` (never val/test). Each sample is

        x = season(t) + Σ_k c_k s_k e_k + ε,

    * season: t ~ U(0, 5) is a continuous position along the 6 training month means
      (Aug 2011 … Jan 2012), linearly interpolated between adjacent months;
    * e_k, s_k: the leading ``n_eofs`` EOFs of the train anomalies (fields minus their month mean)
      and their standard deviations ``singular value / sqrt(54 − 6)``; c_k ~ N(0, eof_scale²)
      (``eof_scale = 1`` reproduces the anomaly variance along each EOF);
    * ε: a smooth Gaussian random field on the sphere, Σ_j a_j z_j φ_j over the first 256 (or
      fewer on coarse grids) Laplace–Beltrami eigenpairs (λ_j, φ_j) of ``Sphere.latlon(nlat, nlon)``,
      z_j ~ N(0, 1), a_j ∝ (1 + ℓ²λ_j)^(−2) (Matérn-like, ℓ = ``noise_length``), scaled so that the
      area-weighted mean pointwise variance is ``noise_std²``.

    No longitude shifts (land/sea stays fixed). Values are normalized units and may leave [0, 1].

    Args:
        seed: int ≥ 0 or ``numpy.random.Generator`` (used and advanced). Same int → same samples.
        n: number of samples, ≥ 0.
        nlat: lat-lon grid rows (see :func:`glosea4_fields`).
        nlon: lat-lon grid columns.
        n_eofs: number of EOFs, 0 ≤ n_eofs ≤ 48 (the anomalies' rank).
        eof_scale: standard deviation of the EOF coefficients c_k, ≥ 0.
        noise_std: RMS pointwise std of ε in normalized units (0.004 ≈ 0.47 K), ≥ 0.
        noise_length: ℓ, the noise correlation length in unit-sphere radians (0.15 ≈ 8.6°), > 0.

    Returns:
        (n, V, 1) float32, V = nlat·nlon, GASP-normalized.

    Raises:
        ValueError: an argument out of range.
    """
    if isinstance(seed, np.random.Generator):
        rng = seed
    elif isinstance(seed, (int, np.integer)) and not isinstance(seed, bool) and seed >= 0:
        rng = np.random.default_rng(int(seed))
    else:
        raise ValueError(f"seed must be an int ≥ 0 or a numpy.random.Generator, got {seed!r}")
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n must be an int ≥ 0, got {n!r}")
    n_anom_rank = len(_SPLITS["train"]) * 6 - 6
    if (not isinstance(n_eofs, (int, np.integer)) or isinstance(n_eofs, bool)
            or not 0 <= n_eofs <= n_anom_rank):
        raise ValueError(f"n_eofs must be an int in [0, {n_anom_rank}], got {n_eofs!r}")
    eof_scale = _check_nonneg("eof_scale", eof_scale)
    noise_std = _check_nonneg("noise_std", noise_std)
    noise_length = _check_nonneg("noise_length", noise_length, positive=True)
    Sphere.latlon(nlat, nlon)  # validates nlat, nlon before any work
    means, eofs, noise = _era5_like_model(int(nlat), int(nlon), int(n_eofs), noise_length)
    out = np.empty((n, means.shape[1], 1), dtype=np.float32)
    for start in range(0, n, _CHUNK):
        m = min(_CHUNK, n - start)
        t = rng.uniform(0.0, 5.0, size=m)
        i = np.minimum(np.floor(t).astype(np.int64), 4)
        w = (t - i)[:, None]
        x = (1.0 - w) * means[i] + w * means[i + 1]
        x += (eof_scale * rng.standard_normal((m, len(eofs)))) @ eofs
        x += (noise_std * rng.standard_normal((m, len(noise)))) @ noise
        out[start:start + m, :, 0] = x
    return out


# ------------------------------------------------------------------ real ERA5 (online users)
def load_gasp_era5(folder, *, normalized: bool = True) -> np.ndarray:
    """Read one of GASP's ``era5_temp2m_16x_{train,val,test}`` folders (the paper's ERA5 data).

    Each ``.npz`` file holds ``latitude`` (46,) 90 → −90, ``longitude`` (90,) 0 → 356 and
    ``temperature`` (46, 90) in K. Files are read in sorted file-name order. Getting the data needs
    the internet: see ``data_recipes/download_gasp_era5.md``.

    Args:
        folder: the folder of ``.npz`` files.
        normalized: return GASP-normalized values (:func:`normalize`) instead of Kelvin.

    Returns:
        (N, 4140, 1) float32 in the vertex layout of ``Sphere.latlon()``; normalized or K.

    Raises:
        FileNotFoundError: ``folder`` does not exist or holds no ``.npz`` file.
        ValueError: a file (named in the message) lacks a key, has the wrong shape, coordinates
            that differ from ``Sphere.latlon()``, or non-finite temperatures.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"folder {str(folder)!r} does not exist or is not a folder")
    files = sorted(folder.glob("*.npz"))
    if not files:
        raise FileNotFoundError(f"folder {str(folder)!r} holds no .npz file")
    sphere = Sphere.latlon()
    nlat, nlon = sphere.layout_shape
    out = np.empty((len(files), nlat * nlon, 1), dtype=np.float32)
    for j, file in enumerate(files):
        with np.load(file) as f:
            missing = [k for k in ("latitude", "longitude", "temperature") if k not in f.files]
            if missing:
                raise ValueError(f"{file}: missing key(s) {missing} (has {f.files})")
            lat, lon, temp = (np.asarray(f[k], dtype=np.float64)
                              for k in ("latitude", "longitude", "temperature"))
        if lat.shape != (nlat,) or not np.allclose(lat, sphere.latitude, atol=1e-4):
            raise ValueError(f"{file}: latitude must be the {nlat} values 90 → −90 of Sphere.latlon(), "
                             f"got shape {lat.shape} from {lat.ravel()[:1]} to {lat.ravel()[-1:]}")
        if lon.shape != (nlon,) or not np.allclose(lon, sphere.longitude, atol=1e-4):
            raise ValueError(f"{file}: longitude must be the {nlon} values 0 → {sphere.longitude[-1]:g} "
                             f"of Sphere.latlon(), got shape {lon.shape} from {lon.ravel()[:1]} to "
                             f"{lon.ravel()[-1:]}")
        if temp.shape != (nlat, nlon):
            raise ValueError(f"{file}: temperature must have shape ({nlat}, {nlon}), got {temp.shape}")
        if not np.all(np.isfinite(temp)):
            raise ValueError(f"{file}: temperature has NaN or infinite values")
        out[j, :, 0] = normalize(temp).ravel() if normalized else temp.ravel()
    return out


_KELVIN_UNITS = ("K", "k", "kelvin", "Kelvin", "degK", "deg_K")
_TIME_DIMS = ("time", "valid_time")


def load_era5_xarray(source, *, variable: str | None = None, sphere: Sphere | None = None,
                     normalized: bool = True) -> np.ndarray:
    """Read temperature on a lat-lon grid from a netCDF file or an xarray object (no regridding).

    Coordinates may be named ``latitude``/``longitude`` or ``lat``/``lon``; latitude may run either
    way and longitude may be in [0, 360) or [−180, 180): :meth:`Sphere.from_xarray` matches them to
    the grid exactly and raises on any other mismatch (regrid beforehand, e.g. with xarray's
    ``interp``). A ``time`` (or ``valid_time``) dimension becomes the sample dimension.

    Args:
        source: path of a netCDF file, an ``xarray.Dataset`` or an ``xarray.DataArray``; values in K
            (a ``units`` attribute, if present, must say Kelvin).
        variable: the data variable of a Dataset; if None the Dataset must have exactly one.
        sphere: a lat-lon :class:`Sphere`; default ``Sphere.latlon(nlat, nlon)`` with the data's
            grid size (the GASP layout 90 → −90, 0 → 360 − 360/nlon).
        normalized: return GASP-normalized values (:func:`normalize`) instead of Kelvin.

    Returns:
        (N, V, 1) float32 in the sphere's vertex layout; N = 1 without a time dimension.

    Raises:
        FileNotFoundError: ``source`` is a path that does not exist.
        ValueError: ``variable`` missing or ambiguous, unexpected dims, non-Kelvin units,
            coordinates that do not match ``sphere``, or non-finite values.
        TypeError: ``source`` or ``sphere`` of the wrong type.
    """
    import xarray as xr

    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"source {str(path)!r} does not exist or is not a file")
        with xr.open_dataset(path) as ds:
            return load_era5_xarray(ds.load(), variable=variable, sphere=sphere, normalized=normalized)
    if isinstance(source, xr.Dataset):
        names = [str(v) for v in source.data_vars]
        if variable is None:
            if len(names) != 1:
                raise ValueError(f"source has data variables {names}; pass variable= to choose one")
            variable = names[0]
        elif variable not in source.data_vars:
            raise ValueError(f"variable {variable!r} is not in source; data variables: {names}")
        da = source[variable]
    elif isinstance(source, xr.DataArray):
        da = source
    else:
        raise TypeError(f"source must be a path, an xarray.Dataset or an xarray.DataArray, "
                        f"got {type(source).__name__}")
    units = da.attrs.get("units")
    if units is not None and str(units).strip() not in _KELVIN_UNITS:
        raise ValueError(f"source's temperature has units {units!r}; Kelvin ('K') expected")
    renames = {}
    for short, long in (("lat", "latitude"), ("lon", "longitude")):
        if short in da.dims and long not in da.dims:
            renames[short] = long
    times = [d for d in da.dims if d in _TIME_DIMS]
    if len(times) > 1:
        raise ValueError(f"source has several time dims {times}; select one first")
    if times:
        if da.dims[0] != times[0]:
            raise ValueError(f"source's time dim {times[0]!r} must be the leading dim, dims are {da.dims}")
        renames[times[0]] = "sample"
    da = da.rename(renames)
    # Drop non-index coordinates whose names might clash (e.g. 'lat' kept as a coordinate).
    da = da.reset_coords(drop=True)
    if sphere is None:
        if "latitude" not in da.dims or "longitude" not in da.dims:
            raise ValueError(f"source must have latitude/longitude (or lat/lon) dims, got {da.dims}")
        sphere = Sphere.latlon(da.sizes["latitude"], da.sizes["longitude"])
    elif not isinstance(sphere, Sphere) or sphere.kind != "latlon":
        raise TypeError(f"sphere must be a lat-lon Sphere (Sphere.latlon), got {sphere!r}")
    x = sphere.from_xarray(da)
    if x.ndim == 2:
        x = x[None]
    if not np.all(np.isfinite(x)):
        raise ValueError("source has NaN or infinite values")
    return (normalize(x) if normalized else x).astype(np.float32)
