"""Train the diffusion priors of the three benchmark datasets and draw their samples.

    python benchmarks/train_priors.py --dataset era5 --quick     # minutes
    python benchmarks/train_priors.py --dataset all --smoke      # seconds (what the tests run)
    python benchmarks/train_priors.py --dataset era5             # full mode, resumable stages

Datasets: ``era5`` (ERA5-like (GloSea4-anchored) temperature on the 46×90 sphere), ``bunny``
(MNIST on the Stanford bunny res3), ``mnist`` (MNIST 32×32, the offline stand-in for CelebA).

Trained priors are cached as ``$GEODIFF_CACHE/priors/<dataset>-<mode>.npz`` and reused by later
scripts (delete the file or pass ``--retrain`` to train again). Where geodiff ships the prior of
a (dataset, mode) (``benchmarks/ship_prior.py``, ``geodiff/pretrained/``), a missing cache file
is a copy of it instead of a new training run. Training checkpoints go to
``$GEODIFF_CACHE/priors/<dataset>-<mode>-ckpt/``: an interrupted full run resumes where it stopped,
and ``--steps`` may be raised to continue a finished one. Writes a figure of prior samples beside
real samples (``<out>/<dataset>-<mode>.png``) and a JSON of timings and the loss curve.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import time
from pathlib import Path

import jax
import numpy as np

from geodiff import Grid, Mesh, Sphere
from geodiff._cache import atomic_write, cache_dir
from geodiff.diffusion import VPSDE, DiffusionPrior, NetConfig
from geodiff.timing import machine_info, versions, write_json


@dataclasses.dataclass(frozen=True)
class Mode:
    steps: int
    batch_size: int
    n_train: int | None       # training signals (None: the whole split)
    net: NetConfig
    sample_steps: int
    learning_rate: float = 2e-3
    warmup_steps: int = 200


MODES = {
    "smoke": Mode(steps=4, batch_size=4, n_train=64, net=NetConfig(width=8, n_blocks=1, n_eig=16, n_pos=4),
                  sample_steps=10, warmup_steps=0),
    "quick": Mode(steps=400, batch_size=32, n_train=2000, net=NetConfig(width=32, n_blocks=4),
                  sample_steps=250, warmup_steps=50),
    "full": Mode(steps=10000, batch_size=64, n_train=None, net=NetConfig(width=32, n_blocks=4),
                 sample_steps=1000),
}


def load_dataset(name: str, n: int | None, seed: int):
    """(manifold, training signals (N, V, C), units label, to-physical function)."""
    from geodiff.data import bunny_mnist, denormalize, era5_like, mnist32

    if name == "era5":
        return Sphere.latlon(46, 90), era5_like(seed, n or 6000), "K", denormalize
    if name == "bunny":
        data = bunny_mnist("train")
        return Mesh.bunny(3), data[:n] if n else data, "", lambda v: v
    if name == "mnist":
        data = mnist32("train")
        return Grid(32, 32), data[:n] if n else data, "", lambda v: v
    raise ValueError(f"dataset must be one of era5, bunny, mnist, got {name!r}")


def prior_name(dataset: str, mode: str, t0: float | None = None) -> str:
    """Cache name: ``<dataset>-<mode>``, plus ``-t0<t0>`` for a non-default VPSDE t0."""
    return f"{dataset}-{mode}" + ("" if t0 is None else f"-t0{t0:g}")


def prior_path(dataset: str, mode: str, t0: float | None = None) -> Path:
    return cache_dir("priors") / f"{prior_name(dataset, mode, t0)}.npz"


#: the package's name of each dataset's shipped prior (``benchmarks/ship_prior.py``)
SHIPPED_NAMES = {"mnist": "mnist-32x32", "bunny": "bunny-mnist-res3", "era5": "era5-like-46x90"}


def shipped_name(dataset: str, mode: str) -> str:
    """The name under which ``ship_prior.py`` ships the prior of ``dataset`` trained in ``mode``
    (full: the dataset's name, quick: with ``-quick``)."""
    return SHIPPED_NAMES[dataset] + ("" if mode == "full" else f"-{mode}")


def shipped_copy(dataset: str, mode: str, t0: float | None = None) -> Path | None:
    """The shipped prior that this script would train for (dataset, mode, default t0), copied
    into the cache as ``prior_path``; None when none ships with this installation."""
    from geodiff.diffusion.prior import PRETRAINED_DIR

    if t0 is not None or mode == "smoke" or dataset not in SHIPPED_NAMES:
        return None
    src = PRETRAINED_DIR / f"{shipped_name(dataset, mode)}.npz"
    if not (src.is_file() and src.with_suffix(".json").is_file()):
        return None
    dst = prior_path(dataset, mode)
    atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))
    print(f"prior: the shipped {src.stem} (geodiff/pretrained/{src.stem}.json: the model card of "
          f"`train_priors.py --dataset {dataset}{'' if mode == 'full' else ' --' + mode}`, seed 0); "
          "--retrain trains it here")
    return dst


