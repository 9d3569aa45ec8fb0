"""netCDF files for the "Your own data" walk-through (docs/your-data.md), offline.

Writes, in Kelvin on the 46×90 lat-lon grid (pole rows included):

* ``era5like_train.nc``: ``--n`` complete ERA5-like fields (built from the GloSea4 *train*
  members, :func:`geodiff.data.era5.era5_like`; not ERA5) along a ``sample`` dimension: the
  training set of a prior.
* ``glosea4_swath.nc``: the six months (Aug 2011 – Jan 2012) of the held-out real GloSea4 member
  011 with a satellite-swath gap pattern: only the points within ``--half-width`` degrees of
  ``--tracks`` polar-orbit ground tracks (inclination 98.2°, a different set of tracks each
  month) are kept, the rest is NaN.
* ``glosea4_truth.nc``: the same six fields without gaps (to score a posterior).

    python data_recipes/gappy_glosea4.py --out outputs/your_data
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from geodiff import Sphere
from geodiff._cache import atomic_write
from geodiff.data.era5 import denormalize, era5_like, glosea4_split, glosea4_split_info

INCLINATION = 98.2          # degrees, a sun-synchronous polar orbit


def swath_mask(sphere: Sphere, ascending_nodes, half_width: float) -> np.ndarray:
    """(V,) bool: points within ``half_width`` degrees of the great circles of polar orbits whose
    ascending nodes are at ``ascending_nodes`` (degrees east)."""
    inc = np.deg2rad(INCLINATION)
    p = sphere.points / sphere.radius
    keep = np.zeros(len(p), bool)
    for node in np.deg2rad(np.asarray(ascending_nodes, float)):
        normal = np.array([np.sin(inc) * np.sin(node), -np.sin(inc) * np.cos(node), np.cos(inc)])
        keep |= np.abs(np.arcsin(np.clip(p @ normal, -1, 1))) < np.deg2rad(half_width)
    return keep


def _write(path: Path, sphere: Sphere, kelvin: np.ndarray, dim: str, coord, long_name: str):
    da = sphere.to_xarray(kelvin[..., None], name="tas", units="K",
                          attrs={"standard_name": "air_temperature", "long_name": long_name})
    da = da.isel(channel=0, drop=True).rename(sample=dim).assign_coords({dim: coord})
    del da.attrs["geodiff_grid"]
    atomic_write(path, lambda tmp: da.to_dataset().to_netcdf(tmp, engine="netcdf4"))
    print(f"wrote {path}: {kelvin.shape[0]} fields, "
          f"{np.isnan(kelvin).mean():.0%} missing")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("outputs/your_data"))
    p.add_argument("--n", type=int, default=2000, help="ERA5-like training fields (default 2000)")
    p.add_argument("--tracks", type=int, default=3, help="orbits per month (default 3)")
    p.add_argument("--half-width", type=float, default=10.0,
                   help="half swath width, degrees of arc (default 10)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    sphere = Sphere.latlon(46, 90)
    args.out.mkdir(parents=True, exist_ok=True)

    train = denormalize(era5_like(args.seed, args.n)[..., 0])
    _write(args.out / "era5like_train.nc", sphere, train, "sample", np.arange(args.n),
           "near-surface air temperature, ERA5-like (built from GloSea4 fields; not ERA5)")

    rows = [i for i, (member, _) in enumerate(glosea4_split_info("test")) if member == 11]
    months = [glosea4_split_info("test")[i][1] for i in rows]
    truth = denormalize(glosea4_split("test")[rows][..., 0])
    time = pd.to_datetime([f"{m}-15" for m in months])
    rng = np.random.default_rng(args.seed)
    gappy = truth.copy()
    for t in range(len(truth)):
        nodes = rng.uniform(0, 360) + np.arange(args.tracks) * 360 / args.tracks
        gappy[t, ~swath_mask(sphere, nodes, args.half_width)] = np.nan
    name = "near-surface air temperature, GloSea4 member 011 (monthly means)"
    _write(args.out / "glosea4_truth.nc", sphere, truth, "time", time, name)
    _write(args.out / "glosea4_swath.nc", sphere, gappy, "time", time,
           name + ", swath gaps")


if __name__ == "__main__":
    main()
