"""Which diffusers scheduler configs ddpm models, and the flow settings and inference grids of them.

A config names its class (``_class_name``). ddpm models:
- the VP classes, which all build the same beta table from ``beta_schedule``/``trained_betas``
  (DDPM, DDIM, PNDM, Euler, DPM-Solver, UniPC, ...): read by :mod:`ddpmcli.configs` as always;
- rectified flow: ``FlowMatchEulerDiscreteScheduler`` / ``FlowMatchHeunDiscreteScheduler`` (SD3,
  Flux, LTX, CogView4), and a VP multistep class with ``use_flow_sigmas`` (SANA, Wan).
Any other class (EDM, VE-SDE, consistency, discrete-token schedulers) is an error: its table is
not a beta table, and reading it as one printed a made-up schedule. A key that no diffusers
scheduler knows is an error too (a typo such as ``shfit`` would otherwise be dropped); a key some
other scheduler knows is accepted, as diffusers accepts it (``ddpm check`` reports it ignored).

No torch at import; the grids come from :mod:`ddpmcli.core.scheduler_grids`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ddpmcli.choices import TIME_SHIFT_TYPES
from ddpmcli.errors import ParameterError, ScheduleError

if TYPE_CHECKING:
    from ddpmcli.configs import ScheduleRequest
    from ddpmcli.core import Schedule
    from ddpmcli.core.scheduler_grids import InferenceGrid

# The union of the __init__ parameters of every scheduler class diffusers 0.42.1 exports, plus
# the keys diffusers writes itself. A config key outside this set is not a diffusers setting.
DIFFUSERS_KNOWN_KEYS: frozenset[str] = frozenset(
    """algorithm_type alpha_cum_end alpha_cum_start base_image_seq_len base_shift beta_end
    beta_schedule beta_start block_length clip_denoised clip_sample clip_sample_range correct_steps
    corrector_k corrector_order corrector_selection corrector_selection_tau corrector_steps
    disable_corrector dynamic_thresholding_ratio editing_threshold entropy_bound eps eta
    euler_at_final final_sigmas_type final_step_size_scale flow_shift gamma gamma_cum_end
    gamma_cum_start interpolation_type invert_sigmas lambda_min_clipped lower_order_final
    mask_token_id masking_schedule max_image_seq_len max_shift minimal_topk n_grid noise_mode
    noise_sampler_seed num_inference_steps num_policy_substeps num_train_timesteps num_vec_classes
    original_inference_steps predict_x0 prediction_type predictor_order rescale_betas_zero_snr rho
    s s_churn s_max s_min s_noise sample_max_value sampling_eps scale_factors scaler schedule_mode
    scheduler_type set_alpha_to_one shift shift_terminal sigma_data sigma_max sigma_min
    sigma_schedule skip_prk_steps snr snr_shift_scale solver_order solver_p solver_type
    stage_range stages steps_offset stochastic_sampling t_lim_ode t_lim_ode_below t_max t_min
    tail_step_multiplier tail_steps tau_func threshold thresholding time_shift_type
    timestep_scaling timestep_spacing timestep_type trained_betas tsr_k tsr_sigma upscale_mode
    use_beta_sigmas use_dynamic_shifting use_exponential_sigmas use_flow_sigmas use_karras_sigmas
    use_lu_lambdas variance_type""".split()
)

# Classes whose training table is the VP beta table of beta_schedule / trained_betas.
VP_CLASSES: frozenset[str] = frozenset(
    """DDPMScheduler DDIMScheduler DDIMInverseScheduler DDIMParallelScheduler DDPMParallelScheduler
    PNDMScheduler EulerDiscreteScheduler EulerAncestralDiscreteScheduler LMSDiscreteScheduler
    HeunDiscreteScheduler KDPM2DiscreteScheduler KDPM2AncestralDiscreteScheduler
    DPMSolverMultistepScheduler DPMSolverMultistepInverseScheduler DPMSolverSinglestepScheduler
    DPMSolverSDEScheduler DEISMultistepScheduler UniPCMultistepScheduler SASolverScheduler
    LCMScheduler TCDScheduler""".split()
)
FLOW_MATCH_CLASSES: frozenset[str] = frozenset(
    {"FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"}
)
# VP classes that take use_flow_sigmas/flow_shift (then the model is a rectified flow)
FLOW_SIGMA_CLASSES: frozenset[str] = frozenset(
    """DPMSolverMultistepScheduler DPMSolverMultistepInverseScheduler DPMSolverSinglestepScheduler
    DEISMultistepScheduler UniPCMultistepScheduler SASolverScheduler""".split()
)
MODELLED_CLASSES: frozenset[str] = VP_CLASSES | FLOW_MATCH_CLASSES
# the VP classes' keys that change the grid and whose grid ddpm reproduces only for some classes
SIGMA_CONVERSIONS: dict[str, str] = {
    "use_karras_sigmas": "karras",
    "use_exponential_sigmas": "exponential",
    "use_beta_sigmas": "beta",
    "use_lu_lambdas": "lu",
}


def check_class_and_keys(raw: Mapping[str, Any], file: Path | str) -> str:
    """The config's class (DDPMScheduler where it names none, as ddpm always read such files),
    refusing a class ddpm does not model and a key no diffusers scheduler knows."""
    name = raw.get("_class_name", "DDPMScheduler")
    if not isinstance(name, str):
        raise ScheduleError(f"{file}: _class_name = {name!r} should be a string")
    if name not in MODELLED_CLASSES:
        raise ScheduleError(
            f"{file}: {name} is not a scheduler ddpm models (its noise table is not a beta "
            "schedule or a rectified flow); supported: the VP schedulers (DDPM, DDIM, PNDM, "
            "Euler, DPM-Solver, UniPC, ...), FlowMatchEulerDiscreteScheduler, "
            "FlowMatchHeunDiscreteScheduler"
        )
    unknown = sorted(
        key for key in raw if not key.startswith("_") and key not in DIFFUSERS_KNOWN_KEYS
    )
    if unknown:
        raise ScheduleError(
            f"{file}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: "
            "no diffusers scheduler takes "
            f"{'them' if len(unknown) > 1 else 'it'} (a typo?)"
        )
    return name


def is_flow_config(raw: Mapping[str, Any], class_name: str) -> bool:
    """A rectified-flow config: a FlowMatch class, or use_flow_sigmas on a class that takes it."""
    return class_name in FLOW_MATCH_CLASSES or (
        class_name in FLOW_SIGMA_CLASSES and raw.get("use_flow_sigmas") is True
    )


@dataclass(frozen=True)
class FlowSettings:
    """The settings of a rectified-flow scheduler config that decide its grids.

    ``shift``: the static shift (``shift``, or ``flow_shift`` of a DPM-Solver/UniPC config);
    ``dynamic``: ``use_dynamic_shifting`` (mu from the resolution); ``pipeline``: what the
    family's pipeline passes to ``set_timesteps`` besides the step count: ``flux`` (sigmas
    ``linspace(1, 1/n, n)``: Flux, LTX), ``cogview4`` (whole timesteps and their sigmas) or None."""

    class_name: str
    num_train_timesteps: int
    shift: float
    dynamic: bool = False
    time_shift_type: str = "exponential"
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    shift_terminal: float | None = None
    invert_sigmas: bool = False
    conversion: str | None = None
    final_sigmas_type: str = "zero"
    pipeline: str | None = None


def _get(raw: Mapping[str, Any], key: str, default: Any, kind: type, file: Path | str) -> Any:
    value = raw.get(key, default)
    if value is None:
        return default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        names = {bool: "boolean", int: "integer", float: "number", str: "string"}
        raise ScheduleError(f"{file}: {key} = {value!r} should be a {names[kind]}")
    return value


def flow_settings(raw: Mapping[str, Any], class_name: str, file: Path | str) -> FlowSettings:
    """Read and check a flow config's settings (ScheduleError naming the file and the key)."""
    get = lambda key, default, kind: _get(raw, key, default, kind, file)  # noqa: E731
    match = class_name in FLOW_MATCH_CLASSES
    shift = get("shift" if match else "flow_shift", 1.0, float)
    if not (math.isfinite(shift) and shift > 0):
        raise ScheduleError(f"{file}: {'shift' if match else 'flow_shift'} = {shift!r} must be > 0")
    dynamic = get("use_dynamic_shifting", False, bool)
    time_shift_type = get("time_shift_type", "exponential", str)
    if time_shift_type not in TIME_SHIFT_TYPES:
        raise ScheduleError(
            f"{file}: time_shift_type {time_shift_type!r}; allowed: {', '.join(TIME_SHIFT_TYPES)}"
        )
    terminal = get("shift_terminal", None, float)
    if terminal is not None and not 0 < terminal < 1:
        raise ScheduleError(f"{file}: shift_terminal = {terminal!r} must lie in (0, 1)")
    conversions = [name for key, name in SIGMA_CONVERSIONS.items() if get(key, False, bool)]
    if len(conversions) > 1:
        raise ScheduleError(f"{file}: more than one of use_karras/exponential/beta_sigmas is set")
    settings = FlowSettings(
        class_name=class_name,
        num_train_timesteps=get("num_train_timesteps", 1000, int),
        shift=shift,
        dynamic=dynamic,
        time_shift_type=time_shift_type,
        base_shift=get("base_shift", 0.25 if time_shift_type == "linear" else 0.5, float),
        max_shift=get("max_shift", 0.75 if time_shift_type == "linear" else 1.15, float),
        base_image_seq_len=get("base_image_seq_len", 256, int),
        max_image_seq_len=get("max_image_seq_len", 4096, int),
        shift_terminal=terminal,
        invert_sigmas=get("invert_sigmas", False, bool),
        conversion=conversions[0] if conversions else None,
        final_sigmas_type=get("final_sigmas_type", "zero", str),
        pipeline=_pipeline_of(class_name, dynamic, time_shift_type),
    )
    if settings.num_train_timesteps < 1:
        raise ScheduleError(f"{file}: num_train_timesteps must be >= 1")
    if dynamic and settings.base_image_seq_len >= settings.max_image_seq_len:
        raise ScheduleError(f"{file}: base_image_seq_len must be below max_image_seq_len")
    return settings


