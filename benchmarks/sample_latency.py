"""Latency of one measurement's posterior draws, ``sampler.sample`` end to end (issue "Throughput":
the one-sample floor).

For the sphere task of the comparison benchmarks (46×90, 60% of the points missing, σ = 0.05;
Gaussian surrogate of rank 128 or 256, spectral or ring-MLP flow) and the grid task (32×32
denoising at σ = 0.1, Tweedie centre), the median wall time of ``sampler.sample(key, y, n)`` for
n = 1 and 128 draws, for a measurement whose mask the sampler has not seen (its own base solve)
and for one whose mask it has (a station network: the sampler keeps the base factor per mask).
Everything the call does is timed: validation, the compiled program, the result. The flows are
untrained (cost does not depend on the weights); the flow sizes are the benchmarks' (8 coupling
pairs, 256 hidden, 64 modes; ring MLP 32). Compilation is excluded. Run it with nothing else on
the machine, or pass ``--pause-pid PID`` to pause a long background job (SIGSTOP, then SIGCONT)
while the timed calls run (the programs are compiled before the pause).

``--stages`` times instead where one draw's compiled program spends its time, on the spectral
variants (sphere R = 128 and grid): the program cut after the base mean, the condition c(y), the
flow's per-condition terms (``prepare``), the flow, and the base map x = m₀ + L₀ u (all of it),
with a mask seen before; each cut is its own compiled program, so differences are approximate.

    python benchmarks/sample_latency.py                  # ≈ 3 min on 2 CPU cores
    python benchmarks/sample_latency.py --stages         # the stage breakdown
    python benchmarks/sample_latency.py --smoke          # what the tests run

Prints a table and writes ``<out>/results.json`` (default ``outputs/sample_latency``;
``<out>/stages.json`` with ``--stages``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from geodiff import AmortizedSampler, Grid, Sphere  # noqa: E402
from geodiff.amortized import GaussianSurrogate  # noqa: E402
from geodiff.baselines import gaussian_fit  # noqa: E402
from geodiff.data import era5_like, mnist32  # noqa: E402
from geodiff.operators import Denoise, RandomMask  # noqa: E402
from geodiff.timing import machine_info, time_call, versions, write_json  # noqa: E402

SIZE = {"full": dict(hidden=256, n_steps=8, n_eig=64), "smoke": dict(hidden=8, n_steps=1, n_eig=4)}


def cases(smoke: bool):
    """(label, sampler, one measurement) of every variant timed."""
    from train_priors import train_or_load

    mode, size = ("smoke", SIZE["smoke"]) if smoke else ("quick", SIZE["full"])
    ranks = ((8, 0), (8, 4)) if smoke else ((128, 0), (256, 0), (256, 32))
    n_fit = 64 if smoke else 1000
    sphere = Sphere.latlon(46, 90)
    prior, *_ = train_or_load("era5", mode, progress=False)
    fit = era5_like(0, n_fit)
    op = RandomMask(0.6, 0.05).on(sphere)
    one = op.measure(jax.random.key(11), era5_like(7, 1))
    one = jax.tree.map(lambda a: a[0], one)
    for rank, lh in ranks:
        sur = GaussianSurrogate(*(np.asarray(a, np.float32) for a in gaussian_fit(fit, rank=rank)))
        yield (f"sphere 46×90, R = {rank}, {'ring-MLP' if lh else 'spectral'} flow",
               AmortizedSampler(sphere, prior, op, seed=0, surrogate=sur, centre="surrogate",
                                local_hidden=lh, **size), one)
    grid = Grid(32, 32)
    gprior, *_ = train_or_load("mnist", "smoke" if smoke else "full", progress=False)
    gop = Denoise(0.1).on(grid)
    digits = mnist32("train")[:n_fit]
    gsur = GaussianSurrogate(*(np.asarray(a, np.float32)
                               for a in gaussian_fit(digits, rank=8 if smoke else 256)))
    gone = jax.tree.map(lambda a: a[0], gop.measure(jax.random.key(11), mnist32("test")[:1]))
    for lh in ((4,) if smoke else (0, 32)):
        yield (f"grid 32×32 denoise, Tweedie, {'ring-MLP' if lh else 'spectral'} flow",
               AmortizedSampler(grid, gprior, gop, seed=0, surrogate=gsur, centre="tweedie",
                                local_hidden=lh, **size), gone)


STAGES = ("base mean", "condition", "flow terms", "flow", "base map")


def stage_programs(sampler, one):
    """(compiled program of one draw cut after stage k, its arguments) for each of STAGES, with
    the base factor of ``one``'s mask kept (a mask seen before)."""
    import jax.numpy as jnp
    from flax import nnx

    from geodiff.amortized.surrogate import base_forward

    m = jax.tree.map(lambda a: jnp.asarray(a)[None], one)
    frozen = sampler._frozen_for_mask(sampler._frozen(), m)
    V, C = sampler.surrogate.mean.shape
    z = jax.random.normal(jax.random.key(0), (1, V, C))

    def upto(stage, params, frozen, m, z):
        b = sampler._base(frozen, m)
        if stage == 0:
            return b["m0"]
        c = sampler._features(frozen["sur"], m, b)
        if stage == 1:
            return c
        b = sampler._strip(b)
        flow = nnx.merge(sampler._graphdef, params, frozen["consts"])
        prepared = flow.prepare(c)
        if stage == 2:
            return prepared
        u, _ = flow.forward(z, None, prepared=prepared)
        if stage == 3:
            return u
        return base_forward(sampler.kind, frozen["sur"], frozen["shared"], b, u)[0]

    args = (sampler.params, frozen, m, z)
    progs = [jax.jit(lambda *a, k=k: upto(k, *a)) for k in range(len(STAGES))]
    for prog in progs:
        jax.block_until_ready(prog(*args))
    return progs, args


