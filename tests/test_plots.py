"""Figures (issue 8): one style across figures, no empty panels, --t honoured by compare, image
grids a readable size. Each figure is captured at save time and its axes inspected."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from ddpmcli import core


@pytest.fixture
def saved(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The figures the plotting modules save, in order (the files are still written)."""
    import ddpmcli.plotting.reconstruct as rec
    import ddpmcli.plotting.sample as smp
    import ddpmcli.plotting.schedule as sch
    from ddpmcli.plotting import save_figure

    figures: list[Any] = []

    def keep(fig: Any, path: str | Path) -> Path:
        figures.append(fig)
        return save_figure(fig, path)

    for module in (rec, smp, sch):
        monkeypatch.setattr(module, "save_figure", keep)
    return figures


def _drawn(ax: Any) -> bool:
    return ax.axison and bool(ax.lines or ax.collections or ax.images)


def test_compare_dots_the_selected_t(saved: list[Any], tmp_path: Path) -> None:
    from ddpmcli.plotting.schedule import plot_compare

    pair = [
        ("linear", core.make_schedule("linear", 1000)),
        ("cosine", core.make_schedule("cosine", 1000)),
    ]
    plot_compare(pair, tmp_path / "c.png", marks=[[0, 500, 999], [0, 500, 999]])
    plot_compare(pair, tmp_path / "all.png")
    marked, plain = saved
    # the x axes are normalised time (t + 1)/T (left) and the sampling step T - 1 - t (right)
    expected = {0: [0.001, 0.501, 1.0], 1: [999.0, 499.0, 0.0]}
    for k, ax in enumerate(marked.axes):
        dots = [line for line in ax.lines if line.get_marker() == "o"]
        assert len(dots) == 2 and list(dots[0].get_xdata()) == expected[(k % 2 + k // 2) % 2]
    assert not any(line.get_marker() == "o" for ax in plain.axes for line in ax.lines)


def test_sample_panels_share_the_paper_style(saved: list[Any], tmp_path: Path) -> None:
    from ddpmcli.plotting.sample import plot_sampling
    from ddpmcli.run import SampleRun, TrajectoryFrame

    ts = [9, 6, 3, 0]
    rows = [
        {"step": k, "t": t, "xt_std": 1.0 - 0.1 * k, "xt_std_expected": 1.0 - 0.1 * k,
         "x0_min": -60.0 if k == 0 else -1.0, "x0_max": 60.0 if k == 0 else 1.0, "x0_std": 0.5,
         "clip_fraction": 0.5 if k == 0 else 0.0, "variance": 0.0 if t == 0 else 0.01,
         "update_norm": 0.1}
        for k, t in enumerate(ts)
    ]  # fmt: skip
    frames = [TrajectoryFrame(k, t, torch.zeros(8, 2)) for k, t in enumerate(ts)]
    run = SampleRun(samples=torch.zeros(8, 2), rows=rows, trajectory=frames)
    plot_sampling(run, tmp_path / "s.png", title="demo")
    [fig] = saved
    panels = [ax for ax in fig.axes if ax.get_xlabel()]
    assert len(panels) == 4
    for ax in panels:
        assert ax.get_xlabel() == "timestep t (0-based)" and ax.get_ylabel()
        assert ax.title.get_fontsize() == 8  # the paper style's title size, as elsewhere
    raw = next(ax for ax in panels if "range" in ax.get_title())
    assert raw.get_yscale() == "symlog"  # +-60 does not flatten the in-range values
    clip = next(ax for ax in panels if ax.get_title() == "clipping")
    assert clip.get_yscale() == "linear"  # a clip fraction of 0 stays visible
    log_panel = next(ax for ax in panels if ax.get_yscale() == "log")
    zeros = [line for line in log_panel.lines if line.get_marker() == "v"]
    assert len(zeros) == 1 and list(zeros[0].get_xdata()) == [0.0]  # variance 0 at t = 0


def test_save_image_grid_is_readable_size(tmp_path: Path) -> None:
    import matplotlib.image

    from ddpmcli.plotting.sample import save_image_grid

    path = save_image_grid(torch.rand(16, 1, 16, 16) * 2 - 1, tmp_path / "grid.png")
    image = matplotlib.image.imread(path)
    assert min(image.shape[:2]) >= 512  # was 69 x 69
    assert image.shape[0] % 69 == 0  # whole-pixel enlargement, no interpolation


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> str:
    from ddpmcli.checkpoints import save_native_checkpoint
    from ddpmcli.data import builtin_dataset
    from ddpmcli.training import train_denoiser

    sched = core.make_schedule("linear", 100, scale_to_timesteps=True)
    data = builtin_dataset("moons", 128, seed=0)
    trained = train_denoiser(
        data, sched, steps=10, batch_size=32, seed=0, threads=1,
        hparams={"hidden": 16, "num_blocks": 1, "time_dim": 8},
    )  # fmt: skip
    return str(save_native_checkpoint(
        tmp_path_factory.mktemp("plots") / "m.pt", trained.model,
        architecture=trained.architecture, hparams=trained.hparams, schedule=sched,
        prediction_type="epsilon", data_shape=(2,), reference_samples=data[:32],
    ))  # fmt: skip


@pytest.mark.parametrize("ts", ["50", "0,99", "0,20,40,60,80,99"])
def test_reconstruct_figure_has_no_empty_panel(
    saved: list[Any], cli: Any, tiny: str, tmp_path: Path, ts: str
) -> None:
    res = cli(
        "reconstruct", tiny, "--n", "8", "--t", ts, "-f", "csv", "--plot", str(tmp_path / "r.png")
    )
    assert res.exit_code == 0, res.stderr
    [fig] = saved
    assert all(_drawn(ax) for ax in fig.axes if ax.get_label() != "<colorbar>")
    scatters = [ax for ax in fig.axes if ax.collections]
    assert len(scatters) == min(4, len(ts.split(",")))
