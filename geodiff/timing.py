"""Wall-clock timing for benchmarks: compile excluded, asynchronous dispatch waited for."""

from __future__ import annotations

import statistics
import time

import jax


def time_call(fn, *args, repeats: int = 3, warmup: int = 1, **kwargs) -> tuple[float, object]:
    """Median wall time of ``fn(*args, **kwargs)`` in seconds, after ``warmup`` untimed calls
    (which absorb JIT compilation). Every result is waited for with ``jax.block_until_ready``.

    Args:
        fn: the function to time.
        *args, **kwargs: its arguments.
        repeats: timed calls (≥ 1).
        warmup: untimed calls first (≥ 0).

    Returns:
        (median seconds, the last result).
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be ≥ 1 and warmup ≥ 0, got {repeats}, {warmup}")
    out = None
    for _ in range(warmup):
        out = jax.block_until_ready(fn(*args, **kwargs))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*args, **kwargs))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def machine_info() -> dict:
    """Where a benchmark ran: platform, CPU count and JAX devices (for result JSON files)."""
    import os
    import platform

    return {"platform": platform.platform(), "processor": platform.machine(),
            "cpu_count": os.cpu_count(), "jax_devices": [str(d) for d in jax.devices()]}


def versions() -> dict:
    """Versions of geodiff and its numerical stack (for result JSON files)."""
    import sys

    import numpy
    import scipy

    import geodiff

    return {"geodiff": geodiff.__version__, "jax": jax.__version__, "numpy": numpy.__version__,
            "scipy": scipy.__version__, "python": sys.version.split()[0]}


def write_json(path, result: dict) -> None:
    """Write a benchmark result as indented JSON, creating the folder."""
    import json
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
