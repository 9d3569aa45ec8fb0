"""Archive throughput of the amortized sampler: posterior summaries of many fields, chunk by chunk.

For each task (the 46×90 sphere with 60% of the points missing, σ = 0.05; the 32×32 grid
denoising at σ = 0.1) and sampler variant (centre × flow), on the same prior as the comparison
benchmarks:

* latency per measurement: 1 sample and 128 samples (``sampler.sample``) of a measurement whose
  mask the sampler has not seen (its own base solve), and of one whose mask it has (a station
  network: the sampler keeps one base factor per mask), and the per-field time
  of a batch of 64 measurements × 128 samples summarized in one compiled call
  (``iter_posterior``, mean, std and the 5/50/95% quantiles);
* XLA's FLOP count of each of those programs and the fraction of the measured float32 matmul
  peak it reaches;
* DPS on the same prior (one chain of ``--dps-steps`` steps, timed once after a compiled warm-up)
  and the speed-ups per sample;
* the archive: N fields × 128 samples through ``iter_posterior`` (chunks of ``--chunk``), fields
  per second, and the peak resident memory after N/4 and after N fields (flat in N when the
  chunk, not N, sets it); once with a random mask per field, once with one mask in all fields.

The flows are untrained: cost does not depend on the weights (the comparison benchmarks' flow
sizes; the ring MLP is the full mode's ``local_hidden = 32``). Compilation is excluded from every
timing. Run it with nothing else on the machine.

    python benchmarks/archive_throughput.py                 # full: N = 1,000 sphere fields
    python benchmarks/archive_throughput.py --quick         # N = 128, fewer repeats
    python benchmarks/archive_throughput.py --smoke         # tiny (what the tests run)

Writes ``<out>/results.json`` and ``<out>/results.md`` (default ``outputs/archive_throughput``).
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from geodiff import AmortizedSampler, Grid, Sphere  # noqa: E402
from geodiff.amortized import GaussianSurrogate, MixtureSurrogate  # noqa: E402
from geodiff.baselines import dps, gaussian_fit  # noqa: E402
from geodiff.data import era5_like, mnist32  # noqa: E402
from geodiff.operators import Denoise, RandomMask  # noqa: E402
from geodiff.timing import machine_info, time_call, versions, write_json  # noqa: E402

from _common import BATCH_QUANTILES as QUANTILES, batch_timing  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Config:
    n_archive: int = 1000        # sphere fields of the archive run
    chunk: int = 16              # fields per compiled call of the archive run
    n_samples: int = 128
    batch: int = 64              # measurements of the batched-latency row
    n_fit: int = 2000            # signals of the Gaussian fit (and the EM fit of the mixture)
    rank: int = 256
    low_rank: int = 128          # a sphere variant with this surrogate rank (0: none); kriging
                                 # loses 0.003 dB at 128 (benchmarks/surrogate_rank.py)
    mixture_k: int = 4
    repeats: int = 5
    dps_steps: int = 1000
    prior_mode: str = "quick"    # era5: the shipped quick prior (same network as the full one)
    hidden: int = 256
    couplings: int = 8
    n_eig: int = 64
    local_hidden: int = 32
    grid: bool = True            # also the 32×32 grid task


MODES = {"full": Config(),
         "quick": Config(n_archive=128, batch=16, repeats=3, n_fit=1000, dps_steps=200),
         "smoke": Config(n_archive=8, chunk=4, n_samples=8, batch=4, n_fit=64, rank=8,
                         mixture_k=2, repeats=1, dps_steps=4, prior_mode="smoke", hidden=8,
                         couplings=1, n_eig=4, local_hidden=4, low_rank=4)}


def matmul_peak_gflops() -> float:
    """Measured float32 matmul throughput of this machine (GFLOP/s, 2048³)."""
    a = jnp.ones((2048, 2048), jnp.float32)
    secs, _ = time_call(jax.jit(lambda a: a @ a), a, repeats=5)
    return 2 * 2048**3 / secs / 1e9


def flops(jitted, *args, **static) -> float:
    """XLA's FLOP count of one call of a jitted function (its cost analysis)."""
    cost = jitted.lower(*args, **static).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", float("nan")))


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MB; Linux reports kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def tasks(cfg: Config, mode: str):
    """(name, manifold, prior, bound operator, fit signals, fresh signals to measure)."""
    from train_priors import train_or_load

    sphere = Sphere.latlon(46, 90)
    prior, _, _, _ = train_or_load("era5", cfg.prior_mode, seed=0, progress=False)
    fit = era5_like(0, cfg.n_fit)
    fresh = era5_like(7, max(cfg.n_archive, cfg.batch))      # synthetic archive fields
    yield ("ERA5-like 46×90, mask 60%, σ=0.05", sphere, prior, RandomMask(0.6, 0.05).on(sphere),
           fit, fresh)
    if cfg.grid:
        grid = Grid(32, 32)
        gprior, _, _, _ = train_or_load("mnist", "smoke" if mode == "smoke" else "full", seed=0,
                                        progress=False)
        digits = mnist32("train")
        yield ("grid 32×32 denoise σ=0.1", grid, gprior, Denoise(0.1).on(grid),
               digits[: cfg.n_fit], mnist32("test")[: cfg.batch])


