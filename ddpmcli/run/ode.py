"""Batched ODE solvers with one step size per row: Dormand-Prince 5(4) with error control
(Dormand & Prince 1980; the controller of Hairer, Norsett & Wanner, *Solving ODEs I*, II.4) and
classical Runge-Kutta 4 on a fixed grid.

Every row of the batch is its own initial value problem ``dy/dt = f(t, y)`` from ``t0[i]`` to
``t1[i]`` with its own step size, its own accepted and rejected steps and its own count of
function evaluations; the function is called once per stage on the rows still running, at each
row's own time. So a row's solution does not depend on which other rows share its batch (up to
the float rounding of the batched arithmetic), and a row that needs more steps does not make the
others take them. Each row stops with a status: ``ok``, ``capped`` (its next attempt would pass
``max_evals``) or ``nonfinite`` (f returned NaN/Inf). Memory is that of a few copies of the state:
nothing of past steps is kept.

Written for the probability-flow likelihood (:mod:`ddpmcli.run.ode_likelihood`) rather than
taken from torchdiffeq: torchdiffeq's ``odeint`` shares one step size across the batch (the
worst row sets everyone's step and evaluation count, so a row's number depends on its
neighbours) and has no cap on evaluations (an unbounded solve is what hangs a distributed run,
k-diffusion #79).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ddpmcli.errors import ParameterError

__all__ = [
    "DOPRI5_EVALS_PER_STEP",
    "STATUS_NAMES",
    "OdeFn",
    "OdeSolution",
    "check_solver_settings",
    "solve_dopri5",
    "solve_rk4",
]

OdeFn = Callable[[Tensor, Tensor, Tensor], Tensor]
"""``f(t [b], y [b, M], rows [b] int64) -> dy/dt [b, M]``: ``rows`` are the batch rows the call
is for (a subset of ``0 .. B-1`` once some rows have finished)."""

STATUS_NAMES: tuple[str, ...] = ("ok", "capped", "nonfinite")
OK, CAPPED, NONFINITE = 0, 1, 2
DOPRI5_EVALS_PER_STEP = 6  # stages 2..7; stage 1 is the last accepted step's stage 7 (FSAL)

# Dormand-Prince 5(4): nodes, the stage matrix, the 5th-order weights (= the last row, FSAL) and
# the difference between the 5th- and 4th-order weights (the local error estimate).
_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_E = (
    35 / 384 - 5179 / 57600,
    0.0,
    500 / 1113 - 7571 / 16695,
    125 / 192 - 393 / 640,
    -2187 / 6784 + 92097 / 339200,
    11 / 84 - 187 / 2100,
    -1 / 40,
)
_SAFETY, _MIN_FACTOR, _MAX_FACTOR = 0.9, 0.2, 10.0


@dataclass
class OdeSolution:
    """Where each row ended: ``y`` ``[B, M]`` at ``t`` ``[B]`` (``t1`` unless it stopped
    early), ``evals`` (function evaluations of the row), ``steps`` (accepted), ``rejected``,
    and ``status`` (int64, an index into :data:`STATUS_NAMES`)."""

    y: Tensor
    t: Tensor
    evals: Tensor
    steps: Tensor
    rejected: Tensor
    status: Tensor

    def status_names(self) -> list[str]:
        return [STATUS_NAMES[int(s)] for s in self.status.tolist()]


def check_solver_settings(rtol: float, atol: float, max_evals: int, steps: int | None) -> None:
    """Reject tolerances and caps no solve can meet, before any work (templates name the
    parameters)."""
    if not rtol > 0 or rtol != rtol or rtol == float("inf"):
        raise ParameterError(f"{{rtol}} must be a positive number, got {rtol}")
    if not atol > 0 or atol != atol or atol == float("inf"):
        raise ParameterError(f"{{atol}} must be a positive number, got {atol}")
    if rtol < 1e-13:
        raise ParameterError(f"{{rtol}} {rtol} is below what float64 can resolve (1e-13)")
    least = 2 + DOPRI5_EVALS_PER_STEP
    if max_evals < least:
        raise ParameterError(
            f"{{max_evals}} must be at least {least} (one adaptive step), got {max_evals}"
        )
    if steps is not None and not 1 <= steps <= 10**6:
        raise ParameterError(f"{{steps}} must be in 1..1000000, got {steps}")


def _scale(y: Tensor, y_new: Tensor, rtol: float, atol: float) -> Tensor:
    return atol + rtol * torch.maximum(y.abs(), y_new.abs())


def _rms(x: Tensor) -> Tensor:
    return x.pow(2).mean(dim=1).sqrt()


def _initial_step(
    fn: OdeFn, t0: Tensor, y0: Tensor, f0: Tensor, span: Tensor, rtol: float, atol: float
) -> Tensor:
    """Hairer et al.'s starting step (II.4, "Starting step size"): one extra evaluation."""
    rows = torch.arange(y0.shape[0], device=y0.device)
    scale = atol + rtol * y0.abs()
    d0, d1 = _rms(y0 / scale), _rms(f0 / scale)
    h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1)
    h0 = torch.minimum(h0, span)
    f1 = fn(t0 + h0, y0 + h0[:, None] * f0, rows)
    d2 = _rms((f1 - f0) / scale) / h0
    big = torch.maximum(d1, d2)
    h1 = torch.where(
        big <= 1e-15,
        torch.maximum(torch.full_like(h0, 1e-6), h0 * 1e-3),
        (0.01 / big.clamp(min=1e-300)) ** (1 / 5),
    )
    return torch.minimum(torch.minimum(100 * h0, h1), span)


