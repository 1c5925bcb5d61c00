"""The ODE/SDE solvers against diffusers' own schedulers (same model, same grid, same noise) and
against the exact Gaussian oracle (closed-form probability-flow ODE solution), plus bad input."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from ddpmcli import core
from ddpmcli.run.events import ParameterError
from ddpmcli.run.noise import generator, randn
from ddpmcli.run.samplers import SampleSettings, sample
from ddpmcli.run.solver_grid import grid_schedule, path_schedule, sigma_grid

diffusers = pytest.importorskip("diffusers")

BETAS = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
N_SAMPLES, DIM = 6, 3


def _train() -> core.Schedule:
    return core.make_schedule("scaled_linear", 1000, beta_start=0.00085, beta_end=0.012)


def _model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A smooth made-up epsilon model that depends on x and on the (float) timestep."""
    tt = t.to(torch.float64).reshape(-1, *([1] * (x.ndim - 1)))
    out = 0.5 * torch.tanh(x.double()) * torch.cos(tt / 400) + 0.1 * x.double() + 0.05
    return out.to(x.dtype)


def _stream(n_blocks: int, seed: int = 0) -> list[torch.Tensor]:
    """The loop's noise: x_T, then one block per step (the same generator draws)."""
    gen = generator(torch.device("cpu"), seed)
    return [
        randn((N_SAMPLES, DIM), gen, torch.device("cpu"), torch.float32) for _ in range(n_blocks)
    ]


def _diffusers_run(sched, n: int, noise: list[torch.Tensor], noise_kw: str | None) -> torch.Tensor:
    sched.set_timesteps(n)
    x = noise[0] * _start_scale(sched)
    for k, t in enumerate(sched.timesteps):
        out = _model(sched.scale_model_input(x, t), t.reshape(1).expand(N_SAMPLES))
        kwargs = {} if noise_kw is None else {noise_kw: noise[k + 1]}
        x = sched.step(out, t, x, **kwargs).prev_sample
    return x


def _start_scale(sched) -> float:
    """x_T = N(0, I) in the path's coordinates, as ddpm starts: in a k-space scheduler's
    coordinates sqrt(sigma_max^2 + 1) (diffusers' EulerDiscrete with linspace/trailing spacing
    uses sigma_max instead, 0.2% less on SD's schedule)."""
    if isinstance(sched.init_noise_sigma, float) and sched.init_noise_sigma == 1.0:
        return 1.0
    return math.sqrt(float(sched.sigmas.max()) ** 2 + 1)


def _ours(sched, settings: SampleSettings, dtype=torch.float32, path_train=None) -> torch.Tensor:
    """Our loop on diffusers' own grid (sigmas[:-1] and timesteps; sigmas[-1] the final)."""
    sigmas = sched.sigmas.double()
    timesteps = torch.unique_consecutive(sched.timesteps.double())
    edm = torch.unique_consecutive(sigmas)[: len(timesteps)]  # Heun's are doubled
    if path_train is None:
        run = grid_schedule(_train(), edm, timesteps)
    else:  # flow sigmas are the flow time s
        run = path_schedule("flow", 1 - edm, edm, timesteps)
    init = _stream(1)[0]
    last = float(sigmas[-1])
    if last > 0:  # final_sigmas_type="sigma_min": the last step lands there
        settings = replace(settings, final_sigma=last if path_train is None else last / (1 - last))

    def predict(x, t):
        return _model(x, t), None

    result = sample(
        predict, run, "epsilon" if path_train is None else "flow", (DIM,), n=N_SAMPLES,
        settings=settings, init=init, model_dtype=dtype,
    )  # fmt: skip
    return result.samples


def _close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    scale = float(theirs.abs().max())
    assert float((ours - theirs).abs().max()) <= 3e-6 * max(scale, 1.0)


@pytest.mark.parametrize(
    ("name", "order", "solver_type", "karras", "n"),
    [
        ("dpmpp-2m", 2, "midpoint", False, 10),
        ("dpmpp-2m", 2, "heun", True, 20),
        ("dpmpp-3m", 3, "midpoint", True, 12),
        ("dpmpp-3m", 3, "heun", False, 25),
        ("dpmpp-2m", 1, "midpoint", False, 8),
    ],
)
def test_dpm_solver_equals_diffusers(name, order, solver_type, karras, n) -> None:
    sched = diffusers.DPMSolverMultistepScheduler(
        **BETAS, solver_order=order, solver_type=solver_type, use_karras_sigmas=karras
    )
    theirs = _diffusers_run(sched, n, _stream(1), None)
    settings = SampleSettings(
        sampler=name, clip=False, solver_type=solver_type,
        order=order if order != int(name[6]) else None,
    )  # fmt: skip
    _close(_ours(sched, settings), theirs)


