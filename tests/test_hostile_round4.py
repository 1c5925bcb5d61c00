"""Hostile input, fourth round: --timestep-list, --dpm-form exact, Karras churn, `ddpm steps`'
defaults, --max-sequence-length, check CKPT on paths, -T without --kind, train at zero terminal
SNR, used as a careless or hostile user would.

The one-line cases run in one subprocess under ``RLIMIT_AS`` 4 GiB (tests/capped.py): each ends
in one ``Error:`` line (never the bug hint) with the right exit status.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from capped import assert_cases, run_capped  # noqa: E402


def _native(path: Path, kind: str, prediction_type: str, timesteps: int = 1000) -> Path:
    from ddpmcli import checkpoints, core, models

    base = models.default_hparams("mlp", (2,))
    checkpoints.save_native_checkpoint(
        path, models.build_model("mlp", base), architecture="mlp", hparams=base,
        schedule=core.make_schedule(kind, timesteps), prediction_type=prediction_type,
        data_shape=(2,),
    )  # fmt: skip
    return path


# (argv, exit status, fragments of the one Error line)
CASES: list[tuple[list[str], int, list[str]]] = [
    # make_schedule's own keywords given as a kind parameter: TypeError 'got multiple values for
    # keyword argument' reached the bug handler (schedule, check, train: every --param user)
    (["schedule", "--kind", "linear", "--param", "zero_terminal_snr=1", "-T", "5"], 2,
     ["zero_terminal_snr is not a parameter", "--zero-terminal-snr"]),
    (["check", "--kind", "cosine", "--param", "logsnr_shift=1"], 2, ["--logsnr-shift"]),
    (["train", "--data", "moons", "--steps", "2", "--param", "zero_terminal_snr=1", "--out",
      "z.pt"], 2, ["--zero-terminal-snr"]),
    # an epsilon reading of a path from alpha_t = 0: x_t became NaN at step 0, exit 1, with the
    # advice "Try the float32 dtype, clipping, or fewer steps"
    (["sample", "flow.pt", "--n", "4", "--prediction-type", "epsilon", "--steps", "3"], 2,
     ["epsilon model cannot be sampled", "alpha_t = 0", "--spacing leading"]),
    (["sample", "vp.pt", "--n", "4", "--kind", "flow", "--steps", "3", "--sampler", "unipc"], 2,
     ["alpha_t = 0"]),
    (["steps", "flow.pt", "--n", "4", "--prediction-type", "epsilon", "--steps", "2",
      "--sampler", "ddim"], 2, ["alpha_t = 0"]),
    # a log-SNR shift that saturates float64 (alpha_bar exactly 1 or 0) printed beta 0, log_snr
    # inf and NaN posterior columns with exit 0 (and train wrote a model on it)
    (["schedule", "--logsnr-shift", "1000"], 2, ["log-SNR shift 1000", "beta[0] = 0.0"]),
    (["schedule", "--logsnr-shift", "-1000"], 2, ["alpha_bar zero before the last step"]),
    (["train", "--data", "moons", "--steps", "2", "--logsnr-shift", "-1000", "--out", "z.pt"],
     2, ["log-SNR shift -1000"]),
    # a churn window or noise scale without --s-churn ran without a word (no churn to shape)
    (["sample", "vp.pt", "--n", "4", "--steps", "3", "--sampler", "heun", "--s-tmin", "5",
      "--s-tmax", "1"], 2, ["--s-tmin shapes the churn, which is off"]),
    (["sample", "vp.pt", "--n", "4", "--steps", "3", "--sampler", "euler", "--s-noise", "0"], 2,
     ["--s-noise shapes the churn"]),
    # a churned heun from a flow's s = 1 was refused as a churn window "from inf to inf"
    (["sample", "t1.pt", "--n", "4", "--sampler", "heun", "--s-churn", "1"], 2,
     ["alpha_t = 0 (a flow at s = 1)"]),
    # the ODE likelihood of a one-timestep schedule named a flag never given: "--t-eps None"
    (["nll", "t1.pt", "--n", "4", "--data", "moons", "--method", "ode"], 2,
     ["has one timestep"]),
    # the bound's NaN there blamed the model ("the model returned NaN/Inf there")
    (["nll", "flow.pt", "--n", "4", "--prediction-type", "epsilon", "--data", "moons"], 1,
     ["at t = 999 (alpha_t = 0 there", "epsilon model is undefined"]),
    # the final sigma of a one-timestep flow is inf: "final_sigma ... got inf", never typed
    (["sample", "t1.pt", "--n", "4", "--sampler", "dpmpp-2m", "--final-sigmas", "sigma_min"], 2,
     ["--final-sigmas sigma_min: the model's smallest training sigma is inf"]),
]  # fmt: skip


def test_hostile_round4_cases(tmp_path: Path) -> None:
    _native(tmp_path / "vp.pt", "linear", "epsilon")
    _native(tmp_path / "flow.pt", "flow", "flow")
    _native(tmp_path / "t1.pt", "flow", "flow", timesteps=1)
    rows = run_capped([argv for argv, _, _ in CASES], tmp_path)
    assert_cases(CASES, rows)
    assert not (tmp_path / "z.pt").exists()


class _Recorder(torch.nn.Module):
    """Returns zeros and keeps the timestep of every call."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[float] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.seen.append(float(t.flatten()[0]))
        return torch.zeros_like(x)


