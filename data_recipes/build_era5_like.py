"""Build and save the "ERA5-like (GloSea4-anchored)" training set (offline; no download).

Draws ``--n`` samples with :func:`geodiff.data.era5.era5_like` from the GloSea4 *train* members
only, saves them (normalized, (n, 4140, 1) float32) with the real val/test fields for evaluation,
and prints statistics and split sizes.

    python data_recipes/build_era5_like.py --n 6000 --seed 0
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from geodiff._cache import atomic_savez
from geodiff.data.era5 import GASP_TMAX, GASP_TMIN, denormalize, era5_like, glosea4_split


def _stats(name: str, x: np.ndarray) -> str:
    k = denormalize(x.astype(np.float64))
    return (f"{name:<28s} {x.shape[0]:6d} fields  mean {k.mean():7.2f} K  std {k.std():6.2f} K  "
            f"range {k.min():7.2f} – {k.max():7.2f} K  (normalized mean {x.mean():.4f}, "
            f"std {x.std():.4f})")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=6000, help="number of ERA5-like samples (default 6000)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--out", type=Path, default=None,
                   help="output .npz (default .cache/data/era5_like_<n>_<seed>.npz)")
    args = p.parse_args(argv)
    out = args.out or Path(".cache") / "data" / f"era5_like_{args.n}_{args.seed}.npz"

    t0 = time.perf_counter()
    train = era5_like(args.seed, args.n)
    dt = time.perf_counter() - t0
    real = {s: glosea4_split(s) for s in ("train", "val", "test")}
    atomic_savez(out, train=train, val=real["val"], test=real["test"],
                 tmin=np.float64(GASP_TMIN), tmax=np.float64(GASP_TMAX))

    print(f"ERA5-like (GloSea4-anchored): {args.n} samples, seed {args.seed}, built in {dt:.2f} s")
    print(_stats("ERA5-like train (synthetic)", train))
    for s, x in real.items():
        print(_stats(f"GloSea4 {s} (real)", x))
    print(f"split sizes: ERA5-like train {len(train)}, real train {len(real['train'])} (anchors only), "
          f"val {len(real['val'])}, test {len(real['test'])}")
    print(f"saved {out}  (keys train, val, test: normalized (N, 4140, 1) float32; "
          f"T = x·({GASP_TMAX} − {GASP_TMIN}) + {GASP_TMIN} K)")


if __name__ == "__main__":
    main()
