"""DPM-Solver++ multistep (Lu et al. 2022b, "DPM-Solver++: Fast Solver for Guided Sampling of
Diffusion Probabilistic Models"): ``dpmpp-2m``, ``dpmpp-3m`` and the SDE variant ``dpmpp-2m-sde``.

The solver integrates the probability-flow ODE in data prediction x0_hat and the half log-SNR
``lambda = log(alpha/sigma)``. From x_t at lambda_t to x_s at lambda_s, ``h = lambda_s - lambda_t``
(eq. 9-10 of the paper, written with ``phi = e^{-h} - 1``, evaluated as ``expm1``):

- order 1: ``x_s = sigma_s/sigma_t x_t - alpha_s phi D0`` (DDIM with eta 0, on any path);
- order 2 (multistep, ``r0 = h_0/h`` with ``h_0`` the previous step's gap,
  ``D1 = (D0 - m1)/r0``): ``midpoint`` adds ``- alpha_s phi D1 / 2``, ``heun`` adds
  ``+ alpha_s (phi/h + 1) D1``;
- order 3: ``+ alpha_s (phi/h + 1) D1 - alpha_s ((phi + h)/h^2 - 1/2) D2`` with the divided
  differences D1, D2 of the last three x0_hat (Lu et al. 2022b, Algorithm 3 / appendix).

The SDE variant (``dpmpp-2m-sde``, Lu et al. 2022b section 5 / diffusers' ``sde-dpmsolver++``)
discretises the reverse SDE in the same variables: ``x_s = sigma_s/sigma_t e^{-h} x_t
+ alpha_s (1 - e^{-2h}) D0 + ... + sigma_s sqrt(1 - e^{-2h}) z``.

Which order a step uses follows diffusers' ``DPMSolverMultistepScheduler`` exactly: warm-up
(order k at the k-th step), first order at the last step when ``euler_at_final``, when it lands on
clean data, or when ``lower_order_final`` and fewer than 15 steps (then also at most second order
at the step before). Each step keeps the last ``order - 1`` x0_hat of its batch in its state:
memory O(order x batch), not O(steps).

``dpm_form`` (order 3 only): ``diffusers`` (the default) is the update of diffusers, k-diffusion
and Lu et al.'s own code, digit for digit. Its third-order term weighs ``D2 = (D1_0 - D1_1)/(r0 +
r1)``, which estimates ``h^2 x0''/2``, with ``(phi + h)/h^2 - 1/2 ~ -h/6``, while the Taylor term
of the exact solution, ``alpha_s h^3 phi_3(-h) x0''`` with ``phi_3(z) = (e^z - 1 - z - z^2/2)/z^3``,
needs twice that: its local error is O(h^3) and the run is second order (measured 1.8-2.1 on the
Gaussian oracle, whatever the first steps). ``exact`` uses the Taylor coefficient (local error
O(h^4)) and starts with a second-order single step, DPM-Solver++(2S) (Lu et al. 2022b,
Algorithm 1) with its intermediate point at the step's own target (r = 1) in the Taylor form
``x_s = u + alpha_s (phi/h + 1) (x0_hat(u) - D0)``, ``u`` the first-order step: one more model
evaluation, and no O(h^2) error left from the warm-up. Measured order 3.0 on the oracle.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor

from ddpmcli.choices import DPM_FORMS
from ddpmcli.run.events import ParameterError
from ddpmcli.run.solver_grid import PathGrid, solver_options_unused, step_grid
from ddpmcli.run.steps import SampleSettings, StepContext, register_sampler

__all__ = [
    "DPM_ORDERS",
    "MultistepHistory",
    "dpm_order",
    "dpm_singlestep_update",
    "dpm_solver_update",
]

DPM_ORDERS: dict[str, int] = {"dpmpp-2m": 2, "dpmpp-3m": 3, "dpmpp-2m-sde": 2}
"""The default order of each name; ``order`` overrides it (1-3)."""

_OPTIONS = (
    "order", "solver_type", "lower_order_final", "euler_at_final", "final_sigma", "dpm_form",
)  # fmt: skip


@dataclass
class MultistepHistory:
    """A multistep solver's memory for one batch: the last x0_hat (newest last) and their
    lambdas, at most ``keep`` of each; ``x_prev`` is the sample before the last update (UniPC's
    corrector needs it), ``order_prev`` the order that update used."""

    keep: int = 3
    x0: list[Tensor] = field(default_factory=list)
    lam: list[float] = field(default_factory=list)
    x_prev: Tensor | None = None
    order_prev: int = 0

    def push(self, x0: Tensor, lam: float) -> None:
        """Remember ``x0`` at ``lam``, forgetting the oldest beyond ``keep``."""
        self.x0.append(x0)
        self.lam.append(lam)
        if len(self.x0) > self.keep:
            del self.x0[0], self.lam[0]


def _order_of(settings: SampleSettings) -> int:
    return settings.order if settings.order is not None else DPM_ORDERS[settings.sampler]


def dpm_order(i: int, num: int, settings: SampleSettings) -> int:
    """The order the step at index ``i`` of ``num`` uses (diffusers' rule, see the module; with
    ``dpm_form`` exact at order 3 the first step is the second-order 2S start)."""
    order = _order_of(settings)
    k = num - 1 - i  # steps taken before this one
    final = i == 0 and (
        settings.euler_at_final
        or (settings.lower_order_final and num < 15)
        or settings.final_sigma == 0
    )
    second = i == 1 and settings.lower_order_final and num < 15
    if final:
        return 1
    if k < 1:  # the first step: the exact form's 2S start has a point to evaluate at (i > 0)
        return 2 if order == 3 and settings.dpm_form == "exact" and i > 0 else 1
    if order == 1:
        return 1
    if order == 2 or k < 2 or second:
        return 2
    return 3


def _differences(
    m: list[Tensor], lam: list[float], h: float, order: int, exact: bool = False
) -> tuple[Tensor | None, Tensor | None]:
    """D1 (and D2 for order 3) of x0_hat ``m`` (newest first) at ``lam`` (newest first); D2
    estimates ``h^2 x0''/2``, or ``h^2 x0''`` when ``exact`` (see the module)."""
    if order == 1:
        return None, None
    r0 = (lam[0] - lam[1]) / h
    d1_0 = (m[0] - m[1]) / r0
    if order == 2:
        return d1_0, None
    r1 = (lam[1] - lam[2]) / h
    d1_1 = (m[1] - m[2]) / r1
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
    return d1, ((2.0 if exact else 1.0) / (r0 + r1)) * (d1_0 - d1_1)


def dpm_solver_update(
    x: Tensor,
    m: list[Tensor],
    lam: list[float],
    grid: PathGrid,
    i: int,
    order: int,
    *,
    solver_type: str = "midpoint",
    noise: Tensor | None = None,
    exact: bool = False,
) -> Tensor:
    """One DPM-Solver++ update from index ``i`` to its target: ``m`` the x0_hat of this and the
    previous steps (newest first), ``lam`` their lambdas; ``noise`` given: the SDE variant;
    ``exact``: the Taylor third-order coefficient (see the module)."""
    a_s, s_s, s_t = grid.alpha_to[i], grid.sigma_to[i], grid.sigma[i]
    h = grid.gap(i)
    if h == 0:  # a last step onto its own sigma (diffusers' sigma_min on a Karras grid)
        return x
    d1, d2 = _differences(m, lam, h, order, exact)
    if noise is None:
        phi = math.expm1(-h)  # e^{-h} - 1
        out = (s_s / s_t) * x - (a_s * phi) * m[0]
        if order == 2 and solver_type == "midpoint":
            return out - (0.5 * a_s * phi) * d1  # type: ignore[operator]
        if d1 is not None:
            out = out + (a_s * (phi / h + 1.0)) * d1
        if d2 is not None:
            out = out - (a_s * ((phi + h) / (h * h) - 0.5)) * d2
        return out
    one_m = -math.expm1(-2.0 * h)  # 1 - e^{-2h}
    out = (s_s / s_t * math.exp(-h)) * x + (a_s * one_m) * m[0]
    if order == 2 and solver_type == "midpoint":
        out = out + (0.5 * a_s * one_m) * d1  # type: ignore[operator]
    else:
        if d1 is not None:
            out = out + (a_s * (one_m / (-2.0 * h) + 1.0)) * d1
        if d2 is not None:
            out = out + (a_s * ((one_m - 2.0 * h) / (2.0 * h) ** 2 - 0.5)) * d2
    return out + (s_s * math.sqrt(one_m)) * noise


def dpm_singlestep_update(
    x: Tensor, m0: Tensor, evaluate: Callable[[Tensor, int], Tensor], grid: PathGrid, i: int
) -> Tensor:
    """DPM-Solver++(2S) from index ``i`` (> 0) to index ``i - 1`` (Lu et al. 2022b, Algorithm
    1, r = 1, Taylor form): the first-order step ``u``, x0_hat there (``evaluate(u, i - 1)``),
    then ``x_s = u + alpha_s (phi/h + 1) (x0_hat(u) - D0)``: local error O(h^3). The
    coefficient tends to alpha_s as h -> inf (a start at alpha = 0), where x_s is then
    ``sigma_s/sigma_t x + alpha_s x0_hat(u)``."""
    a_s, s_s, s_t = grid.alpha_to[i], grid.sigma_to[i], grid.sigma[i]
    h = grid.gap(i)
    if h == 0:
        return x
    phi = math.expm1(-h)  # e^{-h} - 1
    u = (s_s / s_t) * x - (a_s * phi) * m0
    return u + (a_s * (phi / h + 1.0)) * (evaluate(u, i - 1) - m0)


def check_dpm(settings: SampleSettings) -> None:
    """Orders 1-3; ``solver_type`` midpoint or heun."""
    solver_options_unused(settings, _OPTIONS)
    order = settings.order
    if order is not None and order not in (1, 2, 3):
        raise ParameterError(
            f"{{order}} {order} is not one {settings.sampler} has; it has orders 1, 2 and 3"
        )
    if settings.solver_type not in (None, "midpoint", "heun"):
        raise ParameterError(
            f"{{solver_type}} {settings.solver_type!r} is not one {settings.sampler} has; "
            "allowed: midpoint, heun"
        )
    if settings.dpm_form not in DPM_FORMS:
        raise ParameterError(
            f"{{dpm_form}} {settings.dpm_form!r} is unknown; allowed: {', '.join(DPM_FORMS)}"
        )
    if settings.dpm_form == "exact" and settings.sampler == "dpmpp-2m-sde":
        raise ParameterError(
            "{dpm_form} exact is for the ODE solvers dpmpp-2m and dpmpp-3m, not dpmpp-2m-sde"
        )
    if settings.dpm_form == "exact" and _order_of(settings) != 3:
        # the forms differ only in the third-order term: exact at order 1 or 2 would change
        # nothing, and a flag that changes nothing is refused like the others
        raise ParameterError(
            f"{{dpm_form}} exact changes only the third-order update; {settings.sampler} runs "
            f"order {_order_of(settings)} here (drop it, or run order 3)"
        )
    if not (math.isfinite(settings.final_sigma) and settings.final_sigma >= 0):
        raise ParameterError(f"{{final_sigma}} must be finite and >= 0, got {settings.final_sigma}")


def _step(ctx: StepContext, sde: bool) -> tuple[Tensor, Tensor | None]:
    grid, hist, i = step_grid(ctx), ctx.state, ctx.index
    order = dpm_order(i, grid.num_steps, ctx.settings)
    exact = ctx.settings.dpm_form == "exact"
    if exact and not hist.x0 and order == 2:  # the first step: DPM-Solver++(2S)
        if ctx.evaluate is None:
            raise ParameterError("{dpm_form} exact needs a second model call (ctx.evaluate)")
        x_next = dpm_singlestep_update(ctx.x, ctx.x0, ctx.evaluate, grid, i)
    else:
        m = [ctx.x0, *reversed(hist.x0)]
        lam = [grid.lam[i], *reversed(hist.lam)]
        x_next = dpm_solver_update(
            ctx.x, m, lam, grid, i, order, solver_type=ctx.settings.solver_type or "midpoint",
            noise=ctx.noise if sde else None, exact=exact,
        )  # fmt: skip
    hist.push(ctx.x0, grid.lam[i])
    return x_next, None


def _evaluations(num: int, settings: SampleSettings) -> int:
    """N model calls, one more for the exact form's 2S start."""
    return num + 1 if dpm_order(num - 1, num, settings) == 2 else num


