"""The inference grids of ddpmcli.core.grids against the papers' formulas (mpmath, 50 digits) and
diffusers' own schedulers (the implementation users run; used here as a reference only)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from mpmath import mp, mpf

from ddpmcli.core import grids
from ddpmcli.errors import ScheduleParameterError

mp.dps = 50


@pytest.mark.parametrize("n", [1, 2, 3, 7, 28, 1000])
@pytest.mark.parametrize(("start", "stop"), [(0.0, 1.0), (1.0, 0.001), (2.6741, -4.0), (3.0, 3.0)])
def test_linspace_is_numpys_digit_for_digit(n: int, start: float, stop: float) -> None:
    assert np.array_equal(grids.linspace(start, stop, n).numpy(), np.linspace(start, stop, n))


def _mp_karras(n: int, lo: float, hi: float, rho: float) -> list[mpf]:
    # Karras et al. 2022, eq. (5), i/(n-1) ramp; one value when n = 1 (the ramp's 0)
    a, b = mpf(hi) ** (1 / mpf(rho)), mpf(lo) ** (1 / mpf(rho))
    return [(a + (mpf(i) / max(n - 1, 1)) * (b - a)) ** rho for i in range(n)]


@pytest.mark.parametrize("n", [1, 2, 10, 100])
@pytest.mark.parametrize(
    ("lo", "hi", "rho"), [(0.002, 80.0, 7.0), (0.0292, 14.6146, 7.0), (0.1, 10.0, 3.0)]
)
def test_karras_against_the_paper(n: int, lo: float, hi: float, rho: float) -> None:
    got = grids.karras_sigmas(n, lo, hi, rho).tolist()
    for value, ref in zip(got, _mp_karras(n, lo, hi, rho), strict=True):
        assert abs(value - float(ref)) <= 1e-14 * float(ref)
    assert got[0] == pytest.approx(hi, rel=1e-15)
    if n > 1:
        assert got[-1] == pytest.approx(lo, rel=1e-14)
        assert all(a > b for a, b in zip(got, got[1:], strict=False))


@pytest.mark.parametrize("n", [2, 10, 100])
def test_exponential_and_lu_are_uniform_in_log_sigma(n: int) -> None:
    lo, hi = 0.0292, 14.6146
    ref = [mp.exp(mp.log(hi) + mpf(i) / (n - 1) * (mp.log(lo) - mp.log(hi))) for i in range(n)]
    for grid in (grids.exponential_sigmas(n, lo, hi), grids.lu_sigmas(n, lo, hi)):
        for value, r in zip(grid.tolist(), ref, strict=True):
            assert abs(value - float(r)) <= 1e-14 * float(r)


def _diffusers_converters():  # type: ignore[no-untyped-def]
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler()


@pytest.mark.parametrize("n", [1, 5, 20, 999])
def test_karras_and_exponential_match_diffusers_in_float32(n: int) -> None:
    # diffusers' converters read sigma_min/sigma_max from the in_sigmas' ends (float64 here)
    sched = _diffusers_converters()
    ends = torch.tensor([14.614642, 0.029167], dtype=torch.float64)
    pairs = [
        (
            sched._convert_to_karras(in_sigmas=ends, num_inference_steps=n),
            grids.karras_sigmas(n, 0.029167, 14.614642),
        ),
        (
            sched._convert_to_exponential(in_sigmas=ends, num_inference_steps=n),
            grids.exponential_sigmas(n, 0.029167, 14.614642),
        ),
    ]
    for theirs, ours in pairs:
        np.testing.assert_allclose(ours.numpy(), theirs, rtol=4e-16 * 8, atol=0)
        assert np.array_equal(ours.numpy().astype(np.float32), theirs.astype(np.float32))


@pytest.mark.parametrize("q", [1e-12, 1e-6, 0.01, 0.3, 0.5, 0.77, 0.999, 1 - 1e-9])
@pytest.mark.parametrize(("a", "b"), [(0.6, 0.6), (2.0, 0.5), (0.3, 3.0)])
def test_beta_ppf_inverts_the_50_digit_cdf(q: float, a: float, b: float) -> None:
    x = grids.beta_ppf(q, a, b)
    assert 0 < x < 1
    cdf = mp.betainc(a, b, 0, mpf(x), regularized=True)
    density = mp.exp((a - 1) * mp.log(x) + (b - 1) * mp.log(1 - mpf(x)) - mp.log(mp.beta(a, b)))
    # the best any float64 x can do: q's own half ulp, and the CDF's rise over a few ulps of x
    floor = 4 * math.ulp(q) + 4 * float(density) * math.ulp(x)
    assert abs(float(cdf - q)) <= 1e-14 * min(q, 1 - q) + floor
    assert grids.beta_cdf(x, a, b) == pytest.approx(float(cdf), rel=1e-13, abs=1e-300)


def test_beta_sigmas_ends_and_symmetry() -> None:
    got = grids.beta_sigmas(9, 0.03, 14.6)
    assert got[0].item() == pytest.approx(14.6, rel=1e-15)
    assert got[-1].item() == pytest.approx(0.03, rel=1e-15)
    # Beta(0.6, 0.6) is symmetric: the grid is symmetric about the range's midpoint
    mid = (0.03 + 14.6) / 2
    assert torch.allclose(got - mid, -(got.flip(0) - mid), rtol=0, atol=1e-13)
    assert bool((got[:-1] > got[1:]).all())


@pytest.mark.parametrize("shift", [0.5, 3.0, 1 / 0.3])
def test_flow_shift_and_complement_against_mpmath(shift: float) -> None:
    s = torch.tensor([1e-7, 1e-3, 0.25, 0.5, 0.9, 1 - 1e-6, 1.0], dtype=torch.float64)
    for value, comp, x in zip(
        grids.flow_shift(s, shift).tolist(),
        grids.flow_shift_complement(s, shift).tolist(),
        s.tolist(),
        strict=True,
    ):
        ref = mpf(shift) * x / (1 + (mpf(shift) - 1) * x)
        assert abs(value - float(ref)) <= 1e-15 * float(ref)
        assert abs(comp - float(1 - ref)) <= 1e-15 * float(1 - ref) + 1e-300


@pytest.mark.parametrize("mu", [0.5, 1.15, 3.0])
@pytest.mark.parametrize("kind", ["exponential", "linear"])
def test_time_shift_against_mpmath_near_both_ends(mu: float, kind: str) -> None:
    s = torch.tensor([1e-6, 1e-3, 0.3, 0.5, 1 - 1e-6, 1.0], dtype=torch.float64)
    got = grids.time_shift(mu, 1.0, s, kind).tolist()
    c = mp.exp(mu) if kind == "exponential" else mpf(mu)
    for value, x in zip(got, s.tolist(), strict=True):
        ref = c / (c + (1 / mpf(x) - 1))
        assert abs(value - float(ref)) <= 2e-16 * float(ref)
    # sigma_power = 1 exponential is the static shift with shift = e^mu
    if kind == "exponential":
        assert torch.allclose(
            grids.time_shift(mu, 1.0, s), grids.flow_shift(s, math.exp(mu)), rtol=4e-16, atol=0
        )


def test_flux_mu_is_diffusers_calculate_shift() -> None:
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    for seq in (1, 256, 1024, 4096, 4097, 16384):
        assert grids.flux_mu(seq) == calculate_shift(seq)
        assert grids.flux_mu(seq, 256, 4096, 0.95, 2.05) == calculate_shift(
            seq, 256, 4096, 0.95, 2.05
        )
    assert grids.flux_mu(256) == pytest.approx(0.5) and grids.flux_mu(4096) == pytest.approx(1.15)
    assert grids.image_seq_len(1024, 1024) == 4096 and grids.image_seq_len(512, 512) == 1024


@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear", "squaredcos_cap_v2"])
def test_sigma_to_timestep_matches_diffusers(beta_schedule: str) -> None:
    from diffusers import EulerDiscreteScheduler

    sched = EulerDiscreteScheduler(beta_schedule=beta_schedule, beta_start=0.00085, beta_end=0.012)
    table32 = ((1 - sched.alphas_cumprod) / sched.alphas_cumprod) ** 0.5
    log_sigmas = np.log(table32.numpy())
    probe = np.concatenate(
        [grids.karras_sigmas(17, 0.01, 200.0).numpy(), [1e-12, 1e5, float(table32[3])]]
    )
    theirs = np.array([sched._sigma_to_t(s, log_sigmas) for s in probe])
    ours = grids.sigma_to_timestep(torch.from_numpy(probe), table32).numpy()
    # float32 logs of the table may differ by an ulp between numpy's and torch's libm
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)
    assert ours[-3] == 0 and ours[-2] == len(table32) - 1


@pytest.mark.parametrize(
    ("call", "word"),
    [
        (lambda: grids.karras_sigmas(0, 0.1, 1.0), "n must"),
        (lambda: grids.karras_sigmas(5, 1.0, 1.0), "sigma_min"),
        (lambda: grids.exponential_sigmas(5, -1.0, 1.0), "sigma_min"),
        (lambda: grids.beta_sigmas(5, 0.1, 1.0, alpha=0.0), "alpha"),
        (lambda: grids.flow_shift(torch.zeros(2), 0.0), "shift"),
        (lambda: grids.flow_shift(torch.zeros(2), -3.0), "shift"),
        (lambda: grids.time_shift(0.0, 1.0, torch.ones(2), "linear"), "mu"),
        (lambda: grids.time_shift(1.0, 1.0, torch.ones(2), "cubic"), "time_shift_type"),
        (lambda: grids.flux_mu(0), "image_seq_len"),
        (lambda: grids.flux_mu(100, 256, 256), "base_image_seq_len"),
    ],
)
def test_bad_parameters_name_themselves(call, word: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ScheduleParameterError, match=word):
        call()


# ---- diffusers' set_timesteps, reproduced (ddpmcli.core.scheduler_grids) --------------------
# Scheduler configs as published on the Hugging Face hub (scheduler/scheduler_config.json of each
# pipeline; values copied here, no download). Keys that do not touch the grid are left out.
SD3 = {"num_train_timesteps": 1000, "shift": 3.0}  # stabilityai/stable-diffusion-3-medium-diffusers
FLUX_DEV = {  # black-forest-labs/FLUX.1-dev
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
LTX = {  # Lightricks/LTX-Video
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.95,
    "max_shift": 2.05,
    "base_image_seq_len": 1024,
    "max_image_seq_len": 4096,
    "shift_terminal": 0.1,
}
COGVIEW4 = {  # THUDM/CogView4-6B
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": True,
    "time_shift_type": "linear",
    "base_shift": 0.25,
    "max_shift": 0.75,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
# Efficient-Large-Model/Sana_1600M_1024px_diffusers (DPMSolverMultistepScheduler)
SANA = {"use_flow_sigmas": True, "flow_shift": 3.0, "prediction_type": "flow_prediction"}
# Wan-AI/Wan2.1-T2V-1.3B-Diffusers (UniPCMultistepScheduler; 3.0 is Wan's default per diffusers'
# docs/source/en/api/pipelines/wan.md, 5.0 its 720p recommendation)
WAN = {"use_flow_sigmas": True, "flow_shift": 3.0, "prediction_type": "flow_prediction"}
# runwayml/stable-diffusion-v1-5's scheduler values, with Karras sigmas switched on
SD15_KARRAS = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}

STEPS = [1, 2, 8, 28, 50]
_PIPELINE_KEYS = ("base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len")


def _grid_args(config: dict[str, object]) -> dict[str, object]:
    """The config's keys set_timesteps reads (the others feed the pipeline's mu)."""
    return {key: value for key, value in config.items() if key not in _PIPELINE_KEYS}


def _same(theirs, ours, *, timestep_atol: float = 0.0) -> None:  # type: ignore[no-untyped-def]
    """diffusers' float32 tensors equal ours value for value (timesteps within ``timestep_atol``
    where stated: numpy's float32 log of a VP table differs from torch's by an ulp in ~15% of
    entries, and a timestep interpolated in log sigma moves by ulp(log)/spacing, ~1e-5)."""
    assert torch.equal(theirs.sigmas.to(torch.float64), ours.sigmas), (theirs.sigmas, ours.sigmas)
    t_theirs = theirs.timesteps.to(torch.float64)
    assert t_theirs.shape == ours.timesteps.shape
    if timestep_atol == 0:
        assert torch.equal(t_theirs, ours.timesteps), (t_theirs, ours.timesteps)
    else:
        assert float((t_theirs - ours.timesteps).abs().max()) <= timestep_atol


@pytest.mark.parametrize("n", STEPS)
def test_sd3_grid_is_diffusers(n: int) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    from ddpmcli.core import scheduler_grids as sg

    sched = FlowMatchEulerDiscreteScheduler(**SD3)
    sched.set_timesteps(n)
    _same(sched, sg.flow_match_euler_grid(n, **SD3))


def test_sd3_shifts_sigma_min_twice_as_diffusers_does() -> None:
    # diffusers #13243: at 8 steps the last sigma is 0.008929; shift(1/1000) = 0.002994 was meant
    from ddpmcli.core import scheduler_grids as sg

    grid = sg.flow_match_euler_grid(8, **SD3)
    assert grid.sigmas[-2].item() == pytest.approx(0.008929, abs=5e-7)
    once = grids.flow_shift(torch.tensor([1 / 1000], dtype=torch.float64), 3.0)
    assert once.item() == pytest.approx(0.002994, abs=5e-7)


@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize(("height", "width"), [(512, 512), (1024, 1024)])
def test_flux_grid_at_two_resolutions_is_the_pipelines(n: int, height: int, width: int) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from ddpmcli.core import scheduler_grids as sg

    seq = grids.image_seq_len(height, width)
    mu = grids.flux_mu(seq)
    assert mu == calculate_shift(seq)
    sched = FlowMatchEulerDiscreteScheduler(**FLUX_DEV)
    # what FluxPipeline.__call__ passes: sigmas = np.linspace(1.0, 1 / n, n) and mu
    sched.set_timesteps(n, sigmas=np.linspace(1.0, 1 / n, n), mu=mu)
    _same(
        sched,
        sg.flow_match_euler_grid(
            n, **_grid_args(FLUX_DEV), mu=mu, sigmas=sg.pipeline_flow_sigmas(n)
        ),
    )
    # and the scheduler alone, without the pipeline's sigmas
    sched.set_timesteps(n, mu=mu)
    _same(sched, sg.flow_match_euler_grid(n, **_grid_args(FLUX_DEV), mu=mu))


@pytest.mark.parametrize("n", [2, 8, 28, 50])
@pytest.mark.parametrize("seq", [1024, 6000])
def test_ltx_shift_terminal_grid_is_the_pipelines(n: int, seq: int) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    from ddpmcli.core import scheduler_grids as sg

    mu = grids.flux_mu(seq, 1024, 4096, 0.95, 2.05)
    sched = FlowMatchEulerDiscreteScheduler(**LTX)
    sched.set_timesteps(n, sigmas=np.linspace(1.0, 1 / n, n), mu=mu)
    ours = sg.flow_match_euler_grid(n, **_grid_args(LTX), mu=mu, sigmas=sg.pipeline_flow_sigmas(n))
    _same(sched, ours)
    assert ours.sigmas[-2].item() == pytest.approx(0.1, abs=1e-7)


@pytest.mark.parametrize("n", STEPS)
def test_cogview4_linear_time_shift_is_the_pipelines(n: int) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.cogview4.pipeline_cogview4 import calculate_shift

    from ddpmcli.core import scheduler_grids as sg

    mu = grids.cogview4_mu(4096)
    assert mu == calculate_shift(4096)
    timesteps, sigmas = sg.cogview4_pipeline_inputs(n)
    sched = FlowMatchEulerDiscreteScheduler(**COGVIEW4)
    sched.set_timesteps(
        n, sigmas=sigmas.numpy().astype(np.float32), timesteps=timesteps.numpy(), mu=mu
    )
    _same(
        sched,
        sg.flow_match_euler_grid(
            n, **_grid_args(COGVIEW4), mu=mu, sigmas=sigmas, timesteps=timesteps
        ),
    )
    sched.set_timesteps(n, mu=mu)
    _same(sched, sg.flow_match_euler_grid(n, **_grid_args(COGVIEW4), mu=mu))


@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0])
def test_sana_and_wan_flow_sigmas_are_diffusers(n: int, shift: float) -> None:
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    from ddpmcli.core import scheduler_grids as sg

    dpm = DPMSolverMultistepScheduler(**{**SANA, "flow_shift": shift})
    dpm.set_timesteps(n)
    _same(dpm, sg.dpm_solver_flow_grid(n, flow_shift=shift))
    unipc = UniPCMultistepScheduler(**{**WAN, "flow_shift": shift})
    unipc.set_timesteps(n)
    _same(unipc, sg.unipc_flow_grid(n, flow_shift=shift))
    dyn = DPMSolverMultistepScheduler(**SANA, use_dynamic_shifting=True)
    dyn.set_timesteps(n, mu=1.1)
    _same(dyn, sg.dpm_solver_flow_grid(n, flow_shift=3.0, mu=1.1))


@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize(
    "conversion", [{}, {"use_karras_sigmas": True}, {"use_exponential_sigmas": True}]
)
def test_euler_discrete_grids_are_diffusers(
    n: int, spacing: str, conversion: dict[str, bool]
) -> None:
    from diffusers import EulerDiscreteScheduler

    from ddpmcli.core import scheduler_grids as sg

    sched = EulerDiscreteScheduler(
        **SD15_KARRAS, timestep_spacing=spacing, steps_offset=1, **conversion
    )
    sched.set_timesteps(n)
    table = sg.diffusers_train_sigmas(**SD15_KARRAS)
    assert torch.equal(table, ((1 - sched.alphas_cumprod) / sched.alphas_cumprod) ** 0.5)
    ours = sg.euler_discrete_grid(n, table, timestep_spacing=spacing, steps_offset=1, **conversion)
    # sigmas exact; a timestep interpolated in float32 log sigma within 1e-4 (of 0..999)
    _same(sched, ours, timestep_atol=1e-4 if conversion else 0.0)


def test_flow_grids_with_karras_and_exponential_conversions() -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    from ddpmcli.core import scheduler_grids as sg

    for conversion in (
        {"use_karras_sigmas": True},
        {"use_exponential_sigmas": True},
        {"invert_sigmas": True},
    ):
        sched = FlowMatchEulerDiscreteScheduler(**SD3, **conversion)
        sched.set_timesteps(20)
        _same(sched, sg.flow_match_euler_grid(20, **SD3, **conversion))


def test_grid_inputs_are_checked() -> None:
    from ddpmcli.core import scheduler_grids as sg

    with pytest.raises(ScheduleParameterError, match="mu"):
        sg.flow_match_euler_grid(8, **_grid_args(FLUX_DEV))
    with pytest.raises(ScheduleParameterError, match="mu"):
        sg.flow_match_euler_grid(8, **SD3, mu=1.0)
    with pytest.raises(ScheduleParameterError, match="steps"):
        sg.flow_match_euler_grid(0, **SD3)
    with pytest.raises(ScheduleParameterError, match="only one"):
        sg.flow_match_euler_grid(8, use_karras_sigmas=True, use_beta_sigmas=True)