def variants(cfg: Config, op, fit, gauss):
    """(label, sampler keyword arguments) of the sampler variants measured on ``op``."""
    size = dict(hidden=cfg.hidden, n_steps=cfg.couplings, n_eig=cfg.n_eig)
    sur = GaussianSurrogate(*(np.asarray(a, np.float32) for a in gauss))
    centre = "tweedie" if isinstance(op, Denoise) else "surrogate"
    out = [(f"{centre}, spectral flow", dict(surrogate=sur, centre=centre, **size)),
           (f"{centre}, ring-MLP flow", dict(surrogate=sur, centre=centre, **size,
                                             local_hidden=cfg.local_hidden))]
    if isinstance(op, RandomMask) and cfg.low_rank:
        low = GaussianSurrogate(*(np.asarray(a, np.float32)
                                  for a in gaussian_fit(fit, rank=cfg.low_rank)))
        out.append((f"{centre} R={cfg.low_rank}, spectral flow",
                    dict(surrogate=low, centre=centre, **size)))
    if isinstance(op, RandomMask) and cfg.mixture_k:
        mix = MixtureSurrogate.fit(fit, components=cfg.mixture_k,
                                   rank=min(cfg.rank, len(fit) - 1), seed=0)
        out.append((f"mixture K={cfg.mixture_k}, spectral flow",
                    dict(surrogate=sur, centre="mixture", mixture=mix, **size)))
    return out


def latency(cfg: Config, sampler, meas, peak: float) -> dict:
    """Per-measurement costs of ``sampler`` on measurements ``meas`` (B ≥ cfg.batch)."""
    one = jax.tree.map(lambda a: a[0], meas)
    batch = jax.tree.map(lambda a: a[: cfg.batch], meas)
    n = cfg.n_samples
    row = {}

    def new_mask(k):          # a measurement whose mask the sampler has not seen: its own solve
        sampler.__dict__.pop("_mask_factors", None)
        return sampler.sample(jax.random.key(1), one, k)

    for k, label in ((1, "1"), (n, "n")):
        row[f"sample_{label}_s"] = time_call(new_mask, k, repeats=cfg.repeats)[0]
        # a mask seen before (a station network): its base factor is kept by the sampler
        row[f"sample_{label}_known_s"] = time_call(sampler.sample, jax.random.key(1), one, k,
                                                   repeats=cfg.repeats)[0]
    row["batch_per_field_s"] = batch_timing({"": sampler}, batch, batch=cfg.batch, n=n,
                                            repeats=cfg.repeats)[""]
    row["batch_s"] = row["batch_per_field_s"] * cfg.batch
    fr, p = sampler._frozen(), sampler.params
    b1 = jax.tree.map(lambda a: jnp.asarray(a)[None], one)
    first = jnp.int32(0)
    row["flops_1"] = flops(sampler._jit_sample, p, fr, b1, jax.random.key(0), first, n=1)
    row["flops_1_known"] = flops(sampler._jit_sample, p, sampler._frozen_for_mask(fr, b1), b1,
                                 jax.random.key(0), first, n=1)
    row["flops_n"] = flops(sampler._jit_sample, p, fr, b1, jax.random.key(0), first, n=n)
    row["flops_batch"] = flops(sampler._jit_summary, p, fr, batch, jax.random.key(0), first, n=n,
                               quantiles=QUANTILES, keep=False)
    for label, secs in (("1", row["sample_1_s"]), ("1_known", row["sample_1_known_s"]),
                        ("n", row["sample_n_s"]), ("batch", row["batch_s"])):
        row[f"peak_fraction_{label}"] = row[f"flops_{label}"] / secs / 1e9 / peak
    return row


