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


#: Consecutive eigenvalues closer than this (relative) span one degenerate eigenspace.
DEGENERATE_RTOL = 1e-6


def _probes(points: np.ndarray, n: int) -> np.ndarray:
    """(N, n) fixed generic functions of position: column 0 the sign probe (a smooth, mostly
    low-order function), the others plane waves cos(a_j·p + φ_j) at fixed directions, spatial
    frequencies |a_j| from 2 to 9 and phases, so that between them they reach every eigenspace."""
    p = points - points.mean(axis=0)
    scale = np.abs(p).max() or 1.0
    p = p / scale
    first = 1.0 + p @ np.array([0.31, 0.53, 0.71]) + 0.37 * (p**2) @ np.array([1.0, -0.6, 0.3])
    cols = [first + 0.1 * np.sin(7.3 * p[:, 0] + 3.1 * p[:, 1] - 5.7 * p[:, 2])]
    golden = (1 + 5**0.5) / 2
    for j in range(1, n):
        z = 1 - 2 * ((j * 0.618034) % 1.0)                # a spiral of directions on the sphere
        r, phi = np.sqrt(1 - z * z), 2 * np.pi * j / golden
        a = (2.0 + 7.0 * ((j * 0.414214) % 1.0)) * np.array([r * np.cos(phi), r * np.sin(phi), z])
        cols.append(np.cos(p @ a + 2.399963 * j))
    return np.stack(cols, axis=1)


def eigen_clusters(evals: np.ndarray, rtol: float = DEGENERATE_RTOL) -> list[tuple[int, int]]:
    """[start, stop) index ranges of (numerically) equal eigenvalues, in order.

    Args:
        evals: (K,) ascending eigenvalues.
        rtol: relative gap below which two consecutive eigenvalues are one eigenspace.
    """
    evals = np.asarray(evals, np.float64)
    floor = rtol * max(float(np.abs(evals).max(initial=0.0)), 1e-300) * 1e-3
    bounds = [0]
    for i in range(1, len(evals)):
        if evals[i] - evals[i - 1] > rtol * abs(evals[i]) + floor:
            bounds.append(i)
    bounds.append(len(evals))
    return list(zip(bounds[:-1], bounds[1:]))


def fix_signs(evecs: np.ndarray, mass: np.ndarray, points: np.ndarray,
              evals: np.ndarray | None = None) -> np.ndarray:
    """A basis that depends only on the eigenspaces, not on the solver: reproducible across
    runs, machines and the number of eigenpairs asked for.

    Each eigenvector is flipped so that its mass-weighted product with a fixed generic function
    of position is positive. With ``evals``, each degenerate eigenspace U (N, d) (the lat-lon
    grid's cos mφ / sin mφ pairs) is rotated to the basis B = U Q built from fixed generic probe
    functions r_j of position: b₁ is the normalized M-projection of the first probe that reaches
    the space, b₂ that of the next one made orthogonal to b₁, and so on (Gram–Schmidt of the
    coordinates Uᵀ M r_j). Any rotation of U gives the same B; a non-degenerate eigenvector keeps
    the sign given by the first probe, as before degenerate spaces were handled.

    Args:
        evecs: (N, K) M-orthonormal eigenvectors.
        mass: (N,) lumped mass.
        points: (N, 3) vertex positions.
        evals: optional (K,) ascending eigenvalues, to find the degenerate eigenspaces.

    Returns:
        (N, K) eigenvectors (still M-orthonormal).
    """
    evecs = np.array(evecs, np.float64)
    clusters = [(i, i + 1) for i in range(evecs.shape[1])] if evals is None else eigen_clusters(evals)
    width = max((b - a for a, b in clusters), default=1)
    r = _probes(points, width + 24)
    coords = evecs.T @ (mass[:, None] * r)                    # (K, J): Uᵀ M r_j
    r_norm = np.sqrt(mass @ r**2)                              # (J,): ‖r_j‖_M
    for a, b in clusters:
        evecs[:, a:b] = evecs[:, a:b] @ _canonical_rotation(coords[a:b], r_norm)
    return evecs


def _canonical_rotation(coords: np.ndarray, r_norm: np.ndarray, tol: float = 1e-8) -> np.ndarray:
    """(d, d) orthogonal Q: Gram–Schmidt of the probes' coordinates ``coords`` (d, J) in the
    eigenspace, in probe order, skipping a probe whose remaining part is below ``tol`` times its
    norm (it barely reaches the space, so its direction would be round-off)."""
    d = coords.shape[0]
    basis: list[np.ndarray] = []
    for j in range(coords.shape[1]):
        c = coords[:, j].copy()
        for q in basis:
            c -= (q @ c) * q
        norm = np.linalg.norm(c)
        if norm > tol * r_norm[j]:
            basis.append(c / norm)
            if len(basis) == d:
                return np.stack(basis, axis=1)
    # no probe reaches the rest of the space (never seen): keep the solver's directions there
    for c in np.eye(d):
        for q in basis:
            c = c - (q @ c) * q
        if np.linalg.norm(c) > 1e-6:
            basis.append(c / np.linalg.norm(c))
    return np.stack(basis[:d], axis=1)


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
        points: optional (N, 3) positions. With them the basis is made solver-independent
            (:func:`fix_signs`: signs, and a canonical basis of each degenerate eigenspace,
            computed past k until the eigenspace of eigenpair k is complete); without them
            signs and degenerate bases are the solver's.

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
    extra = 8 if points is not None else 0
    while True:   # past k until the eigenspace that holds eigenpair k is complete
        k_ext = min(n, k + extra)
        if n <= DENSE_LIMIT or k_ext >= n - 1:
            evals, evecs = scipy.linalg.eigh(L.toarray(), np.diag(mass), subset_by_index=[0, k_ext - 1])
        else:
            evals, evecs = _eigsh_with_retries(L, mass, k_ext)
        order = np.argsort(evals, kind="stable")
        evals, evecs = evals[order], evecs[:, order]
        if extra == 0 or k_ext == n or eigen_clusters(evals)[-1][0] >= k:
            break
        extra *= 2
    # M-normalize explicitly (ARPACK returns M-orthonormal vectors only up to its tolerance).
    evecs = evecs / np.sqrt(np.einsum("n,nk,nk->k", mass, evecs, evecs))
    evals = np.maximum(evals, 0.0)  # round-off can give -1e-12 for the constant mode
    if points is not None:
        evecs = fix_signs(evecs, mass, points, evals)
    return evals[:k], evecs[:, :k]


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
