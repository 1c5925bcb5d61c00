"""`ddpm sample`: the sampling loop (exactness on Gaussian data, seeds, DDIM, clipping, NaN) and the
command end to end on checkpoints made here."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import gaussian_denoiser
from rowcheck import assert_row_close
from torch import Tensor

from ddpmcli import core
from ddpmcli.errors import UsageError
from ddpmcli.run import (
    STEP_COLUMNS,
    NonFiniteSampleError,
    SampleSettings,
    check_sample_settings,
    dynamic_threshold,
    energy_distance,
    respaced_schedule,
    sample,
    sliced_wasserstein,
)

MU, S = 0.5, 0.7  # the Gaussian data N(MU, S^2 I) of the exactness tests


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest


@pytest.fixture(scope="module")
def sched500() -> core.Schedule:
    # improved-diffusion's 1000/T scaling keeps alpha_bar_T ~ 4e-5 at T = 500
    return core.make_schedule("linear", 500, scale_to_timesteps=True)


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_exact_denoiser_samples_have_the_data_moments(
    sched500: core.Schedule, variance: str
) -> None:
    # 4000 x 2 draws: the Monte Carlo sd of the mean is S/sqrt(8000) = 0.008 and of the std
    # S/sqrt(16000) = 0.0055. Tolerances: 0.035 for the mean (> 4 sd) and 3% of S (0.021, ~4 sd)
    # for the std, which also covers the sampler's own bias at T = 500 (fixed_small
    # under-disperses by about 1%, fixed_large over-disperses by less: both omit or overstate
    # the c0^2 Var[x0|x_t] part of the true reverse variance).
    run = sample(
        gaussian_denoiser(sched500, MU, S), sched500, "sample", (2,), n=4000, seed=1,
        settings=SampleSettings(variance=variance, clip=False), model_dtype=torch.float64,
        data_variance=S**2,
    )  # fmt: skip
    x = run.samples.double()
    assert abs(float(x.mean()) - MU) < 0.035
    assert abs(float(x.std()) - S) < 0.03 * S
    # the std of x_t follows sqrt(ab var + 1 - ab) all the way (pooled over dims: var = S^2)
    worst = max(abs(r["xt_std"] - r["xt_std_expected"]) for r in run.rows)
    assert worst < 0.03
    assert [r["step"] for r in run.rows] == list(range(500))
    assert run.rows[0]["t"] == 499 and run.rows[-1]["t"] == 0
    assert run.rows[-1]["variance"] == 0.0  # no noise is added at the last step


def toy_sched() -> core.Schedule:
    return core.make_schedule("linear", 100)


def run_small(**kw: object) -> Tensor:
    sched = respaced_schedule(toy_sched(), kw.pop("steps", 20), "leading")  # type: ignore[arg-type]
    settings = kw.pop("settings", SampleSettings(clip=False))
    run = sample(
        gaussian_denoiser(toy_sched(), MU, S, var_value=kw.pop("var_value", None)),  # type: ignore[arg-type]
        sched, "sample", (3,), settings=settings, **kw,  # type: ignore[arg-type]
    )  # fmt: skip
    return run.samples


def test_same_seed_same_samples_whatever_the_batch_size() -> None:
    a = run_small(n=10, seed=3)
    b = run_small(n=10, seed=3, batch_size=3)
    c = run_small(n=10, seed=4)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_ddim_eta0_is_deterministic_and_eta1_is_ancestral_fixed_small() -> None:
    ddim0 = SampleSettings(sampler="ddim", eta=0.0, clip=False)
    assert torch.equal(
        run_small(n=6, seed=0, settings=ddim0), run_small(n=6, seed=0, settings=ddim0)
    )
    # eta = 1: sigma^2 = beta_tilde of the (respaced) schedule, exactly the ancestral fixed_small
    ddim1 = run_small(n=6, seed=5, settings=SampleSettings(sampler="ddim", eta=1.0, clip=False))
    ddpm = run_small(n=6, seed=5, settings=SampleSettings(variance="fixed_small", clip=False))
    torch.testing.assert_close(ddim1, ddpm, rtol=1e-5, atol=1e-6)


def test_ddim_eta0_step_is_the_deterministic_map_of_x_T() -> None:
    # with eta = 0 the only randomness is x_T: one step on a 1-step schedule is x0_hat(x_T)
    sched = respaced_schedule(toy_sched(), 1, "trailing")
    run = sample(
        gaussian_denoiser(toy_sched(), MU, S), sched, "sample", (3,), n=4, seed=2,
        settings=SampleSettings(sampler="ddim", clip=False),
    )  # fmt: skip
    x_t = torch.randn((4, 3), generator=torch.Generator().manual_seed(2))
    expect, _ = gaussian_denoiser(toy_sched(), MU, S)(x_t, torch.full((4,), 99))
    torch.testing.assert_close(run.samples, expect)


def test_learned_range_endpoints_are_the_fixed_variances() -> None:
    large = run_small(n=5, seed=1, settings=SampleSettings(variance="fixed_large", clip=False))
    small = run_small(n=5, seed=1, settings=SampleSettings(variance="fixed_small", clip=False))
    lr = SampleSettings(variance="learned_range", clip=False)
    torch.testing.assert_close(run_small(n=5, seed=1, settings=lr, var_value=1.0), large)
    torch.testing.assert_close(run_small(n=5, seed=1, settings=lr, var_value=-1.0), small)


def test_clipping_and_dynamic_thresholding() -> None:
    def far(x: Tensor, t: Tensor) -> tuple[Tensor, None]:
        return torch.full_like(x, 5.0), None

    sched = respaced_schedule(toy_sched(), 5, "leading")
    run = sample(far, sched, "sample", (4,), n=3, settings=SampleSettings(clip=True))
    assert all(r["clip_fraction"] == 1.0 and r["x0_max"] == 5.0 for r in run.rows)
    assert float(run.samples.abs().max()) <= 1.0 + 1e-6  # the last step returns clipped x0_hat
    x0 = torch.tensor([[0.5, -0.2, 0.1, 0.3], [4.0, -2.0, 1.0, 0.0]])
    out = dynamic_threshold(x0, 0.995)
    torch.testing.assert_close(out[0], x0[0])  # s = max(quantile, 1) = 1: in range, untouched
    s = float(torch.quantile(x0[1].abs(), 0.995))
    torch.testing.assert_close(out[1], x0[1].clamp(-s, s) / s)
    assert float(out.abs().max()) <= 1.0


def test_nan_mid_run_stops_with_the_step_and_keeps_rows() -> None:
    def breaks(x: Tensor, t: Tensor) -> tuple[Tensor, None]:
        return (torch.full_like(x, math.nan) if int(t[0]) < 40 else torch.zeros_like(x)), None

    sched = respaced_schedule(toy_sched(), 10, "leading")  # t = 90, 80, ..., 0
    with pytest.raises(NonFiniteSampleError, match=r"step 6 of 10 \(t = 30\)") as info:
        sample(breaks, sched, "sample", (2,), n=4, settings=SampleSettings(clip=False))
    assert [r["t"] for r in info.value.rows] == [90, 80, 70, 60, 50, 40, 30]
    assert math.isnan(info.value.rows[-1]["update_norm"])
    assert info.value.step == 6 and info.value.t == 30


def test_trajectory_every_k() -> None:
    sched = respaced_schedule(toy_sched(), 10, "leading")
    run = sample(
        gaussian_denoiser(toy_sched(), MU, S), sched, "sample", (2,), n=5,
        settings=SampleSettings(trajectory_every=4, trajectory_samples=3),
    )  # fmt: skip
    assert [f.step for f in run.trajectory] == [0, 4, 8, 9]
    assert [f.t for f in run.trajectory] == [90, 50, 10, 0]
    assert run.trajectory[0].x0.shape == (3, 2)


def test_bad_settings_and_steps() -> None:
    with pytest.raises(UsageError, match="variance channel"):
        check_sample_settings(SampleSettings(variance="learned_range"), learned_variance=False)
    with pytest.raises(UsageError, match="eta"):
        check_sample_settings(SampleSettings(sampler="ddim", eta=-0.1), learned_variance=False)
    with pytest.raises(UsageError, match="more than the model's T = 100"):
        respaced_schedule(toy_sched(), 101)
    with pytest.raises(UsageError, match="at least 1"):
        respaced_schedule(toy_sched(), "0")
    assert respaced_schedule(toy_sched(), "ddim10").timesteps.tolist() == list(range(0, 100, 10))


def test_distances_separate_clouds() -> None:
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(800, 2, generator=gen), torch.randn(800, 2, generator=gen)
    shifted = b + torch.tensor([1.0, 0.0])
    assert abs(energy_distance(a, b)) < 0.02
    assert energy_distance(a, shifted) > 0.3
    # W2 between N(0, I) and its shift by d is |d|; sliced: |d| sqrt(E cos^2) = 1/sqrt(2) in 2-D
    assert sliced_wasserstein(a, shifted) == pytest.approx(1 / math.sqrt(2), abs=0.08)
    assert sliced_wasserstein(a, b) < 0.25  # two draws of 800: the tails alone give ~0.13


# ---------------------------------------------------------------------------------------------
# the command


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from ddpmcli import models
    from ddpmcli.checkpoints import save_native_checkpoint

    root = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    sched = core.make_schedule("linear", 50)
    refs = torch.randn(300, 2, generator=torch.Generator().manual_seed(0)) * 0.5
    out: dict[str, Path] = {}
    hp = models.default_hparams("mlp", (2,))
    out["mlp"] = save_native_checkpoint(
        root / "mlp.pt", models.build_model("mlp", hp), architecture="mlp", hparams=hp,
        schedule=sched, prediction_type="epsilon", data_shape=(2,), reference_samples=refs,
    )  # fmt: skip
    net = models.build_model("mlp", hp)
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(math.nan)
    out["nan"] = save_native_checkpoint(
        root / "nan.pt", net, architecture="mlp", hparams=hp, schedule=sched,
        prediction_type="epsilon", data_shape=(2,),
    )  # fmt: skip
    hp_img = {**models.default_hparams("unet", (1, 8, 8)), "base_channels": 8, "time_dim": 16}
    out["unet"] = save_native_checkpoint(
        root / "unet.pt", models.build_model("unet", hp_img), architecture="unet",
        hparams=hp_img, schedule=sched, prediction_type="epsilon", data_shape=(1, 8, 8),
    )  # fmt: skip
    return out


def test_cli_csv_rows_and_columns(cli, ckpts) -> None:  # type: ignore[no-untyped-def]
    result = cli("sample", str(ckpts["mlp"]), "--n", "16", "--steps", "5", "-f", "csv", "-q")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == ",".join(STEP_COLUMNS)
    # trailing by default (a native checkpoint names no spacing): it starts at t = T-1
    assert [line.split(",")[1] for line in lines[1:]] == ["49", "39", "29", "19", "9"]
    assert result.stderr == ""
    leading = cli("sample", str(ckpts["mlp"]), "--n", "16", "--steps", "5", "--spacing", "leading",
                  "-f", "csv", "-q")  # fmt: skip
    assert [line.split(",")[1] for line in leading.stdout.splitlines()[1:]] == [
        "40",
        "30",
        "20",
        "10",
        "0",
    ]


@pytest.mark.parametrize(
    ("info", "given", "expected"),
    [
        ({}, None, ("trailing", 0)),
        ({}, "linspace", ("linspace", 0)),
        ({"scheduler_timestep_spacing": "leading", "scheduler_steps_offset": 1}, None,
         ("leading", 1)),
        ({"scheduler_timestep_spacing": "leading", "scheduler_steps_offset": 1}, "trailing",
         ("trailing", 1)),
    ],
)  # fmt: skip
def test_sample_spacing_is_the_flag_else_the_checkpoints_else_trailing(
    info: dict[str, object], given: str | None, expected: tuple[str, int]
) -> None:
    from types import SimpleNamespace

    from ddpmcli.cli.sample import _spacing

    assert _spacing(SimpleNamespace(info=info), given) == expected  # type: ignore[arg-type]
    spacing, offset = expected
    sched = respaced_schedule(toy_sched(), 10, spacing, offset)
    assert sched.timesteps.tolist() == core.respaced_timesteps(100, 10, spacing, offset)


def test_cli_json_and_summary(cli, ckpts) -> None:  # type: ignore[no-untyped-def]
    args = ("sample", str(ckpts["mlp"]), "--n", "64", "--steps", "4", "--seed", "7")
    rows = json.loads(cli(*args, "-f", "json", "-q").stdout)
    again = json.loads(cli(*args, "--batch-size", "5", "-f", "json", "-q").stdout)
    # the noise does not depend on the batch size; the network's float32 matmuls may, in the
    # last bits (a batch of 5 and of 64 take different kernels)
    for r1, r2 in zip(rows, again, strict=True):
        assert_row_close(r1, r2, rel=1e-5, abs=1e-6)
    assert list(rows[0]) == list(STEP_COLUMNS)
    result = cli(*args, "--sampler", "ddim", "--summary", "-f", "jsonl")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["sampler"] == "ddim" and summary["steps"] == 4 and summary["n"] == 64
    assert summary["energy_distance"] is not None and summary["sliced_w2"] > 0
    one = cli(*args, "-f", "tsv")
    assert "energy_distance" in one.stderr and "energy_distance" not in one.stdout


def test_cli_save_npz_png_and_plot(cli, ckpts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    npz, fig = tmp_path / "s.npz", tmp_path / "fig.png"
    result = cli(
        "sample", str(ckpts["mlp"]), "--n", "12", "--steps", "3", "--save", str(npz),
        "--plot", str(fig), "--trajectory-every", "1", "-f", "csv",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert np.load(npz)["samples"].shape == (12, 2)
    assert fig.stat().st_size > 0 and f"wrote {fig}" in result.stderr
    grid, fig2 = tmp_path / "grid.png", tmp_path / "u.png"
    result = cli(
        "sample", str(ckpts["unet"]), "--n", "4", "--steps", "2", "--save", str(grid),
        "--plot", str(fig2), "--trajectory-every", "1", "-f", "csv", "-q",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert grid.read_bytes()[:4] == b"\x89PNG" and fig2.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--variance", "learned_range"], "needs a model with a variance channel"),
        (["--steps", "51"], "more than the model's T = 50"),
        (["--steps", "0"], "--steps must be at least 1"),
        (["--sampler", "ddim", "--eta", "-0.5"], "--eta must be a finite number >= 0"),
        (["--eta", "0.5"], "--eta applies to --sampler ddim only"),
        (["--save", "out.txt"], "unknown file type '.txt'"),
        (["--save", "s.png"], "a .png grid needs image data"),
        (["--dynamic-threshold", "--percentile", "1.5"], "percentile must lie in (0, 1)"),
    ],
)
def test_cli_bad_input_is_one_usage_line(cli, ckpts, args, message) -> None:  # type: ignore[no-untyped-def]
    result = cli("sample", str(ckpts["mlp"]), "--n", "2", *args, "-f", "csv")
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.startswith("Error: ") and message in result.stderr
    assert result.stderr.count("\n") == 1


def test_cli_unwritable_save_fails_before_sampling(cli, ckpts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = cli("sample", str(ckpts["mlp"]), "--save", str(blocker / "s.npz"), "-f", "csv")
    assert result.exit_code == 2 and result.stdout == ""
    assert "is not a directory" in result.stderr and result.stderr.count("\n") == 1


def test_cli_nan_keeps_rows_and_exits_1(cli, ckpts) -> None:  # type: ignore[no-untyped-def]
    result = cli("sample", str(ckpts["nan"]), "--n", "3", "--steps", "5", "-f", "csv", "-q")
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert lines[0].startswith("step,t,") and len(lines) == 2  # the step where it appeared
    assert lines[1].startswith("0,49,")
    # the NaN weights' output itself is caught, before any x0_hat arithmetic
    assert result.stderr.startswith("Error: the model returned NaN/Inf (6 values) at step 0 of 5")


# ---------------------------------------------------------------------------------------------
# one event shape, registered samplers, failures mid-run (issues 7 and 11)


def test_every_loop_reports_one_event_shape() -> None:
    from ddpmcli.data import builtin_dataset
    from ddpmcli.run import Event, reconstruction_sweep, variational_bound
    from ddpmcli.training import train_denoiser

    events: list[Event] = []
    sched = toy_sched()
    predict = gaussian_denoiser(sched, MU, S)
    sample(predict, respaced_schedule(sched, 4), "sample", (2,), n=3, observers=[events.append])
    x0 = torch.randn(3, 2, generator=torch.Generator().manual_seed(0)) * 0.5
    variational_bound(predict, sched, "sample", x0, t_indices=[0, 50], batch_size=2,
                      observers=[events.append])  # fmt: skip

    class Wrapped:
        schedule, prediction_type, data_range, data_shape = sched, "sample", (-1.0, 1.0), (2,)

        def predict(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor | None]:
            return predict(x, t)

        def to(self, device: object = None, dtype: object = None) -> Wrapped:
            return self

    reconstruction_sweep(Wrapped(), x0, [0, 99], batch_size=4, observers=[events.append])
    train_denoiser(builtin_dataset("moons", 64, seed=0), sched, steps=3, batch_size=8,
                   hparams={"hidden": 8, "num_blocks": 1, "time_dim": 8},
                   observers=[events.append])  # fmt: skip
    assert all(type(e) is Event for e in events)
    by_loop: dict[str, list[Event]] = {}
    for e in events:
        by_loop.setdefault(e.loop, []).append(e)
    assert set(by_loop) == {"sample", "bound", "sweep", "train"}
    work = {k: [e for e in v if e.row is None] for k, v in by_loop.items()}
    assert [(e.done, e.total) for e in work["sample"]] == [(3, 12), (6, 12), (9, 12), (12, 12)]
    assert [e.t for e in work["sample"]] == [(75, 75), (50, 50), (25, 25), (0, 0)]
    assert [r.row["step"] for r in by_loop["sample"] if r.row is not None] == [0, 1, 2, 3]
    assert [(e.done, e.total) for e in work["bound"]] == [(2, 6), (4, 6), (6, 6)]
    assert [(e.done, e.total, e.t) for e in work["sweep"]] == [(4, 6, (0, 99)), (6, 6, (99, 99))]
    assert [(e.step, e.done, e.total) for e in work["train"]] == [(1, 1, 3), (2, 2, 3), (3, 3, 3)]
    assert set(work["train"][0].values) == {"loss", "loss_smoothed"}


def test_a_third_sampler_is_one_registered_function() -> None:
    from ddpmcli.run import StepContext, register_sampler, sampler_names
    from ddpmcli.run import samplers as samplers_module

    @register_sampler("test_ancestral")
    def step(ctx: StepContext) -> tuple[Tensor, Tensor | None]:
        log_var = ctx.schedule.model_log_variance("fixed_small", ctx.t, ctx.x)
        return ctx.schedule.ancestral_step(ctx.x, ctx.t, ctx.x0, log_var, ctx.noise), log_var

    try:
        assert "test_ancestral" in sampler_names()
        sched = respaced_schedule(toy_sched(), 10)
        predict = gaussian_denoiser(toy_sched(), MU, S)
        mine = sample(predict, sched, "sample", (2,), n=6, seed=4,
                      settings=SampleSettings(sampler="test_ancestral"))  # fmt: skip
        ddpm = sample(predict, sched, "sample", (2,), n=6, seed=4)
        assert torch.equal(mine.samples, ddpm.samples)  # the same step, noise and loop
        # the variance column is measured from the log_var the step returns
        for a, b in zip(mine.rows, ddpm.rows, strict=True):
            assert a["variance"] == pytest.approx(b["variance"], rel=1e-6)
            assert a["update_norm"] == b["update_norm"]
    finally:
        samplers_module._REGISTRY.pop("test_ancestral", None)
    with pytest.raises(UsageError, match="sampler 'test_ancestral' is unknown"):
        check_sample_settings(SampleSettings(sampler="test_ancestral"), learned_variance=False)


def test_model_exception_names_the_step_and_keeps_rows() -> None:
    from ddpmcli.run import ModelFailure

    def breaks(x: Tensor, t: Tensor) -> tuple[Tensor, None]:
        if int(t[0]) == 30:
            raise ValueError("line one\nthe real reason")
        return torch.zeros_like(x), None

    sched = respaced_schedule(toy_sched(), 10, "leading")  # t = 90, 80, ..., 0
    with pytest.raises(ModelFailure) as info:
        sample(breaks, sched, "sample", (2,), n=4)
    assert str(info.value) == "the model failed at step 6 (t = 30): ValueError: the real reason"
    assert [r["t"] for r in info.value.rows] == [90, 80, 70, 60, 50, 40]
    assert info.value.step == 6 and info.value.t == 30


def test_cli_model_nan_mid_run_keeps_rows(cli, hostile_programs) -> None:  # type: ignore[no-untyped-def]
    from conftest import HOSTILE_FLAGS

    result = cli("sample", hostile_programs["nan"], *HOSTILE_FLAGS, "--n", "3", "-f", "csv", "-q")
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert lines[0].startswith("step,t,") and len(lines) == 1 + 10  # steps 0..9 (t = 19..10)
    assert lines[-1].startswith("9,10,")
    assert result.stderr.startswith("Error: the model returned NaN/Inf (6 values) at step 9 of 20")
    assert result.stderr.count("\n") == 1


def test_cli_model_exception_is_one_line_with_the_step(cli, hostile_programs) -> None:  # type: ignore[no-untyped-def]
    from conftest import HOSTILE_FLAGS

    result = cli("sample", hostile_programs["raise"], *HOSTILE_FLAGS, "--n", "3", "-f", "csv", "-q")
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert len(lines) == 1 + 9 and lines[-1].startswith("8,11,")  # the steps before it
    assert result.stderr == (
        "Error: the model failed at step 9 (t = 10): RuntimeError: boom at ten\n"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--percentile", "0.9"], "--percentile has no effect without --dynamic-threshold"),
        (["--sampler", "ddim", "--variance", "fixed_large"], "--variance has no effect without"),
        (["--trajectory-every", "2"], "--trajectory-every has no effect without --plot"),
    ],
)
def test_cli_options_without_effect_are_usage_errors(cli, ckpts, args, message) -> None:  # type: ignore[no-untyped-def]
    ckpt_path = ckpts["mlp"]
    result = cli("sample", str(ckpt_path), "--n", "4", "--steps", "3", *args, "-f", "csv")
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.startswith("Error: ") and message in result.stderr
    # the same option where it does act is accepted (default values are never "given")
    ok = cli("sample", str(ckpt_path), "--n", "4", "--steps", "3", "--sampler", "ddim", "-f", "csv")
    assert ok.exit_code == 0, ok.stderr


def test_cli_spacing_without_steps_is_a_usage_error(cli, ckpts) -> None:  # type: ignore[no-untyped-def]
    result = cli("sample", str(ckpts["mlp"]), "--n", "4", "--spacing", "leading", "-f", "csv")
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr == (
        "Error: --spacing has no effect without --steps; add --steps or drop --spacing\n"
    )
