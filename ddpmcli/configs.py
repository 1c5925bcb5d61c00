"""Schedule inputs that come from files: diffusers ``scheduler_config.json`` and custom
betas / alpha_bars files, built into a schedule by :func:`build_schedule` (the compare specs that
name schedules in one string are in :mod:`ddpmcli.specs`).

The core never touches files; this module reads them and hands plain numbers to the core
(``make_schedule``, ``schedule_from_betas``, ``rescale_zero_terminal_snr``, ...). No formula is
re-derived here. torch is imported only inside functions (through the core), numpy only for .npy.

diffusers equivalence: diffusers builds its betas in float32 (``torch.linspace`` in float32,
``betas_for_alpha_bar`` rounded to float32) and takes ``alphas_cumprod`` as a float32 cumulative
product. The same named schedule built here in float64 agrees with diffusers' ``alphas_cumprod`` to
float32 precision (a few parts in 1e6 relative, the float32 cumprod's own rounding), and is the
more accurate of the two. ``trained_betas`` are taken as given (in float64).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ddpmcli import limits, scheduler_classes
from ddpmcli.errors import ParameterError, ScheduleError, check_choice, verbatim
from ddpmcli.schedule_files import CUSTOM_SUFFIXES as CUSTOM_SUFFIXES
from ddpmcli.schedule_files import MAX_SCHEDULE_FILE_BYTES as MAX_SCHEDULE_FILE_BYTES
from ddpmcli.schedule_files import What as What
from ddpmcli.schedule_files import load_custom_schedule as load_custom_schedule
from ddpmcli.schedule_files import read_numbers as read_numbers
from ddpmcli.scheduler_classes import FlowSettings

if TYPE_CHECKING:
    from ddpmcli.core import Schedule

# diffusers' beta_schedule names -> core kinds (the core registry's alias table maps
# squaredcos_cap_v2 -> cosine; these four are the ones DDPMScheduler builds).
DIFFUSERS_BETA_SCHEDULES: tuple[str, ...] = (
    "linear",
    "scaled_linear",
    "squaredcos_cap_v2",
    "sigmoid",
)
# Kinds whose core constants include beta_start/beta_end (diffusers ignores them for the cosine).
_USES_BETA_ENDS = ("linear", "scaled_linear", "sigmoid")
# DDPMScheduler's __init__ defaults, used for keys a config leaves out.
DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "variance_type": "fixed_small",
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
}
CONFIG_NAMES: tuple[str, ...] = ("scheduler_config.json", "scheduler/scheduler_config.json")


@dataclass(frozen=True)
class SchedulerConfig:
    """A diffusers scheduler config turned into a core Schedule plus the settings samplers need.

    ``schedule`` has T = ``num_train_timesteps`` steps, 0-based as the model takes them.
    ``raw`` keeps every key of the file (e.g. ``_class_name``, ``thresholding``) untouched.
    ``declared_timesteps`` is the file's own ``num_train_timesteps``, which differs from
    ``num_train_timesteps`` when ``trained_betas`` has another length (``ddpm check`` reports it).
    ``flow``: the settings of a rectified-flow config (FlowMatch classes, ``use_flow_sigmas``);
    then ``schedule`` is the flow's training table and ``beta_schedule`` is ``flow``.
    """

    path: Path
    schedule: Schedule
    beta_schedule: str
    num_train_timesteps: int
    prediction_type: str
    timestep_spacing: str
    steps_offset: int
    rescale_betas_zero_snr: bool
    clip_sample: bool
    clip_sample_range: float
    variance_type: str
    class_name: str | None
    raw: Mapping[str, Any] = field(repr=False)
    declared_timesteps: int | None = None
    flow: FlowSettings | None = None

    def respaced(self, steps: int | str, spacing: str | None = None) -> Schedule:
        """The schedule respaced to ``steps`` inference steps with this config's spacing and
        steps_offset (diffusers' ``set_timesteps``), unless ``spacing`` overrides it."""
        from ddpmcli import core

        return core.respaced(
            self.schedule, steps, spacing or self.timestep_spacing, self.steps_offset
        )


# ---------------------------------------------------------------------------------------------
# diffusers scheduler_config.json


def find_scheduler_config(path: str | Path) -> Path:
    """The config file itself, or ``scheduler_config.json`` / ``scheduler/scheduler_config.json``
    inside a folder (a scheduler folder or a whole pipeline)."""
    p = Path(path)
    if p.is_dir():
        for name in CONFIG_NAMES:
            if (p / name).is_file():
                return p / name
        raise ScheduleError(f"{p}: no {' or '.join(CONFIG_NAMES)} in this folder")
    return limits.check_regular_file(p, "scheduler config", error=ScheduleError)


def _read_json(path: Path) -> Any:
    return limits.read_json(path, "scheduler config", error=ScheduleError)


def _typed(raw: Mapping[str, Any], key: str, kind: type | tuple[type, ...], path: Path) -> Any:
    value = raw.get(key, DIFFUSERS_DEFAULTS.get(key))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) and kind is not bool:
        raise ScheduleError(f"{path}: {key} = {value!r} should be a {_type_name(kind)}")
    if not isinstance(value, kind):
        raise ScheduleError(f"{path}: {key} = {value!r} should be a {_type_name(kind)}")
    return value


