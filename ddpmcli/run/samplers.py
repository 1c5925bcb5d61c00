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

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ddpmcli import core, limits
from ddpmcli.run import (  # noqa: F401  (the solver families register their steps)
    dpm_solver,
    flow_euler,
    k_samplers,
    off_grid,
    unipc,
)
from ddpmcli.run import steps as _steps
from ddpmcli.run.distributed import Ranks
from ddpmcli.run.events import (
    Event,
    ModelFailure,
    Observer,
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
from ddpmcli.run.solver_grid import PathGrid, check_x0_defined, model_timesteps, path_grid
from ddpmcli.run.steps import (
    DEFAULT_THRESHOLD_PERCENTILE,
    Sampler,
    SampleSettings,
    StepContext,
    check_init,
    check_sample_settings,
    dynamic_threshold,
    limit_x0,
    register_sampler,
    registered,
    respaced_schedule,
    sampler_names,
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
    "check_init",
    "check_sample_settings",
    "dynamic_threshold",
    "finite_check",
    "register_sampler",
    "respaced_schedule",
    "sample",
    "sampler_names",
]

PredictFn = Callable[[Tensor, Tensor], tuple[Tensor, "Tensor | None"]]

SAMPLERS: tuple[str, ...] = sampler_names()  # the built-in ones
_REGISTRY = _steps._REGISTRY  # (tests unregister a sampler they added)

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
    grid: PathGrid | None = None
    states: dict[int, Any] = field(default_factory=dict)  # the step's state per batch start
    model_t: tuple[float, ...] = ()  # the model's timestep per index (float grids)
    constants: dict[Any, Tensor] = field(default_factory=dict)  # see _indices, _sample_indices


def _indices(loop: _Loop, n: int, dev: torch.device) -> Tensor:
    """A ``(N, n)`` int64 table whose row ``i`` is index ``i`` for ``n`` samples (an expanded
    view: no memory), made once per run and batch size: ``table[i]`` is one view per step where
    ``arange(N)[i].expand(n)`` was three operations (the loop's fixed cost is per operation)."""
    key = ("indices", n)
    if key not in loop.constants:
        num = loop.sched.num_steps
        loop.constants[key] = torch.arange(num, device=dev).unsqueeze(1).expand(num, n)
    return loop.constants[key]


def _sample_indices(loop: _Loop, lo: int, hi: int, dev: torch.device) -> Tensor:
    """The global sample indices ``lo .. hi-1`` of a batch, made once per run (every step of a
    run has the same batches)."""
    key = ("samples", lo, hi)
    if key not in loop.constants:
        loop.constants[key] = torch.arange(lo, hi, device=dev)
    return loop.constants[key]


def _t_vector(loop: _Loop, i: int | float, n: int, dev: torch.device) -> Tensor:
    """The model's timestep at index ``i`` (or, a float, at that EDM sigma off the grid) for
    ``n`` samples: int64, or float32 off VP and on a grid whose model timesteps are not whole (a
    VP model on a Karras grid): as ``Schedule.network_timesteps`` on a schedule's own entries."""
    if isinstance(i, float) and loop.grid is not None:
        value = off_grid.timestep_at(i, loop.grid, loop.model_t)
    else:
        value = loop.model_t[int(i)]
    if value != round(value) or loop.sched.path != "vp":  # (a flow's 1000 s: float32 always)
        return torch.full((n,), value, dtype=torch.float32, device=dev)
    return torch.full((n,), round(value), dtype=torch.long, device=dev)


def _model_x0(
    loop: _Loop, xb: Tensor, i: int, t_vec: Tensor, where: tuple[int, Tensor],
    at: float | None = None,
) -> tuple[Tensor, Tensor | None, Tensor]:  # fmt: skip
    """One model call on batch ``xb`` at index ``i`` (or off the grid at EDM sigma ``at``):
    (output, var values, raw x0_hat), in x's dtype; ``where`` = (the step, the batch's global
    sample indices)."""
    t_event = _shown_timesteps((loop.model_t[i],))[0]  # (as the row shows it: c_noise unrounded)
    x_in = xb if xb.dtype == loop.model_dtype else xb.to(loop.model_dtype)  # (to: the same)
    out, var_values = call_model(
        loop.predict, x_in, t_vec, step=where[0], t=(t_event, t_event), sample_index=where[1]
    )
    out = out if out.dtype == xb.dtype else out.to(xb.dtype)
    if at is not None:
        x0 = off_grid.x0_at(out, xb, loop.sched.path, at, loop.kind)
        return out, None if var_values is None else var_values.to(xb.dtype), x0
    x0 = loop.sched.predict_x0(out, xb, _indices(loop, xb.shape[0], xb.device)[i], loop.kind)
    return out, None if var_values is None else var_values.to(xb.dtype), x0


def _one_step(
    loop: _Loop, x: Tensor, i: int, t_model: int, step: int, noise: Tensor | None, first: int = 0
) -> dict[str, Tensor]:
    """Run index ``i`` over every batch of ``x`` (samples ``first ..`` of the run): the step's
    tensors for the observers."""
    n = x.shape[0]
    dev = x.device
    t_idx = _indices(loop, n, dev)[i]  # a view: no kernel
    t_vec = _t_vector(loop, i, n, dev)
    raws, used, nexts, var_sums, bad = [], [], [], [], []
    whole = n <= loop.batch  # one batch: x itself, no slicing views (one op each per step)
    for start in range(0, n, loop.batch):
        sl = slice(start, min(start + loop.batch, n))
        xb, tb, t_b = (x, t_idx, t_vec) if whole else (x[sl], t_idx[sl], t_vec[sl])
        where = (step, _sample_indices(loop, first + sl.start, first + sl.stop, dev))
        nb = noise if whole or noise is None else noise[sl]
        moved = None
        if loop.sampler.perturb is not None and loop.grid is not None:
            moved = loop.sampler.perturb(xb, nb, i, loop.grid, loop.settings)
        if moved is None:
            out, var_values, x0 = _model_x0(loop, xb, i, t_b, where)
        else:  # the step moved x off the grid first (churn): the model is called there
            xb, at = moved
            t_at = _t_vector(loop, at, xb.shape[0], dev)
            out, var_values, x0 = _model_x0(loop, xb, i, t_at, where, at)
        # NaN/Inf values of the output, read with the statistics (no sync): x - x is NaN exactly
        # there (0 elsewhere), and counting it is two kernels where isfinite's count was five
        bad.append(torch.count_nonzero(out - out))
        x0c = limit_x0(x0, loop.settings)
        ctx = StepContext(
            schedule=loop.sched, x=xb, t=tb, out=out, var_values=var_values,
            x0=x0c, x0_raw=x0, noise=nb if nb is not None else torch.zeros_like(xb),
            prediction_type=loop.kind, settings=loop.settings, index=i, grid=loop.grid,
            state=_state(loop, start), evaluate=_evaluator(loop, where, sl),
            edm_sigma=None if moved is None else moved[1],
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


def _state(loop: _Loop, start: int) -> Any:
    """The step's own state for the batch that starts at sample ``start`` (made at first use)."""
    if loop.sampler.new_state is None:
        return None
    if start not in loop.states:
        loop.states[start] = loop.sampler.new_state()
    return loop.states[start]


def _evaluator(
    loop: _Loop, where: tuple[int, Tensor], sl: slice
) -> Callable[[Tensor, int], Tensor]:
    """``evaluate(x, j)``: x0_hat at ``x`` and index ``j`` for this batch, limited as ``x0``."""

    def evaluate(xb: Tensor, j: int) -> Tensor:
        t_vec = _t_vector(loop, j, xb.shape[0], xb.device)
        x0 = _model_x0(loop, xb, j, t_vec, where)[2]
        return limit_x0(x0, loop.settings)

    return evaluate


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
    init: Tensor | None = None,
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
        init: the standard-normal draw ``[n, *data_shape]`` the run starts from (diffusers'
            ``latents``, before any ``init_noise_sigma`` scaling) instead of the seed's; the
            noise the steps add still follows ``seed`` (the seed's first block is drawn and
            dropped). Checked by :func:`check_init`.

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
    sampler = registered(settings.sampler)
    dev = torch.device(device)
    state_dtype = torch.float64 if model_dtype == torch.float64 else torch.float32
    variances = sampler.variances(schedule, settings)
    loop = _Loop(
        predict, schedule.to(dev, state_dtype), sampler, settings,
        core.canonical_prediction_type(prediction_type), batch, model_dtype,
        measure=variances is None, keep_x0=settings.trajectory_every is not None,
        grid=path_grid(schedule, settings.final_sigma), model_t=model_timesteps(schedule),
    )  # fmt: skip
    num = schedule.num_steps
    if loop.grid is not None:
        check_x0_defined(loop.grid, loop.kind)
    if sampler.check_grid is not None and loop.grid is not None:
        sampler.check_grid(loop.grid, settings)
    stats = StepStatistics(schedule, variances, float(data_variance), settings.data_range)
    stats.gaps = [loop.grid.gap(i) for i in range(num)] if loop.grid is not None else []
    stats.orders = [sampler.order(i, num, settings) if sampler.order else 1 for i in range(num)]
    stats.observers = [*observers, finite_check(stats.rows, num)]
    watchers: list[Observer] = [stats]
    recorder = None
    if settings.trajectory_every is not None:
        keep = min(n, settings.trajectory_samples)
        recorder = TrajectoryRecorder(settings.trajectory_every, keep)
        watchers.append(recorder)
    watchers.extend(observers)
    if init is not None:
        init = check_init(init, n, data_shape).to(dev, state_dtype)
    job = _Job(loop, stats, recorder, watchers, n, data_shape, seed, schedule, init)
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
    init: Tensor | None = None

    def start(self, draw: Callable[[], Tensor]) -> Tensor:
        """x at the last index: the seed's first block, or ``init`` (the block is still drawn,
        so that every later step's noise is the same either way). Off VP the block is scaled to
        the prior N(0, (alpha_T^2 + sigma_T^2) I) in the path's coordinates (VE: sigma_max)."""
        first = draw()
        if self.init is not None:
            first = self.init
        sched = self.loop.sched
        if sched.path != "vp":
            first = first * torch.hypot(sched.prior_alpha_t, sched.prior_sigma_t).to(first.dtype)
        return first

    def noise(self) -> Callable[[], Tensor]:
        """The run's noise source: each call draws the next ``(n, *data_shape)`` block (the
        starting x, then one block a step), from one generator seeded with ``seed``."""
        dev, dtype = self.loop.sched.alpha_bar.device, self.loop.sched.alpha_bar.dtype
        gen = generator(dev, self.seed)
        shape = (self.n, *(int(s) for s in self.data_shape))
        return lambda: randn(shape, gen, dev, dtype)


def _shown_timesteps(model_t: Sequence[float]) -> list[Any]:
    """The ``t`` of each step's row: what the model is called with, a whole number where it is
    one (VP tables), else the float itself (a flow's 1000 s, EDM's c_noise = ln(sigma)/4, a VP
    model on a sigma grid), which rounding turned into 1, 1, 0, 0, -1 on an EDM grid."""
    # within float64 rounding of a whole number, that number: Karras' sigma_max comes back from
    # the rho power an ulp below the table's, and the row said t = 998.9999999999999 for 999
    return [round(v) if abs(v - round(v)) <= 1e-9 * max(1.0, abs(v)) else v for v in model_t]


def _run(job: _Job) -> SampleRun:
    """The generic loop: noise, step, emit; from the last index down to 0."""
    loop, stats, recorder, watchers, n = job.loop, job.stats, job.recorder, job.watchers, job.n
    num = job.schedule.num_steps
    timesteps = _shown_timesteps(loop.model_t)
    draw = job.noise()
    uses_noise = loop.sampler.uses_noise(loop.settings)
    at_zero = loop.sampler.noise_at_zero is not None and loop.sampler.noise_at_zero(loop.settings)
    try:
        with torch.inference_mode():
            x = job.start(draw)
            for step, i in enumerate(range(num - 1, -1, -1)):
                noise = draw() if (i > 0 or at_zero) and uses_noise else None
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
    timesteps = _shown_timesteps(loop.model_t)
    draw = job.noise()
    lo, hi = ranks.share(n)
    uses_noise = loop.sampler.uses_noise(loop.settings)
    at_zero = loop.sampler.noise_at_zero is not None and loop.sampler.noise_at_zero(loop.settings)
    moments = StepMoments(stats.data_range, measure=stats.variances is None)
    own = [w for w in job.watchers if w is not stats]  # rows come at the end, from every rank
    failure: Exception | None = None
    x = torch.empty(0)
    try:
        with torch.inference_mode():
            x = job.start(draw)[lo:hi]
            for step, i in enumerate(range(num - 1, -1, -1)):
                noise = draw()[lo:hi] if (i > 0 or at_zero) and uses_noise else None
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
