"""Chunked and sharded posterior sampling over long batches of measurements (archives).

A batch of B measurements is cut into chunks of a fixed size; the last chunk is padded by
repeating its last measurement, so one compiled program serves every chunk, and the padding is
dropped from the results. With several JAX devices each chunk is split across them along its
batch axis (``jax.sharding``). Each chunk's draws can be summarized inside the compiled program
(mean, std, quantiles), so memory is set by the chunk size, not by B.

Dimension letters: B measurements, b in a chunk, n samples, Q quantile levels, V vertices,
C channels.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


@dataclasses.dataclass(frozen=True)
class PosteriorChunk:
    """Summaries of the posterior draws of measurements ``start:stop`` of a batch.

    Attributes:
        start, stop: the measurements' indices in the batch.
        mean, std: (b, V, C) per-entry mean and std (ddof 1) of the draws; None for a plain
            draw (:meth:`AmortizedSampler.sample`).
        quantiles: (Q, b, V, C) per-entry quantiles, or None.
        samples: (n, b, V, C) the draws, or None.
    """

    start: int
    stop: int
    mean: object = None
    std: object = None
    quantiles: object = None
    samples: object = None

    @classmethod
    def of(cls, start: int, stop: int, out: dict) -> "PosteriorChunk":
        """From a compiled chunk's outputs ``out`` (batch axis padded to the chunk size): the
        rows of ``start:stop`` only."""
        k = stop - start
        cut = lambda a, ax: None if a is None else (                       # noqa: E731
            a if a.shape[ax] == k else jax.lax.slice_in_dim(a, 0, k, axis=ax))
        return cls(start, stop, cut(out.get("mean"), 0), cut(out.get("std"), 0),
                   cut(out.get("quantiles"), 1), cut(out.get("samples"), 1))

    def numpy(self) -> "PosteriorChunk":
        """The same chunk with NumPy arrays."""
        conv = lambda a: None if a is None else np.asarray(a)             # noqa: E731
        return dataclasses.replace(self, mean=conv(self.mean), std=conv(self.std),
                                   quantiles=conv(self.quantiles), samples=conv(self.samples))


def check_quantiles(quantiles) -> tuple:
    """Quantile levels as a sorted-as-given tuple of floats in (0, 1) (hashable: they are a
    static argument of the compiled summary)."""
    try:
        q = tuple(float(v) for v in np.asarray(quantiles, dtype=float).reshape(-1))
    except (TypeError, ValueError):
        raise TypeError(f"quantiles must be numbers in (0, 1), got {quantiles!r}") from None
    if not all(0 < v < 1 for v in q):
        raise ValueError(f"quantiles must lie in (0, 1), got {quantiles!r}")
    return q


def spans(n_items: int, size: int, start: int = 0) -> list[tuple[int, int]]:
    """``[(lo, hi), …]`` chunks of ``size`` covering ``start:n_items``."""
    return [(lo, min(lo + size, n_items)) for lo in range(start, n_items, size)]


def take(tree, lo: int, hi: int, size: int):
    """Rows ``lo:hi`` of every leaf of a batched pytree, padded to ``size`` rows by repeating
    row ``hi − 1`` (a valid measurement, so the padded rows compute something harmless).
    A whole batch (``lo`` = 0, every leaf ``size`` rows) is returned as ``tree`` itself, not a
    copy: a compiled call must not donate what this returns."""
    idx = np.minimum(np.arange(lo, lo + size), hi - 1)
    if hi - lo == size:
        if lo == 0 and all(a.shape[0] == size for a in jax.tree.leaves(tree)):
            return tree                                  # the whole batch: no copy, no dispatch
        return jax.tree.map(lambda a: jax.lax.slice_in_dim(a, lo, hi), tree)
    return jax.tree.map(lambda a: jnp.asarray(a)[idx], tree)


# where each output's batch axis is (summaries (b, …), quantiles and draws (·, b, …))
_OUT_SPECS = {"mean": PartitionSpec("batch"), "std": PartitionSpec("batch"),
              "quantiles": PartitionSpec(None, "batch"), "samples": PartitionSpec(None, "batch")}


def shard(tree, devices):
    """Place a batched pytree on ``devices``, split along axis 0 (unchanged for one device)."""
    if len(devices) == 1:
        return tree
    spec = NamedSharding(Mesh(np.asarray(devices), ("batch",)), PartitionSpec("batch"))
    return jax.tree.map(lambda a: jax.device_put(a, spec), tree)


def on_devices(impl, devices, static: tuple):
    """``jit`` of ``impl(params, frozen, m, key, first, **static) → {name: array}`` with the
    measurement batch split across ``devices`` (``shard_map``): each device runs ``impl`` on its
    rows with the offset ``first + device index · rows``, so every measurement keeps the draws of
    an unsharded call. The output names are those of :func:`summarize` (or ``samples``)."""
    mesh = Mesh(np.asarray(devices), ("batch",))
    rep = PartitionSpec()

    def run(params, frozen, m, key, first, **kw):
        def local(params, frozen, m, key, first):
            off = first + jax.lax.axis_index("batch") * m.y.shape[0]
            return impl(params, frozen, m, key, off, **kw)
        names = jax.eval_shape(lambda *a: impl(*a, **kw), params, frozen, m, key, first)
        return jax.shard_map(local, mesh=mesh, in_specs=(rep, rep, PartitionSpec("batch"), rep, rep),
                             out_specs={k: _OUT_SPECS[k] for k in names},
                             # no replication tracking: with it, jax.linear_transpose (the
                             # operators' adjoints) of a per-device mask sums the devices' rows
                             check_vma=False)(
            params, frozen, m, key, first)
    return jax.jit(run, static_argnames=static)


def summarize(x, quantiles: tuple, *, keep: bool) -> dict:
    """Per-entry summaries of draws x (n, b, V, C) (traceable): ``mean``, ``std`` (ddof 1,
    two-pass), ``quantiles`` (Q, b, V, C) with linear interpolation, and ``samples`` with
    ``keep``."""
    n = x.shape[0]
    mean = jnp.mean(x, axis=0)
    std = jnp.sqrt(jnp.sum((x - mean) ** 2, axis=0) / (n - 1))
    out = {"mean": mean, "std": std}
    if quantiles:
        out["quantiles"] = jnp.quantile(x, jnp.asarray(quantiles, x.dtype), axis=0)
    if keep:
        out["samples"] = x
    return out
