"""Score a posterior file of ``geodiff impute`` against the complete fields, beside kriging.

On the points the gappy input leaves missing, per field and on average: the area-weighted RMSE of
the posterior mean (K, or the data's units), the fraction of true values inside the file's
5–95% quantile band (90% coverage, area-weighted), and the same RMSE for kriging with a rank-R
Gaussian fitted to the training file (the classical baseline on the same inputs; noise σ from
the sampler file).

    python benchmarks/score_posterior.py outputs/your_data/posterior.nc \\
        --truth outputs/your_data/glosea4_truth.nc --data outputs/your_data/glosea4_swath.nc \\
        --train outputs/your_data/era5like_train.nc --sampler outputs/your_data/sampler.npz

Prints a table and writes ``--json`` (default: next to the posterior file).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def main(argv=None) -> dict:
    import xarray as xr

    from geodiff import AmortizedSampler
    from geodiff.baselines import gaussian_fit, kriging
    from geodiff.io import read_field
    from geodiff.operators import Mask

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("posterior", type=Path)
    p.add_argument("--truth", type=Path, required=True, help="the complete fields")
    p.add_argument("--data", type=Path, required=True, help="the gappy input of impute")
    p.add_argument("--train", type=Path, required=True, help="complete training fields (kriging)")
    p.add_argument("--sampler", type=Path, required=True, help="the sampler file (σ)")
    p.add_argument("--rank", type=int, default=None,
                   help="kriging covariance rank (default: the sampler's surrogate rank)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    sphere, truth, meta = read_field(args.truth)
    _, gappy, _ = read_field(args.data)
    _, train, _ = read_field(args.train)
    missing = np.isnan(gappy)[..., 0]                              # (T, V)
    w = np.asarray(sphere.mass)[None] * missing
    with xr.open_dataset(args.posterior) as post:
        name = meta["name"]
        mean = sphere.from_layout(post[f"{name}_mean"].values[..., None])[..., 0]
        q = post[f"{name}_quantile"]
        levels = [float(v) for v in q["quantile"].values]
        if not {0.05, 0.95} <= {round(v, 6) for v in levels}:
            raise ValueError(f"the posterior file has quantiles {levels}; 0.05 and 0.95 needed")
        lo = sphere.from_layout(q.sel(quantile=0.05).values[..., None])[..., 0]
        hi = sphere.from_layout(q.sel(quantile=0.95).values[..., None])[..., 0]
    t = truth[..., 0]
    sampler = AmortizedSampler.load(args.sampler)
    info = sampler.prior.data_info
    scale, offset = info["scale"], info["offset"]
    rank = args.rank or int(sampler.surrogate.factor.shape[1])
    m, F, d = gaussian_fit((train - offset) / scale, rank=rank)
    op = Mask(sampler.operator.sigma).on(sphere)
    krig = offset + scale * np.asarray(kriging(op, op.observe((gappy - offset) / scale), mean=m,
                                               cov_factor=F, nugget=d))[..., 0]

    def rmse(est):
        return np.sqrt((w * (est - t) ** 2).sum(1) / w.sum(1))

    inside = ((t >= lo) & (t <= hi)).astype(float)
    rows = {"APS (geodiff impute), posterior mean": rmse(mean), "kriging (same σ, train file)": rmse(krig)}
    cov = (w * inside).sum(1) / w.sum(1)
    times = [str(v)[:10] for v in meta["time"].values] if meta["time"] is not None else ["0"]
    units = meta["units"] or ""
    print(f"RMSE ({units}) on the missing points, area-weighted; {missing.mean():.0%} missing")
    print("| method | " + " | ".join(times) + " | mean |")
    print("|---|" + "---|" * (len(times) + 1))
    for k, v in rows.items():
        print(f"| {k} | " + " | ".join(f"{x:.2f}" for x in v) + f" | {v.mean():.2f} |")
    print(f"| APS 90% coverage (5–95% band) | " + " | ".join(f"{x:.2f}" for x in cov)
          + f" | {cov.mean():.3f} |")
    out = {"units": units, "missing_fraction": float(missing.mean()), "times": times,
           "rmse": {k: v.tolist() for k, v in rows.items()}, "coverage90": cov.tolist(),
           "rank": rank, "sigma": float(sampler.operator.sigma * scale)}
    path = args.json or args.posterior.with_suffix(".scores.json")
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
