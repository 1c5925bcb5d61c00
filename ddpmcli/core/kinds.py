"""Schedule kinds: the registry that feeds the core and the CLI's choices, and the stable
constructors of every kind.

Every schedule is reduced to three float64 arrays computed in a stable form -- ``beta``,
``log_alpha_bar`` and ``one_minus_alpha_bar`` (:class:`_Parts`) -- from which
:mod:`ddpmcli.core.schedule` derives every other quantity. Holding ``log alpha_bar`` and
``1 - alpha_bar`` separately is what keeps every quantity within about 1e-13 relative of an
arbitrary-precision evaluation: ``1 - ab`` is tiny near ``t = 0`` and ``ab`` is tiny near
``t = T - 1``, and neither can be recovered from the other by subtraction without losing digits.

Imports torch and the standard library only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

# the choices are defined once, in ddpmcli.choices (standard library only); re-exported here
from ddpmcli.choices import PREDICTION_ALIASES, PREDICTION_TYPES, prediction_type_of
from ddpmcli.choices import SPACINGS as SPACINGS
from ddpmcli.choices import VARIANCE_TYPES as VARIANCE_TYPES
from ddpmcli.core.path_kinds import PathParts, _edm_sigma, _flow, _ve
from ddpmcli.errors import ScheduleParameterError

F64 = torch.float64


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
    build: Callable[[int, Params], _Parts | PathParts] = field(repr=False)
    min_timesteps: int = 1
    path: str = "vp"


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
        KindInfo(
            "flow",
            "rectified flow x_t = (1 - s) x0 + s eps, s = shift u/(1 + (shift - 1) u), u = (t+1)/T",
            {"shift": 1.0, "mu": 0.0, "linear_time_shift": 0.0, "shift_terminal": 0.0},
            "Liu et al. 2022, Esser et al. 2024 (SD3); diffusers FlowMatchEulerDiscreteScheduler's "
            "training sigmas, model timestep s T; mu: dynamic shifting (shift e^mu, or mu with "
            "linear_time_shift=1), shift_terminal: LTX's stretch (0: off)",
            _flow,
            path="flow",
        ),
        KindInfo(
            "edm_sigma",
            "EDM in sigma space x = x0 + sigma eps, Karras sigmas, timestep ln(sigma)/4",
            {"sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0},
            "Karras et al. 2022 (EDM), c_noise = ln(sigma)/4; `edm` is the same sigmas as a VP "
            "schedule",
            _edm_sigma,
            min_timesteps=2,
            path="ve",
        ),
        KindInfo(
            "ve",
            "VE-SDE x = x0 + sigma eps, sigmas geometric in [sigma_min, sigma_max], timestep sigma",
            {"sigma_min": 0.01, "sigma_max": 50.0},
            "Song et al. 2021, score_sde VESDE (NCSN++ takes sigma)",
            _ve,
            min_timesteps=2,
            path="ve",
        ),
    )
}
SCHEDULE_ALIASES: dict[str, str] = {"squaredcos_cap_v2": "cosine"}

# Parameters that must lie in (0, 1) or be positive; checked before building.
_UNIT_INTERVAL = {"beta_start", "beta_end", "clip_min"}
_POSITIVE = {
    "tau",
    "rate",
    "base",
    "resolution",
    "rho",
    "sigma_min",
    "sigma_max",
    "beta_max",
    "shift",
}


def canonical_kind(name: str) -> str:
    """The registry name of a schedule kind or alias (``squaredcos_cap_v2`` -> ``cosine``)."""
    key = name.strip().lower()
    key = SCHEDULE_ALIASES.get(key, key)
    if key not in SCHEDULE_KINDS:
        allowed = ", ".join([*SCHEDULE_KINDS, *SCHEDULE_ALIASES])
        raise ScheduleParameterError(f"unknown schedule kind {name!r}; allowed: {allowed}")
    return key


def canonical_prediction_type(name: str) -> str:
    """``epsilon``, ``sample``, ``v_prediction`` or ``flow`` (aliases ``eps``, ``x0``, ``v``,
    ``flow_prediction``, ``velocity``)."""
    key = prediction_type_of(name)
    if key is None:
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
