"""No command writes over a file it reads: ``--plot``, ``--save`` and ``--out`` are compared with
every path the command's other options name, before the command runs (``files.check_apart``).

Generic over the commands: the parsed click parameters are read, so a new command or option is
covered without a line here. A value may name files inside it (``MODULE.py:factory``, compare's
``name:path`` specs, ``key=value``): each piece that names something on disk counts as an input.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ddpmcli.cli.common import PLOT_DEFAULT, PLOT_FOLDER
from ddpmcli.files import check_apart

OUTPUT_PARAMETERS: dict[str, str] = {"plot": "--plot", "save": "--save", "out": "--out"}
_PIECES = re.compile(r"[:,=]")


def _values(value: Any) -> Iterator[str]:
    if isinstance(value, str | Path):
        text = str(value)
        yield text
        if _PIECES.search(text):
            yield from (piece for piece in _PIECES.split(text) if piece)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _values(item)


def check_command_paths(ctx: Any) -> None:
    """The outputs of the command ``ctx`` is about to run, checked against its inputs."""
    outputs: dict[str, str] = {}
    inputs: dict[str, list[str]] = {}
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if value is None or isinstance(value, bool):
            continue
        flag = param.opts[0] if param.opts and param.opts[0].startswith("-") else param.name.upper()
        if param.name in OUTPUT_PARAMETERS and isinstance(value, str | Path):
            if str(value) in (PLOT_DEFAULT, ""):
                value = PLOT_FOLDER / f"{ctx.info_name}.png"
            outputs[OUTPUT_PARAMETERS[param.name]] = str(value)
        else:
            inputs[flag] = list(_values(value))
    if outputs:
        check_apart(outputs, inputs)
