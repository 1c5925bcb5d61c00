"""Conditional and latent models (issue 9): class-conditional diffusers UNet2DModel folders,
labels keyed by sample index, classifier-free guidance in one batched call; tiny random-weight
models built here from configs (no hub)."""

from __future__ import annotations

import json
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
from ddpmcli.checkpoints.conditioning import Conditioning, LabelChoice
from ddpmcli.errors import CheckpointError, ParameterError
from ddpmcli.run import SampleSettings, respaced_schedule, sample

diffusers = pytest.importorskip("diffusers")
pytestmark = [pytest.mark.diffusers, pytest.mark.usefixtures("one_thread")]

CLASSES = 4  # the test UNet's classes; its embedding table has one more row, the null label


def _unet_folder(root: Path, *, null: bool = True, classes: int = CLASSES) -> Path:
    """A pipeline folder (unet/, scheduler/) holding a class-conditional UNet2DModel."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        num_class_embeds=classes + 1 if null else classes,
    )
    # random class embeddings big enough that labels change the output visibly
    with torch.no_grad():
        unet.class_embedding.weight.normal_(0.0, 3.0)
    unet.save_pretrained(root / "unet", safe_serialization=True)
    diffusers.DDPMScheduler(num_train_timesteps=20).save_pretrained(root / "scheduler")
    if null:
        config_path = root / "unet" / "config.json"
        config = json.loads(config_path.read_text())
        config["null_class_label"] = classes
        config_path.write_text(json.dumps(config))
    return root


@pytest.fixture(scope="module")
def cc_unet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _unet_folder(tmp_path_factory.mktemp("cc"))


@pytest.fixture(scope="module")
def cc_unet_no_null(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _unet_folder(tmp_path_factory.mktemp("cc_nonull"), null=False)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_images(tmp_path_factory.mktemp("data") / "x.npy", 6)


# ---------------------------------------------------------------------------------------------
# labels


def test_label_forms_pick_labels_by_sample_index() -> None:
    idx = torch.tensor([0, 1, 2, 3, 4, 5, 9])
    fixed = Conditioning(10, None, LabelChoice.parse("7"))
    assert fixed.labels(idx).tolist() == [7] * 7
    cycle = Conditioning(10, None, LabelChoice.parse("2-4"))
    assert cycle.labels(idx).tolist() == [2, 3, 4, 2, 3, 4, 2]
    every = Conditioning(3, None, LabelChoice.parse("all").resolve(3))
    assert every.labels(idx).tolist() == [0, 1, 2, 0, 1, 2, 0]
    null = Conditioning(10, 10, LabelChoice.parse("null"))
    assert null.labels(idx).tolist() == [10] * 7


def test_random_labels_depend_on_seed_and_index_only() -> None:
    a = Conditioning(10, None, LabelChoice.parse("random"), seed=3)
    whole = a.labels(torch.arange(64))
    assert set(whole.tolist()) <= set(range(10)) and len(set(whole.tolist())) == 10
    # another model object, asked in pieces and out of order: the same label per index
    b = Conditioning(10, None, LabelChoice.parse("random"), seed=3)
    assert b.labels(torch.tensor([40, 2])).tolist() == [int(whole[40]), int(whole[2])]
    assert torch.equal(b.labels(torch.arange(32, 64)), whole[32:])
    other = Conditioning(10, None, LabelChoice.parse("random"), seed=4).labels(torch.arange(64))
    assert not torch.equal(other, whole)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("x", "class_label 'x': want K, A-B, all, random or null"),
        ("3-1", "class_label '3-1': labels are non-negative, and A <= B in A-B"),
        ("-2", "class_label '-2': want K, A-B, all, random or null"),
    ],
)
def test_bad_label_forms(spec: str, message: str) -> None:
    with pytest.raises(ParameterError) as info:
        LabelChoice.parse(spec)
    assert str(info.value) == message


def test_label_out_of_range_and_guidance_without_null() -> None:
    with pytest.raises(ParameterError, match=r"class_label 4 is out of range: the model has 4"):
        LabelChoice.parse("4").resolve(4)
    with pytest.raises(CheckpointError, match=r"^guidance_scale needs a null"):
        Conditioning(4, None, LabelChoice.parse("1"), guidance_scale=2.0)


# ---------------------------------------------------------------------------------------------
# the model: labels reach the network, guidance is one call


class _Counting:
    """Wraps a denoiser: counts calls and the rows they carry."""

    def __init__(self, inner: Callable[..., Tensor]) -> None:
        self.inner = inner
        self.calls: list[int] = []

    def __call__(self, x: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        self.calls.append(int(x.shape[0]))
        return self.inner(x, t, labels)


def _sample(model: Any, n: int = 4, batch: int | None = None, seed: int = 0) -> Tensor:
    sched = respaced_schedule(model.schedule, 3)
    run = sample(
        model.predict, sched, model.prediction_type, model.data_shape, n=n, seed=seed,
        batch_size=batch, settings=SampleSettings(sampler="ddim"),
    )  # fmt: skip
    return run.samples


def test_labels_change_the_output_and_follow_the_sample(cc_unet: Path) -> None:
    x = torch.randn(2, 3, 8, 8)
    t = torch.tensor([5, 5])
    outs = [load_checkpoint(cc_unet, class_label=str(k)).predict(x, t)[0] for k in range(CLASSES)]
    assert all(not torch.allclose(outs[0], o) for o in outs[1:])
    # random labels: the samples do not depend on the batch size
    model = load_checkpoint(cc_unet, class_label="random", label_seed=5)
    whole = _sample(model, n=5)
    torch.testing.assert_close(_sample(model, n=5, batch=2), whole, rtol=1e-5, atol=1e-5)
    other = _sample(load_checkpoint(cc_unet, class_label="random", label_seed=6), n=5)
    assert float((other - whole).abs().max()) > 1e-2  # other labels: visibly other samples
    # and label k of "random" is what "k" gives for that sample
    labels = model.conditioning.labels(torch.arange(5))  # type: ignore[union-attr]
    k = int(labels[3])
    alone = _sample(load_checkpoint(cc_unet, class_label=str(k)), n=5)
    torch.testing.assert_close(alone[3], whole[3])


def test_guidance_one_is_the_conditional_model_in_one_pass(cc_unet: Path) -> None:
    plain = load_checkpoint(cc_unet, class_label="1-3")
    one = load_checkpoint(cc_unet, class_label="1-3", guidance_scale=1.0)
    counter = _Counting(one.denoiser)
    one.denoiser = counter
    assert torch.equal(_sample(one, n=4, batch=2), _sample(plain, n=4, batch=2))
    assert counter.calls == [2, 2] * 3  # 3 steps, 2 batches, no second pass


def test_guidance_batches_cond_and_null_into_one_call(cc_unet: Path) -> None:
    scale = 3.0
    guided = load_checkpoint(cc_unet, class_label="2", guidance_scale=scale)
    counter = _Counting(guided.denoiser)
    guided.denoiser = counter
    x = torch.randn(3, 3, 8, 8)
    t = torch.tensor([4, 9, 15])
    got, v = guided.predict(x, t, sample_index=torch.tensor([0, 1, 2]))
    assert counter.calls == [6] and v is None
    cond = load_checkpoint(cc_unet, class_label="2").predict(x, t)[0]
    null = load_checkpoint(cc_unet, class_label="null").predict(x, t)[0]
    torch.testing.assert_close(got, null + scale * (cond - null), rtol=1e-5, atol=1e-5)


def test_default_label_is_null_and_a_model_without_one_needs_a_label(
    cc_unet: Path, cc_unet_no_null: Path
) -> None:
    model = load_checkpoint(cc_unet)
    assert model.info["class_label"] == "null" and model.info["num_classes"] == CLASSES
    with pytest.raises(CheckpointError, match=r"no null label: pass class_label"):
        load_checkpoint(cc_unet_no_null)
    assert load_checkpoint(cc_unet_no_null, inspect_only=True).info["null_label"] is None


# ---------------------------------------------------------------------------------------------
# through the CLI


def test_cli_info_shows_classes(cli: Callable[..., Result], cc_unet: Path) -> None:
    (row,) = json_rows(cli("info", str(cc_unet), "--format", "json", "--class-label", "random"))
    assert row["num_classes"] == CLASSES and row["null_label"] == CLASSES
    assert row["class_label"] == "random" and row["architecture"] == "UNet2DModel"


def test_cli_reconstruct_sample_nll_with_labels_and_guidance(
    cli: Callable[..., Result], cc_unet: Path, data_file: Path
) -> None:
    common = ["--format", "json", "-q"]
    rec = json_rows(cli("reconstruct", str(cc_unet), "--data", str(data_file), "--t", "0,10,19",
                    "--class-label", "0-3", *common))  # fmt: skip
    assert [r["t"] for r in rec] == [0, 10, 19]
    rec_b = json_rows(cli("reconstruct", str(cc_unet), "--data", str(data_file), "--t", "0,10,19",
                      "--class-label", "0-3", "--batch-size", "2", *common))  # fmt: skip
    for a, b in zip(rec, rec_b, strict=True):
        assert a["mse"] == pytest.approx(b["mse"], rel=1e-5)
    args = ["sample", str(cc_unet), "--steps", "3", "-n", "4", "--class-label", "random", *common]
    plain = json_rows(cli(*args))
    one = json_rows(cli(*args, "--guidance-scale", "1"))
    guided = json_rows(cli(*args, "--guidance-scale", "4"))
    assert [r["x0_std"] for r in one] == [r["x0_std"] for r in plain]
    assert [r["x0_std"] for r in guided] != [r["x0_std"] for r in plain]
    args = ("nll", str(cc_unet), "--data", str(data_file), "--class-label", "1", *common)
    nll = json_rows(cli(*args))
    assert nll[-1]["term"] == "total" and nll[-1]["bits_per_dim"] > 0


@pytest.mark.parametrize(
    ("args", "code", "line"),
    [
        (["--class-label", "9"], 2, "Error: --class-label 9 is out of range: the model has 4"),
        (["--class-label", "x"], 2, "Error: --class-label 'x': want K, A-B, all, random or null"),
        (["--guidance-scale", "2"], 1, "Error: --guidance-scale needs a null"),
    ],
)
def test_cli_conditioning_errors(
    cli: Callable[..., Result], cc_unet: Path, cc_unet_no_null: Path, args: list[str], code: int,
    line: str,
) -> None:  # fmt: skip
    folder = cc_unet_no_null if "--guidance-scale" in args else cc_unet
    extra = ["--class-label", "1"] if "--guidance-scale" in args else []
    result = cli("sample", str(folder), "--steps", "2", "-n", "2", "-q", *args, *extra)
    assert result.exit_code == code
    assert result.stderr.startswith(line) and result.stderr.count("\n") == 1


def test_cli_unconditional_model_refuses_labels(cli: Callable[..., Result], tmp_path: Path) -> None:
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8,), layers_per_block=1,
        down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",), norm_num_groups=4,
    )  # fmt: skip
    unet.save_pretrained(tmp_path / "unet", safe_serialization=True)
    diffusers.DDPMScheduler(num_train_timesteps=20).save_pretrained(tmp_path / "scheduler")
    result = cli("sample", str(tmp_path), "--steps", "2", "-n", "2", "-q", "--class-label", "1")
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: {tmp_path}: --class-label given, but the model is unconditional\n"
    )


# ---------------------------------------------------------------------------------------------
# a DiT pipeline: latent, class-conditional, learned sigma

DIT_CLASSES = 5


@pytest.fixture(scope="module")
def dit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return dit_folder(tmp_path_factory.mktemp("dit"))


def dit_folder(root: Path) -> Path:
    """transformer/ (DiT, 2C output channels), vae/ (a tiny AutoencoderKL stored in fp16: 3x8x8
    images, 4x4x4 latents), scheduler/ (learned_range). Also used by test_diffusers_imports."""
    torch.manual_seed(0)
    net = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1,
        sample_size=4, patch_size=2, num_embeds_ada_norm=DIT_CLASSES, norm_num_groups=4,
    )  # fmt: skip
    with torch.no_grad():  # diffusers zero-initialises the adaLN-zero and output layers
        for p in net.parameters():
            p.normal_(0.0, 0.3)
    net.save_pretrained(root / "transformer", safe_serialization=True)
    vae = _tiny_vae()
    vae.half().save_pretrained(root / "vae", safe_serialization=True)
    diffusers.DDPMScheduler(num_train_timesteps=20, variance_type="learned_range").save_pretrained(
        root / "scheduler"
    )
    return root


def test_dit_pipeline_loads_as_a_latent_conditional_model(dit: Path) -> None:
    model = load_checkpoint(dit, class_label="random", guidance_scale=2.0)
    assert model.data_shape == (4, 4, 4) and model.learned_variance
    assert model.info["num_classes"] == DIT_CLASSES and model.info["null_label"] == DIT_CLASSES
    assert model.info["vae"] == "AutoencoderKL 3x8x8 scaling_factor 0.18215"
    assert model.latent is not None and model.latent.latent_shape == (4, 4, 4)
    x = torch.randn(3, 4, 4, 4)
    prediction, v = model.predict(x, torch.tensor([1, 5, 9]), sample_index=torch.arange(3))
    assert prediction.shape == v.shape == (3, 4, 4, 4)  # type: ignore[union-attr]


def test_dit_guidance_guides_eps_and_keeps_the_conditional_variance(dit: Path) -> None:
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([3, 12])
    cond_eps, cond_v = load_checkpoint(dit, class_label="3").predict(x, t)
    null_eps, _ = load_checkpoint(dit, class_label="null").predict(x, t)
    eps, v = load_checkpoint(dit, class_label="3", guidance_scale=4.0).predict(x, t)
    # guidance runs both halves as one batch of 4, the references as batches of 2: float32 kernels
    # round differently by batch size (~1e-6 here), and the scale 4 amplifies that up to 7x
    torch.testing.assert_close(eps, null_eps + 4.0 * (cond_eps - null_eps), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(v, cond_v)
    assert float((eps - cond_eps).abs().max()) > 1e-3


def test_vae_encodes_once_per_image(dit: Path, data_file: Path) -> None:
    from ddpmcli.run import reconstruction_data, reconstruction_sweep

    model = load_checkpoint(dit, class_label="0")
    assert model.latent is not None
    calls: list[int] = []
    encode = model.latent.vae.encode

    def counting(x: Tensor) -> Any:
        calls.append(int(x.shape[0]))
        return encode(x)

    model.latent.vae.encode = counting
    picked = reconstruction_data(model, str(data_file), n=5, seed=0)
    assert calls == [5] and picked.x0.shape == (5, 4, 4, 4)
    assert picked.images is not None and picked.images.shape == (5, 3, 8, 8)
    result = reconstruction_sweep(model, picked.x0, [0, 10, 19], seed=0)
    assert calls == [5] and [r["t"] for r in result.rows] == [0, 10, 19]  # none per t
    # the posterior mean, shifted and scaled: what encode gives
    posterior = encode(picked.images[:2].float()).latent_dist.mean.double()
    torch.testing.assert_close(picked.x0[:2], posterior * 0.18215)


def test_cli_dit_info_reconstruct_sample_nll(
    cli: Callable[..., Result], dit: Path, data_file: Path, tmp_path: Path
) -> None:
    (row,) = json_rows(cli("info", str(dit), "--format", "json"))
    assert row["architecture"] == "DiTTransformer2DModel" and row["learned_variance"] is True
    assert row["data_shape"] == "4x4x4" and row["latent_shape"] == "4x4x4"
    assert row["vae"] == "AutoencoderKL 3x8x8 scaling_factor 0.18215"
    common = ["--class-label", "0-4", "--format", "json", "-q"]
    rec = json_rows(cli("reconstruct", str(dit), "--data", str(data_file), "--t", "0,19", *common))
    assert list(rec[0]) == [
        "t", "alpha_bar", "snr", "mse_latent", "psnr_latent", "eps_mse_latent",
        "clip_fraction_latent",
    ]  # fmt: skip
    assert rec[0]["psnr_latent"] is None and 0 < rec[0]["mse_latent"] < rec[1]["mse_latent"]
    save = tmp_path / "s.npz"
    args = ["sample", str(dit), "--steps", "3", "-n", "3", "--variance", "learned_range", *common]
    plain = json_rows(cli(*args, "--save", str(save)))
    import numpy as np

    with np.load(save) as saved:  # decoded images, in the VAE's range
        assert saved["samples"].shape == (3, 3, 8, 8)
        assert saved["data_range"].tolist() == [-1.0, 1.0]
    guided = json_rows(cli(*args, "--guidance-scale", "4"))
    assert [r["x0_std"] for r in guided] != [r["x0_std"] for r in plain]
    nll = json_rows(cli("nll", str(dit), "--data", str(data_file), *common))
    assert nll[0]["term"] == "decoder_continuous" and nll[-1]["term"] == "total"
    assert "bits_per_dim_latent" in nll[-1] and "x0_mse_latent" in nll[0]


def test_cli_decode_is_the_image_error_of_the_decoded_x0_hat(
    cli: Callable[..., Result], dit: Path, data_file: Path, cc_unet: Path
) -> None:
    from ddpmcli.run.noise import sample_noise

    args = ["reconstruct", str(dit), "--data", str(data_file), "--t", "0,10", "--class-label",
            "2", "--format", "json", "-q", "--decode"]  # fmt: skip
    rows = json_rows(cli(*args))
    assert [list(r)[-2:] for r in rows] == [["mse_image", "psnr_image"]] * 2
    again = json_rows(cli(*args, "--batch-size", "3"))
    assert again[1]["mse_image"] == pytest.approx(rows[1]["mse_image"], rel=1e-5)
    # by hand: the sweep's noise for (seed 0, sample i), x0_hat at t = 10, decoded
    import numpy as np

    model = load_checkpoint(dit, class_label="2")
    assert model.latent is not None
    images = torch.from_numpy(np.load(data_file)).double()
    latents = model.latent.encode(images)
    eps = sample_noise(0, 0, latents.shape[0], latents.shape[1:])
    t = torch.full((latents.shape[0],), 10)
    x_t = model.schedule.q_sample(latents, t, eps)
    with torch.inference_mode():
        out, _ = model.predict(x_t.float(), t, sample_index=torch.arange(latents.shape[0]))
    x0_hat = model.schedule.predict_x0(out.double(), x_t, t, model.prediction_type)
    want = float((model.latent.decode(x0_hat).double() - images).square().mean())
    assert rows[1]["mse_image"] == pytest.approx(want, rel=1e-4)
    bad = cli("reconstruct", str(cc_unet), "--data", str(data_file), "--decode", "-q")
    assert bad.exit_code == 2
    assert bad.stderr == "Error: --decode needs a latent model (a pipeline with a vae/)\n"


# ---------------------------------------------------------------------------------------------
# a Stable Diffusion-style pipeline: latent, text-conditional


@pytest.fixture(scope="module")
def sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("transformers")
    return sd_folder(tmp_path_factory.mktemp("sd"))


def _tiny_vae() -> Any:
    """The pipelines' AutoencoderKL: 3x8x8 images <-> 4x4x4 latents."""
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
        norm_num_groups=4, sample_size=8, layers_per_block=1,
    )  # fmt: skip


