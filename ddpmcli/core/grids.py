"""Inference grids: the sigma, lambda and flow-time grids samplers step on (pure float64 functions).

Every grid is a 1-D float64 tensor ordered as a sampler walks it, the noisiest value first, with
no final 0 appended (a sampler appends its own terminal value). The formulas are the papers':

- Karras et al. 2022 (EDM), eq. (5): ``sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) -
  sigma_max^(1/rho)))^rho``;
- exponential: uniform in ``log sigma`` (k-diffusion's ``get_sigmas_exponential``);
- beta: Lee et al. 2024, "Beta Sampling is All You Need": ``sigma_min + ppf(1 - i/(n-1)) (sigma_max
  - sigma_min)`` with ``ppf`` the quantile of Beta(alpha, beta);
- "lu": Lu et al. 2022 (DPM-Solver), uniform in the half log-SNR ``lambda``;
- flow shift (Esser et al. 2024, SD3, eq. 23): ``s' = shift s / (1 + (shift - 1) s)``, and the
  resolution-dependent time shift of Flux ``exp(mu) / (exp(mu) + (1/s - 1)^p)`` (or ``mu / (mu +
  (1/s - 1)^p)``, "linear", CogView4) with ``mu`` linear in the image sequence length.

Where diffusers builds the same grid, the arithmetic here follows the same order of operations in
float64 (numpy's ``linspace`` is ``start + i * step`` with the last value set to ``stop``), so a
grid cast to float32 gives diffusers' float32 digits. Imports torch and the standard library only.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ddpmcli.choices import TIME_SHIFT_TYPES as TIME_SHIFT_TYPES
from ddpmcli.choices import TimeShiftType
from ddpmcli.errors import ScheduleParameterError

F64 = torch.float64


def _count(n: int, name: str = "n") -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ScheduleParameterError(f"{name} must be a whole number >= 1, got {n!r}")
    return n


def _positive(value: float, name: str) -> float:
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ScheduleParameterError(f"{name} must be a finite number > 0, got {value!r}")
    return value


def _range(sigma_min: float, sigma_max: float) -> tuple[float, float]:
    lo, hi = _positive(sigma_min, "sigma_min"), _positive(sigma_max, "sigma_max")
    if lo >= hi:
        raise ScheduleParameterError(f"sigma_min ({lo!r}) must be below sigma_max ({hi!r})")
    return lo, hi


def linspace(start: float, stop: float, n: int) -> Tensor:
    """numpy's ``linspace(start, stop, n)`` in float64, digit for digit: ``start + i * step`` with
    ``step = (stop - start)/(n - 1)`` and the last value exactly ``stop`` (torch's own linspace
    counts the second half from ``stop``, which differs in the last bit)."""
    _count(n)
    if n == 1:
        return torch.tensor([float(start)], dtype=F64)
    step = (float(stop) - float(start)) / (n - 1)
    index = torch.arange(n, dtype=F64)
    values = index / (n - 1) * (float(stop) - float(start)) if step == 0 else index * step
    values = values + float(start)
    values[-1] = float(stop)
    return values


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """The EDM grid (Karras et al. 2022, eq. 5): n sigmas from sigma_max down to sigma_min,
    uniform in ``sigma^(1/rho)``. Shape (n,), float64, descending, no final 0."""
    _count(n)
    lo, hi = _range(sigma_min, sigma_max)
    rho = _positive(rho, "rho")
    ramp = linspace(0.0, 1.0, n)
    min_inv_rho = lo ** (1.0 / rho)
    max_inv_rho = hi ** (1.0 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def exponential_sigmas(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """n sigmas from sigma_max down to sigma_min, uniform in ``log sigma``. Shape (n,), float64."""
    _count(n)
    lo, hi = _range(sigma_min, sigma_max)
    return torch.exp(linspace(math.log(hi), math.log(lo), n))


def lu_lambdas(n: int, lambda_min: float, lambda_max: float) -> Tensor:
    """DPM-Solver's "lu" grid (Lu et al. 2022): n values uniform from ``lambda_max`` down to
    ``lambda_min`` (``lambda_max + r (lambda_min - lambda_max)``, r = 0..1). Uniform in any affine
    function of log-SNR; diffusers applies it to ``log sigma`` (= -lambda), so pass the grid's log
    sigmas and take ``exp`` of the result (:func:`lu_sigmas`). Shape (n,), float64."""
    _count(n)
    lo, hi = float(lambda_min), float(lambda_max)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ScheduleParameterError("lambda_min and lambda_max must be finite")
    ramp = linspace(0.0, 1.0, n)
    return hi + ramp * (lo - hi)


def lu_sigmas(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """The "lu" grid as sigmas: ``exp(lu_lambdas(n, log sigma_min, log sigma_max))``, descending."""
    lo, hi = _range(sigma_min, sigma_max)
    return torch.exp(lu_lambdas(n, math.log(lo), math.log(hi)))


# --------------------------------------------------------------------------------------------
# Beta quantile (the regularized incomplete beta function and its inverse), standard library only
# --------------------------------------------------------------------------------------------


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b) (modified Lentz), converging for x < (a+1)/(a+b+2)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        for aa in (
            m * (b - m) * x / ((qam + m2) * (a + m2)),
            -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)),
        ):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-16:
            break
    return h


def beta_cdf(x: float, a: float, b: float) -> float:
    """The regularized incomplete beta function I_x(a, b), the CDF of Beta(a, b) at x."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (
        a * math.log(x)
        + b * math.log1p(-x)
        - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    )
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def beta_ppf(q: float, a: float, b: float) -> float:
    """The quantile of Beta(a, b): the x with I_x(a, b) = q (bisection bracket, Newton steps)."""
    if q <= 0.0:
        return 0.0
    if q >= 1.0:
        return 1.0
    lo, hi = 0.0, 1.0
    x = q
    log_norm = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    for _ in range(200):
        f = beta_cdf(x, a, b) - q
        if f == 0.0:
            return x
        if f > 0:
            hi = x
        else:
            lo = x
        density = math.exp((a - 1.0) * math.log(x) + (b - 1.0) * math.log1p(-x) - log_norm)
        step = f / density if density > 0 else math.inf
        new = x - step
        if not (lo < new < hi):  # Newton left the bracket: bisect instead
            new = 0.5 * (lo + hi)
        if abs(new - x) <= 1e-17 * max(abs(x), 1e-300) or hi - lo <= 4e-16 * x:
            return new
        x = new
    return x


