"""The amortized sampler's design table: centre × objective × calibration, with the baselines of
the same prior, on the grid denoising and the ERA5-like imputation tasks (docs/amortized.md).

For each task one diffusion prior (``benchmarks/train_priors.py``, trained first if missing), one
Gaussian fit to the prior's training set (kriging and the sampler's surrogate) and one set of
unseen test signals. Variants of ``AmortizedSampler``:

- centre: ``tweedie`` (Noise2Score of the prior; denoising only), ``surrogate`` (kriging) or
  ``mixture`` (the exact posterior of a Gaussian-mixture surrogate fitted by EM to the same
  training signals: ``mixture_k`` components of rank ``mixture_rank``);
- objective: ``none`` (the untrained sampler: its base), ``reverse`` (the paper's loss on the
  measurements of ``n_train`` training-split signals: learns from measurements only), ``pairs``
  (simulated pairs from the clean training split of the prior: distillation from the prior's
  training set) and ``pairs+reverse``;
- calibration: the raw sampler and the one whose temperature τ :meth:`calibrate` set on held-out
  training-split signals (never test signals).

Scores of 128 samples per test measurement: PSNR of their mean and of one sample, 90% coverage
and the fair CRPS; kriging gets the closed-form Gaussian CRPS. On the sphere every score is
area-weighted (``mass``) and taken on the missing points only; on the grid every pixel counts.

    python benchmarks/aps_design.py --quick     # ≈ 25 min on 2 CPU cores
    python benchmarks/aps_design.py --quick --objectives none reverse pairs pairs+reverse
    python benchmarks/aps_design.py --quick --tasks era5 --centres mixture --objectives none pairs
    python benchmarks/aps_design.py --smoke     # seconds (what the tests run)

Writes ``<out>/results.json`` and ``<out>/results.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling scripts

from geodiff import AmortizedSampler, Grid, Sphere  # noqa: E402
from geodiff.amortized import GaussianSurrogate, MixtureSurrogate  # noqa: E402
from geodiff.baselines import gaussian_fit, kriging, noise2score  # noqa: E402
from geodiff.metrics import coverage, crps, crps_gaussian, psnr  # noqa: E402
from geodiff.operators import Denoise, RandomMask  # noqa: E402
from geodiff.timing import machine_info, versions, write_json  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Config:
    prior_mode: str = "quick"
    n_train: int = 2000          # prior training-split signals: surrogate fit, pairs, measurements
    n_calib: int = 100           # held-out training-split signals for calibrate
    calib_samples: int = 32      # samples per pair while calibrating
    calib_iters: int = 10        # bisection steps of calibrate
    n_test: int = 50
    rank: int = 256
    steps: int = 150
    batch: int = 16
    lr: float = 1e-3
    hidden: int = 128
    couplings: int = 4
    n_eig: int = 32
    samples: int = 128
    seed: int = 0
    tasks: tuple = ("denoise", "era5")
    objectives: tuple = ("none", "reverse", "pairs")
    centres: tuple = ("tweedie", "surrogate", "mixture")   # those that apply to the task
    mixture_k: int = 8
    mixture_rank: int = 64


MODES = {"quick": Config(),
         "smoke": Config(prior_mode="smoke", n_train=40, n_calib=16, n_test=3, rank=8, steps=2,
                         batch=4, hidden=8, couplings=1, n_eig=8, samples=16, tasks=("denoise",),
                         objectives=("none", "pairs+reverse"), mixture_k=2, mixture_rank=4,
                         centres=("tweedie", "mixture"))}   # the surrogate centre: era5 smoke


def task_setup(name: str, cfg: Config):
    """(label, manifold, prior, operator, train, calib, test, data source)."""
    from train_priors import train_or_load

    from geodiff.data import era5_like, glosea4_split, mnist32

    if name == "denoise":
        prior, _, _, _ = train_or_load("mnist", cfg.prior_mode, seed=cfg.seed, progress=False)
        data = mnist32("train")
        train, calib = data[: cfg.n_train], data[len(data) - cfg.n_calib:]
        return ("grid denoise σ=0.1", Grid(32, 32), prior, Denoise(0.1), train, calib,
                mnist32("test")[: cfg.n_test], "MNIST 32×32 (standing in for CelebA)")
    prior, _, _, _ = train_or_load("era5", cfg.prior_mode, seed=cfg.seed, progress=False)
    data = era5_like(cfg.seed + 100, cfg.n_train + cfg.n_calib)
    return ("ERA5-like 60% missing, σ=0.05", Sphere.latlon(46, 90), prior, RandomMask(0.6, 0.05),
            data[: cfg.n_train], data[cfg.n_train:], glosea4_split("test")[: cfg.n_test],
            "ERA5-like, built from GloSea4 fields; test: held-out GloSea4 fields")


def scores(manifold, truth, meas, samples=None, mean=None, std=None) -> dict:
    """PSNR of the mean (and of one sample), coverage and CRPS; area-weighted on missing points
    on the sphere."""
    sphere = isinstance(manifold, Sphere)
    kw = {"weights": np.asarray(manifold.mass), "where": ~np.asarray(meas.mask)} if sphere else {}
    out = {}
    if samples is not None:
        mean = samples.mean(0)
        out["psnr_1"] = float(np.mean(psnr(samples[0], truth, **kw)))
        out["coverage90"] = float(np.mean(coverage(samples, truth, **kw)))
        out["crps"] = float(np.mean(crps(samples, truth, fair=True, **kw)))
    elif std is not None:
        out["crps"] = float(np.mean(crps_gaussian(mean, std, truth, **kw)))
    out["psnr"] = float(np.mean(psnr(mean, truth, **kw)))
    return out


def run_task(name: str, cfg: Config) -> list[dict]:
    label, manifold, prior, op, train, calib, test, source = task_setup(name, cfg)
    op = op.on(manifold)
    truth = np.asarray(test, np.float64)
    meas = op.measure(jax.random.key(cfg.seed), test)
    mean, factor, nugget = gaussian_fit(train, rank=min(cfg.rank, len(train) - 1))
    sur = GaussianSurrogate(*(np.asarray(a, np.float32) for a in (mean, factor, nugget)))
    rows = []

    def row(method, learned_from, **extra):
        r = {"task": label, "method": method, "learned_from": learned_from, "data_source": source}
        rows.append(r | extra)
        print(json.dumps(rows[-1]))

    k_mean = np.asarray(kriging(op, meas, mean=mean, cov_factor=factor, nugget=nugget))
    # the kriging std is the untrained surrogate-centred sampler's base std (same surrogate)
    probe = AmortizedSampler(manifold, prior, op, surrogate=sur, centre="surrogate", n_steps=1,
                             hidden=8, n_eig=8)
    k_std = np.asarray(jax.jit(probe._base)(probe._frozen(), meas)["std"])
    row("Kriging", "the prior's training set (Gaussian fit)",
        **scores(manifold, truth, meas, mean=k_mean, std=k_std))
    if isinstance(op, Denoise):
        row("Noise2Score", "the diffusion prior",
            **scores(manifold, truth, meas, mean=np.asarray(noise2score(prior, op, meas))))
    centres = [c for c in cfg.centres if c != "tweedie" or isinstance(op, Denoise)]
    mix = None
    if "mixture" in centres:
        t0 = time.perf_counter()
        mix = MixtureSurrogate.fit(train, components=cfg.mixture_k, rank=cfg.mixture_rank,
                                   seed=cfg.seed)
        print(f"mixture surrogate: K={cfg.mixture_k}, R={cfg.mixture_rank}, EM "
              f"{time.perf_counter() - t0:.0f} s, {len(mix.fit_info['history'])} iterations, "
              f"log-likelihood {mix.fit_info['loglik']:.4f} nats/dim", flush=True)
    train_meas = op.measure(jax.random.key(cfg.seed + 101), train)
    sources = {"none": "—", "reverse": "measurements only (paper)",
               "pairs": "prior's training set (pairs)",
               "pairs+reverse": "prior's training set, then measurements"}
    for centre in centres:
        base = AmortizedSampler(manifold, prior, op, surrogate=sur, centre=centre,
                                mixture=mix if centre == "mixture" else None, n_steps=cfg.couplings, hidden=cfg.hidden, n_eig=cfg.n_eig,
                                seed=cfg.seed, n_t=2)
        for objective in cfg.objectives:
            t0 = time.perf_counter()
            chosen = None
            if objective == "none":
                trained = base
            else:
                kw = {"signals": train} if objective.startswith("pairs") else {}
                # return-best on the held-out calibration signals (their pairs, or for the
                # paper's loss their measurements): training never ends below its start
                val = calib if objective.startswith("pairs") else op.measure(
                    jax.random.key(cfg.seed + 106), calib)
                trained, hist = base.fit(jax.random.key(cfg.seed + 102),
                                         None if objective == "pairs" else train_meas,
                                         steps=cfg.steps, objective=objective,
                                         batch_size=cfg.batch, learning_rate=cfg.lr,
                                         warmup_steps=min(20, cfg.steps), progress=False,
                                         validation=val, **kw)
                chosen = hist["validation"]["chosen"]
            train_s = time.perf_counter() - t0
            for calibrated in (False, True):
                s = trained
                if calibrated:
                    s = trained.calibrate(jax.random.key(cfg.seed + 105), calib,
                                          n_samples=min(cfg.calib_samples, cfg.samples),
                                          iters=cfg.calib_iters)
                xs = np.asarray(s.sample(jax.random.key(cfg.seed + 104), meas, cfg.samples),
                                np.float64)
                row(f"APS {centre}/{objective}" + (" τ" if calibrated else ""),
                    sources[objective], centre=centre, objective=objective,
                    temperature=s.temperature, training_s=train_s, chosen=chosen,
                    **scores(manifold, truth, meas, samples=xs))
    return rows


def table(rows) -> str:
    lines = ["| task | method | learned from | kept | τ | PSNR mean-128 (dB) | PSNR 1 sample | "
             "cov90 | CRPS | train s |", "|---|---|---|---|---|---|---|---|---|---|"]
    f = lambda v, spec: "–" if v is None else format(v, spec)  # noqa: E731
    for r in rows:
        lines.append(f"| {r['task']} | {r['method']} | {r['learned_from']} | {r.get('chosen') or '–'} | "
                     f"{f(r.get('temperature'), '.2f')} | {r['psnr']:.2f} | "
                     f"{f(r.get('psnr_1'), '.2f')} | {f(r.get('coverage90'), '.3f')} | "
                     f"{f(r.get('crps'), '.4f')} | {f(r.get('training_s'), '.0f')} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true")
    mode.add_argument("--smoke", action="store_true")
    p.add_argument("--tasks", nargs="+", choices=["denoise", "era5"], default=None)
    p.add_argument("--objectives", nargs="+", default=None,
                   choices=["none", "reverse", "pairs", "pairs+reverse"])
    p.add_argument("--centres", nargs="+", default=None,
                   choices=["tweedie", "surrogate", "mixture"])
    p.add_argument("--out", default="outputs/aps_design")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    cfg = MODES["smoke" if args.smoke else "quick"]
    cfg = dataclasses.replace(cfg, seed=args.seed, tasks=tuple(args.tasks or cfg.tasks),
                              objectives=tuple(args.objectives or cfg.objectives),
                              centres=tuple(args.centres or cfg.centres))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in cfg.tasks:
        rows += run_task(name, cfg)
        result = {"meta": {"seed": cfg.seed, "config": dataclasses.asdict(cfg),
                           "machine": machine_info(), "versions": versions(),
                           "scores": "128 samples per test measurement; sphere: area-weighted on "
                                     "the missing points; CRPS fair (samples) or closed-form "
                                     "Gaussian (kriging)"}, "rows": rows}
        write_json(out / "results.json", result)
        (out / "results.md").write_text("# APS design table\n\n" + table(rows) + "\n")
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
