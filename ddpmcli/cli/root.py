"""The typer app `ddpm` and its error boundary, `run_guarded()`, which turns every outcome into one
`Error:` line and an exit status. Imported by `ddpmcli.cli.app.main()` once its signal and stream
guards are in place (start-up imports included).

Every command group is a module `ddpmcli/cli/<group>.py` exposing `register(app: typer.Typer)`;
`COMMAND_GROUPS` below lists them (imported, not named by strings), one line each. Modules
import torch/numpy/matplotlib lazily, inside their commands, so `ddpm --help` and shell
completion stay fast.

Exit codes (`ddpmcli.errors.ExitStatus`): 0 success, 1 domain or runtime error, 2 usage error,
130 interrupted (Ctrl-C). A broken pipe (`ddpm schedule | head -1`) exits 0 silently for every
format: whether the pipe breaks depends on timing, and the reader chose to stop.
"""

from __future__ import annotations

import contextlib
import errno
import inspect
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from ddpmcli import __version__
from ddpmcli.cli import checkpoint as checkpoint_commands
from ddpmcli.cli import nll as nll_commands
from ddpmcli.cli import reconstruct as reconstruct_commands
from ddpmcli.cli import sample as sample_commands
from ddpmcli.cli import schedule as schedule_commands
from ddpmcli.cli import steps as steps_commands
from ddpmcli.cli.common import flag_name
from ddpmcli.cli.plot_args import expand_optional_values, misread_plot_path
from ddpmcli.errors import DdpmError, ExitStatus, Interrupted

EXIT_OK = ExitStatus.OK
EXIT_ERROR = ExitStatus.ERROR
EXIT_USAGE = ExitStatus.USAGE
EXIT_INTERRUPTED = ExitStatus.INTERRUPTED
# errno values of a failed write to stdout that reach the boundary outside `emit` (help text)
_OUTPUT_ERRNOS = frozenset({errno.ENOSPC, errno.EBADF, errno.EIO, errno.EDQUOT})

# One line per command group (a module ddpmcli/cli/<name>.py with register(app)), in help order.
COMMAND_GROUPS: tuple[Any, ...] = (
    schedule_commands,  # schedule, compare, posterior, check
    reconstruct_commands,  # reconstruct
    sample_commands,  # sample
    steps_commands,  # steps
    nll_commands,  # nll
    checkpoint_commands,  # info, train
)


