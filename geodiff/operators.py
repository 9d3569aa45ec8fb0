"""Forward models ``y = A(x) + n``, ``n ~ N(0, σ² I)`` on observed entries (docs/concepts.md,
"Operators and units").

Every operator acts on one signal ``(V, C)`` and is vectorised over leading batch dimensions at the
edge. σ is a standard deviation in *normalized data units* (the [0, 1] range of the data), not in
[−1, 1] units. Likelihoods and adjoints use the plain Euclidean inner product of the vertex layout.

Operators that need geometry (:class:`Blur`, :class:`SuperResolution`) are bound to a manifold,
either at construction (``manifold=...``) or with :meth:`Operator.on`.

Dimension letters: B batch (any leading dims), V vertices, Vy measured entries (V except for
super-resolution), C channels.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from geodiff.manifolds import Grid, Manifold, PaddedManifold

Array = jax.Array


@functools.partial(jax.tree_util.register_dataclass, data_fields=["y", "mask", "params"],
                   meta_fields=[])
@dataclasses.dataclass(frozen=True)
class Measurement:
    """A measurement (a JAX pytree), batched like the signal it was taken of.

    Attributes:
        y: (..., Vy, C) observations, zero where not observed.
        mask: (..., Vy, 1) bool, True where observed (all True for operators without a mask).
        params: dict of per-measurement operator parameters, each (..., ...) (e.g. the drawn
            missing ``ratio`` of a blind :class:`RandomMask`, shape (...,)).
    """

    y: Array
    mask: Array
    params: dict = dataclasses.field(default_factory=dict)

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return tuple(self.y.shape[:-2])

    def __getitem__(self, idx) -> "Measurement":
        """Index the batch dimensions, e.g. ``m[3]`` or ``m[:16]``."""
        if not self.batch_shape:
            raise IndexError("this measurement has no batch dimension to index")
        return jax.tree_util.tree_map(lambda a: a[idx], self)


def _check_sigma(sigma) -> float:
    if not isinstance(sigma, (int, float, np.floating, np.integer)) or not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"sigma must be a finite number ≥ 0 (noise std in normalized data units), "
                         f"got {sigma!r}")
    return float(sigma)


def _check_key(key) -> Array:
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    if not (typed and key.shape == ()) and not (key.dtype == jnp.uint32 and key.shape == (2,)):
        raise ValueError("key must be a single PRNG key (jax.random.key(seed) or PRNGKey(seed)), "
                         f"got an array of dtype {key.dtype} and shape {key.shape}")
    return key


@dataclasses.dataclass(frozen=True)
class Operator:
    """Base class of forward models. Subclasses implement the single-example hooks
    ``_apply(x, params) -> (Vy, C)`` (noise-free, before masking) and optionally
    ``_draw(key, n_vertices) -> (mask (Vy, 1), params)``.

    Attributes:
        sigma: noise standard deviation in normalized data units (≥ 0).
        manifold: the manifold signals live on, or None if the operator needs none.
    """

    sigma: float
    manifold: Manifold | None = dataclasses.field(default=None, kw_only=True)

    linear = True

    def __post_init__(self):
        object.__setattr__(self, "sigma", _check_sigma(self.sigma))
        if self.manifold is not None:
            self._bind_check(self.manifold)

    # ------------------------------------------------------------ binding to a manifold
    def on(self, manifold: Manifold) -> "Operator":
        """A copy of this operator bound to ``manifold`` (checks that it applies there)."""
        if not isinstance(manifold, Manifold):
            raise TypeError(f"manifold must be a geodiff Manifold, got {type(manifold).__name__}")
        return dataclasses.replace(self, manifold=manifold)

    def _bind_check(self, manifold: Manifold) -> None:
        """Raise if this operator cannot act on ``manifold``."""

    def _need_manifold(self) -> Manifold:
        if self.manifold is None:
            raise ValueError(f"{type(self).__name__} needs a manifold: pass manifold=... or use "
                             f"op.on(manifold)")
        return self.manifold

    def _input_vertices(self, n_measured: int) -> int:
        """V of the signal, given Vy of the measurement."""
        return n_measured

    # ------------------------------------------------------------- single-example hooks
    def _apply(self, x: Array, params: dict) -> Array:
        raise NotImplementedError

    def _draw(self, key: Array, n_measured: int) -> tuple[Array, dict]:
        return jnp.ones((n_measured, 1), dtype=bool), {}

    def _output_vertices(self, n_vertices: int) -> int:
        return n_vertices

    # ------------------------------------------------------------------ public methods
    def _check_x(self, x, name="x"):
        if self.manifold is not None:
            return self.manifold.check_signal(x, name)
        shape = getattr(x, "shape", None)
        if shape is None or len(shape) < 2:
            raise ValueError(f"{name} must have shape (..., V, C), got {shape}")
        if not isinstance(x, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(x))):
            raise ValueError(f"{name} contains NaN or infinite values")
        return x

    def measure(self, key, x) -> Measurement:
        """Simulate a measurement of ``x``: draw the operator's random parameters (e.g. a mask),
        apply A, add N(0, σ²) noise on observed entries, zero the rest.

        Args:
            key: a PRNG key; each signal of a batch gets its own split of it.
            x: (..., V, C) clean signal(s) in normalized units.

        Returns:
            A :class:`Measurement` with ``y`` (..., Vy, C) and ``mask`` (..., Vy, 1).
        """
        key = _check_key(key)
        x = self._check_x(x)
        x = jnp.asarray(x, jnp.result_type(x.dtype, jnp.float32))   # integers: as floats
        batch, (V, C) = x.shape[:-2], x.shape[-2:]
        flat = x.reshape(-1, V, C)
        keys = jax.random.split(key, flat.shape[0])
        m = jax.vmap(self._measure_one)(keys, flat)
        return jax.tree_util.tree_map(lambda a: a.reshape(*batch, *a.shape[1:]), m)

    def _measure_one(self, key, x):
        k_draw, k_noise = jax.random.split(key)
        mask, params = self._draw(k_draw, self._output_vertices(x.shape[0]))
        ax = self._apply(x, params)
        y = ax + self.sigma * jax.random.normal(k_noise, ax.shape, ax.dtype)
        return Measurement(y=jnp.where(mask, y, 0.0), mask=mask, params=params)

    def forward(self, x, measurement: Measurement) -> Array:
        """A(x) with the measurement's parameters (mask applied), noise-free.

        Args:
            x: (..., V, C). If the measurement is batched with batch shape B, x must have shape
                (*S, *B, V, C) for some sample shape S (possibly empty).
            measurement: the :class:`Measurement` whose parameters (mask, …) to use.

        Returns:
            (..., Vy, C), the layout of ``measurement.y``.
        """
        return self._map(self._forward_one, self._check_x(x), measurement, "x")

    def _forward_one(self, x, m: Measurement):
        return jnp.where(m.mask, self._apply(x, m.params), 0.0)

    def _check_measurement(self, m: Measurement) -> None:
        y, mask = m.y, m.mask
        if getattr(y, "ndim", 0) < 2:
            raise ValueError(f"measurement.y must have shape (..., Vy, C), got {getattr(y, 'shape', None)}")
        if tuple(mask.shape) != tuple(y.shape[:-1]) + (1,):
            raise ValueError(f"measurement.mask must have shape {tuple(y.shape[:-1]) + (1,)} "
                             f"(..., Vy, 1) to match measurement.y {tuple(y.shape)}, got {tuple(mask.shape)}")
        if self.manifold is not None:
            vy = self._output_vertices(self.manifold.n_vertices)
            if y.shape[-2] != vy:
                raise ValueError(f"measurement.y has {y.shape[-2]} entries per channel, expected "
                                 f"{vy} for {type(self).__name__} on {self.manifold!r}")

    def _map(self, fn, x, m: Measurement, name: str):
        """Apply a single-example ``fn(x (V, C), m)`` over x's leading dims and m's batch."""
        if not isinstance(m, Measurement):
            raise TypeError(f"measurement must be a geodiff.operators.Measurement, got {type(m).__name__}")
        x = jnp.asarray(x)
        if jnp.issubdtype(x.dtype, jnp.complexfloating) or not jnp.issubdtype(x.dtype, jnp.number) \
                and x.dtype != jnp.bool_:
            raise TypeError(f"{name} must be a real-valued (floating-point) array, got dtype {x.dtype}")
        x = x.astype(jnp.result_type(x.dtype, jnp.float32))          # integers: as floats
        self._check_measurement(m)
        batch = m.batch_shape
        nb = len(batch)
        if x.ndim < 2 + nb or tuple(x.shape[x.ndim - 2 - nb:-2]) != batch:
            raise ValueError(f"{name} must have shape (..., {', '.join(map(str, batch + ('V', 'C')))}) "
                             f"to match the measurement's batch shape {batch}, got {x.shape}")
        want = (tuple(m.y.shape[-2:]) if name == "v" else
                (self._input_vertices(m.y.shape[-2]), m.y.shape[-1]))
        if tuple(x.shape[-2:]) != want:
            raise ValueError(f"{name} must have shape (..., {want[0]}, {want[1]}) for this "
                             f"measurement (y {tuple(m.y.shape)}), got {tuple(x.shape)}")
        sample = x.shape[: x.ndim - 2 - nb]
        mf = jax.tree_util.tree_map(lambda a: a.reshape(-1, *a.shape[nb:]), m)
        xf = x.reshape(math.prod(sample), math.prod(batch), *x.shape[-2:])
        out = jax.vmap(lambda xs: jax.vmap(fn)(xs, mf))(xf)
        return out.reshape(*sample, *batch, *out.shape[-2:])


class LinearOperator(Operator):
    """A linear forward model; :meth:`adjoint` is derived with ``jax.linear_transpose``."""

    def adjoint(self, v, measurement: Measurement) -> Array:
        """Aᵀ v in the Euclidean inner product of the vertex layout: ⟨A x, v⟩ = ⟨x, Aᵀ v⟩.

        Args:
            v: (..., Vy, C), like ``measurement.y`` (with optional leading sample dims).
            measurement: the measurement whose parameters define A.

        Returns:
            (..., V, C).
        """
        return self._map(self._adjoint_one, v, measurement, "v")

    def _adjoint_one(self, v, m: Measurement):
        V = self._input_vertices(v.shape[0])
        template = jax.ShapeDtypeStruct((V, v.shape[1]), v.dtype)
        (out,) = jax.linear_transpose(lambda x: self._forward_one(x, m), template)(v)
        return out


@dataclasses.dataclass(frozen=True)
class Denoise(LinearOperator):
    """A = I: ``y = x + n``. (Paper: CelebA denoising, σ = 0.1.)"""

    def _apply(self, x, params):
        return x


@dataclasses.dataclass(frozen=True)
class Mask(LinearOperator):
    """A fixed, data-given mask (imputation of real data with gaps): ``y = x + n`` on the
    observed vertices; NaN in the data marks a missing vertex. There is no random draw: each field
    brings its own mask.

    :meth:`observe` turns data with NaN into a measurement as given (no noise added);
    :meth:`measure` simulates one (noise added on the observed vertices). A vertex is observed
    when all its channels are finite. Samplers and baselines that take :class:`RandomMask`
    measurements take these too (same fields: ``params["ratio"]`` is the fraction missing).

    Args:
        sigma: noise std of the observed values, normalized data units (the instrument and
            representativeness error assumed by the posterior).
    """

    def _apply(self, x, params):
        return x

    def _split(self, x, name: str = "x"):
        """(y with NaN → 0, mask (..., V, 1), fraction missing (...,)) of data with gaps; traced
        data (inside jit or eval_shape) skips the value checks."""
        if isinstance(x, jax.core.Tracer):
            observed = jnp.all(jnp.isfinite(x), -1, keepdims=True)
            missing = 1.0 - jnp.mean(observed, axis=(-2, -1))
            return jnp.where(observed, x, 0.0), observed, missing
        a = np.asarray(x)
        if a.ndim < 2:
            raise ValueError(f"{name} must have shape (..., V, C) (NaN = missing), got {a.shape}")
        if not np.issubdtype(a.dtype, np.floating):
            raise TypeError(f"{name} must be a float array (NaN marks missing values), got "
                            f"dtype {a.dtype}")
        if np.isinf(a).any():
            raise ValueError(f"{name} contains infinite values (only NaN marks a missing value)")
        if self.manifold is not None:
            V, C = self.manifold.n_vertices, getattr(self.manifold, "channels", None)
            if a.shape[-2] != V or (C is not None and a.shape[-1] != C):
                want = f"(..., {V}, {C})" if C is not None else f"(..., {V}, C)"
                raise ValueError(f"{name} must have shape {want} on {self.manifold!r}, got "
                                 f"{a.shape}")
        finite = np.isfinite(a)
        observed = finite.all(-1, keepdims=True)
        partial = finite.any(-1, keepdims=True) & ~observed
        if partial.any():
            raise ValueError(f"{name} has {int(partial.sum())} vertices with NaN in some channels "
                             "but not all: a vertex is observed in every channel or in none")
        n_obs = observed.sum(axis=(-2, -1))
        if (n_obs == 0).any():
            raise ValueError(f"{name}: {int((n_obs == 0).sum())} field(s) have no observed value "
                             "(every vertex NaN)")
        y = np.where(observed, a, 0.0).astype(a.dtype)
        missing = 1.0 - n_obs / a.shape[-2]
        return y, observed, missing

    def observe(self, x) -> Measurement:
        """The measurement of data ``x`` as given: NaN = missing, nothing added, no random draw.

        Args:
            x: (..., V, C) float data in normalized units, NaN where missing (in all channels of
                a vertex).

        Returns:
            A :class:`Measurement`: ``y`` (..., V, C) with zeros where missing, ``mask``
            (..., V, 1), ``params["ratio"]`` (...,) the fraction missing.

        Raises:
            ValueError: a wrong shape, inf, a vertex missing in some channels only, or a field
                with no observed value. TypeError: non-float data.
        """
        y, mask, missing = self._split(x)
        return Measurement(y=jnp.asarray(y), mask=jnp.asarray(mask),
                           params={"ratio": jnp.asarray(missing, jnp.float32)})

    def measure(self, key, x) -> Measurement:
        """Simulate a measurement of clean ``x`` with gaps: N(0, σ²) noise added on the observed
        vertices (NaN = missing), a new noise draw per field.

        Args:
            key: a PRNG key.
            x: (..., V, C) clean float signals in normalized units, NaN where missing.
        """
        key = _check_key(key)
        m = self.observe(x)
        noise = self.sigma * jax.random.normal(key, m.y.shape, m.y.dtype)
        return Measurement(y=jnp.where(m.mask, m.y + noise, 0.0), mask=m.mask, params=m.params)


@dataclasses.dataclass(frozen=True)
class RandomMask(Mask):
    """Random vertex masking (inpainting / imputation): a new mask per measurement.

    Exactly ``round(ratio·V)`` vertices are missing, chosen uniformly; the mask is shared by all
    channels. With ``ratio=(lo, hi)`` (the blind setting) the ratio is drawn uniformly in [lo, hi]
    for each measurement and recorded in ``measurement.params["ratio"]``.

    Args:
        ratio: fraction of vertices *missing*, in [0, 1], or a range ``(lo, hi)``.
        sigma: noise std on observed vertices, normalized data units.
    """

    ratio: Any = 0.6

    def __post_init__(self):
        super().__post_init__()
        r = self.ratio
        if isinstance(r, (tuple, list)):
            ok = len(r) == 2 and all(isinstance(v, (int, float)) for v in r) and 0 <= r[0] <= r[1] <= 1
            if not ok:
                raise ValueError(f"ratio must be a number in [0, 1] or a pair (lo, hi) with "
                                 f"0 ≤ lo ≤ hi ≤ 1, got {r!r}")
            object.__setattr__(self, "ratio", (float(r[0]), float(r[1])))
        elif isinstance(r, (int, float, np.floating)) and 0 <= r <= 1:
            object.__setattr__(self, "ratio", float(r))
        else:
            raise ValueError(f"ratio must be a number in [0, 1] (fraction missing) or a pair "
                             f"(lo, hi), got {r!r}")

    def __init__(self, ratio=0.6, sigma=0.05, *, manifold=None):
        object.__setattr__(self, "ratio", ratio)
        object.__setattr__(self, "sigma", sigma)
        object.__setattr__(self, "manifold", manifold)
        self.__post_init__()

    # simulated measurements draw their mask (Mask.measure reads it from NaN); observe() stays
    measure = Operator.measure

    def _draw(self, key, n_measured):
        k_ratio, k_perm = jax.random.split(key)
        if isinstance(self.ratio, tuple):
            ratio = jax.random.uniform(k_ratio, (), minval=self.ratio[0], maxval=self.ratio[1])
        else:
            ratio = jnp.asarray(self.ratio, jnp.float32)
        n_missing = jnp.round(ratio * n_measured).astype(jnp.int32)
        rank = jnp.argsort(jax.random.permutation(k_perm, n_measured))
        return (rank >= n_missing)[:, None], {"ratio": ratio}


def _gaussian_matrix_1d(n: int, std_px: float) -> np.ndarray:
    """(n, n) row-normalized Gaussian blur with symmetric (half-sample) reflection at the ends."""
    r = max(1, int(math.ceil(3 * std_px)))
    offsets = np.arange(-r, r + 1)
    w = np.exp(-0.5 * (offsets / std_px) ** 2)
    w /= w.sum()
    B = np.zeros((n, n))
    for i in range(n):
        j = i + offsets
        j = np.where(j < 0, -j - 1, j)
        j = np.where(j >= n, 2 * n - 1 - j, j)
        j = np.clip(j, 0, n - 1)  # kernels wider than the image reflect more than once
        np.add.at(B[i], j, w)
    return B


@dataclasses.dataclass(frozen=True)
class Blur(LinearOperator):
    """Blur with a Gaussian of standard deviation ``width`` (in the manifold's length units).

    On a :class:`Grid` (unit square): separable Gaussian convolution with reflecting borders,
    std ``width·H`` pixels down and ``width·W`` pixels across, kernel truncated at 3 std and
    renormalized. Elsewhere: the heat kernel
    ``exp(−τ Δ)`` with τ = width²/2 (the same variance in the flat limit), applied through the
    ``n_modes`` lowest eigenpairs; raises if the truncated modes keep more than 1% of their amplitude
    (exp(−τ λ_K) > 0.01) rather than silently dropping them.

    Args:
        width: blur std (> 0), e.g. 0.02 on the unit square ≈ 0.64 px at 32×32.
        sigma: noise std, normalized data units.
        manifold: the manifold (or bind later with :meth:`on`).
        n_modes: eigenpairs for the heat kernel off the grid; None (default) picks the smallest
            of 64, 128, …, 2048 that damps the last mode below 1%.
    """

    width: float = 0.02
    n_modes: int | None = None

    def __init__(self, width=0.02, sigma=0.05, *, manifold=None, n_modes=None):
        if not isinstance(width, (int, float, np.floating)) or not width > 0:
            raise ValueError(f"width must be a positive number (blur std in the manifold's length "
                             f"units), got {width!r}")
        object.__setattr__(self, "width", float(width))
        if n_modes is not None and (not isinstance(n_modes, (int, np.integer)) or n_modes < 1):
            raise ValueError(f"n_modes must be a positive integer or None, got {n_modes!r}")
        object.__setattr__(self, "n_modes", n_modes)
        object.__setattr__(self, "sigma", sigma)
        object.__setattr__(self, "manifold", manifold)
        self.__post_init__()

    def _bind_check(self, manifold):
        self._matrices(manifold)

    @functools.cache  # noqa: B019  (frozen, hashable by identity of the manifold)
    def _matrices(self, manifold):
        base = manifold.base if isinstance(manifold, PaddedManifold) else manifold
        if isinstance(base, Grid):
            return ("grid", _gaussian_matrix_1d(base.height, self.width * base.height),
                    _gaussian_matrix_1d(base.width, self.width * base.width))
        tau = self.width**2 / 2
        kmax = manifold.max_eigenpairs
        if self.n_modes is not None:
            candidates = [min(self.n_modes, kmax)]
        else:  # smallest K in 64, 128, … whose last mode is damped below 1%
            candidates = [min(64 * 2**i, kmax) for i in range(6)]
            candidates = sorted(set(candidates))
        for k in candidates:
            evals, evecs = manifold.eigenpairs(k)
            if k == kmax or math.exp(-tau * evals[-1]) <= 0.01:
                break
        else:
            need = math.log(100) / tau
            raise ValueError(f"Blur(width={self.width}) needs eigenvalues up to {need:.3g} but "
                             f"n_modes={k} reaches {evals[-1]:.3g}; raise n_modes or the width")
        return ("heat", evecs, np.exp(-tau * evals), evecs * manifold.mass[:, None])

    def _apply(self, x, params):
        mats = self._matrices(self._need_manifold())
        if mats[0] == "grid":
            g = self.manifold.base if isinstance(self.manifold, PaddedManifold) else self.manifold
            img = x[: g.n_vertices].reshape(g.height, g.width, x.shape[-1])
            out = jnp.einsum("ih,hwc,jw->ijc", jnp.asarray(mats[1], x.dtype), img,
                             jnp.asarray(mats[2], x.dtype)).reshape(-1, x.shape[-1])
            return jnp.pad(out, ((0, x.shape[0] - out.shape[0]), (0, 0)))
        _, evecs, decay, m_evecs = mats
        coef = jnp.asarray(m_evecs, x.dtype).T @ x  # (K, C) = Φᵀ M x
        return jnp.asarray(evecs, x.dtype) @ (jnp.asarray(decay, x.dtype)[:, None] * coef)


@dataclasses.dataclass(frozen=True)
class SuperResolution(LinearOperator):
    """Down-sampling by averaging ``factor × factor`` pixel blocks (Grid only).

    ``y`` has ``(H/factor)·(W/factor)`` vertices (row-major low-resolution image), all observed.

    Args:
        factor: integer ≥ 2 dividing both H and W.
        sigma: noise std, normalized data units.
        manifold: the :class:`Grid` (or bind later with :meth:`on`).
    """

    factor: int = 2

    def __init__(self, factor=2, sigma=0.05, *, manifold=None):
        if not isinstance(factor, (int, np.integer)) or factor < 2:
            raise ValueError(f"factor must be an integer ≥ 2, got {factor!r}")
        object.__setattr__(self, "factor", int(factor))
        object.__setattr__(self, "sigma", sigma)
        object.__setattr__(self, "manifold", manifold)
        self.__post_init__()

    def _bind_check(self, manifold):
        if not isinstance(manifold, Grid):
            raise ValueError(f"SuperResolution acts on a Grid, got {manifold!r}")
        if manifold.height % self.factor or manifold.width % self.factor:
            raise ValueError(f"factor={self.factor} must divide the grid size "
                             f"{manifold.height}×{manifold.width}")

    def _output_vertices(self, n_vertices):
        return n_vertices // self.factor**2

    def _input_vertices(self, n_measured):
        return n_measured * self.factor**2

    def _apply(self, x, params):
        g = self._need_manifold()
        f = self.factor
        img = x.reshape(g.height // f, f, g.width // f, f, x.shape[-1])
        return img.mean(axis=(1, 3)).reshape(-1, x.shape[-1])


__all__ = ["Blur", "Denoise", "LinearOperator", "Mask", "Measurement", "Operator", "RandomMask",
           "SuperResolution"]
