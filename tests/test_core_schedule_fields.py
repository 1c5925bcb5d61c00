"""Every per-t quantity of a Schedule is a stored field that take() and to() map.

A property over EVERY tensor field (found by introspection, so a field added later is covered
without editing this file), and regression tests for the two bugs of a derived property that
take() did not map (issue 11): fixed_large's log variance and the prior term on a taken table.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ddpmcli import core
from ddpmcli.core.schedule import per_t_fields, tensor_fields

SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)


@st.composite
def schedules(draw: st.DrawFn) -> core.Schedule:
    kind = draw(st.sampled_from(sorted(core.SCHEDULE_KINDS)))
    n = draw(st.integers(max(2, core.SCHEDULE_KINDS[kind].min_timesteps), 300))
    zsnr = draw(st.booleans()) and core.SCHEDULE_KINDS[kind].path == "vp"  # VP-only transform
    s = core.make_schedule(kind, n, zero_terminal_snr=zsnr)
    if draw(st.booleans()):
        kept = draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=40, unique=True))
        s = core.respace(s, kept)
    return s


def test_the_field_lists_cover_every_tensor_of_a_schedule() -> None:
    s = core.make_schedule("cosine", 50)
    tensors = {k for k, v in vars(s).items() if isinstance(v, torch.Tensor)}
    assert set(tensor_fields()) == tensors
    assert set(tensor_fields()) - set(per_t_fields()) == {
        "prior_sqrt_alpha_bar",
        "prior_one_minus_alpha_bar",
        "prior_alpha_t",
        "prior_sigma_t",
    }
    for name in per_t_fields():
        assert getattr(s, name).shape == (50,), name
    for name in set(tensor_fields()) - set(per_t_fields()):
        assert getattr(s, name).shape == (), name
    # no per-t quantity hides in a property (recomputed per call, missed by take and to)
    properties = {k for k, v in vars(core.Schedule).items() if isinstance(v, property)}
    assert properties == {"num_steps"}
    assert set(core.QUANTITIES) <= set(per_t_fields())


@SETTINGS
@given(schedules(), st.data())
def test_take_indexes_every_per_t_field_and_keeps_the_rest(
    s: core.Schedule, data: st.DataObject
) -> None:
    ts = data.draw(st.lists(st.integers(0, s.num_steps - 1), min_size=1, max_size=20))
    taken = s.take(ts)
    idx = torch.tensor(ts)
    assert taken.num_steps == len(ts)
    for name in per_t_fields():
        assert torch.equal(getattr(taken, name), getattr(s, name)[idx]), name
    for name in set(tensor_fields()) - set(per_t_fields()):
        assert torch.equal(getattr(taken, name), getattr(s, name)), name
    assert (taken.name, taken.spec, taken.num_train_timesteps) == (
        s.name,
        s.spec,
        s.num_train_timesteps,
    )


@SETTINGS
@given(schedules(), st.sampled_from([None, torch.float32, torch.float64]))
def test_to_keeps_every_field(s: core.Schedule, dtype: torch.dtype | None) -> None:
    moved = s.to("cpu", dtype)
    for name in tensor_fields():
        before, after = getattr(s, name), getattr(moved, name)
        if before.is_floating_point():
            assert after.dtype == (dtype or torch.float64), name
            assert torch.equal(after, before.to(after.dtype)), name
        else:  # the integer fields (timesteps, index) are never cast
            assert after.dtype == torch.long and torch.equal(after, before), name


def _linear_beta(i: int, n: int = 1000) -> float:
    # diffusers' linear: linspace(1e-4, 0.02, T), computed here independently of torch
    return 1e-4 + i * (0.02 - 1e-4) / (n - 1)


def test_fixed_large_on_a_taken_table_regression() -> None:
    # issue 11: position 0 gave log beta_tilde_1 = -4.0158 (index 0's special value) where index
    # 500's log beta = log(0.010060...) = -4.5992 is right.
    s = core.make_schedule("linear")
    t = torch.tensor([0, 1])
    got = s.take([500, 900]).model_log_variance(
        "fixed_large", t, torch.zeros(2, dtype=torch.float64)
    )
    want = [math.log(_linear_beta(500)), math.log(_linear_beta(900))]
    assert got.tolist() == pytest.approx(want, rel=1e-12)
    assert got[0].item() == pytest.approx(-4.5992, abs=5e-5)
    # and index 0 itself keeps improved-diffusion's value log beta_tilde_1, wherever it sits
    b0, b1 = _linear_beta(0), _linear_beta(1)
    beta_tilde_1 = (1 - (1 - b0)) / (1 - (1 - b0) * (1 - b1)) * b1
    got0 = s.take([7, 0]).model_log_variance("fixed_large", t, torch.zeros(2, dtype=torch.float64))
    assert got0[1].item() == pytest.approx(math.log(beta_tilde_1), rel=1e-10)


def test_prior_kl_on_a_taken_table_regression() -> None:
    # issue 11: prior_kl read the table's last position, not the schedule's last step.
    s = core.make_schedule("linear")
    log_ab_last = math.fsum(math.log1p(-_linear_beta(i)) for i in range(1000))
    ab, om = math.exp(log_ab_last), -math.expm1(log_ab_last)
    x0 = torch.tensor([[0.5, -1.0], [2.0, 0.0]], dtype=torch.float64)
    # KL(N(sqrt(ab) x, om) || N(0, 1)) = 0.5 (om - 1 - log om + ab x^2)
    want = [[0.5 * (om - 1 - math.log(om) + ab * x * x) for x in row] for row in x0.tolist()]
    for table in (s, s.take([500, 900]), s.take([999, 3])):
        assert table.prior_kl(x0).tolist() == [pytest.approx(r, rel=1e-9, abs=1e-18) for r in want]
        assert table.prior_kl_bits_per_dim_unit_variance() == pytest.approx(
            -math.log(om) / (2 * math.log(2)), rel=1e-12
        )


def test_ancestral_step_on_a_taken_table_adds_noise_by_index_not_position() -> None:
    s = core.make_schedule("linear", 100)
    x_t = torch.zeros(2, 3, dtype=torch.float64)
    x0 = torch.zeros_like(x_t)
    noise = torch.ones_like(x_t)
    log_var = torch.zeros_like(x_t)  # unit variance: the noise passes through as is
    out = s.take([50, 0]).ancestral_step(x_t, torch.tensor([0, 1]), x0, log_var, noise)
    assert out.tolist() == [[1.0] * 3, [0.0] * 3]  # index 50 is noised, index 0 is not
