"""Shared fixtures. Every test session (each xdist worker) gets its own empty geodiff cache
folder, removed when the session ends."""

import atexit
import os
import shutil
import tempfile

import jax
import pytest

_CACHE = tempfile.mkdtemp(prefix="geodiff-test-cache-")
os.environ["GEODIFF_CACHE"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture
def key():
    return jax.random.key(0)


@pytest.fixture
def x64():
    """Run the test body with 64-bit JAX arrays (for checks against math at tight tolerances)."""
    with jax.enable_x64(True):
        yield