def train_or_load(dataset: str, mode_name: str, *, seed: int = 0, steps: int | None = None,
                  retrain: bool = False, progress: bool = True, t0: float | None = None):
    """The cached prior of ``dataset`` trained in ``mode_name``, training it if needed.

    Returns:
        (prior, info dict with timings, or None when loaded from the cache), manifold, data.
    """
    if t0 is not None and not 0 < t0 < 0.1:
        raise ValueError(f"t0 must be in (0, 0.1), got {t0!r}")
    mode = MODES[mode_name]
    manifold, data, units, physical = load_dataset(dataset, mode.n_train, seed)
    path = prior_path(dataset, mode_name, t0)
    if not path.exists() and not retrain and steps is None:
        shipped_copy(dataset, mode_name, t0)
    if path.exists() and not retrain and steps is None:
        return DiffusionPrior.load(path, manifold), None, manifold, data
    ckpt = cache_dir("priors") / f"{prior_name(dataset, mode_name, t0)}-ckpt"
    if retrain and ckpt.exists():
        shutil.rmtree(ckpt)
    start = time.perf_counter()
    prior, history = DiffusionPrior.train(
        jax.random.key(seed), manifold, data, steps=steps or mode.steps, batch_size=mode.batch_size,
        config=mode.net, learning_rate=mode.learning_rate, warmup_steps=mode.warmup_steps,
        checkpoint_dir=ckpt, checkpoint_every=500, progress=progress,
        sde=None if t0 is None else VPSDE(t0=t0))
    wall = time.perf_counter() - start
    prior.save(path)
    n_params = sum(int(np.size(v)) for v in jax.tree_util.tree_leaves(prior.params))
    info = {"wall_s": wall, "step_s": history["step_s"], "compile_s": history["compile_s"],
            "steps": history["step"][-1] if history["step"] else 0, "n_params": n_params,
            "n_bad": history["n_bad"], "loss_first": history["loss"][0] if history["loss"] else None,
            "loss_last": history["loss"][-1] if history["loss"] else None,
            "loss_curve": list(zip(history["step"], history["loss"]))[:: max(1, len(history["loss"]) // 50)]}
    return prior, info, manifold, data


def draw(dataset, prior, manifold, data, path: Path, *, sample_steps: int, seed: int):
    """Figure: 4 prior samples beside 4 real signals; returns sampling time per sample (s)."""
    from geodiff import plot
    from geodiff.data import denormalize

    t0 = time.perf_counter()
    samples = np.asarray(jax.block_until_ready(
        prior.sample(jax.random.key(seed + 1), 4, steps=sample_steps, grid="log_snr")))
    per_sample = (time.perf_counter() - t0) / 4
    real = data[np.random.default_rng(seed).choice(len(data), 4, replace=False)]
    if dataset == "era5":
        fields = {f"real {i}": denormalize(real[i, :, 0]) for i in range(2)}
        fields |= {f"prior sample {i}": denormalize(samples[i, :, 0]) for i in range(2)}
        plot.globe(manifold, fields, path, units="K", ncols=2,
                   suptitle="ERA5-like (GloSea4-anchored): training fields vs diffusion-prior samples")
    elif dataset == "bunny":
        fields = {f"real {i}": real[i, :, 0] for i in range(4)}
        fields |= {f"sample {i}": samples[i, :, 0] for i in range(4)}
        plot.mesh_render(manifold, fields, path, ncols=4, vmin=0.0, vmax=1.0,
                          units="grey level")
    else:
        images = {f"real {i}": real[i] for i in range(4)} | {f"sample {i}": samples[i] for i in range(4)}
        plot.image_grid(manifold, images, path, ncols=4, units="grey level")
    return per_sample


def main(argv=None):
    parser = argparse.ArgumentParser(description="train the diffusion priors")
    parser.add_argument("--dataset", default="all", choices=["all", "era5", "bunny", "mnist"])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true")
    mode.add_argument("--smoke", action="store_true")
    parser.add_argument("--steps", type=int, default=None, help="override the mode's step count")
    parser.add_argument("--retrain", action="store_true", help="ignore a cached prior")
    parser.add_argument("--t0", type=float, default=None,
                        help="VPSDE t0 (default 1e-3); cached as <dataset>-<mode>-t0<t0>")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="outputs/priors")
    parser.add_argument("--json", default=None)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    mode_name = "smoke" if args.smoke else "quick" if args.quick else "full"
    datasets = ["era5", "bunny", "mnist"] if args.dataset == "all" else [args.dataset]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in datasets:
        prior, info, manifold, data = train_or_load(name, mode_name, seed=args.seed, steps=args.steps,
                                                     retrain=args.retrain, progress=not args.no_progress,
                                                     t0=args.t0)
        fig = out / f"{prior_name(name, mode_name, args.t0)}.png"
        per_sample = draw(name, prior, manifold, data, fig, sample_steps=MODES[mode_name].sample_steps,
                          seed=args.seed)
        rows.append({"dataset": name, "mode": mode_name, "t0": float(prior.sde.t0),
                     "trained_now": info is not None,
                     "sample_s": per_sample, "sample_steps": MODES[mode_name].sample_steps,
                     "figure": str(fig), **(info or {})})
        r = rows[-1]
        print(f"{name:6s} {mode_name}: " + (f"{r['steps']} steps, {r['step_s']:.3f} s/step, "
              f"{r['wall_s']:.0f} s wall, loss {r['loss_first']:.3f} → {r['loss_last']:.3f}, "
              if info else "loaded from cache, ") + f"{per_sample:.2f} s/sample → {fig}")
    result = {"meta": {"seed": args.seed, "mode": mode_name, "machine": machine_info(),
                       "versions": versions(),
                       "data_source": {"era5": "ERA5-like (GloSea4-anchored)",
                                       "bunny": "MNIST on Stanford bunny res3",
                                       "mnist": "MNIST 32x32 standing in for CelebA"}},
              "rows": rows}
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
