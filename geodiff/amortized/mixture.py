"""A Gaussian-*mixture* surrogate of a prior and the per-measurement mixture base of the sampler.

A single Gaussian surrogate gives every measurement a unimodal base; a prior whose signals come in
classes (digits, regimes) has a multimodal posterior whenever y is ambiguous, and a coupling flow
learns the global, y-dependent move between modes slowly (docs/amortized.md, "Mixture base").
Here the prior is stood in for by ``Σ_k w_k N(μ_k, F_k F_kᵀ + diag(d_k))``, fitted to prior
signals by EM (:meth:`MixtureSurrogate.fit`). Under a selection operator (``RandomMask``,
``Denoise``: y = x on the observed entries plus N(0, σ²) noise) its posterior is again a mixture,
in closed form:

* component posteriors: each component conditioned exactly on y by the selection solver of
  :mod:`geodiff.amortized.surrogate` (mean m_k(y), covariance square root L_k(y));
* posterior weights: ``π_k(y) ∝ w_k N(y_o; μ_k,o, C_k,oo + σ² I)``, the evidence of y under
  component k, by the Woodbury identity with ω = mask/(d_k + σ²) and
  ``K_k = I + F_kᵀ diag(ω) F_k`` (the same R×R matrix the solver factors):
  ``log|C_oo + σ²I| = Σ_o log(d + σ²) + log|K|`` and
  ``rᵀ(C_oo + σ²I)⁻¹r = rᵀ diag(ω) r − ‖Wᵀ Fᵀ diag(ω) r‖²`` (W Wᵀ = K⁻¹, from the solver).

The mixture base is an exact density (a log-sum-exp over components), so the sampler's
``log_prob`` stays exact. Dimension letters: K components, N measurements, S signals, V vertices,
C channels, D = V·C, R rank.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from scipy.linalg import solve_triangular

from geodiff.amortized.surrogate import (GaussianSurrogate, _sel_apply, _sel_solve,
                                         _selection_one, selection_gram)
from geodiff.operators import Denoise, LinearOperator, Mask, Measurement


def _component_log_prob(x, mean, factor, nugget):
    """log N(x; mean, F Fᵀ + diag(d)) by Woodbury, float64 NumPy. x (S, D) → (S,)."""
    D, R = factor.shape
    diff = x - mean
    dinv = 1.0 / nugget
    M = np.eye(R) + factor.T @ (factor * dinv[:, None])
    L = np.linalg.cholesky(M)
    proj = solve_triangular(L, factor.T @ (diff * dinv).T, lower=True)          # (R, S)
    quad = np.sum(diff**2 * dinv, axis=1) - np.sum(proj**2, axis=0)
    logdet = np.sum(np.log(nugget)) + 2 * np.sum(np.log(np.diag(L)))
    return -0.5 * (quad + logdet + D * np.log(2 * np.pi))


def _joint_log_prob(X, means, factors, nuggets, log_weights):
    """log w_k + log N(x; μ_k, F_k F_kᵀ + diag d_k) (S, K) and its log-sum-exp over k (S,);
    X (S, D), one (D,), (D, R), (D,) triple per component (float64 NumPy)."""
    lp = np.stack([lw + _component_log_prob(X, m, F, d)
                   for m, F, d, lw in zip(means, factors, nuggets, log_weights)], axis=1)
    top = lp.max(1, keepdims=True)
    return lp, top[:, 0] + np.log(np.exp(lp - top).sum(1))


def _weighted_fit(x, resp, rank: int, floor: float):
    """Weighted mean and rank-R + diagonal covariance of x (S, D) with weights resp (S,)."""
    n = resp.sum()
    mean = resp @ x / n
    keep = resp > 1e-8 * resp.max()              # rows that matter (most of them are ≈ 0 for K > 1)
    centred = np.sqrt(resp[keep] / n)[:, None] * (x[keep] - mean)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    D = x.shape[1]
    r = min(rank, len(s), D - 1)
    # probabilistic-PCA maximum likelihood: the leading directions keep their variance above the
    # mean variance of the discarded ones (which the diagonal then carries), not all of it
    rest = (np.sum(s**2) - np.sum(s[:r] ** 2)) / (D - r)
    factor = np.zeros((D, rank))
    factor[:, :r] = vt[:r].T * np.sqrt(np.maximum(s[:r] ** 2 - rest, 0.0))
    total = np.sum(centred**2, axis=0)
    nugget = np.maximum(total - np.sum(factor**2, axis=1), floor)
    return mean, factor, nugget


def mixture_fit(samples, *, components: int = 4, rank: int = 32, iters: int = 50,
                tol: float = 1e-5, seed: int = 0, min_nugget: float = 1e-6,
                rel_nugget: float = 1e-3, progress: bool = False):
    """Fit ``Σ_k w_k N(μ_k, F_k F_kᵀ + diag(d_k))`` to samples by EM (float64, NumPy).

    Initialisation: k-means++ seeds and 10 Lloyd steps give hard responsibilities. Each M-step
    fits every component's mean, its top-``rank`` weighted principal directions with the
    probabilistic-PCA variances (each eigenvalue minus the mean of the discarded ones) and the
    diagonal they leave out (floored at
    ``max(min_nugget, rel_nugget · mean variance)`` so no component collapses onto a few
    signals); each E-step computes exact responsibilities by Woodbury. The truncation to rank R
    makes the M-step approximate, so the log-likelihood need not rise every step: the iterate
    with the highest mean log-likelihood is returned.

    Args:
        samples: (S, V, C) clean prior signals (no measurement involved).
        components: K ≥ 1.
        rank: R ≥ 1 per component.
        iters: EM iterations (≥ 1).
        tol: stop when the mean log-likelihood per dimension rises by less than this.
        seed: seeds the k-means++ initialisation.
        min_nugget: the nugget floor's absolute part (data units²).
        rel_nugget: the nugget floor's part relative to the mean variance.
        progress: print the log-likelihood per iteration.

    Returns:
        dict with ``mean`` (K, V, C), ``factor`` (K, D, R), ``nugget`` (K, V, C), ``weights``
        (K,), ``loglik`` (mean log-likelihood per dimension, nats, of the returned fit) and
        ``history`` (its value per iteration).
    """
    x = np.asarray(samples, dtype=np.float64)
    if x.ndim != 3 or len(x) < 2:
        raise ValueError(f"samples must have shape (S, V, C) with S ≥ 2, got {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("samples contain NaN or infinite values")
    for name, v, lo in (("components", components, 1), ("rank", rank, 1), ("iters", iters, 1)):
        if not isinstance(v, (int, np.integer)) or v < lo:
            raise ValueError(f"{name} must be an integer ≥ {lo}, got {v!r}")
    S, V, C = x.shape
    if S < 2 * components:
        raise ValueError(f"components = {components} needs at least {2 * components} samples, "
                         f"got {S}")
    X = x.reshape(S, -1)
    D = X.shape[1]
    floor = max(float(min_nugget), float(rel_nugget) * float(X.var(axis=0).mean()))
    rng = np.random.default_rng(seed)
    # k-means++ seeds, then Lloyd steps: hard responsibilities to start EM from
    centres = [X[rng.integers(S)]]
    d2 = np.sum((X - centres[0]) ** 2, axis=1)
    for _ in range(1, components):
        centres.append(X[rng.choice(S, p=d2 / d2.sum())])
        d2 = np.minimum(d2, np.sum((X - centres[-1]) ** 2, axis=1))
    centres = np.stack(centres)
    for _ in range(10):
        lab = np.argmin(((X**2).sum(1)[:, None] - 2 * X @ centres.T + (centres**2).sum(1)), axis=1)
        centres = np.stack([X[lab == k].mean(0) if np.any(lab == k) else centres[k]
                            for k in range(components)])
    resp = np.eye(components)[lab]                                    # (S, K)
    resp = 0.98 * resp + 0.02 / components                            # no empty component
    best, history = None, []
    for it in range(int(iters)):
        fits = [_weighted_fit(X, resp[:, k], int(rank), floor) for k in range(components)]
        w = resp.sum(0) / S
        logp, lse = _joint_log_prob(X, *zip(*fits), np.log(w))       # (S, K), (S,)
        ll = float(lse.mean() / D)
        history.append(ll)
        if progress:
            print(f"EM {it + 1}/{iters}: mean log-likelihood {ll:.5f} nats/dim", flush=True)
        if best is None or ll > best[0]:
            best = (ll, fits, w)
        resp = np.exp(logp - lse[:, None])
        if it and history[-1] - history[-2] < tol:
            break
    ll, fits, w = best
    return {"mean": np.stack([f[0] for f in fits]).reshape(components, V, C),
            "factor": np.stack([f[1] for f in fits]),
            "nugget": np.stack([f[2] for f in fits]).reshape(components, V, C),
            "weights": w, "loglik": ll, "history": history}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MixtureSurrogate:
    """``Σ_k w_k N(mean_k, F_k F_kᵀ + diag(nugget_k))`` standing in for a prior (a pytree).

    Attributes:
        mean: (K, V, C) normalized data units.
        factor: (K, D, R) on the row-major flattened (V, C) signal.
        nugget: (K, V, C) > 0 (data units²).
        log_weights: (K,) log w_k (normalized).
    """

    mean: jax.Array
    factor: jax.Array
    nugget: jax.Array
    log_weights: jax.Array

    @classmethod
    def fit(cls, samples, *, components: int = 4, rank: int = 32, iters: int = 50,
            seed: int = 0, **kwargs) -> "MixtureSurrogate":
        """Fit by EM to prior signals (S, V, C) (:func:`mixture_fit`); the fit's mean
        log-likelihood per dimension and its history are kept in ``fit_info`` of the result."""
        out = mixture_fit(samples, components=components, rank=rank, iters=iters, seed=seed,
                          **kwargs)
        sur = cls(jnp.asarray(out["mean"], jnp.float32), jnp.asarray(out["factor"], jnp.float32),
                  jnp.asarray(out["nugget"], jnp.float32),
                  jnp.asarray(np.log(out["weights"]), jnp.float32))
        object.__setattr__(sur, "fit_info", {"loglik": out["loglik"], "history": out["history"]})
        return sur

    @classmethod
    def from_prior(cls, prior) -> "MixtureSurrogate":
        """The exact mixture of a :class:`~geodiff.GaussianMixturePrior` (for checks and studies):
        each component's covariance ``U diag(λ) Uᵀ + ν I`` as ``F = U diag(√λ)``, ``d = ν``."""
        comps = getattr(prior, "components", None)
        if comps is None:
            raise TypeError(f"prior must be a GaussianMixturePrior, got {type(prior).__name__}")
        if len({int(c.basis.shape[1]) for c in comps}) != 1:
            raise ValueError("prior: the components must have bases of the same rank")
        C = prior.channels
        facs = []
        for c in comps:
            F = np.asarray(c.basis, np.float64) * np.sqrt(np.asarray(c.variances, np.float64))
            if C > 1:                                   # Σ ⊗ I_C on the row-major (V, C) signal
                F = np.einsum("vr,cd->vcrd", F, np.eye(C)).reshape(-1, F.shape[1] * C)
            facs.append(F)
        shape = (comps[0].manifold.n_vertices, C)
        dtype = jnp.result_type(float)                  # float64 under jax_enable_x64
        return cls(jnp.asarray(np.stack([np.broadcast_to(np.asarray(c.mean, np.float64), shape)
                                         for c in comps]), dtype),
                   jnp.asarray(np.stack(facs), dtype),
                   jnp.asarray(np.stack([np.full(shape, float(c.nugget)) for c in comps]), dtype),
                   jnp.asarray(np.log(np.asarray(prior.weights, np.float64)), dtype))

    @property
    def n_components(self) -> int:
        return int(self.mean.shape[0])

    @property
    def rank(self) -> int:
        return int(self.factor.shape[2])

    def component(self, k: int) -> GaussianSurrogate:
        """Component k as a :class:`GaussianSurrogate`."""
        return GaussianSurrogate(self.mean[k], self.factor[k], self.nugget[k])

    def log_prob(self, x):
        """Exact log density of signals x (..., V, C) under the mixture, (...,) nats (float64)."""
        x = np.asarray(x, np.float64)
        lead = x.shape[:-2]
        X = x.reshape(-1, x.shape[-2] * x.shape[-1])
        K = self.n_components
        f64 = lambda a: np.asarray(a, np.float64).reshape(K, -1)  # noqa: E731
        _, lse = _joint_log_prob(X, f64(self.mean), np.asarray(self.factor, np.float64),
                                 f64(self.nugget), np.asarray(self.log_weights, np.float64))
        return lse.reshape(lead)


