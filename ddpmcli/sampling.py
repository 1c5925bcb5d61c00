"""Sampling runs and the variational bound, as loops over the core that report through callbacks.

Two library entry points, both under ``torch.inference_mode()``, both driven by a ``predict``
callable ``(x_t [B, *shape], t_model int64 [B]) -> (prediction, var_values | None)`` (what
:meth:`ddpmcli.checkpoints.LoadedModel.predict` is):

- :func:`sample`: DDPM ancestral sampling (variance ``fixed_small`` / ``fixed_large`` /
  ``learned_range``) or DDIM with ``eta``, on any (respaced) schedule, with one row of diagnostics
  per step;
- :func:`variational_bound`: the per-t terms of the variational bound (improved-diffusion's
  ``calc_bpd_loop``) in bits/dim, streamed over (sample, t) pairs in chunks, memory flat in T.

Index convention (the core's): ``i`` indexes the schedule's arrays, ``0 .. N-1``; the model is
called with ``schedule.timesteps[i]`` (the identity unless respaced); ``t = 0`` is one noising step.
Every formula comes from :mod:`ddpmcli.core`: this module only loops, reduces and checks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ddpmcli import core
from ddpmcli.diagnostics import pair_noise, work_dtype
from ddpmcli.errors import SamplingError, UsageError

__all__ = [
    "BOUND_COLUMNS",
    "DECODERS",
    "SAMPLERS",
    "STEP_COLUMNS",
    "BoundResult",
    "NonFiniteSampleError",
    "SampleRun",
    "SampleSettings",
    "TrajectoryFrame",
    "bound_strata",
    "random_strata",
    "check_sample_settings",
    "cloud_distances",
    "dynamic_threshold",
    "energy_distance",
    "respaced_schedule",
    "sample",
    "sliced_wasserstein",
    "variational_bound",
]

PredictFn = Callable[[Tensor, Tensor], tuple[Tensor, "Tensor | None"]]
RowCallback = Callable[[dict[str, Any]], None]

SAMPLERS: tuple[str, ...] = ("ddpm", "ddim")
DECODERS: tuple[str, ...] = ("discretized", "continuous")
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
BOUND_COLUMNS: tuple[str, ...] = (
    "t",
    "term",
    "bits_per_dim",
    "stderr",
    "weight",
    "x0_mse",
    "eps_mse",
)
DEFAULT_THRESHOLD_PERCENTILE = 0.995  # Saharia et al. 2022 (Imagen), section 2.3
_LN2 = math.log(2.0)


# ---------------------------------------------------------------------------------------------
# settings and validation


@dataclass(frozen=True)
class SampleSettings:
    """How to sample.

    Args:
        sampler: ``ddpm`` (ancestral, Ho et al. 2020 Algorithm 2) or ``ddim`` (Song et al. 2021).
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


def check_sample_settings(settings: SampleSettings, *, learned_variance: bool) -> None:
    """Raise :class:`UsageError` (exit 2) for settings that cannot run, before any work."""
    if settings.sampler not in SAMPLERS:
        raise UsageError(
            f"--sampler {settings.sampler!r} is unknown; allowed: {', '.join(SAMPLERS)}"
        )
    if settings.variance not in core.VARIANCE_TYPES:
        raise UsageError(
            f"--variance {settings.variance!r} is unknown; "
            f"allowed: {', '.join(core.VARIANCE_TYPES)}"
        )
    if settings.sampler == "ddpm" and settings.variance == "learned_range" and not learned_variance:
        raise UsageError(
            "--variance learned_range needs a model with a variance channel; this checkpoint "
            "predicts no variance (use fixed_small or fixed_large)"
        )
    if not math.isfinite(settings.eta) or settings.eta < 0:
        raise UsageError(f"--eta must be a finite number >= 0, got {settings.eta}")
    if settings.eta != 0 and settings.sampler != "ddim":
        raise UsageError("--eta applies to --sampler ddim only")
    p = settings.dynamic_threshold
    if p is not None and not 0 < p < 1:
        raise UsageError(f"--dynamic-threshold percentile must lie in (0, 1), got {p}")
    lo, hi = settings.data_range
    if not lo < hi:
        raise UsageError(f"data range must have lo < hi, got [{lo}, {hi}]")
    if settings.trajectory_every is not None and settings.trajectory_every < 1:
        raise UsageError(f"--trajectory-every must be >= 1, got {settings.trajectory_every}")


