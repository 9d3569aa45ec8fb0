"""A training run for the failure drills of tests/test_drills.py, run as a subprocess.

    python _drill_train.py {prior,sampler} OUT MODE

MODE: ``clean`` trains to the end; ``kill-write`` is killed (SIGKILL, by itself) half-way
through writing its second checkpoint; ``kill-step`` is killed (SIGKILL, by itself) inside the
jitted training step, from a host callback, after its first checkpoint; ``resume`` continues
from OUT/ckpt to the end. Every run that ends writes its final parameters to OUT/final-MODE.npz.
The runs compile like the test session (tests/conftest.py: the run's shared compilation cache,
optimizations off unless GEODIFF_TEST_XLA_OPT=1), so their steps compute the same numbers.
"""

import os
import signal
import sys
from pathlib import Path

import jax
import numpy as np

STEPS, EVERY = 12, 3


def kill():
    os.kill(os.getpid(), signal.SIGKILL)


def main(kind: str, out: Path, mode: str) -> None:
    if os.environ.get("GEODIFF_TEST_XLA_OPT", "0") != "1":
        jax.config.update("jax_disable_most_optimizations", True)
    if "GEODIFF_TEST_JAX_CACHE" in os.environ:
        jax.config.update("jax_compilation_cache_dir", os.environ["GEODIFF_TEST_JAX_CACHE"])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    import geodiff._cache
    from geodiff import AmortizedSampler, DiffusionPrior, GaussianPrior, Grid
    from geodiff.diffusion import NetConfig
    from geodiff.operators import RandomMask

    if mode == "kill-write":                  # the second checkpoint dies half-written
        writes = []
        real = np.savez

        def savez(f, **arrays):
            writes.append(1)
            if len(writes) < 2:
                return real(f, **arrays)
            names = sorted(arrays)
            real(f, **{k: arrays[k] for k in names[: len(names) // 2]})
            f.flush()
            kill()
        geodiff._cache.np.savez = savez
    grid = Grid(4, 4)
    gauss = GaussianPrior.matern(grid, variance=0.05, length_scale=0.3, mean=0.4, nugget=1e-3)
    signals = np.asarray(gauss.sample(jax.random.key(2), 64))
    ckpt = out / "ckpt"

    def check(_):                             # a host callback inside every step of every run
        if mode == "kill-step" and (ckpt / "checkpoint.npz").exists():
            kill()                            # (the same program in every mode: same numbers)

    def hooked(orig):
        def loss(self, *args, **kwargs):
            jax.debug.callback(check, args[0])
            return orig(self, *args, **kwargs)
        return loss

    common = dict(steps=STEPS, batch_size=8, checkpoint_every=EVERY, progress=False,
                  checkpoint_dir=None if mode == "clean" else ckpt)
    if kind == "prior":
        cfg = NetConfig(width=8, n_blocks=1, n_eig=8, n_pos=4, emb_dim=8)
        DiffusionPrior.dsm_loss = hooked(DiffusionPrior.dsm_loss)
        model, _ = DiffusionPrior.train(jax.random.key(0), grid, signals, config=cfg,
                                        warmup_steps=2, **common)
    else:
        op = RandomMask(0.5, 0.05)
        sampler = AmortizedSampler(grid, gauss, op, prior_term="exact", surrogate=signals,
                                   surrogate_rank=4, n_steps=2, hidden=16, n_eig=8)
        meas = sampler.operator.measure(jax.random.key(1), signals)
        AmortizedSampler._loss_reverse = hooked(AmortizedSampler._loss_reverse)
        model, _ = sampler.fit(jax.random.key(3), meas, warmup_steps=2, **common)
    leaves = jax.tree_util.tree_leaves(model.params)
    np.savez(out / f"final-{mode}.npz", *[np.asarray(v) for v in leaves])


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), sys.argv[3])
