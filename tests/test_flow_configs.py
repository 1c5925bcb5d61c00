"""`--from` on rectified-flow scheduler configs (SD3, Flux, LTX, CogView4, SANA, Wan), presets by
name, and the errors for configs ddpm does not model. Grids are checked against diffusers' own
schedulers built from the same config dicts (reference only; no hub download)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ddpmcli.configs import ScheduleRequest, build_schedule, load_scheduler_config
from ddpmcli.errors import ParameterError, ScheduleError

# stabilityai/stable-diffusion-3-medium-diffusers scheduler/scheduler_config.json, as published
SD3 = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": "0.29.0.dev0",
    "num_train_timesteps": 1000,
    "shift": 3.0,
}
# black-forest-labs/FLUX.1-dev scheduler/scheduler_config.json
FLUX = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": "0.30.0.dev0",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}
# Wan-AI/Wan2.1-T2V-1.3B-Diffusers scheduler/scheduler_config.json (the keys that matter)
WAN = {
    "_class_name": "UniPCMultistepScheduler",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "flow_shift": 3.0,
    "num_train_timesteps": 1000,
    "prediction_type": "flow_prediction",
    "use_flow_sigmas": True,
    "solver_order": 2,
    "disable_corrector": [],
    "solver_p": None,
}


def _folder(tmp_path: Path, config: dict[str, Any], name: str = "model") -> Path:
    folder = tmp_path / name / "scheduler"
    folder.mkdir(parents=True)
    (folder / "scheduler_config.json").write_text(json.dumps(config))
    return folder.parent


def _diffusers(config: dict[str, Any]) -> Any:
    import diffusers

    cls = getattr(diffusers, config["_class_name"])
    return cls(**{k: v for k, v in config.items() if not k.startswith("_")})


def test_sd3_config_is_a_flow_not_a_linear_ddpm(tmp_path: Path) -> None:
    config = load_scheduler_config(_folder(tmp_path, SD3))
    assert config.flow is not None and config.beta_schedule == "flow"
    assert config.prediction_type == "flow"
    schedule = config.schedule
    assert schedule.path == "flow" and schedule.num_steps == 1000
    # diffusers' training table: s = shift u/(1 + (shift - 1) u), u = t/T, model timestep s T
    sched = _diffusers(SD3)
    # (diffusers computes it in float32, four roundings: within 4 float32 ulps)
    torch.testing.assert_close(
        schedule.sigma_t.flip(0), sched.sigmas.to(torch.float64), rtol=4.8e-7, atol=0
    )


@pytest.mark.parametrize("steps", [1, 8, 28])
def test_sd3_steps_grid_is_diffusers_set_timesteps(tmp_path: Path, steps: int) -> None:
    built = build_schedule(ScheduleRequest(from_file=str(_folder(tmp_path, SD3)), steps=str(steps)))
    sched = _diffusers(SD3)
    sched.set_timesteps(steps)
    schedule = built.schedule
    assert built.respaced and schedule.num_steps == steps
    assert torch.equal(schedule.sigma_t.flip(0), sched.sigmas[:-1].to(torch.float64))
    assert torch.equal(schedule.model_timestep.flip(0), sched.timesteps.to(torch.float64))
    assert torch.equal(schedule.alpha_t, 1 - schedule.sigma_t)


def test_sd3_eight_steps_end_at_the_twice_shifted_sigma(tmp_path: Path) -> None:
    built = build_schedule(ScheduleRequest(from_file=str(_folder(tmp_path, SD3)), steps="8"))
    assert built.schedule.sigma_t[0].item() == pytest.approx(0.008929, abs=5e-7)


@pytest.mark.parametrize("resolution", [512, 1024])
def test_flux_resolution_gives_the_pipelines_mu_and_grid(tmp_path: Path, resolution: int) -> None:
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    folder = _folder(tmp_path, FLUX)
    built = build_schedule(
        ScheduleRequest(from_file=str(folder), steps="28", resolution=resolution)
    )
    sched = _diffusers(FLUX)
    mu = calculate_shift((resolution // 16) ** 2)
    sched.set_timesteps(28, sigmas=np.linspace(1.0, 1 / 28, 28), mu=mu)
    assert torch.equal(built.schedule.sigma_t.flip(0), sched.sigmas[:-1].to(torch.float64))
    assert torch.equal(built.schedule.model_timestep.flip(0), sched.timesteps.to(torch.float64))
    same = build_schedule(ScheduleRequest(from_file=str(folder), steps="28", params={"mu": mu}))
    assert torch.equal(same.schedule.sigma_t, built.schedule.sigma_t)


def test_wan_unipc_flow_sigmas(tmp_path: Path) -> None:
    built = build_schedule(ScheduleRequest(from_file=str(_folder(tmp_path, WAN)), steps="50"))
    sched = _diffusers(WAN)
    sched.set_timesteps(50)
    assert torch.equal(built.schedule.sigma_t.flip(0), sched.sigmas[:-1].to(torch.float64))
    assert torch.equal(built.schedule.model_timestep.flip(0), sched.timesteps.to(torch.float64))
    assert load_scheduler_config(_folder(tmp_path, WAN, "w2")).prediction_type == "flow"


def test_presets_by_name_are_their_configs(tmp_path: Path) -> None:
    from ddpmcli import presets

    by_name = build_schedule(ScheduleRequest(from_file="sd3", steps="8")).schedule
    by_file = build_schedule(
        ScheduleRequest(from_file=str(_folder(tmp_path, SD3)), steps="8")
    ).schedule
    assert torch.equal(by_name.sigma_t, by_file.sigma_t)
    flux = build_schedule(ScheduleRequest(from_file="flux@512", steps="4")).schedule
    flux_default = build_schedule(ScheduleRequest(from_file="flux-dev", steps="4")).schedule
    flux_1024 = build_schedule(ScheduleRequest(from_file="flux@1024", steps="4")).schedule
    assert not torch.equal(flux.sigma_t, flux_default.sigma_t)
    assert torch.equal(flux_default.sigma_t, flux_1024.sigma_t)  # the pipeline's default 1024
    for name, preset in presets.PRESETS.items():
        built = build_schedule(ScheduleRequest(from_file=name)).schedule
        assert built.num_steps >= 1000, name
        assert preset.source  # every preset cites where its values come from


@pytest.mark.parametrize(
    ("config", "words"),
    [
        ({"_class_name": "EDMEulerScheduler", "sigma_min": 0.002}, "not a scheduler ddpm models"),
        ({"_class_name": "ScoreSdeVeScheduler"}, "not a scheduler ddpm models"),
        ({**SD3, "shfit": 2.0}, "unknown key shfit"),
        ({**SD3, "shift": 0}, "shift = 0.0 must be > 0"),
        ({**SD3, "shift": -3}, "shift = -3.0 must be > 0"),
        ({**SD3, "shift_terminal": 1.5}, "shift_terminal"),
        ({**SD3, "time_shift_type": "cubic"}, "time_shift_type"),
        ({**FLUX, "base_image_seq_len": 4096}, "base_image_seq_len"),
        ({**WAN, "flow_shift": 0.0}, "flow_shift = 0.0 must be > 0"),
    ],
)
def test_configs_ddpm_does_not_model_are_errors(
    tmp_path: Path, config: dict[str, Any], words: str
) -> None:
    with pytest.raises(ScheduleError, match=words):
        build_schedule(ScheduleRequest(from_file=str(_folder(tmp_path, config))))


def test_keys_other_diffusers_schedulers_know_are_accepted(tmp_path: Path) -> None:
    # SD 1.5's PNDM config carries clip_sample, which PNDMScheduler does not take: diffusers
    # accepts it, so must ddpm
    config = {
        "_class_name": "PNDMScheduler",
        "beta_schedule": "scaled_linear",
        "clip_sample": False,
    }
    assert load_scheduler_config(_folder(tmp_path, config)).flow is None


@pytest.mark.parametrize(
    ("request_args", "words"),
    [
        ({"from_file": "sd3", "params": {"mu": 1.0}}, "shifts statically"),
        (
            {"from_file": "flux-dev", "steps": "4", "params": {"mu": 1.0}, "resolution": 512},
            "both set",
        ),
        ({"from_file": "sd3", "steps": "4", "spacing": "trailing"}, "do not apply"),
        ({"from_file": "sd3", "steps": "ddim4"}, "step count"),
        ({"from_file": "sd15", "resolution": 512}, "not a flow with dynamic shifting"),
        ({"from_file": "sd3", "zero_terminal_snr": True}, "VP schedules"),
        ({"kind": "flow", "image_seq_len": 0}, "image_seq_len"),
        ({"kind": "cosine", "resolution": 512}, "kind flow"),
    ],
)
def test_bad_flow_requests_name_the_parameter(request_args: dict[str, Any], words: str) -> None:
    with pytest.raises(ParameterError, match=words):
        build_schedule(ScheduleRequest(**request_args))


def test_dynamic_shift_without_mu_is_an_error_with_steps(tmp_path: Path) -> None:
    folder = _folder(tmp_path, FLUX)
    with pytest.raises(ParameterError, match="mu"):
        build_schedule(ScheduleRequest(from_file=str(folder), steps="8"))
    # without --steps the unshifted training table is shown (the shift waits for mu)
    table = build_schedule(ScheduleRequest(from_file=str(folder))).schedule
    assert table.sigma_t[0].item() == pytest.approx(1 / 1000)


def test_cli_from_a_flow_folder(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    folder = _folder(tmp_path, SD3, "sd3")
    result = cli(
        "schedule", "--from", str(folder), "--steps", "8", "--format", "csv", "--columns", "sigma_t"
    )
    assert result.exit_code == 0, result.stderr
    values = [float(v) for v in result.stdout.split()[1:]]
    assert values[0] == pytest.approx(0.008928571827709675, rel=1e-15) and values[-1] == 1.0
    bad = _folder(tmp_path, {"_class_name": "EDMEulerScheduler"}, "edm")
    result = cli("schedule", "--from", str(bad))
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("Error: ")
    result = cli("schedule", "--from", str(_folder(tmp_path, FLUX, "flux")), "--steps", "4")
    assert (
        result.exit_code == 2 and "--resolution" in result.stderr and "--param mu=" in result.stderr
    )


# ---- ddpm check on flow configs ---------------------------------------------------------------


def _findings(cli, *args: str) -> dict[str, dict[str, Any]]:  # type: ignore[no-untyped-def]
    result = cli("check", *args, "--format", "json")
    assert result.exit_code == 0, result.stderr
    return {row["code"]: row for row in json.loads(result.stdout)}


def test_check_finds_the_double_shift_of_sd3(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    found = _findings(cli, "--from", str(_folder(tmp_path, SD3)), "--steps", "8")
    twice = found["shift_applied_twice"]
    assert twice["severity"] == "warning" and twice["t"] == [8]  # timestep 8.93, its last
    assert "0.00892857" in twice["message"] and "0.00299401" in twice["message"]
    assert "flow_starts_at_s1" in found
    # no VP alpha_bar precision findings on a flow
    assert not any(code.startswith(("float32_alpha", "float16_alpha")) for code in found)
    # Flux's pipeline passes its own sigmas: no double shift there
    assert "shift_applied_twice" not in _findings(cli, "--from", "flux@1024", "--steps", "8")


def test_check_dynamic_shift_needs_mu_and_warns_outside_the_fitted_range(
    cli, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    folder = str(_folder(tmp_path, FLUX))
    missing = _findings(cli, "--from", folder)["dynamic_shift_without_mu"]
    assert "--resolution" in missing["message"] and "--param mu=X" in missing["message"]
    inside = _findings(cli, "--from", folder, "--image-seq-len", "4096")
    assert "seq_len_extrapolated" not in inside and "dynamic_shift_without_mu" not in inside
    outside = _findings(cli, "--from", folder, "--image-seq-len", "8192")["seq_len_extrapolated"]
    assert "[256, 4096]" in outside["message"] and "1.84333" in outside["message"]
    # the config records shift 3 but the grid at 512 px is shifted by e^0.63
    differs = _findings(cli, "--from", folder, "--resolution", "512")["training_shift_differs"]
    assert differs["severity"] == "info" and "1.878" in differs["message"]


def test_check_integer_and_low_precision_grids(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    wan = {**WAN, "flow_shift": 5.0}
    folder = str(_folder(tmp_path, wan))
    found = _findings(cli, "--from", folder, "--steps", "500")
    repeats = found["timestep_repeats"]
    from ddpmcli.core import scheduler_grids as sg

    grid = sg.unipc_flow_grid(500, flow_shift=5.0)
    values = grid.timesteps.tolist()
    count = sum(values[i] == values[i - 1] for i in range(1, 500))
    assert repeats["message"].startswith(f"{count} of the 500 timesteps repeat") and count > 0
    assert "bfloat16_s_rounds_to_1" in found and "bfloat16_timesteps_collide" in found
    # bfloat16 is not in play without --dtype: its findings are notes there, warnings with it
    assert found["bfloat16_s_rounds_to_1"]["severity"] == "info"
    half = _findings(cli, "--from", folder, "--steps", "500", "--dtype", "bfloat16")
    assert half["bfloat16_s_rounds_to_1"]["severity"] == "warning"


def test_lint_flow_library_training_shift() -> None:
    from ddpmcli.flow_checks import lint_flow
    from ddpmcli.scheduler_classes import flow_settings

    settings = flow_settings(SD3, "FlowMatchEulerDiscreteScheduler", "sd3")
    codes = {f.code for f in lint_flow(settings, steps=28, train_shift=1.0)}
    assert "training_shift_differs" in codes
    assert "training_shift_differs" not in {f.code for f in lint_flow(settings, train_shift=3.0)}


@pytest.mark.parametrize("key", ["use_karras_sigmas", "use_exponential_sigmas"])
def test_euler_sigma_grid_config_steps_is_diffusers(cli, tmp_path: Path, key: str) -> None:  # type: ignore[no-untyped-def]
    # stabilityai/stable-diffusion-xl-base-1.0's Euler config with a sigma grid switched on
    config = {
        "_class_name": "EulerDiscreteScheduler",
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "timestep_spacing": "leading",
        "steps_offset": 1,
        key: True,
    }
    built = build_schedule(ScheduleRequest(from_file=str(_folder(tmp_path, config)), steps="12"))
    sched = _diffusers(config)
    sched.set_timesteps(12)
    schedule = built.schedule
    assert schedule.path == "vp" and built.respaced
    assert torch.equal(schedule.sigma.flip(0).to(torch.float32), sched.sigmas[:-1])
    # timesteps interpolated in float32 log sigma: within 1e-4 of diffusers' (numpy's float32 log)
    torch.testing.assert_close(
        schedule.model_timestep.flip(0), sched.timesteps.to(torch.float64), rtol=0, atol=1e-4
    )
    result = cli("schedule", "--from", str(tmp_path / "model"), "--steps", "12", "-f", "csv")
    assert result.exit_code == 0 and result.stdout.splitlines()[1].split(",")[1] != "0"


def test_api_schedule_from_config_is_what_the_cli_prints(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import ddpmcli

    ours = ddpmcli.schedule(from_config=FLUX, steps=8, resolution=512)
    folder = _folder(tmp_path, FLUX)
    result = cli(
        "schedule", "--from", str(folder), "--steps", "8", "--resolution", "512", "-f", "json"
    )
    assert result.exit_code == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [row["sigma_t"] for row in rows] == ours.sigma_t.tolist()
    assert [row["timestep"] for row in rows] == ours.model_timestep.tolist()
    with pytest.raises(ScheduleError, match="unknown key"):
        ddpmcli.schedule(from_config={**SD3, "shfit": 1.0})


@pytest.mark.parametrize(
    ("config", "args", "code", "words"),
    [
        ({**SD3, "shift": 0}, [], 1, "shift = 0.0 must be > 0"),
        (SD3, ["--param", "mu=1"], 2, "shifts statically"),
        # UniPC ignores mu without use_dynamic_shifting, DPMSolver asserts: both a usage error here
        (WAN, ["--steps", "4", "--param", "mu=1"], 2, "shifts statically"),
        (FLUX, ["--steps", "4", "--image-seq-len", "0"], 2, "--image-seq-len must be"),
        (
            {
                "_class_name": "EulerDiscreteScheduler",
                "use_karras_sigmas": True,
                "sigma_min": 20.0,
                "sigma_max": 10.0,
            },
            ["--steps", "4"],
            2,
            "sigma_min (20.0) must be below sigma_max (10.0)",
        ),
        (
            {**SD3, "shift": 1.0, "shift_terminal": 0.5, "use_dynamic_shifting": True},
            ["--steps", "1", "--param", "mu=1"],
            1,
            "is not a noise schedule",
        ),
    ],
)
def test_bad_flow_input_is_one_error_line(  # type: ignore[no-untyped-def]
    cli, tmp_path: Path, config: dict[str, Any], args: list[str], code: int, words: str
) -> None:
    result = cli("schedule", "--from", str(_folder(tmp_path, config)), *args)
    assert result.exit_code == code, result.stderr
    assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1
    assert words in result.stderr


@pytest.mark.parametrize(
    "params", [{"shift": 3.0}, {"mu": 1.15}, {"mu": 2.0, "linear_time_shift": 1.0}]
)
def test_kind_flow_steps_is_the_flow_match_grid(params: dict[str, float]) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    built = build_schedule(ScheduleRequest(kind="flow", params=dict(params), steps="28"))
    dynamic = "mu" in params
    sched = FlowMatchEulerDiscreteScheduler(
        shift=params.get("shift", 1.0),
        use_dynamic_shifting=dynamic,
        time_shift_type="linear" if params.get("linear_time_shift") else "exponential",
    )
    sched.set_timesteps(28, mu=params.get("mu"))
    assert built.respaced and built.schedule.path == "flow"
    assert torch.equal(built.schedule.sigma_t.flip(0), sched.sigmas[:-1].to(torch.float64))
    assert torch.equal(built.schedule.model_timestep.flip(0), sched.timesteps.to(torch.float64))
    # with an explicit spacing, the training table respaced as before
    spaced = build_schedule(
        ScheduleRequest(kind="flow", params=dict(params), steps="28", spacing="trailing")
    )
    assert spaced.schedule.num_steps == 28 and not torch.equal(
        spaced.schedule.sigma_t, built.schedule.sigma_t
    )


def test_check_on_the_kind_flow(cli) -> None:  # type: ignore[no-untyped-def]
    found = _findings(cli, "--kind", "flow", "--param", "shift=3", "--steps", "8")
    assert "shift_applied_twice" in found and "zero_snr_with_epsilon" not in found
