"""Issue 20, the first hour of a new user: outputs that never clobber, errors that say what was
meant before the slow part, defaults that agree, the same numbers on every thread count."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TINY_TRAIN = ("train", "--data", "gmm", "--n", "64", "--steps", "2", "--batch-size", "16",
              "--width", "8", "-T", "10", "-q")  # fmt: skip


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_train_never_overwrites_a_checkpoint_without_force(cli, tmp_path: Path) -> None:
    out = tmp_path / "ckpt.pt"
    assert cli(*TINY_TRAIN, "--out", str(out)).exit_code == 0
    before = _md5(out)
    again = cli(*TINY_TRAIN, "--seed", "1", "--out", str(out))
    assert again.exit_code == 2
    assert again.stderr.splitlines() == [
        f"Error: --out {str(out)!r} already exists; pass --force to replace it, or choose "
        "another --out"
    ]
    assert _md5(out) == before
    forced = cli(*TINY_TRAIN, "--seed", "1", "--out", str(out), "--force")
    assert forced.exit_code == 0, forced.stderr
    assert _md5(out) != before


# ---------------------------------------------------------------------------------------------
# a clone stays clean: outputs of the examples and benchmarks go to ignored paths

ROOT = Path(__file__).resolve().parent.parent
IN_GIT = (ROOT / ".git").exists() and shutil.which("git") is not None
COMMANDS = ("schedule", "compare", "posterior", "check", "reconstruct", "sample", "nll")


def _git(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)


@pytest.mark.skipif(not IN_GIT, reason="needs the git checkout")
def test_default_outputs_are_ignored_and_no_gallery_figure_sits_there() -> None:
    defaults = [f"plots/{command}.png" for command in COMMANDS]
    # what the README's main job and examples write, and a benchmark's plain run
    written = ["ckpt.pt", "shapes.pt", "samples.npz", "s.npz", "benchmarks/out/cli.json"]
    ignored = _git("check-ignore", "--no-index", *defaults, *written).stdout.split()
    assert sorted(ignored) == sorted(defaults + written)
    # a bare --plot never replaces a tracked file: the gallery lives in plots/gallery/, the only
    # tracked files under plots/
    tracked = _git("ls-files", "plots").stdout.split()
    assert "plots/gallery/compare.png" in tracked
    assert all(name.startswith("plots/gallery/") for name in tracked)
    # and a figure written there by hand is not ignored (the gallery script's outputs show up)
    assert _git("check-ignore", "--no-index", "plots/gallery/new.png").stdout == ""


def test_every_benchmark_writes_to_an_ignored_folder_unless_recording() -> None:
    import argparse

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from _results import SCRATCH, add_output_options, output_path
    finally:
        sys.path.pop(0)
    parser = argparse.ArgumentParser()
    add_output_options(parser, "x.json")
    assert output_path(parser.parse_args([]), "x.json") == SCRATCH / "x.json"
    assert output_path(parser.parse_args(["--record"]), "x.json").parent.name == "results"
    for script in sorted((ROOT / "benchmarks").glob("bench_*.py")):
        text = script.read_text()
        writes = ".write_text(" in text or "json.dump(" in text  # json.dumps prints
        assert not writes or "output_path(" in text, script.name


def test_package_data_names_only_files_that_exist() -> None:
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for package, patterns in config["tool"]["setuptools"]["package-data"].items():
        for pattern in patterns:
            assert list((ROOT / package).glob(pattern)), f"{package}/{pattern} matches nothing"


# ---------------------------------------------------------------------------------------------
# errors that say what was meant


@pytest.mark.parametrize(
    ("word", "suffix", "better"),
    [("out.jpg", "'.jpg'", "out.png"), ("myplot", "'(no suffix)'", "myplot.png")],
)
def test_a_word_after_plot_that_is_no_figure_gets_the_suffix_rule(cli, word, suffix, better):
    expected = [
        f"Error: --plot '{word}': unknown figure type {suffix}; allowed suffixes: .png, .svg, "
        f".pdf (write --plot {better}, or --plot=PATH)"
    ]
    for args in (("--plot", word), (f"--plot={word}",)):
        result = cli("sample", "missing.pt", *args)
        assert result.exit_code == 2
        assert result.stderr.splitlines() == expected


def test_a_t_out_of_range_is_said_once(cli) -> None:
    alone = cli("schedule", "-T", "50", "--t", "60")
    assert alone.exit_code == 2
    assert alone.stderr.splitlines() == ["Error: --t 60 is out of range; allowed: 0..49"]
    in_range = cli("schedule", "-T", "50", "--t", "0-60")
    assert in_range.stderr.splitlines() == [
        "Error: --t 60 (in '0-60') is out of range; allowed: 0..49"
    ]


# ---------------------------------------------------------------------------------------------
# help and notes at 80 columns

HELP_COMMANDS = ("schedule", "compare", "posterior", "check", "reconstruct", "sample", "nll",
                 "info", "train")  # fmt: skip


def test_help_fits_80_columns_with_whole_examples(cli) -> None:
    for command in HELP_COMMANDS:
        text = cli(command, "--help", env={"COLUMNS": "80"}).stdout
        assert "--seed <int range>" not in text and "9223372036854775807" not in text
        if "Examples:" not in text:
            continue
        examples = text.split("Examples:")[1].split("\nArguments:")[0].split("\nOptions:")[0]
        continued = False
        for line in filter(str.strip, examples.splitlines()):
            # each example is a whole command, or a shell continuation of the line before
            assert line.lstrip().startswith("ddpm ") or continued, (command, line)
            assert len(line) <= 80, (command, line)
            continued = line.endswith(" \\")
        assert not continued, command
    seed = cli("sample", "--help", env={"COLUMNS": "80"}).stdout
    assert "--seed INT" in seed


def test_a_note_wraps_between_words_on_a_terminal(monkeypatch) -> None:
    import io

    from rich.console import Console

    from ddpmcli import output

    buffer = io.StringIO()
    monkeypatch.setattr(sys, "stderr", buffer)
    console = Console(file=buffer, force_terminal=True, width=80, color_system=None)
    monkeypatch.setattr(output, "_stderr_console", console)
    words = [f"column_number_{i}" for i in range(12)]
    output.note("left out to fit 80 columns: " + ", ".join(words))
    lines = buffer.getvalue().splitlines()
    assert len(lines) > 1 and all(len(line) <= 80 for line in lines)
    assert " ".join(" ".join(lines).split()) == "left out to fit 80 columns: " + ", ".join(words)
    assert all(line.rstrip().endswith((",", ":")) for line in lines[:-1])  # no word cut in two


# ---------------------------------------------------------------------------------------------
# usage errors before the slow part: no torch import, no checkpoint load

KINDS_ALLOWED = (
    "allowed: linear, scaled_linear, cosine, sigmoid, sigmoid_logsnr, sqrt, laplace, exp, "
    "shifted_cosine, vp, edm"
)
EARLY_ERRORS = [
    (["sample", "missing.pt", "--n", "0"], "Error: --n must be at least 1, got 0"),
    (["sample", "missing.pt", "--eta", "0.5"], "Error: --eta applies to --sampler ddim only"),
    (["nll", "missing.pt", "--n", "0"], "Error: --n must be at least 1, got 0"),
    (
        ["sample", "missing.pt", "--trajectory-every", "10"],
        "Error: --trajectory-every has no effect without --plot; add --plot or drop "
        "--trajectory-every",
    ),
    (["schedule", "--kind", "cosin"], "Error: unknown schedule kind 'cosin' (did you mean"),
    (["check", "-k", "cosin"], "Error: unknown schedule kind 'cosin' (did you mean 'cosine'?)"),
    (["reconstruct", "missing.pt", "--kind", "cosin"], "Error: unknown schedule kind 'cosin'"),
]
_PROBE = (
    "import atexit, sys\n"
    "atexit.register(lambda: sys.__stderr__.write('torch imported: %s\\n' % ('torch' in "
    "sys.modules)))\n"
    "from ddpmcli.cli.app import main\n"
    "sys.argv = ['ddpm', *sys.argv[1:]]\n"
    "main()\n"
)


@pytest.mark.parametrize(
    ("args", "message"), EARLY_ERRORS, ids=[" ".join(a) for a, _ in EARLY_ERRORS]
)
def test_usage_errors_come_before_torch_and_the_checkpoint(
    args: list[str], message: str, tmp_path: Path
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, *args], cwd=tmp_path, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    lines = done.stderr.splitlines()
    assert done.returncode == 2, done.stderr
    assert lines[0].startswith(message), lines
    assert lines[-1] == "torch imported: False"


def test_a_kind_typo_lists_every_name_custom_included(cli) -> None:
    result = cli("schedule", "--kind", "cosin")
    assert result.exit_code == 2
    line = result.stderr.strip()
    assert "(did you mean 'cosine'?)" in line and KINDS_ALLOWED in line
    assert line.endswith(", squaredcos_cap_v2, custom")
    assert cli("schedule", "-k", "COSINE", "--t", "0", "-f", "csv").exit_code == 0


# ---------------------------------------------------------------------------------------------
# same seed, same numbers, on every thread count


def test_cloud_distances_are_the_same_on_one_and_two_threads() -> None:
    import torch

    from ddpmcli.run.distances import cloud_distances

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(512, 2, generator=gen) * 0.5, torch.randn(512, 2, generator=gen) * 0.5
    before = torch.get_num_threads()
    try:
        got = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            got.append(cloud_distances(x, y, seed=0))
    finally:
        torch.set_num_threads(before)
    assert got[0] == got[1]  # to the last digit (main: ...8792 vs ...6571)


def test_energy_distance_against_an_exactly_summed_reference() -> None:
    import itertools
    import math

    import torch

    from ddpmcli.run.distances import energy_distance

    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 3, generator=gen), torch.randn(30, 3, generator=gen) + 0.2
    a, b = x.double().tolist(), y.double().tolist()

    def mean_distance(p: list[list[float]], q: list[list[float]], same: bool) -> float:
        pairs = [math.dist(u, v) for (i, u), (j, v) in itertools.product(enumerate(p), enumerate(q))
                 if not (same and i == j)]  # fmt: skip
        return math.fsum(pairs) / len(pairs)

    expected = (
        2 * mean_distance(a, b, False) - mean_distance(a, a, True) - mean_distance(b, b, True)
    )
    assert energy_distance(x, y) == pytest.approx(expected, rel=1e-13, abs=1e-15)


@pytest.mark.parametrize("command", ["schedule", "check"])
def test_from_a_checkpoint_says_so_and_what_to_run(cli, command: str, tmp_path: Path) -> None:
    import torch

    ckpt = tmp_path / "ckpt.pt"
    torch.save({"format": "ddpmcli"}, ckpt)  # a zip archive, as every torch.save since 1.6
    result = cli(command, "--from", str(ckpt))
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        f"Error: --from {str(ckpt)!r} is a model checkpoint, not a scheduler config: its schedule "
        f"is in `ddpm info {ckpt}` (kind, T, terminal SNR), and `ddpm reconstruct/sample/nll "
        f"{ckpt}` use it; --from takes a diffusers scheduler_config.json or its folder"
    ]


def test_nll_names_its_data_once_and_the_prior_row_has_no_t(cli, tmp_path: Path) -> None:
    from conftest import tiny_mlp_checkpoint

    ckpt = tiny_mlp_checkpoint(tmp_path / "m.pt", 20, references=16)
    result = cli("nll", str(ckpt), "--n", "16", "-f", "json")
    assert result.exit_code == 0, result.stderr
    assert "bits/dim on 16 of the checkpoint's reference samples;" in result.stderr
    rows = json.loads(result.stdout)
    assert [(r["t"], r["term"]) for r in rows[-3:]] == [
        (19, "kl"),
        (None, "prior"),
        (None, "total"),
    ]


# ---------------------------------------------------------------------------------------------
# one spacing rule, one warning


def test_schedule_and_sample_spread_steps_alike_and_warn_alike(cli, tmp_path: Path) -> None:
    from conftest import tiny_mlp_checkpoint

    base = ("--kind", "linear", "-T", "100", "--steps", "10", "-f", "csv")
    default = cli("schedule", *base)
    trailing = cli("schedule", *base, "--spacing", "trailing")
    assert default.exit_code == 0 and default.stdout == trailing.stdout and default.stderr == ""
    warning = (
        "Warning: leading spacing with 10 steps never visits t = 99 (T-1): sampling starts at "
        "t = 90, with less noise than the model was trained to remove; use --spacing trailing"
    )
    found = cli("check", *base[:-2], "--spacing", "leading", "-f", "json")
    codes = {row["code"]: row["message"] for row in json.loads(found.stdout)}
    assert "Warning: " + codes["respacing_skips_last_t"] == warning
    for command in ("schedule", "posterior"):
        leading = cli(command, *base, "--spacing", "leading")
        assert leading.exit_code == 0 and leading.stderr.splitlines()[0] == warning, command
    ckpt = tiny_mlp_checkpoint(tmp_path / "m.pt", 100)
    run = ("sample", str(ckpt), "--n", "4", "--steps", "10", "--summary", "-f", "csv", "-q")
    assert cli(*run).stderr == ""  # the checkpoint has no spacing of its own: trailing
    assert cli(*run, "--spacing", "leading").stderr.splitlines() == [warning]


# ---------------------------------------------------------------------------------------------
# figures with real names, and no library warning on stderr


def test_compare_labels_are_short_and_unique() -> None:
    from ddpmcli.plotting import short_labels

    labels = [
        "linear",
        "runs/a/sd15/scheduler/scheduler_config.json",
        "runs/b/sd15/scheduler/scheduler_config.json",
        "/a/very/long/path/that/would/cover/the/axes/of/the/figure/my_schedule.json",
        "linear",
    ]
    assert short_labels(labels) == ["linear", "a/sd15", "b/sd15", "my_schedule", "linear #2"]


def test_compare_plot_of_long_config_paths_says_nothing_but_where_it_wrote(tmp_path: Path) -> None:
    config = {"beta_schedule": "linear", "num_train_timesteps": 50}
    specs = []
    for k in range(6):
        folder = tmp_path / ("a-folder-with-a-long-descriptive-name-" * 2 + str(k)) / "scheduler"
        folder.mkdir(parents=True)
        (folder / "scheduler_config.json").write_text(json.dumps(config))
        specs.append(str(folder / "scheduler_config.json"))
    out = tmp_path / "c.png"
    # a real process: pytest would catch the warning before it reached stderr
    result = subprocess.run(
        [sys.executable, "-m", "ddpmcli", "compare", *specs, "--plot", str(out), "--t", "0",
         "-f", "csv"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [f"wrote {out}"]  # no matplotlib warning
    assert out.stat().st_size > 0


def test_trajectory_panels_are_evenly_spaced_in_t() -> None:
    from types import SimpleNamespace

    from ddpmcli.plotting.sample import _frames

    # sample --trajectory-every 100 on 1000 steps keeps steps 0, 100, ..., 900 and the last, 999
    steps = [*range(0, 1000, 100), 999]
    frames = [SimpleNamespace(step=s, t=999 - s, x0=None) for s in steps]
    shown = [frame.t for frame in _frames(SimpleNamespace(trajectory=frames))]
    assert shown == [999, 799, 599, 399, 199, 0]  # main: 999, 899, 699, 599, 399, 299, 99, 0
