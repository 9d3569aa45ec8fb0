"""Shared fixtures. Every test session (each xdist worker) gets its own empty geodiff cache
folder, removed when the session ends.

The workers of one run share a JAX compilation cache (a fresh folder per run, made by the
controlling process before it starts the workers, removed when the run ends): a program that
several tests compile with identical HLO (the same model at the same shapes) compiles once. A
cached executable is the compiled program itself, so results are the same bit for bit; only the
compile time of the repeats goes (tests/test_amortized.py: 174 s → 142 s on 2 cores).

XLA also compiles with most optimizations off (``jax_disable_most_optimizations``): the tests'
arrays are tiny, so compiling dominates (≈ 70% of a benchmark smoke run) and an unoptimized
program is the same computation (142 s → 106 s more). No test may depend on the summation order
an optimization picks; ``GEODIFF_TEST_XLA_OPT=1`` runs the suite with the optimizations on."""

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

if "GEODIFF_TEST_JAX_CACHE" not in os.environ:      # the controller (or a run without xdist)
    os.environ["GEODIFF_TEST_JAX_CACHE"] = tempfile.mkdtemp(prefix="geodiff-test-jaxcc-")
    atexit.register(shutil.rmtree, os.environ["GEODIFF_TEST_JAX_CACHE"], ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", os.environ["GEODIFF_TEST_JAX_CACHE"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
if os.environ.get("GEODIFF_TEST_XLA_OPT", "0") != "1":
    jax.config.update("jax_disable_most_optimizations", True)


@pytest.fixture
def key():
    return jax.random.key(0)


@pytest.fixture
def x64():
    """Run the test body with 64-bit JAX arrays (for checks against math at tight tolerances)."""
    with jax.enable_x64(True):
        yield
