"""ERA5-like temperature imputation on the 46×90 sphere (60% of grid points missing, σ = 0.05).

Training data: the "ERA5-like (GloSea4-anchored)" set generated from the 54 real GloSea4 monthly
fields of ensemble members 0–8 (`geodiff.data.era5_like`). Evaluation: the 18 real held-out fields
of members 10–12 (files 011–013), never used for training. Each held-out field gets one random
mask and noise draw (seeded).

Methods (same prior, measurements and machine; ``benchmarks/_common.py`` has the conventions):
APS(1) and APS(128) (the amortized sampler, trained on the measurements of other ERA5-like fields,
seed + 100, never on the test fields; its surrogate is the kriging Gaussian), DPS and MCG (1000
steps, ζ tuned on validation fields of member 010) with the cached ERA5-like diffusion prior of
``benchmarks/train_priors.py`` (trained first if missing), FlowPerY (the same flow trained per test
measurement, on the first few fields), Gaussian optimal interpolation (kriging with the training
set's mean and a rank-R + diagonal covariance) and harmonic (Laplacian) interpolation. The quick
mode leaves out MCG and FlowPerY to stay within a few minutes.

    python benchmarks/era5_imputation.py --quick          # the README demo (a few minutes)
    python benchmarks/era5_imputation.py --smoke          # what the tests run (seconds)
    python benchmarks/era5_imputation.py                  # full mode, resumable cached stages
    python benchmarks/era5_imputation.py --calibrate-on val   # τ on the real validation fields

Writes ``<out>/results.json`` (schema of API.md), ``<out>/results.md``, ``<out>/globe.png``
(Robinson: truth, measurement, kriging, APS mean and std, DPS, APS error) and
``<out>/globe_ortho.png`` (Orthographic, centred on Europe and Africa).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling scripts

from _common import main as common_main  # noqa: E402
from _common import Settings, Stages, compare, meta, panel_label, write_outputs  # noqa: E402

from geodiff import Sphere  # noqa: E402
from geodiff.baselines import gaussian_fit  # noqa: E402
from geodiff.data import denormalize, era5_like, glosea4_split, glosea4_split_info  # noqa: E402
from geodiff.metrics import area_rmse  # noqa: E402
from geodiff.operators import RandomMask  # noqa: E402

TASK = "ERA5-like imputation 60%, σ=0.05"
DATA_SOURCE = ("train: ERA5-like (GloSea4-anchored), generated from GloSea4 members 0-8; "
               "test: real GloSea4 monthly-mean surface temperature, members 10-12 "
               "(iris-sample-data), regridded to 46x90")


@dataclasses.dataclass(frozen=True)
class Config(Settings):
    """Benchmark settings (the full mode; ``--quick`` and ``--smoke`` shrink them)."""

    n_train: int = 6000          # ERA5-like samples of the Gaussian fit (kriging, APS surrogate)
    ratio: float = 0.6           # fraction of grid points missing
    sigma: float = 0.05          # noise std, normalized units (≈ 5.9 K)
    n_test: int = 18             # held-out real fields (all 18)
    n_tune: int = 2              # validation fields (member 010) used to tune ζ
    prior_mode: str = "full"     # which cached diffusion prior (benchmarks/train_priors.py)


MODES = {
    "full": Config(aps_train=2000, aps_steps=2000, aps_batch=32, fpy_n=3, fpy_steps=300),
    # the demo (make demo, ≤ 5 min on 2 cores): the shipped quick prior, the paper's APS (60
    # steps) and the untrained mixture base (EM on 1,000 fields) with its calibrated τ; DPS with
    # 250 steps (ζ from two candidates) and a 4-chain ensemble on one field. The calibrated
    # APS[reverse/pairs,τ] rows are in aps_design.py and the full mode.
    "quick": Config(n_train=2000, n_test=4, n_tune=1, prior_mode="quick", aps_train=256,
                    aps_steps=60, aps_batch=8, aps_local_hidden=0, mcg=False, fpy_n=0,
                    aps_objectives=(), calib_n=32, calib_samples=16, calib_iters=8,
                    aps_mixture_n=1000, dps_steps=250, zetas=(0.3, 1.0), dps_chains=4,
                    dps_ensemble_n=1, repeats=2),
    "smoke": Config(n_train=200, rank=32, n_test=2, repeats=1, prior_mode="smoke", dps_steps=10,
                    zetas=(0.1, 0.3), n_tune=1, aps_train=32, aps_steps=3, aps_batch=8,
                    aps_hidden=16, aps_couplings=1, aps_n_eig=8, aps_local_hidden=4,
                    # MCG and FlowPerY (shared code) run in the bunny smoke, to keep CI short
                    mcg=False, fpy_n=0,
                    calib_n=4, calib_samples=8, calib_iters=3, dps_chains=2, dps_ensemble_n=2,
                    # the calibrated APS[…,τ] rows run in the bunny smoke (make test-slow): at
                    # 4,140 vertices their compiles cost ≈ 35 s of make test's 10 minutes
                    aps_objectives=(), aps_mixture_k=0),
}


def run(cfg: Config, out: Path, *, fresh: bool = False, save_sampler=None) -> dict:
    """Build the data, measure, reconstruct, score; write JSON, Markdown and a globe plot."""
    from train_priors import prior_path, train_or_load

    out.mkdir(parents=True, exist_ok=True)
    sphere = Sphere.latlon(46, 90)
    t0 = time.perf_counter()
    train = era5_like(cfg.seed, cfg.n_train)
    truth, info = glosea4_split("test")[: cfg.n_test], glosea4_split_info("test")[: cfg.n_test]
    print(f"data: {len(train)} ERA5-like training fields, {len(truth)} held-out real fields "
          f"({time.perf_counter() - t0:.1f} s)")
    t0 = time.perf_counter()
    gauss = gaussian_fit(train, rank=cfg.rank)
    fit_s = time.perf_counter() - t0
    prior, _, _, _ = train_or_load("era5", cfg.prior_mode, seed=cfg.seed, progress=False,
                                   t0=cfg.prior_t0)
    stages = Stages("era5_imputation", cfg, enabled=cfg.prior_mode == "full", fresh=fresh,
                    depends=[prior_path("era5", cfg.prior_mode, cfg.prior_t0)])
    op = RandomMask(cfg.ratio, cfg.sigma).on(sphere)
    rows, est, std, trained, meas = compare(
        TASK, cfg, manifold=sphere, prior=prior, op=op, test=truth,
        val=glosea4_split("val")[: cfg.n_tune], train=era5_like(cfg.seed + 100, cfg.aps_train),
        gauss=gauss, stages=stages, fit_set=train, cal_val=glosea4_split("val"))
    scale = float(denormalize(1.0) - denormalize(0.0))  # K per normalized unit
    for row in rows:
        n = row["n_eval"]
        row["rmse_K"] = float(area_rmse(est[row["method"]], truth[:n], sphere).mean() * scale)
        if row["method"] == "Kriging":
            row["training_s"] = fit_s
    if save_sampler is not None:
        trained.save(save_sampler)
        print(f"saved the amortized sampler to {save_sampler}")

    result = {"meta": meta(cfg.seed, DATA_SOURCE, cfg,
                           test_fields=[f"member {m:03d} {month}" for m, month in info],
                           prior=f"benchmarks/train_priors.py --dataset era5 ({cfg.prior_mode})",
                           units={"psnr": "dB (data range 1, normalized units)",
                                  "rmse_K": "K, area-weighted", "sigma": "normalized units",
                                  "zeta": "normalized data units, non-squared residual norm"}),
              "rows": rows}
    table = write_outputs(out, result, TASK, extra=(("rmse_K", "RMSE (K)", ".2f"),),
                          notes="DPS/MCG: one sample per field, ζ tuned on validation fields "
                                "(member 010). APS: trained on measurements of other ERA5-like "
                                "fields (seed + 100), never on the test fields. τ of the "
                                "calibrated rows: set on "
                                + ("held-out ERA5-like training fields." if cfg.calib_on == "train"
                                   else "the 6 real validation fields (member 010), tiled to "
                                   f"{cfg.calib_n} pairs with fresh masks."))
    print(table)
    shown = {k: est[k] for k in ("Kriging", "APS(128)", "APS[pairs,τ](128)", "APS[mixture,τ](128)",
                                 "DPS") if k in est}
    plot(sphere, truth[0], meas, shown, out / "globe.png",
         title=f"{info[0][1]}, member {info[0][0]:03d}", aps_std=std[0, :, 0])
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'globe.png'}, "
          f"{out / 'globe_ortho.png'}")
    return result


def plot(sphere, truth, meas, estimates, path, *, title, aps_std=None):
    from geodiff.plot import globe

    observed = np.asarray(meas.mask[0, :, 0])
    y = np.where(observed, np.asarray(meas.y[0, :, 0]), np.nan)
    fields = {"truth": denormalize(truth[:, 0]), "measurement (40% observed, noisy)": denormalize(y)}
    for name, est in estimates.items():
        fields[panel_label(name)] = denormalize(est[0, :, 0])
    scale = float(denormalize(1.0) - denormalize(0.0))
    if aps_std is not None:
        fields["APS std (paper's loss)"] = np.asarray(aps_std) * scale
    keys = [k for k in ("APS(128)", "APS[pairs,τ](128)") if k in estimates] or ["Kriging"]
    for key in keys:
        fields[f"{key} error"] = denormalize(estimates[key][0, :, 0]) - denormalize(truth[:, 0])
    globe(sphere, fields, path, units="K", suptitle=f"ERA5-like imputation, held-out GloSea4 field ({title})")
    ortho = {k: v for k, v in fields.items() if k.startswith(("truth", "APS", *keys))}
    globe(sphere, ortho, Path(path).with_name("globe_ortho.png"), projection="orthographic",
          units="K", ncols=min(len(ortho), 4), central_longitude=10.0,
          suptitle=f"ERA5-like imputation over Europe and Africa ({title})")


def main(argv=None):
    return common_main(__doc__, run, MODES, "outputs/era5_imputation", argv)


if __name__ == "__main__":
    main()
