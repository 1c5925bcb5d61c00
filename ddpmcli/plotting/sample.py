"""Figures of `ddpm sample`: the x0_hat trajectory (an image strip, or point clouds for 2-D data)
above the per-step statistics against t; and a PNG grid of image samples for `--save`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ddpmcli.files import atomic_write
from ddpmcli.plotting import FULL_WIDTH_IN, literal, pyplot, save_figure
from ddpmcli.run.runtime import spread

if TYPE_CHECKING:
    from torch import Tensor

    from ddpmcli.run import SampleRun, TrajectoryFrame

MAX_FRAMES = 8
MAX_IMAGE_ROWS = 4


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


def _frames(run: SampleRun) -> list[TrajectoryFrame]:
    from ddpmcli.run import TrajectoryFrame

    if run.trajectory:
        return [run.trajectory[i] for i in spread(len(run.trajectory), MAX_FRAMES)]
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
    fig = plt.figure(figsize=(FULL_WIDTH_IN, strip_height + 4.4))
    outer = fig.add_gridspec(2, 1, height_ratios=[strip_height, 4.4])
    strip = outer[0].subgridspec(strip_rows, len(frames))
    lo, hi = data_range
    try:
        for c, frame in enumerate(frames):
            if images:
                unit = _to_unit(frame.x0[:strip_rows], lo, hi)
                for r in range(unit.shape[0]):
                    ax = fig.add_subplot(strip[r, c])
                    _show(ax, unit[r])
                    if r == 0:
                        ax.set_title(f"t={frame.t}", fontsize=7)
            else:
                ax = fig.add_subplot(strip[0, c])
                if reference is not None:
                    ref = reference.reshape(reference.shape[0], -1)[:, :2].numpy()
                    ax.scatter(ref[:, 0], ref[:, 1], s=1, c="0.8", lw=0)
                pts = frame.x0.reshape(frame.x0.shape[0], -1)[:, :2].numpy()
                ax.scatter(pts[:, 0], pts[:, 1], s=1, c="C0", lw=0)
                ax.set_title(f"x0_hat, t={frame.t}", fontsize=7)
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_xlim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
                ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
                ax.set_aspect("equal")
        _stat_panels(fig, outer[1].subgridspec(2, 2), run.rows)
        head = literal(title)
        if distances:
            head += " | " + ", ".join(f"{k} {v:.4g}" for k, v in distances.items())
        if head:
            fig.suptitle(head, fontsize=8)
        fig.set_layout_engine("constrained")
        return save_figure(fig, path)
    finally:
        plt.close(fig)


def _stat_panels(fig: Any, grid: Any, rows: Sequence[Mapping[str, Any]]) -> None:
    spots = [grid[0, 0], grid[0, 1], grid[1, 0], grid[1, 1]]
    t = [r["t"] for r in rows]

    def col(name: str) -> list[float]:
        return [float(r[name]) for r in rows]

    panels: list[tuple[str, list[tuple[str, str]], bool]] = [
        ("std of x_t", [("xt_std", "measured"), ("xt_std_expected", "expected")], False),
        ("x0_hat (raw)", [("x0_min", "min"), ("x0_max", "max"), ("x0_std", "std")], False),
        ("per step", [("clip_fraction", "clip fraction"), ("variance", "variance")], True),
        ("update norm", [("update_norm", "||x_{t-1} - x_t||")], True),
    ]
    for spot, (label, series, log) in zip(spots, panels, strict=True):
        ax = fig.add_subplot(spot)
        for name, legend in series:
            values = col(name)
            if log:
                values = [v if v > 0 else float("nan") for v in values]
            ax.plot(t, values, label=legend, lw=1)
        if log:
            ax.set_yscale("log")
        ax.invert_xaxis()  # sampling runs from t = T-1 down to 0
        ax.set_xlabel("t")
        ax.set_title(label, fontsize=7)
        ax.legend(fontsize=6)


def save_image_grid(
    samples: Tensor, path: str | Path, data_range: tuple[float, float] = (-1.0, 1.0)
) -> Path:
    """Image samples [N, C, H, W] in ``data_range`` as one PNG grid (about square), atomically."""
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
    image = (canvas * 255).round().astype(np.uint8)
    if c == 1:
        image = image[..., 0]
    plt = pyplot()
    return atomic_write(
        path, lambda tmp: plt.imsave(tmp, image, cmap="gray" if c == 1 else None, format="png")
    )


__all__ = ["plot_sampling", "save_image_grid"]
