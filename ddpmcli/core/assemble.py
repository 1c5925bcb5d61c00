"""Building a :class:`~ddpmcli.core.schedule.Schedule`: every stored array from the stable
parts of a kind (:class:`~ddpmcli.core.kinds._Parts`, and for a path other than VP its
:class:`~ddpmcli.core.path_kinds.PathParts`), validation, and the schedules built from a kind or
explicit arrays.

Imports torch and the standard library only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ddpmcli.core.kinds import (
    F64,
    SCHEDULE_KINDS,
    Params,
    _betas_from_log_alpha_bar,
    _check_param,
    _Parts,
    _parts_from_betas,
    _parts_from_logsnr,
)
from ddpmcli.core.path_kinds import PathParts
from ddpmcli.core.schedule import Schedule
from ddpmcli.errors import ScheduleError, ScheduleParameterError


def _assemble(
    name: str,
    spec: dict[str, Any],
    parts: _Parts,
    timesteps: Tensor,
    num_train: int,
    path: PathParts | None = None,
) -> Schedule:
    """Every array of a schedule from its VP-equivalent ``parts`` (and, off VP, its path)."""
    vp = _vp_columns(parts)
    if path is None:
        columns = _vp_path_columns(vp, timesteps)
    else:
        columns = _path_columns(path)
        # the path's own log-SNR and sigma/alpha, exact by construction
        vp["log_snr"] = path.log_snr
        vp["sigma"] = vp["sqrt_recipm1_alpha_bar"] = path.sigma / path.alpha
    return Schedule(
        name=name,
        spec=spec,
        num_train_timesteps=num_train,
        timesteps=timesteps,
        index=torch.arange(len(parts.beta), dtype=torch.long),
        path="vp" if path is None else path.path,
        **vp,
        **columns,
    )


def _vp_columns(parts: _Parts) -> dict[str, Tensor]:
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
    log_beta = torch.log(beta)
    # fixed_large: log beta, with log beta_tilde_1 at index 0 (improved-diffusion), as log of the
    # stored beta_tilde_1 exactly as it always was computed
    fixed_large = torch.cat([torch.log(post_var[1:2]), log_beta[1:]]) if len(beta) > 1 else log_beta
    return {
        "beta": beta,
        "alpha": alpha,
        "alpha_bar": ab,
        "alpha_bar_prev": ab_prev,
        "one_minus_alpha_bar": om,
        "one_minus_alpha_bar_prev": om_prev,
        "log_alpha_bar": log_ab,
        "sqrt_alpha_bar": torch.exp(0.5 * log_ab),
        "sqrt_one_minus_alpha_bar": torch.sqrt(om),
        "snr": ab / om,
        "log_snr": log_ab - log_om,
        "sigma": torch.exp(0.5 * (log_om - log_ab)),
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": clipped,
        "posterior_mean_coef_x0": torch.sqrt(ab_prev) * beta / om,
        "posterior_mean_coef_xt": torch.sqrt(alpha) * om_prev / om,
        "sqrt_recip_alpha_bar": torch.exp(-0.5 * log_ab),
        "sqrt_recipm1_alpha_bar": torch.exp(0.5 * (log_om - log_ab)),
        "log_beta": log_beta,
        "fixed_large_log_variance": fixed_large,
        "variance_ratio": post_var / beta,
        "prior_sqrt_alpha_bar": torch.exp(0.5 * log_ab[-1]),
        "prior_one_minus_alpha_bar": om[-1].clone(),
    }


def _vp_path_columns(vp: dict[str, Tensor], timesteps: Tensor) -> dict[str, Tensor]:
    """The path fields of a VP schedule: the VP arrays themselves, digit for digit."""
    n = vp["beta"].shape[0]
    return {
        "alpha_t": vp["sqrt_alpha_bar"],
        "sigma_t": vp["sqrt_one_minus_alpha_bar"],
        "alpha_t_prev": torch.sqrt(vp["alpha_bar_prev"]),
        "sigma_t_prev": torch.sqrt(vp["one_minus_alpha_bar_prev"]),
        "model_timestep": timesteps.to(F64),
        "path_scale": torch.ones(n, dtype=F64),
        "log_path_scale_sq_prev": torch.zeros(n, dtype=F64),
        "path_posterior_coef_xt": vp["posterior_mean_coef_xt"],
        "path_posterior_coef_x0": vp["posterior_mean_coef_x0"],
        "path_posterior_variance": vp["posterior_variance"],
        "prior_alpha_t": vp["prior_sqrt_alpha_bar"],
        "prior_sigma_t": torch.sqrt(vp["prior_one_minus_alpha_bar"]),
    }


def path_posterior(
    alpha: Tensor, sigma: Tensor, log_snr_step: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """(coef_xt, coef_x0, variance) of q(x_s | x_t, x0) between consecutive entries (s = i - 1,
    t = i; before entry 0 the clean data, alpha = 1, sigma = 0), Kingma et al. 2021 eq. 33:
    alpha_{t|s} = alpha_t/alpha_s, sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2,
    coef_xt = alpha_{t|s} sigma_s^2/sigma_t^2, coef_x0 = alpha_s sigma_{t|s}^2/sigma_t^2,
    variance = sigma_{t|s}^2 sigma_s^2/sigma_t^2.

    sigma_{t|s}^2/sigma_t^2 = 1 - e^(lambda_t - lambda_s) = -expm1(log_snr_step): no subtraction
    of nearby variances."""
    alpha_s = torch.cat([torch.ones(1, dtype=alpha.dtype), alpha[:-1]])
    sigma_s = torch.cat([torch.zeros(1, dtype=sigma.dtype), sigma[:-1]])
    step = torch.cat([torch.full((1,), -math.inf, dtype=alpha.dtype), log_snr_step])
    fresh = -torch.expm1(step)
    coef_xt = alpha / alpha_s * sigma_s**2 / sigma**2
    return coef_xt, alpha_s * fresh, fresh * sigma_s**2


def _path_columns(path: PathParts) -> dict[str, Tensor]:
    alpha, sigma = path.alpha, path.sigma
    coef_xt, coef_x0, variance = path_posterior(alpha, sigma, path.log_snr_step)
    alpha_s = torch.cat([torch.ones(1, dtype=F64), alpha[:-1]])
    sigma_s = torch.cat([torch.zeros(1, dtype=F64), sigma[:-1]])
    return {
        "alpha_t": alpha,
        "sigma_t": sigma,
        "alpha_t_prev": alpha_s,
        "sigma_t_prev": sigma_s,
        "model_timestep": path.model_timestep,
        "path_scale": torch.hypot(alpha, sigma),
        "log_path_scale_sq_prev": torch.log(alpha_s**2 + sigma_s**2),
        "path_posterior_coef_xt": coef_xt,
        "path_posterior_coef_x0": coef_x0,
        "path_posterior_variance": variance,
        "prior_alpha_t": alpha[-1].clone(),
        "prior_sigma_t": sigma[-1].clone(),
    }


def assemble_path(
    name: str,
    spec: dict[str, Any],
    path: PathParts,
    timesteps: Tensor,
    num_train: int,
    *,
    error: type[ScheduleError] = ScheduleError,
    what: str | None = None,
) -> Schedule:
    """A schedule of a path: its VP-equivalent (alpha_bar = sigmoid(lambda)) and its own arrays;
    ``error``/``what``: how a degenerate VP-equivalent (a grid float64 cannot hold) is reported."""
    parts = _parts_from_logsnr(path.log_snr, path.log_snr_step)
    _validate(parts, error, what or f"{name} path")
    return _assemble(name, spec, parts, timesteps, num_train, path)


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
    built = info.build(timesteps, merged)
    changed = {k: v for k, v in merged.items() if v != info.defaults[k]}
    spec: dict[str, Any] = {"kind": kind, "timesteps": timesteps, "params": changed}
    ident = torch.arange(timesteps, dtype=torch.long)
    if isinstance(built, PathParts):
        what = f"schedule {kind} with {merged}"
        return assemble_path(
            kind, spec, built, ident, timesteps, error=ScheduleParameterError, what=what
        )
    _validate(built, ScheduleParameterError, f"schedule {kind} with {merged}")
    return _assemble(kind, spec, built, ident, timesteps)


def _as_f64(values: Sequence[float] | Tensor, what: str, *, finite: bool = True) -> Tensor:
    """``values`` as a flat float64 tensor, or one ScheduleError naming ``what``: not numbers,
    empty, or (with ``finite``) a NaN/inf value."""
    try:
        tensor = torch.as_tensor(values, dtype=F64).flatten()
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ScheduleError(f"{what}: not a list of numbers ({exc})") from None
    if tensor.numel() == 0:
        raise ScheduleError(f"{what}: empty")
    if not finite:
        return tensor
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
