"""The inference grids diffusers' schedulers build in ``set_timesteps``, digit for digit.

A user who runs a diffusers pipeline gets the sigmas and timesteps its scheduler computes, with
that scheduler's own arithmetic: some steps in float64, some in float32, timesteps truncated to
int64 by the multistep schedulers, the flow scheduler's ``sigma_min`` already shifted once when it
is shifted again (diffusers #13243). The functions here redo each of those steps in the same order
and the same precision (:func:`ddpmcli.core.grids.linspace` is numpy's ``linspace``), so the
result, held in float64, equals diffusers' float32 tensors value for value; the one exception is
a timestep interpolated onto a VP training table, whose float32 ``log`` differs by an ulp between
numpy and torch (the timestep then differs in its last float32 digit or two).

Schedulers and settings covered (diffusers 0.3x-0.42):
- ``FlowMatchEulerDiscreteScheduler``: ``shift``, ``use_dynamic_shifting`` with ``mu`` (exponential
  or linear ``time_shift_type``), ``shift_terminal``, ``invert_sigmas``, karras/exponential/beta
  conversions, and pipeline-given ``sigmas`` (Flux and LTX pass ``linspace(1, 1/n, n)``);
- ``DPMSolverMultistepScheduler`` and ``UniPCMultistepScheduler`` with ``use_flow_sigmas`` and
  ``flow_shift`` (SANA, Wan), ``mu``;
- ``EulerDiscreteScheduler`` on a beta schedule, plain or with karras/exponential/beta sigmas.

Imports torch and the standard library only.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ddpmcli.core.grids import (
    F64,
    beta_sigmas,
    exponential_sigmas,
    karras_sigmas,
    linspace,
    sigma_to_timestep,
)
from ddpmcli.errors import ScheduleParameterError

F32 = torch.float32


@dataclass(frozen=True)
class InferenceGrid:
    """What a diffusers scheduler holds after ``set_timesteps(n)``.

    ``sigmas``: n + 1 values (the last is the terminal one the final step lands on), float64
    holding the scheduler's float32 values. For flow schedulers a sigma is the flow time s
    (``x = (1 - s) x0 + s eps``); for EulerDiscrete it is the VE sigma ``sqrt((1 - ab)/ab)``.
    ``timesteps``: the n values the model is called with, float64 (``timestep_dtype`` says what
    diffusers stores: float32 values or whole int64 numbers). ``mu``: the dynamic shift used."""

    sigmas: Tensor
    timesteps: Tensor
    timestep_dtype: str
    space: str
    mu: float | None = None


def _f32_values(values: Tensor) -> Tensor:
    return values.to(F32).to(F64)


def _steps(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ScheduleParameterError(f"steps must be a whole number >= 1, got {n!r}")
    return n


def _rounder(dtype: torch.dtype) -> Callable[[Tensor | float], Tensor]:
    """Round a float64 tensor to ``dtype`` and back. numpy does float32 grid arithmetic with each
    Python constant rounded to float32 first; every ``+ - * /`` taken in float64 and rounded to
    float32 is the correctly rounded float32 result, as numpy's (torch's ``c / x`` is ``c *
    (1/x)``, two roundings, hence this)."""

    def rounded(values: Tensor | float) -> Tensor:
        return torch.as_tensor(values, dtype=F64).to(dtype).to(F64)

    return rounded


def _shift_static(sigmas: Tensor, shift: float) -> Tensor:
    # diffusers' order of operations: shift * s / (1 + (shift - 1) * s), in the grid's precision
    r, x = _rounder(sigmas.dtype), sigmas.to(F64)
    out = r(r(r(shift) * x) / r(1 + r(r(shift - 1) * x)))
    return out.to(sigmas.dtype)


def _exp_mu(mu: float) -> float:
    # e^mu, or one line where it is past float64 (math.exp raised OverflowError)
    if mu > math.log(sys.float_info.max):
        raise ScheduleParameterError(f"mu={mu} is too large: e^mu overflows float64")
    return math.exp(mu)


def _shift_dynamic(sigmas: Tensor, mu: float, time_shift_type: str) -> Tensor:
    # diffusers' order: e^mu / (e^mu + (1/s - 1)^1) (the exponent 1 is exact), or mu / (mu + ...)
    if time_shift_type == "exponential":
        scale = _exp_mu(mu)
    elif time_shift_type == "linear":
        scale = mu
    else:
        raise ScheduleParameterError(
            f"time_shift_type must be exponential or linear, got {time_shift_type!r}"
        )
    r, x = _rounder(sigmas.dtype), sigmas.to(F64)
    c = r(scale)
    return r(c / r(c + r(r(1 / x) - 1))).to(sigmas.dtype)


def _stretch_to_terminal(sigmas: Tensor, shift_terminal: float) -> Tensor:
    """LTX's stretch: the grid rescaled in ``1 - s`` so that its last value is shift_terminal."""
    r, x = _rounder(sigmas.dtype), sigmas.to(F64)
    one_minus = r(1 - x)
    scale = r(one_minus[-1] / r(1 - shift_terminal))
    return r(1 - r(one_minus / scale)).to(sigmas.dtype)


