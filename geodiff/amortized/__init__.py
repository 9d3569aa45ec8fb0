"""Amortized posterior sampling: the Gaussian-surrogate base and the conditional-flow sampler
(METHOD.md §4–§5, §9)."""

from geodiff.amortized.sampler import AmortizedSampler
from geodiff.amortized.surrogate import GaussianSurrogate, gaussian_fit

__all__ = ["AmortizedSampler", "GaussianSurrogate", "gaussian_fit"]
