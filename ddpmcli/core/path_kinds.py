"""Gaussian paths other than VP: rectified flow and sigma space (EDM, VE), as the arrays every
such schedule is reduced to (:class:`PathParts`), each computed in a stable form.

A path is ``x_t = alpha_t x0 + sigma_t eps``; entry 0 is the least noisy. Its log-SNR
``lambda = 2 log(alpha/sigma)`` and the steps ``lambda_i - lambda_{i-1}`` are formed here without
cancellation, because the VP-equivalent schedule (``alpha_bar = sigmoid(lambda)``) and the path's
posterior (``sigma_{t|s}^2/sigma_t^2 = -expm1(lambda_t - lambda_s)``) are built from them.

Imports torch and the standard library only.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from ddpmcli.errors import ScheduleParameterError

F64 = torch.float64

PATHS: tuple[str, ...] = ("vp", "flow", "ve")
"""The coordinates a schedule's x_t lives in: variance preserving (alpha^2 + sigma^2 = 1),
rectified flow (alpha + sigma = 1) and sigma space (alpha = 1: EDM, VE)."""


@dataclass(frozen=True)
class PathParts:
    """A path's arrays, entry 0 the least noisy, each accurate to a few ulps.

    ``log_snr_step[i - 1] = log_snr[i] - log_snr[i - 1]`` for ``i >= 1`` (length N - 1), formed
    without subtracting two nearby log-SNRs where the kind can.
    """

    path: str
    alpha: Tensor
    sigma: Tensor
    model_timestep: Tensor
    log_snr: Tensor
    log_snr_step: Tensor


def _log_snr_step(alpha: Tensor, sigma: Tensor, d_alpha: Tensor, d_sigma: Tensor) -> Tensor:
    """lambda_i - lambda_{i-1} = 2 log1p(d_alpha/alpha_{i-1}) - 2 log1p(d_sigma/sigma_{i-1}),
    from the exact increments d_alpha = alpha_i - alpha_{i-1}, d_sigma = sigma_i - sigma_{i-1}."""
    # where alpha_i = 0 (a flow's s = 1) the ratio is -1 up to rounding: the step is -inf
    up = torch.where(alpha[1:] == 0, -math.inf, torch.log1p(d_alpha / alpha[:-1]))
    return 2 * (up - torch.log1p(d_sigma / sigma[:-1]))


# --------------------------------------------------------------------------------------------
# Rectified flow: alpha = 1 - s, sigma = s on diffusers' training grid, shifted
# --------------------------------------------------------------------------------------------


_LOG_MAX = math.log(sys.float_info.max)


def flow_shift_factor(p: Mapping[str, float]) -> float:
    """The static shift the parameters give: ``shift``, or, with dynamic shifting by ``mu``,
    e^mu (exponential time shift) or mu (linear), as diffusers' ``time_shift`` with sigma 1."""
    shift, mu, linear = p["shift"], p["mu"], p.get("linear_time_shift", 0.0)
    if linear not in (0.0, 1.0):
        raise ScheduleParameterError(
            f"flow parameter linear_time_shift={linear} must be 0 (exponential) or 1 (linear)"
        )
    if not shift > 0:
        raise ScheduleParameterError(f"flow parameter shift={shift} must be > 0")
    if mu != 0.0 and shift != 1.0:
        raise ScheduleParameterError(
            f"flow parameter mu={mu} (dynamic shifting) cannot go with shift={shift} (static); "
            "give one of them"
        )
    if linear:
        if not mu > 0:
            raise ScheduleParameterError(
                f"flow parameter mu={mu} must be > 0 with a linear time shift"
            )
        return mu
    if mu > _LOG_MAX:  # e^mu is past float64 (an absurd mu, or one from a huge resolution)
        raise ScheduleParameterError(
            f"flow parameter mu={mu} is too large: e^mu overflows float64 (mu <= {_LOG_MAX:.2f})"
        )
    return math.exp(mu) if mu != 0.0 else shift


def shifted_unit_grid(u_num: Tensor, n: int, shift: float) -> tuple[Tensor, Tensor]:
    """(s, 1 - s) for s = shift u/(1 + (shift - 1) u), u = u_num/n, both without cancellation:
    1 - s = (1 - u)/(1 + (shift - 1) u), with 1 - u = (n - u_num)/n and the denominator as
    (1 - u) + shift u, a sum of two positive terms (1 + (shift - 1) u cancels for small shifts)."""
    u = u_num / n
    one_minus_u = (n - u_num) / n
    denom = one_minus_u + shift * u
    return shift * u / denom, one_minus_u / denom


