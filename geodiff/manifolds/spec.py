"""Describe a manifold in a file and rebuild it (for saved priors and samplers).

A spec is a JSON-able dict plus named arrays (mesh vertices and faces); geometry is not stored,
it is rebuilt (and served from the eigenpair cache).
"""

from __future__ import annotations

import numpy as np

from geodiff.manifolds.base import Manifold, PaddedManifold
from geodiff.manifolds.grid import Grid
from geodiff.manifolds.mesh import Mesh
from geodiff.manifolds.sphere import Sphere


def manifold_spec(manifold: Manifold) -> tuple[dict, dict[str, np.ndarray]]:
    """(meta, arrays) describing ``manifold``; :func:`manifold_from_spec` inverts it."""
    if isinstance(manifold, PaddedManifold):
        meta, arrays = manifold_spec(manifold.base)
        return {"kind": "padded", "size": manifold.n_vertices, "base": meta}, arrays
    if isinstance(manifold, Grid):
        return {"kind": "grid", "height": manifold.height, "width": manifold.width,
                "channels": manifold.channels}, {}
    if isinstance(manifold, Sphere):
        if manifold.kind == "latlon":
            nlat, nlon = manifold.layout_shape
            return {"kind": "latlon", "nlat": nlat, "nlon": nlon, "radius": manifold.radius,
                    "poles": manifold.poles}, {}
        return {"kind": "healpix", "nside": manifold.nside, "radius": manifold.radius}, {}
    if isinstance(manifold, Mesh):
        return {"kind": "mesh"}, {"mesh_vertices": manifold.vertices, "mesh_faces": manifold.faces}
    raise TypeError(f"cannot describe a {type(manifold).__name__} in a file")


def manifold_from_spec(meta: dict, arrays) -> Manifold:
    """Rebuild the manifold that :func:`manifold_spec` described."""
    kind = meta.get("kind")
    if kind == "padded":
        return manifold_from_spec(meta["base"], arrays).padded(int(meta["size"]))
    if kind == "grid":
        return Grid(meta["height"], meta["width"], channels=meta["channels"])
    if kind == "latlon":
        return Sphere.latlon(meta["nlat"], meta["nlon"], radius=meta["radius"],
                             poles=bool(meta.get("poles", True)))   # files before 0.4: poles
    if kind == "healpix":
        return Sphere.healpix(meta["nside"], radius=meta["radius"])
    if kind == "mesh":
        return Mesh(np.asarray(arrays["mesh_vertices"]), np.asarray(arrays["mesh_faces"]))
    raise ValueError(f"unknown manifold kind {kind!r} in the file")
