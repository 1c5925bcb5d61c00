"""Schedule figures: `ddpm schedule --plot`, `ddpm compare --plot`, `ddpm posterior --plot`.

The x axis is the model's timestep t (0-based; the kept steps of a respaced schedule), or t/T when
compared schedules have different T. Values are the core's float64 arrays.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ddpmcli.plotting import literal, paper_figure, save_figure, short_labels

if TYPE_CHECKING:
    from ddpmcli.core import Schedule


MAX_PLOT_POINTS = 20_000
"""Most timesteps a schedule figure draws: past it, that many evenly spaced ones (a line of
10^7 points took 93 s and 5.7 GB to draw, and no screen or page shows more)."""


def thinned(schedule: Schedule) -> Schedule:
    """``schedule`` at :data:`MAX_PLOT_POINTS` evenly spaced timesteps (first and last kept)
    when it has more; else itself. Every per-t array keeps its own values."""
    n = schedule.num_steps
    if n <= MAX_PLOT_POINTS:
        return schedule
    step = (n - 1) / (MAX_PLOT_POINTS - 1)
    return schedule.take(sorted({round(i * step) for i in range(MAX_PLOT_POINTS)}))


def _np(values: Any) -> Any:
    return values.detach().cpu().numpy()


def _plot_variances(a: Any, x: Any, schedule: Schedule, beta_note: str, tilde_note: str) -> None:
    """beta_t (solid) and the posterior variance tilde beta_t (dashed) on axes ``a``."""
    a.plot(x, _positive(_np(schedule.beta)), label=rf"$\beta_t${beta_note}")
    a.plot(
        x,
        _positive(_np(schedule.posterior_variance)),
        "--",
        label=rf"$\tilde\beta_t$ ({tilde_note})",
    )


def _positive(values: Any) -> Any:
    """Values for a log axis: non-positive entries become NaN (not drawn) instead of warnings."""
    import numpy as np

    array = np.asarray(values, dtype=float)
    return np.where(array > 0, array, np.nan)


def _x(schedule: Schedule, normalise: bool) -> Any:
    t = _np(schedule.timesteps).astype(float)
    return t / schedule.num_train_timesteps if normalise else t


def plot_schedule(schedule: Schedule, path: str | Path) -> Path:
    """Four panels: alpha_bar and the sqrt terms; log-SNR; beta and beta_tilde (log axis); the
    posterior mean coefficients."""
    schedule = thinned(schedule)
    x = _x(schedule, normalise=False)
    with paper_figure(2, 2) as (fig, ax):
        a = ax[0, 0]
        a.plot(x, _np(schedule.alpha_bar), label=r"$\bar\alpha_t$")
        a.plot(x, _np(schedule.sqrt_alpha_bar), label=r"$\sqrt{\bar\alpha_t}$")
        a.plot(x, _np(schedule.sqrt_one_minus_alpha_bar), label=r"$\sqrt{1-\bar\alpha_t}$")
        a.set(xlabel="timestep t (0-based)", ylabel="value", title="signal and noise scales")
        a.legend()
        a = ax[0, 1]
        a.plot(x, _np(schedule.log_snr), color="C3", label=r"$\log \mathrm{SNR}_t$")
        a.set(
            xlabel="timestep t (0-based)",
            ylabel=r"$\log(\bar\alpha_t/(1-\bar\alpha_t))$",
            title="log-SNR",
        )
        a.legend()
        a = ax[1, 0]
        _plot_variances(a, x, schedule, "", "posterior variance")
        a.set_yscale("log")
        a.set(
            xlabel="timestep t (0-based)", ylabel="variance", title=r"$\beta_t$ and $\tilde\beta_t$"
        )
        a.legend()
        a = ax[1, 1]
        a.plot(x, _np(schedule.posterior_mean_coef_x0), label=r"coef. of $x_0$")
        a.plot(x, _np(schedule.posterior_mean_coef_xt), label=r"coef. of $x_t$")
        a.set(
            xlabel="timestep t (0-based)",
            ylabel="coefficient",
            title=r"posterior mean $\tilde\mu_t$",
        )
        a.legend()
        name, steps = literal(schedule.name), schedule.num_train_timesteps
        fig.suptitle(f"schedule {name} (T = {steps})", fontsize=9)
        return save_figure(fig, path)


def _mark(ax: Any, line: Any, x: Any, y: Any, marks: Sequence[int] | None) -> None:
    """Dots on ``line`` at the selected rows (``--t``/``--every``), in the line's colour."""
    import numpy as np

    if marks is None or not len(marks):
        return
    idx = np.asarray(marks, dtype=int)
    ax.plot(np.asarray(x)[idx], np.asarray(y)[idx], "o", color=line.get_color(), markersize=3)


