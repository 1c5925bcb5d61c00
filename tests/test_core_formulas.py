"""The formulas the loops share, now in the core (issue 11): vb_terms, the per-t sampler variance
tables, the DDIM sigma^2, the expected std of x_t, the variance ratio and dynamic thresholding.

Each is checked against an independent computation in plain Python floats (math, numpy) from the
definitions in Ho et al. 2020, Nichol & Dhariwal 2021, Song et al. 2021 and Saharia et al. 2022,
not against the core's own helpers; and against the loops' current code, so that moving a loop onto
the core keeps its numbers.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from ddpmcli import core
from ddpmcli.errors import ScheduleParameterError, UsageError

F64 = torch.float64
T = 12


def _betas(n: int = T) -> list[float]:
    # diffusers' linear: linspace(1e-4, 0.02, T), computed without torch
    return [1e-4 + i * (0.02 - 1e-4) / (n - 1) for i in range(n)]


def _reference(n: int = T) -> dict[str, list[float]]:
    """alpha_bar, alpha_bar_prev, beta_tilde (0 at index 0) from the definitions."""
    beta = _betas(n)
    ab, prod = [], 1.0
    for b in beta:
        prod *= 1 - b
        ab.append(prod)
    ab_prev = [1.0, *ab[:-1]]
    tilde = [(1 - ap) / (1 - a) * b for a, ap, b in zip(ab, ab_prev, beta, strict=True)]
    return {"beta": beta, "ab": ab, "ab_prev": ab_prev, "tilde": tilde}


@pytest.fixture(scope="module")
def sched() -> core.Schedule:
    return core.make_schedule("linear", T)


# ---- per-t tables --------------------------------------------------------------------------


def test_sampler_log_variance_tables(sched: core.Schedule) -> None:
    ref = _reference()
    small = [math.log(ref["tilde"][1]), *map(math.log, ref["tilde"][1:])]
    large = [math.log(ref["tilde"][1]), *map(math.log, ref["beta"][1:])]
    assert sched.sampler_log_variance("fixed_small").tolist() == pytest.approx(small, rel=1e-12)
    assert sched.sampler_log_variance("fixed_large").tolist() == pytest.approx(large, rel=1e-12)
    # learned_range: v = -1 is fixed_small, v = 1 is log beta (log beta_0 at index 0: no clip)
    lo = sched.sampler_log_variance("learned_range", torch.tensor(-1.0))
    hi = sched.sampler_log_variance("learned_range", torch.full((T,), 1.0))
    assert lo.tolist() == pytest.approx(small, rel=1e-12)
    assert hi.tolist() == pytest.approx([math.log(b) for b in ref["beta"]], rel=1e-12)
    v = torch.linspace(-1, 1, T, dtype=F64)
    mid = sched.sampler_log_variance("learned_range", v)
    want = [
        (vi + 1) / 2 * math.log(b) + (1 - vi) / 2 * s
        for vi, b, s in zip(v.tolist(), ref["beta"], small, strict=True)
    ]
    assert mid.tolist() == pytest.approx(want, rel=1e-12)


def test_sampler_log_variance_is_the_per_sample_api_as_a_table(sched: core.Schedule) -> None:
    idx = torch.arange(T)
    like = torch.zeros(T, 2, dtype=F64)
    for kind in ("fixed_small", "fixed_large"):
        per_sample = sched.model_log_variance(kind, idx, like)[:, 0]
        assert torch.equal(sched.sampler_log_variance(kind), per_sample), kind
    v = torch.linspace(-1, 1, T, dtype=F64)
    per_sample = sched.model_log_variance("learned_range", idx, like, v[:, None].expand(T, 2))
    assert torch.equal(sched.sampler_log_variance("learned_range", v), per_sample[:, 0])


def test_sampler_log_variance_refuses_bad_choices(sched: core.Schedule) -> None:
    with pytest.raises(ScheduleParameterError, match="learned_range needs"):
        sched.sampler_log_variance("learned_range")
    with pytest.raises(ScheduleParameterError, match="unknown variance type 'big'"):
        sched.sampler_log_variance("big")


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_variance_is_song_et_al_sigma_squared(sched: core.Schedule, eta: float) -> None:
    ref = _reference()
    # Song et al. 2021 eq. 16: sigma^2 = eta^2 (1 - a_prev)/(1 - a) (1 - a/a_prev)
    want = [
        eta**2 * (1 - ap) / (1 - a) * (1 - a / ap)
        for a, ap in zip(ref["ab"], ref["ab_prev"], strict=True)
    ]
    got = sched.ddim_variance(eta)
    assert got.dtype == F64
    assert got.tolist() == pytest.approx(want, rel=1e-9, abs=1e-300)


def test_ddim_variance_refuses_negative_eta(sched: core.Schedule) -> None:
    with pytest.raises(ScheduleParameterError, match="eta must be finite and >= 0, got -1"):
        sched.ddim_variance(-1.0)


def test_ddim_step_draws_the_table_variance(sched: core.Schedule) -> None:
    # x0 = 0 and eps = 0 leave only sigma z: the step's noise scale is sqrt(ddim_variance)
    t = torch.arange(T)
    zeros = torch.zeros(T, 1, dtype=F64)
    out = sched.ddim_step(zeros, t, zeros, zeros, 0.7, torch.ones(T, 1, dtype=F64))
    assert torch.equal(out[:, 0], sched.ddim_variance(0.7).sqrt())


def test_expected_xt_std_table_and_monte_carlo(sched: core.Schedule) -> None:
    ref = _reference()
    for var in (1.0, 0.25):
        want = [math.sqrt(a * var + 1 - a) for a in ref["ab"]]
        assert sched.expected_xt_std(var).tolist() == pytest.approx(want, rel=1e-14)
    # and it is the std q_sample gives: data of std 0.5 at the last index
    g = torch.Generator().manual_seed(0)
    x0 = 0.5 * torch.randn(200_000, 1, generator=g, dtype=F64)
    t = torch.full((x0.shape[0],), T - 1)
    x_t = sched.q_sample(x0, t, torch.randn(x0.shape, generator=g, dtype=F64))
    assert float(x_t.std()) == pytest.approx(float(sched.expected_xt_std(0.25)[-1]), rel=1e-2)


def test_variance_ratio_is_beta_tilde_over_beta(sched: core.Schedule) -> None:
    ref = _reference()
    want = [tl / b for tl, b in zip(ref["tilde"], ref["beta"], strict=True)]
    assert sched.variance_ratio.tolist() == pytest.approx(want, rel=1e-12)
    assert sched.variance_ratio[0].item() == 0.0


# ---- vb_terms -------------------------------------------------------------------------------


def _normal_kl(m1: float, v1: float, m2: float, v2: float) -> float:
    return 0.5 * (math.log(v2 / v1) + v1 / v2 + (m1 - m2) ** 2 / v2 - 1)


def _ndtr(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2))


def _tanh_cdf(x: float) -> float:
    """improved-diffusion's approx_standard_normal_cdf (losses.py)."""
    return 0.5 * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _bin_nll(x: float, mean: float, std: float, cdf: Any = _ndtr) -> float:
    """-log P(x) of an 8-bit value x on [-1, 1] (Ho et al. 2020 eq. 13) under the normal ``cdf``."""
    upper = cdf((x - mean + 1 / 255) / std) if x < 0.999 else 1.0
    lower = cdf((x - mean - 1 / 255) / std) if x > -0.999 else 0.0
    return -math.log(upper - lower)


