"""The torch core of ddpm: every noise schedule, the forward process, the posterior and the
conversions between predictions, in float64.

Index convention (diffusers and improved-diffusion): timesteps are 0-based as the models take them.
``t = 0`` is one noising step, ``alpha_bar_prev[0] = 1``; the paper's step is ``t + 1``.

Every schedule is reduced to three float64 arrays computed in a stable form -- ``beta``,
``log_alpha_bar`` and ``one_minus_alpha_bar`` -- from which every other quantity follows in one
line each (see :class:`Schedule`). Holding ``log alpha_bar`` and ``1 - alpha_bar`` separately is
what keeps every quantity within about 1e-13 relative of an arbitrary-precision evaluation:
``1 - ab`` is tiny near ``t = 0`` and ``ab`` is tiny near ``t = T - 1``, and neither can be
recovered from the other by subtraction without losing digits.

This module imports torch and the standard library only; it never prints and never touches files.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor

from ddpmcli.errors import ScheduleError, ScheduleParameterError

F64 = torch.float64

PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "sample", "v_prediction")
PREDICTION_ALIASES: dict[str, str] = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
VARIANCE_TYPES: tuple[str, ...] = ("fixed_small", "fixed_large", "learned_range")
SPACINGS: tuple[str, ...] = ("leading", "trailing", "linspace")

QUANTITIES: tuple[str, ...] = (
    "beta",
    "alpha",
    "alpha_bar",
    "alpha_bar_prev",
    "sqrt_alpha_bar",
    "sqrt_one_minus_alpha_bar",
    "snr",
    "log_snr",
    "sigma",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef_x0",
    "posterior_mean_coef_xt",
    "sqrt_recip_alpha_bar",
    "sqrt_recipm1_alpha_bar",
)


# --------------------------------------------------------------------------------------------
# Stable elementwise helpers
# --------------------------------------------------------------------------------------------


def _softplus(x: Tensor) -> Tensor:
    """log(1 + e^x) without torch's threshold shortcut (which costs ~1e-10 relative at |x| > 20)."""
    return torch.clamp(x, min=0) + torch.log1p(torch.exp(-torch.abs(x)))


def _sigmoid_diff(x: Tensor, y: Tensor, x_minus_y: Tensor) -> Tensor:
    """sigmoid(x) - sigmoid(y) without cancellation, given x - y computed exactly by the caller.

    sigma(x) - sigma(y) = -sigma(x) sigma(-y) expm1(y - x).
    """
    return -torch.sigmoid(x) * torch.sigmoid(-y) * torch.expm1(-x_minus_y)


@dataclass(frozen=True)
class _Parts:
    """The three arrays every schedule is reduced to, each accurate to a few ulps."""

    beta: Tensor
    log_alpha_bar: Tensor
    one_minus_alpha_bar: Tensor


def _parts_from_betas(beta: Tensor) -> _Parts:
    # log alpha_bar as a cumulative sum of log(1 - beta): products of many factors near 1 keep
    # their digits this way, and 1 - alpha_bar = -expm1(log alpha_bar) is exact near t = 0.
    log_ab = torch.cumsum(torch.log1p(-beta), dim=0)
    return _Parts(beta, log_ab, -torch.expm1(log_ab))


def _parts_from_logsnr(lam: Tensor, step: Tensor | None = None) -> _Parts:
    """alpha_bar = sigmoid(lambda); beta_t = 1 - sigmoid(l_t)/sigmoid(l_{t-1})
    = -sigmoid(-l_t) expm1(l_t - l_{t-1}), with l_{-1} = +inf (so beta_0 = 1 - alpha_bar_0).

    ``step`` may give l_t - l_{t-1} for t >= 1 in a form without cancellation."""
    prev = torch.cat([torch.tensor([math.inf], dtype=F64), lam[:-1]])
    diff = lam - prev
    if step is not None:
        diff = torch.cat([diff[:1], step])
    beta = -torch.sigmoid(-lam) * torch.expm1(diff)
    return _Parts(beta, -_softplus(-lam), torch.sigmoid(-lam))


def _betas_from_log_alpha_bar(log_ab: Tensor, one_minus_ab: Tensor) -> Tensor:
    """beta_t = 1 - ab_t/ab_{t-1} = -expm1(log ab_t - log ab_{t-1}); beta_0 = 1 - ab_0."""
    beta = -torch.expm1(torch.diff(log_ab))
    return torch.cat([one_minus_ab[:1], beta])


# --------------------------------------------------------------------------------------------
# Schedule kinds: one registry feeds the core and the CLI's choices
# --------------------------------------------------------------------------------------------

Params = Mapping[str, float]


@dataclass(frozen=True)
class KindInfo:
    """A schedule family: its published constants (all overridable) and where they come from."""

    name: str
    summary: str
    defaults: Mapping[str, float]
    source: str
    build: Callable[[int, Params], _Parts] = field(repr=False)
    min_timesteps: int = 1


def _grid(n: int) -> Tensor:
    """Continuous time u_t = (t + 1)/T of index t, so that t = 0 is one step of noise."""
    return torch.arange(1, n + 1, dtype=F64) / n


def _linear(n: int, p: Params) -> _Parts:
    start, end = float(p["beta_start"]), float(p["beta_end"])
    if p["scale_to_timesteps"]:
        # improved-diffusion keeps the 1000-step curve's shape by scaling both ends by 1000/T.
        start, end = start * 1000.0 / n, end * 1000.0 / n
    return _parts_from_betas(torch.linspace(start, end, n, dtype=F64))


def _scaled_linear(n: int, p: Params) -> _Parts:
    lo, hi = math.sqrt(p["beta_start"]), math.sqrt(p["beta_end"])
    return _parts_from_betas(torch.linspace(lo, hi, n, dtype=F64) ** 2)


def _sigmoid(n: int, p: Params) -> _Parts:
    x = torch.linspace(-6.0, 6.0, n, dtype=F64)
    return _parts_from_betas(torch.sigmoid(x) * (p["beta_end"] - p["beta_start"]) + p["beta_start"])


def _capped(beta: Tensor, max_beta: float) -> Tensor:
    return torch.clamp(beta, max=max_beta)