def one_mask(meas):
    """The measurements with the first one's mask (a station network: the same gaps in every
    field), y zeroed where that mask leaves them unobserved."""
    mask = jnp.broadcast_to(meas.mask[:1], meas.mask.shape)
    return dataclasses.replace(meas, mask=mask, y=jnp.where(mask, meas.y, 0.0))


def archive(cfg: Config, sampler, meas) -> dict:
    """N fields × n samples through iter_posterior; fields/s and peak memory after N/4 and N."""
    n = cfg.n_samples
    N = len(meas.y)
    # compile outside the timing (the same chunk shape serves every chunk)
    next(sampler.iter_posterior(jax.random.key(2), meas, n, chunk=cfg.chunk, quantiles=QUANTILES))
    out = {}
    mean = np.empty(meas.y.shape[:1] + sampler.surrogate.mean.shape, np.float32)
    for label, stop in (("quarter", max(N // 4, 1)), ("all", N)):
        part = jax.tree.map(lambda a: a[:stop], meas)
        t0 = time.perf_counter()
        for p in sampler.iter_posterior(jax.random.key(2), part, n, chunk=cfg.chunk,
                                        quantiles=QUANTILES, progress=True):
            mean[p.start:p.stop] = p.mean          # what a writer would keep: summaries only
        secs = time.perf_counter() - t0
        out[f"archive_{label}_fields"] = stop
        out[f"archive_{label}_s"] = secs
        out[f"archive_{label}_peak_rss_mb"] = peak_rss_mb()
    out["fields_per_s"] = N / out["archive_all_s"]
    out["archive_chunk"] = cfg.chunk
    return out


def dps_time(cfg: Config, prior, op, meas) -> float:
    """Seconds of one DPS chain of cfg.dps_steps steps on one measurement (compiled first)."""
    one = jax.tree.map(lambda a: a[0], meas)
    run = lambda: dps(jax.random.key(3), prior, op, one, n=1, steps=cfg.dps_steps, zeta=0.3)  # noqa: E731
    return time_call(run, repeats=1)[0]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true")
    g.add_argument("--smoke", action="store_true")
    p.add_argument("--n-archive", type=int, default=None, help="archive fields (default per mode)")
    p.add_argument("--chunk", type=int, default=None, help="fields per compiled call")
    p.add_argument("--no-grid", action="store_true", help="the sphere task only")
    p.add_argument("--out", type=Path, default=Path("outputs/archive_throughput"))
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    cfg = MODES[mode]
    cfg = dataclasses.replace(cfg, **{k: v for k, v in (("n_archive", args.n_archive),
                                                         ("chunk", args.chunk)) if v is not None},
                              grid=cfg.grid and not args.no_grid)
    if cfg.n_archive < 4 or cfg.chunk < 1:
        raise SystemExit(f"--n-archive must be ≥ 4 and --chunk ≥ 1, got {cfg.n_archive}, {cfg.chunk}")
    peak = matmul_peak_gflops()
    print(f"float32 matmul peak (2048³): {peak:.1f} GFLOP/s")
    rows = []
    for task, manifold, prior, op, fit, fresh in tasks(cfg, mode):
        print(f"--- {task}")
        gauss = gaussian_fit(fit, rank=min(cfg.rank, len(fit) - 1))
        meas = op.measure(jax.random.key(11), fresh)
        t_dps = dps_time(cfg, prior, op, meas)
        print(f"DPS ({cfg.dps_steps} steps): {t_dps:.2f} s per sample")
        for i, (label, kw) in enumerate(variants(cfg, op, fit, gauss)):
            sampler = AmortizedSampler(manifold, prior, op, seed=0, **kw)
            row = {"task": task, "sampler": label, "n_params": sampler.n_params,
                   "n_vertices": manifold.n_vertices, "n_samples": cfg.n_samples,
                   "batch": cfg.batch, "dps_steps": cfg.dps_steps, "dps_s": t_dps,
                   **latency(cfg, sampler, meas, peak)}
            row["speedup_1"] = t_dps / row["sample_1_s"]
            row["speedup_n"] = t_dps / (row["sample_n_s"] / cfg.n_samples)
            row["speedup_batch"] = t_dps / (row["batch_per_field_s"] / cfg.n_samples)
            if isinstance(op, RandomMask) and i == 0:          # the archive: one variant
                row |= archive(cfg, sampler, meas)
                # the same archive with one gap pattern in every field: one base solve in all
                row |= {f"shared_{k}": v for k, v in archive(cfg, sampler, one_mask(meas)).items()}
            rows.append(row)
            print(_line(row))
    result = {"meta": {"mode": mode, "config": dataclasses.asdict(cfg), "seed": 0,
                       "machine": machine_info(), "versions": versions(),
                       "matmul_peak_gflops": peak, "quantiles": QUANTILES,
                       "data_source": "sphere: ERA5-like (GloSea4-anchored) synthetic fields "
                                      "(era5_like seed 7), not ERA5; grid: MNIST 32×32 "
                                      "standing in for CelebA",
                       "flows": "untrained (cost does not depend on the weights)"},
              "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.json or args.out / "results.json", result)
    table = markdown(result)
    (args.out / "results.md").write_text(table)
    print(table)
    return result


def _line(r: dict) -> str:
    return (f"{r['sampler']:28s} 1: {r['sample_1_s'] * 1e3:7.2f} ms  {r['n_samples']}: "
            f"{r['sample_n_s'] * 1e3:7.1f} ms  batch/field: {r['batch_per_field_s'] * 1e3:7.1f} ms"
            f"  peak {100 * r['peak_fraction_batch']:.1f}%")


def markdown(result: dict) -> str:
    n = result["rows"][0]["n_samples"] if result["rows"] else 128
    b = result["rows"][0]["batch"] if result["rows"] else 64
    lines = [f"Matmul peak {result['meta']['matmul_peak_gflops']:.1f} GFLOP/s (float32, 2048³). "
             "Times per measurement, compilation excluded; % = FLOPs / time / peak.", "",
             f"| task | sampler | 1 sample (ms) | {n} samples (ms) | 1 / {n} samples, mask seen "
             f"before (ms) | batch {b}×{n} per field (ms) "
             f"| % peak (1 / {n} / batch) | DPS (s) | speed-up per sample (1 / {n} / batch) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(
            f"| {r['task']} | {r['sampler']} | {r['sample_1_s'] * 1e3:.2f} | "
            f"{r['sample_n_s'] * 1e3:.1f} | {r['sample_1_known_s'] * 1e3:.2f} / "
            f"{r['sample_n_known_s'] * 1e3:.1f} | {r['batch_per_field_s'] * 1e3:.1f} | "
            f"{100 * r['peak_fraction_1']:.1f} / {100 * r['peak_fraction_n']:.1f} / "
            f"{100 * r['peak_fraction_batch']:.1f} | {r['dps_s']:.2f} ({r['dps_steps']} steps) | "
            f"{r['speedup_1']:,.0f}× / {r['speedup_n']:,.0f}× / {r['speedup_batch']:,.0f}× |")
    arch = [r for r in result["rows"] if "fields_per_s" in r]
    if arch:
        lines += ["", "| archive (sampler) | fields | samples each | chunk | time (s) | fields/s "
                      "| peak RSS after N/4 → N (MB) |", "|---|---|---|---|---|---|---|"]
        for r in arch:
            for pre, what in (("", "a mask per field"), ("shared_", "one mask in all fields")):
                if f"{pre}fields_per_s" not in r:
                    continue
                lines.append(f"| {r['task']} ({r['sampler']}; {what}) | "
                             f"{r[pre + 'archive_all_fields']} | {r['n_samples']} | "
                             f"{r[pre + 'archive_chunk']} | {r[pre + 'archive_all_s']:.1f} | "
                             f"{r[pre + 'fields_per_s']:.2f} | "
                             f"{r[pre + 'archive_quarter_peak_rss_mb']:.0f} → "
                             f"{r[pre + 'archive_all_peak_rss_mb']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
