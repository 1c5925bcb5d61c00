"""`--data-range` and the data-derived metadata of the commands that read data (issue 8).

`--data-range LO,HI` sets the range of a program's samples (TorchScript/export without
metadata) or overrides a checkpoint's; `train --data-range` overrides the range it records. A
program without a data shape takes the shape of `--data`. Data outside the model's range gets a
warning with the fraction outside and the fix. Nothing here imports torch at import time.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ddpmcli.cli.common import PANEL_META, as_flags, flag_name
from ddpmcli.errors import DdpmError, UsageError, name_parameters

if TYPE_CHECKING:
    from torch import Tensor

RANGE_HELP = (
    "Range of the model's samples, LO,HI: for programs without metadata (default -1,1) or to "
    "override a checkpoint's; x0_hat is clipped to it and uint8 data mapped onto it."
)
DataRangeOpt = Annotated[
    str | None,
    typer.Option("--data-range", metavar="LO,HI", help=RANGE_HELP, rich_help_panel=PANEL_META),
]
TrainRangeOpt = Annotated[
    str | None,
    typer.Option(
        "--data-range",
        metavar="LO,HI",
        help="Data range to record in the checkpoint instead of the data's own (file data: "
        "[-1, 1] when it lies inside, else its min and max; built-in sets: their range).",
    ),
]


def parse_range(text: str | None, flag: str = "--data-range") -> tuple[float, float] | None:
    """``LO,HI`` as two finite floats with LO < HI; None stays None."""
    if text is None:
        return None
    parts = text.split(",")
    try:
        lo, hi = (float(part) for part in parts)
    except ValueError:
        raise UsageError(f"{flag} {text!r}: want LO,HI (two numbers, e.g. -1,1)") from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or not lo < hi:
        raise UsageError(f"{flag} {text!r}: want finite LO < HI")
    return lo, hi


def data_load_options(
    checkpoint: Path, data: str | None, data_shape: str | None, data_range: str | None
) -> dict[str, Any]:
    """Keyword arguments for `checkpoints.load_checkpoint` beyond `loader_options`: the
    ``--data-range`` and, for a program (TorchScript/export) without ``--data-shape``, the
    sample shape of ``--data`` (used only when the program's metadata has none), and for a
    diffusers folder (an SD3/Flux pipeline takes its resolution from the data's images)."""
    options: dict[str, Any] = {"data_range": parse_range(data_range)}
    if data is not None and data_shape is None:
        options["shape_from_data"] = _program_data_shape(checkpoint, data)
    return options


def _program_data_shape(checkpoint: Path, data: str) -> tuple[int, ...] | None:
    from ddpmcli import data as datasets
    from ddpmcli import limits
    from ddpmcli.checkpoints import detect_format

    try:
        if detect_format(checkpoint) not in ("torchscript", "export", "diffusers"):
            return None
        builtin = datasets.BUILTIN_DATASETS.get(data)
        if builtin is not None and not Path(data).exists():
            return tuple(builtin.data_shape)
        shape = tuple(int(d) for d in datasets.get_data(data, n=1).shape[1:])
    except DdpmError:
        return None  # the loader, or reading --data later, says what is wrong
    return limits.check_sample_shape(shape, "--data")


def _from_a_file(source: str) -> bool:
    """Whether data came from a file or folder: a built-in set is drawn in the model's range by
    design (its noise may stray a little past it) and reference samples are the model's own."""
    import os

    from ddpmcli.data import BUILTIN_DATASETS

    if source == "reference samples":
        return False
    return source not in BUILTIN_DATASETS or os.path.exists(source)


def evaluation_data(
    model: Any,
    data: str | None,
    n: int,
    seed: int,
    *,
    show: bool,
    quiet: bool,
    compare_optimal: bool = False,
) -> Any:
    """The samples a checkpoint is evaluated on (`ddpm reconstruct`, `ddpm nll`), as
    :func:`ddpmcli.run.reconstruction_data` picks them, its errors naming ``--data``; a warning
    where they lie outside the model's range (``show``: as in :func:`warn_outside_range`), a note
    where ``--n`` asks for more than there are (unless ``quiet``)."""
    from ddpmcli.output import note
    from ddpmcli.run import reconstruction_data

    with as_flags(source="--data"):
        picked = reconstruction_data(model, data, n=n, seed=seed, compare_optimal=compare_optimal)
    warn_outside_range(picked.x0, model.data_range, picked.source, show=show)
    found = picked.x0.shape[0]
    if found < n and not quiet:
        note(f"--n {n} is more than the {found} samples of {picked.source}; using all")
    return picked


def warn_outside_range(
    x: Tensor,
    data_range: tuple[float, float],
    source: str,
    *,
    training: bool = False,
    show: bool = True,
) -> None:
    """Warn on stderr when values of ``x`` lie outside ``data_range`` (see
    `checks.data_outside_range`); ``show=False`` (a torchrun rank but the first) says nothing."""
    if not show or not _from_a_file(source):
        return
    from ddpmcli.checks import data_outside_range
    from ddpmcli.output import warn

    template = data_outside_range(x, data_range, source, training=training)
    if template is not None:
        warn(name_parameters(template, flag_name))
