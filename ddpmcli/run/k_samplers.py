"""Euler, Euler ancestral and Heun in Karras et al. 2022's variables (``euler``, ``euler-a``,
``heun``), on any Gaussian path.

Karras et al. write the probability-flow ODE for ``x' = x/alpha`` at noise level
``sigma' = sigma/alpha`` (the EDM sigma): ``dx'/dsigma' = (x' - D(x'))/sigma'`` with ``D`` the
denoiser x0_hat. The loop's state stays in the path's coordinates (a VP model's x is diffusers'
``scale_model_input`` of its k-space sample), so each step divides by alpha_t, steps in
sigma', and multiplies by the target's alpha.

- ``euler``: ``x'_next = x'_hat + (sigma'_next - sigma'_hat) (x'_hat - D(x'_hat, sigma'_hat))/
  sigma'_hat`` with the churn of Karras et al. Algorithm 2: ``gamma = min(s_churn/N, sqrt 2 - 1)``
  where ``s_tmin <= sigma' <= s_tmax``, ``sigma'_hat = (1 + gamma) sigma'``,
  ``x'_hat = x' + s_noise sqrt(sigma'_hat^2 - sigma'^2) z``. The churn is the step's ``perturb``:
  it runs before the model call, and the model is called at (x'_hat, sigma'_hat), as in the
  paper and k-diffusion's ``sample_euler`` (diffusers' ``EulerDiscreteScheduler.step`` instead
  applies the output of a call at the pre-churn point; without churn the two agree). The
  timestep at sigma'_hat, between grid points, is :func:`ddpmcli.run.off_grid.timestep_at`'s.
  A churn whose window [s_tmin, s_tmax] holds no sigma of the grid is refused before any work.
- ``euler-a``: the ancestral step of k-diffusion / diffusers' ``EulerAncestralDiscreteScheduler``:
  ``sigma_up = sqrt(sigma_to^2 (sigma^2 - sigma_to^2)/sigma^2)``,
  ``sigma_down = sqrt(sigma_to^2 - sigma_up^2)``, an Euler step to sigma_down plus sigma_up z.
- ``heun``: Karras et al. Algorithm 2 (2nd order; Algorithm 1 without churn): the churn as
  Euler's, Euler to sigma'_next, a second model call there (``ctx.evaluate``), the trapezoidal
  average of both slopes; Euler for the last step: 2N - 1 model evaluations, as diffusers'
  ``HeunDiscreteScheduler`` and k-diffusion's ``sample_heun``.
"""

from __future__ import annotations

import math

from torch import Tensor

from ddpmcli.run.events import ParameterError
from ddpmcli.run.solver_grid import PathGrid, path_point, solver_options_unused, step_grid
from ddpmcli.run.steps import SampleSettings, StepContext, register_sampler

__all__ = ["churn", "churn_gamma"]

_CHURN = ("s_churn", "s_tmin", "s_tmax", "s_noise")


def churn_gamma(sigma: float, num: int, settings: SampleSettings) -> float:
    """Karras et al. 2022 Algorithm 2's gamma at EDM sigma ``sigma`` of a run of ``num`` steps."""
    if settings.s_churn == 0 or not settings.s_tmin <= sigma <= settings.s_tmax:
        return 0.0
    return min(settings.s_churn / num, math.sqrt(2.0) - 1.0)


def _check_churn(settings: SampleSettings) -> None:
    solver_options_unused(settings, _CHURN)
    for name in _CHURN:
        value = getattr(settings, name)
        if isinstance(value, bool | str) or not isinstance(value, int | float):
            # a str reached math.isnan (TypeError); a bool was taken as 0/1
            raise ParameterError(f"{{{name}}} must be a finite number >= 0, got {value!r}")
        if math.isnan(value) or value < 0 or (name != "s_tmax" and math.isinf(value)):
            raise ParameterError(f"{{{name}}} must be a finite number >= 0, got {value}")
    _check_order(settings)


_NO_CHURN = {"s_tmin": 0.0, "s_tmax": math.inf, "s_noise": 1.0}


def _check_order(settings: SampleSettings) -> None:
    for name, default in _NO_CHURN.items():  # as a window with no churn: without a word
        if settings.s_churn == 0 and getattr(settings, name) != default:
            raise ParameterError(
                f"{{{name}}} shapes the churn, which is off ({{s_churn}} 0): add {{s_churn}} "
                f"or drop {{{name}}}"
            )
    if settings.s_churn > 0 and settings.s_tmin > settings.s_tmax:
        raise ParameterError(
            f"{{s_churn}} {settings.s_churn:g} churns where {{s_tmin}} <= sigma <= {{s_tmax}}, an "
            f"empty window: {{s_tmin}} {settings.s_tmin:g} is above {{s_tmax}} "
            f"{settings.s_tmax:g}"
        )


def _check_window(grid: PathGrid, settings: SampleSettings) -> None:
    """A churn that no sigma of the run's grid falls under is a usage error, not a no-op. A grid
    from alpha_t = 0 is refused first, before any model call (with a churn it was called a
    window 'from inf to inf')."""
    for i in range(grid.num_steps):
        _k_sigma(grid, i)
    if settings.s_churn == 0:
        return
    _check_order(settings)
    sigmas = [grid.edm_sigma(i) for i in range(grid.num_steps) if grid.alpha[i] > 0]
    if any(settings.s_tmin <= s <= settings.s_tmax for s in sigmas):
        return
    raise ParameterError(
        f"{{s_churn}} {settings.s_churn:g} would never apply: no sigma of the grid lies in "
        f"[{{s_tmin}}, {{s_tmax}}] = [{settings.s_tmin:g}, {settings.s_tmax:g}] (its sigmas "
        f"sigma_t/alpha_t run from {min(sigmas, default=math.inf):.6g} to "
        f"{max(sigmas, default=math.inf):.6g})"
    )


