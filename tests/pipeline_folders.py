"""Tiny random-weight pipeline folders of the text-conditional families (SDXL, SD3, Flux) and
their tokenizers, built with diffusers' and transformers' own classes and saved with their own
``save_pretrained``, as diffusers' tests build theirs (``get_dummy_components``): one helper per
family. Shared by test_sdxl, test_sd3_flux, test_tokenizers and test_diffusers_imports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

LETTERS = "abcdefghijklmnopqrstuvwxyz"
CLIP_LENGTH = 8
"""Tokens the tiny CLIP encoders read (their positions and the tokenizers' model_max_length)."""
T5_LENGTH = 16
"""Tokens the tiny T5 encoder reads (the pipelines' max_sequence_length in the tests)."""


def clip_vocab() -> dict[str, int]:
    """A letters-only byte-level BPE vocabulary (no merges): 54 tokens."""
    vocab = {c: i for i, c in enumerate(LETTERS)}
    vocab.update({f"{c}</w>": 26 + i for i, c in enumerate(LETTERS)})
    vocab.update({"<|startoftext|>": 52, "<|endoftext|>": 53})
    return vocab


def write_clip_tokenizer(folder: Path, layout: str = "tokenizer.json") -> Path:
    """A CLIP tokenizer in ``folder``: as ``transformers`` saves it today (``tokenizer.json``
    and ``tokenizer_config.json``) or in the older ``vocab.json`` + ``merges.txt`` layout."""
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    vocab.write_text(json.dumps(clip_vocab()))
    merges.write_text("#version: 0.2\n")
    config = {"model_max_length": CLIP_LENGTH}
    if layout == "tokenizer.json":
        tok = transformers.CLIPTokenizer(str(vocab), str(merges), model_max_length=CLIP_LENGTH)
        vocab.unlink()
        merges.unlink()
        tok.save_pretrained(folder)
    else:
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


T5_PIECES = ["<pad>", "</s>", "<unk>", "\u2581", *LETTERS, *(f"\u2581{c}" for c in LETTERS)]


def write_t5_tokenizer(folder: Path, layout: str = "tokenizer.json") -> Path:
    """A T5 (Unigram) tokenizer in ``folder``: ``tokenizer.json`` as ``transformers`` saves it,
    or a SentencePiece ``spiece.model`` (needs sentencepiece)."""
    folder.mkdir(parents=True, exist_ok=True)
    if layout == "tokenizer.json":
        import transformers

        vocab = [(p, 0.0 if i < 3 else -float(len(p))) for i, p in enumerate(T5_PIECES)]
        transformers.T5Tokenizer(vocab=vocab, extra_ids=0).save_pretrained(folder)
        return folder
    import sentencepiece as spm

    text = ["a cat sat on a mat", "the dog ran to a red ball", "cats and dogs"] * 20
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text), model_prefix=str(folder / "spiece"), vocab_size=24,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2,
    )  # fmt: skip
    (folder / "spiece.vocab").unlink()
    return folder


def clip_config(projection: int = 8, hidden: int = 16) -> Any:
    import transformers

    return transformers.CLIPTextConfig(
        vocab_size=54, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=CLIP_LENGTH, bos_token_id=52,
        eos_token_id=53, pad_token_id=53, projection_dim=projection,
    )  # fmt: skip


