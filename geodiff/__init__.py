"""geodiff: amortized posterior sampling on grids, spheres and meshes (JAX).

The public surface. Sub-modules: ``geodiff.manifolds``, ``geodiff.operators``, ``geodiff.diffusion``,
``geodiff.flows``, ``geodiff.amortized``, ``geodiff.train``, ``geodiff.baselines``,
``geodiff.metrics``, ``geodiff.data``, ``geodiff.io``, ``geodiff.plot``. Each is also an attribute of the
package (``import geodiff as gd; gd.baselines.dps``), imported on first access, so
``import geodiff`` stays as fast as the top-level names allow (matplotlib and the data sets load
only when used).
"""

import importlib as _importlib

from geodiff.amortized import AmortizedSampler, GaussianSurrogate, MixtureSurrogate
from geodiff.diffusion import VPSDE, DiffusionPrior, GaussianMixturePrior, GaussianPrior
from geodiff.flows import ConditionalRealNVP
from geodiff.manifolds import Grid, Manifold, Mesh, Sphere

# The one source of the version: pyproject.toml reads this literal ([tool.setuptools.dynamic]).
__version__ = "0.4.0.dev0"

__all__ = ["AmortizedSampler", "ConditionalRealNVP", "DiffusionPrior", "GaussianMixturePrior",
           "GaussianPrior", "GaussianSurrogate", "Grid", "Manifold", "Mesh", "MixtureSurrogate",
           "Sphere", "VPSDE",
           "__version__"]

# Sub-modules reachable as attributes of the package (PEP 562), imported on first access. A new
# public sub-module is one more name here.
_SUBMODULES = frozenset({"amortized", "baselines", "cli", "data", "diffusion", "flows", "io",
                         "manifolds", "metrics", "operators", "plot", "train"})


def __getattr__(name: str):
    if name in _SUBMODULES:
        return _importlib.import_module(f"{__name__}.{name}")   # also binds it in this namespace
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _SUBMODULES)
