"""The ``geodiff`` command line: from a gappy netCDF (or PLY) file to a posterior file and a map.

    geodiff train-prior FIELDS.nc --var tas --out prior.npz
    geodiff fit GAPPY.nc --prior prior.npz --out sampler.npz
    geodiff impute GAPPY.nc --sampler sampler.npz --out posterior.nc
    geodiff plot posterior.nc --out map.png

Values stay in the data's units on the way in and out: ``train-prior`` maps the training fields
to [0, 1] by their minimum and range and records that (name, units, offset, scale) in the prior
file, which the sampler file embeds, so ``impute`` writes the posterior in the input's units.
Every output is written atomically. Bad input ends the command with a one-line error and exit
code 1, and no output file (docs/your-data.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

EXIT_ERROR = 1


class CliError(Exception):
    """A user error: printed as one line, exit code 1."""


# ----------------------------------------------------------------------------------- helpers
def _read(path, var):
    from geodiff.io import read_field

    return read_field(path, var=var)


def _same_grid(manifold, other, data, model: str) -> None:
    """Raise unless ``data``'s manifold is the one ``model`` (prior or sampler) was trained on."""
    same = (repr(manifold) == repr(other) and manifold.n_vertices == other.n_vertices
            and np.allclose(manifold.points, other.points, atol=1e-6))
    if not same:
        raise CliError(f"{data} is on {manifold!r}, but the {model} was trained on {other!r}")


def _info(prior, source: str) -> dict:
    info = getattr(prior, "data_info", None)
    if not info or not {"offset", "scale"} <= set(info):
        raise CliError(f"{source} records no data normalisation (offset, scale): train the "
                       "prior with `geodiff train-prior`")
    return info


def _check_output(path: Path, suffixes) -> Path:
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        raise CliError(f"--out {str(path)!r}: expected a {' or '.join(suffixes)} file")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise CliError(f"--out {str(path)!r}: the folder {str(folder)!r} does not exist")
    import os

    if not os.access(folder, os.W_OK):
        raise CliError(f"--out {str(path)!r}: the folder {str(folder)!r} is not writable")
    return path


def _load_prior(spec: str):
    from geodiff import DiffusionPrior

    path = Path(spec)
    if path.is_file():
        try:
            return DiffusionPrior.load(path)
        except (ValueError, KeyError, OSError) as e:
            raise CliError(f"--prior {spec!r}: not a saved geodiff prior ({e})") from None
    names = DiffusionPrior.pretrained_names()
    if spec in names:
        return DiffusionPrior.pretrained(spec)
    raise CliError(f"--prior {spec!r}: no such file" + (f", nor a shipped prior ({', '.join(names)})"
                                                       if names else ""))


# ---------------------------------------------------------------------------------- commands
def train_prior(args) -> None:
    import jax

    from geodiff import DiffusionPrior
    from geodiff.diffusion.prior import NetConfig

    out = _check_output(args.out, (".npz",))
    manifold, x, meta = _read(args.data, args.var)
    gaps = np.isnan(x).any(axis=(1, 2))
    if gaps.any():
        raise CliError(f"{args.data}: {int(gaps.sum())} of {len(x)} fields have missing values; a "
                       "prior is trained on complete fields")
    if len(x) < 2:
        raise CliError(f"{args.data}: a prior needs at least 2 fields, got {len(x)}")
    lo, hi = float(x.min()), float(x.max())
    if not hi > lo:
        raise CliError(f"{args.data}: the fields are constant ({lo:g}); nothing to learn")
    info = {"name": meta["name"], "units": meta["units"], "offset": lo, "scale": hi - lo,
            "standard_name": (meta["attrs"] or {}).get("standard_name"),
            "source": str(args.data), "fields": int(len(x))}
    cfg = NetConfig(width=args.width, n_blocks=args.blocks,
                    n_eig=min(args.n_eig, manifold.max_eigenpairs))
    print(f"training a prior on {len(x)} fields of {meta['name']!r} on {manifold!r} "
          f"({args.steps} steps, batch {min(args.batch, len(x))})", file=sys.stderr)
    prior, _ = DiffusionPrior.train(jax.random.key(args.seed), manifold, (x - lo) / (hi - lo),
                                    steps=args.steps, batch_size=min(args.batch, len(x)),
                                    config=cfg, progress=not args.quiet)
    prior.data_info = info
    prior.save(out)
    print(f"wrote {out}", file=sys.stderr)


