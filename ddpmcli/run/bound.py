"""The variational bound on -log p(x0) term by term (Ho et al. 2020 eq. 5; improved-diffusion's
``calc_bpd_loop``), streamed over (sample, t) pairs in chunks, memory flat in T.

The same shape as the sampler: :func:`ddpmcli.core.vb_terms` is the step (one formula, also used
by training's hybrid loss), :func:`variational_bound` the loop, emitting one
:class:`~ddpmcli.run.events.Event` per chunk to its observers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ddpmcli import core, limits
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
from ddpmcli.run.noise import pair_noise
from ddpmcli.run.runtime import iter_chunks, wider_dtype_hint, work_dtype

__all__ = [
    "BOUND_COLUMNS",
    "DECODERS",
    "BoundResult",
    "Strata",
    "bound_strata",
    "choice_variance",
    "random_strata",
    "variational_bound",
]

PredictFn = Callable[[Tensor, Tensor], tuple[Tensor, "Tensor | None"]]

DECODERS: tuple[str, ...] = core.DECODERS
BOUND_COLUMNS: tuple[str, ...] = (
    "t",
    "term",
    "bits_per_dim",
    "stderr",
    "weight",
    "x0_mse",
    "eps_mse",
)
_LN2 = math.log(2.0)


def _flat_mean(x: Tensor) -> Tensor:
    return x.flatten(1).mean(dim=1)


@dataclass
class BoundResult:
    """What :func:`variational_bound` returns.

    ``rows``: one per evaluated t (ascending), then ``prior``, then ``total`` (every t evaluated:
    the bound itself, as a Monte Carlo mean over samples) or ``total_estimate`` (a random
    stratified choice of t, importance-weighted; its stderr includes the choice of t); no total
    for a fixed subset of t. ``total_bpd`` and ``total_stderr`` repeat the last row's numbers
    (None without a total); ``per_sample_total`` holds each sample's total (or estimate).
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


@dataclass(frozen=True)
class Strata:
    """A random choice of timesteps for an unbiased estimate of the bound, and what is needed to
    estimate the error of that choice.

    ``indices``: 0 and the drawn indices (ascending); ``weights``: how many indices each stands
    for (stratum size / draws in it; 1 for t = 0); ``groups``: the draws of each stratum and the
    stratum's size."""

    indices: list[int]
    weights: dict[int, float]
    groups: list[tuple[tuple[int, ...], int]]


