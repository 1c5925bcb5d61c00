"""`main()`, the console-script entry point of `ddpm`: signal and stream guards around the typer
app (`ddpmcli/cli/root.py`, imported only once the guards are in place, so Ctrl-C during the
start-up imports is handled too).

Standard library only at the top: this module is what the `ddpm` script imports first.

What the shell sees (exit statuses in `ddpmcli.errors.ExitStatus`):
- Ctrl-C at any moment: `Error: interrupted` on stderr, exit 130; never a traceback.
- stdout closed (`ddpm schedule >&-`) or full (`>/dev/full`): one `Error: cannot write output: ...`
  line, exit 1.
- stderr closed: messages are dropped, the exit status is unchanged.
- a broken pipe (`ddpm schedule | head -1`): exit 0 and no message, for every format.
"""

from __future__ import annotations

import os
import signal
import sys


def _interrupted_at_start_up(signum: int, frame: object) -> None:
    # Nothing to clean up yet, and an exception here would escape the script's own import as a
    # traceback: say it in one line and leave.
    try:
        os.write(2, b"Error: interrupted\n")
    finally:
        os._exit(130)


# Installed first, only in the `ddpm` process itself (never in a program that imports us): Ctrl-C
# during the start-up imports. `run_main` replaces it once it can clean up.
if sys.argv and (
    os.path.basename(sys.argv[0]) == "ddpm"
    or sys.argv[0].endswith(os.path.join("ddpmcli", "__main__.py"))
):
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupted_at_start_up)

import contextlib  # noqa: E402
import io  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from types import FrameType  # noqa: E402
from typing import Any  # noqa: E402

from ddpmcli.errors import ExitStatus, Interrupted  # noqa: E402

_UNSAFE_CONTROL = {i: f"\\x{i:02x}" for i in (*range(0x20), 0x7F, *range(0x80, 0xA0))}
_BIDI = (0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A))
_UNSAFE_CONTROL.update({i: f"\\u{i:04x}" for i in _BIDI})  # U+202E reverses the line after it


# Set by the SIGINT handler. A handler's exception can be swallowed where Python ignores
# exceptions (a __del__, a weakref or GC callback, a library's broad except): the flag still says
# the run was interrupted, and wins over whatever error the swallowing caused.
_sigint = {"seen": False, "reported": False, "deferred": False}


def error_line(message: str) -> None:
    """One `Error: ...` line on stderr, as plain text: whitespace runs folded to one space,
    control characters escaped, no markup; a closed or full stderr is ignored. After Ctrl-C only
    `Error: interrupted` is printed, once."""
    if _sigint["seen"]:
        if message != "interrupted" or _sigint["reported"]:
            return
        _sigint["reported"] = True
    text = " ".join(str(message).split()).translate(_UNSAFE_CONTROL) or "unknown error"
    try:
        sys.stderr.write(f"Error: {text}\n")
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):
        pass


def quiet_stdout() -> None:
    """Point fd 1 at /dev/null (after a broken pipe or a failed write) so that the final flush at
    interpreter exit cannot raise a second error."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.close(devnull)
    except OSError:
        pass


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    _sigint["seen"] = True
    if not _sigint["deferred"] and _import_in_progress():
        # Raised inside a module's import, the exception can cross a C++ extension's frames,
        # which abort the process ("terminate called ..." in torch's), or be swallowed by the
        # module's own `except Exception` around an optional import, and the run goes on: deliver
        # it once no import is running. A second Ctrl-C meanwhile raises at once.
        _sigint["deferred"] = True
        import threading

        threading.Thread(target=_interrupt_after_imports, daemon=True).start()
        return
    raise Interrupted


def _import_in_progress() -> bool:
    """Whether a module is being imported right now (importlib marks its spec meanwhile)."""
    return any(
        getattr(getattr(module, "__spec__", None), "_initializing", False)
        for module in list(sys.modules.values())
    )


def _interrupt_after_imports() -> None:
    """Wait until no import is running, then deliver SIGINT to the main thread again (its
    handler raises then)."""
    import _thread
    import time

    while _import_in_progress():
        time.sleep(0.005)
    _thread.interrupt_main()


def _unraisable(hook: Any) -> Any:
    def quiet(info: Any) -> None:
        if not isinstance(info.exc_value, Interrupted):
            hook(info)  # the flag reports an Interrupted that was swallowed here

    return quiet


def _guard_std_fds() -> None:
    """Give closed standard fds a stand-in, so a file opened later never lands on fd 1 and
    receives our output: fd 0 and fd 2 read and write /dev/null (a closed stderr drops messages);
    fd 1 is /dev/null opened read-only, so a write to it fails and is reported as one line."""
    for fd, flags in ((0, os.O_RDONLY), (1, os.O_RDONLY), (2, os.O_WRONLY)):
        try:
            os.fstat(fd)
        except OSError:
            try:
                stand_in = os.open(os.devnull, flags)
            except OSError:
                continue
            if stand_in != fd:
                os.dup2(stand_in, fd)
                os.close(stand_in)
    if sys.stdout is None:
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=False)
    if sys.stderr is None:
        sys.stderr = io.TextIOWrapper(
            io.FileIO(2, "w", closefd=False), errors="backslashreplace", write_through=True
        )


def _finish_stdout(code: int) -> int:
    """Flush stdout here, where a failure can still become one line and the right status."""
    try:
        if sys.stdout is not None:
            sys.stdout.flush()
    except BrokenPipeError:
        quiet_stdout()
    except (OSError, ValueError) as exc:
        quiet_stdout()
        if code == ExitStatus.OK:
            error_line(f"cannot write output: {getattr(exc, 'strerror', None) or exc}")
            return ExitStatus.ERROR
    return code


def run_main(argv: Sequence[str] | None = None) -> int:
    """Run `ddpm` under the signal and stream guards; return its exit status."""
    previous: Any = None
    _sigint.update(seen=False, reported=False)
    # SIGINT ignored (`nohup`, a background job of a script) stays ignored; not the main thread:
    # signals are left alone.
    with contextlib.suppress(ValueError):
        if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            previous = signal.signal(signal.SIGINT, _on_sigint)
    hook = sys.unraisablehook
    sys.unraisablehook = _unraisable(hook)
    code: int = ExitStatus.ERROR
    try:
        _guard_std_fds()
        from ddpmcli.cli.root import run

        code = _finish_stdout(run(argv))
    except (Interrupted, KeyboardInterrupt):
        _sigint["seen"] = True
    finally:
        if previous is not None:
            with contextlib.suppress(ValueError, Interrupted):
                signal.signal(signal.SIGINT, previous)
        sys.unraisablehook = hook
    if _sigint["seen"]:
        error_line("interrupted")
        code = ExitStatus.INTERRUPTED
    return int(code)


def _escape_unencodable() -> None:
    """stdout and stderr write what their encoding cannot hold as backslash escapes (a table's
    box drawing or a non-ASCII path under ``PYTHONIOENCODING=ascii`` or a C locale) instead of
    raising UnicodeEncodeError midway."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError, OSError):
            stream.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point: run `ddpm` and exit with its status."""
    _escape_unencodable()
    try:
        code = run_main(argv)
    except (Interrupted, KeyboardInterrupt):  # between the handler's install and the try
        error_line("interrupted")
        code = ExitStatus.INTERRUPTED
    sys.exit(code)


def __getattr__(name: str) -> Any:
    # `from ddpmcli.cli.app import app` keeps working; the typer app is built on first use.
    if name in ("app", "reflow_help", "run_guarded", "DdpmGroup", "COMMAND_GROUPS"):
        from ddpmcli.cli import root

        return getattr(root, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
