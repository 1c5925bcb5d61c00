"""Likelihood terms of the variational bound (Ho et al. 2020 section 3.3; improved-diffusion
losses.py): the Gaussian KL and the decoders of x0, elementwise and in nats.

Imports torch and the standard library only.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ddpmcli.errors import ScheduleParameterError

if TYPE_CHECKING:
    from ddpmcli.core.schedule import Schedule

DECODERS: tuple[str, ...] = ("discretized", "discretized_tanh", "continuous")
_LN2 = math.log(2.0)


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


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """improved-diffusion's tanh approximation of the standard normal CDF (Page 1977):
    0.5 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))). About 2e-4 from the exact CDF at worst;
    kept only so that published bits/dim computed with it can be reproduced."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood_tanh(
    x: Tensor, means: Tensor, log_scales: Tensor
) -> Tensor:
    """The 8-bit decoder as improved-diffusion computes it (``losses.py``): the bin mass is the
    difference of two tanh-approximated CDFs, each log taken of a value clamped at 1e-12, the edge
    bins extended to infinity. Elementwise, nats. Use :func:`discretized_gaussian_log_likelihood`
    (the exact CDF, no cancellation) unless matching improved-diffusion's numbers."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_upper = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_lower = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_upper = torch.log(cdf_upper.clamp(min=1e-12))
    log_sf_lower = torch.log((1.0 - cdf_lower).clamp(min=1e-12))
    log_mass = torch.log((cdf_upper - cdf_lower).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_sf_lower, log_mass))


def continuous_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """log N(x; mean, e^(2 log_scale)) elementwise, in nats (a density, for real-valued data)."""
    z = (x - means) * torch.exp(-log_scales)
    return -0.5 * z**2 - log_scales - 0.5 * math.log(2 * math.pi)


def vb_terms(
    schedule: Schedule,
    x0: Tensor,
    x_t: Tensor,
    t: Tensor,
    model_mean: Tensor,
    model_log_variance: Tensor,
    *,
    decoder: str = "continuous",
    data_range: tuple[float, float] = (-1.0, 1.0),
    bits: bool = True,
) -> Tensor:
    """The term L_t of the variational bound per sample, averaged over dimensions (Ho et al. 2020
    eq. 5; improved-diffusion's ``_vb_terms_bpd``), for training and evaluation alike.

    For index t > 0: KL(q(x_{t-1} | x_t, x0) || N(model_mean, e^model_log_variance)); at t = 0 the
    decoder's negative log-likelihood -log p(x0 | x_1) with that mean and variance:
    ``continuous``, the Gaussian density (real-valued data); ``discretized``, 8-bit data in bins of
    width 2/255 on [-1, 1] (eq. 13), ``data_range`` mapped onto [-1, 1] first (the bins' masses do
    not change under the affine map); ``discretized_tanh``, the same with improved-diffusion's
    tanh approximation of the normal CDF (to reproduce its published numbers).

    Args:
        schedule: gives the true posterior at ``t`` (indices into it, int64 (B,)).
        x0, x_t, model_mean, model_log_variance: (B, ...), one dtype; the model's mean is
            mu_tilde(x_t, x0_hat), its log variance from ``Schedule.model_log_variance``.
        decoder: one of :data:`DECODERS` (default ``continuous``).
        bits: divide by ln 2 (bits per dimension, the default), else nats.

    Returns:
        (B,) in the inputs' dtype.
    """
    if decoder not in DECODERS:
        raise ScheduleParameterError(f"unknown decoder {decoder!r}; allowed: {', '.join(DECODERS)}")
    true_mean, _, true_log_var = schedule.posterior_mean_variance(x0, x_t, t)
    term = _flat_mean(normal_kl(true_mean, true_log_var, model_mean, model_log_variance))
    first = t == 0
    if bool(first.any()):  # the decoder only where some sample sits at index 0
        log_scale = 0.5 * model_log_variance
        if decoder.startswith("discretized"):
            lo, hi = data_range
            center, half = (lo + hi) / 2, (hi - lo) / 2
            exact = decoder == "discretized"
            binned = (
                discretized_gaussian_log_likelihood
                if exact
                else discretized_gaussian_log_likelihood_tanh
            )
            ll = binned(
                (x0 - center) / half, (model_mean - center) / half, log_scale - math.log(half)
            )
        else:
            ll = continuous_gaussian_log_likelihood(x0, model_mean, log_scale)
        term = torch.where(first.to(term.device), -_flat_mean(ll), term)
    return term / _LN2 if bits else term


def _flat_mean(x: Tensor) -> Tensor:
    return x.flatten(1).mean(dim=1)
