"""The solver side of :func:`ddpmcli.sample`: the grid a sampler runs (respacings, the sigma
grids ``karras``/``exponential``/``beta``/``lu``, an explicit list of sigmas), the solver options
as the library names them, and the sampler a diffusers folder's own scheduler config implies.

Kept apart from :mod:`ddpmcli.api` (which calls it) so that module stays one screenful per
command.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ddpmcli import core
from ddpmcli.checkpoints import LoadedModel
from ddpmcli.choices import DEFAULT_SPACING, SIGMA_SPACINGS, SPACINGS
from ddpmcli.errors import ParameterError
from ddpmcli.run.samplers import respaced_schedule
from ddpmcli.run.solver_grid import grid_schedule, sigma_grid, table_timesteps
from ddpmcli.run.step_sweep import SweepResult

__all__ = [
    "FINAL_SIGMAS_TYPES",
    "MULTISTEP",
    "SOLVER_OPTION_NAMES",
    "own_scheduler",
    "parse_sampler_spec",
    "resolve_sampler",
    "sampling_schedule",
    "sampling_spacing",
    "solver_options",
    "solver_schedule",
    "step_sweep",
]

FINAL_SIGMAS_TYPES = ("zero", "sigma_min")
MULTISTEP = ("dpmpp-2m", "dpmpp-3m", "dpmpp-2m-sde", "unipc")
"""Samplers whose sigma grids call the model at whole timesteps (diffusers rounds them)."""

_OPTION_NAMES = (
    "order", "solver_type", "lower_order_final", "euler_at_final", "final_sigmas_type",
    "corrector", "s_churn", "s_tmin", "s_tmax", "s_noise", "stochastic", "dpm_form",
)  # fmt: skip
SOLVER_OPTION_NAMES = _OPTION_NAMES
"""The library's solver options (:func:`solver_options`), as a sampler spec names them."""


def solver_options(model: LoadedModel, options: Mapping[str, Any]) -> dict[str, Any]:
    """The :class:`~ddpmcli.run.SampleSettings` fields of the library's solver options:
    ``final_sigmas_type`` (``zero`` or ``sigma_min``, diffusers' names) becomes ``final_sigma``,
    the EDM sigma of the model's first training timestep or 0. An unknown name is a
    :class:`ParameterError`."""
    out: dict[str, Any] = {}
    for name, value in options.items():
        if name not in _OPTION_NAMES:
            raise ParameterError(
                f"unknown solver option {name!r}; allowed: {', '.join(_OPTION_NAMES)}"
            )
        if name == "final_sigmas_type":
            if value not in FINAL_SIGMAS_TYPES:
                raise ParameterError(
                    f"{{final_sigmas_type}} {value!r} is unknown; allowed: zero, sigma_min"
                )
            out["final_sigma"] = float(model.schedule.sigma[0]) if value == "sigma_min" else 0.0
            if not math.isfinite(out["final_sigma"]):  # a flow trained with -T 1: s = 1 only
                raise ParameterError(
                    "{final_sigmas_type} sigma_min: the model's smallest training sigma is "
                    f"{out['final_sigma']} (its only timestep is pure noise); use zero"
                )
        elif value is not None or name in ("order", "solver_type"):
            out[name] = value
    return out


_OPTION_TYPES: dict[str, Any] = {
    "order": int, "s_churn": float, "s_tmin": float, "s_tmax": float, "s_noise": float,
    "lower_order_final": bool, "euler_at_final": bool, "corrector": bool, "stochastic": bool,
}  # fmt: skip
_OPTION_ALIASES = {"final_sigmas": "final_sigmas_type"}
_TRUE, _FALSE = ("true", "on", "yes", "1"), ("false", "off", "no", "0")


