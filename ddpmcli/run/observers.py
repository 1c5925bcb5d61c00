"""The sampling loop's observers: per-step statistics rows, trajectory frames, the NaN check.

Each is a callable fed :class:`~ddpmcli.run.events.Event` (the step events of
:func:`ddpmcli.run.samplers.sample`, or the row events :class:`StepStatistics` emits).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ddpmcli import core
from ddpmcli.run.events import Event, NonFiniteError, Observer, notify

__all__ = [
    "STEP_COLUMNS",
    "NonFiniteSampleError",
    "StepMoments",
    "StepStatistics",
    "TrajectoryFrame",
    "TrajectoryRecorder",
    "finite_check",
]

STEP_COLUMNS: tuple[str, ...] = (
    "step",
    "t",
    "variance",
    "xt_std",
    "xt_std_expected",
    "x0_min",
    "x0_max",
    "x0_std",
    "clip_fraction",
    "update_norm",
    "log_snr_gap",
    "order",
)


@dataclass(frozen=True)
class TrajectoryFrame:
    """x0_hat (as used by the step, after clipping/thresholding) of the first samples at a step."""

    step: int
    t: int
    x0: Tensor  # [m, *data_shape], CPU float32


class TrajectoryRecorder:
    """Keeps x0_hat of the first ``samples`` samples every ``every`` steps and at the last."""

    def __init__(self, every: int, samples: int) -> None:
        self.every = every
        self.samples = samples
        self.frames: list[TrajectoryFrame] = []

    def __call__(self, event: Event) -> None:
        if event.step is None or event.t is None or "x0" not in event.tensors:
            return
        if event.step % self.every == 0 or event.done == event.total:
            x0 = event.tensors["x0"][: self.samples].float().cpu()
            self.frames.append(TrajectoryFrame(event.step, event.t[0], x0))


class StepStatistics:
    """Turns each step's tensors into a row of :data:`STEP_COLUMNS`.

    Each step's statistics are one small stack of reductions queued on the device and read back
    one step later (on CUDA the device keeps working while the host reads: one sync per step);
    ``flush`` reads the last. Finished rows go to ``rows`` and, as row events, to ``observers``.
    """

    def __init__(
        self,
        schedule: core.Schedule,
        variances: list[float] | None,
        data_variance: float,
        data_range: tuple[float, float],
        observers: Sequence[Observer] = (),
    ) -> None:
        self.expected_std = schedule.expected_xt_std(data_variance).tolist()
        self.num_steps = schedule.num_steps
        self.variances = variances
        self.data_variance = data_variance
        self.data_range = data_range
        self.observers = list(observers)
        self.rows: list[dict[str, Any]] = []
        self._pending: tuple[Event, Tensor] | None = None
        # per index: the step's gap in lambda = log(alpha/sigma) and the solver order it used
        # (set by the sampling loop, host side)
        self.gaps: list[float] = []
        self.orders: list[int] = []

    def __call__(self, event: Event) -> None:
        if event.step is None or "x_next" not in event.tensors:
            return
        self.add(event, self._reduce(event.tensors))

    def add(self, event: Event, stats: Tensor) -> None:
        """Queue the statistics of ``event``'s step (the layout of ``_reduce``: std of x_t, min,
        max and std of x0_raw, clip fraction, mean update norm[, variance]), finishing the
        previous row."""
        self.flush()
        self._pending = (event, stats)

    def _reduce(self, tensors: Any) -> Tensor:
        # each statistic is one or two kernels on the whole batch, in the state's dtype
        # (float32 sums are pairwise: ~1e-7 relative, plenty for diagnostics)
        x, x_next, x0_raw = tensors["x"], tensors["x_next"], tensors["x0_raw"]
        lo_hi = torch.aminmax(x0_raw)
        parts = [
            torch.std(x, correction=0),
            lo_hi.min,
            lo_hi.max,
            torch.std(x0_raw, correction=0),
            torch.ne(x0_raw.clamp(*self.data_range), x0_raw).mean(dtype=x.dtype),
            torch.linalg.vector_norm((x_next - x).flatten(1), dim=1).mean(),
        ]
        if self.variances is None:
            parts.append(tensors["variance"].to(x.dtype))
        parts.append(tensors["bad_output"].to(x.dtype))  # last: NaN/Inf values the model returned
        return torch.stack(parts)

    def flush(self) -> None:
        """Finish the pending row (the loop calls it once more after the last step)."""
        if self._pending is None:
            return
        event, stats = self._pending
        self._pending = None
        values = stats.tolist()
        i = self.num_steps - 1 - int(event.step or 0)
        row = {
            "step": event.step,
            "t": event.t[0] if event.t is not None else None,
            "variance": values[6] if self.variances is None else self.variances[i],
            "xt_std": values[0],
            "xt_std_expected": self.expected_std[i],
            "x0_min": values[1],
            "x0_max": values[2],
            "x0_std": values[3],
            "clip_fraction": values[4],
            "update_norm": values[5],
            "log_snr_gap": self.gaps[i] if self.gaps else None,
            "order": self.orders[i] if self.orders else None,
        }
        self.rows.append(row)
        if values[-1] > 0:  # the model's own output, before any x0_hat arithmetic or clipping
            step, t = int(row["step"]), int(row["t"])
            raise NonFiniteSampleError(
                f"the model returned NaN/Inf ({int(values[-1])} values) at step {step} of "
                f"{self.num_steps} (t = {t_text(row['t'])}); stopped there ({len(self.rows)} "
                "rows kept)",
                list(self.rows),
                step,
                t,
            )
        notify(self.observers, Event(event.loop, event.done, event.total, event.step, event.t,
                                     row=row))  # fmt: skip


class StepMoments:
    """Each step's partial moments over this rank's samples (float64), added over ranks by
    :meth:`reduce` into the statistics :class:`StepStatistics` turns into rows: one process's
    numbers, up to the float rounding of the sums (std from the summed first and second
    moments)."""

    def __init__(self, data_range: tuple[float, float], *, measure: bool) -> None:
        self.data_range = data_range
        self.measure = measure
        self.events: list[Event] = []
        self.sums: list[Tensor] = []  # per step: sum, sum^2 of x and of x0_raw, clipped, norms,
        self.extremes: list[Tensor] = []  # variance sum, values, samples; -min and max of x0_raw

    def add(self, event: Event, tensors: Any) -> None:
        """Record ``event``'s step (``tensors`` empty when this rank has no samples)."""
        self.events.append(event)
        f64 = torch.float64
        if not tensors:
            self.sums.append(torch.zeros(10, dtype=f64))
            self.extremes.append(torch.full((2,), -math.inf, dtype=f64))
            return
        x, x_next, x0 = tensors["x"], tensors["x_next"], tensors["x0_raw"]
        clipped = torch.ne(x0.clamp(*self.data_range), x0).sum(dtype=f64)
        norms = torch.linalg.vector_norm((x_next - x).flatten(1).to(f64), dim=1).sum()
        zero = torch.zeros((), dtype=f64, device=x.device)
        var = tensors["variance"].to(f64) * x.numel() if self.measure else zero
        parts = [x.sum(dtype=f64), x.to(f64).square().sum(), x0.sum(dtype=f64),
                 x0.to(f64).square().sum(), clipped, norms, var]  # fmt: skip
        count = torch.tensor([x.numel(), x.shape[0]], dtype=f64, device=x.device)
        bad = tensors["bad_output"].to(f64).reshape(1)
        self.sums.append(torch.cat([torch.stack(parts), count, bad]).cpu())
        lo_hi = torch.aminmax(x0)
        self.extremes.append(torch.stack([-lo_hi.min, lo_hi.max]).to("cpu", f64))

    def reduce(self, ranks: Any) -> list[tuple[Event, Tensor]]:
        """Every step's event with its statistics over all ranks (``ranks``: a
        :class:`~ddpmcli.run.distributed.Ranks`), in step order."""
        if not self.events:
            return []
        sums = ranks.sum(torch.stack(self.sums))
        extremes = torch.stack(ranks.gather(torch.stack(self.extremes))).amax(dim=0)
        values, samples = sums[:, 7], sums[:, 8]

        def std(total: Tensor, squares: Tensor) -> Tensor:
            mean = total / values
            return (squares / values - mean * mean).clamp_min(0).sqrt()

        stats = [std(sums[:, 0], sums[:, 1]), -extremes[:, 0], extremes[:, 1]]
        stats += [std(sums[:, 2], sums[:, 3]), sums[:, 4] / values, sums[:, 5] / samples]
        if self.measure:
            stats.append(sums[:, 6] / values)
        stats.append(sums[:, 9])  # NaN/Inf values the model returned, over every rank
        table = torch.stack(stats, dim=1)
        return list(zip(self.events, table, strict=True))


def finite_check(rows: list[dict[str, Any]], num_steps: int) -> Observer:
    """An observer of row events that stops the run at the first non-finite ``update_norm``.

    x_t was finite (checked one step earlier), so a non-finite mean update norm means a NaN/Inf
    in x_{t-1}: the check costs nothing beyond the statistics themselves.
    """

    def observe(event: Event) -> None:
        row = event.row
        if row is None or math.isfinite(row["update_norm"]):
            return
        step, t = int(row["step"]), int(row["t"])
        raise NonFiniteSampleError(
            f"x_t became NaN/Inf at step {step} of {num_steps} (t = {t_text(row['t'])}); "
            f"stopped there ({len(rows)} rows kept). Try the float32 dtype, clipping, or fewer "
            "steps",
            rows,
            step,
            t,
        )

    return observe


def t_text(t: Any) -> str:
    """A row's t as a message shows it: whole as is, a float model timestep (c_noise, 1000 s
    off the table) to 6 significant digits."""
    return str(t) if isinstance(t, int) else f"{t:.6g}"


class NonFiniteSampleError(NonFiniteError):
    """x_t became NaN or Inf mid-run. ``rows`` holds every row computed up to and including the
    step at which it appeared (its statistics show the NaN/Inf)."""
