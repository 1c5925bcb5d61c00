"""Named presets and `ddpm compare` across families: the rows (normalised time, log-SNR gap h),
the per-schedule summary (terminal SNR) and the figure."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpmcli import core, presets
from ddpmcli.specs import parse_compare_spec


def _csv(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def test_every_preset_builds_and_cites_its_source() -> None:
    for name, preset in presets.PRESETS.items():
        assert preset.source and preset.summary, name
        assert (preset.config is None) != (preset.kind is None), name
        spec = parse_compare_spec(name, "28")
        assert spec.built.schedule.num_steps == 28, name
    assert presets.find("SD3") is presets.PRESETS["sd3"]
    assert presets.find("flux@1024") is presets.PRESETS["flux-dev"]


def test_preset_values_are_diffusers_defaults_where_they_say_so() -> None:
    # SD 1.5's table is diffusers' scaled_linear 0.00085..0.012 (float32 there, float64 here)
    from diffusers import PNDMScheduler

    # from_config, as pipelines load it: keys PNDM does not take (clip_sample) are ignored
    sched = PNDMScheduler.from_config(dict(presets.PRESETS["sd15"].config or {}))
    ours = parse_compare_spec("sd15").built.schedule.alpha_bar
    torch.testing.assert_close(ours, sched.alphas_cumprod.to(torch.float64), rtol=2e-5, atol=0)


def test_flux_resolution_moves_the_grid_towards_noise() -> None:
    low = parse_compare_spec("flux@512", "28").built.schedule
    high = parse_compare_spec("flux@1024", "28").built.schedule
    # a larger image shifts every step to more noise: lower log-SNR at the same step
    finite = torch.isfinite(low.log_snr) & torch.isfinite(high.log_snr)
    assert bool((high.log_snr[finite] < low.log_snr[finite]).all())


@pytest.mark.parametrize(("text", "words"), [("flux@abc", "@RES"), ("sd3@1024", "does not shift")])
def test_bad_resolution_suffix(cli, text: str, words: str) -> None:  # type: ignore[no-untyped-def]
    result = cli("compare", text)
    assert result.exit_code == 2 and words in result.stderr and result.stderr.count("\n") == 1


def test_compare_families_rows(cli) -> None:  # type: ignore[no-untyped-def]
    result = cli(
        "compare", "sd15", "sd3", "flux@1024", "--steps", "28", "--columns", "time,log_snr,h",
        "--format", "csv",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    rows = _csv(result.stdout)
    assert list(rows[0]) == ["schedule", "t", "timestep", "time", "log_snr", "h"]
    by = {name: [r for r in rows if r["schedule"] == name] for name in ("sd15", "sd3", "flux@1024")}
    assert all(len(v) == 28 for v in by.values())
    # SD 1.5's leading spacing with steps_offset 1: timesteps 1, 36, ..., 946; time (t + 1)/T
    assert [int(r["timestep"]) for r in by["sd15"][:2]] == [1, 36]
    assert float(by["sd15"][-1]["time"]) == pytest.approx(0.947)
    # a flow's time is s; h is the log-SNR step to the previous (less noisy) entry
    for name in ("sd15", "sd3", "flux@1024"):
        lam = [float(r["log_snr"]) for r in by[name]]
        h = [float(r["h"]) for r in by[name]]
        assert h[0] == math.inf
        for i in range(1, 27):
            assert h[i] == pytest.approx(lam[i - 1] - lam[i], rel=1e-12)
    assert float(by["sd3"][0]["time"]) == pytest.approx(0.008928571827709675, rel=1e-12)
    assert float(by["sd3"][-1]["log_snr"]) == -math.inf


def test_compare_summary_gives_terminal_snr(cli) -> None:  # type: ignore[no-untyped-def]
    result = cli("compare", "sd15", "sd3", "edm", "--steps", "28", "--summary", "--format", "csv")
    assert result.exit_code == 0, result.stderr
    rows = {r["schedule"]: r for r in _csv(result.stdout)}
    assert list(next(iter(rows.values()))) == [
        "schedule", "path", "steps", "log_snr_max", "log_snr_min", "terminal_snr", "h_max",
        "h_mean",
    ]  # fmt: skip
    assert rows["sd3"]["path"] == "flow" and float(rows["sd3"]["terminal_snr"]) == 0.0
    assert rows["edm"]["path"] == "ve"
    # EDM's terminal SNR: 1/sigma_max^2 = 1/6400
    assert float(rows["edm"]["terminal_snr"]) == pytest.approx(1 / 6400, rel=1e-12)
    sd15 = parse_compare_spec("sd15", "28").built.schedule
    assert float(rows["sd15"]["terminal_snr"]) == float(sd15.snr[-1])
    lam = sd15.log_snr.numpy()
    assert float(rows["sd15"]["h_max"]) == pytest.approx(float(np.max(lam[:-1] - lam[1:])))
    bad = cli("compare", "sd15", "--summary", "--t", "0")
    assert bad.exit_code == 2 and "--summary" in bad.stderr


def test_compare_figure_has_the_four_views(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "families.png"
    result = cli("compare", "sd15", "sd3", "flux@1024", "edm", "--steps", "28", "--plot", str(out))
    assert result.exit_code == 0, result.stderr
    assert out.stat().st_size > 10_000 and out.read_bytes()[:4] == b"\x89PNG"


def test_normalised_time_and_gaps_in_the_core() -> None:
    from ddpmcli.core import grids

    vp = core.make_schedule("linear", 10)
    time = grids.normalised_time(vp.path, vp.timesteps, vp.sigma_t, vp.num_train_timesteps)
    assert time.tolist() == [(t + 1) / 10 for t in range(10)]
    lam = torch.tensor([3.0, 1.0, -2.0], dtype=torch.float64)
    assert grids.log_snr_gaps(lam).tolist() == [math.inf, 2.0, 3.0]