def _converted(
    sigmas: Tensor, n: int, conversion: str | None, ends: tuple[float | None, ...]
) -> Tensor:
    """Karras / exponential / beta re-gridding between the grid's ends (or the config's)."""
    if conversion is None:
        return sigmas
    lo = ends[0] if ends[0] is not None else float(sigmas[-1])
    hi = ends[1] if ends[1] is not None else float(sigmas[0])
    if n == 1:  # one step: every conversion gives its first value, sigma_max
        return torch.tensor([hi], dtype=F64)
    if conversion == "karras":
        return karras_sigmas(n, lo, hi)
    if conversion == "exponential":
        return exponential_sigmas(n, lo, hi)
    return beta_sigmas(n, lo, hi)


def _conversion(karras: bool, exponential: bool, beta: bool) -> str | None:
    chosen = [
        name
        for name, on in (("karras", karras), ("exponential", exponential), ("beta", beta))
        if on
    ]
    if len(chosen) > 1:
        raise ScheduleParameterError(
            "only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas can be set"
        )
    return chosen[0] if chosen else None


# --------------------------------------------------------------------------------------------
# FlowMatchEulerDiscreteScheduler
# --------------------------------------------------------------------------------------------


def flow_match_train_ends(
    num_train_timesteps: int, shift: float, dynamic: bool
) -> tuple[float, float]:
    """``(sigma_min, sigma_max)`` as the scheduler's ``__init__`` leaves them: the training table
    ``t/T``, t = T..1, in float32, shifted by ``shift`` unless shifting is dynamic.
    ``set_timesteps`` shifts its grid between these ends again, so a static shift acts twice on
    ``sigma_min``."""
    ends = torch.tensor([num_train_timesteps, 1], dtype=F32) / num_train_timesteps
    if not dynamic:
        ends = _shift_static(ends, shift)
    return float(ends[1]), float(ends[0])


def pipeline_flow_sigmas(n: int) -> Tensor:
    """The ``sigmas`` Flux's and LTX's pipelines pass to ``set_timesteps``: linspace(1, 1/n, n)."""
    return linspace(1.0, 1.0 / _steps(n), n)


def cogview4_pipeline_inputs(n: int, num_train_timesteps: int = 1000) -> tuple[Tensor, Tensor]:
    """The ``(timesteps, sigmas)`` CogView4's pipeline passes to ``set_timesteps``: whole
    timesteps ``int(linspace(T, 1, n))`` as float32, and those over T (float32)."""
    timesteps = linspace(float(num_train_timesteps), 1.0, _steps(n)).to(torch.int64).to(F32)
    return timesteps.to(F64), (timesteps / num_train_timesteps).to(F64)


def flow_match_euler_grid(
    n: int,
    *,
    num_train_timesteps: int = 1000,
    shift: float = 1.0,
    use_dynamic_shifting: bool = False,
    time_shift_type: str = "exponential",
    mu: float | None = None,
    shift_terminal: float | None = None,
    invert_sigmas: bool = False,
    use_karras_sigmas: bool = False,
    use_exponential_sigmas: bool = False,
    use_beta_sigmas: bool = False,
    sigmas: Sequence[float] | Tensor | None = None,
    timesteps: Sequence[float] | Tensor | None = None,
) -> InferenceGrid:
    """``FlowMatchEulerDiscreteScheduler(...).set_timesteps(n, sigmas=sigmas, mu=mu,
    timesteps=timesteps)``.

    Without ``sigmas`` the grid is ``linspace(T sigma_max, T sigma_min, n)/T`` in float64 between
    the ends of :func:`flow_match_train_ends`, then shifted; with ``sigmas`` (a pipeline's) the
    given values are rounded to float32 and shifted in float32, as numpy does for diffusers.
    Given ``timesteps`` (CogView4's pipeline passes both) are kept as float32, not recomputed."""
    _steps(n)
    if use_dynamic_shifting and mu is None:
        raise ScheduleParameterError("use_dynamic_shifting needs mu (or an image sequence length)")
    if not use_dynamic_shifting and mu is not None:
        raise ScheduleParameterError(
            "mu is given but the scheduler shifts statically (use_dynamic_shifting is off)"
        )
    conversion = _conversion(use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas)
    big_t = num_train_timesteps
    if sigmas is None:
        sigma_min, sigma_max = flow_match_train_ends(big_t, shift, use_dynamic_shifting)
        grid = linspace(sigma_max * big_t, sigma_min * big_t, n) / big_t
    else:
        grid = torch.as_tensor(sigmas, dtype=F64).to(F32)
        n = grid.numel()
    if use_dynamic_shifting:
        grid = _shift_dynamic(grid, float(mu), time_shift_type)  # type: ignore[arg-type]
    else:
        grid = _shift_static(grid, shift)
    if shift_terminal:
        grid = _stretch_to_terminal(grid, shift_terminal)
    grid = _converted(grid.to(F64) if conversion else grid, n, conversion, (None, None))
    sigmas32 = grid.to(F32)
    timesteps32 = (
        sigmas32 * big_t if timesteps is None else torch.as_tensor(timesteps, dtype=F64).to(F32)
    )
    terminal = torch.zeros(1, dtype=F32)
    if invert_sigmas:
        sigmas32 = 1.0 - sigmas32
        timesteps32 = sigmas32 * big_t
        terminal = torch.ones(1, dtype=F32)
    return InferenceGrid(
        sigmas=torch.cat([sigmas32, terminal]).to(F64),
        timesteps=timesteps32.to(F64),
        timestep_dtype="float32",
        space="flow",
        mu=None if mu is None else float(mu),
    )