def _check_heun(settings: SampleSettings) -> None:
    _check_churn(settings)


def _k_sigma(grid: PathGrid, i: int) -> float:
    """The EDM sigma at index i; one line where it is infinite (alpha = 0: a flow's s = 1)."""
    if grid.alpha[i] == 0:
        raise ParameterError(
            "euler, euler-a and heun step in sigma_t/alpha_t, infinite where the grid starts at "
            "alpha_t = 0 (a flow at s = 1): use flow-euler, dpmpp-2m or unipc, or a grid that "
            "starts below it (--spacing leading, --sigmas)"
        )
    return grid.edm_sigma(i)


def churn(
    x: Tensor, noise: Tensor | None, i: int, grid: PathGrid, settings: SampleSettings
) -> tuple[Tensor, float] | None:
    """Karras et al. 2022 Algorithm 2, lines 4-6, before the model call at index ``i``:
    (x_hat in the path's coordinates at sigma'_hat, sigma'_hat), or None where gamma = 0."""
    sigma = _k_sigma(grid, i)
    gamma = churn_gamma(sigma, grid.num_steps, settings)
    if gamma == 0 or noise is None:
        return None
    sigma_hat = sigma * (gamma + 1.0)
    amount = settings.s_noise * math.sqrt(sigma_hat * sigma_hat - sigma * sigma)
    xk_hat = x / grid.alpha[i] + amount * noise
    return xk_hat * path_point(grid.path, sigma_hat)[0], sigma_hat


def _churned(ctx: StepContext) -> tuple[Tensor, float]:
    """(x', sigma') the step starts from in k-space: (x'_hat, sigma'_hat) after the churn (the
    point the loop called the model at), else the index's own."""
    grid, i = step_grid(ctx), ctx.index
    if ctx.edm_sigma is None:
        return ctx.x / grid.alpha[i], _k_sigma(grid, i)
    return ctx.x / path_point(grid.path, ctx.edm_sigma)[0], ctx.edm_sigma


def _uses_churn(settings: SampleSettings) -> bool:
    return settings.s_churn > 0


@register_sampler(
    "euler", uses_noise=_uses_churn, check=_check_churn, noise_at_zero=_uses_churn,
    perturb=churn, check_grid=_check_window,
)  # fmt: skip
def euler_step(ctx: StepContext) -> tuple[Tensor, Tensor | None]:
    """One Euler step of the probability-flow ODE in (x', sigma'), with Karras' churn."""
    grid, i = step_grid(ctx), ctx.index
    xk, sigma_hat = _churned(ctx)
    derivative = (xk - ctx.x0) / sigma_hat
    xk_next = xk + (grid.edm_sigma_to(i) - sigma_hat) * derivative
    return xk_next * grid.alpha_to[i], None


def _check_ancestral(settings: SampleSettings) -> None:
    solver_options_unused(settings, ())


@register_sampler("euler-a", check=_check_ancestral)
def euler_ancestral_step(ctx: StepContext) -> tuple[Tensor, Tensor | None]:
    """Euler to sigma_down, then noise of std sigma_up (the ancestral split of the step)."""
    grid, i = step_grid(ctx), ctx.index
    sigma, sigma_to = _k_sigma(grid, i), grid.edm_sigma_to(i)
    up = math.sqrt(sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2)
    down = math.sqrt(sigma_to**2 - up**2)
    xk = ctx.x / grid.alpha[i]
    xk_next = xk + (down - sigma) * ((xk - ctx.x0) / sigma) + up * ctx.noise
    return xk_next * grid.alpha_to[i], None


def _heun_evaluations(num: int, settings: SampleSettings) -> int:
    return 2 * num - 1


@register_sampler(
    "heun", uses_noise=_uses_churn, check=_check_heun, noise_at_zero=_uses_churn,
    evaluations=_heun_evaluations, order=lambda i, num, s: 1 if i == 0 else 2,
    perturb=churn, check_grid=_check_window,
)  # fmt: skip
def heun_step(ctx: StepContext) -> tuple[Tensor, Tensor | None]:
    """Karras et al. 2022 Algorithm 1/2: Euler, then the trapezoidal correction (2 calls)."""
    grid, i = step_grid(ctx), ctx.index
    xk, sigma_hat = _churned(ctx)
    sigma_next = grid.edm_sigma_to(i)
    derivative = (xk - ctx.x0) / sigma_hat
    dt = sigma_next - sigma_hat
    xk_euler = xk + dt * derivative
    if i == 0 or ctx.evaluate is None:  # onto the final point: Euler (Algorithm 1, line 8)
        return xk_euler * grid.alpha_to[i], None
    x0_next = ctx.evaluate(xk_euler * grid.alpha_to[i], i - 1)
    derivative_next = (xk_euler - x0_next) / sigma_next
    xk_next = xk + (0.5 * dt) * (derivative + derivative_next)
    return xk_next * grid.alpha_to[i], None
