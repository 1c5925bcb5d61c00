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

    def __call__(self, event: Event) -> None:
        if event.step is None or "x_next" not in event.tensors:
            return
        stats = self._reduce(event.tensors)
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
        }
        self.rows.append(row)
        notify(self.observers, Event(event.loop, event.done, event.total, event.step, event.t,
                                     row=row))  # fmt: skip


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
            f"x_t became NaN/Inf at step {step} of {num_steps} (t = {t}); stopped there "
            f"({len(rows)} rows kept). Try the float32 dtype, clipping, or fewer steps",
            rows,
            step,
            t,
        )

    return observe


class NonFiniteSampleError(NonFiniteError):
    """x_t became NaN or Inf mid-run. ``rows`` holds every row computed up to and including the
    step at which it appeared (its statistics show the NaN/Inf)."""