# --------------------------------------------------------------------------------------------
# DPMSolverMultistep / UniPCMultistep with use_flow_sigmas
# --------------------------------------------------------------------------------------------


def _truncated(values: Tensor) -> Tensor:
    # torch's float -> int64 conversion truncates toward zero, as diffusers' .to(torch.int64)
    return values.to(torch.int64).to(F64)


def dpm_solver_flow_grid(
    n: int,
    *,
    flow_shift: float = 1.0,
    num_train_timesteps: int = 1000,
    mu: float | None = None,
    final_sigma: float = 0.0,
) -> InferenceGrid:
    """``DPMSolverMultistepScheduler(use_flow_sigmas=True, ...).set_timesteps(n, mu=mu)``:
    ``s = 1 - linspace(1, 1/T, n + 1)``, shifted, reversed, its last (zero) entry dropped; int64
    timesteps ``trunc(T s)``. ``mu`` replaces the shift by ``e^mu``. ``final_sigma`` is the
    appended terminal value (0 for ``final_sigmas_type = "zero"``)."""
    _steps(n)
    big_t = num_train_timesteps
    shift = _exp_mu(mu) if mu is not None else flow_shift
    s = 1.0 - linspace(1.0, 1.0 / big_t, n + 1)
    s = _shift_static(s, shift).flip(0)[:-1]
    timesteps = _truncated(s * big_t)
    sigmas = torch.cat([s, torch.tensor([final_sigma], dtype=F64)])
    return InferenceGrid(_f32_values(sigmas), timesteps, "int64", "flow", mu)


def unipc_flow_grid(
    n: int,
    *,
    flow_shift: float = 1.0,
    num_train_timesteps: int = 1000,
    use_dynamic_shifting: bool = False,
    mu: float | None = None,
    shift_terminal: float | None = None,
    final_sigmas_type: str = "zero",
) -> InferenceGrid:
    """``UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=...).set_timesteps(n, mu=mu)``:
    ``s = linspace(1, 1/T, n + 1)[:-1]``, shifted (static, or exponential time shift with mu),
    stretched to ``shift_terminal``; a first value within 1e-6 of 1 is lowered by 1e-6 (diffusers
    avoids log 0 there); int64 timesteps ``trunc(T s)``."""
    _steps(n)
    if use_dynamic_shifting and mu is None:
        raise ScheduleParameterError("use_dynamic_shifting needs mu (or an image sequence length)")
    big_t = num_train_timesteps
    s = linspace(1.0, 1.0 / big_t, n + 1)[:-1]
    if use_dynamic_shifting:
        s = _shift_dynamic(s, float(mu), "exponential")  # type: ignore[arg-type]
    else:
        s = _shift_static(s, flow_shift)
    if shift_terminal:
        s = _stretch_to_terminal(s, shift_terminal)
    if abs(float(s[0]) - 1) < 1e-6:
        s = s.clone()
        s[0] -= 1e-6
    timesteps = _truncated(s * big_t)
    last = _final(final_sigmas_type, float(s[-1]))
    sigmas = torch.cat([s, torch.tensor([last], dtype=F64)])
    return InferenceGrid(_f32_values(sigmas), timesteps, "int64", "flow", mu)


