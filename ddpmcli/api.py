"""The Python API: the same functions the command line calls, so both give the same numbers.

::

    import ddpmcli
    s = ddpmcli.schedule("cosine", timesteps=1000)      # the float64 core schedule
    m = ddpmcli.load("ckpt.pt")                          # anything `ddpm` opens
    m = ddpmcli.wrap(net, schedule=s, prediction_type="epsilon", data_shape=(3, 32, 32))
    r = ddpmcli.reconstruct(m, x0, t=[0, 500, 999], seed=0, clip=False)  # r.rows
    r = ddpmcli.sample(m, n=64, steps=50, sampler="ddim", seed=0)        # r.samples, r.rows
    r = ddpmcli.nll(m, x0, seed=0)                                       # r.rows, r.total_bpd

Timesteps are 0-based as the models take them (t = 0 is one noising step). Errors are
:mod:`ddpmcli.errors` exceptions whose messages name these functions' parameters. ``device``
and ``dtype`` default to the model's own (a wrapped module stays where it is); a module that
has to move is copied, never moved in place.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from numbers import Integral
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ddpmcli import core, limits
from ddpmcli.api_ode import NllComparison, OdeResult, OdeSettings, nll_ode
from ddpmcli.api_sampling import (
    resolve_sampler,
    sampling_schedule,
    sampling_spacing,
    solver_options,
)
from ddpmcli.api_schedule import schedule as schedule
from ddpmcli.checkpoints import LoadedModel, load_checkpoint
from ddpmcli.checkpoints.conditioning import attach
from ddpmcli.checkpoints.in_memory import (
    callable_mover,
    class_keys,
    module_denoiser,
    module_mover,
    module_state,
)
from ddpmcli.checkpoints.latent import decoded_error, samples_of, space_result, space_rows
from ddpmcli.checkpoints.loaded import check_output_shape, loaded_model
from ddpmcli.choices import (
    DecoderName,
    DeviceName,
    DtypeName,
    NllMethod,
    SamplerName,
    SampleSpacingName,
    VarianceType,
    prediction_type_choices,
    prediction_type_of,
)
from ddpmcli.errors import ParameterError, verbatim
from ddpmcli.run import (
    BoundResult,
    Observer,
    OptimalDenoiser,
    ReconstructionData,
    ReconstructionResult,
    RunError,
    SampleRun,
    SampleSettings,
    check_sample_settings,
    default_timesteps,
    random_strata,
    reconstruction_data,
    reconstruction_sweep,
    resolve_device,
    resolve_dtype,
    variational_bound,
)
from ddpmcli.run import sample as run_sample
from ddpmcli.run.distributed import Ranks

__all__ = [
    "BoundResult",
    "LoadedModel",
    "ReconstructionResult",
    "SampleResult",
    "load",
    "nll",
    "reconstruct",
    "sample",
    "sample_settings",
    "sampling_schedule",
    "sampling_spacing",
    "schedule",
    "wrap",
]

Data = Tensor | str | ReconstructionData | None
"""Data for :func:`reconstruct`, :func:`nll` and :func:`sample`'s references: a tensor
``[n, *data_shape]`` in the model's range, a built-in set's name or a path to an array file or
image folder (the first ``n`` samples), or None for the checkpoint's reference samples. A latent
model's data are images (encoded once each by its VAE) or latents (``[n, *data_shape]``); a
:class:`~ddpmcli.run.ReconstructionData` (``reconstruction_data``) is taken as it is."""
DeviceLike = DeviceName | str | torch.device
DtypeLike = DtypeName | torch.dtype


def load(
    path: str | os.PathLike[str],
    *,
    device: DeviceLike = "cpu",
    dtype: DtypeLike | None = None,
    **options: Any,
) -> LoadedModel:
    """Open a checkpoint of any format `ddpm` opens (native, TorchScript, ``.pt2``, diffusers).

    Args:
        path: the checkpoint file or folder.
        device, dtype: where and in which dtype the model runs (default: CPU, the file's dtype;
            the schedule stays float64).
        **options: the loader's keyword parameters (:func:`ddpmcli.checkpoints.load_checkpoint`):
            ``trust_program``, ``kind``, ``timesteps``, ``prediction_type``, ``data_shape``,
            ``data_range``, ``learned_variance``, ``schedule``; ``model`` (``MODULE:FACTORY``,
            your own architecture); ``class_label`` (``K``, ``A-B``, ``all``, ``random`` with
            ``label_seed``, ``null``), ``prompt``, ``guidance_scale`` for conditional models.

    Raises:
        CheckpointError: one line saying what is wrong with the file (or which parameter to pass).
    """
    return load_checkpoint(
        path,
        device=resolve_device(device),
        dtype=None if dtype is None else resolve_dtype(dtype),
        **options,
    )


def wrap(
    module: nn.Module | Callable[[Tensor, Tensor], Any],
    *,
    schedule: core.Schedule,
    prediction_type: str = "epsilon",
    data_shape: Sequence[int],
    data_range: tuple[float, float] = (-1.0, 1.0),
    learned_variance: bool = False,
    reference_samples: Tensor | None = None,
    name: str | None = None,
    check: bool = True,
    num_classes: int | None = None,
    null_label: int | None = None,
    class_label: str | int | None = None,
    guidance_scale: float | None = None,
    label_seed: int = 0,
) -> LoadedModel:
    """An in-memory model (an ``nn.Module`` or any callable) as a :class:`LoadedModel`.

    ``module(x_t, t)`` takes ``x_t`` ``[B, *data_shape]`` and ``t`` int64 ``[B]`` (the
    schedule's model timesteps, 0-based) and returns the prediction ``[B, *data_shape]`` (with
    the variance values appended along dim 1 when ``learned_variance``); a diffusers output
    (``.sample``) or a tuple (its first item) is unwrapped. A module runs in eval mode (its own
    mode is restored after each call) on its own device and dtype unless a call asks for
    others (then on a copy).

    Args:
        schedule: the training schedule (:func:`schedule`).
        prediction_type: ``epsilon``, ``sample``, ``v_prediction``, ``flow`` (v = eps - x0).
        data_shape: one sample's shape, ``(D,)`` or ``(C, H, W)``.
        data_range: the data's range (what clipping and ``clip_fraction`` refer to).
        learned_variance: the output holds improved-diffusion's variance values too.
        reference_samples: data ``[N, *data_shape]`` used when no data are given.
        name: shown as the model's name in ``info``.
        check: one forward pass on two distinct rows to check the output shape.
        num_classes, null_label: a class-conditional module, called ``module(x_t, t, labels)``
            (int64 labels 0..num_classes-1; ``null_label``, outside them, its unconditional
            label if it was trained with label dropout).
        class_label, guidance_scale, label_seed: as for :func:`load` (``K``, ``A-B``, ``all``,
            ``random``, ``null``; classifier-free guidance needs ``null_label``).

    Raises:
        ParameterError: a bad prediction type, data shape, range or class count.
        CheckpointError: the output shape does not fit (``check``); a label or guidance the
            model cannot take.
    """
    pred = prediction_type_of(prediction_type) if isinstance(prediction_type, str) else None
    if pred is None:
        raise ParameterError(
            f"{{prediction_type}} {verbatim(repr(prediction_type))} is unknown; allowed: "
            f"{prediction_type_choices()}"
        )
    if not isinstance(schedule, core.Schedule):
        raise ParameterError("{schedule} must be a ddpmcli schedule (ddpmcli.schedule(...))")
    shape = limits.check_sample_shape(tuple(data_shape), "{data_shape}", error=ParameterError)
    lo, hi = (float(v) for v in data_range)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ParameterError(f"{{data_range}} [{lo}, {hi}]: want finite lo < hi")
    if isinstance(module, nn.Module):
        device, dtype = module_state(module)
        mover = module_mover(module)
        denoiser = module_denoiser(module)
        kind = type(module).__name__
    elif callable(module):
        device, dtype = torch.device("cpu"), torch.float32
        mover = callable_mover(module)
        denoiser = mover(device, None)
        kind = getattr(module, "__name__", type(module).__name__)
    else:
        raise ParameterError(f"{{module}} must be an nn.Module or a callable, got {type(module)}")
    finished = (schedule, pred, bool(learned_variance), shape, (lo, hi))
    info: dict[str, Any] = {"format": "in-memory", "architecture": kind, "path": name or kind}
    info.update(class_keys(num_classes, null_label))
    model = loaded_model(denoiser, finished, info, mover=mover)
    model.device, model.dtype = device, dtype
    if reference_samples is not None:  # checked as data are: NaN here was a NaN in every run
        model.reference_samples = samples_of(model, reference_samples, "reference_samples")[0]
    model = attach(model, class_label, guidance_scale, label_seed, name or kind)
    if check:
        check_output_shape(model, name or kind)
    return model


def _run_place(
    model: LoadedModel, device: DeviceLike | None, dtype: DtypeLike | None
) -> tuple[torch.device, torch.dtype]:
    """The device and dtype a run uses: the given ones, else the model's own."""
    dev = model.device if device is None else resolve_device(device)
    return dev, model.dtype if dtype is None else resolve_dtype(dtype)