def beta_sigmas(
    n: int, sigma_min: float, sigma_max: float, alpha: float = 0.6, beta: float = 0.6
) -> Tensor:
    """Lee et al. 2024: ``sigma_min + ppf(1 - i/(n-1)) (sigma_max - sigma_min)``, ppf the quantile
    of Beta(alpha, beta): denser at both ends. Shape (n,), float64, descending."""
    _count(n)
    lo, hi = _range(sigma_min, sigma_max)
    a, b = _positive(alpha, "alpha"), _positive(beta, "beta")
    levels = (1 - linspace(0.0, 1.0, n)).tolist()
    return torch.tensor([lo + beta_ppf(q, a, b) * (hi - lo) for q in levels], dtype=F64)


# --------------------------------------------------------------------------------------------
# Flow-matching time shifts
# --------------------------------------------------------------------------------------------


def flow_shift(s: Tensor, shift: float) -> Tensor:
    """SD3's static shift (Esser et al. 2024, eq. 23): ``s' = shift s / (1 + (shift - 1) s)``.

    Maps [0, 1] onto itself, monotone; ``shift > 1`` moves every s towards the noise end. Its
    complement ``1 - s' = (1 - s)/(1 + (shift - 1) s)`` is :func:`flow_shift_complement`."""
    shift = _positive(shift, "shift")
    return shift * s / (1 + (shift - 1) * s)


def flow_shift_complement(s: Tensor, shift: float) -> Tensor:
    """``1 - flow_shift(s, shift) = (1 - s)/(1 + (shift - 1) s)``, exact near s' = 1."""
    shift = _positive(shift, "shift")
    return (1 - s) / (1 + (shift - 1) * s)


def time_shift(
    mu: float, sigma_power: float, s: Tensor, kind: TimeShiftType | str = "exponential"
) -> Tensor:
    """Flux's resolution-dependent shift of flow times s in [0, 1]:
    exponential ``e^mu / (e^mu + (1/s - 1)^p)``, linear ``mu / (mu + (1/s - 1)^p)``.

    Evaluated as ``1 / (1 + c ((1 - s)/s)^p)`` with ``c = e^-mu`` (or ``1/mu``), which keeps its
    digits as s nears 1 (``1/s - 1`` loses them). ``exponential`` with p = 1 equals
    :func:`flow_shift` with ``shift = e^mu``."""
    mu, power = float(mu), _positive(sigma_power, "sigma_power")
    if not math.isfinite(mu):
        raise ScheduleParameterError(f"mu must be finite, got {mu!r}")
    if kind == "exponential":
        inverse = math.exp(-mu)
    elif kind == "linear":
        inverse = 1.0 / _positive(mu, "mu")
    else:
        raise ScheduleParameterError(
            f"time_shift_type must be one of {', '.join(TIME_SHIFT_TYPES)}, got {kind!r}"
        )
    odds = ((1 - s) / s) ** power
    return 1 / (1 + inverse * odds)