def _cosine(n: int, p: Params) -> _Parts:
    # improved-diffusion's betas_for_alpha_bar: beta_t = min(1 - f(t+1)/f(t), max_beta) with
    # f(t) = cos^2(a_t), a_t = (t/T + s)/(1 + s) pi/2.  1 - cos^2(a)/cos^2(b) =
    # sin(a + b) sin(a - b)/cos^2(b) keeps every digit of the small betas near t = 0.
    s = p["s"]
    # With pi/2 = (1 + s) scale, the angles' distances from pi/2 are exact multiples of scale:
    # cos(a_t) = sin((T - t)/T scale), sin(a_{t+1} + a_t) = sin((2T - 2t - 1)/T scale), so no
    # digits are lost where a_t nears pi/2 (the last steps).
    t = torch.arange(n, dtype=F64)
    scale = math.pi / 2 / (1 + s)
    cos_b = torch.sin((n - t) / n * scale)
    sin_sum = torch.sin((2 * (n - t) - 1) / n * scale)
    beta = sin_sum * math.sin(scale / n) / cos_b**2
    return _parts_from_betas(_capped(beta, p["max_beta"]))


def _sqrt(n: int, p: Params) -> _Parts:
    # Diffusion-LM: alpha_bar(u) = 1 - sqrt(u + c) through betas_for_alpha_bar (max_beta 0.999).
    # 1 - f(u2)/f(u1) = (sqrt(u2 + c) - sqrt(u1 + c))/f(u1) = (u2 - u1)/((r2 + r1) f(u1)), and
    # f(u1) = (1 - u1 - c)/(1 + r1): no subtraction of nearly equal numbers anywhere.
    c = p["offset"]
    t = torch.arange(n, dtype=F64)
    u1, u2 = t / n, (t + 1) / n
    r1, r2 = torch.sqrt(u1 + c), torch.sqrt(u2 + c)
    f1 = ((n - t) / n - c) / (1 + r1)
    beta = (1.0 / n) / ((r2 + r1) * f1)
    beta = torch.where(beta > 0, beta, torch.full_like(beta, math.inf))  # f(u1) <= 0: capped below
    return _parts_from_betas(_capped(beta, p["max_beta"]))


def _sigmoid_logsnr(n: int, p: Params) -> _Parts:
    # Chen 2023, "On the importance of noise scheduling", sigmoid_schedule:
    # alpha_bar(u) = (sig(e) - sig(v(u)))/(sig(e) - sig(s)), v(u) = (u (end - start) + start)/tau,
    # clipped below at clip_min.  Both differences of sigmoids are taken in the stable form.
    start, end, tau, clip_min = p["start"], p["end"], p["tau"], p["clip_min"]
    if not start < end:
        raise ScheduleParameterError(f"sigmoid_logsnr needs start < end, got {start} >= {end}")
    u = _grid(n)
    s_, e_ = torch.tensor(start / tau, dtype=F64), torch.tensor(end / tau, dtype=F64)
    v = (u * (end - start) + start) / tau
    width = (end - start) / tau
    denom = _sigmoid_diff(e_, s_, torch.tensor(width, dtype=F64))
    ab = _sigmoid_diff(e_, v, (1 - u) * width) / denom
    one_minus = _sigmoid_diff(v, s_, u * width) / denom
    v_prev = torch.cat([s_.reshape(1), v[:-1]])
    ab_prev = torch.cat([torch.ones(1, dtype=F64), ab[:-1]])
    beta = _sigmoid_diff(v, v_prev, torch.full_like(v, width / n)) / denom / ab_prev
    clipped = ab < clip_min
    if bool(clipped.any()):
        ab = torch.where(clipped, torch.full_like(ab, clip_min), ab)
        one_minus = torch.where(clipped, torch.full_like(ab, 1 - clip_min), one_minus)
        log_ab = torch.log(ab)
        generic = _betas_from_log_alpha_bar(log_ab, one_minus)
        beta = torch.where(clipped, generic, beta)
    return _Parts(beta, torch.log(ab), one_minus)


def _clamped_logsnr(lam: Tensor, p: Params) -> Tensor:
    return torch.clamp(lam, min=p["logsnr_min"], max=p["logsnr_max"])


def _laplace(n: int, p: Params) -> _Parts:
    # Hang et al. 2024: lambda(u) = mu - b sgn(0.5 - u) log(1 - 2|u - 0.5|), clamped to
    # [logsnr_min, logsnr_max] because lambda(1) = -inf.
    u = _grid(n)
    lam = p["mu"] - p["b"] * torch.sign(0.5 - u) * torch.log1p(-2 * torch.abs(u - 0.5))
    return _parts_from_logsnr(_clamped_logsnr(lam, p))


def _exp(n: int, p: Params) -> _Parts:
    # alpha_bar(u) = exp(-k u): log alpha_bar is exact, and every beta is 1 - exp(-k/T).
    k = p["rate"]
    u = _grid(n)
    log_ab = -k * u
    beta = torch.full((n,), -math.expm1(-k / n), dtype=F64)
    return _Parts(beta, log_ab, -torch.expm1(log_ab))


def _shifted_cosine(n: int, p: Params) -> _Parts:
    # Hoogeboom et al. 2023 (simple diffusion): the cosine log-SNR
    # -2 log tan(t_min + u (t_max - t_min)), with t_min/t_max set by logsnr_max/logsnr_min,
    # shifted by 2 log(base/resolution).
    t_min = math.atan(math.exp(-0.5 * p["logsnr_max"]))
    t_max = math.atan(math.exp(-0.5 * p["logsnr_min"]))
    width = t_max - t_min
    u = _grid(n)
    x = t_min + u * width
    # Near pi/2, tan(x) = 1/tan(pi/2 - x), with pi/2 - x = atan(e^(logsnr_min/2)) + (1 - u) width
    # formed without subtracting from pi/2.
    y = (
        math.atan(math.exp(0.5 * p["logsnr_min"]))
        + (n - torch.arange(1, n + 1, dtype=F64)) / n * width
    )
    log_tan = torch.where(x < math.pi / 4, torch.log(torch.tan(x)), -torch.log(torch.tan(y)))
    lam = -2 * log_tan
    lam = lam + 2 * math.log(p["base"] / p["resolution"])
    return _parts_from_logsnr(lam)