def parse_sampler_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``NAME[:OPTION=VALUE...]`` (``dpmpp-3m:dpm-form=exact``, ``euler:s-churn=1:s-tmax=5``) as
    (sampler name, solver options): one sampler with its own options, so a sweep can put variants
    of one solver side by side. Options are :func:`solver_options`' names (``-`` or ``_``);
    values are typed as the library takes them (bool: true/false/on/off)."""
    name, *parts = spec.split(":")
    options: dict[str, Any] = {}
    for part in parts:
        key, eq, text = part.partition("=")
        key = key.strip().replace("-", "_")
        key = _OPTION_ALIASES.get(key, key)
        if not eq or key not in _OPTION_NAMES:
            raise ParameterError(
                f"{{samplers}} {spec!r}: {part!r} is not OPTION=VALUE with an option of "
                f"{', '.join(_OPTION_NAMES)}"
            )
        if key in options:
            raise ParameterError(f"{{samplers}} {spec!r} gives {key} twice")
        options[key] = _typed(spec, key, text.strip())
    return name.strip(), options


def _typed(spec: str, key: str, text: str) -> Any:
    kind = _OPTION_TYPES.get(key, str)
    if kind is str:
        return text
    if kind is bool:
        if text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
    else:
        try:
            return kind(text)
        except ValueError:
            pass
    what = {int: "a whole number", float: "a number", bool: "true or false"}[kind]
    raise ParameterError(f"{{samplers}} {spec!r}: {key}={text!r} must be {what}")


def sampling_spacing(model: LoadedModel, spacing: str | None = None) -> tuple[str, int]:
    """The spacing and offset :func:`ddpmcli.sample` respaces with: ``spacing``, else the
    checkpoint's own (a diffusers scheduler's ``timestep_spacing``), else ``trailing`` (it
    visits t = T-1); with the checkpoint's ``steps_offset`` (diffusers adds it under leading
    spacing)."""
    own = model.info.get("scheduler_timestep_spacing")
    chosen = spacing or (own if own in SPACINGS else DEFAULT_SPACING)
    return chosen, int(model.info.get("scheduler_steps_offset") or 0)


def sampling_schedule(
    model: LoadedModel,
    steps: int | str | None,
    spacing: str | None = None,
    sampler: str = "ddpm",
    sigmas: Sequence[float] | None = None,
    whole: bool | None = None,
    timesteps: Sequence[int] | None = None,
) -> core.Schedule:
    """The schedule :func:`ddpmcli.sample` runs: the model's, respaced to ``steps`` (a count or
    a section string such as ``ddim50``; None: all T) as :func:`sampling_spacing` says, a sigma
    grid (:func:`solver_schedule`), or the model's own entries at explicit ``timesteps`` (which
    then replace the others)."""
    if timesteps is not None:
        return timestep_grid(model.schedule, timesteps)
    how, offset = sampling_spacing(model, spacing)
    return solver_schedule(model, steps, how, offset, sampler, sigmas, whole)


def resolve_sampler(
    model: LoadedModel,
    sampler: str | None,
    spacing: str | None,
    grid: str | Sequence[float] | None,
    solver: Mapping[str, Any],
    *,
    timesteps: bool = False,
) -> tuple[str, str | None, list[float] | None, dict[str, Any], str | None]:
    """(sampler, spacing, explicit sigmas, solver options, note) of :func:`ddpmcli.sample`'s
    arguments: ``grid`` is a spacing or a list of sigmas; with no ``sampler``, a diffusers
    folder's own scheduler (and its spacing and options) where ddpm has it, with a note saying
    so, else ``ddpm``. ``timesteps``: an explicit list of timesteps decides the grid (the note
    then names no spacing, as with a given ``spacing`` or list of sigmas)."""
    sigmas: list[float] | None = None
    if grid is not None:
        if spacing is not None:
            raise ParameterError("{grid} and {spacing} cannot be used together")
        if isinstance(grid, str):
            spacing = grid
        else:
            sigmas = [float(v) for v in grid]
    if sampler is not None:
        return sampler, spacing, sigmas, dict(solver), None
    own = own_scheduler(model)
    if own is None:
        return "ddpm", spacing, sigmas, dict(solver), None
    name, options, own_spacing, words = own
    if own_spacing and (spacing is not None or sigmas is not None or timesteps):
        # the user's grid is run, not the folder's: the note named its spacing all the same
        words, own_spacing = words.replace(f" --spacing {own_spacing}", ""), None
    note: str | None = f"sampling with the folder's own scheduler: {words} (--sampler overrides)"
    if name == "ddpm" and not options and own_spacing is None:
        note = None  # what sample always did: nothing to say
    return name, spacing or own_spacing, sigmas, {**options, **solver}, note


def solver_schedule(
    model: LoadedModel,
    steps: int | str | None,
    spacing: str,
    offset: int,
    sampler: str,
    sigmas: Sequence[float] | None = None,
    whole: bool | None = None,
) -> core.Schedule:
    """The schedule ``sampler`` runs: explicit EDM ``sigmas`` (descending or not, no final 0),
    ``steps`` noise levels of a sigma ``spacing`` between the model's smallest and largest sigma,
    or the model's schedule respaced (``leading``/``trailing``/``linspace``, ``offset``). On a
    sigma grid the model's timesteps are interpolated in log sigma on its training table
    (diffusers' ``_sigma_to_t``), whole for the multistep solvers as diffusers rounds them
    (``whole`` None; True/False: for every sampler)."""
    whole = sampler in MULTISTEP if whole is None else whole
    if sigmas is not None:
        values = torch.as_tensor(list(sigmas), dtype=torch.float64)
        return grid_schedule(
            model.schedule, values, _timesteps_of(model.schedule, values, whole), name="sigmas"
        )
    if spacing in SIGMA_SPACINGS:
        count = _count(steps, spacing)
        return sigma_grid(model.schedule, count, spacing, whole_timesteps=whole)
    return respaced_schedule(model.schedule, steps, spacing, offset)


def timestep_grid(schedule: core.Schedule, timesteps: Sequence[int]) -> core.Schedule:
    """``schedule`` at an explicit list of its own timesteps (diffusers' custom ``timesteps``; any
    order, run from the largest down): whole numbers in 0..T-1, each once."""
    try:  # (a str, a number: not a list of timesteps; "999,0" was read char by char)
        values = None if isinstance(timesteps, str | bytes) else list(timesteps)
    except TypeError:
        values = None
    if values is None:
        raise ParameterError(
            f"{{timesteps}} must be a list of whole numbers (the model's own), got {timesteps!r}"
        )
    if not values:
        raise ParameterError("{timesteps}: give at least one timestep")
    for v in values:
        if isinstance(v, bool) or not float(v).is_integer():
            raise ParameterError(f"{{timesteps}} must be whole numbers, got {v!r}")
    ints = [int(v) for v in values]
    big_t = schedule.num_steps
    outside = [t for t in ints if not 0 <= t < big_t]
    if outside:
        raise ParameterError(f"{{timesteps}} {outside[0]} is outside the model's 0..{big_t - 1}")
    repeated = sorted({t for t in ints if ints.count(t) > 1})
    if repeated:
        raise ParameterError(
            f"{{timesteps}} repeats t = {repeated[0]}; each step needs its own noise level"
        )
    return core.respace(schedule, ints)


def _count(steps: int | str | None, spacing: str) -> int:
    text = str(steps).strip() if steps is not None else ""
    if not text.isdigit() or int(text) < 1:
        raise ParameterError(f"{{spacing}} {spacing} needs {{steps}} N (a count >= 1), got {steps}")
    return int(text)


def _timesteps_of(train: core.Schedule, sigmas: torch.Tensor, whole: bool) -> torch.Tensor:
    from ddpmcli.core import grids

    if not bool(torch.isfinite(sigmas).all()) or bool((sigmas <= 0).any()):
        raise ParameterError("{sigmas} must be finite and > 0")
    table = train.sigma.to(torch.float64)
    lo, hi = float(table[0]), float(table[-1])
    outside = [v for v in sigmas.tolist() if not lo <= v <= hi]
    if outside:  # the model was never trained there (and the timesteps would clamp and repeat)
        raise ParameterError(
            f"{{sigmas}} {outside[0]:g} is outside the model's sigma range [{lo:.6g}, {hi:.6g}]"
        )
    ts = grids.sigma_to_timestep(sigmas, table)
    return table_timesteps(train, torch.round(ts) if whole else ts)


# diffusers' scheduler classes ddpm has, and the sampler each is
_OWN = {
    "DDPMScheduler": "ddpm",
    "DDIMScheduler": "ddim",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler-a",
    "HeunDiscreteScheduler": "heun",
    "UniPCMultistepScheduler": "unipc",
    "FlowMatchEulerDiscreteScheduler": "flow-euler",
}


def own_scheduler(model: LoadedModel) -> tuple[str, dict[str, Any], str | None, str] | None:
    """(sampler, solver options, sigma spacing or None, description) of a diffusers folder's own
    scheduler config where ddpm has that scheduler, else None."""
    path = model.info.get("scheduler_config")
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            raw = json.load(fh)
    except (OSError, ValueError):
        return None
    name = raw.get("_class_name")
    options: dict[str, Any] = {}
    if name == "DPMSolverMultistepScheduler":
        if raw.get("algorithm_type", "dpmsolver++") not in ("dpmsolver++", "sde-dpmsolver++"):
            return None
        order = int(raw.get("solver_order", 2))
        sde = raw.get("algorithm_type") == "sde-dpmsolver++"
        sampler = "dpmpp-2m-sde" if sde else ("dpmpp-3m" if order == 3 else "dpmpp-2m")
        options = {"order": order if order == 1 else None, "solver_type": raw.get("solver_type")}
        options.update(_final_options(raw))
    elif name in _OWN:
        sampler = _OWN[name]
        if name == "UniPCMultistepScheduler":
            options = {
                "order": int(raw.get("solver_order", 2)),
                "solver_type": raw.get("solver_type"),
            }
            options.update(_final_options(raw, euler=False))
    else:
        return None
    spacing = _sigma_spacing_of(raw)
    words = f"{name} -> --sampler {sampler}" + (f" --spacing {spacing}" if spacing else "")
    return sampler, {k: v for k, v in options.items() if v is not None}, spacing, words


def _final_options(raw: Mapping[str, Any], euler: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {
        "lower_order_final": bool(raw.get("lower_order_final", True)),
        "final_sigmas_type": raw.get("final_sigmas_type", "zero") or "zero",
    }
    if euler:
        out["euler_at_final"] = bool(raw.get("euler_at_final", False))
    return out


def _sigma_spacing_of(raw: Mapping[str, Any]) -> str | None:
    for key, spacing in (
        ("use_karras_sigmas", "karras"), ("use_exponential_sigmas", "exponential"),
        ("use_beta_sigmas", "beta"), ("use_lu_lambdas", "lu"),
    ):  # fmt: skip
        if raw.get(key):
            return spacing
    return None


def step_sweep(
    model: LoadedModel,
    samplers: Sequence[str],
    steps: Sequence[int],
    *,
    n: int = 256,
    seed: int = 0,
    spacing: str | None = None,
    clip: bool = False,
    exact: Any = None,
    reference_sampler: str = "unipc",
    reference_steps: int | None = None,
    batch_size: int | None = None,
    ranks: Any = None,
    denoiser: Any = "checkpoint",
    data: Any = None,
) -> SweepResult:
    """How many steps: one row per (sampler, steps) from the same x_T against a reference
    (:func:`ddpmcli.run.step_sweep.step_sweep`; the numbers of `ddpm steps`), every sampler on
    one grid rule and the one loaded model (no reloading). A sampler may carry its own solver
    options (:func:`parse_sampler_spec`: ``dpmpp-3m:dpm-form=exact``, ``unipc:order=3``); the
    rows name it as given. ``spacing``: as
    :func:`ddpmcli.sample` takes it (None: :func:`sampling_spacing`'s rule, the checkpoint's own
    timestep spacing, else trailing); the result's ``spacing`` says which ran. ``exact``:
    ``x_T -> samples`` where the exact solution is known; else a converged run of
    ``reference_sampler`` at ``reference_steps`` steps (None: 500, at most T on a table
    spacing; more than every count of ``steps``), checked by halving. On a latent model
    ``rms_error_range`` is None: its samples are latents, whose range is not the data's.
    ``ranks``: a torchrun process group (the CLI's): each run steps this rank's share of the
    samples and gathers them, so every rank builds the one-process rows; None: one process.
    ``denoiser``: ``checkpoint`` (the model's network), or ``optimal`` (or an
    :class:`~ddpmcli.run.OptimalDenoiser`): every run, the reference included, samples the
    Bayes-optimal denoiser of ``data`` (a built-in Gaussian mixture such as ``gmm``, a data
    file, or by default the checkpoint's reference samples: a finite set) in float64 on the
    model's schedule, so the rows measure the samplers' error alone against a converged solve of
    that exact ODE (its remaining error printed); ``data_distance`` is then to those data."""
    from ddpmcli.api import sample_settings
    from ddpmcli.run.step_sweep import check_lists, optimal_model
    from ddpmcli.run.step_sweep import step_sweep as sweep

    check_lists(samplers, steps)
    specs = {spec: parse_sampler_spec(spec) for spec in (*samplers, reference_sampler)}
    _same_runs(samplers, specs)

    def settings_for(spec: str) -> Any:
        name, options = specs[spec]
        return sample_settings(model, n, name, clip=clip, **options)

    for spec in specs:
        settings_for(spec)  # unknown names and options: one error, before any run
    how = sampling_spacing(model, spacing)[0]
    if exact is None:
        reference_steps = _reference_steps(model, how, steps, reference_steps)

    def grid(spec: str, count: int) -> core.Schedule:
        # fractional timesteps for all: one grid whatever the sampler, no repeats at many steps
        return sampling_schedule(model, count, how, specs[spec][0], whole=False)

    predict: Any = model.predict
    schedule_for: Any = grid
    kind, dtype, points = model.prediction_type, model.dtype, None
    exact_model = _optimal_denoiser(model, denoiser, data, seed)
    if exact_model is not None:
        optimal, points = exact_model
        predict, schedule_for = optimal_model(optimal.to(model.device), grid)
        kind, dtype = "sample", torch.float64
    result = sweep(
        predict,
        schedule_for,
        kind,
        model.data_shape,
        samplers=samplers,
        steps=steps,
        settings_for=settings_for,
        n=n,
        seed=seed,
        exact=exact,
        reference_sampler=reference_sampler,
        reference_steps=reference_steps or 0,
        data=model.reference_samples if points is None else points,
        data_range=None if model.latent is not None else model.data_range,
        run_options={
            "device": model.device, "model_dtype": dtype, "batch_size": batch_size,
            "ranks": ranks,
        },
    )  # fmt: skip
    result.spacing = how
    return result


def _same_runs(samplers: Sequence[str], specs: Mapping[str, tuple[str, dict[str, Any]]]) -> None:
    """Two entries that are one run (``heun:s_churn=1`` and ``heun:s-churn=1.0``) are refused,
    as a repeated name is: the same rows twice."""
    seen: dict[Any, str] = {}
    for spec in samplers:
        name, options = specs[spec]
        key = (name, tuple(sorted(options.items())))
        if key in seen:
            raise ParameterError(
                f"{{samplers}} lists {seen[key]!r} and {spec!r}, the same run; give it once"
            )
        seen[key] = spec


def _reference_steps(model: LoadedModel, how: str, steps: Sequence[int], given: int | None) -> int:
    """The converged reference's step count: ``given``, else 500 (at most T on a table
    spacing); finer than every run it judges, and one the spacing can make."""
    big_t, table = model.schedule.num_steps, how not in SIGMA_SPACINGS
    count = given if given is not None else (min(500, big_t) if table else 500)
    if table and count > big_t:
        raise ParameterError(
            f"{{reference_steps}} {count} is more than the model's T = {big_t} training "
            f"timesteps, the most {{spacing}} {how} can make (fewer, or a sigma spacing: karras)"
        )
    if count <= max(steps):
        raise ParameterError(
            f"{{reference_steps}} {count} must exceed every {{steps}} count (the reference "
            f"judges them; the largest is {max(steps)})"
        )
    return count


def _optimal_denoiser(model: LoadedModel, denoiser: Any, data: Any, seed: int) -> Any:
    """(the optimal denoiser, its data points or None) of :func:`step_sweep`'s ``denoiser``, or
    None for the checkpoint's own network."""
    from ddpmcli.choices import SWEEP_DENOISERS
    from ddpmcli.run import OptimalDenoiser, reconstruction_data

    if isinstance(denoiser, OptimalDenoiser):
        return denoiser, None
    if denoiser not in SWEEP_DENOISERS:
        raise ParameterError(
            f"{{denoiser}} {denoiser!r} is unknown; allowed: {', '.join(SWEEP_DENOISERS)}"
        )
    if denoiser == "checkpoint":
        if data is not None:
            raise ParameterError("{data} is the optimal denoiser's data: give {denoiser} optimal")
        return None
    picked = reconstruction_data(model, data, n=None, seed=seed, compare_optimal=True)
    return picked.optimal, picked.x0
