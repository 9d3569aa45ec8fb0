"""Analytic priors: an exact Gaussian prior and a mixture of them (docs/priors.md; docs/method.md).

They serve as ground truth. Their perturbed densities p_t of the VPSDE (docs/priors.md, "The VPSDE and the time distribution") are known in
closed form, so the score, log p_t, samples, and the posterior under any linear-Gaussian
measurement (docs/concepts.md, "Operators and units") are exact. This lets us test everything a diffusion prior feeds:
Tweedie denoising, the ELBO (docs/priors.md, "The ELBO": b(x) ≤ log p(x) and close), the ancestral sampler, the
probability-flow ODE, and the posterior samplers (DPS, MCG, APS).

Each channel is independent, and all channels share one covariance over vertices:

    x[:, c] ~ N(μ[:, c], Σ),   Σ = U diag(d) Uᵀ + ν I,

where U (V, K) has Euclidean-orthonormal columns, d ≥ 0, and ν > 0 is the nugget. The perturbed
density p_t = N(α_t μ, α_t² Σ + σ_t² I) is then diagonal in the basis U ⊕ span(U)^⊥. Along u_k its
variance is α_t² d_k + s_t, and on the complement it is s_t = α_t² ν + σ_t². So every
density-level quantity costs O(V K). Posteriors under masks and denoising use the Woodbury
identity, which gives fixed shapes and O(V K²) per measurement. Other linear operators are solved
densely (small D only).

Units: signals and σ are in normalized data units; log-densities are in nats, summed over
vertices and channels (Euclidean, not mass-weighted, as for the measurement likelihood).

Dimension letters: B batch (any leading dims), V vertices, C channels, D = V·C, K basis vectors,
Vy measured entries per channel, N samples, M mixture components.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np

from geodiff.diffusion.base import Prior, check_time
from geodiff.diffusion.sde import VPSDE
from geodiff.manifolds import Manifold
from geodiff.operators import Denoise, LinearOperator, Mask, Measurement

_LOG_2PI = math.log(2 * math.pi)


def _float_dtype(*arrays):
    return jnp.result_type(*arrays, jnp.float32)


def _check_positive_int(value, name: str) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_positive_number(value, name: str, what: str = "") -> float:
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0{what}, got {value!r}")
    return float(value)


# ------------------------------------------------------------------------ pure kernels
def _spectrum(sde: VPSDE, d, nu, t):
    """Variances of p_t in the basis: α (...,), s (...,) on the complement, s_k (..., K) along U."""
    a = sde.alpha(t)
    s = a**2 * nu + sde.sigma(t) ** 2
    return a, s, a[..., None] ** 2 * d + s[..., None]


def _project(U, mu, x, a):
    """Residual r = x − α μ split into coefficients c = Uᵀ r (..., K, C) and r⊥ = r − U c."""
    r = x - a[..., None, None] * mu
    c = jnp.einsum("vk,...vc->...kc", U, r)
    return c, r - jnp.einsum("vk,...kc->...vc", U, c)


@functools.partial(jax.jit, static_argnums=0)
def _score_kernel(sde, mu, U, d, nu, x, t):
    a, s, sk = _spectrum(sde, d, nu, t)
    c, rp = _project(U, mu, x, a)
    return -(rp / s[..., None, None] + jnp.einsum("vk,...kc->...vc", U, c / sk[..., :, None]))


@functools.partial(jax.jit, static_argnums=0)
def _log_prob_kernel(sde, mu, U, d, nu, x, t):
    V, C = mu.shape
    K = U.shape[1]
    a, s, sk = _spectrum(sde, d, nu, t)
    c, rp = _project(U, mu, x, a)
    quad = jnp.sum(rp**2, axis=(-2, -1)) / s + jnp.sum(c**2 / sk[..., :, None], axis=(-2, -1))
    logdet = C * (jnp.sum(jnp.log(sk), axis=-1) + (V - K) * jnp.log(s))
    return -0.5 * (quad + logdet + V * C * _LOG_2PI)


def _selection_one(mu, U, d, nu, s2, y, mask, xs, ns):
    """Exact posterior for A = a selection of entries (mask), one measurement.

    Write x = μ + F z + √ν e with F = U diag(√d), z ~ N(0, I_K), e ~ N(0, I_V). Observed entries
    see y = x + n, so z | y ~ N(m_z, S⁻¹) with S = I + Fᵀ W F and W = diag(mask)/τ, τ = ν + σ².
    Given z, each observed e_v has its own closed-form posterior. Then

        E[x | y] = μ + a ⊙ F m_z + (ν/τ) mask ⊙ (y − μ),    a = 1 − mask·ν/τ,
        Var[x_v | y] = a_v² (F S⁻¹ Fᵀ)_vv + ν a_v,

    a sum of non-negative terms (no cancellation; σ = 0 works). The evidence uses
    rᵀ(F_o F_oᵀ + τ I)⁻¹ r = ‖r − F_o m_z‖²/τ + ‖m_z‖² and det = τ^{n_o} det S. Samples follow
    Matheron's rule, x_post = x_prior + G (y − A x_prior − n), where G is the same linear map
    as the mean.

    Args: y (V, C), mask (V, 1), xs (N, V, C) prior draws, ns (N, V, C) unit-noise draws.
    Returns: mean (V, C), std (V, C), log evidence (), samples (N, V, C).
    """
    V, C = mu.shape
    K = U.shape[1]
    F = U * jnp.sqrt(d)
    tau = nu + s2
    m = mask.astype(mu.dtype)                                    # (V, 1)
    w = m[:, 0] / tau
    S = jnp.eye(K, dtype=mu.dtype) + (F.T * w) @ F
    L = jnp.linalg.cholesky(S)
    a = 1.0 - m * (nu / tau)

    def gain(r):  # r (..., V, C), zero where unobserved
        b = jnp.einsum("vk,...vc->...kc", F * w[:, None], r)
        mz = jsl.cho_solve((L, True), b) if b.ndim == 2 else jax.vmap(
            lambda bb: jsl.cho_solve((L, True), bb))(b)
        return a * jnp.einsum("vk,...kc->...vc", F, mz) + (nu / tau) * m * r, mz

    r = m * (y - mu)
    dmean, mz = gain(r)
    mean = mu + dmean
    lf = jsl.solve_triangular(L, F.T, lower=True)                # (K, V)
    var = a[:, 0] ** 2 * jnp.sum(lf**2, axis=0) + nu * a[:, 0]
    std = jnp.broadcast_to(jnp.sqrt(jnp.maximum(var, 0.0))[:, None], (V, C))
    n_obs = jnp.sum(m)
    resid = m * (r - F @ mz)
    quad = jnp.sum(resid**2) / tau + jnp.sum(mz**2)
    logdet = n_obs * jnp.log(tau) + 2 * jnp.sum(jnp.log(jnp.diag(L)))
    logev = -0.5 * quad - 0.5 * C * (logdet + n_obs * _LOG_2PI)
    samples = xs + gain(m * (y - xs - jnp.sqrt(s2) * ns))[0]
    return mean, std, logev, samples


@jax.jit
def _selection_kernel(mu, U, d, nu, s2, y, mask, xs, ns):
    return jax.vmap(_selection_one, in_axes=(None,) * 5 + (0, 0, 1, 1),
                    out_axes=(0, 0, 0, 1))(mu, U, d, nu, s2, y, mask, xs, ns)


@functools.partial(jax.jit, static_argnums=0)
def _dense_kernel(operator, mu, U, d, nu, measurements, xs, ns):
    """Exact posterior for a general linear A, materialized densely (small D only).

    Unobserved measurement rows are zero rows of A, and they get unit noise. This keeps shapes
    fixed without changing the result. The posterior covariance uses the Joseph form
    (I − GA) Σ (I − GA)ᵀ + σ² G Gᵀ, a sum of PSD terms, with gain G = Σ Aᵀ (A Σ Aᵀ + σ² I)⁻¹.
    """
    V, C = mu.shape
    D = V * C
    s2 = operator.sigma**2
    cv = (U * d) @ U.T + nu * jnp.eye(V, dtype=mu.dtype)
    sigma = jnp.kron(cv, jnp.eye(C, dtype=mu.dtype))             # (D, D), row-major (V, C)
    l_sigma = jnp.kron(jnp.linalg.cholesky(cv), jnp.eye(C, dtype=mu.dtype))
    eye = jnp.eye(D, dtype=mu.dtype).reshape(D, V, C)

    def one(m, x_prior, noise):
        A = operator.forward(eye, m).reshape(D, -1).T            # (Dy, D)
        obs = jnp.broadcast_to(m.mask, m.y.shape).reshape(-1)
        kmat = A @ sigma @ A.T + jnp.diag(jnp.where(obs, s2, 1.0).astype(mu.dtype))
        lk = jnp.linalg.cholesky(kmat)
        G = jsl.cho_solve((lk, True), A @ sigma).T               # (D, Dy)
        r = jnp.where(obs, (m.y - operator.forward(mu, m)).reshape(-1), 0.0)
        mean = mu + (G @ r).reshape(V, C)
        joseph = (jnp.eye(D, dtype=mu.dtype) - G @ A) @ l_sigma
        var = jnp.sum(joseph**2, axis=1) + s2 * jnp.sum(jnp.where(obs, G**2, 0.0), axis=1)
        std = jnp.sqrt(jnp.maximum(var, 0.0)).reshape(V, C)
        white = jsl.solve_triangular(lk, r, lower=True)
        n_obs = jnp.sum(obs)
        logev = -0.5 * (white @ white + 2 * jnp.sum(jnp.log(jnp.diag(lk))) + n_obs * _LOG_2PI)
        ax = (x_prior.reshape(-1, D) @ A.T)                      # (N, Dy)
        ry = jnp.where(obs, m.y.reshape(-1) - ax - math.sqrt(s2) * noise.reshape(ax.shape), 0.0)
        samples = x_prior + (ry @ G.T).reshape(x_prior.shape)
        return mean, std, logev, samples

    return jax.vmap(one, in_axes=(0, 1, 1), out_axes=(0, 0, 0, 1))(measurements, xs, ns)


@functools.partial(jax.jit, static_argnums=(5, 6))
def _draw(key, mu, U, d, nu, n: int, noise_shape: tuple = (0,)):
    """n exact draws μ + U diag(√d) z + √ν e, (n, V, C), and standard normal noise of
    ``noise_shape`` (one ``normal`` call, which halves the compile time of two)."""
    V, C = mu.shape
    K = U.shape[1]
    nz, nx = n * K * C, n * (K + V) * C
    eps = jax.random.normal(key, (nx + math.prod(noise_shape),), mu.dtype)
    z = eps[:nz].reshape(n, K, C) * jnp.sqrt(d)[:, None]
    x = mu + jnp.einsum("vk,nkc->nvc", U, z) + jnp.sqrt(nu) * eps[nz:nx].reshape(n, V, C)
    return x, eps[nx:].reshape(noise_shape)


def _is_selection(operator) -> bool:
    """True when A selects entries (Denoise, Mask, RandomMask), so the Woodbury kernel applies."""
    return isinstance(operator, (Denoise, Mask))


# ---------------------------------------------------------------------------- priors
class GaussianPrior(Prior):
    """An exact Gaussian prior N(μ, Σ ⊗ I_C) with Σ = U diag(d) Uᵀ + ν I (docs/priors.md).

    Each channel is independent with the same covariance Σ over vertices. The VPSDE marginals
    p_t = N(α_t μ, α_t² Σ + σ_t² I) (docs/priors.md) are exact, and so is everything derived from
    them: the score, log p_t, samples, and posteriors under linear-Gaussian measurements. Use it
    as ground truth for the learned prior's machinery and for the posterior samplers.

    Args:
        manifold: where the signals live (V = ``manifold.n_vertices``).
        mean: μ, a scalar or (V, C), normalized data units.
        basis: U, (V, K) with Euclidean-orthonormal columns (UᵀU = I within 1e-4), K ≤ V.
        variances: d, (K,) ≥ 0, the variance added along each column of U (data units²).
        nugget: ν > 0, white variance on every vertex (keeps Σ positive definite).
        channels: C.
        sde: the VPSDE that defines p_t (default ``VPSDE()``).

    Attributes:
        mean: (V, C) jnp array.
        basis: (V, K) jnp array.
        variances: (K,) jnp array.
        nugget: () jnp array.

    Raises:
        ValueError: a wrong shape or value, with the argument named.
    """

    def __init__(self, manifold: Manifold, mean, basis, variances, nugget, *, channels: int = 1,
                 sde: VPSDE | None = None):
        super().__init__(manifold, channels=channels, sde=sde)
        V, C = self.event_shape
        dtype = jnp.result_type(float)
        mean_np = np.asarray(mean, dtype=np.float64)
        if mean_np.ndim == 0:
            mean_np = np.full((V, C), float(mean_np))
        if mean_np.shape != (V, C):
            raise ValueError(f"mean must be a scalar or have shape (V, C) = ({V}, {C}) "
                             f"(channels={C}), got shape {mean_np.shape}")
        if not np.all(np.isfinite(mean_np)):
            raise ValueError("mean contains NaN or infinite values")
        u = np.asarray(basis, dtype=np.float64)
        if u.ndim != 2 or u.shape[0] != V or u.shape[1] > V:
            raise ValueError(f"basis must have shape (V, K) = ({V}, K) with K ≤ {V}, got {u.shape}")
        if not np.all(np.isfinite(u)):
            raise ValueError("basis contains NaN or infinite values")
        K = u.shape[1]
        err = float(np.abs(u.T @ u - np.eye(K)).max()) if K else 0.0
        if err > 1e-4:
            raise ValueError(f"basis must have Euclidean-orthonormal columns (UᵀU = I), but "
                             f"max |UᵀU − I| = {err:.3g}")
        dv = np.asarray(variances, dtype=np.float64)
        if dv.shape != (K,):
            raise ValueError(f"variances must have shape (K,) = ({K},) to match basis, got {dv.shape}")
        if not np.all(np.isfinite(dv)) or np.any(dv < 0):
            raise ValueError("variances must be finite and ≥ 0")
        if np.ndim(nugget) != 0:
            raise ValueError(f"nugget must be a scalar, got shape {np.shape(nugget)}")
        nug = _check_positive_number(float(nugget), "nugget", " (white variance, data units²)")
        self.mean = jnp.asarray(mean_np, dtype)
        self.basis = jnp.asarray(u, dtype)
        self.variances = jnp.asarray(dv, dtype)
        self.nugget = jnp.asarray(nug, dtype)

    def __repr__(self) -> str:
        return (f"GaussianPrior({self.manifold!r}, K={self.basis.shape[1]}, "
                f"channels={self.channels}, nugget={float(self.nugget):.3g})")

    # ------------------------------------------------------------------ constructors
    @classmethod
    def matern(cls, manifold: Manifold, *, variance: float, length_scale: float,
               smoothness: float = 2.0, mean=0.0, n_modes: int | None = None,
               nugget: float = 1e-4, channels: int = 1, sde: VPSDE | None = None) -> "GaussianPrior":
        """A Matérn-like prior with a Laplace–Beltrami spectrum.

        The covariance is Φ diag(c) Φᵀ + ν I with (λ_k, φ_k) = ``manifold.eigenpairs(K)`` and
        c_k ∝ (1 + ℓ² λ_k)^(−smoothness). It is scaled so that the mean pointwise variance of
        Φ diag(c) Φᵀ over the (valid) vertices equals ``variance``; the nugget comes on top. The
        eigenvectors are M-orthonormal, not Euclidean, so the Euclidean form uses a thin SVD:
        Φ diag(√c) = U S Wᵀ, d = S².

        Args:
            manifold: the manifold.
            variance: mean pointwise variance of the smooth part (data units², > 0).
            length_scale: ℓ, in the manifold's length units (unit square, unit sphere), > 0.
            smoothness: the spectral exponent (> 0); larger gives smoother samples.
            mean: a scalar or (V, C).
            n_modes: K, number of eigenpairs (default min(256, manifold.max_eigenpairs)).
            nugget: ν > 0.
            channels: C.
            sde: the VPSDE.

        Returns:
            A :class:`GaussianPrior`.
        """
        variance = _check_positive_number(variance, "variance", " (data units²)")
        length_scale = _check_positive_number(length_scale, "length_scale",
                                              " (manifold length units)")
        smoothness = _check_positive_number(smoothness, "smoothness")
        kmax = manifold.max_eigenpairs if isinstance(manifold, Manifold) else None
        if kmax is None:
            raise TypeError(f"manifold must be a geodiff Manifold, got {type(manifold).__name__}")
        if n_modes is None:
            n_modes = min(256, kmax)
        if not isinstance(n_modes, (int, np.integer)) or not 1 <= n_modes <= kmax:
            raise ValueError(f"n_modes must be an integer in [1, {kmax}] for {manifold!r}, "
                             f"got {n_modes!r}")
        evals, evecs = manifold.eigenpairs(int(n_modes))
        evals = np.maximum(np.asarray(evals, np.float64), 0.0)  # the constant mode may be −1e-12
        spec = (1.0 + length_scale**2 * evals) ** (-smoothness)
        valid = np.asarray(manifold.valid)
        pointwise = (evecs[valid] ** 2) @ spec
        spec = spec * (variance / pointwise.mean())
        u, s, _ = np.linalg.svd(evecs * np.sqrt(spec), full_matrices=False)
        return cls(manifold, mean, u, s**2, nugget, channels=channels, sde=sde)

    # ------------------------------------------------------------------------ helpers
    def _params(self):
        return self.mean, self.basis, self.variances, self.nugget

    def _prep(self, x, t=None):
        x = self.check_x(x)
        dtype = _float_dtype(x, self.mean)
        x = jnp.asarray(x, dtype)
        params = tuple(jnp.asarray(p, dtype) for p in self._params())
        if t is None:
            return x, params
        t = jnp.asarray(check_time(t), dtype)
        return x, params, t

    def covariance(self):
        """The dense per-channel covariance Σ = U diag(d) Uᵀ + ν I, (V, V). Small V only."""
        U = self.basis
        return (U * self.variances) @ U.T + self.nugget * jnp.eye(U.shape[0], dtype=U.dtype)

    def marginal_std(self):
        """Pointwise prior standard deviation √Σ_vv, (V, C)."""
        var = jnp.sum(self.basis**2 * self.variances, axis=1) + self.nugget
        return jnp.broadcast_to(jnp.sqrt(var)[:, None], self.event_shape)

    # ---------------------------------------------------------------- density level
    def score(self, x, t):
        """Exact ∇ₓ log p_t(x) = −(α_t² Σ + σ_t² I)⁻¹ (x − α_t μ) (docs/priors.md).

        Args:
            x: (..., V, C) perturbed signals x_t.
            t: scalar or (...,) times in [0, 1], broadcast against x's leading dims.

        Returns:
            (..., V, C), in 1/data units.
        """
        x, (mu, U, d, nu), t = self._prep(x, t)
        return _score_kernel(self.sde, mu, U, d, nu, x, t)

    def log_prob_t(self, x, t):
        """Exact log p_t(x), p_t = N(α_t μ, α_t² Σ + σ_t² I) per channel, in nats.

        Args:
            x: (..., V, C).
            t: scalar or (...,) in [0, 1] (broadcast against x's leading dims).

        Returns:
            (...,) summed over vertices and channels.
        """
        x, (mu, U, d, nu), t = self._prep(x, t)
        return _log_prob_kernel(self.sde, mu, U, d, nu, x, t)

    def log_prob(self, x, *, key=None):
        """Exact log N(x; μ, Σ) summed over vertices and channels, (...,) nats.

        ``key`` is accepted for interface compatibility with the diffusion prior and ignored.
        """
        return self.log_prob_t(x, 0.0)

    def sample(self, key, n: int):
        """Exact samples μ + U diag(√d) z + √ν e, shape (n, V, C)."""
        n = _check_positive_int(n, "n")
        return _draw(key, *self._params(), n)[0]

    # -------------------------------------------------------------------- posterior
    def _check_problem(self, operator, measurement):
        if not isinstance(operator, LinearOperator):
            raise TypeError(f"operator must be a geodiff LinearOperator for an exact Gaussian "
                            f"posterior, got {type(operator).__name__}")
        if not isinstance(measurement, Measurement):
            raise TypeError(f"measurement must be a geodiff.operators.Measurement, got "
                            f"{type(measurement).__name__}")
        V, C = self.event_shape
        if operator.manifold is not None and operator.manifold.n_vertices != V:
            raise ValueError(f"operator is bound to {operator.manifold!r} with "
                             f"{operator.manifold.n_vertices} vertices, but the prior has V = {V}")
        y = measurement.y
        if getattr(y, "ndim", 0) < 2 or y.shape[-1] != C:
            raise ValueError(f"measurement.y must have shape (..., Vy, {C}) for this prior's "
                             f"{C} channel(s), got {getattr(y, 'shape', None)}")
        if tuple(measurement.mask.shape) != tuple(y.shape[:-1]) + (1,):
            raise ValueError(f"measurement.mask must have shape {tuple(y.shape[:-1]) + (1,)}, "
                             f"got {tuple(measurement.mask.shape)}")
        if _is_selection(operator) and y.shape[-2] != V:
            raise ValueError(f"measurement.y must have shape (..., {V}, {C}) for "
                             f"{type(operator).__name__}, got {tuple(y.shape)}")
        if not isinstance(y, jax.core.Tracer) and not bool(np.all(np.isfinite(np.asarray(y)))):
            raise ValueError("measurement.y contains NaN or infinite values")

    def _solve(self, operator, measurement, key=None, n: int = 0):
        """Mean, std, log evidence and (n) Matheron samples for a batch of measurements.

        Returns:
            mean (..., V, C), std (..., V, C), logev (...,), samples (n, ..., V, C).
        """
        self._check_problem(operator, measurement)
        V, C = self.event_shape
        batch = measurement.batch_shape
        nb = int(np.prod(batch)) if batch else 1
        dtype = _float_dtype(measurement.y, self.mean)
        mu, U, d, nu = (jnp.asarray(p, dtype) for p in self._params())
        flat = jax.tree_util.tree_map(lambda a: jnp.reshape(a, (nb, *a.shape[len(batch):])),
                                      measurement)
        y = jnp.asarray(flat.y, dtype)
        if n:
            xs, ns = _draw(key, mu, U, d, nu, n * nb, (n, *y.shape))
            xs = xs.reshape(n, nb, V, C)
        else:
            xs = jnp.zeros((0, nb, V, C), dtype)
            ns = jnp.zeros((0, *y.shape), dtype)
        if _is_selection(operator):
            s2 = jnp.asarray(operator.sigma**2, dtype)
            out = _selection_kernel(mu, U, d, nu, s2, y, flat.mask, xs, ns)
        else:
            flat = Measurement(y=y, mask=flat.mask, params=flat.params)
            out = _dense_kernel(operator, mu, U, d, nu, flat, xs, ns)
        # LAPACK-heavy programs are not left running side by side: XLA's CPU runtime was seen to
        # deadlock on concurrent Cholesky/eigh work (docs/amortized.md, "A deadlock").
        mean, std, logev, samples = jax.block_until_ready(out)
        return (mean.reshape(*batch, V, C), std.reshape(*batch, V, C), logev.reshape(batch),
                samples.reshape(n, *batch, V, C))

    def posterior(self, operator: LinearOperator, measurement: Measurement):
        """Exact posterior mean and pointwise std of x given y = A x + n, n ~ N(0, σ² I).

        σ is ``operator.sigma``. For :class:`Denoise` and :class:`RandomMask` this is Woodbury
        with the mask as a weight vector (jit-able, O(V K²) per measurement); other linear
        operators are materialized densely (O(D³), small D only).

        Args:
            operator: a linear operator (σ in normalized data units).
            measurement: its measurement, ``y`` (..., Vy, C).

        Returns:
            mean (..., V, C), std (..., V, C), batched like the measurement.
        """
        mean, std, _, _ = self._solve(operator, measurement)
        return mean, std

    def posterior_sample(self, key, operator: LinearOperator, measurement: Measurement, n: int):
        """Exact posterior samples via Matheron's rule (prior draw + the posterior-mean correction).

        Args:
            key: PRNG key.
            operator: a linear operator.
            measurement: ``y`` (..., Vy, C).
            n: samples per measurement.

        Returns:
            (n, ..., V, C).
        """
        n = _check_positive_int(n, "n")
        return self._solve(operator, measurement, key, n)[3]

    def log_evidence(self, operator: LinearOperator, measurement: Measurement):
        """log p(y) = log N(y_obs; A μ, A Σ Aᵀ + σ² I) over observed entries only, (...,) nats."""
        return self._solve(operator, measurement)[2]


@functools.partial(jax.jit, static_argnums=(0, 5))
def _mixture_kernel(sde, params, logw, x, t, score: bool):
    """log p_t(x) (...,) of the mixture, or its score (..., V, C) via responsibilities."""
    lp = jnp.stack([_log_prob_kernel(sde, *p, x, t) for p in params])      # (M, ...)
    lp = lp + logw.reshape(-1, *([1] * (lp.ndim - 1)))
    if not score:
        return jax.nn.logsumexp(lp, axis=0)
    resp = jax.nn.softmax(lp, axis=0)[..., None, None]
    return sum(r * _score_kernel(sde, *p, x, t) for r, p in zip(resp, params))


@jax.jit
def _mixture_moments(logpost, means, stds):
    """Mean and std of a mixture with log-weights (M, ...), component means/stds (M, ..., V, C)."""
    pi = jax.nn.softmax(logpost, axis=0)[..., None, None]
    mean = jnp.sum(pi * means, axis=0)
    return mean, jnp.sqrt(jnp.sum(pi * (stds**2 + (means - mean) ** 2), axis=0))


@jax.jit
def _pick(key, logits, draws):
    """Per sample, the draw of a component k ~ softmax(logits).

    Args: logits (..., M), draws (M, n, ..., V, C). Returns (n, ..., V, C).
    """
    idx = jax.random.categorical(key, logits, shape=draws.shape[1:-2])       # (n, ...)
    return jnp.take_along_axis(draws, idx[None, ..., None, None], axis=0)[0]


class GaussianMixturePrior(Prior):
    """A finite mixture Σ_k w_k N(μ_k, Σ_k ⊗ I_C) of :class:`GaussianPrior` components.

    The diffused density is the same mixture of the components' p_t, so the score is exact:
    ∇log p_t = Σ_k r_k(x, t) ∇log p_{t,k}, with responsibilities r_k ∝ w_k p_{t,k}(x)
    (log-sum-exp). Under a linear-Gaussian measurement the posterior is again a mixture. Its
    component posteriors have closed forms, and the posterior weights are ∝ w_k · p_k(y).
    Use it to check that posterior samplers capture several modes (docs/method.md, "What the first prototypes showed": judge mixtures
    by the mode-weight error).

    Args:
        components: a non-empty sequence of :class:`GaussianPrior` on the same manifold (the same
            object or the same vertex count), with the same channels and SDE.
        weights: (M,) positive, summing to 1 within 1e-6 (then renormalized).

    Attributes:
        components: tuple of the M components.
        weights: (M,) jnp array.

    Raises:
        ValueError: mismatched components or bad weights, with the argument named.
    """

    def __init__(self, components, weights):
        comps = tuple(components) if isinstance(components, (list, tuple)) else None
        if not comps:
            raise ValueError("components must be a non-empty list of GaussianPrior")
        for i, c in enumerate(comps):
            if not isinstance(c, GaussianPrior):
                raise ValueError(f"components[{i}] must be a GaussianPrior, got {type(c).__name__}")
        first = comps[0]
        for i, c in enumerate(comps[1:], 1):
            if c.manifold is not first.manifold and c.manifold.n_vertices != first.manifold.n_vertices:
                raise ValueError(f"components[{i}] lives on {c.manifold!r}, components[0] on "
                                 f"{first.manifold!r}: components must share one manifold")
            if c.channels != first.channels:
                raise ValueError(f"components[{i}] has {c.channels} channel(s), components[0] "
                                 f"has {first.channels}: components must have the same channels")
            if c.sde != first.sde:
                raise ValueError(f"components[{i}] has sde {c.sde}, components[0] has {first.sde}: "
                                 f"components must share one SDE")
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (len(comps),):
            raise ValueError(f"weights must have shape ({len(comps)},) to match components, got {w.shape}")
        if not np.all(np.isfinite(w)) or np.any(w <= 0):
            raise ValueError(f"weights must be positive, got {w}")
        if abs(w.sum() - 1.0) > 1e-6:
            raise ValueError(f"weights must sum to 1 (within 1e-6), got sum {w.sum()!r}")
        super().__init__(first.manifold, channels=first.channels, sde=first.sde)
        self.components = comps
        self.weights = jnp.asarray(w / w.sum(), jnp.result_type(float))

    def __repr__(self) -> str:
        return f"GaussianMixturePrior({self.manifold!r}, M={len(self.components)}, channels={self.channels})"

    def _log_weights(self, dtype):
        return jnp.log(jnp.asarray(self.weights, dtype))

    def _prep(self, x, t):
        x = self.check_x(x)
        dtype = _float_dtype(x, self.weights)
        params = tuple(tuple(jnp.asarray(p, dtype) for p in c._params()) for c in self.components)
        return (jnp.asarray(x, dtype), params, self._log_weights(dtype),
                jnp.asarray(check_time(t), dtype))

    # ---------------------------------------------------------------- density level
    def log_prob_t(self, x, t):
        """Exact log p_t(x) = logsumexp_k (log w_k + log p_{t,k}(x)), (...,) nats.

        Args:
            x: (..., V, C).
            t: scalar or (...,) in [0, 1].
        """
        x, params, logw, t = self._prep(x, t)
        return _mixture_kernel(self.sde, params, logw, x, t, False)

    def log_prob(self, x, *, key=None):
        """Exact log p(x), (...,) nats (``key`` ignored)."""
        return self.log_prob_t(x, 0.0)

    def score(self, x, t):
        """Exact ∇ log p_t(x) = Σ_k r_k ∇ log p_{t,k}(x), (..., V, C).

        Args:
            x: (..., V, C).
            t: scalar or (...,) in [0, 1].
        """
        x, params, logw, t = self._prep(x, t)
        return _mixture_kernel(self.sde, params, logw, x, t, True)

    def sample(self, key, n: int):
        """Exact samples, (n, V, C): a component index per sample, then that component's draw."""
        n = _check_positive_int(n, "n")
        k_idx, *keys = jax.random.split(key, len(self.components) + 1)
        draws = jnp.stack([c.sample(k, n) for c, k in zip(self.components, keys)])  # (M, n, V, C)
        return _pick(k_idx, self._log_weights(draws.dtype), draws)

    # -------------------------------------------------------------------- posterior
    def _solve_all(self, operator, measurement, key=None, n: int = 0):
        keys = [None] * len(self.components) if key is None else list(
            jax.random.split(key, len(self.components)))
        outs = [c._solve(operator, measurement, k, n) for c, k in zip(self.components, keys)]
        means, stds, logevs, samples = (jnp.stack(z) for z in zip(*outs))
        lw = self._log_weights(logevs.dtype).reshape(-1, *([1] * (logevs.ndim - 1)))
        logpost = lw + logevs                                               # (M, ...)
        return means, stds, logpost, samples

    def posterior_weights(self, operator: LinearOperator, measurement: Measurement):
        """Posterior component weights p(k | y) ∝ w_k N(y; A μ_k, A Σ_k Aᵀ + σ² I), (..., M)."""
        _, _, logpost, _ = self._solve_all(operator, measurement)
        return jnp.moveaxis(jax.nn.softmax(logpost, axis=0), 0, -1)

    def log_evidence(self, operator: LinearOperator, measurement: Measurement):
        """log p(y) = logsumexp_k (log w_k + log p_k(y)), (...,) nats over observed entries."""
        _, _, logpost, _ = self._solve_all(operator, measurement)
        return jax.nn.logsumexp(logpost, axis=0)

    def posterior(self, operator: LinearOperator, measurement: Measurement):
        """Mean and pointwise std of the mixture posterior.

        mean = Σ_k π_k m_k and var = Σ_k π_k (s_k² + (m_k − mean)²), with π = posterior weights.

        Returns:
            mean (..., V, C), std (..., V, C).
        """
        means, stds, logpost, _ = self._solve_all(operator, measurement)
        return _mixture_moments(logpost, means, stds)

    def posterior_sample(self, key, operator: LinearOperator, measurement: Measurement, n: int):
        """Exact posterior samples, (n, ..., V, C): a component k ~ p(k | y) per sample, then an
        exact draw from that component's posterior."""
        n = _check_positive_int(n, "n")
        k_idx, k_draw = jax.random.split(key)
        _, _, logpost, samples = self._solve_all(operator, measurement, k_draw, n)
        return _pick(k_idx, jnp.moveaxis(logpost, 0, -1), samples)


__all__ = ["GaussianMixturePrior", "GaussianPrior"]
