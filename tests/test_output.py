"""The output layer: exact text per format, full-precision floats, inf/nan, atomic writes."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ddpmcli.errors import DdpmError, UsageError
from ddpmcli.output import (
    atomic_write,
    atomic_write_text,
    check_writable,
    emit,
    format_machine,
    format_table_value,
    progress,
    resolve_format,
    warn,
)

ROWS = [
    {"t": 0, "beta": 0.0001, "snr": math.inf, "name": "a"},
    {"t": 1, "beta": 0.0097916123456789, "snr": math.nan, "name": "b,c"},
]
COLS = ["t", "beta", "snr", "name"]


def render(fmt: str, rows=ROWS, cols=COLS, **kwargs) -> str:
    out = io.StringIO()
    emit(rows, cols, fmt, stream=out, **kwargs)
    return out.getvalue()


def test_csv_exact() -> None:
    assert render("csv") == 't,beta,snr,name\n0,0.0001,inf,a\n1,0.0097916123456789,nan,"b,c"\n'


def test_tsv_exact_and_no_header() -> None:
    assert (
        render("tsv") == "t\tbeta\tsnr\tname\n0\t0.0001\tinf\ta\n1\t0.0097916123456789\tnan\tb,c\n"
    )
    assert render("tsv", no_header=True) == "0\t0.0001\tinf\ta\n1\t0.0097916123456789\tnan\tb,c\n"
    assert render("csv", no_header=True).startswith("0,0.0001,")


def test_json_is_valid_with_null_for_non_finite() -> None:
    text = render("json")
    data = json.loads(text)  # strict: would fail on NaN/Infinity literals
    assert data == [
        {"t": 0, "beta": 0.0001, "snr": None, "name": "a"},
        {"t": 1, "beta": 0.0097916123456789, "snr": None, "name": "b,c"},
    ]
    assert "NaN" not in text and "Infinity" not in text


def test_jsonl_exact() -> None:
    assert render("jsonl") == (
        '{"t": 0, "beta": 0.0001, "snr": null, "name": "a"}\n'
        '{"t": 1, "beta": 0.0097916123456789, "snr": null, "name": "b,c"}\n'
    )


def test_empty_outputs() -> None:
    assert render("json", rows=[]) == "[]\n"
    assert render("jsonl", rows=[]) == ""
    assert render("csv", rows=[]) == "t,beta,snr,name\n"


def test_table_rounds_and_right_aligns_numbers() -> None:
    text = render("table", title="demo")
    lines = text.splitlines()
    assert lines[0].strip() == "demo"
    header = lines[1]
    assert header.split() == COLS
    first, second = lines[3], lines[4]
    assert "0.00979161" in second and "0.0097916123456789" not in text
    assert "inf" in first and "nan" in second
    # right-aligned numbers end in the same column
    assert first.index("0.0001") + len("0.0001") == second.index("0.00979161") + len("0.00979161")
    assert all(line == line.rstrip() for line in lines)


def test_auto_is_tsv_when_not_a_terminal() -> None:
    assert resolve_format("auto", io.StringIO()) == "tsv"

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert resolve_format("auto", Tty()) == "table"
    with pytest.raises(UsageError, match="allowed"):
        resolve_format("xml")


def test_value_formatting() -> None:
    assert format_machine(True) == "true"
    assert format_machine(None) == ""
    assert format_machine(-math.inf) == "-inf"
    assert format_table_value(1234567.891) == "1.23457e+06"
    assert format_table_value(-math.inf) == "-inf"


def test_numpy_and_torch_scalars_print_as_numbers() -> None:
    import numpy as np
    import torch

    rows = [{"a": np.float64(0.1), "b": torch.tensor(0.25, dtype=torch.float64), "c": np.int64(3)}]
    assert render("csv", rows=rows, cols=["a", "b", "c"]) == "a,b,c\n0.1,0.25,3\n"
    assert json.loads(render("json", rows=rows, cols=["a", "b", "c"])) == [
        {"a": 0.1, "b": 0.25, "c": 3}
    ]


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_machine_floats_round_trip_exactly(value: float) -> None:
    text = render("csv", rows=[{"x": value}], cols=["x"], no_header=True)
    back = float(next(csv.reader(io.StringIO(text)))[0])
    assert (math.isnan(value) and math.isnan(back)) or back == value


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_json_floats_round_trip_exactly(value: float) -> None:
    assert json.loads(render("json", rows=[{"x": value}], cols=["x"]))[0]["x"] == value


def test_warn_goes_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    warn("careful [not markup]")
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "Warning: careful [not markup]" in captured.err


def test_progress_is_silent_off_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    with progress(3, "work") as bar:
        for _ in range(3):
            bar.advance()
    with progress(3, "work", quiet=True) as bar:
        bar.advance(2)
    assert capsys.readouterr() == ("", "")


def test_progress_shows_live_fields_on_a_terminal() -> None:
    """On a real terminal (a pty) the bar shows the extra fields it was given, updated live."""
    import os
    import pty
    import subprocess
    import sys

    code = (
        "from ddpmcli.output import progress\n"
        "with progress(4, 'training', fields={'loss': '-'}) as bar:\n"
        "    for k in range(1, 5):\n"
        "        bar.update(completed=k, loss=f'{1 / k:.4f}')\n"
    )
    leader, follower = pty.openpty()
    done = subprocess.run(
        [sys.executable, "-c", code], stdin=follower, stdout=follower, stderr=follower,
        env={**os.environ, "COLUMNS": "120", "TERM": "xterm"}, timeout=60, check=False,
    )  # fmt: skip
    os.close(follower)
    out = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    os.close(leader)
    assert done.returncode == 0
    text = out.decode(errors="replace")
    assert "training" in text and "loss 0.2500" in text


def test_atomic_write_replaces_and_keeps_permissions(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.txt"
    atomic_write_text(target, "one", make_parents=True)
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.txt"]


def test_atomic_write_failure_leaves_nothing_behind(tmp_path: Path) -> None:
    target = tmp_path / "out.png"
    target.write_text("old")

    def half_then_fail(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_write(target, half_then_fail)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]

    def interrupted(tmp: Path) -> None:
        tmp.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "new.png", interrupted)
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]


def test_atomic_write_reports_os_errors(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(DdpmError, match="cannot write"):
        atomic_write_text(blocker / "x.txt", "data")


def test_check_writable(tmp_path: Path) -> None:
    assert (
        check_writable(tmp_path / "new" / "deeper" / "x.png", create_parents=True)
        == tmp_path / "new" / "deeper" / "x.png"
    )
    with pytest.raises(UsageError, match="folder .* does not exist"):
        check_writable(tmp_path / "new" / "deeper" / "x.png")
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UsageError, match="not a directory"):
        check_writable(blocker / "x.png")
    with pytest.raises(UsageError, match="is a directory"):
        check_writable(tmp_path)
    with pytest.raises(UsageError, match="not writable"):
        check_writable("/proc/ddpm-test.png")
    assert not (tmp_path / "new").exists()  # checking creates nothing


# ---------------------------------------------------------------------------------------------
# tables that fit a real terminal (issue 8): every command's default table, in a pty


def test_fit_columns_keeps_the_first_and_skips_what_does_not_fit() -> None:
    from ddpmcli.output import fit_columns

    # widths 5 + (2+10) + (2+30) + (2+4) = 55; the 30-wide one is skipped at 30 columns
    assert fit_columns([5, 10, 30, 4], 55) == [0, 1, 2, 3]
    assert fit_columns([5, 10, 30, 4], 30) == [0, 1, 3]
    assert fit_columns([50, 3], 20) == [0]  # the key column stays, however narrow the screen


def test_column_min_width_keeps_numbers_and_headers_whole() -> None:
    from ddpmcli.output import column_min_width

    assert column_min_width("t", ["999", "4.03583e-05"], [True, True]) == 11
    assert column_min_width("clip_fraction", ["0"], [True]) == 13
    # prose wraps down to 20 columns; a long single word (a path) up to 32 stays whole
    assert column_min_width("message", ["a " * 60], [False]) == 20
    assert column_min_width("path", ["x" * 28], [False]) == 28
    assert column_min_width("path", ["x" * 90], [False]) == 32


def test_piped_table_uses_columns_env_and_notes_what_it_left_out(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [{"t": 0, "a_long_header": 1.5, "b": 4.03583e-05, "c": "x"}]
    monkeypatch.setenv("COLUMNS", "24")
    text = render("table", rows=rows, cols=["t", "a_long_header", "b", "c"])
    assert text.splitlines()[0].split() == ["t", "a_long_header", "c"]
    assert capsys.readouterr().err == (
        "left out to fit 24 columns: b (pick columns with --columns, or see every column with "
        "--format csv, tsv or json)\n"
    )
    monkeypatch.delenv("COLUMNS")
    render("table", rows=rows, cols=["t", "a_long_header", "b", "c"], columns_option=False)
    assert capsys.readouterr().err == ""  # 80 columns when piped: everything fits


@pytest.fixture(scope="module")
def tiny_ckpts(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Two small 2-D checkpoints (T = 100, 30 optimiser steps) with reference samples."""
    import torch

    from ddpmcli import core
    from ddpmcli.checkpoints import save_native_checkpoint
    from ddpmcli.data import builtin_dataset
    from ddpmcli.training import train_denoiser

    root = tmp_path_factory.mktemp("tty")
    sched = core.make_schedule("linear", 100, scale_to_timesteps=True)
    data = builtin_dataset("moons", 256, seed=0)
    trained = train_denoiser(
        data, sched, steps=30, batch_size=64, lr=3e-3, seed=0, threads=1,
        hparams={"hidden": 32, "num_blocks": 1, "time_dim": 16},
    )  # fmt: skip
    paths = []
    for name in ("first.pt", "second_with_a_longer_name.pt"):
        paths.append(str(save_native_checkpoint(
            root / name, trained.model, architecture=trained.architecture,
            hparams=trained.hparams, schedule=sched, prediction_type="epsilon",
            data_shape=(2,), reference_samples=data[:64].to(torch.float32),
        )))  # fmt: skip
    return paths


