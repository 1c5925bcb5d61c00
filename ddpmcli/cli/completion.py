"""Shell completion of option values (issue 8): schedule kinds and their aliases (`--kind`/`-k`,
`compare` specs), column names per command (`--columns`, a comma list), built-in data names
(`--data`, `--references`, with file names from the shell beside them).

Each completer is a click ``shell_complete`` callback, ``(ctx, param, incomplete) -> items``.
They run only when the shell asks for completions: this module imports nothing heavy at import
time (the option definitions import it, and `ddpm --help` must stay fast).
"""

from __future__ import annotations

from typing import Any

from click.shell_completion import CompletionItem

CUSTOM_KIND = "custom"  # betas or alpha_bars from a file (schedule_options' --betas-file)
BUILTIN_DATA = ("moons", "swiss_roll", "gmm", "shapes")


def kind_names() -> list[str]:
    """Every schedule kind, then the aliases, then ``custom``."""
    from ddpmcli import core

    return [*core.SCHEDULE_KINDS, *core.SCHEDULE_ALIASES, CUSTOM_KIND]


def complete_kind(ctx: Any, param: Any, incomplete: str) -> list[CompletionItem]:
    """`--kind`: the kinds and aliases starting with what is typed."""
    return [CompletionItem(name) for name in kind_names() if name.startswith(incomplete)]


def complete_spec(ctx: Any, param: Any, incomplete: str) -> list[CompletionItem]:
    """`compare SPEC...`: a kind while the spec has no ``:`` or ``+`` yet. No match leaves the
    shell to complete file names (a spec may be a diffusers config)."""
    if ":" in incomplete or "+" in incomplete:
        return []
    return complete_kind(ctx, param, incomplete)


def complete_data(ctx: Any, param: Any, incomplete: str) -> list[CompletionItem]:
    """`--data`/`--references`: the built-in sets starting with what is typed; none (a path)
    leaves the shell to complete file names (typer's scripts fall back to them)."""
    return [CompletionItem(name) for name in BUILTIN_DATA if name.startswith(incomplete)]


def column_names(command: str | None) -> list[str]:
    """The columns `command` can print (what its `--columns` accepts); [] for another command."""
    if command in ("schedule", "compare"):
        from ddpmcli.core import QUANTITIES

        first = ["schedule"] if command == "compare" else []
        return [*first, "t", "timestep", *QUANTITIES]
    if command in ("posterior", "check"):
        from ddpmcli.cli.schedule import CHECK_COLUMNS, POSTERIOR_COLUMNS

        return list(POSTERIOR_COLUMNS if command == "posterior" else CHECK_COLUMNS)
    if command == "reconstruct":
        from ddpmcli.run import AGGREGATE_COLUMNS, OPTIMAL_COLUMNS

        return list(dict.fromkeys(["t", "sample", *AGGREGATE_COLUMNS, *OPTIMAL_COLUMNS]))
    if command in ("sample", "nll"):
        from ddpmcli.run import BOUND_COLUMNS, STEP_COLUMNS

        names = STEP_COLUMNS if command == "sample" else (*BOUND_COLUMNS, "sample", "bits_per_dim")
        return list(dict.fromkeys(names))
    if command == "info":
        from ddpmcli.cli.checkpoint import INFO_COLUMNS

        return list(INFO_COLUMNS)
    return []


def complete_columns(ctx: Any, param: Any, incomplete: str) -> list[CompletionItem]:
    """`--columns A,B,...`: the command's columns not yet listed, after what is typed."""
    done, comma, last = incomplete.rpartition(",")
    listed = set(done.split(",")) if comma else set()
    head = done + comma
    names = column_names(getattr(ctx, "info_name", None))
    return [
        CompletionItem(head + name)
        for name in names
        if name.startswith(last) and name not in listed
    ]
