"""Failure drills (docs/reliability.md): a training process killed with SIGKILL in the middle of
a step or of a checkpoint write resumes to the parameters of an uninterrupted run, bit for bit;
a truncated, corrupted or foreign file handed to a loader is a clear error and nothing is
half-loaded; a save that cannot be written leaves the previous file intact."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import jax
import numpy as np
import pytest

from geodiff import AmortizedSampler, DiffusionPrior, GaussianPrior, Grid
from geodiff.diffusion import NetConfig
from geodiff.operators import RandomMask
from geodiff.train import load_checkpoint

DRILL = Path(__file__).with_name("_drill_train.py")


def _run(kind, out, mode):
    out.mkdir(exist_ok=True)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, str(DRILL), kind, str(out), mode], env=env,
                          capture_output=True, text=True, timeout=600)


def _leaves(path):
    with np.load(path) as f:
        return [f[k] for k in sorted(f.files, key=lambda k: int(k.split("_")[1]))]


@pytest.mark.slow                     # 5 subprocesses of ≈ 8 s each per kind: make test-slow
@pytest.mark.parametrize("kind", ["prior", "sampler"])
def test_sigkill_mid_step_and_mid_checkpoint_write_then_resume_is_bitwise(kind, tmp_path):
    clean = _run(kind, tmp_path / "clean", "clean")
    assert clean.returncode == 0, clean.stderr[-3000:]
    want = _leaves(tmp_path / "clean" / "final-clean.npz")
    for mode in ("kill-write", "kill-step"):
        d = tmp_path / mode
        killed = _run(kind, d, mode)
        assert killed.returncode == -9, (mode, killed.returncode, killed.stderr[-3000:])
        assert not (d / f"final-{mode}.npz").exists()
        ckpt = load_checkpoint(d / "ckpt")               # the file on disk is whole
        assert 0 < ckpt["step"] < 12, (mode, ckpt["step"])
        if mode == "kill-write":                         # the half-written one is only a .tmp
            half = list((d / "ckpt").glob("checkpoint.npz.*.tmp"))
            assert len(half) == 1 and half[0].stat().st_size > 0
        resumed = _run(kind, d, "resume")
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        got = _leaves(d / "final-resume.npz")
        assert len(got) == len(want)
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------ bad files for every loader
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A prior, a sampler and a training checkpoint, saved."""
    d = tmp_path_factory.mktemp("saved")
    grid = Grid(4, 4)
    gauss = GaussianPrior.matern(grid, variance=0.05, length_scale=0.3, mean=0.4, nugget=1e-3)
    signals = np.asarray(gauss.sample(jax.random.key(2), 32))
    prior, _ = DiffusionPrior.train(jax.random.key(0), grid, signals, steps=2, batch_size=8,
                                    config=NetConfig(width=8, n_blocks=1, n_eig=8, n_pos=4, emb_dim=8),
                                    warmup_steps=1, checkpoint_dir=d / "ckpt", checkpoint_every=1,
                                    progress=False)
    prior.save(d / "prior.npz")
    sampler = AmortizedSampler(grid, gauss, RandomMask(0.5, 0.05), prior_term="exact",
                               surrogate=signals, surrogate_rank=4, n_steps=1, hidden=8, n_eig=8)
    sampler.save(d / "sampler.npz")
    return {"prior": d / "prior.npz", "sampler": d / "sampler.npz",
            "checkpoint": d / "ckpt" / "checkpoint.npz"}


LOADERS = {"prior": DiffusionPrior.load, "sampler": AmortizedSampler.load,
           "checkpoint": load_checkpoint}


def _damaged(src: Path, how: str, dst: Path) -> Path:
    data = src.read_bytes()
    if how == "truncated":
        dst.write_bytes(data[: len(data) // 2])
    elif how == "corrupted":                    # bytes flipped inside the stored arrays
        b = bytearray(data)
        for i in range(len(b) // 3, len(b) // 3 + 64):
            b[i] ^= 0xFF
        dst.write_bytes(bytes(b))
    elif how == "empty":
        dst.write_bytes(b"")
    elif how == "text":
        dst.write_text("this is not a geodiff file\n")
    elif how == "foreign npz":                   # a valid .npz that geodiff did not write
        np.savez(dst, a=np.arange(3))
    elif how == "other zip":
        with zipfile.ZipFile(dst, "w") as z:
            z.writestr("meta.npy", b"junk")
    return dst


@pytest.mark.parametrize("what", sorted(LOADERS))
@pytest.mark.parametrize("how", ["truncated", "corrupted", "empty", "text", "foreign npz", "other zip"])
def test_a_damaged_or_foreign_file_is_a_clear_error(saved, what, how, tmp_path):
    bad = _damaged(saved[what], how, tmp_path / "bad.npz")
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        LOADERS[what](bad)
    message = str(err.value)
    assert str(bad) in message or "bad.npz" in message, message
    assert "Traceback" not in message


@pytest.mark.parametrize("what", sorted(LOADERS))
def test_another_kind_of_geodiff_file_is_refused(saved, what):
    other = {"prior": "sampler", "sampler": "checkpoint", "checkpoint": "prior"}[what]
    with pytest.raises(ValueError, match="not a"):
        LOADERS[what](saved[other])


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes anywhere")
def test_a_save_into_a_read_only_folder_keeps_the_previous_file(saved, tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    target = d / "prior.npz"
    target.write_bytes(saved["prior"].read_bytes())
    before = target.read_bytes()
    prior = DiffusionPrior.load(saved["prior"])
    d.chmod(0o500)
    try:
        with pytest.raises(PermissionError):
            prior.save(target)
    finally:
        d.chmod(0o700)
    assert target.read_bytes() == before and os.listdir(d) == ["prior.npz"]


def test_a_save_that_fails_midway_keeps_the_previous_file(saved, tmp_path, monkeypatch):
    """A full disk (ENOSPC) in the middle of the write: the error reaches the caller, the old
    file is unchanged and no temporary file is left (root ignores folder permissions, so this
    drill stands in for the read-only one when the tests run as root)."""
    import errno

    import geodiff._cache

    target = tmp_path / "prior.npz"
    target.write_bytes(saved["prior"].read_bytes())
    before = target.read_bytes()
    prior = DiffusionPrior.load(saved["prior"])
    real = np.savez

    def full_disk(f, **arrays):
        real(f, **{k: arrays[k] for k in list(arrays)[:1]})
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(geodiff._cache.np, "savez", full_disk)
    for save in (prior.save, AmortizedSampler.load(saved["sampler"]).save):
        with pytest.raises(OSError, match="No space left"):
            save(target)
        assert target.read_bytes() == before and os.listdir(tmp_path) == ["prior.npz"]
