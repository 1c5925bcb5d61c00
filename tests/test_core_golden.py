"""Golden values of the core, each with where it came from, and the errors bad input raises."""

from __future__ import annotations

import math

import pytest
import torch
from mpmath import mp, mpf

from ddpmcli import core
from ddpmcli.errors import ScheduleError, ScheduleParameterError

# --------------------------------------------------------------------------------------------
# Published numbers
# --------------------------------------------------------------------------------------------


def test_linear_posterior_variance_at_487() -> None:
    # The issue (DDPM linear schedule, beta 1e-4 .. 0.02, T = 1000): beta_tilde_487 = 0.0097916,
    # quoted to 5 significant digits.
    s = core.make_schedule("linear")
    assert s.posterior_variance[487].item() == pytest.approx(0.0097916, abs=5e-8)


def test_stable_diffusion_terminal_sqrt_alpha_bar() -> None:
    # Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Sec. 3.1:
    # Stable Diffusion's schedule (scaled_linear 0.00085 .. 0.012, T = 1000) ends at
    # sqrt(alpha_bar_T) = 0.068265, i.e. a non-zero terminal SNR of 0.004682.
    s = core.make_schedule("scaled_linear")
    assert s.sqrt_alpha_bar[-1].item() == pytest.approx(0.068265, abs=5e-7)
    assert s.snr[-1].item() == pytest.approx(0.004682, abs=5e-7)
    z = core.make_schedule("scaled_linear", zero_terminal_snr=True)
    assert z.alpha_bar[-1].item() == 0.0 and z.snr[-1].item() == 0.0
    # Algorithm 1 keeps sqrt(alpha_bar_0) unchanged
    assert z.sqrt_alpha_bar[0].item() == pytest.approx(s.sqrt_alpha_bar[0].item(), rel=1e-15)


# Cosine (Nichol & Dhariwal 2021, improved-diffusion, s = 0.008, max_beta = 0.999, T = 1000).
# The betas telescope: for t < T - 1 no beta is capped, so alpha_bar_t = f((t+1)/T)/f(0) with
# f(u) = cos^2((u + s)/(1 + s) pi/2); the last beta is capped, so alpha_bar_{T-1} =
# 0.001 alpha_bar_{T-2}. Values below: that closed form evaluated once in mpmath at 50 digits
# (independently of the cumulative-product reference in test_core_exact), rounded to 17 digits.
COSINE_ALPHA_BAR = {
    0: 0.99995871577517822,
    1: 0.99991257592736802,
    99: 0.97209273711396917,
    499: 0.49384359044063771,
    899: 0.024091724140085855,
    998: 2.4287669070344684e-6,
    999: 2.4287669070344705e-9,
}


@pytest.mark.parametrize("t", list(COSINE_ALPHA_BAR))
def test_cosine_alpha_bar(t: int) -> None:
    got = core.make_schedule("cosine").alpha_bar[t].item()
    assert got == pytest.approx(COSINE_ALPHA_BAR[t], rel=1e-13)
    # and the closed form itself, re-evaluated here
    with mp.workdps(50):
        s = mpf(0.008)

        def f(u):
            return mp.cos((u + s) / (1 + s) * mp.pi / 2) ** 2

        want = f(mpf(min(t, 998) + 1) / 1000) / f(0) * (1 - mpf(0.999) if t == 999 else 1)
    assert float(want) == pytest.approx(COSINE_ALPHA_BAR[t], rel=1e-16)


def test_cosine_alias_is_diffusers_squaredcos_cap_v2() -> None:
    assert core.canonical_kind("squaredcos_cap_v2") == "cosine"
    a, b = core.make_schedule("squaredcos_cap_v2"), core.make_schedule("cosine")
    assert torch.equal(a.alpha_bar, b.alpha_bar)


# --------------------------------------------------------------------------------------------
# Respacing: diffusers set_timesteps spacings and improved-diffusion space_timesteps
# --------------------------------------------------------------------------------------------

# Lin et al. 2024, Table 2 (T = 1000, 10 sampling steps), in 0-based model timesteps, as
# diffusers' DDPMScheduler/DDIMScheduler.set_timesteps gives them (listed ascending here):
#   linspace: np.linspace(0, 999, 10).round()            -> 0, 111, ..., 999
#   leading:  np.arange(0, 10) * (1000 // 10) + offset     -> 0, 100, ..., 900 (SD: offset 1)
#   trailing: np.round(np.arange(1000, 0, -100)) - 1       -> 99, 199, ..., 999
DIFFUSERS_10 = {
    ("linspace", 0): [0, 111, 222, 333, 444, 555, 666, 777, 888, 999],
    ("leading", 0): [0, 100, 200, 300, 400, 500, 600, 700, 800, 900],
    ("leading", 1): [1, 101, 201, 301, 401, 501, 601, 701, 801, 901],
    ("trailing", 0): [99, 199, 299, 399, 499, 599, 699, 799, 899, 999],
}


@pytest.mark.parametrize(("spacing", "offset"), list(DIFFUSERS_10))
def test_diffusers_spacings(spacing: str, offset: int) -> None:
    kept = core.respaced_timesteps(1000, 10, spacing, steps_offset=offset)
    assert kept == DIFFUSERS_10[(spacing, offset)]


