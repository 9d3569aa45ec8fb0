"""Train-step time of the diffusion prior (compile excluded) on each benchmark manifold.

    python benchmarks/prior_step_time.py               # batch 64, default network, 20 timed steps
    python benchmarks/prior_step_time.py --smoke       # tiny, for the tests

Uses `geodiff.train.fit` exactly as `DiffusionPrior.train` does (jitted, donated step) and reports
its median step time (the first step, which compiles, is excluded). Writes ``--json PATH``.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

from geodiff import DiffusionPrior, Grid, Mesh, Sphere
from geodiff.diffusion import NetConfig
from geodiff.timing import machine_info, versions, write_json

MANIFOLDS = {
    "sphere 46x90": lambda: Sphere.latlon(46, 90),
    "bunny res3": lambda: Mesh.bunny(3),
    "grid 32x32": lambda: Grid(32, 32),
}


def run(*, batch_size: int, steps: int, config: NetConfig) -> list[dict]:
    rows = []
    for name, build in MANIFOLDS.items():
        m = build()
        rng = np.random.default_rng(0)
        data = rng.uniform(0.2, 0.8, size=(max(256, batch_size), m.n_vertices, 1)).astype(np.float32)
        prior, hist = DiffusionPrior.train(jax.random.key(0), m, data, steps=steps, batch_size=batch_size,
                                           config=config, progress=False, warmup_steps=0)
        n_params = sum(int(np.size(v)) for v in jax.tree_util.tree_leaves(prior.params))
        rows.append({"manifold": name, "n_vertices": m.n_vertices, "batch_size": batch_size,
                     "n_params": n_params, "step_s": hist["step_s"], "compile_s": hist["compile_s"]})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description="diffusion-prior train-step time")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=21)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    config = NetConfig(width=8, n_blocks=1, n_eig=16, n_pos=4) if args.smoke else NetConfig()
    batch, steps = (4, 3) if args.smoke else (args.batch_size, args.steps)
    rows = run(batch_size=batch, steps=steps, config=config)
    print("| manifold | V | batch | params | step (s) | compile (s) |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['manifold']} | {r['n_vertices']} | {r['batch_size']} | {r['n_params']} | "
              f"{r['step_s']:.3f} | {r['compile_s']:.1f} |")
    result = {"meta": {"machine": machine_info(), "versions": versions(),
                       "config": config.__dict__},
              "rows": rows}
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
