"""The typer app `ddpm` and `main()`, the one error boundary of the command line.

Every command group is a module `ddpmcli/cli/<group>.py` exposing `register(app: typer.Typer)`;
`COMMAND_GROUPS` below lists them, one line each. Modules import torch/numpy/matplotlib lazily,
inside their commands, so `ddpm --help` and shell completion stay fast.

Exit codes: 0 success, 1 domain or runtime error, 2 usage error, 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from ddpmcli import __version__
from ddpmcli.cli.common import expand_optional_values
from ddpmcli.errors import DdpmError

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

# One line per command group (module ddpmcli/cli/<name>.py with register(app)), in help order.
COMMAND_GROUPS: tuple[str, ...] = (
    "schedule",  # schedule, compare, posterior, check
    "reconstruct",  # reconstruct
    "sample",  # sample, nll
    "checkpoint",  # info, train
    # helpers: add your group here, one line each, e.g. "checkpoint", "reconstruct", "sample",
)


def _debug() -> bool:
    return os.environ.get("DDPM_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def _error_line(message: str) -> None:
    """One `Error: ...` line on stderr, as plain text (no rich markup in messages)."""
    text = " ".join(str(message).split()) or "unknown error"
    try:
        sys.stderr.write(f"Error: {text}\n")
        sys.stderr.flush()
    except (BrokenPipeError, ValueError):
        pass


def _quiet_broken_stdout() -> None:
    """stdout's reader went away (`ddpm schedule | head`): point stdout at devnull so the final
    flush at interpreter exit does not raise a second BrokenPipeError."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def _usage_message(exc: typer.TyperException) -> str:
    message = exc.format_message()
    ctx = getattr(exc, "ctx", None)
    if ctx is not None:
        message = f"{message} (see '{ctx.command_path} --help')"
    return message


class DdpmGroup(TyperGroup):
    """The root group: runs click in non-standalone mode and turns every failure into one line."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        argv = expand_optional_values(sys.argv[1:] if args is None else args)
        code = run_guarded(
            lambda: super(DdpmGroup, self).main(
                args=argv,
                prog_name=prog_name,
                complete_var=complete_var,
                standalone_mode=False,
                windows_expand_args=windows_expand_args,
                **extra,
            )
        )
        if standalone_mode:
            sys.exit(code)
        return code


def run_guarded(call: Any) -> int:
    """Run ``call()`` (click in non-standalone mode) and map its outcome to an exit code."""
    try:
        rv = call()
    except DdpmError as exc:
        if _debug():
            traceback.print_exc()
        _error_line(str(exc))
        return int(getattr(exc, "exit_code", EXIT_ERROR))
    except typer.Abort:
        _error_line("aborted")
        return EXIT_INTERRUPTED
    except typer.TyperException as exc:  # click's UsageError, BadParameter, FileError, ...
        if type(exc).__name__ == "NoArgsIsHelpError":
            # the help text, on stderr: bare `ddpm` is a usage error
            sys.stderr.write(exc.format_message().rstrip("\n") + "\n")
            return EXIT_USAGE
        if _debug():
            traceback.print_exc()
        _error_line(_usage_message(exc))
        return int(getattr(exc, "exit_code", EXIT_USAGE))
    except KeyboardInterrupt:
        _error_line("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _quiet_broken_stdout()
        return EXIT_ERROR
    except SystemExit:
        raise
    except Exception as exc:  # a bug: still one line, traceback on request
        if _debug():
            traceback.print_exc()
        _error_line(f"{type(exc).__name__}: {exc} (set DDPM_DEBUG=1 for the traceback)")
        return EXIT_ERROR
    if isinstance(rv, int) and not isinstance(rv, bool):
        return rv  # click returns the code of a typer.Exit / ctx.exit in non-standalone mode
    return EXIT_OK


app = typer.Typer(
    name="ddpm",
    cls=DdpmGroup,
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    # Plain click help: rendering it with rich costs ~0.1 s of imports, and `ddpm --help` must stay
    # within 1.5x of `import typer` (benchmarks/bench_cli.py).
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120},
    help=(
        "See a DDPM noise schedule, its posterior, and what a checkpoint does at every noise "
        "level.\n\n"
        "Timesteps are 0-based as models take them: t = 0 is one noising step, t = T-1 the "
        "last.\n\n"
        "Exit codes: 0 ok, 1 error, 2 usage error, 130 interrupted. DDPM_DEBUG=1 shows tracebacks."
    ),
)


def _version_callback(value: bool) -> None:
    if value:
        sys.stdout.write(f"ddpm {__version__}\n")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            help="Print the version and exit.",
            callback=_version_callback,
            is_eager=True,
        ),
    ] = False,
) -> None:
    """See a DDPM noise schedule, its posterior, and what a checkpoint does at every noise level."""


def reflow_help(doc: str) -> str:
    """A command docstring as help text: lines of a prose paragraph joined into one (rich keeps
    a docstring's line breaks, which then wrap badly at the terminal's width); indented
    paragraphs (examples) kept line by line."""
    paragraphs = inspect.cleandoc(doc).split("\n\n")
    out = []
    for para in paragraphs:
        lines = para.splitlines()
        if any(line.startswith((" ", "- ", "* ")) for line in lines):
            out.append(para)
        else:
            out.append(" ".join(line.strip() for line in lines))
    return "\n\n".join(out)


for _group in COMMAND_GROUPS:
    importlib.import_module(f"ddpmcli.cli.{_group}").register(app)
for _info in app.registered_commands:
    if _info.help is None and _info.callback is not None and _info.callback.__doc__:
        _info.help = reflow_help(_info.callback.__doc__)


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point: run `ddpm` and exit with its code."""
    command = typer.main.get_command(app)
    command.main(args=argv, prog_name="ddpm")
