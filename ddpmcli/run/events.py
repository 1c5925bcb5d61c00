"""The one event shape every loop reports through, the observers built on it, and run failures.

Every loop in :mod:`ddpmcli.run` (and :func:`ddpmcli.training.train_denoiser`) takes
``observers``: callables ``(Event) -> None``. A loop emits an :class:`Event` after each unit of
work (a sampling step, a chunk of (sample, t) pairs, a training step); observers measure, keep
frames, check for NaN or drive a progress bar, so the loops themselves only step.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from ddpmcli.errors import DataError, DdpmError, ParameterError, SamplingError

__all__ = [
    "Event",
    "ModelFailure",
    "NonFiniteError",
    "Observer",
    "ParameterError",
    "RunError",
    "call_model",
    "check_data_finite",
    "notify",
    "progress_observer",
]


@dataclass(frozen=True)
class Event:
    """What a loop reports after each unit of work.

    Attributes:
        loop: which loop: ``sample``, ``bound``, ``sweep`` or ``train``.
        done: units of work done so far (model evaluations or training steps), of ``total``.
        total: units of work in the whole run.
        step: the loop's step (sampling: 0 = the noisiest; training: 1-based), if it has one.
        t: the model timesteps this unit covered, ``(first, last)`` (equal for one t), if any.
        tensors: the step's state for observers that measure it (sampling: ``x`` = x_t,
            ``x_next``, ``x0_raw`` (before clipping), ``x0`` (as used), ``variance`` (the mean
            variance of the noise the step added, a 0-d tensor, or absent); sweep: ``x0_hat``
            of the chunk's pairs, each pair's ``position`` in the timesteps and ``sample`` index).
        values: host numbers (training: ``loss``, ``loss_smoothed``).
        row: a finished result row, when this event carries one.
    """

    loop: str
    done: int
    total: int
    step: int | None = None
    t: tuple[int, int] | None = None
    tensors: Mapping[str, Tensor] = field(default_factory=dict)
    values: Mapping[str, float] = field(default_factory=dict)
    row: dict[str, Any] | None = None


Observer = Callable[[Event], None]


def notify(observers: Iterable[Observer], event: Event) -> None:
    """Hand ``event`` to every observer, in order."""
    for observe in observers:
        observe(event)


class _Bar(Protocol):
    def update(self, completed: int | None = None, **fields: str) -> None: ...


def progress_observer(bar: _Bar, fields: Mapping[str, str] | None = None) -> Observer:
    """An observer moving ``bar`` (``output.progress``'s handle) to each event's ``done``.

    ``fields`` maps a bar field to the event value it shows (``{"loss": "loss_smoothed"}``).
    Row events (``row`` set, no new work) leave the bar alone.
    """
    shown = dict(fields or {})

    def observe(event: Event) -> None:
        if event.row is not None:
            return
        extra = {k: f"{event.values[v]:.4f}" for k, v in shown.items() if v in event.values}
        bar.update(completed=event.done, **extra)

    return observe


class RunError(SamplingError):
    """A run that stopped early. ``rows`` holds the rows it finished (print them before the
    error); ``step`` and ``t`` say where it stopped (None where the loop has no such index)."""

    def __init__(
        self,
        message: str,
        rows: Sequence[dict[str, Any]] = (),
        step: int | None = None,
        t: int | None = None,
    ) -> None:
        super().__init__(message)
        self.rows = list(rows)
        self.step = step
        self.t = t


class NonFiniteError(RunError):
    """The model's output (or the state built from it) became NaN or Inf."""


class ModelFailure(RunError):
    """The model raised an exception of its own."""


def where_text(step: int | None, t: tuple[int, int] | None) -> str:
    """``step 3 (t = 960)``, ``t = 10``, ``t = 10..20``: where a unit of work ran."""
    parts = []
    if t is not None:  # (a float model timestep off VP: 6 digits, not 1.0955066586684705)
        a, b = (v if isinstance(v, int) else f"{v:.6g}" for v in t)
        parts.append(f"t = {a}" if t[0] == t[1] else f"t = {a}..{b}")
    if step is not None:
        return f"step {step}" + (f" ({parts[0]})" if parts else "")
    return parts[0] if parts else "start"


def _one_line(exc: BaseException) -> str:
    """The last non-empty line of an exception's message (TorchScript errors carry a whole
    interpreter traceback; its last line is the original error), with its type if missing."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = (lines[-1] if lines else "").removeprefix("builtins.")  # TorchScript's spelling
    return text if ":" in text.split(" ", 1)[0] else f"{type(exc).__name__}: {text}".rstrip(": ")


@functools.lru_cache(maxsize=64)
def _accepts_index(function: Callable[..., Any]) -> bool:
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):  # a builtin or C callable: no keywords of ours
        return False
    return "sample_index" in parameters


def takes_sample_index(predict: Callable[..., Any]) -> bool:
    """Whether ``predict`` takes a ``sample_index`` keyword (a bound method is looked up by its
    function, so one model's calls share the cached answer)."""
    function = getattr(predict, "__func__", predict)
    try:
        return _accepts_index(function)
    except TypeError:  # unhashable callable
        return "sample_index" in inspect.signature(predict).parameters


def call_model(
    predict: Callable[[Tensor, Tensor], tuple[Tensor, Tensor | None]],
    x_t: Tensor,
    t_model: Tensor,
    *,
    step: int | None = None,
    t: tuple[int, int] | None = None,
    rows: Sequence[dict[str, Any]] = (),
    sample_index: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """``predict(x_t, t_model)``; an exception of the model's own becomes one
    :class:`ModelFailure` line naming where it happened (our own errors pass unchanged).

    ``sample_index`` (int64 ``[B]``, each row's global sample index) is passed as a keyword to a
    ``predict`` that takes one (``LoadedModel.predict``: a conditional model's labels), so the
    labels follow the sample, not the batch; plain ``(x_t, t)`` callables are called as before.
    """
    try:
        if sample_index is not None and takes_sample_index(predict):
            return predict(x_t, t_model, sample_index=sample_index)  # type: ignore[call-arg]
        return predict(x_t, t_model)
    except DdpmError:
        raise
    except Exception as exc:
        where = where_text(step, t)
        raise ModelFailure(
            f"the model failed at {where}: {_one_line(exc)}",
            rows,
            step,
            None if t is None else t[0],
        ) from exc


def check_data_finite(x0: Tensor, model_dtype: torch.dtype, what: str = "the data") -> None:
    """Raise :class:`DataError` when ``x0`` holds NaN/Inf, or values that overflow the model's
    dtype (a data problem: the model never saw a finite input)."""
    if x0.is_floating_point() and not bool(torch.isfinite(x0).all()):
        bad = int((~torch.isfinite(x0)).sum())
        raise DataError(f"{what}: {bad} value(s) are NaN or Inf")
    if model_dtype.is_floating_point and not bool(torch.isfinite(x0.to(model_dtype)).all()):
        big = float(x0.abs().max())
        name = str(model_dtype).removeprefix("torch.")
        raise DataError(
            f"{what}: values up to {big:.4g} are not finite in the model's dtype {name} "
            f"(largest {torch.finfo(model_dtype).max:.4g})"
        )
