"""`ddpm nll --method ode|both`: the probability-flow ODE's log-likelihood against the exact
density of Gaussian data under its exact denoiser (VP, flow and sigma-space paths), exact
divergence against Hutchinson, the path conversions against the core's, k-diffusion's own
``log_likelihood``, dequantization, and the command end to end (bad input, the cap, torchrun)."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import k_diffusion_sampling as _k_diffusion_sampling
from conftest import tiny_mlp_checkpoint
from torch import Tensor

import ddpmcli
from ddpmcli import core
from ddpmcli.core import ode_path
from ddpmcli.errors import ParameterError
from ddpmcli.run.ode_likelihood import (
    OdeGeometry,
    OdeSettings,
    SolveCapped,
    ode_likelihood,
)

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
MU = torch.tensor([0.3, -0.2], dtype=F64)
COV = torch.tensor([[0.30, 0.12], [0.12, 0.20]], dtype=F64)  # not diagonal: Hutchinson has spread
TOL = 1e-6
BOUND = 20 * TOL
"""Stated bound: at rtol = atol = TOL, each sample's log-density (nats) is within 20 TOL of the
exact one (measured: 0.5-5 TOL on these paths)."""


def _schedule(kind: str) -> core.Schedule:
    return core.make_schedule(kind, 200)


def _marginal(geo: OdeGeometry, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """x_rho ~ N(alpha MU, alpha^2 COV + sigma^2 I), per row: (means [b, 2], covariances)."""
    a, s = alpha.reshape(-1, 1, 1), sigma.reshape(-1, 1, 1)
    return alpha[:, None] * MU, a**2 * COV + s**2 * torch.eye(2, dtype=F64)


def exact_model(geo: OdeGeometry, kind: str = "sample"):  # noqa: ANN201 - a test model
    """E[x0 | x_t] of x0 ~ N(MU, COV), called like a network with float model timesteps:
    x0 = MU + a COV (a^2 COV + s^2 I)^-1 (x - a MU), as ``sample`` or ``flow`` output."""

    def predict(x: Tensor, t: Tensor, sample_index: Tensor | None = None) -> Tensor:
        alpha, sigma = geo.at_timesteps(t.double().cpu())
        mean, cov = _marginal(geo, alpha, sigma)
        gain = alpha[:, None, None] * COV @ torch.linalg.inv(cov)
        x0 = MU + (gain @ (x.double() - mean)[:, :, None])[:, :, 0]
        if kind == "flow":  # v = eps - x0, eps = (x - alpha x0)/sigma
            return (x.double() - alpha[:, None] * x0) / sigma[:, None] - x0
        return x0

    return predict


def _log_density(x: Tensor, mean: Tensor, cov: Tensor) -> Tensor:
    return torch.distributions.MultivariateNormal(mean, cov).log_prob(x)


def _data(n: int = 5, seed: int = 1) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    chol = torch.linalg.cholesky(COV)
    return MU + torch.randn(n, 2, generator=gen, dtype=F64) @ chol.T


def _ends(geo: OdeGeometry, rho: float) -> tuple[Tensor, Tensor]:
    a, s, _, _ = ode_path.path_coefficients(geo.path, torch.tensor([rho], dtype=F64))
    return a, s


@pytest.mark.parametrize("kind", ["linear", "flow", "edm_sigma"])
@pytest.mark.parametrize("exact", [True, False], ids=["exact", "hutchinson"])
def test_ode_gives_the_exact_gaussian_log_density(kind: str, exact: bool) -> None:
    sched = _schedule(kind)
    geo = OdeGeometry.of(sched)
    x = _data()
    # Gaussian probes: in 2-D, a few Rademacher probes can all give the same estimate (u1 u2 =
    # +-1), a spread of 0 that says nothing
    s = OdeSettings(exact_divergence=exact, probes=8, probe_kind="gaussian", rtol=TOL, atol=TOL)
    r = ode_likelihood(exact_model(geo), sched, "sample", x, settings=s, model_dtype=F64)
    # log p_eps(x) = log p_T(x_T) + int div: the divergence integral against the two exact
    # marginal densities at the ends (the data start at the first entry, x_T where it ended)
    mean0, cov0 = _marginal(geo, *_ends(geo, float(geo.rho[0])))
    mean1, cov1 = _marginal(geo, *_ends(geo, float(geo.rho[-1])))
    want = _log_density(x, mean0, cov0) - _log_density(r.latent, mean1, cov1)
    # Hutchinson: within 4 of its own probe standard errors (nats) of the same number
    spread = 0.0 if exact else 4 * r.probe_var.sqrt() * 2 * math.log(2)
    assert ((r.delta - want).abs() <= BOUND + spread).all(), (r.delta - want).abs().max()
    if not exact:
        assert (r.probe_var > 0).any()
        return
    if kind == "flow":  # alpha_T = 0: the prior N(0, I) is exactly p_T, so log p is exact
        assert (r.logp - _log_density(x, mean0, cov0)).abs().max() <= BOUND
    assert r.status == ["ok"] * 5 and (r.evals > 0).all()


def test_a_flow_model_is_called_in_its_own_prediction_type() -> None:
    sched = _schedule("flow")
    geo = OdeGeometry.of(sched)
    x = _data(3)
    s = OdeSettings(exact_divergence=True, rtol=TOL, atol=TOL)
    by_v = ode_likelihood(exact_model(geo, "flow"), sched, "flow", x, settings=s, model_dtype=F64)
    by_x0 = ode_likelihood(exact_model(geo), sched, "sample", x, settings=s, model_dtype=F64)
    assert torch.allclose(by_v.logp, by_x0.logp, atol=BOUND, rtol=0)


def test_hutchinson_agrees_with_the_exact_divergence_within_its_probe_error() -> None:
    sched = _schedule("linear")
    geo = OdeGeometry.of(sched)
    x = _data(4)
    exact = ode_likelihood(
        exact_model(geo), sched, "sample", x, model_dtype=F64,
        settings=OdeSettings(exact_divergence=True, rtol=TOL, atol=TOL),
    )  # fmt: skip
    for kind in ("rademacher", "gaussian"):
        s = OdeSettings(probes=16, probe_kind=kind, rtol=TOL, atol=TOL, seed=3)  # type: ignore[arg-type]
        est = ode_likelihood(exact_model(geo), sched, "sample", x, settings=s, model_dtype=F64)
        se = est.probe_var.sqrt()
        assert (se > 0).all()  # COV is not diagonal: one probe's estimate has spread
        diff = (est.bits_per_dim - exact.bits_per_dim).abs()
        assert (diff <= 4 * se + 1e-5).all(), (diff, se)
        assert est.probe_stderr is not None and est.total_stderr is not None
        assert abs(est.total_bpd - exact.total_bpd) <= 4 * est.probe_stderr + 1e-5  # type: ignore[operator]


@pytest.mark.parametrize("kind", ["linear", "flow", "edm_sigma"])
def test_the_ode_conversions_are_the_cores_at_the_entries(kind: str) -> None:
    sched = _schedule(kind)
    idx = torch.tensor([0, 57, 199])
    alpha, sigma = sched.alpha_t[idx][:, None], sched.sigma_t[idx][:, None]
    gen = torch.Generator().manual_seed(0)
    x, out = (
        torch.randn(3, 2, generator=gen, dtype=F64),
        torch.randn(3, 2, generator=gen, dtype=F64),
    )
    kinds = ["epsilon", "sample", "v_prediction", "flow"]
    for pred in kinds if kind != "flow" else ["sample", "v_prediction", "flow"]:
        x0, eps = ode_path.prediction_to_x0_eps(out, x, alpha, sigma, pred)
        assert torch.allclose(x0, sched.predict_x0(out, x, idx, pred), rtol=1e-12, atol=1e-12)
        assert torch.allclose(eps, sched.predict_eps(out, x, idx, pred), rtol=1e-12, atol=1e-12)
    # the closed forms in rho pass through every entry
    geo = OdeGeometry.of(sched)
    a, s, da, ds = ode_path.path_coefficients(geo.path, geo.rho)
    assert torch.allclose(a, sched.alpha_t, rtol=1e-12) and torch.allclose(
        s, sched.sigma_t, rtol=1e-10
    )
    # derivatives against a central difference
    r = torch.tensor([0.2, 0.5, 0.7], dtype=F64)
    h = 1e-6
    up, down = (
        ode_path.path_coefficients(geo.path, r + h),
        ode_path.path_coefficients(geo.path, r - h),
    )
    a, s, da, ds = ode_path.path_coefficients(geo.path, r)
    assert torch.allclose(da, (up[0] - down[0]) / (2 * h), rtol=1e-7, atol=1e-9)
    assert torch.allclose(ds, (up[1] - down[1]) / (2 * h), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("kind", ["linear", "flow", "edm_sigma"])
def test_float_timesteps_interpolate_in_log_snr_through_the_entries(kind: str) -> None:
    sched = _schedule(kind)
    geo = OdeGeometry.of(sched)
    assert torch.allclose(geo.timestep_at(geo.rho), sched.model_timestep, rtol=0, atol=1e-9)
    # half way in log-SNR between entries 10 and 11 is half way between their timesteps
    lam = 0.5 * (sched.log_snr[10] + sched.log_snr[11])
    mid = geo.timestep_at(ode_path.rho_of_log_snr(lam).reshape(1))
    want = 0.5 * (sched.model_timestep[10] + sched.model_timestep[11])
    assert torch.allclose(mid, want.reshape(1), atol=1e-9)
    t = torch.linspace(
        float(sched.model_timestep[0]), float(sched.model_timestep[-2]), 37, dtype=F64
    )
    assert torch.allclose(geo.timestep_at(geo.rho_at_timesteps(t)), t, atol=1e-8)


def test_rows_do_not_depend_on_the_chunking() -> None:
    sched = _schedule("linear")
    geo = OdeGeometry.of(sched)
    x = _data(7)
    runs = [
        ode_likelihood(
            exact_model(geo),
            sched,
            "sample",
            x,
            model_dtype=F64,
            settings=OdeSettings(probes=2, rtol=1e-5, atol=1e-5, batch_size=b),
        )  # fmt: skip
        for b in (3, 7)
    ]
    assert torch.allclose(runs[0].logp, runs[1].logp, rtol=0, atol=1e-12)
    assert torch.equal(runs[0].evals, runs[1].evals)


def test_uniform_dequantization_adds_the_offset_and_stays_in_the_bins() -> None:
    sched = _schedule("linear")
    geo = OdeGeometry.of(sched)
    levels = torch.tensor([[0, 255], [128, 7], [64, 200]], dtype=F64)
    x = -1.0 + 2.0 * levels / 255.0
    s = OdeSettings(exact_divergence=True, rtol=1e-5, atol=1e-5, dequantization="uniform")
    r = ode_likelihood(exact_model(geo), sched, "sample", x, settings=s, model_dtype=F64)
    assert r.convention == "ode_dequantized" and "+log2(256/2) = 7 bits/dim" in r.description
    assert torch.allclose(r.bits_per_dim, -r.logp / (2 * math.log(2)) + 7.0, rtol=0, atol=1e-12)
    with pytest.raises(ParameterError, match="8-bit"):
        ode_likelihood(exact_model(geo), sched, "sample", _data(2), settings=s, model_dtype=F64)


def test_bad_settings_are_refused_before_any_work() -> None:
    with pytest.raises(ParameterError, match="probes"):
        OdeSettings(probes=0).check(2)
    with pytest.raises(ParameterError, match="rtol"):
        OdeSettings(rtol=0.0).check(2)
    with pytest.raises(ParameterError, match="256 values per sample, the limit is 64"):
        OdeSettings(exact_divergence=True).check(256)


def test_a_solve_at_its_cap_is_a_row_that_says_so() -> None:
    sched = _schedule("linear")
    geo = OdeGeometry.of(sched)
    s = OdeSettings(exact_divergence=True, rtol=1e-10, atol=1e-10, max_evals=20)
    with pytest.raises(SolveCapped) as info:
        ode_likelihood(exact_model(geo), sched, "sample", _data(2), settings=s, model_dtype=F64)
    rows = info.value.rows
    assert [r["status"] for r in rows[:2]] == ["capped at 20 evals"] * 2
    assert rows[0]["bits_per_dim"] is None and rows[-1]["bits_per_dim"] is None


# ---------------------------------------------------------------------------------------------
# k-diffusion's own log_likelihood on the same network and data


def test_k_diffusion_log_likelihood_agrees(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kd = _k_diffusion_sampling(monkeypatch)
    model = ddpmcli.load(tiny_mlp_checkpoint(tmp_path / "m.pt", 50, seed=4), dtype="float64")
    sched = model.schedule
    geo = OdeGeometry.of(sched)
    x = _data(3, seed=5) * 0.5
    s = OdeSettings(probes=1, rtol=1e-7, atol=1e-7, seed=9)
    mine = ode_likelihood(model.predict, sched, "epsilon", x, settings=s, model_dtype=F64)

    def denoiser(z: Tensor, sigma: Tensor) -> Tensor:  # k-diffusion's D(z, sigma), alpha = 1 space
        rho = sigma / (1 + sigma)
        alpha, sig, _, _ = ode_path.path_coefficients("vp", rho)
        out, _ = model.predict(z * alpha[:, None], geo.timestep_at(rho))
        return ode_path.prediction_to_x0_eps(
            out, z * alpha[:, None], alpha[:, None], sig[:, None], "epsilon"
        )[0]

    a0, _ = _ends(geo, float(geo.rho[0]))
    at, st = _ends(geo, float(geo.rho[-1]))
    sigma_min, sigma_max = float(geo.rho[0] / (1 - geo.rho[0])), float(st / at)
    from ddpmcli.run.ode_likelihood import _probes

    probe = _probes(s, 0, 3, 2)[:, 0].reshape(3, 2)  # the same Rademacher probe as ours
    monkeypatch.setattr(torch, "randint_like", lambda like, high: (probe + 1) / 2)
    ll, info = kd.log_likelihood(denoiser, x / a0, sigma_min, sigma_max, atol=1e-7, rtol=1e-7)
    # units: theirs is log p of z = x/alpha at sigma_min with prior N(0, sigma_max^2) on
    # z_T = x_T/alpha_T; ours is log p of x with prior N(0, I) on x_T. The divergence integrals
    # differ by D (log alpha_T - log alpha_eps) (z = x/alpha), and their latent is ours / alpha_T
    theirs_delta = ll - torch.distributions.Normal(0, sigma_max).log_prob(mine.latent / at).sum(1)
    want = theirs_delta + 2 * (math.log(float(at)) - math.log(float(a0)))
    # both solvers at tol 1e-7; measured 3.1e-6 nats apart (torchdiffeq's batch-shared step)
    assert torch.allclose(mine.delta, want, rtol=0, atol=1e-5), (mine.delta, want)
    assert info["fevals"] > 0


# ---------------------------------------------------------------------------------------------
# the command


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_mlp_checkpoint(tmp_path_factory.mktemp("ode") / "mlp.pt", 20, references=8)


def test_method_both_names_each_convention_on_the_same_samples(cli, ckpt: Path) -> None:
    args = ["nll", str(ckpt), "-n", "3", "--method", "both", "--per-sample", "--exact-divergence"]
    done = cli(*args, "-f", "json")
    assert done.exit_code == 0, done.stderr
    rows = json.loads(done.stdout)
    assert [(r["sample"], r["method"]) for r in rows] == [
        (0, "vb"), (0, "ode"), (1, "vb"), (1, "ode"), (2, "vb"), (2, "ode"), (None, "vb"),
        (None, "ode"),
    ]  # fmt: skip
    assert {r["convention"] for r in rows} == {"vb_continuous", "ode_continuous"}
    assert all(r["evals"] == 20 for r in rows if r["method"] == "vb")
    assert "ode (ode_continuous)" in done.stderr and "bound:" in done.stderr
    # the API gives the same rows
    model = ddpmcli.load(ckpt)
    api = ddpmcli.nll(model, None, n=3, method="both", ode=OdeSettings(exact_divergence=True))
    assert json.loads(json.dumps(api.rows)) == rows  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--probes", "0"], "--probes must be in 1..4096, got 0"),
        (["--rtol", "0"], "--rtol must be a positive number"),
        (["--atol", "-1"], "--atol must be a positive number"),
        (["--ode-steps", "0"], "--ode-steps must be in"),
        (["--method", "both", "--t", "3"], "--method both compares totals"),
    ],
)
def test_bad_ode_flags_are_one_usage_line(cli, ckpt: Path, flags: list[str], words: str) -> None:
    done = cli("nll", str(ckpt), "--method", "ode", *flags)
    assert done.exit_code == 2, done.stderr
    assert words in done.stderr and done.stderr.count("Error") == 1


def test_a_capped_solve_prints_its_row_and_exits_1(cli, ckpt: Path) -> None:
    done = cli("nll", str(ckpt), "-n", "2", "--method", "ode", "--max-evals", "8",
               "--rtol", "1e-9", "--atol", "1e-9", "-f", "csv")  # fmt: skip
    assert done.exit_code == 1
    rows = list(csv.DictReader(io.StringIO(done.stdout)))
    assert rows[0]["status"] == "capped at 8 evals" and rows[0]["bits_per_dim"] == ""
    assert rows[-1]["status"].startswith("no total: 2 of 2")
    assert "raise --max-evals" in done.stderr


def test_two_ranks_give_one_process_rows(ckpt: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    args = ["nll", str(ckpt), "-n", "5", "--method", "ode", "--probes", "2", "--per-sample",
            "--batch-size", "2", "--rtol", "1e-4", "--atol", "1e-4", "-f", "csv"]  # fmt: skip
    run = [sys.executable, "-m", "ddpmcli", *args]
    two = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
           "-m", "ddpmcli", *args]  # fmt: skip
    outs = [
        subprocess.run(c, cwd=ckpt.parent, env=env, capture_output=True, text=True, timeout=120)
        for c in (run, two)
    ]
    assert outs[0].returncode == 0 and outs[1].returncode == 0, outs[1].stderr
    assert outs[0].stdout == outs[1].stdout  # the same chunks, each solved by one rank


def test_exact_divergence_on_data_too_large_is_one_line_with_the_size(cli, tmp_path: Path) -> None:
    from ddpmcli import models
    from ddpmcli.checkpoints import save_native_checkpoint

    hp = models.default_hparams("mlp", (80,))
    refs = torch.zeros(4, 80)
    path = save_native_checkpoint(
        tmp_path / "wide.pt", models.build_model("mlp", hp), architecture="mlp", hparams=hp,
        schedule=core.make_schedule("linear", 20), prediction_type="epsilon", data_shape=(80,),
        reference_samples=refs,
    )  # fmt: skip
    done = cli("nll", str(path), "-n", "2", "--method", "ode", "--exact-divergence")
    assert done.exit_code == 2
    assert (
        "--exact-divergence takes one backward pass per value: the data have 80 values per "
        "sample, the limit is 64" in done.stderr
    )
    assert done.stdout == "" and done.stderr.count("Error") == 1
