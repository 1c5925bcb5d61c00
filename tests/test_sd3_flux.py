"""SD3/3.5 and Flux pipelines (issue 18): flow-matching transformers with their VAE (shift and
scaling factor), CLIP, CLIP-G and T5 encoders, Flux's packed latents and embedded guidance.
Tiny random-weight folders saved by diffusers' StableDiffusion3Pipeline and FluxPipeline
themselves, run once through them; ddpm's model output equals the pipelines' own denoiser call
on the same latents, timestep and prompt embedding; the scheduler config's shift (or dynamic
shifting at the data's resolution) is the schedule."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import write_images
from rowcheck import json_rows
from torch import Tensor
from typer.testing import Result

from ddpmcli.checkpoints import load_checkpoint

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytestmark = [pytest.mark.diffusers, pytest.mark.usefixtures("one_thread")]


@pytest.fixture
def folders(flow_folders: dict[str, Path]) -> dict[str, Path]:
    """SD3 (with and without T5), Flux-dev and a schnell-style Flux (conftest.flow_folders)."""
    return flow_folders


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_images(tmp_path_factory.mktemp("data") / "x.npy", 4)


def _rows(a: Tensor, b: int) -> Tensor:
    return a.expand(b, *a.shape[1:])


def _sd3_call(pipe: Any, x: Tensor, t: Tensor, prompt: str, scale: float) -> Tensor:
    """StableDiffusion3Pipeline's denoiser step: its embeddings, one batched call, CFG."""
    pe, npe, ppe, nppe = pipe.encode_prompt(
        prompt, None, None, device="cpu", do_classifier_free_guidance=True
    )
    b = x.shape[0]
    with torch.no_grad():
        out = pipe.transformer(
            hidden_states=torch.cat([x, x]), timestep=torch.cat([t, t]),
            encoder_hidden_states=torch.cat([_rows(npe, b), _rows(pe, b)]),
            pooled_projections=torch.cat([_rows(nppe, b), _rows(ppe, b)]), return_dict=False,
        )[0]  # fmt: skip
    uncond, cond = out.chunk(2)
    return uncond + scale * (cond - uncond)


def _flux_call(pipe: Any, x: Tensor, t: Tensor, prompt: str, guidance: Tensor | None) -> Tensor:
    """FluxPipeline's denoiser step on unpacked latents ``x``: packed, ids, ``t / 1000``."""
    b, c, h, w = x.shape
    pe, ppe, text_ids = pipe.encode_prompt(prompt, None, device="cpu")
    with torch.no_grad():
        out = pipe.transformer(
            hidden_states=pipe._pack_latents(x, b, c, h, w), timestep=t / 1000,
            guidance=guidance, pooled_projections=_rows(ppe, b),
            encoder_hidden_states=_rows(pe, b), txt_ids=text_ids,
            img_ids=pipe._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", x.dtype),
            return_dict=False,
        )[0]  # fmt: skip
    return pipe._unpack_latents(out, h * pipe.vae_scale_factor, w * pipe.vae_scale_factor, 2)


def _pipeline_output(case: str, pipe: Any, x: Tensor, t: Tensor, scale: float) -> Tensor:
    if case.startswith("sd3"):
        return _sd3_call(pipe, x, t, "a cat", scale)
    if case == "flux-dev":  # embedded guidance: one call with the scale as the network's input
        return _flux_call(pipe, x, t, "a cat", torch.full([1], scale).expand(x.shape[0]))
    neg = _flux_call(pipe, x, t, "", None)  # schnell: true CFG against the empty prompt
    return neg + scale * (_flux_call(pipe, x, t, "a cat", None) - neg)