@pytest.mark.parametrize(("solver_type", "n"), [("midpoint", 10), ("heun", 16)])
def test_dpm_solver_sde_equals_diffusers_with_the_same_noise(solver_type, n) -> None:
    sched = diffusers.DPMSolverMultistepScheduler(
        **BETAS, algorithm_type="sde-dpmsolver++", solver_type=solver_type, use_karras_sigmas=True
    )
    theirs = _diffusers_run(sched, n, _stream(n + 1), "variance_noise")
    settings = SampleSettings(sampler="dpmpp-2m-sde", clip=False, solver_type=solver_type)
    _close(_ours(sched, settings), theirs)


@pytest.mark.parametrize(
    ("order", "variant", "corrector", "n"),
    [(1, "bh2", True, 8), (2, "bh1", True, 10), (2, "bh2", False, 10), (3, "bh2", True, 12),
     (3, "bh1", True, 20)],
)  # fmt: skip
def test_unipc_equals_diffusers(order, variant, corrector, n) -> None:
    sched = diffusers.UniPCMultistepScheduler(
        **BETAS, solver_order=order, solver_type=variant, use_karras_sigmas=True,
        disable_corrector=[] if corrector else list(range(n)),
        final_sigmas_type="sigma_min" if variant == "bh1" else "zero",
    )  # fmt: skip
    # (bh1 onto sigma 0 is NaN in diffusers: B(h) = -inf times a zero correction)
    theirs = _diffusers_run(sched, n, _stream(1), None)
    settings = SampleSettings(
        sampler="unipc", clip=False, order=order, solver_type=variant, corrector=corrector
    )
    _close(_ours(sched, settings), theirs)


@pytest.mark.parametrize("karras", [False, True])
def test_euler_and_euler_ancestral_equal_diffusers(karras) -> None:
    n = 12
    sched = diffusers.EulerDiscreteScheduler(**BETAS, use_karras_sigmas=karras)
    theirs = _diffusers_run(sched, n, _stream(1), None)
    _close(_ours(sched, SampleSettings(sampler="euler", clip=False)), theirs)
    sched = diffusers.EulerAncestralDiscreteScheduler(**BETAS)
    noise = _stream(n + 1)
    sched.set_timesteps(n)
    x = noise[0] * _start_scale(sched)
    for k, t in enumerate(sched.timesteps):  # its step draws noise itself: patch the draw
        out = _model(sched.scale_model_input(x, t), t.reshape(1).expand(N_SAMPLES))
        step_noise = noise[k + 1] if k + 1 < n else torch.zeros_like(x)
        gen = _FixedNoise(step_noise)
        x = sched.step(out, t, x, generator=gen.generator).prev_sample
        gen.restore()
    _close(_ours(sched, SampleSettings(sampler="euler-a", clip=False)), x)


class _FixedNoise:
    """Makes diffusers' ``randn_tensor`` return a given tensor for one call."""

    def __init__(self, value: torch.Tensor) -> None:
        import diffusers.schedulers.scheduling_euler_ancestral_discrete as mod

        self.mod, self.saved = mod, mod.randn_tensor
        self.generator = None
        mod.randn_tensor = lambda *a, **k: value.clone()

    def restore(self) -> None:
        self.mod.randn_tensor = self.saved


def test_heun_equals_diffusers() -> None:
    n = 9
    sched = diffusers.HeunDiscreteScheduler(**BETAS)
    theirs = _diffusers_run(sched, n, _stream(1), None)
    _close(_ours(sched, SampleSettings(sampler="heun", clip=False)), theirs)


def test_flow_euler_equals_diffusers() -> None:
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(10)
    noise = _stream(1)
    x = noise[0].clone()
    for t in sched.timesteps:
        x = sched.step(_model(x, t.reshape(1).expand(N_SAMPLES)), t, x).prev_sample
    ours = _ours(sched, SampleSettings(sampler="flow-euler", clip=False), path_train=_flow())
    _close(ours, x)


