"""`ddpm steps --plot`: error against model evaluations, one line per sampler (log-log)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ddpmcli.plotting import paper_figure, save_figure

__all__ = ["plot_steps"]


def plot_steps(
    rows: Sequence[Mapping[str, Any]],
    orders: Mapping[str, float],
    path: str | Path,
    *,
    title: str = "",
    target: float | None = None,
    reference: str = "",
) -> Path:
    """RMS error of the final samples against the reference vs NFE, log-log; the empirical
    order (slope over the two largest NFE) in each deterministic sampler's legend entry; a
    stochastic sampler's line is its distribution distance (energy distance to the reference
    samples, dashed). ``target``: a horizontal line."""
    with paper_figure(1, 2, row_height=3.0) as (fig, ax):
        det, sto = ax[0, 0], ax[0, 1]
        for name in dict.fromkeys(r["sampler"] for r in rows):
            mine = sorted((r for r in rows if r["sampler"] == name), key=lambda r: r["nfe"])
            nfe = [r["nfe"] for r in mine]
            if mine[0]["stochastic"]:  # an unbiased estimate: can dip below 0 near 0
                sto.plot(nfe, [r["reference_distance"] or 0.0 for r in mine], "o--", label=name)
                continue
            label = f"{name} (order {orders[name]:.2f})" if name in orders else name
            det.plot(nfe, [r["rms_error"] for r in mine], "o-", label=label)
        xlabel = "model evaluations per sample (NFE)"
        det.set(xscale="log", yscale="log", xlabel=xlabel, ylabel="RMS error vs reference")
        det.set_title(title or "deterministic samplers")
        if target is not None:
            det.axhline(target, color="0.5", lw=0.8, ls=":", label=f"target {target:g}")
        if det.get_legend_handles_labels()[0]:  # none: matplotlib warned on stderr
            det.legend(fontsize="small")
        sto.set(xscale="log", xlabel=xlabel, ylabel="energy distance to reference")
        sto.axhline(0.0, color="0.5", lw=0.8)
        for a, stochastic in ((det, False), (sto, True)):
            ticks = _ticks(r["nfe"] for r in rows if r["stochastic"] == stochastic)
            a.set_xticks(ticks, [str(v) for v in ticks])
            a.minorticks_off()
        sto.set_title("stochastic samplers (distribution error)")
        if sto.get_legend_handles_labels()[0]:  # its axhline at 0 has no label
            sto.legend(fontsize="small")
        if reference:
            fig.suptitle(reference, fontsize="small")
        return save_figure(fig, path)


def _ticks(values: Any) -> list[int]:
    """The NFE values as ticks, leaving out one within 25% of the previous (9 beside 10)."""
    out: list[int] = []
    for v in sorted({int(x) for x in values}):
        if not out or v >= 1.25 * out[-1]:
            out.append(v)
    return out