@pytest.mark.parametrize("case", ["sd3", "sd3-no-t5", "flux-dev", "flux-schnell"])
def test_output_is_the_pipelines_denoiser_call(folders: dict[str, Path], case: str) -> None:
    cls = diffusers.StableDiffusion3Pipeline if case.startswith("sd3") else diffusers.FluxPipeline
    extra = {"text_encoder_3": None, "tokenizer_3": None} if case == "sd3-no-t5" else {}
    pipe = cls.from_pretrained(folders[case], **extra)
    if case in ("sd3", "flux-dev"):  # the fixture is a real pipeline: it runs end to end
        images = pipe("a cat", num_inference_steps=2, height=8, width=8, output_type="np").images
        assert images.shape == (1, 8, 8, 3)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn((2, 4, 4, 4), generator=gen)
    t = torch.tensor([250.0, 875.0])  # what the pipelines call with: 1000 sigma
    model = load_checkpoint(folders[case], prompt="a cat", guidance_scale=3.0)
    assert model.prediction_type == "flow" and model.data_shape == (4, 4, 4)
    want = _pipeline_output(case, pipe, x, t, 3.0)
    torch.testing.assert_close(model.predict(x, t.double())[0], want, rtol=1e-5, atol=1e-6)
    other = load_checkpoint(folders[case], prompt="a dog", guidance_scale=3.0)
    assert float((other.predict(x, t.double())[0] - want).abs().max()) > 1e-5  # prompt reaches it


def test_schedule_is_the_scheduler_configs_shift_at_the_resolution(
    folders: dict[str, Path],
) -> None:
    sd3 = load_checkpoint(folders["sd3"], inspect_only=True)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)  # its training sigmas
    want = scheduler.sigmas.flip(0).double()
    torch.testing.assert_close(sd3.schedule.sigma_t, want, rtol=1e-6, atol=0)
    flux = load_checkpoint(folders["flux-dev"], inspect_only=True)
    # 4x4 latents: 2x2 packed tokens; Flux's calculate_shift at that sequence length
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    mu = calculate_shift(4, 256, 4096, 0.5, 1.15)
    assert flux.info["scheduler_flow_mu"] == pytest.approx(mu, rel=1e-12)
    u = torch.arange(1, 1001, dtype=torch.float64) / 1000
    shifted = math.exp(mu) / (math.exp(mu) + (1 / u - 1))
    torch.testing.assert_close(flux.schedule.sigma_t, shifted, rtol=1e-12, atol=1e-15)
    bigger = load_checkpoint(folders["flux-dev"], inspect_only=True, data_shape=(4, 64, 64))
    assert bigger.info["scheduler_flow_mu"] == pytest.approx(calculate_shift(1024), rel=1e-12)
    images = load_checkpoint(folders["flux-dev"], inspect_only=True, shape_from_data=(3, 16, 16))
    assert images.data_shape == (4, 8, 8)  # the data's 16 px images: 8x8 latents, 16 tokens
    assert images.latent is not None and images.latent.image_shape == (3, 16, 16)
    assert images.info["scheduler_flow_mu"] == pytest.approx(calculate_shift(16), rel=1e-12)


def test_info_says_which_guidance(cli: Callable[..., Result], folders: dict[str, Path]) -> None:
    (dev,) = json_rows(cli("info", str(folders["flux-dev"]), "--format", "json"))
    assert dev["architecture"] == "FluxTransformer2DModel" and dev["guidance_scale"] == 3.5
    assert dev["guidance"].startswith("embedded") and dev["prediction_type"] == "flow"
    assert dev["vae"] == "AutoencoderKL 3x8x8 scaling_factor 0.3611 shift_factor 0.1159"
    (schnell,) = json_rows(cli("info", str(folders["flux-schnell"]), "--format", "json"))
    assert schnell["guidance"].startswith("classifier-free") and schnell["guidance_scale"] == 1.0
    (sd3,) = json_rows(cli("info", str(folders["sd3-no-t5"]), "--format", "json"))
    assert sd3["architecture"] == "SD3Transformer2DModel" and sd3["latent_shape"] == "4x4x4"
    assert sd3["text_encoders"] == "CLIP-L, CLIP-G (no T5)"


