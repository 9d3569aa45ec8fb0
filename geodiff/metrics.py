"""Reconstruction metrics. All take (..., V, C) arrays in the vertex layout and return (...,).

PSNR and SSIM follow the paper's definitions on the *user layout* (data range 1 for normalized
data); area-weighted RMSE integrates with the manifold's mass so it does not depend on resolution.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

from geodiff.manifolds import Grid, Manifold, Sphere


def _real(a, name: str) -> np.ndarray:
    """``a`` as float64; a complex, string or object array, or an empty one, is an error."""
    a = np.asarray(a)
    if a.dtype.kind not in "fiub":
        raise TypeError(f"{name} must be a real-valued array, got dtype {a.dtype}")
    if a.size == 0:
        raise ValueError(f"{name} is empty (shape {a.shape})")
    return a.astype(np.float64)


def _pair(x, ref, manifold: Manifold | None = None):
    x, ref = _real(x, "x"), _real(ref, "ref")
    if ref.ndim < 2:
        raise ValueError(f"ref must have shape (..., V, C), got {ref.shape}")
    try:
        x, ref = np.broadcast_arrays(x, ref)
    except ValueError:
        raise ValueError(f"x {x.shape} and ref {ref.shape} must be broadcastable (..., V, C) arrays") from None
    if manifold is not None and x.shape[-2] != manifold.n_vertices:
        raise ValueError(f"x must have shape (..., {manifold.n_vertices}, C) for {manifold!r}, got {x.shape}")
    return x, ref


def _weights(weights, V: int):
    """Validated per-vertex weights (V,) float64, or None."""
    if weights is None:
        return None
    w = _real(weights, "weights")
    if w.shape != (V,):
        raise ValueError(f"weights must have shape ({V},) (one non-negative weight per vertex, e.g. "
                         f"manifold.mass), got {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError("weights must be finite and non-negative")
    if not np.any(w > 0):
        raise ValueError("weights must have at least one positive entry")
    return w


def _average(err, *, weights=None, where=None):
    """Mean of per-entry values ``err`` (..., V, C) over vertices and channels, shape (...,).

    ``weights`` (V,) weight each vertex (e.g. ``manifold.mass`` for an area average); ``where``
    (broadcastable to (..., V, C), bool) keeps only the selected entries (e.g. ``~mask`` for the
    missing points). Each element of the batch needs at least one selected entry of positive weight.
    """
    V, C = err.shape[-2:]
    w = np.ones(V) if weights is None else _weights(weights, V)
    w = np.broadcast_to(w[:, None], (V, C))
    if where is not None:
        sel = np.asarray(where)
        if sel.dtype != bool:
            raise TypeError(f"where must be a boolean array (True = score this entry), got dtype "
                            f"{sel.dtype}")
        try:
            sel = np.broadcast_to(sel, err.shape)
        except ValueError:
            raise ValueError(f"where must be broadcastable to {err.shape} ((..., V, 1) or "
                             f"(..., V, C)), got {sel.shape}") from None
        w = w * sel
    else:
        w = np.broadcast_to(w, err.shape)
    total = w.sum(axis=(-2, -1))
    if np.any(total <= 0):
        raise ValueError("where/weights select no entry of positive weight for some signals")
    return (w * err).sum(axis=(-2, -1)) / total


def mse(x, ref, *, weights=None, where=None):
    """Mean squared error over vertices and channels, shape (...,).

    Args:
        x: (..., V, C) array.
        ref: (..., V, C) reference, broadcastable with ``x``.
        weights: optional (V,) non-negative per-vertex weights (``manifold.mass``: area-weighted).
        where: optional bool (..., V, 1) or (..., V, C): score only these entries.
    """
    x, ref = _pair(x, ref)
    return _average((x - ref) ** 2, weights=weights, where=where)


def psnr(x, ref, *, data_range: float = 1.0, weights=None, where=None):
    """Peak signal-to-noise ratio 10·log10(data_range² / MSE) in dB, shape (...,).

    On every manifold of geodiff the user layout holds the same entries as the vertex layout, so
    without ``weights``/``where`` this equals the PSNR of the image / lat-lon grid. ``weights``
    and ``where`` as in :func:`mse` (the MSE is then weighted and restricted).
    """
    return 10 * np.log10(data_range**2 / mse(x, ref, weights=weights, where=where))


def area_rmse(x, ref, manifold: Manifold):
    """Area-weighted RMSE √(∫|x − ref|² dA / (area·C)), in the units of the data, shape (...,)."""
    x, ref = _pair(x, ref, manifold)
    w = manifold.mass / manifold.area
    return np.sqrt(np.einsum("v,...vc->...", w, (x - ref) ** 2) / x.shape[-1])


def ssim(x, ref, manifold: Manifold, *, data_range: float = 1.0, sigma: float = 1.5):
    """Structural similarity (Wang et al. 2004) on the 2-D user layout, shape (...,).

    Gaussian window (std ``sigma`` pixels, truncated at 3.5 std), K1 = 0.01, K2 = 0.03, population
    statistics, mean over pixels and channels — scikit-image's
    ``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``,
    including its border crop. Borders are reflected (longitude is *not* treated as periodic).

    Args:
        x: (..., V, C) on a :class:`Grid` or a lat-lon :class:`Sphere`.
        ref: (..., V, C) reference, on the same manifold.
        manifold: the manifold (defines the 2-D layout).

    Raises:
        ValueError: a manifold without a 2-D layout (meshes, HEALPix).
    """
    if not (isinstance(manifold, Grid) or (isinstance(manifold, Sphere) and manifold.kind == "latlon")):
        raise ValueError(f"ssim needs a 2-D layout (Grid or lat-lon Sphere), got {manifold!r}")
    x, ref = _pair(x, ref, manifold)
    a, b = manifold.to_layout(x), manifold.to_layout(ref)  # (..., H, W, C)
    sig = [0.0] * (a.ndim - 3) + [sigma, sigma, 0.0]
    f = lambda z: gaussian_filter(z, sig, mode="reflect", truncate=3.5)  # noqa: E731
    mu_a, mu_b = f(a), f(b)
    va, vb, cov = f(a * a) - mu_a**2, f(b * b) - mu_b**2, f(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (va + vb + c2))
    pad = int(3.5 * sigma + 0.5)
    return s[..., pad:-pad, pad:-pad, :].mean(axis=(-3, -2, -1))


def _samples_ref(samples, ref, min_samples: int = 1):
    samples, ref = _real(samples, "samples"), _real(ref, "ref")
    if ref.ndim < 2:
        raise ValueError(f"ref must have shape (..., V, C), got {ref.shape}")
    if samples.shape[1:] != ref.shape or samples.shape[0] < min_samples:
        raise ValueError(f"samples must have shape (S ≥ {min_samples}, *{ref.shape}), got "
                         f"{samples.shape}")
    return samples, ref


def coverage(samples, ref, *, level: float = 0.9, weights=None, where=None):
    """Fraction of true values inside the per-entry central ``level`` interval of the samples.

    Args:
        samples: (S, ..., V, C) posterior samples.
        ref: (..., V, C) truth.
        level: nominal probability of the interval, in (0, 1).
        weights: optional (V,) non-negative per-vertex weights (area-weighted with ``mass``).
        where: optional bool (..., V, 1) or (..., V, C): score only these entries.

    Returns:
        (...,) (weighted) fraction in [0, 1].
    """
    if not (isinstance(level, (int, float, np.floating)) and 0 < level < 1):
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    samples, ref = _samples_ref(samples, ref)
    lo, hi = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2], axis=0)
    inside = ((ref >= lo) & (ref <= hi)).astype(np.float64)
    return _average(inside, weights=weights, where=where)


def crps(samples, ref, *, fair: bool = False, weights=None, where=None):
    """Continuous ranked probability score from samples, averaged over entries (lower is better).

    CRPS = E|X − y| − ½ E|X − X'| per entry, with the exact sorted-sample formula for the second
    term (O(S log S)); units of the data. With ``fair=False`` the second term is the V-statistic
    (divides Σᵢⱼ|xᵢ − xⱼ| by 2M²: the CRPS of the empirical distribution of the M samples); with
    ``fair=True`` it is the U-statistic (divides by 2M(M − 1)), the unbiased estimator of the
    CRPS of the distribution the samples come from (Ferro 2014), so ensembles of different sizes
    compare fairly.

    Args:
        samples: (S, ..., V, C) posterior samples, S ≥ 2.
        ref: (..., V, C) truth.
        fair: the fair (unbiased) ensemble estimator.
        weights: optional (V,) non-negative per-vertex weights (area-weighted with ``mass``).
        where: optional bool (..., V, 1) or (..., V, C): score only these entries.

    Returns:
        (...,) (weighted) mean CRPS over vertices and channels.
    """
    samples, ref = _samples_ref(samples, ref, 2)
    S = samples.shape[0]
    term1 = np.abs(samples - ref).mean(axis=0)
    xs = np.sort(samples, axis=0)
    weights_s = (2 * np.arange(1, S + 1) - S - 1).reshape((S,) + (1,) * ref.ndim)
    # Σᵢⱼ |xᵢ − xⱼ| = 2 Σₖ (2k − S − 1) x₍ₖ₎
    term2 = (weights_s * xs).sum(axis=0) / (S * (S - 1) if fair else S**2)
    return _average(term1 - term2, weights=weights, where=where)


def crps_gaussian(mean, std, ref, *, weights=None, where=None):
    """Closed-form CRPS of per-entry Gaussians N(mean, std²) (Gneiting et al. 2005), averaged over
    entries like :func:`crps`: σ·[z(2Φ(z) − 1) + 2φ(z) − 1/√π], z = (y − μ)/σ. Units of the data.

    Args:
        mean: (..., V, C) predictive mean.
        std: (..., V, C) predictive standard deviation (std > 0).
        ref: (..., V, C) truth.
        weights: as in :func:`crps`.
        where: as in :func:`crps`.

    Returns:
        (...,).
    """
    from scipy.stats import norm

    mean, ref = _pair(mean, ref)
    std = np.broadcast_to(np.asarray(std, dtype=np.float64), ref.shape)
    if not np.all(std > 0):
        raise ValueError("std must be positive everywhere")
    z = (ref - mean) / std
    per = std * (z * (2 * norm.cdf(z) - 1) + 2 * norm.pdf(z) - 1 / np.sqrt(np.pi))
    return _average(per, weights=weights, where=where)