@pytest.mark.parametrize("sampler", ["ddim", "heun", "dpmpp-2m"])
@pytest.mark.parametrize("kind", ["edm_sigma", "ve", "flow"])
def test_explicit_sigmas_call_the_model_with_its_own_timestep(kind: str, sampler: str) -> None:
    """`sample --sigmas` off VP called the model with the training table's *index* (769.0 for
    sigma 20 on edm_sigma, whose network takes c_noise = ln(sigma)/4 = 0.749; 951.4 on a flow
    that takes 1000 s = 952.4): the model timestep is now interpolated on the table's own model
    timesteps, in log sigma between neighbours as the index is (exact for c_noise)."""
    import ddpmcli

    net = _Recorder()
    model = ddpmcli.wrap(
        net, schedule=ddpmcli.schedule(kind), data_shape=(2,),
        prediction_type="flow" if kind == "flow" else "epsilon",
    )  # fmt: skip
    sigmas = [20.0, 2.0, 0.5]
    net.seen.clear()  # (wrap's own check call)
    ddpmcli.sample(model, n=2, sampler=sampler, grid=sigmas)
    exact = {  # each path's own timestep of an EDM sigma (sigma_t/alpha_t)
        "edm_sigma": lambda s: math.log(s) / 4,
        "ve": lambda s: s,
        "flow": lambda s: 1000 * s / (1 + s),
    }[kind]
    want = [exact(s) for s in sigmas]
    seen = sorted(set(net.seen), reverse=True)
    if sampler == "dpmpp-2m":  # whole table indices, as diffusers' multistep schedulers round
        table = [float(v) for v in model.schedule.model_timestep]
        want = [min(table, key=lambda v, w=w: abs(v - w)) for w in want]
        assert seen == pytest.approx(want, abs=1e-6)
    else:
        # float32 as the model takes it; ve and flow: linear in log sigma between table entries
        tol = 1e-6 if kind == "edm_sigma" else 2e-4
        assert seen == pytest.approx(want, rel=tol, abs=1e-12)


def test_karras_grid_on_edm_sigma_calls_the_model_with_c_noise() -> None:
    import ddpmcli

    net = _Recorder()
    model = ddpmcli.wrap(
        net, schedule=ddpmcli.schedule("edm_sigma"), prediction_type="epsilon", data_shape=(2,)
    )
    net.seen.clear()
    run = ddpmcli.sample(model, n=2, sampler="euler", steps=4, spacing="karras")
    sigmas = run.schedule.sigma.flip(0).tolist()
    assert net.seen == pytest.approx([math.log(s) / 4 for s in sigmas], rel=1e-6)


