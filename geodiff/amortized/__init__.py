"""Amortized posterior sampling: the Gaussian-surrogate base and the conditional-flow sampler
(docs/amortized.md, docs/method.md)."""

from geodiff.amortized.mixture import MixtureSurrogate, mixture_fit
from geodiff.amortized.sampler import AmortizedSampler
from geodiff.amortized.surrogate import GaussianSurrogate, gaussian_fit

__all__ = ["AmortizedSampler", "GaussianSurrogate", "MixtureSurrogate", "gaussian_fit", "mixture_fit"]
