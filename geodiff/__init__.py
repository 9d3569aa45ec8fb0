"""geodiff: amortized posterior sampling on grids, spheres and meshes (JAX).

The public surface. Sub-modules: ``geodiff.manifolds``, ``geodiff.operators``, ``geodiff.diffusion``,
``geodiff.train``, ``geodiff.baselines``, ``geodiff.metrics``, ``geodiff.data``, ``geodiff.plot``.
"""

from geodiff.diffusion import VPSDE, DiffusionPrior, GaussianMixturePrior, GaussianPrior
from geodiff.manifolds import Grid, Manifold, Mesh, Sphere

__version__ = "0.2.0"

__all__ = ["DiffusionPrior", "GaussianMixturePrior", "GaussianPrior", "Grid", "Manifold", "Mesh", "Sphere",
           "VPSDE", "__version__"]
