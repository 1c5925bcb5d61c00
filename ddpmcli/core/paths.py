"""Schedules of any Gaussian path ``x_t = alpha_t x0 + sigma_t eps``.

Every such path is ``c_t = sqrt(alpha_t^2 + sigma_t^2)`` times a variance-preserving path with
``alpha_bar = alpha_t^2/(alpha_t^2 + sigma_t^2)`` and the same SNR, so a :class:`Schedule` of a
path holds both: the VP-equivalent arrays under their usual names (``alpha_bar``, ``beta``,
``posterior_variance`` ...) and the path's own (``alpha_t``, ``sigma_t``, ``model_timestep``,
``path_posterior_*``). A VP schedule is the special case whose path arrays are its VP arrays.

Imports torch and the standard library only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ddpmcli.core.assemble import _as_f64, assemble_path, path_posterior
from ddpmcli.core.path_kinds import (
    PATHS,
    PathParts,
    flow_path,
    flow_shift_factor,
    shifted_unit_grid,
)
from ddpmcli.core.schedule import Schedule
from ddpmcli.errors import ScheduleError

__all__ = [
    "PATHS",
    "PathParts",
    "flow_path",
    "flow_shift_factor",
    "path_posterior",
    "schedule_from_path",
    "shifted_unit_grid",
]


def _check_path(path: str, alpha: Tensor, sigma: Tensor, timestep: Tensor) -> None:
    if path not in PATHS:
        raise ScheduleError(f"unknown path {path!r}; allowed: {', '.join(PATHS)}")
    n = alpha.numel()
    if sigma.numel() != n or timestep.numel() != n:
        raise ScheduleError(
            f"path arrays differ in length: alpha_t {n}, sigma_t {sigma.numel()}, "
            f"model_timestep {timestep.numel()}"
        )
    for name, values in (("alpha_t", alpha), ("sigma_t", sigma), ("model_timestep", timestep)):
        bad = ~torch.isfinite(values)
        if bool(bad.any()):
            i = int(torch.nonzero(bad)[0])
            raise ScheduleError(f"{name}[{i}] = {float(values[i])!r} must be finite")
    # alpha in [0, 1] (0 only at the last entry: zero terminal SNR), sigma > 0
    outside = (alpha < 0) | (alpha > 1) | ((alpha == 0) & (torch.arange(n) != n - 1))
    if bool(outside.any()):
        i = int(torch.nonzero(outside)[0])
        raise ScheduleError(
            f"alpha_t[{i}] = {float(alpha[i])!r} is outside (0, 1] (0 only at the last entry)"
        )
    if bool((sigma <= 0).any()):
        i = int(torch.nonzero(sigma <= 0)[0])
        raise ScheduleError(f"sigma_t[{i}] = {float(sigma[i])!r} must be > 0")


def schedule_from_path(
    path: str,
    alpha_t: Sequence[float] | Tensor,
    sigma_t: Sequence[float] | Tensor,
    model_timestep: Sequence[float] | Tensor,
    *,
    name: str = "custom",
    spec: dict[str, Any] | None = None,
) -> Schedule:
    """A schedule of the path ``x_t = alpha_t x0 + sigma_t eps`` from explicit float64 arrays.

    Args:
        path: ``vp``, ``flow`` or ``ve`` (:data:`PATHS`): the coordinates x_t lives in.
        alpha_t, sigma_t: 1-D, entry 0 the least noisy; alpha_t in [0, 1] (0 only at the last
            entry), sigma_t > 0, sigma_t/alpha_t strictly increasing.
        model_timestep: what the network is called with at each entry (float64).
        name: the schedule's name; ``spec``: what rebuilds it (default: the arrays themselves).

    The log-SNR steps are formed from the arrays (lambda_i - lambda_{i-1}); kinds that know their
    increments exactly build :class:`PathParts` themselves.
    """
    # non-finite values are named per field by _check_path
    alpha = _as_f64(alpha_t, "alpha_t", finite=False)
    sigma = _as_f64(sigma_t, "sigma_t", finite=False)
    timestep = _as_f64(model_timestep, "model_timestep", finite=False)
    _check_path(path, alpha, sigma, timestep)
    log_snr = 2 * (torch.log(alpha) - torch.log(sigma))
    falling = torch.diff(log_snr) >= 0
    if bool(falling.any()):
        i = int(torch.nonzero(falling)[0]) + 1
        raise ScheduleError(
            f"sigma_t/alpha_t must increase strictly: entry {i} "
            f"({float(sigma[i] / alpha[i])!r}) is not above entry {i - 1} "
            f"({float(sigma[i - 1] / alpha[i - 1])!r})"
        )
    if spec is None:
        spec = {
            "kind": "path",
            "path": path,
            "alpha_t": alpha.tolist(),
            "sigma_t": sigma.tolist(),
            "model_timestep": timestep.tolist(),
        }
    parts = PathParts(path, alpha, sigma, timestep, log_snr, torch.diff(log_snr))
    n = alpha.numel()
    return assemble_path(name, spec, parts, torch.arange(n), n)
