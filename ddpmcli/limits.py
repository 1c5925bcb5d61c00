"""Size limits checked before anything is allocated, and careful readers for files a user names.

Standard library only (no torch, no numpy), so every layer can import it cheaply. Two kinds of
limit apply: what this machine can hold (:func:`available_memory`, with a margin) and sane format
limits (the constants below), so a hostile or mistaken value fails in one line, naming the option
or the file, before any work starts.
"""

from __future__ import annotations

import math
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from ddpmcli.errors import DataError, DdpmError, ParameterError, UsageError, verbatim

MAX_JSON_BYTES: int = 32 * 1024**2
"""Size limit for any JSON file we read (configs, sidecars, schedule files): 32 MiB."""

MAX_JSON_DEPTH: int = 64
"""Deepest nesting of lists and objects accepted in a JSON document."""

MAX_JSON_INT_DIGITS: int = 64
"""Most digits accepted in one JSON integer (Python's own limit, 4300, fails late and loudly)."""

MAX_JSON_NUMBER_CHARS: int = 400
"""Longest accepted spelling of one JSON number with a fraction or exponent."""

MAX_TIMESTEPS: int = 10**7
"""Largest number of diffusion timesteps T (diffusers uses 1000; 10^7 already needs ~2 GiB)."""

SCHEDULE_BYTES_PER_T: int = 512
"""Estimate of the bytes a schedule command allocates per timestep: about 20 float64 arrays
of the Schedule plus the temporaries of their stable forms (~220 B/t measured; 512 leaves a
margin)."""

ROW_BYTES: int = 2048
"""Estimate of the bytes one printed row (a dict of ~16 floats, then its formatted text) takes
until it is written: ~1.7 KiB measured for `ddpm schedule`."""

KEPT_BYTES_PER_VALUE: int = 32
"""Bytes a model run keeps per data value of every sample for its whole length: the data or the
samples in float64, their noise, and a copy in the model's dtype (~60 B measured for `ddpm
reconstruct` on 2-D data; 32 is a lower bound, so only what cannot fit is refused)."""

BATCH_BYTES_PER_VALUE: int = 1024
"""Bytes one model call takes per input value with its activations: 256 float32 values, the
estimate of ``run.auto_chunk_size`` (~1.1 KiB measured for the 2-D MLP; a UNet takes more, so this
too is a lower bound)."""

MAX_SAMPLE_VALUES: int = 1 << 28
"""Most values in one sample (C*H*W): 16384 x 16384 RGB is ~2^29.6."""

SAMPLE_BYTES_FACTOR: int = 64
"""Bytes per sample value a model's load check needs: a small batch in float32 with activations."""

MEMORY_MARGIN: float = 0.8
"""Fraction of the free memory one allocation may take, leaving room for the rest of the run."""

_UNLIMITED = 1 << 62


def _gib(nbytes: float) -> str:
    gib = nbytes / 1024**3
    return f"{gib:.1f}" if gib >= 0.1 else f"{gib:.2g}"


def _read_int_file(path: str) -> int | None:
    """The integer in a one-line kernel file (cgroup limits), or None for ``max`` or no file."""
    try:
        with open(path, encoding="ascii") as fh:
            text = fh.read(64).strip()
    except (OSError, ValueError):
        return None
    return int(text) if text.isdigit() else None


