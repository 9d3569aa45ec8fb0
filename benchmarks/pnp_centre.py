"""The plug-and-play centre (``centre="pnp"``): how far K steps of the prior's denoiser and an
exact data-consistency step carry the base mean beyond kriging, per task and schedule.

Each row is the untrained sampler's base mean (its centre; no flow training, no sampling) on
validation signals that no benchmark scores: the last ``n_val`` digits of the MNIST test split
(the grid benchmarks score the first 100) and ERA5-like fields drawn with seed + 200 (the ERA5-like
benchmark scores real GloSea4 fields). Priors: the shipped full MNIST prior and the shipped quick
ERA5-like prior (``geodiff/pretrained``, copied into the cache by ``train_priors.py``). Schedules:
ρ_max ∈ {s̄, 0.3·s̄} (s̄: rms prior std of the surrogate) down to ρ_min ∈ {0.4σ, σ}, K ∈ {4, 8, 16};
the sampler's default is (s̄, 0.4σ), K = 8. PSNR: data range 1; on the sphere area-weighted on
the missing points.

    python benchmarks/pnp_centre.py            # ≈ 3 min on 2 CPU cores
    python benchmarks/pnp_centre.py --smoke    # what the tests run

Prints a table and writes ``<out>/results.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling scripts

from _common import scoring  # noqa: E402

from geodiff import AmortizedSampler, Grid, Sphere  # noqa: E402
from geodiff.amortized import GaussianSurrogate  # noqa: E402
from geodiff.metrics import psnr  # noqa: E402
from geodiff.timing import machine_info, versions, write_json  # noqa: E402


def tasks(mode: str):
    """(label, manifold, prior, operator, validation signals, surrogate-fit signals) per task."""
    from image_inverse import operators
    from train_priors import train_or_load

    from geodiff.data import era5_like, mnist32
    from geodiff.operators import RandomMask

    smoke = mode == "smoke"
    grid = Grid(32, 32)
    prior, _, _, _ = train_or_load("mnist", "smoke" if smoke else "full", progress=False)
    n_val = 4 if smoke else 100
    val = mnist32("test")[-n_val:]
    train = mnist32("train")
    for name in ("deblur",) if smoke else ("deblur", "sr2"):
        label, op = operators(grid)[name]
        yield f"{label} (MNIST)", grid, prior, op, val, train
    if smoke:
        return
    sphere = Sphere.latlon(46, 90)
    prior, _, _, _ = train_or_load("era5", "quick", progress=False)
    yield ("ERA5-like 60%, σ=0.05 (area-weighted, missing points)", sphere, prior,
           RandomMask(0.6, 0.05).on(sphere), era5_like(200, 32), era5_like(0, 2000))


def scan(mode: str, seed: int = 0) -> list[dict]:
    rows = []
    steps = (2,) if mode == "smoke" else (4, 8, 16)
    for label, manifold, prior, op, val, fit in tasks(mode):
        sur = GaussianSurrogate.fit(np.asarray(fit, np.float32), rank=256 if mode != "smoke" else 16)
        meas = op.measure(jax.random.key(seed), val)
        sc = scoring(manifold, meas)
        truth = np.asarray(val, np.float64)

        def row(method, sampler, **extra):
            sampler.base_moments(meas)                        # compile outside the timing
            t0 = time.perf_counter()
            mean = np.asarray(sampler.base_moments(meas)[0], np.float64)
            wall = time.perf_counter() - t0
            rows.append({"task": label, "method": method, "psnr": float(np.mean(psnr(mean, truth, **sc))),
                         "time_per_measurement_s": wall / len(truth), "n_eval": len(truth), **extra})
            print(f"{label} | {method}: {rows[-1]['psnr']:.2f} dB", flush=True)

        kw = {"n_steps": 1, "hidden": 4, "n_eig": 4, "surrogate": sur}
        row("kriging (centre='surrogate')", AmortizedSampler(manifold, prior, op, centre="surrogate",
                                                             **kw))
        s_bar = float(np.sqrt(np.mean(np.asarray(sur.marginal_std) ** 2)))
        sigma = op.sigma
        for hi_name, hi in (("s̄", s_bar), ("0.3·s̄", 0.3 * s_bar)):
            for lo_name, lo in (("0.4σ", 0.4 * sigma), ("σ", sigma)):
                if lo > hi:
                    continue
                for k in steps:
                    s = AmortizedSampler(manifold, prior, op, centre="pnp", pnp_steps=k,
                                         pnp_noise=(hi, lo), **kw)
                    row(f"pnp K={k}, ρ {hi_name} → {lo_name}", s, pnp_steps=k,
                        pnp_noise=[hi, lo], default=(hi_name, lo_name, k) == ("s̄", "0.4σ", 8))
    return rows


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", default="outputs/pnp_centre")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rows = scan("smoke" if args.smoke else "quick", args.seed)
    print("\n".join(
        ["| task | centre | PSNR (dB) | time / measurement (s) | n |", "|---|---|---|---|---|"]
        + [f"| {r['task']} | {r['method']}{' (default)' if r.get('default') else ''} | "
           f"{r['psnr']:.2f} | {r['time_per_measurement_s']:.2e} | {r['n_eval']} |" for r in rows]))
    write_json(Path(args.out) / "results.json",
               {"meta": {"seed": args.seed, "machine": machine_info(), "versions": versions(),
                         "units": {"psnr": "dB, data range 1"},
                         "signals": "validation signals no benchmark scores (see the docstring)"},
                "rows": rows})
    return rows


if __name__ == "__main__":
    main()