def _batch(sched: core.Schedule) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(3)
    t = torch.tensor([0, 1, 5, T - 1, 0])
    # x0 on the 8-bit grid of [0, 1] (the discretized decoder's bins once mapped to [-1, 1])
    x0 = torch.randint(0, 256, (5, 2, 3), generator=g).to(F64) / 255
    x_t = sched.q_sample(x0, t, torch.randn(x0.shape, generator=g, dtype=F64))
    mean = x0 + 0.01 * torch.randn(x0.shape, generator=g, dtype=F64)
    log_var = torch.log(torch.rand(x0.shape, generator=g, dtype=F64) * 1e-3 + 1e-5)
    return x0, x_t, t, mean, log_var


@pytest.mark.parametrize("decoder", core.DECODERS)
def test_vb_terms_against_the_definitions(sched: core.Schedule, decoder: str) -> None:
    ref = _reference()
    x0, x_t, t, mean, log_var = _batch(sched)
    got_bits = core.vb_terms(
        sched, x0, x_t, t, mean, log_var, decoder=decoder, data_range=(0.0, 1.0)
    )
    got_nats = core.vb_terms(
        sched, x0, x_t, t, mean, log_var, decoder=decoder, data_range=(0.0, 1.0), bits=False
    )
    for b, ti in enumerate(t.tolist()):
        terms = []
        for x, xt, m, lv in zip(
            x0[b].flatten().tolist(),
            x_t[b].flatten().tolist(),
            mean[b].flatten().tolist(),
            log_var[b].flatten().tolist(),
            strict=True,
        ):
            var = math.exp(lv)
            if ti == 0 and decoder == "continuous":
                terms.append(0.5 * math.log(2 * math.pi * var) + (x - m) ** 2 / (2 * var))
            elif ti == 0:  # data_range (0, 1) mapped to [-1, 1]: x' = 2x - 1, std' = 2 std
                cdf = _tanh_cdf if decoder == "discretized_tanh" else _ndtr
                terms.append(_bin_nll(2 * x - 1, 2 * m - 1, 2 * math.sqrt(var), cdf))
            else:
                a, ap, beta = ref["ab"][ti], ref["ab_prev"][ti], ref["beta"][ti]
                true_mean = (
                    math.sqrt(ap) * beta / (1 - a) * x
                    + math.sqrt(1 - beta) * (1 - ap) / (1 - a) * xt
                )
                terms.append(_normal_kl(true_mean, ref["tilde"][ti], m, var))
        want = sum(terms) / len(terms)
        assert got_nats[b].item() == pytest.approx(want, rel=1e-9), (b, ti)
        assert got_bits[b].item() == pytest.approx(want / math.log(2), rel=1e-9), (b, ti)


