"""SDXL-style pipelines (issue 18): two text encoders, pooled embedding, added time ids; a
refiner-style folder with one encoder. Tiny random-weight folders saved by diffusers'
StableDiffusionXL(Img2Img)Pipeline itself, run once through that pipeline, and ddpm's guided
model output checked against the pipeline's own denoiser call."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor
from typer.testing import Result

from ddpmcli.checkpoints import load_checkpoint

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytestmark = [pytest.mark.diffusers, pytest.mark.usefixtures("one_thread")]

import pipeline_folders as pf  # noqa: E402 (tests/ is on sys.path)
from conftest import write_images  # noqa: E402
from rowcheck import json_rows  # noqa: E402


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pf.sdxl_folder(tmp_path_factory.mktemp("sdxl"))


@pytest.fixture(scope="module")
def refiner(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pf.sdxl_folder(tmp_path_factory.mktemp("refiner"), refiner=True, layout="files")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_images(tmp_path_factory.mktemp("data") / "x.npy", 4)


def _pipeline_output(
    pipe: Any, x: Tensor, t: Tensor, prompt: str, scale: float, refiner: bool
) -> Tensor:
    """The pipeline's own denoiser call on ``x`` at ``t``: its prompt embeddings, added time
    ids and classifier-free guidance, as its ``__call__`` does per step."""
    pe, npe, ppe, nppe = pipe.encode_prompt(
        prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True
    )
    projection = pipe.text_encoder_2.config.projection_dim
    if refiner:
        ids, neg_ids = pipe._get_add_time_ids(
            (8, 8), (0, 0), (8, 8), 6.0, 2.5, (8, 8), (0, 0), (8, 8), pe.dtype, projection
        )
    else:
        ids = neg_ids = pipe._get_add_time_ids(
            (8, 8), (0, 0), (8, 8), pe.dtype, text_encoder_projection_dim=projection
        )
    b = x.shape[0]
    rows = lambda a, c: torch.cat([a.expand(b, *a.shape[1:]), c.expand(b, *c.shape[1:])])  # noqa: E731
    added = {"text_embeds": rows(nppe, ppe), "time_ids": rows(neg_ids, ids)}
    with torch.no_grad():
        out = pipe.unet(
            torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=rows(npe, pe),
            added_cond_kwargs=added, return_dict=False,
        )[0]  # fmt: skip
    uncond, cond = out.chunk(2)
    return uncond + scale * (cond - uncond)


@pytest.mark.parametrize("case", ["base", "refiner"])
def test_output_is_the_pipelines_denoiser_call(sdxl: Path, refiner: Path, case: str) -> None:
    folder = sdxl if case == "base" else refiner
    cls = diffusers.StableDiffusionXLPipeline if case == "base" else (
        diffusers.StableDiffusionXLImg2ImgPipeline
    )  # fmt: skip
    pipe = cls.from_pretrained(folder)
    if case == "base":  # the fixture is a real pipeline: it runs end to end
        images = pipe("a cat", num_inference_steps=2, height=8, width=8, output_type="np").images
        assert images.shape == (1, 8, 8, 3)
    gen = torch.Generator().manual_seed(3)
    x, t = torch.randn((2, 4, 4, 4), generator=gen), torch.tensor([3, 17])
    model = load_checkpoint(folder, prompt="a cat", guidance_scale=4.0)
    want = _pipeline_output(pipe, x, t, "a cat", 4.0, case == "refiner")
    torch.testing.assert_close(model.predict(x, t)[0], want, rtol=1e-5, atol=1e-6)
    plain = load_checkpoint(folder, prompt="a cat").predict(x, t)[0]
    assert float((plain - want).abs().max()) > 1e-4  # guidance and the prompt reach the unet


def test_guidance_is_one_batched_call_and_prompts_encode_once(sdxl: Path) -> None:
    model = load_checkpoint(sdxl, prompt="a dog", guidance_scale=2.0)
    calls: list[int] = []
    inner = model.denoiser

    def counting(x: Tensor, t: Tensor, cond: Any) -> Tensor:
        calls.append(x.shape[0])
        return inner(x, t, cond)  # type: ignore[call-arg]

    text = model.conditioning
    assert text is not None and not hasattr(text, "num_classes")
    encoded: list[str] = []
    encode = text.encode  # type: ignore[union-attr]

    def count_encode(prompt: str) -> Any:
        encoded.append(prompt)
        return encode(prompt)

    null = text.encode_null  # type: ignore[union-attr]
    text.encode = count_encode  # type: ignore[union-attr]
    text.encode_null = lambda: (encoded.append("<null>"), null())[1]  # type: ignore[union-attr,misc]
    text._cache.clear()  # type: ignore[union-attr]
    model.denoiser = counting
    x = torch.randn(3, 4, 4, 4)
    for _ in range(3):
        model.predict(x, torch.tensor([1, 5, 9]))
    assert calls == [6, 6, 6] and encoded == ["a dog", "<null>"]  # each once


def test_time_ids_default_from_the_data_shape_and_overridable(sdxl: Path, refiner: Path) -> None:
    model = load_checkpoint(sdxl, inspect_only=True)
    assert model.info["time_ids"] == "8,8,0,0,8,8"
    x, t = torch.randn(1, 4, 4, 4), torch.tensor([7])
    given = load_checkpoint(sdxl, prompt="a", time_ids="16,16,2,2,8,8")
    assert given.info["time_ids"] == "16,16,2,2,8,8"
    base = load_checkpoint(sdxl, prompt="a").predict(x, t)[0]
    assert float((given.predict(x, t)[0] - base).abs().max()) > 1e-5
    assert load_checkpoint(refiner, inspect_only=True).info["time_ids"] == "8,8,0,0,6"
    from ddpmcli.errors import DdpmError

    with pytest.raises(DdpmError, match="time_ids must be 5 numbers"):
        load_checkpoint(refiner, time_ids=[8, 8, 0, 0, 8, 8])


def test_cli_info_reconstruct_sample_nll(
    cli: Callable[..., Result], sdxl: Path, data_file: Path, tmp_path: Path
) -> None:
    (row,) = json_rows(cli("info", str(sdxl), "--format", "json", "--prompt", "a dog"))
    assert row["architecture"] == "UNet2DConditionModel (SDXL-style)"
    assert row["prompt"] == "a dog" and row["latent_shape"] == "4x4x4"
    assert row["time_ids"] == "8,8,0,0,8,8"
    common = ["--prompt", "a dog", "--format", "json", "-q"]
    rec = json_rows(cli("reconstruct", str(sdxl), "--data", str(data_file), "--t", "0,19", *common))
    assert 0 < rec[0]["mse_latent"] < rec[1]["mse_latent"]
    save = tmp_path / "s.npz"
    args = ["sample", str(sdxl), "--steps", "2", "-n", "2", *common]
    guided = json_rows(cli(*args, "--guidance-scale", "5", "--save", str(save)))
    import numpy as np

    with np.load(save) as saved:  # decoded images
        assert saved["samples"].shape == (2, 3, 8, 8)
    assert [r["x0_std"] for r in json_rows(cli(*args))] != [r["x0_std"] for r in guided]
    nll = json_rows(cli("nll", str(sdxl), "--data", str(data_file), *common))
    assert nll[-1]["term"] == "total"
    moved = json_rows(cli("info", str(sdxl), "--format", "json", "--time-ids", "16,16,0,0,16,16"))
    assert moved[0]["time_ids"] == "16,16,0,0,16,16"
    bad = cli("info", str(sdxl), "--time-ids", "1,2")
    assert bad.exit_code == 2 and bad.stderr.startswith("Error: --time-ids must be 6 numbers")


def test_loading_runs_no_probe_and_the_first_call_checks(
    sdxl: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loading runs no forward pass (the load-time probe would be a whole extra SDXL forward);
    the first real call checks the shape instead, with the probe's one-line error."""
    calls: list[int] = []
    forward = diffusers.UNet2DConditionModel.forward

    def counting(self: Any, sample: Tensor, *args: Any, **kwargs: Any) -> Any:
        calls.append(sample.shape[0])
        return forward(self, sample, *args, **kwargs)

    monkeypatch.setattr(diffusers.UNet2DConditionModel, "forward", counting)
    model = load_checkpoint(sdxl, prompt="a", guidance_scale=2.0)
    assert calls == []
    model.predict(torch.randn(1, 4, 4, 4), torch.tensor([4]))
    assert calls == [2]
    from ddpmcli.errors import CheckpointError

    wrong = load_checkpoint(sdxl, data_shape=(3, 4, 4))  # 3 channels: the unet takes 4
    with pytest.raises(CheckpointError, match=r"the model fails on inputs of data shape \[3, 4"):
        wrong.predict(torch.randn(1, 3, 4, 4), torch.tensor([4]))
