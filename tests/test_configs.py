"""Schedules from files and strings: diffusers scheduler configs (against an independent float32
numpy evaluation of diffusers' definitions, and diffusers itself when installed), custom
betas/alpha_bars files, compare specs."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ddpmcli import core
from ddpmcli.configs import (
    ScheduleRequest,
    build_schedule,
    load_custom_schedule,
    load_scheduler_config,
    read_numbers,
)
from ddpmcli.errors import ScheduleError, ScheduleParameterError, UsageError
from ddpmcli.limits import MAX_TIMESTEPS
from ddpmcli.specs import parse_compare_spec


def diffusers_alphas_cumprod_f32(config: dict[str, Any]) -> np.ndarray:
    """diffusers' DDPMScheduler.__init__ schedule, re-evaluated in float32 numpy from its
    definitions (schedulers/scheduling_ddpm.py): linspace in float32; scaled_linear squares a
    float32 linspace of sqrt ends; squaredcos_cap_v2 is betas_for_alpha_bar (Python floats,
    min(1 - f(t2)/f(t1), 0.999), then float32); sigmoid(linspace(-6, 6)) * (end - start) + start;
    rescale_zero_terminal_snr (Lin et al. 2024 Alg. 1) on float32 betas; float32 cumprod."""
    big_t = config.get("num_train_timesteps", 1000)
    start = config.get("beta_start", 0.0001)
    end = config.get("beta_end", 0.02)
    kind = config.get("beta_schedule", "linear")
    f32 = np.float32
    if config.get("trained_betas") is not None:
        betas = np.asarray(config["trained_betas"], dtype=f32)
    elif kind == "linear":
        betas = np.linspace(start, end, big_t, dtype=f32)
    elif kind == "scaled_linear":
        betas = np.linspace(start**0.5, end**0.5, big_t, dtype=f32) ** 2
    elif kind == "squaredcos_cap_v2":

        def f(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = np.array(
            [min(1 - f((i + 1) / big_t) / f(i / big_t), 0.999) for i in range(big_t)], dtype=f32
        )
    elif kind == "sigmoid":
        x = np.linspace(-6, 6, big_t, dtype=f32)
        betas = (f32(1) / (f32(1) + np.exp(-x))) * f32(end - start) + f32(start)
    else:
        raise AssertionError(kind)
    if config.get("rescale_betas_zero_snr"):
        s = np.sqrt(np.cumprod(f32(1) - betas, dtype=f32))
        s0, s_last = s[0].copy(), s[-1].copy()
        s = (s - s_last) * s0 / (s0 - s_last)
        ab = s**2
        betas = f32(1) - np.concatenate([ab[:1], ab[1:] / ab[:-1]])
    return np.cumprod(f32(1) - betas.astype(f32), dtype=f32)


CONFIGS = [
    {"beta_schedule": "linear"},
    {"beta_schedule": "linear", "num_train_timesteps": 500, "beta_end": 0.01},
    {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    {"beta_schedule": "squaredcos_cap_v2"},
    {"beta_schedule": "sigmoid"},
    {"beta_schedule": "linear", "rescale_betas_zero_snr": True},
    {
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "rescale_betas_zero_snr": True,
    },
    {"beta_schedule": "squaredcos_cap_v2", "rescale_betas_zero_snr": True},
    {"trained_betas": [0.001, 0.01, 0.1, 0.5]},
]


def write_config(folder: Path, config: dict[str, Any]) -> Path:
    path = folder / "scheduler_config.json"
    path.write_text(json.dumps({"_class_name": "DDPMScheduler", **config}))
    return path


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: json.dumps(c, sort_keys=True))
def test_diffusers_config_matches_float32_reference(tmp_path: Path, config: dict[str, Any]) -> None:
    loaded = load_scheduler_config(write_config(tmp_path, config))
    ours = loaded.schedule.alpha_bar.numpy()
    reference = diffusers_alphas_cumprod_f32(config).astype(np.float64)
    assert ours.shape == reference.shape
    # float32 precision: diffusers' own float32 cumprod drifts by a few ulps per step, so compare
    # to a few 1e-7 absolute (alpha_bar <= 1) and a few 1e-5 relative where alpha_bar is tiny.
    np.testing.assert_allclose(ours, reference, rtol=5e-5, atol=2e-6)
    if config.get("rescale_betas_zero_snr"):
        assert ours[-1] == 0.0 and reference[-1] == 0.0


def test_diffusers_itself_when_installed(tmp_path: Path) -> None:
    diffusers = pytest.importorskip("diffusers")
    for config in CONFIGS:
        folder = tmp_path / str(abs(hash(json.dumps(config, sort_keys=True))))
        folder.mkdir()
        write_config(folder, config)
        theirs = diffusers.DDPMScheduler.from_pretrained(folder).alphas_cumprod.double().numpy()
        ours = load_scheduler_config(folder).schedule.alpha_bar.numpy()
        np.testing.assert_allclose(ours, theirs, rtol=5e-5, atol=2e-6)


def test_config_settings_and_folder_lookup(tmp_path: Path) -> None:
    (tmp_path / "scheduler").mkdir()
    write_config(
        tmp_path / "scheduler",
        {
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "prediction_type": "v_prediction",
            "timestep_spacing": "trailing",
            "steps_offset": 1,
            "clip_sample": False,
        },
    )
    config = load_scheduler_config(tmp_path)  # a pipeline folder
    assert config.path == tmp_path / "scheduler" / "scheduler_config.json"
    assert (config.prediction_type, config.timestep_spacing, config.steps_offset) == (
        "v_prediction",
        "trailing",
        1,
    )
    assert config.clip_sample is False and config.class_name == "DDPMScheduler"
    assert config.schedule.num_steps == 1000
    respaced = config.respaced(10)
    assert respaced.timesteps.tolist()[-1] == 999  # trailing visits T-1
    assert config.respaced(10, "leading").timesteps.tolist()[:2] == [1, 101]  # steps_offset 1


def test_config_defaults_are_ddpm_scheduler_defaults(tmp_path: Path) -> None:
    config = load_scheduler_config(write_config(tmp_path, {}))
    assert config.beta_schedule == "linear" and config.prediction_type == "epsilon"
    assert config.timestep_spacing == "leading" and config.variance_type == "fixed_small"
    assert float(config.schedule.beta[-1]) == 0.02


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"beta_schedule": "laplace_v9"}', "'laplace_v9' is not supported"),
        ('{"num_train_timesteps": "1000"}', "num_train_timesteps"),
        ('{"num_train_timesteps": 0}', "num_train_timesteps must be between 1 and 10000000, got 0"),
        ('{"beta_start": 1.5}', "beta_start=1.5"),
        ('{"rescale_betas_zero_snr": "yes"}', "rescale_betas_zero_snr"),
        ('{"prediction_type": "noise"}', "'noise'"),
        ('{"timestep_spacing": "middle"}', "'middle'"),
        ('{"trained_betas": [0.1, NaN]}', "index 1"),
        ('{"trained_betas": "0.1"}', "trained_betas"),
    ],
)
def test_malformed_config_names_file_and_problem(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "scheduler_config.json"
    path.write_text(text)
    with pytest.raises(ScheduleError) as info:
        load_scheduler_config(path)
    assert str(path) in str(info.value) and fragment in str(info.value)
    assert info.value.exit_code == 1  # a bad file is not a usage error, even for beta_start


def test_missing_config(tmp_path: Path) -> None:
    with pytest.raises(ScheduleError, match="no such file"):
        load_scheduler_config(tmp_path / "nope.json")
    with pytest.raises(ScheduleError, match="scheduler_config.json"):
        load_scheduler_config(tmp_path)


# ---------------------------------------------------------------------------------------------
# custom files


BETAS = [0.001, 0.01, 0.1]


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("b.txt", "0.001\n0.01\n\n0.1  # last\n"),
        ("b.csv", "0.001\n0.01\n0.1\n"),
        ("b.csv", "t,beta\n0,0.001\n1,0.01\n2,0.1\n"),
        ("b.tsv", "betas\n0.001\n0.01\n0.1\n"),
        ("b.json", "[0.001, 0.01, 0.1]"),
        ("b.json", '{"betas": [0.001, 0.01, 0.1]}'),
        ("b.json", '[{"t": 0, "beta": 0.001}, {"t": 1, "beta": 0.01}, {"t": 2, "beta": 0.1}]'),
    ],
)
def test_custom_betas_every_format(tmp_path: Path, name: str, content: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    assert read_numbers(path, "betas") == BETAS
    schedule = load_custom_schedule(path, "betas")
    assert schedule.beta.tolist() == BETAS
    assert schedule.name == f"custom:{name}"


def test_custom_npy_and_alpha_bars(tmp_path: Path) -> None:
    path = tmp_path / "ab.npy"
    np.save(path, np.array([0.9, 0.5, 0.1]))
    schedule = load_custom_schedule(path, "alpha_bars")
    assert schedule.alpha_bar.tolist() == pytest.approx([0.9, 0.5, 0.1], rel=1e-15)
    csv = tmp_path / "ab.csv"
    csv.write_text("t,alpha_bar,snr\n0,0.9,9\n1,0.5,1\n")
    assert read_numbers(csv, "alpha_bars") == [0.9, 0.5]


@pytest.mark.parametrize(
    ("name", "content", "what", "fragment"),
    [
        ("b.txt", "0.01\nnan\n0.02\n", "betas", "index 1"),
        ("b.txt", "0.01\ninf\n", "betas", "index 1"),
        ("b.json", "[0.01, null]", "betas", "index 1"),
        ("b.txt", "0.01\n1.5\n", "betas", "beta[1] = 1.5"),
        ("b.txt", "0.01\nabc\n", "betas", "line 2"),
        ("b.txt", "", "betas", "no numbers"),
        ("ab.txt", "0.9\n0.8\n0.85\n", "alpha_bars", "index 2"),
        ("ab.txt", "0.9\n0.9\n", "alpha_bars", "index 1"),
        ("ab.txt", "1.0\n0.5\n", "alpha_bars", "index 0"),
        ("b.csv", "a,b\n1,2\n", "betas", "no betas column"),
        ("b.csv", "0.1,0.2\n", "betas", "2 columns"),
        ("b.json", '{"x": [1]}', "betas", "'betas'"),
        ("b.yaml", "- 0.1\n", "betas", "'.yaml'"),
    ],
)
def test_bad_custom_files(
    tmp_path: Path, name: str, content: str, what: str, fragment: str
) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ScheduleError) as info:
        load_custom_schedule(path, what)  # type: ignore[arg-type]
    assert str(path) in str(info.value) and fragment in str(info.value)
    assert info.value.exit_code == 1


def test_bad_npy(tmp_path: Path) -> None:
    path = tmp_path / "b.npy"
    np.save(path, np.ones((2, 2)))
    with pytest.raises(ScheduleError, match="1-D"):
        load_custom_schedule(path)
    with pytest.raises(ScheduleError, match="no such file"):
        load_custom_schedule(tmp_path / "missing.npy")


# ---------------------------------------------------------------------------------------------
# requests and compare specs


def test_build_schedule_transforms_through_the_core() -> None:
    built = build_schedule(
        ScheduleRequest(
            kind="scaled_linear", zero_terminal_snr=True, steps="10", spacing="trailing"
        )
    )
    expected = core.respace(
        core.make_schedule("scaled_linear", zero_terminal_snr=True),
        core.respaced_timesteps(1000, 10, "trailing"),
    )
    assert built.respaced and built.schedule.name == expected.name
    assert built.schedule.alpha_bar.tolist() == expected.alpha_bar.tolist()
    shifted = build_schedule(ScheduleRequest(kind="cosine", logsnr_shift=-1.0)).schedule
    assert (
        shifted.log_snr.tolist()
        == core.shift_logsnr(core.make_schedule("cosine"), -1.0).log_snr.tolist()
    )


@pytest.mark.parametrize(
    ("request_", "message", "flags"),
    [
        (
            ScheduleRequest(kind="cosine", from_file="x.json"),
            "from_file and kind cosine cannot be used together",
            "--from and --kind cosine cannot be used together",
        ),
        (
            ScheduleRequest(from_file="x.json", betas_file="b.txt"),
            "from_file and betas_file cannot be used together",
            "--from and --betas-file cannot be used together",
        ),
        (
            ScheduleRequest(kind="linear", betas_file="b.txt"),
            "betas_file builds a custom schedule; it cannot be combined with kind linear",
            "--betas-file builds a custom schedule; it cannot be combined with --kind linear",
        ),
        (
            ScheduleRequest(betas_file="b.txt", timesteps=10),
            "timesteps cannot be combined with betas_file (the file fixes the schedule)",
            "-T/--timesteps cannot be combined with --betas-file (the file fixes the schedule)",
        ),
        (
            ScheduleRequest(kind="custom"),
            "kind custom needs betas_file FILE or alpha_bars_file FILE",
            "--kind custom needs --betas-file FILE or --alpha-bars-file FILE",
        ),
        (
            ScheduleRequest(spacing="trailing"),
            "spacing needs steps",
            "--spacing needs --steps",
        ),
        (
            ScheduleRequest(kind="{x}", from_file="x.json"),
            "from_file and kind {x} cannot be used together",
            "--from and --kind {x} cannot be used together",
        ),
    ],
)
def test_conflicting_requests_fail_before_reading_files(
    request_: ScheduleRequest, message: str, flags: str
) -> None:
    """The library names parameters; the CLI's mapping (as_flags) shows the flags."""
    from ddpmcli.cli.schedule_options import SCHEDULE_FLAG_NAMES
    from ddpmcli.errors import ParameterError

    with pytest.raises(ParameterError) as caught:
        build_schedule(request_)
    assert str(caught.value) == message
    assert caught.value.exit_code == 2
    shown = caught.value.render(lambda p: SCHEDULE_FLAG_NAMES.get(p) or "--" + p.replace("_", "-"))
    assert shown == flags


