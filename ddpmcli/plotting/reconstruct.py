"""Reconstruction figures: `ddpm reconstruct --plot`.

- image data: a grid, rows = samples (x_t above x0_hat), columns = t, the clean x0 first;
- 2-D data: x0_hat over x0 in the plane at a few t;
- always: the error curves (mse, eps_mse and the optimal denoiser's) against t and against log-SNR.

Images are shown with the data range mapped to [0, 1] (x_t clipped to it: at high noise it is mostly
out of range). The numbers come from a :class:`~ddpmcli.run.ReconstructionResult`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ddpmcli.plotting import literal, paper_figure, save_figure
from ddpmcli.run.runtime import spread

if TYPE_CHECKING:
    from ddpmcli.run import ReconstructionResult

GRID_SAMPLES = 6  # samples (pairs of rows) in the image grid
SCATTER_PANELS = 4  # timesteps in the 2-D scatter row
CURVES: tuple[tuple[str, str, str], ...] = (
    ("mse", r"$x_0$ mse", "C0"),
    ("eps_mse", r"$\epsilon$ mse", "C1"),
    ("optimal_mse", r"$x_0$ mse, optimal", "C0"),
    ("optimal_eps_mse", r"$\epsilon$ mse, optimal", "C1"),
)


def plot_reconstruction(result: ReconstructionResult, path: str | Path, title: str = "") -> Path:
    """Write the figure for ``result`` to ``path`` (PNG, SVG or PDF by suffix)."""
    ex = result.examples
    is_image = ex.x0.ndim == 4 and ex.x0.shape[0] > 0
    is_2d = ex.x0.ndim == 2 and ex.x0.shape[1] == 2 and ex.x0.shape[0] > 0
    if is_image:
        with paper_figure(3, 2, row_height=2.3) as (fig, ax):
            grid = _span(fig, ax, rows=slice(0, 2), cols=slice(0, 2))
            _image_grid(grid, result)
            _curves(ax[2, 0], ax[2, 1], result)
            return _finish(fig, result, path, title)
    if is_2d:
        # as many scatter panels as timesteps (up to 4), so a single t leaves no empty panels;
        # the curves always take the bottom row in two halves
        panels = min(SCATTER_PANELS, len(ex.t))
        if panels == 1:  # one t: its cloud beside its errors, no empty panels
            with paper_figure(1, 2, row_height=2.8) as (fig, ax):
                _scatter(ax[0, 0], result, 0, first=True)
                _curves(ax[0, 1], None, result)
                return _finish(fig, result, path, title)
        cols = 4 if panels > 2 else 2
        with paper_figure(2, cols, row_height=2.0) as (fig, ax):
            spec = ax[0, 0].get_gridspec()
            for a in ax[0, :]:
                a.remove()
            top = spec[0, :].subgridspec(1, panels)
            for j, pos in enumerate(spread(len(ex.t), panels)):
                _scatter(fig.add_subplot(top[0, j]), result, pos, first=j == 0)
            half = cols // 2
            left = _span(fig, ax, rows=slice(1, 2), cols=slice(0, half))
            right = _span(fig, ax, rows=slice(1, 2), cols=slice(half, cols))
            _curves(left, right, result)
            return _finish(fig, result, path, title)
    with paper_figure(1, 2, row_height=2.4) as (fig, ax):
        _curves(ax[0, 0], ax[0, 1], result)
        return _finish(fig, result, path, title)


def _finish(fig: Any, result: ReconstructionResult, path: str | Path, title: str) -> Path:
    clip = "clipped" if result.clip else "not clipped"
    head = f"{literal(title)}: " if title else ""
    fig.suptitle(
        f"{head}{result.prediction_type} model, {result.n_samples} samples, x0_hat {clip}",
        fontsize=9,
    )
    return save_figure(fig, path)


def _span(fig: Any, ax: Any, *, rows: slice, cols: slice) -> Any:
    """One axes covering ``ax[rows, cols]`` of a ``paper_figure`` grid (the others removed)."""
    spec = ax[0, 0].get_gridspec()
    for a in ax[rows, cols].flat:
        a.remove()
    return fig.add_subplot(spec[rows, cols])


def _to_unit(x: Any, lo: float, hi: float) -> Any:
    """Values in the data range -> [0, 1] images, HWC (or HW for one channel)."""
    import numpy as np

    img = np.clip((np.asarray(x, dtype=float) - lo) / (hi - lo), 0.0, 1.0)
    if img.shape[0] == 3:
        return img.transpose(1, 2, 0)
    return img[0]


def _image_grid(a: Any, result: ReconstructionResult) -> None:
    """One mosaic: for each sample a row of x_t and a row of x0_hat; column 0 holds x0."""
    import numpy as np

    ex = result.examples
    lo, hi = result.data_range
    k = min(GRID_SAMPLES, ex.x0.shape[0])
    channels, h, w = ex.x0.shape[1:]
    rgb = channels == 3
    pad = max(1, h // 8)
    cols, rows = len(ex.t) + 1, 2 * k
    shape = (rows * (h + pad) + pad, cols * (w + pad) + pad) + ((3,) if rgb else ())
    mosaic = np.ones(shape)
    for s in range(k):
        for r, images in ((2 * s, ex.x_t), (2 * s + 1, ex.x0_hat)):
            y = pad + r * (h + pad)
            if r % 2 == 0:
                mosaic[y : y + h, pad : pad + w] = _to_unit(ex.x0[s].numpy(), lo, hi)
            for c in range(len(ex.t)):
                x = pad + (c + 1) * (w + pad)
                mosaic[y : y + h, x : x + w] = _to_unit(images[c, s].numpy(), lo, hi)
    a.imshow(mosaic, cmap=None if rgb else "gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    a.grid(False)
    a.set_xticks([pad + c * (w + pad) + w / 2 for c in range(cols)])
    a.set_xticklabels([r"$x_0$"] + [f"t={t}" for t in ex.t])
    a.set_yticks([pad + r * (h + pad) + h / 2 for r in range(rows)])
    a.set_yticklabels(
        [f"#{r // 2} " + (r"$x_t$" if r % 2 == 0 else r"$\hat x_0$") for r in range(rows)]
    )
    a.tick_params(length=0)
    for spine in a.spines.values():
        spine.set_visible(False)
    a.set_title(r"rows: $x_t$ above its reconstruction $\hat x_0$; columns: timestep t")


def _scatter(a: Any, result: ReconstructionResult, pos: int, *, first: bool) -> None:
    ex = result.examples
    x0 = ex.x0.numpy()
    x0_hat = ex.x0_hat[pos].numpy()
    size = 4.0 if x0.shape[0] <= 500 else 1.5
    a.scatter(x0[:, 0], x0[:, 1], s=size, color="0.75", label=r"$x_0$", linewidths=0)
    a.scatter(x0_hat[:, 0], x0_hat[:, 1], s=size, color="C3", label=r"$\hat x_0$", linewidths=0)
    row = next(r for r in result.rows if r["t"] == ex.t[pos])
    a.set_title(f"t = {ex.t[pos]}, mse {row['mse']:.3g}")
    a.set_aspect("equal", adjustable="datalim")
    a.set_xlabel(r"$x_{0,1}$")
    if first:
        a.set_ylabel(r"$x_{0,2}$")
        a.legend(loc="best", markerscale=3)


def _named(result: ReconstructionResult, name: str) -> str:
    """``name`` as the result's rows call it: a latent model's errors are ``<name>_latent``."""
    latent = f"{name}_latent"
    return latent if name not in result.columns and latent in result.columns else name


def _curves(by_t: Any, by_snr: Any | None, result: ReconstructionResult) -> None:
    """Error curves against t and (unless ``by_snr`` is None) against log-SNR."""
    import numpy as np

    t = np.asarray(result.curve("t"), dtype=float)
    snr = np.asarray(result.curve("snr"), dtype=float)
    with np.errstate(divide="ignore"):
        log_snr = np.log(snr)
    order = np.argsort(t)
    for plain, label, color in CURVES:
        name = _named(result, plain)
        if name not in result.columns:
            continue
        y = np.asarray(result.curve(name), dtype=float)
        y = np.where(y > 0, y, np.nan)  # log axis: a perfect 0 is not drawn
        style = "--" if name.startswith("optimal") else "-"
        marker = "" if name.startswith("optimal") else "o"
        kw = {"color": color, "linestyle": style, "marker": marker, "markersize": 2.5}
        by_t.plot(t[order], y[order], label=label, **kw)
        finite = np.isfinite(log_snr[order])
        if by_snr is not None:
            by_snr.plot(log_snr[order][finite], y[order][finite], label=label, **kw)
    by_t.set(xlabel="timestep t (0-based)", ylabel="mean squared error", yscale="log")
    by_t.set_title("error against t")
    by_t.legend()
    if by_snr is not None:
        by_snr.set(xlabel=r"$\log \mathrm{SNR}_t = \log(\bar\alpha_t/(1-\bar\alpha_t))$")
        by_snr.set(ylabel="mean squared error", yscale="log", title="error against log-SNR")
        if np.isfinite(log_snr).any():
            by_snr.invert_xaxis()  # noise grows to the right, as on the t panel
        by_snr.legend()
    clip = np.asarray(result.curve(_named(result, "clip_fraction")), dtype=float)
    if (clip > 0).any():  # how often x0_hat leaves the data range, on a second axis
        twin = by_t.twinx()
        twin.plot(t[order], clip[order], color="0.5", linestyle=":", label="clip fraction")
        twin.set_ylabel(r"fraction of $\hat x_0$ out of range", color="0.4")
        twin.set_ylim(0, 1)
        twin.grid(False)
        twin.spines["right"].set_visible(True)