def _in_pty(argv: list[str], width: int) -> tuple[int, str, str]:
    """Run ``ddpm argv`` in-process with stdout on a real pseudo-terminal ``width`` columns wide
    (stderr captured apart); return (status, what the terminal received, stderr)."""
    import fcntl
    import pty
    import struct
    import sys
    import termios
    import threading

    from ddpmcli.cli.root import run

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, width, 0, 0))
    attrs = termios.tcgetattr(slave)
    attrs[1] &= ~termios.OPOST  # no "\n" -> "\r\n": what the program wrote, byte for byte
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    received = bytearray()

    def drain() -> None:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the slave side is closed and everything was read
                return
            if not chunk:
                return
            received.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    saved = sys.stdout, sys.stderr, os.environ.pop("COLUMNS", None)
    out = open(slave, "w", encoding="utf-8", closefd=False)  # noqa: SIM115
    sys.stdout, sys.stderr = out, io.StringIO()
    try:
        code = run(argv)
        out.flush()
        err = sys.stderr.getvalue()
    finally:
        sys.stdout, sys.stderr = saved[0], saved[1]
        if saved[2] is not None:
            os.environ["COLUMNS"] = saved[2]
        os.close(slave)
        reader.join(timeout=60)
        os.close(master)
    return code, received.decode("utf-8"), err