def _flow() -> core.Schedule:
    return core.make_schedule("flow", 1000)


# ---- the exact Gaussian oracle -------------------------------------------------------------

MU, S = 0.3, 0.5


def _oracle_run(name: str, steps: int, **options) -> tuple[torch.Tensor, torch.Tensor]:
    """(our float64 sample, the exact PF-ODE solution from the same x_T) on a Karras grid."""
    train = _train()
    run = sigma_grid(train, steps, "karras")
    sig = run.sigma.tolist()

    def predict(x, t):  # E[x0 | x_t] of N(MU, S^2) at the grid's own sigma (by timestep)
        k = min(range(len(sig)), key=lambda j: abs(float(run.model_timestep[j]) - float(t[0])))
        a, s = 1 / math.sqrt(1 + sig[k] ** 2), sig[k] / math.sqrt(1 + sig[k] ** 2)
        return MU + a * S * S / (a * a * S * S + s * s) * (x - a * MU), None

    init = torch.linspace(-2, 2, 7, dtype=torch.float64).reshape(7, 1)
    # the last step lands on the grid's own sigma_min (a no-op), where the exact solution is
    # known: the whole error is the discretisation of sigma_max .. sigma_min
    settings = SampleSettings(sampler=name, clip=False, final_sigma=sig[0], **options)
    out = sample(predict, run, "sample", (1,), n=7, settings=settings, init=init,
                 model_dtype=torch.float64).samples.double()  # fmt: skip
    # PF-ODE in (x' = x/alpha, sigma'): x' - MU scales as sqrt(S^2 + sigma'^2) (Gaussian data)
    s_max, s_min = sig[-1], sig[0]
    xk = init * math.sqrt(1 + s_max**2)
    exact = MU + (xk - MU) * math.sqrt((S * S + s_min * s_min) / (S * S + s_max * s_max))
    return out, exact / math.sqrt(1 + s_min**2)


def test_first_order_dpm_solver_is_ddim() -> None:
    train = _train()
    run = core.respace(train, list(range(0, 1000, 50)))
    init = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def predict(x, t):
        return _model(x, t), None

    runs = [
        sample(predict, run, "epsilon", (2,), n=5, init=init, model_dtype=torch.float64,
               settings=SampleSettings(sampler=name, clip=False, order=order)).samples.double()
        for name, order in (("ddim", None), ("dpmpp-2m", 1), ("unipc", 1), ("flow-euler", None))
    ]  # fmt: skip
    for other in runs[1:2] + runs[3:]:
        assert float((other - runs[0]).abs().max()) < 1e-12


def _order(name: str, counts=(8, 16, 32), **options) -> list[float]:
    errors = []
    for n in counts:
        out, exact = _oracle_run(name, n, **options)
        errors.append(float((out - exact).abs().max()))
    return [math.log2(errors[k] / errors[k + 1]) for k in range(len(errors) - 1)]


@pytest.mark.parametrize(
    ("name", "options", "want"),
    [("euler", {}, 1), ("heun", {}, 2), ("dpmpp-2m", {}, 2), ("unipc", {}, 3),
     # diffusers' 3M weighs its third-order term by half the Taylor coefficient: local error
     # O(h^3), a second-order run (its warm-up is not the cause; tests/test_solver_orders.py)
     ("dpmpp-3m", {}, 2)],
)  # fmt: skip
def test_empirical_order_on_the_gaussian_oracle(name, options, want) -> None:
    slopes = _order(name, counts=(16, 32, 64), **options)
    assert abs(slopes[-1] - want) < 0.3, slopes


def _exact_point(lam: float, c: float) -> tuple[float, float, float, float]:
    """(alpha, sigma, x, x0_hat) on the PF-ODE path of N(MU, S^2) data through c at lambda."""
    alpha = 1 / math.sqrt(1 + math.exp(-2 * lam))
    sig = math.exp(-lam)  # sigma/alpha
    xk = MU + c * math.sqrt(S * S + sig * sig)
    return alpha, alpha * sig, alpha * xk, MU + (xk - MU) * S * S / (S * S + sig * sig)


