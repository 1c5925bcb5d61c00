"""How many steps does a sampler need? One run per (sampler, steps) from the same x_T, each
measured against a reference: the numbers of `ddpm steps`.

Every run starts from the same standard-normal x_T (drawn once from ``seed``), and a stochastic
sampler's step noise follows the same seed (common random numbers), so the differences between
rows are the samplers' and the step counts' alone. The reference is either given (the exact
solution, e.g. the closed-form probability-flow ODE of Gaussian data) or a *converged run*: a
high-order solver at ``reference_steps`` steps, checked by halving (the run at half the steps):
for a solver of order p the remaining error of the longer run is about
``|ref - ref_half| / (2^p - 1)``, reported with the reference.

Rows (:data:`SWEEP_COLUMNS`): ``sampler``, ``steps``, ``nfe`` (model evaluations per sample),
``rms_error`` (RMS over every element of the final samples against the reference from the same
x_T; a stochastic sampler's is that of its own draw, dominated by its noise),
``rms_error_range`` (the same over the data range's width; None where that width is not known
in the space the samples live in, e.g. a latent model's latents), ``reference_distance`` (energy
distance of the sample set to the reference's samples: the distribution-level error, the fair
measure for stochastic samplers), ``data_distance`` (energy distance to reference data points,
vector data only), ``max_log_snr_gap`` (the grid's largest step in half log-SNR lambda, the last
step onto clean data excluded), ``stochastic``, ``wall_s``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from ddpmcli import core
from ddpmcli.run.distances import energy_distance
from ddpmcli.run.events import ParameterError
from ddpmcli.run.noise import generator, randn
from ddpmcli.run.samplers import SampleSettings, sample
from ddpmcli.run.solver_grid import path_grid
from ddpmcli.run.steps import registered

__all__ = [
    "SWEEP_COLUMNS",
    "Reference",
    "SweepResult",
    "cheapest",
    "check_lists",
    "empirical_orders",
    "max_gap",
    "optimal_model",
    "step_sweep",
]

SWEEP_COLUMNS: tuple[str, ...] = (
    "sampler",
    "steps",
    "nfe",
    "rms_error",
    "rms_error_range",
    "reference_distance",
    "data_distance",
    "max_log_snr_gap",
    "stochastic",
    "wall_s",
)

PredictFn = Callable[[Tensor, Tensor], tuple[Tensor, "Tensor | None"]]


@dataclass(frozen=True)
class Reference:
    """What the rows are measured against: ``samples`` from the sweep's x_T, ``kind`` (``exact``
    or ``converged``), and for a converged run its sampler, steps and remaining-error estimate
    (RMS, from halving)."""

    samples: Tensor
    kind: str
    sampler: str | None = None
    steps: int | None = None
    remaining_error: float | None = None

    def describe(self) -> str:
        """One line for stderr."""
        if self.kind == "exact":
            return "reference: the exact solution from the same x_T"
        return (
            f"reference: {self.sampler} at {self.steps} steps from the same x_T; halving the "
            f"steps changes it by {self.remaining_error * 7:.3g} RMS, remaining error about "  # type: ignore[operator]
            f"{self.remaining_error:.3g} RMS (order 3: /7)"
        )


@dataclass
class SweepResult:
    """The rows, the reference, and the empirical order (slope of log error against log NFE)
    of each deterministic sampler over its two largest step counts."""

    rows: list[dict[str, Any]]
    reference: Reference
    orders: dict[str, float] = field(default_factory=dict)
    spacing: str | None = None
    """The grid rule the runs used, where the caller said (``ddpmcli.api_sampling``)."""


def optimal_model(
    denoiser: Any, schedule_for: Callable[[str, int], core.Schedule]
) -> tuple[PredictFn, Callable[[str, int], core.Schedule]]:
    """A Bayes-optimal denoiser (:class:`ddpmcli.run.OptimalDenoiser`) as the sweep's model:
    ``(predict, schedule_for)`` where ``predict`` gives E[x0 | x_t] (prediction type
    ``sample``, float64) at the entry of the run's own schedule that the call's timestep names
    (the nearest ``model_timestep``: a sigma grid's timesteps are fractional), and
    ``schedule_for`` is ``schedule_for`` remembering each run's schedule for it. Calls off the
    grid (Karras churn) are not supported: the sweep runs none."""
    current: list[core.Schedule] = []

    def schedule(name: str, count: int) -> core.Schedule:
        current[:] = [schedule_for(name, count)]
        return current[0]

    def predict(x: Tensor, t: Tensor) -> tuple[Tensor, Tensor | None]:
        if current[0].alpha_bar.device != x.device:
            current[0] = current[0].to(x.device)
        sched = current[0]
        k = int(torch.argmin((sched.model_timestep - float(t.reshape(-1)[0])).abs()))
        index = torch.full((x.shape[0],), k, dtype=torch.long, device=x.device)
        return denoiser.predict_x0(x.double(), index, sched).to(x.dtype), None

    return predict, schedule


def max_gap(schedule: core.Schedule, settings: SampleSettings) -> float | None:
    """The largest step in lambda = log(alpha/sigma) of a run of ``schedule`` (the last step
    onto clean data, an infinite gap, left out; a one-step grid has no other: None)."""
    grid = path_grid(schedule, settings.final_sigma)
    # only the last step (index 0) onto data is left out: a flow's first step from s = 1 is an
    # infinite gap too, and dropping it printed nan for a 2-step flow grid
    gaps = [grid.gap(i) for i in range(grid.num_steps) if i > 0 or math.isfinite(grid.gap(i))]
    return max(gaps) if gaps else None


def _rms(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).pow(2).mean().sqrt())


@dataclass(frozen=True)
class _Runner:
    """One loaded model and what every run of the sweep shares."""

    predict: PredictFn
    schedule_for: Callable[[str, int], core.Schedule]
    settings_for: Callable[[str], SampleSettings]
    prediction_type: str
    data_shape: tuple[int, ...]
    n: int
    seed: int
    x_t: Tensor
    options: dict[str, Any]

    def run(self, sampler: str, steps: int) -> tuple[Tensor, core.Schedule, SampleSettings, float]:
        sched = self.schedule_for(sampler, steps)
        settings = self.settings_for(sampler)
        start = time.perf_counter()
        out = sample(
            self.predict, sched, self.prediction_type, self.data_shape, n=self.n,
            settings=settings, seed=self.seed, init=self.x_t, **self.options,
        )  # fmt: skip
        return out.samples, sched, settings, time.perf_counter() - start


def _converged(runner: _Runner, sampler: str, steps: int) -> Reference:
    full = runner.run(sampler, steps)[0]
    half = runner.run(sampler, max(1, steps // 2))[0]
    return Reference(full, "converged", sampler, steps, _rms(full, half) / 7.0)


def step_sweep(
    predict: PredictFn,
    schedule_for: Callable[[str, int], core.Schedule],
    prediction_type: str,
    data_shape: Sequence[int],
    *,
    samplers: Sequence[str],
    steps: Sequence[int],
    settings_for: Callable[[str], SampleSettings],
    n: int = 256,
    seed: int = 0,
    exact: Callable[[Tensor], Tensor] | None = None,
    reference_sampler: str = "unipc",
    reference_steps: int = 500,
    data: Tensor | None = None,
    data_range: tuple[float, float] | None = (-1.0, 1.0),
    run_options: dict[str, Any] | None = None,
) -> SweepResult:
    """One row per (sampler, steps), every run from the same x_T (see the module).

    Args:
        predict: the model, as :func:`ddpmcli.run.samplers.sample` takes it.
        schedule_for: ``(sampler, steps) -> schedule`` the run uses (one grid rule for all).
        settings_for: ``sampler -> SampleSettings`` (clipping and solver options).
        exact: ``x_T -> samples``, the exact solution, or None for a converged run of
            ``reference_sampler`` at ``reference_steps`` steps (checked by halving).
        data: reference data points for ``data_distance`` (vector data).
        data_range: the samples' range, for ``rms_error_range``; None where it is not known in
            the samples' own space (a latent model: the column is then None).
        run_options: passed to every run (device, model_dtype, batch_size).
    """
    check_lists(samplers, steps)
    shape = tuple(int(s) for s in data_shape)
    x_t = randn(
        (n, *shape), generator(torch.device("cpu"), seed), torch.device("cpu"), torch.float64
    )
    runner = _Runner(
        predict, schedule_for, settings_for, prediction_type, shape, n, seed, x_t,
        dict(run_options or {}),
    )  # fmt: skip
    if exact is not None:
        reference = Reference(exact(x_t).float(), "exact")
    else:
        reference = _converged(runner, reference_sampler, reference_steps)
    width = None if data_range is None else data_range[1] - data_range[0]
    rows = []
    for name in samplers:
        for count in steps:
            rows.append(_row(runner, name, count, reference, data, width))
    return SweepResult(rows, reference, empirical_orders(rows))


def check_lists(samplers: Sequence[str], steps: Sequence[int]) -> None:
    """A :class:`ParameterError` for an empty list, a count below 1, or an entry given twice (a
    repeated entry would rerun the same row: same x_T, same grid, the same numbers twice)."""
    if not samplers or not steps:
        raise ParameterError("give at least one {samplers} and one {steps} count")
    for count in steps:
        if count < 1:
            raise ParameterError(f"{{steps}} counts must be >= 1, got {count}")
    for what, values in (("samplers", list(samplers)), ("steps", list(steps))):
        twice = [v for k, v in enumerate(values) if v in values[:k]]
        if twice:
            raise ParameterError(
                f"{{{what}}} lists {twice[0]!r} twice (it would rerun the same rows); "
                "give each once"
            )


def _row(
    runner: _Runner,
    name: str,
    count: int,
    reference: Reference,
    data: Tensor | None,
    width: float | None,
) -> dict[str, Any]:
    samples, sched, settings, wall = runner.run(name, count)
    sampler = registered(settings.sampler)  # name may carry options: dpmpp-3m:dpm-form=exact
    nfe = sampler.evaluations(sched.num_steps, settings) if sampler.evaluations else sched.num_steps
    rms = _rms(samples, reference.samples)
    vectors = len(runner.data_shape) == 1 and runner.n >= 2
    return {
        "sampler": name,
        "steps": count,
        "nfe": nfe,
        "rms_error": rms,
        "rms_error_range": None if width is None else rms / width,
        "reference_distance": energy_distance(samples, reference.samples, seed=runner.seed)
        if vectors
        else None,
        "data_distance": energy_distance(samples, data, seed=runner.seed)
        if vectors and data is not None and data.shape[0] >= 2
        else None,
        "max_log_snr_gap": max_gap(sched, settings),
        "stochastic": sampler.uses_noise(settings),
        "wall_s": wall,
    }


def empirical_orders(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Per deterministic sampler: -d log(rms_error)/d log(nfe) between its two largest NFE."""
    out: dict[str, float] = {}
    for name in dict.fromkeys(r["sampler"] for r in rows):
        mine = sorted(
            (r for r in rows if r["sampler"] == name and not r["stochastic"]),
            key=lambda r: r["nfe"],
        )
        if len(mine) < 2:
            continue
        a, b = mine[-2], mine[-1]
        if a["rms_error"] > 0 and b["rms_error"] > 0 and b["nfe"] != a["nfe"]:
            out[name] = -math.log(b["rms_error"] / a["rms_error"]) / math.log(b["nfe"] / a["nfe"])
    return out


def cheapest(rows: Sequence[dict[str, Any]], target: float) -> dict[str, Any] | None:
    """The row of fewest model evaluations whose ``rms_error`` is at most ``target`` (ties: the
    smaller error), deterministic samplers only; None when none reaches it."""
    ok = [r for r in rows if not r["stochastic"] and r["rms_error"] <= target]
    return min(ok, key=lambda r: (r["nfe"], r["rms_error"])) if ok else None


def with_final(settings: SampleSettings, final_sigma: float) -> SampleSettings:
    """``settings`` landing on ``final_sigma`` (a helper for exact references at sigma_min)."""
    return replace(settings, final_sigma=final_sigma)
