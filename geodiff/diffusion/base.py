"""The prior interface shared by analytic priors and the learned diffusion prior.

A prior defines p(x) over signals (V, C) on a manifold and, through the VPSDE, the perturbed
densities p_t. Subclasses implement :meth:`Prior.score`; this base class derives from it:
Tweedie denoising, the diffusion ELBO (docs/priors.md, "The ELBO"), ancestral reverse-SDE sampling
and the probability-flow ODE log-likelihood.

Dimension letters: V vertices, C channels, D = V·C, B batch (any leading dims), N samples.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from geodiff.diffusion.sde import VPSDE
from geodiff.manifolds import Manifold


def check_time(t, name: str = "t"):
    """Raise a clear error for concrete times outside [0, 1] or NaN; return t as an array."""
    t = jnp.asarray(t)
    if not isinstance(t, jax.core.Tracer):
        tn = np.asarray(t)
        if not np.all(np.isfinite(tn)) or np.any(tn < 0) or np.any(tn > 1):
            raise ValueError(f"{name} must be in [0, 1], got values in [{tn.min()}, {tn.max()}]")
    return t


class Prior:
    """Base class of priors on signals (V, C) of a manifold.

    Attributes:
        manifold: where the signals live.
        channels: C.
        sde: the VPSDE that defines the perturbed densities p_t.
    """

    def __init__(self, manifold: Manifold, *, channels: int = 1, sde: VPSDE | None = None):
        if not isinstance(manifold, Manifold):
            raise TypeError(f"manifold must be a geodiff Manifold, got {type(manifold).__name__}")
        if not isinstance(channels, (int, np.integer)) or channels < 1:
            raise ValueError(f"channels must be a positive integer, got {channels!r}")
        self.manifold = manifold
        self.channels = int(channels)
        self.sde = VPSDE() if sde is None else sde

    @property
    def event_shape(self) -> tuple[int, int]:
        return (self.manifold.n_vertices, self.channels)

    def check_x(self, x, name: str = "x"):
        """Validate (..., V, C) signals for this prior (shape, channels, NaN) and return them."""
        return self.manifold.check_signal(x, name, channels=self.channels)

    # ------------------------------------------------------------------- to implement
    def score(self, x, t):
        """∇ log p_t(x).

        Args:
            x: (..., V, C) perturbed signals x_t.
            t: scalar or (...,) times in [0, 1].

        Returns:
            (..., V, C).
        """
        raise NotImplementedError

    # ------------------------------------------------------------------- derived
    def denoise(self, x_t, t):
        """Tweedie's posterior mean E[x₀ | x_t] = (x_t + σ_t² ∇log p_t(x_t)) / α_t, (..., V, C)."""
        t = check_time(t)
        s = self.score(x_t, t)
        tt = jnp.asarray(t, s.dtype)[..., None, None]
        return (x_t + self.sde.sigma(tt) ** 2 * s) / self.sde.alpha(tt)

    def elbo(self, key, x, *, n_t: int = 1, control_variate: bool = False, antithetic: bool = False):
        """The diffusion evidence lower bound b(x) ≤ log p(x) (full bound, nats), shape (...,).

        Continuous-time bound of Kingma et al. 2021 (VDM) / Song et al. 2021 with the likelihood
        weighting, which in ε-form reads

            b(x) = −KL(N(α₁x, σ₁²I) ‖ N(0, I))                       (prior at t = 1)
                   − D/2 · (log 2πλ²_{t0} + 1)                      (Gaussian decoder at t0)
                   − ½ ∫_{t0}^{1} g²/σ² E_ε ‖ε̂(x_t, t) − ε‖² dt       (diffusion term)

        with ε̂ = −σ_t ∇log p_t. The integral is estimated by importance sampling t ∝ g²/σ²
        (log-uniform in λ = σ/α; docs/priors.md, "The VPSDE and the time distribution") with
        ``n_t`` *stratified* draws per signal, so the weight is the constant
        Z = log λ₁² − log λ²_{t0}. With ``control_variate`` the term ‖ε‖² is replaced by its
        expectation D (same mean and same x-gradient; off by default because it *raises* the
        variance where ε̂ ≈ ε: measured 2× for unit-variance and 10× for small-variance
        Gaussians). With ``antithetic`` the draws come in pairs (t, ε), (t, −ε) (``n_t`` even;
        n_t/2 strata in t): for a Gaussian prior the score is affine, so the part of the
        x-gradient that is linear in ε cancels exactly within each pair, which is what makes the
        bound usable as a training signal for samplers (docs/method.md, "What the first
        prototypes showed"). Differentiable w.r.t. x: gradients flow through the score into x.

        Args:
            key: PRNG key.
            x: (..., V, C) signals.
            n_t: (t, ε) draws per signal (≥ 1).
            control_variate: replace ‖ε‖² by D.
            antithetic: pair every ε with −ε at the same t (n_t must be even).

        Returns:
            (...,) lower bound on log p(x) in nats.
        """
        if not isinstance(n_t, (int, np.integer)) or n_t < 1:
            raise ValueError(f"n_t must be a positive integer, got {n_t!r}")
        x = self.check_x(x)
        sde = self.sde
        batch, (V, C) = x.shape[:-2], x.shape[-2:]
        D = V * C
        k_t, k_eps = jax.random.split(key)
        if antithetic:
            if n_t % 2:
                raise ValueError(f"antithetic draws need an even n_t, got {n_t}")
            u = sde.stratified_u(k_t, n_t // 2, batch)
            u = jnp.concatenate([u, u], axis=-1)                    # (..., n_t): pairs share t
        else:
            u = sde.stratified_u(k_t, n_t, batch)                   # (..., n_t)
        t = sde.sample_likelihood_t(u)
        xs = jnp.broadcast_to(x[..., None, :, :], (*batch, n_t, V, C))
        if antithetic:
            half = jax.random.normal(k_eps, (*batch, n_t // 2, V, C), x.dtype)
            eps = jnp.concatenate([half, -half], axis=-3)
            x_t = sde.alpha(t)[..., None, None] * xs + sde.sigma(t)[..., None, None] * eps
        else:
            x_t, eps = sde.perturb(k_eps, xs, t)
        sigma = sde.sigma(t)[..., None, None]
        eps_hat = -sigma * self.score(x_t, t)
        if control_variate:
            sq = jnp.sum(eps_hat**2 - 2 * eps_hat * eps, axis=(-2, -1)) + D
        else:
            sq = jnp.sum((eps_hat - eps) ** 2, axis=(-2, -1))
        diffusion = -0.5 * sde.likelihood_weight_total() * sq.mean(axis=-1)
        a1, s1 = sde.alpha(1.0), sde.sigma(1.0)
        prior_term = -0.5 * (a1**2 * jnp.sum(x**2, axis=(-2, -1)) + D * (s1**2 - 1 - 2 * jnp.log(s1)))
        lam0 = sde.noise_ratio(sde.t0)
        decoder = -0.5 * D * (jnp.log(2 * jnp.pi * lam0**2) + 1.0)
        return prior_term + decoder + diffusion

    def time_grid(self, steps: int, grid: str = "uniform"):
        """Decreasing times from 1 to t0, shape (steps + 1,).

        ``"uniform"`` is uniform in t (DDPM); ``"log_snr"`` is uniform in log λ, which spends
        more steps at the low noise levels where fine detail is decided.
        """
        sde = self.sde
        if grid == "uniform":
            return jnp.linspace(1.0, sde.t0, steps + 1)
        if grid == "log_snr":
            lo, hi = jnp.log(sde.noise_ratio(sde.t0)), jnp.log(sde.noise_ratio(1.0))
            return sde.t_from_noise_ratio(jnp.exp(jnp.linspace(hi, lo, steps + 1)))
        raise ValueError(f"grid must be 'uniform' or 'log_snr', got {grid!r}")

    def sample_sde(self, key, n: int, *, steps: int = 1000, grid: str = "uniform"):
        """Ancestral (DDPM-type) reverse-diffusion sampling with the prior's score.

        From x_1 ~ N(0, I), each step t → t' draws x_{t'} from q(x_{t'} | x_t, x̂₀) with x̂₀ the
        Tweedie estimate, down to t0; the result is the Tweedie estimate x̂₀ at t0. Substituting
        x̂₀ for x₀ drops its uncertainty, so variances come out slightly low: for an exact
        Gaussian prior with 300 uniform steps, 2.5% low overall and more along directions whose
        variance is below σ²_{t0} (tests/test_gaussian_priors.py measures it).

        Args:
            key: PRNG key.
            n: number of samples.
            steps: reverse steps (network evaluations).
            grid: time grid, see :meth:`time_grid`.

        Returns:
            (n, V, C) samples.
        """
        if not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        if not isinstance(steps, (int, np.integer)) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        ts = self.time_grid(int(steps), grid)
        k0, key = jax.random.split(key)
        x = jax.random.normal(k0, (n, *self.event_shape))
        return _ancestral(self, ts, x, key)

    def log_prob_ode(self, x, *, key=None, steps: int = 100, exact_trace: bool = False):
        """log p_{t0}(x) from the probability-flow ODE dx/dt = −½β(t)(x + ∇log p_t(x)).

        The ODE is integrated from t0 to 1 with RK4 on a grid uniform in log λ (the ODE is stiff
        near t0 where λ is small), together with the divergence,
        which is Hutchinson-estimated with one Rademacher probe per signal (needs ``key``), or
        computed exactly with ``exact_trace`` (cost ∝ D; small problems only). Then
        log p_{t0}(x) = log N(x₁; 0, I) + ∫_{t0}^{1} ∇·F dt.

        Args:
            x: (..., V, C) signals.
            key: PRNG key for the Hutchinson probes (required unless ``exact_trace``).
            steps: RK4 steps.
            exact_trace: exact divergence instead of Hutchinson.

        Returns:
            (...,) log-density in nats.
        """
        x = self.check_x(x)
        if key is None and not exact_trace:
            raise ValueError("key is required for the Hutchinson trace estimate (or exact_trace=True)")
        batch, event = x.shape[:-2], x.shape[-2:]
        flat = x.reshape(-1, *event)
        probes = (None if exact_trace else
                  jax.random.rademacher(key, flat.shape, dtype=flat.dtype))
        out = _pf_ode_logp(self, flat, probes, int(steps))
        return out.reshape(batch)


def _ancestral(prior: Prior, ts, x, key):
    sde = prior.sde

    def step(carry, i):
        x, key = carry
        t, t_next = ts[i], ts[i + 1]
        x0 = prior.denoise(x, t)
        a_t, a_n = sde.alpha(t), sde.alpha(t_next)
        s2_t, s2_n = sde.sigma(t) ** 2, sde.sigma(t_next) ** 2
        a = a_t / a_n
        b = 1 - a**2
        mean = (a_n * b / s2_t) * x0 + (a * s2_n / s2_t) * x
        std = jnp.sqrt(s2_n * b / s2_t)
        key, k = jax.random.split(key)
        return (mean + std * jax.random.normal(k, x.shape, x.dtype), key), None

    (x, _), _ = jax.lax.scan(step, (x, key), jnp.arange(len(ts) - 1))
    return prior.denoise(x, ts[-1])


def _pf_ode_logp(prior: Prior, x, probes, steps: int):
    sde = prior.sde
    D = math.prod(x.shape[1:])

    def drift(z, t):
        return -0.5 * sde.beta(t) * (z + prior.score(z, t))

    # Reverse mode only: the score network's ring mean defines a VJP, not a JVP
    # (geodiff.diffusion.network.ring_mean). The signals of the batch are independent, so one VJP
    # with a probe per signal gives each signal's εᵀJ.
    def div(z, t):
        if probes is None:
            f = lambda zz: drift(zz.reshape(z.shape[1:])[None], t)[0].reshape(-1)  # noqa: E731
            jac = jax.vmap(lambda zi: jax.jacrev(f)(zi.reshape(-1)))(z)
            return jnp.trace(jac, axis1=-2, axis2=-1)
        _, pull = jax.vjp(lambda zz: drift(zz, t), z)
        return jnp.sum(pull(probes)[0] * probes, axis=(-2, -1))

    def rhs(state, t):
        z, _ = state
        return drift(z, t), div(z, t)

    ts = prior.time_grid(steps, "log_snr")[::-1]  # t0 → 1, dense where the flow is stiff (small t)

    def step(state, i):
        t, h = ts[i], ts[i + 1] - ts[i]
        k1 = rhs(state, t)
        k2 = rhs(jax.tree_util.tree_map(lambda s, k: s + 0.5 * h * k, state, k1), t + 0.5 * h)
        k3 = rhs(jax.tree_util.tree_map(lambda s, k: s + 0.5 * h * k, state, k2), t + 0.5 * h)
        k4 = rhs(jax.tree_util.tree_map(lambda s, k: s + h * k, state, k3), t + h)
        new = jax.tree_util.tree_map(lambda s, a, b, c, d: s + h / 6 * (a + 2 * b + 2 * c + d),
                                     state, k1, k2, k3, k4)
        return new, None

    init = (x, jnp.zeros(x.shape[0], x.dtype))
    (z1, integral), _ = jax.lax.scan(step, init, jnp.arange(steps))
    log_pz = -0.5 * jnp.sum(z1**2, axis=(-2, -1)) - 0.5 * D * jnp.log(2 * jnp.pi)
    return log_pz + integral
