"""CLI tests of `ddpm schedule|compare|posterior|check` and of the app itself: exact stdout per
format, stderr and exit code checked separately, one `Error:` line for every bad input, real
subprocesses for `python -m ddpmcli` and the installed `ddpm`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ddpmcli import core
from ddpmcli.cli.common import (
    PLOT_DEFAULT,
    parse_key_values,
    parse_t_selection,
    resolve_plot_path,
    select_columns,
    select_rows,
)
from ddpmcli.cli.plot_args import expand_optional_values
from ddpmcli.errors import UsageError

ALL_COMMANDS = ("schedule", "compare", "posterior", "check")


def ok(result) -> str:
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return result.stdout


def one_error(result, code: int, *fragments: str) -> str:
    """The failure contract: nothing on stdout, exactly one `Error:` line, no traceback."""
    assert result.exit_code == code, (result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------------------------------------
# ddpm schedule: exact output per format


def test_one_bare_number(cli) -> None:
    out = ok(
        cli(
            "schedule",
            "--kind",
            "cosine",
            "--t",
            "999",
            "--columns",
            "snr",
            "--format",
            "tsv",
            "--no-header",
        )
    )
    expected = float(core.make_schedule("cosine").snr[999])
    assert out == f"{expected!r}\n"
    assert float(out) == expected


def test_csv_exact(cli) -> None:
    # linear, T = 2: betas are exactly the ends 1e-4 and 0.02; alpha_bar_1 = 0.9999 * 0.98.
    out = ok(cli("schedule", "-T", "2", "--columns", "t,beta,alpha_bar", "--format", "csv"))
    assert out == "t,beta,alpha_bar\n0,0.0001,0.9999\n1,0.02,0.979902\n"


def test_tsv_is_the_piped_default(cli) -> None:
    args = ("schedule", "-T", "2", "--columns", "t,beta,alpha_bar")
    assert ok(cli(*args)) == "t\tbeta\talpha_bar\n0\t0.0001\t0.9999\n1\t0.02\t0.979902\n"
    assert ok(cli(*args, "--format", "tsv")) == ok(cli(*args))


def test_json_and_jsonl_exact(cli) -> None:
    args = ("schedule", "-T", "2", "--columns", "t,beta", "--t", "1")
    assert ok(cli(*args, "--format", "json")) == '[\n  {\n    "t": 1,\n    "beta": 0.02\n  }\n]\n'
    assert ok(cli(*args, "--format", "jsonl")) == '{"t": 1, "beta": 0.02}\n'


def test_json_stays_valid_with_infinite_values(cli) -> None:
    out = ok(
        cli(
            "schedule",
            "--kind",
            "scaled_linear",
            "--zero-terminal-snr",
            "--t",
            "999",
            "--columns",
            "t,snr,log_snr,sqrt_recip_alpha_bar",
            "--format",
            "json",
        )
    )
    assert json.loads(out) == [
        {"t": 999, "snr": 0.0, "log_snr": None, "sqrt_recip_alpha_bar": None}
    ]
    tsv = ok(
        cli(
            "schedule",
            "--kind",
            "scaled_linear",
            "--zero-terminal-snr",
            "--t",
            "999",
            "--columns",
            "log_snr",
            "--no-header",
        )
    )
    assert tsv == "-inf\n"


def test_table_format(cli) -> None:
    out = ok(
        cli(
            "schedule",
            "--kind",
            "cosine",
            "--every",
            "250",
            "--format",
            "table",
            "--columns",
            "t,beta,alpha_bar",
        )
    )
    lines = out.splitlines()
    assert lines[0].strip() == "cosine"
    assert lines[1].split() == ["t", "beta", "alpha_bar"]
    assert [line.split()[0] for line in lines[3:]] == ["0", "250", "500", "750"]
    assert lines[3].split()[1:] == ["4.12842e-05", "0.999959"]


def test_default_columns_are_t_and_every_quantity(cli) -> None:
    header = ok(cli("schedule", "-T", "3", "--format", "csv")).splitlines()[0]
    assert header.split(",") == ["t", *core.QUANTITIES]
    respaced = ok(cli("schedule", "--steps", "5", "--spacing", "trailing", "--format", "csv"))
    lines = respaced.splitlines()
    assert lines[0].split(",")[:2] == ["t", "timestep"]
    assert [line.split(",")[1] for line in lines[1:]] == ["199", "399", "599", "799", "999"]


def test_row_selection(cli) -> None:
    def ts(*args: str) -> list[str]:
        out = ok(cli("schedule", "--columns", "t", "--no-header", *args))
        return out.split()

    assert ts("--t", "0,499,999") == ["0", "499", "999"]
    assert ts("--t", "0:1000:250") == ["0", "250", "500", "750"]
    assert ts("--t", "997-999") == ["997", "998", "999"]
    assert ts("--t", "998:") == ["998", "999"]
    assert ts("--every", "400") == ["0", "400", "800"]


def test_schedule_parameters_reach_the_core(cli) -> None:
    def beta(*args: str) -> list[float]:
        out = ok(cli("schedule", "--columns", "beta", "--no-header", *args))
        return [float(x) for x in out.split()]

    assert beta("-T", "2", "--beta-start", "0.001", "--beta-end", "0.01") == [0.001, 0.01]
    assert beta("-T", "2", "--param", "beta_end=0.01") == [0.0001, 0.01]
    assert beta("-T", "500", "--scale-to-timesteps", "--t", "0") == [pytest.approx(0.0002)]
    capped = beta("--kind", "cosine", "--max-beta", "0.5", "--t", "999")
    assert capped == [0.5]
    assert beta("--kind", "squaredcos_cap_v2", "--t", "5") == beta("--kind", "cosine", "--t", "5")


def test_list_kinds_comes_from_the_registry(cli) -> None:
    out = ok(cli("schedule", "--list-kinds", "--format", "csv"))
    kinds = [line.split(",")[0] for line in out.splitlines()[1:]]
    assert kinds == [*core.SCHEDULE_KINDS, *core.SCHEDULE_ALIASES, "custom"]


def test_custom_files_and_from_config(cli, tmp_path: Path) -> None:
    betas = tmp_path / "betas.txt"
    betas.write_text("0.1\n0.2\n")
    out = ok(cli("schedule", "--betas-file", str(betas), "--columns", "alpha_bar", "--no-header"))
    assert [float(x) for x in out.split()] == [pytest.approx(0.9), pytest.approx(0.72)]
    abars = tmp_path / "ab.json"
    abars.write_text(json.dumps({"alpha_bars": [0.9, 0.5, 0.1]}))
    out = ok(
        cli(
            "schedule",
            "--kind",
            "custom",
            "--alpha-bars-file",
            str(abars),
            "--columns",
            "alpha_bar",
            "--no-header",
        )
    )
    assert [float(x) for x in out.split()] == [
        pytest.approx(0.9),
        pytest.approx(0.5),
        pytest.approx(0.1),
    ]
    cfg = tmp_path / "scheduler_config.json"
    cfg.write_text(
        json.dumps(
            {
                "beta_schedule": "scaled_linear",
                "beta_start": 0.00085,
                "beta_end": 0.012,
                "num_train_timesteps": 1000,
            }
        )
    )
    a = ok(cli("schedule", "--from", str(tmp_path), "--t", "999", "--columns", "sqrt_alpha_bar"))
    b = ok(cli("schedule", "--kind", "scaled_linear", "--t", "999", "--columns", "sqrt_alpha_bar"))
    assert a == b
    # Stable Diffusion's terminal sqrt(alpha_bar) = 0.068265 (Lin et al. 2024, section 3.1).
    assert float(a.split()[1]) == pytest.approx(0.068265, abs=5e-7)


# ---------------------------------------------------------------------------------------------
# bad input: one line, right exit code, no traceback, nothing half-written


def test_compare_plot_before_a_config_file_keeps_the_file_as_a_spec(
    cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `compare cosine --plot sched.json` once took the config as the figure path
    config = tmp_path / "sched.json"
    config.write_text(json.dumps({"beta_schedule": "linear", "num_train_timesteps": 10}))
    monkeypatch.chdir(tmp_path)
    done = cli("compare", "cosine:T=10", "--plot", str(config), "--t", "9", "--format", "csv")
    assert done.exit_code == 0, done.stderr
    assert [line.split(",")[0] for line in done.stdout.splitlines()[1:]] == [
        "cosine:T=10",
        str(config),
    ]
    assert (tmp_path / "plots" / "compare.png").stat().st_size > 0


@pytest.mark.parametrize(
    ("args", "code", "fragments"),
    [
        (["schedule", "--kind", "nope"], 2, ["'nope'", "allowed", "cosine"]),
        (["schedule", "-T", "0"], 2, ["-T/--timesteps must be between 1 and 10000000, got 0"]),
        (["schedule", "--beta-start", "1.5"], 2, ["beta_start=1.5", "(0, 1)"]),
        (["schedule", "--beta-end", "0"], 2, ["beta_end=0", "(0, 1)"]),
        (["schedule", "--kind", "cosine", "--beta-start", "0.1"], 2, ["beta_start", "allowed"]),
        (["schedule", "--t", "1000"], 2, ["1000", "0..999"]),
        (["schedule", "-T", "10", "--t", "0:11"], 2, ["11", "0..10"]),
        (["schedule", "--t", "x"], 2, ["'x'"]),
        (["schedule", "--columns", "snr,bogus"], 2, ["'bogus'", "allowed", "snr"]),
        (["schedule", "--t", "1", "--every", "2"], 2, ["--t and --every"]),
        (["schedule", "--format", "xml"], 2, ["'xml'"]),
        (["schedule", "--no-header", "--format", "json"], 2, ["--no-header"]),
        (["schedule", "--bogus-flag"], 2, ["--bogus-flag"]),
        (["schedule", "--plot=out.jpg"], 2, ["'.jpg'", ".png"]),
        (["schedule", "--plot", "out.jpg"], 2, ["out.jpg"]),  # not a figure suffix: --plot is bare
        (["schedule", "--steps", "50", "--spacing", "sideways"], 2, ["'sideways'", "trailing"]),
        (["schedule", "--spacing", "trailing"], 2, ["--spacing needs --steps"]),
        (["schedule", "--kind", "custom"], 2, ["--betas-file"]),
        (["schedule", "--param", "s"], 2, ["name=value"]),
        (["schedule", "--from", "missing.json"], 1, ["missing.json"]),
        (["compare"], 2, ["SPEC"]),
        (["compare", "cosine", "nope:T=3"], 2, ["'nope'"]),
        (["compare", "cosine", "linear:T=500", "--t", "999"], 2, ["999", "0..499", "linear:T=500"]),
        (["compare", "linear:beta_end=abc"], 2, ["'abc'"]),
        (["posterior", "--v", "2"], 2, ["--v"]),
        (["check", "--prediction-type", "noise"], 2, ["'noise'", "v_prediction"]),
    ],
)
def test_bad_input_is_one_error_line(cli, args: list[str], code: int, fragments: list[str]) -> None:
    one_error(cli(*args), code, *fragments)


def test_bad_files_are_exit_1(cli, tmp_path: Path) -> None:
    rising = tmp_path / "ab.txt"
    rising.write_text("0.9\n0.8\n0.85\n")
    one_error(cli("schedule", "--alpha-bars-file", str(rising)), 1, "ab.txt", "index 2")
    nan = tmp_path / "b.csv"
    nan.write_text("0.01\nnan\n0.02\n")
    one_error(cli("schedule", "--betas-file", str(nan)), 1, "b.csv", "index 1", "nan")
    bad = tmp_path / "scheduler_config.json"
    bad.write_text("{not json")
    for command in ("schedule", "posterior", "check"):
        one_error(cli(command, "--from", str(bad)), 1, "scheduler_config.json", "JSON")
    one_error(cli("compare", str(bad)), 1, "JSON")


def test_plot_path_checked_before_any_work(cli, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    one_error(cli("schedule", "--plot", str(blocker / "x.png")), 2, "not a directory")
    one_error(cli("schedule", "--plot", "/proc/ddpm.png"), 2, "not writable")
    # a failing schedule leaves no figure and no temporary file behind
    target = tmp_path / "figs" / "s.png"
    one_error(cli("schedule", "--kind", "nope", "--plot", str(target)), 2)
    assert not (tmp_path / "figs").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


# ---------------------------------------------------------------------------------------------
# plots


def test_plot_writes_each_suffix_and_names_it_on_stderr(cli, tmp_path: Path) -> None:
    for name in ("s.png", "s.svg", "s.pdf"):
        path = tmp_path / name
        result = cli("schedule", "--kind", "cosine", "-T", "50", "--t", "0", "--plot", str(path))
        ok(result)
        assert path.stat().st_size > 1000
        assert str(path) in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.pdf", "s.png", "s.svg"]


def test_bare_plot_goes_to_plots_folder(
    cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    ok(cli("schedule", "-T", "20", "--plot", "--t", "0"))
    ok(cli("posterior", "-T", "20", "--t", "0", "--plot"))
    ok(cli("compare", "cosine:T=20", "linear:T=30", "--t", "0", "--plot"))
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "compare.png",
        "posterior.png",
        "schedule.png",
    ]


def test_quiet_plot_says_nothing(cli, tmp_path: Path) -> None:
    result = cli("schedule", "-T", "20", "--t", "0", "--plot", str(tmp_path / "a.png"), "-q")
    ok(result)
    assert result.stderr == ""


# ---------------------------------------------------------------------------------------------
# compare, posterior, check


def test_compare_keeps_its_key_columns_under_columns(cli) -> None:
    out = ok(
        cli("compare", "linear", "cosine", "--t", "999", "--columns", "alpha_bar", "-f", "csv")
    )
    assert out == (
        "schedule,t,alpha_bar\n"
        f"linear,999,{float(core.make_schedule('linear').alpha_bar[999])!r}\n"
        f"cosine,999,{float(core.make_schedule('cosine').alpha_bar[999])!r}\n"
    )


def test_compare_long_format(cli) -> None:
    out = ok(
        cli(
            "compare",
            "cosine",
            "linear:beta_end=0.012,T=500",
            "scaled_linear+zsnr",
            "--t",
            "0",
            "--columns",
            "schedule,t,beta",
            "--format",
            "csv",
        )
    )
    assert out == (
        "schedule,t,beta\n"
        f"cosine,0,{float(core.make_schedule('cosine').beta[0])!r}\n"
        '"linear:beta_end=0.012,T=500",0,0.0001\n'
        f"scaled_linear+zsnr,0,"
        f"{float(core.make_schedule('scaled_linear', zero_terminal_snr=True).beta[0])!r}\n"
    )
    header = ok(cli("compare", "cosine", "cosine:steps=10", "--t", "0", "--format", "csv"))
    assert header.splitlines()[0].split(",")[:3] == ["schedule", "t", "timestep"]


def test_posterior_columns_and_golden_value(cli) -> None:
    out = ok(cli("posterior", "--t", "0,487", "--format", "json"))
    rows = json.loads(out)
    assert list(rows[0]) == [
        "t",
        "beta",
        "posterior_variance",
        "variance_ratio",
        "posterior_log_variance_clipped",
        "posterior_mean_coef_x0",
        "posterior_mean_coef_xt",
        "fixed_small",
        "fixed_large",
        "learned_range",
    ]
    # linear schedule's posterior variance at t = 487 (0-based): 0.0097916 (issue 2 golden value).
    assert rows[1]["posterior_variance"] == pytest.approx(0.0097916, abs=5e-8)
    assert rows[0]["posterior_variance"] == 0.0
    # fixed_small clips t = 0 to beta_tilde_1; fixed_large uses beta_tilde_1 at t = 0 too.
    assert rows[0]["fixed_small"] == pytest.approx(rows[0]["fixed_large"])
    assert rows[1]["fixed_large"] == pytest.approx(rows[1]["beta"], rel=1e-14)
    # v = 0 is the geometric mean of the two variances
    assert rows[1]["learned_range"] == pytest.approx(
        (rows[1]["fixed_small"] * rows[1]["fixed_large"]) ** 0.5
    )
    v1 = json.loads(ok(cli("posterior", "--t", "487", "--v", "1", "--format", "json")))
    assert v1[0]["learned_range"] == pytest.approx(v1[0]["beta"])


def test_posterior_prior_kl_goes_to_stderr(cli) -> None:
    result = cli("posterior", "--kind", "linear", "--t", "0", "--columns", "t", "--no-header")
    assert ok(result) == "0\n"
    kl = core.make_schedule("linear").prior_kl_bits_per_dim_unit_variance()
    assert f"{kl!r} bits/dim" in result.stderr
    assert cli("posterior", "--t", "0", "-q").stderr == ""


def findings(result) -> dict[str, str]:
    rows = [line.split("\t") for line in result.stdout.splitlines()[1:]]
    return {code: severity for severity, code, _t, _message in rows}


def test_check_clean_exit_0_with_warnings(cli) -> None:
    result = cli("check", "--kind", "scaled_linear")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines()[0] == "severity\tcode\tt\tmessage"
    got = findings(result)
    assert got["nonzero_terminal_snr"] == "warning"  # sqrt(alpha_bar_999) = 0.068
    assert "zero_snr_with_epsilon" not in got


def test_check_zero_snr_with_epsilon_is_an_error(cli) -> None:
    result = cli("check", "--kind", "scaled_linear", "--zero-terminal-snr")
    assert result.exit_code == 1
    assert result.stderr == ""
    assert findings(result)["zero_snr_with_epsilon"] == "error"
    fine = cli("check", "--kind", "scaled_linear", "--zero-terminal-snr", "--prediction-type", "v")
    assert fine.exit_code == 0
    assert findings(fine)["zero_terminal_snr"] == "info"


def test_check_findings(cli, tmp_path: Path) -> None:
    cosine = findings(cli("check", "--kind", "cosine"))
    assert cosine["beta_cap"] == "warning"
    # float16 is not in play without --dtype float16: notes (issue 20)
    assert cosine["float16_alpha_bar_is_1"] == "info"
    assert cosine["float16_recip_overflow"] == "info"
    half = findings(cli("check", "--kind", "cosine", "--dtype", "float16"))
    assert half["float16_alpha_bar_is_1"] == half["float16_recip_overflow"] == "warning"
    assert cosine["nonzero_terminal_snr"] == "info"
    leading = cli("check", "--steps", "50", "--spacing", "leading")
    assert findings(leading)["respacing_skips_last_t"] == "warning"
    assert "t = 980" in leading.stdout
    assert "respacing_skips_last_t" not in findings(
        cli("check", "--steps", "50", "--spacing", "trailing")
    )
    cfg = tmp_path / "scheduler_config.json"
    cfg.write_text(
        json.dumps(
            {
                "beta_schedule": "linear",
                "timestep_spacing": "leading",
                "rescale_betas_zero_snr": True,
                "prediction_type": "epsilon",
            }
        )
    )
    result = cli("check", "--from", str(cfg))
    assert result.exit_code == 1
    got = findings(result)
    assert got["respacing_skips_last_t"] == "warning"  # probed at 50 steps
    assert got["zero_snr_with_epsilon"] == "error"


# ---------------------------------------------------------------------------------------------
# the app: help, version, shared option parsers


def test_every_command_has_help_with_examples(cli) -> None:
    top = ok(cli("--help"))
    for command in ALL_COMMANDS:
        assert command in top
        text = ok(cli(command, "--help"))
        assert "Examples" in text, command
        assert "0-based" in text, command
        assert "--format" in text or command == "check"


def test_all_registered_commands_have_help_text() -> None:
    import typer.main

    from ddpmcli.cli.app import app

    group = typer.main.get_command(app)
    for name, command in group.commands.items():  # type: ignore[attr-defined]
        assert (command.help or "").strip(), f"ddpm {name} has no help text"


def test_version_and_no_args(cli) -> None:
    from ddpmcli import __version__

    assert ok(cli("--version")) == f"ddpm {__version__}\n"
    bare = cli()
    assert bare.exit_code == 2
    assert "schedule" in bare.stdout + bare.stderr


def test_parse_t_selection() -> None:
    assert parse_t_selection("3,1,3", 5) == [3, 1]
    assert parse_t_selection("0-2,4", 5) == [0, 1, 2, 4]
    assert parse_t_selection(":5:2", 5) == [0, 2, 4]
    assert parse_t_selection(None, 3) == [0, 1, 2]
    for bad, fragment in [
        ("5", "0..4"),
        ("-1", "^--t -1 is out of range; allowed: 0..4$"),  # said once (issue 20)
        ("1:2:0", "step"),
        ("", "empty"),
        ("1:2:3:4", "start:stop"),
    ]:
        with pytest.raises(UsageError, match=fragment):
            parse_t_selection(bad, 5)
    assert select_rows(None, 2, 5) == [0, 2, 4]
    with pytest.raises(UsageError, match="together"):
        select_rows("1", 2, 5)


def test_select_columns_and_params() -> None:
    assert select_columns(None, ["a", "b"]) == ["a", "b"]
    assert select_columns(" b , a ", ["a", "b"]) == ["b", "a"]
    with pytest.raises(UsageError, match="allowed: a, b"):
        select_columns("c", ["a", "b"])
    assert parse_key_values(["s=0.01", "tau=2"]) == {"s": 0.01, "tau": 2.0}
    with pytest.raises(UsageError, match="not a number"):
        parse_key_values(["s=x"])


def test_plot_option_takes_an_optional_value(tmp_path: Path) -> None:
    assert expand_optional_values(["schedule", "--plot"]) == ["schedule", f"--plot={PLOT_DEFAULT}"]
    assert expand_optional_values(["--plot", "--t", "0"]) == [f"--plot={PLOT_DEFAULT}", "--t", "0"]
    assert expand_optional_values(["--plot", "a.svg"]) == ["--plot", "a.svg"]
    assert expand_optional_values(["compare", "--plot", "cosine"])[1] == f"--plot={PLOT_DEFAULT}"
    # exact rule: the next word is the figure only when it ends in a figure suffix, any case
    assert expand_optional_values(["--plot", "A.PNG"]) == ["--plot", "A.PNG"]
    assert expand_optional_values(["--plot", "dir/fig.pdf"]) == ["--plot", "dir/fig.pdf"]
    for word in ("sched.json", "figs/", "linear:beta_end=0.012"):
        assert expand_optional_values(["--plot", word]) == [f"--plot={PLOT_DEFAULT}", word]
    # another image type was meant as the figure: taken, then refused by its suffix (issue 20)
    assert expand_optional_values(["--plot", "out.jpg"]) == ["--plot", "out.jpg"]
    assert expand_optional_values(["--plot=sched.json"]) == ["--plot=sched.json"]
    assert expand_optional_values(["--", "--plot"]) == ["--", "--plot"]
    assert resolve_plot_path(PLOT_DEFAULT, "posterior") == Path("plots/posterior.png")
    assert resolve_plot_path(None, "x") is None
    assert resolve_plot_path(str(tmp_path / "f.PDF"), "x") == tmp_path / "f.PDF"


# ---------------------------------------------------------------------------------------------
# real subprocesses


def run(args: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **kwargs.pop("env", {})}
    return subprocess.run(args, capture_output=True, text=True, timeout=120, env=env, **kwargs)


def test_python_m_ddpmcli() -> None:
    done = run(
        [
            sys.executable,
            "-m",
            "ddpmcli",
            "schedule",
            "--kind",
            "cosine",
            "--t",
            "999",
            "--columns",
            "snr",
            "--format",
            "tsv",
            "--no-header",
        ]
    )
    assert done.returncode == 0, done.stderr
    assert float(done.stdout) == float(core.make_schedule("cosine").snr[999])
    assert done.stderr == ""
    bad = run([sys.executable, "-m", "ddpmcli", "schedule", "-T", "0"])
    assert bad.returncode == 2
    assert bad.stdout == ""
    assert bad.stderr.startswith("Error: ") and bad.stderr.count("\n") == 1


def test_installed_entry_point() -> None:
    exe = shutil.which("ddpm")
    if exe is None:
        pytest.skip("the ddpm console script is not installed (pip install -e .)")
    done = run([exe, "schedule", "-T", "2", "--columns", "t,beta", "--format", "csv"])
    assert (done.returncode, done.stdout, done.stderr) == (0, "t,beta\n0,0.0001\n1,0.02\n", "")
    bad = run([exe, "check", "--kind", "scaled_linear", "--zero-terminal-snr"])
    assert bad.returncode == 1


def test_debug_shows_the_traceback() -> None:
    args = [sys.executable, "-m", "ddpmcli", "schedule", "--kind", "nope"]
    assert "Traceback" not in run(args).stderr
    debug = run(args, env={"DDPM_DEBUG": "1"})
    assert debug.returncode == 2
    assert "Traceback" in debug.stderr
    assert debug.stderr.rstrip().splitlines()[-1].startswith("Error: ")


HELP_IMPORTS = """
import sys
from ddpmcli.cli.app import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
heavy = [m for m in ("torch", "matplotlib", "numpy") if m in sys.modules]
print(",".join(heavy), file=sys.stderr)
"""


@pytest.mark.parametrize("args", [["--help"], ["schedule", "--help"], ["check", "--help"]])
def test_help_imports_no_heavy_modules(args: list[str]) -> None:
    done = run([sys.executable, "-c", HELP_IMPORTS, *args])
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().splitlines()[-1:] in ([], [""]), done.stderr
    assert "schedule" in done.stdout


def test_shell_completion_imports_no_heavy_modules() -> None:
    env = {"_DDPM_COMPLETE": "complete_bash", "COMP_WORDS": "ddpm sch", "COMP_CWORD": "1"}
    code = HELP_IMPORTS.replace("main(sys.argv[1:])", "main([])")
    done = run([sys.executable, "-c", code], env=env)
    assert "schedule" in done.stdout
    assert done.stderr.strip() == "", done.stderr


def test_check_hints_name_flags_and_the_library_names_parameters(cli) -> None:
    """checks words its hints once, naming parameters; `ddpm check` shows them as flags."""
    from ddpmcli import core
    from ddpmcli.checks import lint_schedule

    sched = core.make_schedule("scaled_linear")
    respaced = core.respace(sched, core.respaced_timesteps(1000, 50, "leading"))
    found = {f.code: f for f in lint_schedule(sched, respaced=respaced, spacing="leading")}
    assert found["nonzero_terminal_snr"].message.endswith("; see zero_terminal_snr")
    assert found["respacing_skips_last_t"].message.endswith("; use spacing trailing")
    result = cli(
        "check", "-k", "scaled_linear", "--steps", "50", "--spacing", "leading", "-f", "tsv"
    )
    lines = result.stdout.splitlines()
    assert any(line.endswith("; see --zero-terminal-snr") for line in lines)
    assert any(line.endswith("; use --spacing trailing") for line in lines)
