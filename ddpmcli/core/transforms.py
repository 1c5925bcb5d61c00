"""Transforms of a schedule (zero terminal SNR, log-SNR shift, respacing) and the entry points
that apply them: :func:`make_schedule` and :func:`schedule_from_spec`."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ddpmcli.core.assemble import (
    _assemble,
    _base_schedule,
    _validate,
    assemble_path,
    schedule_from_alpha_bars,
    schedule_from_betas,
)
from ddpmcli.core.kinds import (
    F64,
    SPACINGS,
    _betas_from_log_alpha_bar,
    _Parts,
    _parts_from_logsnr,
    canonical_kind,
)
from ddpmcli.core.path_kinds import PathParts
from ddpmcli.core.paths import schedule_from_path
from ddpmcli.core.schedule import Schedule
from ddpmcli.errors import ScheduleError, ScheduleParameterError


def make_schedule(
    kind: str,
    timesteps: int = 1000,
    *,
    zero_terminal_snr: bool = False,
    logsnr_shift: float = 0.0,
    **params: float,
) -> Schedule:
    """Build a schedule of a registered kind with T = ``timesteps`` training steps.

    Args:
        kind: a name in :data:`SCHEDULE_KINDS` or :data:`SCHEDULE_ALIASES`.
        timesteps: T, the number of training timesteps (default 1000).
        zero_terminal_snr: rescale so that alpha_bar_{T-1} = 0 (Lin et al. 2024, Algorithm 1).
        logsnr_shift: add this to every log-SNR (applied after ``zero_terminal_snr``).
        **params: the kind's constants (see ``SCHEDULE_KINDS[kind].defaults``).
    """
    schedule = _base_schedule(canonical_kind(kind), timesteps, params)
    if zero_terminal_snr:
        schedule = rescale_zero_terminal_snr(schedule)
    if logsnr_shift:
        schedule = shift_logsnr(schedule, logsnr_shift)
    return schedule


def _vp_only(schedule: Schedule, what: str) -> None:
    if schedule.path != "vp":
        raise ScheduleParameterError(
            f"{what} applies to VP schedules; {schedule.name} is a {schedule.path} path "
            "(a flow's shift parameter moves its log-SNR)"
        )


def _with_transform(schedule: Schedule, step: list[Any]) -> dict[str, Any]:
    spec = dict(schedule.spec)
    spec["transforms"] = [*spec.get("transforms", []), step]
    return spec


def rescale_zero_terminal_snr(schedule: Schedule) -> Schedule:
    """Rescale so that alpha_bar_{T-1} = 0 (Lin et al. 2024, Algorithm 1).

    s' = (s - s_T) s_0/(s_0 - s_T) with s = sqrt(alpha_bar). Computed without cancellation:
    s_t - s_T is a reverse cumulative sum of the positive steps d_j = s_{j-1} - s_j
    = s_{j-1} beta_j/(1 + sqrt(alpha_j)), and 1 - s' = (s_0 (1 - s) - s_T (1 - s_0))/(s_0 - s_T).
    """
    _vp_only(schedule, "zero terminal SNR")
    if schedule.num_steps < 2:
        raise ScheduleParameterError("zero terminal SNR needs at least 2 timesteps")
    s = schedule.sqrt_alpha_bar
    beta, alpha = schedule.beta, schedule.alpha
    d = torch.cat([torch.zeros(1, dtype=F64), s[:-1] * beta[1:] / (1 + torch.sqrt(alpha[1:]))])
    # above[t] = s_t - s_T = sum_{j > t} d_j
    above = torch.flip(torch.cumsum(torch.flip(d, [0]), 0), [0]) - d
    s0, s_last = s[0], s[-1]
    span = above[0]
    k = s0 / span
    s_new = above * k
    one_minus_s = schedule.one_minus_alpha_bar / (1 + s)
    one_minus_s_new = (s0 * one_minus_s - s_last * one_minus_s[0]) / span
    om = one_minus_s_new * (1 + s_new)
    om[-1] = 1.0  # alpha_bar_{T-1} = 0 exactly; rounding must not leave 1 - ab a few ulps off 1
    log_ab = 2 * torch.log(s_new)
    s_prev = torch.cat([torch.ones(1, dtype=F64), s_new[:-1]])
    beta_new = k * d * (s_prev + s_new) / s_prev**2
    beta_new[0] = om[0]
    beta_new[-1] = 1.0
    parts = _Parts(beta_new, log_ab, om)
    return _assemble(
        f"{schedule.name}+zsnr",
        _with_transform(schedule, ["zero_terminal_snr"]),
        parts,
        schedule.timesteps,
        schedule.num_train_timesteps,
    )


def shift_logsnr(schedule: Schedule, shift: float) -> Schedule:
    """Add ``shift`` to every log-SNR: alpha_bar' = sigmoid(log_snr + shift)."""
    if not math.isfinite(shift):
        raise ScheduleParameterError(f"log-SNR shift must be finite, got {shift}")
    if schedule.path != "vp":
        return _shift_path_logsnr(schedule, shift)
    parts = _parts_from_logsnr(schedule.log_snr + shift)
    # a shift that saturates float64 (alpha_bar exactly 1 or 0: beta 0 or 1) printed inf/NaN
    # columns with exit 0
    _validate(parts, ScheduleParameterError, f"log-SNR shift {shift:g} of {schedule.name}")
    return _assemble(
        f"{schedule.name}{shift:+g}logsnr",
        _with_transform(schedule, ["logsnr_shift", float(shift)]),
        parts,
        schedule.timesteps,
        schedule.num_train_timesteps,
    )