@pytest.mark.parametrize("order", [1, 2])
def test_dpm_solver_local_order(order) -> None:
    """One update from exact history: local error O(h^(order+1)) (Lu et al. 2022b, Thm 3.2)."""
    from ddpmcli.run.dpm_solver import dpm_solver_update
    from ddpmcli.run.solver_grid import PathGrid

    errors = []
    for h in (0.2, 0.1, 0.05):
        pts = [_exact_point(-k * h, 0.7) for k in range(3)]  # current, previous, the one before
        a_to, s_to, x_to, _ = _exact_point(h, 0.7)
        lams = tuple(-k * h for k in range(3))
        alphas, sigmas = tuple(p[0] for p in pts), tuple(p[1] for p in pts)
        grid = PathGrid("vp", alphas, sigmas, lams, (a_to, 0, 0), (s_to, 0, 0), (h, 0, 0))
        m = [torch.tensor([p[3]], dtype=torch.float64) for p in pts]
        x = torch.tensor([pts[0][2]], dtype=torch.float64)
        out = dpm_solver_update(x, m, [-k * h for k in range(3)], grid, 0, order)
        errors.append(abs(float(out) - x_to))
    slope = math.log2(errors[1] / errors[2])
    assert abs(slope - (order + 1)) < 0.3, (errors, slope)


# ---- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        (SampleSettings(sampler="dpmpp-2m", order=4), "order 4 is not one dpmpp-2m has"),
        (SampleSettings(sampler="unipc", order=0), "order 0 is not one unipc has"),
        (SampleSettings(sampler="euler", order=2), "order does not apply to sampler euler"),
        (SampleSettings(sampler="dpmpp-2m", s_churn=1.0), "s_churn does not apply"),
        (SampleSettings(sampler="euler-a", s_churn=1.0), "s_churn does not apply"),
        (SampleSettings(sampler="unipc", solver_type="midpoint"), "solver_type 'midpoint'"),
        (SampleSettings(sampler="euler", eta=0.5), "eta applies to sampler ddim only"),
        (SampleSettings(sampler="ddim", order=2), "order does not apply to sampler ddim"),
    ],
)
def test_options_a_sampler_does_not_have(settings, words) -> None:
    from ddpmcli.run.steps import check_sample_settings

    with pytest.raises(ParameterError, match=words):
        check_sample_settings(settings, learned_variance=False)


def test_a_grid_that_repeats_a_timestep_is_refused() -> None:
    with pytest.raises(ParameterError, match="repeats a model timestep"):
        grid_schedule(_train(), [1.0, 2.0, 3.0], [10.0, 20.0, 20.0])
    with pytest.raises(ParameterError, match="repeats a sigma"):
        grid_schedule(_train(), [1.0, 2.0, 2.0], [10.0, 20.0, 30.0])


@pytest.mark.parametrize(
    ("init", "words"),
    [(torch.zeros(4, 3), r"shape \[4, 3\]"), (torch.full((5, 2), math.nan), "NaN")],
)
def test_bad_init_is_refused(init, words) -> None:
    run = core.respace(_train(), [0, 500, 999])
    with pytest.raises(ParameterError, match=words):
        sample(lambda x, t: (x, None), run, "epsilon", (2,), n=5, init=init)


# ---- a diffusers folder's own scheduler; the command line --------------------------------------


def _folder_model(tmp_path, config: dict):
    import json
    from types import SimpleNamespace

    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps(config))
    return SimpleNamespace(info={"scheduler_config": str(path)})


@pytest.mark.parametrize(
    ("config", "want", "spacing", "options"),
    [
        ({"_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True,
          "solver_order": 2, "final_sigmas_type": "sigma_min"}, "dpmpp-2m", "karras",
         {"final_sigmas_type": "sigma_min", "lower_order_final": True}),
        ({"_class_name": "DPMSolverMultistepScheduler", "solver_order": 3,
          "lower_order_final": False}, "dpmpp-3m", None, {"lower_order_final": False}),
        ({"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver++"},
         "dpmpp-2m-sde", None, {}),
        ({"_class_name": "UniPCMultistepScheduler", "solver_type": "bh1"}, "unipc", None,
         {"solver_type": "bh1", "order": 2}),
        ({"_class_name": "EulerAncestralDiscreteScheduler"}, "euler-a", None, {}),
    ],
)  # fmt: skip
def test_a_folder_samples_with_its_own_scheduler(tmp_path, config, want, spacing, options) -> None:
    from ddpmcli.api_sampling import resolve_sampler

    model = _folder_model(tmp_path, config)
    name, how, _, solver, note = resolve_sampler(model, None, None, None, {})  # type: ignore[arg-type]
    assert (name, how) == (want, spacing)
    assert options.items() <= solver.items()
    assert note is not None and config["_class_name"] in note and "--sampler overrides" in note
    # --sampler overrides it; an explicit spacing wins over the folder's
    assert resolve_sampler(model, "ddim", "trailing", None, {})[:2] == ("ddim", "trailing")  # type: ignore[arg-type]


