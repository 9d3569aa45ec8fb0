"""The per-measurement flow (Feng et al. 2023, "FlowPerY" in the tables): a flow trained on one
measurement only, with the same loss, base and couplings as the amortized sampler.

It is an :class:`~geodiff.AmortizedSampler` fitted to a single y (each step draws ``batch_size``
z for that y), so the comparison with APS isolates amortization: the same network, paid for once
per measurement instead of once per dataset.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from geodiff.amortized import AmortizedSampler
from geodiff.operators import Measurement


def flow_per_y(key, sampler: AmortizedSampler, measurement: Measurement, *, n: int = 1,
               steps: int = 500, batch_size: int = 64, **fit_kwargs):
    """Train ``sampler`` (typically untrained) on one measurement, then draw from it.

    Args:
        key: PRNG key.
        sampler: an :class:`AmortizedSampler` for the measurement's operator (not modified).
        measurement: one measurement (y (Vy, C), no batch dimension).
        n: samples to return (≥ 1).
        steps: optimizer steps on this measurement.
        batch_size: z draws per step.
        **fit_kwargs: passed to :meth:`AmortizedSampler.fit` (learning rate, progress, …).

    Returns:
        ``(samples (n, V, C), trained sampler, history)``.
    """
    if not isinstance(sampler, AmortizedSampler):
        raise TypeError(f"sampler must be an AmortizedSampler, got {type(sampler).__name__}")
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    sampler.check_measurement(measurement, batched=False)
    k_fit, k_draw = jax.random.split(key)
    copies = jax.tree.map(lambda a: jnp.broadcast_to(jnp.asarray(a)[None],
                                                     (batch_size, *jnp.shape(a))), measurement)
    trained, history = sampler.fit(k_fit, copies, steps=steps, batch_size=batch_size, **fit_kwargs)
    return trained.sample(k_draw, measurement, n), trained, history
