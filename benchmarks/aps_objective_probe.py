"""Probe of the APS objective on a learned prior: is a poor APS result an optimization failure or
what the objective asks for?

For the grid denoising task (σ = 0.1, MNIST 32×32 standing in for CelebA, the cached MNIST
diffusion prior), it evaluates the amortized objective of METHOD §4 per dimension,

    L(q) = E_q[log q(x|y) − log p(y|x) − b(x)]        (b: the diffusion ELBO, ``n_t`` draws),

with the same estimator for several candidate posteriors q(·|y) on held-out measurements:
- ``base``: the untrained sampler (the exact posterior of the Gaussian surrogate);
- ``APS``: the sampler after ``--steps`` optimizer steps on training measurements;
- ``Tweedie + s``: N(x̂, s² I) around the Noise2Score estimate x̂ = E[x | y] of the same prior,
  for a few s (log q in closed form).
If a candidate has a lower L than the trained APS, the optimizer or the flow failed to reach it;
if the trained APS has the lower L while being farther from the truth, the objective (the ELBO of
this prior) prefers it. Also printed: PSNR of the candidates' means and 90% coverage.

    python benchmarks/aps_objective_probe.py [--steps 300] [--local-hidden 32] [--encoder-width 32]
                                             [--prior-mode full] [--json PATH]
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from geodiff import AmortizedSampler, Grid  # noqa: E402
from geodiff.amortized import GaussianSurrogate  # noqa: E402
from geodiff.baselines import gaussian_fit, noise2score  # noqa: E402
from geodiff.data import mnist32  # noqa: E402
from geodiff.metrics import coverage, psnr  # noqa: E402
from geodiff.operators import Denoise  # noqa: E402
from geodiff.timing import machine_info, versions, write_json  # noqa: E402


def objective(prior, op, meas, x, log_q, key, n_t):
    """Per-dimension terms of L for samples x (K, B, V, C) with log q (K, B)."""
    K, B, V, C = x.shape
    D = V * C
    s2 = op.sigma**2
    resid = np.asarray(meas.y)[None] - x
    log_lik = -0.5 * np.sum(resid**2, axis=(-2, -1)) / s2 - 0.5 * D * math.log(2 * math.pi * s2)
    elbo = jax.jit(lambda k, xx: prior.elbo(k, xx, n_t=n_t, antithetic=True))
    b = np.stack([np.asarray(elbo(jax.random.fold_in(key, i), jnp.asarray(x[i]))) for i in range(K)])
    terms = {"log_q": float(np.mean(log_q)) / D, "data": float(-np.mean(log_lik)) / D,
             "prior": float(-np.mean(b)) / D}
    terms["L"] = terms["log_q"] + terms["data"] + terms["prior"]
    return terms


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, nargs="+", default=[300],
                   help="evaluate the trained sampler after each of these step counts (one run)")
    p.add_argument("--prior-mode", default="quick")
    p.add_argument("--n-test", type=int, default=16)
    p.add_argument("--samples", type=int, default=16, help="draws per measurement")
    p.add_argument("--n-t", type=int, default=16, help="ELBO draws per sample (even)")
    p.add_argument("--local-hidden", type=int, default=0,
                   help="per-vertex MLP width of the flow's conditioners (0: off, the default)")
    p.add_argument("--encoder-width", type=int, default=0,
                   help="width of the flow's condition encoder (0: none, the default)")
    p.add_argument("--encoder-blocks", type=int, default=2, help="diffusion blocks of the encoder")
    p.add_argument("--batch", type=int, default=16, help="measurements per optimizer step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    from train_priors import train_or_load

    grid = Grid(32, 32)
    prior, _, _, _ = train_or_load("mnist", args.prior_mode, seed=args.seed, progress=False)
    train, test = mnist32("train"), mnist32("test")[: args.n_test]
    op = Denoise(0.1).on(grid)
    meas = op.measure(jax.random.key(args.seed), test)
    sur = GaussianSurrogate(*(np.asarray(a, np.float32) for a in gaussian_fit(train, rank=256)))
    sampler = AmortizedSampler(grid, prior, op, surrogate=sur, n_t=2, seed=args.seed,
                               local_hidden=args.local_hidden, encoder_width=args.encoder_width,
                               encoder_blocks=args.encoder_blocks)
    train_meas = op.measure(jax.random.key(args.seed + 101), train[:500])
    key = jax.random.key(args.seed + 7)
    K = args.samples
    cands = {"base": sampler}
    with tempfile.TemporaryDirectory() as ckpt:
        t0 = time.perf_counter()
        for steps in sorted(args.steps):          # one run, evaluated at each step count
            trained, hist = sampler.fit(jax.random.key(args.seed + 102), train_meas, steps=steps,
                                        batch_size=args.batch, progress=False, checkpoint_dir=ckpt,
                                        checkpoint_every=min(args.steps))
            print(f"APS: {steps} steps after {time.perf_counter() - t0:.0f} s, training loss "
                  f"{hist['loss'][-1]:.3f} nats/dim")
            cands[f"APS ({steps} steps)"] = trained
    for name, smp in list(cands.items()):
        x = np.asarray(smp.sample(jax.random.key(1), meas, K))
        cands[name] = (x, np.asarray(smp.log_prob(x, meas)))
    xhat = np.asarray(noise2score(prior, op, meas))
    D = xhat.shape[-2] * xhat.shape[-1]
    for sd in (0.02, 0.05, 0.1):
        z = np.asarray(jax.random.normal(jax.random.key(2), (K, *xhat.shape)))
        log_q = -0.5 * np.sum(z**2, axis=(-2, -1)) - 0.5 * D * math.log(2 * math.pi) - D * math.log(sd)
        cands[f"Tweedie + s={sd}"] = (xhat[None] + sd * z, log_q)
    rows = []
    print(f"{'candidate':24s} {'L':>8s} {'log q':>8s} {'−log p(y|x)':>12s} {'−b(x)':>8s} "
          f"{'PSNR mean':>10s} {'cov90':>6s}")
    for name, (x, log_q) in cands.items():
        t = objective(prior, op, meas, x, log_q, key, args.n_t)
        t |= {"candidate": name, "psnr_mean": float(np.mean(psnr(x.mean(0), test))),
              "coverage90": float(np.mean(coverage(x, test)))}
        rows.append(t)
        print(f"{name:24s} {t['L']:8.4f} {t['log_q']:8.4f} {t['data']:12.4f} {t['prior']:8.4f} "
              f"{t['psnr_mean']:10.2f} {t['coverage90']:6.3f}")
    truth_b = objective(prior, op, meas, test[None].astype(np.float32), np.zeros((1, len(test))), key,
                        args.n_t)["prior"]
    print(f"−b(truth) = {truth_b:.4f} nats/dim (the ELBO of the clean test digits)")
    if args.json:
        write_json(args.json, {"meta": {"seed": args.seed, "machine": machine_info(),
                                        "versions": versions(), "args": vars(args),
                                        "data_source": "MNIST 32×32 standing in for CelebA"},
                               "rows": rows, "neg_elbo_truth": truth_b})
    return rows


if __name__ == "__main__":
    main()
