"""The reconstruction sweep of ``ddpm reconstruct``: noise data to x_t at each t, let the model
predict, rebuild x0, measure, streamed in chunks of (t, sample) pairs.

The same shape as the sampler: :func:`_chunk_metrics` is the step, :func:`reconstruction_sweep`
the loop, emitting one :class:`~ddpmcli.run.events.Event` per chunk to its observers.

Index convention: ``t`` is an index into the schedule's arrays (0-based, ``t = 0`` is one noising
step); the model is called with ``schedule.timesteps[t]`` (the identity unless respaced).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from ddpmcli import limits
from ddpmcli.core import Schedule, canonical_prediction_type
from ddpmcli.errors import DataError
from ddpmcli.run.chunking import chunk_cap
from ddpmcli.run.distributed import Ranks
from ddpmcli.run.events import (
    Event,
    NonFiniteError,
    Observer,
    ParameterError,
    call_model,
    check_data_finite,
    notify,
)
from ddpmcli.run.noise import sample_noise
from ddpmcli.run.optimal import OptimalDenoiser
from ddpmcli.run.runtime import (
    dtype_name,
    iter_chunks,
    resolve_device,
    resolve_dtype,
    spread,
    wider_dtype_hint,
    work_dtype,
)

__all__ = [
    "AGGREGATE_COLUMNS",
    "OPTIMAL_COLUMNS",
    "path_columns",
    "SWEEP_DATA_BUDGET",
    "ReconstructionData",
    "ReconstructionExamples",
    "ReconstructionResult",
    "SweepModel",
    "default_timesteps",
    "reconstruction_data",
    "reconstruction_sweep",
]


class SweepModel(Protocol):
    """What a sweep needs of a model (``checkpoints.LoadedModel`` has it)."""

    schedule: Schedule
    prediction_type: str
    data_range: tuple[float, float]

    def predict(
        self, x_t: Tensor, t: Tensor, *, sample_index: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]: ...

    def to(
        self, device: str | torch.device | None = ..., dtype: torch.dtype | None = ...
    ) -> Any: ...


AGGREGATE_COLUMNS: tuple[str, ...] = (
    "t",
    "alpha_bar",
    "snr",
    "mse",
    "psnr",
    "eps_mse",
    "clip_fraction",
)
OPTIMAL_COLUMNS: tuple[str, ...] = ("optimal_mse", "optimal_eps_mse", "excess_mse", "excess_stderr")


@dataclass
class ReconstructionExamples:
    """A few reconstructions kept for the figure: the first ``k`` samples at ``t`` (a subset).

    ``x0`` ``[k, *shape]``, ``x_t`` and ``x0_hat`` ``[len(t), k, *shape]``, float64 on CPU.
    """

    t: list[int]
    x0: Tensor
    x_t: Tensor
    x0_hat: Tensor


@dataclass
class ReconstructionResult:
    """What :func:`reconstruction_sweep` measured.

    ``rows``: one per timestep, keyed by ``columns`` (aggregated over samples);
    ``sample_rows``: one per (t, sample) when asked for, keyed by ``sample_columns``.
    """

    columns: list[str]
    rows: list[dict[str, Any]]
    sample_columns: list[str]
    sample_rows: list[dict[str, Any]] | None
    examples: ReconstructionExamples
    timesteps: list[int]
    n_samples: int
    batch_size: int
    prediction_type: str
    data_range: tuple[float, float]
    clip: bool
    device: str
    dtype: str

    def curve(self, column: str) -> list[float]:
        """One column of the per-t rows as floats (for the plots)."""
        return [float(row[column]) for row in self.rows]


def default_timesteps(num_steps: int, k: int = 10) -> list[int]:
    """About ``k`` schedule indices spread evenly from 0 to ``num_steps - 1`` (both included)."""
    return spread(num_steps, k)


@dataclass
class ReconstructionData:
    """The samples a sweep reconstructs and, when asked for, their data's optimal denoiser."""

    x0: Tensor
    source: str
    optimal: OptimalDenoiser | None
    images: Tensor | None = None  # a latent model's images, of which x0 are the latents