def test_spec_errors_name_spec_keys() -> None:
    with pytest.raises(UsageError) as caught:
        parse_compare_spec("cosine:spacing=trailing")
    assert str(caught.value) == "spec 'cosine:spacing=trailing': spacing needs steps"
    with pytest.raises(UsageError) as caught:
        parse_compare_spec("cosine:T=0")
    assert str(caught.value) == f"spec 'cosine:T=0': T must be between 1 and {MAX_TIMESTEPS}, got 0"


def test_compare_specs() -> None:
    spec = parse_compare_spec("linear:beta_end=0.012,T=500")
    assert spec.label == "linear:beta_end=0.012,T=500"
    assert spec.built.schedule.num_steps == 500 and float(spec.built.schedule.beta[-1]) == 0.012
    zsnr = parse_compare_spec("scaled_linear+zsnr").built.schedule
    assert float(zsnr.snr[-1]) == 0.0
    assert parse_compare_spec("squaredcos_cap_v2").built.schedule.spec["kind"] == "cosine"
    respaced = parse_compare_spec("cosine:steps=ddim50,zsnr=1").built
    assert respaced.respaced and respaced.schedule.num_steps == 50
    shifted = parse_compare_spec("cosine:logsnr_shift=2,s=0.01").built.schedule
    base = core.make_schedule("cosine", s=0.01)
    assert shifted.log_snr.tolist() == core.shift_logsnr(base, 2.0).log_snr.tolist()


def test_compare_spec_files(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"beta_schedule": "squaredcos_cap_v2"})
    assert parse_compare_spec(str(path)).built.config is not None
    betas = tmp_path / "b.txt"
    betas.write_text("0.1\n0.2\n")
    assert parse_compare_spec(f"custom:betas={betas}").built.schedule.beta.tolist() == [0.1, 0.2]


@pytest.mark.parametrize(
    ("text", "error", "fragment"),
    [
        ("", UsageError, "empty"),
        ("nope", ScheduleParameterError, "'nope'"),
        ("cosine+zero", UsageError, "+zero"),
        ("cosine:s", UsageError, "key=value"),
        ("cosine:T=ten", UsageError, "'ten'"),
        ("cosine:s=abc", UsageError, "'abc'"),
        ("cosine:foo=1", ScheduleParameterError, "'foo'"),
        ("linear:T=0", UsageError, "'linear:T=0': T must be between 1 and 10000000, got 0"),
        ("missing.json", ScheduleError, "no such file"),
    ],
)
def test_bad_compare_specs(text: str, error: type[Exception], fragment: str) -> None:
    with pytest.raises(error) as info:
        parse_compare_spec(text)
    assert fragment in str(info.value)
    if text:
        assert repr(text) in str(info.value)
