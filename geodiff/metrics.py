"""Reconstruction metrics. All take (..., V, C) arrays in the vertex layout and return (...,).

PSNR and SSIM follow the paper's definitions on the *user layout* (data range 1 for normalized
data); area-weighted RMSE integrates with the manifold's mass so it does not depend on resolution.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

from geodiff.manifolds import Grid, Manifold, Sphere


def _pair(x, ref, manifold: Manifold | None = None):
    x, ref = np.asarray(x, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if ref.ndim < 2:
        raise ValueError(f"ref must have shape (..., V, C), got {ref.shape}")
    try:
        x, ref = np.broadcast_arrays(x, ref)
    except ValueError:
        raise ValueError(f"x {x.shape} and ref {ref.shape} must be broadcastable (..., V, C) arrays") from None
    if manifold is not None and x.shape[-2] != manifold.n_vertices:
        raise ValueError(f"x must have shape (..., {manifold.n_vertices}, C) for {manifold!r}, got {x.shape}")
    return x, ref


def mse(x, ref):
    """Mean squared error over vertices and channels, shape (...,)."""
    x, ref = _pair(x, ref)
    return ((x - ref) ** 2).mean(axis=(-2, -1))


def psnr(x, ref, *, data_range: float = 1.0):
    """Peak signal-to-noise ratio 10·log10(data_range² / MSE) in dB, shape (...,).

    On every manifold of geodiff the user layout holds the same entries as the vertex layout, so
    this equals the PSNR of the image / lat-lon grid.
    """
    return 10 * np.log10(data_range**2 / mse(x, ref))


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
        x, ref: (..., V, C) on a :class:`Grid` or a lat-lon :class:`Sphere`.
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


def coverage(samples, ref, *, level: float = 0.9):
    """Fraction of true values inside the per-entry central ``level`` interval of the samples.

    Args:
        samples: (S, ..., V, C) posterior samples.
        ref: (..., V, C) truth.

    Returns:
        (...,) fraction in [0, 1].
    """
    samples = np.asarray(samples, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if samples.shape[1:] != ref.shape:
        raise ValueError(f"samples must have shape (S, *{ref.shape}), got {samples.shape}")
    lo, hi = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2], axis=0)
    return ((ref >= lo) & (ref <= hi)).mean(axis=(-2, -1))


def crps(samples, ref):
    """Continuous ranked probability score from samples, averaged over entries (lower is better).

    CRPS = E|X − y| − ½ E|X − X'| per entry, with the exact sorted-sample formula for the second
    term (O(S log S)); units of the data.

    Args:
        samples: (S, ..., V, C) posterior samples, S ≥ 2.
        ref: (..., V, C) truth.

    Returns:
        (...,) mean CRPS over vertices and channels.
    """
    samples = np.asarray(samples, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if samples.shape[1:] != ref.shape or samples.shape[0] < 2:
        raise ValueError(f"samples must have shape (S ≥ 2, *{ref.shape}), got {samples.shape}")
    S = samples.shape[0]
    term1 = np.abs(samples - ref).mean(axis=0)
    xs = np.sort(samples, axis=0)
    weights = (2 * np.arange(1, S + 1) - S - 1).reshape((S,) + (1,) * ref.ndim)
    term2 = (weights * xs).sum(axis=0) / S**2  # = ½ E|X − X'| (V-statistic)
    return (term1 - term2).mean(axis=(-2, -1))