def _data(
    model: LoadedModel, x0: Data | Any, n: int | None, seed: int, compare_optimal: bool = False
) -> ReconstructionData:
    """The samples a run evaluates: a tensor (or array) as given (a latent model's images
    encoded), else the first ``n`` of a data source or of the reference samples
    (:func:`ddpmcli.run.reconstruction_data`)."""
    if isinstance(x0, ReconstructionData):
        return x0
    if x0 is None or isinstance(x0, str | os.PathLike):
        return reconstruction_data(
            model, None if x0 is None else os.fspath(x0), n=n if n is not None else 64,
            seed=seed, compare_optimal=compare_optimal,
        )  # fmt: skip
    if n is not None:
        limits.check_count(n, "n")
    data, images = samples_of(model, x0, "x0", n)
    optimal = OptimalDenoiser.from_points(data) if compare_optimal else None
    return ReconstructionData(x0=data, source="tensor", optimal=optimal, images=images)


def _timesteps(t: Sequence[int] | int | Tensor) -> list[int]:
    """``t`` (an int, a sequence of ints or an integer tensor) as a list of ints; a value that
    is not a whole number is a ParameterError rather than silently truncated."""
    values: Any = t.reshape(-1).tolist() if isinstance(t, Tensor) and t.ndim else t
    items: list[Any] = [values] if isinstance(values, Integral | float | Tensor) else list(values)
    bad = [v for v in items if isinstance(v, bool) or not float(v).is_integer()]
    if bad:
        raise ParameterError(f"{{t}} {verbatim(bad[0])}: timesteps are whole numbers")
    return [int(v) for v in items]