def sd_folder(root: Path) -> Path:
    """unet/ (UNet2DConditionModel), text_encoder/ (a tiny CLIPTextModel), tokenizer/ (a
    letters-only vocab.json and merges.txt written here), vae/, scheduler/. Also used by
    test_diffusers_imports."""
    import transformers

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {c: i for i, c in enumerate(letters)}
    vocab.update({f"{c}</w>": 26 + i for i, c in enumerate(letters)})
    vocab.update({"<|startoftext|>": 52, "<|endoftext|>": 53})
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "vocab.json").write_text(json.dumps(vocab))
    (root / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
    (root / "tokenizer" / "tokenizer_config.json").write_text('{"model_max_length": 8}')
    torch.manual_seed(0)
    text = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            vocab_size=54, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=8, bos_token_id=52, eos_token_id=53,
            pad_token_id=53,
        )
    )  # fmt: skip
    text.save_pretrained(root / "text_encoder", safe_serialization=True)
    unet = diffusers.UNet2DConditionModel(
        sample_size=4, in_channels=4, out_channels=4, block_out_channels=(8, 16),
        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
        attention_head_dim=2, norm_num_groups=4,
    )  # fmt: skip
    unet.save_pretrained(root / "unet", safe_serialization=True)
    vae = _tiny_vae()
    vae.save_pretrained(root / "vae", safe_serialization=True)
    diffusers.DDPMScheduler(num_train_timesteps=20).save_pretrained(root / "scheduler")
    return root


