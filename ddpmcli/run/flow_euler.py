"""Flow Euler (``flow-euler``): the Euler step of rectified flow (Liu et al. 2023; Esser et al.
2024, SD3), diffusers' ``FlowMatchEulerDiscreteScheduler``.

On a flow path (``alpha = 1 - s``, ``sigma = s``) with velocity ``v = eps - x0``, the
deterministic step ``x_next = x + (s_next - s) v`` is ``x_next = (1 - s_next) x0 + s_next eps``:
DDIM with eta 0 on the path. It is written in that second form, with the path's own
``alpha_to``/``sigma_to``, so that it holds on any Gaussian path and uses the x0_hat the loop
limited (clipping) with the eps consistent with it. ``stochastic`` (diffusers'
``stochastic_sampling``) re-noises instead: ``x_next = alpha_next x0 + sigma_next z``.
"""

from __future__ import annotations

from torch import Tensor

from ddpmcli.run.solver_grid import solver_options_unused, step_grid
from ddpmcli.run.steps import SampleSettings, StepContext, register_sampler

__all__ = ["flow_euler_step"]


def _check(settings: SampleSettings) -> None:
    solver_options_unused(settings, ("stochastic", "final_sigma"))


def _stochastic(settings: SampleSettings) -> bool:
    return settings.stochastic


def _noise_at_zero(settings: SampleSettings) -> bool:
    return settings.stochastic and settings.final_sigma > 0


@register_sampler(
    "flow-euler", uses_noise=_stochastic, check=_check, noise_at_zero=_noise_at_zero
)  # fmt: skip
def flow_euler_step(ctx: StepContext) -> tuple[Tensor, Tensor | None]:
    """x_next = alpha_next x0_hat + sigma_next eps_hat (or z when stochastic)."""
    grid, i = step_grid(ctx), ctx.index
    if ctx.settings.stochastic:
        return grid.alpha_to[i] * ctx.x0 + grid.sigma_to[i] * ctx.noise, None
    # eps consistent with the x0_hat used (the core's conversion of x0 as a "sample" output)
    eps = ctx.schedule.predict_eps(ctx.x0, ctx.x, ctx.t, "sample")
    return grid.alpha_to[i] * ctx.x0 + grid.sigma_to[i] * eps, None
