"""Euler, Euler ancestral and Heun in Karras et al. 2022's variables (``euler``, ``euler-a``,
``heun``), on any Gaussian path.

Karras et al. write the probability-flow ODE for ``x' = x/alpha`` at noise level
``sigma' = sigma/alpha`` (the EDM sigma): ``dx'/dsigma' = (x' - D(x'))/sigma'`` with ``D`` the
denoiser x0_hat. The loop's state stays in the path's coordinates (a VP model's x is diffusers'
``scale_model_input`` of its k-space sample), so each step divides by alpha_t, steps in
sigma', and multiplies by the target's alpha.

- ``euler``: ``x'_next = x'_hat + (sigma'_next - sigma'_hat) (x'_hat - D)/sigma'_hat`` with the
  churn of Karras et al. Algorithm 2: ``gamma = min(s_churn/N, sqrt 2 - 1)`` where
  ``s_tmin <= sigma' <= s_tmax``, ``sigma'_hat = (1 + gamma) sigma'``,
  ``x'_hat = x' + s_noise sqrt(sigma'_hat^2 - sigma'^2) z``. As in diffusers'
  ``EulerDiscreteScheduler`` the model is evaluated before the churn (the loop's one call per
  index), and D is that evaluation's x0_hat.
- ``euler-a``: the ancestral step of k-diffusion / diffusers' ``EulerAncestralDiscreteScheduler``:
  ``sigma_up = sqrt(sigma_to^2 (sigma^2 - sigma_to^2)/sigma^2)``,
  ``sigma_down = sqrt(sigma_to^2 - sigma_up^2)``, an Euler step to sigma_down plus sigma_up z.
- ``heun``: Karras et al. Algorithm 1 (2nd order): Euler to sigma'_next, a second model call
  there (``ctx.evaluate``), the trapezoidal average of both slopes; Euler for a last step onto
  clean data: 2N - 1 model evaluations, as diffusers' ``HeunDiscreteScheduler``.
"""

from __future__ import annotations

import math

from torch import Tensor

from ddpmcli.run.events import ParameterError
from ddpmcli.run.solver_grid import PathGrid, solver_options_unused, step_grid
from ddpmcli.run.steps import SampleSettings, StepContext, register_sampler

__all__ = ["churn_gamma"]

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
        if math.isnan(value) or value < 0 or (name != "s_tmax" and math.isinf(value)):
            raise ParameterError(f"{{{name}}} must be a finite number >= 0, got {value}")


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


def _churned(ctx: StepContext) -> tuple[Tensor, float]:
    """(x'_hat, sigma'_hat) at the step's index: the state in k-space after the churn."""
    grid, i = step_grid(ctx), ctx.index
    sigma = _k_sigma(grid, i)
    xk = ctx.x / grid.alpha[i]
    gamma = churn_gamma(sigma, grid.num_steps, ctx.settings)
    if gamma == 0:
        return xk, sigma
    sigma_hat = sigma * (gamma + 1.0)
    amount = ctx.settings.s_noise * math.sqrt(sigma_hat * sigma_hat - sigma * sigma)
    return xk + amount * ctx.noise, sigma_hat


def _uses_churn(settings: SampleSettings) -> bool:
    return settings.s_churn > 0


@register_sampler(
    "euler", uses_noise=_uses_churn, check=_check_churn, noise_at_zero=_uses_churn
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
