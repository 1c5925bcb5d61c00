"""The :class:`Schedule`: every per-t array of a discrete DDPM schedule as a stored float64 field,
the one broadcast helper :func:`extract`, and the schedules built from a kind or explicit arrays.

Index convention (diffusers and improved-diffusion): timesteps are 0-based as the models take them.
``t = 0`` is one noising step, ``alpha_bar_prev[0] = 1``; the paper's step is ``t + 1``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor

from ddpmcli.core.kinds import (
    VARIANCE_TYPES,
    canonical_prediction_type,
)
from ddpmcli.core.likelihood import normal_kl
from ddpmcli.errors import ScheduleParameterError

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


PATH_QUANTITIES: tuple[str, ...] = (
    "alpha_t",
    "sigma_t",
    "path_posterior_variance",
    "path_posterior_coef_x0",
    "path_posterior_coef_xt",
)
"""The path's own per-t quantities (x_t = alpha_t x0 + sigma_t eps); on VP equal to
sqrt_alpha_bar, sqrt_one_minus_alpha_bar and the posterior columns."""

PATH_DEFAULT_QUANTITIES: tuple[str, ...] = (
    "alpha_t",
    "sigma_t",
    "alpha_bar",
    "snr",
    "log_snr",
    "sigma",
    "path_posterior_variance",
    "path_posterior_coef_x0",
    "path_posterior_coef_xt",
)
"""What a table of a path other than VP shows by default: the rest of :data:`QUANTITIES`
(beta, alpha, alpha_bar_prev, sqrt_*, posterior_*) describe the VP-equivalent x_t/c_t, not x_t."""


def _tensor_field() -> Any:
    return field(repr=False, compare=False)


def _scalar_field() -> Any:
    # A 0-d tensor of the whole schedule (not per t): to() casts and moves it, take() keeps it.
    return field(repr=False, compare=False, metadata={"per_t": False})


@dataclass(frozen=True, eq=False)
class Schedule:
    """A discrete DDPM schedule: 1-D float64 tensors computed once, named after their formulas.

    Index ``i`` runs over ``0 .. num_steps - 1``; the model is called with ``timesteps[i]`` (the
    identity unless respaced). ``t = 0`` is one noising step and ``alpha_bar_prev[0] = 1``.
    ``posterior_log_variance_clipped`` replaces the log of ``posterior_variance[0] = 0`` by the log
    of ``posterior_variance[1]`` (improved-diffusion's convention).

    Every per-t quantity is a stored 1-D field, never a property recomputed per call, so that
    :meth:`take` and :meth:`to` map all of them (:func:`per_t_fields` lists them). ``index`` is the
    position of each entry in this schedule (``arange(num_steps)`` until :meth:`take` picks some),
    so that "no noise at the first step" holds on a taken table too. The ``prior_*`` fields are
    0-d: the values at the schedule's last step, for the prior term, whatever :meth:`take` keeps.
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
    fixed_large_log_variance: Tensor = _tensor_field()
    variance_ratio: Tensor = _tensor_field()
    index: Tensor = _tensor_field()
    # ---- the Gaussian path x_t = alpha_t x0 + sigma_t eps in its own coordinates (VP: the same
    # values as sqrt_alpha_bar, sqrt_one_minus_alpha_bar; see ddpmcli.core.paths) ----
    alpha_t: Tensor = _tensor_field()
    sigma_t: Tensor = _tensor_field()
    alpha_t_prev: Tensor = _tensor_field()
    sigma_t_prev: Tensor = _tensor_field()
    model_timestep: Tensor = _tensor_field()
    path_scale: Tensor = _tensor_field()
    log_path_scale_sq_prev: Tensor = _tensor_field()
    path_posterior_coef_xt: Tensor = _tensor_field()
    path_posterior_coef_x0: Tensor = _tensor_field()
    path_posterior_variance: Tensor = _tensor_field()
    prior_sqrt_alpha_bar: Tensor = _scalar_field()
    prior_one_minus_alpha_bar: Tensor = _scalar_field()
    prior_alpha_t: Tensor = _scalar_field()
    prior_sigma_t: Tensor = _scalar_field()
    path: str = "vp"

    @property
    def num_steps(self) -> int:
        return int(self.beta.shape[0])

    def _map_arrays(self, fn: Callable[[Tensor], Tensor], *, per_t_only: bool = False) -> Schedule:
        names = per_t_fields() if per_t_only else tensor_fields()
        moved: dict[str, Any] = {name: fn(getattr(self, name)) for name in names}
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
        return self._map_arrays(lambda v: v[idx.to(v.device)], per_t_only=True)

    def network_timesteps(self, t: Tensor) -> Tensor:
        """What the network is called with at indices ``t``: ``timesteps[t]`` (int64) on a VP
        schedule, ``model_timestep[t]`` as float32 on another path (1000 s for a flow, as
        diffusers' FlowMatchEulerDiscreteScheduler passes it; ln(sigma)/4 for EDM)."""
        if self.path == "vp":
            return self.timesteps[t.to(self.timesteps.device)]
        return self.model_timestep[t.to(self.model_timestep.device)].to(torch.float32)

    def quantity(self, name: str) -> Tensor:
        """One of :data:`QUANTITIES` or :data:`PATH_QUANTITIES` by name."""
        if name not in QUANTITIES and name not in PATH_QUANTITIES:
            allowed = ", ".join([*QUANTITIES, *PATH_QUANTITIES])
            raise ScheduleParameterError(f"unknown quantity {name!r}; allowed: {allowed}")
        value: Tensor = getattr(self, name)
        return value

    # ---- forward process and conversions (Ho et al. 2020 eq. 4, 15; Salimans & Ho 2022 for v) ----
    # On a path other than VP, x_t is c_t = sqrt(alpha_t^2 + sigma_t^2) times the VP-equivalent
    # x'_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps; the VP formulas act on x'_t = x_t / c_t. On VP
    # nothing is divided, so every digit stays what it was.

    def _c(self, values: Tensor, t: Tensor, like: Tensor) -> Tensor:
        return extract(values, t, like.ndim, like=like)

    def vp_equivalent(self, x_t: Tensor, t: Tensor) -> Tensor:
        """x'_t = x_t / c_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps, the VP-equivalent of x_t
        (x_t itself on a VP schedule)."""
        if self.path == "vp":
            return x_t
        return x_t / self._c(self.path_scale, t, x_t)

    _vp = vp_equivalent

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = alpha_t x0 + sigma_t eps (VP: sqrt(ab_t) x0 + sqrt(1 - ab_t) eps).
        Shapes (B, ...); t int64 (B,) indices."""
        return self._c(self.alpha_t, t, x0) * x0 + self._c(self.sigma_t, t, x0) * noise

    def x0_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x0 = (x_t - sigma_t eps)/alpha_t; on VP x_t/sqrt(ab_t) - sqrt(1/ab_t - 1) eps
        (Ho et al. 2020 eq. 15)."""
        x = self._vp(x_t, t)
        return (
            self._c(self.sqrt_recip_alpha_bar, t, x) * x
            - self._c(self.sqrt_recipm1_alpha_bar, t, x) * eps
        )

    def eps_from_x0(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        """eps = (x_t - alpha_t x0)/sigma_t; finite also where alpha_t = 0."""
        x = self._vp(x_t, t)
        return (x - self._c(self.sqrt_alpha_bar, t, x) * x0) / self._c(
            self.sqrt_one_minus_alpha_bar, t, x
        )

    def x0_from_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        """x0 = sqrt(ab_t) x'_t - sqrt(1 - ab_t) v (v of the VP-equivalent path)."""
        x = self._vp(x_t, t)
        return (
            self._c(self.sqrt_alpha_bar, t, x) * x
            - self._c(self.sqrt_one_minus_alpha_bar, t, x) * v
        )

    def eps_from_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        """eps = sqrt(1 - ab_t) x'_t + sqrt(ab_t) v."""
        x = self._vp(x_t, t)
        return (
            self._c(self.sqrt_one_minus_alpha_bar, t, x) * x
            + self._c(self.sqrt_alpha_bar, t, x) * v
        )

    def v_target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """v = sqrt(ab_t) eps - sqrt(1 - ab_t) x0."""
        return (
            self._c(self.sqrt_alpha_bar, t, x0) * noise
            - self._c(self.sqrt_one_minus_alpha_bar, t, x0) * x0
        )

    def x0_from_flow(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        """x0 = (x_t - sigma_t v)/(alpha_t + sigma_t) for the flow velocity v = eps - x0
        (rectified flow, alpha = 1 - s, sigma = s: x0 = x_t - s v)."""
        sigma = self._c(self.sigma_t, t, x_t)
        return (x_t - sigma * v) / (self._c(self.alpha_t, t, x_t) + sigma)

    def eps_from_flow(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        """eps = (x_t + alpha_t v)/(alpha_t + sigma_t) (rectified flow: x_t + (1 - s) v)."""
        alpha = self._c(self.alpha_t, t, x_t)
        return (x_t + alpha * v) / (alpha + self._c(self.sigma_t, t, x_t))

    def predict_x0(
        self, model_output: Tensor, x_t: Tensor, t: Tensor, prediction_type: str
    ) -> Tensor:
        """x0_hat from a model output of the given prediction type."""
        kind = canonical_prediction_type(prediction_type)
        if kind == "epsilon":
            return self.x0_from_eps(x_t, t, model_output)
        if kind == "v_prediction":
            return self.x0_from_v(x_t, t, model_output)
        if kind == "flow":
            return self.x0_from_flow(x_t, t, model_output)
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
        if kind == "flow":
            return self.eps_from_flow(x_t, t, model_output)
        return self.eps_from_x0(x_t, t, model_output)

    # ---- posterior q(x_{t-1} | x_t, x0) = N(mu_tilde, beta_tilde I) (Ho et al. 2020 eq. 6-7) ----
    # On another path the mean and variance are the path's own (Kingma et al. 2021): the VP
    # variances times c_s^2 = alpha_s^2 + sigma_s^2 (log_path_scale_sq_prev, 0 before entry 0).

    def posterior_mean_variance(
        self, x0: Tensor, x_t: Tensor, t: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """mu_tilde = coef_x0 x0 + coef_xt x_t, beta_tilde, log beta_tilde (clipped at t = 0)."""
        mean = self.posterior_mean(x0, x_t, t)
        if self.path == "vp":
            var = self._c(self.posterior_variance, t, x_t).expand_as(x_t)
        else:
            var = self._c(self.path_posterior_variance, t, x_t).expand_as(x_t)
        log_var = self._c(self._path_log_variance(self.posterior_log_variance_clipped), t, x_t)
        return mean, var, log_var.expand_as(x_t)

    def posterior_mean(self, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """mu_tilde = coef_x0 x0 + coef_xt x_t alone (Ho et al. 2020 eq. 7; on another path its
        own coefficients, ``path_posterior_coef_*``)."""
        if self.path != "vp":
            return (
                self._c(self.path_posterior_coef_x0, t, x_t) * x0
                + self._c(self.path_posterior_coef_xt, t, x_t) * x_t
            )
        return (
            self._c(self.posterior_mean_coef_x0, t, x_t) * x0
            + self._c(self.posterior_mean_coef_xt, t, x_t) * x_t
        )

    def _path_log_variance(self, vp_log_variance: Tensor) -> Tensor:
        # a VP-equivalent log variance of x_{t-1} in the path's coordinates: + log c_s^2
        if self.path == "vp":
            return vp_log_variance
        return vp_log_variance + self.log_path_scale_sq_prev.to(vp_log_variance.device)

    def model_log_variance(
        self, variance_type: str, t: Tensor, like: Tensor, var_values: Tensor | None = None
    ) -> Tensor:
        """log of the reverse-process variance a sampler uses at ``t``, shaped like ``like``.

        The per-sample form of :meth:`sampler_log_variance` (same choices); ``var_values`` is the
        model's v, shaped like ``like``, for learned_range.
        """
        if variance_type == "learned_range":
            if var_values is None:
                raise ScheduleParameterError("learned_range needs the model's variance values")
            log_var = _learned_range(
                var_values,
                self._c(self.log_beta, t, like),
                self._c(self.posterior_log_variance_clipped, t, like),
            )
            if self.path == "vp":
                return log_var
            return log_var + self._c(self.log_path_scale_sq_prev, t, like)
        return self._c(self._fixed_log_variance(variance_type), t, like).expand_as(like)

    def sampler_log_variance(self, variance_type: str, v: Tensor | None = None) -> Tensor:
        """log of the reverse-process variance for every index: a (N,) table in this schedule's
        dtype, for loops and tables that need it per step rather than per sample.

        fixed_small: log beta_tilde (clipped at index 0 to log beta_tilde_1); fixed_large: log beta,
        with log beta_tilde_1 at index 0 (improved-diffusion); learned_range:
        frac log beta + (1 - frac) log beta_tilde, frac = (v + 1)/2 for the model's v in [-1, 1]
        (Nichol & Dhariwal 2021 eq. 15), ``v`` broadcasting against (N,).
        No step adds noise at index 0 (:meth:`ancestral_step`); the table still holds its value.
        """
        if variance_type == "learned_range":
            if v is None:
                raise ScheduleParameterError("learned_range needs the model's variance values")
            v = v.to(dtype=self.log_beta.dtype, device=self.log_beta.device)
            learned = _learned_range(v, self.log_beta, self.posterior_log_variance_clipped)
            return self._path_log_variance(learned)
        return self._fixed_log_variance(variance_type)

    def _fixed_log_variance(self, variance_type: str) -> Tensor:
        if variance_type == "fixed_small":
            return self._path_log_variance(self.posterior_log_variance_clipped)
        if variance_type == "fixed_large":
            return self._path_log_variance(self.fixed_large_log_variance)
        raise ScheduleParameterError(
            f"unknown variance type {variance_type!r}; allowed: {', '.join(VARIANCE_TYPES)}"
        )

    def ddim_variance(self, eta: float) -> Tensor:
        """sigma^2 of the DDIM step for every index, a (N,) table (Song et al. 2021 eq. 16):
        eta^2 (1 - ab_prev)/(1 - ab) (1 - ab/ab_prev) = eta^2 beta_tilde on this schedule."""
        if not math.isfinite(eta) or eta < 0:
            raise ScheduleParameterError(f"eta must be finite and >= 0, got {eta}")
        if self.path != "vp":
            return eta**2 * self.path_posterior_variance
        return eta**2 * self.posterior_variance

    def expected_xt_std(self, data_variance: float = 1.0) -> Tensor:
        """The std of x_t = sqrt(ab) x0 + sqrt(1 - ab) eps for data of variance ``data_variance``
        (independent of eps): sqrt(ab var + 1 - ab) for every index, a (N,) table."""
        if self.path != "vp":  # sqrt(alpha_t^2 var + sigma_t^2) in the path's coordinates
            return torch.sqrt(self.alpha_t**2 * data_variance + self.sigma_t**2)
        # Written as ab var + 1 - ab (not with one_minus_alpha_bar) so that the numbers equal the
        # ones `ddpm sample` has always printed, bit for bit; the difference is ~1e-16 absolute.
        return torch.sqrt(self.alpha_bar * data_variance + 1 - self.alpha_bar)

    def ancestral_step(
        self, x_t: Tensor, t: Tensor, x0: Tensor, log_var: Tensor, noise: Tensor
    ) -> Tensor:
        """x_{t-1} = mu_tilde(x_t, x0_hat) + exp(log_var/2) z, with no noise at index 0."""
        mean = self.posterior_mean(x0, x_t, t)
        # by `index`, not by `t` itself: on a taken table position 0 need not be index 0
        nonzero = (extract(self.index, t, x_t.ndim) != 0).to(dtype=x_t.dtype, device=x_t.device)
        return mean + nonzero * torch.exp(0.5 * log_var) * noise

    def ddim_step(
        self, x_t: Tensor, t: Tensor, x0: Tensor, eps: Tensor, eta: float, noise: Tensor
    ) -> Tensor:
        """x_{t-1} = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - s^2) eps + s z (Song et al. 2021 eq. 12),
        s^2 = :meth:`ddim_variance` (eta); on another path alpha_s x0 + sqrt(sigma_s^2 - s^2) eps
        + s z, with eta = 0 the flow Euler step x_t + (s_next - s) v on a rectified flow."""
        var = self._c(self.ddim_variance(eta), t, x_t)
        if self.path != "vp":
            sigma_s = self._c(self.sigma_t_prev, t, x_t)
            direction = sigma_s if eta == 0 else torch.sqrt(torch.clamp(sigma_s**2 - var, min=0))
            return self._c(self.alpha_t_prev, t, x_t) * x0 + direction * eps + var.sqrt() * noise
        direction = torch.sqrt(
            torch.clamp(self._c(self.one_minus_alpha_bar_prev, t, x_t) - var, min=0)
        )
        return (
            self._c(self.alpha_bar_prev, t, x_t).sqrt() * x0 + direction * eps + var.sqrt() * noise
        )

    # ---- terms of the variational bound ----

    def prior_kl(self, x0: Tensor) -> Tensor:
        """KL(q(x_T | x0) || N(0, I)) elementwise, in nats."""
        # the stored values of the last step, so a taken table gives the same prior
        mean = _cast(self.prior_sqrt_alpha_bar, x0) * x0
        log_var = torch.log(_cast(self.prior_one_minus_alpha_bar, x0))
        zero = torch.zeros_like(mean)
        return normal_kl(mean, log_var.expand_as(mean), zero, zero)

    def prior_kl_bits_per_dim_unit_variance(self) -> float:
        """E KL(q(x_T|x0) || N(0,1)) per dim for data with E x0^2 = 1: -log(1 - ab_T)/(2 ln 2)."""
        return float(-torch.log(self.prior_one_minus_alpha_bar) / (2 * math.log(2.0))) + 0.0


@functools.cache
def tensor_fields() -> tuple[str, ...]:
    """The names of every tensor field of :class:`Schedule` (what :meth:`Schedule.to` maps)."""
    return tuple(f.name for f in fields(Schedule) if f.type in ("Tensor", Tensor))


@functools.cache
def per_t_fields() -> tuple[str, ...]:
    """The names of the per-t (1-D) fields of :class:`Schedule`: what :meth:`Schedule.take` maps."""
    scalar = {f.name for f in fields(Schedule) if f.metadata.get("per_t", True) is False}
    return tuple(name for name in tensor_fields() if name not in scalar)


def _learned_range(v: Tensor, log_beta: Tensor, log_beta_tilde: Tensor) -> Tensor:
    # Nichol & Dhariwal 2021 eq. 15: interpolate the logs with frac = (v + 1)/2.
    frac = (v + 1) / 2
    return frac * log_beta + (1 - frac) * log_beta_tilde


def _cast(value: Tensor, like: Tensor) -> Tensor:
    # the cast before the move, as in extract (MPS has no float64)
    return value.to(dtype=like.dtype).to(device=like.device)


def extract(values: Tensor, t: Tensor, ndim: int, *, like: Tensor | None = None) -> Tensor:
    """``values[t]`` shaped ``(B, 1, ..., 1)`` with ``ndim`` dims, cast to ``like``'s dtype/device.

    The cast happens before the move, on the array's own device (MPS has no float64). Casts
    that would change nothing are skipped (the same tensors): a sampler's schedule is already on
    the data's dtype and device, and three no-op ``to`` calls per coefficient on every step were
    a measurable part of a small model's sampling time."""
    if like is not None:
        if values.dtype != like.dtype:
            values = values.to(dtype=like.dtype)
        if values.device != like.device:
            values = values.to(device=like.device)
        if t.device != like.device:
            t = t.to(device=like.device)
    elif values.device != t.device:
        values = values.to(device=t.device)
    return values[t].reshape(t.shape[0], *([1] * (ndim - 1)))
