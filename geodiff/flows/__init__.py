"""Bijections with a condition argument and the conditional RealNVP flow (docs/method.md)."""

from geodiff.flows.realnvp import (ActNorm, AffineCoupling, ConditionalRealNVP, DenseConditioner,
                                   SpectralBasis, SpectralConditioner, vertex_partition)

__all__ = ["ActNorm", "AffineCoupling", "ConditionalRealNVP", "DenseConditioner",
           "SpectralBasis", "SpectralConditioner", "vertex_partition"]
