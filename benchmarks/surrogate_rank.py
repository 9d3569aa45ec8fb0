"""What the surrogate's rank R costs and buys on the ERA5-like sphere (issue "Throughput": a lower
rank where it costs no accuracy).

The per-measurement base solve of the amortized sampler is O(D R²) (the R×R matrix
I + Fᵀ diag(ω) F over the D = 4,140 entries and the base std F W), which sets the floor of a
one-sample call on the 46×90 sphere. For each R: kriging's PSNR (the surrogate's own posterior
mean, which is the sampler's centre) on the 18 held-out real GloSea4 fields with the ERA5-like
benchmark's masks (60% missing, σ = 0.05, key = seed; area-weighted on the missing points), the
Gaussian fitted to the benchmark's 6,000 ERA5-like fields; and XLA's FLOP count of the sampler's
compiled programs for one measurement (1 and 128 samples; the comparison benchmarks' spectral
flow, untrained: cost does not depend on the weights). FLOPs are counted, not timed, so the
numbers do not depend on what else runs on the machine.

    python benchmarks/surrogate_rank.py            # ≈ 2 min on 2 CPU cores
    python benchmarks/surrogate_rank.py --smoke    # what the tests run

Prints a table and writes ``<out>/results.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling scripts

from _common import scoring  # noqa: E402
from archive_throughput import flops  # noqa: E402

from geodiff import AmortizedSampler, Sphere  # noqa: E402
from geodiff.amortized import GaussianSurrogate  # noqa: E402
from geodiff.baselines import gaussian_fit  # noqa: E402
from geodiff.data import era5_like, glosea4_split  # noqa: E402
from geodiff.metrics import psnr  # noqa: E402
from geodiff.operators import RandomMask  # noqa: E402


def scan(*, smoke: bool, seed: int = 0) -> list[dict]:
    from train_priors import train_or_load

    sphere = Sphere.latlon(46, 90)
    prior, _, _, _ = train_or_load("era5", "smoke" if smoke else "quick", progress=False)
    train = era5_like(seed, 300 if smoke else 6000)
    test = glosea4_split("test")[: 4 if smoke else 18]
    op = RandomMask(0.6, 0.05).on(sphere)
    meas = op.measure(jax.random.key(seed), test)
    sc = scoring(sphere, meas)
    truth = np.asarray(test, np.float64)
    size = dict(hidden=8, n_steps=1, n_eig=4) if smoke else dict(hidden=256, n_steps=8, n_eig=64)
    rows = []
    for rank in (16, 32) if smoke else (32, 64, 128, 256, 512):
        sur = GaussianSurrogate(*(np.asarray(a, np.float32) for a in gaussian_fit(train, rank=rank)))
        s = AmortizedSampler(sphere, prior, op, surrogate=sur, centre="surrogate", seed=seed, **size)
        mean = np.asarray(s.base_moments(meas)[0], np.float64)
        one = jax.tree.map(lambda a: jnp.asarray(a)[:1], meas)
        f1 = flops(s._jit_sample, s.params, s._frozen(), one, jax.random.key(0), jnp.int32(0), n=1)
        f128 = flops(s._jit_sample, s.params, s._frozen(), one, jax.random.key(0), jnp.int32(0),
                     n=128)
        rows.append({"rank": rank, "kriging_psnr": float(np.mean(psnr(mean, truth, **sc))),
                     "gflop_1_sample": f1 / 1e9, "gflop_128_samples": f128 / 1e9,
                     "n_eval": len(truth)})
        print(rows[-1], flush=True)
    return rows


def main(argv=None) -> list[dict]:
    from geodiff.timing import machine_info, versions, write_json

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", default="outputs/surrogate_rank")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rows = scan(smoke=args.smoke, seed=args.seed)
    print("\n".join(["| rank R | kriging PSNR (dB) | GFLOP, 1 sample | GFLOP, 128 samples | n |",
                     "|---|---|---|---|---|"]
                    + [f"| {r['rank']} | {r['kriging_psnr']:.3f} | {r['gflop_1_sample']:.3f} | "
                       f"{r['gflop_128_samples']:.2f} | {r['n_eval']} |" for r in rows]))
    write_json(Path(args.out) / "results.json",
               {"meta": {"seed": args.seed, "machine": machine_info(), "versions": versions(),
                         "units": {"kriging_psnr": "dB, data range 1, area-weighted, missing "
                                                   "points", "gflop": "XLA cost analysis, per "
                                                                      "measurement"}},
                "rows": rows})
    return rows


if __name__ == "__main__":
    main()
