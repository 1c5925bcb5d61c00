"""`ddpm compare`: schedules of any family (VP, flow, sigma space) side by side, as long-format
rows, a per-schedule summary, and one figure.

Thin: parse the specs (:mod:`ddpmcli.specs`, presets included), take the rows from the core's
arrays (normalised time and the per-step log-SNR gap from :mod:`ddpmcli.core.grids`), hand them to
the output layer and the figure to :mod:`ddpmcli.plotting.schedule`. torch only inside.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ddpmcli import limits
from ddpmcli.cli.common import select_columns, select_rows
from ddpmcli.cli.completion import complete_spec
from ddpmcli.cli.option_groups import NO_TABLE_FLAGS, TableFlags, table_options
from ddpmcli.errors import UsageError

if TYPE_CHECKING:
    from ddpmcli.core import Schedule
    from ddpmcli.specs import CompareSpec

VIEW_COLUMNS: tuple[str, ...] = ("time", "h")
"""Columns compare adds to the schedule quantities: normalised time and the log-SNR gap h."""
SUMMARY_COLUMNS: tuple[str, ...] = (
    "schedule",
    "path",
    "steps",
    "log_snr_max",
    "log_snr_min",
    "terminal_snr",
    "h_max",
    "h_mean",
)


def view_columns(schedule: Schedule) -> dict[str, Any]:
    """``time`` (normalised, 1 = the noisiest training time) and ``h`` (log-SNR gap) per entry."""
    from ddpmcli.core import grids

    time = grids.normalised_time(
        schedule.path, schedule.timesteps, schedule.sigma_t, schedule.num_train_timesteps
    )
    return {"time": time, "h": grids.log_snr_gaps(schedule.log_snr)}


def summary_row(label: str, schedule: Schedule) -> dict[str, Any]:
    """One schedule in one row: log-SNR range, terminal SNR, the largest and mean finite h."""
    import torch

    h = view_columns(schedule)["h"]
    finite = h[torch.isfinite(h)]
    return {
        "schedule": label,
        "path": schedule.path,
        "steps": schedule.num_steps,
        "log_snr_max": float(schedule.log_snr[0]),
        "log_snr_min": float(schedule.log_snr[-1]),
        "terminal_snr": float(schedule.snr[-1]),
        "h_max": float(finite.max()) if finite.numel() else float("nan"),
        "h_mean": float(finite.mean()) if finite.numel() else float("nan"),
    }


def _rows(
    spec: CompareSpec, indices: Sequence[int], columns: Sequence[str]
) -> list[dict[str, Any]]:
    from ddpmcli.cli.schedule import schedule_rows

    schedule = spec.built.schedule
    plain = [c for c in columns if c not in VIEW_COLUMNS and c != "schedule"]
    rows = schedule_rows(schedule, indices, plain, extra={"schedule": spec.label})
    view = view_columns(schedule)
    for row, i in zip(rows, indices, strict=True):
        row.update({name: float(view[name][i]) for name in VIEW_COLUMNS if name in columns})
    return [{name: row[name] for name in columns} for row in rows]


@table_options()
def compare(
    specs: Annotated[
        list[str],
        typer.Argument(
            metavar="SPEC...",
            help="Schedules: KIND[+zsnr][:key=value,...], a preset NAME[@RES] (sd15, sd2-v, "
            "sdxl, sd3, sd35, flux-dev, flux-schnell, sana, wan, edm, improved-cosine; "
            "flux@1024) or a diffusers config file, e.g. cosine, linear:beta_end=0.012,T=500, "
            "scaled_linear+zsnr, cosine:steps=50,spacing=trailing.",
            autocompletion=complete_spec,
        ),
    ],
    steps: Annotated[
        str | None,
        typer.Option(
            "--steps",
            metavar="N",
            help="Compare the N-step inference grids: a flow preset's or config's scheduler grid, "
            "a VP schedule respaced (its config's spacing, else leading), EDM's N Karras sigmas. "
            "A spec's own steps=... wins.",
        ),
    ] = None,
    summary: Annotated[
        bool,
        typer.Option(
            "--summary",
            help="One row per schedule: path, steps, log-SNR range, terminal SNR, largest and "
            "mean log-SNR gap h.",
        ),
    ] = False,
    table: TableFlags = NO_TABLE_FLAGS,
) -> None:
    """Compare schedules side by side: long-format rows with a `schedule` column.

    The key columns (schedule, t, and timestep when respaced) always lead; --columns picks the rest.
    Timesteps are 0-based as models take them (t = 0 is one noising step; t indexes entries from
    the least noisy). `time` is normalised time ((t+1)/T for VP, s for a flow, the rank for sigma
    space); `h` is the log-SNR gap lambda_{t-1} - lambda_t a sampler crosses at t (inf at t = 0,
    whose step lands on data). --t and --every select rows in every schedule.

    Examples:

      ddpm compare sd15 sd3 flux@1024 --steps 28 --summary

      ddpm compare linear cosine scaled_linear+zsnr --every 100 --columns alpha_bar,snr

      ddpm compare cosine linear:beta_end=0.012,T=500 --format csv > compare.csv

      ddpm compare sd15 sd3 flux@1024 edm --steps 28 --plot plots/compare_families.png
    """
    from ddpmcli.cli.schedule import _plot
    from ddpmcli.specs import parse_compare_spec

    table.check()
    plot_path = table.plot_path("compare")
    parsed = [parse_compare_spec(spec, steps) for spec in specs]
    marks: list[Sequence[int]] | None = None
    if summary:
        if table.t is not None or table.every is not None:
            raise UsageError("--summary gives one row per schedule; drop --t/--every")
        rows = [summary_row(p.label, p.built.schedule) for p in parsed]
        picked = select_columns(table.columns, SUMMARY_COLUMNS)
        table.emit(rows, list(dict.fromkeys(["schedule", *picked])), "compare")
    else:
        marks = _emit_rows(parsed, table)
    from ddpmcli.plotting.schedule import plot_compare

    selected = table.t is not None or table.every is not None
    figure = partial(plot_compare, marks=marks if selected else None)
    _plot(figure, plot_path, table.quiet, [(p.label, p.built.schedule) for p in parsed])


def _emit_rows(parsed: list[CompareSpec], table: TableFlags) -> list[Sequence[int]]:
    """The long-format rows; the indices picked per schedule (dots on the figure)."""
    from ddpmcli.cli.schedule import _columns_of

    respaced = any(p.built.respaced for p in parsed)
    available, default = _columns_of(parsed[0].built)
    keys = ["schedule", "t", *(["timestep"] if respaced else [])]
    available = list(dict.fromkeys(["t", "timestep", *VIEW_COLUMNS, *available]))
    default = list(dict.fromkeys([*keys, *VIEW_COLUMNS, *default[1:]]))
    # long format: the key columns always lead, so rows stay attributable under --columns
    picked = select_columns(table.columns, ["schedule", *available], default)
    cols = list(dict.fromkeys([*keys, *picked]))
    rows: list[dict[str, Any]] = []
    marks: list[Sequence[int]] = []
    for p in parsed:
        try:
            indices = select_rows(table.t, table.every, p.built.schedule.num_steps)
        except UsageError as exc:
            raise UsageError(f"{exc} in schedule {p.label!r}") from None
        marks.append(indices)
    total = sum(len(indices) for indices in marks)  # all schedules' rows are held together
    limits.check_allocation(total * limits.ROW_BYTES, f"{total} rows of {len(parsed)} schedules")
    for p, picked_rows in zip(parsed, marks, strict=True):
        rows += _rows(p, picked_rows, cols)
    table.emit(rows, cols, "compare")
    return marks
