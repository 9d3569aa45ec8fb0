"""Does the diffusion ELBO itself narrow the posterior? A scan on an exact Gaussian prior.

On a Matérn ``GaussianPrior`` (exact log p and exact posterior), with q_s = N(m, s²·Σ) where m, Σ
are the exact posterior mean and covariance of each measurement, compare the paper's objective

    L(s) = E_{q_s}[log q_s(x) − log p(y | x) − b(x)]

with b = log p (exact: its minimum is at s = 1, where L = −log p(y)) and with b = the diffusion
ELBO (``prior.elbo``, ``n_t`` draws of (t, ε) per sample). Entropy: E[log q_s] = E[log q_1] − D
log s. Common random numbers: the same posterior draws (scaled by s) and the same ELBO keys for
every s, so the curves are smooth and their differences are not Monte Carlo noise.

    python benchmarks/elbo_scan.py              # ≈ 1 min on 2 CPU cores
    python benchmarks/elbo_scan.py --smoke

Prints a table (per-dimension objective relative to its value at s = 1, and each argmin) and
writes ``<out>/results.json``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from geodiff import VPSDE, GaussianPrior, Sphere
from geodiff.operators import RandomMask
from geodiff.timing import machine_info, versions, write_json

SCALES = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 1.0, 1.05, 1.1, 1.2, 1.4)


def scan(*, n_y: int, n_samples: int, n_t: int, t0: float, seed: int = 0, nlat: int = 12,
         nlon: int = 24) -> dict:
    sphere = Sphere.latlon(nlat, nlon)
    prior = GaussianPrior.matern(sphere, variance=0.01, length_scale=0.3, mean=0.5,
                                 sde=VPSDE(t0=t0))
    op = RandomMask(0.6, 0.05).on(sphere)
    meas = op.measure(jax.random.key(seed), prior.sample(jax.random.key(seed + 1), n_y))
    post = prior.posterior_sample(jax.random.key(seed + 2), op, meas, n_samples)  # (n, B, V, C)
    mean, _ = prior.posterior(op, meas)
    D = sphere.n_vertices * prior.channels
    s2 = op.sigma**2

    @jax.jit
    def terms(s, key):
        x = mean + s * (post - mean)                              # draws of q_s
        flat = x.reshape(-1, *x.shape[-2:])
        resid = (meas.y - op.forward(x, meas)) * meas.mask
        log_lik = -0.5 * jnp.sum(resid**2, axis=(-2, -1)) / s2       # constants dropped
        exact = prior.log_prob(flat).reshape(x.shape[:2])
        elbo = prior.elbo(key, flat, n_t=n_t, antithetic=True).reshape(x.shape[:2])
        ent = -D * jnp.log(s)                                      # E log q_s − E log q_1
        return (jnp.mean(ent - log_lik - exact) / D, jnp.mean(ent - log_lik - elbo) / D)

    key = jax.random.key(seed + 3)
    rows = [tuple(float(v) for v in terms(jnp.float32(s), key)) for s in SCALES]
    exact, elbo = np.array([r[0] for r in rows]), np.array([r[1] for r in rows])
    i1 = SCALES.index(1.0)
    return {"t0": t0, "n_y": n_y, "n_samples": n_samples, "n_t": n_t, "D": D,
            "scales": list(SCALES), "exact": list(exact - exact[i1]), "elbo": list(elbo - elbo[i1]),
            "argmin_exact": SCALES[int(np.argmin(exact))], "argmin_elbo": SCALES[int(np.argmin(elbo))],
            "elbo_gap_at_1": float(elbo[i1] - exact[i1])}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", default="outputs/elbo_scan")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    kw = dict(n_y=2, n_samples=4, n_t=2, nlat=6, nlon=12) if args.smoke else \
        dict(n_y=16, n_samples=64, n_t=8)
    results = [scan(t0=t0, seed=args.seed, **kw) for t0 in (1e-3, 1e-5)]
    head = "| s | " + " | ".join(f"exact (t0={r['t0']:g}) | ELBO (t0={r['t0']:g})" for r in results)
    lines = [head + " |", "|---" * (1 + 2 * len(results)) + "|"]
    for i, s in enumerate(SCALES):
        cells = " | ".join(f"{r['exact'][i]:+.4f} | {r['elbo'][i]:+.4f}" for r in results)
        lines.append(f"| {s:g} | {cells} |")
    lines.append("| argmin | " + " | ".join(f"{r['argmin_exact']:g} | {r['argmin_elbo']:g}"
                                           for r in results) + " |")
    print("\n".join(lines))
    for r in results:
        print(f"t0={r['t0']:g}: ELBO − exact objective at s = 1: {r['elbo_gap_at_1']:.4f} nats/dim")
    out = Path(args.out)
    write_json(out / "results.json", {"meta": {"seed": args.seed, "machine": machine_info(),
                                               "versions": versions(),
                                               "units": "nats per dimension, relative to s = 1"},
                                      "rows": results})
    return results


if __name__ == "__main__":
    main()
