"""`--plot` as an option with an optional value: the argv rewrite that gives a bare `--plot` its
default, and the suffix rule for a word after it that was meant as the figure's name.

Standard library only (the CLI runs this on every invocation, before typer parses anything).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from ddpmcli.errors import UsageError

PLOT_SUFFIXES: tuple[str, ...] = (".png", ".svg", ".pdf")
PLOT_DEFAULT = "@default"  # what a bare `--plot` becomes (see expand_optional_values)


OPTIONAL_VALUE_OPTIONS: dict[str, str] = {"--plot": PLOT_DEFAULT}


# Image types matplotlib could be asked for that we do not write: a word after `--plot` ending in
# one of them was meant as the figure, and is taken as --plot's PATH so its suffix is refused.
_OTHER_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".eps", ".ps")


def _takes_value(token: str) -> bool:
    """Whether the token after a bare `--plot` is its PATH: when it ends in a figure suffix
    (.png, .svg, .pdf, any case), or in another image type's (.jpg, ...: then refused by its
    suffix). Anything else (`cosine`, `sched.json`, a folder, an option) leaves `--plot` bare;
    write `--plot=PATH` to give another name. A word left over that way that the command cannot
    place gets the suffix rule (:func:`misread_plot_path`), not click's "extra argument"."""
    lowered = token.lower()
    return lowered.endswith(PLOT_SUFFIXES + _OTHER_IMAGE_SUFFIXES) and not token.startswith("-")


def plot_suffix_error(value: str) -> UsageError:
    """The one message for a `--plot` PATH of a type we do not write."""
    suffix = Path(value).suffix
    return UsageError(
        f"--plot {value!r}: unknown figure type {suffix or '(no suffix)'!r}; allowed suffixes: "
        f"{', '.join(PLOT_SUFFIXES)} (write --plot {Path(value).with_suffix('.png')}, or "
        "--plot=PATH)"
    )


def misread_plot_path(message: str, args: Sequence[str]) -> UsageError | None:
    """The suffix rule, for click's ``Got unexpected extra argument(s) (WORD ...)`` when WORD is
    the word right after a bare `--plot` in ``args``: it was meant as the figure (`--plot
    myplot`). None for any other message."""
    match = re.fullmatch(r"Got unexpected extra argument(?:\(s\)|s)? \((.*)\)", message, re.S)
    if match is None:
        return None
    extra = match.group(1)
    tokens = list(args)
    for i, token in enumerate(tokens[:-1]):
        if token == "--":
            break
        word = tokens[i + 1]
        if token == "--plot" and not _takes_value(word) and extra.split(" ")[0] == word:
            return plot_suffix_error(word)
    return None


def expand_optional_values(args: Sequence[str]) -> list[str]:
    """Rewrite argv so that `--plot` works as a flag with an optional value.

    Typer's bundled click has no optional-value options, so a bare `--plot` becomes
    `--plot=@default` unless the next token ends in a figure suffix (see `_takes_value`): no
    guessing from the token's look. `--plot=PATH` is passed unchanged. Stops at `--`.
    """
    out: list[str] = []
    tokens = list(args)
    for i, token in enumerate(tokens):
        if token == "--":
            out.extend(tokens[i:])
            break
        default = OPTIONAL_VALUE_OPTIONS.get(token)
        if default is not None:
            following = tokens[i + 1] if i + 1 < len(tokens) else ""
            if not _takes_value(following):
                out.append(f"{token}={default}")
                continue
        out.append(token)
    return out