def _final(final_sigmas_type: str, sigma_min: float) -> float:
    if final_sigmas_type == "zero":
        return 0.0
    if final_sigmas_type == "sigma_min":
        return sigma_min
    raise ScheduleParameterError(
        f"final_sigmas_type must be zero or sigma_min, got {final_sigmas_type!r}"
    )


# --------------------------------------------------------------------------------------------
# EulerDiscreteScheduler on a VP training table
# --------------------------------------------------------------------------------------------


def _cosine_betas(big_t: int, max_beta: float = 0.999) -> list[float]:
    # improved-diffusion's cosine alpha_bar, betas in float64 then stored as float32 (GLIDE)
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return [
        min(1 - alpha_bar((i + 1) / big_t) / alpha_bar(i / big_t), max_beta) for i in range(big_t)
    ]


def diffusers_train_sigmas(
    beta_schedule: str = "linear",
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
    num_train_timesteps: int = 1000,
    trained_betas: Sequence[float] | None = None,
) -> Tensor:
    """The float32 VE sigma table ``sqrt((1 - ab)/ab)`` a diffusers scheduler builds from its betas
    (float32 ``linspace``, float32 cumulative product), shape (T,), dtype float32, ascending."""
    big_t = num_train_timesteps
    if trained_betas is not None:
        betas = torch.tensor(list(trained_betas), dtype=F32)
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, big_t, dtype=F32)
    elif beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, big_t, dtype=F32) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        betas = torch.tensor(_cosine_betas(big_t), dtype=F32)
    else:
        raise ScheduleParameterError(
            f"beta_schedule {beta_schedule!r} has no diffusers grid here; "
            "allowed: linear, scaled_linear, squaredcos_cap_v2 (or trained_betas)"
        )
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def _arange_desc(start: float, step: float) -> Tensor:
    # numpy's arange(start, 0, -step): start + i * delta, delta = (start - step) - start
    count = math.ceil(start / step)
    delta = (start - step) - start
    return start + torch.arange(count, dtype=F64) * delta


def _spaced_timesteps(n: int, big_t: int, spacing: str, steps_offset: int) -> Tensor:
    """EulerDiscrete's float32 timesteps of n steps (linspace / leading / trailing), descending."""
    if spacing == "linspace":
        return linspace(0.0, big_t - 1.0, n).to(F32).flip(0)
    if spacing == "leading":
        ratio = big_t // n
        return (torch.arange(n, dtype=F64) * ratio).round().flip(0).to(F32) + steps_offset
    if spacing == "trailing":
        return _arange_desc(float(big_t), big_t / n).round().to(F32) - 1
    raise ScheduleParameterError(
        f"timestep_spacing must be linspace, leading or trailing, got {spacing!r}"
    )


def _interp(x: Tensor, table: Tensor) -> Tensor:
    """numpy's ``interp(x, arange(T), table)`` in float64: ``slope (x - j) + table[j]``."""
    fp = table.to(F64)
    xs = x.to(F64)
    j = torch.clamp(torch.floor(xs).to(torch.int64), 0, fp.numel() - 2)
    slope = (fp[j + 1] - fp[j]) / 1.0
    out = slope * (xs - j.to(F64)) + fp[j]
    return torch.where(xs >= fp.numel() - 1, fp[-1], out)


def euler_discrete_grid(
    n: int,
    train_sigmas: Tensor,
    *,
    timestep_spacing: str = "linspace",
    steps_offset: int = 0,
    use_karras_sigmas: bool = False,
    use_exponential_sigmas: bool = False,
    use_beta_sigmas: bool = False,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    final_sigmas_type: str = "zero",
) -> InferenceGrid:
    """``EulerDiscreteScheduler(...).set_timesteps(n)`` on the float32 table of
    :func:`diffusers_train_sigmas`: spaced timesteps, sigmas interpolated linearly in t; with a
    karras/exponential/beta conversion the sigmas are re-gridded between the ends (or the config's
    ``sigma_min``/``sigma_max``) and the timesteps interpolated back in log sigma."""
    _steps(n)
    conversion = _conversion(use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas)
    big_t = train_sigmas.numel()
    timesteps = _spaced_timesteps(n, big_t, timestep_spacing, steps_offset).to(F64)
    sigmas = _interp(timesteps, train_sigmas)
    if conversion is not None:
        sigmas = _converted(sigmas, n, conversion, (sigma_min, sigma_max))
        timesteps = sigma_to_timestep(sigmas, train_sigmas.to(F32))
    last = _final(final_sigmas_type, float(train_sigmas[0]))
    sigmas = torch.cat([sigmas, torch.tensor([last], dtype=F64)])
    return InferenceGrid(_f32_values(sigmas), _f32_values(timesteps), "float32", "ve", None)
