"""Figures, made with matplotlib imported lazily (Agg backend) so that nothing pays for it unless a
figure is asked for. Shared here: a paper style (labelled axes, legends, readable at column width)
and an atomic save by suffix (PNG, SVG or PDF). Each command group has its own module
(`plotting/schedule.py`, ...)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ddpmcli.errors import UsageError
from ddpmcli.files import atomic_write

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FIGURE_SUFFIXES: dict[str, str] = {".png": "png", ".svg": "svg", ".pdf": "pdf"}
# One column of a two-column paper is about 3.3 in; panels are laid out two per row at ~7 in.
COLUMN_WIDTH_IN = 3.4
FULL_WIDTH_IN = 7.0
PAPER_STYLE: dict[str, Any] = {
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "legend.fontsize": 7,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "lines.linewidth": 1.2,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.5,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "legend.frameon": False,
    "savefig.dpi": 200,
    "savefig.bbox": "tight",
    "svg.fonttype": "none",
    "pdf.fonttype": 42,
}


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display needed), imported on first use."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


@contextmanager
def paper_figure(
    nrows: int = 1, ncols: int = 1, *, width: float = FULL_WIDTH_IN, row_height: float = 2.2
) -> Iterator[tuple[Figure, Any]]:
    """A figure in the paper style with a grid of axes (always a 2-D array); closed on exit."""
    plt = pyplot()
    with plt.rc_context(PAPER_STYLE):
        fig, axes = plt.subplots(
            nrows, ncols, figsize=(width, row_height * nrows), squeeze=False, layout="constrained"
        )
        try:
            yield fig, axes
        finally:
            plt.close(fig)


def literal(text: str) -> str:
    """``text`` (a file or schedule name) shown as it is in a title or legend: a ``$`` would start
    matplotlib's mathtext, so it is escaped; control characters are escaped as in the terminal."""
    from ddpmcli.output import escape_control

    return escape_control(str(text)).replace("$", r"\$")


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Save ``fig`` atomically, the format taken from the suffix (.png, .svg, .pdf)."""
    target = Path(path)
    fmt = FIGURE_SUFFIXES.get(target.suffix.lower())
    if fmt is None:
        raise UsageError(
            f"figure {str(target)!r}: unknown suffix {target.suffix or '(none)'!r}; "
            f"allowed: {', '.join(FIGURE_SUFFIXES)}"
        )
    with pyplot().rc_context(PAPER_STYLE):
        return atomic_write(target, lambda tmp: fig.savefig(tmp, format=fmt), make_parents=True)
