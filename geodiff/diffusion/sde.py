"""The variance-preserving SDE (Song et al. 2021) and the time grids used with it (docs/priors.md).

    dx = −½ β(t) x dt + √β(t) dW,   β(t) = β_min + t (β_max − β_min),   t ∈ [0, 1]
    x_t = α_t x_0 + σ_t ε,   α_t = exp(−½ B(t)),   σ_t² = 1 − α_t²,   B(t) = ∫₀ᵗ β

The noise-to-signal ratio λ_t = σ_t / α_t = √(e^{B(t)} − 1) is monotone in t. The ELBO's
likelihood weighting g²/σ² dt equals d log λ², so the ELBO's importance distribution
(docs/priors.md, "The VPSDE and the time distribution") is *log-uniform in λ* and has a
closed-form inverse CDF.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class VPSDE:
    """Variance-preserving SDE with a linear β schedule.

    Args:
        beta_min: β(0) (> 0).
        beta_max: β(1) (> beta_min).
        t0: smallest time used for training, sampling and the ELBO (avoids the σ → 0 singularity).
    """

    beta_min: float = 0.1
    beta_max: float = 20.0
    t0: float = 1e-3

    def __post_init__(self):
        if not (0 < self.beta_min < self.beta_max):
            raise ValueError(f"need 0 < beta_min < beta_max, got {self.beta_min}, {self.beta_max}")
        if not (0 < self.t0 < 1):
            raise ValueError(f"t0 must be in (0, 1), got {self.t0}")

    def beta(self, t):
        """β(t) = g(t)², shape of t."""
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def int_beta(self, t):
        """B(t) = ∫₀ᵗ β(s) ds."""
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2

    def alpha(self, t):
        """Signal scale α_t = exp(−B(t)/2)."""
        return jnp.exp(-0.5 * self.int_beta(t))

    def sigma(self, t):
        """Noise std σ_t = √(1 − α_t²) (computed stably for small t)."""
        return jnp.sqrt(-jnp.expm1(-self.int_beta(t)))

    def noise_ratio(self, t):
        """λ_t = σ_t / α_t = √(e^{B(t)} − 1)."""
        return jnp.sqrt(jnp.expm1(self.int_beta(t)))

    def t_from_int_beta(self, b):
        """Inverse of B(t)."""
        a = 0.5 * (self.beta_max - self.beta_min)
        return (-self.beta_min + jnp.sqrt(self.beta_min**2 + 4 * a * b)) / (2 * a)

    def t_from_noise_ratio(self, lam):
        """Inverse of λ_t."""
        return self.t_from_int_beta(jnp.log1p(lam**2))

    def perturb(self, key, x, t):
        """Sample x_t = α_t x + σ_t ε.

        Args:
            key: PRNG key.
            x: (..., V, C) clean signals.
            t: (...,) times (broadcast against x's leading dims).

        Returns:
            (x_t, ε), both shaped like x.
        """
        eps = jax.random.normal(key, x.shape, x.dtype)
        t = jnp.asarray(t, x.dtype)[..., None, None]
        return self.alpha(t) * x + self.sigma(t) * eps, eps

    # -------------------------------------------------- likelihood-weighting time distribution
    def _log_lambda2_range(self):
        lo = jnp.log(jnp.expm1(self.int_beta(self.t0)))
        hi = jnp.log(jnp.expm1(self.int_beta(1.0)))
        return lo, hi

    def likelihood_weight_total(self):
        """Z = ∫_{t0}^{1} g(t)²/σ_t² dt = log λ_1² − log λ_{t0}²."""
        lo, hi = self._log_lambda2_range()
        return hi - lo

    def sample_likelihood_t(self, u):
        """Map u ∈ [0, 1] to t ∈ [t0, 1] with density ∝ g(t)²/σ_t² (log-uniform in λ)."""
        lo, hi = self._log_lambda2_range()
        log_lam2 = lo + u * (hi - lo)
        return self.t_from_int_beta(jnp.logaddexp(0.0, log_lam2))  # B = log(1 + λ²)

    def stratified_u(self, key, n: int, shape=()):
        """``n`` stratified uniforms per entry of ``shape``: (*shape, n), one in each [i/n, (i+1)/n)."""
        u = jax.random.uniform(key, (*shape, n))
        return (jnp.arange(n) + u) / n