def _flow(n: int, p: Mapping[str, float]) -> PathParts:
    # diffusers FlowMatchEulerDiscreteScheduler: sigmas = linspace(1, N, N)[::-1]/N, shifted
    # s' = shift s/(1 + (shift - 1) s); the model is called with s' N. Here ascending in t.
    shift = flow_shift_factor(p)
    u_num = torch.arange(1, n + 1, dtype=F64)
    s, one_minus_s = shifted_unit_grid(u_num, n, shift)
    # s_i - s_{i-1} = shift (u_i - u_{i-1})/(d_{i-1} d_i), d = 1 + (shift - 1) u = (1 - u) + shift u
    u = u_num / n
    d = (n - u_num) / n + shift * u
    ds = shift * (1.0 / n) / (d[:-1] * d[1:])
    terminal = p.get("shift_terminal", 0.0)
    if terminal:
        # LTX's stretch (diffusers stretch_shift_to_terminal):
        # 1 - s'' = (1 - s') (1 - st)/(1 - s'_0): the least noisy entry becomes shift_terminal
        if not 0 < terminal < 1:
            raise ScheduleParameterError(
                f"flow parameter shift_terminal={terminal} must lie in (0, 1) (0: off)"
            )
        # s'' = (st - s'_0)/(1 - s'_0) + f s', f = (1 - st)/(1 - s'_0): two positive terms where
        # st > s'_0 (the usual stretch); 1 - s'' and the increments are products.
        factor = (1 - terminal) / one_minus_s[0]
        s = (terminal - s[0]) / one_minus_s[0] + factor * s
        one_minus_s = one_minus_s * factor
        ds = ds * factor
        if not bool((s[:-1] < 1).all()) or not bool((one_minus_s[:-1] > 0).all()):
            raise ScheduleParameterError(
                f"flow parameter shift_terminal={terminal} makes the grid leave (0, 1)"
            )
    return flow_path(s, one_minus_s, ds, s * n)


def flow_path(s: Tensor, one_minus_s: Tensor, ds: Tensor, model_timestep: Tensor) -> PathParts:
    """A rectified-flow path from its s, 1 - s and the increments s_i - s_{i-1} (each exact)."""
    # lambda = 2 log((1 - s)/s) = 2 (log(1 - s) - log s); log1p where s is small
    log_alpha = torch.where(s < 0.5, torch.log1p(-s), torch.log(one_minus_s))
    log_sigma = torch.where(one_minus_s < 0.5, torch.log1p(-one_minus_s), torch.log(s))
    lam = 2 * (log_alpha - log_sigma)
    step = _log_snr_step(one_minus_s, s, -ds, ds)
    return PathParts("flow", one_minus_s, s, model_timestep, lam, step)


# --------------------------------------------------------------------------------------------
# Sigma space: alpha = 1, x = x0 + sigma eps (EDM, VE)
# --------------------------------------------------------------------------------------------


_SIGMA_MAX = 1 / math.sqrt(sys.float_info.min)


def _check_sigmas(kind: str, lo: float, hi: float) -> None:
    if not 0 < lo < hi:
        raise ScheduleParameterError(
            f"{kind} needs 0 < sigma_min < sigma_max, got sigma_min={lo}, sigma_max={hi}"
        )
    # past this, sigma^2 overflows and alpha_bar = 1/(1 + sigma^2) underflows: the table printed
    # inf and nan (ve sigma_max=1e200) and check saw alpha_bar not decreasing
    if not hi <= _SIGMA_MAX:
        raise ScheduleParameterError(
            f"{kind} parameter sigma_max={hi} is too large: sigma^2 leaves float64 "
            f"(sigma_max <= {_SIGMA_MAX:.3g})"
        )


def _edm_sigma(n: int, p: Mapping[str, float]) -> PathParts:
    # Karras et al. 2022: sigma_i^(1/rho) linear from sigma_min to sigma_max (ascending in t);
    # the network's noise input c_noise = ln(sigma)/4 (EDM's preconditioning, Table 1).
    lo, hi, rho = p["sigma_min"], p["sigma_max"], p["rho"]
    _check_sigmas("edm_sigma", lo, hi)
    ramp = torch.arange(n, dtype=F64) / (n - 1)
    r_lo, r_hi = lo ** (1 / rho), hi ** (1 / rho)
    roots = r_lo + ramp * (r_hi - r_lo)
    log_sigma = rho * torch.log(roots)
    # lambda_i - lambda_{i-1} = -2 rho log1p(dr/r_{i-1}): no cancellation
    step = -2 * rho * torch.log1p(((r_hi - r_lo) / (n - 1)) / roots[:-1])
    sigma = roots**rho
    sigma[0], sigma[-1] = lo, hi  # the ends as given (the root and power cost a few ulps)
    return PathParts("ve", torch.ones(n, dtype=F64), sigma, 0.25 * log_sigma, -2 * log_sigma, step)


def _ve(n: int, p: Mapping[str, float]) -> PathParts:
    # Song et al. 2021 (score_sde VESDE): sigma_i = sigma_min (sigma_max/sigma_min)^(i/(N-1)),
    # geometric, ascending in t; NCSN++ takes sigma itself as its noise input.
    lo, hi = p["sigma_min"], p["sigma_max"]
    _check_sigmas("ve", lo, hi)
    ramp = torch.arange(n, dtype=F64) / (n - 1)
    log_sigma = math.log(lo) + ramp * (math.log(hi) - math.log(lo))
    sigma = torch.exp(log_sigma)
    sigma[0], sigma[-1] = lo, hi  # the ends as given
    step = torch.full((n - 1,), -2 * (math.log(hi) - math.log(lo)) / (n - 1), dtype=F64)
    return PathParts("ve", torch.ones(n, dtype=F64), sigma, sigma.clone(), -2 * log_sigma, step)