def test_sd_prompt_encoded_once_and_guided_in_one_call(sd: Path) -> None:
    model = load_checkpoint(sd, prompt="a cat", guidance_scale=3.0)
    assert model.data_shape == (4, 4, 4) and model.info["prompt"] == "a cat"
    text = model.conditioning
    assert text is not None and not isinstance(text, Conditioning)
    encoded: list[str] = []
    encode = text.encode

    def counting(prompt: str) -> Tensor:
        encoded.append(prompt)
        return encode(prompt)

    text.encode = counting
    text._cache.clear()  # the load check encoded both already
    counter = _Counting(model.denoiser)
    model.denoiser = counter
    x = torch.randn(2, 4, 4, 4)
    t = torch.tensor([3, 12])
    got = [model.predict(x, t)[0] for _ in range(3)][-1]
    assert sorted(encoded) == ["", "a cat"] and counter.calls == [4, 4, 4]
    cond = load_checkpoint(sd, prompt="a cat").predict(x, t)[0]
    empty = load_checkpoint(sd).predict(x, t)[0]
    torch.testing.assert_close(got, empty + 3.0 * (cond - empty), rtol=1e-5, atol=1e-5)
    assert float((cond - empty).abs().max()) > 1e-4  # the prompt reaches the unet


def test_cli_sd_info_reconstruct_sample_nll(
    cli: Callable[..., Result], sd: Path, data_file: Path
) -> None:
    (row,) = json_rows(cli("info", str(sd), "--format", "json", "--prompt", "a dog"))
    assert row["architecture"] == "UNet2DConditionModel" and row["prompt"] == "a dog"
    assert row["latent_shape"] == "4x4x4"
    common = ["--prompt", "a dog", "--format", "json", "-q"]
    rec = json_rows(cli("reconstruct", str(sd), "--data", str(data_file), "--t", "0,19", *common))
    assert rec[0]["mse_latent"] < rec[1]["mse_latent"]
    args = ["sample", str(sd), "--steps", "2", "-n", "2", *common]
    plain, guided = json_rows(cli(*args)), json_rows(cli(*args, "--guidance-scale", "5"))
    assert [r["x0_std"] for r in guided] != [r["x0_std"] for r in plain]
    nll = json_rows(cli("nll", str(sd), "--data", str(data_file), *common))
    assert nll[-1]["term"] == "total"
    bad = cli("sample", str(sd), "--steps", "2", "-n", "2", "-q", "--class-label", "1")
    assert bad.exit_code == 1
    assert bad.stderr == (
        f"Error: {sd}: --class-label given, but the model is text-conditional (give --prompt)\n"
    )