def random_strata(num_steps: int, count: int, seed: int = 0) -> Strata:
    """About ``count`` indices for an unbiased estimate of the bound whose error can be estimated:
    index 0 (the decoder term, weight 1), and two indices drawn uniformly without replacement from
    each of ``(count - 1) // 2`` equal contiguous strata of 1..N-1 (three in the last stratum
    when ``count - 1`` is odd; all of a stratum smaller than its draws), seeded. Each is weighted
    by its stratum's size over its draws, so E[sum_j w_j L_{t_j}] = sum_t L_t exactly, and the
    spread of the draws within a stratum estimates the variance of that choice (see
    :func:`variational_bound`); one draw per stratum could not."""
    if count < 3 or count > num_steps:
        raise ParameterError(f"{{t_random}} needs 3..{num_steps} timesteps (T), got {count}")
    gen = torch.Generator().manual_seed(int(seed))
    strata = max(1, (count - 1) // 2)
    # strata equal in log t, not in t: the KL terms fall roughly like 1/t (L_1 is often larger
    # than all the others together), so the first strata are small (evaluated whole) and each
    # stratum holds a similar share of the sum; equal strata miss L_1 in most draws.
    edges = sorted(
        {min(num_steps, max(1, round(num_steps ** (h / strata)))) for h in range(strata + 1)}
    )
    edges = sorted(set(edges) | {1, num_steps})
    strata = len(edges) - 1
    picks, weights = [0], {0: 1.0}
    groups: list[tuple[tuple[int, ...], int]] = []
    for h, (lo, hi) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
        want = 2 + (count - 1 - 2 * strata if h == strata - 1 else 0)
        size = hi - lo
        draws = min(want, size)
        chosen = sorted(int(lo + i) for i in torch.randperm(size, generator=gen)[:draws].tolist())
        for i in chosen:
            picks.append(i)
            weights[i] = size / draws
        groups.append((tuple(chosen), size))
    return Strata(sorted(picks), weights, groups)


def choice_variance(
    groups: Sequence[tuple[tuple[int, ...], int]], means: dict[int, float]
) -> float:
    """The variance of a stratified estimate of sum_t L_t that comes from which t were drawn:
    sum over strata of N_h^2 (1 - r_h/N_h) s_h^2 / r_h, with s_h^2 the sample variance of the
    r_h >= 2 drawn terms ``means[i]`` of stratum h of size N_h (drawn without replacement; a
    stratum drawn whole contributes 0). Its expectation is the variance of the estimate over the
    draw, plus part of the noise already in the per-sample standard error: it errs on the wide
    side."""
    total = 0.0
    for draws, size in groups:
        r = len(draws)
        if r < 2 or r >= size:
            continue
        values = [means[i] for i in draws]
        mean = sum(values) / r
        s2 = sum((v - mean) ** 2 for v in values) / (r - 1)
        total += size * size * (1.0 - r / size) * s2 / r
    return total


@dataclass(frozen=True)
class _BoundSetup:
    """What every chunk of one bound run shares (tensors on the device)."""

    predict: PredictFn
    sched: core.Schedule  # on the device, in the bound's dtype
    kind: str
    data: Tensor  # [n, *shape]
    selected: list[int]
    sel: Tensor  # the selected indices, on the device
    variance: str
    decoder: str
    clip: bool
    data_range: tuple[float, float]
    seed: int
    model_dtype: torch.dtype
    model_ts: list[int]  # the model timestep of each index (host side)


def _chunk_terms(setup: _BoundSetup, start: int, stop: int) -> tuple[Tensor, Tensor, Tensor]:
    """The pairs ``start .. stop - 1`` (sample-major): ``(s_idx, j_idx, [4, B] stats)`` with
    the term, its square, the x0_hat MSE and the eps_hat MSE of each pair."""
    sched, data, k = setup.sched, setup.data, len(setup.selected)
    dev, dtype = data.device, data.dtype
    pairs = torch.arange(start, stop, device=dev)
    # sample-major: a sample's timesteps are consecutive, so pair_noise draws each of its noise
    # blocks (several consecutive t of one sample) once per chunk
    s_idx, j_idx = pairs // k, pairs % k
    tb, xb = setup.sel[j_idx], data[s_idx]
    # independent noise for each (seed, sample, t) pair: nothing depends on the batch size or
    # the device
    eps = pair_noise(
        setup.seed,
        [p // k for p in range(start, stop)],
        [setup.selected[p % k] for p in range(start, stop)],
        tuple(data.shape[1:]),
    ).to(dtype=dtype, device=dev)
    x_t = sched.q_sample(xb, tb, eps)
    t_model = sched.network_timesteps(tb)
    ts = sorted({setup.selected[p % k] for p in range(start, stop)})
    where = (setup.model_ts[ts[0]], setup.model_ts[ts[-1]])
    out, var_values = call_model(
        setup.predict, x_t.to(setup.model_dtype), t_model, t=where, sample_index=s_idx
    )
    out = out.to(dtype)
    x0_hat = sched.predict_x0(out, x_t, tb, setup.kind)
    if setup.clip:
        x0_hat = x0_hat.clamp(*setup.data_range)
    eps_hat = sched.predict_eps(out, x_t, tb, setup.kind)
    vv = None if var_values is None else var_values.to(dtype)
    model_mean = sched.posterior_mean(x0_hat, x_t, tb)
    model_log_var = sched.model_log_variance(setup.variance, tb, x_t, vv)
    term = core.vb_terms(
        sched, xb, x_t, tb, model_mean, model_log_var,
        decoder=setup.decoder, data_range=setup.data_range,
    )  # fmt: skip
    stats = [term, term**2, _flat_mean((x0_hat - xb) ** 2), _flat_mean((eps_hat - eps) ** 2)]
    return s_idx, j_idx, torch.stack(stats)


def _check_bound_args(
    variance: str, learned_variance: bool, decoder: str, batch_size: int, n: int
) -> None:
    if variance not in core.VARIANCE_TYPES:
        raise ParameterError(
            f"{{variance}} {variance!r} is unknown; allowed: {', '.join(core.VARIANCE_TYPES)}"
        )
    if variance == "learned_range" and not learned_variance:
        raise ParameterError(
            "{variance} learned_range needs a model with a variance channel; this checkpoint "
            "predicts no variance (use fixed_small or fixed_large)"
        )
    if decoder not in DECODERS:
        raise ParameterError(f"{{decoder}} {decoder!r} is unknown; allowed: {', '.join(DECODERS)}")
    limits.check_count(batch_size, "batch_size")
    if n < 1:
        raise ParameterError("no data to evaluate the bound on")


def variational_bound(
    predict: PredictFn,
    schedule: core.Schedule,
    prediction_type: str,
    x0: Tensor,
    *,
    t_indices: Sequence[int] | None = None,
    strata: Strata | None = None,
    variance: str = "fixed_small",
    learned_variance: bool = False,
    decoder: str = "continuous",
    clip: bool = False,
    data_range: tuple[float, float] = (-1.0, 1.0),
    seed: int = 0,
    batch_size: int | None = None,
    device: str | torch.device = "cpu",
    model_dtype: torch.dtype = torch.float32,
    observers: Sequence[Observer] = (),
    ranks: Ranks | None = None,
) -> BoundResult:
    """The terms of the variational bound on -log p(x0), per t, in bits/dim.

    For index i > 0: KL(q(x_{i-1} | x_i, x0) || p(x_{i-1} | x_i)) with the model's mean
    mu_tilde(x_i, x0_hat) and the chosen ``variance``; at i = 0 the decoder term -log p(x0 | x_1)
    (:func:`ddpmcli.core.vb_terms`); the prior term KL(q(x_{N-1} | x0) || N(0, I)). Each is
    averaged over dimensions, divided by ln 2 and averaged over samples; x_t is drawn with
    independent noise for every (sample, t) pair (:func:`ddpmcli.run.noise.pair_noise`; unlike
    ``ddpm reconstruct``, which keeps one noise per sample across t, so that the terms summed
    into the bound are independent), and the numbers do not depend on ``batch_size`` or the
    device. The arithmetic is float64 (float32 on MPS); only the model sees ``model_dtype``.
    Also the MSE of x0_hat and of the model's eps per t.

    Args:
        x0: data [n, *data_shape] (in the model's range).
        t_indices: the indices to evaluate (default all: the exact bound); t = 0 is added when
            missing. A fixed subset gives the terms but no total (row weights from
            :func:`bound_strata`): a quadrature of a few t can be far from the bound, and no
            standard error can say how far.
        strata: a random choice (:func:`random_strata`) instead of ``t_indices``: the total is
            then an unbiased estimate (``total_estimate``) whose standard error adds the
            variance of the choice of t (:func:`choice_variance`) to the one over samples.
        batch_size: (sample, t) pairs per model call; memory grows with it, not with T. None:
            :func:`~ddpmcli.run.chunking.chunk_cap`: one timestep's batch (``n``), or more
            while the extra activations stay small; the same every run.
        observers: called with an :class:`Event` after every chunk (``done`` counts pairs).
        ranks: a distributed run (:func:`ddpmcli.run.distributed.current`): this rank evaluates
            the pairs of its share of the samples and the sums are added over ranks; every rank
            returns the whole result. None: one process.

    Raises:
        ParameterError: learned_range without a variance channel, an unknown decoder.
        DataError: data with NaN/Inf, or not finite in ``model_dtype``.
        NonFiniteError: a term came out NaN/Inf; ``rows`` holds the finite terms and the prior.
        ModelFailure: the model raised (naming the timesteps of the chunk).
    """
    n = int(x0.shape[0])
    _check_bound_args(
        variance, learned_variance, decoder, 1 if batch_size is None else batch_size, n
    )
    check_data_finite(x0, model_dtype)
    num = schedule.num_steps
    if strata is not None:
        t_indices = strata.indices
    selected = list(range(num)) if t_indices is None else sorted({int(i) for i in t_indices} | {0})
    w = strata.weights if strata is not None else bound_strata(num, selected)
    dev = torch.device(device)
    state_dtype = work_dtype(dev)  # the bound's own arithmetic: float64 except on MPS
    setup = _BoundSetup(
        predict, schedule.to(dev, state_dtype), core.canonical_prediction_type(prediction_type),
        x0.to(device=dev, dtype=state_dtype), selected,
        torch.tensor(selected, dtype=torch.long, device=dev), variance, decoder, clip,
        data_range, seed, model_dtype, schedule.timesteps.tolist(),
    )  # fmt: skip
    k = len(selected)
    weight_vec = torch.tensor([float(w.get(i, 0)) for i in selected], dtype=torch.float64)
    weight_dev = weight_vec.to(dev)
    sums = torch.zeros(4, k, dtype=torch.float64, device=dev)  # term, term^2, x0 mse, eps mse
    per_sample = torch.zeros(n, dtype=torch.float64, device=dev)
    ranks = ranks or Ranks()
    first, last = ranks.share(n)  # this rank's samples; pairs are sample-major
    mine = (last - first) * k
    if batch_size is None:
        numel = int(x0[0].numel())
        cap = chunk_cap(numel, n, k * n, device=dev, bytes_per_element=model_dtype.itemsize)
        chunks = iter_chunks(mine, cap)
    else:
        chunks = iter_chunks(mine, batch_size)
    failure: Exception | None = None
    try:
        with torch.inference_mode():
            for start, stop in chunks:
                s_idx, j_idx, stacked = _chunk_terms(setup, first * k + start, first * k + stop)
                sums.index_add_(1, j_idx, stacked)
                per_sample.index_add_(0, s_idx, weight_dev[j_idx] * stacked[0])
                notify(observers, Event("bound", ranks.progress(stop, k * n), k * n))
    except Exception as exc:  # the other ranks must hear of it before the sums are added
        if not ranks.active:
            raise
        failure = exc
    ranks.settle(failure)
    ranks.sum(sums)
    ranks.sum(per_sample)
    with torch.inference_mode():
        prior = torch.cat(
            [
                _flat_mean(setup.sched.prior_kl(setup.data[a : a + 4096])) / _LN2
                for a in range(0, n, 4096)
            ]
        )
    return _bound_result(setup, sums.cpu(), prior.cpu(), per_sample.cpu(), weight_vec, strata)


def _bound_result(
    setup: _BoundSetup,
    sums: Tensor,
    prior: Tensor,
    per_sample: Tensor,
    weight_vec: Tensor,
    strata: Strata | None,
) -> BoundResult:
    """The rows of a bound run; a :class:`NonFiniteError` carrying the finite ones when some
    term is NaN/Inf."""
    n = int(per_sample.shape[0])
    num, selected, timesteps = setup.sched.num_steps, setup.selected, setup.model_ts
    rows: list[dict[str, Any]] = []
    bad: list[int] = []
    cause = ""
    for j, i in enumerate(selected):
        mean = float(sums[0, j] / n)
        if not math.isfinite(mean):
            if not bad:
                cause = _nonfinite_cause(setup, i)
            bad.append(timesteps[i])
            continue
        var = max(float(sums[1, j] / n) - mean**2, 0.0)
        rows.append(
            {
                "t": timesteps[i],
                "term": f"decoder_{setup.decoder}" if i == 0 else "kl",
                "bits_per_dim": mean,
                "stderr": math.sqrt(var / n) if n > 1 else None,
                "weight": float(weight_vec[j]),
                "x0_mse": float(sums[2, j] / n),
                "eps_mse": float(sums[3, j] / n),
            }
        )
    # the prior term has no t of its own (issue 20: it was labelled t = T-1 like that t's kl row)
    rows.append(_summary_row("prior", prior, None))
    if bad:
        raise NonFiniteError(
            f"the bound's term is NaN/Inf at {len(bad)} of {len(selected)} timestep(s), first "
            f"at t = {bad[0]} ({cause})",
            rows,
            None,
            bad[0],
        )
    estimate = len(selected) < num
    totals = per_sample + prior
    # a total only where its error is known: every t, or a random draw with two per stratum
    covered = not estimate or strata is not None
    total_bpd: float | None = None
    total_stderr: float | None = None
    if covered:
        row = _summary_row("total_estimate" if estimate else "total", totals, None)
        if strata is not None:
            means = {i: float(sums[0, j] / n) for j, i in enumerate(selected)}
            spread = choice_variance(strata.groups, means)
            row["stderr"] = math.sqrt((row["stderr"] or 0.0) ** 2 + spread)
        rows.append(row)
        total_bpd, total_stderr = row["bits_per_dim"], row["stderr"]
    return BoundResult(
        rows=rows,
        total_bpd=total_bpd,
        total_stderr=total_stderr,
        estimate=estimate,
        decoder=setup.decoder,
        per_sample_total=totals if covered else None,
    )


def _nonfinite_cause(setup: _BoundSetup, i: int) -> str:
    """Why the term at index ``i`` is NaN/Inf: an epsilon model where alpha_t = 0 (x0 = (x_t -
    sigma_t eps)/0: the model's output was finite), else the model's output."""
    if setup.kind == "epsilon" and float(setup.sched.alpha_t[i]) == 0:
        return (
            "alpha_t = 0 there: x0 = (x_t - sigma_t eps)/alpha_t of an epsilon model is "
            "undefined; a v or flow model rebuilds x0 at every t"
        )
    return f"the model returned NaN/Inf there{wider_dtype_hint(setup.model_dtype)}"


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
