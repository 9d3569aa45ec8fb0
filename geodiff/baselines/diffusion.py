"""Diffusion-based baselines: DPS, MCG and Noise2Score (docs/concepts.md, "Diffusion baselines").

All accept any prior with the prior interface (``GaussianPrior``, ``GaussianMixturePrior``,
``DiffusionPrior``) and operators from :mod:`geodiff.operators`. Step sizes ζ are in the units of
the normalized data ([0, 1] range), applied to the gradient of the *non-squared* residual norm
‖y − A(x̂₀(x_t))‖, as in the official DPS code.

Dimension letters: n samples per measurement, B measurements (any leading dims), V vertices,
C channels.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from geodiff.diffusion.base import Prior
from geodiff.operators import Denoise, Mask, Measurement, Operator


def _check(prior, operator, measurement, *, n=1, steps=1, zeta=1.0):
    if not isinstance(prior, Prior):
        raise TypeError(f"prior must be a geodiff prior, got {type(prior).__name__}")
    if not isinstance(operator, Operator):
        raise TypeError(f"operator must be a geodiff operator, got {type(operator).__name__}")
    if not isinstance(measurement, Measurement):
        raise TypeError(f"measurement must be a Measurement, got {type(measurement).__name__}")
    if operator.manifold is not None and operator.manifold.n_vertices != prior.manifold.n_vertices:
        raise ValueError(f"operator is bound to {operator.manifold!r} but the prior lives on "
                         f"{prior.manifold!r}")
    if operator.manifold is None:
        operator = operator.on(prior.manifold)
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not (isinstance(zeta, (int, float, np.floating)) and zeta > 0):
        raise ValueError(f"zeta must be a positive step size (normalized data units), got {zeta!r}")
    operator._check_measurement(measurement)
    y = np.asarray(measurement.y)
    if not np.all(np.isfinite(y)):
        raise ValueError("measurement.y contains NaN or infinite values")
    return operator


def _posterior_chain(prior: Prior, operator: Operator, m: Measurement, key, ts, zeta: float,
                     n: int, mcg: bool):
    """n samples for one measurement m (unbatched). Returns (n, V, C)."""
    sde = prior.sde
    k0, key = jax.random.split(key)
    x = jax.random.normal(k0, (n, *prior.event_shape))
    mask = jnp.broadcast_to(m.mask, m.y.shape)[None]

    def residual(x, t):
        x0 = prior.denoise(x, t)
        r = m.y[None] - operator.forward(x0, m)
        norms = jnp.sqrt(jnp.sum(r**2, axis=(-2, -1)) + 1e-20)
        return jnp.sum(norms), x0

    def step(carry, i):
        x, key = carry
        t, t_next = ts[i], ts[i + 1]
        (_, x0), grad = jax.value_and_grad(residual, has_aux=True)(x, t)
        a_t, a_n = sde.alpha(t), sde.alpha(t_next)
        s2_t, s2_n = sde.sigma(t) ** 2, sde.sigma(t_next) ** 2
        a = a_t / a_n
        b = 1 - a**2
        mean = (a_n * b / s2_t) * x0 + (a * s2_n / s2_t) * x
        key, k1, k2 = jax.random.split(key, 3)
        x_new = mean + jnp.sqrt(s2_n * b / s2_t) * jax.random.normal(k1, x.shape)
        if mcg:  # gradient on unknown entries only, then known entries ← measurement noised to t'
            x_new = x_new - zeta * jnp.where(mask, 0.0, grad)
            y_t = a_n * m.y[None] + jnp.sqrt(s2_n) * jax.random.normal(k2, x.shape)
            x_new = jnp.where(mask, y_t, x_new)
        else:
            x_new = x_new - zeta * grad
        return (x_new, key), None

    (x, _), _ = jax.lax.scan(step, (x, key), jnp.arange(len(ts) - 1))
    x0 = prior.denoise(x, ts[-1])
    return jnp.where(mask, m.y[None], x0) if mcg else x0


@functools.partial(jax.jit, static_argnums=(0, 1, 6, 7, 8))
def _run(prior, operator, measurement, key, ts, zeta, n, mcg, batch_ndim):
    # ζ is traced, not static: tuning over several ζ compiles the chain once
    flat = jax.tree_util.tree_map(lambda a: a.reshape(-1, *a.shape[batch_ndim:]), measurement)
    keys = jax.random.split(key, flat.y.shape[0])
    out = jax.vmap(lambda m, k: _posterior_chain(prior, operator, m, k, ts, zeta, n, mcg))(flat, keys)
    return out  # (B, n, V, C)


def _sample(key, prior, operator, measurement, n, steps, zeta, grid, mcg):
    batch = measurement.batch_shape
    ts = prior.time_grid(int(steps), grid)
    out = _run(prior, operator, measurement, key, ts, jnp.float32(zeta), int(n), mcg, len(batch))
    out = jnp.moveaxis(out, 1, 0)  # (n, B, V, C)
    return out.reshape(int(n), *batch, *out.shape[-2:])


def dps(key, prior: Prior, operator: Operator, measurement: Measurement, *, n: int = 1,
        steps: int = 1000, zeta: float, grid: str = "uniform"):
    """Diffusion posterior sampling (Chung et al. 2023).

    Ancestral reverse diffusion with, after each step, x ← x − ζ ∇_{x_t} ‖y − A(x̂₀(x_t))‖
    (x̂₀ by Tweedie; non-squared norm). Official ζ: 0.3 SR/deblur, 0.5 inpainting, 1.0 phase
    retrieval, for data in [−1, 1]; here data are in [0, 1]: tune ζ with :func:`tune_zeta`.

    Args:
        key: PRNG key.
        prior: any prior (score + Tweedie).
        operator: any operator (linear or not; differentiable).
        measurement: one measurement (V, C) or a batch (..., V, C).
        n: samples per measurement.
        steps: reverse steps (network evaluations per sample).
        zeta: step size (> 0), normalized data units.
        grid: time grid, "uniform" (DDPM) or "log_snr".

    Returns:
        (n, V, C) for one measurement, (n, ..., V, C) for a batch.
    """
    operator = _check(prior, operator, measurement, n=n, steps=steps, zeta=zeta)
    return _sample(key, prior, operator, measurement, n, steps, zeta, grid, mcg=False)


def mcg(key, prior: Prior, operator: Operator, measurement: Measurement, *, n: int = 1,
        steps: int = 1000, zeta: float, grid: str = "uniform"):
    """Manifold-constrained gradients (Chung et al. 2022), for masking operators.

    Like :func:`dps`, but the gradient step acts on unknown entries only, after which the known
    entries are replaced by the measurement noised to the next level, α_{t'} y + σ_{t'} ε. The
    returned samples equal y on observed entries.

    Args: as :func:`dps` (``operator`` must be a :class:`~geodiff.operators.Mask`, e.g. a
    :class:`~geodiff.operators.RandomMask`).

    Returns:
        (n, V, C) or (n, ..., V, C).
    """
    if not isinstance(operator, Mask):   # RandomMask is a Mask
        raise ValueError(f"mcg needs a masking operator (Mask or RandomMask), got {type(operator).__name__}")
    operator = _check(prior, operator, measurement, n=n, steps=steps, zeta=zeta)
    return _sample(key, prior, operator, measurement, n, steps, zeta, grid, mcg=True)


def noise2score(prior: Prior, operator: Operator, measurement: Measurement):
    """Noise2Score (Kim & Ye 2021): one-step Tweedie denoising for y = x + N(0, σ²).

    With the VPSDE, α_{t*} y is distributed like x_{t*} at the t* with σ_{t*}/α_{t*} = σ, so
    x̂ = E[x | y] = y + α_{t*} σ² ∇log p_{t*}(α_{t*} y) — the exact posterior mean for an exact
    score.

    Args:
        prior: any prior.
        operator: a :class:`~geodiff.operators.Denoise` with σ > 0.
        measurement: (V, C) or (..., V, C).

    Returns:
        (V, C) or (..., V, C).
    """
    if not isinstance(operator, Denoise):
        raise ValueError(f"noise2score is for denoising (Denoise), got {type(operator).__name__}")
    if operator.sigma <= 0:
        raise ValueError("noise2score needs sigma > 0")
    _check(prior, operator, measurement)
    sde = prior.sde
    t = float(sde.t_from_noise_ratio(operator.sigma))
    if not sde.t0 <= t <= 1:
        raise ValueError(f"sigma = {operator.sigma} is outside the prior's noise range")
    return prior.denoise(sde.alpha(t) * jnp.asarray(measurement.y), t)


def tune_zeta(key, prior: Prior, operator: Operator, measurement: Measurement, truth, *,
              zetas=(0.1, 0.3, 1.0, 3.0), steps: int = 1000, method=dps, metric=None):
    """Pick ζ on a validation split: run ``method`` with each ζ, score the samples against the
    ground truth (mean PSNR by default), return the best.

    Args:
        key: PRNG key (the same key for every ζ, so the comparison is paired).
        prior: as in :func:`dps`.
        operator: as in :func:`dps`.
        measurement: a batch of validation measurements (B, V, C).
        truth: (B, V, C) their clean signals.
        zetas: candidates.
        steps: reverse steps.
        method: :func:`dps` or :func:`mcg`.
        metric: ``metric(samples (B, V, C), truth) -> (B,)``, higher is better (default PSNR).

    Returns:
        (best ζ, {ζ: score}).
    """
    from geodiff.metrics import psnr

    metric = metric or (lambda x, ref: psnr(x, ref))
    scores = {}
    for z in zetas:
        x = method(key, prior, operator, measurement, n=1, steps=steps, zeta=float(z))[0]
        scores[float(z)] = float(np.mean(metric(np.asarray(x), np.asarray(truth))))
    best = max(scores, key=lambda z: scores[z] if np.isfinite(scores[z]) else -np.inf)
    return best, scores
