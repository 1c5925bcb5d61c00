"""The solvers' orders on the exact Gaussian oracle, DPM-Solver++'s third-order term against an
independent 50-digit quadrature, and Karras et al. 2022's churn against k-diffusion.

The oracle: data N(MU, S^2), so x0_hat = E[x0 | x_t] is affine in x_t and the probability-flow
ODE solution from x_T is closed form: in Karras' variables x' = x/alpha, sigma' = sigma/alpha,
x' - MU scales as sqrt(S^2 + sigma'^2). A run lands on the grid's own sigma_min (the last step a
no-op), where the exact solution is known; the error is read from the last step's float64 x (an
observer), not from the float32 samples.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import k_diffusion_sampling as _k_diffusion_sampling

from ddpmcli import core
from ddpmcli.run.samplers import SampleSettings, sample
from ddpmcli.run.solver_grid import PathGrid, sigma_grid

MU, S = 0.3, 0.5
F64 = torch.float64


def _train() -> core.Schedule:
    return core.make_schedule("scaled_linear", 1000, beta_start=0.00085, beta_end=0.012)


def _oracle_error(name: str, steps: int, spacing: str = "karras", **options) -> tuple[float, int]:
    """(max |x - exact| of a float64 run of ``steps`` steps, model calls it made)."""
    x, exact, calls = _oracle_run(name, steps, spacing, **options)
    return float((x - exact).abs().max()), calls


def _oracle_run(
    name: str, steps: int, spacing: str = "karras", **options
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(the run's last x in float64, the exact PF-ODE solution there, model calls)."""
    run = sigma_grid(_train(), steps, spacing)
    sig, ts = run.sigma.tolist(), run.model_timestep.tolist()
    calls = [0]

    def predict(x, t):  # E[x0 | x_t] of N(MU, S^2) at the grid entry of this timestep
        calls[0] += 1
        k = min(range(len(ts)), key=lambda j: abs(ts[j] - float(t[0])))
        a, s = 1 / math.sqrt(1 + sig[k] ** 2), sig[k] / math.sqrt(1 + sig[k] ** 2)
        return MU + a * S * S / (a * a * S * S + s * s) * (x - a * MU), None

    last: dict[str, torch.Tensor] = {}

    def keep(event) -> None:
        if "x_next" in event.tensors:
            last["x"] = event.tensors["x_next"]

    init = torch.linspace(-2, 2, 7, dtype=F64).reshape(7, 1)
    settings = SampleSettings(sampler=name, clip=False, final_sigma=sig[0], **options)
    sample(predict, run, "sample", (1,), n=7, settings=settings, init=init, model_dtype=F64,
           observers=[keep])  # fmt: skip
    s_max, s_min = sig[-1], sig[0]
    xk = init * math.sqrt(1 + s_max**2)
    exact = MU + (xk - MU) * math.sqrt((S * S + s_min * s_min) / (S * S + s_max * s_max))
    return last["x"], exact / math.sqrt(1 + s_min**2), calls[0]


def _slopes(name: str, counts=(16, 32, 64), **options) -> list[float]:
    errors = [_oracle_error(name, n, **options)[0] for n in counts]
    return [math.log2(errors[k] / errors[k + 1]) for k in range(len(errors) - 1)]


@pytest.mark.parametrize(
    ("name", "options", "want", "counts"),
    [
        ("dpmpp-2m", {}, 2, (16, 32, 64)),  # measured 2.09
        # diffusers' third-order term is half the Taylor one: second order (measured 1.80 at
        # 32 -> 64 Karras steps, 1.95 at 128 -> 256), whatever its warm-up
        ("dpmpp-3m", {}, 2, (16, 32, 64)),
        ("dpmpp-3m", {"dpm_form": "exact"}, 3, (16, 32, 64)),  # 3.05 (3.02 at 128 -> 256)
        ("dpmpp-3m", {"dpm_form": "exact", "solver_type": "heun"}, 3, (16, 32, 64)),
        # UniP-p + UniC is of order p + 1 (Zhao et al. 2023, Theorem 3.3): 3.08 and 3.87
        ("unipc", {}, 3, (16, 32, 64)),
        ("unipc", {"order": 3}, 4, (16, 32, 64)),
        ("unipc", {"corrector": False}, 2, (16, 32, 64)),  # 2.09
        ("unipc", {"order": 3, "corrector": False}, 3, (32, 64, 128)),  # 2.91 (2.78 at 64)
    ],
)  # fmt: skip
def test_empirical_order_on_the_gaussian_oracle(name, options, want, counts) -> None:
    slopes = _slopes(name, counts, **options)
    assert abs(slopes[-1] - want) < 0.3, slopes


