"""Amortized posterior sampling against exact posteriors (issue 4's benchmark).

Priors with exact posteriors on the lat-lon sphere: a Matérn-like ``GaussianPrior`` and a
two-component ``GaussianMixturePrior`` (same covariance, means 0.5 ± δ). Operator: random masks
(60% missing), σ = 0.05. The sampler is trained on simulated measurements only (the signals behind
them are never shown to it) and evaluated on unseen measurements against the exact posterior:

* ``rel_err``: ‖mean_APS − mean_exact‖ / ‖mean_exact − μ_prior‖ (mean of 128 samples; mass
  weighted), averaged over test measurements; ``noise_floor``: the same for the mean of 128
  *exact* posterior samples;
* ``std_ratio``: median over vertices and measurements of std_APS / std_exact;
* ``kl_per_dim``: KL(q(·|y) ‖ p(·|y)) / D, Monte Carlo over q's samples with both log-densities
  exact (flow change of variables; Gaussian likelihood + prior − evidence);
* ``coverage90``: fraction of true signal values inside the samples' central 90% interval;
* mixtures: ``mode_weight_err`` = |mean over samples of p(k = 1 | x) − exact p(k = 1 | y)| on
  ambiguous measurements (exact weight in [0.1, 0.9]) and ``between_modes`` = fraction of
  samples with 0.1 < p(k = 1 | x) < 0.9;
* timings: train-step time, training wall time (compile included), sampling latency for 1 and 128
  samples of one new measurement (base solve included, compile excluded), the flow's FLOPs and
  the fraction of this machine's measured matmul peak they reach.

Training runs in stages (``fit`` resumes from its checkpoint); metrics after each stage give the
convergence curve and the wall time to the Gaussian target (rel_err ≤ 5%, std ratio in
[0.9, 1.1]).

    python benchmarks/gaussian_posterior.py              # full: 46×90, 30 min per run
    python benchmarks/gaussian_posterior.py --quick      # 23×45, a few minutes
    python benchmarks/gaussian_posterior.py --smoke      # tiny (the tests)
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from geodiff import VPSDE, AmortizedSampler, GaussianMixturePrior, GaussianPrior, Sphere
from geodiff.amortized import GaussianSurrogate
from geodiff.metrics import coverage
from geodiff.operators import RandomMask
from geodiff.timing import machine_info, time_call, versions, write_json


@dataclasses.dataclass(frozen=True)
class Config:
    """Benchmark settings (the full mode; ``--quick`` and ``--smoke`` shrink them)."""

    seed: int = 0
    nlat: int = 46
    nlon: int = 90
    ratio: float = 0.6
    sigma: float = 0.05
    variance: float = 0.01           # prior pointwise variance (normalized units²)
    length_scale: float = 0.3        # Matérn length scale on the unit sphere
    n_modes: int = 256               # prior eigenmodes
    delta: float = 0.04              # mixture means 0.5 ± delta·sin(latitude): ~55% ambiguous y
    n_train: int = 2000              # training measurements
    n_test: int = 100                # unseen test measurements
    surrogate_samples: int = 5000
    rank: int = 256
    n_steps: int = 8                 # flow steps (2 couplings each)
    hidden: int = 256
    n_eig: int = 64
    batch_size: int = 64
    learning_rate: float = 3e-4
    ema_decay: float | None = None   # parameter EMA used for evaluation (None: last iterate)
    n_t: int = 4                     # ELBO draws per sample
    t0: float = 1e-3                 # the priors' VPSDE t0 (the ELBO's decoder noise λ²(t0) ≈ 0.1·t0)
    minutes: float = 30.0            # training budget per run (wall, compile included)
    stages: int = 6                  # evaluations during training
    max_steps: int = 50000
    n_samples: int = 128
    priors: tuple = ("gaussian", "mixture")
    prior_terms: tuple = ("exact", "elbo")


QUICK = dict(nlat=23, nlon=45, n_train=1000, n_test=50, surrogate_samples=2000, minutes=1.0,
             stages=3)
SMOKE = dict(nlat=8, nlon=16, n_modes=48, n_train=64, n_test=6, surrogate_samples=200, rank=32,
             n_steps=2, hidden=32, n_eig=16, batch_size=16, minutes=0.02, stages=2, max_steps=20,
             n_samples=32)


def make_prior(kind: str, sphere: Sphere, cfg: Config):
    sde = VPSDE(t0=cfg.t0)
    base = GaussianPrior.matern(sphere, variance=cfg.variance, length_scale=cfg.length_scale,
                                mean=0.5, n_modes=min(cfg.n_modes, sphere.max_eigenpairs), sde=sde)
    if kind == "gaussian":
        return base
    # the two means differ by ±delta along a smooth pattern: the l = 1 zonal mode (north–south)
    lat = np.asarray(sphere.points)[:, 2:3]
    comps = [GaussianPrior(sphere, 0.5 + s * cfg.delta * lat, base.basis, base.variances,
                           float(base.nugget), sde=sde) for s in (-1.0, 1.0)]
    return GaussianMixturePrior(comps, [0.5, 0.5])


def responsibilities(prior: GaussianMixturePrior, x):
    """p(k = 1 | x) under the prior mixture (the measurement adds nothing given x), (...,)."""
    lw = jnp.log(prior.weights).reshape(-1, *([1] * (x.ndim - 2)))
    lp = jnp.stack([c.log_prob(x) for c in prior.components]) + lw
    return jax.nn.softmax(lp, axis=0)[1]


def rel_err(mean, mean_x, prior, sphere) -> float:
    """‖mean − mean_x‖ / ‖mean_x − μ_prior‖ (mass weighted), averaged over measurements."""
    w = jnp.asarray(sphere.mass)[:, None]
    mu = jnp.asarray(prior.mean if isinstance(prior, GaussianPrior)
                     else sum(wk * c.mean for wk, c in zip(prior.weights, prior.components)))
    num = jnp.sqrt(jnp.sum(w * (mean - mean_x) ** 2, axis=(-2, -1)))
    den = jnp.sqrt(jnp.sum(w * (mean_x - mu) ** 2, axis=(-2, -1)))
    return float(jnp.mean(num / den))


def evaluate(sampler, prior, op, meas, truth, exact, sphere, cfg, key) -> dict:
    """Metrics of ``sampler`` on the test measurements (see the module docstring)."""
    mean_x, std_x, noise_floor = exact
    x = sampler.sample(key, meas, cfg.n_samples)                     # (n, B, V, C)
    mean, std = x.mean(0), x.std(0)
    D = sphere.n_vertices * prior.channels
    log_q = sampler.log_prob(x, meas)                               # (n, B)
    resid = meas.y - op.forward(x, meas)
    n_obs = jnp.sum(meas.mask, axis=(-2, -1))
    log_lik = (-0.5 * jnp.sum(resid**2, axis=(-2, -1)) / op.sigma**2
               - 0.5 * n_obs * math.log(2 * math.pi * op.sigma**2))
    log_post = log_lik + prior.log_prob(x) - prior.log_evidence(op, meas)
    out = {"rel_err": rel_err(mean, mean_x, prior, sphere), "noise_floor": noise_floor,
           "std_ratio": float(jnp.median(std / std_x)),
           "kl_per_dim": float(jnp.mean(log_q - log_post)) / D,
           "coverage90": float(np.mean(coverage(np.asarray(x), np.asarray(truth)))),
           "mse": float(jnp.mean((mean - truth) ** 2))}
    if isinstance(prior, GaussianMixturePrior):
        wts = prior.posterior_weights(op, meas)[..., 1]
        amb = (wts > 0.1) & (wts < 0.9)
        r = responsibilities(prior, x)                              # (n, B)
        err = jnp.abs(r.mean(0) - wts)
        out.update(mode_weight_err=float(jnp.mean(err[amb])) if bool(amb.any()) else None,
                   n_ambiguous=int(amb.sum()),
                   between_modes=float(jnp.mean((r > 0.1) & (r < 0.9))))
    return out


def matmul_peak_gflops() -> float:
    """Measured float32 matmul throughput of this machine (GFLOP/s, 2048³)."""
    a = jnp.ones((2048, 2048), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    secs, _ = time_call(f, a, repeats=5)
    return 2 * 2048**3 / secs / 1e9


def sample_flops(sampler, meas1, n: int) -> float:
    """FLOPs of one ``sample`` call (XLA's cost analysis of the compiled program)."""
    m = jax.tree.map(lambda a: jnp.asarray(a)[None], meas1)
    lowered = sampler._jit_sample.lower(sampler.params, sampler._frozen(), m, jax.random.key(0),
                                        jnp.int32(0), n=n)
    cost = lowered.compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", float("nan")))


def run_one(kind: str, term: str, cfg: Config, sphere, op, train_m, test_m, test_x, sur,
            workdir: Path) -> dict:
    prior = make_prior(kind, sphere, cfg)
    t0 = time.perf_counter()
    mean_x, std_x = jax.block_until_ready(prior.posterior(op, test_m))
    ex = prior.posterior_sample(jax.random.key(cfg.seed + 7), op, test_m, cfg.n_samples)
    exact = (mean_x, std_x, rel_err(ex.mean(0), mean_x, prior, sphere))
    sampler = AmortizedSampler(sphere, prior, op, prior_term=term, surrogate=sur, n_t=cfg.n_t,
                               n_steps=cfg.n_steps, hidden=cfg.hidden, n_eig=cfg.n_eig, seed=cfg.seed)
    k_eval = jax.random.key(cfg.seed + 11)
    base = evaluate(sampler, prior, op, test_m, test_x, exact, sphere, cfg, k_eval)
    print(f"  [{kind}/{term}] base (untrained): " + _fmt(base), flush=True)

    budget = cfg.minutes * 60.0
    ckpt = workdir / f"{kind}-{term}"
    curve, steps, train_s, hist, trained = [], 0, 0.0, None, sampler
    step_s = None
    for stage in range(cfg.stages):
        if step_s is None:
            target = min(cfg.max_steps, max(10, cfg.max_steps // cfg.stages) if cfg.max_steps < 100
                         else 50)
        else:
            left = budget * (stage + 1) / cfg.stages - train_s
            target = min(cfg.max_steps, steps + max(1, int(left / step_s)))
        if target <= steps:
            continue
        t = time.perf_counter()
        trained, hist = sampler.fit(jax.random.key(cfg.seed + 3), train_m, steps=target,
                                    batch_size=cfg.batch_size, learning_rate=cfg.learning_rate,
                                    ema_decay=cfg.ema_decay, checkpoint_dir=ckpt,
                                    checkpoint_every=10**9, progress=False)
        train_s += time.perf_counter() - t
        steps = target
        step_s = hist["step_s"] if math.isfinite(hist["step_s"]) else train_s / steps
        met = evaluate(trained, prior, op, test_m, test_x, exact, sphere, cfg, k_eval)
        met.update(step=steps, train_s=round(train_s, 1), loss=hist["loss"][-1])
        curve.append(met)
        print(f"  [{kind}/{term}] step {steps:6d} ({train_s:6.0f} s): " + _fmt(met), flush=True)
        if steps >= cfg.max_steps or train_s >= budget:
            break

    one = test_m[0]
    t1, _ = time_call(trained.sample, jax.random.key(1), one, 1, repeats=5)
    t128, _ = time_call(trained.sample, jax.random.key(1), one, 128, repeats=5)
    final = curve[-1] if curve else base
    hit = next((c for c in curve if c["rel_err"] <= 0.05 and 0.9 <= c["std_ratio"] <= 1.1), None)
    return {"prior": kind, "prior_term": term, "base": base, "final": final, "curve": curve,
            "steps": steps, "train_s": round(train_s, 1), "step_s": step_s,
            "time_to_target_s": None if hit is None else hit["train_s"],
            "sample_1_s": t1, "sample_128_s": t128,
            "flops_1": sample_flops(trained, one, 1), "flops_128": sample_flops(trained, one, 128),
            "n_params": trained.n_params, "base_s": hist["base_s"] if hist else None,
            "setup_s": round(time.perf_counter() - t0 - train_s, 1)}


def _fmt(m: dict) -> str:
    s = (f"rel_err {m['rel_err']:.3f} (floor {m['noise_floor']:.3f}), std ratio "
         f"{m['std_ratio']:.3f}, KL/dim {m['kl_per_dim']:.4f}, cov90 {m['coverage90']:.3f}")
    if "mode_weight_err" in m:
        mw = m["mode_weight_err"]
        s += (f", mode-weight err {'n/a' if mw is None else f'{mw:.3f}'} "
              f"({m['n_ambiguous']} ambiguous), between {m['between_modes']:.3f}")
    return s


def run(cfg: Config, out: Path) -> dict:
    sphere = Sphere.latlon(cfg.nlat, cfg.nlon)
    op = RandomMask(cfg.ratio, cfg.sigma).on(sphere)
    peak = matmul_peak_gflops()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in cfg.priors:
            prior = make_prior(kind, sphere, cfg)
            k = jax.random.split(jax.random.key(cfg.seed), 4)
            train_x = prior.sample(k[0], cfg.n_train)
            train_m = op.measure(k[1], train_x)
            del train_x                                   # the sampler never sees the signals
            test_x = prior.sample(k[2], cfg.n_test)
            test_m = op.measure(k[3], test_x)
            t = time.perf_counter()
            sur = GaussianSurrogate.from_prior(jax.random.key(cfg.seed + 5), prior,
                                               n_samples=cfg.surrogate_samples, rank=cfg.rank)
            sur_s = time.perf_counter() - t
            for term in cfg.prior_terms:
                r = run_one(kind, term, cfg, sphere, op, train_m, test_m, test_x, sur, Path(tmp))
                r["surrogate_s"] = round(sur_s, 2)
                r["gflops_1"] = r["flops_1"] / r["sample_1_s"] / 1e9
                r["gflops_128"] = r["flops_128"] / r["sample_128_s"] / 1e9
                r["peak_fraction_128"] = r["gflops_128"] / peak
                results.append(r)
    rows = []
    for r in results:
        task = f"{r['prior']} prior, sphere {cfg.nlat}x{cfg.nlon}, mask {cfg.ratio:.0%}, σ={cfg.sigma}"
        for method, n, secs in (("APS(1)", 1, r["sample_1_s"]), ("APS(128)", 128, r["sample_128_s"])):
            rows.append({"task": task, "method": method, "prior_term": r["prior_term"],
                         "time_per_sample_s": secs / n, "psnr": None, "ssim": None,
                         "mse": r["final"]["mse"] if n == 128 else None,
                         "coverage90": r["final"]["coverage90"] if n == 128 else None,
                         "training_s": r["train_s"], "break_even_n": None})
    result = {"meta": {"seed": cfg.seed, "data_source": "synthetic: samples of the analytic priors",
                       "machine": machine_info(), "versions": versions(),
                       "config": dataclasses.asdict(cfg), "matmul_peak_gflops": peak},
              "runs": results, "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", result)
    (out / "results.md").write_text(markdown_table(results, cfg))
    print(markdown_table(results, cfg))
    return result


def markdown_table(results: list[dict], cfg: Config) -> str:
    head = ("| prior | prior term | stage | steps | train (s) | rel. err (floor) | std ratio | "
            "KL/dim | cov90 | mode-weight err | between modes |\n|" + "---|" * 11 + "\n")
    lines = []
    for r in results:
        for stage, m, steps, secs in (("base", r["base"], 0, 0.0),
                                      ("trained", r["final"], r["steps"], r["train_s"])):
            mw, bm = m.get("mode_weight_err"), m.get("between_modes")
            lines.append(f"| {r['prior']} | {r['prior_term']} | {stage} | {steps} | {secs:.0f} | "
                         f"{m['rel_err']:.3f} ({m['noise_floor']:.3f}) | {m['std_ratio']:.3f} | "
                         f"{m['kl_per_dim']:.4f} | {m['coverage90']:.3f} | "
                         f"{'–' if mw is None else f'{mw:.3f}'} | "
                         f"{'–' if bm is None else f'{bm:.3f}'} |")
    t = ["", "| prior | prior term | step (ms) | 1 sample (ms) | 128 samples (ms) | GFLOP (1 / 128) "
         "| % of matmul peak (128) | params | time to target (s) |", "|" + "---|" * 9]
    for r in results:
        ttt = r["time_to_target_s"]
        t.append(f"| {r['prior']} | {r['prior_term']} | {1e3 * r['step_s']:.1f} | "
                 f"{1e3 * r['sample_1_s']:.2f} | {1e3 * r['sample_128_s']:.1f} | "
                 f"{r['flops_1'] / 1e9:.3f} / {r['flops_128'] / 1e9:.2f} | "
                 f"{100 * r['peak_fraction_128']:.1f} | {r['n_params']:,} | "
                 f"{'not reached' if ttt is None else f'{ttt:.0f}'} |")
    return head + "\n".join(lines) + "\n" + "\n".join(t) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="23×45 sphere, short runs")
    p.add_argument("--smoke", action="store_true", help="tiny, for the tests")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--minutes", type=float, help="training budget per run (minutes)")
    p.add_argument("--stages", type=int, help="evaluations during each training run")
    p.add_argument("--priors", nargs="+", choices=("gaussian", "mixture"))
    p.add_argument("--prior-terms", nargs="+", choices=("exact", "elbo"))
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--n-t", type=int)
    p.add_argument("--ema-decay", type=float)
    p.add_argument("--t0", type=float, help="the priors' VPSDE t0")
    p.add_argument("--out", type=Path, default=Path("outputs/gaussian_posterior"))
    p.add_argument("--json", type=Path, help="also write the results JSON here")
    args = p.parse_args(argv)
    over = SMOKE if args.smoke else QUICK if args.quick else {}
    cfg = dataclasses.replace(Config(), seed=args.seed, **over)
    for name, val in (("minutes", args.minutes), ("stages", args.stages), ("priors", args.priors),
                      ("prior_terms", args.prior_terms), ("learning_rate", args.learning_rate),
                      ("n_t", args.n_t), ("ema_decay", args.ema_decay),
                      ("t0", args.t0)):
        if val is not None:
            cfg = dataclasses.replace(cfg, **{name: tuple(val) if isinstance(val, list) else val})
    result = run(cfg, args.out)
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