def reconstruction_data(
    model: Any,
    source: str | None,
    *,
    n: int | None = 64,
    seed: int = 0,
    compare_optimal: bool = False,
) -> ReconstructionData:
    """The data for ``ddpm reconstruct``: ``source`` (a built-in set's name or a path to an array
    file or image folder), else the checkpoint's reference samples; the first ``n`` of them.

    With ``compare_optimal``, the optimal denoiser of the data's distribution: the closed form for
    a Gaussian-mixture built-in set (``gmm``), the whole finite set for a file or the reference
    samples (its posterior is over every point of the set, not only the ``n`` reconstructed).

    Raises:
        UsageError: no data (no ``source`` and no reference samples), ``n < 1``, or
            ``compare_optimal`` on a built-in set whose distribution is neither.
        DataError: data that cannot be read or do not fit the model.
    """
    from ddpmcli import data as datasets

    if n is not None:
        limits.check_count(n, "n")
    latent = getattr(model, "latent", None)  # a latent model reads images, then encodes them
    shape = tuple(int(d) for d in (model.data_shape if latent is None else latent.image_shape))
    lo, hi = (float(v) for v in (model.data_range if latent is None else latent.image_range))
    if latent is not None and compare_optimal:
        raise ParameterError("{compare_optimal} is not available on a latent model")
    if latent is not None and source is not None:  # images (encoded once each) or latents
        x0, images = latent.read(source, n=n, seed=seed)
        return ReconstructionData(x0=x0, source=source, optimal=None, images=images)
    optimal = None
    if source is None:
        refs = getattr(model, "reference_samples", None)
        if refs is None:
            raise ParameterError(
                "this checkpoint holds no reference samples; give {source} (an .npy/.npz file, "
                f"an image folder or a built-in set: {', '.join(datasets.BUILTIN_DATASETS)})"
            )
        everything = refs.detach().to("cpu", torch.float64)
        if tuple(everything.shape[1:]) != shape:
            raise DataError(
                f"reference samples have shape {list(everything.shape[1:])}, the model wants "
                f"{list(shape)}"
            )
        label = "reference samples"
    elif source in datasets.BUILTIN_DATASETS and not os.path.exists(source):
        everything = datasets.get_data(
            source, n=n or 64, seed=seed, data_shape=shape, data_range=(lo, hi), dtype=torch.float64
        )
        label = source
        if compare_optimal:
            mixture = datasets.gaussian_mixture(source)
            if mixture is None or (lo, hi) != datasets.BUILTIN_DATASETS[source].data_range:
                raise ParameterError(
                    f"{{compare_optimal}}: the built-in set {source!r} is neither a finite set nor "
                    "a Gaussian mixture in the model's range; use gmm, a data file or the "
                    "checkpoint's reference samples"
                )
            optimal = OptimalDenoiser.from_mixture(mixture)
    else:
        everything = datasets.get_data(
            source, n=None, data_shape=shape, data_range=(lo, hi), dtype=torch.float64
        )
        label = source
    if compare_optimal and optimal is None:
        optimal = OptimalDenoiser.from_points(everything)
    x0 = everything if n is None else everything[:n]
    return ReconstructionData(x0=x0, source=label, optimal=optimal)


SWEEP_DATA_BUDGET = 256 * 2**20
"""Bytes of x0 and noise a sweep keeps on the device at once; more samples are swept in groups."""


@dataclass
class _Sweep:
    """What every chunk of one sweep shares, and the running sums it fills (on the device)."""

    net: Any  # the model, on the device in its dtype
    sched: Schedule  # position j is timestep ts[j], on the device in the sweep's dtype
    ts: list[int]
    optimal: OptimalDenoiser | None
    pred_type: str
    data_range: tuple[float, float]
    clip: bool
    mdtype: torch.dtype
    sums: Tensor  # [len(ts), metrics]
    per: Tensor | None  # [len(ts) * n, metrics] when per-sample rows are asked for
    n: int
    ex_pos: list[int]  # positions of the timesteps kept for the figure
    ex_k: int  # samples kept for the figure
    ex_xt: Tensor
    ex_x0hat: Tensor