def _type_name(kind: type | tuple[type, ...]) -> str:
    names = {bool: "boolean", int: "integer", float: "number", str: "string"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _config_schedule(raw: Mapping[str, Any], file: Path, big_t: int) -> Schedule:
    """The schedule a config's ``trained_betas`` or ``beta_schedule`` (with its beta ends) names,
    before ``rescale_betas_zero_snr``."""
    from ddpmcli import core

    trained = raw.get("trained_betas")
    if trained is not None:
        if not isinstance(trained, list):
            raise ScheduleError(f"{file}: trained_betas should be a list of numbers")
        if not trained:
            raise ScheduleError(f"{file}: trained_betas is empty")
        limits.check_timesteps(len(trained), f"{file}: trained_betas length", error=ScheduleError)
        return core.schedule_from_betas(trained, name="trained_betas")
    beta_schedule = _typed(raw, "beta_schedule", str, file)
    if beta_schedule not in DIFFUSERS_BETA_SCHEDULES:
        raise ScheduleError(
            f"{file}: beta_schedule {beta_schedule!r} is not supported; "
            f"allowed: {', '.join(DIFFUSERS_BETA_SCHEDULES)} (or trained_betas)"
        )
    kind = core.canonical_kind(beta_schedule)
    params: dict[str, float] = {}
    if kind in _USES_BETA_ENDS:
        params["beta_start"] = _typed(raw, "beta_start", float, file)
        params["beta_end"] = _typed(raw, "beta_end", float, file)
    return core.make_schedule(kind, big_t, zero_terminal_snr=False, logsnr_shift=0.0, **params)


def load_scheduler_config(path: str | Path) -> SchedulerConfig:
    """Read a diffusers ``scheduler_config.json`` (or a folder holding one) into the same schedule
    diffusers builds: ``beta_schedule`` linear | scaled_linear | squaredcos_cap_v2 | sigmoid, or
    ``trained_betas``; then ``rescale_betas_zero_snr`` (Lin et al. 2024, Algorithm 1). A
    rectified-flow config (``FlowMatchEulerDiscreteScheduler``, ``use_flow_sigmas``) gives the
    flow's training table; a class ddpm does not model, or a key no scheduler knows, is an error.

    Missing keys take DDPMScheduler's defaults. Any problem with the file -> ScheduleError (exit 1)
    naming the file and the key.
    """
    file = find_scheduler_config(path)
    raw = _read_json(file)
    if not isinstance(raw, dict):
        raise ScheduleError(f"{file}: expected a JSON object of scheduler settings")
    return scheduler_config_from_mapping(raw, file)


def scheduler_config_from_mapping(raw: Mapping[str, Any], file: Path) -> SchedulerConfig:
    """A scheduler config already parsed (a file's, a preset's, the API's ``from_config``);
    ``file`` names it in errors."""
    from ddpmcli import core

    class_name = scheduler_classes.check_class_and_keys(raw, file)
    if scheduler_classes.is_flow_config(raw, class_name):
        return _flow_config(raw, file, class_name)
    big_t = _typed(raw, "num_train_timesteps", int, file)
    limits.check_timesteps(big_t, f"{file}: num_train_timesteps", error=ScheduleError)
    beta_schedule = _typed(raw, "beta_schedule", str, file)
    zsnr = _typed(raw, "rescale_betas_zero_snr", bool, file)
    trained = raw.get("trained_betas")
    try:
        schedule = _config_schedule(raw, file, big_t)
        if zsnr:
            schedule = core.rescale_zero_terminal_snr(schedule)
        prediction_type = core.canonical_prediction_type(_typed(raw, "prediction_type", str, file))
    except ScheduleError as exc:
        message = str(exc)
        raise ScheduleError(
            message if message.startswith(str(file)) else f"{file}: {message}"
        ) from None

    spacing = _typed(raw, "timestep_spacing", str, file)
    if spacing not in core.SPACINGS:
        raise ScheduleError(
            f"{file}: timestep_spacing {spacing!r} is not supported; "
            f"allowed: {', '.join(core.SPACINGS)}"
        )
    steps_offset = _typed(raw, "steps_offset", int, file)
    if steps_offset < 0:
        raise ScheduleError(f"{file}: steps_offset = {steps_offset} must be >= 0")
    return SchedulerConfig(
        path=file,
        schedule=schedule,
        beta_schedule="trained_betas" if trained is not None else beta_schedule,
        num_train_timesteps=schedule.num_train_timesteps,
        prediction_type=prediction_type,
        timestep_spacing=spacing,
        steps_offset=steps_offset,
        rescale_betas_zero_snr=zsnr,
        clip_sample=_typed(raw, "clip_sample", bool, file),
        clip_sample_range=_typed(raw, "clip_sample_range", float, file),
        variance_type=str(raw.get("variance_type") or DIFFUSERS_DEFAULTS["variance_type"]),
        class_name=raw.get("_class_name"),
        raw=dict(raw),
        declared_timesteps=big_t,
    )


def _flow_config(raw: Mapping[str, Any], file: Path, class_name: str) -> SchedulerConfig:
    """A rectified-flow config: its settings and its training table (unshifted where the shift
    waits for a resolution)."""
    from ddpmcli import core

    flow = scheduler_classes.flow_settings(raw, class_name, file)
    limits.check_timesteps(
        flow.num_train_timesteps, f"{file}: num_train_timesteps", error=ScheduleError
    )
    try:
        schedule = scheduler_classes.training_schedule(flow, None)
        prediction_type = core.canonical_prediction_type(
            _typed({"prediction_type": "flow", **raw}, "prediction_type", str, file)
        )
    except ScheduleError as exc:
        raise ScheduleError(f"{file}: {exc}") from None
    return SchedulerConfig(
        path=file,
        schedule=schedule,
        beta_schedule="flow",
        num_train_timesteps=flow.num_train_timesteps,
        prediction_type=prediction_type,
        timestep_spacing="linspace",
        steps_offset=0,
        rescale_betas_zero_snr=False,
        clip_sample=False,
        clip_sample_range=1.0,
        variance_type="fixed_small",
        class_name=class_name,
        raw=dict(raw),
        declared_timesteps=flow.num_train_timesteps,
        flow=flow,
    )


# ---------------------------------------------------------------------------------------------
# building a schedule from options (shared by the commands and by compare specs)


@dataclass
class ScheduleRequest:
    """Everything that picks a schedule on the command line or in a compare spec.

    Exactly one source: ``kind`` (a core kind or alias, or ``custom`` with a betas/alpha_bars file),
    ``from_file`` (a diffusers config, or a preset's name: :mod:`ddpmcli.presets`), ``from_config``
    (a config already parsed). Transforms apply in order: zero terminal SNR, log-SNR shift,
    respacing to ``steps`` (a flow config's ``steps`` is its scheduler's own inference grid).
    ``mu``, ``image_seq_len``, ``resolution``: the dynamic shift of a flow, given or as a
    pipeline computes it from the image size (``resolution`` px square: (res/16)^2 tokens).
    """

    kind: str | None = None
    timesteps: int | None = None
    params: dict[str, float] = field(default_factory=dict)
    from_file: str | None = None
    betas_file: str | None = None
    alpha_bars_file: str | None = None
    zero_terminal_snr: bool = False
    logsnr_shift: float = 0.0
    steps: str | None = None
    spacing: str | None = None
    steps_offset: int | None = None
    from_config: Mapping[str, Any] | None = None
    mu: float | None = None
    image_seq_len: int | None = None
    resolution: int | None = None


@dataclass(frozen=True)
class BuiltSchedule:
    """A schedule with where it came from: the diffusers config (if any), whether respaced, and
    a flow's dynamic shift (``mu``, from ``image_seq_len`` when that was given)."""

    schedule: Schedule
    config: SchedulerConfig | None = None
    respaced: bool = False
    mu: float | None = None
    image_seq_len: int | None = None


def _check_request(request: ScheduleRequest) -> str | None:
    """Refuse conflicting schedule choices (ParameterError naming the parameters, exit 2) before
    any file is read; the kind, lower-cased, or None."""
    from ddpmcli import core

    sources = ("from_file", "from_config", "betas_file", "alpha_bars_file")
    given = ["{" + name + "}" for name in sources if getattr(request, name) is not None]
    if len(given) > 1:
        raise ParameterError(f"{' and '.join(given)} cannot be used together")
    kind = (request.kind or "").strip().lower() or None
    file_given = request.betas_file is not None or request.alpha_bars_file is not None
    if file_given and kind not in (None, "custom"):
        raise ParameterError(
            f"{given[0]} builds a custom schedule; it cannot be combined with "
            f"{{kind}} {verbatim(kind)}"
        )
    if kind == "custom" and not file_given:
        raise ParameterError("{kind} custom needs {betas_file} FILE or {alpha_bars_file} FILE")
    config_given = request.from_file is not None or request.from_config is not None
    if config_given and kind is not None:
        name = "{from_file}" if request.from_file is not None else "{from_config}"
        raise ParameterError(f"{name} and {{kind}} {verbatim(kind)} cannot be used together")
    if config_given and set(request.params) == {"mu"}:
        # the one parameter a config leaves open: the dynamic shift of a flow
        request.mu, request.params = request.params["mu"], {}
    if (config_given or file_given) and (request.timesteps is not None or request.params):
        what = "{timesteps}" if request.timesteps is not None else "schedule parameters"
        raise ParameterError(
            f"{what} cannot be combined with {given[0]} (the file fixes the schedule)"
        )
    for name in ("steps_offset", "spacing"):
        if getattr(request, name) is not None and request.steps is None:
            raise ParameterError(f"{{{name}}} needs {{steps}}")
    scheduler_classes.check_image_size(request)
    if request.spacing is not None:
        check_choice(request.spacing, core.SPACINGS, "spacing")
    return kind


def _preset_request(request: ScheduleRequest) -> tuple[ScheduleRequest, str]:
    """``from_file`` naming a preset (``sd3``, ``flux@1024``; a file of that name wins) becomes
    the preset's config or kind; the origin names it in errors."""
    from ddpmcli import presets

    source = request.from_file
    found = None if source is None or Path(source).exists() else presets.parse(source)
    if found is None:
        return request, "from_config" if source is None else source
    preset, resolution = found
    if request.timesteps is not None or set(request.params) - {"mu"}:
        raise ParameterError(
            f"{{from_file}} {preset.name} fixes the schedule; drop {{timesteps}}/--param"
        )
    if resolution is not None and (
        request.resolution is not None or request.image_seq_len is not None
    ):
        raise ParameterError(f"{{from_file}} {source} gives the resolution; drop {{resolution}}")
    if preset.config is None:
        steps, timesteps = request.steps, preset.timesteps
        if preset.steps_set_timesteps and steps is not None and steps.strip().isdigit():
            timesteps, steps = int(steps), None  # N steps: the kind's own N-point grid
        spacing = request.spacing or (preset.spacing if steps is not None else None)
        return replace(
            request,
            from_file=None,
            kind=preset.kind,
            timesteps=timesteps,
            params=dict(preset.params),
            steps=steps,
            spacing=spacing,
        ), preset.name
    open_shift = request.mu is None and "mu" not in request.params and request.image_seq_len is None
    default = (
        preset.resolution if preset.config.get("use_dynamic_shifting") and open_shift else None
    )
    return replace(
        request,
        from_file=None,
        from_config=preset.config,
        resolution=resolution or request.resolution or default,
    ), preset.name


def _config_of(request: ScheduleRequest, origin: str) -> SchedulerConfig:
    if request.from_config is not None:
        if not isinstance(request.from_config, Mapping):
            raise ParameterError("{from_config} must be a mapping of scheduler settings")
        return scheduler_config_from_mapping(request.from_config, Path(origin))
    return load_scheduler_config(str(request.from_file))


def _flow_built(request: ScheduleRequest, config: SchedulerConfig) -> BuiltSchedule:
    """A flow config's schedule: its inference grid with ``steps``, else its training table."""
    flow = config.flow
    if flow is None:
        raise ScheduleError(f"{config.path}: not a flow scheduler config")
    if request.zero_terminal_snr or request.logsnr_shift:
        raise ParameterError(
            f"{verbatim(config.path)} is a flow; {{zero_terminal_snr}} and {{logsnr_shift}} "
            "apply to VP schedules (a flow's shift moves its log-SNR)"
        )
    if request.spacing is not None or request.steps_offset is not None:
        raise ParameterError(
            f"{verbatim(config.path)} is a flow scheduler ({flow.class_name}): its --steps grid is "
            "the scheduler's own; {spacing} and {steps_offset} do not apply"
        )
    tokens = scheduler_classes.image_tokens(request)
    mu = scheduler_classes.mu_of(flow, request.mu, tokens)
    if request.steps is None:
        return BuiltSchedule(
            scheduler_classes.training_schedule(flow, mu), config, False, mu, tokens
        )
    steps = request.steps.strip()
    if not steps.isdigit() or int(steps) < 1:
        raise ParameterError(f"{{steps}} of a flow scheduler must be a step count, got {steps!r}")
    limits.check_timesteps(int(steps), "{steps}", error=ParameterError)
    grid = scheduler_classes.inference_grid(flow, int(steps), mu)
    try:
        schedule = scheduler_classes.grid_schedule(grid, f"{config.path}:steps={steps}")
    except ScheduleError as exc:
        settings = [f"shift {flow.shift:g}"]
        if flow.shift_terminal:
            settings.append(f"shift_terminal {flow.shift_terminal:g}")
        if mu is not None:
            settings.append(f"mu {mu:g}")
        raise ScheduleError(
            f"{config.path}: the {steps}-step grid of these settings ({', '.join(settings)}) "
            f"is not a noise schedule: {exc}"
        ) from None
    return BuiltSchedule(schedule, config, True, mu, tokens)


def build_schedule(request: ScheduleRequest) -> BuiltSchedule:
    """Turn a request into a schedule through the core, rejecting conflicting choices first."""
    request, origin = _preset_request(request)
    kind = _check_request(request)
    if request.from_file is not None or request.from_config is not None:
        config = _config_of(request, origin)
        if config.flow is not None:
            return _flow_built(request, config)
        if request.mu is not None or scheduler_classes.image_tokens(request) is not None:
            raise ParameterError(
                f"{verbatim(config.path)} is not a flow with dynamic shifting; "
                "{mu}, {resolution} and {image_seq_len} do not apply"
            )
        return _finish(request, config.schedule, config)
    if request.betas_file is not None:
        return _finish(request, load_custom_schedule(request.betas_file, "betas"), None)
    if request.alpha_bars_file is not None:
        return _finish(request, load_custom_schedule(request.alpha_bars_file, "alpha_bars"), None)
    return _kind_built(request, kind)


def _kind_built(request: ScheduleRequest, kind: str | None) -> BuiltSchedule:
    """A registry kind's schedule; the kind flow as FlowMatchEulerDiscreteScheduler settings
    (--steps N is its grid, and `ddpm check` lints that grid)."""
    from ddpmcli import core

    timesteps = 1000 if request.timesteps is None else request.timesteps
    limits.check_timesteps(timesteps, "{timesteps}", error=ParameterError)
    params = dict(request.params)
    for name in set(params) & {"zero_terminal_snr", "logsnr_shift"}:
        # make_schedule's own keywords: as a kind parameter the name reached it twice (TypeError)
        raise ParameterError(
            f"{name} is not a parameter of schedule {kind or 'linear'} but a transform of any "
            f"schedule: use {{{name}}}"
        )
    tokens = scheduler_classes.image_tokens(request)
    if tokens is not None or request.mu is not None:
        params.update(scheduler_classes.kind_shift(kind or "linear", request.mu, tokens, params))
    schedule = core.make_schedule(
        kind or "linear", timesteps, zero_terminal_snr=False, logsnr_shift=0.0, **params
    )
    if schedule.spec.get("kind") != "flow":
        return _finish(request, schedule, None)
    settings = scheduler_classes.kind_flow_settings(params, timesteps)
    kind_mu = params.get("mu") if settings.dynamic else None
    config = SchedulerConfig(**{**_FLOW_KIND_CONFIG, "schedule": schedule, "flow": settings})
    if _scheduler_steps(request) is not None:
        kind_request = replace(request, mu=kind_mu, image_seq_len=None, resolution=None)
        return _flow_built(kind_request, config)
    return _finish(request, schedule, config, kind_mu)


def _finish(
    request: ScheduleRequest,
    schedule: Schedule,
    config: SchedulerConfig | None,
    mu: float | None = None,
) -> BuiltSchedule:
    """The transforms (zero terminal SNR, log-SNR shift) and the respacing, in that order; an
    Euler config's sigma grid instead of a respacing."""
    from ddpmcli import core

    if request.zero_terminal_snr:
        if config is not None and config.rescale_betas_zero_snr:
            raise ParameterError(
                f"{verbatim(config.path)} already sets rescale_betas_zero_snr; "
                "drop {zero_terminal_snr}"
            )
        schedule = core.rescale_zero_terminal_snr(schedule)
    if request.logsnr_shift:
        schedule = core.shift_logsnr(schedule, request.logsnr_shift)
    grid = _sigma_grid(request, config)
    if grid is not None:
        return BuiltSchedule(schedule=grid, config=config, respaced=True)
    if request.steps is not None:
        spacing = spacing_of(request.spacing, config)
        offset = request.steps_offset
        if offset is None:
            offset = config.steps_offset if config else 0
        steps: int | str = int(request.steps) if request.steps.strip().isdigit() else request.steps
        schedule = core.respaced(schedule, steps, spacing, offset)
    return BuiltSchedule(schedule, config, request.steps is not None, mu)


def spacing_of(spacing: str | None, config: SchedulerConfig | None) -> str:
    """The one rule for how ``--steps N`` is spread (schedule, compare, posterior, check and
    sample alike): the spacing asked for, else the config's own ``timestep_spacing`` (a config
    without the key has diffusers' default, leading), else ``trailing``, which visits t = T-1
    (:data:`ddpmcli.choices.DEFAULT_SPACING`)."""
    from ddpmcli.choices import DEFAULT_SPACING

    return spacing or (config.timestep_spacing if config else DEFAULT_SPACING)


def _sigma_grid(request: ScheduleRequest, config: SchedulerConfig | None) -> Schedule | None:
    """An Euler config's karras/exponential/beta grid of ``steps`` (None where none applies)."""
    if config is None or request.steps is None or not request.steps.strip().isdigit():
        return None
    grid = scheduler_classes.euler_sigma_grid(config.raw, config.path, int(request.steps))
    if grid is not None and (
        request.zero_terminal_snr or request.logsnr_shift or request.spacing is not None
    ):
        raise ParameterError(
            f"{verbatim(config.path)} samples on its own sigma grid; {{zero_terminal_snr}}, "
            "{logsnr_shift} and {spacing} do not apply to it"
        )
    return grid


_FLOW_KIND_CONFIG: dict[str, Any] = {
    "path": Path("flow"),
    "beta_schedule": "flow",
    "num_train_timesteps": 0,
    "prediction_type": "flow",
    "timestep_spacing": "linspace",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "variance_type": "fixed_small",
    "class_name": "FlowMatchEulerDiscreteScheduler",
    "raw": {},
}


def _scheduler_steps(request: ScheduleRequest) -> int | None:
    """A step count to take as a scheduler's own grid: --steps N without --spacing/--steps-offset
    (with them, the training table is respaced as they say)."""
    if request.steps is None or request.spacing is not None or request.steps_offset is not None:
        return None
    return int(request.steps) if request.steps.strip().isdigit() else None