def _new_history() -> MultistepHistory:
    return MultistepHistory(keep=2)


@register_sampler(
    "dpmpp-2m", uses_noise=lambda s: False, new_state=_new_history, check=check_dpm,
    order=dpm_order, evaluations=_evaluations,
)  # fmt: skip
def dpmpp_2m_step(ctx: StepContext) -> tuple[Tensor, Tensor | None]:
    """DPM-Solver++(2M): multistep, second order by default (Lu et al. 2022b, Algorithm 2)."""
    return _step(ctx, sde=False)


@register_sampler(
    "dpmpp-3m", uses_noise=lambda s: False, new_state=_new_history, check=check_dpm,
    order=dpm_order, evaluations=_evaluations,
)  # fmt: skip
def dpmpp_3m_step(ctx: StepContext) -> tuple[Tensor, Tensor | None]:
    """DPM-Solver++(3M): multistep, third order by default."""
    return _step(ctx, sde=False)


@register_sampler(
    "dpmpp-2m-sde", new_state=_new_history, check=check_dpm,
    noise_at_zero=lambda s: s.final_sigma > 0, order=dpm_order,
)  # fmt: skip
def dpmpp_2m_sde_step(ctx: StepContext) -> tuple[Tensor, Tensor | None]:
    """SDE-DPM-Solver++(2M): the reverse SDE in data prediction and log-SNR."""
    return _step(ctx, sde=True)
