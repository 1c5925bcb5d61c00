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
