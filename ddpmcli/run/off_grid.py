"""A model call at a noise level between a run's grid points (Karras et al. 2022's churned
sigma_hat): the model timestep there and the x0_hat its output implies.

The timestep follows the rule diffusers' ``_sigma_to_t`` and k-diffusion's ``DiscreteSchedule``
apply to a training table, here on the run's own grid: linear in log sigma between the two
neighbouring grid points (sigma = sigma_t/alpha_t, the EDM sigma), clamped to the grid's first
and last timesteps outside it. (On a grid spanning the training range, as Karras and trailing
grids do, a churned first step thus gets the largest timestep, as in k-diffusion.) The output is
turned into x0_hat at that point of the path by the core's one conversion
(:func:`ddpmcli.core.ode_path.prediction_to_x0_eps`).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ddpmcli.core import ode_path
from ddpmcli.run.solver_grid import PathGrid, path_point

__all__ = ["timestep_at", "x0_at"]


def timestep_at(edm_sigma: float, grid: PathGrid, model_t: Sequence[float]) -> float:
    """The model timestep at EDM sigma ``edm_sigma`` on ``grid`` (entry 0 the least noisy),
    whose entries the model takes at ``model_t``: linear in log sigma, clamped at the ends."""

    def sigma(i: int) -> float:  # increasing in i; inf where alpha = 0 (a flow's s = 1)
        return grid.edm_sigma(i) if grid.alpha[i] > 0 else math.inf

    k = bisect.bisect_right(range(len(model_t)), edm_sigma, key=sigma)  # O(log N) a call
    if k == 0:
        return model_t[0]
    if k >= len(model_t) or not math.isfinite(sigma(k)):
        return model_t[k - 1]
    lo, hi = math.log(sigma(k - 1)), math.log(sigma(k))
    w = (math.log(edm_sigma) - lo) / (hi - lo)
    return model_t[k - 1] + w * (model_t[k] - model_t[k - 1])


def x0_at(out: Tensor, x: Tensor, path: str, edm_sigma: float, prediction_type: str) -> Tensor:
    """x0_hat of the model output ``out`` at ``x``, the point of EDM sigma ``edm_sigma`` on
    ``path`` (in the path's coordinates)."""
    alpha, sigma = path_point(path, edm_sigma)
    a = torch.tensor(alpha, dtype=x.dtype, device=x.device)
    s = torch.tensor(sigma, dtype=x.dtype, device=x.device)
    return ode_path.prediction_to_x0_eps(out, x, a, s, prediction_type)[0]
