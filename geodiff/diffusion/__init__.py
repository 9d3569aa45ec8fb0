"""Priors: the VPSDE, the learned :class:`DiffusionPrior` and the analytic Gaussian priors."""

from geodiff.diffusion.base import Prior
from geodiff.diffusion.gaussian import GaussianMixturePrior, GaussianPrior
from geodiff.diffusion.network import NetGeometry, SpectralScoreNet
from geodiff.diffusion.prior import DiffusionPrior, NetConfig
from geodiff.diffusion.sde import VPSDE

__all__ = ["DiffusionPrior", "GaussianMixturePrior", "GaussianPrior", "NetConfig", "NetGeometry", "Prior", "SpectralScoreNet", "VPSDE"]
