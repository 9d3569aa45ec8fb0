"""The manifold interface shared by :class:`Grid`, :class:`Sphere` and :class:`Mesh`.

A manifold describes where a signal lives. Signals are arrays in the *vertex layout*
``(..., V, C)``; the *user layout* is the natural array shape (image ``H×W×C``, lat-lon
``nlat×nlon×C``, mesh ``V×C``). Geometry (Laplacian, mass, eigenpairs) is computed with NumPy/SciPy
once, cached in memory and on disk, and handed to JAX as fixed-shape arrays (:meth:`geometry`).

Some user layouts repeat a point (the 90 longitudes of a lat-lon pole). The Laplacian is then built
on a *geometry mesh* without duplicates; ``index`` maps each layout vertex to its mesh vertex.
Each copy carries an equal share of the mesh vertex's mass, and eigenvectors are copied.

Dimension letters: V layout vertices, N geometry-mesh vertices, C channels, K eigenpairs.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp

from geodiff._cache import atomic_savez, cache_dir
from geodiff.manifolds.eigen import generalized_eigenpairs

#: Bump when a change to geometry code invalidates cached Laplacians or eigenpairs.
GEOMETRY_VERSION = "1"


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["points", "mass", "valid", "evals", "evecs"],
    meta_fields=[],
)
@dataclasses.dataclass(frozen=True)
class Geometry:
    """Fixed-shape geometry arrays for networks (a JAX pytree).

    Attributes:
        points: (V, 3) vertex positions (zeros on padding).
        mass: (V,) lumped area per vertex (0 on padding).
        valid: (V,) bool, False on padding vertices.
        evals: (K,) Laplacian eigenvalues, ascending.
        evecs: (V, K) eigenvectors, ``evecsᵀ diag(mass) evecs = I`` (zero rows on padding).
    """

    points: jax.Array
    mass: jax.Array
    valid: jax.Array
    evals: jax.Array
    evecs: jax.Array


class Manifold:
    """Base class. Subclasses provide points, mass and the geometry mesh's Laplacian.

    Attributes:
        n_vertices: V, the number of vertices of the vertex layout.
        points: (V, 3) float64 positions.
        mass: (V,) float64 lumped area per vertex; ``mass.sum()`` is the surface area.
        valid: (V,) bool, True for real vertices (False only on padding).
        layout_shape: the user layout's spatial shape, e.g. ``(H, W)`` or ``(nlat, nlon)``.
    """

    def __init__(self, points: np.ndarray, mass: np.ndarray, layout_shape: tuple[int, ...],
                 index: np.ndarray | None = None):
        self._points = np.asarray(points, dtype=np.float64)
        self._mass = np.asarray(mass, dtype=np.float64)
        self.layout_shape = tuple(int(s) for s in layout_shape)
        self._index = None if index is None else np.asarray(index, dtype=np.int64)
        self._eig: tuple[np.ndarray, np.ndarray] | None = None  # largest set computed so far
        if math.prod(self.layout_shape) != len(self._points):
            raise AssertionError("layout_shape does not match the number of points")

    # ----------------------------------------------------------------- basic attributes
    @property
    def n_vertices(self) -> int:
        return len(self._points)

    @property
    def points(self) -> np.ndarray:
        return self._points.copy()

    @property
    def mass(self) -> np.ndarray:
        return self._mass.copy()

    @property
    def valid(self) -> np.ndarray:
        return np.ones(self.n_vertices, dtype=bool)

    @property
    def area(self) -> float:
        """Total surface area, ``mass.sum()``."""
        return float(self._mass.sum())

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n_vertices={self.n_vertices})"

    # ------------------------------------------------------------ geometry (subclass hooks)
    def _build_mesh_geometry(self) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
        """Return (stiffness L (N, N), mass (N,), points (N, 3)) of the geometry mesh."""
        raise NotImplementedError

    def _mesh_geometry(self) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
        if getattr(self, "_geom", None) is None:
            self._geom = self._build_mesh_geometry()
        return self._geom

    def _cache_key(self) -> str | None:
        """A content hash identifying the geometry, or None for no disk cache."""
        return None

    def _compute_mesh_eigenpairs(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        L, m, pts = self._mesh_geometry()
        return generalized_eigenpairs(L, m, k, points=pts)

    @property
    def max_eigenpairs(self) -> int:
        """The largest ``k`` :meth:`eigenpairs` accepts (the geometry mesh's vertex count)."""
        return self.n_vertices if self._index is None else int(self._index.max()) + 1

    def _mesh_eigenpairs(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Eigenpairs on the geometry mesh, from memory, the disk cache, or the solver."""
        if not isinstance(k, (int, np.integer)) or k < 1 or k > self.max_eigenpairs:
            raise ValueError(f"k must be an integer in [1, {self.max_eigenpairs}] for {self!r}, got {k!r}")
        if self._eig is not None and len(self._eig[0]) >= k:
            return self._eig[0][:k], self._eig[1][:, :k]
        key = self._cache_key()
        path = None if key is None else cache_dir("geometry") / f"eig2_{key}.npz"  # eig2: canonical bases
        if path is not None and path.exists():
            with np.load(path) as f:
                evals, evecs = f["evals"], f["evecs"]
            if len(evals) >= k:
                self._eig = (evals, evecs)
                return evals[:k], evecs[:, :k]
        evals, evecs = self._compute_mesh_eigenpairs(k)
        self._eig = (evals, evecs)
        if path is not None:
            atomic_savez(path, evals=evals, evecs=evecs)
        return evals, evecs

    # ------------------------------------------------------------------ public geometry
    def eigenpairs(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` smallest Laplace–Beltrami eigenpairs (generalized, with the lumped mass).

        Args:
            k: number of eigenpairs.

        Returns:
            evals: (K,) ascending, in 1/length² of the manifold's units (unit sphere: ≈ l(l+1)).
            evecs: (V, K) with ``evecsᵀ diag(mass) evecs = I``; signs fixed deterministically.
        """
        evals, evecs = self._mesh_eigenpairs(k)
        if self._index is not None:
            evecs = evecs[self._index]
        return evals.copy(), evecs.copy()

    def geometry_mesh(self) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
        """The duplicate-free mesh the geometry is built on.

        Returns:
            stiffness (N, N) sparse, mass (N,), index (V,) mapping each layout vertex to its mesh
            vertex (the identity unless the layout repeats points, as the lat-lon poles do).
        """
        L, m, _ = self._mesh_geometry()
        index = np.arange(self.n_vertices) if self._index is None else self._index.copy()
        return L, m, index

    @functools.cached_property
    def laplacian(self) -> sp.csr_matrix:
        """(V, V) sparse stiffness matrix L (positive semi-definite; ``L·1 = 0``).

        ``uᵀ L u`` is the Dirichlet energy ∫|∇u|² of the function u. With a geometry mesh,
        L = Rᵀ L_mesh R where R averages the copies of a mesh vertex.
        """
        L, _, _ = self._mesh_geometry()
        if self._index is None:
            return sp.csr_matrix(L)
        counts = np.bincount(self._index)
        R = sp.csr_matrix((1.0 / counts[self._index], (self._index, np.arange(self.n_vertices))),
                          shape=(len(counts), self.n_vertices))
        return sp.csr_matrix(R.T @ L @ R)

    def laplacian_features(self, k: int = 16) -> np.ndarray:
        """Per-vertex positional features for networks: the first ``k`` non-constant eigenvectors,
        sign-fixed and scaled by √area so that each has unit mean square over the surface.

        Args:
            k: number of features.

        Returns:
            (V, k) float64 array (zero rows on padding vertices).
        """
        _, evecs = self.eigenpairs(k + 1)
        return evecs[:, 1:] * math.sqrt(self.area)

    def geometry(self, k: int, *, dtype=jnp.float32) -> Geometry:
        """Fixed-shape JAX arrays for networks: points, mass, valid mask and ``k`` eigenpairs."""
        evals, evecs = self.eigenpairs(k)
        return Geometry(points=jnp.asarray(self._points, dtype), mass=jnp.asarray(self._mass, dtype),
                        valid=jnp.asarray(self.valid), evals=jnp.asarray(evals, dtype),
                        evecs=jnp.asarray(evecs, dtype))

    # ---------------------------------------------------------------------- signals
    def check_signal(self, x, name: str = "x", *, channels: int | None = None,
                     missing: bool = False):
        """Validate a signal in the vertex layout and return it unchanged.

        Args:
            x: array of shape (..., V, C).
            name: the argument name to put in error messages.
            channels: required C, if any.
            missing: allow NaN (a missing value; data with gaps), never inf.

        Raises:
            ValueError: wrong rank or size, or (for concrete arrays) NaN/inf values.
            TypeError: a complex, string or object array.
        """
        shape = getattr(x, "shape", None)
        if shape is None or len(shape) < 2 or shape[-2] != self.n_vertices:
            raise ValueError(f"{name} must have shape (..., {self.n_vertices}, C) for {self!r} "
                             f"(vertex layout; use from_layout for the user layout), got {shape}")
        dtype = np.dtype(getattr(x, "dtype", np.float64))
        if not (np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.integer)
                or dtype == np.bool_):
            raise TypeError(f"{name} must be a real-valued (floating-point) array, got dtype {dtype}")
        if channels is not None and shape[-1] != channels:
            raise ValueError(f"{name} must have {channels} channel(s) (last axis), got shape {shape}")
        if not isinstance(x, jax.core.Tracer):
            a = np.asarray(x)
            if missing and np.isinf(a).any():
                raise ValueError(f"{name} contains infinite values (NaN marks a missing value)")
            if not missing and not bool(np.all(np.isfinite(a))):
                raise ValueError(f"{name} contains NaN or infinite values")
        return x

    def inner(self, a, b):
        """Mass-weighted inner product ∫ a·b dA, summed over channels.

        Args:
            a: (..., V, C) array.
            b: (..., V, C) array, broadcastable with ``a``.

        Returns:
            (...,) array. Padding vertices (mass 0) never contribute.
        """
        m = jnp.asarray(self._mass, dtype=jnp.result_type(a, b, jnp.float32))
        return jnp.einsum("v,...vc->...", m, jnp.asarray(a) * jnp.asarray(b))

    def norm(self, a):
        """The L² norm √∫|a|² dA of a (..., V, C) signal, shape (...,)."""
        return jnp.sqrt(self.inner(a, a))

    def to_layout(self, x):
        """(..., V, C) vertex layout → (..., *layout_shape, C) user layout (a reshape)."""
        shape = getattr(x, "shape", None)
        if shape is None or len(shape) < 2 or shape[-2] != self.n_vertices:
            raise ValueError(f"x must have shape (..., {self.n_vertices}, C) for {self!r}, got {shape}")
        return x.reshape(*shape[:-2], *self.layout_shape, shape[-1])

    def from_layout(self, a):
        """(..., *layout_shape, C) user layout → (..., V, C) vertex layout (a reshape)."""
        n = len(self.layout_shape)
        shape = getattr(a, "shape", None)
        if shape is None or len(shape) < n + 1 or tuple(shape[-n - 1:-1]) != self.layout_shape:
            raise ValueError(f"a must have shape (..., {', '.join(map(str, self.layout_shape))}, C) "
                             f"for {self!r} (user layout), got {shape}")
        return a.reshape(*shape[:-n - 1], self.n_vertices, shape[-1])

    def padded(self, size: int) -> "PaddedManifold":
        """This manifold with zero-mass padding vertices appended up to ``size`` vertices."""
        return PaddedManifold(self, size)


class PaddedManifold(Manifold):
    """A manifold with ``size − V`` padding vertices appended (e.g. to give a dense conditioner's
    vertex halves equal size). Padding vertices have mass 0, zero positions, zero eigenvector rows
    and zero Laplacian rows, and ``valid`` is False there, so inner products, norms and
    eigen-features of the real vertices are unchanged.

    The user layout is the base manifold's: :meth:`to_layout` drops the padding first.
    """

    def __init__(self, base: Manifold, size: int):
        if isinstance(base, PaddedManifold):
            base = base.base
        if not isinstance(size, (int, np.integer)) or size < base.n_vertices:
            raise ValueError(f"size must be an integer ≥ n_vertices = {base.n_vertices}, got {size!r}")
        self.base = base
        self.n_pad = int(size) - base.n_vertices
        pad = (0, self.n_pad)
        super().__init__(np.pad(base.points, (pad, (0, 0))), np.pad(base.mass, pad), (int(size),))

    @property
    def valid(self) -> np.ndarray:
        return np.arange(self.n_vertices) < self.base.n_vertices

    def __repr__(self) -> str:
        return f"PaddedManifold({self.base!r}, size={self.n_vertices})"

    @property
    def max_eigenpairs(self) -> int:
        return self.base.max_eigenpairs

    def eigenpairs(self, k: int):
        evals, evecs = self.base.eigenpairs(k)
        return evals, np.pad(evecs, ((0, self.n_pad), (0, 0)))

    @functools.cached_property
    def laplacian(self) -> sp.csr_matrix:
        L = self.base.laplacian
        return sp.csr_matrix(sp.block_diag([L, sp.csr_matrix((self.n_pad, self.n_pad))]))

    def laplacian_features(self, k: int = 16) -> np.ndarray:
        return np.pad(self.base.laplacian_features(k), ((0, self.n_pad), (0, 0)))

    def pad(self, x):
        """(..., V_base, C) → (..., V, C), zeros on the padding vertices."""
        self.base.check_signal(x, "x")
        widths = [(0, 0)] * (x.ndim - 2) + [(0, self.n_pad), (0, 0)]
        return jnp.pad(x, widths) if isinstance(x, jax.Array) else np.pad(x, widths)

    def unpad(self, x):
        """(..., V, C) → (..., V_base, C), dropping the padding vertices."""
        shape = getattr(x, "shape", None)
        if shape is None or len(shape) < 2 or shape[-2] != self.n_vertices:
            raise ValueError(f"x must have shape (..., {self.n_vertices}, C), got {shape}")
        return x[..., : self.base.n_vertices, :]

    def to_layout(self, x):
        return self.base.to_layout(self.unpad(x))

    def from_layout(self, a):
        return self.pad(self.base.from_layout(a))
