"""The probability-flow ODE of a Gaussian path in continuous time (Song et al. 2021, eq. 13),
written once for every path: VP, flow matching and sigma space (VE/EDM).

Time is the path's *flow time* ``rho = sigma/(alpha + sigma)`` in [0, 1] (flow matching's ``s``
itself; finite where alpha = 0). Each path is one closed form of ``(alpha, sigma)`` in ``rho``,
all with ``alpha/sigma = (1 - rho)/rho``, so the log-SNR is ``lambda = 2 log((1 - rho)/rho)`` on
every path:

- ``vp``:   ``alpha = (1 - rho)/c``, ``sigma = rho/c``, ``c = sqrt((1 - rho)^2 + rho^2)``;
- ``flow``: ``alpha = 1 - rho``, ``sigma = rho``;
- ``ve``:   ``alpha = 1``, ``sigma = rho/(1 - rho)``.

With ``x = alpha x0 + sigma eps`` the ODE ``dx = [f x - g^2/2 score] dt`` (``f = (log alpha)'``,
``g^2 = -sigma^2 lambda'``, ``score = -eps_hat/sigma``) is ``dx/drho = alpha' x0_hat + sigma'
eps_hat``: the path's velocity at the model's prediction (flow: ``eps_hat - x0_hat = v``).

A discrete schedule gives the ODE its model timesteps: between two entries the timestep is
interpolated linearly in log-SNR (diffusers' ``sigma_to_timestep`` interpolates in log sigma,
the same up to the path's scale), linearly in ``rho`` on a segment that reaches alpha = 0 or
sigma = 0 (an infinite log-SNR); the model is called at these float timesteps.
Float64 throughout; torch and the standard library only.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ddpmcli.errors import ScheduleError

__all__ = [
    "ODE_PATHS",
    "gaussian_log_density",
    "log_snr_of_rho",
    "path_coefficients",
    "path_of_entries",
    "prediction_to_x0_eps",
    "rho_of_log_snr",
    "timestep_at",
]

ODE_PATHS: tuple[str, ...] = ("vp", "flow", "ve")


def log_snr_of_rho(rho: Tensor) -> Tensor:
    """``lambda = 2 log((1 - rho)/rho)`` (the same on every path)."""
    return 2.0 * (torch.log1p(-rho) - torch.log(rho))


def rho_of_log_snr(lam: Tensor) -> Tensor:
    """``rho = sigmoid(-lambda/2)``, the inverse of :func:`log_snr_of_rho`."""
    return torch.sigmoid(-0.5 * lam)


def path_coefficients(path: str, rho: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(alpha, sigma, d alpha/d rho, d sigma/d rho)`` of ``path`` at flow times ``rho``."""
    one = torch.ones_like(rho)
    if path == "flow":
        return 1.0 - rho, rho, -one, one
    if path == "ve":
        return one, rho / (1.0 - rho), torch.zeros_like(rho), 1.0 / (1.0 - rho) ** 2
    if path == "vp":
        c = torch.sqrt((1.0 - rho) ** 2 + rho**2)
        dc = (2.0 * rho - 1.0) / c
        alpha, sigma = (1.0 - rho) / c, rho / c
        return alpha, sigma, (-c - (1.0 - rho) * dc) / c**2, (c - rho * dc) / c**2
    raise ScheduleError(
        f"the probability-flow ODE knows the paths {', '.join(ODE_PATHS)}, not {path!r}"
    )


def path_of_entries(path: str, alpha: Tensor, sigma: Tensor) -> Tensor:
    """The flow times ``rho`` of a schedule's entries, after checking that they lie on ``path``
    (its closed form within 1e-9), so that the continuous ODE passes through every entry."""
    alpha, sigma = alpha.double(), sigma.double()
    if path == "vp":
        off = (alpha**2 + sigma**2 - 1.0).abs()
    elif path == "flow":
        off = (alpha + sigma - 1.0).abs()
    elif path == "ve":
        off = (alpha - 1.0).abs()
    else:
        raise ScheduleError(
            f"the probability-flow ODE knows the paths {', '.join(ODE_PATHS)}, not {path!r}"
        )
    worst = float(off.max()) if off.numel() else 0.0
    if not worst <= 1e-9:
        raise ScheduleError(
            f"the schedule's alpha_t, sigma_t are not a {path} path (off by {worst:.3g}); the "
            "probability-flow ODE needs one of its closed forms"
        )
    rho = sigma / (alpha + sigma)
    if not bool((rho[1:] > rho[:-1]).all()):
        raise ScheduleError("the schedule's sigma_t/alpha_t must increase strictly")
    return rho


def timestep_at(rho: Tensor, nodes: Tensor, log_snr: Tensor, timesteps: Tensor) -> Tensor:
    """The model timestep at flow times ``rho`` [b]: between entries ``i`` and ``i + 1`` of the
    schedule (``nodes`` their flow times, increasing), linear in log-SNR, or in ``rho`` where an
    end's log-SNR is infinite; clamped to the first and last entries outside them."""
    n = nodes.shape[0]
    if n == 1:
        return timesteps.expand(rho.shape[0]).clone()
    i = torch.searchsorted(nodes, rho.contiguous(), right=True).sub(1).clamp(0, n - 2)
    r0, r1 = nodes[i], nodes[i + 1]
    l0, l1 = log_snr[i], log_snr[i + 1]
    finite = torch.isfinite(l0) & torch.isfinite(l1)
    lam = log_snr_of_rho(rho.clamp(min=1e-300, max=1.0 - 1e-16))
    w_lam = (lam - torch.where(finite, l0, 0.0)) / torch.where(finite, l1 - l0, 1.0)
    w = torch.where(finite, w_lam, (rho - r0) / (r1 - r0)).clamp(0.0, 1.0)
    return timesteps[i] + w * (timesteps[i + 1] - timesteps[i])


def prediction_to_x0_eps(
    out: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor, kind: str
) -> tuple[Tensor, Tensor]:
    """``(x0_hat, eps_hat)`` from a model output at ``x = alpha x0 + sigma eps`` (``alpha``,
    ``sigma`` broadcast against ``x``): the conversions of ``Schedule.predict_x0/predict_eps``
    at any point of the path, not only at a schedule's entries.

    ``v_prediction`` keeps its VP meaning (``v = a eps - s x0`` on the VP path of the same SNR,
    ``a = alpha/c``, ``s = sigma/c``, ``c = sqrt(alpha^2 + sigma^2)``); ``flow`` is ``v = eps -
    x0``.
    """
    if kind == "epsilon":
        return (x - sigma * out) / alpha, out
    if kind == "sample":
        return out, (x - alpha * out) / sigma
    if kind == "v_prediction":
        c = torch.sqrt(alpha**2 + sigma**2)
        a, s, xv = alpha / c, sigma / c, x / c
        return a * xv - s * out, s * xv + a * out
    if kind == "flow":
        total = alpha + sigma
        return (x - sigma * out) / total, (x + alpha * out) / total
    raise ScheduleError(f"unknown prediction type {kind!r} for the probability-flow ODE")


def gaussian_log_density(x: Tensor, variance: float) -> Tensor:
    """``log N(x; 0, variance I)`` summed over all but the first dimension."""
    flat = x.flatten(1)
    d = flat.shape[1]
    return -0.5 * (flat**2).sum(1) / variance - 0.5 * d * math.log(2 * math.pi * variance)