def check_mixture_operator(operator: LinearOperator):
    """The mixture base needs a selection operator (RandomMask or Denoise)."""
    if not isinstance(operator, (Mask, Denoise)):   # RandomMask is a Mask
        raise ValueError(f"centre='mixture' needs a selection operator (Mask, RandomMask or Denoise), "
                         f"got {type(operator).__name__}: use centre='surrogate'")


def mixture_shared(msur: MixtureSurrogate) -> dict:
    """Per-component ``gram`` (K, R, R), computed once per sampler (float64 on the host)."""
    return {"gram": jnp.stack([selection_gram(msur.component(k))
                               for k in range(msur.n_components)]).astype(msur.factor.dtype)}


def mixture_base_params(operator: LinearOperator, measurements: Measurement,
                        msur: MixtureSurrogate, shared: dict) -> dict:
    """The mixture posterior of a batch of N measurements (one sequential loop over them).

    Returns:
        dict with ``comp`` (the selection solver's per-component factors, leading axes (N, K)),
        ``logw`` (N, K) log posterior weights π_k(y) (normalized), ``m0`` (N, V, C) the mixture
        posterior mean and ``std`` (N, V, C) its per-entry std (exact: within-component variance
        plus the spread of the component means).
    """
    sigma = float(operator.sigma)

    def one(ym):
        y, mask = ym

        def comp(mean, factor, nugget, gram):
            sur = GaussianSurrogate(mean, factor, nugget)
            b = _selection_one(sur, gram, y, mask, sigma=sigma, evidence=True)
            logev = b.pop("logev")
            zq = b["a"][:, None] * (factor @ b["W"])
            var = (b["r"] ** 2 * (1 + jnp.sum(zq**2, axis=1))).reshape(mean.shape)
            return b, var, logev

        b, var, logev = jax.vmap(comp)(msur.mean, msur.factor, msur.nugget, shared["gram"])
        logw = jax.nn.log_softmax(msur.log_weights + logev)
        pi = jnp.exp(logw)[:, None, None]
        mean = jnp.sum(pi * b["m0"], axis=0)
        std = jnp.sqrt(jnp.sum(pi * (var + (b["m0"] - mean) ** 2), axis=0))
        return {"comp": b, "logw": logw, "m0": mean, "std": std}

    # sequential over measurements: batched LAPACK programs side by side can deadlock XLA's CPU
    # runtime (docs/amortized.md)
    return jax.lax.map(one, (measurements.y, measurements.mask))