def _vp(n: int, p: Params) -> _Parts:
    # Song et al. 2021 score_sde VPSDE.discrete_betas = linspace(beta_min/N, beta_max/N, N).
    return _parts_from_betas(torch.linspace(p["beta_min"] / n, p["beta_max"] / n, n, dtype=F64))


def _edm(n: int, p: Params) -> _Parts:
    # Karras et al. 2022 sigmas (rho-spaced), ascending with t, mapped to
    # alpha_bar = 1/(1 + sigma^2): log-SNR = -2 log sigma.
    lo, hi, rho = p["sigma_min"], p["sigma_max"], p["rho"]
    if not 0 < lo < hi:
        raise ScheduleParameterError(f"edm needs 0 < sigma_min < sigma_max, got {lo}, {hi}")
    ramp = torch.arange(n, dtype=F64) / (n - 1)
    r_lo, r_hi = lo ** (1 / rho), hi ** (1 / rho)
    roots = r_lo + ramp * (r_hi - r_lo)  # sigma^(1/rho), linear in t
    # l_t - l_{t-1} = -2 rho log(r_t/r_{t-1}) = -2 rho log1p(dr/r_{t-1}): no cancellation.
    step = -2 * rho * torch.log1p(((r_hi - r_lo) / (n - 1)) / roots[:-1])
    return _parts_from_logsnr(-2 * rho * torch.log(roots), step)