def t5_encoder(vocab: int, width: int = 16) -> Any:
    import transformers

    config = transformers.T5Config(
        vocab_size=vocab, d_model=width, d_kv=4, d_ff=2 * width, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    return transformers.T5EncoderModel(config)


def tiny_vae(latent_channels: int = 4, **extra: Any) -> Any:
    """An AutoencoderKL: 3x8x8 images <-> Cx4x4 latents (scale factor 2)."""
    import diffusers

    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
        latent_channels=latent_channels, norm_num_groups=4, sample_size=8, layers_per_block=1,
        **extra,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# SDXL


def sdxl_folder(root: Path, *, refiner: bool = False, layout: str = "tokenizer.json") -> Path:
    """An SDXL-style pipeline (a refiner's: only text_encoder_2/tokenizer_2, 5 time ids): unet/
    (UNet2DConditionModel, addition_embed_type text_time, 4x4x4 latents), text_encoder/
    (CLIPTextModel, 16 wide), text_encoder_2/ (CLIPTextModelWithProjection, 16 wide,
    projection 8), tokenizers, vae/, scheduler/ (EulerDiscreteScheduler as SDXL's), and the
    pipeline's model_index.json saved by StableDiffusionXLPipeline itself."""
    import diffusers
    import transformers

    torch.manual_seed(0)
    per_id, projection = 4, 8
    ids = 5 if refiner else 6
    unet = diffusers.UNet2DConditionModel(
        sample_size=4, in_channels=4, out_channels=4, block_out_channels=(8, 16),
        layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
        use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=per_id,
        projection_class_embeddings_input_dim=ids * per_id + projection,
        cross_attention_dim=16 if refiner else 32, norm_num_groups=4,
    )  # fmt: skip
    text = None if refiner else transformers.CLIPTextModel(clip_config())
    text_2 = transformers.CLIPTextModelWithProjection(clip_config(projection))
    tok = None if refiner else transformers.CLIPTokenizer.from_pretrained(
        write_clip_tokenizer(root / "_tok", layout)
    )  # fmt: skip
    tok_2 = transformers.CLIPTokenizer.from_pretrained(write_clip_tokenizer(root / "_tok", layout))
    scheduler = diffusers.EulerDiscreteScheduler(
        num_train_timesteps=20, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
        steps_offset=1, timestep_spacing="leading",
    )  # fmt: skip
    cls = (
        diffusers.StableDiffusionXLImg2ImgPipeline
        if refiner
        else diffusers.StableDiffusionXLPipeline
    )
    extra = {"requires_aesthetics_score": True} if refiner else {}
    pipe = cls(
        vae=tiny_vae(), text_encoder=text, text_encoder_2=text_2, tokenizer=tok, tokenizer_2=tok_2,
        unet=unet, scheduler=scheduler, **extra,
    )  # fmt: skip
    pipe.save_pretrained(root, safe_serialization=True)
    _replace_tokenizers(root, ("tokenizer", "tokenizer_2"), layout)
    return root


def _replace_tokenizers(root: Path, names: tuple[str, ...], layout: str) -> None:
    """The saved tokenizer folders rewritten in ``layout`` (the pipeline saves tokenizer.json)."""
    import shutil

    for name in names:
        if (root / name).is_dir():
            shutil.rmtree(root / name)
            write_clip_tokenizer(root / name, layout)
    shutil.rmtree(root / "_tok", ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# SD3 and Flux


def _t5_pair(root: Path, enc: str, tok: str) -> tuple[Any, Any]:
    """A tiny T5 encoder (32 wide) and its tokenizer, as a pipeline holds them."""
    import transformers

    torch.manual_seed(1)
    tokenizer = transformers.T5Tokenizer.from_pretrained(write_t5_tokenizer(root / f"_{tok}"))
    return t5_encoder(len(T5_PIECES), width=32), tokenizer


def sd3_folder(root: Path, *, t5: bool = True) -> Path:
    """An SD3-style pipeline saved by StableDiffusion3Pipeline: transformer/
    (SD3Transformer2DModel, 4x4x4 latents, patch 2, 16 wide), text_encoder/ and text_encoder_2/
    (CLIPTextModelWithProjection, 16 wide, projection 8), text_encoder_3/ (T5, 32 wide; left out
    with ``t5=False``, as diffusers allows), tokenizers, vae/ (scaling 1.5035, shift 0.0609),
    scheduler/ (FlowMatchEulerDiscreteScheduler, shift 3)."""
    import diffusers
    import transformers

    torch.manual_seed(0)
    net = diffusers.SD3Transformer2DModel(
        sample_size=4, patch_size=2, in_channels=4, out_channels=4, num_layers=1,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
        caption_projection_dim=16, pooled_projection_dim=16, pos_embed_max_size=8,
    )  # fmt: skip
    clip_tok = transformers.CLIPTokenizer.from_pretrained(write_clip_tokenizer(root / "_clip"))
    encoders = [transformers.CLIPTextModelWithProjection(clip_config(8)) for _ in range(2)]
    t5_model, t5_tok = _t5_pair(root, "text_encoder_3", "tokenizer_3") if t5 else (None, None)
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=net, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(4, scaling_factor=1.5035, shift_factor=0.0609),
        text_encoder=encoders[0], tokenizer=clip_tok, text_encoder_2=encoders[1],
        tokenizer_2=clip_tok, text_encoder_3=t5_model, tokenizer_3=t5_tok,
    )  # fmt: skip
    pipe.save_pretrained(root, safe_serialization=True)
    _clean(root)
    return root


def flux_folder(root: Path, *, guidance: bool = True) -> Path:
    """A Flux pipeline saved by FluxPipeline (Flux-dev with ``guidance``, else schnell-style):
    transformer/ (FluxTransformer2DModel, 16 input channels = 4 latent channels packed 2x2, 16
    wide), text_encoder/ (CLIPTextModel, 16 wide), text_encoder_2/ (T5, 32 wide), tokenizers,
    vae/ (scaling 0.3611, shift 0.1159 as Flux's), scheduler/ (FlowMatchEulerDiscreteScheduler
    with dynamic shifting, as Flux-dev's)."""
    import diffusers
    import transformers

    torch.manual_seed(0)
    net = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
        guidance_embeds=guidance, axes_dims_rope=(2, 2, 4),
    )  # fmt: skip
    clip_tok = transformers.CLIPTokenizer.from_pretrained(write_clip_tokenizer(root / "_clip"))
    t5_model, t5_tok = _t5_pair(root, "text_encoder_2", "tokenizer_2")
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=4096,
        base_shift=0.5, max_shift=1.15,
    )  # fmt: skip
    pipe = diffusers.FluxPipeline(
        transformer=net, scheduler=scheduler,
        vae=tiny_vae(4, scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=transformers.CLIPTextModel(clip_config()), tokenizer=clip_tok,
        text_encoder_2=t5_model, tokenizer_2=t5_tok,
    )  # fmt: skip
    pipe.save_pretrained(root, safe_serialization=True)
    _clean(root)
    return root


def _clean(root: Path) -> None:
    import shutil

    for scratch in root.glob("_*"):
        shutil.rmtree(scratch)
