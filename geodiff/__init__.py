"""geodiff: amortized posterior sampling on grids, spheres and meshes (JAX).

The public surface. Sub-modules: ``geodiff.manifolds``, ``geodiff.operators``, ``geodiff.diffusion``,
``geodiff.flows``, ``geodiff.amortized``, ``geodiff.train``, ``geodiff.baselines``,
``geodiff.metrics``, ``geodiff.data``, ``geodiff.plot``.
"""

from geodiff.amortized import AmortizedSampler, GaussianSurrogate
from geodiff.diffusion import VPSDE, DiffusionPrior, GaussianMixturePrior, GaussianPrior
from geodiff.flows import ConditionalRealNVP
from geodiff.manifolds import Grid, Manifold, Mesh, Sphere

__version__ = "0.2.0"

__all__ = ["AmortizedSampler", "ConditionalRealNVP", "DiffusionPrior", "GaussianMixturePrior",
           "GaussianPrior", "GaussianSurrogate", "Grid", "Manifold", "Mesh", "Sphere", "VPSDE",
           "__version__"]