SCHEDULE_KINDS: dict[str, KindInfo] = {
    k.name: k
    for k in (
        KindInfo(
            "linear",
            "betas linear in t (DDPM)",
            {"beta_start": 1e-4, "beta_end": 0.02, "scale_to_timesteps": 0.0},
            "Ho et al. 2020; ends kept for any T as diffusers does (scale_to_timesteps=1: "
            "improved-diffusion's 1000/T scaling)",
            _linear,
        ),
        KindInfo(
            "scaled_linear",
            "betas linear in sqrt space (latent/Stable Diffusion)",
            {"beta_start": 0.00085, "beta_end": 0.012},
            "Rombach et al. 2022; diffusers scaled_linear",
            _scaled_linear,
        ),
        KindInfo(
            "cosine",
            "cosine alpha_bar, betas capped at max_beta",
            {"s": 0.008, "max_beta": 0.999},
            "Nichol & Dhariwal 2021; diffusers squaredcos_cap_v2",
            _cosine,
        ),
        KindInfo(
            "sigmoid",
            "betas = sigmoid(linspace(-6, 6, T)) (end - start) + start",
            {"beta_start": 1e-4, "beta_end": 0.02},
            "GeoDiff (Xu et al. 2022); diffusers sigmoid",
            _sigmoid,
        ),
        KindInfo(
            "sigmoid_logsnr",
            "sigmoid alpha_bar(u) at u = (t+1)/T, clipped at clip_min",
            {"start": -3.0, "end": 3.0, "tau": 1.0, "clip_min": 1e-9},
            "Chen 2023, On the importance of noise scheduling",
            _sigmoid_logsnr,
        ),
        KindInfo(
            "sqrt",
            "alpha_bar(u) = 1 - sqrt(u + offset), betas capped at max_beta",
            {"offset": 1e-4, "max_beta": 0.999},
            "Li et al. 2022, Diffusion-LM",
            _sqrt,
        ),
        KindInfo(
            "laplace",
            "Laplace log-SNR mu - b sgn(0.5-u) log(1-2|u-0.5|) at u = (t+1)/T, clamped",
            {"mu": 0.0, "b": 0.5, "logsnr_min": -20.0, "logsnr_max": 20.0},
            "Hang et al. 2024, Improved noise schedule for diffusion training",
            _laplace,
        ),
        KindInfo(
            "exp",
            "alpha_bar(u) = exp(-rate u) at u = (t+1)/T",
            {"rate": 12.0},
            "exponential alpha_bar",
            _exp,
        ),
        KindInfo(
            "shifted_cosine",
            "cosine log-SNR shifted by 2 log(base/resolution)",
            {"base": 64.0, "resolution": 256.0, "logsnr_min": -15.0, "logsnr_max": 15.0},
            "Hoogeboom et al. 2023, simple diffusion",
            _shifted_cosine,
        ),
        KindInfo(
            "vp",
            "VP-SDE betas linspace(beta_min/T, beta_max/T, T)",
            {"beta_min": 0.1, "beta_max": 20.0},
            "Song et al. 2021, score_sde VPSDE discretisation",
            _vp,
            min_timesteps=21,
        ),
        KindInfo(
            "edm",
            "Karras sigmas (rho-spaced) mapped to alpha_bar = 1/(1 + sigma^2)",
            {"sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0},
            "Karras et al. 2022 (EDM)",
            _edm,
            min_timesteps=2,
        ),
    )
}
SCHEDULE_ALIASES: dict[str, str] = {"squaredcos_cap_v2": "cosine"}

# Parameters that must lie in (0, 1) or be positive; checked before building.
_UNIT_INTERVAL = {"beta_start", "beta_end", "clip_min"}
_POSITIVE = {"tau", "rate", "base", "resolution", "rho", "sigma_min", "sigma_max", "beta_max"}


def canonical_kind(name: str) -> str:
    """The registry name of a schedule kind or alias (``squaredcos_cap_v2`` -> ``cosine``)."""
    key = name.strip().lower()
    key = SCHEDULE_ALIASES.get(key, key)
    if key not in SCHEDULE_KINDS:
        allowed = ", ".join([*SCHEDULE_KINDS, *SCHEDULE_ALIASES])
        raise ScheduleParameterError(f"unknown schedule kind {name!r}; allowed: {allowed}")
    return key


def canonical_prediction_type(name: str) -> str:
    """``epsilon``, ``sample`` or ``v_prediction`` (aliases ``eps``, ``x0``, ``v``)."""
    key = name.strip().lower()
    key = PREDICTION_ALIASES.get(key, key)
    if key not in PREDICTION_TYPES:
        allowed = ", ".join([*PREDICTION_TYPES, *PREDICTION_ALIASES])
        raise ScheduleParameterError(f"unknown prediction type {name!r}; allowed: {allowed}")
    return key


def _check_param(kind: str, name: str, value: float) -> None:
    if not math.isfinite(value):
        raise ScheduleParameterError(f"{kind} parameter {name}={value} must be finite")
    if name in _UNIT_INTERVAL and not 0 < value < 1:
        raise ScheduleParameterError(f"{kind} parameter {name}={value} must lie in (0, 1)")
    if name == "max_beta" and not 0 < value <= 1:
        raise ScheduleParameterError(f"{kind} parameter max_beta={value} must lie in (0, 1]")
    if name in _POSITIVE and not value > 0:
        raise ScheduleParameterError(f"{kind} parameter {name}={value} must be > 0")
    if name in {"s", "offset", "beta_min"} and not value >= 0:
        raise ScheduleParameterError(f"{kind} parameter {name}={value} must be >= 0")


# --------------------------------------------------------------------------------------------
# The Schedule
# --------------------------------------------------------------------------------------------


def _tensor_field() -> Any:
    return field(repr=False, compare=False)


@dataclass(frozen=True, eq=False)
class Schedule:
    """A discrete DDPM schedule: 1-D float64 tensors computed once, named after their formulas.

    Index ``i`` runs over ``0 .. num_steps - 1``; the model is called with ``timesteps[i]`` (the
    identity unless respaced). ``t = 0`` is one noising step and ``alpha_bar_prev[0] = 1``.
    ``posterior_log_variance_clipped`` replaces the log of ``posterior_variance[0] = 0`` by the log
    of ``posterior_variance[1]`` (improved-diffusion's convention).
    """

    name: str
    spec: dict[str, Any] = field(repr=False)
    num_train_timesteps: int
    timesteps: Tensor = _tensor_field()
    beta: Tensor = _tensor_field()
    alpha: Tensor = _tensor_field()
    alpha_bar: Tensor = _tensor_field()
    alpha_bar_prev: Tensor = _tensor_field()
    one_minus_alpha_bar: Tensor = _tensor_field()
    one_minus_alpha_bar_prev: Tensor = _tensor_field()
    log_alpha_bar: Tensor = _tensor_field()
    sqrt_alpha_bar: Tensor = _tensor_field()
    sqrt_one_minus_alpha_bar: Tensor = _tensor_field()
    snr: Tensor = _tensor_field()
    log_snr: Tensor = _tensor_field()
    sigma: Tensor = _tensor_field()
    posterior_variance: Tensor = _tensor_field()
    posterior_log_variance_clipped: Tensor = _tensor_field()
    posterior_mean_coef_x0: Tensor = _tensor_field()
    posterior_mean_coef_xt: Tensor = _tensor_field()
    sqrt_recip_alpha_bar: Tensor = _tensor_field()
    sqrt_recipm1_alpha_bar: Tensor = _tensor_field()
    log_beta: Tensor = _tensor_field()

    @property
    def num_steps(self) -> int:
        return int(self.beta.shape[0])

    def _map_arrays(self, fn: Callable[[Tensor], Tensor]) -> Schedule:
        arrays = {f.name: getattr(self, f.name) for f in fields(self)}
        moved: dict[str, Any] = {k: fn(v) for k, v in arrays.items() if isinstance(v, Tensor)}
        return replace(self, **moved)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Schedule:
        """The same schedule with every array on ``device``, the float ones cast to ``dtype``.

        The cast happens first, on the arrays' own device (MPS has no float64). Doing this once
        before a loop turns :func:`extract`'s per-call cast and copy into no-ops."""

        def move(v: Tensor) -> Tensor:
            if dtype is not None and v.is_floating_point():
                v = v.to(dtype=dtype)
            return v.to(device=device)

        return self._map_arrays(move)

    def take(self, indices: Sequence[int]) -> Schedule:
        """A lookup table of the arrays at ``indices``: position ``j`` holds index ``indices[j]``.

        For loops that only visit those indices (``extract`` with positions); the result is not a
        schedule in its own right (``alpha_bar_prev`` no longer follows ``alpha_bar``)."""
        idx = torch.tensor(list(indices), dtype=torch.long)
        return self._map_arrays(lambda v: v[idx.to(v.device)])

    def quantity(self, name: str) -> Tensor:
        """One of :data:`QUANTITIES` by name."""
        if name not in QUANTITIES:
            raise ScheduleParameterError(
                f"unknown quantity {name!r}; allowed: {', '.join(QUANTITIES)}"
            )
        value: Tensor = getattr(self, name)
        return value

    def table(self, names: Sequence[str] | None = None) -> dict[str, Tensor]:
        """``{name: float64 tensor (N,)}`` for the given quantities (all by default)."""
        return {n: self.quantity(n) for n in (names or QUANTITIES)}

    # ---- forward process and conversions (Ho et al. 2020 eq. 4, 15; Salimans & Ho 2022 for v) ----

    def _c(self, values: Tensor, t: Tensor, like: Tensor) -> Tensor:
        return extract(values, t, like.ndim, like=like)

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps. Shapes (B, ...); t int64 (B,) indices."""
        return (
            self._c(self.sqrt_alpha_bar, t, x0) * x0
            + self._c(self.sqrt_one_minus_alpha_bar, t, x0) * noise
        )

    def x0_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x0 = x_t/sqrt(ab_t) - sqrt(1/ab_t - 1) eps (Ho et al. 2020 eq. 15)."""
        return (
            self._c(self.sqrt_recip_alpha_bar, t, x_t) * x_t
            - self._c(self.sqrt_recipm1_alpha_bar, t, x_t) * eps
        )

    def eps_from_x0(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        """eps = (x_t - sqrt(ab_t) x0)/sqrt(1 - ab_t); finite also where ab_t = 0."""
        return (x_t - self._c(self.sqrt_alpha_bar, t, x_t) * x0) / self._c(
            self.sqrt_one_minus_alpha_bar, t, x_t
        )

    def x0_from_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        """x0 = sqrt(ab_t) x_t - sqrt(1 - ab_t) v."""
        return (
            self._c(self.sqrt_alpha_bar, t, x_t) * x_t
            - self._c(self.sqrt_one_minus_alpha_bar, t, x_t) * v
        )

    def eps_from_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        """eps = sqrt(1 - ab_t) x_t + sqrt(ab_t) v."""
        return (
            self._c(self.sqrt_one_minus_alpha_bar, t, x_t) * x_t
            + self._c(self.sqrt_alpha_bar, t, x_t) * v
        )

    def v_target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """v = sqrt(ab_t) eps - sqrt(1 - ab_t) x0."""
        return (
            self._c(self.sqrt_alpha_bar, t, x0) * noise
            - self._c(self.sqrt_one_minus_alpha_bar, t, x0) * x0
        )

    def predict_x0(
        self, model_output: Tensor, x_t: Tensor, t: Tensor, prediction_type: str
    ) -> Tensor:
        """x0_hat from a model output of the given prediction type."""
        kind = canonical_prediction_type(prediction_type)
        if kind == "epsilon":
            return self.x0_from_eps(x_t, t, model_output)
        if kind == "v_prediction":
            return self.x0_from_v(x_t, t, model_output)
        return model_output

    def predict_eps(
        self, model_output: Tensor, x_t: Tensor, t: Tensor, prediction_type: str
    ) -> Tensor:
        """eps_hat from a model output of the given prediction type."""
        kind = canonical_prediction_type(prediction_type)
        if kind == "epsilon":
            return model_output
        if kind == "v_prediction":
            return self.eps_from_v(x_t, t, model_output)
        return self.eps_from_x0(x_t, t, model_output)

    # ---- posterior q(x_{t-1} | x_t, x0) = N(mu_tilde, beta_tilde I) (Ho et al. 2020 eq. 6-7) ----

    def posterior_mean_variance(
        self, x0: Tensor, x_t: Tensor, t: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """mu_tilde = coef_x0 x0 + coef_xt x_t, beta_tilde, log beta_tilde (clipped at t = 0)."""
        mean = self.posterior_mean(x0, x_t, t)
        var = self._c(self.posterior_variance, t, x_t).expand_as(x_t)
        log_var = self._c(self.posterior_log_variance_clipped, t, x_t).expand_as(x_t)
        return mean, var, log_var

    def posterior_mean(self, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """mu_tilde = coef_x0 x0 + coef_xt x_t alone (Ho et al. 2020 eq. 7)."""
        return (
            self._c(self.posterior_mean_coef_x0, t, x_t) * x0
            + self._c(self.posterior_mean_coef_xt, t, x_t) * x_t
        )

    def model_log_variance(
        self, variance_type: str, t: Tensor, like: Tensor, var_values: Tensor | None = None
    ) -> Tensor:
        """log of the reverse-process variance a sampler uses, shaped like ``like``.

        fixed_small: log beta_tilde (clipped); fixed_large: log beta, with beta_tilde_1 at t = 0
        (improved-diffusion); learned_range: frac log beta + (1 - frac) log beta_tilde with
        frac = (v + 1)/2 for the model's v in [-1, 1] (Nichol & Dhariwal 2021 eq. 15).
        """
        if variance_type == "fixed_small":
            return self._c(self.posterior_log_variance_clipped, t, like).expand_as(like)
        if variance_type == "fixed_large":
            return self._c(self.fixed_large_log_variance, t, like).expand_as(like)
        if variance_type == "learned_range":
            if var_values is None:
                raise ScheduleParameterError("learned_range needs the model's variance values")
            frac = (var_values + 1) / 2
            min_log = self._c(self.posterior_log_variance_clipped, t, like)
            max_log = self._c(self.log_beta, t, like)
            return frac * max_log + (1 - frac) * min_log
        raise ScheduleParameterError(
            f"unknown variance type {variance_type!r}; allowed: {', '.join(VARIANCE_TYPES)}"
        )

    @property
    def fixed_large_log_variance(self) -> Tensor:
        """log beta with log beta_tilde_1 at index 0 (improved-diffusion's fixed_large)."""
        if self.num_steps < 2:
            return self.log_beta
        return torch.cat([torch.log(self.posterior_variance[1:2]), self.log_beta[1:]])

    def ancestral_step(
        self, x_t: Tensor, t: Tensor, x0: Tensor, log_var: Tensor, noise: Tensor
    ) -> Tensor:
        """x_{t-1} = mu_tilde(x_t, x0_hat) + exp(log_var/2) z, with no noise at t = 0."""
        mean = self.posterior_mean(x0, x_t, t)
        nonzero = (t != 0).to(x_t.dtype).reshape(-1, *([1] * (x_t.ndim - 1)))
        return mean + nonzero * torch.exp(0.5 * log_var) * noise

    def ddim_step(
        self, x_t: Tensor, t: Tensor, x0: Tensor, eps: Tensor, eta: float, noise: Tensor
    ) -> Tensor:
        """x_{t-1} = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - s^2) eps + s z (Song et al. 2021 eq. 12),
        s^2 = eta^2 (1 - ab_prev)/(1 - ab) (1 - ab/ab_prev) = eta^2 beta_tilde on this schedule."""
        var = eta**2 * self._c(self.posterior_variance, t, x_t)
        direction = torch.sqrt(
            torch.clamp(self._c(self.one_minus_alpha_bar_prev, t, x_t) - var, min=0)
        )
        return (
            self._c(self.alpha_bar_prev, t, x_t).sqrt() * x0 + direction * eps + var.sqrt() * noise
        )

    # ---- terms of the variational bound ----

    def prior_kl(self, x0: Tensor) -> Tensor:
        """KL(q(x_T | x0) || N(0, I)) elementwise, in nats."""
        last = torch.full((x0.shape[0],), self.num_steps - 1, dtype=torch.long, device=x0.device)
        mean = self._c(self.sqrt_alpha_bar, last, x0) * x0
        log_var = torch.log(self._c(self.one_minus_alpha_bar, last, x0))
        zero = torch.zeros_like(mean)
        return normal_kl(mean, log_var.expand_as(mean), zero, zero)

    def prior_kl_bits_per_dim_unit_variance(self) -> float:
        """E KL(q(x_T|x0) || N(0,1)) per dim for data with E x0^2 = 1: -log(1 - ab_T)/(2 ln 2)."""
        return float(-torch.log(self.one_minus_alpha_bar[-1]) / (2 * math.log(2.0))) + 0.0


def extract(values: Tensor, t: Tensor, ndim: int, *, like: Tensor | None = None) -> Tensor:
    """``values[t]`` shaped ``(B, 1, ..., 1)`` with ``ndim`` dims, cast to ``like``'s dtype/device.

    The cast happens before the move, on the array's own device (MPS has no float64)."""
    if like is not None:
        values = values.to(dtype=like.dtype).to(device=like.device)
        t = t.to(device=like.device)
    else:
        values = values.to(device=t.device)
    return values[t].reshape(t.shape[0], *([1] * (ndim - 1)))


def _assemble(
    name: str, spec: dict[str, Any], parts: _Parts, timesteps: Tensor, num_train: int
) -> Schedule:
    beta, log_ab, om = parts.beta, parts.log_alpha_bar, parts.one_minus_alpha_bar
    ab = torch.exp(log_ab)
    one = torch.ones(1, dtype=F64)
    ab_prev = torch.cat([one, ab[:-1]])
    om_prev = torch.cat([torch.zeros(1, dtype=F64), om[:-1]])
    # alpha = 1 - beta loses digits where beta nears 1; there alpha = ab_t/ab_{t-1} is exact.
    ratio = torch.exp(torch.diff(log_ab, prepend=torch.zeros(1, dtype=F64)))
    alpha = torch.where(beta < 0.5, 1 - beta, ratio)
    # log(1 - ab) from ab itself where ab is small: log(om) would keep only om's absolute digits.
    log_om = torch.where(ab < 0.5, torch.log1p(-ab), torch.log(om))
    log_om_prev = torch.cat([torch.full((1,), -math.inf, dtype=F64), log_om[:-1]])
    post_var = beta * om_prev / om
    # The posterior variance is 0 at t = 0, so its log is clipped to the value at t = 1. Summing
    # logs keeps its digits where 1 - ab_prev is within ulps of 1 (the zero-SNR step).
    log_post_var = torch.log(beta) + log_om_prev - log_om
    # (A one-step schedule has no t = 1; it keeps log beta, as fixed_large does.)
    clipped = torch.cat([log_post_var[1:2], log_post_var[1:]]) if len(beta) > 1 else torch.log(beta)
    return Schedule(
        name=name,
        spec=spec,
        num_train_timesteps=num_train,
        timesteps=timesteps,
        beta=beta,
        alpha=alpha,
        alpha_bar=ab,
        alpha_bar_prev=ab_prev,
        one_minus_alpha_bar=om,
        one_minus_alpha_bar_prev=om_prev,
        log_alpha_bar=log_ab,
        sqrt_alpha_bar=torch.exp(0.5 * log_ab),
        sqrt_one_minus_alpha_bar=torch.sqrt(om),
        snr=ab / om,
        log_snr=log_ab - log_om,
        sigma=torch.exp(0.5 * (log_om - log_ab)),
        posterior_variance=post_var,
        posterior_log_variance_clipped=clipped,
        posterior_mean_coef_x0=torch.sqrt(ab_prev) * beta / om,
        posterior_mean_coef_xt=torch.sqrt(alpha) * om_prev / om,
        sqrt_recip_alpha_bar=torch.exp(-0.5 * log_ab),
        sqrt_recipm1_alpha_bar=torch.exp(0.5 * (log_om - log_ab)),
        log_beta=torch.log(beta),
    )


def _validate(parts: _Parts, error: type[ScheduleError], what: str) -> None:
    beta, log_ab, om = parts.beta, parts.log_alpha_bar, parts.one_minus_alpha_bar
    if beta.numel() == 0:
        raise error(f"{what}: empty schedule")
    bad = ~torch.isfinite(beta) | (beta <= 0) | (beta > 1) | torch.isnan(log_ab) | torch.isnan(om)
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0])
        raise error(f"{what}: beta[{i}] = {float(beta[i])!r} is outside (0, 1]")
    ones = torch.nonzero(beta >= 1)
    if ones.numel() and int(ones[0]) != len(beta) - 1:
        i = int(ones[0])
        raise error(
            f"{what}: beta[{i}] = 1 makes alpha_bar zero before the last step "
            f"(index {len(beta) - 1})"
        )


def _base_schedule(kind: str, timesteps: int, params: Params) -> Schedule:
    info = SCHEDULE_KINDS[kind]
    if isinstance(timesteps, bool) or not isinstance(timesteps, int):
        raise ScheduleParameterError(f"timesteps must be an integer, got {timesteps!r}")
    if timesteps < info.min_timesteps:
        raise ScheduleParameterError(
            f"{kind} needs at least {info.min_timesteps} timesteps, got T = {timesteps}"
        )
    merged: dict[str, float] = dict(info.defaults)
    for name, value in params.items():
        if name not in info.defaults:
            allowed = ", ".join(info.defaults) or "none"
            raise ScheduleParameterError(
                f"unknown parameter {name!r} for schedule {kind!r}; allowed: {allowed}"
            )
        merged[name] = float(value)
    for name, value in merged.items():
        _check_param(kind, name, value)
    parts = info.build(timesteps, merged)
    _validate(parts, ScheduleParameterError, f"schedule {kind} with {merged}")
    changed = {k: v for k, v in merged.items() if v != info.defaults[k]}
    spec: dict[str, Any] = {"kind": kind, "timesteps": timesteps, "params": changed}
    ident = torch.arange(timesteps, dtype=torch.long)
    return _assemble(kind, spec, parts, ident, timesteps)


def make_schedule(
    kind: str,
    timesteps: int = 1000,
    *,
    zero_terminal_snr: bool = False,
    logsnr_shift: float = 0.0,
    **params: float,
) -> Schedule:
    """Build a schedule of a registered kind with T = ``timesteps`` training steps.

    Args:
        kind: a name in :data:`SCHEDULE_KINDS` or :data:`SCHEDULE_ALIASES`.
        timesteps: T, the number of training timesteps (default 1000).
        zero_terminal_snr: rescale so that alpha_bar_{T-1} = 0 (Lin et al. 2024, Algorithm 1).
        logsnr_shift: add this to every log-SNR (applied after ``zero_terminal_snr``).
        **params: the kind's constants (see ``SCHEDULE_KINDS[kind].defaults``).
    """
    schedule = _base_schedule(canonical_kind(kind), timesteps, params)
    if zero_terminal_snr:
        schedule = rescale_zero_terminal_snr(schedule)
    if logsnr_shift:
        schedule = shift_logsnr(schedule, logsnr_shift)
    return schedule


def _as_f64(values: Sequence[float] | Tensor, what: str) -> Tensor:
    try:
        tensor = torch.as_tensor(values, dtype=F64).flatten()
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ScheduleError(f"{what}: not a list of numbers ({exc})") from None
    if tensor.numel() == 0:
        raise ScheduleError(f"{what}: empty")
    bad = ~torch.isfinite(tensor)
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0])
        raise ScheduleError(f"{what}: value at index {i} is {float(tensor[i])!r} (must be finite)")
    return tensor


