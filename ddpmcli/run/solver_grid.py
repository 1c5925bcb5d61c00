"""The path coefficients a solver step reads, on the host in float64, once per run.

A run's schedule (``core.Schedule``, entry 0 the least noisy) holds the path
``x_t = alpha_t x0 + sigma_t eps`` at every index. The step at index ``i`` goes from entry ``i`` to
entry ``i - 1``, and the step at index 0 to the final point: clean data (``alpha = 1``,
``sigma = 0``) or, for diffusers' ``final_sigmas_type="sigma_min"``, the point of EDM sigma
``final_sigma`` on the same path. :class:`PathGrid` keeps ``alpha``, ``sigma`` and the half
log-SNR ``lambda = log(alpha/sigma)`` (Lu et al. 2022) of both ends of every step as Python floats,
so that an update's coefficients cost nothing per call and are float64 whatever the state's dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ddpmcli import core, limits
from ddpmcli.run.events import ParameterError

__all__ = [
    "PathGrid",
    "check_x0_defined",
    "model_timesteps",
    "path_grid",
    "path_point",
    "path_schedule",
    "solver_options_unused",
    "step_grid",
    "table_timesteps",
]


@dataclass(frozen=True)
class PathGrid:
    """alpha, sigma, lambda of every index and of every step's target (``*_to``), host floats.

    ``lam_to[0]`` is +inf when the last step lands on clean data. ``path``: ``vp``, ``flow`` or
    ``ve`` (the schedule's own, ``vp`` for a schedule without one).
    """

    path: str
    alpha: tuple[float, ...]
    sigma: tuple[float, ...]
    lam: tuple[float, ...]
    alpha_to: tuple[float, ...]
    sigma_to: tuple[float, ...]
    lam_to: tuple[float, ...]

    @property
    def num_steps(self) -> int:
        return len(self.alpha)

    def edm_sigma(self, i: int) -> float:
        """sigma_t/alpha_t at index ``i`` (Karras et al. 2022's sigma)."""
        return self.sigma[i] / self.alpha[i]

    def edm_sigma_to(self, i: int) -> float:
        """sigma/alpha of the point the step at index ``i`` lands on (0 for clean data)."""
        return self.sigma_to[i] / self.alpha_to[i]

    def gap(self, i: int) -> float:
        """The step's log-SNR gap h = lambda_to - lambda (the half log-SNR; inf at a last step
        onto clean data)."""
        return self.lam_to[i] - self.lam[i]


def path_point(path: str, edm_sigma: float) -> tuple[float, float]:
    """(alpha, sigma) of the point of EDM sigma ``edm_sigma`` = sigma/alpha on ``path``."""
    if path == "flow":  # alpha = 1 - s, sigma = s
        return 1.0 / (1.0 + edm_sigma), edm_sigma / (1.0 + edm_sigma)
    if path == "ve":
        return 1.0, edm_sigma
    scale = math.sqrt(1.0 + edm_sigma * edm_sigma)  # VP: alpha^2 + sigma^2 = 1
    return 1.0 / scale, edm_sigma / scale


def _coefficients(schedule: core.Schedule) -> tuple[list[float], list[float], list[float]]:
    """alpha_t, sigma_t and lambda = log_snr/2 of every entry, float64 on the host."""
    alpha = getattr(schedule, "alpha_t", None)
    sigma = getattr(schedule, "sigma_t", None)
    if alpha is None or sigma is None:
        alpha, sigma = schedule.sqrt_alpha_bar, schedule.sqrt_one_minus_alpha_bar
    lam = (schedule.log_snr.to("cpu", torch.float64) / 2).tolist()
    return (
        alpha.to("cpu", torch.float64).tolist(),
        sigma.to("cpu", torch.float64).tolist(),
        lam,
    )


def path_grid(schedule: core.Schedule, final_sigma: float = 0.0) -> PathGrid:
    """The :class:`PathGrid` of a run of ``schedule``, its last step landing on EDM sigma
    ``final_sigma`` (0: clean data)."""
    path = str(getattr(schedule, "path", "vp"))
    alpha, sigma, lam = _coefficients(schedule)
    if final_sigma > 0:
        a_f, s_f = path_point(path, final_sigma)
        lam_f = math.log(a_f / s_f)
    else:
        a_f, s_f, lam_f = 1.0, 0.0, math.inf
    return PathGrid(
        path=path,
        alpha=tuple(alpha),
        sigma=tuple(sigma),
        lam=tuple(lam),
        alpha_to=(a_f, *alpha[:-1]),
        sigma_to=(s_f, *sigma[:-1]),
        lam_to=(lam_f, *lam[:-1]),
    )


def model_timesteps(schedule: core.Schedule) -> tuple[float, ...]:
    """What the model is called with at every index: ``schedule.model_timestep`` where the
    schedule has one (float: a VP model on a sigma grid, a flow model), else its timesteps."""
    values = getattr(schedule, "model_timestep", None)
    if values is None:
        values = schedule.timesteps
    return tuple(float(v) for v in values.to("cpu", torch.float64).tolist())


_SOLVER_DEFAULTS: dict[str, Any] = {
    "order": None,
    "solver_type": None,
    "lower_order_final": True,
    "euler_at_final": False,
    "final_sigma": 0.0,
    "corrector": True,
    "dpm_form": "diffusers",
    "s_churn": 0.0,
    "s_tmin": 0.0,
    "s_tmax": math.inf,
    "s_noise": 1.0,
    "stochastic": False,
}


def solver_options_unused(settings: Any, allowed: tuple[str, ...] = ()) -> None:
    """Raise :class:`ParameterError` for a solver option set away from its default that the
    sampler ``settings.sampler`` does not take (``allowed`` are those it takes)."""
    for name, default in _SOLVER_DEFAULTS.items():
        if name in allowed:
            continue
        if getattr(settings, name) != default:
            takes = ", ".join(f"{{{a}}}" for a in allowed) or "none of the solver options"
            raise ParameterError(
                f"{{{name}}} does not apply to {{sampler}} {settings.sampler} (it takes {takes})"
            )


def step_grid(ctx: Any) -> PathGrid:
    """``ctx.grid`` of a :class:`~ddpmcli.run.samplers.StepContext` (the loop always sets it; a
    step called by hand without one is a usage error, not an assertion)."""
    grid = ctx.grid
    if not isinstance(grid, PathGrid):
        raise ParameterError(f"{{sampler}} {ctx.settings.sampler} needs the run's grid (ctx.grid)")
    return grid


def grid_schedule(
    train: core.Schedule, edm_sigmas: Any, model_timestep: Any, *, name: str = "grid"
) -> core.Schedule:
    """The run schedule of explicit noise levels on ``train``'s path: ``edm_sigmas`` (sigma/alpha,
    any order, distinct, > 0) and the model's timestep at each (same order). A repeated sigma or
    model timestep, or a non-finite or non-positive sigma, is a :class:`ParameterError`."""
    sig = torch.as_tensor(edm_sigmas, dtype=torch.float64).flatten()
    ts = torch.as_tensor(model_timestep, dtype=torch.float64).flatten()
    if sig.numel() == 0 or sig.numel() != ts.numel():
        raise ParameterError(
            f"the grid needs as many model timesteps ({ts.numel()}) as sigmas ({sig.numel()}), "
            "at least one"
        )
    if not bool(torch.isfinite(sig).all()) or bool((sig <= 0).any()):
        raise ParameterError("{sigmas} must be finite and > 0")
    path = str(getattr(train, "path", "vp"))
    points = [path_point(path, s) for s in sig.tolist()]
    alpha = torch.tensor([a for a, _ in points], dtype=torch.float64)
    sigma = torch.tensor([s for _, s in points], dtype=torch.float64)
    return path_schedule(path, alpha, sigma, ts, name=name)


def path_schedule(path: str, alpha: Any, sigma: Any, model_timestep: Any, *, name: str = "grid"
                  ) -> core.Schedule:  # fmt: skip
    """The run schedule of explicit points ``(alpha_t, sigma_t)`` of ``path`` (any order; a
    flow's s = 1 included) with the model's timestep at each; repeats are a ParameterError."""
    alpha = torch.as_tensor(alpha, dtype=torch.float64).flatten()
    sigma = torch.as_tensor(sigma, dtype=torch.float64).flatten()
    ts = torch.as_tensor(model_timestep, dtype=torch.float64).flatten()
    order = torch.argsort(sigma / alpha)
    alpha, sigma, ts = alpha[order], sigma[order], ts[order]
    _check_distinct((sigma / alpha).tolist(), "sigma")
    _check_distinct(ts.tolist(), "model timestep")
    return core.schedule_from_path(path, alpha, sigma, ts, name=name)


def _check_distinct(values: list[float], what: str) -> None:
    for k in range(1, len(values)):
        if values[k] == values[k - 1]:
            raise ParameterError(
                f"the grid repeats a {what} ({values[k]!r}); each step needs its own noise level "
                "(on a sigma grid at many steps the rounded timesteps meet: fewer {steps})"
            )


def sigma_grid(
    train: core.Schedule, steps: int, spacing: str, *, whole_timesteps: bool = False
) -> core.Schedule:
    """``steps`` noise levels of a sigma spacing (``karras``, ``exponential``, ``beta``, ``lu``,
    :mod:`ddpmcli.core.grids`) between ``train``'s smallest and largest EDM sigma, with the
    model's timesteps interpolated in log sigma on ``train``'s table (diffusers' ``_sigma_to_t``;
    rounded to whole numbers with ``whole_timesteps``, as its multistep schedulers do)."""
    from ddpmcli.core import grids

    # a count past MAX_TIMESTEPS allocated it (--steps 10**9 --spacing karras: 8 GB, then OOM)
    limits.check_count(steps, "steps", maximum=limits.MAX_TIMESTEPS)
    table = train.sigma.to("cpu", torch.float64)
    lo, hi = float(table[0]), float(table[-1])
    if not math.isfinite(hi):
        raise ParameterError(
            f"{{spacing}} {spacing} needs a finite largest sigma; this schedule ends at sigma "
            "= inf (a flow from s = 1, or zero terminal SNR): use leading, trailing or linspace"
        )
    if spacing == "karras":
        sig = grids.karras_sigmas(steps, lo, hi)
    elif spacing == "exponential":
        sig = grids.exponential_sigmas(steps, lo, hi)
    elif spacing == "beta":
        sig = grids.beta_sigmas(steps, lo, hi)
    elif spacing == "lu":
        sig = grids.lu_sigmas(steps, lo, hi)
    else:
        raise ParameterError(f"unknown sigma {{spacing}} {spacing!r}")
    ts = grids.sigma_to_timestep(sig, table)
    if whole_timesteps:
        ts = torch.round(ts)
    return grid_schedule(
        train, sig, table_timesteps(train, ts), name=f"{train.name}@{spacing}{steps}"
    )


def table_timesteps(train: core.Schedule, index: torch.Tensor) -> torch.Tensor:
    """The model timesteps at the (fractional) ``index`` of ``train``'s table, as
    :func:`ddpmcli.core.grids.sigma_to_timestep` gives it: linear between the two neighbouring
    entries' model timesteps (so linear in log sigma, as the index is). A model called with its
    index (VP) gets ``index`` itself; a flow its ``1000 s``, ``edm_sigma`` its c_noise, ``ve`` its
    sigma (the index was passed as the timestep there: 769 where c_noise is 0.75)."""
    own = torch.tensor(model_timesteps(train), dtype=torch.float64)
    if torch.equal(own, torch.arange(own.numel(), dtype=torch.float64)):
        return index  # (the same digits as before)
    idx = index.to(torch.float64)
    low = torch.floor(idx).clamp(0, own.numel() - 2).to(torch.long)
    frac = idx - low
    return (1 - frac) * own[low] + frac * own[low + 1]


def check_x0_defined(grid: PathGrid, prediction_type: str) -> None:
    """An epsilon model cannot be sampled from a point where alpha_t = 0 (a flow's s = 1, a
    zero terminal SNR): x0 = (x_t - sigma_t eps)/alpha_t is 0/0 there. A ParameterError before
    any model call (the run's first step turned x_t into NaN, blamed on the dtype)."""
    if prediction_type != "epsilon":
        return
    if any(a == 0 for a in grid.alpha):
        raise ParameterError(
            "an epsilon model cannot be sampled from where alpha_t = 0 (the grid starts at pure "
            "noise: a flow's s = 1 or a zero terminal SNR): x0 = (x_t - sigma_t eps)/alpha_t is "
            "undefined there; start below it ({spacing} leading, or an explicit grid) or "
            "sample a v or flow model"
        )
