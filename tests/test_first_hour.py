"""Issue 20, the first hour of a new user: outputs that never clobber, errors that say what was
meant before the slow part, defaults that agree, the same numbers on every thread count."""

from __future__ import annotations

import hashlib
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
    # a bare --plot never replaces a tracked file (the gallery lives in docs/gallery/)
    assert _git("ls-files", "plots").stdout == ""
    assert "docs/gallery/compare.png" in _git("ls-files", "docs/gallery").stdout.split()


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
        assert "add_output_options(parser" in text, script.name
        assert "results/" not in text.replace("benchmarks/results/", ""), script.name


def test_package_data_names_only_files_that_exist() -> None:
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for package, patterns in config["tool"]["setuptools"]["package-data"].items():
        for pattern in patterns:
            assert list((ROOT / package).glob(pattern)), f"{package}/{pattern} matches nothing"
