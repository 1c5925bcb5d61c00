"""Sampling as steps registered by name, one generic loop, and observers of its events.

A sampler is a *step*: ``step(ctx) -> (x_next, log_var | None)`` for one batch at one index
(:class:`StepContext` holds x_t, the model output and the x0_hat it implies). Steps are
registered by name with :func:`register_sampler` (``ddpm``: ancestral with a variance choice,
Ho et al. 2020 Algorithm 2; ``ddim``: Song et al. 2021 with ``eta``); a new sampler is one
decorated function. :func:`sample` runs any of them: it draws the noise, calls the model, clips
or thresholds x0_hat, calls the step and emits one :class:`~ddpmcli.run.events.Event` per step.
Statistics (:class:`StepStatistics`), trajectory frames (:class:`TrajectoryRecorder`), the NaN
check (:func:`finite_check`) and progress are observers of those events.

Index convention (the core's): ``i`` indexes the schedule's arrays, ``0 .. N-1``; the model is
called with ``schedule.timesteps[i]`` (the identity unless respaced); ``t = 0`` is one noising step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ddpmcli import core, limits
from ddpmcli.errors import check_choice
from ddpmcli.run.distributed import Ranks
from ddpmcli.run.events import (
    Event,
    ModelFailure,
    Observer,
    ParameterError,
    call_model,
    notify,
)
from ddpmcli.run.noise import generator, randn
from ddpmcli.run.observers import (
    STEP_COLUMNS,
    NonFiniteSampleError,
    StepMoments,
    StepStatistics,
    TrajectoryFrame,
    TrajectoryRecorder,
    finite_check,
)

__all__ = [
    "DEFAULT_THRESHOLD_PERCENTILE",
    "SAMPLERS",
    "STEP_COLUMNS",
    "NonFiniteSampleError",
    "SampleRun",
    "SampleSettings",
    "Sampler",
    "StepContext",
    "StepStatistics",
    "TrajectoryFrame",
    "TrajectoryRecorder",
    "check_sample_settings",
    "dynamic_threshold",
    "finite_check",
    "register_sampler",
    "respaced_schedule",
    "sample",
    "sampler_names",
]

PredictFn = Callable[[Tensor, Tensor], tuple[Tensor, "Tensor | None"]]

DEFAULT_THRESHOLD_PERCENTILE = core.DEFAULT_THRESHOLD_PERCENTILE
dynamic_threshold = core.dynamic_threshold


@dataclass(frozen=True)
class SampleSettings:
    """How to sample.

    Args:
        sampler: a registered sampler: ``ddpm`` (ancestral, Ho et al. 2020 Algorithm 2) or
            ``ddim`` (Song et al. 2021), or one added with :func:`register_sampler`.
        variance: the ancestral variance: ``fixed_small`` (beta_tilde), ``fixed_large`` (beta, with
            beta_tilde_1 at t = 0, improved-diffusion's convention) or ``learned_range`` (the
            model's variance channel, Nichol & Dhariwal 2021 eq. 15). Ignored by ``ddim``.
        eta: DDIM's noise scale (0 = deterministic, 1 = the ancestral sampler's fixed_small).
        clip: clamp x0_hat to ``data_range`` before the posterior step.
        dynamic_threshold: a percentile p in (0, 1) for dynamic thresholding (Saharia et al. 2022);
            replaces ``clip`` when set.
        data_range: the data's value range (what clipping and ``clip_fraction`` refer to).
        trajectory_every: keep x0_hat every K steps (and at the last step) for a figure.
        trajectory_samples: how many samples (the first ones) a trajectory frame keeps.
    """

    sampler: str = "ddpm"
    variance: str = "fixed_small"
    eta: float = 0.0
    clip: bool = True
    dynamic_threshold: float | None = None
    data_range: tuple[float, float] = (-1.0, 1.0)
    trajectory_every: int | None = None
    trajectory_samples: int = 16


# ---------------------------------------------------------------------------------------------
# steps, registered by name


@dataclass(frozen=True)
class StepContext:
    """One batch at one schedule index, as a step sees it (tensors in the sampler's dtype).

    ``x0`` is x0_hat as the step should use it (clipped or thresholded); ``x0_raw`` the model's
    own (the same object when nothing changed it); ``noise`` is z ~ N(0, I), zeros when the
    sampler draws none at this index.
    """

    schedule: core.Schedule
    x: Tensor
    t: Tensor
    out: Tensor
    var_values: Tensor | None
    x0: Tensor
    x0_raw: Tensor
    noise: Tensor
    prediction_type: str
    settings: SampleSettings


StepFn = Callable[[StepContext], tuple[Tensor, "Tensor | None"]]
"""``step(ctx) -> (x_next, log_var)``: log_var of the noise added, or None (not measured)."""


@dataclass(frozen=True)
class Sampler:
    """A registered sampler: its step, whether it draws noise, its per-index noise variances."""

    name: str
    step: StepFn
    uses_noise: Callable[[SampleSettings], bool]
    variances: Callable[[core.Schedule, SampleSettings], list[float] | None]


_REGISTRY: dict[str, Sampler] = {}


def _always(settings: SampleSettings) -> bool:
    return True


def _measured(schedule: core.Schedule, settings: SampleSettings) -> list[float] | None:
    return None


def register_sampler(
    name: str,
    *,
    uses_noise: Callable[[SampleSettings], bool] = _always,
    variances: Callable[[core.Schedule, SampleSettings], list[float] | None] = _measured,
) -> Callable[[StepFn], StepFn]:
    """Register ``step`` under ``name`` (a decorator); :func:`sample` then runs it by name.

    Args:
        uses_noise: whether the sampler draws z at indices > 0 (default: always).
        variances: the variance of the noise added at each index, host side (default None:
            measured from the log_var each step returns, 0 where it returns None).
    """

    def add(step: StepFn) -> StepFn:
        _REGISTRY[name] = Sampler(name, step, uses_noise, variances)
        return step

    return add


def sampler_names() -> tuple[str, ...]:
    """The registered samplers' names, in registration order."""
    return tuple(_REGISTRY)


def _fixed_variances(schedule: core.Schedule, variance: str) -> list[float]:
    """exp(log variance) per index of a fixed ancestral variance (host side); 0 at index 0,
    where no noise is added."""
    var = torch.exp(schedule.sampler_log_variance(variance).to(torch.float64))
    var[0] = 0.0
    return [float(v) for v in var]


def _ancestral_variances(schedule: core.Schedule, settings: SampleSettings) -> list[float] | None:
    if settings.variance == "learned_range":
        return None
    return _fixed_variances(schedule, settings.variance)


def _ddim_variances(schedule: core.Schedule, settings: SampleSettings) -> list[float]:
    var = schedule.ddim_variance(settings.eta).to(torch.float64)  # Song et al. 2021 eq. 16
    var[0] = 0.0  # no noise is added at index 0
    return [float(v) for v in var]


@register_sampler("ddpm", variances=_ancestral_variances)
def ancestral_step(ctx: StepContext) -> tuple[Tensor, Tensor | None]:
    """x_{t-1} = mu_tilde(x_t, x0_hat) + sigma z with the chosen variance (no noise at t = 0)."""
    vv = ctx.var_values
    log_var = ctx.schedule.model_log_variance(ctx.settings.variance, ctx.t, ctx.x, vv)
    return ctx.schedule.ancestral_step(ctx.x, ctx.t, ctx.x0, log_var, ctx.noise), log_var


@register_sampler("ddim", uses_noise=lambda s: s.eta > 0, variances=_ddim_variances)
def ddim_step(ctx: StepContext) -> tuple[Tensor, Tensor | None]:
    """DDIM (Song et al. 2021 eq. 12) with eps consistent with the x0_hat actually used
    (improved-diffusion's ddim_sample); the model's own eps where x0_hat was not changed."""
    sched, x, t = ctx.schedule, ctx.x, ctx.t
    if ctx.x0 is ctx.x0_raw:
        eps = sched.predict_eps(ctx.out, x, t, ctx.prediction_type)
    else:
        eps = sched.eps_from_x0(x, t, ctx.x0)
    return sched.ddim_step(x, t, ctx.x0, eps, ctx.settings.eta, ctx.noise), None


SAMPLERS: tuple[str, ...] = sampler_names()  # the built-in ones


# ---------------------------------------------------------------------------------------------
# settings, respacing, thresholding


def check_sample_settings(settings: SampleSettings, *, learned_variance: bool) -> None:
    """Raise :class:`ParameterError` (exit 2) for settings that cannot run, before any work."""
    if settings.sampler not in _REGISTRY:
        raise ParameterError(
            f"{{sampler}} {settings.sampler!r} is unknown; allowed: {', '.join(_REGISTRY)}"
        )
    if settings.variance not in core.VARIANCE_TYPES:
        raise ParameterError(
            f"{{variance}} {settings.variance!r} is unknown; "
            f"allowed: {', '.join(core.VARIANCE_TYPES)}"
        )
    if settings.sampler == "ddpm" and settings.variance == "learned_range" and not learned_variance:
        raise ParameterError(
            "{variance} learned_range needs a model with a variance channel; this checkpoint "
            "predicts no variance (use fixed_small or fixed_large)"
        )
    if not math.isfinite(settings.eta) or not 0 <= settings.eta <= 1e100:  # eta**2 stays finite
        raise ParameterError(
            f"{{eta}} must be a finite number >= 0 (at most 1e100), got {settings.eta}"
        )
    if settings.eta != 0 and settings.sampler != "ddim":
        raise ParameterError("{eta} applies to {sampler} ddim only")
    p = settings.dynamic_threshold
    if p is not None and not 0 < p < 1:
        raise ParameterError(f"{{dynamic_threshold}} percentile must lie in (0, 1), got {p}")
    lo, hi = settings.data_range
    if not lo < hi:
        raise ParameterError(f"data range must have lo < hi, got [{lo}, {hi}]")
    if settings.trajectory_every is not None and settings.trajectory_every < 1:
        raise ParameterError(f"{{trajectory_every}} must be >= 1, got {settings.trajectory_every}")


def respaced_schedule(
    schedule: core.Schedule,
    steps: int | str | None,
    spacing: str = "leading",
    offset: int = 0,
) -> core.Schedule:
    """The schedule a sampler runs: ``schedule`` itself when ``steps`` is None or T, else
    :func:`core.respaced` (``steps`` a count or a section string such as ``ddim50`` /
    ``10,20,30``; ``offset`` is diffusers' ``steps_offset``, added under leading spacing). A count
    outside 1..T is a :class:`ParameterError`."""
    big_t = schedule.num_steps
    if steps is None:
        return schedule
    if isinstance(steps, str) and steps.strip().isdigit():
        steps = int(steps.strip())
    if isinstance(steps, int):
        if steps < 1:
            raise ParameterError(f"{{steps}} must be at least 1, got {steps}")
        if steps > big_t:
            raise ParameterError(
                f"{{steps}} {steps} is more than the model's T = {big_t} training timesteps"
            )
        if steps == big_t:
            return schedule
    check_choice(spacing, core.SPACINGS, "spacing")
    return core.respaced(schedule, steps, spacing, offset)


def _limit_x0(x0: Tensor, settings: SampleSettings) -> Tensor:
    """x0_hat as the step uses it: thresholded, clipped, or ``x0`` itself (the same object)."""
    if settings.dynamic_threshold is not None:
        return core.dynamic_threshold(x0, settings.dynamic_threshold, settings.data_range)
    if settings.clip:
        return x0.clamp(*settings.data_range)
    return x0


# ---------------------------------------------------------------------------------------------
# the loop


@dataclass
class SampleRun:
    """What :func:`sample` returns: the samples (CPU float32), one row per step, the trajectory."""

    samples: Tensor
    rows: list[dict[str, Any]]
    trajectory: list[TrajectoryFrame] = field(default_factory=list)
    schedule_name: str = ""
    data_variance: float = 1.0


@dataclass(frozen=True)
class _Loop:
    """What every step of one run shares."""

    predict: PredictFn
    sched: core.Schedule  # on the device, in the state's dtype
    sampler: Sampler
    settings: SampleSettings
    kind: str
    batch: int
    model_dtype: torch.dtype
    measure: bool  # measure the added variance from the steps' log_var
    keep_x0: bool  # hand the used x0_hat to observers (a trajectory is recorded)


def _one_step(
    loop: _Loop, x: Tensor, i: int, t_model: int, step: int, noise: Tensor | None, first: int = 0
) -> dict[str, Tensor]:
    """Run index ``i`` over every batch of ``x`` (samples ``first ..`` of the run): the step's
    tensors for the observers."""
    n = x.shape[0]
    dev = x.device
    t_idx = torch.arange(loop.sched.num_steps, device=dev)[i].expand(n)  # a view: no kernel
    t_vec = torch.full((n,), t_model, dtype=torch.long, device=dev)
    raws, used, nexts, var_sums, bad = [], [], [], [], []
    for start in range(0, n, loop.batch):
        sl = slice(start, min(start + loop.batch, n))
        xb, tb = x[sl], t_idx[sl]
        out, var_values = call_model(
            loop.predict, xb.to(loop.model_dtype), t_vec[sl], step=step, t=(t_model, t_model),
            sample_index=torch.arange(first + sl.start, first + sl.stop, device=dev),
        )  # fmt: skip
        out = out.to(x.dtype)
        bad.append(torch.isfinite(out).logical_not_().sum())  # read with the statistics: no sync
        x0 = loop.sched.predict_x0(out, xb, tb, loop.kind)
        x0c = _limit_x0(x0, loop.settings)
        ctx = StepContext(
            schedule=loop.sched, x=xb, t=tb, out=out,
            var_values=None if var_values is None else var_values.to(x.dtype),
            x0=x0c, x0_raw=x0, noise=noise[sl] if noise is not None else torch.zeros_like(xb),
            prediction_type=loop.kind, settings=loop.settings,
        )  # fmt: skip
        x_next, log_var = loop.sampler.step(ctx)
        raws.append(x0)
        used.append(x0c)
        nexts.append(x_next)
        if loop.measure and i > 0 and log_var is not None:
            var_sums.append(torch.exp(log_var).sum(dtype=torch.float64))
    tensors = {"x": x, "x0_raw": _cat(raws), "x_next": _cat(nexts)}
    tensors["bad_output"] = bad[0] if len(bad) == 1 else torch.stack(bad).sum()
    if loop.keep_x0:
        tensors["x0"] = _cat(used)
    if loop.measure:
        total = torch.stack(var_sums).sum() if var_sums else torch.zeros((), device=dev)
        tensors["variance"] = total / x.numel()
    return tensors


def _cat(parts: list[Tensor]) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def sample(
    predict: PredictFn,
    schedule: core.Schedule,
    prediction_type: str,
    data_shape: Sequence[int],
    *,
    n: int,
    settings: SampleSettings | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    device: str | torch.device = "cpu",
    model_dtype: torch.dtype = torch.float32,
    data_variance: float = 1.0,
    observers: Sequence[Observer] = (),
    ranks: Ranks | None = None,
) -> SampleRun:
    """Draw ``n`` samples by running ``schedule`` from its last index down to 0.

    Args:
        predict: the model, ``(x_t, t_model) -> (prediction, var_values | None)``; it is called
            with x_t in ``model_dtype`` and ``t_model = schedule.timesteps[i]``.
        schedule: the (respaced) schedule to run (see :func:`respaced_schedule`).
        prediction_type: ``epsilon``, ``sample`` or ``v_prediction``.
        data_shape: the shape of one sample.
        n: number of samples; processed ``batch_size`` at a time (default: all at once).
        settings: sampler, variance, eta, clipping (see :class:`SampleSettings`).
        seed: same seed, same samples. All noise is drawn for all ``n`` samples at once, per step,
            from one generator on ``device``, so the samples do not depend on ``batch_size``.
        device, model_dtype: where the model runs and its input dtype. The sampler's state x_t is
            float64 when ``model_dtype`` is float64, else float32.
        data_variance: var(x0) pooled over all elements, for ``xt_std_expected`` =
            sqrt(ab_t var + 1 - ab_t) (1 for data assumed of unit variance).
        observers: called with every step's :class:`Event` (``done`` counts model evaluations)
            and with every finished row (an event with ``row`` set), in step order.
        ranks: a distributed run (:func:`ddpmcli.run.distributed.current`): this rank steps its
            share of the samples (the noise is still drawn for all ``n`` and sliced, so every
            sample is the single-process one); rows are built from statistics added over ranks at
            the end, and every rank returns all samples. None: one process.

    Each row: ``step`` (0 = the first, noisiest step), ``t`` (model timestep), ``variance`` (the
    variance of the noise added by the step, mean over elements; 0 where none is added),
    ``xt_std`` (std of x_t over all elements) and ``xt_std_expected``, ``x0_min/max/std`` of the
    raw x0_hat (before clipping), ``clip_fraction`` (fraction of raw x0_hat outside the data
    range), ``update_norm`` (mean over samples of ||x_{t-1} - x_t||_2).

    Raises:
        ParameterError: impossible settings (checked before any model call).
        NonFiniteSampleError: the model returned NaN/Inf, or x_{t-1} became NaN/Inf; carries
            the rows computed so far.
        ModelFailure: the model raised; carries the rows computed so far.
    """
    settings = settings or SampleSettings()
    limits.check_count(n, "n")
    batch = n if batch_size is None else limits.check_count(batch_size, "batch_size")
    if settings.sampler not in _REGISTRY:
        check_sample_settings(settings, learned_variance=True)
    sampler = _REGISTRY[settings.sampler]
    dev = torch.device(device)
    state_dtype = torch.float64 if model_dtype == torch.float64 else torch.float32
    variances = sampler.variances(schedule, settings)
    loop = _Loop(
        predict, schedule.to(dev, state_dtype), sampler, settings,
        core.canonical_prediction_type(prediction_type), batch, model_dtype,
        measure=variances is None, keep_x0=settings.trajectory_every is not None,
    )  # fmt: skip
    num = schedule.num_steps
    stats = StepStatistics(schedule, variances, float(data_variance), settings.data_range)
    stats.observers = [*observers, finite_check(stats.rows, num)]
    watchers: list[Observer] = [stats]
    recorder = None
    if settings.trajectory_every is not None:
        keep = min(n, settings.trajectory_samples)
        recorder = TrajectoryRecorder(settings.trajectory_every, keep)
        watchers.append(recorder)
    watchers.extend(observers)
    job = _Job(loop, stats, recorder, watchers, n, data_shape, seed, schedule)
    return _run_ranks(job, ranks) if ranks is not None and ranks.active else _run(job)


@dataclass
class _Job:
    """One run as its loop takes it: the one-process :func:`_run` or :func:`_run_ranks`."""

    loop: _Loop
    stats: StepStatistics
    recorder: TrajectoryRecorder | None
    watchers: list[Observer]
    n: int
    data_shape: Sequence[int]
    seed: int
    schedule: core.Schedule

    def noise(self) -> Callable[[], Tensor]:
        """The run's noise source: each call draws the next ``(n, *data_shape)`` block (the
        starting x, then one block a step), from one generator seeded with ``seed``."""
        dev, dtype = self.loop.sched.alpha_bar.device, self.loop.sched.alpha_bar.dtype
        gen = generator(dev, self.seed)
        shape = (self.n, *(int(s) for s in self.data_shape))
        return lambda: randn(shape, gen, dev, dtype)


def _run(job: _Job) -> SampleRun:
    """The generic loop: noise, step, emit; from the last index down to 0."""
    loop, stats, recorder, watchers, n = job.loop, job.stats, job.recorder, job.watchers, job.n
    num = job.schedule.num_steps
    timesteps = job.schedule.timesteps.tolist()
    draw = job.noise()
    uses_noise = loop.sampler.uses_noise(loop.settings)
    try:
        with torch.inference_mode():
            x = draw()
            for step, i in enumerate(range(num - 1, -1, -1)):
                noise = draw() if i > 0 and uses_noise else None
                tensors = _one_step(loop, x, i, timesteps[i], step, noise)
                t = (timesteps[i], timesteps[i])
                notify(watchers, Event("sample", n * (step + 1), n * num, step, t, tensors))
                x = tensors["x_next"]
            stats.flush()
    except ModelFailure as exc:
        stats.flush()  # the rows finished before the failing step (may itself stop at a NaN)
        exc.rows = list(stats.rows)
        raise
    return SampleRun(
        samples=x.float().cpu(),
        rows=stats.rows,
        trajectory=recorder.frames if recorder is not None else [],
        schedule_name=job.schedule.name,
        data_variance=stats.data_variance,
    )


def _run_ranks(job: _Job, ranks: Ranks) -> SampleRun:
    """:func:`_run` over ranks: rank r steps samples ``ranks.share(n)`` with the slices of the
    noise every rank draws for all ``n``; each step's statistics are partial moments, added over
    ranks once at the end, where the rows, the NaN check, the trajectory and the samples are
    assembled in sample order."""
    loop, stats, recorder, n = job.loop, job.stats, job.recorder, job.n
    num = job.schedule.num_steps
    timesteps = job.schedule.timesteps.tolist()
    draw = job.noise()
    lo, hi = ranks.share(n)
    uses_noise = loop.sampler.uses_noise(loop.settings)
    moments = StepMoments(stats.data_range, measure=stats.variances is None)
    own = [w for w in job.watchers if w is not stats]  # rows come at the end, from every rank
    failure: Exception | None = None
    x = torch.empty(0)
    try:
        with torch.inference_mode():
            x = draw()[lo:hi]
            for step, i in enumerate(range(num - 1, -1, -1)):
                noise = draw()[lo:hi] if i > 0 and uses_noise else None
                tensors = _one_step(loop, x, i, timesteps[i], step, noise, lo) if hi > lo else {}
                t = (timesteps[i], timesteps[i])
                moments.add(Event("sample", n * (step + 1), n * num, step, t), tensors)
                done = ranks.progress((hi - lo) * (step + 1), n * num)
                notify(own, Event("sample", done, n * num, step, t, tensors))
                x = tensors.get("x_next", x)
    except Exception as exc:  # the other ranks must hear of it before the sums are added
        failure = exc
    ranks.settle(failure)
    for event, values in moments.reduce(ranks):
        stats.add(event, values)
    stats.flush()
    parts = ranks.gather(x.float().cpu())
    frames = recorder.frames if recorder is not None else []
    if recorder is not None:
        every_rank = ranks.gather([f.x0 for f in frames])
        frames = [
            TrajectoryFrame(f.step, f.t, torch.cat([r[k] for r in every_rank if k < len(r)]))
            for k, f in enumerate(frames)
        ]
    return SampleRun(
        samples=torch.cat(parts), rows=stats.rows, trajectory=frames,
        schedule_name=job.schedule.name, data_variance=stats.data_variance,
    )  # fmt: skip
