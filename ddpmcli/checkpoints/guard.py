"""What surrounds every call into a model: its prints go to stderr, and Ctrl-C always ends it.

A model (TorchScript especially) may print from native code, which writes to file descriptor 1
whatever ``sys.stdout`` is; so :func:`model_call` points fd 1 at fd 2 for the call (flush, ``dup2``,
restore), and stdout carries data only. A model that loops in native code never returns to the
interpreter, so Python's SIGINT handler would never run: a watchdog thread, woken through
``signal.set_wakeup_fd`` (written by the C-level handler even while native code runs), prints
``Error: interrupted`` and exits 130 if the interrupted call has not returned within
:data:`GRACE_SECONDS`. Cost per call: a flush and three ``dup``/``dup2`` system calls (a few
microseconds).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator

GRACE_SECONDS = 1.0
EXIT_INTERRUPTED = 130

_state = {"depth": 0, "generation": 0}
_watchdog: dict[str, object] = {}


def _watch(sock: socket.socket) -> None:
    while True:
        try:
            data = sock.recv(64)
        except OSError:
            return
        if not data:
            return
        if signal.SIGINT not in data or _state["depth"] == 0:
            continue
        generation = _state["generation"]
        threading.Event().wait(GRACE_SECONDS)
        if _state["depth"] > 0 and _state["generation"] == generation:
            # the model is stuck in native code: Python's own handler cannot run
            with contextlib.suppress(OSError):
                os.write(_stderr_fd(), b"Error: interrupted\n")
            os._exit(EXIT_INTERRUPTED)


def _stderr_fd() -> int:
    saved = _watchdog.get("stderr_fd")
    return saved if isinstance(saved, int) else 2


def _start_watchdog() -> None:
    """Once per process, from the main thread (``set_wakeup_fd`` is allowed only there)."""
    if _watchdog or threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        return
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    try:
        previous = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    except (ValueError, OSError):
        reader.close()
        writer.close()
        return
    if previous != -1:  # someone else (an event loop) owns the wakeup fd: leave it to them
        signal.set_wakeup_fd(previous)
        reader.close()
        writer.close()
        return
    _watchdog.update(reader=reader, writer=writer, stderr_fd=os.dup(2))
    threading.Thread(target=_watch, args=(reader,), name="ddpm-watchdog", daemon=True).start()


@contextlib.contextmanager
def model_call() -> Iterator[None]:
    """Run the body as a model call: fd 1 -> fd 2 while it runs, and a Ctrl-C watchdog."""
    _start_watchdog()
    if _state["depth"] > 0:  # nested (a denoiser calling a denoiser): already redirected
        _state["depth"] += 1
        try:
            yield
        finally:
            _state["depth"] -= 1
        return
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:
        saved = -1
    if saved >= 0:
        os.dup2(2, 1)
    _state["depth"] += 1
    _state["generation"] += 1
    try:
        yield
    finally:
        _state["depth"] -= 1
        if saved >= 0:
            with contextlib.suppress(Exception):
                sys.stdout.flush()  # anything Python-level the model wrote goes to stderr too
            os.dup2(saved, 1)
            os.close(saved)
