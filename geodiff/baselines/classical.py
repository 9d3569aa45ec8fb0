"""The classical baselines a geoscientist would use: Gaussian optimal interpolation (kriging /
Wiener filter) and harmonic (Laplacian) interpolation.

Dimension letters: B batch (any leading dims), V vertices, C channels, D = V·C, R covariance rank,
S samples.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse.linalg as spla

from geodiff.manifolds import Manifold
from geodiff.operators import Denoise, LinearOperator, Mask, Measurement


def _selection(operator) -> bool:
    """True when A is a selection of entries (A Aᵀ diagonal), so Woodbury applies directly."""
    return isinstance(operator, (Denoise, Mask))


def kriging(operator: LinearOperator, measurement: Measurement, *, mean, cov_factor, nugget=0.0):
    """Posterior mean of x under the Gaussian prior ``N(mean, F Fᵀ + diag(nugget))`` and the
    linear-Gaussian likelihood of ``operator`` (σ = ``operator.sigma``): the Wiener filter /
    simple kriging estimate ``mean + C Aᵀ (A C Aᵀ + σ² I)⁻¹ (y − A mean)``.

    For masks and denoising the solve is exact in O(D R²) with the Woodbury identity; for other
    linear operators A is materialized as a dense matrix (fine up to a few thousand entries).

    Args:
        operator: a linear operator from :mod:`geodiff.operators`.
        measurement: its measurement, ``y`` (..., Vy, C).
        mean: prior mean, scalar or (V, C).
        cov_factor: F, (D, R) on the flattened (V, C) signal (see :func:`geodiff.amortized.gaussian_fit`).
        nugget: diagonal remainder, scalar or (V, C), ≥ 0.

    Returns:
        (..., V, C) posterior mean, batched like the measurement.
    """
    if not isinstance(operator, LinearOperator):
        raise TypeError(f"operator must be a linear operator, got {type(operator).__name__}")
    if not isinstance(measurement, Measurement):
        raise TypeError(f"measurement must be a Measurement, got {type(measurement).__name__}")
    y = measurement.y
    C = y.shape[-1]
    F = jnp.asarray(cov_factor)
    if F.ndim != 2:
        raise ValueError(f"cov_factor must have shape (V·C, R), got {F.shape}")
    D = F.shape[0]
    if D % C:
        raise ValueError(f"cov_factor has {D} rows, not a multiple of the {C} channels of y")
    V = D // C
    if operator.manifold is not None and operator.manifold.n_vertices != V:
        raise ValueError(f"cov_factor must have shape ({operator.manifold.n_vertices}·{C}, R) for "
                         f"the operator's manifold, got {F.shape}")
    dtype = jnp.result_type(y.dtype, jnp.float32)
    if np.ndim(mean) != 0 and tuple(np.shape(mean)) != (V, C):
        raise ValueError(f"mean must be a scalar or have shape ({V}, {C}), got {np.shape(mean)}")
    mu = jnp.broadcast_to(jnp.asarray(mean, dtype), (V, C))
    d = jnp.broadcast_to(jnp.asarray(nugget, dtype), (V, C)).reshape(D)
    if np.any(np.asarray(nugget) < 0):
        raise ValueError("nugget must be ≥ 0")
    F = F.astype(dtype)
    s2 = operator.sigma**2

    if _selection(operator):
        if operator.sigma == 0 and float(jnp.min(d)) == 0:
            raise ValueError("kriging with sigma = 0 needs nugget > 0 (the system is singular)")
    batch = measurement.batch_shape
    flat = jax.tree_util.tree_map(lambda a: a.reshape(-1, *a.shape[len(batch):]), measurement)
    if _selection(operator):
        out = _kriging_selection(mu, F, d, jnp.asarray(s2, dtype), flat.y, flat.mask)
    else:
        out = _kriging_dense(operator, mu, F, d, flat)
    return out.reshape(*batch, V, C)


@jax.jit
@functools.partial(jax.vmap, in_axes=(None, None, None, None, 0, 0))
def _kriging_selection(mu, F, d, s2, y, mask):
    """Woodbury solve for A = a selection of entries; y, mask (V, C), (V, 1)."""
    V, C = mu.shape
    w = jnp.broadcast_to(mask, (V, C)).reshape(-1) / (d + s2)
    wr = w * (y - jnp.where(mask, mu, 0.0)).reshape(-1)
    inner = jnp.eye(F.shape[1], dtype=F.dtype) + F.T @ (w[:, None] * F)
    alpha = wr - w * (F @ jnp.linalg.solve(inner, F.T @ wr))
    return mu + (F @ (F.T @ alpha) + d * alpha).reshape(V, C)


@functools.partial(jax.jit, static_argnums=0)
def _kriging_dense(operator, mu, F, d, measurements):
    """Dense solve in measurement space for a general linear A (materialized column by column)."""
    V, C = mu.shape
    D = V * C
    s2 = operator.sigma**2

    def one(m):
        eye = jnp.eye(D, dtype=F.dtype).reshape(D, V, C)
        A = jax.vmap(lambda e: operator.forward(e, m))(eye).reshape(D, -1).T  # (Dy, D)
        AF = A @ F
        K = AF @ AF.T + (A * d) @ A.T + s2 * jnp.eye(A.shape[0], dtype=F.dtype)
        resid = (m.y - operator.forward(mu, m)).reshape(-1)
        alpha = A.T @ jnp.linalg.solve(K, resid)
        return mu + (F @ (F.T @ alpha) + d * alpha).reshape(V, C)

    return jax.vmap(one)(measurements)


def harmonic(manifold: Manifold, operator, measurement: Measurement):
    """Harmonic (Laplacian) interpolation: keep the observed values, fill the missing vertices with
    the minimizer of the Dirichlet energy ∫|∇u|² (``(L u)_missing = 0``).

    On lat-lon spheres the solve runs on the duplicate-free mesh (a pole is observed if any of its
    copies is, with their mean value).

    Args:
        manifold: the manifold of the signal.
        operator: a masking operator (:class:`~geodiff.operators.Mask`,
            :class:`~geodiff.operators.RandomMask` or :class:`~geodiff.operators.Denoise`).
        measurement: ``y`` and ``mask`` (..., V, C) / (..., V, 1).

    Returns:
        (..., V, C) interpolated signal (NumPy float64).

    Raises:
        ValueError: a non-masking operator, a size mismatch, or a measurement with nothing observed.
    """
    if not _selection(operator):
        raise ValueError(f"harmonic interpolation needs a masking operator (Mask, RandomMask or Denoise), "
                         f"got {type(operator).__name__}")
    y = np.asarray(measurement.y, dtype=np.float64)
    mask = np.asarray(measurement.mask)
    if y.ndim < 2 or y.shape[-2] != manifold.n_vertices:
        raise ValueError(f"measurement.y must have shape (..., {manifold.n_vertices}, C) for "
                         f"{manifold!r}, got {y.shape}")
    L, _, index = manifold.geometry_mesh()
    L = L.tocsr()
    n = L.shape[0]
    batch, (V, C) = y.shape[:-2], y.shape[-2:]
    y, mask = y.reshape(-1, V, C), mask.reshape(-1, V)
    out = np.empty_like(y)
    for b in range(len(y)):
        counts = np.bincount(index, weights=mask[b], minlength=n)
        known = counts > 0
        if not known.any():
            raise ValueError(f"measurement {b} observes no vertex; nothing to interpolate from")
        sums = np.stack([np.bincount(index, weights=mask[b] * y[b, :, c], minlength=n)
                         for c in range(C)], axis=1)
        u = np.zeros((n, C))
        u[known] = sums[known] / counts[known, None]
        unknown = ~known
        if unknown.any():
            A = L[unknown][:, unknown].tocsc()
            rhs = -(L[unknown][:, known] @ u[known])
            u[unknown] = spla.spsolve(A, rhs).reshape(-1, C)
            if not np.all(np.isfinite(u)):
                raise ValueError(f"measurement {b}: a part of the mesh with missing vertices touches "
                                 "no observed vertex, so harmonic interpolation is undefined there")
        out[b] = u[index]
    return out.reshape(*batch, V, C)
