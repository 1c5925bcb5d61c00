"""Run many ``ddpm`` command lines in one subprocess under a memory cap (the hostile rounds).

``ddpmcli.cli.root.run`` is called once per argv with stdout and stderr captured, so a batch costs
one interpreter start. ``RLIMIT_AS`` is well below the machine's memory: a case that allocated
what it describes would die of the cap (MemoryError, reaching the bug handler) instead of printing
its one ``Error:`` line.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

CAP = 4 * 1024**3
TIME_LIMIT = 60.0
BUG_HINT = "set DDPM_DEBUG=1"

DRIVER = textwrap.dedent(
    """
    import io, json, resource, sys, time
    resource.setrlimit(resource.RLIMIT_AS, ({cap}, {cap}))
    from ddpmcli.cli.root import run
    out = []
    for args in json.loads(sys.argv[1]):
        err, saved, saved_out = io.StringIO(), sys.stderr, sys.stdout
        sys.stderr, sys.stdout = err, io.StringIO()
        start = time.perf_counter()
        try:
            code = run(args)
        except SystemExit as exc:
            code = exc.code
        finally:
            sys.stderr, sys.stdout = saved, saved_out
        out.append([code, err.getvalue(), time.perf_counter() - start])
    print(json.dumps(out))
    """
)


def run_capped(
    cases: list[list[str]], cwd: Path, *, quiet_process: bool = False
) -> list[tuple[int, str, float]]:
    """Each argv run in one subprocess under the memory cap: (exit code, stderr, seconds).

    ``quiet_process``: the process's own stderr must stay empty too (torch's loggers write to the
    real stderr, past the capture)."""
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER.format(cap=CAP), json.dumps(cases)],
        capture_output=True, text=True, cwd=cwd, timeout=len(cases) * TIME_LIMIT + 60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    if quiet_process:
        assert proc.stderr.strip() == "", proc.stderr[-3000:]
    return [tuple(row) for row in json.loads(proc.stdout.strip().splitlines()[-1])]  # type: ignore[misc]


def assert_one_line(row: tuple[int, str, float], code: int, *fragments: str) -> None:
    """One ``Error:`` line (never the bug hint) naming each fragment, exit ``code``, in time."""
    status, stderr, seconds = row
    lines = stderr.strip().splitlines()
    assert status == code, stderr
    assert len(lines) == 1 and lines[0].startswith("Error: "), stderr
    assert BUG_HINT not in lines[0], lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert seconds < TIME_LIMIT, (seconds, lines[0])


def assert_cases(
    cases: list[tuple[list[str], int, list[str]]], rows: list[tuple[int, str, float]]
) -> None:
    """:func:`assert_one_line` for each (argv, exit status, fragments) case and its row, the
    argv named in the failure."""
    for (argv, code, fragments), row in zip(cases, rows, strict=True):
        try:
            assert_one_line(row, code, *fragments)
        except AssertionError as exc:
            raise AssertionError(f"{argv}: {exc}") from None