def _chunk_metrics(
    run: _Sweep, x0_g: Tensor, eps_g: Tensor, g0: int, a: int, b: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Pairs ``a .. b - 1`` of the group starting at sample ``g0`` (pair p is position
    ``p // size``, sample ``g0 + p % size``): their positions ``ti`` and samples ``si``, x_t
    and x0_hat (per-pair sums over values go into ``run.sums`` / ``run.per``)."""
    size = x0_g.shape[0]
    pairs = torch.arange(a, b, device=x0_g.device)
    ti, si = pairs // size, pairs % size
    j = a // size
    if j == (b - 1) // size:
        # one timestep (the usual chunk on images): its samples are a slice, not a gathered
        # copy, and its coefficients one row that broadcasts; the same products, bit for bit
        x0c, eps = x0_g[a - j * size : b - j * size], eps_g[a - j * size : b - j * size]
        tc = ti[:1]
    else:
        x0c, eps, tc = x0_g[si], eps_g[si], ti
    sched = run.sched
    x_t = sched.q_sample(x0c, tc, eps)
    where = (run.ts[j], run.ts[(b - 1) // size])
    out, _ = call_model(
        run.net.predict,
        x_t.to(run.mdtype),
        sched.network_timesteps(ti),
        t=where,
        sample_index=si + g0,
    )
    out = out.to(x_t.dtype)
    x0_hat = sched.predict_x0(out, x_t, tc, run.pred_type)
    eps_hat = sched.predict_eps(out, x_t, tc, run.pred_type)
    x0_hat, outside = _clip_count(x0_hat, run.data_range, run.clip)
    metrics = [_sq_sum(x0_hat, x0c), _sq_sum(eps_hat, eps), outside]
    if run.optimal is not None:
        x0_opt = run.optimal.predict_x0(x_t, ti, sched)
        metrics.append(_sq_sum(x0_opt, x0c))
        metrics.append(_sq_sum(sched.eps_from_x0(x_t, ti, x0_opt), eps))
        # the pair's excess (model minus optimal) squared, pre-divided by numel once: the sums
        # are divided by numel at the end, so this becomes the mean of excess^2 per value
        numel = x0c[0].numel()
        metrics.append((metrics[0] - metrics[3]) ** 2 / numel)
    values = torch.stack(metrics, dim=1)
    run.sums.index_add_(0, ti, values)
    if run.per is not None:
        if size == run.n:
            run.per[a:b] = values
        else:
            run.per.index_copy_(0, ti * run.n + si + g0, values)
    return ti, si, x_t, x0_hat


def _keep_examples(
    run: _Sweep, g0: int, size: int, a: int, b: int, x_t: Tensor, x0_hat: Tensor
) -> None:
    """Copy the example pairs (positions ``ex_pos``, the first ``ex_k`` samples) in this chunk."""
    n_ex = max(0, min(run.ex_k, g0 + size) - g0)  # example samples in this group
    for e, j in enumerate(run.ex_pos if n_ex else ()):
        lo_p, hi_p = max(a, j * size), min(b, j * size + n_ex)
        if lo_p < hi_p:
            dst = slice(g0 + lo_p - j * size, g0 + hi_p - j * size)
            run.ex_xt[e, dst] = x_t[lo_p - a : hi_p - a]
            run.ex_x0hat[e, dst] = x0_hat[lo_p - a : hi_p - a]


def _check_sweep_args(
    model: SweepModel,
    x0: Tensor,
    ts: list[int],
    batch_size: int | None,
    compare_optimal: OptimalDenoiser | None,
) -> None:
    num_steps = model.schedule.num_steps
    if not ts:
        raise ParameterError("no timesteps selected")
    bad = [t for t in ts if not 0 <= t < num_steps]
    if bad:
        raise ParameterError(f"{{t}} {bad[0]} is out of range; allowed: 0..{num_steps - 1}")
    if x0.ndim < 2 or x0.shape[0] < 1:
        raise DataError(f"data of shape {list(x0.shape)} is not a batch of samples")
    want = getattr(model, "data_shape", None)
    shape = tuple(int(d) for d in x0.shape[1:])
    if want is not None and tuple(want) != shape:
        raise DataError(f"data samples have shape {list(shape)}, the model wants {list(want)}")
    if batch_size is not None:
        limits.check_count(batch_size, "batch_size")
    numel = math.prod(shape)
    if compare_optimal is not None and compare_optimal.dim != numel:
        raise DataError(
            f"the optimal denoiser's data have {compare_optimal.dim} values per sample, "
            f"the data {numel}"
        )


def reconstruction_sweep(
    model: SweepModel,
    x0: Tensor,
    timesteps: Sequence[int],
    *,
    batch_size: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = torch.float32,
    clip: bool = True,
    per_sample: bool = False,
    compare_optimal: OptimalDenoiser | None = None,
    observers: Sequence[Observer] = (),
    example_samples: int | None = None,
    example_timesteps: int = 10,
    ranks: Ranks | None = None,
) -> ReconstructionResult:
    """Noise ``x0`` to ``x_t`` at each timestep, let the model predict, rebuild x0, measure.

    Noise (common random numbers across t): sample ``i`` gets ONE noise tensor
    ``eps_i ~ N(0, I)`` (:func:`sample_noise`, a function of ``(seed, i)`` only) and is noised
    with it at every t, ``x_t = q_sample(x0_i, t, eps_i) = sqrt(ab_t) x0_i + sqrt(1 - ab_t)
    eps_i``. Each t still sees independent noise across samples, so every per-t statistic is
    unbiased; the estimates at different t are correlated (the curves are smoother than with
    fresh noise per t, their errors move together), and the figure shows the same noise at
    growing levels. The numbers depend on ``seed`` and the data only: not on ``batch_size``
    (up to float rounding of the sums), the device, or which other timesteps are selected.

    The model's output gives ``x0_hat = predict_x0(...)`` and ``eps_hat = predict_eps(...)``
    (the core's formulas, one for every prediction type). Per t:

    - ``mse``: mean of ``(x0_hat - x0)^2`` over samples and values (``x0_hat`` clipped to the data
      range first when ``clip``); ``psnr = 10 log10((hi - lo)^2 / mse)``;
    - ``eps_mse``: mean of ``(eps_hat - eps)^2`` (never clipped);
    - ``clip_fraction``: fraction of the values of ``x0_hat`` outside the data range, before
      clipping;
    - with ``compare_optimal``: ``optimal_mse``/``optimal_eps_mse`` of the Bayes-optimal
      denoiser on the same ``x_t`` (never clipped).

    x0 and the noise are moved to the device once (in groups of samples when they exceed
    :data:`SWEEP_DATA_BUDGET`); the (t, sample) pairs stream through the model in chunks of
    ``batch_size`` (t-major order) that index them on the device, under
    ``torch.inference_mode()``, with no host-device synchronisation inside the loop; the running
    sums stay on the device and are read once at the end, so peak memory grows with the chunk,
    not with ``n x len(timesteps)``. The sweep's own arithmetic is float64 (float32 on MPS); only
    the model's input and output are in ``dtype``.

    Args:
        model: a :class:`SweepModel` (``checkpoints.LoadedModel``); moved with ``.to``.
        x0: data ``[n, *data_shape]`` in the model's range.
        timesteps: schedule indices in ``[0, num_steps)``, in the order of the rows.
        batch_size: pairs per model call; None: :func:`~ddpmcli.run.chunking.chunk_cap`, one
            timestep's batch, or more while the extra activations stay small (thousands of pairs
            for vectors): never hungrier than a plain loop over t, and the same every run.
        seed: fixes the noise (see above).
        device, dtype: where and in which dtype the model runs.
        clip: clip ``x0_hat`` to the data range before measuring ``mse``.
        per_sample: also return one row per (t, sample).
        compare_optimal: the data distribution's optimal denoiser, or None.
        observers: called with an :class:`Event` after every chunk (``done``/``total`` count
            pairs; ``t`` the first and last timestep of the chunk).
        example_samples: samples kept for the figure (default 8 for images, up to 2000 for
            vectors of up to 16 values); example_timesteps: at most that many t, spread.
        ranks: a distributed run (:func:`ddpmcli.run.distributed.current`): this rank sweeps its
            share of the samples and the sums are added over ranks; every rank returns the whole
            result. None: one process.

    Raises:
        ParameterError: an empty or out-of-range timestep list, a bad batch size (exit 2).
        DataError: data that do not fit the model, or are not finite in ``dtype``.
        NonFiniteError: the model returned NaN or Inf at some t (seen as a non-finite
            ``eps_mse``); ``rows`` holds the rows of every other t, ``t`` the first bad one.
        ModelFailure: the model raised (naming the timesteps of the chunk).
    """
    ts = [int(t) for t in timesteps]
    _check_sweep_args(model, x0, ts, batch_size, compare_optimal)
    dev, mdtype = resolve_device(device), resolve_dtype(dtype)
    check_data_finite(x0, mdtype)
    run, chunk, group = _setup(
        model, x0, ts, dev, mdtype, batch_size, clip, per_sample, compare_optimal,
        example_samples, example_timesteps,
    )  # fmt: skip
    n, shape, wdt = run.n, tuple(int(d) for d in x0.shape[1:]), run.sums.dtype
    total, done = n * len(ts), 0
    ranks = ranks or Ranks()
    first, last = ranks.share(n)  # this rank's samples; all of them in one process
    failure: Exception | None = None
    try:
        with torch.inference_mode():
            for g0 in range(first, last, group):
                size = min(last, g0 + group) - g0
                x0_g = x0[g0 : g0 + size].detach().to(wdt).to(dev)
                eps_g = sample_noise(seed, g0, g0 + size, shape).to(wdt).to(dev)
                for a, b in iter_chunks(size * len(ts), chunk):
                    ti, si, x_t, x0_hat = _chunk_metrics(run, x0_g, eps_g, g0, a, b)
                    _keep_examples(run, g0, size, a, b, x_t, x0_hat)
                    done += b - a
                    where = (ts[a // size], ts[(b - 1) // size])
                    tensors = {"x0_hat": x0_hat, "position": ti, "sample": si + g0}
                    progress = ranks.progress(done, total)
                    notify(observers, Event("sweep", progress, total, t=where, tensors=tensors))
    except Exception as exc:  # another rank must hear of it before the sums are added
        if not ranks.active:
            raise
        failure = exc
    ranks.settle(failure)
    for part in (run.sums, run.per, run.ex_xt, run.ex_x0hat):  # each rank filled its own part
        if part is not None:
            ranks.sum(part)
    return _result(run, model, x0, chunk, dev)


def _setup(
    model: SweepModel,
    x0: Tensor,
    ts: list[int],
    dev: torch.device,
    mdtype: torch.dtype,
    batch_size: int | None,
    clip: bool,
    per_sample: bool,
    compare_optimal: OptimalDenoiser | None,
    example_samples: int | None,
    example_timesteps: int,
) -> tuple[_Sweep, int, int]:
    """The sweep's shared state, its chunk (pairs per model call) and group (samples whose x0
    and noise sit on the device at once: all of them unless they are large)."""
    shape = tuple(int(d) for d in x0.shape[1:])
    numel, n, wdt = math.prod(shape), int(x0.shape[0]), work_dtype(dev)
    total = n * len(ts)
    chunk = batch_size or chunk_cap(numel, n, total, device=dev, bytes_per_element=mdtype.itemsize)
    group = max(1, min(n, SWEEP_DATA_BUDGET // (2 * numel * wdt.itemsize)))
    optimal = None if compare_optimal is None else compare_optimal.to(dev, wdt)
    # per-pair metrics, summed over values (divided by numel at the end), in these columns:
    # mse, eps_mse, clip (, optimal_mse, optimal_eps_mse)
    n_metrics = 6 if optimal is not None else 3
    # examples for the figure: the first k samples at a spread of the timesteps
    k = example_samples if example_samples is not None else (min(n, 2000) if numel <= 16 else 8)
    k = max(0, min(k, n))
    ex_pos = spread(len(ts), example_timesteps)
    ex_xt = torch.zeros((len(ex_pos), k, *shape), dtype=wdt, device=dev)
    run = _Sweep(
        net=model.to(dev, mdtype), sched=model.schedule.take(ts).to(dev, wdt), ts=ts,
        optimal=optimal, pred_type=canonical_prediction_type(model.prediction_type),
        data_range=(float(model.data_range[0]), float(model.data_range[1])), clip=clip,
        mdtype=mdtype, sums=torch.zeros((len(ts), n_metrics), dtype=wdt, device=dev),
        per=torch.zeros((total, n_metrics), dtype=wdt, device=dev) if per_sample else None,
        n=n, ex_pos=ex_pos, ex_k=k, ex_xt=ex_xt, ex_x0hat=torch.zeros_like(ex_xt),
    )  # fmt: skip
    return run, min(chunk, total), group


def path_columns(schedule: Any) -> tuple[str, ...]:
    """The columns rows add after ``t``: a non-VP path's own ``alpha_t``, ``sigma_t`` (on VP the
    alpha_bar column gives them)."""
    return () if schedule.path == "vp" else ("alpha_t", "sigma_t")


def _result(
    run: _Sweep, model: SweepModel, x0: Tensor, chunk: int, dev: torch.device
) -> ReconstructionResult:
    """Rows from the sums; a :class:`NonFiniteError` carrying the rows of the finite timesteps
    when the model returned NaN/Inf at some."""
    numel, n, ts = math.prod(x0.shape[1:]), run.n, run.ts
    got = run.sums.to("cpu", torch.float64) / numel  # per-t sums over samples of per-pair means
    # finite float64 sums of squares of a finite float32/16 output: non-finite means NaN/Inf
    finite = torch.isfinite(got[:, 1]).tolist()
    lo, hi = run.data_range
    peak = (hi - lo) ** 2
    ts_cpu = torch.tensor(ts, dtype=torch.long)
    path = path_columns(model.schedule)
    at = [(c, getattr(model.schedule, c)[ts_cpu].tolist()) for c in ("alpha_bar", "snr", *path)]
    per_t = [{c: v[j] for c, v in at} for j in range(len(ts))]  # the float64 originals
    optimal = run.optimal is not None
    names = ["mse", "eps_mse", "clip_fraction"]
    names += ["optimal_mse", "optimal_eps_mse", "excess_sq"] if optimal else []
    columns = ["t", *path, *AGGREGATE_COLUMNS[1:]] + (list(OPTIMAL_COLUMNS) if optimal else [])
    rows: list[dict[str, Any]] = []
    for j, (t, mean) in enumerate(zip(ts, (got / n).tolist(), strict=True)):
        row: dict[str, Any] = {"t": t, **per_t[j]}
        row.update(zip(names, mean, strict=True))
        row["psnr"] = _psnr(row["mse"], peak)
        if optimal:
            _excess(row, n)
        if finite[j]:
            rows.append({c: row[c] for c in columns})
    sample_columns = ["t", "sample", *columns[1:]]
    sample_rows = None
    if run.per is not None:
        flat = (run.per.to("cpu", torch.float64) / numel).tolist()
        sample_rows = []
        for p, values in enumerate(flat):
            j, i = divmod(p, n)
            srow: dict[str, Any] = {"t": ts[j], "sample": i, **per_t[j]}
            srow.update(zip(names, values, strict=True))
            srow["psnr"] = _psnr(srow["mse"], peak)
            if optimal:
                _excess(srow, 1)
            if finite[j]:
                sample_rows.append({c: srow[c] for c in sample_columns})
    if not all(finite):
        bad = [t for t, ok in zip(ts, finite, strict=True) if not ok]
        raise NonFiniteError(
            f"the model returned NaN/Inf at {len(bad)} of {len(ts)} timestep(s), first at "
            f"t = {bad[0]} (dtype {dtype_name(run.mdtype)}{wider_dtype_hint(run.mdtype)}); "
            f"the other rows are shown",
            sample_rows if sample_rows is not None else rows,
            None,
            bad[0],
        )
    examples = ReconstructionExamples(
        t=[ts[p] for p in run.ex_pos],
        x0=x0[: run.ex_k].detach().to("cpu", torch.float64),
        x_t=run.ex_xt.to("cpu", torch.float64),
        x0_hat=run.ex_x0hat.to("cpu", torch.float64),
    )
    return ReconstructionResult(
        columns=columns, rows=rows, sample_columns=sample_columns, sample_rows=sample_rows,
        examples=examples, timesteps=ts, n_samples=n, batch_size=chunk,
        prediction_type=run.pred_type, data_range=run.data_range, clip=run.clip,
        device=str(dev), dtype=dtype_name(run.mdtype),
    )  # fmt: skip


def _excess(row: dict[str, Any], n: int) -> None:
    """``excess_mse`` = mse - optimal_mse (paired: the same x_t) and its standard error over the
    ``n`` samples, from the mean of the squared per-sample excess in ``excess_sq`` (removed). An
    excess below zero by more than a few standard errors means the optimum is not the data's."""
    excess = row["mse"] - row["optimal_mse"]
    mean_sq = row.pop("excess_sq")
    row["excess_mse"] = excess
    var = max(mean_sq - excess**2, 0.0) * n / (n - 1) if n > 1 else math.nan
    row["excess_stderr"] = math.sqrt(var / n) if n > 1 else None


