"""Hostile outputs, terminals and signals: symlinked and non-regular outputs, case-insensitive
suffixes, missing folders, over-long names, control characters and markup in data, `$` in figure
names, Ctrl-C at several moments, closed or full stdout/stderr and broken pipes.

Where the behaviour is about file descriptors or signals the test runs a real `python -m ddpmcli`
subprocess. Each CLI case asserts the exit status, one `Error:` line (or none), and that no stray
file is left behind.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ddpmcli.errors import DdpmError, ExitStatus, UsageError
from ddpmcli.files import atomic_write, atomic_write_text, check_writable
from ddpmcli.output import emit, escape_control

DDPM = [sys.executable, "-m", "ddpmcli"]
FORMATS = ["table", "csv", "tsv", "json", "jsonl"]
CONFIG = (
    '{"_class_name": "DDPMScheduler", "num_train_timesteps": 20, "beta_schedule": "linear", '
    '"beta_start": 0.0001, "beta_end": 0.02}'
)


def ddpm(args: list[str], cwd: Path | None = None, **kwargs: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*DDPM, *args], capture_output=True, text=True, timeout=120, cwd=cwd, **kwargs
    )  # type: ignore[call-overload]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("Error:")]


# ---------------------------------------------------------------------------------------------
# files: symlinks, non-regular outputs, suffixes, folders, lengths


def test_symlinked_output_updates_the_target_and_keeps_the_link(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "model.pt"
    target.write_text("old")
    link = tmp_path / "link.pt"
    link.symlink_to(target)
    assert check_writable(link) == link
    assert atomic_write_text(link, "new") == link
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.pt", "real"]
    assert [p.name for p in (tmp_path / "real").iterdir()] == ["model.pt"]


def test_dangling_symlink_output_creates_its_target(tmp_path: Path) -> None:
    link = tmp_path / "link.txt"
    link.symlink_to(tmp_path / "made.txt")
    atomic_write_text(link, "x")
    assert link.is_symlink() and (tmp_path / "made.txt").read_text() == "x"


@pytest.mark.parametrize("kind", ["fifo", "directory", "device"])
def test_non_regular_outputs_are_refused_before_any_work(tmp_path: Path, kind: str) -> None:
    out = tmp_path / "out.npz"
    if kind == "fifo":
        os.mkfifo(out)
        expected = "a FIFO"
    elif kind == "directory":
        out.mkdir()
        expected = "is a directory"
    else:
        if os.geteuid() != 0:
            pytest.skip("creating a device node needs root")
        os.mknod(out, 0o666 | 0o020000, os.makedev(1, 3))  # a /dev/null twin
        expected = "a device"
    link = tmp_path / "via-link.npz"
    link.symlink_to(out)
    for path in (out, link):
        with pytest.raises(UsageError, match=expected):
            check_writable(path)
        called: list[Path] = []
        with pytest.raises(UsageError, match=expected):
            atomic_write(path, called.append)
        assert called == []  # refused before the writer ran
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.npz", "via-link.npz"]


def test_fifo_output_on_the_command_line_is_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fig.png")
    done = ddpm(["schedule", "-T", "5", "--plot", "fig.png", "--format", "csv"], cwd=tmp_path)
    assert done.returncode == ExitStatus.USAGE, done.stderr
    assert error_lines(done.stderr) == [
        "Error: cannot write plot 'fig.png': it is a FIFO, not a regular file"
    ]
    assert done.stdout == ""  # refused before any rows
    assert [p.name for p in tmp_path.iterdir()] == ["fig.png"]


@pytest.mark.parametrize("name", ["OUT.NPZ", "out.Npz", "out.npz"])
def test_upper_case_suffix_writes_the_data_to_the_named_file(tmp_path: Path, name: str) -> None:
    # np.savez appends .npz to a name not ending in lower-case .npz: the temporary name must
    # end in it, or the data lands in a stray file and the output is left empty.
    out = tmp_path / name
    atomic_write(out, lambda tmp: np.savez(tmp, samples=np.arange(6.0)))
    assert [p.name for p in tmp_path.iterdir()] == [name]
    with np.load(out) as archive:
        assert archive["samples"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    npy = tmp_path / "X.NPY"
    atomic_write(npy, lambda tmp: np.save(tmp, np.ones(3)))
    assert np.load(npy).tolist() == [1.0, 1.0, 1.0]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, "X.NPY"])


def test_upper_case_figure_suffix(tmp_path: Path) -> None:
    done = ddpm(["schedule", "-T", "5", "--plot", "FIG.PNG", "--format", "csv"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["FIG.PNG"]
    assert (tmp_path / "FIG.PNG").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_parent_folder_is_a_usage_error_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        check_writable(tmp_path / "nope" / "s.npz")
    with pytest.raises(DdpmError, match="No such file"):
        atomic_write_text(tmp_path / "nope" / "s.txt", "x")
    done = ddpm(["schedule", "-T", "5", "--plot", "nope/fig.png", "--format", "csv"], cwd=tmp_path)
    assert done.returncode == ExitStatus.USAGE
    assert error_lines(done.stderr) == [
        "Error: cannot write plot 'nope/fig.png': folder 'nope' does not exist"
    ]
    assert done.stdout == ""
    assert list(tmp_path.iterdir()) == []  # nothing created


def test_default_plot_folder_is_still_created(tmp_path: Path) -> None:
    done = ddpm(["schedule", "-T", "5", "--plot", "--format", "csv"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert [p.name for p in (tmp_path / "plots").iterdir()] == ["schedule.png"]


def test_long_names_are_checked_before_training(tmp_path: Path) -> None:
    # 250 characters fit (the temporary name is short and fixed); 300 do not, and are refused
    # before the training starts, not after.
    fits = tmp_path / ("c" * 247 + ".pt")
    assert check_writable(fits) == fits
    atomic_write_text(fits, "ok")
    assert fits.read_text() == "ok"
    fits.unlink()
    name = "c" * 297 + ".pt"
    start = time.monotonic()
    done = ddpm(["train", "--steps", "100000", "--out", name, "--quiet"], cwd=tmp_path)
    assert time.monotonic() - start < 60
    assert done.returncode == ExitStatus.USAGE, done.stderr
    assert error_lines(done.stderr) == [
        f"Error: cannot write checkpoint '{name}': file name is 300 bytes, longer than the 255 "
        "this filesystem allows"
    ]
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# terminal safety

HOSTILE = "m[red].pt\x1b]0;owned\x07\x1b[2J\ttab\nnl\x9b\u202e[/]"
ESCAPED = "m[red].pt\\x1b]0;owned\\x07\\x1b[2J\\ttab\\nnl\\x9b\\u202e[/]"


def test_escape_control() -> None:
    assert escape_control(HOSTILE) == ESCAPED
    assert escape_control("plain é ü [b] \\ $x$") == "plain é ü [b] \\ $x$"
    assert escape_control("\x00\x7f") == "\\x00\\x7f"


@pytest.mark.parametrize("fmt", ["table", "csv", "tsv"])
def test_control_characters_and_markup_print_literally(fmt: str) -> None:
    out = io.StringIO()
    emit([{"name": HOSTILE, "value": "[/]", "x": 1.5}], ["name", "value", "x"], fmt, stream=out)
    text = out.getvalue()
    assert not any(ch in text for ch in "\x1b\x07\x9b\u202e")
    lines = text.splitlines()
    if fmt == "table":
        assert ESCAPED in lines[-1] and "[/]" in lines[-1]
    else:
        sep = "," if fmt == "csv" else "\t"
        assert len(lines) == 2  # the newline in the value did not split the row
        assert lines[1].split(sep)[1:] == ["[/]", "1.5"]
        assert ESCAPED in lines[1]


def test_markup_and_escapes_in_a_file_name_on_the_command_line(tmp_path: Path) -> None:
    name = "m[red]\x1b[2J.json"
    (tmp_path / name).write_text(CONFIG)
    for fmt in ("table", "csv", "tsv"):
        done = ddpm(["compare", "linear", name, "--format", fmt], cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert "\x1b" not in done.stdout
        assert "m[red]\\x1b[2J.json" in done.stdout
    missing = "gone[/]\x1b]0;x\x07.pt"
    done = ddpm(["info", missing], cwd=tmp_path)
    assert done.returncode != 0
    assert "\x1b" not in done.stderr and "\x07" not in done.stderr
    assert len(error_lines(done.stderr)) == 1
    assert "gone[/]\\x1b]0;x\\x07.pt" in done.stderr


def test_dollar_in_a_name_shows_literally_in_the_figure(tmp_path: Path) -> None:
    (tmp_path / "a$x.json").write_text(CONFIG)
    done = ddpm(
        ["compare", "linear", "a$x.json", "--plot", "c$.svg", "--format", "csv"], cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    # the legend names the spec by its stem (issue 20: short labels); svg.fonttype none: text
    assert "a$x (terminal SNR" in (tmp_path / "c$.svg").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a$x.json", "c$.svg"]


# ---------------------------------------------------------------------------------------------
# signals and streams


@pytest.mark.parametrize("delay", [0.15, 0.4, 3.0])
def test_ctrl_c_at_any_moment_prints_one_line_and_exits_130(tmp_path: Path, delay: float) -> None:
    # 0.15 s and 0.4 s: our start-up imports (typer, the commands); 3 s: inside a long run.
    proc = subprocess.Popen(
        [*DDPM, "schedule", "-T", "2000000", "--format", "csv", "--plot", "s.png"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal")  # a very fast machine
    assert proc.returncode == ExitStatus.INTERRUPTED, err
    assert error_lines(err) == ["Error: interrupted"], err
    assert "Traceback" not in err and "Exception ignored" not in err
    assert list(tmp_path.iterdir()) == []  # no figure, no temporary file


def test_closed_stdout_gives_one_line_and_exit_1() -> None:
    done = subprocess.run(
        ["sh", "-c", '"$@" >&-', "sh", *DDPM, "schedule", "-T", "5"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == ExitStatus.ERROR
    assert done.stderr == "Error: cannot write output: Bad file descriptor\n"


def test_closed_stderr_keeps_the_exit_status() -> None:
    for args, code in ((["schedule", "--no-such-flag"], 2), (["info", "missing.pt"], 1)):
        done = subprocess.run(
            ["sh", "-c", '"$@" 2>&-', "sh", *DDPM, *args],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == code, args
        assert done.stdout == ""


@pytest.mark.parametrize("args", [["schedule", "-T", "5"], ["--help"]])
def test_full_stdout_gives_one_line_and_exit_1(args: list[str]) -> None:
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [*DDPM, *args], stdout=full, stderr=subprocess.PIPE, text=True, timeout=120
        )
    assert done.returncode == ExitStatus.ERROR
    assert done.stderr == "Error: cannot write output: No space left on device\n"


@pytest.mark.parametrize("fmt", FORMATS)
def test_broken_pipe_exits_0_silently_for_every_format(fmt: str) -> None:
    # more output than a pipe buffers (64 KiB); a rich table renders ~0.4 ms a row, so fewer rows
    rows = "20000" if fmt == "table" else "200000"
    proc = subprocess.Popen(
        [*DDPM, "schedule", "-T", rows, "--format", fmt],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert proc.returncode == ExitStatus.OK, err
    assert err == ""
