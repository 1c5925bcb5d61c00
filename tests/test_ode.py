"""The batched ODE solvers of ``ddpmcli.run.ode`` against known solutions: a harmonic oscillator
(one frequency per row) and exponential growth, error control, convergence order, row
independence, the evaluation cap and NaN."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from ddpmcli.errors import ParameterError
from ddpmcli.run.ode import check_solver_settings, solve_dopri5, solve_rk4

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
OMEGA = torch.tensor([0.5, 1.0, 3.0, 10.0], dtype=F64)
T_END = 5.0


def oscillator(t: Tensor, y: Tensor, rows: Tensor) -> Tensor:
    """y'' = -w^2 y as a first-order system, ``w`` the row's own frequency."""
    return torch.stack([y[:, 1], -(OMEGA[rows] ** 2) * y[:, 0]], dim=1)


def _start(b: int) -> tuple[Tensor, Tensor, Tensor]:
    y0 = torch.tensor([[1.0, 0.0]] * b, dtype=F64)
    return y0, torch.zeros(b, dtype=F64), torch.full((b,), T_END, dtype=F64)


@pytest.mark.parametrize("tol", [1e-4, 1e-8])
def test_dopri5_meets_its_tolerance_on_the_oscillator(tol: float) -> None:
    # exact: y = cos(w t). The global error of a tolerance-controlled solve grows with the
    # phase w T it integrates over; measured 0.1-0.25 x tol x (1 + w T) here; bound: tol (1 + w T)
    sol = solve_dopri5(oscillator, *_start(4), rtol=tol, atol=tol, max_evals=100_000)
    assert sol.status_names() == ["ok"] * 4
    assert torch.equal(sol.t, torch.full((4,), T_END, dtype=F64))
    err = (sol.y[:, 0] - torch.cos(OMEGA * T_END)).abs()
    assert (err <= tol * (1 + OMEGA * T_END)).all(), err
    # a faster oscillator takes more steps: each row has its own step size
    assert (sol.evals[1:] > sol.evals[:-1]).all()


def test_a_row_solves_the_same_alone_as_in_a_batch() -> None:
    y0, t0, t1 = _start(4)
    batch = solve_dopri5(oscillator, y0, t0, t1, rtol=1e-6, atol=1e-6, max_evals=100_000)
    for i in range(4):

        def alone(t: Tensor, y: Tensor, r: Tensor, i: int = i) -> Tensor:
            return oscillator(t, y, r * 0 + i)  # row 0 of a batch of one is row i

        one = solve_dopri5(alone, y0[:1], t0[:1], t1[:1], rtol=1e-6, atol=1e-6, max_evals=10**5)
        assert torch.equal(one.y[0], batch.y[i])
        assert int(one.evals[0]) == int(batch.evals[i])


def test_rk4_converges_at_fourth_order() -> None:
    def grow(t: Tensor, y: Tensor, rows: Tensor) -> Tensor:
        return y * torch.cos(t)[:, None]  # y = exp(sin t)

    y0, t0 = torch.ones(1, 1, dtype=F64), torch.zeros(1, dtype=F64)
    t1 = torch.full((1,), 3.0, dtype=F64)
    exact = math.exp(math.sin(3.0))
    errors = [
        abs(float(solve_rk4(grow, y0, t0, t1, steps=n).y[0, 0]) - exact) for n in (20, 40, 80)
    ]
    ratios = [errors[0] / errors[1], errors[1] / errors[2]]
    assert all(13.0 < r < 19.0 for r in ratios), ratios  # 2^4 = 16
    assert int(solve_rk4(grow, y0, t0, t1, steps=20).evals[0]) == 80


def test_a_solve_past_its_cap_stops_and_says_so() -> None:
    sol = solve_dopri5(oscillator, *_start(4), rtol=1e-9, atol=1e-9, max_evals=500)
    names = sol.status_names()
    assert names[-1] == "capped" and names[0] == "ok"  # the slow row fits, the fast one not
    assert (sol.evals <= 500).all()
    assert float(sol.t[-1]) < T_END


def test_nan_stops_the_row_without_spending_the_cap() -> None:
    def broken(t: Tensor, y: Tensor, rows: Tensor) -> Tensor:
        out = oscillator(t, y, rows)
        return torch.where((rows == 2)[:, None] & (t > 1.0)[:, None], math.nan, out)

    sol = solve_dopri5(broken, *_start(4), rtol=1e-6, atol=1e-6, max_evals=100_000)
    assert sol.status_names() == ["ok", "ok", "nonfinite", "ok"]
    assert int(sol.evals[2]) < 1000


def test_progress_counts_finished_rows() -> None:
    seen: list[int] = []
    solve_dopri5(oscillator, *_start(4), rtol=1e-6, atol=1e-6, max_evals=10**5,
                 on_finish=seen.append)  # fmt: skip
    assert seen == sorted(seen) and seen[-1] == 4 and len(seen) >= 2


@pytest.mark.parametrize(
    ("rtol", "atol", "cap", "steps", "word"),
    [
        (0.0, 1e-5, 100, None, "rtol"),
        (-1e-3, 1e-5, 100, None, "rtol"),
        (math.nan, 1e-5, 100, None, "rtol"),
        (1e-5, 0.0, 100, None, "atol"),
        (1e-15, 1e-5, 100, None, "float64"),
        (1e-5, 1e-5, 3, None, "max_evals"),
        (1e-5, 1e-5, 100, 0, "steps"),
    ],
)
def test_settings_no_solve_can_meet_are_refused(
    rtol: float, atol: float, cap: int, steps: int | None, word: str
) -> None:
    with pytest.raises(ParameterError, match=word):
        check_solver_settings(rtol, atol, cap, steps)