def _shift_path_logsnr(schedule: Schedule, shift: float) -> Schedule:
    # the same family at lambda + shift (the steps between entries do not change):
    # flow alpha = sigmoid(lambda/2), sigma = sigmoid(-lambda/2); sigma space sigma = e^(-lambda/2)
    lam = schedule.log_snr + shift
    if schedule.path == "flow":
        alpha, sigma = torch.sigmoid(lam / 2), torch.sigmoid(-lam / 2)
    else:
        alpha, sigma = torch.ones_like(lam), torch.exp(-lam / 2)
    parts = PathParts(
        schedule.path, alpha, sigma, schedule.model_timestep, lam, torch.diff(schedule.log_snr)
    )
    return assemble_path(
        f"{schedule.name}{shift:+g}logsnr",
        _with_transform(schedule, ["logsnr_shift", float(shift)]),
        parts,
        schedule.timesteps,
        schedule.num_train_timesteps,
    )


def respaced_timesteps(
    num_train_timesteps: int, steps: int | str, spacing: str = "leading", steps_offset: int = 0
) -> list[int]:
    """The kept timesteps, ascending, for a respacing of T = ``num_train_timesteps`` steps.

    ``steps`` is a step count used with ``spacing`` (diffusers' ``leading`` / ``trailing`` /
    ``linspace`` of ``set_timesteps``), or an improved-diffusion section string: ``"ddim50"`` (a
    stride that gives exactly 50 steps) or ``"10,20,30"`` (T split into equal sections, each with
    that many evenly spaced steps).
    """
    big_t = num_train_timesteps
    if isinstance(steps, str):
        text = steps.strip().lower()
        if text.isdigit():
            return respaced_timesteps(big_t, int(text), spacing, steps_offset)
        return _section_timesteps(big_t, text)
    n = steps
    if not 1 <= n <= big_t:
        raise ScheduleParameterError(f"steps must lie in 1..{big_t} (T), got {n}")
    if spacing == "linspace":
        kept = [int(k) for k in torch.linspace(0, big_t - 1, n, dtype=F64).round().long()]
    elif spacing == "leading":
        ratio = big_t // n
        kept = [i * ratio + steps_offset for i in range(n)]
    elif spacing == "trailing":
        kept = sorted(round(big_t - i * big_t / n) - 1 for i in range(n))
    else:
        raise ScheduleParameterError(f"unknown spacing {spacing!r}; allowed: {', '.join(SPACINGS)}")
    kept = sorted(set(int(k) for k in kept))
    if kept[0] < 0 or kept[-1] >= big_t:
        raise ScheduleParameterError(
            f"{spacing} spacing with steps_offset={steps_offset} gives timestep {kept[-1]}, "
            f"outside 0..{big_t - 1}"
        )
    return kept


