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
import io
import math
import os
import sys
import unicodedata
from collections.abc import Callable, Iterator, Mapping, Sequence
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
    "table_width",
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


def _format_cell(value: Any, float_text: Callable[[float], str]) -> str:
    """One cell as text: none empty, booleans true/false, floats by ``float_text``, the rest as
    text with control characters escaped."""
    value = _plain(value)
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return float_text(value)
    return escape_control(str(value))


def format_machine(value: Any) -> str:
    """One csv/tsv field: full-precision repr for floats; inf/nan as ``float()`` reads them."""
    return _format_cell(value, repr)  # 'inf', '-inf', 'nan' for the non-finite ones


def _json_value(value: Any) -> Any:
    value = _plain(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no inf/nan: null keeps the document valid
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, list | tuple):  # a list cell (check's t) stays a JSON array
        return [_json_value(v) for v in value]
    if isinstance(value, Mapping):  # a mapping cell (check's numbers) stays a JSON object
        return {str(k): _json_value(v) for k, v in value.items()}
    return str(value)


def format_table_value(value: Any) -> str:
    """One table cell: floats rounded to 6 significant digits, the rest as text."""
    return _format_cell(value, _rounded)


def _rounded(value: float) -> str:
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.{TABLE_SIGNIFICANT_DIGITS}g}"


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
        console = stderr_console()
        # On a terminal, wrapped between words at its width (the terminal itself would cut a word
        # in two); piped, one line per message, for grep and logs.
        if console.is_terminal:
            console.print(text, soft_wrap=False, overflow="fold")
        else:
            console.print(text)
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
    columns_option: bool = True,
) -> None:
    """Write ``rows`` (mappings keyed by column name) to stdout in ``fmt``.

    Args:
        rows: one mapping per row; missing keys print as empty (null in JSON).
        columns: the columns to print, in order.
        fmt: one of ``FORMATS``; ``auto`` = rich table on a terminal, TSV when piped.
        no_header: drop the header line (csv/tsv only; ignored by the other formats).
        title: a caption for the table format (ignored by machine formats: stdout stays data).
        stream: where to write; stdout by default (tests may pass a StringIO).
        columns_option: whether the command takes ``--columns``; the table names it when it
            leaves out columns that do not fit the width.

    A table fits ``table_width()`` (``COLUMNS``, the terminal, or 80 when piped): columns that do
    not fit are left out, the first ones kept, and a note on stderr names them.
    """
    out = sys.stdout if stream is None else stream
    fmt = resolve_format(fmt, out)
    try:
        left_out = _emit(rows, columns, fmt, out, no_header=no_header, title=title)
        out.flush()
    except BrokenPipeError:
        raise  # the reader went away: main() exits quietly
    except OSError as exc:  # closed stdout, /dev/full, EIO
        raise OutputError(f"cannot write output: {exc.strerror or exc}") from None
    if fmt == "table" and len(rows) > MAX_TABLE_ROWS:  # after the rows, as the note below
        note(
            f"a table shows at most {MAX_TABLE_ROWS} rows: {MAX_TABLE_ROWS} evenly spaced of "
            f"{len(rows)} (--format tsv, csv or json prints every row)"
        )
    if left_out:  # after the rows are out: a reader that went away hears nothing more
        how = "pick columns with --columns, or " if columns_option else ""
        note(
            f"left out to fit {table_width(out)} columns: {', '.join(left_out)} "
            f"({how}see every column with --format csv, tsv or json)"
        )


def _emit(
    rows: Sequence[Row],
    columns: Sequence[str],
    fmt: str,
    out: IO[str],
    *,
    no_header: bool,
    title: str | None,
) -> list[str]:
    """Write the rows; return the columns a table left out to fit the width."""
    import json  # here, not at the top: `ddpm --help` imports this module (start-up time)

    if fmt == "table":
        return _emit_table(_table_rows(rows), columns, out, title=title)
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
    return []


MAX_TABLE_ROWS = 2000
"""Most rows a table format draws: past it, evenly spaced rows, first and last kept, and a note
(a table of 200,000 rows took 116 s to lay out before its first line; the machine formats print
every row)."""


def _table_rows(rows: Sequence[Row]) -> Sequence[Row]:
    if len(rows) <= MAX_TABLE_ROWS:
        return rows
    step = (len(rows) - 1) / (MAX_TABLE_ROWS - 1)
    return [rows[round(i * step)] for i in range(MAX_TABLE_ROWS)]


def _emit_delimited(
    rows: Sequence[Row], columns: Sequence[str], out: IO[str], *, delimiter: str, no_header: bool
) -> None:
    import csv

    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=delimiter, lineterminator="\n")
    if not no_header:
        writer.writerow([escape_control(c) for c in columns])
    for row in rows:
        writer.writerow([format_machine(row.get(c)) for c in columns])
    out.write(buffer.getvalue())


