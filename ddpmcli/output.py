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
import sys
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from typing import IO, TYPE_CHECKING, Any, Protocol

from ddpmcli.errors import OutputError, UsageError
from ddpmcli.files import atomic_write, atomic_write_text, check_writable

# re-exported for callers that still import them from here (new code: ddpmcli.files)
__all__ = [
    "FORMATS",
    "atomic_write",
    "atomic_write_text",
    "check_writable",
    "emit",
    "escape_control",
    "note",
    "progress",
    "resolve_format",
    "stderr_console",
    "warn",
]

if TYPE_CHECKING:
    from rich.console import Console

FORMATS: tuple[str, ...] = ("auto", "table", "csv", "tsv", "json", "jsonl")
TABLE_SIGNIFICANT_DIGITS = 6

Row = Mapping[str, Any]


# ---------------------------------------------------------------------------------------------
# terminal safety

# Characters that move the cursor, retitle or clear the terminal, or reorder text: C0 and C1
# controls, DEL, line/paragraph separators and the bidirectional overrides ("Trojan source").
_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f")
_SHORT = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _unsafe(ch: str) -> bool:
    return ch in _BIDI or unicodedata.category(ch) in ("Cc", "Zl", "Zp")


def escape_control(text: str) -> str:
    """``text`` with every control character written as a visible escape (``\\x1b``, ``\\n``,
    ``\\u202e``), so that a path or a checkpoint's metadata can never drive the terminal or break
    a csv/tsv row. Everything else, backslashes included, is left as it is."""
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if not _unsafe(ch):
            out.append(ch)
        elif ch in _SHORT:
            out.append(_SHORT[ch])
        elif ord(ch) < 0x100:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(f"\\u{ord(ch):04x}")
    return "".join(out)


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
    return escape_control(str(value))


def _json_value(value: Any) -> Any:
    value = _plain(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no inf/nan: null keeps the document valid
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, list | tuple):  # a list cell (check's t) stays a JSON array
        return [_json_value(v) for v in value]
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
    return escape_control(str(value))


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

        # emoji=False: a ``:name:`` in a path is text, not an emoji code.
        _stderr_console = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)
    return _stderr_console


def _print_stderr(prefix: Any, message: str) -> None:
    from rich.text import Text

    text = Text.assemble(prefix, escape_control(str(message)))  # Text: no markup is interpreted
    try:
        stderr_console().print(text)
    except (OSError, ValueError):
        pass  # stderr closed or full: a note is not worth failing the command for


def warn(message: str) -> None:
    """Print ``Warning: message`` on stderr (never stdout); control characters escaped, markup
    shown literally."""
    _print_stderr(("Warning: ", "yellow"), message)


def note(message: str) -> None:
    """Print an informational line on stderr (e.g. the path of a written figure); control
    characters escaped, markup shown literally."""
    _print_stderr("", message)


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
    try:
        _emit(rows, columns, fmt, out, no_header=no_header, title=title)
        out.flush()
    except BrokenPipeError:
        raise  # the reader went away: main() exits quietly
    except OSError as exc:  # closed stdout, /dev/full, EIO
        raise OutputError(f"cannot write output: {exc.strerror or exc}") from None


def _emit(
    rows: Sequence[Row],
    columns: Sequence[str],
    fmt: str,
    out: IO[str],
    *,
    no_header: bool,
    title: str | None,
) -> None:
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


def _emit_delimited(
    rows: Sequence[Row], columns: Sequence[str], out: IO[str], *, delimiter: str, no_header: bool
) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=delimiter, lineterminator="\n")
    if not no_header:
        writer.writerow([escape_control(c) for c in columns])
    for row in rows:
        writer.writerow([format_machine(row.get(c)) for c in columns])
    out.write(buffer.getvalue())


def _emit_table(
    rows: Sequence[Row], columns: Sequence[str], out: IO[str], *, title: str | None
) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    isatty = getattr(out, "isatty", None)
    terminal = bool(callable(isatty) and isatty())
    # Off a terminal (`--format table` into a file) nothing limits the width: let the table take
    # its natural width instead of rich's 80-column default folding the numbers.
    # Every cell, header and the title is a rich Text, never a markup string: data such as
    # `m[red].pt` prints as it is and `[/]` cannot crash the table.
    table = Table(
        title=Text(escape_control(title)) if title else None,
        box=box.SIMPLE_HEAD,
        header_style="bold",
        show_edge=False,
    )
    for column in columns:
        numeric = any(_is_number(row.get(column)) for row in rows)
        table.add_column(
            Text(escape_control(column)), justify="right" if numeric else "left", overflow="fold"
        )
    for row in rows:
        table.add_row(*(Text(format_table_value(row.get(c))) for c in columns))
    if terminal:
        Console(file=out, highlight=False, markup=False, emoji=False).print(table)
        return
    buffer = io.StringIO()
    Console(
        file=buffer, width=100_000, highlight=False, color_system=None, markup=False, emoji=False
    ).print(table)
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