def schedule_from_betas(betas: Sequence[float] | Tensor, *, name: str = "custom") -> Schedule:
    """A schedule from explicit betas in (0, 1] (only the last may be 1)."""
    beta = _as_f64(betas, "betas")
    parts = _parts_from_betas(beta)
    _validate(parts, ScheduleError, "betas")
    spec: dict[str, Any] = {"kind": "custom", "betas": beta.tolist()}
    return _assemble(name, spec, parts, torch.arange(len(beta)), len(beta))


def schedule_from_alpha_bars(
    alpha_bars: Sequence[float] | Tensor, *, name: str = "custom"
) -> Schedule:
    """A schedule from explicit alpha_bars: strictly decreasing in [0, 1), only the last 0."""
    ab = _as_f64(alpha_bars, "alpha_bars")
    outside = (ab < 0) | (ab >= 1)
    if bool(outside.any()):
        i = int(torch.nonzero(outside)[0])
        raise ScheduleError(f"alpha_bars: value at index {i} is {float(ab[i])!r}, outside [0, 1)")
    rising = torch.diff(ab) >= 0
    if bool(rising.any()):
        i = int(torch.nonzero(rising)[0]) + 1
        raise ScheduleError(
            f"alpha_bars: not strictly decreasing at index {i} "
            f"({float(ab[i - 1])!r} -> {float(ab[i])!r})"
        )
    log_ab = torch.log(ab)
    om = 1 - ab  # exact: ab is given data, and 1 - ab is exact for ab >= 0.5 (Sterbenz)
    parts = _Parts(_betas_from_log_alpha_bar(log_ab, om), log_ab, om)
    _validate(parts, ScheduleError, "alpha_bars")
    spec: dict[str, Any] = {"kind": "custom", "alpha_bars": ab.tolist()}
    return _assemble(name, spec, parts, torch.arange(len(ab)), len(ab))