_ANSI = __import__("re").compile(r"\x1b\[[0-9;]*m")


def _check_table(text: str, width: int, rows: list[dict[str, str]], err: str) -> None:
    """No line wider than ``width``; headers are whole column names; every shown number appears
    whole on its row's line; the columns left out are the ones the stderr note names."""
    lines = [_ANSI.sub("", line) for line in text.splitlines()]
    assert lines and max(len(line) for line in lines) <= width, max(lines, key=len)
    rule = next(k for k, line in enumerate(lines) if line.startswith("─"))
    shown = lines[rule - 1].split()
    assert shown and all(name in rows[0] for name in shown), shown
    left_out = [c for c in rows[0] if c not in shown]
    if left_out:
        assert f"left out to fit {width} columns: {', '.join(left_out)} " in err, err
    else:
        assert "left out" not in err
    body = lines[rule + 1 :]
    numeric = [c for c in shown if all(_is_float(row[c]) or not row[c] for row in rows)]
    if all(len(row[c]) <= 20 for row in rows for c in shown if c not in numeric):
        assert len(body) == len(rows)  # nothing wrapped: one line per row
    tokens = " ".join(body).split()
    at = 0
    for row in rows:  # every number whole, in row order
        for name in numeric:
            if row[name]:
                at = tokens.index(format_table_value(float(row[name])), at) + 1


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("width", [80, 120])
def test_every_command_default_table_fits_a_real_terminal(
    width: int, tiny_ckpts: list[str]
) -> None:
    first, second = tiny_ckpts
    commands = [
        ["schedule", "--kind", "cosine"],
        ["compare", "linear", "cosine"],
        ["posterior", "--kind", "linear"],
        ["check", "--kind", "scaled_linear", "--steps", "50", "--spacing", "leading"],
        ["reconstruct", first, "--n", "16"],
        ["sample", first, "--n", "16", "--steps", "10"],
        ["sample", first, "--n", "16", "--steps", "10", "--summary"],
        ["nll", first, "--n", "16", "--every", "10"],
        ["info", first, second],
    ]
    for argv in commands:
        code, text, err = _in_pty(argv, width)  # stderr is not a terminal: no progress bars
        assert code == 0, (argv, err)
        status, csv_text, _ = _in_pty([*argv, "--format", "csv"], width)
        rows = list(csv.DictReader(io.StringIO(csv_text)))
        _check_table(text, width, rows, err)
