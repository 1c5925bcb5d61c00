"""Latent models through the Python API (issue 9): `ddpmcli.reconstruct(..., decode=True)`, the
latent column names in the API's rows, and `sample`'s references encoded by the VAE; the CLI's
rows are the API's. The tiny DiT pipeline (3x8x8 images, 4x4x4 latents) and the SD-style one are
test_conditional's fixtures."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor
from typer.testing import Result

import ddpmcli
from ddpmcli.errors import DataError, ParameterError

pytest.importorskip("diffusers")
import test_conditional  # noqa: E402  (its tiny pipelines, as fixtures here too)
from rowcheck import as_json_rows, assert_row_close, json_rows  # noqa: E402

dit, sd, data_file = test_conditional.dit, test_conditional.sd, test_conditional.data_file

pytestmark = [pytest.mark.diffusers, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(autouse=True)
def cli_one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI on one thread too (its default follows the idle cores: on a quiet machine 2, and
    the last bits of a float32 convolution depend on the thread count), as the API runs here."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


LATENT_COLUMNS = ["t", "alpha_bar", "snr", "mse_latent", "psnr_latent", "eps_mse_latent",
                  "clip_fraction_latent"]  # fmt: skip


@pytest.fixture
def latents_file(one_thread: None, dit: Path, data_file: Path, tmp_path: Path) -> Path:
    """The VAE latents of data_file's images (float64), as an array file (encoded on one thread,
    as the tests encode: the last bits of a float32 convolution depend on the thread count)."""
    model = ddpmcli.load(dit, class_label="0")
    assert model.latent is not None
    path = tmp_path / "z.npy"
    np.save(path, model.latent.encode(torch.from_numpy(np.load(data_file))).numpy())
    return path


def test_reconstruct_cli_rows_equal_api_rows_with_and_without_decode(
    cli: Callable[..., Result], dit: Path, data_file: Path
) -> None:
    args = ["reconstruct", str(dit), "--data", str(data_file), "--t", "0,10,19", "--class-label",
            "1", "--batch-size", "4", "--format", "json", "-q"]  # fmt: skip
    model = ddpmcli.load(dit, class_label="1")
    plain = ddpmcli.reconstruct(model, str(data_file), t=[0, 10, 19], batch_size=4)
    assert json_rows(cli(*args)) == plain.rows
    assert list(plain.rows[0]) == plain.columns == LATENT_COLUMNS
    assert plain.rows[0]["psnr_latent"] is None and plain.rows[2]["mse_latent"] > 0
    decoded = ddpmcli.reconstruct(model, str(data_file), t=[0, 10, 19], batch_size=4, decode=True)
    assert json_rows(cli(*args, "--decode")) == decoded.rows
    assert decoded.columns == [*LATENT_COLUMNS, "mse_image", "psnr_image"]
    assert list(decoded.rows[0]) == decoded.columns
    for row, base in zip(decoded.rows, plain.rows, strict=True):  # decode only adds columns
        assert {k: row[k] for k in LATENT_COLUMNS} == base
        assert row["psnr_image"] == pytest.approx(10 * np.log10(4 / row["mse_image"]))
    assert decoded.rows[0]["mse_image"] < decoded.rows[2]["mse_image"]
    # the images as a tensor: encoded by the API, the same rows
    images = torch.from_numpy(np.load(data_file))
    again = ddpmcli.reconstruct(model, images, t=[0, 10, 19], batch_size=4, decode=True)
    assert again.rows == decoded.rows


def test_per_sample_rows_and_the_plot_use_the_latent_names(
    cli: Callable[..., Result], dit: Path, data_file: Path, tmp_path: Path
) -> None:
    model = ddpmcli.load(dit, class_label="2")
    result = ddpmcli.reconstruct(model, str(data_file), t=[5, 15], per_sample=True, batch_size=6)
    assert result.sample_rows is not None and len(result.sample_rows) == 12
    assert result.sample_columns == ["t", "sample", *LATENT_COLUMNS[1:]]
    assert list(result.sample_rows[0]) == result.sample_columns
    per = cli("reconstruct", str(dit), "--data", str(data_file), "--t", "5,15", "--class-label",
              "2", "--per-sample", "--batch-size", "6", "-f", "json", "-q")  # fmt: skip
    assert json_rows(per) == result.sample_rows
    plot = tmp_path / "rec.png"
    drawn = cli("reconstruct", str(dit), "--data", str(data_file), "--t", "5,15", "--class-label",
                "2", "--plot", str(plot), "-f", "csv")  # fmt: skip
    assert drawn.exit_code == 0, drawn.stderr
    assert plot.stat().st_size > 1000 and f"wrote {plot}" in drawn.stderr


def test_latent_shaped_data_are_taken_as_latents(
    cli: Callable[..., Result], dit: Path, data_file: Path, latents_file: Path
) -> None:
    args = ["--t", "0,19", "--class-label", "3", "--batch-size", "6", "-f", "json", "-q"]
    from_images = json_rows(cli("reconstruct", str(dit), "--data", str(data_file), *args))
    from_latents = json_rows(cli("reconstruct", str(dit), "--data", str(latents_file), *args))
    # the fixture encodes all images as one batch, the command in chunks of 6: a float32
    # convolution's last bits follow the batch (seen: 1.5e-7 relative in mse_latent)
    assert len(from_latents) == len(from_images)
    for got, want in zip(from_latents, from_images, strict=True):
        assert_row_close(got, want, rel=1e-5)
    model = ddpmcli.load(dit, class_label="3")
    latents = torch.from_numpy(np.load(latents_file))
    api = ddpmcli.reconstruct(model, latents, t=[0, 19], batch_size=6)
    assert api.rows == from_latents
    # decoding needs the images to compare with; latents have none
    with pytest.raises(
        ParameterError, match=r"^decode needs image data to compare with, not latents$"
    ):
        ddpmcli.reconstruct(model, latents, t=[0], decode=True)
    bad = cli("reconstruct", str(dit), "--data", str(latents_file), "--decode", *args)
    assert bad.exit_code == 2
    assert bad.stderr == "Error: --decode needs image data to compare with, not latents\n"
    with pytest.raises(DataError, match=r"shape \[2, 4, 4\]; the model wants images \[3, 8, 8\]"):
        ddpmcli.reconstruct(model, torch.zeros(2, 2, 4, 4), t=[0])


def test_decode_is_refused_where_it_cannot_mean_anything(dit: Path, data_file: Path) -> None:
    sched = ddpmcli.schedule("linear", timesteps=10)
    flat = ddpmcli.wrap(lambda x, t: torch.zeros_like(x), schedule=sched, data_shape=(2,))
    with pytest.raises(ParameterError, match=r"^decode needs a latent model"):
        ddpmcli.reconstruct(flat, torch.zeros(4, 2), t=[0], decode=True)
    model = ddpmcli.load(dit, class_label="0")
    with pytest.raises(
        ParameterError, match=r"^decode gives per-t rows; it does not go with per_sample$"
    ):
        ddpmcli.reconstruct(model, str(data_file), t=[0], decode=True, per_sample=True)
    # a plain model's rows keep their plain names
    assert list(ddpmcli.reconstruct(flat, torch.zeros(4, 2), t=[0]).rows[0])[3] == "mse"


def test_nll_cli_rows_equal_api_rows_named_in_latent_space(
    cli: Callable[..., Result], dit: Path, data_file: Path
) -> None:
    args = ["--class-label", "4", "-n", "3", "--t-random", "4", "--batch-size", "8"]
    rows = json_rows(cli("nll", str(dit), "--data", str(data_file), *args, "-f", "json", "-q"))
    model = ddpmcli.load(dit, class_label="4")
    result = ddpmcli.nll(model, str(data_file), n=3, t_random=4, batch_size=8)
    assert rows == result.rows
    assert rows[-1]["term"] == "total_estimate"
    assert rows[-1]["bits_per_dim_latent"] == result.total_bpd
    assert "x0_mse_latent" in rows[1] and "bits_per_dim" not in rows[-1]
    per = json_rows(cli("nll", str(dit), "--data", str(data_file), *args, "--per-sample", "-f",
                    "json", "-q"))  # fmt: skip
    assert result.per_sample_total is not None
    assert per == [{"sample": i, "bits_per_dim_latent": v}
                   for i, v in enumerate(result.per_sample_total.tolist())]  # fmt: skip


def test_sample_references_are_encoded_and_compared_in_latent_space(
    cli: Callable[..., Result], dit: Path, data_file: Path, latents_file: Path
) -> None:
    args = ["--class-label", "1", "--steps", "3", "-n", "2", "-f", "json"]
    shown = cli("sample", str(dit), "--references", str(data_file), *args)
    rows = json_rows(shown)
    # the folder's scheduler samples with leading spacing: the one warning about it comes first
    warning, note = shown.stderr.splitlines()
    assert warning.startswith("Warning: leading spacing with 3 steps never visits t = 19")
    assert note == "references compared in latent space (images encoded by the VAE)"
    model = ddpmcli.load(dit, class_label="1")
    api = ddpmcli.sample(model, n=2, steps=3, references=str(data_file))
    assert rows == as_json_rows(api.rows)
    assert model.latent is not None and api.references is not None
    latents = torch.from_numpy(np.load(latents_file))
    torch.testing.assert_close(api.references, latents, rtol=0, atol=0)
    variance = float(latents.var(correction=0))
    assert api.data_variance == pytest.approx(variance, rel=1e-12)
    ab = float(model.schedule.alpha_bar[rows[0]["t"]])
    assert rows[0]["xt_std_expected"] == pytest.approx((ab * variance + 1 - ab) ** 0.5)
    # latents as given (file or tensor), images as a tensor: the same rows
    as_latents = json_rows(cli("sample", str(dit), "--references", str(latents_file), *args, "-q"))
    assert as_latents == rows
    images = torch.from_numpy(np.load(data_file))
    assert as_json_rows(ddpmcli.sample(model, n=2, steps=3, references=images).rows) == rows
    assert as_json_rows(ddpmcli.sample(model, n=2, steps=3, references=latents).rows) == rows
    # without references, var(data) = 1: a different expectation, and the note says so
    bare = cli("sample", str(dit), *args)
    assert json_rows(bare)[0]["xt_std_expected"] != rows[0]["xt_std_expected"]
    assert bare.stderr.splitlines()[-1] == (
        "xt_std_expected assumes var(data) = 1 (no reference samples)"
    )
    assert ddpmcli.sample(model, n=2, steps=3).references is None


def test_sd_pipeline_decode_cli_equals_api(
    cli: Callable[..., Result], sd: Path, data_file: Path
) -> None:
    args = ["reconstruct", str(sd), "--data", str(data_file), "--t", "3,17", "--prompt", "a cat",
            "--batch-size", "6", "--decode", "-f", "json", "-q"]  # fmt: skip
    model = ddpmcli.load(sd, prompt="a cat")
    api = ddpmcli.reconstruct(model, str(data_file), t=[3, 17], batch_size=6, decode=True)
    assert json_rows(cli(*args)) == api.rows
    assert api.columns[-2:] == ["mse_image", "psnr_image"] and "mse_latent" in api.columns


def test_the_rows_of_a_failed_run_carry_the_latent_names(dit: Path, data_file: Path) -> None:
    """A model that returns NaN at t = 19: the rows of the other t (``RunError.rows``, printed
    before the error) are named as a finished run's."""
    from ddpmcli.run import RunError

    model = ddpmcli.load(dit, class_label="0")
    move = model._mover
    assert move is not None

    def poisoned(device: torch.device, dtype: torch.dtype | None) -> Any:
        net = move(device, dtype)

        def call(x_t: Tensor, t: Tensor, *rest: Any) -> Tensor:
            out = net(x_t, t, *rest)
            return torch.where((t == 19).view(-1, 1, 1, 1), torch.nan, out)

        return call

    model._mover = poisoned  # reconstruct moves the model (a new denoiser); nll calls it as is
    model.denoiser = poisoned(model.device, None)
    with pytest.raises(RunError) as failed:
        ddpmcli.reconstruct(model, str(data_file), t=[0, 19], batch_size=6)
    assert [r["t"] for r in failed.value.rows] == [0]
    assert list(failed.value.rows[0]) == LATENT_COLUMNS
    with pytest.raises(RunError) as bound:
        ddpmcli.nll(model, str(data_file), t=[0, 19], n=2, batch_size=4)
    assert bound.value.rows and all("x0_mse_latent" in r for r in bound.value.rows)
