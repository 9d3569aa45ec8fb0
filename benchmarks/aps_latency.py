"""Sampling latency of the amortized sampler on the 46×90 sphere (mask 60%, σ = 0.05), split into
the per-measurement base solve and the flow, with XLA's FLOP counts and the fraction of the
measured matmul peak. The flow is untrained: latency does not depend on the weights.

    python benchmarks/aps_latency.py [--rank 256] [--json PATH]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax

from geodiff import AmortizedSampler, GaussianPrior, Sphere
from geodiff.amortized.surrogate import base_params
from geodiff.operators import RandomMask
from geodiff.timing import machine_info, time_call, versions, write_json

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nlat", type=int, default=46)
    p.add_argument("--nlon", type=int, default=90)
    p.add_argument("--rank", type=int, default=256)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    from gaussian_posterior import matmul_peak_gflops, sample_flops

    sphere = Sphere.latlon(args.nlat, args.nlon)
    prior = GaussianPrior.matern(sphere, variance=0.01, length_scale=0.3, mean=0.5,
                                 n_modes=min(256, sphere.max_eigenpairs))
    op = RandomMask(0.6, 0.05).on(sphere)
    samples = prior.sample(jax.random.key(0), args.rank + 1)
    sampler = AmortizedSampler(sphere, prior, op, surrogate=samples, surrogate_rank=args.rank)
    m = op.measure(jax.random.key(1), prior.sample(jax.random.key(2), 1))[0]
    base = jax.jit(lambda mm: base_params(sampler.operator, mm, sampler.surrogate,
                                          shared=sampler._shared))
    mb = jax.tree.map(lambda a: a[None], m)
    peak = matmul_peak_gflops()
    rows = {"base_solve_s": time_call(base, mb, repeats=10)[0]}
    for n in (1, 128):
        rows[f"sample_{n}_s"] = time_call(sampler.sample, jax.random.key(3), m, n, repeats=10)[0]
        rows[f"flops_{n}"] = sample_flops(sampler, m, n)
        rows[f"peak_fraction_{n}"] = rows[f"flops_{n}"] / rows[f"sample_{n}_s"] / 1e9 / peak
    rows.update(matmul_peak_gflops=peak, n_params=sampler.n_params, rank=args.rank,
                n_vertices=sphere.n_vertices)
    for k, v in rows.items():
        print(f"{k:>22}: {v:.4g}")
    if args.json:
        write_json(args.json, {"meta": {"machine": machine_info(), "versions": versions()},
                               "result": rows})
    return rows


if __name__ == "__main__":
    main()
