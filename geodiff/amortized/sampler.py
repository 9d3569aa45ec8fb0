"""Amortized posterior sampling (APS): a conditional flow distilled from a prior and an operator,
trained on measurements only (METHOD.md §4–§5, §9).

The sampler draws ``x = m₀(y) + L₀(y)·G_φ(z; c(y))``, ``z ~ N(0, I)``:

* ``m₀, L₀``: the exact posterior mean and a square root of the posterior covariance under a
  Gaussian *surrogate* of the prior (fitted to prior samples; :mod:`geodiff.amortized.surrogate`);
* ``G_φ``: a :class:`~geodiff.flows.ConditionalRealNVP` on the whitened coordinates, conditioned on
  ``c(y)`` = [(m₀ − μ)/s, Aᵀ(y − Aμ)/s, mask] (s the surrogate's prior std). It starts as the
  identity, so an untrained sampler samples the surrogate posterior exactly.

Training minimises, per measurement and draw z (METHOD.md §4; reported per dimension D = V·C),

    log q(x | y) − log p(y | x) − λ · b(x),    x = G(z, y),

whose mean is KL(q(·|y) ‖ p(·|y)) − log p(y) when ``b = log p`` (``prior_term="exact"``) and an
upper bound of it with the diffusion ELBO (``prior_term="elbo"``, the method).

Dimension letters: N training measurements, B batch, n samples, V vertices, C channels, Vy
measured entries, D = V·C.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from geodiff._cache import atomic_savez
from geodiff.amortized import io as _io
from geodiff.amortized.surrogate import (GaussianSurrogate, base_forward, base_inverse, base_params,
                                         dense_posterior, selection_shared, solver_kind)
from geodiff.diffusion.base import Prior
from geodiff.diffusion.prior import _flatten, _key, _unflatten
from geodiff.flows import ConditionalRealNVP
from geodiff.manifolds import Manifold
from geodiff.manifolds.spec import manifold_from_spec, manifold_spec
from geodiff.operators import LinearOperator, Measurement
from geodiff.train import fit as _fit

FORMAT_VERSION = 1
PRIOR_TERMS = ("elbo", "exact")


def _check_int(value, name: str, lo: int = 1) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < lo:
        raise ValueError(f"{name} must be an integer ≥ {lo}, got {value!r}")
    return int(value)


class AmortizedSampler:
    """Posterior sampler for ``y = A(x) + n`` under a prior, amortized over measurements.

    Args:
        manifold: where the signals live (V vertices).
        prior: a :class:`~geodiff.GaussianPrior`, :class:`~geodiff.GaussianMixturePrior` or
            :class:`~geodiff.DiffusionPrior` on ``manifold`` (C channels).
        operator: a linear operator from :mod:`geodiff.operators` with σ > 0 (bound to
            ``manifold`` here if it is not bound yet): ``RandomMask`` and ``Denoise`` (exact
            per-measurement base in O(D R²)), ``Blur`` and ``SuperResolution`` (shared dense base,
            D ≤ 8192).
        flow: a :class:`~geodiff.ConditionalRealNVP` with ``channels=C`` and
            ``condition_channels=2C + 1`` on ``manifold``; None builds one from ``n_steps``,
            ``conditioner``, ``hidden``, ``n_eig``, ``local_hidden``, ``encoder_width``,
            ``encoder_blocks`` and ``seed``.
        prior_term: ``"elbo"`` (the method: the diffusion ELBO b(x) with ``n_t`` stratified
            draws) or ``"exact"`` (``prior.log_prob``, for analytic priors; for studies).
        surrogate: the Gaussian surrogate of the prior: a :class:`GaussianSurrogate`, or prior
            samples (S, V, C) to fit one to (rank ``surrogate_rank``); None draws
            ``surrogate_samples`` samples from ``prior.sample`` (slow for a DiffusionPrior on a
            CPU: pass samples such as the prior's training set instead).
        surrogate_samples: S when drawing from the prior.
        surrogate_rank: R, rank of the surrogate covariance (≤ S − 1).
        n_t: (t, ε) draws per signal of the ELBO (``prior_term="elbo"``).
        antithetic: draw them as antithetic pairs (t, ±ε) (``n_t`` even), which cancels the
            gradient noise that is linear in ε (exactly so for Gaussian priors).
        prior_weight: λ, weight of the prior term (1 in the paper).
        n_steps, conditioner, hidden, n_eig, local_hidden, encoder_width, encoder_blocks, seed:
            the default flow's settings
            (see :class:`~geodiff.ConditionalRealNVP`); ``seed`` also draws the surrogate samples.

    Attributes:
        manifold, prior, operator, flow, surrogate, prior_term, n_t, antithetic, prior_weight.
        history: the training history of the latest :meth:`fit` (None before).

    Raises:
        ValueError / TypeError: bad arguments, naming the argument and what was expected.
    """

    def __init__(self, manifold: Manifold, prior: Prior, operator: LinearOperator, *,
                 flow: ConditionalRealNVP | None = None, prior_term: str = "elbo", surrogate=None,
                 surrogate_samples: int = 2048, surrogate_rank: int = 256, n_t: int = 4,
                 antithetic: bool = True, prior_weight: float = 1.0, n_steps: int = 8,
                 conditioner: str = "spectral",
                 hidden: int = 256, n_eig: int = 64, local_hidden: int = 0, encoder_width: int = 0,
                 encoder_blocks: int = 2, seed: int = 0):
        if not isinstance(manifold, Manifold):
            raise TypeError(f"manifold must be a geodiff Manifold, got {type(manifold).__name__}")
        if not isinstance(prior, Prior):
            raise TypeError(f"prior must be a geodiff prior, got {type(prior).__name__}")
        if prior.manifold.n_vertices != manifold.n_vertices:
            raise ValueError(f"prior lives on {prior.manifold!r} ({prior.manifold.n_vertices} "
                             f"vertices), but manifold has {manifold.n_vertices}")
        if not isinstance(operator, LinearOperator):
            raise TypeError(f"operator must be a linear operator from geodiff.operators, got "
                            f"{type(operator).__name__}")
        self.kind = solver_kind(operator)
        if operator.sigma <= 0:
            raise ValueError("operator.sigma must be > 0 (noise std in normalized units); the "
                             "sampler's Gaussian base needs a noisy likelihood")
        if operator.manifold is None:
            operator = operator.on(manifold)
        elif operator.manifold.n_vertices != manifold.n_vertices:
            raise ValueError(f"operator is bound to {operator.manifold!r}, not to a manifold with "
                             f"{manifold.n_vertices} vertices")
        if prior_term not in PRIOR_TERMS:
            raise ValueError(f"prior_term must be one of {PRIOR_TERMS}, got {prior_term!r}")
        if prior_term == "exact" and not hasattr(prior, "log_prob_t"):
            raise ValueError(f"prior_term='exact' needs an analytic prior with an exact log_prob "
                             f"(GaussianPrior, GaussianMixturePrior), got {type(prior).__name__}")
        if not (isinstance(prior_weight, (int, float)) and math.isfinite(prior_weight)
                and prior_weight >= 0):
            raise ValueError(f"prior_weight must be a finite number ≥ 0, got {prior_weight!r}")
        self.manifold, self.prior, self.operator = manifold, prior, operator
        self.channels = C = prior.channels
        self.prior_term, self.prior_weight = prior_term, float(prior_weight)
        self.n_t = _check_int(n_t, "n_t")
        self.antithetic = bool(antithetic)
        if self.antithetic and self.n_t % 2:
            raise ValueError(f"n_t must be even with antithetic=True, got {n_t}")
        _check_int(seed, "seed", 0)

        V = manifold.n_vertices
        if surrogate is None:
            surrogate = GaussianSurrogate.from_prior(
                jax.random.key(seed), prior, n_samples=_check_int(surrogate_samples, "surrogate_samples", 2),
                rank=_check_int(surrogate_rank, "surrogate_rank"))
        elif not isinstance(surrogate, GaussianSurrogate):
            samples = np.asarray(surrogate)
            if samples.ndim != 3 or samples.shape[1:] != (V, C):
                raise ValueError(f"surrogate must be a GaussianSurrogate or prior samples of shape "
                                 f"(S, {V}, {C}), got shape {samples.shape}")
            surrogate = GaussianSurrogate.fit(samples, rank=_check_int(surrogate_rank, "surrogate_rank"))
        if surrogate.mean.shape != (V, C):
            raise ValueError(f"surrogate.mean must have shape ({V}, {C}), got {surrogate.mean.shape}")
        self.surrogate = surrogate

        cc = 2 * C + 1
        if flow is None:
            flow = ConditionalRealNVP(manifold, channels=C, condition_channels=cc, n_steps=n_steps,
                                      conditioner=conditioner, hidden=hidden, n_eig=n_eig,
                                      local_hidden=local_hidden, encoder_width=encoder_width,
                                      encoder_blocks=encoder_blocks, seed=seed)
        elif not isinstance(flow, ConditionalRealNVP):
            raise TypeError(f"flow must be a ConditionalRealNVP, got {type(flow).__name__}")
        if (flow.n_vertices, flow.channels, flow.condition_channels) != (V, C, cc):
            raise ValueError(f"flow must have n_vertices={V}, channels={C} and condition_channels="
                             f"{cc} (2C + 1), got {flow.n_vertices}, {flow.channels}, "
                             f"{flow.condition_channels}")
        self.flow_config = dict(flow.config)
        self._graphdef, self.params, self._consts = nnx.split(flow, nnx.Param, ...)
        self.history = None
        self._train_cache = None       # (measurements, their arrays, bases, conditions) of fit

        if self.kind == "dense":
            zero = jnp.zeros((V, C), jnp.float32)
            self._shared = dense_posterior(operator, operator.measure(jax.random.key(0), zero),
                                           surrogate)
        else:
            self._shared = selection_shared(operator, surrogate)
        # a template measurement: the structure and per-example shapes every input must have
        self._template = jax.eval_shape(lambda k: operator.measure(k, jnp.zeros((V, C))),
                                        jax.random.key(0))
        self._jit_sample = jax.jit(self._sample_impl, static_argnames=("n",))
        self._jit_log_prob = jax.jit(self._log_prob_impl)

    # ------------------------------------------------------------------------ helpers
    def __repr__(self) -> str:
        return (f"AmortizedSampler({self.manifold!r}, {type(self.prior).__name__}, "
                f"{type(self.operator).__name__}(sigma={self.operator.sigma}), "
                f"prior_term={self.prior_term!r}, rank={self.surrogate.rank})")

    @property
    def flow(self) -> ConditionalRealNVP:
        """The flow G_φ with the current parameters."""
        return nnx.merge(self._graphdef, self.params, self._consts)

    @property
    def n_params(self) -> int:
        return int(sum(np.size(a) for a in jax.tree.leaves(self.params)))

    def _frozen(self) -> dict:
        return {"consts": self._consts, "sur": self.surrogate, "shared": self._shared}

    def check_measurement(self, measurement, *, batched: bool | None = None,
                          name: str = "measurement") -> tuple[int, ...]:
        """Validate a measurement of this sampler's operator; return its batch shape (() or (B,)).

        Raises a ValueError naming the problem: a structure or per-example shape that another
        operator or manifold size would produce, missing entries for an operator without a mask,
        NaN/inf in ``y``, or a batch shape other than () / (B,) (``batched`` forces one of them).
        """
        if not isinstance(measurement, Measurement):
            raise TypeError(f"{name} must be a geodiff.operators.Measurement, got "
                            f"{type(measurement).__name__}")
        tpl = self._template
        y = measurement.y
        ex = tpl.y.shape
        if getattr(y, "ndim", 0) < 2 or tuple(y.shape[-2:]) != tuple(ex):
            raise ValueError(f"{name}.y must have shape (..., {ex[0]}, {ex[1]}) for "
                             f"{type(self.operator).__name__} on {self.manifold!r}, got "
                             f"{getattr(y, 'shape', None)}: was it taken with another operator or "
                             "manifold?")
        batch = tuple(y.shape[:-2])
        if len(batch) > 1 or (batched is True and len(batch) != 1) or (batched is False and batch):
            want = "(N, ...)" if batched else "() or (B,)" if batched is None else "()"
            raise ValueError(f"{name} must have batch shape {want}, got {batch}")
        if jax.tree.structure(measurement) != jax.tree.structure(tpl):
            raise ValueError(f"{name} has fields {jax.tree.structure(measurement)}, but "
                             f"{type(self.operator).__name__} makes {jax.tree.structure(tpl)}: was it "
                             "taken with another operator?")
        for a, t in zip(jax.tree.leaves(measurement), jax.tree.leaves(tpl)):
            if tuple(a.shape[len(batch):]) != tuple(t.shape):
                raise ValueError(f"{name} has an entry of per-example shape {a.shape[len(batch):]}, "
                                 f"expected {t.shape} for {type(self.operator).__name__}")
        if not isinstance(y, jax.core.Tracer):
            if not bool(jnp.all(jnp.isfinite(y))):
                raise ValueError(f"{name}.y contains NaN or infinite values")
            if self.kind == "dense" or type(self.operator).__name__ == "Denoise":
                if not bool(jnp.all(measurement.mask)):
                    raise ValueError(f"{name}.mask has missing entries, but "
                                     f"{type(self.operator).__name__} observes every entry: was it "
                                     "taken with another operator?")
        return batch

    def _features(self, sur, m: Measurement, b: dict):
        """Condition c(y) (B, V, 2C + 1)."""
        B = m.y.shape[0]
        V, C = sur.mean.shape
        sd = sur.marginal_std
        mu = jnp.broadcast_to(sur.mean, (B, V, C))
        back = self.operator.adjoint(m.y - self.operator.forward(mu, m), m) / sd
        mask = m.mask.astype(sd.dtype) if self.kind == "selection" else jnp.ones((B, V, 1), sd.dtype)
        return jnp.concatenate([(b["m0"] - sur.mean) / sd, back, mask], axis=-1)

    def _base(self, frozen, m: Measurement) -> dict:
        return base_params(self.operator, m, frozen["sur"], shared=frozen["shared"])

    # ---------------------------------------------------------------------- training
    def _loss(self, params, batch, key, frozen):
        flow = nnx.merge(self._graphdef, params, frozen["consts"])
        m, b, c = batch["m"], batch["b"], batch["c"]
        sur = frozen["sur"]
        B = m.y.shape[0]
        V, C = sur.mean.shape
        D = V * C
        k_z, k_p = jax.random.split(key)
        z = jax.random.normal(k_z, (B, V, C))
        u, ld_flow = flow.forward(z, c)
        x, ld_base = base_forward(self.kind, sur, frozen["shared"], b, u)
        s2 = self.operator.sigma**2
        resid = m.y - self.operator.forward(x, m)
        n_obs = jnp.sum(m.mask, axis=(-2, -1)) * C
        log_lik = -0.5 * jnp.sum(resid**2, axis=(-2, -1)) / s2 - 0.5 * n_obs * math.log(2 * math.pi * s2)
        log_q = -0.5 * jnp.sum(z**2, axis=(-2, -1)) - 0.5 * D * math.log(2 * math.pi) - ld_flow - ld_base
        if self.prior_term == "exact":
            log_p = self.prior.log_prob(x)
        else:
            log_p = self.prior.elbo(k_p, x, n_t=self.n_t, antithetic=self.antithetic)
        per = log_q - log_lik - self.prior_weight * log_p
        aux = {"data": -jnp.mean(log_lik) / D, "prior": -jnp.mean(log_p) / D,
               "log_q": jnp.mean(log_q) / D}
        return jnp.mean(per) / D, aux

    def fit(self, key, measurements: Measurement, *, steps: int, batch_size: int = 64,
            learning_rate: float = 3e-4, warmup_steps: int = 100, clip_norm: float | None = 1.0,
            ema_decay: float | None = None, checkpoint_dir=None, checkpoint_every: int = 500,
            resume: bool = True, log_every: int = 10, progress: bool = True, devices=None,
            max_bad_steps: int = 100) -> tuple["AmortizedSampler", dict]:
        """Train the flow on measurements only (no ground truth). The receiver keeps its parameters;
        it only caches the bases of ``measurements``, so a staged or resumed fit on the same object
        does not solve them again.

        Args:
            key: PRNG key.
            measurements: N training measurements (batch shape (N,)) of this sampler's operator.
            steps: optimizer steps (a resumed run continues up to this number).
            batch_size: measurements per step (one draw z each), ≤ N.
            learning_rate, warmup_steps, clip_norm, ema_decay, checkpoint_dir, checkpoint_every,
                resume, log_every, progress, devices, max_bad_steps: as in :func:`geodiff.train.fit`
                (Adam with linear warm-up, global-norm clipping, atomic checkpoints with exact
                resume, NaN guard, data parallelism).

        Returns:
            ``(trained_sampler, history)``; history entries (per dimension, nats): ``loss`` (KL − log
            p(y) with the exact prior term), ``data`` (−log p(y|x)), ``prior`` (−b(x) or −log p(x)),
            ``log_q``; plus ``base_s`` (seconds to build the per-measurement bases) and the
            timings of :func:`geodiff.train.fit`.
        """
        self.check_measurement(measurements, batched=True, name="measurements")
        t0 = time.perf_counter()
        frozen = self._frozen()
        cache = self._train_cache
        if cache is not None and cache[0] is measurements:     # a resumed or staged fit
            m, b, c = cache[1:]
        else:
            m = jax.tree.map(jnp.asarray, measurements)
            b = jax.block_until_ready(jax.jit(self._base)(frozen, m))
            c = jax.jit(self._features)(frozen["sur"], m, b)
            jax.block_until_ready(c)
            self._train_cache = (measurements, m, b, c)
        base_s = time.perf_counter() - t0
        state, history = _fit(key, self._loss, self.params, {"m": m, "b": b, "c": c}, steps=steps,
                              batch_size=batch_size, learning_rate=learning_rate,
                              warmup_steps=warmup_steps, clip_norm=clip_norm, ema_decay=ema_decay,
                              checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
                              resume=resume, log_every=log_every, progress=progress, devices=devices,
                              max_bad_steps=max_bad_steps, has_aux=True, frozen=frozen)
        history["base_s"] = base_s
        new = copy.copy(self)
        new.params = jax.device_get(state.ema if ema_decay is not None else state.params)
        new.params = jax.tree.map(jnp.asarray, new.params)
        new.history = history
        new._jit_sample = jax.jit(new._sample_impl, static_argnames=("n",))
        new._jit_log_prob = jax.jit(new._log_prob_impl)
        return new, history

    # ---------------------------------------------------------------------- inference
    def _sample_impl(self, params, frozen, m: Measurement, key, n: int):
        """(n, B, V, C) for a batched measurement (B,)."""
        B = m.y.shape[0]
        V, C = frozen["sur"].mean.shape
        b = self._base(frozen, m)
        c = self._features(frozen["sur"], m, b)
        flow = nnx.merge(self._graphdef, params, frozen["consts"])
        z = jax.random.normal(key, (n * B, V, C))
        rep = lambda a: jnp.broadcast_to(a[None], (n, *a.shape)).reshape(n * B, *a.shape[1:])  # noqa: E731
        u, _ = flow.forward(z, rep(flow.encode(c)), encoded=True)   # the encoder once per y
        x, _ = base_forward(self.kind, frozen["sur"], frozen["shared"], jax.tree.map(rep, b), u)
        return x.reshape(n, B, V, C)

    def sample(self, key, measurement: Measurement, n: int = 1):
        """n posterior draws in one pass of the flow (plus the base's per-measurement solve).

        Args:
            key: PRNG key.
            measurement: one measurement (y (Vy, C)) or a batch (y (B, Vy, C)).
            n: samples per measurement (≥ 1).

        Returns:
            (n, V, C) for one measurement, (n, B, V, C) for a batch; normalized data units.
        """
        n = _check_int(n, "n")
        batch = self.check_measurement(measurement)
        m = jax.tree.map(lambda a: jnp.asarray(a)[None] if not batch else jnp.asarray(a), measurement)
        # returned ready: concurrent LAPACK programs can deadlock XLA's CPU runtime
        x = jax.block_until_ready(self._jit_sample(self.params, self._frozen(), m, key, n=n))
        return x[:, 0] if not batch else x

    def _log_prob_impl(self, params, frozen, m: Measurement, x):
        """x (S, B, V, C), m batched (B,) → (S, B)."""
        S, B, V, C = x.shape
        b = self._base(frozen, m)
        c = self._features(frozen["sur"], m, b)
        rep = lambda a: jnp.broadcast_to(a[None], (S, *a.shape)).reshape(S * B, *a.shape[1:])  # noqa: E731
        u, ld_base = base_inverse(self.kind, frozen["sur"], frozen["shared"], jax.tree.map(rep, b),
                                  x.reshape(S * B, V, C))
        flow = nnx.merge(self._graphdef, params, frozen["consts"])
        log_q = flow.log_prob(u, rep(flow.encode(c)), encoded=True) - ld_base
        return log_q.reshape(S, B)

    def log_prob(self, x, measurement: Measurement):
        """Exact log q(x | y) in nats (change of variables through the flow and the base).

        Args:
            x: (..., V, C) signals; the trailing batch dims must match the measurement's, e.g.
                (n, V, C) or (V, C) for one measurement, (n, B, V, C) or (B, V, C) for a batch.
            measurement: one measurement or a batch of B.

        Returns:
            (...,): x's leading shape without (V, C).
        """
        batch = self.check_measurement(measurement)
        x = self.manifold.check_signal(jnp.asarray(x), "x", channels=self.channels)
        nb = len(batch)
        if x.ndim < 2 + nb or tuple(x.shape[x.ndim - 2 - nb:-2]) != batch:
            raise ValueError(f"x must have shape (..., {', '.join(map(str, batch + ('V', 'C')))}) to "
                             f"match the measurement's batch shape {batch}, got {x.shape}")
        lead = x.shape[:x.ndim - 2 - nb]
        m = jax.tree.map(lambda a: jnp.asarray(a)[None] if not batch else jnp.asarray(a), measurement)
        xs = x.reshape(math.prod(lead), max(1, math.prod(batch)), *x.shape[-2:])
        out = jax.block_until_ready(self._jit_log_prob(self.params, self._frozen(), m, xs))
        return out.reshape(*lead, *batch)

    def posterior(self, key, measurement: Measurement, n: int = 128):
        """Posterior mean and std from n samples: ``(mean, std)``, each (V, C) or (B, V, C)."""
        x = self.sample(key, measurement, n)
        return x.mean(axis=0), x.std(axis=0)

    # ---------------------------------------------------------------------- save/load
    def save(self, path) -> Path:
        """Write the sampler (prior, operator, manifold, surrogate, flow) to one ``.npz``,
        atomically; :meth:`load` needs nothing else."""
        path = Path(path)
        spec, spec_arrays = manifold_spec(self.manifold)
        pmeta, parrays = _io.prior_spec(self.prior)
        flat = {f"flow/{'/'.join(map(str, k))}": np.asarray(v)
                for k, v in _flatten(nnx.to_pure_dict(self.params)).items()}
        meta = {"format": FORMAT_VERSION, "class": "AmortizedSampler", "manifold_spec": spec,
                "manifold": repr(self.manifold), "prior": pmeta,
                "operator": _io.operator_spec(self.operator), "prior_term": self.prior_term,
                "n_t": self.n_t, "antithetic": self.antithetic, "prior_weight": self.prior_weight,
                "flow": self.flow_config}
        arrays = {"meta": _io.dumps(meta), **spec_arrays, **parrays, **flat,
                  "surrogate/mean": np.asarray(self.surrogate.mean),
                  "surrogate/factor": np.asarray(self.surrogate.factor),
                  "surrogate/nugget": np.asarray(self.surrogate.nugget)}
        atomic_savez(path, **arrays)
        return path

    @classmethod
    def load(cls, path) -> "AmortizedSampler":
        """Read a sampler written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"path: no saved sampler at {str(path)!r}")
        with np.load(path, allow_pickle=False) as f:
            if "meta" not in f.files:
                raise ValueError(f"path: {str(path)!r} is not a saved AmortizedSampler")
            meta = _io.loads(f["meta"])
            if meta.get("class") != "AmortizedSampler":
                raise ValueError(f"path: {str(path)!r} is not a saved AmortizedSampler")
            arrays = {k: f[k] for k in f.files}
        manifold = manifold_from_spec(meta["manifold_spec"], arrays)
        prior = _io.prior_from_spec(meta["prior"], arrays, manifold)
        operator = _io.operator_from_spec(meta["operator"], manifold)
        sur = GaussianSurrogate(*(jnp.asarray(arrays[f"surrogate/{k}"])
                                  for k in ("mean", "factor", "nugget")))
        fc = meta["flow"]
        out = cls(manifold, prior, operator, prior_term=meta["prior_term"], surrogate=sur,
                  n_t=meta["n_t"], antithetic=meta["antithetic"], prior_weight=meta["prior_weight"],
                  flow=ConditionalRealNVP(manifold, channels=prior.channels,
                                          condition_channels=2 * prior.channels + 1,
                                          n_steps=fc["n_steps"], conditioner=fc["conditioner"],
                                          hidden=fc["hidden"], n_eig=fc["n_eig"],
                                          local_hidden=fc.get("local_hidden", 0),  # files before 0.3
                                          encoder_width=fc.get("encoder_width", 0),  # older files: none
                                          encoder_blocks=fc.get("encoder_blocks", 2),
                                          max_log_scale=fc["max_log_scale"], seed=fc["seed"]))
        flat = {tuple(_key(p) for p in k.split("/")[1:]): arrays[k] for k in arrays
                if k.startswith("flow/")}
        pure = nnx.to_pure_dict(out.params)
        if set(_flatten(pure)) != set(flat):
            raise ValueError(f"path: flow parameters in {str(path)!r} do not match its flow config")
        nnx.replace_by_pure_dict(out.params, _unflatten(flat))
        return out

