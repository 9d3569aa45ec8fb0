"""Bijections with a condition argument and the conditional RealNVP flow (METHOD.md §5)."""

from geodiff.flows.realnvp import (ActNorm, AffineCoupling, ConditionalRealNVP, DenseConditioner,
                                   SpectralConditioner, vertex_partition)

__all__ = ["ActNorm", "AffineCoupling", "ConditionalRealNVP", "DenseConditioner",
           "SpectralConditioner", "vertex_partition"]