def test_the_exact_form_costs_one_more_model_call() -> None:
    from ddpmcli.run.steps import registered

    for steps in (1, 2, 16):
        for form, extra in (("diffusers", 0), ("exact", 1 if steps > 1 else 0)):
            settings = SampleSettings(sampler="dpmpp-3m", dpm_form=form)
            _, calls = _oracle_error("dpmpp-3m", steps, dpm_form=form)
            assert calls == steps + extra
            evaluations = registered("dpmpp-3m").evaluations
            assert evaluations is not None and evaluations(steps, settings) == steps + extra


def _quadrature(lam_t: float, lam_s: float, x_t: float, coeffs: tuple[float, ...]) -> float:
    """x_s of dx/dlambda for x0_hat(lambda) = sum c_k (lambda - lam_t)^k, VP path, by mpmath at
    50 digits: x_s = sigma_s/sigma_t x_t + sigma_s int e^lambda x0_hat(lambda) dlambda (Lu et
    al. 2022b, eq. 8)."""
    mpmath = pytest.importorskip("mpmath")
    mp = mpmath.mp
    mp.dps = 50

    def sigma(lam):
        return 1 / mp.sqrt(1 + mp.exp(2 * lam))

    def x0(lam):
        return sum(c * (lam - lam_t) ** k for k, c in enumerate(coeffs))

    integral = mp.quad(lambda lam: mp.exp(lam) * x0(lam), [lam_t, lam_s])
    return float(sigma(lam_s) / sigma(lam_t) * x_t + sigma(lam_s) * integral)


@pytest.mark.parametrize("form", ["diffusers", "exact"])
def test_third_order_update_is_exact_for_a_quadratic_x0(form) -> None:
    """A third-order multistep update integrates x0_hat = c0 + c1 tau + c2 tau^2 exactly (tau =
    lambda - lambda_t); diffusers' weighs the quadratic term alpha_s (h^2/2 - h - phi) x0''
    by half: its error is exactly -alpha_s c2 (h^2/2 - h - phi), phi = e^{-h} - 1 (-0.0123)."""
    from ddpmcli.run.dpm_solver import dpm_solver_update

    lam_t, h, h0, h1 = -0.4, 0.5, 0.35, 0.6
    coeffs = (0.2, -0.7, 0.9)
    lams = [lam_t, lam_t - h0, lam_t - h0 - h1]
    m = [torch.tensor([sum(c * (v - lam_t) ** k for k, c in enumerate(coeffs))], dtype=F64)
         for v in lams]  # fmt: skip

    def point(lam: float) -> tuple[float, float]:
        return 1 / math.sqrt(1 + math.exp(-2 * lam)), 1 / math.sqrt(1 + math.exp(2 * lam))

    (a_t, s_t), (a_s, s_s) = point(lam_t), point(lam_t + h)
    grid = PathGrid("vp", (a_t,), (s_t,), (lam_t,), (a_s,), (s_s,), (lam_t + h,))
    x_t = 0.8
    out = dpm_solver_update(torch.tensor([x_t], dtype=F64), m, lams, grid, 0, 3,
                            exact=form == "exact")  # fmt: skip
    want = _quadrature(lam_t, lam_t + h, x_t, coeffs)
    if form == "exact":
        assert abs(float(out) - want) < 1e-14
    else:
        half = -a_s * coeffs[2] * (h * h / 2 - h - math.expm1(-h))
        assert abs(float(out) - want - half) < 1e-14 and abs(half) > 1e-2


def test_singlestep_start_is_second_order() -> None:
    """DPM-Solver++(2S) with r = 1 from exact x0_hat: local error O(h^3)."""
    from ddpmcli.run.dpm_solver import dpm_singlestep_update

    def exact_point(lam: float, c: float = 0.7) -> tuple[float, float, float, float]:
        alpha = 1 / math.sqrt(1 + math.exp(-2 * lam))
        sig = math.exp(-lam)
        xk = MU + c * math.sqrt(S * S + sig * sig)
        return alpha, alpha * sig, alpha * xk, MU + (xk - MU) * S * S / (S * S + sig * sig)

    errors = []
    for h in (0.1, 0.05, 0.025):
        a_t, s_t, x_t, m0 = exact_point(0.0)
        a_s, s_s, x_s, _ = exact_point(h)
        grid = PathGrid("vp", (a_s, a_t), (s_s, s_t), (h, 0.0), (0, a_s), (0, s_s), (0, h))

        def evaluate(u: torch.Tensor, j: int, a=a_s, s=s_s) -> torch.Tensor:
            return MU + a * S * S / (a * a * S * S + s * s) * (u - a * MU)

        x = torch.tensor([x_t], dtype=F64)
        out = dpm_singlestep_update(x, torch.tensor([m0], dtype=F64), evaluate, grid, 1)
        errors.append(abs(float(out) - x_s))
    slope = math.log2(errors[1] / errors[2])
    assert abs(slope - 3) < 0.3, (errors, slope)


