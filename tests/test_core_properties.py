"""Hypothesis properties of the core: random kinds, T in [2, 2000], random valid parameters, with
and without zero terminal SNR, with random respacing; plus fixed-seed Monte Carlo checks of the
forward process and the posterior, and the likelihood terms.

Tolerances are stated where they are used. Round trips are held to 1e-10 absolute for data of unit
scale; where a conversion divides by sqrt(alpha_bar) (x0 from eps) its float64 error grows like
ulp/sqrt(alpha_bar), so the bound there is 1e-10 + 64 ulp (|x_t| + |eps|)/sqrt(alpha_bar) -- this
only matters for alpha_bar < ~1e-10 (the steps before a zero terminal SNR).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from mpmath import mp, mpf

from ddpmcli import core

F64 = torch.float64
ULP = float(np.finfo(np.float64).eps)
SETTINGS = settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)

# --------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------


def _u(lo: float, hi: float) -> st.SearchStrategy[float]:
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False)


def _log_u(lo: float, hi: float) -> st.SearchStrategy[float]:
    return _u(math.log(lo), math.log(hi)).map(math.exp)


@st.composite
def kind_params(draw, kind: str, n: int) -> dict[str, float]:
    """Valid, non-degenerate constants for ``kind`` at T = n (no plateau of alpha_bar)."""
    if kind in ("linear", "sigmoid", "scaled_linear"):
        start = draw(_log_u(1e-5, 2e-3))
        end = draw(_u(start * 1.5, 0.05))
        params = {"beta_start": start, "beta_end": end}
        if kind == "linear" and draw(st.booleans()):
            assume(end * 1000 / n < 0.9)
            params["scale_to_timesteps"] = 1.0
        return params
    if kind == "cosine":
        return {"s": draw(_u(0.0, 0.05)), "max_beta": draw(_u(0.5, 0.999))}
    if kind == "sqrt":
        return {"offset": draw(_log_u(1e-5, 1e-3)), "max_beta": draw(_u(0.5, 0.999))}
    if kind == "sigmoid_logsnr":
        return {
            "start": draw(_u(-5.0, 0.0)),
            "end": draw(_u(1.0, 5.0)),
            "tau": draw(_u(0.5, 2.0)),
            "clip_min": draw(_log_u(1e-12, 1e-9)),
        }
    if kind == "laplace":
        return {
            "mu": draw(_u(-1.0, 1.0)),
            "b": draw(_u(0.25, 1.5)),
            "logsnr_min": draw(_u(-30.0, -20.0)),
            "logsnr_max": draw(_u(20.0, 30.0)),
        }
    if kind == "exp":
        return {"rate": draw(_u(0.5, 30.0))}
    if kind == "shifted_cosine":
        return {
            "base": draw(_u(16.0, 128.0)),
            "resolution": draw(_u(32.0, 1024.0)),
            "logsnr_min": draw(_u(-20.0, -10.0)),
            "logsnr_max": draw(_u(10.0, 20.0)),
        }
    if kind == "vp":
        beta_max = draw(_u(5.0, 30.0))
        assume(beta_max / n < 0.9)
        return {"beta_min": draw(_u(0.01, 1.0)), "beta_max": beta_max}
    if kind == "edm":
        return {
            "sigma_min": draw(_log_u(1e-3, 0.1)),
            "sigma_max": draw(_u(10.0, 160.0)),
            "rho": draw(_u(1.0, 10.0)),
        }
    if kind == "edm_sigma":
        return {
            "sigma_min": draw(_log_u(1e-3, 0.1)),
            "sigma_max": draw(_u(10.0, 160.0)),
            "rho": draw(_u(1.0, 10.0)),
        }
    if kind == "ve":
        return {"sigma_min": draw(_log_u(1e-3, 0.1)), "sigma_max": draw(_u(10.0, 100.0))}
    if kind == "flow":
        return {"shift": draw(_log_u(0.2, 10.0))}
    raise AssertionError(kind)


@st.composite
def kept_steps(draw, n: int) -> list[int]:
    """A respacing: a diffusers spacing, an improved-diffusion section string, or any subset."""
    how = draw(st.sampled_from(["spacing", "sections", "subset"]))
    if how == "spacing":
        spacing = draw(st.sampled_from(core.SPACINGS))
        steps = draw(st.integers(1, n))
        offset = draw(st.integers(0, 1)) if spacing == "leading" else 0
        assume(spacing != "leading" or (n // steps) * (steps - 1) + offset < n)
        return core.respaced_timesteps(n, steps, spacing, steps_offset=offset)
    if how == "sections":
        sections = draw(st.integers(1, min(4, n)))
        size = n // sections
        counts = draw(st.lists(st.integers(1, size), min_size=sections, max_size=sections))
        return core.respaced_timesteps(n, ",".join(map(str, counts)))
    subset = draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=60, unique=True))
    return sorted(subset)


class Drawn:
    """A drawn schedule that prints as its spec (a falsifying example would else print every
    tensor); ``schedule_from_spec(spec)`` rebuilds it."""

    def __init__(self, schedule: core.Schedule) -> None:
        self.s = schedule

    def __repr__(self) -> str:
        spec = json.dumps(self.s.spec)
        return f"<{spec[:400]}{'...' if len(spec) > 400 else ''}>"


@st.composite
def schedules(draw, respace: bool | None = None, zsnr: bool | None = None) -> Drawn:
    kind = draw(st.sampled_from(sorted(core.SCHEDULE_KINDS)))
    n = draw(st.integers(max(2, core.SCHEDULE_KINDS[kind].min_timesteps), 2000))
    params = draw(kind_params(kind, n))
    zsnr = draw(st.booleans()) if zsnr is None else zsnr
    # zero terminal SNR rescales a VP schedule (a flow path reaches SNR 0 through its s = 1)
    zsnr = zsnr and core.SCHEDULE_KINDS[kind].path == "vp"
    shift = draw(st.sampled_from([0.0, 0.0, -1.0, 2.5]))
    s = core.make_schedule(kind, n, zero_terminal_snr=zsnr, logsnr_shift=shift, **params)
    if respace is None:
        respace = draw(st.booleans())
    if respace:
        kept = draw(kept_steps(n))
        s = core.respace(s, kept)
    return Drawn(s)


def _beta_condition(beta: np.ndarray) -> np.ndarray:
    """Relative error of prod(1 - beta) that 4 ulp of error in each beta can cause."""
    with np.errstate(divide="ignore"):
        term = np.where(beta < 1, 4 * ULP * beta / (1 - beta), 0.0)
    return np.cumsum(term)


def _all_t(s: core.Schedule) -> torch.Tensor:
    return torch.arange(s.num_steps)


# --------------------------------------------------------------------------------------------
# The schedule arrays
# --------------------------------------------------------------------------------------------


@SETTINGS
@given(schedules())
def test_alpha_bar_strictly_decreasing_in_unit_interval(d: Drawn) -> None:
    s = d.s
    ab = s.alpha_bar.numpy()
    assert np.all(np.diff(ab) < 0), np.nonzero(np.diff(ab) >= 0)
    assert np.all(ab[:-1] > 0) and np.all(ab <= 1)
    zsnr = "zero_terminal_snr" in str(s.spec.get("transforms", []))
    # a flow's training grid ends at s = 1 (alpha_t = 0): zero terminal SNR by construction
    starts_at_noise = s.path == "flow" and float(s.alpha_t[-1]) == 0.0
    assert ab[-1] > 0 or ((zsnr or starts_at_noise) and ab[-1] == 0)
    assert s.alpha_bar_prev[0].item() == 1.0
    assert torch.equal(s.alpha_bar_prev[1:], s.alpha_bar[:-1])


@SETTINGS
@given(schedules())
def test_beta_in_unit_interval(d: Drawn) -> None:
    s = d.s
    beta, alpha = s.beta, s.alpha
    assert bool((beta > 0).all()) and bool((beta <= 1).all())
    assert bool((beta[:-1] < 1).all())  # only the last step may reach alpha_bar = 0
    assert bool((alpha >= 0).all()) and bool((alpha < 1).all())


def test_respace_to_the_zero_snr_step_alone() -> None:
    s = core.make_schedule("cosine", zero_terminal_snr=True)
    assert s.one_minus_alpha_bar[-1].item() == 1.0
    r = core.respace(s, [999])
    assert 0 < r.beta.item() <= 1


@SETTINGS
@given(schedules())
def test_posterior_variance_between_zero_and_beta(d: Drawn) -> None:
    s = d.s
    pv, beta = s.posterior_variance, s.beta
    assert bool((pv >= 0).all()) and bool((pv <= beta).all())
    assert pv[0].item() == 0.0  # q(x_{-1} | x_0, x0) is a point mass: t = 0 is one noising step
    assert bool(torch.isfinite(s.posterior_log_variance_clipped).all())


@SETTINGS
@given(schedules(respace=False), st.data())
def test_respaced_betas_multiply_to_alpha_bar(d: Drawn, data: st.DataObject) -> None:
    s = d.s
    kept = data.draw(kept_steps(s.num_steps))
    r = core.respace(s, kept)
    assert r.timesteps.tolist() == kept
    ref = s.alpha_bar.numpy()[kept]
    # float64 product of n factors, each exact to 1/2 ulp: <= (n + 2) ulp relative. The factors are
    # the core's alpha = 1 - beta, which must agree with 1 - beta to the rounding of that
    # subtraction (a beta near 1 has lost alpha's low digits, so 1 - beta in float64 cannot stand
    # in for alpha at this tolerance).
    alpha, beta = r.alpha.numpy(), r.beta.numpy()
    assert np.all(np.abs(alpha - (1 - beta)) <= ULP)
    prod = np.cumprod(alpha)
    tol = (len(kept) + 2) * ULP * ref
    assert np.all(np.abs(prod - ref) <= tol), np.max(np.abs(prod - ref) / np.maximum(ref, 1e-300))
    # ... and in exact arithmetic from the float betas themselves, to 1e-12 relative plus what
    # the betas cannot carry: a beta accurate to a few ulp is 1 - beta accurate only to
    # ulp beta/(1 - beta) relative (large where beta nears 1).
    with mp.workdps(40):
        exact = [mpf(1)]
        for b in beta:
            exact.append(exact[-1] * (1 - mpf(b)))
    exact_ab = np.array([float(v) for v in exact[1:]])
    rel = np.abs(exact_ab - ref) / np.where(ref > 0, ref, 1.0)
    assert np.all(rel <= 1e-12 + _beta_condition(beta)), (int(np.argmax(rel)), rel.max())
    assert torch.equal(r.alpha_bar, s.alpha_bar[kept])


@SETTINGS
@given(schedules())
def test_spec_round_trip_is_exact(d: Drawn) -> None:
    s = d.s
    spec = json.loads(json.dumps(s.spec))  # JSON-able, as checkpoints store it
    r = core.schedule_from_spec(spec)
    assert r.num_train_timesteps == s.num_train_timesteps
    assert torch.equal(r.timesteps, s.timesteps)
    for name in core.QUANTITIES:
        assert torch.equal(r.quantity(name), s.quantity(name)), name


@SETTINGS
@given(schedules())
def test_from_betas_reproduces_alpha_bar(d: Drawn) -> None:
    s = d.s
    r = core.schedule_from_betas(s.beta)
    ab, got = s.alpha_bar.numpy(), r.alpha_bar.numpy()
    rel = np.abs(got - ab) / np.where(ab > 0, ab, 1.0)
    # 1e-13, plus the loss where betas near 1 cannot carry alpha's digits (see _beta_condition)
    tol = 1e-13 + _beta_condition(s.beta.numpy())
    assert np.all(rel <= tol), (int(np.argmax(rel / tol)), rel.max())
    assert (got[-1] == 0) == (ab[-1] == 0)


@SETTINGS
@given(schedules())
def test_closed_form_identities(d: Drawn) -> None:
    """sqrt(ab)^2 + sqrt(1 - ab)^2 = 1, snr sigma^2 = 1, ..., each to a few ulps."""
    s = d.s
    ab, om = s.alpha_bar, 1 - s.alpha_bar
    assert torch.allclose(s.sqrt_alpha_bar**2 + s.sqrt_one_minus_alpha_bar**2, torch.ones_like(ab))
    pos = ab > 0
    assert torch.allclose(s.snr[pos] * s.sigma[pos] ** 2, torch.ones_like(ab[pos]), rtol=1e-14)
    assert torch.allclose(
        s.sqrt_recip_alpha_bar[pos] * s.sqrt_alpha_bar[pos], torch.ones_like(ab[pos])
    )
    assert torch.allclose(s.log_snr[pos], torch.log(s.snr[pos]), rtol=1e-12, atol=1e-12)
    assert torch.allclose(s.alpha * s.alpha_bar_prev, ab, rtol=1e-13, atol=0)
    # 1 - ab is held separately (stable near t = 0); each is within a few 1e-15 of the exact
    # value (test_core_exact), so the two agree to 1e-13 absolute
    assert torch.allclose(s.one_minus_alpha_bar, om, rtol=0, atol=1e-13)


# --------------------------------------------------------------------------------------------
# Forward process and conversions
# --------------------------------------------------------------------------------------------


def _data(s: core.Schedule, seed: int, width: int = 8) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    n = s.num_steps
    x0 = torch.randn(n, 3, width, generator=g, dtype=F64)
    eps = torch.randn(n, 3, width, generator=g, dtype=F64)
    return x0, eps


@SETTINGS
@given(schedules(), st.integers(0, 2**31 - 1))
def test_reconstruct_from_every_prediction_type(d: Drawn, seed: int) -> None:
    s = d.s
    x0, eps = _data(s, seed, width=4)
    t = _all_t(s)
    x_t = s.q_sample(x0, t, eps)
    ab = s.alpha_bar.reshape(-1, 1, 1)
    pos = (s.alpha_bar > 0).reshape(-1, 1, 1)

    # epsilon: x0 = x_t/sqrt(ab) - sqrt(1/ab - 1) eps, conditioned by 1/sqrt(ab) (module docstring)
    got = s.x0_from_eps(x_t, t, eps)
    bound = 1e-10 + 64 * ULP * (x_t.abs() + eps.abs()) / torch.sqrt(torch.where(pos, ab, 1.0))
    assert bool(((got - x0).abs() <= bound)[pos.expand_as(x0)].all())
    rows = s.alpha_bar > 0  # at ab = 0 eps carries no information about x0
    assert torch.equal(s.predict_x0(eps, x_t, t, "epsilon")[rows], got[rows])

    # v: x0 = sqrt(ab) x_t - sqrt(1 - ab) v, a rotation: fine at every t, ab = 0 included
    v = s.v_target(x0, eps, t)
    assert torch.allclose(s.x0_from_v(x_t, t, v), x0, rtol=0, atol=1e-10)
    assert torch.allclose(s.predict_x0(v, x_t, t, "v"), x0, rtol=0, atol=1e-10)
    assert torch.allclose(s.eps_from_v(x_t, t, v), eps, rtol=0, atol=1e-10)

    # sample: the model output is x0 itself
    assert torch.equal(s.predict_x0(x0, x_t, t, "sample"), x0)

    # predict_eps round trips
    assert torch.equal(s.predict_eps(eps, x_t, t, "eps"), eps)
    assert torch.allclose(s.predict_eps(v, x_t, t, "v_prediction"), eps, rtol=0, atol=1e-10)
    # eps = (x_t - sqrt(ab) x0)/sqrt(1 - ab): conditioned by 1/sqrt(1 - ab) >= 1
    om = s.one_minus_alpha_bar.reshape(-1, 1, 1)
    bound = 1e-10 + 64 * ULP * (x_t.abs() + x0.abs()) / torch.sqrt(om)
    assert bool(((s.predict_eps(x0, x_t, t, "x0") - eps).abs() <= bound).all())
    assert torch.allclose(s.eps_from_x0(x_t, t, x0), s.predict_eps(x0, x_t, t, "sample"))


@SETTINGS
@given(schedules(), st.data())
def test_posterior_matches_gaussian_conditioning(d: Drawn, data: st.DataObject) -> None:
    """q(x_{t-1} | x_t, x0) from the joint Gaussian of (x_{t-1}, x_t) given x0, in mpmath:
    x_{t-1} = sqrt(ab_prev) x0 + sqrt(1 - ab_prev) e1, x_t = sqrt(1 - beta) x_{t-1}
    + sqrt(beta) e2, so Var x_{t-1} = 1 - ab_prev = V1, Cov = sqrt(1 - beta) V1 = C,
    Var x_t = (1 - beta) V1 + beta = V2,
    mean = sqrt(ab_prev) x0 + C/V2 (x_t - sqrt(ab_prev (1 - beta)) x0), var = V1 - C^2/V2.
    The schedule's beta, alpha_bar_prev and 1 - alpha_bar_prev are taken as exact inputs; the core
    computes 1 - alpha_bar its own (stable) way, so agreement is to 1e-11 relative."""
    s = d.s
    assume(s.path == "vp")  # VP coordinates; other paths: tests/test_core_paths.py
    ts = data.draw(st.lists(st.integers(0, s.num_steps - 1), min_size=1, max_size=8, unique=True))
    t = torch.tensor(ts)
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    x0 = torch.randn(len(ts), 4, generator=g, dtype=F64)
    x_t = torch.randn(len(ts), 4, generator=g, dtype=F64)
    mean, var, log_var = s.posterior_mean_variance(x0, x_t, t)
    with mp.workdps(40):
        for row, i in enumerate(ts):
            b, ab_prev = mpf(s.beta[i].item()), mpf(s.alpha_bar_prev[i].item())
            v1 = mpf(s.one_minus_alpha_bar_prev[i].item())
            c = mp.sqrt(1 - b) * v1
            v2 = (1 - b) * v1 + b
            want_var = v1 - c**2 / v2
            got_var = var[row, 0].item()
            assert abs(got_var - want_var) <= 1e-11 * want_var + 1e-300, (i, got_var, want_var)
            k = c / v2
            m_prev, m_t = mp.sqrt(ab_prev), mp.sqrt(ab_prev * (1 - b))
            for col in range(4):
                a, xt = mpf(x0[row, col].item()), mpf(x_t[row, col].item())
                want = m_prev * a + k * (xt - m_t * a)
                err = abs(mean[row, col].item() - want)
                assert err <= 1e-11 * (abs(a) + abs(xt)) + 1e-15, (i, float(err))
    # the log variance is the clipped log of beta_tilde (its value at t = 1 stands in at t = 0)
    assert torch.equal(log_var[:, 0], s.posterior_log_variance_clipped[t])


@SETTINGS
@given(schedules(), st.integers(0, 2**31 - 1))
def test_ddim_eta_one_is_the_ancestral_posterior(d: Drawn, seed: int) -> None:
    """With eta = 1 the DDIM step's noise variance is beta_tilde, and with eps consistent with
    (x_t, x0) its mean is mu_tilde (Song et al. 2021, DDPM as the eta = 1 case)."""
    s = d.s
    assume(s.path == "vp")  # VP coordinates; other paths: tests/test_core_paths.py
    x0, noise = _data(s, seed, width=4)
    t = _all_t(s)
    x_t = s.q_sample(x0, t, noise)
    eps = s.eps_from_x0(x_t, t, x0)
    z = torch.randn_like(x0)
    step0 = s.ddim_step(x_t, t, x0, eps, 1.0, torch.zeros_like(z))
    # the step is linear in the noise: with x0 = eps = 0 and noise = 1 it is the noise's std
    zero, one = torch.zeros_like(z), torch.ones_like(z)
    std = s.ddim_step(x_t, t, zero, zero, 1.0, one)[:, 0, 0]
    assert torch.allclose(std**2, s.posterior_variance, rtol=1e-14, atol=0)
    mean, _, _ = s.posterior_mean_variance(x0, x_t, t)
    scale = 1 + x0.abs() + x_t.abs()
    ok = (step0 - mean).abs() <= 1e-10 * scale
    assert bool(ok.all())
    # eta = 0: deterministic, the noise is ignored
    assert torch.equal(
        s.ddim_step(x_t, t, x0, eps, 0.0, z), s.ddim_step(x_t, t, x0, eps, 0.0, torch.zeros_like(z))
    )


def test_ddim_eta_one_at_the_zero_snr_step() -> None:
    s = core.make_schedule("cosine", zero_terminal_snr=True)
    t = torch.tensor([999])
    x0 = torch.ones(1, 1, dtype=F64)
    x_t = s.q_sample(x0, t, x0)
    eps = s.eps_from_x0(x_t, t, x0)
    step = s.ddim_step(x_t, t, x0, eps, 1.0, torch.zeros_like(x0))
    mean, _, _ = s.posterior_mean_variance(x0, x_t, t)
    assert abs((step - mean).item()) <= 1e-12


@SETTINGS
@given(schedules())
def test_learned_range_ends_are_the_fixed_variances(d: Drawn) -> None:
    s = d.s
    assume(s.path == "vp")  # VP coordinates; other paths: tests/test_core_paths.py
    like = torch.zeros(s.num_steps, 2, 3, dtype=F64)
    t = _all_t(s)
    small = s.model_log_variance("fixed_small", t, like)
    lo = s.model_log_variance("learned_range", t, like, torch.full_like(like, -1.0))
    hi = s.model_log_variance("learned_range", t, like, torch.full_like(like, 1.0))
    assert torch.equal(lo, small)
    assert torch.equal(hi, torch.log(s.beta).reshape(-1, 1, 1).expand_as(like))
    assert torch.equal(small[:, 0, 0], s.posterior_log_variance_clipped)
    large = s.model_log_variance("fixed_large", t, like)[:, 0, 0]
    assert torch.equal(large[1:], torch.log(s.beta[1:]))
    if s.num_steps > 1:  # improved-diffusion: beta_tilde_1 stands in for beta_0
        assert large[0].item() == math.log(s.posterior_variance[1].item())
    mid = s.model_log_variance("learned_range", t, like, torch.zeros_like(like))
    assert torch.allclose(mid, (lo + hi) / 2)


@SETTINGS
@given(schedules(), st.integers(0, 2**31 - 1))
def test_prior_kl_is_the_normal_kl_closed_form(d: Drawn, seed: int) -> None:
    s = d.s
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(5, 7, generator=g, dtype=F64)
    ab_t, om_t = s.alpha_bar[-1].item(), s.one_minus_alpha_bar[-1].item()
    # KL(N(m, v) || N(0, 1)) = (v + m^2 - 1 - log v)/2 with m = sqrt(ab_T) x0, v = 1 - ab_T
    want = 0.5 * (om_t + ab_t * x0**2 - 1 - math.log(om_t))
    got = s.prior_kl(x0)
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-15)
    # unit-variance data: E KL = -log(1 - ab_T)/2 nats, reported in bits
    assert math.isclose(
        s.prior_kl_bits_per_dim_unit_variance(), -math.log(om_t) / (2 * math.log(2)), rel_tol=1e-12
    )


@SETTINGS
@given(
    st.floats(-3, 3),
    st.floats(-5, 2),
    st.floats(-3, 3),
    st.floats(-5, 2),
)
def test_normal_kl_identities(m1: float, lv1: float, m2: float, lv2: float) -> None:
    a = [torch.tensor([v], dtype=F64) for v in (m1, lv1, m2, lv2)]
    kl = core.normal_kl(*a).item()
    v1, v2 = math.exp(lv1), math.exp(lv2)
    want = 0.5 * math.log(v2 / v1) + (v1 + (m1 - m2) ** 2) / (2 * v2) - 0.5
    assert math.isclose(kl, want, rel_tol=1e-12, abs_tol=1e-13)
    assert kl >= -1e-15
    assert core.normal_kl(a[0], a[1], a[0], a[1]).item() == 0.0


# --------------------------------------------------------------------------------------------
# Monte Carlo checks (fixed seeds; tolerances of 6 standard errors)
# --------------------------------------------------------------------------------------------

MC_CASES = [
    ("cosine", False, 10),
    ("cosine", False, 500),
    ("linear", True, 998),
    ("linear", True, 999),
    ("edm", False, 0),
    ("scaled_linear", False, 300),
]


@pytest.mark.parametrize(("kind", "zsnr", "i"), MC_CASES)
def test_q_sample_moments_monte_carlo(kind: str, zsnr: bool, i: int) -> None:
    s = core.make_schedule(kind, zero_terminal_snr=zsnr)
    n = 200_000
    g = torch.Generator().manual_seed(1234)
    x0 = torch.full((n, 1), 0.7, dtype=F64)
    t = torch.full((n,), i, dtype=torch.long)
    x_t = s.q_sample(x0, t, torch.randn(n, 1, generator=g, dtype=F64))
    ab = s.alpha_bar[i].item()
    var = 1 - ab
    # mean: SE = sqrt(var/n); variance: SE = var sqrt(2/(n - 1)) (Gaussian data)
    assert abs(x_t.mean().item() - math.sqrt(ab) * 0.7) <= 6 * math.sqrt(var / n)
    assert abs(x_t.var().item() - var) <= 6 * var * math.sqrt(2 / (n - 1))


@pytest.mark.parametrize(("kind", "zsnr", "i"), [c for c in MC_CASES if c[2] > 0])
def test_posterior_by_monte_carlo_regression(kind: str, zsnr: bool, i: int) -> None:
    """Sample x0 ~ N(0, 1), x_{t-1} ~ q(x_{t-1} | x0), x_t ~ q(x_t | x_{t-1}); regressing x_{t-1}
    on (x0, x_t) by least squares estimates (coef_x0, coef_xt) and the residual variance estimates
    beta_tilde. Tolerance: 6 OLS standard errors for the coefficients (sigma^2 (X'X)^-1), and
    6 sqrt(2/(n - 2)) relative for the residual variance."""
    s = core.make_schedule(kind, zero_terminal_snr=zsnr)
    n = 200_000
    g = torch.Generator().manual_seed(99)
    x0 = torch.randn(n, generator=g, dtype=F64)
    ab_prev = s.alpha_bar_prev[i].item()
    beta = s.beta[i].item()
    x_prev = math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev) * torch.randn(
        n, generator=g, dtype=F64
    )
    x_t = math.sqrt(1 - beta) * x_prev + math.sqrt(beta) * torch.randn(n, generator=g, dtype=F64)
    design = torch.stack([x0, x_t], dim=1)
    coef = torch.linalg.lstsq(design, x_prev.unsqueeze(1)).solution.squeeze(1)
    resid = x_prev - design @ coef
    sigma2 = (resid @ resid).item() / (n - 2)
    se = torch.sqrt(sigma2 * torch.diag(torch.linalg.inv(design.T @ design)))
    want = torch.tensor(
        [s.posterior_mean_coef_x0[i].item(), s.posterior_mean_coef_xt[i].item()], dtype=F64
    )
    assert bool(((coef - want).abs() <= 6 * se + 1e-12).all()), (coef, want, se)
    pv = s.posterior_variance[i].item()
    assert abs(sigma2 - pv) <= 6 * pv * math.sqrt(2 / (n - 2)), (sigma2, pv)


# --------------------------------------------------------------------------------------------
# Likelihood terms
# --------------------------------------------------------------------------------------------


@SETTINGS
@given(_u(-1.3, 1.3), _u(-7.0, 1.0))
def test_discretized_likelihood_is_a_distribution_over_256_bins(mean: float, log_scale: float):
    """The 256 bin probabilities sum to 1. Adjacent bin edges are computed separately (x +- 1/255),
    so they agree only to a rounding of the scaled edge: tolerance 1e-10 absolute."""
    x = -1 + 2 * torch.arange(256, dtype=F64) / 255
    ll = core.discretized_gaussian_log_likelihood(
        x, torch.full_like(x, mean), torch.full_like(x, log_scale)
    )
    assert bool((ll <= 0).all())
    total = torch.exp(ll).sum().item()
    assert abs(total - 1) <= 1e-10, total


@SETTINGS
@given(_u(-3.0, 3.0), _u(-3.0, 3.0), _u(-6.0, 3.0))
def test_continuous_likelihood_closed_form(x: float, mean: float, log_scale: float) -> None:
    got = core.continuous_gaussian_log_likelihood(
        torch.tensor([x], dtype=F64),
        torch.tensor([mean], dtype=F64),
        torch.tensor([log_scale], dtype=F64),
    ).item()
    with mp.workdps(30):
        sd = mp.exp(mpf(log_scale))
        want = -((mpf(x) - mpf(mean)) ** 2) / (2 * sd**2) - mp.log(sd) - mp.log(2 * mp.pi) / 2
    assert abs(got - float(want)) <= 1e-12 * max(1.0, abs(float(want)))


@SETTINGS
@given(schedules(), st.data())
def test_take_and_to_are_the_lookups_extract_would_make(d: Drawn, data: st.DataObject) -> None:
    s = d.s
    ts = data.draw(st.lists(st.integers(0, s.num_steps - 1), min_size=1, max_size=20))
    table = s.take(ts).to("cpu", torch.float32)
    like = torch.zeros(len(ts), 3, dtype=torch.float32)
    pos, idx = torch.arange(len(ts)), torch.tensor(ts)
    for name in core.QUANTITIES:
        got = core.extract(table.quantity(name), pos, 2, like=like)
        want = core.extract(s.quantity(name), idx, 2, like=like)
        assert torch.equal(got, want), name
    assert torch.equal(table.timesteps, s.timesteps[idx])
    assert s.to("cpu").alpha_bar.dtype == torch.float64  # no dtype: arrays keep float64
