"""ERA5-like temperature imputation on the 46×90 sphere (60% of grid points missing, σ = 0.05).

Training data: the "ERA5-like (GloSea4-anchored)" set generated from the 54 real GloSea4 monthly
fields of ensemble members 0–8 (`geodiff.data.era5_like`). Evaluation: the 18 real held-out fields
of members 10–12 (files 011–013), never used for training. Each held-out field gets one random
mask and noise draw (seeded).

Methods in this version: Gaussian optimal interpolation (kriging with the training set's mean and a
rank-R + diagonal covariance), harmonic (Laplacian) interpolation, and DPS (1000 steps) with the
cached ERA5-like diffusion prior of ``benchmarks/train_priors.py`` (trained first if missing), ζ
tuned on validation fields. The amortized sampler (APS) joins this table when it lands.

    python benchmarks/era5_imputation.py --quick          # the README demo (a few minutes)
    python benchmarks/era5_imputation.py --smoke          # what the tests run (seconds)

Writes ``<out>/results.json`` (schema of API.md), ``<out>/results.md`` and ``<out>/globe.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import jax
import numpy as np

from geodiff import Sphere
from geodiff.baselines import dps, gaussian_fit, harmonic, kriging, tune_zeta
from geodiff.data import denormalize, era5_like, glosea4_split, glosea4_split_info
from geodiff.metrics import area_rmse, mse, psnr, ssim
from geodiff.operators import RandomMask
from geodiff.timing import machine_info, time_call, versions, write_json

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling scripts (train_priors)

TASK = "ERA5-like imputation 60%, σ=0.05"
DATA_SOURCE = ("train: ERA5-like (GloSea4-anchored), generated from GloSea4 members 0-8; "
               "test: real GloSea4 monthly-mean surface temperature, members 10-12 "
               "(iris-sample-data), regridded to 46x90")


@dataclasses.dataclass(frozen=True)
class Config:
    """Benchmark settings (the full mode; ``--quick`` and ``--smoke`` shrink them)."""

    seed: int = 0
    n_train: int = 6000          # ERA5-like training samples
    rank: int = 256              # kriging covariance rank
    ratio: float = 0.6           # fraction of grid points missing
    sigma: float = 0.05          # noise std, normalized units (≈ 5.9 K)
    n_test: int | None = None    # held-out real fields to use (None: all 18)
    repeats: int = 3             # timing repeats
    prior_mode: str = "full"     # which cached diffusion prior (benchmarks/train_priors.py)
    dps_steps: int = 1000        # DPS reverse steps (NFE)
    zetas: tuple = (0.3, 1.0, 3.0)  # ζ candidates, tuned on validation fields (member 010)
    n_tune: int = 2              # validation fields used to tune ζ
    tune_steps: int = 250        # DPS steps while tuning
    aps_train: int = 2000        # ERA5-like fields (another seed) whose measurements train APS
    aps_steps: int = 2000        # APS optimizer steps
    aps_batch: int = 32          # APS batch (measurements per step)
    aps_n_t: int = 2             # ELBO draws per sample (one antithetic pair)
    aps_lr: float = 3e-4         # APS learning rate


MODES = {
    "full": Config(),
    "quick": Config(n_train=2000, rank=256, n_test=6, prior_mode="quick", aps_train=500,
                    aps_steps=100, aps_batch=16),
    "smoke": Config(n_train=200, rank=32, n_test=2, repeats=1, prior_mode="smoke", dps_steps=10,
                    zetas=(0.1, 0.3), n_tune=1, tune_steps=5, aps_train=32, aps_steps=3,
                    aps_batch=8),
}


def evaluate(name: str, estimate: np.ndarray, truth: np.ndarray, sphere: Sphere, seconds: float) -> dict:
    """One table row: mean metrics over the held-out fields; time per reconstructed field."""
    est, ref = np.asarray(estimate, np.float64), np.asarray(truth, np.float64)
    scale = float(denormalize(1.0) - denormalize(0.0))  # K per normalized unit
    return {"task": TASK, "method": name, "time_per_sample_s": seconds / len(ref),
            "psnr": float(psnr(est, ref).mean()), "ssim": float(ssim(est, ref, sphere).mean()),
            "mse": float(mse(est, ref).mean()),
            "rmse_K": float(area_rmse(est, ref, sphere).mean() * scale),
            "coverage90": None, "training_s": None, "break_even_n": None}


def run(cfg: Config, out: Path, *, save_sampler=None) -> dict:
    """Build the data, measure, reconstruct, score; write JSON, Markdown and a globe plot."""
    out.mkdir(parents=True, exist_ok=True)
    sphere = Sphere.latlon(46, 90)
    t0 = time.perf_counter()
    train = era5_like(cfg.seed, cfg.n_train)
    truth = glosea4_split("test")
    info = glosea4_split_info("test")
    if cfg.n_test is not None:
        truth, info = truth[: cfg.n_test], info[: cfg.n_test]
    data_s = time.perf_counter() - t0
    print(f"data: {len(train)} ERA5-like training fields, {len(truth)} held-out real fields "
          f"({data_s:.1f} s)")

    op = RandomMask(cfg.ratio, cfg.sigma).on(sphere)
    meas = op.measure(jax.random.key(cfg.seed), truth)

    rows, estimates = [], {}
    t0 = time.perf_counter()
    mean, factor, nugget = gaussian_fit(train, rank=cfg.rank)
    fit_s = time.perf_counter() - t0
    secs, est = time_call(kriging, op, meas, mean=mean, cov_factor=factor, nugget=nugget,
                          repeats=cfg.repeats)
    rows.append(evaluate("Kriging", est, truth, sphere, secs) | {"training_s": fit_s})
    estimates["Kriging"] = np.asarray(est)
    secs, est = time_call(harmonic, sphere, op, meas, repeats=cfg.repeats)
    rows.append(evaluate("Harmonic", est, truth, sphere, secs))
    estimates["Harmonic"] = np.asarray(est)
    dps_row, dps_est, zeta_scores, prior = run_dps(cfg, sphere, op, meas, truth)
    aps_rows, aps_est, aps_std, sampler = run_aps(cfg, sphere, op, meas, truth, prior,
                                                  (mean, factor, nugget), dps_row)
    rows.extend(aps_rows)
    estimates["APS(128) mean"] = aps_est
    rows.append(dps_row)
    estimates["DPS"] = dps_est
    if save_sampler is not None:
        sampler.save(save_sampler)
        print(f"saved the amortized sampler to {save_sampler}")

    result = {"meta": {"seed": cfg.seed, "data_source": DATA_SOURCE, "machine": machine_info(),
                       "versions": versions(), "config": dataclasses.asdict(cfg),
                       "test_fields": [f"member {m:03d} {month}" for m, month in info],
                       "dps": {"zeta_psnr_on_validation": zeta_scores, "steps": cfg.dps_steps,
                               "prior": f"benchmarks/train_priors.py --dataset era5 ({cfg.prior_mode})",
                               "zeta_units": "normalized data units, non-squared residual norm"},
                       "units": {"psnr": "dB (data range 1, normalized units)",
                                 "rmse_K": "K, area-weighted", "sigma": "normalized units"}},
              "rows": rows}
    write_json(out / "results.json", result)
    table = markdown_table(rows)
    (out / "results.md").write_text(f"# {TASK}\n\nData: {DATA_SOURCE}.\n\n{table}\n")
    print(table)
    plot(sphere, truth[0], meas, estimates, out / "globe.png", title=f"{info[0][1]}, member {info[0][0]:03d}",
         aps_std=aps_std[0, :, 0])
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'globe.png'}")
    return result


def run_dps(cfg: Config, sphere, op, meas, truth):
    """DPS with the cached ERA5-like diffusion prior: ζ tuned on validation fields (GloSea4
    member 010, never a test field), then one sample per test field. Time per sample is from a
    second single-field run (compile excluded)."""
    from train_priors import train_or_load

    prior, info, _, _ = train_or_load("era5", cfg.prior_mode, seed=cfg.seed, progress=False)
    val = glosea4_split("val")[: cfg.n_tune]
    val_meas = op.measure(jax.random.key(cfg.seed + 1), val)
    zeta, scores = tune_zeta(jax.random.key(cfg.seed + 2), prior, op, val_meas, val,
                             zetas=cfg.zetas, steps=cfg.tune_steps)
    print(f"DPS: ζ tuned on {len(val)} validation fields: {scores} → ζ = {zeta}")
    one = meas[0:1]
    dps(jax.random.key(0), prior, op, one, n=1, steps=cfg.dps_steps, zeta=zeta)  # compile
    secs, _ = time_call(dps, jax.random.key(0), prior, op, one, n=1, steps=cfg.dps_steps, zeta=zeta,
                        repeats=1, warmup=0)
    est = np.asarray(dps(jax.random.key(cfg.seed + 3), prior, op, meas, n=1, steps=cfg.dps_steps,
                         zeta=zeta)[0])
    row = evaluate("DPS", est, truth, sphere, secs * len(truth))
    return row | {"zeta": zeta, "nfe": cfg.dps_steps}, est, scores, prior


def run_aps(cfg: Config, sphere, op, meas, truth, prior, gauss, dps_row):
    """APS: the amortized sampler on the same diffusion prior, its Gaussian surrogate the
    kriging fit. Trained on measurements of *other* ERA5-like fields (seed + 100; the held-out real
    fields are never seen), evaluated on the held-out real fields. Rows APS(1) and APS(128)."""
    from geodiff import AmortizedSampler
    from geodiff.amortized import GaussianSurrogate
    from geodiff.metrics import coverage

    mean, factor, nugget = gauss
    sur = GaussianSurrogate(*(np.asarray(a, np.float32) for a in (mean, factor, nugget)))
    sampler = AmortizedSampler(sphere, prior, op, surrogate=sur, n_t=cfg.aps_n_t, seed=cfg.seed)
    fields = era5_like(cfg.seed + 100, cfg.aps_train)
    train_meas = op.measure(jax.random.key(cfg.seed + 101), fields)
    t0 = time.perf_counter()
    trained, hist = sampler.fit(jax.random.key(cfg.seed + 102), train_meas, steps=cfg.aps_steps,
                                batch_size=cfg.aps_batch, learning_rate=cfg.aps_lr)
    train_s = time.perf_counter() - t0
    print(f"APS: {cfg.aps_steps} steps in {train_s:.0f} s ({hist['step_s']:.2f} s/step, base "
          f"{hist['base_s']:.0f} s), loss {hist['loss'][0]:.3f} → {hist['loss'][-1]:.3f}")
    one = meas[0]
    t1, _ = time_call(trained.sample, jax.random.key(1), one, 1, repeats=cfg.repeats)
    t128, _ = time_call(trained.sample, jax.random.key(1), one, 128, repeats=cfg.repeats)
    x1 = np.asarray(trained.sample(jax.random.key(cfg.seed + 103), meas, 1)[0])
    xs = np.asarray(trained.sample(jax.random.key(cfg.seed + 104), meas, 128))
    cov = float(np.mean(coverage(xs, np.asarray(truth))))
    dps_t = dps_row["time_per_sample_s"]
    rows = []
    for name, est, secs in (("APS(1)", x1, t1), ("APS(128)", xs.mean(0), t128)):
        per_meas = secs                             # one call per measurement
        gain = dps_t - per_meas
        rows.append(evaluate(name, est, truth, sphere, secs * len(truth))
                    | {"time_per_sample_s": secs / (1 if name == "APS(1)" else 128),
                       "time_per_measurement_s": per_meas, "coverage90": cov if name == "APS(128)" else None,
                       "training_s": train_s,
                       "break_even_n": train_s / gain if gain > 0 else None,
                       "steps": cfg.aps_steps, "train_measurements": cfg.aps_train})
    return rows, xs.mean(0), xs.std(0), trained


def markdown_table(rows: list[dict]) -> str:
    head = "| method | time / field (s) | PSNR (dB) | SSIM | RMSE (K) |\n|---|---|---|---|---|"
    lines = [f"| {r['method']} | {r['time_per_sample_s']:.2e} | {r['psnr']:.2f} | {r['ssim']:.3f} | "
             f"{r['rmse_K']:.2f} |" for r in rows]
    return "\n".join([head, *lines])


def plot(sphere, truth, meas, estimates, path, *, title, aps_std=None):
    from geodiff.plot import globe

    observed = np.asarray(meas.mask[0, :, 0])
    y = np.where(observed, np.asarray(meas.y[0, :, 0]), np.nan)
    fields = {"truth": denormalize(truth[:, 0]), "measurement (40% observed, noisy)": denormalize(y)}
    for name, est in estimates.items():
        fields[name] = denormalize(est[0, :, 0])
    scale = float(denormalize(1.0) - denormalize(0.0))
    if aps_std is not None:
        fields["APS std"] = np.asarray(aps_std) * scale
    key = "APS(128) mean" if "APS(128) mean" in estimates else "Kriging"
    fields[f"{key} error"] = denormalize(estimates[key][0, :, 0]) - denormalize(truth[:, 0])
    globe(sphere, fields, path, units="K", suptitle=f"ERA5-like imputation, held-out GloSea4 field ({title})")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the README demo (about a minute)")
    mode.add_argument("--smoke", action="store_true", help="tiny run for CI (seconds)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="outputs/era5_imputation", help="output folder")
    parser.add_argument("--json", default=None, help="also write the results JSON here")
    parser.add_argument("--save-sampler", default=None,
                        help="write the trained amortized sampler here (AmortizedSampler.load)")
    args = parser.parse_args(argv)
    cfg = MODES["smoke" if args.smoke else "quick" if args.quick else "full"]
    cfg = dataclasses.replace(cfg, seed=args.seed)
    result = run(cfg, Path(args.out), save_sampler=args.save_sampler)
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