def _parts_of(schedule: Schedule) -> _Parts:
    return _Parts(schedule.beta, schedule.log_alpha_bar, schedule.one_minus_alpha_bar)


def _with_transform(schedule: Schedule, step: list[Any]) -> dict[str, Any]:
    spec = dict(schedule.spec)
    spec["transforms"] = [*spec.get("transforms", []), step]
    return spec


def rescale_zero_terminal_snr(schedule: Schedule) -> Schedule:
    """Rescale so that alpha_bar_{T-1} = 0 (Lin et al. 2024, Algorithm 1).

    s' = (s - s_T) s_0/(s_0 - s_T) with s = sqrt(alpha_bar). Computed without cancellation:
    s_t - s_T is a reverse cumulative sum of the positive steps d_j = s_{j-1} - s_j
    = s_{j-1} beta_j/(1 + sqrt(alpha_j)), and 1 - s' = (s_0 (1 - s) - s_T (1 - s_0))/(s_0 - s_T).
    """
    if schedule.num_steps < 2:
        raise ScheduleParameterError("zero terminal SNR needs at least 2 timesteps")
    s = schedule.sqrt_alpha_bar
    beta, alpha = schedule.beta, schedule.alpha
    d = torch.cat([torch.zeros(1, dtype=F64), s[:-1] * beta[1:] / (1 + torch.sqrt(alpha[1:]))])
    # above[t] = s_t - s_T = sum_{j > t} d_j
    above = torch.flip(torch.cumsum(torch.flip(d, [0]), 0), [0]) - d
    s0, s_last = s[0], s[-1]
    span = above[0]
    k = s0 / span
    s_new = above * k
    one_minus_s = schedule.one_minus_alpha_bar / (1 + s)
    one_minus_s_new = (s0 * one_minus_s - s_last * one_minus_s[0]) / span
    om = one_minus_s_new * (1 + s_new)
    om[-1] = 1.0  # alpha_bar_{T-1} = 0 exactly; rounding must not leave 1 - ab a few ulps off 1
    log_ab = 2 * torch.log(s_new)
    s_prev = torch.cat([torch.ones(1, dtype=F64), s_new[:-1]])
    beta_new = k * d * (s_prev + s_new) / s_prev**2
    beta_new[0] = om[0]
    beta_new[-1] = 1.0
    parts = _Parts(beta_new, log_ab, om)
    return _assemble(
        f"{schedule.name}+zsnr",
        _with_transform(schedule, ["zero_terminal_snr"]),
        parts,
        schedule.timesteps,
        schedule.num_train_timesteps,
    )