def _debug() -> bool:
    return os.environ.get("DDPM_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def _error_line(message: str) -> None:
    """One `Error: ...` line on stderr, as plain text: no markup, control characters escaped."""
    from ddpmcli.cli.app import error_line

    error_line(message)


def _let_rank0_report() -> None:
    """Under torchrun, a rank other than 0 waits for rank 0 to print the error and exit."""
    if "ddpmcli.run.distributed" in sys.modules:
        from ddpmcli.run.distributed import after_failure

        after_failure()


def _quiet_broken_stdout() -> None:
    from ddpmcli.cli.app import quiet_stdout

    quiet_stdout()


def _usage_message(exc: typer.TyperException) -> str:
    message = exc.format_message()
    ctx = getattr(exc, "ctx", None)
    if ctx is not None:
        message = f"{message} (see '{ctx.command_path} --help')"
    return message


class _ReaderGone(Exception):
    """A broken pipe on stdout, carried past typer (which would exit 1 for it, and swap
    sys.stdout for a wrapper) to `run_guarded`."""


class DdpmGroup(TyperGroup):
    """The root group: runs click in non-standalone mode and turns every failure into one line."""

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        command: Any = super().get_command(ctx, cmd_name)
        if command is not None and not getattr(command, "_ddpm_apart", False):
            run_command = command.invoke

            def invoke(sub_ctx: Any) -> Any:
                from ddpmcli.cli.apart import check_command_paths

                check_command_paths(sub_ctx)  # no output over an input, before any work
                return run_command(sub_ctx)

            command.invoke = invoke
            command._ddpm_apart = True
        return command

    def invoke(self, ctx: Any) -> Any:
        # typer's own main turns KeyboardInterrupt into a silent exit 130 and EPIPE into exit 1
        # before our boundary sees them: pass them on as exceptions it does not catch.
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as exc:
            raise Interrupted from exc
        except BrokenPipeError as exc:
            raise _ReaderGone from exc

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        given = list(sys.argv[1:] if args is None else args)
        argv = expand_optional_values(given)

        def parse_and_run() -> Any:
            try:
                return super(DdpmGroup, self).main(
                    args=argv,
                    prog_name=prog_name,
                    complete_var=complete_var,
                    standalone_mode=False,
                    windows_expand_args=windows_expand_args,
                    **extra,
                )
            except typer.TyperException as exc:  # `--plot myplot`: the suffix rule, not click's
                better = misread_plot_path(exc.format_message(), given)
                if better is None:
                    raise
                raise better from None

        code = run_guarded(parse_and_run)
        if standalone_mode:
            sys.exit(code)
        return code


def _bug(exc: BaseException) -> int:
    if _debug():
        traceback.print_exc()
    _error_line(f"{type(exc).__name__}: {exc} (set DDPM_DEBUG=1 for the traceback)")
    return EXIT_ERROR


def run_guarded(call: Any) -> int:
    """Run ``call()`` (click in non-standalone mode) and map its outcome to an exit code."""
    try:
        rv = call()
    except DdpmError as exc:
        if _debug():
            traceback.print_exc()
        _error_line(exc.render(flag_name))  # parameters the library names, as our flags
        _let_rank0_report()
        return int(getattr(exc, "exit_code", EXIT_ERROR))
    except Interrupted:
        _error_line("interrupted")
        return EXIT_INTERRUPTED
    except typer.Abort as exc:  # click turns a KeyboardInterrupt into Abort
        interrupted = isinstance(exc.__context__, KeyboardInterrupt | EOFError)
        _error_line("interrupted" if interrupted else "aborted")
        return EXIT_INTERRUPTED
    except typer.TyperException as exc:  # click's UsageError, BadParameter, FileError, ...
        if type(exc).__name__ == "NoArgsIsHelpError":
            # the help text, on stderr: bare `ddpm` is a usage error
            with contextlib.suppress(OSError, ValueError, AttributeError):
                sys.stderr.write(exc.format_message().rstrip("\n") + "\n")
            return EXIT_USAGE
        if _debug():
            traceback.print_exc()
        _error_line(_usage_message(exc))
        return int(getattr(exc, "exit_code", EXIT_USAGE))
    except KeyboardInterrupt:
        _error_line("interrupted")
        return EXIT_INTERRUPTED
    except (BrokenPipeError, _ReaderGone):
        _quiet_broken_stdout()
        return EXIT_OK
    except SystemExit:
        raise
    except OSError as exc:
        if exc.errno in _OUTPUT_ERRNOS and exc.filename is None:
            # a write to stdout outside `emit` (help text into /dev/full or a closed stdout)
            _error_line(f"cannot write output: {exc.strerror or exc}")
            return EXIT_ERROR
        return _bug(exc)
    except Exception as exc:  # a bug: still one line, traceback on request
        return _bug(exc)
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


HELP_EXAMPLE_WIDTH = 78  # an example's lines fit 80 columns after click's 2-space indent


def _fold(line: str, width: int = HELP_EXAMPLE_WIDTH) -> list[str]:
    """An example command longer than ``width`` as shell continuation lines (``\\`` at the end),
    broken before an option where possible: it still copies and pastes as one command."""
    if len(line) <= width:
        return [line]
    indent = line[: len(line) - len(line.lstrip())]
    words = line.split()
    lines: list[str] = []
    current = indent + words[0]
    for i, word in enumerate(words[1:], start=1):
        # keep an option with its value: break before a word that starts an option, unless the
        # line would overflow anyway
        fits = len(current) + 1 + len(word) + 2 <= width
        rest_fits = len(current) + len(" ".join(words[i:])) + 1 <= width
        if fits and (rest_fits or not word.startswith("-") or len(current) < width // 2):
            current += " " + word
        else:
            lines.append(current + " \\")
            current = indent + "  " + word
    return [*lines, current]


def reflow_help(doc: str) -> str:
    """A command docstring as help text: lines of a prose paragraph joined into one (rich keeps
    a docstring's line breaks, which then wrap badly at the terminal's width); indented
    paragraphs (examples) kept line by line, and marked (click's ``\\b``) so that click never
    rewraps them: an example stays one line, whole, to copy and paste, even at 80 columns."""
    paragraphs = inspect.cleandoc(doc).split("\n\n")
    out = []
    for para in paragraphs:
        lines = para.splitlines()
        if any(line.startswith(" ") for line in lines):
            out.append("\n".join(["\b", *(part for line in lines for part in _fold(line))]))
        elif any(line.startswith(("- ", "* ")) for line in lines):
            out.append(para)
        else:
            out.append(" ".join(line.strip() for line in lines))
    return "\n\n".join(out)


for _group in COMMAND_GROUPS:
    _group.register(app)
for _info in app.registered_commands:
    if _info.help is None and _info.callback is not None and _info.callback.__doc__:
        _info.help = reflow_help(_info.callback.__doc__)


def run(argv: Sequence[str] | None = None) -> int:
    """Run `ddpm` with ``argv`` (default: sys.argv[1:]) and return its exit status."""
    command = typer.main.get_command(app)
    code = command.main(args=argv, prog_name="ddpm", standalone_mode=False)
    return int(code) if isinstance(code, int) else EXIT_OK
