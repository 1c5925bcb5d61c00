"""The step-count diagnostic: rows against the exact Gaussian reference, the converged reference
checked by halving, common random numbers (same rows on 1 and 2 threads and on a rerun), the
cheapest-under-target answer, and `ddpm steps` through the CLI."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from ddpmcli import core
from ddpmcli.run.samplers import SampleSettings
from ddpmcli.run.solver_grid import sigma_grid
from ddpmcli.run.step_sweep import SWEEP_COLUMNS, cheapest, max_gap, step_sweep

MU, S = 0.3, 0.5


def _train() -> core.Schedule:
    return core.make_schedule("linear", 1000)


def _oracle(run_for):
    """E[x0 | x_t] of N(MU, S^2) data, as an x0-predicting model, read from each run's grid."""

    def predict(x, t):
        sched = run_for["current"]
        k = int(torch.argmin((sched.model_timestep - float(t[0])).abs()))
        a, s = float(sched.alpha_t[k]), float(sched.sigma_t[k])
        return MU + a * S * S / (a * a * S * S + s * s) * (x - a * MU), None

    return predict


def _sweep(samplers, steps, *, exact=True, threads=None, **kw):
    train = _train()
    state: dict = {}

    def schedule_for(name, count):
        state["current"] = sigma_grid(train, count, "karras")
        return state["current"]

    s_max = float(train.sigma[-1])

    def closed_form(x_t):  # the PF-ODE from x_T at sigma_max to clean data, Gaussian data
        xk = x_t.double() * math.sqrt(1 + s_max**2)
        return MU + (xk - MU) * S / math.sqrt(S * S + s_max * s_max)

    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return step_sweep(
            _oracle(state), schedule_for, "sample", (2,), samplers=samplers, steps=steps,
            settings_for=lambda name: SampleSettings(sampler=name, clip=False), n=64, seed=3,
            exact=closed_form if exact else None, run_options={"model_dtype": torch.float64},
            **kw,
        )  # fmt: skip
    finally:
        torch.set_num_threads(old)


def test_rows_shrink_with_steps_and_the_orders_are_the_solvers() -> None:
    result = _sweep(["ddim", "dpmpp-2m", "heun", "euler-a"], [16, 32, 64])  # asymptotic range
    assert [list(r) for r in result.rows] == [list(SWEEP_COLUMNS)] * 12
    for name in ("ddim", "dpmpp-2m", "heun"):
        errors = [r["rms_error"] for r in result.rows if r["sampler"] == name]
        assert errors == sorted(errors, reverse=True), name
    assert [r["nfe"] for r in result.rows if r["sampler"] == "heun"] == [31, 63, 127]
    assert abs(result.orders["ddim"] - 1) < 0.3
    assert abs(result.orders["dpmpp-2m"] - 2) < 0.3
    assert abs(result.orders["heun"] - 2) < 0.3
    assert "euler-a" not in result.orders  # stochastic: measured by distance, not by a slope
    assert all(r["stochastic"] for r in result.rows if r["sampler"] == "euler-a")
    gaps = [r["max_log_snr_gap"] for r in result.rows if r["sampler"] == "ddim"]
    assert gaps == sorted(gaps, reverse=True) and all(g > 0 for g in gaps)


def test_the_same_rows_on_one_and_two_threads_and_on_a_rerun() -> None:
    def strip(rows):
        return [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]

    one = _sweep(["dpmpp-2m", "euler-a"], [4, 8], threads=1)
    two = _sweep(["dpmpp-2m", "euler-a"], [4, 8], threads=2)
    again = _sweep(["dpmpp-2m", "euler-a"], [4, 8], threads=1)
    assert strip(one.rows) == strip(two.rows) == strip(again.rows)


def test_the_converged_reference_is_near_the_exact_one() -> None:
    exact = _sweep(["dpmpp-2m"], [16])
    conv = _sweep(["dpmpp-2m"], [16], exact=False, reference_steps=200)
    assert conv.reference.kind == "converged" and conv.reference.remaining_error is not None
    gap = float((exact.reference.samples.double() - conv.reference.samples.double()).pow(2).mean())
    # the halving estimate bounds the converged run's true error (with a safety factor of 10);
    # the exact reference lands on sigma = 0, the grid's run on sigma_min (0.01): a floor
    assert math.sqrt(gap) < 10 * conv.reference.remaining_error + 5e-3
    assert "remaining error" in conv.reference.describe()