def _section_timesteps(big_t: int, text: str) -> list[int]:
    if text.startswith("ddim"):
        try:
            desired = int(text[4:])
        except ValueError:
            raise ScheduleParameterError(f"bad section string {text!r}; e.g. ddim50") from None
        for stride in range(1, big_t):
            if len(range(0, big_t, stride)) == desired:
                return list(range(0, big_t, stride))
        raise ScheduleParameterError(
            f"no integer stride gives exactly {desired} steps of T = {big_t}"
        )
    try:
        counts = [int(x) for x in text.split(",")]
    except ValueError:
        raise ScheduleParameterError(
            f"bad steps {text!r}; give a number, 'ddimN' or section counts like '10,20,30'"
        ) from None
    if any(c < 1 for c in counts) or len(counts) > big_t:
        raise ScheduleParameterError(f"section counts must be >= 1, got {text!r}")
    size_per, extra = divmod(big_t, len(counts))
    start, kept = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ScheduleParameterError(f"cannot take {count} steps from a section of {size}")
        frac_stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0  # accumulated, as improved-diffusion does, so rounding matches it
        for _ in range(count):
            kept.append(start + round(position))
            position += frac_stride
        start += size
    return sorted(set(kept))


def respace(schedule: Schedule, timesteps: Sequence[int]) -> Schedule:
    """Keep only ``timesteps``: ab'_i = ab_{t_i}, beta'_i = 1 - ab_{t_i}/ab_{t_{i-1}}."""
    kept = sorted(set(int(t) for t in timesteps))
    if not kept or kept[0] < 0 or kept[-1] >= schedule.num_steps:
        raise ScheduleParameterError(
            f"respaced timesteps must lie in 0..{schedule.num_steps - 1}, "
            f"got {kept[0] if kept else None}..{kept[-1] if kept else None}"
        )
    idx = torch.tensor(kept, dtype=torch.long)
    log_ab, om = schedule.log_alpha_bar[idx], schedule.one_minus_alpha_bar[idx]
    parts = _Parts(_betas_from_log_alpha_bar(log_ab, om), log_ab, om)
    _validate(parts, ScheduleParameterError, f"respacing of {schedule.name}")
    return _assemble(
        f"{schedule.name}@{len(kept)}",
        _with_transform(schedule, ["respace", kept]),
        parts,
        schedule.timesteps[idx],
        schedule.num_train_timesteps,
        None if schedule.path == "vp" else _path_at(schedule, idx),
    )


def _path_at(schedule: Schedule, idx: Tensor) -> PathParts:
    # the path's entries at the kept indices (the log-SNR steps between them are new
    # differences); the VP-equivalent is respaced as a VP schedule is, digit for digit
    log_snr = schedule.log_snr[idx]
    return PathParts(
        schedule.path,
        schedule.alpha_t[idx],
        schedule.sigma_t[idx],
        schedule.model_timestep[idx],
        log_snr,
        torch.diff(log_snr),
    )


def respaced(
    schedule: Schedule, steps: int | str, spacing: str = "leading", steps_offset: int = 0
) -> Schedule:
    """``schedule`` respaced to ``steps`` inference steps: :func:`respace` of
    :func:`respaced_timesteps` over its own T (diffusers' ``set_timesteps`` with ``spacing`` and
    ``steps_offset``, or an improved-diffusion section string). The one respacing path of the
    schedule commands, the configs and the samplers."""
    return respace(schedule, respaced_timesteps(schedule.num_steps, steps, spacing, steps_offset))


def schedule_from_spec(spec: Mapping[str, Any]) -> Schedule:
    """Rebuild a schedule from :attr:`Schedule.spec` (as stored in checkpoints)."""
    try:
        kind = spec["kind"]
        if kind == "path":
            schedule = schedule_from_path(
                spec["path"], spec["alpha_t"], spec["sigma_t"], spec["model_timestep"]
            )
        elif kind == "custom":
            if "betas" in spec:
                schedule = schedule_from_betas(spec["betas"])
            else:
                schedule = schedule_from_alpha_bars(spec["alpha_bars"])
        else:
            schedule = _base_schedule(
                canonical_kind(kind), int(spec.get("timesteps", 1000)), spec.get("params", {})
            )
        for step in spec.get("transforms", []):
            if step[0] == "zero_terminal_snr":
                schedule = rescale_zero_terminal_snr(schedule)
            elif step[0] == "logsnr_shift":
                schedule = shift_logsnr(schedule, float(step[1]))
            elif step[0] == "respace":
                schedule = respace(schedule, step[1])
            else:
                raise ScheduleError(f"unknown schedule transform {step[0]!r}")
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        shown = repr(dict(spec))  # a path spec holds every per-t array: one line, not 50 kB
        shown = shown if len(shown) <= 200 else f"{shown[:200]}... (keys {sorted(map(str, spec))})"
        raise ScheduleError(f"malformed schedule spec {shown}: {exc!r}") from None
    return schedule
