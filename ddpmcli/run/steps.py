"""Sampler steps registered by name: the settings, what a step sees, the registry, the checks.

A sampler is a *step*: ``step(ctx) -> (x_next, log_var | None)`` for one batch at one index
(:class:`StepContext` holds x_t, the model output and the x0_hat it implies, the run's path
coefficients and the step's own state). Steps are registered by name with
:func:`register_sampler` (``ddpm``: ancestral with a variance choice, Ho et al. 2020 Algorithm 2;
``ddim``: Song et al. 2021 with ``eta``; the ODE/SDE solvers in their own modules:
:mod:`~ddpmcli.run.dpm_solver`, :mod:`~ddpmcli.run.unipc`, :mod:`~ddpmcli.run.k_samplers`,
:mod:`~ddpmcli.run.flow_euler`); :func:`ddpmcli.run.samplers.sample` is the one loop that runs
any of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ddpmcli import core
from ddpmcli.errors import check_choice
from ddpmcli.run.events import ParameterError
from ddpmcli.run.solver_grid import PathGrid, solver_options_unused

__all__ = [
    "DEFAULT_THRESHOLD_PERCENTILE",
    "SampleSettings",
    "Sampler",
    "StepContext",
    "check_init",
    "check_sample_settings",
    "dynamic_threshold",
    "limit_x0",
    "register_sampler",
    "registered",
    "respaced_schedule",
    "sampler_names",
]

DEFAULT_THRESHOLD_PERCENTILE = core.DEFAULT_THRESHOLD_PERCENTILE
dynamic_threshold = core.dynamic_threshold


@dataclass(frozen=True)
class SampleSettings:
    """How to sample.

    Args:
        sampler: a registered sampler: ``ddpm`` (ancestral, Ho et al. 2020 Algorithm 2) or
            ``ddim`` (Song et al. 2021), or one added with :func:`register_sampler`.
        variance: the ancestral variance: ``fixed_small`` (beta_tilde), ``fixed_large`` (beta, with
            beta_tilde_1 at t = 0, improved-diffusion's convention) or ``learned_range`` (the
            model's variance channel, Nichol & Dhariwal 2021 eq. 15). Ignored by ``ddim``.
        eta: DDIM's noise scale (0 = deterministic, 1 = the ancestral sampler's fixed_small).
        clip: clamp x0_hat to ``data_range`` before the posterior step.
        dynamic_threshold: a percentile p in (0, 1) for dynamic thresholding (Saharia et al. 2022);
            replaces ``clip`` when set.
        data_range: the data's value range (what clipping and ``clip_fraction`` refer to).
        trajectory_every: keep x0_hat every K steps (and at the last step) for a figure.
        trajectory_samples: how many samples (the first ones) a trajectory frame keeps.
        order, solver_type, lower_order_final, euler_at_final, final_sigma, corrector, s_churn,
            s_tmin, s_tmax, s_noise, stochastic: the options of the ODE/SDE solvers
            (:mod:`ddpmcli.run.solvers`, which checks which sampler takes which): the multistep
            order (DPM-Solver++ 1-3, UniPC 1-3), ``midpoint``/``heun`` (DPM-Solver++) or
            ``bh1``/``bh2`` (UniPC), lower order near the end, Euler at the final step, the EDM
            sigma the last step lands on (0: clean data; diffusers' ``final_sigmas_type``),
            UniPC's corrector, Karras et al. 2022's churn (Euler, Heun), and flow Euler's
            ``stochastic_sampling``.
        dpm_form: DPM-Solver++'s third-order update, ``diffusers`` (bit-compatible) or
            ``exact`` (third order in fact; :mod:`ddpmcli.run.dpm_solver`).
    """

    sampler: str = "ddpm"
    variance: str = "fixed_small"
    eta: float = 0.0
    clip: bool = True
    dynamic_threshold: float | None = None
    data_range: tuple[float, float] = (-1.0, 1.0)
    trajectory_every: int | None = None
    trajectory_samples: int = 16
    order: int | None = None
    solver_type: str | None = None
    lower_order_final: bool = True
    euler_at_final: bool = False
    final_sigma: float = 0.0
    corrector: bool = True
    dpm_form: str = "diffusers"
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = math.inf
    s_noise: float = 1.0
    stochastic: bool = False


# ---------------------------------------------------------------------------------------------
# steps, registered by name


@dataclass(frozen=True)
class StepContext:
    """One batch at one schedule index, as a step sees it (tensors in the sampler's dtype).

    ``x0`` is x0_hat as the step should use it (clipped or thresholded); ``x0_raw`` the model's
    own (the same object when nothing changed it); ``noise`` is z ~ N(0, I), zeros when the
    sampler draws none at this index.
    ``index`` is ``i`` as an int, ``grid`` the run's path coefficients on the host
    (:class:`~ddpmcli.run.solver_grid.PathGrid`), ``state`` the step's own per-run state (its
    sampler's ``new_state()``, one per batch of samples: a multistep solver's history), and
    ``evaluate(x, j)`` x0_hat (limited as ``x0``) of the model at ``x`` and index ``j`` (a second
    evaluation within the step, Heun's). ``edm_sigma``: where the sampler's ``perturb`` moved x
    off the grid before the model call (Karras et al.'s churn), the EDM sigma sigma_t/alpha_t
    that ``x`` (in that point's path coordinates) and ``x0`` belong to; None: index ``i``.
    """

    schedule: core.Schedule
    x: Tensor
    t: Tensor
    out: Tensor
    var_values: Tensor | None
    x0: Tensor
    x0_raw: Tensor
    noise: Tensor
    prediction_type: str
    settings: SampleSettings
    index: int = 0
    grid: PathGrid | None = None
    state: Any = None
    evaluate: Callable[[Tensor, int], Tensor] | None = None
    edm_sigma: float | None = None


StepFn = Callable[[StepContext], tuple[Tensor, "Tensor | None"]]
"""``step(ctx) -> (x_next, log_var)``: log_var of the noise added, or None (not measured)."""

PerturbFn = Callable[
    [Tensor, "Tensor | None", int, PathGrid, SampleSettings], "tuple[Tensor, float] | None"
]
"""``perturb(x, noise, i, grid, settings) -> (x_hat, edm_sigma_hat) | None``: a new point for
the model call at index ``i`` (x_hat in that point's path coordinates), or None to stay."""


@dataclass(frozen=True)
class Sampler:
    """A registered sampler: its step, whether it draws noise, its per-index noise variances."""

    name: str
    step: StepFn
    uses_noise: Callable[[SampleSettings], bool]
    variances: Callable[[core.Schedule, SampleSettings], list[float] | None]
    new_state: Callable[[], Any] | None = None
    check: Callable[[SampleSettings], None] | None = None
    noise_at_zero: Callable[[SampleSettings], bool] | None = None
    evaluations: Callable[[int, SampleSettings], int] | None = None
    order: Callable[[int, int, SampleSettings], int] | None = None
    perturb: PerturbFn | None = None
    check_grid: Callable[[PathGrid, SampleSettings], None] | None = None


_REGISTRY: dict[str, Sampler] = {}


def _always(settings: SampleSettings) -> bool:
    return True


def _measured(schedule: core.Schedule, settings: SampleSettings) -> list[float] | None:
    return None


def register_sampler(
    name: str,
    *,
    uses_noise: Callable[[SampleSettings], bool] = _always,
    variances: Callable[[core.Schedule, SampleSettings], list[float] | None] = _measured,
    new_state: Callable[[], Any] | None = None,
    check: Callable[[SampleSettings], None] | None = None,
    noise_at_zero: Callable[[SampleSettings], bool] | None = None,
    evaluations: Callable[[int, SampleSettings], int] | None = None,
    order: Callable[[int, int, SampleSettings], int] | None = None,
    perturb: PerturbFn | None = None,
    check_grid: Callable[[PathGrid, SampleSettings], None] | None = None,
) -> Callable[[StepFn], StepFn]:
    """Register ``step`` under ``name`` (a decorator); :func:`sample` then runs it by name.

    Args:
        uses_noise: whether the sampler draws z at indices > 0 (default: always).
        variances: the variance of the noise added at each index, host side (default None:
            measured from the log_var each step returns, 0 where it returns None).
        new_state: a fresh per-run state for the step (``ctx.state``), or None.
        check: raises :class:`ParameterError` for settings the sampler does not take.
        noise_at_zero: whether the step also draws z at index 0 (Euler's churn).
        evaluations: model evaluations of a run of N indices per sample (default N).
        order: ``(i, N, settings) ->`` the order of the step at index ``i`` (the ``order``
            column; default 1).
        perturb: moves x before the model call at an index (see :data:`PerturbFn`); the model
            is then called there, and the step sees the point as ``ctx.x``/``ctx.edm_sigma``.
        check_grid: raises :class:`ParameterError` for settings the run's grid makes void
            (called before any model call).
    """

    def add(step: StepFn) -> StepFn:
        _REGISTRY[name] = Sampler(
            name, step, uses_noise, variances, new_state, check, noise_at_zero, evaluations,
            order, perturb, check_grid,
        )  # fmt: skip
        return step

    return add


def sampler_names() -> tuple[str, ...]:
    """The registered samplers' names, in registration order."""
    return tuple(_REGISTRY)


def _fixed_variances(schedule: core.Schedule, variance: str) -> list[float]:
    """exp(log variance) per index of a fixed ancestral variance (host side); 0 at index 0,
    where no noise is added."""
    var = torch.exp(schedule.sampler_log_variance(variance).to(torch.float64))
    var[0] = 0.0
    return [float(v) for v in var]


def _ancestral_variances(schedule: core.Schedule, settings: SampleSettings) -> list[float] | None:
    if settings.variance == "learned_range":
        return None
    return _fixed_variances(schedule, settings.variance)


def _ddim_variances(schedule: core.Schedule, settings: SampleSettings) -> list[float]:
    var = schedule.ddim_variance(settings.eta).to(torch.float64)  # Song et al. 2021 eq. 16
    var[0] = 0.0  # no noise is added at index 0
    return [float(v) for v in var]


@register_sampler("ddpm", variances=_ancestral_variances)
def ancestral_step(ctx: StepContext) -> tuple[Tensor, Tensor | None]:
    """x_{t-1} = mu_tilde(x_t, x0_hat) + sigma z with the chosen variance (no noise at t = 0)."""
    vv = ctx.var_values
    log_var = ctx.schedule.model_log_variance(ctx.settings.variance, ctx.t, ctx.x, vv)
    return ctx.schedule.ancestral_step(ctx.x, ctx.t, ctx.x0, log_var, ctx.noise), log_var


@register_sampler("ddim", uses_noise=lambda s: s.eta > 0, variances=_ddim_variances)
def ddim_step(ctx: StepContext) -> tuple[Tensor, Tensor | None]:
    """DDIM (Song et al. 2021 eq. 12) with eps consistent with the x0_hat actually used
    (improved-diffusion's ddim_sample); the model's own eps where x0_hat was not changed."""
    sched, x, t = ctx.schedule, ctx.x, ctx.t
    if ctx.x0 is ctx.x0_raw:
        eps = sched.predict_eps(ctx.out, x, t, ctx.prediction_type)
    else:
        eps = sched.eps_from_x0(x, t, ctx.x0)
    return sched.ddim_step(x, t, ctx.x0, eps, ctx.settings.eta, ctx.noise), None


# ---------------------------------------------------------------------------------------------
# settings, respacing, thresholding


def check_sample_settings(settings: SampleSettings, *, learned_variance: bool) -> None:
    """Raise :class:`ParameterError` (exit 2) for settings that cannot run, before any work."""
    if settings.sampler not in _REGISTRY:
        raise ParameterError(
            f"{{sampler}} {settings.sampler!r} is unknown; allowed: {', '.join(_REGISTRY)}"
        )
    if settings.variance not in core.VARIANCE_TYPES:
        raise ParameterError(
            f"{{variance}} {settings.variance!r} is unknown; "
            f"allowed: {', '.join(core.VARIANCE_TYPES)}"
        )
    if settings.sampler == "ddpm" and settings.variance == "learned_range" and not learned_variance:
        raise ParameterError(
            "{variance} learned_range needs a model with a variance channel; this checkpoint "
            "predicts no variance (use fixed_small or fixed_large)"
        )
    if not math.isfinite(settings.eta) or not 0 <= settings.eta <= 1e100:  # eta**2 stays finite
        raise ParameterError(
            f"{{eta}} must be a finite number >= 0 (at most 1e100), got {settings.eta}"
        )
    if settings.eta != 0 and settings.sampler != "ddim":
        raise ParameterError("{eta} applies to {sampler} ddim only")
    check = _REGISTRY[settings.sampler].check
    if check is not None:
        check(settings)
    else:
        solver_options_unused(settings)
    p = settings.dynamic_threshold
    if p is not None and not 0 < p < 1:
        raise ParameterError(f"{{dynamic_threshold}} percentile must lie in (0, 1), got {p}")
    lo, hi = settings.data_range
    if not lo < hi:
        raise ParameterError(f"data range must have lo < hi, got [{lo}, {hi}]")
    if settings.trajectory_every is not None and settings.trajectory_every < 1:
        raise ParameterError(f"{{trajectory_every}} must be >= 1, got {settings.trajectory_every}")


def check_init(init: Tensor, n: int, data_shape: Sequence[int]) -> Tensor:
    """``init`` if it is a finite tensor of shape ``[n, *data_shape]``, else a
    :class:`ParameterError` (exit 2) naming what is wrong."""
    want = (n, *(int(s) for s in data_shape))
    if not isinstance(init, Tensor):
        raise ParameterError(f"{{init}} must be a tensor of shape {list(want)}, got {type(init)}")
    if tuple(init.shape) != want:
        raise ParameterError(
            f"{{init}} has shape {list(init.shape)}; this run needs {list(want)} (n samples of "
            "the model's data shape)"
        )
    if not init.is_floating_point():
        raise ParameterError(f"{{init}} must hold floating-point numbers, got {init.dtype}")
    bad = ~torch.isfinite(init)
    if bool(bad.any()):
        k = int(torch.nonzero(bad.flatten(1).any(1))[0])
        raise ParameterError(f"{{init}} holds NaN/Inf (first in sample {k})")
    return init


def respaced_schedule(
    schedule: core.Schedule,
    steps: int | str | None,
    spacing: str = "leading",
    offset: int = 0,
) -> core.Schedule:
    """The schedule a sampler runs: ``schedule`` itself when ``steps`` is None or T, else
    :func:`core.respaced` (``steps`` a count or a section string such as ``ddim50`` /
    ``10,20,30``; ``offset`` is diffusers' ``steps_offset``, added under leading spacing). A count
    outside 1..T is a :class:`ParameterError`."""
    big_t = schedule.num_steps
    if steps is None:
        return schedule
    if isinstance(steps, str) and steps.strip().isdigit():
        steps = int(steps.strip())
    if isinstance(steps, int):
        if steps < 1:
            raise ParameterError(f"{{steps}} must be at least 1, got {steps}")
        if steps > big_t:
            raise ParameterError(
                f"{{steps}} {steps} is more than the model's T = {big_t} training timesteps"
            )
        if steps == big_t:
            return schedule
    check_choice(spacing, core.SPACINGS, "spacing")
    return core.respaced(schedule, steps, spacing, offset)


def limit_x0(x0: Tensor, settings: SampleSettings) -> Tensor:
    """x0_hat as the step uses it: thresholded, clipped, or ``x0`` itself (the same object)."""
    if settings.dynamic_threshold is not None:
        return core.dynamic_threshold(x0, settings.dynamic_threshold, settings.data_range)
    if settings.clip:
        return x0.clamp(*settings.data_range)
    return x0


def registered(name: str) -> Sampler:
    """The sampler registered as ``name`` (a :class:`ParameterError` for an unknown one)."""
    if name not in _REGISTRY:
        raise ParameterError(f"{{sampler}} {name!r} is unknown; allowed: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]