def _pipeline_of(class_name: str, dynamic: bool, time_shift_type: str) -> str | None:
    # FluxPipeline and LTXPipeline pass sigmas = linspace(1, 1/n, n) with a dynamic mu;
    # CogView4Pipeline (the linear time shift) passes whole timesteps and their sigmas;
    # StableDiffusion3Pipeline, SANA and Wan pass the step count alone.
    if class_name not in FLOW_MATCH_CLASSES or not dynamic:
        return None
    return "cogview4" if time_shift_type == "linear" else "flux"


def kind_flow_settings(params: Mapping[str, float], num_train_timesteps: int) -> FlowSettings:
    """The FlowMatchEulerDiscreteScheduler settings of the kind ``flow``'s parameters: ``shift``,
    or dynamic shifting by ``mu`` (linear with ``linear_time_shift=1``), ``shift_terminal``."""
    dynamic = float(params.get("mu", 0.0)) != 0.0
    terminal = float(params.get("shift_terminal", 0.0))
    return FlowSettings(
        class_name="FlowMatchEulerDiscreteScheduler",
        num_train_timesteps=num_train_timesteps,
        shift=float(params.get("shift", 1.0)),
        dynamic=dynamic,
        time_shift_type="linear" if params.get("linear_time_shift") else "exponential",
        shift_terminal=terminal or None,
    )