@pytest.mark.parametrize("case", ["sd3", "flux-dev"])
def test_cli_reconstruct_sample_nll(
    cli: Callable[..., Result], folders: dict[str, Path], data_file: Path, tmp_path: Path,
    case: str,
) -> None:  # fmt: skip
    folder = str(folders[case])
    common = ["--prompt", "a dog", "--format", "json", "-q"]
    rec = json_rows(cli("reconstruct", folder, "--data", str(data_file), "--t", "0,999", *common))
    assert 0 < rec[0]["mse_latent"] < rec[1]["mse_latent"]
    save = tmp_path / "s.npz"
    args = ["sample", folder, "--steps", "2", "-n", "2", *common]
    guided = json_rows(cli(*args, "--guidance-scale", "5", "--save", str(save)))
    import numpy as np

    with np.load(save) as saved:  # decoded images
        assert saved["samples"].shape == (2, 3, 8, 8)
    assert [r["x0_std"] for r in json_rows(cli(*args, "--guidance-scale", "2"))] != [
        r["x0_std"] for r in guided
    ]
    # 8 of the 1000 timesteps, weighted (the full bound is 1000 calls of the tiny transformer)
    nll = json_rows(cli("nll", folder, "--data", str(data_file), "--t-random", "8", *common))
    assert nll[-1]["term"] == "total_estimate" and nll[-1]["bits_per_dim_latent"] > 0


def test_hostile_sizes_are_one_line_before_anything_is_built(
    folders: dict[str, Path], tmp_path: Path
) -> None:
    """Transformer and T5 configs that describe a huge network: one Error line, nothing built."""
    import shutil

    from ddpmcli.errors import CheckpointError

    cases = [
        ("flux-dev", "transformer", {"num_layers": 10**5}, "num_layers must be an integer in 1"),
        ("flux-dev", "transformer", {"num_attention_heads": 1024, "attention_head_dim": 4096},
         "heads x head dim 4194304 is more than 16384"),
        ("sd3", "transformer", {"num_attention_heads": 1024, "attention_head_dim": 16,
         "num_layers": 256}, "the SD3Transformer2DModel it describes"),
        ("sd3", "text_encoder_3", {"d_ff": 1 << 18, "num_layers": 256}, "the text encoder it"),
    ]  # fmt: skip
    for i, (case, part, change, message) in enumerate(cases):
        folder = tmp_path / str(i)
        shutil.copytree(folders[case], folder)
        config = json.loads((folder / part / "config.json").read_text())
        (folder / part / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(folder, inspect_only=True)


def test_time_ids_need_an_sdxl_model(folders: dict[str, Path]) -> None:
    from ddpmcli.errors import DdpmError

    with pytest.raises(DdpmError, match="time_ids given, but the model is not SDXL-style"):
        load_checkpoint(folders["sd3"], inspect_only=True, time_ids="8,8,0,0,8,8")


def test_cli_takes_the_resolution_from_the_data(
    cli: Callable[..., Result], folders: dict[str, Path], tmp_path: Path
) -> None:
    import numpy as np

    data = tmp_path / "x16.npy"
    gen = torch.Generator().manual_seed(2)
    np.save(data, (torch.rand((2, 3, 16, 16), generator=gen) * 2 - 1).numpy())
    common = ["--prompt", "a dog", "--format", "json", "-q"]
    args = ["reconstruct", str(folders["flux-dev"]), "--t", "0", *common]
    rows = json_rows(cli(*args, "--data", str(data)))
    # 8x8 latents (16 tokens) shift less than 4x4 ones would: alpha_bar at t = 0 says which mu
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    shift = math.exp(calculate_shift(16, 256, 4096, 0.5, 1.15))
    s = shift * 0.001 / (1 + (shift - 1) * 0.001)
    assert rows[0]["alpha_bar"] == pytest.approx((1 - s) ** 2 / ((1 - s) ** 2 + s**2), rel=1e-9)
