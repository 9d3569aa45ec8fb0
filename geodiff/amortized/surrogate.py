"""The Gaussian surrogate of a prior and the per-measurement Gaussian base of the amortized flow.

The first prototypes (docs/method.md) found the base distribution decisive: a Gaussian surrogate of the *prior*
``N(μ, F Fᵀ + diag(d))`` (mean and rank-R + diagonal covariance estimated from prior samples, no
ground truth), conditioned exactly on each measurement, gives the flow a base
``x = m₀(y) + L₀(y)·u`` whose mean is the surrogate's Wiener filter and whose scale ``L₀`` is an
exact square root of the surrogate posterior covariance (log-determinant in closed form).

Two exact solvers, chosen by the operator:

* **selection** (:class:`~geodiff.operators.Mask`, :class:`~geodiff.operators.RandomMask`,
  :class:`~geodiff.operators.Denoise`):
  A selects entries, so with ``w = mask/σ²`` the posterior covariance is
  ``Σ = diag(r)·(I + Z Zᵀ)·diag(r)`` with ``r = √(d/(1+d w))``, ``Z = diag(a) F K^{-1/2}``,
  ``a = 1/√(d(1+d w))`` and ``K = I + Fᵀ diag(w/(1+d w)) F`` (two Woodbury steps; any
  ``K^{-1/2}`` with the right ``Z Zᵀ`` will do, and a Cholesky factor is used). The symmetric
  root ``S = (I + Z Zᵀ)^{1/2} = I + Z Q diag(c) Qᵀ Zᵀ`` comes from the eigenpairs ``(Q, s²)`` of
  ``ZᵀZ`` (R×R), so each measurement costs O(D R² + R³) once and O(D R) per draw, and stores one
  R×R matrix. For Denoise the mask is all ones in every measurement, so that factor is computed
  once per sampler (:func:`selection_shared`) and a measurement costs only its mean, O(D R).
* **dense** (:class:`~geodiff.operators.Blur`, :class:`~geodiff.operators.SuperResolution`): A does
  not change between measurements, so Σ and its Cholesky factor are computed once (D × D; fine up
  to a few thousand entries) and only m₀ depends on y.

Dimension letters: N measurements, V vertices, C channels, D = V·C, R surrogate rank, Vy measured
entries.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from geodiff.operators import Blur, Denoise, LinearOperator, Mask, Measurement, SuperResolution

#: Largest D = V·C for the dense solver (a D × D Cholesky factor is kept in memory).
MAX_DENSE_D = 8192


def gaussian_fit(samples, *, rank: int = 256, min_nugget: float = 1e-6):
    """Fit a Gaussian ``N(mean, F Fᵀ + diag(nugget))`` to samples (low rank + diagonal).

    ``F`` holds the top ``rank`` principal directions of the sample covariance, scaled by their
    standard deviations; ``nugget`` is the per-entry variance the rank-R part leaves out.

    Args:
        samples: (S, V, C) training signals (no measurement involved).
        rank: R, at most S − 1.
        min_nugget: lower bound on the diagonal remainder (keeps the covariance positive definite).

    Returns:
        mean (V, C), cov_factor (D, R) acting on the row-major flattened (V, C) signal,
        nugget (V, C).
    """
    x = np.asarray(samples, dtype=np.float64)
    if x.ndim != 3 or len(x) < 2:
        raise ValueError(f"samples must have shape (S, V, C) with S ≥ 2, got {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("samples contain NaN or infinite values")
    if not isinstance(rank, (int, np.integer)) or not 1 <= rank <= len(x) - 1:
        raise ValueError(f"rank must be an integer in [1, S − 1 = {len(x) - 1}], got {rank!r}")
    mean = x.mean(axis=0)
    centred = (x - mean).reshape(len(x), -1) / np.sqrt(len(x) - 1)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    factor = vt[:rank].T * s[:rank]
    total = (centred**2).sum(axis=0)
    nugget = np.maximum(total - (factor**2).sum(axis=1), min_nugget).reshape(mean.shape)
    return mean, factor, nugget


def draw_prior(key, prior, n_samples: int, *, batch: int = 256, **sample_kwargs) -> np.ndarray:
    """``n_samples`` draws of ``prior.sample`` in batches of ``batch``, (n_samples, V, C) NumPy.

    Raises:
        ValueError: ``n_samples`` not an integer ≥ 2.
    """
    if not isinstance(n_samples, (int, np.integer)) or n_samples < 2:
        raise ValueError(f"n_samples must be an integer ≥ 2, got {n_samples!r}")
    draws = []
    for i, k in enumerate(jax.random.split(key, -(-n_samples // batch))):
        draws.append(np.asarray(prior.sample(k, min(batch, n_samples - i * batch), **sample_kwargs)))
    return np.concatenate(draws)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GaussianSurrogate:
    """A Gaussian ``N(mean, F Fᵀ + diag(nugget))`` standing in for a prior (a pytree).

    Attributes:
        mean: (V, C) in normalized data units.
        factor: F, (D, R) on the row-major flattened (V, C) signal.
        nugget: (V, C) > 0, diagonal remainder (data units²).
    """

    mean: jax.Array
    factor: jax.Array
    nugget: jax.Array

    @classmethod
    def fit(cls, samples, *, rank: int = 256, min_nugget: float = 1e-6) -> "GaussianSurrogate":
        """Fit to prior samples (S, V, C) with :func:`gaussian_fit` (rank clipped to S − 1)."""
        n = len(np.asarray(samples))
        mean, F, d = gaussian_fit(samples, rank=min(int(rank), max(n - 1, 1)), min_nugget=min_nugget)
        return cls(jnp.asarray(mean, jnp.float32), jnp.asarray(F, jnp.float32),
                   jnp.asarray(d, jnp.float32))

    @classmethod
    def from_prior(cls, key, prior, *, n_samples: int = 2048, rank: int = 256,
                   batch: int = 256, **sample_kwargs) -> "GaussianSurrogate":
        """Fit to ``n_samples`` draws of ``prior.sample`` (no ground truth involved).

        ``sample_kwargs`` go to ``prior.sample`` (e.g. ``steps=`` for a :class:`DiffusionPrior`,
        whose 1000-step sampler makes thousands of draws slow on a CPU: there a surrogate fitted
        to the prior's own training set is a cheaper stand-in, see :meth:`fit`).
        """
        return cls.fit(draw_prior(key, prior, n_samples, batch=batch, **sample_kwargs), rank=rank)

    @property
    def rank(self) -> int:
        return int(self.factor.shape[1])

    @property
    def marginal_std(self):
        """(V, C) prior standard deviation per entry."""
        return jnp.sqrt(jnp.sum(self.factor**2, axis=1).reshape(self.mean.shape) + self.nugget)


def solver_kind(operator) -> str:
    """'selection' or 'dense': which exact surrogate-posterior solver ``operator`` needs."""
    if isinstance(operator, (Denoise, Mask)):   # RandomMask is a Mask
        return "selection"
    if isinstance(operator, (Blur, SuperResolution)):
        return "dense"
    raise TypeError(f"operator: the Gaussian-surrogate base supports Mask, RandomMask, Denoise, "
                    f"Blur and SuperResolution, got {type(operator).__name__}")


# ----------------------------------------------------------------------- selection operators
def selection_gram(sur: GaussianSurrogate):
    """Fᵀ diag(1/d) F (R, R): computed once per surrogate, it saves one O(D R²) product per
    measurement (ZᵀZ's middle factor is this minus K − I)."""
    F = sur.factor
    if isinstance(F, jax.core.Tracer):
        return F.T @ (F / sur.nugget.reshape(-1)[:, None])
    # float64 on the host: G = gram − (K − I) cancels part of it per measurement
    F64 = np.asarray(F, np.float64)
    gram = F64.T @ (F64 / np.asarray(sur.nugget, np.float64).reshape(-1)[:, None])
    return jnp.asarray(gram, jnp.result_type(F.dtype, float))


@functools.partial(jax.jit, static_argnames=("sigma", "evidence"))
def _selection_one(sur: GaussianSurrogate, gram, y, mask, *, sigma: float, evidence: bool = False):
    """Per-measurement base of a selection operator. y (V, C), mask (V, 1).

    ``evidence=True`` adds ``logev``, log N(y_o; μ_o, C_oo + σ² I) in nats, by Woodbury with
    ω = mask/(d + σ²) (so that K = I + Fᵀ diag(ω) F): log|C_oo + σ²I| = Σ_o log(d + σ²) + log|K|
    and rᵀ(C_oo + σ²I)⁻¹r = rᵀ diag(ω) r − ‖Wᵀ Fᵀ diag(ω) r‖², since W Wᵀ = K⁻¹. It reuses the
    Cholesky factor and W: no second LAPACK call that XLA could dispatch beside the eigensolver
    (independent LAPACK calls side by side can deadlock its CPU runtime)."""
    V, C = sur.mean.shape
    F, d = sur.factor, sur.nugget.reshape(-1)
    R = F.shape[1]
    w = jnp.broadcast_to(mask, (V, C)).reshape(-1).astype(F.dtype) / sigma**2
    r = jnp.sqrt(d / (1 + d * w))
    a = r / d
    K = jnp.eye(R, dtype=F.dtype) + F.T @ ((w / (1 + d * w))[:, None] * F)
    # Z = diag(a) F Lk⁻ᵀ with K = Lk Lkᵀ has the same Z Zᵀ as diag(a) F K^{-1/2}; one Cholesky
    # and one R×R eigensolver per measurement.
    lk = jnp.linalg.cholesky(K)
    G = gram - (K - jnp.eye(R, dtype=F.dtype))                           # Fᵀ diag(a²) F
    tmp = jax.scipy.linalg.solve_triangular(lk, 0.5 * (G + G.T), lower=True)
    Mz = jax.scipy.linalg.solve_triangular(lk, tmp.T, lower=True)         # ZᵀZ = Lk⁻¹ G Lk⁻ᵀ
    s2, q = jnp.linalg.eigh(0.5 * (Mz + Mz.T))
    s2 = jnp.maximum(s2, 0.0)
    W = jax.scipy.linalg.solve_triangular(lk.T, q, lower=False)           # Z Q = diag(a) F W
    base = {"r": r, "a": a, "W": W, "s2": s2,
            "logdet": jnp.sum(jnp.log(r)) + 0.5 * jnp.sum(jnp.log1p(s2))}
    out = {**base, "m0": _selection_mean(sur, base, y, mask, sigma=sigma)}
    if evidence:
        obs = jnp.broadcast_to(mask, (V, C)).reshape(-1).astype(F.dtype)
        omega = w / (1 + d * w)                                       # mask / (d + σ²)
        resid = obs * (y - sur.mean).reshape(-1)
        proj = W.T @ (F.T @ (omega * resid))
        quad = jnp.sum(omega * resid**2) - jnp.sum(proj**2)
        logdet = jnp.sum(obs * jnp.log(d + sigma**2)) + 2 * jnp.sum(jnp.log(jnp.diag(lk)))
        out["logev"] = -0.5 * (quad + logdet + jnp.sum(obs) * jnp.log(2 * jnp.pi))
    return out


def _selection_mean(sur: GaussianSurrogate, base: dict, y, mask, *, sigma: float):
    """m₀ = μ + Σ w (y − μ) with Σ v = L Lᵀ v, w = mask/σ²; y (V, C), mask (V, 1)."""
    V, C = sur.mean.shape
    F = sur.factor
    w = jnp.broadcast_to(mask, (V, C)).reshape(-1).astype(F.dtype) / sigma**2
    resid = (w * (y - jnp.where(mask, sur.mean, 0.0)).reshape(-1))
    m0 = sur.mean.reshape(-1) + _sel_apply(F, base, _sel_apply_t(F, base, resid))
    return m0.reshape(V, C)


def selection_shared(operator: LinearOperator, sur: GaussianSurrogate) -> dict:
    """What the selection solver computes once per sampler: ``gram`` (:func:`selection_gram`) and
    ``fixed``. For :class:`Denoise` every entry is observed in every measurement, so the
    posterior covariance factor (``r``, ``a``, ``W``, ``s2``, ``logdet``) does not depend on y:
    ``fixed`` holds it and each measurement then costs only its mean, O(D R), instead of a
    Cholesky factorization and an R×R eigensolver. For :class:`RandomMask` (a mask per
    measurement) ``fixed`` is None."""
    gram = selection_gram(sur)
    fixed = None
    if isinstance(operator, Denoise):
        V = sur.mean.shape[0]
        fixed = selection_factor(sur, gram, jnp.ones((V, 1), bool), sigma=float(operator.sigma))
    return {"gram": gram, "fixed": fixed}


@functools.partial(jax.jit, static_argnames=("sigma",))
def selection_factor(sur: GaussianSurrogate, gram, mask, *, sigma: float) -> dict:
    """The selection solver's covariance factor for one mask (V, 1) bool: ``r``, ``a``, ``W``,
    ``s2``, ``logdet`` (:func:`_selection_one`) and the base's per-entry ``std`` (V, C). Every
    measurement with this mask shares it (only its mean depends on y): :class:`Denoise`
    (every entry observed), and a batch whose measurements share one mask (a station network
    or a fixed gap pattern; ``AmortizedSampler`` caches one factor per mask)."""
    V, C = sur.mean.shape
    one = _selection_one(sur, gram, jnp.zeros((V, C), sur.factor.dtype), mask.astype(bool),
                         sigma=sigma)
    fixed = {k: v for k, v in one.items() if k != "m0"}
    fixed["std"] = _selection_std(sur, fixed)
    return fixed


def _sel_sym(F, b, v, inverse: bool):
    """S v (or S⁻¹ v) with S = (I + Z Zᵀ)^{±1/2}; v (..., D)."""
    root = jnp.sqrt(1 + b["s2"])
    c = -1 / (root * (1 + root)) if inverse else 1 / (1 + root)
    av = b["a"] * v
    coef = jnp.einsum("...d,dr->...r", av, F)
    coef = jnp.einsum("...r,rk->...k", coef, b["W"]) * c
    coef = jnp.einsum("...k,rk->...r", coef, b["W"])
    return v + b["a"] * jnp.einsum("...r,dr->...d", coef, F)


def _sel_apply(F, b, u):
    """L u = diag(r) S u."""
    return b["r"] * _sel_sym(F, b, u, False)


def _sel_apply_t(F, b, v):
    """Lᵀ v = S diag(r) v."""
    return _sel_sym(F, b, b["r"] * v, False)


def _sel_solve(F, b, x):
    """L⁻¹ x = S⁻¹ (x / r)."""
    return _sel_sym(F, b, x / b["r"], True)


# --------------------------------------------------------------------------- dense operators
def _operator_matrix(operator: LinearOperator, measurement: Measurement, V: int, C: int):
    """A as a dense (Vy·C, V·C) matrix for one (unbatched) measurement."""
    D = V * C
    eye = jnp.eye(D, dtype=jnp.float32).reshape(D, V, C)
    cols = jax.vmap(lambda e: operator.forward(e, measurement))(eye)       # (D, Vy, C)
    return cols.reshape(D, -1).T


def dense_posterior(operator: LinearOperator, measurement: Measurement, sur: GaussianSurrogate):
    """Shared factors of the dense solver: ``(chol, prec_chol, gain, logdet)`` with
    Σ = (C⁻¹ + AᵀA/σ²)⁻¹ = chol cholᵀ (D, D), Σ⁻¹ = prec_chol prec_cholᵀ (so chol⁻¹ =
    prec_cholᵀ), m₀ = μ + gain (y − A μ) with gain (D, Dy), logdet = log|det chol|.

    Computed in float64 with NumPy from the first measurement (A is the same for all of them).
    """
    V, C = sur.mean.shape
    D = V * C
    if D > MAX_DENSE_D:
        raise ValueError(f"the dense surrogate solver needs D = V·C ≤ {MAX_DENSE_D}, got {D}")
    if operator.sigma <= 0:
        raise ValueError("operator.sigma must be > 0 for the amortized sampler's Gaussian base")
    m1 = jax.tree.map(lambda a: a.reshape(-1, *a.shape[-2:])[0] if a.ndim >= 2 else a, measurement)
    A = np.asarray(_operator_matrix(operator, m1, V, C), np.float64)
    F = np.asarray(sur.factor, np.float64)
    cov = F @ F.T + np.diag(np.asarray(sur.nugget, np.float64).reshape(-1))
    prec = np.linalg.inv(cov)
    prec = 0.5 * (prec + prec.T) + A.T @ A / operator.sigma**2
    lp = np.linalg.cholesky(prec)                                          # P = lp lpᵀ
    chol = np.linalg.inv(lp).T                                             # Σ = chol cholᵀ
    sigma_post = chol @ chol.T
    gain = sigma_post @ A.T / operator.sigma**2
    logdet = -float(np.sum(np.log(np.diag(lp))))
    return (jnp.asarray(chol, jnp.float32), jnp.asarray(lp, jnp.float32),
            jnp.asarray(gain, jnp.float32), jnp.asarray(logdet, jnp.float32))


# --------------------------------------------------------------------------------- interface
def base_params(operator: LinearOperator, measurements: Measurement, sur: GaussianSurrogate, *,
                shared=None, chunk: int = 64):
    """Per-measurement base parameters for a batch of measurements (leading axis N).

    Args:
        operator: the measurement operator (σ > 0).
        measurements: a :class:`Measurement` with batch shape (N,).
        sur: the prior's Gaussian surrogate.
        shared: for the dense solver, the output of :func:`dense_posterior`; for the selection
            solver, that of :func:`selection_shared` (computed if None). With :class:`Denoise`
            the covariance factor in it assumes every entry observed, as ``Denoise.measure``
            makes them (``AmortizedSampler.check_measurement`` rejects other masks).
        chunk: measurements per vectorized call (bounds memory).

    Returns:
        dict of (N, ...) arrays; always ``m0`` (N, V, C). With :class:`Denoise` only ``m0``: the
        covariance factor is ``shared["fixed"]``, used unbatched by :func:`base_forward` and
        :func:`base_inverse` (no copy per measurement or per sample).
    """
    if operator.sigma <= 0:
        raise ValueError("operator.sigma must be > 0 for the amortized sampler's Gaussian base "
                         "(a noiseless measurement pins entries exactly; use a small sigma)")
    kind = solver_kind(operator)
    V, C = sur.mean.shape
    N = measurements.batch_shape[0]
    if kind == "dense":
        _, _, gain, _ = dense_posterior(operator, measurements, sur) if shared is None else shared
        resid = measurements.y - operator.forward(jnp.broadcast_to(sur.mean, (N, V, C)), measurements)
        m0 = sur.mean + (resid.reshape(N, -1) @ gain.T).reshape(N, V, C)
        return {"m0": m0}
    shared = selection_shared(operator, sur) if shared is None else shared
    if shared["fixed"] is not None:                    # Denoise: only the mean depends on y
        fixed = shared["fixed"]
        one = functools.partial(_selection_mean, sur, fixed, sigma=float(operator.sigma))
        return {"m0": jax.vmap(one)(measurements.y, measurements.mask)}
    # One sequential loop over equal chunks (N padded to a multiple of the chunk): independent
    # batched LAPACK calls dispatched side by side (a Python loop of chunks, or lax.map's
    # remainder next to its loop) were seen to deadlock XLA's CPU runtime.
    chunk = min(chunk, N)
    n_pad = -(-N // chunk) * chunk
    pad = lambda a: jnp.concatenate([a, jnp.broadcast_to(a[:1], (n_pad - N, *a.shape[1:]))])  # noqa: E731
    ys = pad(measurements.y).reshape(n_pad // chunk, chunk, V, -1)
    masks = pad(measurements.mask).reshape(n_pad // chunk, chunk, V, 1)
    one = jax.vmap(functools.partial(_selection_one, sur, shared["gram"], sigma=float(operator.sigma)))
    out = jax.lax.map(lambda ym: one(*ym), (ys, masks))
    return jax.tree.map(lambda a: a.reshape(n_pad, *a.shape[2:])[:N], out)


def _shared_factor(shared, b: dict):
    """The selection solver's covariance factor if it is shared by all measurements (Denoise:
    ``b`` then holds only ``m0``), else None."""
    if "r" in b:
        return None
    if shared is None or shared.get("fixed") is None:
        raise ValueError("these base params hold only m0: pass the shared factor of "
                         "selection_shared (a Denoise operator) as shared")
    return shared["fixed"]


def base_forward(kind: str, sur: GaussianSurrogate, shared, b: dict, u):
    """x = m₀ + L₀ u and log|det L₀|. u (B, V, C), b the base params of the B measurements."""
    B, V, C = u.shape
    if kind == "dense":
        chol, _, _, logdet = shared
        x = b["m0"] + (u.reshape(B, -1) @ chol.T).reshape(B, V, C)
        return x, jnp.broadcast_to(logdet, (B,))
    fixed = _shared_factor(shared, b)
    if fixed is not None:
        x = b["m0"] + _sel_apply(sur.factor, fixed, u.reshape(B, -1)).reshape(B, V, C)
        return x, jnp.broadcast_to(fixed["logdet"], (B,))
    x = b["m0"] + jax.vmap(functools.partial(_sel_apply, sur.factor))(b, u.reshape(B, -1)).reshape(B, V, C)
    return x, b["logdet"]


def base_inverse(kind: str, sur: GaussianSurrogate, shared, b: dict, x):
    """u = L₀⁻¹ (x − m₀) and log|det L₀|. x (B, V, C)."""
    B, V, C = x.shape
    v = (x - b["m0"]).reshape(B, -1)
    if kind == "dense":
        _, prec_chol, _, logdet = shared
        u = v @ prec_chol
        return u.reshape(B, V, C), jnp.broadcast_to(logdet, (B,))
    fixed = _shared_factor(shared, b)
    if fixed is not None:
        return (_sel_solve(sur.factor, fixed, v).reshape(B, V, C),
                jnp.broadcast_to(fixed["logdet"], (B,)))
    u = jax.vmap(functools.partial(_sel_solve, sur.factor))(b, v)
    return u.reshape(B, V, C), b["logdet"]


def base_std(kind: str, sur: GaussianSurrogate, shared, b: dict):
    """Per-entry standard deviation of the base, √diag(L₀ L₀ᵀ), shape (B, V, C).

    Selection solver: Σ = diag(r)(I + Z Zᵀ)diag(r) with Z Q = diag(a) F W, so
    diag Σ = r² (1 + Σₖ (a ⊙ (F W)ₖ)²), O(D R²) per measurement (once for :class:`Denoise`).
    Dense solver: the row norms of the shared Cholesky factor.
    """
    B = b["m0"].shape[0]
    V, C = sur.mean.shape
    if kind == "dense":
        chol = shared[0]
        return jnp.broadcast_to(jnp.sqrt(jnp.sum(chol**2, axis=1)).reshape(V, C), (B, V, C))

    fixed = _shared_factor(shared, b)
    if fixed is not None:
        std = fixed["std"] if "std" in fixed else _selection_std(sur, fixed)
        return jnp.broadcast_to(std, (B, V, C))
    return jax.vmap(functools.partial(_selection_std, sur))({k: b[k] for k in ("r", "a", "W")})


def _selection_std(sur: GaussianSurrogate, f: dict):
    """√diag Σ = r ⊙ √(1 + Σₖ (a ⊙ (F W)ₖ)²) of one selection factor, (V, C)."""
    zq = f["a"][:, None] * (sur.factor @ f["W"])
    return (f["r"] * jnp.sqrt(1 + jnp.sum(zq**2, axis=1))).reshape(sur.mean.shape)