def test_cheapest_under_a_target() -> None:
    rows = [
        {"sampler": "a", "steps": 10, "nfe": 10, "rms_error": 0.02, "stochastic": False},
        {"sampler": "b", "steps": 5, "nfe": 9, "rms_error": 0.009, "stochastic": False},
        {"sampler": "c", "steps": 3, "nfe": 3, "rms_error": 0.001, "stochastic": True},
        {"sampler": "a", "steps": 20, "nfe": 20, "rms_error": 0.005, "stochastic": False},
    ]
    assert cheapest(rows, 0.01)["sampler"] == "b"  # type: ignore[index]
    assert cheapest(rows, 1e-4) is None


def test_max_gap_leaves_out_the_step_onto_data() -> None:
    grid = sigma_grid(_train(), 4, "lu")
    gap = max_gap(grid, SampleSettings(sampler="ddim"))
    lam = (grid.log_snr / 2).tolist()
    assert gap == pytest.approx(max(b - a for a, b in zip(lam[1:], lam[:-1], strict=True)))


def test_ddpm_steps_command(cli, tmp_path: Path) -> None:
    from conftest import tiny_mlp_checkpoint

    ckpt = tiny_mlp_checkpoint(tmp_path / "m.pt", timesteps=50, references=32)
    args = [
        "steps", str(ckpt), "--sampler", "ddim,dpmpp-2m", "--steps", "2,4", "--n", "16",
        "--reference-steps", "8", "--target", "10", "--format", "csv",
    ]  # fmt: skip
    done = cli(*args)
    assert done.exit_code == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == ",".join(SWEEP_COLUMNS) and len(lines) == 5
    assert "reference: unipc at 8 steps" in done.stderr
    assert "cheapest under RMS error 10: dpmpp-2m at 2 steps (2 model evaluations" in done.stderr
    bad = cli("steps", str(ckpt), "--sampler", "ddim,nope")
    assert bad.exit_code == 2 and "--sampler 'nope' is unknown" in bad.stderr


def _flow_checkpoint(path: Path) -> Path:
    """An untrained native MLP of 2-D data on the flow path (prediction type flow), T = 50."""
    from ddpmcli import models
    from ddpmcli.checkpoints import save_native_checkpoint

    torch.manual_seed(0)
    hp = models.default_hparams("mlp", (2,))
    return save_native_checkpoint(
        path, models.build_model("mlp", hp), architecture="mlp", hparams=hp,
        schedule=core.make_schedule("flow", 50), prediction_type="flow", data_shape=(2,),
    )  # fmt: skip


def test_steps_defaults_to_samples_spacing_and_says_so(cli, tmp_path: Path) -> None:
    """Without --spacing, `steps` runs sample's rule (the checkpoint's own timestep spacing,
    else trailing): a flow model, on which the old karras default failed (its sigma_max is
    infinite), runs, and stderr names the spacing; --spacing karras still picks karras."""
    from conftest import tiny_mlp_checkpoint

    flow = _flow_checkpoint(tmp_path / "f.pt")
    base = ["--steps", "2,4", "--n", "8", "--reference-steps", "8", "--format", "csv"]
    done = cli("steps", str(flow), "--sampler", "flow-euler,dpmpp-2m", *base)
    assert done.exit_code == 0, done.stderr
    assert len(done.stdout.splitlines()) == 5
    assert done.stderr.splitlines()[0] == (
        "spacing trailing (sample's default for this checkpoint; --spacing overrides)"
    )
    vp = tiny_mlp_checkpoint(tmp_path / "m.pt", timesteps=50)
    given = cli("steps", str(vp), "--sampler", "ddim", "--spacing", "karras", *base)
    assert given.exit_code == 0 and "spacing" not in given.stderr, given.stderr
    title = cli("steps", str(vp), "--sampler", "ddim", *base[:-2], "--format", "table")
    assert "steps m.pt (trailing)" in title.stdout, title.stdout


@pytest.mark.parametrize(
    ("flag", "value", "line"),
    [
        ("--steps", "5,2,5", "Error: --steps lists 5 twice (it would rerun the same rows); "
         "give each once"),
        ("--sampler", "ddim,unipc,ddim", "Error: --sampler lists 'ddim' twice (it would rerun "
         "the same rows); give each once"),
    ],
)  # fmt: skip
def test_a_repeated_entry_is_refused(cli, tmp_path: Path, flag: str, value: str, line: str) -> None:
    """A repeated step count or sampler would rerun the same row: one line, exit 2, before the
    checkpoint is read (a path that does not exist is not even opened)."""
    done = cli("steps", str(tmp_path / "absent.pt"), flag, value)
    assert done.exit_code == 2 and done.stderr.strip() == line, done.stderr
    assert done.stdout == ""