def mixture_draw(key, msur: MixtureSurrogate, b: dict, eps, *, comp=None):
    """Draws of the mixture base: a component k ~ π(y) per draw, then x = m_k + L_k ε.

    Args:
        key: PRNG key (component choice; unused when ``comp`` is given).
        b: :func:`mixture_base_params` of the B measurements the draws belong to.
        eps: (B, V, C) the latent (N(0, τ²) for temperature τ).
        comp: (B,) int, the components already drawn from π(y) (None: drawn here with ``key``).

    Returns:
        (B, V, C).
    """
    B, V, C = eps.shape
    k = jax.random.categorical(key, b["logw"]) if comp is None else comp   # (B,)
    comp_k = jax.tree.map(lambda a: jnp.moveaxis(a, 1, 0), b["comp"])   # (K, B, ...)
    # every component's draw, then the chosen one: K× the flops of one, but no (B, D, R) gather
    # of the factors (memory stays O(K·B·D))
    xs = jax.vmap(lambda F, ck: ck["m0"] + jax.vmap(functools.partial(_sel_apply, F))(
        ck, eps.reshape(B, -1)).reshape(B, V, C))(msur.factor, comp_k)  # (K, B, V, C)
    return jnp.take_along_axis(xs, k[None, :, None, None], axis=0)[0]


def mixture_log_prob(msur: MixtureSurrogate, b: dict, x, tau):
    """Exact log density of the mixture base at temperature τ, log Σ_k π_k N(x; m_k, τ² Σ_k),
    x (B, V, C) → (B,) nats."""
    B, V, C = x.shape
    D = V * C
    tau = jnp.asarray(tau, x.dtype)

    def per_comp(F, comp_k, m0_k):                      # comp_k leaves (B, ...), m0_k (B, V, C)
        u = jax.vmap(functools.partial(_sel_solve, F))(comp_k, (x - m0_k).reshape(B, -1))
        return (-0.5 * jnp.sum(u**2, axis=-1) / tau**2 - comp_k["logdet"]
                - D * (jnp.log(tau) + 0.5 * jnp.log(2 * jnp.pi)))

    comp_k = jax.tree.map(lambda a: jnp.moveaxis(a, 1, 0), b["comp"])   # (K, B, ...)
    lp = jax.vmap(per_comp)(msur.factor, comp_k, comp_k["m0"])          # (K, B)
    return jax.nn.logsumexp(lp + b["logw"].T, axis=0)


__all__ = ["MixtureSurrogate", "mixture_fit"]