def test_unsupported_added_embedding_is_one_line(
    cli: Callable[..., Result], tmp_path: Path
) -> None:
    """SDXL-style folders load (tests/test_sdxl.py); another added embedding is one line."""
    (tmp_path / "unet").mkdir()
    config = {"_class_name": "UNet2DConditionModel", "addition_embed_type": "image"}
    (tmp_path / "unet" / "config.json").write_text(json.dumps(config))
    result = cli("info", str(tmp_path))
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: {tmp_path / 'unet' / 'config.json'}: addition_embed_type 'image' is not "
        "supported (SDXL-style 'text_time' is)\n"
    )


def test_each_rank_passes_its_global_sample_indices() -> None:
    """Under torchrun, rank r steps samples ``share(n)``: the model sees their global indices
    (so a rank's labels are the single-process ones), in every loop."""
    from ddpmcli.core import make_schedule
    from ddpmcli.run import reconstruction_sweep, variational_bound
    from ddpmcli.run.distributed import Ranks

    class SecondOfTwo(Ranks):  # rank 1 of 2, its collectives local (what it computes is checked)
        def sum(self, tensor: Tensor) -> Tensor:
            return tensor

        def gather(self, value: Any) -> list[Any]:
            return [value]

        def settle(self, failure: BaseException | None) -> None:
            if failure is not None:
                raise failure

    seen: list[int] = []

    class Model:
        schedule = make_schedule("linear", 10)
        prediction_type = "epsilon"
        data_range = (-1.0, 1.0)
        data_shape = (2,)

        def predict(
            self, x: Tensor, t: Tensor, *, sample_index: Tensor | None = None
        ) -> tuple[Tensor, None]:
            assert sample_index is not None
            seen.extend(sample_index.tolist())
            return torch.zeros_like(x), None

        def to(self, device: Any = None, dtype: Any = None) -> Any:
            return self

    ranks, model = SecondOfTwo(rank=1, world=2), Model()
    lo, hi = ranks.share(5)
    sample(model.predict, respaced_schedule(model.schedule, 2), "epsilon", (2,), n=5,
           batch_size=2, ranks=ranks)  # fmt: skip
    assert seen == [*range(lo, hi)] * 2 and lo > 0
    seen.clear()
    reconstruction_sweep(model, torch.zeros(5, 2), [0, 9], batch_size=1, ranks=ranks)
    assert sorted(seen) == sorted([*range(lo, hi)] * 2)
    seen.clear()
    variational_bound(model.predict, model.schedule, "epsilon", torch.zeros(5, 2),
                      batch_size=3, ranks=ranks)  # fmt: skip
    assert sorted(set(seen)) == [*range(lo, hi)] and len(seen) == (hi - lo) * 10


def test_fp16_weights_load_in_their_dtype(tmp_path: Path) -> None:
    folder = _unet_folder(tmp_path)
    unet = diffusers.UNet2DModel.from_pretrained(folder / "unet")
    unet.half().save_pretrained(folder / "unet", safe_serialization=True)  # fp16 safetensors
    stored = load_checkpoint(folder, class_label="1")
    assert stored.dtype == torch.float16 and stored.info["weights_dtype"] == "float16"
    x = torch.randn(2, 3, 8, 8)
    t = torch.tensor([2, 9])
    half, _ = stored.predict(x.half(), t)
    assert half.dtype == torch.float16
    full = load_checkpoint(folder, class_label="1", dtype=torch.float32)
    assert full.dtype == torch.float32
    out, _ = full.predict(x, t)
    # the same fp16 weights, upcast exactly: float32 math differs only by fp16 rounding
    torch.testing.assert_close(half.float(), out, rtol=2e-2, atol=2e-2)