def mu_of(settings: FlowSettings, mu: float | None, image_seq_len: int | None) -> float | None:
    """The dynamic shift: ``mu`` as given, else from the image sequence length as the family's
    pipeline computes it (Flux's ``calculate_shift``, CogView4's square-root rule), else None."""
    from ddpmcli.core import grids

    if mu is not None:
        # every class: FlowMatchEuler and DPMSolver refuse mu without use_dynamic_shifting,
        # UniPC ignores it (`--from wan --param mu=1` printed the static grid without a word)
        if not settings.dynamic:
            raise ParameterError(
                f"mu is given but the config shifts statically (use_dynamic_shifting is off, "
                f"shift {settings.shift:g}); drop mu"
            )
        return mu
    if image_seq_len is None or not settings.dynamic:
        return None
    if settings.time_shift_type == "linear":
        return grids.cogview4_mu(
            image_seq_len, settings.base_image_seq_len, settings.base_shift, settings.max_shift
        )
    return grids.flux_mu(
        image_seq_len,
        settings.base_image_seq_len,
        settings.max_image_seq_len,
        settings.base_shift,
        settings.max_shift,
    )


def training_schedule(settings: FlowSettings, mu: float | None) -> Schedule:
    """The T-entry table the scheduler holds before ``set_timesteps``: s = t/T shifted statically
    (a dynamic config holds it unshifted until mu is known; with mu, shifted by it)."""
    from ddpmcli import core

    params: dict[str, float] = {}
    if settings.dynamic and mu is not None:
        params["mu"] = mu
        if settings.time_shift_type == "linear":
            params["linear_time_shift"] = 1.0
    elif not settings.dynamic:
        params["shift"] = settings.shift
    return core.make_schedule(
        "flow", settings.num_train_timesteps, zero_terminal_snr=False, logsnr_shift=0.0, **params
    )