# ---- Karras et al. 2022 Algorithm 2 (churn) against k-diffusion ------------------------------


class _SameNoise:
    """Stands in for k-diffusion's ``torch``: ``randn_like`` hands out our loop's step noise
    (the seed's blocks after x_T, one per step), everything else is torch's."""

    def __init__(self, blocks: list[torch.Tensor]) -> None:
        self.blocks = iter(blocks)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return next(self.blocks).to(x)

    def __getattr__(self, name: str):
        return getattr(torch, name)


def _eps_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A smooth made-up epsilon model of x and the (float) timestep."""
    tt = t.to(F64).reshape(-1, *([1] * (x.ndim - 1)))
    return (0.5 * torch.tanh(x.double()) * torch.cos(tt / 400) + 0.1 * x.double() + 0.05).to(x)


def _our_churned_run(
    run: core.Schedule, name: str, churn: dict, kind: str, *, n: int, dim: int
) -> tuple:
    """(grid, model timesteps, the run's noise blocks, final x) of our ``name`` with ``churn`` on
    ``run``, float64, seed 0: block 0 is x_T, block k the noise of step k (for k-diffusion)."""
    from ddpmcli.run.noise import generator, randn
    from ddpmcli.run.solver_grid import path_grid

    grid, model_t = path_grid(run), [float(v) for v in run.model_timestep]
    gen = generator(torch.device("cpu"), 0)
    blocks = [randn((n, dim), gen, torch.device("cpu"), F64) for _ in range(run.num_steps + 1)]
    last: dict[str, torch.Tensor] = {}

    def keep(event) -> None:
        if "x_next" in event.tensors:
            last["x"] = event.tensors["x_next"]

    settings = SampleSettings(sampler=name, clip=False, **churn)
    sample(lambda x, t: (_eps_model(x, t), None), run, kind, (dim,), n=n, settings=settings,
           model_dtype=F64, observers=[keep])  # fmt: skip
    return grid, model_t, blocks, last["x"]


@pytest.mark.parametrize(
    ("name", "k_name", "churn"),
    [("euler", "sample_euler", {"s_churn": 3.0, "s_tmin": 0.2, "s_tmax": 8.0, "s_noise": 1.003}),
     ("heun", "sample_heun", {"s_churn": 2.0, "s_tmin": 0.5, "s_noise": 0.9}),
     ("euler", "sample_euler", {"s_churn": 40.0}),  # gamma capped at sqrt(2) - 1, every step
     ("heun", "sample_heun", {})],
)  # fmt: skip
def test_churn_is_karras_algorithm_2_as_k_diffusion(monkeypatch, name, k_name, churn) -> None:
    """Same denoiser, same grid, same noise: k-diffusion's sampler and ours agree to float64
    rounding. The denoiser at a churned sigma_hat is the model at off_grid.timestep_at's
    timestep (our rule for a point between grid points; k-diffusion's own wrapper would use the
    training table), so what is compared is the algorithm."""
    from ddpmcli.run.off_grid import timestep_at

    kd = _k_diffusion_sampling(monkeypatch)
    steps = 10
    run = sigma_grid(_train(), steps, "karras")
    grid, model_t, blocks, ours = _our_churned_run(run, name, churn, "epsilon", n=5, dim=3)

    def denoiser(xk: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = float(sigma[0])
        alpha, sig = 1 / math.sqrt(1 + s * s), s / math.sqrt(1 + s * s)
        # the loop hands a VP model fractional timesteps in float32 (Schedule.network_timesteps)
        t = torch.full((xk.shape[0],), timestep_at(s, grid, model_t), dtype=torch.float32)
        return (alpha * xk - sig * _eps_model(alpha * xk, t)) / alpha

    monkeypatch.setattr(kd, "torch", _SameNoise(blocks[1:]))
    sigmas = torch.tensor([*reversed([grid.edm_sigma(i) for i in range(steps)]), 0.0], dtype=F64)
    x_k = blocks[0] * math.sqrt(1 + float(sigmas[0]) ** 2)  # x_T in Karras' variables
    theirs = getattr(kd, k_name)(denoiser, x_k, sigmas, disable=True, **churn)
    assert float((ours - theirs).abs().max()) < 1e-12 * float(theirs.abs().max())
    if churn.get("s_churn", 0) > 0:  # and the churn did something: not the unchurned run
        monkeypatch.setattr(kd, "torch", _SameNoise(blocks[1:]))
        plain = getattr(kd, k_name)(denoiser, x_k, sigmas, disable=True)
        assert float((plain - theirs).abs().max()) > 1e-3


@pytest.mark.parametrize(("path", "kind"), [("flow", "flow"), ("ve", "epsilon")])
@pytest.mark.parametrize("name", ["euler", "heun"])
def test_churn_off_vp_is_k_diffusions(monkeypatch, path, kind, name) -> None:
    """The same on a flow (velocity model, timestep 1000 s) and a sigma-space path (epsilon
    model, timestep ln(sigma)/4): Karras' variables x' = x/alpha, sigma' = sigma/alpha, the
    model at each point in the path's own coordinates."""
    from ddpmcli.core import grids, ode_path
    from ddpmcli.run.off_grid import timestep_at
    from ddpmcli.run.solver_grid import grid_schedule, path_point

    kd = _k_diffusion_sampling(monkeypatch)
    steps = 8
    churn = {"s_churn": 4.0, "s_tmin": 0.1, "s_tmax": 30.0}
    sig = grids.karras_sigmas(steps, 0.05, 20.0).to(F64)
    ts = 1000 * sig / (1 + sig) if path == "flow" else torch.log(sig) / 4
    run = grid_schedule(core.make_schedule(path, 1000), sig, ts)
    grid, model_t, blocks, ours = _our_churned_run(run, name, churn, kind, n=4, dim=2)

    def denoiser(xk: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = float(sigma[0])
        alpha, sig_t = (torch.tensor(v, dtype=F64) for v in path_point(path, s))
        t = torch.full((xk.shape[0],), timestep_at(s, grid, model_t), dtype=torch.float32)
        out = _eps_model(alpha * xk, t)
        return ode_path.prediction_to_x0_eps(out, alpha * xk, alpha, sig_t, kind)[0]

    monkeypatch.setattr(kd, "torch", _SameNoise(blocks[1:]))
    sigmas = torch.tensor([*reversed([grid.edm_sigma(i) for i in range(steps)]), 0.0], dtype=F64)
    x_k = blocks[0] * math.sqrt(1 + float(sigmas[0]) ** 2)  # x_T ~ N(0, (alpha^2 + sigma^2) I)
    k_sampler = {"euler": kd.sample_euler, "heun": kd.sample_heun}[name]
    theirs = k_sampler(denoiser, x_k, sigmas, disable=True, **churn)
    assert float((ours - theirs).abs().max()) < 1e-12 * float(theirs.abs().max())


# ---- a churn that never applies --------------------------------------------------------------


@pytest.mark.parametrize(
    ("window", "words"),
    [((100.0, 200.0), r"would never apply: no sigma of the grid lies in \[s_tmin, s_tmax\]"),
     ((3.0, 2.0), "an empty window: s_tmin 3 is above s_tmax 2")],
)  # fmt: skip
@pytest.mark.parametrize("name", ["euler", "heun"])
def test_an_empty_churn_window_is_refused_before_any_model_call(name, window, words) -> None:
    from ddpmcli.errors import ParameterError, UsageError

    calls = []
    run = sigma_grid(_train(), 5, "karras")  # sigmas 0.0292 .. 14.6
    settings = SampleSettings(sampler=name, s_churn=1.0, s_tmin=window[0], s_tmax=window[1])
    with pytest.raises(ParameterError, match=words) as caught:
        sample(lambda x, t: (calls.append(t) or x, None), run, "epsilon", (2,), n=3,
               settings=settings)  # fmt: skip
    assert isinstance(caught.value, UsageError) and not calls
    # a window that holds one grid sigma is taken
    one = SampleSettings(sampler=name, s_churn=1.0, s_tmin=14.0, s_tmax=15.0)
    sample(lambda x, t: (torch.zeros_like(x), None), run, "epsilon", (2,), n=3, settings=one)


@pytest.mark.parametrize(
    ("flags", "words"),
    [(["--s-tmin", "100", "--s-tmax", "200"],
      "Error: --s-churn 1 would never apply: no sigma of the grid lies in [--s-tmin, --s-tmax] "
      "= [100, 200]"),
     (["--s-tmin", "3", "--s-tmax", "2"],
      "Error: --s-churn 1 churns where --s-tmin <= sigma <= --s-tmax, an empty window: --s-tmin "
      "3 is above --s-tmax 2")],
)  # fmt: skip
def test_an_empty_churn_window_is_one_line_exit_2(cli, tmp_path, flags, words) -> None:
    from conftest import tiny_mlp_checkpoint

    ckpt = tiny_mlp_checkpoint(tmp_path / "m.pt", 50)
    result = cli("sample", str(ckpt), "--sampler", "euler", "--steps", "5", "--n", "4",
                 "--s-churn", "1", *flags)  # fmt: skip
    assert result.exit_code == 2, result.stderr
    assert result.stdout == ""
    assert result.stderr.startswith(words) and result.stderr.count("\n") == 1, result.stderr


def test_dpm_form_on_the_command_line(cli, tmp_path) -> None:
    from conftest import tiny_mlp_checkpoint

    ckpt = str(tiny_mlp_checkpoint(tmp_path / "m.pt", 50))
    base = ["sample", ckpt, "--steps", "6", "--n", "4", "--format", "csv"]
    done = cli(*base, "--sampler", "dpmpp-3m", "--dpm-form", "exact", "--columns", "step,order")
    assert done.exit_code == 0, done.stderr
    # the 2S start is second order, then 3M's rule (lower_order_final below 15 steps)
    assert [r.split(",")[1] for r in done.stdout.splitlines()[1:]] == list("223321")
    for flags, words in (
        (["--sampler", "dpmpp-3m", "--dpm-form", "bogus"],
         "Error: --dpm-form 'bogus' is unknown; allowed: diffusers, exact"),
        (["--sampler", "euler", "--dpm-form", "exact"],
         "Error: --dpm-form does not apply to --sampler euler"),
        (["--sampler", "dpmpp-2m-sde", "--dpm-form", "exact"],
         "Error: --dpm-form exact is for the ODE solvers dpmpp-2m and dpmpp-3m"),
        # the forms differ in the third-order term only: elsewhere the flag would change nothing
        (["--sampler", "dpmpp-2m", "--dpm-form", "exact"],
         "Error: --dpm-form exact changes only the third-order update; dpmpp-2m runs order 2"),
        (["--sampler", "dpmpp-3m", "--order", "2", "--dpm-form", "exact"],
         "Error: --dpm-form exact changes only the third-order update; dpmpp-3m runs order 2"),
    ):  # fmt: skip
        result = cli(*base, *flags)
        assert result.exit_code == 2 and result.stdout == "", result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and errors[0].startswith(words.rstrip("\n")), result.stderr


# ---- the SDE variant: weak order, from the exact output distribution -------------------------


def _sde_moments(monkeypatch, steps: int, **options) -> tuple[float, float]:
    """(|mean - exact|, |variance - exact|) of dpmpp-2m-sde's output on the Gaussian oracle,
    from x_T ~ N(0, 1) at sigma_max to sigma_min, both computed exactly. The run is affine in
    x_T and in the step noise z_k (x0_hat is affine in x), so with sample 0 at x_T = 0, z = 0,
    sample k with z_k = 1 at step k only, and the last sample at x_T = 1 without noise, the
    output is c + a x_T + sum_k b_k z_k: mean c, variance a^2 + sum b_k^2. The exact map is the
    true reverse conditional q(x_s | x_t) of the forward process (what the reverse SDE with the
    exact score generates) applied to N(0, 1)."""
    import ddpmcli.run.samplers as loop_module

    run = sigma_grid(_train(), steps, "karras")
    sig, ts = run.sigma.tolist(), run.model_timestep.tolist()

    def predict(x, t):
        k = min(range(len(ts)), key=lambda j: abs(ts[j] - float(t[0])))
        a, s = 1 / math.sqrt(1 + sig[k] ** 2), sig[k] / math.sqrt(1 + sig[k] ** 2)
        return MU + a * S * S / (a * a * S * S + s * s) * (x - a * MU), None

    n, drawn = steps + 2, [0]

    def unit_noise(shape, gen, dev, dtype):  # block 0 is x_T (replaced by init)
        z = torch.zeros(shape, dtype=dtype, device=dev)
        if 1 <= drawn[0] <= steps:
            z[drawn[0]] = 1.0
        drawn[0] += 1
        return z

    monkeypatch.setattr(loop_module, "randn", unit_noise)
    last: dict[str, torch.Tensor] = {}

    def keep(event) -> None:
        if "x_next" in event.tensors:
            last["x"] = event.tensors["x_next"]

    init = torch.zeros(n, 1, dtype=F64)
    init[-1] = 1.0
    settings = SampleSettings(sampler="dpmpp-2m-sde", clip=False, final_sigma=sig[0], **options)
    sample(predict, run, "sample", (1,), n=n, settings=settings, init=init, model_dtype=F64,
           observers=[keep])  # fmt: skip
    y = last["x"][:, 0]
    c, a, b = float(y[0]), float(y[-1] - y[0]), y[1:-1] - y[0]
    mean, var = c, a * a + float((b * b).sum())
    (a_t, s_t), (a_s, s_s) = [(1 / math.sqrt(1 + v * v), v / math.sqrt(1 + v * v))
                              for v in (sig[-1], sig[0])]  # fmt: skip
    var_s, var_t = a_s**2 * S * S + s_s**2, a_t**2 * S * S + s_t**2
    gain = (a_t / a_s) * var_s / var_t  # Cov(x_s, x_t)/Var(x_t)
    mean_exact = a_s * MU - gain * a_t * MU
    var_exact = gain * gain + var_s - gain * gain * var_t
    return abs(mean - mean_exact), abs(var - var_exact)


@pytest.mark.parametrize(
    ("options", "want"),
    [({}, 2), ({"solver_type": "heun"}, 2), ({"order": 1}, 1)],  # measured 2.09, 2.17, 0.91
)
def test_sde_variant_weak_order_on_the_gaussian_oracle(monkeypatch, options, want) -> None:
    moments = [_sde_moments(monkeypatch, n, **options) for n in (16, 32, 64)]
    assert all(mean < 1e-12 for mean, _ in moments)  # the mean is exact (affine x0_hat)
    slope = math.log2(moments[1][1] / moments[2][1])
    assert abs(slope - want) < 0.3, moments


def test_off_grid_timestep_on_the_training_table_is_diffusers_sigma_to_t() -> None:
    """On a run of all T entries, the churned point's timestep is diffusers' ``_sigma_to_t``
    (core.grids.sigma_to_timestep, checked against diffusers in tests/test_grids.py), and so
    k-diffusion's DiscreteSchedule.sigma_to_t, clamped outside the table alike."""
    from ddpmcli.core import grids
    from ddpmcli.run.off_grid import timestep_at
    from ddpmcli.run.solver_grid import model_timesteps, path_grid

    train = _train()
    grid, model_t = path_grid(train), model_timesteps(train)
    table = train.sigma.to(F64)
    for s in (0.001, 0.0292, 0.05, 0.3, 1.0, 3.7, 14.0, 14.6, 20.0):
        want = float(grids.sigma_to_timestep(torch.tensor([s], dtype=F64), table)[0])
        assert abs(timestep_at(s, grid, model_t) - want) < 1e-11, s


def test_default_3m_is_k_diffusions_3m_digit_for_digit(monkeypatch) -> None:
    """k-diffusion's sample_dpmpp_3m_sde with eta = 0 (its ODE 3M, whose second-order warm-up
    step is the ``heun`` form) on our grid and oracle gives our default-form dpmpp-3m's error to
    1e-12: the half coefficient is theirs too."""
    kd = _k_diffusion_sampling(monkeypatch)
    steps = 16
    run = sigma_grid(_train(), steps, "karras")
    sig = run.sigma.tolist()
    ours, exact, _ = _oracle_run("dpmpp-3m", steps, solver_type="heun")

    def denoiser(xk: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s2 = float(sigma[0]) ** 2
        return MU + S * S / (S * S + s2) * (xk - MU)

    init = torch.linspace(-2, 2, 7, dtype=F64).reshape(7, 1)
    xk = init * math.sqrt(1 + sig[-1] ** 2)
    sigmas = torch.tensor(list(reversed(sig)), dtype=F64)  # down to sigma_min, no final 0
    theirs = kd.sample_dpmpp_3m_sde(denoiser, xk, sigmas, disable=True, eta=0.0)
    theirs = theirs / math.sqrt(1 + sig[0] ** 2)  # x = alpha x' at sigma_min
    assert float((ours - theirs).abs().max()) < 1e-12
    assert float((ours - exact).abs().max()) > 1e-3  # and the error is the 2nd-order one