def _clip_count(
    x0_hat: Tensor, data_range: tuple[float, float], clip: bool
) -> tuple[Tensor, Tensor]:
    """``x0_hat`` (clipped to ``data_range`` when ``clip``) and, per pair, how many of its values
    lay outside the range (NaN counts as outside)."""
    lo, hi = data_range
    if x0_hat.device.type == "cpu":
        # one pass (min and max) tells whether all lie inside, as a latent model's always do:
        # then there is nothing to clamp or count. Asked on the CPU only, where reading the
        # answer costs no device synchronisation. NaN compares false: it takes the full path.
        low, high = torch.aminmax(x0_hat)
        if lo <= float(low) and float(high) <= hi:
            return x0_hat, x0_hat.new_zeros(x0_hat.shape[0])
    clamped = x0_hat.clamp(lo, hi)
    # count_nonzero of the mask, then the cast: the same counts, half the time of a float sum
    outside = torch.count_nonzero((clamped != x0_hat).flatten(1), dim=1).to(x0_hat.dtype)
    return (clamped if clip else x0_hat), outside


def _sq_sum(a: Tensor, b: Tensor) -> Tensor:
    """``sum((a - b)^2)`` over all but the first dimension."""
    d = a - b
    return d.mul_(d).flatten(1).sum(1)  # in place: d is our own temporary


def _psnr(mse: float, peak: float) -> float:
    """10 log10(peak / mse) in dB; +inf for a perfect reconstruction."""
    return math.inf if mse <= 0 else 10.0 * math.log10(peak / mse)