def test_epsilon_from_alpha_zero_is_refused_before_any_model_call() -> None:
    import ddpmcli
    from ddpmcli.errors import ParameterError

    net = _Recorder()
    model = ddpmcli.wrap(
        net, schedule=ddpmcli.schedule("flow"), prediction_type="epsilon", data_shape=(2,)
    )
    net.seen.clear()
    with pytest.raises(ParameterError, match="alpha_t = 0"):
        ddpmcli.sample(model, n=2, steps=3, sampler="dpmpp-2m")
    assert net.seen == []
    run = ddpmcli.sample(model, n=2, timesteps=[998, 500])  # below s = 1: it runs
    assert bool(torch.isfinite(run.samples).all())


@pytest.mark.parametrize(
    "options",
    [{"timesteps": "999,0"}, {"timesteps": 999}, {"sampler": "heun", "s_churn": "1"},
     {"sampler": "heun", "s_churn": True}, {"sampler": "euler", "s_noise": "1"}],
)  # fmt: skip
def test_library_wrong_types_are_parameter_errors(options: dict[str, object]) -> None:
    """sample(timesteps="999,0") read the string char by char (ValueError), timesteps=999 was a
    TypeError, s_churn="1" a TypeError inside math.isnan, s_churn=True ran as 1."""
    import ddpmcli
    from ddpmcli.errors import ParameterError

    model = ddpmcli.wrap(
        _Recorder(), schedule=ddpmcli.schedule("linear", 10), prediction_type="epsilon",
        data_shape=(2,),
    )  # fmt: skip
    with pytest.raises(ParameterError):
        ddpmcli.sample(model, n=2, **options)  # type: ignore[arg-type]


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_k_samplers_from_alpha_zero_refused_before_any_model_call(sampler: str) -> None:
    import ddpmcli
    from ddpmcli.errors import ParameterError

    net = _Recorder()
    model = ddpmcli.wrap(
        net, schedule=ddpmcli.schedule("flow"), prediction_type="flow", data_shape=(2,)
    )
    net.seen.clear()
    with pytest.raises(ParameterError, match="alpha_t = 0"):
        ddpmcli.sample(model, n=2, steps=3, sampler=sampler)
    assert net.seen == []


@pytest.mark.parametrize("kind", ["edm_sigma", "ve"])
def test_terminal_snr_hint_off_vp_names_no_vp_transform(kind: str) -> None:
    """`check --kind edm_sigma` advised 'see --zero-terminal-snr', which is refused off VP
    ('zero terminal SNR applies to VP schedules')."""
    from ddpmcli import checks, core

    [finding] = checks.check_terminal_snr(core.make_schedule(kind, 1000))
    assert finding.severity == "warning"
    assert "zero_terminal_snr" not in finding.message and "sigma_max" in finding.message
    [vp] = checks.check_terminal_snr(core.make_schedule("linear", 100))
    assert vp.message.endswith("; see zero_terminal_snr")


def test_train_from_a_v_config_trains_v(tmp_path: Path) -> None:
    """`train --from sd2-v` (a DDIMScheduler config with prediction_type v_prediction) trained
    and declared epsilon: without --prediction-type, the config's own is trained."""
    import ddpmcli

    argv = ["train", "--data", "moons", "--n", "64", "--steps", "2", "--from", "sd2-v", "--out"]
    rows = run_capped([[*argv, "v.pt"], [*argv, "e.pt", "--prediction-type", "epsilon"]], tmp_path)
    assert [status for status, _, _ in rows] == [0, 0], rows
    assert ddpmcli.load(tmp_path / "v.pt").prediction_type == "v_prediction"
    assert ddpmcli.load(tmp_path / "e.pt").prediction_type == "epsilon"  # the flag wins


