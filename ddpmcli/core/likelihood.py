"""Likelihood terms of the variational bound (Ho et al. 2020 section 3.3; improved-diffusion
losses.py): the Gaussian KL and the decoders of x0, elementwise and in nats.

Imports torch and the standard library only.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats.

    0.5 (e^d - 1 - d + (mean1 - mean2)^2 e^-logvar2) with d = logvar1 - logvar2: expm1 keeps the
    digits of nearly equal variances (and gives exactly 0 for equal distributions)."""
    d = logvar1 - logvar2
    return 0.5 * (torch.expm1(d) - d + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """log P(x) of 8-bit data scaled to [-1, 1] under a Gaussian integrated over each bin of width
    2/255, the edge bins extended to infinity (Ho et al. 2020 eq. 13). Elementwise, nats.

    Uses the exact normal CDF (torch.special.ndtr / log_ndtr), not improved-diffusion's tanh
    approximation, and takes each bin's mass from the tail it lies in so no digits cancel.
    """
    centered = x - means
    inv_std = torch.exp(-log_scales)
    upper = inv_std * (centered + 1.0 / 255.0)
    lower = inv_std * (centered - 1.0 / 255.0)
    log_cdf_upper = torch.special.log_ndtr(upper)
    log_sf_lower = torch.special.log_ndtr(-lower)
    # mass of the bin: from the lower tail when the bin is below the mean, else from the upper.
    upper_tail = lower > 0
    mass = torch.where(
        upper_tail,
        torch.special.ndtr(-lower) - torch.special.ndtr(-upper),
        torch.special.ndtr(upper) - torch.special.ndtr(lower),
    )
    log_mass = torch.log(torch.clamp(mass, min=1e-300))
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_sf_lower, log_mass))


def continuous_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """log N(x; mean, e^(2 log_scale)) elementwise, in nats (a density, for real-valued data)."""
    z = (x - means) * torch.exp(-log_scales)
    return -0.5 * z**2 - log_scales - 0.5 * math.log(2 * math.pi)
