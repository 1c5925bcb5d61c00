"""Custom schedule files: betas or alpha_bars as .npy, .txt, .csv, .tsv or .json, read into a
core Schedule (moved out of :mod:`ddpmcli.configs`, which re-exports these names).

The core never touches files; this module reads them and hands plain numbers to the core.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ddpmcli import limits
from ddpmcli.errors import ScheduleError, UsageError

if TYPE_CHECKING:
    from ddpmcli.core import Schedule

CUSTOM_SUFFIXES: tuple[str, ...] = (".npy", ".txt", ".csv", ".tsv", ".json")
MAX_SCHEDULE_FILE_BYTES: int = 64 * 1024**2
"""Size limit of a custom schedule file (text, table or .npy): 64 MiB."""

What = Literal["betas", "alpha_bars"]


_COLUMN_NAMES: dict[str, tuple[str, ...]] = {
    "betas": ("betas", "beta"),
    "alpha_bars": ("alpha_bars", "alpha_bar", "alphas_cumprod"),
}


def _parse_number(text: str, path: Path, where: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ScheduleError(f"{path}: {where}: {text.strip()!r} is not a number") from None


def _numbers_from_text(text: str, path: Path) -> list[float]:
    values: list[float] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        content = line.split("#", 1)[0].replace(",", " ").split()
        values.extend(_parse_number(tok, path, f"line {lineno}") for tok in content)
    return values


def _numbers_from_table(text: str, path: Path, what: What, delimiter: str) -> list[float]:
    rows = [
        row
        for row in csv.reader(io.StringIO(text), delimiter=delimiter)
        if any(c.strip() for c in row)
    ]
    if not rows:
        return []
    header = [cell.strip() for cell in rows[0]]
    column = 0
    body = rows
    if any(_is_word(cell) for cell in header):
        names = _COLUMN_NAMES[what]
        matches = [i for i, name in enumerate(header) if name in names]
        if matches:
            column = matches[0]
        elif len(header) == 1:
            column = 0
        else:
            raise ScheduleError(
                f"{path}: no {what} column; header has {', '.join(header)} "
                f"(name one column {' or '.join(names)})"
            )
        body = rows[1:]
    elif len(header) != 1:
        raise ScheduleError(
            f"{path}: {len(header)} columns and no header; give one number per line, or a header "
            f"naming the {_COLUMN_NAMES[what][0]} column"
        )
    values = []
    for lineno, row in enumerate(body, start=len(rows) - len(body) + 1):
        if column >= len(row):
            raise ScheduleError(f"{path}: line {lineno} has no column {column + 1}")
        values.append(_parse_number(row[column], path, f"line {lineno}"))
    return values


def _is_word(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return True
    return False


def _numbers_from_json(data: Any, path: Path, what: What) -> list[float]:
    names = _COLUMN_NAMES[what]
    if isinstance(data, dict):
        key = next((name for name in names if name in data), None)
        if key is None:
            raise ScheduleError(f"{path}: expected a list or an object with key {names[0]!r}")
        data = data[key]
    if isinstance(data, list) and data and all(isinstance(item, dict) for item in data):
        # rows as `ddpm schedule --format json` prints them
        key = next((name for name in names if name in data[0]), None)
        if key is None:
            raise ScheduleError(f"{path}: rows have no {names[0]!r} or {names[1]!r} key")
        data = [item.get(key) for item in data]
    if not isinstance(data, list):
        raise ScheduleError(f"{path}: expected a list of numbers")
    values = []
    for i, item in enumerate(data):
        if item is None:
            values.append(math.nan)  # null is how JSON writers spell nan/inf; reported below
        elif isinstance(item, int | float) and not isinstance(item, bool):
            values.append(float(item))
        elif isinstance(item, str):
            values.append(_parse_number(item, path, f"index {i}"))
        else:
            raise ScheduleError(f"{path}: index {i}: {item!r} is not a number")
    return values


def _numbers_from_npy(path: Path) -> list[float]:
    """The numbers of a 1-D numeric .npy file, its header checked against the file size before
    any array is allocated (a header may claim 10^12 rows)."""
    import numpy as np

    data = limits.read_bytes(
        path, "schedule file", limit=MAX_SCHEDULE_FILE_BYTES, error=ScheduleError
    )
    stream = io.BytesIO(data)
    shape, dtype = limits.npy_header(stream, len(data), str(path), error=ScheduleError)
    if len(shape) != 1:
        raise ScheduleError(f"{path}: expected a 1-D numeric array, got shape {shape} {dtype}")
    limits.check_timesteps(shape[0], f"{path}: array length", error=ScheduleError)
    array = np.frombuffer(data, dtype=dtype, count=shape[0], offset=stream.tell())
    return [float(x) for x in array.tolist()]


def read_numbers(path: str | Path, what: What = "betas") -> list[float]:
    """The numbers of a custom schedule file: .npy (1-D), .txt (one per line, `#` comments),
    .csv/.tsv (one column, or a header naming the column), .json (a list, or {"betas": [...]})."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in CUSTOM_SUFFIXES:
        raise ScheduleError(
            f"{p}: unsupported file type {suffix or '(no suffix)'!r}; "
            f"allowed: {', '.join(CUSTOM_SUFFIXES)}"
        )
    limits.check_regular_file(p, "schedule file", error=ScheduleError)
    if suffix == ".npy":
        return _numbers_from_npy(p)
    data = limits.read_bytes(p, "schedule file", limit=MAX_SCHEDULE_FILE_BYTES, error=ScheduleError)
    if suffix == ".json":
        return _numbers_from_json(limits.parse_json(data, str(p), error=ScheduleError), p, what)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ScheduleError(f"{p}: not UTF-8 text (byte {exc.start})") from None
    if suffix == ".txt":
        return _numbers_from_text(text, p)
    return _numbers_from_table(text, p, what, "," if suffix == ".csv" else "\t")


def load_custom_schedule(path: str | Path, what: What = "betas") -> Schedule:
    """A custom schedule from a file of betas or alpha_bars (see :func:`read_numbers`).

    NaN/Inf, betas outside (0, 1], alpha_bars outside [0, 1) or not strictly decreasing ->
    ScheduleError (exit 1) naming the file and the bad index (0-based).
    """
    from ddpmcli import core

    if what not in _COLUMN_NAMES:
        raise UsageError(f"what must be betas or alpha_bars, got {what!r}")
    values = read_numbers(path, what)
    if not values:
        raise ScheduleError(f"{path}: no numbers in file")
    limits.check_timesteps(len(values), f"{path}: number of {what}", error=ScheduleError)
    for i, value in enumerate(values):
        if not math.isfinite(value):
            raise ScheduleError(
                f"{path}: {what} index {i} is {value!r}; every value must be finite"
            )
    name = f"custom:{Path(path).name}"
    try:
        if what == "betas":
            return core.schedule_from_betas(values, name=name)
        return core.schedule_from_alpha_bars(values, name=name)
    except ScheduleError as exc:
        raise ScheduleError(f"{path}: {exc}") from None
