"""Where signals live: :class:`Grid` (images), :class:`Sphere` (lat-lon, HEALPix), :class:`Mesh`.

All share the :class:`Manifold` interface: ``n_vertices``, ``points``, ``mass``, ``eigenpairs``,
``inner``, ``laplacian``, ``laplacian_features``, ``padded``, ``to_layout``/``from_layout``.
"""

from geodiff.manifolds.base import Geometry, Manifold, PaddedManifold
from geodiff.manifolds.grid import Grid
from geodiff.manifolds.mesh import Mesh, clean_mesh
from geodiff.manifolds.sphere import Sphere

__all__ = ["Geometry", "Grid", "Manifold", "Mesh", "PaddedManifold", "Sphere", "clean_mesh"]
