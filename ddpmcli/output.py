"""The one output layer: rows on stdout as a table, CSV, TSV, JSON or JSON lines; everything else
(warnings, notes, progress bars) on stderr; files written atomically.

Standard library and rich only (rich imported lazily), so every command can use it without pulling
in torch or numpy.

Value rules, the same for every command:
- machine formats (csv, tsv, json, jsonl) print floats at full precision, as Python's ``repr`` gives
  them (the shortest string that round-trips), so ``float(text) == value`` exactly;
- csv/tsv write non-finite floats as ``inf``, ``-inf`` and ``nan`` (what ``float()`` reads back);
  JSON has no such literals, so json/jsonl write them as ``null`` and the output stays valid JSON;
- booleans are ``true``/``false`` in csv/tsv, ``None`` an empty field (``null`` in JSON);
- only the table rounds (6 significant digits) and right-aligns numbers.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

from ddpmcli.errors import DdpmError, UsageError

if TYPE_CHECKING:
    from rich.console import Console

FORMATS: tuple[str, ...] = ("auto", "table", "csv", "tsv", "json", "jsonl")
MACHINE_FORMATS: tuple[str, ...] = ("csv", "tsv", "json", "jsonl")
TABLE_SIGNIFICANT_DIGITS = 6

Row = Mapping[str, Any]


# ---------------------------------------------------------------------------------------------
# values


def _plain(value: Any) -> Any:
    """A numpy/torch scalar (anything with ``.item()``) as the Python number it holds."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, float):  # np.float64 subclasses float but reprs as np.float64(...)
        return float(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, str):
        return str(value)
    item = getattr(value, "item", None)
    if callable(item):
        try:
            return item()
        except (TypeError, ValueError):
            return value
    return value


def format_machine(value: Any) -> str:
    """One csv/tsv field: full-precision repr for floats; inf/nan as ``float()`` reads them."""
    value = _plain(value)
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)  # 'inf', '-inf', 'nan' for the non-finite ones
    return str(value)


def _json_value(value: Any) -> Any:
    value = _plain(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no inf/nan: null keeps the document valid
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def format_table_value(value: Any) -> str:
    """One table cell: floats rounded to 6 significant digits, the rest as text."""
    value = _plain(value)
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.{TABLE_SIGNIFICANT_DIGITS}g}"
    return str(value)


def _is_number(value: Any) -> bool:
    value = _plain(value)
    return isinstance(value, int | float) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------------------
# consoles


_stderr_console: Console | None = None


def stderr_console() -> Console:
    """The rich console on stderr shared by warnings, notes and progress bars."""
    global _stderr_console
    if _stderr_console is None or _stderr_console.file is not sys.stderr:
        from rich.console import Console

        _stderr_console = Console(stderr=True, highlight=False, soft_wrap=True)
    return _stderr_console


def warn(message: str) -> None:
    """Print ``Warning: message`` on stderr (never stdout)."""
    from rich.markup import escape

    stderr_console().print(f"[yellow]Warning:[/yellow] {escape(message)}")


def note(message: str) -> None:
    """Print an informational line on stderr (e.g. the path of a written figure)."""
    from rich.markup import escape

    stderr_console().print(escape(message))


def resolve_format(fmt: str, stream: IO[str] | None = None) -> str:
    """``auto`` becomes ``table`` on a terminal and ``tsv`` when piped; others pass through."""
    if fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r}; allowed: {', '.join(FORMATS)}")
    if fmt != "auto":
        return fmt
    stream = sys.stdout if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return "table" if callable(isatty) and isatty() else "tsv"


# ---------------------------------------------------------------------------------------------
# emit


def emit(
    rows: Sequence[Row],
    columns: Sequence[str],
    fmt: str,
    *,
    no_header: bool = False,
    title: str | None = None,
    stream: IO[str] | None = None,
) -> None:
    """Write ``rows`` (mappings keyed by column name) to stdout in ``fmt``.

    Args:
        rows: one mapping per row; missing keys print as empty (null in JSON).
        columns: the columns to print, in order.
        fmt: one of ``FORMATS``; ``auto`` = rich table on a terminal, TSV when piped.
        no_header: drop the header line (csv/tsv only; ignored by the other formats).
        title: a caption for the table format (ignored by machine formats: stdout stays data).
        stream: where to write; stdout by default (tests may pass a StringIO).
    """
    out = sys.stdout if stream is None else stream
    fmt = resolve_format(fmt, out)
    if fmt == "table":
        _emit_table(rows, columns, out, title=title)
    elif fmt in ("csv", "tsv"):
        _emit_delimited(
            rows, columns, out, delimiter="," if fmt == "csv" else "\t", no_header=no_header
        )
    elif fmt == "json":
        data = [{c: _json_value(row.get(c)) for c in columns} for row in rows]
        out.write(json.dumps(data, indent=2, allow_nan=False) if data else "[]")
        out.write("\n")
    else:  # jsonl
        for row in rows:
            out.write(json.dumps({c: _json_value(row.get(c)) for c in columns}, allow_nan=False))
            out.write("\n")
    out.flush()


