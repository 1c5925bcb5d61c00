"""Figures of `ddpm sample`: the x0_hat trajectory (an image strip, or point clouds for 2-D data)
above the per-step statistics against t; and a PNG grid of image samples for `--save`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ddpmcli.files import atomic_write
from ddpmcli.plotting import FULL_WIDTH_IN, PAPER_STYLE, literal, pyplot, save_figure

if TYPE_CHECKING:
    from torch import Tensor

    from ddpmcli.run import SampleRun, TrajectoryFrame

MAX_FRAMES = 8
MAX_IMAGE_ROWS = 4
GRID_MIN_PX = 512  # the long side of a --save PNG grid, at least (whole-pixel enlargement)
GRID_MAX_SCALE = 16


def _to_unit(x: Any, lo: float, hi: float) -> Any:
    """[N, C, H, W] tensor in [lo, hi] -> numpy [N, H, W, C] in [0, 1] (C = 1 squeezed later)."""
    import numpy as np

    arr = ((x.detach().float().cpu().numpy() - lo) / (hi - lo)).clip(0, 1)
    return np.transpose(arr, (0, 2, 3, 1))


def _show(ax: Any, img: Any) -> None:
    if img.shape[-1] == 1:
        ax.imshow(img[..., 0], cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(img[..., :3])
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)


def _even(count: int, k: int) -> list[int]:
    """Up to ``k`` of ``count`` trajectory frames at one stride, and the last: the frames are kept
    every K steps plus the final one, so a common stride keeps the panels evenly spaced in t
    (issue 20: rounding ``spread`` showed t = 999, 899, 699, 599, ..., skipping 799, 499, 199)."""
    if count <= k:
        return list(range(count))
    stride = -(-(count - 1) // (k - 1))  # ceil: at most k - 1 intervals
    return [*range(0, count - 1, stride), count - 1]


def _frames(run: SampleRun) -> list[TrajectoryFrame]:
    from ddpmcli.run import TrajectoryFrame

    if run.trajectory:
        return [run.trajectory[i] for i in _even(len(run.trajectory), MAX_FRAMES)]
    last = run.rows[-1] if run.rows else {"step": 0, "t": 0}
    return [TrajectoryFrame(int(last["step"]), int(last["t"]), run.samples[: MAX_FRAMES * 8])]


def plot_sampling(
    run: SampleRun,
    path: str | Path,
    *,
    data_range: tuple[float, float] = (-1.0, 1.0),
    reference: Tensor | None = None,
    distances: Mapping[str, float] | None = None,
    title: str = "",
) -> Path:
    """The trajectory strip (images) or clouds (2-D data; other vectors: their first two
    coordinates) above four panels of per-step statistics against t. Returns the path written."""
    frames = _frames(run)
    images = frames[0].x0.ndim == 4
    strip_rows = min(MAX_IMAGE_ROWS, frames[0].x0.shape[0]) if images else 1
    plt = pyplot()
    strip_height = 1.1 * strip_rows if images else 1.8
    with plt.rc_context(PAPER_STYLE):  # the same style as every other figure
        fig = plt.figure(figsize=(FULL_WIDTH_IN, strip_height + 4.4), layout="constrained")
        try:
            _draw(fig, frames, images, strip_rows, strip_height, data_range, reference, run.rows)
            head = literal(title)
            if distances:
                head += " | " + ", ".join(f"{k} {v:.4g}" for k, v in distances.items())
            if head:
                fig.suptitle(head, fontsize=9)
            return save_figure(fig, path)
        finally:
            plt.close(fig)


def _draw(
    fig: Any,
    frames: Sequence[TrajectoryFrame],
    images: bool,
    strip_rows: int,
    strip_height: float,
    data_range: tuple[float, float],
    reference: Tensor | None,
    rows: Sequence[Mapping[str, Any]],
) -> None:
    """The x0_hat strip (one column per frame) above the four statistics panels."""
    outer = fig.add_gridspec(2, 1, height_ratios=[strip_height, 4.4])
    strip = outer[0].subgridspec(strip_rows, len(frames))
    lo, hi = data_range
    pad = 0.05 * (hi - lo)
    for c, frame in enumerate(frames):
        if images:
            unit = _to_unit(frame.x0[:strip_rows], lo, hi)
            for r in range(unit.shape[0]):
                ax = fig.add_subplot(strip[r, c])
                _show(ax, unit[r])
                if r == 0:
                    ax.set_title(f"t = {frame.t:.6g}")
            continue
        ax = fig.add_subplot(strip[0, c])
        if reference is not None:
            ref = reference.reshape(reference.shape[0], -1)[:, :2].numpy()
            ax.scatter(ref[:, 0], ref[:, 1], s=1, c="0.8", lw=0)
        pts = frame.x0.reshape(frame.x0.shape[0], -1)[:, :2].numpy()
        ax.scatter(pts[:, 0], pts[:, 1], s=1, c="C0", lw=0)
        ax.set_title(rf"$\hat x_0$, t = {frame.t:.6g}")
        ax.set(xticks=[], yticks=[], xlim=(lo - pad, hi + pad), ylim=(lo - pad, hi + pad))
        ax.set_aspect("equal")
    _stat_panels(fig, outer[1].subgridspec(2, 2), rows, data_range)


def _stat_panels(
    fig: Any, grid: Any, rows: Sequence[Mapping[str, Any]], data_range: tuple[float, float]
) -> None:
    """Four panels against t in the paper style (labelled axes, one title size): the spread of
    x_t against its expected value; x0_hat's range on a symlog axis (linear inside the data range,
    so +-60 spikes at high noise do not flatten the rest); the clip fraction on a linear axis; the
    sampler variance and update norm on a log axis, zeros drawn as triangles on its floor."""
    import numpy as np

    t = np.asarray([float(r["t"]) for r in rows])

    def col(name: str) -> Any:
        return np.asarray([float(r[name]) for r in rows])

    xlabel = "timestep t (0-based)"
    axes = [fig.add_subplot(grid[k // 2, k % 2]) for k in range(4)]
    a = axes[0]
    a.plot(t, col("xt_std"), label="measured")
    a.plot(t, col("xt_std_expected"), "--", label="expected")
    a.set(xlabel=xlabel, ylabel=r"std of $x_t$", title=r"spread of $x_t$")
    a = axes[1]
    for name, label in (("x0_max", "max"), ("x0_std", "std"), ("x0_min", "min")):
        a.plot(t, col(name), label=label)
    lo, hi = data_range
    for bound in (lo, hi):
        a.axhline(bound, color="0.5", linestyle=":", linewidth=0.8)
    a.set_yscale("symlog", linthresh=max(abs(lo), abs(hi), 1e-6))
    a.set(xlabel=xlabel, ylabel=r"$\hat x_0$ (before clipping)", title=r"range of $\hat x_0$")
    a = axes[2]
    a.plot(t, col("clip_fraction"), color="C3")
    a.set(xlabel=xlabel, ylabel=r"fraction of $\hat x_0$ clipped", ylim=(-0.02, 1.02))
    a.set_title("clipping")
    a = axes[3]
    series = [("variance", "variance"), ("update_norm", r"$\|x_{t-1} - x_t\|$")]
    positive = np.concatenate([col(name)[col(name) > 0] for name, _ in series])
    floor = positive.min() / 3 if positive.size else 1e-6
    for k, (name, label) in enumerate(series):
        values = col(name)
        zero = values <= 0
        (line,) = a.plot(t, np.where(zero, np.nan, values), color=f"C{k}", label=label)
        if zero.any():
            a.plot(t[zero], np.full(zero.sum(), floor), "v", color=line.get_color(),
                   markersize=3, label=f"{name} = 0")  # fmt: skip
    a.set_yscale("log")
    a.set_ylim(bottom=floor / 1.5)
    a.set(xlabel=xlabel, ylabel="value", title="variance and step size")
    for a in axes:
        a.invert_xaxis()  # sampling runs from t = T-1 down to 0
        if a.get_legend_handles_labels()[0]:
            a.legend()


def save_image_grid(
    samples: Tensor, path: str | Path, data_range: tuple[float, float] = (-1.0, 1.0)
) -> Path:
    """Image samples [N, C, H, W] in ``data_range`` as one PNG grid (about square), atomically;
    each pixel drawn as a square block so that the grid is at least ``GRID_MIN_PX`` wide."""
    import math

    import numpy as np

    lo, hi = data_range
    unit = _to_unit(samples, lo, hi)
    count, h, w, c = unit.shape
    cols = math.ceil(math.sqrt(count))
    rows = math.ceil(count / cols)
    canvas = np.ones(((h + 1) * rows + 1, (w + 1) * cols + 1, c), dtype=np.float32)
    for k in range(count):
        r, q = divmod(k, cols)
        canvas[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + q * (w + 1) : 1 + q * (w + 1) + w] = unit[
            k
        ]
    # Small images (16x16 samples make a 69 px grid) are enlarged by a whole factor, each pixel
    # a block (no interpolation), so the grid is at least GRID_MIN_PX on its long side.
    scale = max(1, min(GRID_MAX_SCALE, math.ceil(GRID_MIN_PX / max(canvas.shape[:2]))))
    canvas = canvas.repeat(scale, axis=0).repeat(scale, axis=1)
    image = (canvas * 255).round().astype(np.uint8)
    if c == 1:
        image = image[..., 0]
    plt = pyplot()
    return atomic_write(
        path, lambda tmp: plt.imsave(tmp, image, cmap="gray" if c == 1 else None, format="png")
    )


__all__ = ["plot_sampling", "save_image_grid"]
