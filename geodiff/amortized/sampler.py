"""Amortized posterior sampling (APS): a conditional flow distilled from a prior and an operator
(docs/amortized.md).

The sampler draws ``x = m(y) + L₀(y)·G_φ(z; c(y))``, ``z ~ N(0, τ² I)``:

* ``m``: the centre, the prior's best one-pass estimate: the Tweedie (Noise2Score) posterior mean
  of the prior for :class:`~geodiff.operators.Denoise` (``centre="tweedie"``), or the exact
  posterior mean m₀ of a Gaussian *surrogate* of the prior (kriging; ``centre="surrogate"``),
  or K plug-and-play steps from m₀ that alternate the prior's Tweedie denoiser with an exact
  data-consistency step (``centre="pnp"``; any linear operator, K network evaluations per
  measurement, docs/amortized.md);
* ``L₀``: a square root of the surrogate's posterior covariance (:mod:`geodiff.amortized.surrogate`);
* ``G_φ``: a :class:`~geodiff.flows.ConditionalRealNVP` on the whitened coordinates, conditioned on
  ``c(y)`` = [(m − μ)/s, Aᵀ(y − Aμ)/√(s² + σ²), mask, sd₀/s] (μ, s the surrogate's prior mean
  and std, σ the noise std, sd₀ the base's per-entry std); its conditioners see inputs clipped
  to ±``input_bound``. It starts as the identity, so an untrained sampler's mean *is* its
  centre and (with the surrogate centre) it samples the surrogate posterior exactly;
* ``τ``: the base temperature, 1 until :meth:`AmortizedSampler.calibrate` sets it.

With ``centre="mixture"`` the base is instead the exact posterior of a Gaussian-*mixture*
surrogate (:mod:`geodiff.amortized.mixture`: a component k ~ π_k(y), then ``x_b = m_k(y) +
L_k(y)·z``), and the flow acts after it on the standardized signal:
``x = μ + s·G_φ((x_b − μ)/s; c(y))``. The base's density is a closed-form mixture, so
``log_prob`` stays exact; an untrained sampler samples the mixture posterior exactly.

Three objectives (:meth:`AmortizedSampler.fit`):

* ``"reverse"`` (the paper's loss, measurements only): per measurement and draw z (reported per
  dimension D = V·C) ``log q(x | y) − log p(y | x) − λ · b(x)``, x = G(z, y), whose mean is
  KL(q(·|y) ‖ p(·|y)) − log p(y) when ``b = log p`` (``prior_term="exact"``) and an upper bound of
  it with the diffusion ELBO (``prior_term="elbo"``, the method);
* ``"pairs"`` (simulated-pair distillation, forward KL): ``−log q(x | A(x) + n)`` over clean prior
  signals x with a fresh operator draw and noise each step;
* ``"pairs+reverse"``: pairs, then a fine-tune with the paper's loss on the measurements.

Dimension letters: N training measurements, B batch, n samples, V vertices, C channels, Vy
measured entries, D = V·C.
"""

from __future__ import annotations

import collections
import copy
import functools
import hashlib
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from geodiff._cache import atomic_savez, read_npz
from geodiff.amortized import batch as _batch
from geodiff.amortized import io as _io
from geodiff.amortized.mixture import (MixtureSurrogate, check_mixture_operator, mixture_base_params,
                                       mixture_draw, mixture_log_prob, mixture_shared)
from geodiff.amortized.surrogate import (GaussianSurrogate, base_forward, base_inverse, base_params,
                                         base_std, dense_posterior, draw_prior, selection_factor,
                                         selection_shared, solver_kind)
from geodiff.diffusion.base import Prior
from geodiff.diffusion.prior import _flatten, _key, _unflatten, _version
from geodiff.flows import ConditionalRealNVP
from geodiff.manifolds import Manifold
from geodiff.manifolds.spec import manifold_from_spec, manifold_spec
from geodiff.operators import LinearOperator, Measurement
from geodiff.train import fit as _fit

FORMAT_VERSION = 3
PRIOR_TERMS = ("elbo", "exact")
CENTRES = ("auto", "surrogate", "tweedie", "pnp", "mixture")
OBJECTIVES = ("reverse", "pairs", "pairs+reverse")


