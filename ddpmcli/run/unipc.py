"""UniPC (``unipc``): the unified predictor-corrector of Zhao et al. 2023 ("UniPC: A Unified
Predictor-Corrector Framework for Fast Sampling of Diffusion Models"), in data prediction, with
the B(h) variants ``bh1`` (B(h) = h) and ``bh2`` (B(h) = e^h - 1), orders 1-3, as diffusers'
``UniPCMultistepScheduler``.

With ``hh = -h`` (h the log-SNR gap of the update), ``phi_1 = e^{hh} - 1`` and the recursion
``phi_{k+1} = phi_k/hh - 1/(k+1)!`` (from ``phi_1/hh - 1``), the order-p update from x_s0 is
``x_t = sigma_t/sigma_s0 x_s0 - alpha_t phi_1 m0 - alpha_t B(h) sum_k rho_k D_k`` with
``D_k = (m_k - m0)/r_k`` (``r_k = (lambda_k - lambda_s0)/h``) and rho solving
``R rho = b``, ``R[j] = r^j``, ``b_j = phi_{j+1} (j+1)!/B(h)`` (the paper's Theorem 3.1):

- UniP, the predictor, uses the previous points (rho = 1/2 at order 2);
- UniC, the corrector, re-does the last update once the model has been evaluated at its result,
  adding that new x0_hat as the highest difference (rho = 1/2 at order 1). It runs at the start
  of the next step, on the model output the loop has just computed, so it costs no evaluation.

The corrector does not run after the last update. Orders follow diffusers: warm-up, and with
``lower_order_final`` at most ``N - k`` at step k.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ddpmcli.run.dpm_solver import MultistepHistory
from ddpmcli.run.events import ParameterError
from ddpmcli.run.solver_grid import solver_options_unused, step_grid
from ddpmcli.run.steps import SampleSettings, StepContext, register_sampler

__all__ = ["uni_coefficients", "unipc_order"]

_OPTIONS = ("order", "solver_type", "lower_order_final", "final_sigma", "corrector")


def uni_coefficients(
    h: float, rks: list[float], order: int, variant: str, corrector: bool
) -> tuple[float, float, list[float]]:
    """(phi_1, B(h), rho) of an order-``order`` UniP (``corrector`` False) or UniC update."""
    hh = -h
    phi_1 = math.expm1(hh)
    b_h = hh if variant == "bh1" else math.expm1(hh)
    h_phi_k = phi_1 / hh - 1.0
    factorial = 1
    b: list[float] = []
    for k in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    r = [*rks, 1.0]
    if corrector:
        if order == 1:
            return phi_1, b_h, [0.5]
        size = order
    else:
        if order == 1:
            return phi_1, b_h, []
        if order == 2:
            return phi_1, b_h, [0.5]
        size = order - 1
    mat = torch.tensor([[r[j] ** k for j in range(size)] for k in range(size)], dtype=torch.float64)
    rho = torch.linalg.solve(mat, torch.tensor(b[:size], dtype=torch.float64))
    return phi_1, b_h, rho.tolist()


def _update(
    x: Tensor, m: list[Tensor], lam: list[float], to: tuple[float, float, float], sigma_s0: float,
    order: int, variant: str, model_t: Tensor | None,
) -> Tensor:  # fmt: skip
    """The UniP (``model_t`` None) or UniC update from x at lam[0] (x0_hat m[0]) to
    ``to`` = (alpha_t, sigma_t, lambda_t); m/lam newest first."""
    alpha_t, sigma_t, lam_t = to
    h = lam_t - lam[0]
    if h == 0:
        return x
    used = order - 1
    rks = [(lam[k] - lam[0]) / h for k in range(1, used + 1)]
    phi_1, b_h, rho = uni_coefficients(h, rks, order, variant, model_t is not None)
    out = (sigma_t / sigma_s0) * x - (alpha_t * phi_1) * m[0]
    res: Tensor | None = None
    for k in range(1, used + 1):
        term = (rho[k - 1] / rks[k - 1]) * (m[k] - m[0])
        res = term if res is None else res + term
    if model_t is not None:
        term = rho[-1] * (model_t - m[0])
        res = term if res is None else res + term
    return out if res is None else out - (alpha_t * b_h) * res


def unipc_order(i: int, num: int, settings: SampleSettings) -> int:
    """The predictor's order at index ``i`` of ``num`` (diffusers' rule)."""
    order = settings.order if settings.order is not None else 2
    k = num - 1 - i
    if settings.lower_order_final:
        order = min(order, num - k)
    return min(order, k + 1)


def _check(settings: SampleSettings) -> None:
    solver_options_unused(settings, _OPTIONS)
    if settings.order is not None and settings.order not in (1, 2, 3):
        raise ParameterError(
            f"{{order}} {settings.order} is not one unipc has; it has orders 1, 2 and 3"
        )
    if settings.solver_type not in (None, "bh1", "bh2"):
        raise ParameterError(
            f"{{solver_type}} {settings.solver_type!r} is not one unipc has; allowed: bh1, bh2"
        )


def _new_history() -> MultistepHistory:
    return MultistepHistory(keep=3)


@register_sampler(
    "unipc", uses_noise=lambda s: False, new_state=_new_history, check=_check,
    order=unipc_order,
)  # fmt: skip
def unipc_step(ctx: StepContext) -> tuple[Tensor, Tensor | None]:
    """UniC on the last update (with this index's x0_hat), then UniP to the next point."""
    grid, hist, i = step_grid(ctx), ctx.state, ctx.index
    if not isinstance(hist, MultistepHistory):
        raise ParameterError("{sampler} unipc needs its state (ctx.state)")
    variant = ctx.settings.solver_type or "bh2"
    x = ctx.x
    if hist.x_prev is not None and ctx.settings.corrector:
        m = list(reversed(hist.x0))
        lam = list(reversed(hist.lam))
        to = (grid.alpha[i], grid.sigma[i], grid.lam[i])
        sigma_s0 = grid.sigma[i + 1]
        x = _update(hist.x_prev, m, lam, to, sigma_s0, hist.order_prev, variant, ctx.x0)
    hist.push(ctx.x0, grid.lam[i])
    order = unipc_order(i, grid.num_steps, ctx.settings)
    hist.x_prev, hist.order_prev = x, order
    m, lam = list(reversed(hist.x0)), list(reversed(hist.lam))
    to = (grid.alpha_to[i], grid.sigma_to[i], grid.lam_to[i])
    return _update(x, m, lam, to, grid.sigma[i], order, variant, None), None