def _meminfo(key: str, path: str = "/proc/meminfo") -> int | None:
    """A field of /proc/meminfo (or /proc/self/status) in bytes, or None where not readable."""
    try:
        with open(path, encoding="ascii") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    parts = line.split()
                    return int(parts[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_free() -> int | None:
    """Bytes left under this process's cgroup memory limit (v2, then v1), or None if unlimited."""
    pairs = (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        (
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            "/sys/fs/cgroup/memory/memory.usage_in_bytes",
        ),
    )
    for limit_file, usage_file in pairs:
        limit = _read_int_file(limit_file)
        if limit is None or limit >= _UNLIMITED:
            continue
        usage = _read_int_file(usage_file) or 0
        return max(limit - usage, 0)
    return None


def _rlimit_free() -> int | None:
    """Bytes of address space left under RLIMIT_AS (soft limit), or None if unlimited."""
    import resource  # here: `ddpm --help` imports this module, and only a size check needs it

    try:
        soft, _hard = resource.getrlimit(resource.RLIMIT_AS)
    except (OSError, ValueError):
        return None
    if soft == resource.RLIM_INFINITY or soft < 0:
        return None
    used = _meminfo("VmSize", "/proc/self/status") or 0
    return max(soft - used, 0)


def available_memory() -> int:
    """Bytes this process may still allocate: the least of MemAvailable, the cgroup limit left and
    the RLIMIT_AS address space left, times :data:`MEMORY_MARGIN`.

    Where none can be read (not Linux), the physical memory size stands in for MemAvailable.
    """
    candidates = [v for v in (_meminfo("MemAvailable"), _cgroup_free(), _rlimit_free()) if v]
    if not candidates:
        try:
            candidates.append(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (OSError, ValueError, AttributeError):
            candidates.append(8 * 1024**3)
    return int(min(candidates) * MEMORY_MARGIN)


def check_allocation(nbytes: int, what: str, *, error: type[DdpmError] = UsageError) -> None:
    """Raise ``error`` naming ``what`` if ``nbytes`` is more than :func:`available_memory`.

    ``what`` is the option or file field the size comes from, e.g. ``"--n 1000000000"``.
    """
    if nbytes <= 0:
        return
    free = available_memory()
    if nbytes > free:
        raise error(f"{what} needs ~{_gib(nbytes)} GiB, more than the {_gib(free)} GiB available")


MAX_THREADS: int = 1024
"""Most CPU threads (``--threads``, ``OMP_NUM_THREADS``): libgomp creates each one on first use,
and past what the system allows it prints ``libgomp: Thread creation failed`` and exits (or, at
100,000, crashes with SIGSEGV), which no Python handler can catch."""

THREAD_STACK_BYTES: int = 8 * 1024**2
"""Address space one thread reserves for its stack (glibc's default under an 8 MiB stack limit)."""


def check_threads(value: int, name: str) -> int:
    """``value`` as a thread count: 1 to :data:`MAX_THREADS`, and its stacks within the address
    space left under ``RLIMIT_AS``; else one ParameterError naming the parameter ``name`` (or,
    not an identifier, the text ``name``: ``OMP_NUM_THREADS variable``)."""
    check_count(value, name, maximum=MAX_THREADS)
    room = _rlimit_free()
    need = value * THREAD_STACK_BYTES
    if room is not None and need > room * MEMORY_MARGIN:
        field = "{" + name + "}" if name.isidentifier() else verbatim(name)
        raise ParameterError(
            f"{field} {value}: the threads' stacks need ~{_gib(need)} GiB of address space, more "
            f"than the {_gib(room * MEMORY_MARGIN)} GiB left under the address-space limit"
        )
    return value


def _range_text(minimum: int, maximum: int | None) -> str:
    if maximum is None:
        return f"at least {minimum}"
    return f"between {minimum} and {maximum}"


def check_count(value: int, name: str, *, minimum: int = 1, maximum: int | None = None) -> int:
    """``value`` as an int if ``minimum <= value <= maximum``; otherwise a ParameterError (exit
    2) naming the parameter ``name`` (the CLI shows its flag).

    The one message style for counts (``n``, ``batch_size``, ``steps``, ...): ``n must be between
    1 and 1000000, got 0``, shown by the CLI as ``--n must be ...``.
    """
    field = "{" + name + "}" if name.isidentifier() else verbatim(name)
    if isinstance(value, bool) or not isinstance(value, int):
        got = verbatim(repr(value))
        raise ParameterError(
            f"{field} must be an integer {_range_text(minimum, maximum)}, got {got}"
        )
    if value < minimum or (maximum is not None and value > maximum):
        raise ParameterError(f"{field} must be {_range_text(minimum, maximum)}, got {value}")
    return int(value)


def check_timesteps(
    value: int,
    what: str,
    *,
    error: type[DdpmError] = UsageError,
    bytes_per_t: int = SCHEDULE_BYTES_PER_T,
) -> int:
    """The number of timesteps T if ``1 <= T <= MAX_TIMESTEPS`` and its arrays fit in memory
    (``bytes_per_t`` per timestep); otherwise ``error`` naming ``what`` (an option or a file
    field)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise error(f"{what} must be an integer between 1 and {MAX_TIMESTEPS}, got {value!r}")
    if not 1 <= value <= MAX_TIMESTEPS:
        raise error(f"{what} must be between 1 and {MAX_TIMESTEPS}, got {value}")
    check_allocation(value * bytes_per_t, f"{what} = {value}", error=error)
    return value


def npy_header(
    stream: BinaryIO, size: int, where: str, *, error: type[DdpmError] = DataError
) -> tuple[tuple[int, ...], Any]:
    """The shape and numpy dtype of the .npy array ``stream`` starts (read up to its data),
    checked against the ``size`` bytes of the whole file: a header may claim any shape, so a
    numeric dtype and shape x itemsize equal to the bytes that follow it, or ``error`` naming
    ``where``. Nothing is allocated from the header's word."""
    import numpy as np

    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, _fortran, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version in ((2, 0), (3, 0)):
            shape, _fortran, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except (ValueError, TypeError, SyntaxError, EOFError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise error(f"{where}: cannot read array file ({first})") from None
    if dtype.hasobject or dtype.kind not in "uif":
        raise error(f"{where}: array of dtype {dtype} is not numeric")
    count = math.prod(shape)
    follow = size - stream.tell()
    if count * dtype.itemsize != follow:
        raise error(
            f"{where}: header claims shape {tuple(shape)} of {dtype} "
            f"({count * dtype.itemsize} bytes) but {follow} bytes follow it"
        )
    return tuple(int(d) for d in shape), dtype


def check_sample_shape(
    shape: tuple[int, ...] | list[int], what: str, *, error: type[DdpmError] = UsageError
) -> tuple[int, ...]:
    """``shape`` as a tuple if it is one sample's shape, ``(D,)`` or ``(C, H, W)`` with positive
    sizes, of at most :data:`MAX_SAMPLE_VALUES` values, of which a small batch fits in memory;
    otherwise ``error`` naming ``what`` (``--data-shape``, or a file and its field)."""
    shape = tuple(int(d) for d in shape)
    if len(shape) not in (1, 3) or any(d < 1 for d in shape):
        raise error(f"{what} {list(shape)}: want D or C,H,W with positive sizes")
    values = 1
    for d in shape:
        values *= d
    if values > MAX_SAMPLE_VALUES:
        raise error(
            f"{what} {list(shape)} has {values} values per sample, more than the "
            f"{MAX_SAMPLE_VALUES} allowed"
        )
    check_allocation(values * SAMPLE_BYTES_FACTOR, f"{what} {list(shape)}", error=error)
    return shape


def check_run_sizes(
    data_shape: tuple[int, ...],
    *,
    n: int,
    batch_size: int | None,
    pairs_per_sample: int = 1,
    rows_per_sample: int = 0,
    one_batch_default: bool = False,
    n_name: str = "n",
) -> None:
    """Refuse the sample count and batch size of a model run (``ddpm sample``, ``reconstruct``,
    ``nll``) that this machine cannot hold, before anything is allocated: UsageError naming the
    flag (exit 2), in the words of :func:`check_count` and :func:`check_allocation`.

    ``n`` samples of ``data_shape`` are kept for the whole run (:data:`KEPT_BYTES_PER_VALUE`); a
    model call takes ``batch_size`` items (capped at ``n * pairs_per_sample``, the items there
    are) with their activations (:data:`BATCH_BYTES_PER_VALUE`), or all ``n`` samples at once
    when ``batch_size`` is None and ``one_batch_default`` (``run.sample``'s default); a run that
    prints ``rows_per_sample`` rows per sample holds them until they are written
    (:data:`ROW_BYTES` each).
    """
    check_count(n, n_name)
    if batch_size is not None:
        check_count(batch_size, "batch_size")
    n_field = "{" + n_name + "}"
    values = 1
    for d in data_shape:
        values *= max(int(d), 1)
    check_allocation(n * values * KEPT_BYTES_PER_VALUE, f"{n_field} {n}", error=ParameterError)
    if rows_per_sample > 0:
        rows = n * rows_per_sample
        check_allocation(
            rows * ROW_BYTES, f"{n_field} {n} (printing {rows} rows)", error=ParameterError
        )
    if batch_size is not None:
        items = min(batch_size, n * max(pairs_per_sample, 1))
        check_allocation(
            items * values * BATCH_BYTES_PER_VALUE,
            f"{{batch_size}} {batch_size}",
            error=ParameterError,
        )
    elif one_batch_default:
        check_allocation(
            n * values * BATCH_BYTES_PER_VALUE,
            f"{n_field} {n} in one batch (set {{batch_size}})",
            error=ParameterError,
        )


_KIND_NAMES: tuple[tuple[Callable[[int], bool], str], ...] = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def check_regular_file(
    path: str | os.PathLike[str], what: str, *, error: type[DdpmError] = DataError
) -> Path:
    """``path`` as a Path if it is (or links to) a regular file; otherwise ``error`` naming it.

    Uses ``os.stat`` only, never opens the file, so a FIFO or device is refused without blocking.
    ``what`` says what the file is for, e.g. ``"schedule file"``.
    """
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise error(f"{p}: no such file") from None
    except OSError as exc:
        raise error(f"{p}: cannot read {what} ({exc.strerror or exc})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _KIND_NAMES if test(st.st_mode)), "not a plain file")
        raise error(f"{p}: {what} is {kind}, not a regular file")
    return p


def read_bytes(
    path: str | os.PathLike[str], what: str, *, limit: int, error: type[DdpmError] = DataError
) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes; otherwise ``error`` naming the file.

    Opens non-blocking and checks the opened file again, so a file swapped for a FIFO after the
    check still cannot block; reads at most ``limit + 1`` bytes, so ``/dev/zero`` cannot fill
    memory.
    """
    p = check_regular_file(path, what, error=error)
    too_big = f"{p}: {what} is larger than the {_size_text(limit)} limit"
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise error(f"{p}: cannot read {what} ({exc.strerror or exc})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{p}: {what} is not a regular file")
        if st.st_size > limit:
            raise error(too_big)
        chunks: list[bytes] = []
        total = 0
        while total <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    except OSError as exc:
        raise error(f"{p}: cannot read {what} ({exc.strerror or exc})") from None
    finally:
        os.close(fd)
    if total > limit:
        raise error(too_big)
    return b"".join(chunks)


def _size_text(nbytes: int) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if nbytes >= size:
            return f"{nbytes / size:g} {unit}"
    return f"{nbytes} bytes"


class _JsonLimit(Exception):
    """Raised from inside the JSON parser hooks when a number breaks a limit."""


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_JSON_INT_DIGITS:
        raise _JsonLimit(
            f"an integer with {len(text.lstrip('-'))} digits (at most {MAX_JSON_INT_DIGITS})"
        )
    return int(text)


def _parse_float(text: str) -> float:
    if len(text) > MAX_JSON_NUMBER_CHARS:
        raise _JsonLimit(f"a number {len(text)} characters long (at most {MAX_JSON_NUMBER_CHARS})")
    return float(text)


def _too_deep(data: Any) -> bool:
    """Whether parsed JSON nests deeper than MAX_JSON_DEPTH (an explicit stack, no recursion)."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > MAX_JSON_DEPTH:
                return True
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def parse_json(
    text: str | bytes,
    where: str,
    *,
    error: type[DdpmError] = DataError,
    limit: int = MAX_JSON_BYTES,
) -> Any:
    """Parse JSON text with the size, nesting-depth and number limits of :func:`read_json`.

    ``where`` names the source in the one-line error, e.g. ``"ckpt.pt: metadata"``.
    """
    size = len(text.encode("utf-8") if isinstance(text, str) else text)
    if size > limit:
        raise error(f"{where}: JSON is larger than the {_size_text(limit)} limit")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise error(f"{where}: not UTF-8 text (byte {exc.start})") from None
    import json

    try:
        data = json.loads(text, parse_int=_parse_int, parse_float=_parse_float)
    except json.JSONDecodeError as exc:
        raise error(
            f"{where}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
        ) from None
    except _JsonLimit as exc:
        raise error(f"{where}: JSON holds {exc}") from None
    except RecursionError:
        raise error(f"{where}: JSON nests deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as exc:  # e.g. an integer Python refuses to convert
        raise error(f"{where}: not valid JSON ({exc})") from None
    if _too_deep(data):
        raise error(f"{where}: JSON nests deeper than {MAX_JSON_DEPTH} levels")
    return data


def read_json(
    path: str | os.PathLike[str],
    what: str,
    *,
    limit: int = MAX_JSON_BYTES,
    error: type[DdpmError] = DataError,
) -> Any:
    """Read a JSON file: a regular file of at most ``limit`` bytes, nesting at most
    :data:`MAX_JSON_DEPTH` deep, integers of at most :data:`MAX_JSON_INT_DIGITS` digits.
    Any problem -> one ``error`` line naming the file."""
    data = read_bytes(path, what, limit=limit, error=error)
    return parse_json(data, str(Path(path)), error=error, limit=limit)