def test_a_folder_with_a_scheduler_ddpm_lacks_keeps_ddpm(tmp_path) -> None:
    from ddpmcli.api_sampling import resolve_sampler

    model = _folder_model(tmp_path, {"_class_name": "LMSDiscreteScheduler"})
    assert resolve_sampler(model, None, None, None, {})[0] == "ddpm"  # type: ignore[arg-type]


def test_sample_cli_takes_init_sigmas_and_solver_options(cli, tmp_path) -> None:
    import numpy as np
    from conftest import tiny_mlp_checkpoint

    ckpt = str(tiny_mlp_checkpoint(tmp_path / "m.pt", timesteps=50))
    x_t = np.random.default_rng(0).standard_normal((4, 2))
    np.save(tmp_path / "x.npy", x_t)
    base = ["sample", ckpt, "--n", "4", "--format", "csv", "--no-clip"]
    x_path = str(tmp_path / "x.npy")
    cols = ["--columns", "step,t,log_snr_gap,order"]
    done = cli(*base, "--sampler", "dpmpp-3m", "--steps", "6", "--spacing", "karras",
               "--init", x_path, *cols)  # fmt: skip
    assert done.exit_code == 0, done.stderr
    orders = [line.split(",")[-1] for line in done.stdout.splitlines()[1:]]
    assert orders == ["1", "2", "3", "3", "2", "1"]  # warm-up, then lower_order_final (< 15)
    done = cli(*base, "--sampler", "heun", "--sigmas", "0.7,0.3,0.1", "--columns", "step")
    assert done.exit_code == 0, done.stderr
    for extra, words in [
        (["--sampler", "euler", "--steps", "5", "--order", "2"], "--order does not apply"),
        (["--sampler", "unipc", "--steps", "5", "--order", "4"], "--order 4 is not one unipc"),
        (["--sampler", "heun", "--sigmas", "0.3,0.1,0.1"], "repeats a sigma"),
        (["--sampler", "heun", "--sigmas", "30,0.1"], "--sigmas 30 is outside the model's"),
        (["--sampler", "unipc", "--steps", "5", "--init", str(tmp_path / "x.npy"), "--n", "3"],
         "--init has shape [4, 2]"),
    ]:  # fmt: skip
        bad = cli(*base, *extra)
        assert bad.exit_code == 2, (extra, bad.stderr)
        assert words in bad.stderr and bad.stderr.count("\n") == 1, bad.stderr


def test_the_api_call_of_the_issue(tmp_path) -> None:
    from conftest import tiny_mlp_checkpoint

    import ddpmcli

    model = ddpmcli.load(str(tiny_mlp_checkpoint(tmp_path / "m.pt", timesteps=50)))
    x_t = torch.randn(5, 2, generator=torch.Generator().manual_seed(1))
    r = ddpmcli.sample(model, 5, sampler="dpmpp-2m", steps=6, grid="karras", init=x_t, clip=False)
    grid = sigma_grid(model.schedule, 6, "karras", whole_timesteps=True)
    assert torch.equal(r.schedule.model_timestep, grid.model_timestep)
    direct = sample(
        model.predict, grid, model.prediction_type, (2,), n=5, init=x_t,
        settings=SampleSettings(sampler="dpmpp-2m", clip=False, data_range=model.data_range),
    )  # fmt: skip
    assert torch.equal(r.samples, direct.samples)
    sigmas = [float(s) for s in grid.sigma.flip(0)]
    same = ddpmcli.sample(model, 5, sampler="dpmpp-2m", grid=sigmas, init=x_t, clip=False)
    assert torch.equal(same.samples, r.samples)