def reconstruct(
    model: LoadedModel,
    x0: Data | Any = None,
    t: Sequence[int] | int | Tensor | None = None,
    *,
    seed: int = 0,
    clip: bool = True,
    n: int | None = None,
    batch_size: int | None = None,
    device: DeviceLike | None = None,
    dtype: DtypeLike | None = None,
    per_sample: bool = False,
    compare_optimal: OptimalDenoiser | bool | None = None,
    decode: bool = False,
    observers: Sequence[Observer] = (),
    ranks: Ranks | None = None,
) -> ReconstructionResult:
    """Noise ``x0`` to ``x_t`` at each ``t``, let the model predict, rebuild x0, measure: the
    numbers of `ddpm reconstruct` (:func:`ddpmcli.run.reconstruction_sweep`).

    Each sample keeps one noise (from ``seed`` and its index) at every t. ``r.rows`` holds one
    dict per t with the CLI's columns (``t, alpha_bar, snr, mse, psnr, eps_mse,
    clip_fraction``, plus ``optimal_mse, optimal_eps_mse, excess_mse, excess_stderr`` with an
    optimal denoiser); ``r.sample_rows`` one per (t, sample) with ``per_sample``. A latent
    model's errors are in latent space and named so (``mse_latent``, ..., ``psnr_latent`` None).

    Args:
        model: from :func:`load` or :func:`wrap`.
        x0: a tensor ``[n, *data_shape]`` (a latent model's images are encoded by its VAE), a
            data source (built-in name or path) or None (the reference samples).
        t: schedule indices (default: 10 spread from 0 to T-1).
        seed: fixes the noise.
        clip: clip x0_hat to the data range before ``mse``.
        n: use the first ``n`` samples (a data source: default 64).
        batch_size: (sample, t) pairs per model call (default: adaptive).
        device, dtype: where and in which dtype the model runs (default: the model's own).
        compare_optimal: an :class:`~ddpmcli.run.OptimalDenoiser`, or True for the data's own
            (the closed form of ``gmm``, else the given samples' set); not on a latent model.
        decode: a latent model on images: also decode each x0_hat with the VAE and add its
            image-space error, ``mse_image`` and ``psnr_image``, to the per-t rows.
        observers: called with progress events.
        ranks: a torchrun process group (the CLI's); None: one process.
    """
    if model.latent is not None and compare_optimal not in (None, False):  # as the CLI says
        raise ParameterError("{compare_optimal} is not available on a latent model")
    picked = _data(model, x0, n, seed, compare_optimal=compare_optimal is True)
    optimal = compare_optimal if isinstance(compare_optimal, OptimalDenoiser) else picked.optimal
    indices = default_timesteps(model.schedule.num_steps) if t is None else _timesteps(t)
    decoded = decoded_error(model, picked, indices, per_sample) if decode else None
    dev, mdtype = _run_place(model, device, dtype)
    try:
        result = reconstruction_sweep(
            model, picked.x0, indices, batch_size=batch_size, seed=seed, device=dev, dtype=mdtype,
            clip=clip, per_sample=per_sample, compare_optimal=optimal,
            observers=[*observers, *([decoded] if decoded else [])], ranks=ranks,
        )  # fmt: skip
    except RunError as exc:  # the rows so far, named as the result's would be
        exc.rows = space_rows(model, exc.rows)
        raise
    return space_result(model, result, decoded, ranks)