def test_own_scheduler_note_names_no_spacing_the_user_replaced(tmp_path: Path) -> None:
    """A folder whose scheduler is DPM-Solver with Karras sigmas, sampled with --spacing trailing,
    --sigmas or --timestep-list, ran the user's grid while stderr said '--spacing karras'."""
    import json
    from types import SimpleNamespace

    from ddpmcli.api_sampling import resolve_sampler

    config = tmp_path / "scheduler_config.json"
    config.write_text(
        json.dumps({"_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True})
    )
    model: Any = SimpleNamespace(info={"scheduler_config": str(config)})
    own = resolve_sampler(model, None, None, None, {})
    assert own[:2] == ("dpmpp-2m", "karras") and "--spacing karras" in str(own[4])
    for spacing, grid, listed in [
        ("trailing", None, False),
        (None, [1.0], False),
        (None, None, True),
    ]:
        name, how, _, _, said = resolve_sampler(model, None, spacing, grid, {}, timesteps=listed)
        assert name == "dpmpp-2m" and how == spacing and "--spacing" not in str(said), said


def test_trajectory_titles_round_a_float_timestep(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Off VP the rows' t is the unrounded model timestep (c2e8828): the trajectory panels of
    `sample --plot` titled 't = 1.0955066586684705'."""
    from matplotlib.axes import Axes

    import ddpmcli
    from ddpmcli.plotting.sample import plot_sampling

    titles: list[str] = []
    original = Axes.set_title

    def record(self: Any, label: str, *args: Any, **kwargs: Any) -> Any:
        titles.append(label)
        return original(self, label, *args, **kwargs)

    monkeypatch.setattr(Axes, "set_title", record)
    model = ddpmcli.wrap(
        _Recorder(), schedule=ddpmcli.schedule("edm_sigma"), prediction_type="epsilon",
        data_shape=(2,),
    )  # fmt: skip
    run = ddpmcli.sample(model, n=4, steps=3, sampler="euler", trajectory_every=1)
    plot_sampling(run, tmp_path / "s.png")
    assert any("t = 1.09551" in title for title in titles), titles
    assert not any("1.0955066" in title for title in titles), titles


def test_nan_line_shows_the_float_timestep() -> None:
    """The NaN error line printed int(t): EDM's c_noise 1.0955 as 't = 1'."""
    import ddpmcli
    from ddpmcli.run.observers import NonFiniteSampleError

    class Bad(_Recorder):
        def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return torch.full_like(x, float("nan")) if float(t.flatten()[0]) > 1 else x

    model = ddpmcli.wrap(
        Bad(), schedule=ddpmcli.schedule("edm_sigma"), prediction_type="epsilon", data_shape=(2,)
    )
    with pytest.raises(NonFiniteSampleError, match=r"at step 0 of 3 \(t = 1\.09551\)"):
        ddpmcli.sample(model, n=2, steps=3, sampler="ddim")


def test_model_failure_line_shows_the_float_timestep() -> None:
    """A model that raised off VP: 'the model failed at step 0 (t = 1.0955066586684705)'."""
    import ddpmcli
    from ddpmcli.run.events import ModelFailure

    class Raises(_Recorder):
        def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if float(t.flatten()[0]) > 1:
                raise ValueError("boom")
            return x

    model = ddpmcli.wrap(
        Raises(), schedule=ddpmcli.schedule("edm_sigma"), prediction_type="epsilon",
        data_shape=(2,),
    )  # fmt: skip
    with pytest.raises(ModelFailure, match=r"step 0 \(t = 1\.09551\)"):
        ddpmcli.sample(model, n=2, steps=3, sampler="ddim")


def test_karras_rows_show_the_whole_timestep_at_sigma_max() -> None:
    """The first row of a Karras run on a VP model said t = 998.9999999999999 (sigma_max an ulp
    below the table's after the rho power); within float64 rounding of 999 it is 999."""
    import ddpmcli

    model = ddpmcli.wrap(
        _Recorder(), schedule=ddpmcli.schedule("linear"), prediction_type="epsilon",
        data_shape=(2,),
    )  # fmt: skip
    run = ddpmcli.sample(model, n=2, steps=3, spacing="karras", sampler="euler")
    shown = [row["t"] for row in run.rows]
    assert shown[0] == 999 and isinstance(shown[0], int) and shown[-1] == 0
    assert not float(shown[1]).is_integer()  # an interpolated timestep stays a float