def respaced_schedule(
    schedule: core.Schedule, steps: int | str | None, spacing: str = "leading"
) -> core.Schedule:
    """The schedule a sampler runs: ``schedule`` itself when ``steps`` is None or T, else
    :func:`core.respace` of :func:`core.respaced_timesteps` (``steps`` a count or a section string
    such as ``ddim50`` / ``10,20,30``). A count outside 1..T is a :class:`UsageError`."""
    big_t = schedule.num_steps
    if steps is None:
        return schedule
    if isinstance(steps, str) and steps.strip().isdigit():
        steps = int(steps.strip())
    if isinstance(steps, int):
        if steps < 1:
            raise UsageError(f"--steps must be at least 1, got {steps}")
        if steps > big_t:
            raise UsageError(
                f"--steps {steps} is more than the model's T = {big_t} training timesteps"
            )
        if steps == big_t:
            return schedule
    if spacing not in core.SPACINGS:
        raise UsageError(f"--spacing {spacing!r} is unknown; allowed: {', '.join(core.SPACINGS)}")
    kept = core.respaced_timesteps(big_t, steps, spacing)
    return core.respace(schedule, kept)


def ddim_sampler(settings: SampleSettings) -> bool:
    return settings.sampler == "ddim"


def _step_variances(schedule: core.Schedule, settings: SampleSettings) -> list[float]:
    """The variance of the noise each index's step adds, for the fixed choices (host side, float64,
    through the core): eta^2 beta_tilde for DDIM, else exp(model_log_variance); 0 at index 0,
    where no noise is added. NaN for learned_range (measured per step instead)."""
    num = schedule.num_steps
    idx = torch.arange(num)
    like = torch.zeros(num, dtype=torch.float64)
    if ddim_sampler(settings):
        var = settings.eta**2 * schedule.posterior_variance
    elif settings.variance == "learned_range":
        var = torch.full((num,), math.nan, dtype=torch.float64)
    else:
        var = torch.exp(schedule.model_log_variance(settings.variance, idx, like))
    var[0] = 0.0
    return [float(v) for v in var]


def _generator(device: torch.device, seed: int) -> torch.Generator:
    try:
        gen = torch.Generator(device=device)
    except RuntimeError:  # a backend without its own generator
        gen = torch.Generator()
    return gen.manual_seed(int(seed))


def _randn(
    shape: Sequence[int], gen: torch.Generator, device: torch.device, dtype: torch.dtype
) -> Tensor:
    if gen.device.type == device.type:
        return torch.randn(tuple(shape), generator=gen, device=device, dtype=dtype)
    return torch.randn(tuple(shape), generator=gen, dtype=dtype).to(device)


# ---------------------------------------------------------------------------------------------
# dynamic thresholding


def dynamic_threshold(
    x0: Tensor,
    percentile: float = DEFAULT_THRESHOLD_PERCENTILE,
    data_range: tuple[float, float] = (-1.0, 1.0),
) -> Tensor:
    """Dynamic thresholding (Saharia et al. 2022, section 2.3), per sample.

    With x0 mapped to [-1, 1] by the data range, s = max(quantile(|x0|, p), 1); x0 is clamped to
    [-s, s] and divided by s, then mapped back. s >= 1 leaves samples already in range untouched.
    """
    lo, hi = data_range
    center, half = (lo + hi) / 2, (hi - lo) / 2
    z = (x0 - center) / half
    flat = z.abs().flatten(1)
    s = torch.quantile(flat.float(), percentile, dim=1).clamp(min=1.0).to(z.dtype)
    s = s.reshape(-1, *([1] * (z.ndim - 1)))
    z = torch.maximum(torch.minimum(z, s), -s) / s
    return z * half + center


# ---------------------------------------------------------------------------------------------
# sampling


@dataclass(frozen=True)
class TrajectoryFrame:
    """x0_hat (as used by the step, after clipping/thresholding) of the first samples at a step."""

    step: int
    t: int
    x0: Tensor  # [m, *data_shape], CPU float32


@dataclass
class SampleRun:
    """What :func:`sample` returns: the samples (CPU float32), one row per step, the trajectory."""

    samples: Tensor
    rows: list[dict[str, Any]]
    trajectory: list[TrajectoryFrame] = field(default_factory=list)
    schedule_name: str = ""
    data_variance: float = 1.0


