"""Checked, atomic writes of output files (standard library only, so loaders and savers can use it
without importing the output layer).

The rules, the same for every output option (`--out`, `--save`, `--plot`) and every writer:
- the whole path is checked before any work (`check_writable`): its folder exists and is writable,
  its name (and the temporary name written first) fits the filesystem's limits, and an existing
  output is a regular file: a directory, FIFO, socket or device is refused, never replaced;
- a missing parent folder is a usage error (as `cp` and `torch.save` do), except where the caller
  owns the folder (the default `plots/`) and asks for it to be created;
- writing through a symlink writes the link's target and keeps the link;
- the file is written to a temporary name in the same folder whose suffix is the suffix of the
  name given, in lower case (numpy appends `.npz`/`.npy` to any other name: a link `out.npz` to
  `data.bin` must still write `.npz`), then moved over the output in one `os.replace`; on any
  failure, Ctrl-C included, the temporary file is removed and the output is left as it was;
- an output that replaces an existing file keeps that file's permission bits (a 0600 file stays
  0600); being a new inode, other hard links to the old file keep the old content, and the owner is
  the writer's;
- no output may be a file the command reads (`check_apart`: same device and inode after symlinks
  and hard links, or an existing file directly in a folder it reads): a usage error before any
  work.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from ddpmcli.errors import DdpmError, UsageError

# The temporary name: short and fixed in length, so that any output name the filesystem accepts
# also has a temporary name it accepts (a `.{name}.XXXX` temporary name made 250-character names
# fail after the work).
_TMP_PREFIX = ".ddpm-"
_TMP_RANDOM_CHARS = 12
_DEFAULT_NAME_MAX = 255
_DEFAULT_PATH_MAX = 4096


def _limit(folder: Path, name: str, default: int) -> int:
    try:
        return int(os.pathconf(folder, name))
    except (OSError, ValueError, AttributeError):
        return default


def _tmp_name(given: Path) -> str:
    """A temporary name with the suffix of the name the user gave (not of a link's target)."""
    import secrets  # here, not at the top: `ddpm --help` imports this module (start-up time)

    return f"{_TMP_PREFIX}{secrets.token_hex(_TMP_RANDOM_CHARS // 2)}.tmp{given.suffix.lower()}"


def _real_target(path: Path) -> Path:
    """The file a write to ``path`` lands in: the final target of a symlink (dangling or not)."""
    if path.is_symlink():
        return Path(os.path.realpath(path))
    return path


def _nearest_folder(path: Path) -> Path:
    folder = path.parent if str(path.parent) else Path(".")
    with contextlib.suppress(OSError):
        while not folder.is_dir() and folder.parent != folder:
            folder = folder.parent
    return folder


def _describe_kind(mode: int) -> str | None:
    """None for a regular file, else what the non-regular file is."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def _check_existing(shown: str, real: Path, what: str) -> None:
    try:
        mode = os.stat(real).st_mode  # never opens it: a FIFO would block
    except (FileNotFoundError, NotADirectoryError):
        return  # the folder check names the problem
    except OSError as exc:
        raise UsageError(f"cannot write {what} {shown!r}: {exc.strerror or exc}") from None
    kind = _describe_kind(mode)
    if kind == "a directory":
        raise UsageError(f"{what} {shown!r} is a directory; give a file path")
    if kind is not None:
        raise UsageError(f"cannot write {what} {shown!r}: it is {kind}, not a regular file")


def check_writable(
    path: str | os.PathLike[str], *, what: str = "output file", create_parents: bool = False
) -> Path:
    """Raise UsageError unless ``path`` can be written; call it before any work.

    Checks the name lengths (the output's and its temporary name's), that the folder exists (or,
    with ``create_parents``, that the nearest existing ancestor is a writable folder), that the
    folder is writable, and that an existing output (followed through symlinks) is a regular file.
    Creates nothing. Returns ``path`` as a Path (the name the user gave, links not resolved).
    """
    target = Path(path)
    shown = str(target)
    if not target.name or target.name in (".", ".."):
        raise UsageError(f"{what} {shown!r} is a directory; give a file path")
    name_max = _limit(_nearest_folder(target), "PC_NAME_MAX", _DEFAULT_NAME_MAX)
    name_bytes = len(os.fsencode(target.name))
    if name_bytes > name_max:  # the temporary name is short and fixed, so the output's decides
        raise UsageError(
            f"cannot write {what} {shown!r}: file name is {name_bytes} bytes, longer than the "
            f"{name_max} this filesystem allows"
        )
    if any(len(os.fsencode(part)) > name_max for part in target.parts[:-1]):
        raise UsageError(f"cannot write {what} {shown!r}: a folder name is too long")
    try:
        real = _real_target(target)
    except OSError as exc:
        raise UsageError(f"cannot write {what} {shown!r}: {exc.strerror or exc}") from None
    _check_existing(shown, real, what)
    folder = real.parent if str(real.parent) else Path(".")
    existing = folder
    while not existing.exists():
        if not create_parents:
            raise UsageError(
                f"cannot write {what} {shown!r}: folder {str(folder)!r} does not exist"
            )
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"cannot write {what} {shown!r}: {str(existing)!r} is not a directory")
    path_max = _limit(existing, "PC_PATH_MAX", _DEFAULT_PATH_MAX)
    if len(os.fsencode(os.path.abspath(folder / _tmp_name(target)))) >= path_max:
        raise UsageError(f"cannot write {what} {shown!r}: path is longer than {path_max} bytes")
    # Probe by creating a file: os.access says yes to root on read-only or virtual filesystems.
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise UsageError(
            f"cannot write {what} {shown!r}: folder {str(existing)!r} is not writable "
            f"({exc.strerror or exc})"
        ) from None
    if real.exists() and not os.access(real, os.W_OK):
        raise UsageError(f"cannot write {what} {shown!r}: file is not writable")
    return target


def atomic_write(
    path: str | os.PathLike[str],
    write_fn: Callable[[Path], object],
    *,
    make_parents: bool = False,
) -> Path:
    """Write a file atomically: ``write_fn(tmp)`` writes a temporary file in the output's folder
    (suffix: the output's, lower-cased, so suffix-sniffing writers such as ``np.savez`` write
    exactly ``tmp``), then ``os.replace`` moves it over the output. A symlink is followed: its
    target is written and the link kept. An existing non-regular output is refused before
    ``write_fn`` runs. On any failure (even Ctrl-C) the temporary file is removed and the output
    is left untouched. ``make_parents`` creates a missing folder (for folders the tool owns).

    Returns ``path`` as given. An OSError while writing becomes a DdpmError naming the path.
    """
    target = Path(path)
    shown = str(target)
    real = _real_target(target)
    _check_existing(shown, real, "output file")
    folder = real.parent if str(real.parent) else Path(".")
    tmp = folder / _tmp_name(target)
    try:
        if make_parents:
            folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise DdpmError(f"cannot write {shown!r}: {exc.strerror or exc}") from exc
    os.close(fd)
    try:
        write_fn(tmp)
        _check_written(tmp, shown)
        os.chmod(tmp, _final_mode(real))
        os.replace(tmp, real)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError) and not isinstance(exc, BrokenPipeError):
            raise DdpmError(f"cannot write {shown!r}: {exc.strerror or exc}") from exc
        if isinstance(exc, Exception) and _full(folder):
            # a writer that hides the failed write behind its own error (matplotlib's PDF
            # backend: zlib's "Error -2 while flushing")
            raise DdpmError(f"cannot write {shown!r}: No space left on device") from exc
        raise
    return target


def _full(folder: Path) -> bool:
    """Whether the filesystem of ``folder`` has no block left for this user."""
    try:
        return os.statvfs(folder).f_bavail == 0
    except (OSError, AttributeError):
        return False


def _final_mode(real: Path) -> int:
    """The permission bits of the file being replaced, else those a plain open() would give."""
    try:
        return stat.S_IMODE(os.stat(real).st_mode)
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _check_written(tmp: Path, shown: str) -> None:
    """A writer that wrote beside the temporary file (numpy appending a suffix) is a bug: its
    stray file is removed and nothing replaces the output."""
    for extra in (".npz", ".npy"):
        stray = Path(f"{tmp}{extra}")
        if stray.exists():
            with contextlib.suppress(OSError):
                stray.unlink()
            raise DdpmError(
                f"cannot write {shown!r}: the writer did not write the file it was given"
            )


def atomic_write_text(
    path: str | os.PathLike[str], text: str, *, make_parents: bool = False
) -> Path:
    """Atomically write ``text`` (UTF-8) to ``path``."""
    return atomic_write(
        path, lambda tmp: tmp.write_text(text, encoding="utf-8"), make_parents=make_parents
    )


def _identity(path: str | os.PathLike[str]) -> tuple[int, int, int] | None:
    """(device, inode, mode) of what ``path`` names after symlinks, or None if nothing."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino, st.st_mode


def check_apart(
    outputs: Mapping[str, str | os.PathLike[str]],
    inputs: Mapping[str, Iterable[str | os.PathLike[str]]],
) -> None:
    """Raise UsageError if an output names a file the command reads: the same file after symlinks
    and hard links (same device and inode), or an existing file directly in a folder it reads (an
    image folder is read without its subfolders).

    ``outputs`` maps a flag to its path; ``inputs`` a flag to the paths its value may name (a value
    that names nothing on disk is skipped). Call it before any work.
    """
    for flag, out in outputs.items():
        found = _identity(out)
        if found is None or not stat.S_ISREG(found[2]):
            continue  # a new file, or one check_writable refuses by kind
        real_out = os.path.realpath(out)
        for source, candidates in inputs.items():
            for candidate in candidates:
                other = _identity(candidate)
                if other is None:
                    continue
                if other[:2] == found[:2]:
                    raise UsageError(
                        f"{flag} {str(out)!r} is the same file as {source} {str(candidate)!r}, "
                        "which this command reads; write the output elsewhere"
                    )
                if stat.S_ISDIR(other[2]) and os.path.samefile(
                    os.path.dirname(real_out), candidate
                ):
                    raise UsageError(
                        f"{flag} {str(out)!r} is a file inside the folder {source} "
                        f"{str(candidate)!r} names, which this command reads; write the output "
                        "elsewhere"
                    )


__all__ = ["atomic_write", "atomic_write_text", "check_apart", "check_writable"]