def flux_mu(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """Flux's ``calculate_shift``: mu linear in the image sequence length, ``base_shift`` at
    ``base_seq_len`` and ``max_shift`` at ``max_seq_len`` (extrapolated outside them; ``ddpm check``
    warns). Same arithmetic order as diffusers' pipelines."""
    if isinstance(image_seq_len, bool) or not isinstance(image_seq_len, int) or image_seq_len < 1:
        raise ScheduleParameterError(
            f"image_seq_len must be a whole number >= 1, got {image_seq_len!r}"
        )
    if base_seq_len == max_seq_len:
        raise ScheduleParameterError(
            f"base_image_seq_len and max_image_seq_len are equal ({base_seq_len!r})"
        )
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


calculate_shift = flux_mu


def cogview4_mu(
    image_seq_len: int, base_seq_len: int = 256, base_shift: float = 0.25, max_shift: float = 0.75
) -> float:
    """CogView4's pipeline ``calculate_shift`` (used with the linear time shift):
    ``mu = sqrt(image_seq_len / base_seq_len) max_shift + base_shift``."""
    if isinstance(image_seq_len, bool) or not isinstance(image_seq_len, int) or image_seq_len < 1:
        raise ScheduleParameterError(
            f"image_seq_len must be a whole number >= 1, got {image_seq_len!r}"
        )
    m = (image_seq_len / base_seq_len) ** 0.5
    return m * max_shift + base_shift


def image_seq_len(height: int, width: int, vae_scale_factor: int = 8, patch_size: int = 2) -> int:
    """Tokens of a packed latent image: ``(height // f) * (width // f)``, f = vae_scale_factor *
    patch_size (Flux packs 2x2 latent patches: 1024x1024 is 4096 tokens, as SD3's patchify)."""
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ScheduleParameterError(f"{name} must be a whole number >= 1, got {value!r}")
    step = vae_scale_factor * patch_size
    return (height // step) * (width // step)


# --------------------------------------------------------------------------------------------
# Sigma grids back onto a training table
# --------------------------------------------------------------------------------------------


def sigma_to_timestep(sigma: Tensor, train_sigmas: Tensor) -> Tensor:
    """Float timesteps of the sigmas ``sigma`` on a training table (diffusers' ``_sigma_to_t``):
    linear interpolation in ``log sigma`` between the two neighbouring table entries, clamped to
    ``[0, T - 1]``. ``train_sigmas`` is the table, ascending in t (``Schedule.sigma``); its log is
    taken in its own dtype (diffusers takes it in float32), the interpolation in float64."""
    table = train_sigmas
    if table.dim() != 1 or table.numel() < 2:
        raise ScheduleParameterError("the training sigma table must be 1-D with at least 2 entries")
    log_table = torch.log(table).to(F64)
    values = sigma.to(F64).reshape(-1)
    log_sigma = torch.log(torch.clamp(values, min=1e-10))
    at_or_above = (log_sigma[None, :] - log_table[:, None]) >= 0
    # the last table index at or below each sigma (0 where none is), kept below T - 1
    low = (
        torch.cumsum(at_or_above.to(torch.int64), dim=0).argmax(dim=0).clamp(max=table.numel() - 2)
    )
    high = low + 1
    lo, hi = log_table[low], log_table[high]
    w = torch.clamp((lo - log_sigma) / (lo - hi), 0, 1)
    return ((1 - w) * low + w * high).reshape(sigma.shape)


# --------------------------------------------------------------------------------------------
# One view across families: normalised time and the per-step log-SNR gap
# --------------------------------------------------------------------------------------------


def log_snr_gaps(log_snr: Tensor) -> Tensor:
    """The log-SNR gap a sampler crosses at each entry, h_i = lambda_{i-1} - lambda_i (entry 0
    the least noisy; lambda = log SNR here, twice DPM-Solver's half log-SNR, so h is twice its h).
    Entry 0's step lands on clean data, lambda = +inf: h_0 = inf. Shape as ``log_snr``."""
    gaps = torch.full_like(log_snr, math.inf)
    gaps[1:] = log_snr[:-1] - log_snr[1:]
    return gaps


def normalised_time(
    path: str, timesteps: Tensor, sigma_t: Tensor, num_train_timesteps: int
) -> Tensor:
    """Each entry's time in (0, 1], 1 the noisiest end of training: a VP model's (t + 1)/T (its
    0-based training timestep), a flow's s itself (sigma_t), and for sigma-space paths, whose
    time is the noise level, the entry's rank (i + 1)/N."""
    if path == "vp":
        return (timesteps.to(F64) + 1) / num_train_timesteps
    if path == "flow":
        return sigma_t.to(F64)
    n = sigma_t.numel()
    return torch.arange(1, n + 1, dtype=F64) / n
