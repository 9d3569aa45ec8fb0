"""Shared fixtures. Every test session gets its own empty geodiff cache folder."""

import os
import tempfile

import jax
import pytest

os.environ["GEODIFF_CACHE"] = tempfile.mkdtemp(prefix="geodiff-test-cache-")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture
def key():
    return jax.random.key(0)


@pytest.fixture
def x64():
    """Run the test body with 64-bit JAX arrays (for checks against math at tight tolerances)."""
    with jax.enable_x64(True):
        yield