def _check_temperature(value) -> float:
    if not (isinstance(value, (int, float, np.floating)) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {value!r}")
    return float(value)


def _concat_histories(stages):
    """One history from consecutive stages [(name, History)]: lists concatenated (steps and times
    running on; NaN where a stage lacks an entry), ``stage`` naming each entry's stage, scalars
    summed (``n_bad``, ``compile_s``) or taken from the last stage (``step_s``)."""
    from geodiff.train import History

    keys = []
    for _, h in stages:
        keys += [k for k, v in h.items() if isinstance(v, list) and k not in keys]
    out = History({k: [] for k in keys})
    out["stage"] = []
    step0 = time0 = 0.0
    for name, h in stages:
        n = len(h["step"])
        for k in keys:
            vals = h.get(k, [float("nan")] * n)
            if k == "step":
                vals = [int(v + step0) for v in vals]
            elif k == "time":
                vals = [v + time0 for v in vals]
            out[k].extend(vals)
        out["stage"].extend([name] * n)
        step0, time0 = out["step"][-1], out["time"][-1]
    out["n_bad"] = sum(h.get("n_bad", 0) for _, h in stages)
    out["compile_s"] = sum(h.get("compile_s", 0.0) for _, h in stages)
    out["step_s"] = stages[-1][1].get("step_s", float("nan"))
    return out


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
            ``manifold`` here if it is not bound yet): ``Mask``, ``RandomMask`` and ``Denoise``
            (exact per-measurement base in O(D R²); a sampler built with ``RandomMask`` takes
            ``Mask`` measurements of real data with gaps too), ``Blur`` and ``SuperResolution`` (shared dense base,
            D ≤ 8192).
        flow: a :class:`~geodiff.ConditionalRealNVP` with ``channels=C`` and
            ``condition_channels=3C + 1`` on ``manifold``; None builds one from ``n_steps``,
            ``conditioner``, ``hidden``, ``n_eig``, ``local_hidden``, ``encoder_width``,
            ``encoder_blocks``, ``input_bound`` and ``seed``.
        centre: the base mean m(y). ``"tweedie"``: the prior's Tweedie estimate at the
            measurement's noise level (Noise2Score: one network evaluation per measurement;
            :class:`~geodiff.operators.Denoise` only). ``"surrogate"``: the surrogate's exact
            posterior mean (kriging). ``"mixture"``: the exact posterior of a Gaussian-*mixture*
            surrogate (``mixture``; a multimodal base with closed-form weights, masks and
            Denoise only); the flow then acts on the standardized signal (x − μ)/s after the
            base draw. ``"pnp"``: ``pnp_steps`` plug-and-play (half-quadratic splitting) steps
            from the surrogate's posterior mean, each a Tweedie denoising of the prior at noise
            ratio ρ_k followed by the exact data-consistency step argmin_x ‖A x − y‖²/σ² +
            ‖x − x̂_k‖²/ρ_k² (``pnp_cg`` conjugate-gradient iterations); any linear operator,
            K network evaluations per measurement, not per sample; the base's spread stays the
            surrogate posterior's. ``"auto"`` (default): Tweedie for Denoise, else the surrogate.
        temperature: τ > 0, std of the flow's latent z (1: untempered; set by :meth:`calibrate`).
        prior_term: ``"elbo"`` (the method: the diffusion ELBO b(x) with ``n_t`` stratified
            draws) or ``"exact"`` (``prior.log_prob``, for analytic priors; for studies).
        surrogate: the Gaussian surrogate of the prior: a :class:`GaussianSurrogate`, or prior
            samples (S, V, C) to fit one to (rank ``surrogate_rank``); None draws
            ``surrogate_samples`` samples from ``prior.sample`` (slow for a DiffusionPrior on a
            CPU: pass samples such as the prior's training set instead).
        surrogate_samples: S when drawing from the prior.
        surrogate_rank: R, rank of the surrogate covariance (≤ S − 1).
        mixture: with ``centre="mixture"``, a :class:`MixtureSurrogate`, or None to fit one by EM
            (``mixture_components`` components of rank ``mixture_rank``) to the same prior samples
            as the Gaussian surrogate (``surrogate`` must then be samples or None).
        pnp_steps: K, plug-and-play steps of ``centre="pnp"``.
        pnp_noise: (ρ_max, ρ_min), the first and last noise ratios σ_t/α_t of the ``"pnp"``
            steps (geometric in between), in the data's units; both inside the prior's noise
            range and ρ_max ≥ ρ_min > 0. None: ``(s̄, 0.4 σ)`` with s̄ the rms of the
            surrogate's prior std and σ the operator's noise std.
        pnp_cg: conjugate-gradient iterations of each ``"pnp"`` data-consistency step (exact
            after 2 for masks and Denoise).
        mixture_components: K, components of the fitted mixture.
        mixture_rank: R, rank of each fitted component.
        n_t: (t, ε) draws per signal of the ELBO (``prior_term="elbo"``).
        antithetic: draw them as antithetic pairs (t, ±ε) (``n_t`` even), which cancels the
            gradient noise that is linear in ε (exactly so for Gaussian priors).
        prior_weight: λ, weight of the prior term (1 in the paper).
        n_steps: the default flow's flow steps (this and the next seven: used when ``flow`` is
            None; see :class:`~geodiff.ConditionalRealNVP`).
        conditioner: the default flow's conditioner, ``"spectral"`` or ``"dense"``.
        hidden: the default flow's H.
        n_eig: the default flow's K.
        local_hidden: the default flow's per-vertex MLP width (0: off).
        encoder_width: the default flow's condition-encoder width (0: no encoder).
        encoder_blocks: the default flow's encoder blocks.
        input_bound: the default flow's soft clip b of what its conditioners see, in the
            whitened and standardized units of the draws and the condition (None: off; see
            :class:`~geodiff.ConditionalRealNVP`). 4 keeps a pair-trained flow from
            extrapolating on signals outside its training range (docs/amortized.md,
            "Out-of-range signals").
        seed: seeds the default flow; also draws the surrogate samples.

    Attributes:
        manifold: as given.
        prior: as given.
        operator: as given, bound to ``manifold``.
        flow: the conditional flow (given or built).
        surrogate: the fitted (or given) :class:`GaussianSurrogate`.
        prior_term: as given.
        n_t: as given.
        antithetic: as given.
        prior_weight: as given.
        centre: the resolved centre, ``"tweedie"``, ``"surrogate"``, ``"pnp"`` or ``"mixture"``.
        pnp: with ``centre="pnp"``, ``{"steps": K, "noise": (ρ_max, ρ_min), "cg": iterations}``
            (else None).
        mixture: the :class:`MixtureSurrogate` (centre="mixture"; else None).
        temperature: τ.
        history: the training history of the latest :meth:`fit` (None before).

    Raises:
        ValueError / TypeError: bad arguments, naming the argument and what was expected.
    """

    def __init__(self, manifold: Manifold, prior: Prior, operator: LinearOperator, *,
                 flow: ConditionalRealNVP | None = None, centre: str = "auto",
                 temperature: float = 1.0, prior_term: str = "elbo", surrogate=None,
                 surrogate_samples: int = 2048, surrogate_rank: int = 256, mixture=None,
                 pnp_steps: int = 8, pnp_noise: tuple[float, float] | None = None, pnp_cg: int = 32,
                 mixture_components: int = 4, mixture_rank: int = 32, n_t: int = 4,
                 antithetic: bool = True, prior_weight: float = 1.0, n_steps: int = 8,
                 conditioner: str = "spectral",
                 hidden: int = 256, n_eig: int = 64, local_hidden: int = 0, encoder_width: int = 0,
                 encoder_blocks: int = 2, input_bound: float | None = 4.0, seed: int = 0):
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
        if centre not in CENTRES:
            raise ValueError(f"centre must be one of {CENTRES}, got {centre!r}")
        is_denoise = type(operator).__name__ == "Denoise"
        if centre == "tweedie" and not is_denoise:
            raise ValueError(f"centre='tweedie' needs a Denoise operator (Tweedie's formula gives "
                             f"E[x | y] for y = x + noise), got {type(operator).__name__}; use "
                             "centre='surrogate'")
        if centre in ("mixture", "pnp"):
            if centre == "mixture":
                check_mixture_operator(operator)
            self.centre = centre
        else:
            self.centre = "tweedie" if (centre == "tweedie" or (centre == "auto" and is_denoise)) \
                else "surrogate"
        if mixture is not None and self.centre != "mixture":
            raise ValueError(f"mixture is used with centre='mixture' only, not centre={centre!r}")
        if self.centre == "tweedie":
            t_star = float(prior.sde.t_from_noise_ratio(operator.sigma))
            if not prior.sde.t0 <= t_star <= 1:
                raise ValueError(f"operator.sigma = {operator.sigma} is outside the prior's noise "
                                 f"range (t* = {t_star:.3g} not in [t0, 1]): centre='tweedie' "
                                 "cannot be used")
            self._t_star = t_star
        self.temperature = _check_temperature(temperature)
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
        samples = None
        if surrogate is None:
            if self.centre == "mixture" and mixture is None:   # the mixture needs the samples too
                samples = draw_prior(jax.random.key(seed), prior,
                                     _check_int(surrogate_samples, "surrogate_samples", 2))
                surrogate = GaussianSurrogate.fit(samples, rank=_check_int(surrogate_rank,
                                                                           "surrogate_rank"))
            else:
                surrogate = GaussianSurrogate.from_prior(
                    jax.random.key(seed), prior,
                    n_samples=_check_int(surrogate_samples, "surrogate_samples", 2),
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
        self.mixture = self._mshared = None
        self.pnp = None
        if self.centre == "pnp":
            self.pnp = self._check_pnp(pnp_steps, pnp_noise, pnp_cg)
        elif (pnp_steps, pnp_noise, pnp_cg) != (8, None, 32):
            raise ValueError(f"pnp_steps, pnp_noise and pnp_cg are used with centre='pnp' only, "
                             f"not centre={centre!r}")
        if self.centre == "mixture":
            if mixture is None:
                if samples is None:
                    raise ValueError("centre='mixture' fits its mixture to prior samples: pass "
                                     "mixture= (a MixtureSurrogate), or prior samples (S, V, C) "
                                     "or None as surrogate=, not a GaussianSurrogate")
                mixture = MixtureSurrogate.fit(
                    samples, components=_check_int(mixture_components, "mixture_components"),
                    rank=_check_int(mixture_rank, "mixture_rank"), seed=seed)
            elif not isinstance(mixture, MixtureSurrogate):
                raise TypeError(f"mixture must be a MixtureSurrogate, got {type(mixture).__name__}")
            if tuple(mixture.mean.shape[1:]) != (V, C):
                raise ValueError(f"mixture.mean must have shape (K, {V}, {C}), got "
                                 f"{tuple(mixture.mean.shape)}")
            self.mixture = mixture
            self._mshared = mixture_shared(mixture)

        cc = 3 * C + 1
        if flow is None:
            flow = ConditionalRealNVP(manifold, channels=C, condition_channels=cc, n_steps=n_steps,
                                      conditioner=conditioner, hidden=hidden, n_eig=n_eig,
                                      local_hidden=local_hidden, encoder_width=encoder_width,
                                      encoder_blocks=encoder_blocks, input_bound=input_bound,
                                      seed=seed)
        elif not isinstance(flow, ConditionalRealNVP):
            raise TypeError(f"flow must be a ConditionalRealNVP, got {type(flow).__name__}")
        if (flow.n_vertices, flow.channels, flow.condition_channels) != (V, C, cc):
            raise ValueError(f"flow must have n_vertices={V}, channels={C} and condition_channels="
                             f"{cc} (3C + 1), got {flow.n_vertices}, {flow.channels}, "
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
        self._jit_summary = jax.jit(self._summary_impl, static_argnames=("n", "quantiles", "keep"))
        self._jit_log_prob = jax.jit(self._log_prob_impl)

    def _check_pnp(self, steps, noise, cg) -> dict:
        """Validate the ``"pnp"`` settings; the default noise range from the surrogate."""
        steps, cg = _check_int(steps, "pnp_steps"), _check_int(cg, "pnp_cg")
        if noise is None:
            s_bar = float(jnp.sqrt(jnp.mean(self.surrogate.marginal_std ** 2)))
            noise = (s_bar, 0.4 * self.operator.sigma)
        try:
            hi, lo = (float(v) for v in noise)
        except (TypeError, ValueError):
            raise ValueError(f"pnp_noise must be a pair (ρ_max, ρ_min) of numbers, got {noise!r}") \
                from None
        sde = self.prior.sde
        lam_lo, lam_hi = float(sde.noise_ratio(sde.t0)), float(sde.noise_ratio(1.0))
        if not (math.isfinite(hi) and math.isfinite(lo) and 0 < lo <= hi):
            raise ValueError(f"pnp_noise must satisfy ρ_max ≥ ρ_min > 0, got {noise!r}")
        if lo < lam_lo or hi > lam_hi:
            raise ValueError(f"pnp_noise = ({hi:.4g}, {lo:.4g}) must lie inside the prior's noise "
                             f"range [{lam_lo:.4g}, {lam_hi:.4g}] (σ_t/α_t at t0 and 1)")
        # the schedule as Python numbers (t_k, α_k, ρ_k), computed here, outside any trace
        rhos = np.geomspace(hi, lo, steps)
        ts = [float(sde.t_from_noise_ratio(r)) for r in rhos]
        self._pnp_schedule = [(t, float(sde.alpha(t)), float(r)) for t, r in zip(ts, rhos)]
        return {"steps": steps, "noise": (hi, lo), "cg": cg}

    def _pnp_centre(self, m: Measurement, start):
        """K plug-and-play steps from ``start`` (B, V, C): x̂_k = Tweedie denoising at noise
        ratio ρ_k of the current iterate, then the exact data-consistency step
        argmin_x ‖A x − y‖²/σ² + ‖x − x̂_k‖²/ρ_k² (conjugate gradients); returns (B, V, C)."""
        op = self.operator
        s2 = op.sigma ** 2
        aty = op.adjoint(m.y, m)

        def dot(a, b):
            return jnp.sum(a * b, axis=(-2, -1), keepdims=True)

        x = start
        for t, a, rho in self._pnp_schedule:
            xhat = self.prior.denoise(a * x, t).astype(start.dtype)
            w = rho ** 2 / s2                  # (w AᵀA + I) x = w Aᵀy + x̂

            def apply(v, w=w):
                return w * op.adjoint(op.forward(v, m), m) + v

            x = xhat
            r = w * aty + xhat - apply(x)
            p, rr = r, dot(r, r)

            def body(_, state, apply=apply):
                x, r, p, rr = state
                ap = apply(p)
                alpha = rr / jnp.maximum(dot(p, ap), jnp.finfo(p.dtype).tiny)
                x, r = x + alpha * p, r - alpha * ap
                rr_new = dot(r, r)
                p = r + rr_new / jnp.maximum(rr, jnp.finfo(p.dtype).tiny) * p
                return x, r, p, rr_new

            x = jax.lax.fori_loop(0, self.pnp["cg"], body, (x, r, p, rr))[0]
        return x

    # ------------------------------------------------------------------------ helpers
    def __repr__(self) -> str:
        return (f"AmortizedSampler({self.manifold!r}, {type(self.prior).__name__}, "
                f"{type(self.operator).__name__}(sigma={self.operator.sigma}), "
                f"centre={self.centre!r}, temperature={self.temperature:.4g}, "
                f"prior_term={self.prior_term!r}, rank={self.surrogate.rank}"
                + (f", mixture K={self.mixture.n_components})" if self.mixture is not None else ")"))

    @property
    def flow(self) -> ConditionalRealNVP:
        """The flow G_φ with the current parameters."""
        return nnx.merge(self._graphdef, self.params, self._consts)

    @property
    def n_params(self) -> int:
        return int(sum(np.size(a) for a in jax.tree.leaves(self.params)))

    def _frozen(self) -> dict:
        return {"consts": self._consts, "sur": self.surrogate, "shared": self._shared,
                "mix": self.mixture, "mshared": self._mshared,
                "tau": jnp.float32(self.temperature)}

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
        # params may be left out (a measurement built by hand from y and mask: nothing here reads
        # a mask's recorded ratio), but none the operator does not make may be added
        params = measurement.params if isinstance(measurement.params, dict) else None
        if params is None or set(params) - set(tpl.params):
            raise ValueError(f"{name}.params has entries {sorted(params or [])}, but "
                             f"{type(self.operator).__name__} makes {sorted(tpl.params)}: was it "
                             "taken with another operator?")
        pairs = [(measurement.mask, tpl.mask, "mask")] + [
            (params[k], tpl.params[k], f"params[{k!r}]") for k in params]
        for a, t, field in pairs:
            if jax.tree.structure(a) != jax.tree.structure(t):
                raise ValueError(f"{name}.{field} has structure {jax.tree.structure(a)}, expected "
                                 f"{jax.tree.structure(t)}: was it taken with another operator?")
            for a_, t_ in zip(jax.tree.leaves(a), jax.tree.leaves(t)):
                if tuple(getattr(a_, "shape", ())) != batch + tuple(t_.shape):
                    raise ValueError(f"{name}.{field} must have shape {batch + tuple(t_.shape)} "
                                     f"(batch {batch} of y, then {tuple(t_.shape)} for "
                                     f"{type(self.operator).__name__}), got "
                                     f"{tuple(getattr(a_, 'shape', ()))}")
                if np.dtype(a_.dtype).kind != np.dtype(t_.dtype).kind:
                    raise TypeError(f"{name}.{field} must have dtype {t_.dtype}, got {a_.dtype}")
        if np.dtype(y.dtype).kind != "f":
            raise TypeError(f"{name}.y must be a floating-point array, got dtype {y.dtype}")
        if not isinstance(y, jax.core.Tracer):
            # on the host where the data already are (NumPy, or the CPU: one eager device op
            # costs more than this whole check); on an accelerator a device reduction, not a copy
            on_host = not isinstance(y, jax.Array) or all(d.platform == "cpu" for d in y.devices())
            xp = np if on_host else jnp
            if not bool(xp.all(xp.isfinite(y))):
                raise ValueError(f"{name}.y contains NaN or infinite values")
            if self.kind == "dense" or type(self.operator).__name__ == "Denoise":
                if not bool(xp.all(measurement.mask)):
                    raise ValueError(f"{name}.mask has missing entries, but "
                                     f"{type(self.operator).__name__} observes every entry: was it "
                                     "taken with another operator?")
        return batch

    def _features(self, sur, m: Measurement, b: dict):
        """Condition c(y) (B, V, 3C + 1) = [(m − μ)/s, Aᵀ(y − Aμ)/√(s² + σ²), mask, sd₀/s].

        The residual is scaled by its predictive std under the surrogate, √(s² + σ²) (exact for
        masks and Denoise, a per-vertex scale for dense operators), not by s alone: where the
        prior signals hardly vary (s at its floor) a residual over s would be O(σ/s) in
        training and far larger on a test signal that leaves the training range, and the
        conditioner would extrapolate (docs/amortized.md, "Out-of-range signals")."""
        B = m.y.shape[0]
        V, C = sur.mean.shape
        sd = sur.marginal_std
        mu = jnp.broadcast_to(sur.mean, (B, V, C))
        scale = jnp.sqrt(sd**2 + jnp.asarray(self.operator.sigma, sd.dtype) ** 2)
        back = self.operator.adjoint(m.y - self.operator.forward(mu, m), m) / scale
        mask = m.mask.astype(sd.dtype) if self.kind == "selection" else jnp.ones((B, V, 1), sd.dtype)
        return jnp.concatenate([(b["m0"] - sur.mean) / sd, back, mask, b["std"] / sd], axis=-1)

    def _base(self, frozen, m: Measurement) -> dict:
        """The base of B measurements: ``m0`` (B, V, C) is the centre m(y), ``std`` (B, V, C) the
        base's per-entry std, plus the surrogate solver's covariance factor."""
        if self.centre == "mixture":
            return mixture_base_params(self.operator, m, frozen["mix"], frozen["mshared"])
        b = base_params(self.operator, m, frozen["sur"], shared=frozen["shared"])
        if self.centre == "tweedie":
            t = self._t_star
            b["m0"] = jax.lax.stop_gradient(
                self.prior.denoise(self.prior.sde.alpha(t) * m.y, t).astype(b["m0"].dtype))
        elif self.centre == "pnp":
            b["m0"] = jax.lax.stop_gradient(self._pnp_centre(m, b["m0"]))
        b["std"] = base_std(self.kind, frozen["sur"], frozen["shared"], b)
        return b

    def _strip(self, b: dict) -> dict:
        """The base without its ``std`` (used only by the condition), except for the mixture,
        whose density diagnostics standardize by it."""
        return b if self.centre == "mixture" else {k: v for k, v in b.items() if k != "std"}

    def _draw(self, flow, frozen, b: dict, c, z, key, *, encoded: bool = False,
              log_q: bool = True, comp=None, prepared=None):
        """x = G(z; y) for latents z (B, V, C) ~ N(0, τ² I) of B measurements with bases ``b``
        (without ``std``) and conditions ``c``; returns ``(x, log q(x | y))`` ((B,) nats; None
        with ``log_q=False``). ``key`` picks the mixture component (centre='mixture'), unless
        ``comp`` (B,) gives the components. ``prepared``: the flow's :meth:`prepare` of the
        distinct conditions (c unused; z may hold n draws of each)."""
        sur = frozen["sur"]
        if self.centre == "mixture":
            xb = mixture_draw(key, frozen["mix"], b, z, comp=comp)
            x, ld = self._mixture_flow(flow, sur, xb, c, encoded=encoded, prepared=prepared)
            return x, (mixture_log_prob(frozen["mix"], b, xb, frozen["tau"]) - ld) if log_q else None
        u, ld = flow.forward(z, c, encoded=encoded, prepared=prepared)
        x, ld_base = base_forward(self.kind, sur, frozen["shared"], b, u)
        return x, (self._log_latent(z, frozen["tau"]) - ld - ld_base) if log_q else None

    @staticmethod
    def _mixture_flow(flow, sur, xb, c, *, encoded: bool = False, prepared=None):
        """The flow on the mixture base's draws xb (B, V, C), in the surrogate's standardized
        units; returns (x, log|det|) ((B,) nats)."""
        sd = sur.marginal_std
        v, ld = flow.forward((xb - sur.mean) / sd, c, encoded=encoded, prepared=prepared)
        return sur.mean + sd * v, ld

    def _density(self, flow, frozen, b: dict, c, x, *, encoded: bool = False, prepared=None):
        """Exact log q(x | y) (B,) nats of signals x (B, V, C) of B measurements; also the
        latent's rms (a diagnostic: ≈ τ when the flow fits)."""
        sur = frozen["sur"]
        if self.centre == "mixture":
            sd = sur.marginal_std
            w, ld_inv = flow.inverse((x - sur.mean) / sd, c, encoded=encoded, prepared=prepared)
            xb = sur.mean + sd * w
            return (mixture_log_prob(frozen["mix"], b, xb, frozen["tau"]) + ld_inv,
                    jnp.sqrt(jnp.mean(((xb - b["m0"]) / b["std"]) ** 2)))
        u, ld_base = base_inverse(self.kind, sur, frozen["shared"], b, x)
        z, ld_inv = flow.inverse(u, c, encoded=encoded, prepared=prepared)
        return self._log_latent(z, frozen["tau"]) + ld_inv - ld_base, jnp.sqrt(jnp.mean(z**2))

    @staticmethod
    def _log_latent(z, tau):
        """log N(z; 0, τ² I) over all V·C entries (the sampler draws z on all of them), (B,)."""
        d = z.shape[-2] * z.shape[-1]
        tau = jnp.asarray(tau, z.dtype)               # float64 checks stay float64
        return (-0.5 * jnp.sum(z**2, axis=(-2, -1)) / tau**2
                - d * (jnp.log(tau) + 0.5 * math.log(2 * math.pi)))

    # ---------------------------------------------------------------------- training
    def _loss_reverse(self, params, batch, key, frozen, *, stl: bool = False):
        """The paper's loss on measurements: log q(x|y) − log p(y|x) − λ b(x), x = G(z, y).

        ``stl``: sticking-the-landing path gradient (Roeder et al. 2017): log q is evaluated with
        the flow's parameters held fixed at x(φ), which drops the zero-mean score term of the
        gradient; the loss value is unchanged."""
        flow = nnx.merge(self._graphdef, params, frozen["consts"])
        m, b, c = batch["m"], batch["b"], batch["c"]
        sur = frozen["sur"]
        B = m.y.shape[0]
        V, C = sur.mean.shape
        D = V * C
        k_z, k_p = jax.random.split(key)
        k_z, k_k = jax.random.split(k_z)
        z = frozen["tau"] * jax.random.normal(k_z, (B, V, C))
        x, log_q = self._draw(flow, frozen, b, c, z, k_k)
        s2 = self.operator.sigma**2
        resid = m.y - self.operator.forward(x, m)
        n_obs = jnp.sum(m.mask, axis=(-2, -1)) * C
        log_lik = -0.5 * jnp.sum(resid**2, axis=(-2, -1)) / s2 - 0.5 * n_obs * math.log(2 * math.pi * s2)
        if stl:
            fixed = nnx.merge(self._graphdef, jax.lax.stop_gradient(params), frozen["consts"])
            log_q, _ = self._density(fixed, frozen, b, c, x)
        if self.prior_term == "exact":
            log_p = self.prior.log_prob(x)
        else:
            log_p = self.prior.elbo(k_p, x, n_t=self.n_t, antithetic=self.antithetic)
        per = log_q - log_lik - self.prior_weight * log_p
        aux = {"data": -jnp.mean(log_lik) / D, "prior": -jnp.mean(log_p) / D,
               "log_q": jnp.mean(log_q) / D}
        return jnp.mean(per) / D, aux


    def _loss_pairs(self, params, batch, key, frozen):
        """Forward KL on simulated pairs: −log q(x | A(x) + n) per dimension, with a fresh operator
        draw and noise for each signal x; x from ``batch["x"]`` or, without signals, fresh exact
        draws of an analytic prior."""
        flow = nnx.merge(self._graphdef, params, frozen["consts"])
        sur = frozen["sur"]
        V, C = sur.mean.shape
        k_x, k_m = jax.random.split(key)
        if "x" in batch:
            x = batch["x"]
        else:
            x = self.prior.sample(k_x, batch["n"].shape[0]).astype(sur.mean.dtype)
        m = self.operator.measure(k_m, x)
        b = self._base(frozen, m)
        c = self._features(sur, m, b)
        b = self._strip(b)
        log_q, z_rms = self._density(flow, frozen, b, c, x)
        nll = -jnp.mean(log_q) / (V * C)
        return nll, {"nll": nll, "z_rms": z_rms}

    def _check_signals(self, signals, name: str = "signals"):
        """Validated clean prior signals (N, V, C) float32, or None (draw from an analytic prior)."""
        V, C = self.manifold.n_vertices, self.channels
        if signals is None:
            if not hasattr(self.prior, "log_prob_t"):
                raise ValueError(f"{name}=None draws fresh signals from the prior, which needs an "
                                 f"analytic prior with exact samples (GaussianPrior, "
                                 f"GaussianMixturePrior); {type(self.prior).__name__} needs "
                                 f"{name}= clean prior signals (N, {V}, {C}): its training set or "
                                 "samples drawn with prior.sample")
            return None
        x = np.asarray(signals)
        if x.ndim != 3 or x.shape[1:] != (V, C) or len(x) < 1:
            raise ValueError(f"{name} must have shape (N, {V}, {C}) (clean prior signals on "
                             f"{self.manifold!r}), got {x.shape}")
        if not np.issubdtype(x.dtype, np.number):
            raise TypeError(f"{name} must be a numeric array, got dtype {x.dtype}")
        if not np.all(np.isfinite(x)):
            raise ValueError(f"{name} contains NaN or infinite values")
        return jnp.asarray(x, jnp.float32)

    def _validator(self, validation, *, draws: int):
        """``params -> held-out loss`` (per dimension, mean over items and ``draws`` fixed keys)."""
        frozen = self._frozen()
        keys = jax.random.split(jax.random.key(20_261_202), draws)
        if isinstance(validation, Measurement):
            self.check_measurement(validation, batched=True, name="validation")
            m = jax.tree.map(jnp.asarray, validation)
            b = jax.jit(self._base)(frozen, m)
            c = jax.jit(self._features)(frozen["sur"], m, b)
            batch = {"m": m, "b": self._strip(b), "c": c}
            one = jax.jit(lambda p, k: self._loss_reverse(p, batch, k, frozen)[0])
        else:
            x = self._check_signals(validation, "validation")
            if x is None:
                raise ValueError("validation must be held-out measurements or clean signals")
            one = jax.jit(lambda p, k: self._loss_pairs(p, {"x": x}, k, frozen)[0])

        def validate(params):
            return float(np.mean([float(one(params, k)) for k in keys]))
        return validate

    def _measurement_batch(self, measurements):
        """(m, b, c) of the training measurements, cached on the sampler so a staged or resumed fit
        does not solve the bases again; also returns the seconds it took."""
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
            b = self._strip(b)
            self._train_cache = (measurements, m, b, c)
        return (m, b, c), time.perf_counter() - t0

    def fit(self, key, measurements: Measurement | None = None, *, steps: int,
            objective: str = "reverse", signals=None, finetune_steps: int | None = None,
            stl: bool = False, batch_size: int = 64, learning_rate: float = 3e-4,
            warmup_steps: int = 100, clip_norm: float | None = 1.0, ema_decay: float | None = None,
            checkpoint_dir=None, checkpoint_every: int = 500, resume: bool = True,
            log_every: int = 10, progress: bool = True, devices=None,
            max_bad_steps: int = 100, validation=None,
            val_draws: int = 4) -> tuple["AmortizedSampler", dict]:
        """Train the flow. The receiver keeps its parameters; it only caches the bases of
        ``measurements``, so a staged or resumed fit on the same object does not solve them again.

        What the sampler learns from (say so when reporting it):

        * ``"reverse"``: the paper's loss on ``measurements`` only (no ground truth);
        * ``"pairs"``: clean prior signals, ``signals`` (the prior's training set, or draws of the
          prior; never test signals) or, with ``signals=None`` and an analytic prior, fresh exact
          prior draws each step. Each step measures the batch anew (fresh masks and noise) and
          maximises log q(x | A(x) + n). ``measurements`` may be None;
        * ``"pairs+reverse"``: ``steps`` of pairs, then ``finetune_steps`` of the paper's loss on
          ``measurements``.

        Args:
            key: PRNG key.
            measurements: N training measurements (batch shape (N,)) of this sampler's operator.
            steps: optimizer steps of the first (or only) objective (a resumed run continues up to
                this number).
            objective: ``"reverse"``, ``"pairs"`` or ``"pairs+reverse"``.
            signals: (N, V, C) clean prior signals for the pair objectives, or None (analytic
                priors only).
            finetune_steps: reverse steps after pairs (``"pairs+reverse"``; default steps // 4).
            stl: path (sticking-the-landing) gradient for the reverse loss.
            batch_size: measurements (or signals) per step (one draw z each).
            learning_rate: as in :func:`geodiff.train.fit` (Adam), like the next ten.
            warmup_steps: linear warm-up steps.
            clip_norm: global-norm gradient clipping.
            ema_decay: decay of the parameters' EMA.
            checkpoint_dir: atomic checkpoints with exact resume. With ``"pairs+reverse"`` the two
                stages checkpoint in ``checkpoint_dir/pairs`` and ``checkpoint_dir/reverse``.
            checkpoint_every: steps between checkpoints.
            resume: resume from ``checkpoint_dir``.
            log_every: steps between history entries.
            progress: show a progress bar.
            devices: data parallelism.
            max_bad_steps: the NaN guard.
            validation: held-out data that picks the parameters returned (return-best): the
                untrained flow and the end of each stage (the EMA where ``ema_decay`` is set)
                are scored with common random numbers and the lowest loss wins. Held-out
                *measurements* (a :class:`Measurement`, batch (M,); no ground truth) are scored
                by the paper's loss; held-out clean *signals* (M, V, C) by the pair loss on fresh
                measurements of them. None: the end of the last stage.
            val_draws: draws (z, operator noise) per validation item.

        Returns:
            ``(trained_sampler, history)``; history entries (per dimension, nats): ``loss``; for the
            reverse objective ``data`` (−log p(y|x)), ``prior`` (−b(x) or −log p(x)) and ``log_q``
            (the loss is KL − log p(y) with the exact prior term); for pairs ``nll``
            (−log q(x|y)) and ``z_rms``. ``base_s`` is the seconds to build the bases of the
            training measurements, ``objective`` the objective, ``validation`` (with
            ``validation=``) the candidates, their held-out losses and the one chosen and, for
            ``"pairs+reverse"``,
            ``stage`` tells each entry's stage (the two stages' histories are concatenated, steps
            and times running on).

        Raises:
            ValueError: an unknown ``objective``, missing ``measurements`` for a reverse stage,
                ``signals`` of the wrong shape or with NaN, or ``signals=None`` with a prior that
                cannot draw exact samples.
        """
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        _check_int(steps, "steps")
        pairs, reverse = objective.startswith("pairs"), objective.endswith("reverse")
        if reverse:
            if measurements is None:
                raise ValueError(f"objective={objective!r} trains on measurements: pass "
                                 "measurements (batch shape (N,))")
            self.check_measurement(measurements, batched=True, name="measurements")
        elif measurements is not None:
            self.check_measurement(measurements, batched=True, name="measurements")
        if pairs:
            signals = self._check_signals(signals)
            if signals is not None and batch_size > len(signals):
                raise ValueError(f"batch_size ({batch_size}) must be ≤ the number of signals "
                                 f"({len(signals)})")
        elif signals is not None:
            raise ValueError(f"signals are used by the pair objectives only, not by "
                             f"objective={objective!r}")
        n_fine = None
        if objective == "pairs+reverse":
            n_fine = max(1, steps // 4) if finetune_steps is None else _check_int(finetune_steps,
                                                                                  "finetune_steps")
        elif finetune_steps is not None:
            raise ValueError("finetune_steps applies to objective='pairs+reverse' only")
        common = dict(batch_size=batch_size, learning_rate=learning_rate,
                      warmup_steps=warmup_steps, clip_norm=clip_norm, ema_decay=ema_decay,
                      checkpoint_every=checkpoint_every, resume=resume, log_every=log_every,
                      progress=progress, devices=devices, max_bad_steps=max_bad_steps,
                      has_aux=True, frozen=self._frozen())
        sub = lambda name: (None if checkpoint_dir is None  # noqa: E731
                            else Path(checkpoint_dir) / name if objective == "pairs+reverse"
                            else checkpoint_dir)
        if validation is not None:
            validate = self._validator(validation, draws=_check_int(val_draws, "val_draws"))
        params, histories = self.params, []
        candidates = [("initial", params)]
        base_s = 0.0
        if pairs:
            k_pairs = key if objective == "pairs" else jax.random.fold_in(key, 1)
            data = ({"x": signals} if signals is not None
                    else {"n": jnp.zeros((batch_size,), jnp.float32)})
            state, h = _fit(k_pairs, self._loss_pairs, params, data, steps=steps,
                            checkpoint_dir=sub("pairs"), **common)
            params = jax.device_get(state.ema if ema_decay is not None else state.params)
            histories.append(("pairs", h))
            candidates.append(("pairs", params))
        if reverse:
            (m, b, c), base_s = self._measurement_batch(measurements)
            k_rev = key if objective == "reverse" else jax.random.fold_in(key, 2)
            loss = functools.partial(self._loss_reverse, stl=bool(stl))
            state, h = _fit(k_rev, loss, params, {"m": m, "b": b, "c": c},
                            steps=steps if n_fine is None else n_fine,
                            checkpoint_dir=sub("reverse"), **common)
            params = jax.device_get(state.ema if ema_decay is not None else state.params)
            histories.append(("reverse", h))
            candidates.append(("reverse", params))
        history = histories[0][1] if len(histories) == 1 else _concat_histories(histories)
        if validation is not None:                      # return the best candidate
            losses = [validate(p) for _, p in candidates]
            best = int(np.nanargmin(losses)) if np.any(np.isfinite(losses)) else len(losses) - 1
            params = candidates[best][1]
            history["validation"] = {"candidates": [n for n, _ in candidates],
                                     "loss": losses, "chosen": candidates[best][0]}
        history["base_s"] = base_s
        history["objective"] = objective
        new = copy.copy(self)
        new.params = jax.tree.map(jnp.asarray, params)
        new.history = history
        new._jit_sample = jax.jit(new._sample_impl, static_argnames=("n",))
        new._jit_summary = jax.jit(new._summary_impl, static_argnames=("n", "quantiles", "keep"))
        new._sharded_programs = {}
        new._jit_log_prob = jax.jit(new._log_prob_impl)
        return new, history

    # ---------------------------------------------------------------------- inference
    def _sample_impl(self, params, frozen, m: Measurement, key, first, n: int):
        """(n, B, V, C) for a batched measurement (B,). Measurement b's draws come from
        ``fold_in(key, first + b)`` alone, so a batch split into chunks (each passed its offset
        ``first``) gives the same draws as the whole batch in one call."""
        B = m.y.shape[0]
        V, C = frozen["sur"].mean.shape
        b = self._base(frozen, m)
        c = self._features(frozen["sur"], m, b)
        b = self._strip(b)
        flow = nnx.merge(self._graphdef, params, frozen["consts"])
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(first + jnp.arange(B))
        k_z, k_k = jax.vmap(jax.random.split, out_axes=1)(keys)        # (B,) each
        z = jax.vmap(lambda k: jax.random.normal(k, (n, V, C)))(k_z)     # (B, n, V, C)
        z = frozen["tau"] * jnp.swapaxes(z, 0, 1).reshape(n * B, V, C)
        comp = None
        if self.centre == "mixture":                                     # (n·B,) components
            comp = jax.vmap(lambda k, lw: jax.random.categorical(k, lw, shape=(n,)))(
                k_k, b["logw"]).T.reshape(n * B)
        # the condition's share of the flow once per y (flow.prepare), not once per draw
        prepared = flow.prepare(c)
        # the base's factors once per y too: the n draws of a measurement share them (a batched
        # product over B), instead of n copies of each (R, R) factor
        if self.centre == "mixture":
            xb = jax.vmap(lambda e, k: mixture_draw(None, frozen["mix"], b, e, comp=k))(
                z.reshape(n, B, V, C), comp.reshape(n, B))
            x, _ = self._mixture_flow(flow, frozen["sur"], xb.reshape(n * B, V, C), None,
                                      prepared=prepared)
            return x.reshape(n, B, V, C)
        u, _ = flow.forward(z, None, prepared=prepared)
        return jax.vmap(lambda v: base_forward(self.kind, frozen["sur"], frozen["shared"], b, v)[0]
                        )(u.reshape(n, B, V, C))

    def _summary_impl(self, params, frozen, m: Measurement, key, first, n: int,
                      quantiles: tuple, keep: bool):
        """Per-entry summaries of n draws per measurement (one compiled program per chunk):
        ``mean``, ``std`` (ddof 1) (B, V, C), ``quantiles`` (Q, B, V, C) (linear interpolation,
        NumPy's default), ``samples`` (n, B, V, C) with ``keep``."""
        x = self._sample_impl(params, frozen, m, key, first, n)
        return _batch.summarize(x, quantiles, keep=keep)

    def _batched(self, measurement, name: str = "measurement"):
        """(measurement with a batch axis, whether the input had one)."""
        batch = self.check_measurement(measurement, name=name)
        # lax.expand_dims, not a[None]: indexing goes through jnp's slower __getitem__ path
        m = jax.tree.map(lambda a: jax.lax.expand_dims(jnp.asarray(a), (0,)) if not batch
                         else jnp.asarray(a), measurement)
        return m, bool(batch)

    def sample(self, key, measurement: Measurement, n: int = 1, *, chunk: int | None = None,
               progress: bool = False):
        """n posterior draws in one pass of the flow (plus the base's per-measurement solve).

        Measurement b of a batch draws from ``fold_in(key, b)`` alone, so the result does not
        depend on ``chunk`` or on the number of devices (up to float32 rounding of batched
        matrix products), and a lone measurement draws what the first of a batch would.

        Args:
            key: PRNG key.
            measurement: one measurement (y (Vy, C)) or a batch (y (B, Vy, C)).
            n: samples per measurement (≥ 1).
            chunk: measurements per compiled call (None: all B at once). The last chunk is padded
                to full size, so one program serves every chunk; with several JAX devices each
                chunk is split across them (``chunk`` is rounded up to a multiple of their
                number). Peak memory of the draws is n·chunk·V·C floats, plus the result.
            progress: a progress bar over the chunks.

        Returns:
            (n, V, C) for one measurement, (n, B, V, C) for a batch; normalized data units.
        """
        n = _check_int(n, "n")
        m, batched = self._batched(measurement)
        parts = [p.samples for p in self._chunks(key, m, n, chunk, (), True, 0, progress,
                                                  "sample")]
        x = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)
        return jax.lax.squeeze(x, (1,)) if not batched else x

    def iter_posterior(self, key, measurement: Measurement, n: int = 128, *, chunk: int = 64,
                       quantiles=(), keep_samples: bool = False, start: int = 0,
                       progress: bool = False):
        """Posterior summaries of a long batch of measurements, chunk by chunk (an iterator).

        Memory stays bounded by ``chunk`` whatever the number B of measurements: each chunk's n
        draws are summarized inside one compiled program and only the summaries come back (and
        the draws with ``keep_samples``). Same draws as :meth:`sample` with the same key.

        Args:
            key: PRNG key.
            measurement: a batch of B measurements (y (B, Vy, C)) or one measurement.
            n: samples per measurement (≥ 2).
            chunk: measurements per compiled call (rounded up to a multiple of the JAX device
                count; each chunk is split across the devices).
            quantiles: levels in (0, 1) to report (linear interpolation between order
                statistics, as ``numpy.quantile``).
            keep_samples: also return the draws.
            start: skip the measurements before this index (resuming a long run: chunk
                boundaries are ``start``, ``start + chunk``, …).
            progress: a progress bar over the chunks.

        Returns:
            An iterator of :class:`~geodiff.amortized.batch.PosteriorChunk`, one per chunk of
            measurements
            ``start:stop``: ``mean`` and ``std`` (ddof 1) (b, V, C), ``quantiles`` (Q, b, V, C)
            or None, ``samples`` (n, b, V, C) or None; NumPy float32, normalized data units.
        """
        n = _check_int(n, "n", 2)
        q = _batch.check_quantiles(quantiles)
        m, _ = self._batched(measurement)
        B = m.y.shape[0]
        if not isinstance(start, (int, np.integer)) or isinstance(start, bool) or not 0 <= start <= B:
            raise ValueError(f"start must be an integer in [0, {B}], got {start!r}")
        return (p.numpy() for p in self._chunks(key, m, n, _check_int(chunk, "chunk"), q,
                                                bool(keep_samples), int(start), progress,
                                                "posterior"))

    def _chunks(self, key, m: Measurement, n: int, chunk, q: tuple, keep: bool, start: int,
                progress: bool, desc: str):
        """The chunk loop of :meth:`sample` (``q`` empty, draws only) and :meth:`iter_posterior`."""
        from tqdm.auto import tqdm

        B = m.y.shape[0]
        devices = jax.devices()
        size = B if chunk is None else _check_int(chunk, "chunk")
        size = -(-size // len(devices)) * len(devices)
        frozen, spans = self._frozen(), _batch.spans(B, size, start)
        summary = desc == "posterior"
        kw = {"quantiles": q, "keep": keep} if summary else {}
        if len(devices) == 1:
            run = self._jit_summary if summary else (
                lambda *a, **k: {"samples": self._jit_sample(*a, **k)})
        else:
            run = self._sharded(summary, devices)
        for lo, hi in tqdm(spans, disable=not progress, desc=desc, unit="chunk"):
            mc = _batch.shard(_batch.take(m, lo, hi, size), devices)
            fr = self._frozen_for_mask(frozen, mc)
            # returned ready: concurrent LAPACK programs can deadlock XLA's CPU runtime
            out = jax.block_until_ready(run(self.params, fr, mc, key, np.int32(lo), n=n, **kw))
            yield _batch.PosteriorChunk.of(lo, hi, out)

    #: masks whose base factor a sampler keeps (:meth:`_frozen_for_mask`), least recent dropped
    MASK_FACTORS = 8

    def _frozen_for_mask(self, frozen: dict, m: Measurement) -> dict:
        """``frozen`` with the base's covariance factor of the one mask that every measurement of
        the chunk ``m`` shares, if they share one (a lone measurement, a station network, a fixed
        gap pattern): each measurement then costs only its mean, O(D R), instead of its own
        O(D R²) solve and R×R eigensolver. Same formulas, so the same draws up to rounding.
        The factor is computed once per mask and surrogate and kept (``MASK_FACTORS`` of them).
        Only the selection solver with a Gaussian base (``centre`` other than "mixture")."""
        shared = frozen["shared"]
        if (self.kind != "selection" or self.centre == "mixture" or shared["fixed"] is not None):
            return frozen
        mask = np.asarray(m.mask)
        if not (mask == mask[:1]).all():
            return frozen
        sur = frozen["sur"]
        key = (id(sur), hashlib.sha1(np.packbits(mask[0])).hexdigest())
        cache = self.__dict__.setdefault("_mask_factors", collections.OrderedDict())
        if key not in cache:
            fixed = selection_factor(sur, shared["gram"], mask[0], sigma=float(self.operator.sigma))
            cache[key] = (sur, jax.block_until_ready(fixed))     # sur held: its id stays unique
            while len(cache) > self.MASK_FACTORS:
                cache.popitem(last=False)
        cache.move_to_end(key)
        return {**frozen, "shared": {**shared, "fixed": cache[key][1]}}

    def _sharded(self, summary: bool, devices):
        """The compiled chunk program split across ``devices`` (built once per device set)."""
        cache = self.__dict__.setdefault("_sharded_programs", {})
        k = (summary, tuple(d.id for d in devices))
        if k not in cache:
            impl = self._summary_impl if summary else (
                lambda *a, **kw: {"samples": self._sample_impl(*a, **kw)})
            cache[k] = _batch.on_devices(impl, devices, ("n", "quantiles", "keep") if summary
                                         else ("n",))
        return cache[k]

    def _log_prob_impl(self, params, frozen, m: Measurement, x):
        """x (S, B, V, C), m batched (B,) → (S, B)."""
        S, B, V, C = x.shape
        b = self._base(frozen, m)
        c = self._features(frozen["sur"], m, b)
        b = self._strip(b)
        rep = lambda a: jnp.broadcast_to(a[None], (S, *a.shape)).reshape(S * B, *a.shape[1:])  # noqa: E731
        flow = nnx.merge(self._graphdef, params, frozen["consts"])
        log_q, _ = self._density(flow, frozen, jax.tree.map(rep, b), None,
                                 x.reshape(S * B, V, C), prepared=flow.prepare(c))
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

    def posterior(self, key, measurement: Measurement, n: int = 128, *, chunk: int | None = None,
                  progress: bool = False):
        """Posterior mean and std (ddof 1) from n samples: ``(mean, std)``, each (V, C) or
        (B, V, C). ``chunk`` as in :meth:`iter_posterior` (None: all measurements at once); the
        draws are :meth:`sample`'s with the same key."""
        m, batched = self._batched(measurement)
        parts = list(self.iter_posterior(key, m, n, chunk=chunk or m.y.shape[0],
                                         progress=progress))
        mean = np.concatenate([p.mean for p in parts])
        std = np.concatenate([p.std for p in parts])
        return (mean, std) if batched else (mean[0], std[0])

    def base_moments(self, measurement: Measurement):
        """The base's mean (the centre m(y)) and per-entry std at τ = 1, ``(mean, std)``, each
        (V, C) or (B, V, C). With the surrogate centre these are the kriging posterior mean and
        std of the surrogate; an untrained sampler's samples have exactly this mean and (times τ)
        this std."""
        batch = self.check_measurement(measurement)
        m = jax.tree.map(lambda a: jnp.asarray(a)[None] if not batch else jnp.asarray(a), measurement)
        b = jax.block_until_ready(jax.jit(self._base)(self._frozen(), m))
        mean, std = b["m0"], b["std"]
        return (mean[0], std[0]) if not batch else (mean, std)

    def with_temperature(self, temperature: float) -> "AmortizedSampler":
        """A copy with base temperature τ (the flow, its compiled programs and everything else
        shared: τ is an argument of them, so no recompilation)."""
        new = copy.copy(self)
        new.temperature = _check_temperature(temperature)
        return new

    def calibrate(self, key, signals, *, level: float = 0.9, n_samples: int = 64,
                  batch: int = 32, iters: int = 14, bounds: tuple[float, float] = (0.05, 20.0)
                  ) -> "AmortizedSampler":
        """A copy whose base temperature τ makes the central ``level`` intervals cover ``level``.

        Fresh simulated pairs: each clean signal of ``signals`` is measured with this sampler's
        operator (a fresh mask and noise), ``n_samples`` samples are drawn at temperature τ with
        the same latent draws for every τ (common random numbers), and the coverage of the true
        values by the per-entry central ``level`` intervals is averaged with the manifold's mass
        as weights, over the entries a mask leaves unobserved (:class:`RandomMask`) or over all
        of them (other operators). τ is found by bisection on log τ (coverage grows with τ).
        ``log_prob`` stays exact: τ is the std of the flow's latent.

        Args:
            key: PRNG key.
            signals: (N, V, C) clean prior signals not used in training (held-out training-set
                signals or prior draws; never test signals).
            level: nominal coverage in (0, 1).
            n_samples: samples per pair (≥ 8).
            batch: pairs per sampling call (bounds memory).
            iters: bisection steps.
            bounds: (lo, hi) search range of τ.

        Returns:
            The calibrated sampler (``temperature`` set; ``calibration`` holds τ, the coverage
            reached, the number of pairs and samples).

        Raises:
            ValueError: ``level`` outside (0, 1), bad ``signals``, or a target coverage that τ in
                ``bounds`` cannot reach.
        """
        from geodiff.metrics import coverage    # numpy-only helpers; no layer above is imported

        if not (isinstance(level, (int, float, np.floating)) and 0 < level < 1):
            raise ValueError(f"level must be in (0, 1), got {level!r}")
        x = self._check_signals(signals)
        if x is None:
            raise ValueError("signals must be clean prior signals (N, V, C), got None")
        n_samples = _check_int(n_samples, "n_samples", 8)
        batch = _check_int(batch, "batch")
        iters = _check_int(iters, "iters")
        lo, hi = (float(b) for b in bounds)
        if not 0 < lo < hi:
            raise ValueError(f"bounds must be (lo, hi) with 0 < lo < hi, got {bounds!r}")
        k_m, k_z = jax.random.split(key)
        meas = self.operator.measure(k_m, x)
        frozen = self._frozen()
        weights = np.asarray(self.manifold.mass, np.float64)
        N = len(x)
        chunks = [slice(i, min(i + batch, N)) for i in range(0, N, batch)]
        where = (None if self.kind != "selection" or type(self.operator).__name__ == "Denoise"
                 else ~np.asarray(meas.mask))
        truth = np.asarray(x, np.float64)

        def cover(tau):
            fr = frozen | {"tau": jnp.float32(tau)}
            xs = np.concatenate([np.asarray(jax.block_until_ready(self._jit_sample(
                self.params, fr, jax.tree.map(lambda a: a[sl], meas), k_z, jnp.int32(sl.start),
                n=n_samples))) for sl in chunks], axis=1)     # (n, N, V, C)
            return float(np.mean(coverage(xs, truth, level=level, weights=weights, where=where)))

        c_lo, c_hi = cover(lo), cover(hi)
        if not c_lo <= level <= c_hi:
            raise ValueError(f"coverage {level} is out of reach for temperatures in {bounds} "
                             f"(coverage {c_lo:.3f} at τ = {lo}, {c_hi:.3f} at τ = {hi})")
        a, b = math.log(lo), math.log(hi)
        for _ in range(iters):
            mid = 0.5 * (a + b)
            if cover(math.exp(mid)) < level:
                a = mid
            else:
                b = mid
        tau = math.exp(0.5 * (a + b))
        out = self.with_temperature(tau)
        out.calibration = {"temperature": tau, "level": float(level), "coverage": cover(tau),
                           "pairs": N, "samples": n_samples}
        return out

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
                "centre": self.centre, "pnp": self.pnp, "temperature": self.temperature,
                "calibration": getattr(self, "calibration", None),
                "n_t": self.n_t, "antithetic": self.antithetic, "prior_weight": self.prior_weight,
                "flow": self.flow_config, "geodiff_version": _version()}
        arrays = {"meta": _io.dumps(meta), **spec_arrays, **parrays, **flat,
                  "surrogate/mean": np.asarray(self.surrogate.mean),
                  "surrogate/factor": np.asarray(self.surrogate.factor),
                  "surrogate/nugget": np.asarray(self.surrogate.nugget)}
        if self.mixture is not None:
            arrays |= {f"mixture/{k}": np.asarray(getattr(self.mixture, k))
                       for k in ("mean", "factor", "nugget", "log_weights")}
        atomic_savez(path, **arrays)
        return path

    @classmethod
    def load(cls, path) -> "AmortizedSampler":
        """Read a sampler written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"path: no saved sampler at {str(path)!r}")
        meta, arrays = read_npz(path, "meta", "saved AmortizedSampler")
        if meta.get("class") != "AmortizedSampler":
            raise ValueError(f"path: {str(path)!r} is not a saved AmortizedSampler")
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"path: {str(path)!r} was saved in sampler format "
                             f"{meta.get('format')!r}, this geodiff reads format "
                             f"{FORMAT_VERSION} (since format 3 the flow's condition scales "
                             "the residual by its predictive std): refit the sampler")
        manifold = manifold_from_spec(meta["manifold_spec"], arrays)
        prior = _io.prior_from_spec(meta["prior"], arrays, manifold)
        operator = _io.operator_from_spec(meta["operator"], manifold)
        sur = GaussianSurrogate(*(jnp.asarray(arrays[f"surrogate/{k}"])
                                  for k in ("mean", "factor", "nugget")))
        mix = (MixtureSurrogate(*(jnp.asarray(arrays[f"mixture/{k}"])
                                  for k in ("mean", "factor", "nugget", "log_weights")))
               if meta["centre"] == "mixture" else None)
        fc = meta["flow"]
        pnp = meta.get("pnp") or {}
        pnp = ({"pnp_steps": pnp["steps"], "pnp_noise": tuple(pnp["noise"]), "pnp_cg": pnp["cg"]}
               if pnp else {})
        out = cls(manifold, prior, operator, centre=meta["centre"], temperature=meta["temperature"],
                  **pnp,
                  prior_term=meta["prior_term"], surrogate=sur, mixture=mix,
                  n_t=meta["n_t"], antithetic=meta["antithetic"], prior_weight=meta["prior_weight"],
                  flow=ConditionalRealNVP(manifold, channels=prior.channels,
                                          condition_channels=3 * prior.channels + 1,
                                          n_steps=fc["n_steps"], conditioner=fc["conditioner"],
                                          hidden=fc["hidden"], n_eig=fc["n_eig"],
                                          local_hidden=fc.get("local_hidden", 0),  # files before 0.3
                                          encoder_width=fc.get("encoder_width", 0),  # older files: none
                                          encoder_blocks=fc.get("encoder_blocks", 2),
                                          max_log_scale=fc["max_log_scale"],
                                          input_bound=fc.get("input_bound"), seed=fc["seed"]))
        flat = {tuple(_key(p) for p in k.split("/")[1:]): arrays[k] for k in arrays
                if k.startswith("flow/")}
        pure = nnx.to_pure_dict(out.params)
        if set(_flatten(pure)) != set(flat):
            raise ValueError(f"path: flow parameters in {str(path)!r} do not match its flow config")
        nnx.replace_by_pure_dict(out.params, _unflatten(flat))
        if meta.get("calibration") is not None:
            out.calibration = meta["calibration"]
        return out