def inference_grid(settings: FlowSettings, steps: int, mu: float | None) -> InferenceGrid:
    """The sigmas and timesteps ``set_timesteps(steps)`` gives (with the pipeline's inputs)."""
    from ddpmcli.core import scheduler_grids as sg

    if settings.dynamic and mu is None:
        raise ParameterError(
            "this config shifts by resolution (use_dynamic_shifting): give {mu} "
            "or an image size ({resolution} or {image_seq_len})"
        )
    big_t = settings.num_train_timesteps
    name = settings.class_name
    if name == "FlowMatchEulerDiscreteScheduler":
        return _flow_match_grid(settings, steps, mu)
    if name == "DPMSolverMultistepScheduler" and settings.conversion is None:
        final = 0.0 if settings.final_sigmas_type == "zero" else None
        if final is None:
            raise ScheduleError(
                f"{name}: final_sigmas_type sigma_min on flow sigmas is not modelled"
            )
        return sg.dpm_solver_flow_grid(
            steps, flow_shift=settings.shift, num_train_timesteps=big_t, mu=mu
        )
    if name == "UniPCMultistepScheduler" and settings.conversion is None:
        return sg.unipc_flow_grid(
            steps,
            flow_shift=settings.shift,
            num_train_timesteps=big_t,
            use_dynamic_shifting=settings.dynamic,
            mu=mu,
            shift_terminal=settings.shift_terminal,
            final_sigmas_type=settings.final_sigmas_type,
        )
    raise ScheduleError(
        f"{name}{' with ' + settings.conversion + ' sigmas' if settings.conversion else ''}: its "
        "inference grid is not reproduced by ddpm (FlowMatchEulerDiscreteScheduler, and "
        "DPMSolverMultistep/UniPCMultistep with use_flow_sigmas, are)"
    )


def _flow_match_grid(settings: FlowSettings, steps: int, mu: float | None) -> InferenceGrid:
    from ddpmcli.core import scheduler_grids as sg

    sigmas = timesteps = None
    if settings.pipeline == "flux":
        sigmas = sg.pipeline_flow_sigmas(steps)
    elif settings.pipeline == "cogview4":
        timesteps, sigmas = sg.cogview4_pipeline_inputs(steps, settings.num_train_timesteps)
    return sg.flow_match_euler_grid(
        steps,
        num_train_timesteps=settings.num_train_timesteps,
        shift=settings.shift,
        use_dynamic_shifting=settings.dynamic,
        time_shift_type=settings.time_shift_type,
        mu=mu if settings.dynamic else None,
        shift_terminal=settings.shift_terminal,
        invert_sigmas=settings.invert_sigmas,
        use_karras_sigmas=settings.conversion == "karras",
        use_exponential_sigmas=settings.conversion == "exponential",
        use_beta_sigmas=settings.conversion == "beta",
        sigmas=sigmas,
        timesteps=timesteps,
    )


def grid_schedule(grid: InferenceGrid, name: str) -> Schedule:
    """The schedule of an inference grid: entry 0 the least noisy step, the terminal value (the
    clean end the last step lands on) dropped; flow grids on the flow path, VE sigmas (a VP
    model's) on the VP path with alpha = 1/sqrt(1 + sigma^2)."""
    import torch

    from ddpmcli import core

    sigmas = grid.sigmas[:-1].flip(0)
    timesteps = grid.timesteps.flip(0)
    if grid.space == "flow":
        return core.schedule_from_path("flow", 1 - sigmas, sigmas, timesteps, name=name)
    alpha = 1 / torch.sqrt(1 + sigmas**2)
    return core.schedule_from_path("vp", alpha, sigmas * alpha, timesteps, name=name)


