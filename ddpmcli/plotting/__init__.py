"""Figures, made with matplotlib imported lazily (Agg backend) so that nothing pays for it unless a
figure is asked for. Shared here: a paper style (labelled axes, legends, readable at column width)
and an atomic save by suffix (PNG, SVG or PDF). Each command group has its own module
(`plotting/schedule.py`, ...)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
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


# Names a diffusers layout gives every scheduler config: the folder around them names it better.
_GENERIC_NAMES = frozenset({"scheduler_config", "config", "scheduler", "model_index"})


def short_labels(labels: Sequence[str]) -> list[str]:
    """Legend names for schedule specs: a spec that names a file or folder (a config) is shown by
    its own name, or by the folder that holds it where the name is diffusers' generic one
    (``sd15/scheduler/scheduler_config.json`` -> ``sd15``); others as given. Names that would
    repeat take more of their path (``a/sd15``), then a number, so each stays unique and short
    (issue 20: a 52-character path covered the axes)."""

    def parts(label: str) -> list[str]:
        if "/" not in label and not label.lower().endswith(".json"):
            return [label]
        path = Path(label)
        names = [p for p in (*path.parent.parts, path.stem if path.suffix else path.name) if p]
        while len(names) > 1 and names[-1].lower() in _GENERIC_NAMES:
            names.pop()
        return names or [label]

    split = [parts(label) for label in labels]
    depth = [1] * len(labels)
    for _ in range(8):  # take one more folder where names repeat
        shown = ["/".join(p[-d:]) for p, d in zip(split, depth, strict=True)]
        repeated = {name for name in shown if shown.count(name) > 1}
        if not repeated:
            return shown
        depth = [d + (s in repeated) for s, d in zip(shown, depth, strict=True)]
    seen: dict[str, int] = {}
    out = []
    for name in shown:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name} #{seen[name]}")
    return out


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Save ``fig`` atomically, the format taken from the suffix (.png, .svg, .pdf). Warnings
    matplotlib raises while drawing (``constrained_layout not applied ...``, a missing glyph) are
    kept from the user's terminal: the figure is written all the same (issue 20)."""
    target = Path(path)
    fmt = FIGURE_SUFFIXES.get(target.suffix.lower())
    if fmt is None:
        raise UsageError(
            f"figure {str(target)!r}: unknown suffix {target.suffix or '(none)'!r}; "
            f"allowed: {', '.join(FIGURE_SUFFIXES)}"
        )
    with pyplot().rc_context(PAPER_STYLE), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return atomic_write(target, lambda tmp: fig.savefig(tmp, format=fmt), make_parents=True)