def test_leading_never_visits_the_last_step() -> None:
    # Lin et al. 2024 Sec. 3.3: leading spacing never samples from t = T - 1; trailing does.
    assert 999 not in core.respaced_timesteps(1000, 50, "leading")
    assert core.respaced_timesteps(1000, 50, "trailing")[-1] == 999


# improved-diffusion respace.py, space_timesteps docstring: "if there's 300 timesteps and the
# section counts are [10,15,20] then the first 100 timesteps are strided to be 10 timesteps, the
# second 100 are strided to be 15 timesteps, and the final 100 are strided to be 20". Each section
# takes round(k * (size - 1)/(count - 1)) with the fractional stride *accumulated* in float64:
# in the second section 7 strides of 99/14 add up to 49.49999999999999, so Python's round gives
# 49 (timestep 149), where the exact 49.5 would round to 50 -- the list follows the accumulation.
SECTIONS_300 = (
    [0, 11, 22, 33, 44, 55, 66, 77, 88, 99]
    + [100, 107, 114, 121, 128, 135, 142, 149, 157, 164, 171, 178, 185, 192, 199]
    + [200, 205, 210, 216, 221, 226, 231, 236, 242, 247, 252, 257, 263, 268]
    + [273, 278, 283, 289, 294, 299]
)


def test_improved_diffusion_section_example() -> None:
    kept = core.respaced_timesteps(300, "10,15,20")
    assert kept == SECTIONS_300
    assert [sum(lo <= k < lo + 100 for k in kept) for lo in (0, 100, 200)] == [10, 15, 20]


def test_improved_diffusion_ddim_striding() -> None:
    # space_timesteps(1000, "ddim50"): the first integer stride giving exactly 50 steps is 20.
    assert core.respaced_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    # space_timesteps(1000, "ddim25") -> stride 40; (1000, "ddim10") -> stride 100
    assert core.respaced_timesteps(1000, "ddim25") == list(range(0, 1000, 40))
    assert core.respaced_timesteps(1000, "ddim10") == list(range(0, 1000, 100))
    # two sections of 500, 4 steps each: strides of 499/3 -> 0, 166, 333, 499 and 500 + those
    assert core.respaced_timesteps(1000, "4,4") == [0, 166, 333, 499, 500, 666, 833, 999]


def test_respaced_betas_follow_spaced_diffusion() -> None:
    # improved-diffusion SpacedDiffusion: new_beta = 1 - ab_t/ab_last over the kept steps.
    s = core.make_schedule("linear")
    kept = list(range(0, 1000, 100))
    r = core.respace(s, kept)
    ab = s.alpha_bar
    want = [1 - ab[kept[0]].item()] + [
        1 - ab[b].item() / ab[a].item() for a, b in zip(kept, kept[1:], strict=False)
    ]
    assert r.beta.tolist() == pytest.approx(want, rel=1e-12)
    assert r.timesteps.tolist() == kept


# --------------------------------------------------------------------------------------------
# Errors: the right class, naming the bad value
# --------------------------------------------------------------------------------------------


def test_unknown_kind() -> None:
    with pytest.raises(ScheduleParameterError, match="'foo'") as info:
        core.make_schedule("foo")
    assert "cosine" in str(info.value)  # says what is allowed
    assert info.value.exit_code == 2


@pytest.mark.parametrize("timesteps", [0, -1])
def test_timesteps_below_one(timesteps: int) -> None:
    with pytest.raises(ScheduleParameterError, match=f"T = {timesteps}"):
        core.make_schedule("linear", timesteps)


def test_unknown_parameter_names_what_is_allowed() -> None:
    with pytest.raises(ScheduleParameterError, match="'beta_stop'.*beta_start"):
        core.make_schedule("linear", beta_stop=0.1)


@pytest.mark.parametrize("value", [1.5, 0.0, -0.1])
def test_beta_parameter_outside_unit_interval(value: float) -> None:
    with pytest.raises(ScheduleParameterError, match=f"beta_end={value}"):
        core.make_schedule("linear", beta_end=value)


@pytest.mark.parametrize("bad", [1.5, 0.0, -0.1])
def test_custom_beta_outside_unit_interval(bad: float) -> None:
    with pytest.raises(ScheduleError, match=rf"beta\[1\] = {bad}") as info:
        core.schedule_from_betas([0.1, bad, 0.2])
    assert info.value.exit_code == 1  # from a file: a domain error


def test_custom_beta_one_before_the_end() -> None:
    with pytest.raises(ScheduleError, match=r"beta\[1\] = 1"):
        core.schedule_from_betas([0.1, 1.0, 0.2])


def test_nan_betas() -> None:
    with pytest.raises(ScheduleError, match="index 2 is nan"):
        core.schedule_from_betas([0.1, 0.2, math.nan])
    with pytest.raises(ScheduleError, match="inf"):
        core.schedule_from_alpha_bars([0.9, math.inf])


@pytest.mark.parametrize(
    ("values", "where"),
    [([0.9, 0.95, 0.5], r"index 1 \(0.9 -> 0.95\)"), ([0.9, 0.5, 0.5], r"index 2 \(0.5 -> 0.5\)")],
)
def test_alpha_bars_not_strictly_decreasing(values: list[float], where: str) -> None:
    with pytest.raises(ScheduleError, match=where):
        core.schedule_from_alpha_bars(values)


def test_alpha_bar_outside_range() -> None:
    with pytest.raises(ScheduleError, match="1.0"):
        core.schedule_from_alpha_bars([1.0, 0.5])
