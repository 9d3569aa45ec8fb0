"""geodiff: amortized posterior sampling on grids, spheres and meshes (JAX).

The public surface. Sub-modules: ``geodiff.manifolds``, ``geodiff.operators``, ``geodiff.data``,
``geodiff.plot``.
"""

from geodiff.manifolds import Grid, Manifold, Mesh, Sphere

__version__ = "0.1.0"

__all__ = ["Grid", "Manifold", "Mesh", "Sphere", "__version__"]