def solve_dopri5(
    fn: OdeFn,
    y0: Tensor,
    t0: Tensor,
    t1: Tensor,
    *,
    rtol: float,
    atol: float,
    max_evals: int,
    on_finish: Callable[[int], None] | None = None,
) -> OdeSolution:
    """Integrate every row from ``t0`` to ``t1`` (``t1 > t0``) with Dormand-Prince 5(4).

    A step is accepted where the RMS over the row's components of the error estimate divided by
    ``atol + rtol max(|y|, |y_new|)`` is at most 1; the next step is ``h 0.9 err^(-1/5)``,
    within 0.2x..10x (no growth right after a rejection). The 5th-order solution is propagated
    (local extrapolation). ``on_finish(count)`` is called with how many rows have stopped, each
    time that number grows.
    """
    y0, t0, t1 = y0.double(), t0.double(), t1.double()
    b = y0.shape[0]
    dev = y0.device
    rows = torch.arange(b, device=dev)
    evals = torch.full((b,), 2, dtype=torch.long, device=dev)
    f = fn(t0, y0, rows)
    h = _initial_step(fn, t0, y0, f, t1 - t0, rtol, atol)
    sol = OdeSolution(
        y=y0.clone(), t=t0.clone(), evals=evals, steps=torch.zeros_like(evals),
        rejected=torch.zeros_like(evals), status=torch.full_like(evals, -1),
    )  # fmt: skip
    last_rejected = torch.zeros(b, dtype=torch.bool, device=dev)
    finished = 0
    while True:
        running = sol.status < 0
        cap = running & (sol.evals + DOPRI5_EVALS_PER_STEP > max_evals)
        sol.status[cap] = CAPPED
        act = (sol.status < 0).nonzero().squeeze(1)
        now = b - int(act.numel())
        if now > finished and on_finish is not None:
            on_finish(now)
        finished = now
        if act.numel() == 0:
            return sol
        t, y, ha, span = sol.t[act], sol.y[act], h[act], t1[act] - sol.t[act]
        last = ha >= span * (1 - 1e-12)  # the step that lands on t1 lands exactly
        ha = torch.where(last, span, ha)
        k = [f[act]]
        for s in range(1, 7):
            ys = y + ha[:, None] * sum(a * k[j] for j, a in enumerate(_A[s]) if a != 0.0)
            k.append(fn(t + _C[s] * ha, ys, act))
        y_new = ys  # stage 7's point is the 5th-order solution
        err_vec = ha[:, None] * sum(e * k[j] for j, e in enumerate(_E) if e != 0.0)
        err = _rms(err_vec / _scale(y, y_new, rtol, atol))
        sol.evals[act] += DOPRI5_EVALS_PER_STEP
        bad = ~torch.isfinite(err) | ~torch.isfinite(y_new).all(dim=1)
        ok = (err <= 1.0) & ~bad
        factor = (_SAFETY * err.clamp(min=1e-10) ** (-1 / 5)).clamp(_MIN_FACTOR, _MAX_FACTOR)
        factor = torch.where(ok & last_rejected[act], factor.clamp(max=1.0), factor)
        h[act] = ha * torch.where(ok, factor, factor.clamp(max=1.0))
        acc = act[ok]
        sol.y[acc] = y_new[ok]
        sol.t[acc] = torch.where(last[ok], t1[acc], t[ok] + ha[ok])
        f[acc] = k[6][ok]
        sol.steps[acc] += 1
        sol.rejected[act[~ok]] += 1
        last_rejected[act] = ~ok
        sol.status[acc[last[ok]]] = OK
        sol.status[act[bad]] = NONFINITE


def solve_rk4(
    fn: OdeFn,
    y0: Tensor,
    t0: Tensor,
    t1: Tensor,
    *,
    steps: int,
    on_finish: Callable[[int], None] | None = None,
) -> OdeSolution:
    """Integrate every row from ``t0`` to ``t1`` with ``steps`` equal steps of classical RK4
    (4 evaluations a step, no error control)."""
    y, t0, t1 = y0.double().clone(), t0.double(), t1.double()
    b = y.shape[0]
    rows = torch.arange(b, device=y.device)
    h = (t1 - t0) / steps
    status = torch.zeros(b, dtype=torch.long, device=y.device)
    for i in range(steps):
        t = t0 + i * h
        k1 = fn(t, y, rows)
        k2 = fn(t + h / 2, y + (h / 2)[:, None] * k1, rows)
        k3 = fn(t + h / 2, y + (h / 2)[:, None] * k2, rows)
        k4 = fn(t + h, y + h[:, None] * k3, rows)
        y = y + (h / 6)[:, None] * (k1 + 2 * k2 + 2 * k3 + k4)
        if not bool(torch.isfinite(y).all()):
            status[~torch.isfinite(y).all(dim=1)] = NONFINITE
            break
    if on_finish is not None:
        on_finish(b)
    evals = torch.full((b,), 4 * steps, dtype=torch.long, device=y.device)
    return OdeSolution(
        y=y, t=t1.clone(), evals=evals, steps=torch.full_like(evals, steps),
        rejected=torch.zeros_like(evals), status=status,
    )  # fmt: skip
