"""Time to build the manifolds and their Laplacian eigenpairs, cold (empty cache) and cached.

    python benchmarks/geometry_build.py            # k = 128 eigenpairs
    python benchmarks/geometry_build.py --smoke    # k = 16, for the tests

Each "cold" run uses a fresh, empty cache folder; "cached" builds a new object with the cache that
the cold run filled (a new process would see the same). Writes ``--json PATH`` if given.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from geodiff.timing import machine_info, versions, write_json

BUILDERS = {
    "Sphere.latlon(46, 90)": lambda: __import__("geodiff").Sphere.latlon(46, 90),
    "Sphere.healpix(16)": lambda: __import__("geodiff").Sphere.healpix(16),
    "Mesh.bunny(3)": lambda: __import__("geodiff").Mesh.bunny(3),
    "Grid(32, 32)": lambda: __import__("geodiff").Grid(32, 32),
}


def time_build(build, k: int) -> float:
    t0 = time.perf_counter()
    m = build()
    evals, evecs = m.eigenpairs(k)
    assert evecs.shape == (m.n_vertices, k) and np.all(np.isfinite(evals))
    return time.perf_counter() - t0


def run(k: int) -> list[dict]:
    rows = []
    old = os.environ.get("GEODIFF_CACHE")
    try:
        for name, build in BUILDERS.items():
            with tempfile.TemporaryDirectory() as cache:
                os.environ["GEODIFF_CACHE"] = cache
                cold = time_build(build, k)
                cached = min(time_build(build, k) for _ in range(3))
            rows.append({"manifold": name, "n_vertices": build().n_vertices, "k": k,
                         "cold_s": cold, "cached_s": cached})
    finally:
        if old is None:
            os.environ.pop("GEODIFF_CACHE", None)
        else:
            os.environ["GEODIFF_CACHE"] = old
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description="manifold build + eigenpair timings")
    parser.add_argument("--k", type=int, default=128)
    parser.add_argument("--smoke", action="store_true", help="k = 16")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    k = 16 if args.smoke else args.k
    rows = run(k)
    print("| manifold | V | k | cold (s) | cached (s) |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['manifold']} | {r['n_vertices']} | {r['k']} | {r['cold_s']:.3f} | {r['cached_s']:.4f} |")
    result = {"meta": {"machine": machine_info(), "versions": versions()},
              "rows": rows}
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