class NonFiniteSampleError(SamplingError):
    """x_t became NaN or Inf mid-run. ``rows`` holds every row computed up to and including the
    step at which it appeared (its statistics show the NaN/Inf)."""

    def __init__(self, message: str, rows: list[dict[str, Any]], step: int, t: int) -> None:
        super().__init__(message)
        self.rows = rows
        self.step = step
        self.t = t


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
    callback: RowCallback | None = None,
    progress: Callable[[int], None] | None = None,
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
        callback: receives each step's row as it completes (in step order).
        progress: called with the number of model evaluations done since the last call.

    Each row: ``step`` (0 = the first, noisiest step), ``t`` (model timestep), ``variance`` (the
    variance of the noise added by the step, mean over elements; 0 where none is added),
    ``xt_std`` (std of x_t over all elements) and ``xt_std_expected``, ``x0_min/max/std`` of the
    raw x0_hat (before clipping), ``clip_fraction`` (fraction of raw x0_hat outside the data
    range), ``update_norm`` (mean over samples of ||x_{t-1} - x_t||_2).

    Raises:
        UsageError: impossible settings (checked before any model call).
        NonFiniteSampleError: x_{t-1} became NaN/Inf; carries the rows computed so far.
    """
    settings = settings or SampleSettings()
    kind = core.canonical_prediction_type(prediction_type)
    if n < 1:
        raise UsageError(f"--n must be at least 1, got {n}")
    batch = n if batch_size is None else batch_size
    if batch < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch}")
    dev = torch.device(device)
    state_dtype = torch.float64 if model_dtype == torch.float64 else torch.float32
    sched = schedule.to(dev, state_dtype)
    gen = _generator(dev, seed)
    learned = not ddim_sampler(settings) and settings.variance == "learned_range"
    fixed_variance = _step_variances(schedule, settings)
    shape = (n, *(int(s) for s in data_shape))
    lo, hi = settings.data_range
    ddim = ddim_sampler(settings)
    num = schedule.num_steps
    alpha_bar = schedule.alpha_bar.tolist()
    timesteps = schedule.timesteps.tolist()
    every = settings.trajectory_every
    keep = min(n, settings.trajectory_samples)
    run = SampleRun(
        samples=torch.empty(0),
        rows=[],
        schedule_name=schedule.name,
        data_variance=float(data_variance),
    )
    pending: tuple[int, int, int, Tensor] | None = None

    def finish(step: int, i: int, t_model: int, stats: Tensor) -> None:
        values = stats.tolist()
        row = {
            "step": step,
            "t": t_model,
            "variance": values[6] if learned else fixed_variance[i],
            "xt_std": values[0],
            "xt_std_expected": math.sqrt(alpha_bar[i] * data_variance + 1 - alpha_bar[i]),
            "x0_min": values[1],
            "x0_max": values[2],
            "x0_std": values[3],
            "clip_fraction": values[4],
            "update_norm": values[5],
        }
        run.rows.append(row)
        if callback is not None:
            callback(row)
        # x_t was finite (checked one step earlier), so a non-finite mean update norm means a
        # NaN/Inf in x_{t-1}: the check costs nothing beyond the statistics themselves.
        if not math.isfinite(values[5]):
            raise NonFiniteSampleError(
                f"x_t became NaN/Inf at step {step} of {num} (t = {t_model}); stopped there "
                f"({len(run.rows)} rows kept). Try --dtype float32, --clip, or fewer --steps",
                run.rows,
                step,
                t_model,
            )

    with torch.inference_mode():
        x = _randn(shape, gen, dev, state_dtype)
        index = torch.arange(num, device=dev)
        for step, i in enumerate(range(num - 1, -1, -1)):
            t_idx = index[i].expand(n)  # a view: no kernel, and the core only gathers with it
            t_model = torch.full((n,), timesteps[i], dtype=torch.long, device=dev)
            needs_noise = i > 0 and (not ddim or settings.eta > 0)
            noise = _randn(shape, gen, dev, state_dtype) if needs_noise else None
            keep_frame = every is not None and (step % every == 0 or i == 0)
            raws, nexts, frame, var_sums = [], [], [], []
            for start in range(0, n, batch):
                sl = slice(start, min(start + batch, n))
                xb, tb = x[sl], t_idx[sl]
                out, var_values = predict(xb.to(model_dtype), t_model[sl])
                out = out.to(state_dtype)
                x0 = sched.predict_x0(out, xb, tb, kind)
                raws.append(x0)
                if settings.dynamic_threshold is not None:
                    x0c = dynamic_threshold(x0, settings.dynamic_threshold, (lo, hi))
                elif settings.clip:
                    x0c = x0.clamp(lo, hi)
                else:
                    x0c = x0
                if keep_frame and sl.start < keep:
                    frame.append(x0c[: keep - sl.start].float().cpu())
                zb = noise[sl] if noise is not None else torch.zeros_like(xb)
                if ddim:
                    # eps consistent with the x0 actually used (improved-diffusion's ddim_sample);
                    # the model's own eps where x0_hat was not changed, to keep its digits.
                    if x0c is x0:
                        eps = sched.predict_eps(out, xb, tb, kind)
                    else:
                        eps = sched.eps_from_x0(xb, tb, x0c)
                    nexts.append(sched.ddim_step(xb, tb, x0c, eps, settings.eta, zb))
                else:
                    vv = None if var_values is None else var_values.to(state_dtype)
                    log_var = sched.model_log_variance(settings.variance, tb, xb, vv)
                    nexts.append(sched.ancestral_step(xb, tb, x0c, log_var, zb))
                    if learned and i > 0:
                        var_sums.append(torch.exp(log_var).sum(dtype=torch.float64))
                if progress is not None:
                    progress(sl.stop - sl.start)
            x0_raw = raws[0] if len(raws) == 1 else torch.cat(raws)
            x_next = nexts[0] if len(nexts) == 1 else torch.cat(nexts)
            # One small stack of reductions per step, read back one step later (see finish):
            # each statistic is one or two kernels on the whole batch, in the state's dtype
            # (float32 sums are pairwise: ~1e-7 relative, plenty for diagnostics).
            lo_hi = torch.aminmax(x0_raw)
            parts = [
                torch.std(x, correction=0),
                lo_hi.min,
                lo_hi.max,
                torch.std(x0_raw, correction=0),
                torch.ne(x0_raw.clamp(lo, hi), x0_raw).mean(dtype=state_dtype),
                torch.linalg.vector_norm((x_next - x).flatten(1), dim=1).mean(),
            ]
            if learned:
                if var_sums:
                    total = var_sums[0] if len(var_sums) == 1 else torch.stack(var_sums).sum()
                    parts.append((total / x.numel()).to(state_dtype))
                else:  # index 0: no noise is added
                    parts.append(torch.zeros_like(parts[0]))
            stats = torch.stack(parts)
            if keep_frame:
                run.trajectory.append(TrajectoryFrame(step, timesteps[i], torch.cat(frame)))
            # Finish the previous step's row now, after this step's work is queued: on CUDA the
            # device keeps working while the host reads the statistics (one sync per step).
            if pending is not None:
                finish(*pending)
            pending = (step, i, timesteps[i], stats)
            x = x_next
        if pending is not None:
            finish(*pending)
        run.samples = x.float().cpu()
    return run


# ---------------------------------------------------------------------------------------------
# distances between a sample cloud and the data (for comparing sampler settings by a number)


def _subsample(x: Tensor, max_points: int, gen: torch.Generator) -> Tensor:
    x = x.reshape(x.shape[0], -1).double()
    if x.shape[0] <= max_points:
        return x
    return x[torch.randperm(x.shape[0], generator=gen)[:max_points]]


def energy_distance(x: Tensor, y: Tensor, *, max_points: int = 2000, seed: int = 0) -> float:
    """Energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'| (Szekely & Rizzo 2013) between two point
    clouds [n, ...] and [m, ...], flattened per point; within-cloud means exclude the diagonal
    (the unbiased U-statistic, so it can be slightly negative for two draws of one law). Clouds
    above ``max_points`` are subsampled with ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    a, b = _subsample(x, max_points, gen), _subsample(y, max_points, gen)
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise SamplingError("energy distance needs at least 2 points in each cloud")
    xy = torch.cdist(a, b).mean()
    na, nb = a.shape[0], b.shape[0]
    xx = torch.cdist(a, a).sum() / (na * (na - 1))
    yy = torch.cdist(b, b).sum() / (nb * (nb - 1))
    return float(2 * xy - xx - yy)


