"""Baselines for the comparison tables: classical estimators (kriging, harmonic interpolation) and
diffusion posterior samplers (DPS, MCG, Noise2Score). The per-measurement flow (FlowPerY) comes
with the flows."""

from geodiff.baselines.classical import gaussian_fit, harmonic, kriging
from geodiff.baselines.diffusion import dps, mcg, noise2score, tune_zeta

__all__ = ["dps", "gaussian_fit", "harmonic", "kriging", "mcg", "noise2score", "tune_zeta"]
