"""End to end through the CLI: the same network saved in every checkpoint format gives the same
`ddpm reconstruct`, `ddpm sample` and `ddpm nll` rows (only the loader differs)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from rowcheck import assert_row_close
from typer.testing import Result

from ddpmcli import checkpoints, core, models

SCHEDULE = core.make_schedule("cosine", 50)
RUNS: dict[str, tuple[str, ...]] = {
    "reconstruct": ("reconstruct", "--n", "16", "--every", "7", "--seed", "3"),
    "sample": ("sample", "--n", "16", "--steps", "6", "--seed", "3"),
    "nll": ("nll", "--n", "8", "--every", "10", "--seed", "3"),
}


def _rows(cli: Callable[..., Result], ckpt: Path, run: str, *extra: str) -> list[dict[str, Any]]:
    args = RUNS[run]
    # every format loads with the same flags; TorchScript needs the trust flag (others ignore it)
    result = cli(
        args[0], str(ckpt), *args[1:], *extra, "--format", "json", "--quiet", "--trust-program"
    )
    assert result.exit_code == 0, result.stderr
    rows = json.loads(result.stdout)
    assert rows, f"{run} printed no rows"
    return rows


@pytest.fixture(scope="module")
def mlp_formats(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One small MLP (2-D data, v-prediction) as native, TorchScript and torch.export files,
    and a data file for reconstruct and nll."""
    root = tmp_path_factory.mktemp("formats")
    hp = {**models.default_hparams("mlp", (2,)), "hidden": 16, "num_blocks": 1, "time_dim": 8}
    torch.manual_seed(0)
    model = models.build_model("mlp", hp).eval()
    refs = torch.randn(64, 2, generator=torch.Generator().manual_seed(5)) * 0.5
    paths = {name: root / file for name, file in
             [("native", "m.pt"), ("torchscript", "m.ts"), ("export", "m.pt2")]}  # fmt: skip
    checkpoints.save_native_checkpoint(
        paths["native"],
        model,
        architecture="mlp",
        hparams=hp,
        schedule=SCHEDULE,
        prediction_type="v",
        data_shape=(2,),
    )  # fmt: skip  (no reference samples: the program formats carry none, and sample reads them)
    meta = checkpoints.checkpoint_metadata(SCHEDULE, "v", (2,))
    checkpoints.save_torchscript(model, paths["torchscript"], meta)
    example = (torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))
    checkpoints.save_exported_program(model, paths["export"], example, meta)
    np.save(root / "data.npy", refs.numpy())
    return paths


@pytest.mark.parametrize("run", sorted(RUNS))
def test_every_format_gives_the_same_rows(cli, mlp_formats: dict[str, Path], run: str) -> None:  # type: ignore[no-untyped-def]
    data = str(mlp_formats["native"].parent / "data.npy")
    extra = () if run == "sample" else ("--data", data)
    want = _rows(cli, mlp_formats["native"], run, *extra)
    for name in ("torchscript", "export"):
        got = _rows(cli, mlp_formats[name], run, *extra)
        assert len(got) == len(want), name
        for g, w in zip(got, want, strict=True):
            # the same float32 network: only kernel choices may differ, in the last bits
            assert_row_close(g, w, rel=1e-5, abs=1e-7)


@pytest.mark.diffusers
def test_diffusers_folder_matches_its_own_torchscript_trace(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A diffusers pipeline folder (written by diffusers) and a TorchScript trace of the same UNet
    with the same schedule give the same reconstruct and sample rows."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
    ).eval()  # fmt: skip
    scheduler = diffusers.DDPMScheduler(
        num_train_timesteps=50, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon"
    )
    folder = tmp_path / "pipe"
    unet.save_pretrained(folder / "unet")
    scheduler.save_config(folder / "scheduler")

    class Plain(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.inner(x, t).sample

    example = (torch.randn(2, 1, 8, 8), torch.tensor([3, 7]))
    traced = torch.jit.trace(Plain(unet), example, check_trace=False)
    meta = checkpoints.checkpoint_metadata(
        checkpoints.load_checkpoint(folder).schedule, "epsilon", (1, 8, 8)
    )
    torch.jit.save(traced, str(tmp_path / "unet.ts"), _extra_files={"ddpm.json": json.dumps(meta)})

    images = np.random.default_rng(0).uniform(-1, 1, size=(8, 1, 8, 8)).astype(np.float32)
    np.save(tmp_path / "images.npy", images)
    data = ("--data", str(tmp_path / "images.npy"))
    # the folder respaces `sample --steps` with its scheduler's own timestep_spacing (leading,
    # DDPMScheduler's default); the program has no scheduler config, so it is given the same
    leading = ("--spacing", "leading")
    for run, extra, program_extra in (("reconstruct", data, data), ("sample", (), leading)):
        want = _rows(cli, tmp_path / "unet.ts", run, *program_extra)
        got = _rows(cli, folder, run, *extra)
        for g, w in zip(got, want, strict=True):
            assert_row_close(g, w, rel=1e-5, abs=1e-7)
    assert [row["t"] for row in got] == [40, 32, 24, 16, 8, 0]