def euler_sigma_grid(raw: Mapping[str, Any], file: Path | str, steps: int) -> Schedule | None:
    """An EulerDiscreteScheduler config with karras/exponential/beta sigmas: the schedule of its
    ``set_timesteps(steps)`` grid (VP path, float timesteps interpolated in log sigma); None for
    any other config (respaced as its spacing says)."""
    if raw.get("_class_name") != "EulerDiscreteScheduler":
        return None
    conversions = [SIGMA_CONVERSIONS[key] for key in SIGMA_CONVERSIONS if raw.get(key) is True]
    if not conversions:
        return None
    from ddpmcli.core import scheduler_grids as sg

    if raw.get("rescale_betas_zero_snr") or raw.get("timestep_type", "discrete") != "discrete":
        raise ScheduleError(
            f"{file}: an Euler {conversions[0]} grid with rescale_betas_zero_snr or continuous "
            "timesteps is not reproduced by ddpm"
        )
    get = lambda key, default, kind: _get(raw, key, default, kind, file)  # noqa: E731
    trained = raw.get("trained_betas")
    table = sg.diffusers_train_sigmas(
        get("beta_schedule", "linear", str),
        get("beta_start", 0.0001, float),
        get("beta_end", 0.02, float),
        get("num_train_timesteps", 1000, int),
        trained if isinstance(trained, list) else None,
    )
    grid = sg.euler_discrete_grid(
        steps,
        table,
        timestep_spacing=get("timestep_spacing", "linspace", str),
        steps_offset=get("steps_offset", 0, int),
        use_karras_sigmas=conversions[0] == "karras",
        use_exponential_sigmas=conversions[0] == "exponential",
        use_beta_sigmas=conversions[0] == "beta",
        sigma_min=get("sigma_min", None, float),
        sigma_max=get("sigma_max", None, float),
        final_sigmas_type=get("final_sigmas_type", "zero", str),
    )
    return grid_schedule(grid, f"{file}:{conversions[0]}@{steps}")


# the image size of a request (moved here from ddpmcli.configs, which stays under 600 lines)


def check_image_size(request: ScheduleRequest) -> None:
    """The image-size fields of a request: one of them, whole numbers, not with mu."""
    if request.resolution is not None and request.image_seq_len is not None:
        raise ParameterError("{resolution} and {image_seq_len} cannot be used together")
    for name in ("resolution", "image_seq_len"):
        value = getattr(request, name)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise ParameterError(f"{{{name}}} must be a whole number >= 1, got {value!r}")
    if request.resolution is not None and request.resolution < 16:
        raise ParameterError(f"{{resolution}} {request.resolution} is below one 16-pixel token")
    if request.mu is not None and (
        request.resolution is not None or request.image_seq_len is not None
    ):
        raise ParameterError(
            "{mu} and an image size ({resolution}, {image_seq_len}) both set the shift"
        )


def image_tokens(request: ScheduleRequest) -> int | None:
    """The image sequence length a request gives: ``image_seq_len``, or ``(resolution // 16)^2``
    (a square image through an 8x VAE and 2x2 patches: Flux, SD3, CogView4)."""
    from ddpmcli.core import grids

    if request.image_seq_len is not None:
        return request.image_seq_len
    if request.resolution is not None:
        return grids.image_seq_len(request.resolution, request.resolution)
    return None


def kind_shift(
    kind: str, mu: float | None, tokens: int | None, params: Mapping[str, float]
) -> dict[str, float]:
    """``mu`` for the kind ``flow`` from ``mu`` or an image size (Flux's defaults: base_shift 0.5
    at 256 tokens, max_shift 1.15 at 4096)."""
    from ddpmcli import core
    from ddpmcli.core import grids

    if core.canonical_kind(kind) != "flow":
        raise ParameterError(
            f"{{mu}}, {{resolution}} and {{image_seq_len}} apply to kind flow, not {kind}"
        )
    if "mu" in params or "shift" in params and params["shift"] != 1.0:
        raise ParameterError("an image size sets mu (dynamic shifting); drop --param mu/shift")
    return {"mu": mu if mu is not None else grids.flux_mu(tokens)}  # type: ignore[arg-type]