# Table layout: no outer edge and one space of padding between columns (collapsed), so the
# columns cost two characters each beyond their cells. A text column (names, messages, paths) may
# wrap at spaces down to this width; a number never wraps.
_COLUMN_GAP = 2
_TEXT_MIN_WIDTH = 20
_WORD_MAX_WIDTH = 32  # a longer "word" (a path) may be folded rather than widen the column
DEFAULT_TABLE_WIDTH = 80


def table_width(stream: IO[str] | None = None) -> int:
    """The width a table may take: ``COLUMNS`` when set, else the terminal's width when ``stream``
    is a terminal, else 80 (a file or pipe gets the width of an ordinary terminal)."""
    env = os.environ.get("COLUMNS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    stream = sys.stdout if stream is None else stream
    try:
        if stream.isatty():
            return os.get_terminal_size(stream.fileno()).columns or DEFAULT_TABLE_WIDTH
    except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
        pass
    return DEFAULT_TABLE_WIDTH


def _cell_width(text: str) -> int:
    from rich.cells import cell_len

    return cell_len(text)


def column_min_width(header: str, cells: Sequence[str], numbers: Sequence[bool]) -> int:
    """The narrowest a column may be: its header and every number whole; text cells may wrap
    at spaces down to ``_TEXT_MIN_WIDTH`` (never splitting a word up to ``_WORD_MAX_WIDTH``)."""
    pairs = list(zip(cells, numbers, strict=True))
    whole = max([_cell_width(header)] + [_cell_width(c) for c, n in pairs if n])
    texts = [c for c, n in pairs if not n]
    if not texts:
        return whole
    natural = max(_cell_width(c) for c in texts)
    word = max((_cell_width(w) for c in texts for w in c.split()), default=0)
    return max(whole, min(natural, max(_TEXT_MIN_WIDTH, min(word, _WORD_MAX_WIDTH))))


def fit_columns(min_widths: Sequence[int], width: int) -> list[int]:
    """Indices of the columns to show within ``width`` characters, in order of usefulness (the
    order given): each column joins if it still fits beside those already taken, so the first
    (key) columns always stay and a wide column left out does not hide narrower ones after it.
    The first column is always shown."""
    chosen: list[int] = []
    used = 0
    for k, w in enumerate(min_widths):
        cost = w if not chosen else w + _COLUMN_GAP
        if not chosen or used + cost <= width:
            chosen.append(k)
            used += cost
    return chosen


def _emit_table(
    rows: Sequence[Row],
    columns: Sequence[str],
    out: IO[str],
    *,
    title: str | None,
) -> list[str]:
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    isatty = getattr(out, "isatty", None)
    terminal = bool(callable(isatty) and isatty())
    width = table_width(out)
    headers = [escape_control(c) for c in columns]
    cells = [[format_table_value(row.get(c)) for c in columns] for row in rows]
    numbers = [[_is_number(row.get(c)) for c in columns] for row in rows]
    mins = [
        column_min_width(headers[k], [r[k] for r in cells], [n[k] for n in numbers])
        for k in range(len(columns))
    ]
    shown = fit_columns(mins, width) if columns else []
    left_out = [headers[k] for k in range(len(columns)) if k not in shown]
    # Every cell, header and the title is a rich Text, never a markup string: data such as
    # `m[red].pt` prints as it is and `[/]` cannot crash the table. Numbers and headers never
    # wrap (min_width holds the widest); only text cells wrap, at spaces.
    table = Table(
        title=Text(escape_control(title)) if title else None,
        box=box.SIMPLE_HEAD,
        header_style="bold",
        show_edge=False,
        pad_edge=False,
        collapse_padding=True,
    )
    for k in shown:
        numeric = any(n[k] for n in numbers)
        table.add_column(
            Text(headers[k], no_wrap=True),
            justify="right" if numeric else "left",
            min_width=mins[k],
            overflow="fold",
        )
    for row_cells, row_numbers in zip(cells, numbers, strict=True):
        table.add_row(*(Text(row_cells[k], no_wrap=row_numbers[k]) for k in shown))
    if terminal:
        Console(file=out, width=width, highlight=False, markup=False, emoji=False).print(table)
    else:
        buffer = io.StringIO()
        Console(
            file=buffer, width=width, highlight=False, color_system=None, markup=False, emoji=False
        ).print(table)
        lines = [line.rstrip() + "\n" for line in buffer.getvalue().splitlines()]
        # In blocks, not one write: on an unbuffered stdout (PYTHONUNBUFFERED) one huge write
        # that a closed pipe cuts short returns quietly, and the next one reports the reader gone.
        for start in range(0, len(lines), 1024):
            out.write("".join(lines[start : start + 1024]))
    return left_out


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