def shift_logsnr(schedule: Schedule, shift: float) -> Schedule:
    """Add ``shift`` to every log-SNR: alpha_bar' = sigmoid(log_snr + shift)."""
    if not math.isfinite(shift):
        raise ScheduleParameterError(f"log-SNR shift must be finite, got {shift}")
    parts = _parts_from_logsnr(schedule.log_snr + shift)
    return _assemble(
        f"{schedule.name}{shift:+g}logsnr",
        _with_transform(schedule, ["logsnr_shift", float(shift)]),
        parts,
        schedule.timesteps,
        schedule.num_train_timesteps,
    )


def respaced_timesteps(
    num_train_timesteps: int, steps: int | str, spacing: str = "leading", steps_offset: int = 0
) -> list[int]:
    """The kept timesteps, ascending, for a respacing of T = ``num_train_timesteps`` steps.

    ``steps`` is a step count used with ``spacing`` (diffusers' ``leading`` / ``trailing`` /
    ``linspace`` of ``set_timesteps``), or an improved-diffusion section string: ``"ddim50"`` (a
    stride that gives exactly 50 steps) or ``"10,20,30"`` (T split into equal sections, each with
    that many evenly spaced steps).
    """
    big_t = num_train_timesteps
    if isinstance(steps, str):
        text = steps.strip().lower()
        if text.isdigit():
            return respaced_timesteps(big_t, int(text), spacing, steps_offset)
        return _section_timesteps(big_t, text)
    n = steps
    if not 1 <= n <= big_t:
        raise ScheduleParameterError(f"steps must lie in 1..{big_t} (T), got {n}")
    if spacing == "linspace":
        kept = [int(k) for k in torch.linspace(0, big_t - 1, n, dtype=F64).round().long()]
    elif spacing == "leading":
        ratio = big_t // n
        kept = [i * ratio + steps_offset for i in range(n)]
    elif spacing == "trailing":
        kept = sorted(round(big_t - i * big_t / n) - 1 for i in range(n))
    else:
        raise ScheduleParameterError(f"unknown spacing {spacing!r}; allowed: {', '.join(SPACINGS)}")
    kept = sorted(set(int(k) for k in kept))
    if kept[0] < 0 or kept[-1] >= big_t:
        raise ScheduleParameterError(
            f"{spacing} spacing with steps_offset={steps_offset} gives timestep {kept[-1]}, "
            f"outside 0..{big_t - 1}"
        )
    return kept