def _emit_delimited(
    rows: Sequence[Row], columns: Sequence[str], out: IO[str], *, delimiter: str, no_header: bool
) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=delimiter, lineterminator="\n")
    if not no_header:
        writer.writerow(columns)
    for row in rows:
        writer.writerow([format_machine(row.get(c)) for c in columns])
    out.write(buffer.getvalue())


def _emit_table(
    rows: Sequence[Row], columns: Sequence[str], out: IO[str], *, title: str | None
) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    isatty = getattr(out, "isatty", None)
    terminal = bool(callable(isatty) and isatty())
    # Off a terminal (`--format table` into a file) nothing limits the width: let the table take
    # its natural width instead of rich's 80-column default folding the numbers.
    table = Table(title=title, box=box.SIMPLE_HEAD, header_style="bold", show_edge=False)
    for column in columns:
        numeric = any(_is_number(row.get(column)) for row in rows)
        table.add_column(column, justify="right" if numeric else "left", overflow="fold")
    for row in rows:
        table.add_row(*(format_table_value(row.get(c)) for c in columns))
    if terminal:
        Console(file=out, highlight=False).print(table)
        return
    buffer = io.StringIO()
    Console(file=buffer, width=100_000, highlight=False, color_system=None).print(table)
    out.write("".join(line.rstrip() + "\n" for line in buffer.getvalue().splitlines()))


# ---------------------------------------------------------------------------------------------
# progress


class ProgressHandle(Protocol):
    """What ``progress()`` yields: call ``advance(n)`` as work completes."""

    def advance(self, n: int = 1) -> None: ...

    def update(self, completed: int | None = None, **fields: str) -> None: ...


class _NullProgress:
    def advance(self, n: int = 1) -> None:
        return None

    def update(self, completed: int | None = None, **fields: str) -> None:
        return None


class _RichProgress:
    def __init__(self, bar: Any, task: Any) -> None:
        self._bar = bar
        self._task = task

    def advance(self, n: int = 1) -> None:
        self._bar.advance(self._task, n)

    def update(self, completed: int | None = None, **fields: str) -> None:
        self._bar.update(self._task, completed=completed, **fields)


@contextlib.contextmanager
def progress(
    total: int | None,
    description: str,
    quiet: bool = False,
    fields: Mapping[str, str] | None = None,
) -> Iterator[ProgressHandle]:
    """A progress bar on stderr, silent when stderr is not a terminal or ``quiet`` is set.

    Usage::

        with progress(len(ts), "reconstructing", quiet) as bar:
            for t in ts:
                ...
                bar.advance()

    ``bar.advance`` also fits as a ``callback=`` for library loops. ``fields`` adds live values
    after the counts (``fields={"loss": "-"}``, then ``bar.update(completed=k, loss="0.13")``).
    """
    if quiet or not sys.stderr.isatty():
        yield _NullProgress()
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *(TextColumn(f"{name} {{task.fields[{name}]}}") for name in fields or {}),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=stderr_console(),
        transient=True,
    )
    with bar:
        live: dict[str, Any] = dict(fields or {})
        task = bar.add_task(description, total=total, **live)
        yield _RichProgress(bar, task)


# ---------------------------------------------------------------------------------------------
# files


def check_writable(path: str | os.PathLike[str], *, what: str = "output file") -> Path:
    """Raise UsageError unless ``path`` can be written (its folder exists or can be created and is
    writable, and the path is not a folder). Call it before any work, so a bad path fails fast."""
    target = Path(path)
    if target.is_dir():
        raise UsageError(f"{what} {str(target)!r} is a directory; give a file path")
    parent = target.parent if str(target.parent) else Path(".")
    existing = parent
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(
            f"cannot write {what} {str(target)!r}: {str(existing)!r} is not a directory"
        )
    # Probe by creating a file: os.access says yes to root on read-only or virtual filesystems.
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise UsageError(
            f"cannot write {what} {str(target)!r}: folder {str(existing)!r} is not writable "
            f"({exc.strerror or exc})"
        ) from None
    if target.exists() and not os.access(target, os.W_OK):
        raise UsageError(f"cannot write {what} {str(target)!r}: file is not writable")
    return target


def atomic_write(
    path: str | os.PathLike[str],
    write_fn: Callable[[Path], object],
    *,
    make_parents: bool = True,
) -> Path:
    """Write a file atomically: ``write_fn(tmp)`` writes a temporary file in the same folder (same
    suffix, so suffix-sniffing writers like ``savefig``/``np.save`` behave), then ``os.replace``
    moves it to ``path``. On any failure (even Ctrl-C) the temporary file is removed and ``path`` is
    left untouched.

    Returns the final path. An OSError while writing becomes a DdpmError naming the path.
    """
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    try:
        if make_parents:
            folder.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{target.name}.", suffix=target.suffix)
    except OSError as exc:
        raise DdpmError(f"cannot write {str(target)!r}: {exc.strerror or exc}") from exc
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write_fn(tmp)
        # mkstemp creates 0600; give the file the permissions a plain open() would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError) and not isinstance(exc, BrokenPipeError):
            raise DdpmError(f"cannot write {str(target)!r}: {exc.strerror or exc}") from exc
        raise
    return target


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Atomically write ``text`` (UTF-8) to ``path``."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Atomically write ``data`` to ``path``."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))
