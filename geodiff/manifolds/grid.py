"""Images as a grid manifold: pixel centres on the unit square, Neumann Laplacian, DCT eigenpairs.

Dimension letters: H rows, W columns, V = H·W vertices (row-major), C channels, K eigenpairs.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from geodiff.manifolds.base import Manifold


def _neumann_1d(n: int, h: float) -> sp.csr_matrix:
    """(n, n) 1-D second-difference matrix with reflecting ends, divided by h²."""
    main = np.full(n, 2.0)
    main[[0, -1]] = 1.0
    if n == 1:
        main[:] = 0.0
    off = -np.ones(n - 1)
    return sp.diags([off, main, off], [-1, 0, 1], format="csr") / h**2


class Grid(Manifold):
    """An ``height × width`` image as a manifold on the unit square.

    Pixel (i, j) (row i from the top, column j) is vertex ``v = i·width + j`` at
    ``((j + ½)/width, 1 − (i + ½)/height, 0)``, with mass ``1/(height·width)`` (area 1 in all).
    The Laplacian is the 5-point finite-difference Neumann Laplacian; its eigenpairs are the
    2-D DCT-II basis, known in closed form (no eigensolver):
    ``λ_pq = 4H² sin²(πp/2H) + 4W² sin²(πq/2W)`` (≈ π²(p² + q²) for small p, q).

    Args:
        height: H ≥ 1.
        width: W ≥ 1.
        channels: C, the number of channels images on this grid have (user layout ``H×W×C``).
    """

    def __init__(self, height: int, width: int, *, channels: int = 1):
        for name, val in (("height", height), ("width", width), ("channels", channels)):
            if not isinstance(val, (int, np.integer)) or val < 1:
                raise ValueError(f"{name} must be a positive integer, got {val!r}")
        self.height, self.width, self.channels = int(height), int(width), int(channels)
        i, j = np.divmod(np.arange(height * width), width)
        points = np.stack([(j + 0.5) / width, 1.0 - (i + 0.5) / height, np.zeros(i.shape)], axis=1)
        mass = np.full(height * width, 1.0 / (height * width))
        super().__init__(points, mass, (height, width))

    def __repr__(self) -> str:
        return f"Grid({self.height}, {self.width}, channels={self.channels})"

    def _build_mesh_geometry(self):
        H, W = self.height, self.width
        lap = sp.kron(_neumann_1d(H, 1.0 / H), sp.eye(W)) + sp.kron(sp.eye(H), _neumann_1d(W, 1.0 / W))
        stiffness = sp.csr_matrix(lap / (H * W))  # L = M·Δ_h with M = I/(HW)
        return stiffness, self._mass, self._points

    def _compute_mesh_eigenpairs(self, k: int):
        H, W = self.height, self.width
        p, q = np.divmod(np.arange(H * W), W)
        lam = 4 * H**2 * np.sin(np.pi * p / (2 * H)) ** 2 + 4 * W**2 * np.sin(np.pi * q / (2 * W)) ** 2
        # Sort by eigenvalue (rounded so exact ties break by (p + q, p) deterministically).
        order = np.lexsort((p, p + q, np.round(lam, 9)))[:k]
        i, j = np.divmod(np.arange(H * W), W)
        cp = np.where(p[order] == 0, 1.0, np.sqrt(2.0))
        cq = np.where(q[order] == 0, 1.0, np.sqrt(2.0))
        evecs = (cp * cq) * np.cos(np.pi * np.outer(i + 0.5, p[order]) / H) * np.cos(
            np.pi * np.outer(j + 0.5, q[order]) / W)
        return lam[order], evecs

    def check_signal(self, x, name: str = "x", *, channels: int | None = None,
                     missing: bool = False):
        return super().check_signal(x, name, channels=self.channels if channels is None else channels,
                                    missing=missing)
