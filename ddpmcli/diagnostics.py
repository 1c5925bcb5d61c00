"""Diagnostics: loops over the core that measure what a checkpoint does, batched and streamed.

Every loop here calls the core for its formulas (q_sample, predict_x0, predict_eps, ...), runs under
``torch.inference_mode()``, streams its work in chunks so that peak memory follows the chunk size,
and reports progress through ``callback(n_done, n_total)`` so the caller owns the UI.

Shared helpers (used by every loop in this file): :func:`resolve_device`, :func:`resolve_dtype`,
:func:`work_dtype`, :func:`auto_chunk_size`, :func:`iter_chunks`, the seeded noise of
:func:`sample_noise` (one noise per sample, the reconstruction sweep's) and :func:`pair_noise`
(one per (sample, t) pair, the variational bound's).

Reconstruction (``ddpm reconstruct``): :func:`reconstruction_sweep` and the Bayes-optimal
denoiser :class:`OptimalDenoiser` it compares against.

Index convention: ``t`` is an index into the schedule's arrays (0-based, ``t = 0`` is one noising
step); the model is called with ``schedule.timesteps[t]`` (the identity unless respaced).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
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
    "sample_noise",
    "sample_noise_rows",
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
    seed: int, samples: Sequence[int], ts: Sequence[int], shape: Sequence[int]
) -> Tensor:
    """Standard normal noise ``[len(samples), *shape]``, float64 on CPU, one draw per pair
    ``(samples[j], ts[j])`` (the variational bound of ``ddpm nll`` uses it; the reconstruction
    sweep uses :func:`sample_noise`).

    The noise of ``(sample, t)`` is row ``t mod L`` of a ``[L, numel]`` block drawn by a
    generator seeded with ``pair_seed(seed, sample, t // L)``, ``L = noise_block_length(numel)``:
    it depends on ``(seed, sample, t)`` and the sample shape only, not on the batch size, the
    device, the order of the pairs or which other timesteps are asked for.
    """
    numel = math.prod(shape)
    length = noise_block_length(numel)
    out = torch.empty((len(samples), *shape), dtype=torch.float64)
    flat = out.view(len(samples), numel)
    groups: dict[tuple[int, int], list[int]] = {}
    for j, (s, t) in enumerate(zip(samples, ts, strict=True)):
        groups.setdefault((int(s), int(t) // length), []).append(j)
    gen = torch.Generator()
    for (s, b), rows in groups.items():
        gen.manual_seed(pair_seed(seed, s, b))
        block = torch.randn((length, numel), generator=gen, dtype=torch.float64)
        offsets = torch.tensor([int(ts[j]) - b * length for j in rows])
        flat[torch.tensor(rows)] = block[offsets]
    return out


SAMPLE_NOISE_VALUES = 1 << 16  # values per generator call of sample_noise
_NOISE_TAG = 0x5EED5A4D1E5  # keeps sample_noise's generator seeds apart from pair_seed's


def sample_noise_rows(numel: int) -> int:
    """How many consecutive samples share one generator in :func:`sample_noise`: about
    :data:`SAMPLE_NOISE_VALUES` values a block, between 1 and 256 samples."""
    return max(1, min(256, SAMPLE_NOISE_VALUES // max(1, numel)))


def sample_noise(seed: int, start: int, stop: int, shape: Sequence[int]) -> Tensor:
    """One standard normal noise tensor per sample, ``[stop - start, *shape]``, float64 on CPU:
    the noise ``eps_i`` of samples ``start .. stop - 1``.

    Sample ``i``'s noise is row ``i mod L`` of a ``[L, numel]`` block drawn by a generator
    seeded with a SplitMix64 hash of ``(seed, i // L)``, ``L = sample_noise_rows(numel)``: it
    depends on ``(seed, i)`` and the sample shape only (not on how many samples are drawn, the
    batch size or the device). ``ddpm reconstruct`` noises sample ``i`` with this same ``eps_i``
    at every t (common random numbers across t).
    """
    numel = math.prod(shape)
    rows = sample_noise_rows(numel)
    out = torch.empty((stop - start, numel), dtype=torch.float64)
    gen = torch.Generator()
    first = start // rows
    for block in range(first, -(-stop // rows) if stop > start else first):
        gen.manual_seed(_splitmix64(_splitmix64(seed & _MASK64) ^ _NOISE_TAG ^ block))
        drawn = torch.randn((rows, numel), generator=gen, dtype=torch.float64)
        lo, hi = max(start, block * rows), min(stop, (block + 1) * rows)
        out[lo - start : hi - start] = drawn[lo - block * rows : hi - block * rows]
    return out.view(stop - start, *shape)


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


SWEEP_DATA_BUDGET = 256 * 2**20
"""Bytes of x0 and noise a sweep keeps on the device at once; more samples are swept in groups."""


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
        batch_size: pairs per model call; None picks one with :func:`auto_chunk_size`.
        seed: fixes the noise (see above).
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
        SamplingError: the model returned NaN or Inf (seen as a non-finite ``eps_mse``).
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
    numel = math.prod(shape)
    if compare_optimal is not None and compare_optimal.dim != numel:
        raise DataError(
            f"the optimal denoiser's data have {compare_optimal.dim} values per sample, "
            f"the data {numel}"
        )

    dev = resolve_device(device)
    mdtype = resolve_dtype(dtype)
    wdt = work_dtype(dev)
    pred_type = canonical_prediction_type(model.prediction_type)
    data_lo, data_hi = (float(v) for v in model.data_range)
    n, n_t = int(x0.shape[0]), len(ts)
    total = n * n_t
    chunk = batch_size or auto_chunk_size(
        numel, total, device=dev, bytes_per_element=mdtype.itemsize
    )
    chunk = min(chunk, total)
    # samples whose x0 and noise sit on the device at once: all of them unless they are large
    group = max(1, min(n, SWEEP_DATA_BUDGET // (2 * numel * wdt.itemsize)))

    net = model.to(dev, mdtype)
    # position j of `sched` is timestep ts[j]: chunks index it with their positions directly
    sched = schedule.take(ts).to(dev, wdt)
    optimal = None if compare_optimal is None else compare_optimal.to(dev, wdt)

    # per-pair metrics, summed over values (divided by numel at the end), in these columns
    n_metrics = 5 if optimal is not None else 3  # mse, eps_mse, clip (, optimal_mse, _eps_mse)
    sums = torch.zeros((n_t, n_metrics), dtype=wdt, device=dev)
    per = torch.zeros((total, n_metrics), dtype=wdt, device=dev) if per_sample else None

    # examples for the figure: the first k samples at a spread of the timesteps
    k = example_samples if example_samples is not None else (min(n, 2000) if numel <= 16 else 8)
    k = max(0, min(k, n))
    ex_pos = _spread(ts, example_timesteps)
    ex_xt = torch.zeros((len(ex_pos), k, *shape), dtype=wdt, device=dev)
    ex_x0hat = torch.zeros_like(ex_xt)

    done = 0
    with torch.inference_mode():
        for g0 in range(0, n, group):
            size = min(n, g0 + group) - g0
            x0_g = x0[g0 : g0 + size].detach().to(wdt).to(dev)
            eps_g = sample_noise(seed, g0, g0 + size, shape).to(wdt).to(dev)
            n_ex = max(0, min(k, g0 + size) - g0)  # example samples in this group
            # pair p of the group is (position p // size, sample g0 + p % size)
            for a, b in iter_chunks(size * n_t, chunk):
                pairs = torch.arange(a, b, device=dev)
                ti, si = pairs // size, pairs % size
                x0c, eps = x0_g[si], eps_g[si]
                x_t = sched.q_sample(x0c, ti, eps)
                out, _ = net.predict(x_t.to(mdtype), sched.timesteps[ti])
                out = out.to(wdt)
                x0_hat = sched.predict_x0(out, x_t, ti, pred_type)
                eps_hat = sched.predict_eps(out, x_t, ti, pred_type)
                clamped = x0_hat.clamp(data_lo, data_hi)
                outside = (clamped != x0_hat).flatten(1).sum(1, dtype=wdt)
                if clip:
                    x0_hat = clamped
                metrics = [_sq_sum(x0_hat, x0c), _sq_sum(eps_hat, eps), outside]
                if optimal is not None:
                    x0_opt = optimal.predict_x0(x_t, ti, sched)
                    metrics.append(_sq_sum(x0_opt, x0c))
                    metrics.append(_sq_sum(sched.eps_from_x0(x_t, ti, x0_opt), eps))
                values = torch.stack(metrics, dim=1)
                sums.index_add_(0, ti, values)
                if per is not None:
                    if size == n:
                        per[a:b] = values
                    else:
                        per.index_copy_(0, ti * n + si + g0, values)
                for e, j in enumerate(ex_pos if n_ex else ()):
                    # the example pairs (position j, samples g0 .. g0 + n_ex) in this chunk
                    lo_p, hi_p = max(a, j * size), min(b, j * size + n_ex)
                    if lo_p < hi_p:
                        dst = slice(g0 + lo_p - j * size, g0 + hi_p - j * size)
                        ex_xt[e, dst] = x_t[lo_p - a : hi_p - a]
                        ex_x0hat[e, dst] = x0_hat[lo_p - a : hi_p - a]
                done += b - a
                if callback is not None:
                    callback(done, total)

    got = sums.to("cpu", torch.float64) / numel  # per-t sums over samples of per-pair means
    # finite float64 sums of squares of a finite float32/16 output: non-finite means NaN/Inf
    broken = ~torch.isfinite(got[:, 1])
    if bool(broken.any()):
        first = int(torch.nonzero(broken)[0, 0])
        raise SamplingError(
            f"the model returned NaN/Inf at {int(broken.sum())} of {n_t} timestep(s), first at "
            f"t={ts[first]} (dtype {_dtype_name(mdtype)}; try --dtype float32)"
        )
    peak = (data_hi - data_lo) ** 2
    ts_cpu = torch.tensor(ts, dtype=torch.long)
    alpha_bar = schedule.alpha_bar[ts_cpu].tolist()  # the float64 originals
    snr = schedule.snr[ts_cpu].tolist()
    names = ["mse", "eps_mse", "clip_fraction", *(OPTIMAL_COLUMNS if optimal is not None else ())]
    columns = list(AGGREGATE_COLUMNS) + (list(OPTIMAL_COLUMNS) if optimal is not None else [])
    rows: list[dict[str, Any]] = []
    for j, (t, mean) in enumerate(zip(ts, (got / n).tolist(), strict=True)):
        row: dict[str, Any] = {"t": t, "alpha_bar": alpha_bar[j], "snr": snr[j]}
        row.update(zip(names, mean, strict=True))
        row["psnr"] = _psnr(row["mse"], peak)
        rows.append({c: row[c] for c in columns})

    sample_columns = ["t", "sample", *columns[1:]]
    sample_rows = None
    if per is not None:
        flat = (per.to("cpu", torch.float64) / numel).tolist()
        sample_rows = []
        for p, values in enumerate(flat):
            j, i = divmod(p, n)
            srow: dict[str, Any] = {"t": ts[j], "sample": i, "alpha_bar": alpha_bar[j]}
            srow["snr"] = snr[j]
            srow.update(zip(names, values, strict=True))
            srow["psnr"] = _psnr(srow["mse"], peak)
            sample_rows.append({c: srow[c] for c in sample_columns})

    examples = ReconstructionExamples(
        t=[ts[p] for p in ex_pos],
        x0=x0[:k].detach().to("cpu", torch.float64),
        x_t=ex_xt.to("cpu", torch.float64),
        x0_hat=ex_x0hat.to("cpu", torch.float64),
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
        data_range=(data_lo, data_hi),
        clip=clip,
        device=str(dev),
        dtype=_dtype_name(mdtype),
    )


def _sq_sum(a: Tensor, b: Tensor) -> Tensor:
    """``sum((a - b)^2)`` over all but the first dimension."""
    d = a - b
    return (d * d).flatten(1).sum(1)


def _psnr(mse: float, peak: float) -> float:
    """10 log10(peak / mse) in dB; +inf for a perfect reconstruction."""
    return math.inf if mse <= 0 else 10.0 * math.log10(peak / mse)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
