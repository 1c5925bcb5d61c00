"""The error hierarchy shared by every layer (standard library only, so `main()` can catch it
without importing torch). Each error carries the exit code the CLI turns it into."""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from typing import Self, TypeVar

Value = TypeVar("Value")


class ExitStatus(enum.IntEnum):
    """The exit codes of `ddpm`, documented in the README and `ddpm --help`."""

    OK = 0
    ERROR = 1  # a domain or runtime error: bad checkpoint, NaN from the model, unwritable output
    USAGE = 2  # a bad flag or value
    INTERRUPTED = 130  # Ctrl-C (SIGINT), as shells report 128 + 2


class DdpmError(Exception):
    """A domain or runtime error: bad checkpoint, NaN from the model, unreadable file. Exit 1.

    An error whose message names parameters is built with :meth:`naming`: the library words it
    once (``pass the right {data_shape}``), ``str()`` shows the parameter names, and the CLI's
    error boundary shows its flags through :meth:`render` (``--data-shape``).
    """

    exit_code: int = ExitStatus.ERROR
    template: str | None = None

    @classmethod
    def naming(cls, template: str) -> Self:
        """This error with a message that names parameters as ``{fields}`` (``{{`` for a brace)."""
        error = cls(name_parameters(template, str))
        error.template = template
        return error

    def render(self, name: Callable[[str], str]) -> str:
        """The message with each parameter it names shown as ``name(parameter)``."""
        return str(self) if self.template is None else name_parameters(self.template, name)


class UsageError(DdpmError):
    """A bad flag or value given on the command line. Exit 2."""

    exit_code = ExitStatus.USAGE


class ParameterError(UsageError):
    """A bad value of a named library parameter (exit 2).

    ``template`` names parameters as ``{name}`` fields; the library's message shows them as
    written (``eta must be ...``), and the CLI re-renders it with its flags (``--eta must be
    ...``) through :meth:`render` (``cli.common.as_flags``). Literal braces are doubled.
    """

    def __init__(self, template: str) -> None:
        super().__init__(name_parameters(template, str))
        self.template = template


def check_choice(value: str, allowed: tuple[str, ...], name: str) -> str:
    """``value`` if it is one of ``allowed``, else a ParameterError naming the parameter ``name``:
    ``unknown spacing 'x'; allowed: leading, trailing, linspace`` (the CLI: ``--spacing``)."""
    if value not in allowed:
        raise ParameterError(
            f"unknown {{{name}}} {verbatim(repr(value))}; allowed: {', '.join(allowed)}"
        )
    return value


def look_up(
    table: Mapping[str, Value], name: str, what: str, error: type[DdpmError], label: str = "known"
) -> Value:
    """``table[name]``, else ``error``: ``unknown architecture 'x' (known: mlp, unet)``."""
    try:
        return table[name]
    except KeyError:
        raise error(f"unknown {what} {name!r} ({label}: {', '.join(table)})") from None


def verbatim(text: object) -> str:
    """``text`` as it reads inside a template of :func:`name_parameters` (its braces doubled):
    for paths, values and foreign messages put into a message that names parameters."""
    return str(text).replace("{", "{{").replace("}", "}}")


def name_parameters(template: str, name: Callable[[str], str]) -> str:
    """``template`` with each ``{parameter}`` field shown as ``name(parameter)`` (``{{`` is a
    literal brace): the library words a message once, the CLI shows its flags."""
    return template.format_map(_Names(name))


class _Names(dict[str, str]):
    def __init__(self, name: Callable[[str], str]) -> None:
        super().__init__()
        self._name = name

    def __missing__(self, key: str) -> str:
        return self._name(key)


class ScheduleError(DdpmError):
    """A schedule that cannot be built or is not valid (from a file or config: exit 1)."""


class ScheduleParameterError(ScheduleError, UsageError):
    """A schedule parameter out of its allowed range (unknown kind, T < 1, beta outside (0, 1)).
    Exit 2."""

    exit_code = ExitStatus.USAGE


class CheckpointError(DdpmError):
    """A checkpoint that cannot be loaded safely or does not match its metadata."""


class DataError(DdpmError):
    """Input data that cannot be read or does not fit the model."""


class SamplingError(DdpmError):
    """A sampling or evaluation run that failed (NaN/Inf appeared, impossible options)."""


class OutputError(DdpmError):
    """stdout cannot be written (closed, full, an I/O error). Exit 1."""


class Interrupted(BaseException):
    """Ctrl-C, raised by the CLI's SIGINT handler. A BaseException that is not KeyboardInterrupt,
    so that neither `except Exception` nor click's own KeyboardInterrupt handler can swallow it
    before `main()` turns it into `Error: interrupted` and exit 130."""
