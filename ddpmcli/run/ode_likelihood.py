"""The log-likelihood of data under the probability-flow ODE of a model (Song et al. 2021,
appendix D.2; the numbers score_sde and VDM report), for every Gaussian path the core holds.

``log p_eps(x) = log p_T(x_T) + int_eps^T div v(x(rho), rho) d rho``, where ``x(rho)`` solves
``dx/drho = v = alpha' x0_hat + sigma' eps_hat`` (:mod:`ddpmcli.core.ode_path`) from the data
at ``rho_eps`` to ``x_T`` at the last entry, and ``p_T = N(0, (alpha_T^2 + sigma_T^2) I)`` (VP
and flow: N(0, I)). The divergence is exact (one vector-Jacobian product per dimension, for
small data) or the Hutchinson-Skilling estimate ``E[u^T (dv/dx) u]`` with K fixed probes per
sample, each probe integrated as its own estimate along the one trajectory (their spread is the
probe part of the error). The solver (:mod:`ddpmcli.run.ode`) steps each sample on its own.

Units: nats of the data's density at ``rho_eps`` (the start of the ODE, the schedule's first
entry by default: a DDPM never sees cleaner inputs), then bits/dim ``-log p/(D ln 2)``; with
uniform dequantization of 8-bit data in ``[lo, hi]`` the data are ``lo + (hi - lo)(k + u)/256``
and ``log2(256/(hi - lo))`` bits/dim are added (7 for [-1, 1]: score_sde's offset), which makes
the number an upper bound on the discrete data's bits/dim.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ddpmcli.choices import DEQUANTIZATIONS, PROBE_KINDS, Dequantization, ProbeKind
from ddpmcli.core import ode_path
from ddpmcli.errors import name_parameters
from ddpmcli.hashing import MASK64, splitmix64
from ddpmcli.run.distributed import Ranks
from ddpmcli.run.events import (
    Event,
    Observer,
    ParameterError,
    RunError,
    call_model,
    check_data_finite,
    notify,
)
from ddpmcli.run.noise import sample_noise
from ddpmcli.run.ode import STATUS_NAMES, check_solver_settings, solve_dopri5, solve_rk4

__all__ = [
    "MAX_EXACT_DIVERGENCE_VALUES",
    "ODE_COLUMNS",
    "OdeGeometry",
    "OdeResult",
    "OdeSettings",
    "SolveCapped",
    "ode_likelihood",
]

ODE_COLUMNS: tuple[str, ...] = (
    "sample",
    "method",
    "convention",
    "bits_per_dim",
    "stderr",
    "probe_stderr",
    "evals",
    "status",
)
MAX_EXACT_DIVERGENCE_VALUES = 64
"""Most values per sample for the exact divergence (one backward pass per value per step)."""
_PROBE_TAG, _DEQUANT_TAG = 0x0DE9B0BE, 0x0DE0DEC1
_LN2 = math.log(2.0)

Predict = Callable[..., Any]
"""``predict(x [b, *shape] in the model's dtype, t float64 [b], sample_index=...)`` -> the
output, or ``(output, variance values)`` as ``LoadedModel.predict`` returns."""


class SolveCapped(RunError):
    """Some samples' solves hit the evaluation cap (or the model returned NaN/Inf): ``rows``
    holds every sample's row, the stopped ones with their status and no number."""


@dataclass(frozen=True)
class OdeSettings:
    """How the ODE is solved and what its number means (see :func:`ode_likelihood`)."""

    exact_divergence: bool = False  # else Hutchinson-Skilling with `probes` probes
    probes: int = 1
    probe_kind: ProbeKind = "rademacher"
    rtol: float = 1e-5
    atol: float = 1e-5
    max_evals: int = 4000
    steps: int | None = None  # a fixed RK4 grid instead of the adaptive solver
    t_eps: float | None = None  # model timestep where the ODE starts (default: first entry)
    dequantization: Dequantization = "none"  # auto: uniform for 4-D data (images)
    seed: int = 0
    batch_size: int | None = None

    def check(self, numel: int) -> None:
        """Reject settings before any work (templates name the parameters)."""
        if self.probe_kind not in PROBE_KINDS:
            raise ParameterError(
                f"{{probe_kind}} must be rademacher or gaussian, not {self.probe_kind!r}"
            )
        if not 1 <= self.probes <= 4096:
            raise ParameterError(f"{{probes}} must be in 1..4096, got {self.probes}")
        if self.dequantization not in DEQUANTIZATIONS:
            raise ParameterError(
                f"{{dequantization}} must be one of {', '.join(DEQUANTIZATIONS)}, not "
                f"{self.dequantization!r}"
            )
        check_solver_settings(self.rtol, self.atol, self.max_evals, self.steps)
        if self.batch_size is not None and not 1 <= self.batch_size <= 1 << 20:
            raise ParameterError(f"{{batch_size}} must be in 1..1048576, got {self.batch_size}")
        if self.exact_divergence and numel > MAX_EXACT_DIVERGENCE_VALUES:
            raise ParameterError(
                f"{{exact_divergence}} takes one backward pass per value: the data have {numel} "
                f"values per sample, the limit is {MAX_EXACT_DIVERGENCE_VALUES}; use Hutchinson "
                "probes ({probes}) instead"
            )


@dataclass(frozen=True)
class OdeGeometry:
    """A schedule as the ODE sees it: its path, the flow time ``rho``, log-SNR and model
    timestep of every entry (float64), and the prior's variance."""

    path: str
    rho: Tensor
    log_snr: Tensor
    timesteps: Tensor
    prior_variance: float

    @classmethod
    def of(cls, schedule: Any) -> OdeGeometry:
        """From a ``core.Schedule`` (its ``alpha_t``/``sigma_t`` where it has them, else the VP
        ``sqrt_alpha_bar``/``sqrt_one_minus_alpha_bar``)."""
        path = str(getattr(schedule, "path", "vp"))
        alpha = getattr(schedule, "alpha_t", None)
        sigma = getattr(schedule, "sigma_t", None)
        if alpha is None or sigma is None:
            alpha, sigma = schedule.sqrt_alpha_bar, schedule.sqrt_one_minus_alpha_bar
        alpha, sigma = alpha.detach().cpu().double(), sigma.detach().cpu().double()
        steps = getattr(schedule, "model_timestep", None)
        if steps is None:
            steps = schedule.timesteps
        rho = ode_path.path_of_entries(path, alpha, sigma)
        lam = 2.0 * (torch.log(alpha) - torch.log(sigma))
        prior = float(alpha[-1] ** 2 + sigma[-1] ** 2)
        return cls(path, rho, lam, steps.detach().cpu().double(), prior)

    def rho_at_timestep(self, t: float) -> float:
        """The flow time where the model timestep is ``t`` (the inverse of the interpolation)."""
        ts = self.timesteps
        lo, hi = float(ts.min()), float(ts.max())
        if not lo <= t <= hi:
            raise ParameterError(
                f"{{t_eps}} {t} is outside the schedule's timesteps {lo:g}..{hi:g}"
            )
        return float(self.rho_at_timesteps(torch.tensor([float(t)], dtype=torch.float64))[0])

    def rho_at_timesteps(self, t: Tensor) -> Tensor:
        """:meth:`rho_at_timestep` for a tensor of timesteps (increasing timesteps only)."""
        ts, n = self.timesteps, self.timesteps.shape[0]
        if n == 1:
            return self.rho.expand(t.shape[0]).clone()
        i = torch.searchsorted(ts, t.double().contiguous(), right=True).sub(1).clamp(0, n - 2)
        step = ts[i + 1] - ts[i]
        w = ((t.double() - ts[i]) / torch.where(step == 0, 1.0, step)).clamp(0.0, 1.0)
        l0, l1 = self.log_snr[i], self.log_snr[i + 1]
        finite = torch.isfinite(l0) & torch.isfinite(l1)
        lam = torch.where(finite, l0, 0.0) + w * torch.where(finite, l1 - l0, 0.0)
        by_lam = ode_path.rho_of_log_snr(lam)
        return torch.where(finite, by_lam, self.rho[i] + w * (self.rho[i + 1] - self.rho[i]))

    def timestep_at(self, rho: Tensor) -> Tensor:
        return ode_path.timestep_at(rho, self.rho, self.log_snr, self.timesteps)

    def at_timesteps(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(alpha, sigma)`` where the model timesteps are ``t`` (tests' exact models use it)."""
        a, s, _, _ = ode_path.path_coefficients(self.path, self.rho_at_timesteps(t))
        return a, s


@dataclass
class OdeResult:
    """What :func:`ode_likelihood` returns: ``rows`` (one per sample, then ``total``),
    per-sample tensors (``logp`` nats, ``bits_per_dim``, ``probe_var`` of the bits/dim estimate,
    ``evals``, ``latent`` x_T, ``delta`` the divergence integral in nats), ``status``, the total
    and its two standard errors, and the ``convention`` (short) and ``description`` (long)."""

    rows: list[dict[str, Any]]
    logp: Tensor
    bits_per_dim: Tensor
    probe_var: Tensor
    evals: Tensor
    latent: Tensor
    delta: Tensor
    status: list[str]
    convention: str
    description: str
    total_bpd: float | None
    total_stderr: float | None
    probe_stderr: float | None


@dataclass(frozen=True)
class _Setup:
    predict: Predict
    kind: str
    geometry: OdeGeometry
    shape: tuple[int, ...]
    model_dtype: torch.dtype
    settings: OdeSettings
    rho0: float
    rho1: float


def _probes(settings: OdeSettings, start: int, stop: int, numel: int) -> Tensor:
    """The K fixed probes of samples ``start..stop-1`` ``[b, K, D]`` (seeded per sample)."""
    seed = splitmix64((settings.seed & MASK64) ^ _PROBE_TAG)
    z = sample_noise(seed, start, stop, (settings.probes, numel))
    return z.sign() if settings.probe_kind == "rademacher" else z


def _dequantize(
    x0: Tensor, settings: OdeSettings, start: int, data_range: tuple[float, float]
) -> Tensor:
    """8-bit data ``lo + (hi - lo) k/255`` -> ``lo + (hi - lo)(k + u)/256``, ``u`` uniform in
    [0, 1) seeded per sample; refused where the data are not on the 256-level grid."""
    lo, hi = data_range
    k = (x0 - lo) / (hi - lo) * 255.0
    off = float((k - k.round()).abs().max()) if k.numel() else 0.0
    if off > 0.01:
        raise ParameterError(
            "{dequantization} uniform is for 8-bit data (256 levels on the data range); these "
            f"values are up to {off:.3g} of a level off the grid: use none for continuous data"
        )
    seed = splitmix64((settings.seed & MASK64) ^ _DEQUANT_TAG)
    z = sample_noise(seed, start, start + x0.shape[0], tuple(x0.shape[1:])).to(x0.device)
    u = 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))
    return lo + (hi - lo) * (k.round().clamp(0, 255) + u) / 256.0


def _ode_fn(setup: _Setup, probes: Tensor | None, index: Tensor) -> Callable[..., Tensor]:
    """The right-hand side on ``[b, D + K]`` states: the velocity and the divergence estimates."""
    shape, d = setup.shape, math.prod(setup.shape)
    geo = setup.geometry

    def fn(rho: Tensor, y: Tensor, rows: Tensor) -> Tensor:
        b = y.shape[0]
        alpha, sigma, da, ds = (
            c.view(b, *([1] * len(shape))) for c in ode_path.path_coefficients(geo.path, rho)
        )
        t_model = geo.timestep_at(rho.cpu()).to(y.device)
        with torch.enable_grad():
            x = y[:, :d].reshape(b, *shape).detach().requires_grad_(True)
            raw: Any = call_model(
                setup.predict, x.to(setup.model_dtype), t_model, sample_index=index[rows]
            )
            out = (raw[0] if isinstance(raw, tuple) else raw).to(torch.float64)
            x0, eps = ode_path.prediction_to_x0_eps(out, x, alpha, sigma, setup.kind)
            vel = (da * x0 + ds * eps).reshape(b, d)
            div = _divergence(vel, x, None if probes is None else probes[rows])
        return torch.cat([vel.detach(), div], dim=1)

    return fn


def _divergence(vel: Tensor, x: Tensor, probes: Tensor | None) -> Tensor:
    """``[b, 1]`` the exact trace of dv/dx, or ``[b, K]`` one Hutchinson estimate per probe."""
    b, d = vel.shape
    if probes is None:
        cols = []
        for j in range(d):
            (g,) = torch.autograd.grad(vel[:, j].sum(), x, retain_graph=j < d - 1)
            cols.append(g.reshape(b, d)[:, j])
        return torch.stack(cols, 1).sum(1, keepdim=True)
    k = probes.shape[1]
    ests = []
    for i in range(k):
        u = probes[:, i]
        (g,) = torch.autograd.grad((vel * u).sum(), x, retain_graph=i < k - 1)
        ests.append((g.reshape(b, d) * u).sum(1))
    return torch.stack(ests, 1)


def _solve_chunk(
    setup: _Setup, x: Tensor, start: int, on_finish: Callable[[int], None]
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Samples ``start .. start + b - 1``: ``(x_T [b, D], divergence integrals [b, K], evals,
    status)``."""
    s = setup.settings
    b, d = x.shape[0], math.prod(setup.shape)
    dev = x.device
    probes = None
    if not s.exact_divergence:
        probes = _probes(s, start, start + b, d).to(dev)
    index = torch.arange(start, start + b, device=dev)
    fn = _ode_fn(setup, probes, index)
    k = 1 if probes is None else probes.shape[1]
    y0 = torch.cat([x.reshape(b, d), torch.zeros(b, k, dtype=torch.float64, device=dev)], 1)
    t0 = torch.full((b,), setup.rho0, dtype=torch.float64, device=dev)
    t1 = torch.full((b,), setup.rho1, dtype=torch.float64, device=dev)
    if s.steps is not None:
        sol = solve_rk4(fn, y0, t0, t1, steps=s.steps, on_finish=on_finish)
    else:
        sol = solve_dopri5(
            fn, y0, t0, t1, rtol=s.rtol, atol=s.atol, max_evals=s.max_evals, on_finish=on_finish
        )
    return sol.y[:, :d], sol.y[:, d:], sol.evals, sol.status


def ode_likelihood(
    predict: Predict,
    schedule: Any,
    prediction_type: str,
    x0: Tensor,
    *,
    settings: OdeSettings = OdeSettings(),
    data_range: tuple[float, float] = (-1.0, 1.0),
    device: str | torch.device = "cpu",
    model_dtype: torch.dtype = torch.float32,
    observers: Sequence[Observer] = (),
    ranks: Ranks | None = None,
) -> OdeResult:
    """The log-likelihood of each sample of ``x0`` ``[n, *shape]`` under the probability-flow
    ODE of ``predict`` on ``schedule`` (module docstring), in bits/dim.

    Samples are cut into chunks of ``settings.batch_size`` (default 256) by their global index;
    a distributed run (``ranks``) gives each rank a contiguous share of the chunks, so each
    sample's solve is the one a single process does, and the per-sample numbers are gathered.
    Every solve ends (``max_evals``), so no rank waits on another's without bound. Progress:
    one :class:`Event` ``("ode", samples done, n)`` each time a sample finishes.

    Raises:
        ParameterError: bad settings (before any work), data off the 8-bit grid for uniform
            dequantization, ``t_eps`` outside the schedule.
        SolveCapped: some solve hit ``max_evals`` or the model returned NaN/Inf; its ``rows``
            hold every sample's row (the stopped ones without a number) and no total.
    """
    n = int(x0.shape[0])
    shape = tuple(int(v) for v in x0.shape[1:])
    s = settings
    s.check(math.prod(shape))
    if n < 1:
        raise ParameterError("no data to evaluate the likelihood on")
    check_data_finite(x0, model_dtype)
    if s.dequantization == "auto":
        s = dataclasses.replace(s, dequantization="uniform" if x0.ndim == 4 else "none")
    geometry = OdeGeometry.of(schedule)
    kind = _prediction_kind(prediction_type)
    rho0 = float(geometry.rho[0]) if s.t_eps is None else geometry.rho_at_timestep(s.t_eps)
    rho1 = float(geometry.rho[-1])
    if not rho0 < rho1:  # (t_eps None: a one-entry schedule; it said "--t-eps None")
        raise ParameterError(
            "the schedule has one timestep: the ODE has nothing to integrate (use the bound)"
            if s.t_eps is None
            else f"{{t_eps}} {s.t_eps} leaves nothing to integrate (it is the last entry)"
        )
    if rho1 >= 1.0 and kind == "epsilon":
        raise ParameterError(
            "the schedule ends at alpha = 0 (zero terminal SNR), where an epsilon model gives no "
            "x0: the probability-flow ODE cannot reach it"
        )
    dev = torch.device(device)
    setup = _Setup(predict, kind, geometry, shape, model_dtype, s, rho0, rho1)
    data = x0.to(device=dev, dtype=torch.float64)
    ranks = ranks or Ranks()
    per = s.batch_size or 256
    chunks = [(a, min(n, a + per)) for a in range(0, n, per)]
    first, last = ranks.share(len(chunks))
    k = 1 if s.exact_divergence else s.probes
    d = math.prod(shape)
    latent = torch.zeros(n, d, dtype=torch.float64)
    acc = torch.zeros(n, k, dtype=torch.float64)
    evals = torch.zeros(n, dtype=torch.long)
    status = torch.zeros(n, dtype=torch.long)
    failure: Exception | None = None
    try:
        done = 0
        for a, b in chunks[first:last]:
            xb = data[a:b]
            if s.dequantization == "uniform":
                xb = _dequantize(xb, s, a, data_range)
                data[a:b] = xb

            def finished(count: int, base: int = done) -> None:
                notify(observers, Event("ode", ranks.progress(base + count, n), n))

            xt, ab, eb, sb = _solve_chunk(setup, xb, a, finished)
            latent[a:b], acc[a:b], evals[a:b], status[a:b] = xt.cpu(), ab.cpu(), eb.cpu(), sb.cpu()
            done += b - a
    except Exception as exc:  # the other ranks must hear of it before the sums
        if not ranks.active:
            raise
        failure = exc
    ranks.settle(failure)
    for tensor in (latent, acc, evals, status):
        ranks.sum(tensor)  # each sample's numbers come from one rank; the others add zeros
    return _ode_result(setup, data.cpu(), latent, acc, evals, status, data_range)


def _prediction_kind(prediction_type: str) -> str:
    from ddpmcli.core import canonical_prediction_type

    name = prediction_type.strip().lower()
    if name in ("flow", "flow_prediction", "velocity"):
        return "flow"
    return canonical_prediction_type(name)


def describe(setup: _Setup, data_range: tuple[float, float]) -> tuple[str, str]:
    """The convention's short name and its description."""
    s, geo = setup.settings, setup.geometry
    t0 = float(geo.timestep_at(torch.tensor([setup.rho0], dtype=torch.float64)))
    a0, s0, _, _ = ode_path.path_coefficients(geo.path, torch.tensor([setup.rho0]).double())
    div = (
        "exact divergence"
        if s.exact_divergence
        else f"Hutchinson divergence ({s.probes} {s.probe_kind} probe(s) per sample)"
    )
    solver = (
        f"RK4 on {s.steps} equal steps"
        if s.steps is not None
        else f"Dormand-Prince 5(4), rtol {s.rtol:g}, atol {s.atol:g}"
    )
    v = geo.prior_variance
    prior = "N(0, I)" if abs(v - 1.0) < 1e-12 else f"N(0, {v:.4g} I)"
    lo, hi = data_range
    if s.dequantization == "uniform":
        short = "ode_dequantized"
        units = (
            f"uniform dequantization of 8-bit data, +log2(256/{hi - lo:g}) = "
            f"{math.log2(256 / (hi - lo)):.4g} bits/dim (a bound on discrete bits/dim)"
        )
    else:
        short = "ode_continuous"
        units = "density of continuous data, no dequantization (can be negative)"
    text = (
        f"probability-flow ODE of the {geo.path} path from t = {t0:g} (sigma/alpha = "
        f"{float(s0 / a0):.3g}) to t = {float(geo.timesteps[-1]):g}, prior {prior}; {div}; "
        f"{solver}; {units}"
    )
    return short, text


def _ode_result(
    setup: _Setup,
    data: Tensor,
    latent: Tensor,
    acc: Tensor,
    evals: Tensor,
    status: Tensor,
    data_range: tuple[float, float],
) -> OdeResult:
    """Rows and totals; :class:`SolveCapped` (carrying every row) where a solve stopped."""
    from ddpmcli.core.ode_path import gaussian_log_density

    n, d = latent.shape
    k = acc.shape[1]
    short, text = describe(setup, data_range)
    delta = acc.mean(1)
    logp = gaussian_log_density(latent, setup.geometry.prior_variance) + delta
    offset = 0.0
    if setup.settings.dequantization == "uniform":
        lo, hi = data_range
        offset = math.log2(256.0 / (hi - lo))
    bpd = -logp / (d * _LN2) + offset
    probe_var = (
        acc.var(1, correction=1) / k / (d * _LN2) ** 2
        if k > 1
        else torch.zeros(n, dtype=torch.float64)
    )
    names = [STATUS_NAMES[int(v)] for v in status.tolist()]
    cap = setup.settings.max_evals
    rows: list[dict[str, Any]] = []
    for i in range(n):
        ok = names[i] == "ok"
        rows.append(
            {
                "sample": i, "method": "ode", "convention": short,
                "bits_per_dim": float(bpd[i]) if ok else None, "stderr": None,
                "probe_stderr": math.sqrt(float(probe_var[i])) if ok and k > 1 else None,
                "evals": int(evals[i]),
                "status": names[i] if names[i] != "capped" else f"capped at {cap} evals",
            }
        )  # fmt: skip
    stopped = [i for i in range(n) if names[i] != "ok"]
    total: dict[str, Any] = {
        "sample": None, "method": "ode", "convention": short, "bits_per_dim": None,
        "stderr": None, "probe_stderr": None, "evals": float(evals.double().mean()),
        "status": "total",
    }  # fmt: skip
    result = OdeResult(
        rows, logp, bpd, probe_var, evals, latent, delta, names, short, text, None, None, None
    )
    if stopped:
        total["status"] = f"no total: {len(stopped)} of {n} solve(s) stopped"
        rows.append(total)
        first = stopped[0]
        template = (
            f"{len(stopped)} of {n} ODE solve(s) stopped before t = T, first sample {first} "
            f"({rows[first]['status']}); raise {{max_evals}} or loosen {{rtol}}/{{atol}}"
        )
        error = SolveCapped(name_parameters(template, str), rows)
        error.template = template
        raise error
    total["bits_per_dim"] = float(bpd.mean())
    total["stderr"] = float(bpd.std(correction=1) / math.sqrt(n)) if n > 1 else None
    total["probe_stderr"] = float(probe_var.sum().sqrt() / n) if k > 1 else None
    rows.append(total)
    result.total_bpd, result.total_stderr = total["bits_per_dim"], total["stderr"]
    result.probe_stderr = total["probe_stderr"]
    return result
