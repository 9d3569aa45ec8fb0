"""Generalized Laplacian eigenproblems ``L φ = λ M φ`` with a lumped (diagonal) mass matrix.

Dimension letters: N vertices of the geometry mesh, K eigenpairs.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import scipy.sparse as sp
import scipy.sparse.linalg as spla

#: Below this many vertices the dense solver is used (exact and fast at that size).
DENSE_LIMIT = 600


def fix_signs(evecs: np.ndarray, mass: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Flip each eigenvector so that its mass-weighted product with a fixed generic function of
    position is positive. Makes eigenvectors (and features built from them) reproducible across
    runs and machines; inside a degenerate eigenspace the basis is still solver-dependent.

    Args:
        evecs: (N, K) eigenvectors.
        mass: (N,) lumped mass.
        points: (N, 3) vertex positions.

    Returns:
        (N, K) eigenvectors with fixed signs.
    """
    p = points - points.mean(axis=0)
    scale = np.abs(p).max() or 1.0
    p = p / scale
    probe = 1.0 + p @ np.array([0.31, 0.53, 0.71]) + 0.37 * (p**2) @ np.array([1.0, -0.6, 0.3])
    probe = probe + 0.1 * np.sin(7.3 * p[:, 0] + 3.1 * p[:, 1] - 5.7 * p[:, 2])
    s = np.sign((mass * probe) @ evecs)
    s[s == 0] = 1.0
    return evecs * s


def generalized_eigenpairs(
    stiffness: sp.spmatrix, mass: np.ndarray, k: int, *, points: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` smallest eigenpairs of ``L φ = λ M φ``, normalized so that ``Φᵀ M Φ = I``.

    Uses a dense solver for small problems, else ARPACK ``eigsh`` in shift-invert mode with a
    small negative shift (L is singular), retrying with larger shifts and more Lanczos vectors.

    Args:
        stiffness: (N, N) symmetric positive semi-definite sparse matrix L.
        mass: (N,) positive lumped mass (diagonal of M).
        k: number of eigenpairs, 1 ≤ k ≤ N.
        points: optional (N, 3) positions used to fix eigenvector signs.

    Returns:
        evals (K,) ascending, evecs (N, K).

    Raises:
        ValueError: k out of range or mass not positive.
        RuntimeError: the eigensolver failed after all retries.
    """
    n = stiffness.shape[0]
    if not (1 <= k <= n):
        raise ValueError(f"k must be in [1, {n}] (the number of mesh vertices), got k={k}")
    mass = np.asarray(mass, dtype=np.float64)
    if mass.shape != (n,) or not np.all(mass > 0):
        raise ValueError("mass must be a positive (N,) array; a zero-mass vertex (unreferenced, "
                         "or padding) makes the eigenproblem singular")
    L = sp.csc_matrix(stiffness, dtype=np.float64)
    if n <= DENSE_LIMIT or k >= n - 1:
        evals, evecs = scipy.linalg.eigh(L.toarray(), np.diag(mass), subset_by_index=[0, k - 1])
    else:
        evals, evecs = _eigsh_with_retries(L, mass, k)
    order = np.argsort(evals, kind="stable")
    evals, evecs = evals[order], evecs[:, order]
    # M-normalize explicitly (ARPACK returns M-orthonormal vectors only up to its tolerance).
    evecs = evecs / np.sqrt(np.einsum("n,nk,nk->k", mass, evecs, evecs))
    evals = np.maximum(evals, 0.0)  # round-off can give -1e-12 for the constant mode
    if points is not None:
        evecs = fix_signs(evecs, mass, points)
    return evals, evecs


def _eigsh_with_retries(L: sp.csc_matrix, mass: np.ndarray, k: int):
    n = L.shape[0]
    M = sp.diags(mass).tocsc()
    scale = float(np.abs(L.diagonal() / mass).max())  # a typical eigenvalue magnitude
    v0 = np.ones(n) + 1e-3 * np.cos(np.arange(n))  # deterministic start vector
    errors = []
    for shift, ncv in [(-1e-8, None), (-1e-6, None), (-1e-4, 4 * k + 1), (-1e-3, 6 * k + 1)]:
        ncv = None if ncv is None else min(ncv, n - 1)
        try:
            evals, evecs = spla.eigsh(L, k=k, M=M, sigma=shift * scale, which="LM", v0=v0, ncv=ncv,
                                      maxiter=20 * n)
            if np.all(np.isfinite(evals)) and np.all(np.isfinite(evecs)):
                return evals, evecs
            errors.append(f"shift {shift:g}: non-finite result")
        except (spla.ArpackNoConvergence, RuntimeError, ValueError) as err:  # factorization or ARPACK
            errors.append(f"shift {shift:g}: {type(err).__name__}: {err}")
    raise RuntimeError(
        f"eigsh failed to compute {k} eigenpairs of the Laplacian on {n} vertices after "
        f"{len(errors)} tries ({'; '.join(errors)}). Ask for fewer eigenpairs, or clean the mesh "
        "(Mesh(..., clean=True) removes duplicate faces and unreferenced vertices)."
    )