@dataclass(kw_only=True)
class SampleResult(SampleRun):
    """What :func:`sample` returns: a :class:`~ddpmcli.run.SampleRun` (``samples``
    ``[n, *data_shape]`` on the CPU, float32 or float64 when the model runs in float64; ``rows``,
    one dict per step with the CLI's columns; the ``trajectory`` frames) with the schedule that
    ran (respaced), the settings, and the ``references`` the samples were compared with (a
    latent model's: latents)."""

    schedule: core.Schedule
    settings: SampleSettings
    references: Tensor | None = None


def declared_variance(model: LoadedModel, variance: VarianceType | str | None) -> str:
    """``variance``, else the one the checkpoint declares its trainer used (an adapter's
    metadata ``variance``: improved-diffusion's bound uses fixed_large), else fixed_small."""
    return str(variance or model.info.get("variance") or "fixed_small")


def sample_settings(
    model: LoadedModel,
    n: int = 64,
    sampler: SamplerName | str = "ddpm",
    *,
    variance: VarianceType | None = None,
    eta: float = 0.0,
    clip: bool = True,
    dynamic_threshold: float | None = None,
    trajectory_every: int | None = None,
    trajectory_samples: int | None = None,
    **solver: Any,
) -> SampleSettings:
    """The checked settings :func:`sample` runs with (the same parameters); the CLI calls it
    first, so a setting that cannot run is refused before any data is read. ``solver``: the
    solver options (:func:`ddpmcli.api_sampling.solver_options`).

    Raises:
        ParameterError: an unknown sampler or variance, eta with ddpm, learned_range without a
            variance channel, a percentile outside (0, 1), ``n`` below 1.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ParameterError(f"{{n}} must be an integer of at least 1, got {n!r}")
    if trajectory_samples is None:  # a few images, or the points of a scatter
        trajectory_samples = 8 if len(model.data_shape) > 1 else min(n, 2000)
    settings = SampleSettings(
        sampler=sampler, variance=declared_variance(model, variance), eta=float(eta), clip=clip,
        dynamic_threshold=dynamic_threshold, data_range=model.data_range,
        trajectory_every=trajectory_every, trajectory_samples=trajectory_samples,
        **solver_options(model, solver),
    )  # fmt: skip
    check_sample_settings(settings, learned_variance=model.learned_variance)
    return settings


def sample(
    model: LoadedModel,
    n: int = 64,
    steps: int | str | None = None,
    sampler: SamplerName | str | None = None,
    *,
    seed: int = 0,
    variance: VarianceType | None = None,
    eta: float = 0.0,
    spacing: SampleSpacingName | None = None,
    grid: SampleSpacingName | Sequence[float] | None = None,
    timesteps: Sequence[int] | None = None,
    init: Tensor | None = None,
    clip: bool = True,
    dynamic_threshold: float | None = None,
    batch_size: int | None = None,
    device: DeviceLike | None = None,
    dtype: DtypeLike | None = None,
    data_variance: float | None = None,
    references: Data | Any = None,
    trajectory_every: int | None = None,
    trajectory_samples: int | None = None,
    observers: Sequence[Observer] = (),
    ranks: Ranks | None = None,
    **solver: Any,
) -> SampleResult:
    """Draw ``n`` samples and watch every step: the numbers of `ddpm sample`.

    Args:
        model: from :func:`load` or :func:`wrap`.
        n: number of samples.
        steps: respace to this many steps (or a section string such as ``ddim50``); None: all T.
        sampler: ``ddpm`` (ancestral), ``ddim``, ``dpmpp-2m``/``-3m``/``-2m-sde``, ``unipc``,
            ``euler``, ``euler-a``, ``heun``, ``flow-euler``, or one registered with
            :func:`ddpmcli.run.register_sampler`; None: a diffusers folder's own scheduler
            where ddpm has it (:func:`ddpmcli.api_sampling.own_scheduler`), else ``ddpm``.
        grid: a spacing (as ``spacing``, e.g. ``karras``) or explicit EDM sigmas, descending.
        timesteps: an explicit list of the model's own timesteps to visit (diffusers' custom
            ``timesteps``), instead of ``steps``/``spacing``/``grid``.
        init: the standard-normal x_T ``[n, *data_shape]`` to start from (diffusers' latents).
        solver: ``order``, ``solver_type``, ``lower_order_final``, ``euler_at_final``,
            ``final_sigmas_type``, ``corrector``, ``s_churn``/``s_tmin``/``s_tmax``/``s_noise``
            (Karras et al. 2022 Algorithm 2), ``stochastic``, ``dpm_form`` (``diffusers`` or
            ``exact``: a third-order DPM-Solver++(3M), :mod:`ddpmcli.run.dpm_solver`)
            (:mod:`ddpmcli.api_sampling`).
        seed: same seed, same samples (whatever ``batch_size``).
        variance: the ancestral variance (``fixed_small``, ``fixed_large``, ``learned_range``;
            default: the checkpoint's declared one, else ``fixed_small``).
        eta: DDIM's noise scale (ddim only).
        spacing: how ``steps`` are spread (default: the checkpoint's own, else trailing).
        clip: clip x0_hat to the data range before each step.
        dynamic_threshold: a percentile in (0, 1) for dynamic thresholding instead of ``clip``.
        batch_size: samples per model call (default: all).
        device, dtype: where and in which dtype the model runs (default: the model's own).
        data_variance: var(x0) for ``xt_std_expected`` (default: the references', else 1).
        references: data to compare the samples with (a tensor or a data source: all of a file,
            2000 of a built-in set; default: the checkpoint's reference samples). A latent
            model's images are encoded by its VAE (latent-shaped data are taken as latents):
            the comparison is in latent space, where the samples are.
        trajectory_every, trajectory_samples: keep x0_hat every K steps, of the first samples.
        observers: called with every step's event; ranks: a torchrun process group.

    Raises:
        ParameterError: settings that cannot run (before any model call).
        NonFiniteSampleError, ModelFailure: the run failed; ``rows`` holds the steps so far.
    """
    if timesteps is not None:
        given = [k for k, v in (("steps", steps), ("spacing", spacing), ("grid", grid)) if v]
        if given:
            raise ParameterError(f"{{timesteps}} and {{{given[0]}}} cannot be used together")
    name, how, sigmas, solver, _ = resolve_sampler(model, sampler, spacing, grid, solver)
    settings = sample_settings(
        model, n, name, variance=variance, eta=eta, clip=clip,
        dynamic_threshold=dynamic_threshold, trajectory_every=trajectory_every,
        trajectory_samples=trajectory_samples, **solver,
    )  # fmt: skip
    sched = sampling_schedule(model, steps, how, name, sigmas, timesteps=timesteps)
    refs = _references(model, references, seed)
    if data_variance is None:
        data_variance = 1.0 if refs is None else float(refs.double().var(correction=0))
    dev, mdtype = _run_place(model, device, dtype)
    if (dev, mdtype) != (model.device, model.dtype):
        model = model.to(dev, mdtype)
    run = run_sample(
        model.predict, sched, model.prediction_type, model.data_shape, n=n, settings=settings,
        seed=seed, batch_size=batch_size, device=model.device, model_dtype=model.dtype,
        data_variance=data_variance, observers=observers, ranks=ranks, init=init,
    )  # fmt: skip
    return SampleResult(
        samples=run.samples, rows=run.rows, trajectory=run.trajectory,
        schedule_name=run.schedule_name, data_variance=run.data_variance, schedule=sched,
        settings=settings, references=refs,
    )  # fmt: skip


def _references(model: LoadedModel, references: Data | Any, seed: int) -> Tensor | None:
    """The data :func:`sample` compares with (a latent model's as latents), or None."""
    if references is None:
        return model.reference_samples
    if isinstance(references, ReconstructionData):
        return references.x0
    if not isinstance(references, str | os.PathLike):
        return samples_of(model, references, "references")[0]
    source = os.fspath(references)
    count = None if os.path.exists(source) else 2000
    if model.latent is not None:
        return model.latent.read(source, n=count, seed=seed)[0]
    from ddpmcli.data import get_data

    shape, data_range = model.data_shape, model.data_range
    return get_data(source, n=count, seed=seed, data_shape=shape, data_range=data_range)


def nll(
    model: LoadedModel,
    x0: Data | Any = None,
    *,
    seed: int = 0,
    t: Sequence[int] | Tensor | None = None,
    t_random: int | None = None,
    variance: VarianceType | None = None,
    decoder: DecoderName | Literal["auto"] = "auto",
    clip: bool = False,
    n: int | None = None,
    batch_size: int | None = None,
    device: DeviceLike | None = None,
    dtype: DtypeLike | None = None,
    observers: Sequence[Observer] = (),
    ranks: Ranks | None = None,
    method: NllMethod = "vb",
    ode: OdeSettings | None = None,
) -> BoundResult | OdeResult | NllComparison:
    """The variational bound on ``-log p(x0)`` term by term, in bits/dim: the numbers of
    `ddpm nll` (:func:`ddpmcli.run.variational_bound`); ``method`` ode, both: api_ode.nll_ode.

    ``r.rows``: one dict per evaluated t (``term`` kl, or the decoder at t = 0), then ``prior``,
    then ``total`` (every t) or ``total_estimate`` (``t_random``); ``r.total_bpd`` and
    ``r.total_stderr`` repeat the total (None for a fixed subset ``t``); ``r.per_sample_total``
    each sample's. A latent model's columns say they are in latent space (``bits_per_dim_latent``).

    Args:
        model: from :func:`load` or :func:`wrap`.
        x0: a tensor ``[n, *data_shape]``, a data source, or None (the reference samples).
        seed: fixes the noise of every (sample, t) pair (and the choice of ``t_random``).
        t: a fixed subset of t (terms only, no total); t_random: about K t drawn in strata (an
            unbiased estimate of the total). Default: every t, the bound itself.
        variance: the model's reverse variance (``fixed_small``, ``fixed_large``,
            ``learned_range``; default: the checkpoint's declared one, else ``fixed_small``).
        decoder: the t = 0 term: ``discretized`` (8-bit data), ``discretized_tanh``,
            ``continuous``, or ``auto`` (discretized for images, continuous for vectors and
            latents; a latent model takes continuous only).
        clip: clip x0_hat to the data range.
        n: use the first ``n`` samples (a data source: default 64).
        batch_size, device, dtype, observers, ranks: as for :func:`reconstruct`.
    """
    if t is not None and t_random is not None:
        raise ParameterError("{t} and {t_random} cannot be used together")
    if method == "both" and t is not None:  # a fixed subset of t has no total to compare
        raise ParameterError("method both compares totals: use every t or {t_random}, not {t}")
    if model.latent is not None and decoder not in ("auto", "continuous"):  # 256 bins of what?
        raise ParameterError(
            f"{{decoder}} {verbatim(decoder)} is for 8-bit data; a latent model's latents are "
            "real-valued: use continuous (the default)"
        )
    data = _data(model, x0, n, seed).x0
    num = model.schedule.num_steps
    strata = None
    indices: list[int] | None = None
    if t_random is not None:
        strata = random_strata(num, t_random, seed)
        indices = strata.indices
    elif t is not None:
        indices = _timesteps(t)
    images = data.ndim == 4 and model.latent is None  # latents are real-valued, not 8-bit
    dec = decoder if decoder != "auto" else ("discretized" if images else "continuous")
    dev, mdtype = _run_place(model, device, dtype)
    if (dev, mdtype) != (model.device, model.dtype):
        model = model.to(dev, mdtype)

    reverse = declared_variance(model, variance)

    def bound() -> BoundResult:
        try:
            result = variational_bound(
                model.predict, model.schedule, model.prediction_type, data, t_indices=indices,
                strata=strata, variance=reverse, learned_variance=model.learned_variance,
                decoder=dec, clip=clip, data_range=model.data_range, seed=seed,
                batch_size=batch_size, device=model.device, model_dtype=model.dtype,
                observers=observers, ranks=ranks,
            )  # fmt: skip
        except RunError as exc:  # the terms so far, named as the result's would be
            exc.rows = space_rows(model, exc.rows)
            raise
        return dataclasses.replace(result, rows=space_rows(model, result.rows))

    if method == "vb":
        return bound()
    return nll_ode(model, data, method, ode, bound, observers=observers, ranks=ranks)