def test_a_latent_model_has_no_range_error(tmp_path: Path) -> None:
    """A latent model's samples are latents: the data range's width means nothing there, so
    rms_error_range is None (rms_error stays); a pixel model divides by its range's width."""
    import dataclasses
    from types import SimpleNamespace

    from conftest import tiny_mlp_checkpoint

    import ddpmcli
    from ddpmcli.api_sampling import step_sweep as api_sweep

    model = ddpmcli.load(tiny_mlp_checkpoint(tmp_path / "m.pt", timesteps=20))
    kw = {"n": 4, "reference_steps": 4}
    pixel = api_sweep(model, ["ddim"], [2], **kw)
    latent = api_sweep(dataclasses.replace(model, latent=SimpleNamespace()), ["ddim"], [2], **kw)
    assert pixel.spacing == latent.spacing == "trailing"
    [p], [q] = pixel.rows, latent.rows
    assert p["rms_error_range"] == pytest.approx(p["rms_error"] / 2)  # data range [-1, 1]
    assert q["rms_error_range"] is None and q["rms_error"] == p["rms_error"]


def _points_oracle(points: torch.Tensor, state: dict):
    """E[x0 | x_t] of the uniform distribution on ``points`` at the run's grid entry named by the
    timestep, written here from its definition: softmax_i(-|x_t - alpha x_i|^2 / (2 sigma^2))."""

    def predict(x, t):
        sched = state["current"]
        k = int(torch.argmin((sched.model_timestep - float(t[0])).abs()))
        a, s = float(sched.alpha_t[k]), float(sched.sigma_t[k])
        d2 = ((x.double()[:, None, :] - a * points[None]) ** 2).sum(-1)
        return torch.softmax(-d2 / (2 * s * s), dim=1) @ points, None

    return predict


def test_the_optimal_denoiser_mode_is_the_exact_denoisers_sweep(tmp_path: Path) -> None:
    """denoiser='optimal' samples E[x0 | x_t] of the reference samples (a finite set) in float64
    on the model's grid: its rows equal a sweep of the same denoiser written independently here,
    and its converged reference is converged (halving moves it by < 1e-6)."""
    from conftest import tiny_mlp_checkpoint

    import ddpmcli
    from ddpmcli.api_sampling import sampling_schedule
    from ddpmcli.api_sampling import step_sweep as api_sweep

    model = ddpmcli.load(tiny_mlp_checkpoint(tmp_path / "m.pt", timesteps=40, references=8))
    kw = {"n": 16, "seed": 5, "reference_steps": 64, "spacing": "karras"}
    got = api_sweep(model, ["ddim", "dpmpp-2m"], [4, 8], denoiser="optimal", **kw)
    state: dict = {}

    def schedule_for(name, count):
        state["current"] = sampling_schedule(model, count, "karras", name, whole=False)
        return state["current"]

    points = model.reference_samples.double()
    want = step_sweep(
        _points_oracle(points, state), schedule_for, "sample", (2,),
        samplers=["ddim", "dpmpp-2m"], steps=[4, 8],
        settings_for=lambda name: SampleSettings(sampler=name, clip=False), n=16, seed=5,
        reference_steps=64, data=points, run_options={"model_dtype": torch.float64},
    )  # fmt: skip
    assert got.reference.remaining_error is not None and got.reference.remaining_error < 1e-6
    torch.testing.assert_close(got.reference.samples, want.reference.samples, rtol=0, atol=1e-6)
    for a, b in zip(got.rows, want.rows, strict=True):
        assert a["sampler"] == b["sampler"] and a["nfe"] == b["nfe"]
        assert a["rms_error"] == pytest.approx(b["rms_error"], rel=1e-6, abs=1e-9)
        assert a["data_distance"] == pytest.approx(b["data_distance"], rel=1e-6, abs=1e-9)


def test_ddpm_steps_denoiser_optimal(cli, tmp_path: Path) -> None:
    from conftest import tiny_mlp_checkpoint

    ckpt = tiny_mlp_checkpoint(tmp_path / "m.pt", timesteps=40, references=8)
    base = ["steps", str(ckpt), "--steps", "4,8", "--n", "8", "--reference-steps", "32"]
    done = cli(*base, "--denoiser", "optimal", "--sampler", "dpmpp-2m", "--format", "csv")
    assert done.exit_code == 0, done.stderr
    assert len(done.stdout.splitlines()) == 3
    assert "denoiser: the Bayes-optimal denoiser of the checkpoint's reference samples" in (
        done.stderr
    )
    moons = cli(*base, "--denoiser", "optimal", "--data", "moons")
    assert moons.exit_code == 2 and moons.stderr.startswith(
        "Error: --denoiser optimal: the built-in set 'moons' is neither"
    ), moons.stderr
    alone = cli(*base, "--data", "gmm")
    assert alone.exit_code == 2
    assert (
        alone.stderr.strip()
        == "Error: --data is the optimal denoiser's data: give --denoiser optimal"
    )