def _section_timesteps(big_t: int, text: str) -> list[int]:
    if text.startswith("ddim"):
        try:
            desired = int(text[4:])
        except ValueError:
            raise ScheduleParameterError(f"bad section string {text!r}; e.g. ddim50") from None
        for stride in range(1, big_t):
            if len(range(0, big_t, stride)) == desired:
                return list(range(0, big_t, stride))
        raise ScheduleParameterError(
            f"no integer stride gives exactly {desired} steps of T = {big_t}"
        )
    try:
        counts = [int(x) for x in text.split(",")]
    except ValueError:
        raise ScheduleParameterError(
            f"bad steps {text!r}; give a number, 'ddimN' or section counts like '10,20,30'"
        ) from None
    if any(c < 1 for c in counts) or len(counts) > big_t:
        raise ScheduleParameterError(f"section counts must be >= 1, got {text!r}")
    size_per, extra = divmod(big_t, len(counts))
    start, kept = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ScheduleParameterError(f"cannot take {count} steps from a section of {size}")
        frac_stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0  # accumulated, as improved-diffusion does, so rounding matches it
        for _ in range(count):
            kept.append(start + round(position))
            position += frac_stride
        start += size
    return sorted(set(kept))


def respace(schedule: Schedule, timesteps: Sequence[int]) -> Schedule:
    """Keep only ``timesteps``: ab'_i = ab_{t_i}, beta'_i = 1 - ab_{t_i}/ab_{t_{i-1}}."""
    kept = sorted(set(int(t) for t in timesteps))
    if not kept or kept[0] < 0 or kept[-1] >= schedule.num_steps:
        raise ScheduleParameterError(
            f"respaced timesteps must lie in 0..{schedule.num_steps - 1}, "
            f"got {kept[0] if kept else None}..{kept[-1] if kept else None}"
        )
    idx = torch.tensor(kept, dtype=torch.long)
    log_ab = schedule.log_alpha_bar[idx]
    om = schedule.one_minus_alpha_bar[idx]
    parts = _Parts(_betas_from_log_alpha_bar(log_ab, om), log_ab, om)
    _validate(parts, ScheduleParameterError, f"respacing of {schedule.name}")
    return _assemble(
        f"{schedule.name}@{len(kept)}",
        _with_transform(schedule, ["respace", kept]),
        parts,
        schedule.timesteps[idx],
        schedule.num_train_timesteps,
    )


def schedule_from_spec(spec: Mapping[str, Any]) -> Schedule:
    """Rebuild a schedule from :attr:`Schedule.spec` (as stored in checkpoints)."""
    try:
        kind = spec["kind"]
        if kind == "custom":
            if "betas" in spec:
                schedule = schedule_from_betas(spec["betas"])
            else:
                schedule = schedule_from_alpha_bars(spec["alpha_bars"])
        else:
            schedule = _base_schedule(
                canonical_kind(kind), int(spec.get("timesteps", 1000)), spec.get("params", {})
            )
        for step in spec.get("transforms", []):
            if step[0] == "zero_terminal_snr":
                schedule = rescale_zero_terminal_snr(schedule)
            elif step[0] == "logsnr_shift":
                schedule = shift_logsnr(schedule, float(step[1]))
            elif step[0] == "respace":
                schedule = respace(schedule, step[1])
            else:
                raise ScheduleError(f"unknown schedule transform {step[0]!r}")
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise ScheduleError(f"malformed schedule spec {dict(spec)!r}: {exc!r}") from None
    return schedule


# --------------------------------------------------------------------------------------------
# Likelihood terms (Ho et al. 2020 section 3.3; improved-diffusion losses.py)
# --------------------------------------------------------------------------------------------


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats.

    0.5 (e^d - 1 - d + (mean1 - mean2)^2 e^-logvar2) with d = logvar1 - logvar2: expm1 keeps the
    digits of nearly equal variances (and gives exactly 0 for equal distributions)."""
    d = logvar1 - logvar2
    return 0.5 * (torch.expm1(d) - d + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """log P(x) of 8-bit data scaled to [-1, 1] under a Gaussian integrated over each bin of width
    2/255, the edge bins extended to infinity (Ho et al. 2020 eq. 13). Elementwise, nats.

    Uses the exact normal CDF (torch.special.ndtr / log_ndtr), not improved-diffusion's tanh
    approximation, and takes each bin's mass from the tail it lies in so no digits cancel.
    """
    centered = x - means
    inv_std = torch.exp(-log_scales)
    upper = inv_std * (centered + 1.0 / 255.0)
    lower = inv_std * (centered - 1.0 / 255.0)
    log_cdf_upper = torch.special.log_ndtr(upper)
    log_sf_lower = torch.special.log_ndtr(-lower)
    # mass of the bin: from the lower tail when the bin is below the mean, else from the upper.
    upper_tail = lower > 0
    mass = torch.where(
        upper_tail,
        torch.special.ndtr(-lower) - torch.special.ndtr(-upper),
        torch.special.ndtr(upper) - torch.special.ndtr(lower),
    )
    log_mass = torch.log(torch.clamp(mass, min=1e-300))
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_sf_lower, log_mass))


def continuous_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """log N(x; mean, e^(2 log_scale)) elementwise, in nats (a density, for real-valued data)."""
    z = (x - means) * torch.exp(-log_scales)
    return -0.5 * z**2 - log_scales - 0.5 * math.log(2 * math.pi)