def sliced_wasserstein(
    x: Tensor, y: Tensor, *, projections: int = 256, seed: int = 0, max_points: int = 4000
) -> float:
    """Sliced 2-Wasserstein distance: sqrt of the mean over random unit directions of the squared
    W2 between the projected clouds (quantiles matched on a common grid; seeded directions)."""
    gen = torch.Generator().manual_seed(seed)
    a, b = _subsample(x, max_points, gen), _subsample(y, max_points, gen)
    dirs = torch.randn(a.shape[1], projections, generator=gen, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    pa, _ = torch.sort(a @ dirs, dim=0)
    pb, _ = torch.sort(b @ dirs, dim=0)
    m = max(pa.shape[0], pb.shape[0])
    q = (torch.arange(m, dtype=torch.float64) + 0.5) / m
    qa = pa[(q * pa.shape[0]).long().clamp(max=pa.shape[0] - 1)]
    qb = pb[(q * pb.shape[0]).long().clamp(max=pb.shape[0] - 1)]
    return float(((qa - qb) ** 2).mean().sqrt())


def cloud_distances(samples: Tensor, reference: Tensor, *, seed: int = 0) -> dict[str, float]:
    """``{"energy_distance": ..., "sliced_w2": ...}`` between samples and reference points."""
    return {
        "energy_distance": energy_distance(samples, reference, seed=seed),
        "sliced_w2": sliced_wasserstein(samples, reference, seed=seed),
    }


# ---------------------------------------------------------------------------------------------
# the variational bound (Ho et al. 2020 eq. 5; improved-diffusion's calc_bpd_loop)


@dataclass
class BoundResult:
    """What :func:`variational_bound` returns.

    ``rows``: one per evaluated t (ascending), then ``prior``, then ``total`` (every t evaluated:
    the bound itself, as a Monte Carlo mean over samples) or ``total_estimate`` (a subset of t,
    importance-weighted: see :func:`bound_strata`). ``total_bpd`` and ``total_stderr`` repeat the
    last row's numbers.
    """

    rows: list[dict[str, Any]]
    total_bpd: float | None
    total_stderr: float | None
    estimate: bool
    decoder: str
    per_sample_total: Tensor | None = None


def bound_strata(num_steps: int, selected: Sequence[int]) -> dict[int, int]:
    """Importance weights for estimating the sum of the KL terms over t = 1..N-1 from a subset.

    The indices 1..N-1 are split into contiguous strata, one around each selected index > 0
    (boundaries half way between neighbours); each selected t gets its stratum's size as weight,
    so sum_j w_j L_{t_j} estimates sum_t L_t. The estimate is unbiased when each t_j is drawn
    uniformly from its stratum (:func:`random_strata` does that); for a fixed subset it is a
    quadrature estimate. t = 0 (the decoder term) always has weight 1: it is never estimated.
    """
    picks = sorted({int(i) for i in selected if int(i) > 0})
    weights: dict[int, int] = {0: 1} if 0 in {int(i) for i in selected} else {}
    lower = 1
    for k, i in enumerate(picks):
        upper = (i + picks[k + 1]) // 2 if k + 1 < len(picks) else num_steps - 1
        weights[i] = upper - lower + 1
        lower = upper + 1
    return weights


def random_strata(num_steps: int, count: int, seed: int = 0) -> tuple[list[int], dict[int, int]]:
    """``count`` indices and their weights for an unbiased estimate of the bound: index 0 (the
    decoder term, weight 1) and one index drawn uniformly from each of ``count - 1`` equal
    contiguous strata of 1..N-1 (seeded), weighted by its stratum's size. Then
    E[sum_j w_j L_{t_j}] = sum_t L_t exactly."""
    if count < 2 or count > num_steps:
        raise UsageError(f"--t-random needs 2..{num_steps} timesteps (T), got {count}")
    gen = torch.Generator().manual_seed(int(seed))
    edges = torch.linspace(1, num_steps, count, dtype=torch.float64).round().long().tolist()
    picks, weights = [0], {0: 1}
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        i = int(torch.randint(lo, hi, (1,), generator=gen))
        picks.append(i)
        weights[i] = hi - lo
    return picks, weights


def variational_bound(
    predict: PredictFn,
    schedule: core.Schedule,
    prediction_type: str,
    x0: Tensor,
    *,
    t_indices: Sequence[int] | None = None,
    weights: dict[int, int] | None = None,
    variance: str = "fixed_small",
    learned_variance: bool = False,
    decoder: str = "continuous",
    clip: bool = False,
    data_range: tuple[float, float] = (-1.0, 1.0),
    seed: int = 0,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    model_dtype: torch.dtype = torch.float32,
    progress: Callable[[int], None] | None = None,
) -> BoundResult:
    """The terms of the variational bound on -log p(x0), per t, in bits/dim.

    For index i > 0: KL(q(x_{i-1} | x_i, x0) || p(x_{i-1} | x_i)) with the model's mean
    mu_tilde(x_i, x0_hat) and the chosen ``variance``; at i = 0 the decoder term -log p(x0 | x_1)
    (``discretized``: 8-bit data, bins of width 2/255 on [-1, 1], Ho et al. 2020 eq. 13;
    ``continuous``: the Gaussian *density*, for real-valued data); the prior term
    KL(q(x_{N-1} | x0) || N(0, I)). Each is averaged over dimensions, divided by ln 2 and averaged
    over samples; x_t is drawn with independent noise for every (sample, t) pair
    (:func:`ddpmcli.diagnostics.pair_noise`; unlike ``ddpm reconstruct``, which keeps one noise
    per sample across t, so that the terms summed into the bound are independent), and the
    numbers do not depend on ``batch_size`` or the device. The arithmetic is float64 (float32 on
    MPS); only the model sees ``model_dtype``.
    Also the MSE of x0_hat and of the model's eps per t.

    Args:
        x0: data [n, *data_shape] (in the model's range).
        t_indices: the indices to evaluate (default all: the exact bound). A subset gives an
            estimate of the total weighted by ``weights`` (default :func:`bound_strata`), and t = 0
            is added when missing.
        batch_size: (sample, t) pairs per model call; memory grows with it, not with T.

    Raises:
        UsageError: learned_range without a variance channel, an unknown decoder.
    """
    if variance not in core.VARIANCE_TYPES:
        raise UsageError(
            f"--variance {variance!r} is unknown; allowed: {', '.join(core.VARIANCE_TYPES)}"
        )
    if variance == "learned_range" and not learned_variance:
        raise UsageError(
            "--variance learned_range needs a model with a variance channel; this checkpoint "
            "predicts no variance (use fixed_small or fixed_large)"
        )
    if decoder not in DECODERS:
        raise UsageError(f"--decoder {decoder!r} is unknown; allowed: {', '.join(DECODERS)}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    kind = core.canonical_prediction_type(prediction_type)
    num = schedule.num_steps
    if t_indices is None:
        selected = list(range(num))
    else:
        selected = sorted({int(i) for i in t_indices} | {0})
    estimate = len(selected) < num
    w = weights if weights is not None else bound_strata(num, selected)
    dev = torch.device(device)
    state_dtype = work_dtype(dev)  # the bound's own arithmetic: float64 except on MPS
    sched = schedule.to(dev, state_dtype)
    n = int(x0.shape[0])
    if n < 1:
        raise UsageError("no data to evaluate the bound on")
    data = x0.to(device=dev, dtype=state_dtype)
    lo, hi = data_range
    center, half = (lo + hi) / 2, (hi - lo) / 2
    k = len(selected)
    sel = torch.tensor(selected, dtype=torch.long, device=dev)
    weight_vec = torch.tensor([float(w.get(i, 0)) for i in selected], dtype=torch.float64)
    sums = torch.zeros(4, k, dtype=torch.float64, device=dev)  # term, term^2, x0 mse, eps mse
    per_sample = torch.zeros(n, dtype=torch.float64, device=dev)
    weight_dev = weight_vec.to(dev)
    total_pairs = k * n
    with torch.inference_mode():
        for start in range(0, total_pairs, batch_size):
            stop = min(start + batch_size, total_pairs)
            pairs = torch.arange(start, stop, device=dev)
            # sample-major: a sample's timesteps are consecutive, so pair_noise draws each of its
            # noise blocks (several consecutive t of one sample) once per chunk
            s_idx, j_idx = pairs // k, pairs % k
            tb = sel[j_idx]
            xb = data[s_idx]
            # independent noise for each (seed, sample, t) pair: nothing depends on the batch size
            # or the device.
            eps = pair_noise(
                seed,
                [p // k for p in range(start, stop)],
                [selected[p % k] for p in range(start, stop)],
                tuple(data.shape[1:]),
            ).to(dtype=state_dtype, device=dev)
            x_t = sched.q_sample(xb, tb, eps)
            out, var_values = predict(x_t.to(model_dtype), sched.timesteps[tb])
            out = out.to(state_dtype)
            x0_hat = sched.predict_x0(out, x_t, tb, kind)
            if clip:
                x0_hat = x0_hat.clamp(lo, hi)
            eps_hat = sched.predict_eps(out, x_t, tb, kind)
            vv = None if var_values is None else var_values.to(state_dtype)
            model_mean = sched.posterior_mean(x0_hat, x_t, tb)
            model_log_var = sched.model_log_variance(variance, tb, x_t, vv)
            true_mean, _, true_log_var = sched.posterior_mean_variance(xb, x_t, tb)
            term = _flat_mean(core.normal_kl(true_mean, true_log_var, model_mean, model_log_var))
            first = tb == 0
            if bool(first.any()):
                log_scale = 0.5 * model_log_var
                if decoder == "discretized":
                    # the discretised likelihood's bins are defined on [-1, 1]: map the data range
                    # there (probabilities of bins do not change under the affine map).
                    ll = core.discretized_gaussian_log_likelihood(
                        (xb - center) / half,
                        (model_mean - center) / half,
                        log_scale - math.log(half),
                    )
                else:
                    ll = core.continuous_gaussian_log_likelihood(xb, model_mean, log_scale)
                term = torch.where(first, -_flat_mean(ll), term)
            term = term / _LN2
            stacked = torch.stack(
                [
                    term,
                    term**2,
                    _flat_mean((x0_hat - xb) ** 2),
                    _flat_mean((eps_hat - eps) ** 2),
                ]
            )
            sums.index_add_(1, j_idx, stacked)
            per_sample.index_add_(0, s_idx, weight_dev[j_idx] * term)
            if progress is not None:
                progress(stop - start)
        prior = torch.cat(
            [
                _flat_mean(sched.prior_kl(data[a : a + batch_size])) / _LN2
                for a in range(0, n, batch_size)
            ]
        )
    sums_cpu = sums.cpu()
    prior_cpu = prior.cpu()
    totals = per_sample.cpu() + prior_cpu
    timesteps = schedule.timesteps.tolist()
    rows: list[dict[str, Any]] = []
    for j, i in enumerate(selected):
        mean = float(sums_cpu[0, j] / n)
        var = max(float(sums_cpu[1, j] / n) - mean**2, 0.0)
        rows.append(
            {
                "t": timesteps[i],
                "term": f"decoder_{decoder}" if i == 0 else "kl",
                "bits_per_dim": mean,
                "stderr": math.sqrt(var / n) if n > 1 else None,
                "weight": float(weight_vec[j]),
                "x0_mse": float(sums_cpu[2, j] / n),
                "eps_mse": float(sums_cpu[3, j] / n),
            }
        )
    rows.append(_summary_row("prior", prior_cpu, timesteps[num - 1]))
    total_bpd: float | None = None
    total_stderr: float | None = None
    covered = sum(weight_vec.tolist()) == num  # every index 0..N-1 is represented
    if covered:
        row = _summary_row("total_estimate" if estimate else "total", totals, None)
        rows.append(row)
        total_bpd, total_stderr = row["bits_per_dim"], row["stderr"]
    return BoundResult(
        rows=rows,
        total_bpd=total_bpd,
        total_stderr=total_stderr,
        estimate=estimate,
        decoder=decoder,
        per_sample_total=totals if covered else None,
    )


def _flat_mean(x: Tensor) -> Tensor:
    return x.flatten(1).mean(dim=1).double()


def _summary_row(term: str, values: Tensor, t: int | None) -> dict[str, Any]:
    n = values.shape[0]
    return {
        "t": t,
        "term": term,
        "bits_per_dim": float(values.mean()),
        "stderr": float(values.std(correction=1) / math.sqrt(n)) if n > 1 else None,
        "weight": 1.0,
        "x0_mse": None,
        "eps_mse": None,
    }
