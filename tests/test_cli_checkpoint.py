"""`ddpm info` and `ddpm train` through the real app: stdout, stderr and exit codes apart."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from typer.testing import Result

from ddpmcli import checkpoints

Cli = Callable[..., Result]
TRAIN = ("train", "--steps", "30", "--batch-size", "32", "--width", "16", "-T", "50", "--quiet")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from typer.testing import CliRunner

    from ddpmcli.cli.app import app

    out = tmp_path_factory.mktemp("ckpt") / "ckpt.pt"
    result = CliRunner().invoke(app, [*TRAIN, "--data", "gmm", "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    return out


def test_train_writes_loadable_checkpoint(trained: Path) -> None:
    model = checkpoints.load_checkpoint(trained)
    assert model.info["architecture"] == "mlp" and model.schedule.num_steps == 50
    assert model.info["training"]["steps"] == 30 and model.info["training"]["data"] == "gmm"
    assert model.reference_samples is not None and model.reference_samples.shape == (512, 2)
    assert not list(trained.parent.glob(".ckpt.pt.*"))  # no temporary file left behind


def test_train_same_seed_same_weights(cli: Cli, tmp_path: Path, trained: Path) -> None:
    again = tmp_path / "again.pt"
    assert cli(*TRAIN, "--data", "gmm", "--out", str(again)).exit_code == 0
    a = torch.load(trained, weights_only=True)["state_dict"]
    b = torch.load(again, weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = tmp_path / "other.pt"
    assert cli(*TRAIN, "--data", "gmm", "--seed", "1", "--out", str(other)).exit_code == 0
    c = torch.load(other, weights_only=True)["state_dict"]
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_train_images_v_learned_variance(cli: Cli, tmp_path: Path) -> None:
    out = tmp_path / "img.pt"
    result = cli(
        "train", "--data", "shapes", "--n", "64", "--steps", "3", "--batch-size", "4",
        "--width", "8", "-T", "20", "--kind", "cosine", "--prediction-type", "v",
        "--learned-variance", "--references", "4", "--quiet", "--out", str(out),
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    model = checkpoints.load_checkpoint(out)
    assert model.data_shape == (1, 16, 16) and model.learned_variance
    assert model.prediction_type == "v_prediction" and model.schedule.name.startswith("cosine")


def test_train_from_npy_file(cli: Cli, tmp_path: Path) -> None:
    import numpy as np

    np.save(tmp_path / "d.npy", np.random.default_rng(0).normal(size=(40, 3)).astype(np.float32))
    out = tmp_path / "f.pt"
    result = cli(*TRAIN, "--data", str(tmp_path / "d.npy"), "--out", str(out))
    assert result.exit_code == 0, result.stderr
    assert checkpoints.load_checkpoint(out).data_shape == (3,)


def test_info_json_and_table(cli: Cli, trained: Path) -> None:
    result = cli("info", str(trained), "--format", "json")
    assert result.exit_code == 0 and result.stderr == ""
    [row] = json.loads(result.stdout)
    assert row["format"] == "native" and row["architecture"] == "mlp"
    assert row["timesteps"] == 50 and row["prediction_type"] == "epsilon"
    assert row["data_shape"] == "2" and row["file_size"] == os.path.getsize(trained)
    assert row["terminal_snr"] > 0
    # an unconditional, non-latent model has no class, prompt or VAE fields to show
    assert not {"num_classes", "class_label", "prompt", "latent_shape", "vae"} & set(row)
    table = cli("info", str(trained), "--format", "table")
    assert "parameters" in table.stdout and "native" in table.stdout
    assert "num_classes" not in table.stdout and "latent_shape" not in table.stdout
    csv = cli("info", str(trained), str(trained), "-f", "csv", "-c", "format,kind")
    assert csv.stdout == "format,kind\nnative,linear\nnative,linear\n"


def test_info_torchscript_needs_flags(cli: Cli, trained: Path, tmp_path: Path) -> None:
    model = checkpoints.load_checkpoint(trained)
    assert isinstance(model.denoiser, torch.nn.Module)
    checkpoints.save_torchscript(model.denoiser, tmp_path / "s.pt")
    bad = cli("info", str(tmp_path / "s.pt"))
    assert bad.exit_code == 1 and bad.stdout == ""
    assert bad.stderr.startswith("Error: ") and bad.stderr.count("\n") == 1
    assert "--kind" in bad.stderr
    ok = cli(
        "info",
        str(tmp_path / "s.pt"),
        "--kind",
        "linear",
        "-T",
        "50",
        "--prediction-type",
        "eps",
        "--data-shape",
        "2",
        "-f",
        "json",
    )
    assert ok.exit_code == 0, ok.stderr
    assert json.loads(ok.stdout)[0]["format"] == "torchscript"


def test_info_bad_files_one_line_exit_1(cli: Cli, trained: Path, tmp_path: Path) -> None:
    blob = trained.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(blob[: len(blob) // 3])
    (tmp_path / "rand.pt").write_bytes(bytes(range(256)) * 4)
    torch.save({"w": torch.zeros(1)}, tmp_path / "plain.pt")
    good = torch.load(trained, weights_only=True)
    torch.save({**good, "state_dict": {"w": torch.zeros(1)}}, tmp_path / "keys.pt")
    torch.save({**good, "data_shape": [5]}, tmp_path / "shape.pt")
    marker = tmp_path / "marker"

    class Evil:
        def __reduce__(self) -> tuple[object, ...]:
            return (os.system, (f"touch {marker}",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    for name, needle in [
        ("trunc.pt", "truncated or corrupt"), ("rand.pt", "not a torch checkpoint"),
        ("plain.pt", "not a ddpmcli checkpoint"), ("keys.pt", "state dict does not match"),
        ("shape.pt", "does not fit"), ("evil.pt", "refused to load"), ("nope.pt", "not found"),
    ]:  # fmt: skip
        result = cli("info", str(tmp_path / name))
        assert result.exit_code == 1, (name, result.stderr)
        assert result.stdout == ""
        assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1, name
        assert needle in result.stderr, (name, result.stderr)
    assert not marker.exists()


def test_train_usage_errors(cli: Cli, tmp_path: Path) -> None:
    out = str(tmp_path / "x.pt")
    for args, needle in [
        (("--data", "nosuch"), "data not found"),
        (("--ema", "1.5"), "--ema"),
        (("--kind", "nosuch"), "nosuch"),
        (("--prediction-type", "score"), "score"),
    ]:
        result = cli(*TRAIN, *args, "--out", out)
        assert result.exit_code in (1, 2), (args, result.stderr)
        assert needle in result.stderr and result.stderr.count("\n") == 1, (args, result.stderr)
    assert not Path(out).exists()