def _finite(values: Any) -> Any:
    """Values for a plot: +-inf (a flow's log-SNR at s = 1, h at the clean end) become NaN."""
    import numpy as np

    array = np.asarray(values, dtype=float)
    return np.where(np.isfinite(array), array, np.nan)


def _terminal(schedule: Schedule) -> str:
    snr = float(schedule.snr[-1])
    return "terminal SNR 0" if snr == 0 else f"terminal SNR {snr:.3g}"


def plot_compare(
    schedules: Sequence[tuple[str, Schedule]],
    path: str | Path,
    *,
    marks: Sequence[Sequence[int]] | None = None,
) -> Path:
    """One view across families (VP, flow, sigma space), a line per schedule: log-SNR against
    normalised time and against the sampling step, the log-SNR gap h of each step (log axis), and
    the VP-equivalent alpha_bar; the legend gives each schedule's terminal SNR. ``marks`` (one index
    list per schedule, the rows `--t`/`--every` picked) are drawn as dots."""
    import numpy as np

    from ddpmcli.core import grids

    names = short_labels([label for label, _ in schedules])  # a config's own name, not its path
    with paper_figure(2, 2) as (fig, ax):
        for k, (_, schedule) in enumerate(schedules):
            time = _np(
                grids.normalised_time(
                    schedule.path,
                    schedule.timesteps,
                    schedule.sigma_t,
                    schedule.num_train_timesteps,
                )
            )
            n = schedule.num_steps
            step = n - 1 - np.arange(n)  # sampling order: step 0 starts from noise
            log_snr = _finite(_np(schedule.log_snr))
            gaps = _finite(_np(grids.log_snr_gaps(schedule.log_snr)))
            picked = None if marks is None else marks[k]
            name = f"{literal(names[k])} ({_terminal(schedule)})"
            for a, x, y in (
                (ax[0, 0], time, log_snr),
                (ax[0, 1], step, log_snr),
                (ax[1, 0], step, _positive(gaps)),
                (ax[1, 1], time, _np(schedule.alpha_bar)),
            ):
                (line,) = a.plot(x, y, ".-" if n <= 64 else "-", markersize=2.5, label=name)
                _mark(a, line, x, y, picked)
        ax[0, 0].set(
            xlabel="normalised time ((t+1)/T; flow: s)",
            ylabel=r"$\log \mathrm{SNR}$",
            title="log-SNR against time",
        )
        ax[0, 1].set(
            xlabel="sampling step (0 = first, from noise)",
            ylabel=r"$\log \mathrm{SNR}$",
            title="log-SNR against step",
        )
        ax[1, 0].set(
            xlabel="sampling step (0 = first, from noise)",
            ylabel=r"$h = \lambda_{\mathrm{next}} - \lambda$",
            title="log-SNR gap per step",
            yscale="log",
        )
        ax[1, 1].set(
            xlabel="normalised time ((t+1)/T; flow: s)",
            ylabel=r"$\bar\alpha = \alpha^2/(\alpha^2+\sigma^2)$",
            title="alpha_bar (VP-equivalent)",
        )
        ax[0, 0].legend(fontsize=6)
        if marks is not None:
            fig.suptitle("dots: the rows printed", fontsize=9)
        return save_figure(fig, path)


def plot_posterior(schedule: Schedule, v: float, path: str | Path) -> Path:
    """beta, beta_tilde and the learned_range variance for ``v`` (log axis), their ratio, and the
    clipped log variance."""
    import torch

    schedule = thinned(schedule)
    x = _x(schedule, normalise=False)
    n = schedule.num_steps
    steps, like = torch.arange(n), torch.zeros(n, dtype=torch.float64)
    learned = torch.exp(
        schedule.model_log_variance("learned_range", steps, like, torch.full((n,), float(v)))
    )
    with paper_figure(1, 3, row_height=2.4) as (fig, ax):
        a = ax[0, 0]
        _plot_variances(a, x, schedule, " (fixed_large)", "fixed_small")
        a.plot(x, _positive(_np(learned)), ":", label=f"learned_range, v = {v:g}")
        a.set(
            xlabel="timestep t (0-based)",
            ylabel="variance",
            yscale="log",
            title="reverse-process variances",
        )
        a.legend()
        a = ax[0, 1]
        a.plot(x, _np(schedule.posterior_variance / schedule.beta), color="C3")
        a.set(xlabel="timestep t (0-based)", ylabel=r"$\tilde\beta_t/\beta_t$", title="ratio")
        a = ax[0, 2]
        a.plot(
            x,
            _np(schedule.posterior_log_variance_clipped),
            color="C4",
            label=r"$\log\tilde\beta_t$, $t = 0$ clipped to $t = 1$",
        )
        a.set(xlabel="timestep t (0-based)", ylabel="log variance", title="clipped log variance")
        a.legend()
        fig.suptitle(f"posterior of {literal(schedule.name)}", fontsize=9)
        return save_figure(fig, path)