def test_vb_terms_is_what_training_computes(sched: core.Schedule) -> None:
    from ddpmcli import training

    x0, x_t, t, _, _ = _batch(sched)
    g = torch.Generator().manual_seed(5)
    pred = torch.randn(x0.shape, generator=g, dtype=F64)
    v = torch.rand(x0.shape, generator=g, dtype=F64) * 2 - 1
    x0_hat = sched.predict_x0(pred, x_t, t, "epsilon")
    model_mean = sched.posterior_mean(x0_hat, x_t, t)
    log_var = sched.model_log_variance("learned_range", t, x_t, v)
    got = core.vb_terms(sched, x0, x_t, t, model_mean, log_var)
    want = training.vlb_term(sched, x0, x_t, t, pred, v, "epsilon")
    torch.testing.assert_close(got, want, rtol=1e-13, atol=0)


def test_vb_terms_refuses_an_unknown_decoder(sched: core.Schedule) -> None:
    x0, x_t, t, mean, log_var = _batch(sched)
    with pytest.raises(ScheduleParameterError, match="unknown decoder 'gauss'; allowed: discre"):
        core.vb_terms(sched, x0, x_t, t, mean, log_var, decoder="gauss")


# ---- dynamic thresholding -------------------------------------------------------------------


def _threshold_reference(x0: np.ndarray, p: float, lo: float, hi: float) -> np.ndarray:
    center, half = (lo + hi) / 2, (hi - lo) / 2
    out = np.empty_like(x0)
    for i, sample in enumerate(x0):
        z = (sample - center) / half
        s = max(float(np.quantile(np.abs(z).astype(np.float32), p)), 1.0)
        out[i] = np.clip(z, -s, s) / s * half + center
    return out


@pytest.mark.parametrize(("p", "data_range"), [(0.995, (-1.0, 1.0)), (0.9, (0.0, 1.0))])
def test_dynamic_threshold_against_numpy(p: float, data_range: tuple[float, float]) -> None:
    g = torch.Generator().manual_seed(1)
    x0 = (
        torch.randn(4, 3, 8, 8, generator=g, dtype=F64)
        * torch.tensor([0.2, 1.0, 3.0, 10.0])[:, None, None, None]
    )
    got = core.dynamic_threshold(x0, p, data_range)
    want = _threshold_reference(x0.numpy(), p, *data_range)
    # s is a float32 quantile (~1e-7 relative), and adding the range's centre back turns that
    # into ~1e-7 absolute
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-6)
    if data_range == (-1.0, 1.0):
        assert torch.equal(got[0], x0[0])  # already inside [-1, 1]: s = 1 leaves it untouched
    assert float(got.abs().max()) <= max(abs(data_range[0]), abs(data_range[1])) + 1e-12


def test_the_sampler_thresholds_with_the_core_function() -> None:
    # one home for the formula: the loops use the core's function, not a copy
    from ddpmcli.run import samplers

    assert samplers.dynamic_threshold is core.dynamic_threshold


@pytest.mark.parametrize("p", [0.0, 1.0, -0.5, 1.5])
def test_dynamic_threshold_refuses_a_percentile_outside_the_unit_interval(p: float) -> None:
    with pytest.raises(UsageError, match=f"percentile must lie in \\(0, 1\\), got {p}"):
        core.dynamic_threshold(torch.zeros(1, 3), p)