def fit(args) -> None:
    import jax

    from geodiff import AmortizedSampler, GaussianSurrogate
    from geodiff.amortized.surrogate import draw_prior
    from geodiff.operators import Mask, RandomMask

    out = _check_output(args.out, (".npz",))
    manifold, x, meta = _read(args.data, args.var)           # the cheap checks first
    prior = _load_prior(args.prior)
    info = _info(prior, f"--prior {args.prior!r}")
    _same_grid(manifold, prior.manifold, args.data, "prior")
    xn = (x - info["offset"]) / info["scale"]
    if args.sigma is None:
        args.sigma = 0.01 * info["scale"]
    if not args.sigma > 0:
        raise CliError(f"--sigma must be > 0 (data units), got {args.sigma}")
    sigma = args.sigma / info["scale"]
    meas = Mask(sigma).on(manifold).observe(xn)
    ratio = float(np.mean(np.asarray(meas.params["ratio"])))
    k_draw, k_fit, k_cal = jax.random.split(jax.random.key(args.seed), 3)
    if args.signals is not None:
        other, clean, _ = _read(args.signals, args.var)
        _same_grid(other, manifold, args.signals, f"data of {args.data}")
        if np.isnan(clean).any() or len(clean) < 4:
            raise CliError(f"--signals {args.signals!r}: expected at least 4 complete fields "
                           f"(no NaN), got {len(clean)} with {int(np.isnan(clean).sum())} NaN")
        draws = (clean - info["offset"]) / info["scale"]
    else:
        print(f"drawing {args.prior_samples} prior samples ({args.sample_steps} steps each) for "
              "the Gaussian surrogate and the calibration", file=sys.stderr)
        draws = draw_prior(k_draw, prior, args.prior_samples, batch=64, steps=args.sample_steps)
    n_cal = min(max(len(draws) // 4, 2), 100)                 # 100 fields set τ well enough
    sur = GaussianSurrogate.fit(draws[n_cal:], rank=args.rank)
    # the sampler's own operator draws masks at the data's missing fraction (for calibration);
    # it takes the data's Mask measurements as they are
    op = RandomMask(ratio, sigma).on(manifold)
    mix = None
    if args.centre == "mixture":
        from geodiff import MixtureSurrogate

        print(f"fitting a {args.components}-component Gaussian mixture (rank {args.rank}) to "
              f"{len(draws) - n_cal} fields by EM", file=sys.stderr)
        mix = MixtureSurrogate.fit(draws[n_cal:], components=args.components,
                                   rank=min(args.rank, len(draws) - n_cal - 1), seed=args.seed)
    sampler = AmortizedSampler(manifold, prior, op, surrogate=sur, centre=args.centre,
                               mixture=mix, n_steps=args.couplings, hidden=args.hidden,
                               n_eig=min(64, manifold.max_eigenpairs), seed=args.seed)
    if args.steps > 0:
        n_val = len(x) // 5
        train, val = (meas[n_val:], meas[:n_val]) if n_val else (meas, None)
        sampler, _ = sampler.fit(k_fit, train, steps=args.steps, objective="reverse",
                                 batch_size=min(32, len(x) - n_val), validation=val,
                                 progress=not args.quiet)
    sampler = sampler.calibrate(k_cal, draws[:n_cal], level=0.9, n_samples=args.calib_samples,
                                iters=10)
    sampler.save(out)
    print(f"wrote {out} (missing fraction {ratio:.2f}, σ = {args.sigma:g} "
          f"{info.get('units') or ''}, τ = {sampler.temperature:.3g})", file=sys.stderr)


def impute(args) -> None:
    from geodiff import AmortizedSampler
    from geodiff.io import write_summary
    from geodiff.operators import Mask

    out = _check_output(args.out, (".nc", ".ply"))
    if args.samples < 2:
        raise CliError(f"--samples must be ≥ 2, got {args.samples}")
    if args.chunk < 1:
        raise CliError(f"--chunk must be ≥ 1, got {args.chunk}")
    if not all(0 < q < 1 for q in args.quantiles):
        raise CliError(f"--quantiles must lie in (0, 1), got {args.quantiles}")
    manifold, x, meta = _read(args.data, args.var)           # the cheap checks first
    try:
        sampler = AmortizedSampler.load(args.sampler)
    except FileNotFoundError:
        raise CliError(f"--sampler {args.sampler!r}: no such file") from None
    except (ValueError, KeyError, OSError) as e:
        raise CliError(f"--sampler {args.sampler!r}: not a saved geodiff sampler ({e})") from None
    info = _info(sampler.prior, f"--sampler {args.sampler!r}")
    if not info["scale"] > 0:
        raise CliError(f"--sampler {args.sampler!r}: its data scale must be > 0, got "
                       f"{info['scale']}")
    _same_grid(manifold, sampler.manifold, args.data, "sampler")
    meas = Mask(sampler.operator.sigma).on(manifold).observe((x - info["offset"]) / info["scale"])
    parts = Parts(out, {"data": _digest(args.data), "sampler": _digest(args.sampler),
                        "samples": args.samples, "seed": args.seed, "chunk": args.chunk,
                        "quantiles": list(args.quantiles), "keep_samples": args.keep_samples,
                        "fields": len(x)})
    start = parts.done()
    if start and not args.quiet:
        print(f"resuming: fields 0–{start - 1} of {len(x)} are in {parts.folder}", file=sys.stderr)
    for chunk in posterior_chunks(sampler, meas, args.samples, seed=args.seed, chunk=args.chunk,
                                  quantiles=tuple(args.quantiles), keep_samples=args.keep_samples,
                                  start=start, progress=not args.quiet):
        units = lambda a: None if a is None else (                        # noqa: E731
            info["offset"] + info["scale"] * np.asarray(a, np.float64))      # the data's units
        parts.write(chunk.start, chunk.stop, {k: v for k, v in (
            ("mean", units(chunk.mean)), ("std", info["scale"] * np.asarray(chunk.std, np.float64)),
            ("quantiles", units(chunk.quantiles)), ("samples", units(chunk.samples)))
            if v is not None})
    arrays = parts.read()
    meta["units"] = meta["units"] or info.get("units")
    write_summary(out, manifold, arrays["mean"], arrays["std"], quantiles=arrays.get("quantiles"),
                  levels=tuple(args.quantiles), samples=arrays.get("samples"), meta=meta,
                  history=f"geodiff impute {args.data} --sampler {args.sampler} "
                          f"--samples {args.samples} --seed {args.seed}")
    parts.remove()
    print(f"wrote {out}", file=sys.stderr)


def posterior_chunks(sampler, measurement, n: int, *, seed: int = 0, chunk: int = 16,
                     quantiles=(), keep_samples: bool = False, start: int = 0,
                     progress: bool = False):
    """What ``geodiff impute`` draws: :meth:`AmortizedSampler.iter_posterior` with PRNG key
    ``jax.random.key(seed)`` over the T measurements, in normalized units (the same draws as
    ``sampler.sample(jax.random.key(seed), measurement, n)``)."""
    import jax

    return sampler.iter_posterior(jax.random.key(seed), measurement, n, chunk=chunk,
                                  quantiles=quantiles, keep_samples=keep_samples, start=start,
                                  progress=progress)


def _digest(path) -> str:
    """sha256 of a file (or of a folder's files, e.g. zarr), for the resume check."""
    import hashlib

    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


class Parts:
    """The finished chunks of an ``impute`` run, in ``<out>.parts/`` beside the output: one
    ``.npz`` per chunk, each written atomically, and ``run.json`` describing the run (input
    digests and options). A rerun with the same inputs and options resumes after the chunks
    already there; with anything else it stops with an error rather than mix two runs."""

    def __init__(self, out: Path, run: dict):
        import json

        self.folder = out.with_name(out.name + ".parts")
        self.run = run
        manifest = self.folder / "run.json"
        if manifest.exists():
            try:
                old = json.loads(manifest.read_text())
            except (OSError, ValueError):
                old = None
            if old != run:
                raise CliError(f"--out {str(out)!r}: {str(self.folder)!r} holds the chunks of a run "
                               "with other inputs or options; delete it to start again")
        else:
            from geodiff._cache import atomic_write

            self.folder.mkdir(exist_ok=True)
            atomic_write(manifest, lambda tmp: Path(tmp).write_text(json.dumps(run, indent=1)))

    def _path(self, lo: int) -> Path:
        return self.folder / f"fields-{lo:09d}.npz"

    def done(self) -> int:
        """The number of leading fields already written (chunk boundaries: 0, chunk, …)."""
        lo, step = 0, self.run["chunk"]
        while lo < self.run["fields"] and self._path(lo).exists():
            lo += step
        return min(lo, self.run["fields"])

    def write(self, lo: int, hi: int, arrays: dict) -> None:
        import json

        from geodiff._cache import atomic_savez

        atomic_savez(self._path(lo), meta=np.array(json.dumps({"start": lo, "stop": hi})),
                     **{k: np.asarray(v) for k, v in arrays.items()})

    def read(self) -> dict:
        """Every chunk's arrays, joined along the field axis (axis 1 for quantiles and samples)."""
        from geodiff._cache import read_npz

        step, out = self.run["chunk"], {}
        for lo in range(0, self.run["fields"], step):
            try:
                meta, arrays = read_npz(self._path(lo), "meta", "chunk of geodiff impute")
            except ValueError as e:
                raise CliError(f"{e}; delete {str(self.folder)!r} to start again") from None
            hi = min(lo + step, self.run["fields"])
            if meta != {"start": lo, "stop": hi}:
                raise CliError(f"{str(self._path(lo))!r} holds fields {meta}, expected "
                               f"{lo}–{hi - 1}; delete {str(self.folder)!r} to start again")
            for k, v in arrays.items():
                if k != "meta":
                    out.setdefault(k, []).append(v)
        return {k: np.concatenate(v, axis=1 if k in ("quantiles", "samples") else 0)
                for k, v in out.items()}

    def remove(self) -> None:
        import shutil

        shutil.rmtree(self.folder, ignore_errors=True)


def plot(args) -> None:
    import xarray as xr

    from geodiff.io import read_field

    out = _check_output(args.out, (".png",))
    path = Path(args.posterior)
    if not path.is_file():
        raise CliError(f"{args.posterior!r}: no such file")
    if path.suffix.lower() == ".ply":
        from geodiff.plot import mesh_render

        mesh, mean, _ = read_field(path, var="mean")
        _, std, _ = read_field(path, var="std")
        panels = {"posterior mean": mean[0], "posterior std": std[0]}
        if args.data is not None:
            grid, x, _ = read_field(args.data)
            _same_grid(grid, mesh, args.data, "posterior")
            panels = {"data (grey: missing)": x[0], **panels}
        mesh_render(mesh, panels, out)
        print(f"wrote {out}", file=sys.stderr)
        return
    from geodiff.plot import globe

    try:
        ds = xr.open_dataset(path)
    except (OSError, ValueError) as e:
        raise CliError(f"{args.posterior!r}: not a readable netCDF file ({e})") from None
    with ds:
        names = [str(v) for v in ds.data_vars if str(v).endswith("_mean")]
        if len(names) != 1:
            raise CliError(f"{args.posterior!r}: expected one posterior (a *_mean variable), "
                           f"found {names}")
        base = names[0][:-len("_mean")]
        panels = {}
        for kind in ("mean", "std"):
            da = ds[f"{base}_{kind}"]
            if "time" in da.dims:
                if not 0 <= args.time < da.sizes["time"]:
                    raise CliError(f"--time {args.time}: the file has {da.sizes['time']} time "
                                   "steps")
                da = da.isel(time=args.time)
            sphere, x, _ = read_field(da.load())
            panels[f"posterior {kind}"] = x[0]
        units = ds[f"{base}_mean"].attrs.get("units", "")
    if args.data is not None:
        grid, x, _ = read_field(args.data, var=base)
        _same_grid(grid, sphere, args.data, "posterior")
        if not 0 <= args.time < len(x):
            raise CliError(f"--time {args.time}: {args.data} has {len(x)} fields")
        panels = {"data (grey: missing)": x[args.time], **panels}
    globe(sphere, panels, out, units=units, suptitle=f"{base}: posterior of {path.name}")
    print(f"wrote {out}", file=sys.stderr)


# ------------------------------------------------------------------------------------ parser
def parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="geodiff", description=__doc__.split("\n\n")[0],
                                formatter_class=fmt)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train-prior", formatter_class=fmt,
                       help="train a diffusion prior on complete fields",
                       description="Train a diffusion prior on complete fields (no NaN).",
                       epilog="example:\n  geodiff train-prior tas_monthly.nc --var tas "
                              "--out prior.npz --steps 10000")
    t.add_argument("data", help="netCDF/zarr file (lat-lon) or PLY mesh with the fields")
    t.add_argument("--var", help="the variable (default: the only one on a lat-lon grid)")
    t.add_argument("--out", required=True, help="the prior file to write (.npz)")
    t.add_argument("--steps", type=int, default=2000, help="optimizer steps (default 2000)")
    t.add_argument("--batch", type=int, default=64, help="fields per step (default 64)")
    t.add_argument("--width", type=int, default=32, help="network width (default 32)")
    t.add_argument("--blocks", type=int, default=4, help="network blocks (default 4)")
    t.add_argument("--n-eig", type=int, default=64, help="Laplacian eigenpairs (default 64)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(run=train_prior)

    f = sub.add_parser("fit", formatter_class=fmt,
                       help="fit an amortized sampler to gappy fields",
                       description="Fit an amortized posterior sampler (APS) for the gappy fields "
                                   "of DATA (NaN = missing): a Gaussian surrogate of prior "
                                   "samples (or of --signals), the paper's loss on the fields' "
                                   "own measurements, and a temperature that makes 90%% "
                                   "intervals cover 90%% (set on held-out prior samples or "
                                   "signals, masked at the data's missing fraction).",
                       epilog="example:\n  geodiff fit tas_gappy.nc --prior prior.npz "
                              "--out sampler.npz --sigma 0.5")
    f.add_argument("data", help="netCDF/zarr file or PLY mesh with gaps (NaN)")
    f.add_argument("--prior", required=True,
                   help="a prior file from train-prior, or the name of a shipped prior")
    f.add_argument("--out", required=True, help="the sampler file to write (.npz)")
    f.add_argument("--var")
    f.add_argument("--sigma", type=float, default=None,
                   help="noise std of the observed values, in the data's units "
                        "(default: 1%% of the prior's data range)")
    f.add_argument("--steps", type=int, default=0,
                   help="training steps of the paper's loss on the gappy fields (default 0: the "
                        "calibrated base; with steps, the better of untrained and trained on "
                        "held-out fields is kept; docs/your-data.md has what training did)")
    f.add_argument("--signals", help="complete fields (the prior's training file) for the "
                                     "surrogate and the calibration, instead of prior draws")
    f.add_argument("--prior-samples", type=int, default=64,
                   help="prior draws for the surrogate and the calibration (default 64)")
    f.add_argument("--sample-steps", type=int, default=200,
                   help="reverse-diffusion steps per prior draw (default 200)")
    f.add_argument("--rank", type=int, default=256, help="surrogate rank (default 256)")
    f.add_argument("--centre", choices=("surrogate", "mixture"), default="surrogate",
                   help="the flow's base: the exact posterior of one Gaussian (kriging; default) "
                        "or of a Gaussian mixture fitted by EM")
    f.add_argument("--components", type=int, default=4,
                   help="mixture components (default 4)")
    f.add_argument("--couplings", type=int, default=8, help="flow coupling pairs (default 8)")
    f.add_argument("--hidden", type=int, default=256, help="flow conditioner width (default 256)")
    f.add_argument("--calib-samples", type=int, default=32,
                   help="samples per held-out field while calibrating (default 32)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--quiet", action="store_true")
    f.set_defaults(run=fit)

    i = sub.add_parser("impute", formatter_class=fmt, help="posterior samples of gappy fields",
                       description="Posterior mean, std and quantiles (and optionally samples) "
                                   "of every field of DATA, in the data's units.",
                       epilog="example:\n  geodiff impute tas_gappy.nc --sampler sampler.npz "
                              "--out posterior.nc --samples 128 --quantiles 0.05 0.5 0.95")
    i.add_argument("data", help="netCDF/zarr file or PLY mesh with gaps (NaN)")
    i.add_argument("--sampler", required=True, help="a sampler file from fit")
    i.add_argument("--out", required=True, help="posterior file to write (.nc; .ply for meshes)")
    i.add_argument("--var")
    i.add_argument("--samples", type=int, default=128, help="samples per field (default 128)")
    i.add_argument("--quantiles", type=float, nargs="+", default=[0.05, 0.5, 0.95])
    i.add_argument("--keep-samples", action="store_true", help="also write the samples")
    i.add_argument("--chunk", type=int, default=16,
                   help="fields per compiled call (default 16; memory grows with it, not with "
                        "the number of fields). Finished chunks are kept in OUT.parts/, so a "
                        "run that is stopped resumes where it stopped")
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--quiet", action="store_true", help="no progress bar")
    i.set_defaults(run=impute)

    g = sub.add_parser("plot", formatter_class=fmt, help="map of a posterior file",
                       description="Globe map (lat-lon) or 3-D render (mesh) of the posterior "
                                   "mean and std.",
                       epilog="example:\n  geodiff plot posterior.nc --out map.png --time 0 "
                              "--data tas_gappy.nc")
    g.add_argument("posterior", help="a posterior file from impute (.nc or .ply)")
    g.add_argument("--out", required=True, help="the image to write (.png)")
    g.add_argument("--time", type=int, default=0, help="time step to draw (default 0)")
    g.add_argument("--data", help="the gappy input file, drawn beside the posterior")
    g.set_defaults(run=plot)
    return p


def main(argv=None) -> int:
    """Entry point of the ``geodiff`` console script; returns the exit code."""
    args = parser().parse_args(argv)
    try:
        args.run(args)
    except (CliError, ValueError, TypeError, OSError) as e:     # OSError: FileNotFoundError too
        print(f"geodiff {args.command}: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
