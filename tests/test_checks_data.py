"""Issue 8 leftovers on data and vocabulary: data outside a checkpoint's range is warned about
(fraction and fix), `--data-range LO,HI` for programs, info and train, `--data-shape` taken from
`--data`, `train --train-steps` (alias `--steps`), `sample --references` (old `--reference`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ddpmcli.checks import data_outside_range

PROGRAM_FLAGS = ("--trust-program", "--kind", "linear", "--prediction-type", "epsilon")


class HalfOfX(torch.nn.Module):
    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x * 0.5


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A TorchScript program without metadata and a ring of radius 3 (400 points)."""
    where = tmp_path_factory.mktemp("data_range")
    program = where / "prog.pt"
    torch.jit.save(torch.jit.script(HalfOfX()), str(program))
    angle = np.linspace(0.0, 2 * np.pi, 400, endpoint=False)
    ring = where / "ring.npy"
    np.save(ring, np.stack([3 * np.cos(angle), 3 * np.sin(angle)], axis=1))
    return {"program": program, "ring": ring}


def outside_share(path: Path, lo: float, hi: float) -> str:
    values = np.load(path)
    return f"{100 * float(((values < lo) | (values > hi)).mean()):.3g}%"


def test_library_message_names_the_parameter() -> None:
    x = torch.tensor([[-3.0, 0.5], [0.0, 2.0]])
    message = data_outside_range(x, (-1.0, 1.0), "a{b}.npy")
    assert message is not None
    assert message.startswith("50% of the values of a{{b}}.npy lie outside the model's data range")
    assert message.endswith("pass {data_range} -3,2")
    assert data_outside_range(x, (-3.0, 2.0), "x") is None


def test_reconstruct_warns_with_fraction_and_fix(cli, files) -> None:
    ring, program = str(files["ring"]), str(files["program"])
    # no --data-shape: the program has no metadata, the shape comes from --data
    args = ("reconstruct", program, *PROGRAM_FLAGS, "--data", ring, "--n", "400", "--t", "0")
    result = cli(*args, "--format", "tsv")
    assert result.exit_code == 0, result.stderr
    share = outside_share(files["ring"], -1.0, 1.0)
    warning = [line for line in result.stderr.splitlines() if line.startswith("Warning:")]
    assert warning == [
        f"Warning: {share} of the values of {ring} lie outside the model's data range [-1, 1] "
        "(the data span [-3, 3]): the model never saw such values, and x0_hat clipped to its "
        "range cannot reach them. Map the data into the range, train on the data as it is "
        "(train records its own range), or, if the checkpoint's range is wrong, pass "
        "--data-range -3,3"
    ]
    clipped = float(result.stdout.splitlines()[1].split("\t")[-1])
    assert clipped > 0.5
    fixed = cli(*args, "--data-range", "-3,3", "--format", "tsv", "-q")
    assert fixed.exit_code == 0, fixed.stderr
    assert fixed.stderr == ""
    assert float(fixed.stdout.splitlines()[1].split("\t")[-1]) < 0.01  # clip_fraction (noise)


def test_nll_warns_too(cli, files) -> None:
    result = cli(
        "nll", str(files["program"]), *PROGRAM_FLAGS, "--data", str(files["ring"]), "--n", "8",
        "--every", "500", "--format", "tsv", "-q",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert result.stderr.startswith("Warning: ")
    assert "outside the model's data range [-1, 1]" in result.stderr


def test_program_without_shape_or_data_still_needs_data_shape(cli, files) -> None:
    result = cli("reconstruct", str(files["program"]), *PROGRAM_FLAGS, "--n", "4")
    assert result.exit_code == 1
    assert "no data-shape in the checkpoint's metadata; pass --data-shape" in result.stderr


def test_info_data_range(cli, files) -> None:
    result = cli(
        "info", str(files["program"]), "--kind", "linear", "--prediction-type", "v",
        "--data-shape", "2", "--data-range", "0,3", "--format", "json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert '"data_min": 0.0' in result.stdout and '"data_max": 3.0' in result.stdout


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("3,1", "Error: --data-range '3,1': want finite LO < HI"),
        ("0,inf", "Error: --data-range '0,inf': want finite LO < HI"),
        ("a,1", "Error: --data-range 'a,1': want LO,HI (two numbers, e.g. -1,1)"),
        ("1", "Error: --data-range '1': want LO,HI (two numbers, e.g. -1,1)"),
    ],
)
def test_bad_data_range_is_a_usage_error(cli, files, value: str, error: str) -> None:
    result = cli("info", str(files["program"]), "--data-range", value)
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [error]


def test_train_data_range_and_train_steps(cli, files, tmp_path: Path) -> None:
    out = tmp_path / "r.pt"
    result = cli(
        "train", "--data", str(files["ring"]), "--train-steps", "2", "--data-range", "-1,1",
        "--out", str(out), "-q",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    share = outside_share(files["ring"], -1.0, 1.0)
    assert result.stderr.strip().splitlines() == [
        f"Warning: {share} of the values of {files['ring']} lie outside the data range given "
        "[-1, 1] (the data span [-3, 3]): the checkpoint would record a range that does not "
        "hold its own data, and sampling and reconstruct clip x0_hat to it; widen --data-range "
        "(-3,3) or drop it to record the data's own range"
    ]
    info = cli("info", str(out), "--format", "tsv").stdout.splitlines()
    row = dict(zip(info[0].split("\t"), info[1].split("\t"), strict=True))
    assert (row["data_min"], row["data_max"], row["train_steps"]) == ("-1.0", "1.0", "2")
    # --steps, the README's spelling, is an alias of --train-steps
    # (a second run onto the same --out needs --force: issue 20)
    again = cli(
        "train", "--data", str(files["ring"]), "--steps", "3", "--out", str(out), "-q", "--force"
    )
    assert again.exit_code == 0, again.stderr
    assert again.stderr == ""  # its own range [-3, 3] is recorded: nothing outside
    info = cli("info", str(out), "--format", "tsv").stdout.splitlines()
    row = dict(zip(info[0].split("\t"), info[1].split("\t"), strict=True))
    assert (row["data_min"], row["data_max"], row["train_steps"]) == ("-3.0", "3.0", "3")
    assert "--train-steps" in cli("train", "--help", env={"COLUMNS": "200"}).stdout


def test_sample_references_and_hidden_old_spelling(cli, files, tmp_path: Path) -> None:
    out = tmp_path / "m.pt"
    assert cli("train", "--data", "moons", "--steps", "2", "--out", str(out), "-q").exit_code == 0
    base = ("sample", str(out), "--n", "16", "--steps", "2", "--summary", "--format", "json")
    new = cli(*base, "--references", "moons", "-q")
    old = cli(*base, "--reference", "moons", "-q")
    assert new.exit_code == 0 and old.exit_code == 0, new.stderr + old.stderr
    assert new.stdout == old.stdout
    both = cli(*base, "--references", "moons", "--reference", "gmm")
    assert both.exit_code == 2
    assert "--references and --reference cannot be used together" in both.stderr
    help_text = cli("sample", "--help", env={"COLUMNS": "200"}).stdout
    assert "--references" in help_text and "--reference " not in help_text
