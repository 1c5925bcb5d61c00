"""`ddpm nll`: the variational-bound terms against their closed form for Gaussian data with the
exact optimal denoiser, the subset estimate, streaming, and the command end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import gaussian_denoiser, tiny_mlp_checkpoint
from rowcheck import assert_row_close
from torch import Tensor

from ddpmcli import core
from ddpmcli.errors import UsageError
from ddpmcli.run import (
    BOUND_COLUMNS,
    bound_strata,
    choice_variance,
    random_strata,
    variational_bound,
)

MU, S, D = 0.5, 0.7, 2


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest


LN2 = math.log(2.0)


def closed_form_terms(betas: np.ndarray, variance: str) -> tuple[np.ndarray, float]:
    """Expected per-t terms (bits/dim) of the bound for x0 ~ N(MU, S^2 I) and the exact denoiser,
    derived here from the betas alone (numpy float64, not the core):

    q(x_{t-1}|x_t, x0) = N(c0 x0 + ct x_t, bt), p = N(c0 x0_hat + ct x_t, sig2), so
    KL = 1/2 [log(sig2/bt) + bt/sig2 - 1 + c0^2 (x0 - x0_hat)^2 / sig2], and with
    x0_hat = E[x0|x_t], E (x0 - x0_hat)^2 = Var[x0 | x_t] = S^2 (1 - ab)/(ab S^2 + 1 - ab).
    t = 0: c0 = 1, ct = 0, so -log N(x0; x0_hat, sig2) has expectation
    1/2 log(2 pi sig2) + Var[x0|x_0]/(2 sig2). Prior: KL(N(sqrt(ab_T) x0, 1 - ab_T) || N(0, 1))
    = 1/2 [-log(1 - ab_T) + (1 - ab_T) - 1 + ab_T E x0^2], E x0^2 = MU^2 + S^2.
    sig2: fixed_small bt (bt_1 at t = 0), fixed_large beta (bt_1 at t = 0).
    """
    ab = np.cumprod(1 - betas)
    ab_prev = np.concatenate([[1.0], ab[:-1]])
    bt = betas * (1 - ab_prev) / (1 - ab)
    c0 = np.sqrt(ab_prev) * betas / (1 - ab)
    post = S**2 * (1 - ab) / (ab * S**2 + 1 - ab)
    sig2 = bt.copy() if variance == "fixed_small" else betas.copy()
    sig2[0] = bt[1]
    bt_safe = np.where(bt > 0, bt, 1.0)  # bt_0 = 0: that term is replaced below
    terms = 0.5 * (np.log(sig2 / bt_safe) + bt_safe / sig2 - 1 + c0**2 * post / sig2)
    terms[0] = 0.5 * math.log(2 * math.pi * sig2[0]) + post[0] / (2 * sig2[0])
    prior = 0.5 * (-math.log(1 - ab[-1]) + (1 - ab[-1]) - 1 + ab[-1] * (MU**2 + S**2))
    return terms / LN2, prior / LN2


@pytest.fixture(scope="module")
def sched() -> core.Schedule:
    return core.make_schedule("linear", 40, beta_end=0.25)


@pytest.fixture(scope="module")
def x0() -> Tensor:
    return MU + S * torch.randn(
        3000, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_terms_match_the_gaussian_closed_form(sched, x0, variance) -> None:  # type: ignore[no-untyped-def]
    result = variational_bound(
        gaussian_denoiser(sched, MU, S), sched, "sample", x0, variance=variance, batch_size=4096
    )
    expect, prior = closed_form_terms(sched.beta.numpy(), variance)
    per_t = result.rows[: sched.num_steps]
    assert [r["term"] for r in per_t] == ["decoder_continuous"] + ["kl"] * (sched.num_steps - 1)
    # Monte Carlo over 2000 samples: each term within 5 of its standard errors (plus rounding)
    for row, want in zip(per_t, expect, strict=True):
        assert abs(row["bits_per_dim"] - want) < 5 * row["stderr"] + 1e-9, (row, want)
    prior_row, total_row = result.rows[-2], result.rows[-1]
    assert prior_row["term"] == "prior" and total_row["term"] == "total"
    assert abs(prior_row["bits_per_dim"] - prior) < 5 * prior_row["stderr"]
    exact_total = float(expect.sum()) + prior
    assert abs(total_row["bits_per_dim"] - exact_total) < 5 * total_row["stderr"]
    assert not result.estimate
    # x0_mse is the posterior variance of x0 given x_t
    ab = np.cumprod(1 - sched.beta.numpy())
    post = S**2 * (1 - ab) / (ab * S**2 + 1 - ab)
    for row, want in zip(per_t, post, strict=True):
        assert row["x0_mse"] == pytest.approx(want, rel=0.1)


def test_numbers_do_not_depend_on_the_batch_size(sched, x0) -> None:  # type: ignore[no-untyped-def]
    seen: list[int] = []
    model = gaussian_denoiser(sched, MU, S)

    def counting(x: Tensor, t: Tensor) -> tuple[Tensor, None]:
        seen.append(x.shape[0])
        return model(x, t)

    a = variational_bound(counting, sched, "sample", x0[:50], batch_size=37)
    b = variational_bound(model, sched, "sample", x0[:50], batch_size=2000)
    assert max(seen) <= 37  # streamed: never more than one chunk of pairs in flight
    for ra, rb in zip(a.rows, b.rows, strict=True):
        assert_row_close(ra, rb, rel=1e-12, abs=1e-15)


def test_subset_estimate_weights(sched, x0) -> None:  # type: ignore[no-untyped-def]
    weights = bound_strata(40, [0, 5, 20, 39])
    assert weights == {0: 1, 5: 12, 20: 17, 39: 10}  # 1..12, 13..29, 30..39
    assert sum(weights.values()) == 40
    result = variational_bound(
        gaussian_denoiser(sched, MU, S), sched, "sample", x0[:200], t_indices=[5, 20, 39]
    )
    assert [r["t"] for r in result.rows[:4]] == [0, 5, 20, 39]  # t = 0 always evaluated
    assert [r["weight"] for r in result.rows[:4]] == [1, 12, 17, 10]
    # a fixed subset gives the terms and the prior, but no total: its error is unknown
    assert result.estimate and result.rows[-1]["term"] == "prior" and len(result.rows) == 5
    assert result.total_bpd is None and result.per_sample_total is None


def test_random_strata_are_unbiased_and_paired() -> None:
    # E over the draw of sum_j w_j L_{t_j} equals sum_t L_t exactly: check by averaging
    # over many seeds for an arbitrary positive L (5 sd of the mean of 3000 draws).
    terms = np.exp(-np.arange(30) / 4.0) + 0.1
    draws, variances = [], []
    for seed in range(3000):
        strata = random_strata(30, 7, seed)
        assert strata.indices[0] == 0 and sum(strata.weights.values()) == pytest.approx(30)
        assert [len(d) for d, _ in strata.groups] == [2, 2, 2]
        assert sum(size for _, size in strata.groups) == 29
        draws.append(sum(strata.weights[i] * terms[i] for i in strata.indices))
        variances.append(choice_variance(strata.groups, {i: terms[i] for i in strata.indices}))
    values = np.array(draws)
    assert abs(values.mean() - terms.sum()) < 5 * values.std() / math.sqrt(len(values))
    # the variance estimate from the pairs is unbiased for the variance of the draw (exact
    # terms, no sampling noise here): within 10% over 3000 draws
    assert np.mean(variances) == pytest.approx(values.var(), rel=0.1)
    assert [len(d) for d, _ in random_strata(30, 8).groups] == [2, 2, 3]  # odd K-1: 3 in last
    with pytest.raises(UsageError):
        random_strata(30, 2)


def test_random_estimate_interval_covers_the_bound(sched, x0) -> None:  # type: ignore[no-untyped-def]
    # 12 seeded --t-random 9 estimates (9 of 40 t) for the exact denoiser on 3000 samples
    # against the bound's closed form (sum of the expected terms and the prior): each printed
    # ± (per-sample error and the choice of t) must cover the bound within 3 of them for at least
    # 11 of 12 seeds (a normal estimate misses 3 se with probability 0.27%; 11 of 12 allows one
    # unlucky seed). Equal strata failed this (5 of 12): L_1 is larger than the rest together,
    # and two draws from 1..10 mostly missed it, with a tiny spread (log-spaced strata now).
    terms, prior = closed_form_terms(sched.beta.numpy(), "fixed_small")
    bound = float(terms.sum() + prior)
    covered = 0
    for seed in range(12):
        est = variational_bound(
            gaussian_denoiser(sched, MU, S), sched, "sample", x0, strata=random_strata(40, 9, seed),
            seed=seed,
        )  # fmt: skip
        assert est.estimate and est.rows[-1]["term"] == "total_estimate"
        assert est.total_bpd is not None and est.total_stderr is not None
        assert est.per_sample_total is not None and est.per_sample_total.shape == (3000,)
        # the ± is at least the per-sample standard error: the choice of t only adds
        naive = float(est.per_sample_total.std()) / math.sqrt(3000)
        assert est.total_stderr >= naive * (1 - 1e-12)
        covered += abs(est.total_bpd - bound) <= 3 * est.total_stderr
    assert covered >= 11


def test_learned_range_needs_a_channel(sched, x0) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(UsageError, match="variance channel"):
        variational_bound(
            gaussian_denoiser(sched, MU, S), sched, "sample", x0[:4], variance="learned_range"
        )


def test_discretized_decoder_on_8bit_data() -> None:
    # A perfect x0 predictor (handed x0 through the closure) on 8-bit data: at t = 0 the model's
    # mean is x0 itself (c_xt = 0 there), its std sqrt(beta_tilde_1), so the decoder term is the
    # normal mass of the bin [x0 - 1/255, x0 + 1/255] (one side unbounded at 0 and 255):
    # -log2(2 Phi(h) - 1) inside, -log2(Phi(h)) at the edges, h = (1/255)/std.
    sched = core.make_schedule("linear", 10)
    levels = torch.randint(0, 256, (16, 3, 4, 4), generator=torch.Generator().manual_seed(0))
    levels[0, 0, 0, :2] = torch.tensor([0, 255])
    data = levels.double() / 127.5 - 1

    def oracle(x: Tensor, t: Tensor) -> tuple[Tensor, None]:
        return data[: x.shape[0]].to(x.dtype), None

    result = variational_bound(
        oracle, sched, "sample", data, t_indices=[0], decoder="discretized", batch_size=16,
        model_dtype=torch.float64,
    )  # fmt: skip
    row = result.rows[0]
    assert row["term"] == "decoder_discretized"
    betas = sched.beta.numpy()
    ab = np.cumprod(1 - betas)
    std = math.sqrt(betas[1] * (1 - ab[0]) / (1 - ab[1]))
    h = (1 / 255) / std
    phi = 0.5 * (1 + math.erf(h / math.sqrt(2)))
    edges = int(((levels == 0) | (levels == 255)).sum())
    want = (edges * -math.log2(phi) + (levels.numel() - edges) * -math.log2(2 * phi - 1)) / (
        levels.numel()
    )
    assert row["bits_per_dim"] == pytest.approx(want, rel=1e-9)


# ---------------------------------------------------------------------------------------------
# the command


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_mlp_checkpoint(tmp_path_factory.mktemp("nll") / "mlp.pt", 20, references=100)


def test_cli_rows_formats_and_note(cli, ckpt) -> None:  # type: ignore[no-untyped-def]
    result = cli("nll", str(ckpt), "--n", "16", "-f", "csv")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == ",".join(BOUND_COLUMNS)
    assert len(lines) == 1 + 20 + 2
    assert lines[1].startswith("0,decoder_continuous,")
    assert lines[-1].startswith(",total,")
    assert "continuous Gaussian density" in result.stderr and "bound:" in result.stderr
    rows = json.loads(cli("nll", str(ckpt), "--n", "16", "--batch-size", "7", "-f", "json").stdout)
    assert rows[-1]["term"] == "total" and rows[-1]["t"] is None
    assert rows[-2]["term"] == "prior" and rows[-2]["t"] is None  # not t = 19's label (issue 20)


def test_cli_fixed_subset_has_no_total(cli, ckpt) -> None:  # type: ignore[no-untyped-def]
    fixed = cli("nll", str(ckpt), "--n", "8", "--every", "5", "-f", "jsonl")
    assert fixed.exit_code == 0, fixed.stderr
    rows = [json.loads(line) for line in fixed.stdout.splitlines()]
    assert [r["t"] for r in rows[:-1]] == [0, 5, 10, 15]
    assert rows[-1]["term"] == "prior"  # no total_estimate row
    assert fixed.stderr.startswith("no total: a fixed subset of t")
    assert "--t-random K" in fixed.stderr and "(the default for vectors)" in fixed.stderr
    quiet = cli("nll", str(ckpt), "--n", "8", "--every", "5", "-f", "jsonl", "-q")
    assert quiet.stderr == ""
    refused = cli("nll", str(ckpt), "--n", "8", "--every", "5", "--per-sample")
    assert refused.exit_code == 2 and "--per-sample needs a total" in refused.stderr


def test_cli_random_subset_estimate_and_per_sample(cli, ckpt) -> None:  # type: ignore[no-untyped-def]
    rand = cli("nll", str(ckpt), "--n", "8", "--t-random", "7", "-f", "jsonl")
    assert rand.exit_code == 0, rand.stderr
    rows = [json.loads(line) for line in rand.stdout.splitlines()]
    assert rows[-1]["term"] == "total_estimate" and rows[0]["t"] == 0
    assert "estimated bound (± includes the choice of t)" in rand.stderr
    per = cli("nll", str(ckpt), "--n", "8", "--t-random", "7", "--per-sample", "-f", "json")
    assert per.exit_code == 0, per.stderr
    samples = json.loads(per.stdout)
    assert [r["sample"] for r in samples] == list(range(8))
    assert set(samples[0]) == {"sample", "bits_per_dim"}
    mean = sum(r["bits_per_dim"] for r in samples) / 8
    assert mean == pytest.approx(rows[-1]["bits_per_dim"], rel=1e-9)


def test_cli_tanh_decoder_is_named_and_close_to_the_exact_one(cli, ckpt) -> None:  # type: ignore[no-untyped-def]
    args = ("nll", str(ckpt), "--n", "8", "--t", "0", "-f", "json")
    exact = cli(*args, "--decoder", "discretized")
    tanh = cli(*args, "--decoder", "discretized_tanh")
    assert tanh.exit_code == 0, tanh.stderr
    a, b = json.loads(exact.stdout)[0], json.loads(tanh.stdout)[0]
    assert b["term"] == "decoder_discretized_tanh" and "tanh CDF" in tanh.stderr
    assert b["bits_per_dim"] != a["bits_per_dim"]
    assert b["bits_per_dim"] == pytest.approx(a["bits_per_dim"], rel=0.05)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--variance", "learned_range"], "needs a model with a variance channel"),
        (["--t", "3", "--every", "2"], "cannot be used together"),
        (["--t-random", "2"], "--t-random needs 3..20"),
        (["--t", "20"], "out of range"),
    ],
)
def test_cli_bad_input(cli, ckpt, args, message) -> None:  # type: ignore[no-untyped-def]
    result = cli("nll", str(ckpt), "--n", "4", *args, "-f", "csv")
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.startswith("Error: ") and message in result.stderr


# ---------------------------------------------------------------------------------------------
# failures mid-run (issue 7)


def test_cli_nan_term_keeps_the_finite_rows_and_exits_1(cli, hostile_programs) -> None:  # type: ignore[no-untyped-def]
    from conftest import HOSTILE_FLAGS

    result = cli("nll", hostile_programs["nan"], *HOSTILE_FLAGS, "--data", "moons", "--n", "4",
                 "-f", "csv")  # fmt: skip
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert lines[0] == ",".join(BOUND_COLUMNS)
    ts = [line.split(",")[0] for line in lines[1:]]
    assert ts == [str(t) for t in range(20) if t != 10] + [""]  # every finite t, the prior
    assert lines[-1].split(",")[1] == "prior" and "nan" not in result.stdout
    assert result.stderr.startswith(
        "Error: the bound's term is NaN/Inf at 1 of 20 timestep(s), first at t = 10"
    )
    assert result.stderr.count("\n") == 1


def test_cli_model_exception_is_one_line_naming_t(cli, hostile_programs) -> None:  # type: ignore[no-untyped-def]
    from conftest import HOSTILE_FLAGS

    result = cli("nll", hostile_programs["raise"], *HOSTILE_FLAGS, "--data", "moons", "--n", "4",
                 "--batch-size", "1", "-f", "csv")  # fmt: skip
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr == "Error: the model failed at t = 10: RuntimeError: boom at ten\n"


def test_library_names_parameters_and_the_cli_names_flags(cli, ckpt) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(UsageError, match=r"^t_random needs 3\.\.20"):
        random_strata(20, 1)
    result = cli("nll", str(ckpt), "--t-random", "1", "-f", "csv")
    assert result.exit_code == 2 and result.stderr.startswith("Error: --t-random needs 3..20")


def test_nonfinite_data_is_a_data_error() -> None:
    from ddpmcli.errors import DataError

    sched = core.make_schedule("linear", 20)
    x0 = torch.tensor([[1e6, 0.0]], dtype=torch.float64)

    def predict(x: Tensor, t: Tensor) -> tuple[Tensor, None]:
        return torch.zeros_like(x), None

    with pytest.raises(DataError, match="not finite in the model's dtype float16"):
        variational_bound(predict, sched, "epsilon", x0, model_dtype=torch.float16)


def test_cli_data_overflowing_the_model_dtype_is_named_as_data(cli, ckpt, tmp_path) -> None:  # type: ignore[no-untyped-def]
    big = tmp_path / "big.npy"
    np.save(big, np.array([[1e6, 0.0], [0.1, 0.2]]))
    result = cli("nll", str(ckpt), "--data", str(big), "--dtype", "float16", "-f", "csv")
    assert result.exit_code == 1 and result.stdout == ""
    # the data also lie outside the model's range and number fewer than --n: a warning and a note
    # come first, and the error is the one last line
    *before, last = result.stderr.splitlines()
    assert last.startswith("Error: the data: values up to 1e+06 are not finite in ")
    assert "model's dtype float16" in last
    assert len(before) == 2 and before[0].startswith("Warning: 25% of the values of ")
    assert before[1].endswith("; using all") and "Error" not in "".join(before)


def test_tanh_decoder_matches_improved_diffusions_definition() -> None:
    # improved-diffusion (losses.py): cdf(x) = 0.5 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))),
    # bin mass cdf((x - m + 1/255)/s) - cdf((x - m - 1/255)/s), edge bins one-sided, each log of
    # a value clamped at 1e-12. Evaluated here with numpy from that definition, then compared.
    x = np.array([-1.0, -0.5, 0.0, 0.25, 0.99, 1.0])
    m = np.array([-0.98, -0.49, 0.1, 0.25, 0.5, 0.97])
    log_s = np.log(np.array([0.01, 0.003, 0.05, 0.2, 0.01, 0.02]))

    def cdf(v: np.ndarray) -> np.ndarray:
        return 0.5 * (1 + np.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v**3)))

    up, lo = cdf((x - m + 1 / 255) / np.exp(log_s)), cdf((x - m - 1 / 255) / np.exp(log_s))
    want = np.where(
        x < -0.999,
        np.log(np.maximum(up, 1e-12)),
        np.where(x > 0.999, np.log(np.maximum(1 - lo, 1e-12)), np.log(np.maximum(up - lo, 1e-12))),
    )
    got = core.discretized_gaussian_log_likelihood_tanh(
        torch.tensor(x), torch.tensor(m), torch.tensor(log_s)
    )
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=0)
    exact = core.discretized_gaussian_log_likelihood(
        torch.tensor(x), torch.tensor(m), torch.tensor(log_s)
    )
    # the approximation is close to the exact CDF where the mass is not tiny (2e-4 abs in CDF)
    assert np.abs(np.exp(got.numpy()) - np.exp(exact.numpy())).max() < 1e-3
    assert core.approx_standard_normal_cdf(torch.tensor(0.0)).item() == 0.5
