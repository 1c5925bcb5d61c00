"""Gaussian paths other than VP in the core (issue 16): rectified flow, EDM and VE in sigma space.

Golden values are independent 50-digit mpmath evaluations of each kind's definition (the grid,
then alpha, sigma, log-SNR, the VP-equivalent and the posterior of Kingma et al. 2021, eq. 33);
properties are hypothesis draws; diffusers' FlowMatchEulerDiscreteScheduler is the reference for
the flow's training grid and its Euler step.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mpmath import mp, mpf

from ddpmcli import core
from ddpmcli.core.assemble import path_posterior
from ddpmcli.errors import ScheduleError, ScheduleParameterError

F64 = torch.float64
N = 50
SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)

# --------------------------------------------------------------------------------------------
# 50-digit references
# --------------------------------------------------------------------------------------------


def ref_flow(n: int, shift: float, terminal: float = 0.0) -> list[tuple]:
    """(alpha, sigma, timestep) of diffusers' training grid s = shift u/(1 + (shift - 1) u),
    u = (i + 1)/n, stretched to shift_terminal when given (LTX)."""
    k = mpf(shift)
    s = [k * mpf(i + 1) / n / (1 + (k - 1) * mpf(i + 1) / n) for i in range(n)]
    if terminal:
        scale = (1 - s[0]) / (1 - mpf(terminal))
        s = [1 - (1 - x) / scale for x in s]
    return [(1 - x, x, x * n) for x in s]


def ref_edm(n: int, lo: float = 0.002, hi: float = 80.0, rho: float = 7.0) -> list[tuple]:
    r_lo, r_hi = mpf(lo) ** (1 / mpf(rho)), mpf(hi) ** (1 / mpf(rho))
    sig = [(r_lo + mpf(i) / (n - 1) * (r_hi - r_lo)) ** rho for i in range(n)]
    return [(mpf(1), x, mp.log(x) / 4) for x in sig]


def ref_ve(n: int, lo: float = 0.01, hi: float = 50.0) -> list[tuple]:
    sig = [mpf(lo) * (mpf(hi) / mpf(lo)) ** (mpf(i) / (n - 1)) for i in range(n)]
    return [(mpf(1), x, x) for x in sig]


def ref_quantities(rows: list[tuple]) -> dict[str, list]:
    """Every new quantity from (alpha, sigma, timestep) by its definition."""
    q: dict[str, list] = {
        k: []
        for k in (
            "alpha_t sigma_t model_timestep log_snr alpha_bar snr sigma beta posterior_variance "
            "path_posterior_coef_xt path_posterior_coef_x0 path_posterior_variance"
        ).split()
    }
    a_s, s_s, ab_s = mpf(1), mpf(0), mpf(1)
    for a, s, ts in rows:
        ab = a**2 / (a**2 + s**2)
        q["alpha_t"].append(a)
        q["sigma_t"].append(s)
        q["model_timestep"].append(ts)
        q["log_snr"].append(2 * mp.log(a / s) if a else -mp.inf)
        q["alpha_bar"].append(ab)
        q["snr"].append(a**2 / s**2)
        q["sigma"].append(s / a if a else mp.inf)
        beta = 1 - ab / ab_s
        q["beta"].append(beta)
        q["posterior_variance"].append(beta * (1 - ab_s) / (1 - ab))
        a_ts = a / a_s
        var_ts = s**2 - a_ts**2 * s_s**2
        q["path_posterior_coef_xt"].append(a_ts * s_s**2 / s**2)
        q["path_posterior_coef_x0"].append(a_s * var_ts / s**2)
        q["path_posterior_variance"].append(var_ts * s_s**2 / s**2)
        a_s, s_s, ab_s = a, s, ab
    return q


def assert_close(name: str, got: torch.Tensor, want: list) -> None:
    for i, (g, w) in enumerate(zip(got.tolist(), want, strict=True)):
        if mp.isinf(w):
            assert g == float(w), (name, i, g, w)
            continue
        err = abs(mpf(g) - w)
        if name == "log_snr" and abs(w) < 1:  # absolute near 0, relative elsewhere
            assert err <= 1e-12, (name, i, g, w)
        else:
            assert err <= 1e-12 * abs(w) + 1e-300, (name, i, g, w, float(err / abs(w)))


FLOW_CASES = {
    # shift 2e-5: s_0 = 4e-7 (within 1e-6 of 0); 5e4: 1 - s_{T-2} = 4e-7 (within 1e-6 of 1)
    "flow-shift2e-5": ({"shift": 2e-5}, lambda: ref_flow(N, 2e-5)),
    "flow-shift3": ({"shift": 3.0}, lambda: ref_flow(N, 3.0)),
    "flow-shift5e4": ({"shift": 5e4}, lambda: ref_flow(N, 5e4)),
    "flow-mu1.15": ({"mu": 1.15}, lambda: ref_flow(N, float(mp.exp(mpf(1.15))))),
    "flow-linear-mu2": ({"mu": 2.0, "linear_time_shift": 1.0}, lambda: ref_flow(N, 2.0)),
    "flow-terminal": ({"shift": 3.0, "shift_terminal": 0.1}, lambda: ref_flow(N, 3.0, 0.1)),
}


@pytest.mark.parametrize(
    ("kind", "params", "ref"),
    [("flow", p, r) for p, r in FLOW_CASES.values()]
    + [
        ("edm_sigma", {}, lambda: ref_edm(N)),
        ("edm_sigma", {"sigma_min": 1e-3, "sigma_max": 500.0, "rho": 3.0}, lambda: None),
        ("ve", {}, lambda: ref_ve(N)),
        ("ve", {"sigma_min": 1e-3, "sigma_max": 1e3}, lambda: ref_ve(N, 1e-3, 1e3)),
    ],
    ids=[*FLOW_CASES, "edm", "edm-wide", "ve", "ve-wide"],
)
def test_every_path_quantity_within_1e_12_of_50_digits(kind, params, ref) -> None:
    with mp.workdps(50):
        rows = ref()
        if rows is None:
            rows = ref_edm(N, params["sigma_min"], params["sigma_max"], params["rho"])
        want = ref_quantities(rows)
        s = core.make_schedule(kind, N, **params)
        for name, values in want.items():
            assert_close(name, getattr(s, name), values)


def test_flow_grid_reaches_within_1e_6_of_both_ends() -> None:
    low = core.make_schedule("flow", N, shift=2e-5).sigma_t
    high = core.make_schedule("flow", N, shift=5e4).alpha_t
    assert 0 < float(low[0]) < 1e-6
    assert 0 < float(high[-2]) < 1e-6 and float(high[-1]) == 0.0


# --------------------------------------------------------------------------------------------
# VP is the special case
# --------------------------------------------------------------------------------------------

VP_KINDS = [k for k, info in core.SCHEDULE_KINDS.items() if info.path == "vp"]


@pytest.mark.parametrize("kind", VP_KINDS)
def test_vp_path_arrays_are_the_vp_columns(kind: str) -> None:
    s = core.make_schedule(kind, 1000)
    assert s.path == "vp"
    for path_name, vp_name in (
        ("alpha_t", "sqrt_alpha_bar"),
        ("sigma_t", "sqrt_one_minus_alpha_bar"),
        ("path_posterior_coef_xt", "posterior_mean_coef_xt"),
        ("path_posterior_coef_x0", "posterior_mean_coef_x0"),
        ("path_posterior_variance", "posterior_variance"),
    ):
        assert torch.equal(getattr(s, path_name), getattr(s, vp_name)), path_name
    assert torch.equal(s.model_timestep, s.timesteps.to(F64))
    # the general (alpha, sigma) posterior, evaluated on the VP arrays, is the VP posterior
    # (1e-15 absolute on these values in [0, 1]; the log-SNR steps carry the difference)
    coef_xt, coef_x0, var = path_posterior(s.alpha_t, s.sigma_t, torch.diff(s.log_snr))
    for got, want in (
        (coef_xt, s.posterior_mean_coef_xt),
        (coef_x0, s.posterior_mean_coef_x0),
        (var, s.posterior_variance),
    ):
        assert torch.allclose(got, want, rtol=1e-9, atol=1e-15)


def test_vp_methods_keep_their_digits() -> None:
    s = core.make_schedule("scaled_linear", 1000)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 8, 3, generator=g), torch.randn(2, 8, 3, generator=g)
    t = torch.tensor([3, 700])
    c = lambda v: core.extract(v, t, 3, like=x0)  # noqa: E731
    x_t = s.q_sample(x0, t, eps)
    assert torch.equal(x_t, c(s.sqrt_alpha_bar) * x0 + c(s.sqrt_one_minus_alpha_bar) * eps)
    want = c(s.sqrt_recip_alpha_bar) * x_t - c(s.sqrt_recipm1_alpha_bar) * eps
    assert torch.equal(s.predict_x0(eps, x_t, t, "epsilon"), want)


# --------------------------------------------------------------------------------------------
# Properties of every path
# --------------------------------------------------------------------------------------------


@st.composite
def path_schedules(draw) -> core.Schedule:
    kind = draw(st.sampled_from(["flow", "edm_sigma", "ve", "linear", "cosine"]))
    n = draw(st.integers(2, 400))
    params: dict[str, float] = {}
    if kind == "flow":
        params["shift"] = draw(st.floats(0.1, 20.0))
    if kind == "edm_sigma":
        params["rho"] = draw(st.floats(1.0, 10.0))
    s = core.make_schedule(kind, n, **params)
    if draw(st.booleans()):
        kept = draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=20, unique=True))
        s = core.respace(s, kept)
    return s


def _draw(s: core.Schedule, seed: int):
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(s.num_steps)
    x0 = torch.randn(s.num_steps, 5, generator=g, dtype=F64)
    eps = torch.randn(s.num_steps, 5, generator=g, dtype=F64)
    return t, x0, eps


@SETTINGS
@given(path_schedules(), st.integers(0, 2**31 - 1))
def test_predictions_recover_x0_and_eps_from_the_truth(s: core.Schedule, seed: int) -> None:
    t, x0, eps = _draw(s, seed)
    keep = s.alpha_t > 1e-8  # x0 from eps is undefined where alpha_t = 0
    x_t = s.q_sample(x0, t, eps)
    scale = 1 + x0.abs() + eps.abs()
    flow_v = eps - x0
    got = s.predict_x0(flow_v, x_t, t, "flow")
    assert torch.all((got - x0).abs() <= 1e-12 * scale)
    assert torch.all((s.predict_eps(flow_v, x_t, t, "velocity") - eps).abs() <= 1e-12 * scale)
    vp_v = s.v_target(x0, eps, t)
    assert torch.all((s.predict_x0(vp_v, x_t, t, "v") - x0).abs() <= 1e-11 * scale)
    sigma_over_alpha = torch.where(keep, s.sigma, 0)[:, None]
    got_eps = s.predict_x0(eps, x_t, t, "epsilon")[keep]
    assert torch.all((got_eps - x0[keep]).abs() <= 1e-11 * (scale * (1 + sigma_over_alpha))[keep])


@SETTINGS
@given(path_schedules())
def test_path_posterior_is_gaussian_conditioning(s: core.Schedule) -> None:
    """x_s = alpha_s x0 + sigma_s e1, x_t = alpha_{t|s} x_s + sigma_{t|s} e2: the posterior
    variance is sigma_s^2 - Cov^2/Var x_t in [0, sigma_s^2], Cov = alpha_{t|s} sigma_s^2."""
    a, sg = s.alpha_t, s.sigma_t
    a_s, s_s = s.alpha_t_prev, s.sigma_t_prev
    var = s.path_posterior_variance
    assert torch.all(var >= 0) and torch.all(var <= s_s**2 * (1 + 1e-12))
    if s.num_steps != s.index.numel() or s.spec.get("transforms"):
        return  # a respaced table: the previous entry is the previous kept one
    want = s_s**2 - (a / a_s) ** 2 * s_s**4 / sg**2
    assert torch.allclose(var, want, rtol=1e-8, atol=1e-14)
    # mean coefficients: x0 carries alpha_s - coef_xt alpha_t, x_t carries Cov/Var x_t
    assert torch.allclose(s.path_posterior_coef_xt, (a / a_s) * s_s**2 / sg**2, rtol=1e-12)
    assert torch.allclose(
        s.path_posterior_coef_x0, a_s - s.path_posterior_coef_xt * a, rtol=1e-8, atol=1e-14
    )


@SETTINGS
@given(st.floats(0.1, 20.0), st.integers(2, 300), st.integers(0, 2**31 - 1))
def test_flow_euler_step_is_the_path_ddim_step(shift: float, n: int, seed: int) -> None:
    """x_s = x_t + (s_next - s) v equals alpha_s x0_hat + sigma_s eps_hat (DDIM, eta 0)."""
    s = core.make_schedule("flow", n, shift=shift)
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(n)
    x_t = torch.randn(n, 6, generator=g, dtype=F64)
    v = torch.randn(n, 6, generator=g, dtype=F64)
    x0 = s.predict_x0(v, x_t, t, "flow")
    eps = s.predict_eps(v, x_t, t, "flow")
    ddim = s.ddim_step(x_t, t, x0, eps, 0.0, torch.zeros_like(x_t))
    euler = x_t + (s.sigma_t_prev - s.sigma_t)[:, None] * v
    assert torch.all((ddim - euler).abs() <= 1e-14 * (1 + x_t.abs() + v.abs()))


def test_flow_grid_and_step_match_diffusers() -> None:
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=N, shift=3.0)
    s = core.make_schedule("flow", N, shift=3.0)
    # diffusers builds in float32, descending
    assert torch.allclose(ref.sigmas.double(), s.sigma_t.flip(0), rtol=2e-7, atol=0)
    assert torch.allclose(ref.timesteps.double(), s.model_timestep.flip(0), rtol=2e-7, atol=0)
    # the Euler step on the same x and v, over our own grid (shift 1 leaves it as given)
    step = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=N, shift=1.0)
    step.set_timesteps(sigmas=s.sigma_t.flip(0).tolist())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, generator=g)
    for k, i in enumerate(range(N - 1, -1, -1)):
        v = torch.randn(1, 4, generator=g)
        got = step.step(v, step.timesteps[k], x).prev_sample
        t = torch.tensor([i])
        x64, v64 = x.double(), v.double()
        x0, eps = s.predict_x0(v64, x64, t, "flow"), s.predict_eps(v64, x64, t, "flow")
        ours = s.ddim_step(x64, t, x0, eps, 0.0, torch.zeros_like(x64))
        assert torch.allclose(got.double(), ours, rtol=1e-5, atol=1e-6), k
        x = got


# --------------------------------------------------------------------------------------------
# Constructors and bad input
# --------------------------------------------------------------------------------------------


def test_schedule_from_path_rebuilds_a_kind_and_its_spec() -> None:
    f = core.make_schedule("flow", 40, shift=3.0)
    s = core.schedule_from_path("flow", f.alpha_t, f.sigma_t, f.model_timestep)
    for name in ("alpha_bar", "log_snr", "path_posterior_variance", "path_posterior_coef_x0"):
        assert torch.allclose(getattr(s, name), getattr(f, name), rtol=1e-10, atol=1e-300)
    again = core.schedule_from_spec(s.spec)
    assert torch.equal(again.sigma_t, s.sigma_t) and again.path == "flow"
    rebuilt = core.schedule_from_spec(f.spec)
    assert torch.equal(rebuilt.sigma_t, f.sigma_t) and rebuilt.path == "flow"
    respaced = core.respaced(f, 8, "trailing")
    assert respaced.path == "flow" and respaced.num_steps == 8
    assert torch.equal(core.schedule_from_spec(respaced.spec).sigma_t, respaced.sigma_t)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("flow", [0.5, 1.0], [0.5, 0.5], [0, 1]), "must increase strictly"),
        (("flow", [1.0, 0.0, 0.0], [0.1, 0.5, 1.0], [0, 1, 2]), r"alpha_t\[1\]"),
        (("ve", [1.0], [0.0], [0.0]), r"sigma_t\[0\]"),
        (("ve", [1.0], [math.nan], [0.0]), "finite"),
        (("ve", [1.0, 1.0], [1.0, 2.0], [0.0]), "differ in length"),
        (("sde", [1.0], [1.0], [0.0]), "unknown path"),
    ],
)
def test_schedule_from_path_refuses_bad_arrays(args, match) -> None:
    with pytest.raises(ScheduleError, match=match):
        core.schedule_from_path(*args)


@pytest.mark.parametrize(
    ("kind", "params", "match"),
    [
        ("flow", {"shift": 0.0}, "shift"),
        ("flow", {"shift": -2.0}, "shift"),
        ("flow", {"mu": 1.0, "shift": 3.0}, "mu"),
        ("flow", {"mu": -1.0, "linear_time_shift": 1.0}, "mu"),
        ("flow", {"linear_time_shift": 0.5}, "linear_time_shift"),
        ("flow", {"shift_terminal": 1.0}, "shift_terminal"),
        ("edm_sigma", {"sigma_min": 80.0, "sigma_max": 1.0}, "sigma_min"),
        ("ve", {"sigma_min": 50.0}, "sigma_min"),
    ],
)
def test_bad_parameters_name_the_parameter(kind, params, match) -> None:
    with pytest.raises(ScheduleParameterError, match=match):
        core.make_schedule(kind, 100, **params)


def test_zero_terminal_snr_is_refused_on_a_path() -> None:
    with pytest.raises(ScheduleParameterError, match="VP"):
        core.make_schedule("ve", 100, zero_terminal_snr=True)


# --------------------------------------------------------------------------------------------
# The command line prints what the API builds
# --------------------------------------------------------------------------------------------


def test_cli_flow_table_is_the_api_schedule(cli) -> None:
    import csv
    import io

    import ddpmcli

    result = cli("schedule", "--kind", "flow", "--param", "shift=3", "--format", "csv")
    assert result.exit_code == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert list(rows[0]) == ["t", "timestep", *core.PATH_DEFAULT_QUANTITIES]
    s = ddpmcli.schedule("flow", shift=3.0)
    assert s.path == "flow" and len(rows) == s.num_steps
    for name in ("alpha_t", "sigma_t", "log_snr", "path_posterior_variance"):
        assert [float(r[name]) for r in rows] == getattr(s, name).tolist(), name
    assert [float(r["timestep"]) for r in rows] == s.model_timestep.tolist()
    # a VP table keeps its columns
    vp = cli("schedule", "-T", "3", "--format", "csv").stdout.splitlines()[0]
    assert vp.split(",") == ["t", *core.QUANTITIES]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("--kind", "flow", "--param", "shift=0"), "shift"),
        (("--kind", "flow", "--param", "mu=1", "--param", "shift=2"), "mu"),
        (("--kind", "edm_sigma", "--param", "sigma_min=100"), "sigma_min"),
        (("--kind", "ve", "--param", "sigma_max=0.001"), "sigma_min"),
        (("--kind", "flow", "--zero-terminal-snr"), "VP"),
    ],
)
def test_cli_bad_path_parameters_are_one_error_line(cli, args, fragment) -> None:
    result = cli("schedule", *args)
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and fragment in lines[0], lines


# --------------------------------------------------------------------------------------------
# The bound is the same in a path's coordinates and in its VP-equivalent's
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "params"), [("flow", {"shift": 3.0}), ("edm_sigma", {}), ("ve", {"sigma_max": 5.0})]
)
def test_vb_terms_on_a_path_equal_the_vp_equivalent(kind, params) -> None:
    """KL is invariant under scaling both Gaussians by c_s: the bound of a path, with its own
    posterior and the samplers' variances in its coordinates, is its VP-equivalent's."""
    s = core.make_schedule(kind, 50, **params)
    v = core.schedule_from_alpha_bars(s.alpha_bar)
    g = torch.Generator().manual_seed(3)
    t = torch.arange(50)
    x0 = torch.randn(50, 4, generator=g, dtype=F64)
    eps = torch.randn(50, 4, generator=g, dtype=F64)
    x0_hat = x0 + 0.1 * torch.randn(50, 4, generator=g, dtype=F64)
    x_path, x_vp = s.q_sample(x0, t, eps), v.q_sample(x0, t, eps)
    assert torch.allclose(x_path / s.path_scale[:, None], x_vp, rtol=1e-12, atol=1e-14)
    for variance in ("fixed_small", "fixed_large"):
        terms = []
        for sched, x in ((s, x_path), (v, x_vp)):
            mean = sched.posterior_mean(x0_hat, x, t)
            log_var = sched.model_log_variance(variance, t, x)
            terms.append(core.vb_terms(sched, x0, x, t, mean, log_var))
        assert torch.allclose(terms[0], terms[1], rtol=1e-9, atol=1e-12), variance
    # eta = 1 DDIM is the path's ancestral posterior: its noise variance
    assert torch.allclose(s.ddim_variance(1.0), s.path_posterior_variance, rtol=0, atol=0)