@contextlib.contextmanager
def paused(pid: int | None):
    """SIGSTOP ``pid`` for the duration of the block (SIGCONT after it, whatever happens)."""
    if pid is None:
        yield
        return
    print(f"pausing process {pid} while timing (if this script dies, resume it: kill -CONT {pid})")
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(0.3)                       # let its threads leave the cores
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):     # it may have ended meanwhile
            os.kill(pid, signal.SIGCONT)


def check_pause_pid(pid: int) -> None:
    """Refuse a ``--pause-pid`` that is not one other live process this user may signal (0, a
    negative pid, this process or its group would stop the benchmark itself or everything)."""
    if pid <= 0 or pid == os.getpid() or pid == os.getpgid(0):
        raise SystemExit(f"--pause-pid must be another process's id (> 0, not this process or "
                         f"its group), got {pid}")
    try:
        os.kill(pid, 0)
        if os.getpgid(pid) == os.getpgid(0):
            raise SystemExit(f"--pause-pid {pid} is in this process's group: pausing it could "
                             "stop this benchmark too")
    except OSError as e:
        raise SystemExit(f"--pause-pid {pid}: {e.strerror}") from None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--n", type=int, default=128, help="the many-sample call's draws")
    p.add_argument("--repeats", type=int, default=None, help="timed calls (n = 1; n: a quarter)")
    p.add_argument("--stages", action="store_true",
                   help="time where one draw's program spends its time (spectral variants)")
    p.add_argument("--pause-pid", type=int, default=None,
                   help="a background process to pause while timing (SIGSTOP / SIGCONT)")
    p.add_argument("--out", type=Path, default=Path("outputs/sample_latency"))
    args = p.parse_args(argv)
    if args.n < 2:
        raise SystemExit(f"--n must be ≥ 2, got {args.n}")
    repeats = args.repeats if args.repeats is not None else (1 if args.smoke else 20)
    if repeats < 1:
        raise SystemExit(f"--repeats must be ≥ 1, got {repeats}")
    if args.pause_pid is not None:
        check_pause_pid(args.pause_pid)       # before any work

    def new_mask(sampler, one, n):            # a mask the sampler has not seen: its own solve
        sampler.__dict__.pop("_mask_factors", None)
        return sampler.sample(jax.random.key(1), one, n)

    todo = list(cases(args.smoke))
    if args.stages:
        return stages(args, [t for t in todo if "spectral" in t[0] and "R = 256" not in t[0]],
                      repeats)
    for _, sampler, one in todo:              # compile every program before timing
        for n in (1, args.n):
            new_mask(sampler, one, n)
            sampler.sample(jax.random.key(1), one, n)
    rows = []
    with paused(args.pause_pid):
        for label, sampler, one in todo:
            row = {"variant": label, "n": args.n}
            for n, tag, reps in ((1, "1", repeats), (args.n, "n", max(1, repeats // 4))):
                row[f"{tag}_new_mask_s"] = time_call(new_mask, sampler, one, n, repeats=reps)[0]
                row[f"{tag}_known_mask_s"] = time_call(sampler.sample, jax.random.key(1), one, n,
                                                       repeats=reps)[0]
            rows.append(row)
    result = {"meta": {"seed": 0, "smoke": args.smoke, "repeats": repeats,
                       "paused_pid": args.pause_pid, "machine": machine_info(),
                       "versions": versions(),
                       "data_source": "sphere: ERA5-like (GloSea4-anchored) synthetic fields, not "
                                      "ERA5; grid: MNIST 32×32 standing in for CelebA",
                       "flows": "untrained (cost does not depend on the weights)"},
              "rows": rows}
    write_json(args.out / "results.json", result)
    lines = [f"| variant | 1 sample, new mask (ms) | 1 sample, mask seen before (ms) | {args.n} "
             f"samples, new mask (ms) | {args.n} samples, mask seen before (ms) |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {1e3 * r['1_new_mask_s']:.2f} | {1e3 * r['1_known_mask_s']:.2f}"
              f" | {1e3 * r['n_new_mask_s']:.1f} | {1e3 * r['n_known_mask_s']:.1f} |" for r in rows]
    print("\n".join(lines))
    print(f"wrote {args.out / 'results.json'}")
    return result


def stages(args, todo, repeats: int) -> dict:
    """The stage breakdown of one draw (``--stages``): cumulative and per-stage seconds."""
    built = [(label, *stage_programs(sampler, one)) for label, sampler, one in todo]
    rows = []
    with paused(args.pause_pid):
        for label, progs, a in built:
            cum = [time_call(prog, *a, repeats=repeats)[0] for prog in progs]
            rows.append({"variant": label, "cumulative_s": dict(zip(STAGES, cum)),
                         "stage_s": dict(zip(STAGES, np.diff([0.0] + cum).tolist()))})
    result = {"meta": {"seed": 0, "smoke": args.smoke, "repeats": repeats,
                       "paused_pid": args.pause_pid, "machine": machine_info(),
                       "versions": versions(), "stages": STAGES,
                       "note": "one draw, mask seen before; each cut is its own compiled program"},
              "rows": rows}
    write_json(args.out / "stages.json", result)
    lines = ["| variant | " + " | ".join(f"+ {s} (ms)" for s in STAGES) + " |",
             "|---|" + "---|" * len(STAGES)]
    lines += [f"| {r['variant']} | " + " | ".join(f"{1e3 * r['cumulative_s'][s]:.2f}"
                                                  for s in STAGES) + " |" for r in rows]
    print("cumulative time of the program cut after each stage:")
    print("\n".join(lines))
    print(f"wrote {args.out / 'stages.json'}")
    return result


if __name__ == "__main__":
    main()
