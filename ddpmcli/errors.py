"""The error hierarchy shared by every layer (standard library only, so `main()` can catch it
without importing torch). Each error carries the exit code the CLI turns it into."""

from __future__ import annotations


class DdpmError(Exception):
    """A domain or runtime error: bad checkpoint, NaN from the model, unreadable file. Exit 1."""

    exit_code: int = 1


class UsageError(DdpmError):
    """A bad flag or value given on the command line. Exit 2."""

    exit_code = 2


class ScheduleError(DdpmError):
    """A schedule that cannot be built or is not valid (from a file or config: exit 1)."""


class ScheduleParameterError(ScheduleError, UsageError):
    """A schedule parameter out of its allowed range (unknown kind, T < 1, beta outside (0, 1)).
    Exit 2."""

    exit_code = 2


class CheckpointError(DdpmError):
    """A checkpoint that cannot be loaded safely or does not match its metadata."""


class DataError(DdpmError):
    """Input data that cannot be read or does not fit the model."""


class SamplingError(DdpmError):
    """A sampling or evaluation run that failed (NaN/Inf appeared, impossible options)."""
