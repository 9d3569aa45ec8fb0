"""Baselines for the comparison tables: classical estimators (this module) and, later, DPS, MCG,
Noise2Score and per-measurement flows."""

from geodiff.baselines.classical import gaussian_fit, harmonic, kriging

__all__ = ["gaussian_fit", "harmonic", "kriging"]
