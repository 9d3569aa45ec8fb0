"""Cost of the amortized sampler's flow variants on the 32×32 grid denoising task (σ = 0.1, MNIST
32×32 standing in for CelebA, the cached MNIST prior): wall seconds per training step at the
full-mode batch, and sampling latency for 1 and 128 samples (compilation excluded, median of
repeats). Variants: the spectral conditioner alone, with the 2-ring MLP (``local_hidden``), and
with the ring MLP plus the condition encoder (``encoder_width``). The flows are untrained: the
cost does not depend on the weights. Run it with nothing else on the machine.

    python benchmarks/aps_flow_cost.py [--prior-mode full] [--steps 20] [--json PATH]
    python benchmarks/aps_flow_cost.py --smoke      # tiny, what the tests run
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from geodiff import AmortizedSampler, Grid  # noqa: E402
from geodiff.amortized import GaussianSurrogate  # noqa: E402
from geodiff.baselines import gaussian_fit  # noqa: E402
from geodiff.data import mnist32  # noqa: E402
from geodiff.operators import Denoise  # noqa: E402
from geodiff.timing import machine_info, time_call, versions, write_json  # noqa: E402

VARIANTS = {"spectral": {}, "ring MLP": {"local_hidden": 32},
            "ring MLP + encoder": {"local_hidden": 32, "encoder_width": 32, "encoder_blocks": 2}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prior-mode", default="full")
    p.add_argument("--steps", type=int, default=20, help="timed training steps per variant (≥ 3)")
    p.add_argument("--batch", type=int, default=32, help="measurements per step (full mode: 32)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes and the smoke prior (CI)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.steps < 3:
        raise SystemExit(f"--steps must be ≥ 3 (the first step compiles), got {args.steps}")
    from train_priors import train_or_load

    mode = "smoke" if args.smoke else args.prior_mode
    size = dict(hidden=16, n_steps=1, n_eig=8) if args.smoke else {}
    grid = Grid(32, 32)
    prior, _, _, _ = train_or_load("mnist", mode, seed=args.seed, progress=False)
    train = mnist32("train")[: 64 if args.smoke else 2000]
    op = Denoise(0.1).on(grid)
    sur = GaussianSurrogate(*(np.asarray(a, np.float32)
                              for a in gaussian_fit(train, rank=16 if args.smoke else 256)))
    meas = op.measure(jax.random.key(args.seed + 101), train[: max(args.batch, 8)])
    one = meas[0]
    rows = []
    for name, kw in VARIANTS.items():
        if args.smoke:
            kw = {k: (4 if k != "encoder_blocks" else 1) for k in kw}
        s = AmortizedSampler(grid, prior, op, surrogate=sur, n_t=2, seed=args.seed, **size, **kw)
        t0 = time.perf_counter()
        _, hist = s.fit(jax.random.key(args.seed), meas, steps=args.steps, batch_size=args.batch,
                        progress=False, log_every=1)
        row = {"variant": name, **kw, "n_params": s.n_params, "step_s": hist["step_s"],
               "compile_s": hist["compile_s"], "fit_wall_s": time.perf_counter() - t0,
               "batch": args.batch}
        for n in (1, 128):
            row[f"sample_{n}_s"] = time_call(s.sample, jax.random.key(1), one, n, repeats=5)[0]
        rows.append(row)
    print(f"{'variant':20s} {'params':>9s} {'s/step':>8s} {'1 sample (s)':>13s} {'128 samples (s)':>16s}")
    for r in rows:
        print(f"{r['variant']:20s} {r['n_params']:9d} {r['step_s']:8.3f} {r['sample_1_s']:13.2e} "
              f"{r['sample_128_s']:16.2e}")
    result = {"meta": {"seed": args.seed, "prior_mode": mode, "machine": machine_info(),
                       "versions": versions(), "steps": args.steps,
                       "data_source": "MNIST 32×32 standing in for CelebA"}, "rows": rows}
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
