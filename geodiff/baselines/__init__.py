"""Baselines for the comparison tables: classical estimators (kriging, harmonic interpolation) and
diffusion posterior samplers (DPS, MCG, Noise2Score), and the per-measurement flow (FlowPerY)."""

from geodiff.amortized.surrogate import gaussian_fit  # the kriging prior, shared with the sampler's base
from geodiff.baselines.classical import harmonic, kriging
from geodiff.baselines.diffusion import dps, mcg, noise2score, tune_zeta
from geodiff.baselines.flow import flow_per_y

__all__ = ["dps", "flow_per_y", "gaussian_fit", "harmonic", "kriging", "mcg", "noise2score", "tune_zeta"]
