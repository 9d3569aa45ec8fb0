"""ERA5-like temperature imputation on the 46×90 sphere (60% of grid points missing, σ = 0.05).

Training data: the "ERA5-like (GloSea4-anchored)" set generated from the 54 real GloSea4 monthly
fields of ensemble members 0–8 (`geodiff.data.era5_like`). Evaluation: the 18 real held-out fields
of members 10–12 (files 011–013), never used for training. Each held-out field gets one random
mask and noise draw (seeded).

Methods in this version: Gaussian optimal interpolation (kriging with the training set's mean and a
rank-R + diagonal covariance) and harmonic (Laplacian) interpolation. The amortized sampler (APS)
and the diffusion baselines join this table as they land.

    python benchmarks/era5_imputation.py --quick          # the README demo (≈ 1 minute)
    python benchmarks/era5_imputation.py --smoke          # what the tests run (seconds)

Writes ``<out>/results.json`` (schema of API.md), ``<out>/results.md`` and ``<out>/globe.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import jax
import numpy as np

from geodiff import Sphere
from geodiff.baselines import gaussian_fit, harmonic, kriging
from geodiff.data import denormalize, era5_like, glosea4_split, glosea4_split_info
from geodiff.metrics import area_rmse, mse, psnr, ssim
from geodiff.operators import RandomMask
from geodiff.timing import machine_info, time_call, versions, write_json

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


MODES = {
    "full": Config(),
    "quick": Config(n_train=2000, rank=256),
    "smoke": Config(n_train=200, rank=32, n_test=4, repeats=1),
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


def run(cfg: Config, out: Path) -> dict:
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

    result = {"meta": {"seed": cfg.seed, "data_source": DATA_SOURCE, "machine": machine_info(),
                       "versions": versions(), "config": dataclasses.asdict(cfg),
                       "test_fields": [f"member {m:03d} {month}" for m, month in info],
                       "units": {"psnr": "dB (data range 1, normalized units)",
                                 "rmse_K": "K, area-weighted", "sigma": "normalized units"}},
              "rows": rows}
    write_json(out / "results.json", result)
    table = markdown_table(rows)
    (out / "results.md").write_text(f"# {TASK}\n\nData: {DATA_SOURCE}.\n\n{table}\n")
    print(table)
    plot(sphere, truth[0], meas, estimates, out / "globe.png", title=f"{info[0][1]}, member {info[0][0]:03d}")
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'globe.png'}")
    return result


def markdown_table(rows: list[dict]) -> str:
    head = "| method | time / field (s) | PSNR (dB) | SSIM | RMSE (K) |\n|---|---|---|---|---|"
    lines = [f"| {r['method']} | {r['time_per_sample_s']:.2e} | {r['psnr']:.2f} | {r['ssim']:.3f} | "
             f"{r['rmse_K']:.2f} |" for r in rows]
    return "\n".join([head, *lines])


def plot(sphere, truth, meas, estimates, path, *, title):
    from geodiff.plot import globe

    observed = np.asarray(meas.mask[0, :, 0])
    y = np.where(observed, np.asarray(meas.y[0, :, 0]), np.nan)
    fields = {"truth": denormalize(truth[:, 0]), "measurement (40% observed, noisy)": denormalize(y)}
    for name, est in estimates.items():
        fields[name] = denormalize(est[0, :, 0])
    fields["Kriging error"] = denormalize(estimates["Kriging"][0, :, 0]) - denormalize(truth[:, 0])
    globe(sphere, fields, path, units="K", suptitle=f"ERA5-like imputation, held-out GloSea4 field ({title})")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the README demo (about a minute)")
    mode.add_argument("--smoke", action="store_true", help="tiny run for CI (seconds)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="outputs/era5_imputation", help="output folder")
    parser.add_argument("--json", default=None, help="also write the results JSON here")
    args = parser.parse_args(argv)
    cfg = MODES["smoke" if args.smoke else "quick" if args.quick else "full"]
    cfg = dataclasses.replace(cfg, seed=args.seed)
    result = run(cfg, Path(args.out))
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
