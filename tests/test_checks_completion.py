"""Shell completion (issue 8): kinds and aliases, compare specs, columns per command, built-in
data names; the completers keep `ddpm --help` free of torch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from ddpmcli import core
from ddpmcli.cli.completion import BUILTIN_DATA, column_names


def complete(runner: CliRunner, words: str) -> list[str]:
    """What typer's bash script would offer for the command line ``words`` (the last word is the
    one being completed; a trailing space starts a new one)."""
    from ddpmcli.cli.app import app

    cword = len(words.split()) - (0 if words.endswith(" ") else 1)
    env = {"_DDPM_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(cword)}
    result = runner.invoke(app, [], env=env, prog_name="ddpm")
    assert result.exit_code == 0, result.output
    return result.stdout.split()


@pytest.mark.parametrize(
    ("words", "offered"),
    [
        ("ddpm schedule --kind co", ["cosine"]),
        ("ddpm check -k squ", ["squaredcos_cap_v2"]),
        ("ddpm train --kind sig", ["sigmoid", "sigmoid_logsnr"]),
        ("ddpm compare linear sc", ["scaled_linear"]),
        ("ddpm compare cosine:T=", []),  # past the kind: nothing (the shell offers files)
        ("ddpm schedule --columns t,alpha_b", ["t,alpha_bar", "t,alpha_bar_prev"]),
        ("ddpm reconstruct x.pt --columns exc", ["excess_mse", "excess_stderr"]),
        ("ddpm nll x.pt -c bits", ["bits_per_dim"]),
        ("ddpm info x.pt --columns data_", ["data_shape", "data_min", "data_max"]),
        ("ddpm nll x.pt --data s", ["swiss_roll", "shapes"]),
        ("ddpm sample x.pt --references m", ["moons"]),
        ("ddpm train --data g", ["gmm"]),
        ("ddpm reconstruct x.pt --data ./", []),  # a path: the shell completes files
    ],
)
def test_completion_offers(runner: CliRunner, words: str, offered: list[str]) -> None:
    assert complete(runner, words) == offered


def test_every_kind_and_alias_is_offered(runner: CliRunner) -> None:
    want = [*core.SCHEDULE_KINDS, *core.SCHEDULE_ALIASES, "custom"]
    assert complete(runner, "ddpm reconstruct x.pt --kind ") == want
    assert complete(runner, "ddpm schedule -k ") == want


def test_columns_already_listed_are_not_offered_again(runner: CliRunner) -> None:
    offered = complete(runner, "ddpm sample x.pt --columns step,t,")
    assert offered and all(item.startswith("step,t,") for item in offered)
    assert "step,t,step" not in offered and "step,t,t" not in offered


def test_completion_copies_match_the_library() -> None:
    from ddpmcli import data, run
    from ddpmcli.cli import completion
    from ddpmcli.cli.checkpoint import INFO_COLUMNS, MODEL_COLUMNS

    assert completion.KINDS == tuple(core.SCHEDULE_KINDS)
    assert completion.KIND_ALIASES == tuple(core.SCHEDULE_ALIASES)
    assert completion.QUANTITIES == core.QUANTITIES
    assert tuple(data.BUILTIN_DATASETS) == BUILTIN_DATA
    assert completion.STEP_COLUMNS == run.STEP_COLUMNS
    assert completion.BOUND_COLUMNS == run.BOUND_COLUMNS
    assert completion.AGGREGATE_COLUMNS == run.AGGREGATE_COLUMNS
    assert completion.OPTIMAL_COLUMNS == run.OPTIMAL_COLUMNS
    assert column_names("info") == [*INFO_COLUMNS, *MODEL_COLUMNS]
    assert column_names("sample") == list(run.STEP_COLUMNS)
    assert column_names("train") == []


@pytest.mark.parametrize("words", ["ddpm schedule --kind co", "ddpm nll x.pt --columns bi"])
def test_completing_values_imports_no_torch(words: str) -> None:
    code = (
        "import atexit, sys\n"
        "atexit.register(lambda: sys.stderr.write(f'torch={\"torch\" in sys.modules}'))\n"
        "from ddpmcli.cli.app import main\n"
        "main([])\n"
    )
    env = {
        **os.environ,
        "_DDPM_COMPLETE": "complete_bash",
        "COMP_WORDS": words,
        "COMP_CWORD": str(len(words.split()) - 1),
    }
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
        check=False,
    )  # fmt: skip
    assert done.stdout.split() in (["cosine"], ["bits_per_dim"])
    assert done.stderr.endswith("torch=False"), done.stderr


def test_help_stays_free_of_torch() -> None:
    code = (
        "import sys\n"
        "from ddpmcli.cli.app import run_main\n"
        "for argv in (['--help'], ['schedule', '--help'], ['reconstruct', '--help']):\n"
        "    assert run_main(argv) == 0\n"
        "print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
