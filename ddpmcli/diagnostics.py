"""Diagnostics: loops over the core that measure what a checkpoint does, batched and streamed.

Every loop here calls the core for its formulas (q_sample, predict_x0, predict_eps, ...), runs under
``torch.inference_mode()``, streams its work in chunks so that peak memory follows the chunk size,
and reports progress through ``callback(n_done, n_total)`` so the caller owns the UI.

Shared helpers (used by every loop in this file): :func:`resolve_device`, :func:`resolve_dtype`,
:func:`work_dtype`, :func:`auto_chunk_size`, :func:`iter_chunks`, :func:`pair_noise`.

Reconstruction (``ddpm reconstruct``): :func:`reconstruction_sweep` and the Bayes-optimal
denoiser :class:`OptimalDenoiser` it compares against.

Index convention: ``t`` is an index into the schedule's arrays (0-based, ``t = 0`` is one noising
step); the model is called with ``schedule.timesteps[t]`` (the identity unless respaced).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from ddpmcli.core import Schedule, canonical_prediction_type
from ddpmcli.errors import DataError, DdpmError, SamplingError, UsageError

__all__ = [
    "DEVICES",
    "DTYPES",
    "OptimalDenoiser",
    "Progress",
    "ReconstructionExamples",
    "ReconstructionResult",
    "SweepModel",
    "ReconstructionData",
    "auto_chunk_size",
    "default_timesteps",
    "iter_chunks",
    "pair_noise",
    "pair_seed",
    "noise_block_length",
    "reconstruction_data",
    "reconstruction_sweep",
    "resolve_device",
    "resolve_dtype",
    "work_dtype",
]

Progress = Callable[[int, int], None]
"""``callback(n_done, n_total)``, called after every chunk."""

DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda", "mps")
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


# =============================================================================================
# shared helpers: devices, dtypes, chunking, deterministic noise
# =============================================================================================


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``auto`` -> cuda, then mps, then cpu; ``cpu|cuda|mps`` (or ``cuda:1``) checked to exist.

    Raises:
        UsageError: an unknown device name (exit 2).
        DdpmError: a known device this machine does not have (exit 1).
    """
    if isinstance(name, torch.device):
        name = str(name)
    text = (name or "auto").strip().lower()
    kind, _, index = text.partition(":")
    if kind not in DEVICES or (index and not index.isdigit()) or (index and kind != "cuda"):
        raise UsageError(f"unknown device {name!r}; allowed: {', '.join(DEVICES)}")
    if kind == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise DdpmError("device cuda requested but CUDA is not available on this machine")
        if index and int(index) >= torch.cuda.device_count():
            raise DdpmError(
                f"device {text} requested but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    if kind == "mps" and not _mps_available():
        raise DdpmError("device mps requested but MPS is not available on this machine")
    return torch.device(text)


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    """``float32|bfloat16|float16|float64`` (or a torch dtype) -> the torch dtype."""
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise UsageError(f"unsupported dtype {name}; allowed: {', '.join(DTYPES)}")
        return name
    try:
        return DTYPES[name.strip().lower()]
    except KeyError:
        raise UsageError(f"unknown dtype {name!r}; allowed: {', '.join(DTYPES)}") from None


def work_dtype(device: torch.device) -> torch.dtype:
    """The dtype of the diagnostics' own arithmetic on ``device``: float64, except on MPS (which
    has none), whatever dtype the model runs in. Only the model's input and output are cast."""
    return torch.float32 if device.type == "mps" else torch.float64


def auto_chunk_size(
    numel_per_item: int,
    total: int,
    *,
    device: torch.device | str = "cpu",
    budget_bytes: int | None = None,
    bytes_per_element: int = 4,
    activation_factor: int = 256,
    max_chunk: int = 4096,
) -> int:
    """How many items (``numel_per_item`` values each) to push through a model at once.

    The model's activations dominate memory: about ``activation_factor`` times the input per item
    for the small UNets here (32-64 channels at full resolution, a few maps alive at once). The
    budget is 256 MiB on CPU/MPS and a quarter of the free memory on CUDA. The result lies in
    ``[1, min(total, max_chunk)]``; throughput is flat well before ``max_chunk`` on every device.
    """
    dev = torch.device(device)
    if budget_bytes is None:
        budget_bytes = 256 * 2**20
        if dev.type == "cuda":
            free, _ = torch.cuda.mem_get_info(dev)
            budget_bytes = max(budget_bytes, free // 4)
    per_item = max(1, numel_per_item) * bytes_per_element * activation_factor
    return max(1, min(total, max_chunk, budget_bytes // per_item))


def iter_chunks(total: int, chunk: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` ranges covering ``0 .. total`` in steps of ``chunk``."""
    if chunk < 1:
        raise UsageError(f"batch size {chunk}: must be at least 1")
    for start in range(0, total, chunk):
        yield start, min(total, start + chunk)


_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """One step of SplitMix64 (Steele et al. 2014): a bijective 64-bit mixer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def pair_seed(seed: int, sample: int, block: int) -> int:
    """The generator seed of one noise block of ``sample``: a hash of all three, in [0, 2^64)."""
    return _splitmix64(_splitmix64(_splitmix64(seed & _MASK64) ^ sample) ^ block)


NOISE_BLOCK_VALUES = 1024  # values per generator call: amortises its ~5 us overhead, little waste


def noise_block_length(numel: int) -> int:
    """How many consecutive timesteps of one sample share a generator: up to 64, fewer for large
    samples, so that one block holds about :data:`NOISE_BLOCK_VALUES` values."""
    return max(1, min(64, NOISE_BLOCK_VALUES // max(1, numel)))


def pair_noise(
    seed: int,
    samples: Sequence[int],
    ts: Sequence[int],
    shape: Sequence[int],
    *,
    pin_memory: bool = False,
    pool: ThreadPoolExecutor | None = None,
    workers: int = 1,
) -> Tensor:
    """Standard normal noise ``[len(samples), *shape]``, float64 on CPU, for the pairs
    ``(samples[j], ts[j])``.

    The noise of ``(sample, t)`` is row ``t mod L`` of a ``[L, numel]`` block drawn by a
    generator seeded with ``pair_seed(seed, sample, t // L)``, ``L = noise_block_length(numel)``:
    it depends on ``(seed, sample, t)`` and the sample shape only, not on the batch size, the
    device, the order of the pairs or which other timesteps are asked for. Drawing on the CPU in
    float64 keeps it identical across devices and model dtypes. With ``pool``, the blocks are
    split into ``workers`` parts drawn on its threads (torch releases the GIL while it draws).
    """
    numel = math.prod(shape)
    length = noise_block_length(numel)
    out = torch.empty((len(samples), *shape), dtype=torch.float64, pin_memory=pin_memory)
    flat = out.view(len(samples), numel)
    groups: dict[tuple[int, int], list[int]] = {}
    for j, (s, t) in enumerate(zip(samples, ts, strict=True)):
        groups.setdefault((int(s), int(t) // length), []).append(j)
    keys = list(groups)

    def fill(part: Sequence[tuple[int, int]]) -> None:
        # inference mode is per thread: enter it here too, so a worker may write into ``out``
        # whether it was made inside inference mode (a sweep's first chunk) or outside
        with torch.inference_mode():
            _fill(part)

    def _fill(part: Sequence[tuple[int, int]]) -> None:
        gen = torch.Generator()
        for s, b in part:
            gen.manual_seed(pair_seed(seed, s, b))
            block = torch.randn((length, numel), generator=gen, dtype=torch.float64)
            rows = groups[(s, b)]
            offsets = torch.tensor([int(ts[j]) - b * length for j in rows])
            flat[torch.tensor(rows)] = block[offsets]

    if pool is None or workers <= 1 or len(keys) < 2:
        fill(keys)
    else:
        step = math.ceil(len(keys) / workers)
        for future in [pool.submit(fill, keys[i : i + step]) for i in range(0, len(keys), step)]:
            future.result()
    return out


# =============================================================================================
# the Bayes-optimal denoiser
# =============================================================================================


class _Mixture(Protocol):
    """An isotropic Gaussian mixture (``data.GaussianMixture`` is one)."""

    @property
    def weights(self) -> Tensor: ...  # [K]

    @property
    def means(self) -> Tensor: ...  # [K, D]

    @property
    def stds(self) -> Tensor: ...  # [K]


@dataclass(frozen=True)
class OptimalDenoiser:
    """The exact minimum-MSE denoiser ``E[x0 | x_t]`` for a known data distribution.

    - a finite set of points ``x_i`` (weights ``w_i``, uniform by default): the posterior over the
      points is ``softmax_i(log w_i - |x_t - sqrt(ab) x_i|^2 / (2 (1 - ab)))`` and
      ``E[x0 | x_t] = sum_i p_i x_i`` (Karras et al. 2022, appendix B.3, in DDPM notation);
    - an isotropic Gaussian mixture ``sum_k w_k N(mu_k, s_k^2 I)``: given component ``k``,
      ``x_t ~ N(sqrt(ab) mu_k, v_k I)`` with ``v_k = ab s_k^2 + 1 - ab``, and
      ``E[x0 | x_t, k] = mu_k + sqrt(ab) s_k^2 / v_k (x_t - sqrt(ab) mu_k)`` (Gaussian
      conditioning); responsibilities ``softmax_k(log w_k - |x_t - sqrt(ab) mu_k|^2/(2 v_k)
      - D/2 log v_k)``.

    ``sqrt(ab)`` and ``1 - ab`` are the schedule's own float64 arrays. Everything is computed in
    float64 (float32 on MPS). The optimal noise prediction follows from the core's
    ``eps_from_x0``; no other formula is needed.
    """

    kind: str  # "points" | "mixture"
    points: Tensor | None = None  # [N, D]
    log_weights: Tensor | None = None  # [N] or [K]
    means: Tensor | None = None  # [K, D]
    variances: Tensor | None = None  # [K]
    max_pairs: int = field(default=1 << 22, repr=False)  # batch x points per block

    @classmethod
    def from_points(cls, points: Tensor, weights: Tensor | None = None) -> OptimalDenoiser:
        """The denoiser of the empirical distribution of ``points`` ``[N, *shape]``."""
        if points.ndim < 2 or points.shape[0] < 1:
            raise DataError("the optimal denoiser needs at least one data point [N, ...]")
        flat = points.detach().to("cpu", torch.float64).reshape(points.shape[0], -1)
        w = (
            torch.full((flat.shape[0],), 1.0 / flat.shape[0], dtype=torch.float64)
            if weights is None
            else weights.detach().to("cpu", torch.float64)
        )
        return cls(kind="points", points=flat, log_weights=torch.log(w))

    @classmethod
    def from_mixture(cls, mixture: _Mixture) -> OptimalDenoiser:
        """The denoiser of an isotropic Gaussian mixture (``weights``, ``means``, ``stds``)."""
        means = mixture.means.detach().to("cpu", torch.float64)
        weights = mixture.weights.detach().to("cpu", torch.float64)
        stds = mixture.stds.detach().to("cpu", torch.float64)
        return cls(
            kind="mixture",
            log_weights=torch.log(weights / weights.sum()),
            means=means.reshape(means.shape[0], -1),
            variances=stds**2,
        )

    @property
    def dim(self) -> int:
        source = self.points if self.kind == "points" else self.means
        return int(source.shape[1]) if source is not None else 0

    def to(self, device: torch.device, dtype: torch.dtype = torch.float64) -> OptimalDenoiser:
        """The same denoiser with its arrays on ``device`` in ``dtype``."""

        def move(x: Tensor | None) -> Tensor | None:
            return None if x is None else x.to(dtype=dtype).to(device=device)

        return OptimalDenoiser(
            kind=self.kind,
            points=move(self.points),
            log_weights=move(self.log_weights),
            means=move(self.means),
            variances=move(self.variances),
            max_pairs=self.max_pairs,
        )

    def predict_x0(self, x_t: Tensor, t: Tensor, schedule: Schedule) -> Tensor:
        """``E[x0 | x_t]`` for ``x_t`` ``[B, *shape]`` at schedule indices ``t`` ``[B]``."""
        flat = x_t.reshape(x_t.shape[0], -1)
        if flat.shape[1] != self.dim:
            raise DataError(
                f"the optimal denoiser's data have {self.dim} values per sample, x_t has "
                f"{flat.shape[1]}"
            )
        t = t.to(device=x_t.device)
        s = schedule.sqrt_alpha_bar.to(x_t.dtype).to(x_t.device)[t][:, None]
        one_minus = schedule.one_minus_alpha_bar.to(x_t.dtype).to(x_t.device)[t][:, None]
        n_ref = self.points.shape[0] if self.points is not None else 1
        step = max(1, self.max_pairs // n_ref)
        parts = [
            self._points(flat[i : i + step], s[i : i + step], one_minus[i : i + step])
            if self.kind == "points"
            else self._mixture(flat[i : i + step], s[i : i + step], one_minus[i : i + step])
            for i in range(0, flat.shape[0], step)
        ]
        return torch.cat(parts).reshape(x_t.shape)

    def _points(self, x: Tensor, s: Tensor, one_minus: Tensor) -> Tensor:
        pts, logw = self.points, self.log_weights
        if pts is None or logw is None:  # pragma: no cover - guaranteed by the constructors
            raise DdpmError("internal: point denoiser without points")
        # -|x_t - s x_i|^2 / (2(1 - ab)) without the |x_t|^2 term, which softmax cancels
        logits = (s * (x @ pts.T) - 0.5 * s**2 * (pts**2).sum(1)) / one_minus + logw
        return torch.softmax(logits, dim=1) @ pts

    def _mixture(self, x: Tensor, s: Tensor, one_minus: Tensor) -> Tensor:
        mu, logw, var = self.means, self.log_weights, self.variances
        if mu is None or logw is None or var is None:  # pragma: no cover
            raise DdpmError("internal: mixture denoiser without components")
        v = s**2 * var + one_minus  # [B, K]
        dist2 = (x**2).sum(1, keepdim=True) - 2 * s * (x @ mu.T) + s**2 * (mu**2).sum(1)
        logits = logw - 0.5 * dist2.clamp(min=0) / v - 0.5 * x.shape[1] * torch.log(v)
        r = torch.softmax(logits, dim=1)  # [B, K]
        gain = r * (s * var / v)  # sum_k r_k sqrt(ab) s_k^2 / v_k (x_t - sqrt(ab) mu_k)
        return r @ mu + gain.sum(1, keepdim=True) * x - s * (gain @ mu)


# =============================================================================================
# reconstruction sweep
# =============================================================================================


class SweepModel(Protocol):
    """What a sweep needs of a model (``checkpoints.LoadedModel`` has it)."""

    schedule: Schedule
    prediction_type: str
    data_range: tuple[float, float]

    def predict(self, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor | None]: ...

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
OPTIMAL_COLUMNS: tuple[str, ...] = ("optimal_mse", "optimal_eps_mse")


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
    if num_steps <= k:
        return list(range(num_steps))
    return sorted({round(i * (num_steps - 1) / (k - 1)) for i in range(k)})


@dataclass
class ReconstructionData:
    """The samples a sweep reconstructs and, when asked for, their data's optimal denoiser."""

    x0: Tensor
    source: str
    optimal: OptimalDenoiser | None


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

    if n is not None and n < 1:
        raise UsageError(f"--n {n}: must be at least 1")
    shape = tuple(int(d) for d in model.data_shape)
    lo, hi = (float(v) for v in model.data_range)
    optimal = None
    if source is None:
        refs = getattr(model, "reference_samples", None)
        if refs is None:
            raise UsageError(
                "this checkpoint holds no reference samples; give --data (an .npy/.npz file, an "
                f"image folder or a built-in set: {', '.join(datasets.BUILTIN_DATASETS)})"
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
                raise UsageError(
                    f"--compare-optimal: the built-in set {source!r} is neither a finite set nor "
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


def _spread(values: Sequence[int], k: int) -> list[int]:
    """Up to ``k`` positions spread evenly over ``values`` (first and last included)."""
    if len(values) <= k:
        return list(range(len(values)))
    return sorted({round(i * (len(values) - 1) / (k - 1)) for i in range(k)})


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
    callback: Progress | None = None,
    example_samples: int | None = None,
    example_timesteps: int = 10,
) -> ReconstructionResult:
    """Noise ``x0`` to ``x_t`` at each timestep, let the model predict, rebuild x0, measure.

    For every pair ``(sample i, t)``: ``eps ~ N(0, I)`` (seeded per pair, see :func:`pair_noise`),
    ``x_t = q_sample(x0_i, t, eps)``; the model's output gives ``x0_hat = predict_x0(...)`` and
    ``eps_hat = predict_eps(...)`` (the core's formulas, one for every prediction type). Per t:

    - ``mse``: mean of ``(x0_hat - x0)^2`` over samples and values (``x0_hat`` clipped to the data
      range first when ``clip``); ``psnr = 10 log10((hi - lo)^2 / mse)``;
    - ``eps_mse``: mean of ``(eps_hat - eps)^2`` (never clipped);
    - ``clip_fraction``: fraction of the values of ``x0_hat`` outside the data range, before
      clipping;
    - with ``compare_optimal``: ``optimal_mse``/``optimal_eps_mse`` of the Bayes-optimal
      denoiser on the same ``x_t`` (never clipped).

    Pairs stream through the model in chunks of ``batch_size`` (t-major order), under
    ``torch.inference_mode()``; aggregates are float64 running sums, so peak memory grows with the
    chunk, not with ``n x len(timesteps)``. The sweep's own arithmetic is float64 (float32 on MPS);
    only the model's input and output are in ``dtype``.

    Args:
        model: a :class:`SweepModel` (``checkpoints.LoadedModel``); moved with ``.to``.
        x0: data ``[n, *data_shape]`` in the model's range.
        timesteps: schedule indices in ``[0, num_steps)``, in the order of the rows.
        batch_size: pairs per model call; None picks one with :func:`auto_chunk_size`.
        seed: fixes the noise; the numbers do not depend on ``batch_size`` or ``device``.
        device, dtype: where and in which dtype the model runs.
        clip: clip ``x0_hat`` to the data range before measuring ``mse``.
        per_sample: also return one row per (t, sample).
        compare_optimal: the data distribution's optimal denoiser, or None.
        callback: ``callback(pairs_done, pairs_total)`` after every chunk.
        example_samples: samples kept for the figure (default 8 for images, up to 2000 for
            vectors of up to 16 values); example_timesteps: at most that many t, spread.

    Raises:
        UsageError: an empty or out-of-range timestep list, a bad batch size (exit 2).
        DataError: data that do not fit the model.
        SamplingError: the model returned NaN or Inf.
    """
    schedule = model.schedule
    num_steps = schedule.num_steps
    ts = [int(t) for t in timesteps]
    if not ts:
        raise UsageError("no timesteps selected")
    bad = [t for t in ts if not 0 <= t < num_steps]
    if bad:
        raise UsageError(f"--t {bad[0]} is out of range; allowed: 0..{num_steps - 1}")
    if x0.ndim < 2 or x0.shape[0] < 1:
        raise DataError(f"data of shape {list(x0.shape)} is not a batch of samples")
    want = getattr(model, "data_shape", None)
    shape = tuple(int(d) for d in x0.shape[1:])
    if want is not None and tuple(want) != shape:
        raise DataError(f"data samples have shape {list(shape)}, the model wants {list(want)}")
    if batch_size is not None and batch_size < 1:
        raise UsageError(f"--batch-size {batch_size}: must be at least 1")
    if compare_optimal is not None and compare_optimal.dim != math.prod(shape):
        raise DataError(
            f"the optimal denoiser's data have {compare_optimal.dim} values per sample, "
            f"the data {math.prod(shape)}"
        )

    dev = resolve_device(device)
    mdtype = resolve_dtype(dtype)
    wdt = work_dtype(dev)
    pred_type = canonical_prediction_type(model.prediction_type)
    lo, hi = (float(v) for v in model.data_range)
    n, n_t = int(x0.shape[0]), len(ts)
    total = n * n_t
    chunk = batch_size or auto_chunk_size(
        math.prod(shape), total, device=dev, bytes_per_element=mdtype.itemsize
    )
    chunk = min(chunk, total)

    net = model.to(dev, mdtype)
    schedule = _schedule_on(schedule, dev, wdt)
    optimal = None if compare_optimal is None else compare_optimal.to(dev, wdt)
    x0_dev = x0.detach().to(wdt).to(dev)
    ts_cpu = torch.tensor(ts, dtype=torch.long)
    ts_dev = ts_cpu.to(dev)
    model_ts = schedule.timesteps.to(torch.long).to(dev)

    # running sums per timestep (float64 on the device; read back once at the end)
    sums = {
        name: torch.zeros(n_t, dtype=wdt, device=dev)
        for name in ("mse", "eps_mse", "clip", "optimal_mse", "optimal_eps_mse", "nonfinite")
    }
    per: dict[str, Tensor] = {}
    if per_sample:
        per = {
            name: torch.zeros(n_t * n, dtype=wdt, device=dev)
            for name in ("mse", "eps_mse", "clip", "optimal_mse", "optimal_eps_mse")
        }

    # examples for the figure: the first k samples at a spread of the timesteps
    numel = math.prod(shape)
    k = example_samples if example_samples is not None else (min(n, 2000) if numel <= 16 else 8)
    k = max(0, min(k, n))
    ex_pos = _spread(ts, example_timesteps)
    # everything indexed on the device, so the loop never waits for it (a host-to-device copy
    # without non_blocking would): pairs that are not examples are written to a spare last slot
    n_ex = len(ex_pos)
    ex_of_ti = torch.full((n_t,), n_ex, dtype=torch.long)
    ex_of_ti[torch.tensor(ex_pos, dtype=torch.long)] = torch.arange(n_ex)
    ex_of_ti = ex_of_ti.to(dev)
    ex_xt = torch.zeros((n_ex + 1, k + 1, *shape), dtype=wdt, device=dev)
    ex_x0hat = torch.zeros_like(ex_xt)

    noise_source = _NoiseStream(seed, n, ts_cpu, shape, chunk, total, dev)
    dims = tuple(range(1, x0.ndim))
    try:
        with torch.inference_mode():
            for (start, stop), noise_cpu in zip(noise_source.ranges, noise_source, strict=True):
                pairs = torch.arange(start, stop, device=dev)
                ti, si = pairs // n, pairs % n
                t_idx = ts_dev[ti]
                noise = noise_cpu.to(dev, non_blocking=True).to(wdt)
                x0c = x0_dev[si]
                x_t = schedule.q_sample(x0c, t_idx, noise)
                out, _ = net.predict(x_t.to(mdtype), model_ts[t_idx])
                out = out.to(wdt)
                sums["nonfinite"].index_add_(
                    0, ti, (~torch.isfinite(out)).flatten(1).sum(1).to(wdt)
                )
                x0_hat = schedule.predict_x0(out, x_t, t_idx, pred_type)
                eps_hat = schedule.predict_eps(out, x_t, t_idx, pred_type)
                outside = ((x0_hat < lo) | (x0_hat > hi)).to(wdt).mean(dim=dims)
                if clip:
                    x0_hat = x0_hat.clamp(lo, hi)
                metrics = {
                    "mse": ((x0_hat - x0c) ** 2).mean(dim=dims),
                    "eps_mse": ((eps_hat - noise) ** 2).mean(dim=dims),
                    "clip": outside,
                }
                if optimal is not None:
                    x0_opt = optimal.predict_x0(x_t, t_idx, schedule)
                    eps_opt = schedule.eps_from_x0(x_t, t_idx, x0_opt)
                    metrics["optimal_mse"] = ((x0_opt - x0c) ** 2).mean(dim=dims)
                    metrics["optimal_eps_mse"] = ((eps_opt - noise) ** 2).mean(dim=dims)
                for name, values in metrics.items():
                    sums[name].index_add_(0, ti, values)
                    if per_sample:
                        per[name][start:stop] = values
                if k:
                    ex_rows = ex_of_ti[ti]
                    ex_cols = torch.where(ex_rows < n_ex, si.clamp(max=k), k)
                    ex_rows = torch.where(ex_cols < k, ex_rows, n_ex)
                    ex_xt[ex_rows, ex_cols] = x_t
                    ex_x0hat[ex_rows, ex_cols] = x0_hat
                if callback is not None:
                    callback(stop, total)
    finally:
        noise_source.close()

    got = {name: values.to("cpu", torch.float64) for name, values in sums.items()}
    nonfinite = got.pop("nonfinite")
    if bool((nonfinite > 0).any()):
        first = int(torch.nonzero(nonfinite > 0)[0, 0])
        raise SamplingError(
            f"the model returned {int(nonfinite.sum())} NaN/Inf value(s), first at t={ts[first]} "
            f"(dtype {_dtype_name(mdtype)}; try --dtype float32)"
        )
    scale = 1.0 / (n * 1.0)
    peak = (hi - lo) ** 2
    alpha_bar = model.schedule.alpha_bar[ts_cpu]  # the float64 originals, on the CPU
    snr = model.schedule.snr[ts_cpu]
    columns = list(AGGREGATE_COLUMNS) + (list(OPTIMAL_COLUMNS) if optimal is not None else [])
    rows: list[dict[str, Any]] = []
    for j, t in enumerate(ts):
        mse = float(got["mse"][j]) * scale
        row: dict[str, Any] = {
            "t": t,
            "alpha_bar": float(alpha_bar[j]),
            "snr": float(snr[j]),
            "mse": mse,
            "psnr": _psnr(mse, peak),
            "eps_mse": float(got["eps_mse"][j]) * scale,
            "clip_fraction": float(got["clip"][j]) * scale,
        }
        if optimal is not None:
            row["optimal_mse"] = float(got["optimal_mse"][j]) * scale
            row["optimal_eps_mse"] = float(got["optimal_eps_mse"][j]) * scale
        rows.append(row)

    sample_columns = ["t", "sample", *columns[1:]]
    sample_rows = None
    if per_sample:
        flat = {name: values.to("cpu", torch.float64).tolist() for name, values in per.items()}
        sample_rows = []
        for p in range(total):
            j, i = divmod(p, n)
            mse = flat["mse"][p]
            srow: dict[str, Any] = {
                "t": ts[j],
                "sample": i,
                "alpha_bar": rows[j]["alpha_bar"],
                "snr": rows[j]["snr"],
                "mse": mse,
                "psnr": _psnr(mse, peak),
                "eps_mse": flat["eps_mse"][p],
                "clip_fraction": flat["clip"][p],
            }
            if optimal is not None:
                srow["optimal_mse"] = flat["optimal_mse"][p]
                srow["optimal_eps_mse"] = flat["optimal_eps_mse"][p]
            sample_rows.append(srow)

    examples = ReconstructionExamples(
        t=[ts[p] for p in ex_pos],
        x0=x0[:k].detach().to("cpu", torch.float64),
        x_t=ex_xt[:n_ex, :k].to("cpu", torch.float64),
        x0_hat=ex_x0hat[:n_ex, :k].to("cpu", torch.float64),
    )
    return ReconstructionResult(
        columns=columns,
        rows=rows,
        sample_columns=sample_columns,
        sample_rows=sample_rows,
        examples=examples,
        timesteps=ts,
        n_samples=n,
        batch_size=chunk,
        prediction_type=pred_type,
        data_range=(lo, hi),
        clip=clip,
        device=str(dev),
        dtype=_dtype_name(mdtype),
    )


def _schedule_on(schedule: Schedule, device: torch.device, dtype: torch.dtype) -> Schedule:
    """The same schedule with its float64 arrays already on ``device`` in ``dtype``, so that the
    core's per-call ``extract`` casts are no-ops (on CUDA each would be a blocking copy)."""
    moved: dict[str, Any] = {
        f.name: value.to(dtype=dtype).to(device=device)
        for f in dataclasses.fields(schedule)
        if isinstance(value := getattr(schedule, f.name), Tensor) and value.is_floating_point()
    }
    return dataclasses.replace(schedule, **moved)


def _psnr(mse: float, peak: float) -> float:
    """10 log10(peak / mse) in dB; +inf for a perfect reconstruction."""
    return math.inf if mse <= 0 else 10.0 * math.log10(peak / mse)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class _NoiseStream:
    """The noise of each chunk, in order. On an accelerator the next chunk's noise is drawn while
    the device runs the current one (a prefetch thread, the blocks spread over a few more, into
    pinned memory), so the CPU generators stay off the critical path; on the CPU it is drawn
    inline, leaving the cores to the model."""

    def __init__(
        self,
        seed: int,
        n: int,
        ts: Tensor,
        shape: tuple[int, ...],
        chunk: int,
        total: int,
        device: torch.device,
    ) -> None:
        self._seed, self._n, self._ts, self._shape = seed, n, ts.tolist(), shape
        self.ranges = list(iter_chunks(total, chunk))
        self._pin = device.type == "cuda"
        accelerated = device.type != "cpu"
        self._prefetch = ThreadPoolExecutor(max_workers=1) if accelerated else None
        workers = max(1, min(8, (os.cpu_count() or 1) // 2))
        self._workers = ThreadPoolExecutor(max_workers=workers) if accelerated else None
        self._n_workers = workers

    def _draw(self, start: int, stop: int) -> Tensor:
        samples = [p % self._n for p in range(start, stop)]
        steps = [self._ts[p // self._n] for p in range(start, stop)]
        return pair_noise(
            self._seed, samples, steps, self._shape, pin_memory=self._pin,
            pool=self._workers, workers=self._n_workers,
        )  # fmt: skip

    def __iter__(self) -> Iterator[Tensor]:
        if self._prefetch is None:
            for start, stop in self.ranges:
                yield self._draw(start, stop)
            return
        pending: Future[Tensor] | None = None
        for i, (start, stop) in enumerate(self.ranges):
            current = pending.result() if pending is not None else self._draw(start, stop)
            if i + 1 < len(self.ranges):
                pending = self._prefetch.submit(self._draw, *self.ranges[i + 1])
            yield current

    def close(self) -> None:
        for pool in (self._prefetch, self._workers):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
