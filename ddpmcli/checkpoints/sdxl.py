"""SDXL-style pipelines: two CLIP text encoders, a pooled embedding and added time ids.

A base folder has ``text_encoder/`` (CLIP ViT-L, ``CLIPTextModel``) and ``text_encoder_2/``
(OpenCLIP bigG, ``CLIPTextModelWithProjection``) with ``tokenizer/`` and ``tokenizer_2/``; a
refiner-style folder has only the second pair. As diffusers' ``StableDiffusionXLPipeline``
encodes a prompt: each encoder's penultimate hidden states, concatenated along the features, and
the second encoder's projected (pooled) embedding; the unet's ``added_cond_kwargs`` take that
embedding and the time ids, ``(original h, w, crop top, left, target h, w)`` in pixels (a
refiner's: ``(original h, w, crop top, left, aesthetic score)``). Their default is the image size
of the data shape (latent size times the VAE's scale), no crop, as the pipeline's defaults; the
null condition of guidance is zeros where the pipeline's ``force_zeros_for_empty_prompt`` says
so (its default), and a refiner's null time ids carry the negative aesthetic score.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ddpmcli import limits
from ddpmcli.checkpoints import text_encoders
from ddpmcli.checkpoints.conditioning import Prompt, TextConditioning
from ddpmcli.checkpoints.first_call import CheckedOnFirstCall
from ddpmcli.errors import CheckpointError, ParameterError, verbatim

AESTHETIC_SCORE = 6.0
NEGATIVE_AESTHETIC_SCORE = 2.5
"""A refiner's aesthetic scores for the prompt and the null condition (the pipeline's defaults)."""


def is_sdxl(config: Mapping[str, Any]) -> bool:
    """Whether a ``UNet2DConditionModel`` config is SDXL-style (added text and time embedding)."""
    return config.get("addition_embed_type") == "text_time"


class SDXLDenoiser(CheckedOnFirstCall):
    """``unet(x_t, t, encoder_hidden_states, added_cond_kwargs).sample`` for a condition dict
    ``{"states", "pooled", "time_ids"}`` with ``B`` rows."""

    def forward(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        added = {"text_embeds": cond["pooled"], "time_ids": cond["time_ids"]}
        out: Tensor = self.net(
            x, t, encoder_hidden_states=cond["states"], added_cond_kwargs=added, return_dict=False
        )[0]
        return out


def time_ids_value(time_ids: object, refiner: bool) -> tuple[float, ...]:
    """Caller's time ids checked: 6 numbers ``(orig h, w, crop top, left, target h, w)``, or a
    refiner's 5 ``(orig h, w, crop top, left, aesthetic score)``; a string of them comma-separated.

    Raises:
        ParameterError: naming ``time_ids``.
    """
    want = 5 if refiner else 6
    what = (
        "original height, width, crop top, left, aesthetic score"
        if refiner
        else "original height, width, crop top, left, target height, width"
    )
    items: Sequence[Any]
    if isinstance(time_ids, str):
        items = [s.strip() for s in time_ids.split(",")]
    elif isinstance(time_ids, (list, tuple)):
        items = time_ids
    else:
        raise ParameterError(
            f"{{time_ids}} must be {want} numbers ({what}), got {verbatim(repr(time_ids))}"
        )
    try:
        values = tuple(float(v) for v in items if not isinstance(v, bool))
    except (TypeError, ValueError):
        values = ()
    if len(values) != want or len(items) != want or not all(abs(v) < 1e6 for v in values):
        raise ParameterError(
            f"{{time_ids}} must be {want} numbers ({what}), got {verbatim(repr(time_ids))}"
        )
    return values


def load_sdxl_text(
    p: Path, unet_config: Mapping[str, Any], where: str, image_hw: tuple[int, int]
) -> TextConditioning:
    """The conditioning of an SDXL-style folder ``p`` whose data shape decodes to images
    ``image_hw`` (pixels); its ``set_time_ids(ids)`` replaces the default time ids."""
    first = (p / "text_encoder" / "config.json").is_file()
    pairs = [("text_encoder", "tokenizer")] if first else []
    pairs.append(("text_encoder_2", "tokenizer_2"))
    for enc, tok in pairs:
        if not (p / enc / "config.json").is_file() or not (p / tok).is_dir():
            raise CheckpointError(f"{p}: an SDXL-style pipeline needs {enc}/ and {tok}/ folders")
    encoders = []
    for enc, tok in pairs:
        module, positions = text_encoders.clip_text_encoder(
            p / enc, where, projection=enc == "text_encoder_2"
        )
        tokenizer = text_encoders.load_tokenizer(p / tok, "clip")
        encoders.append((tokenizer, module, text_encoders.clip_length(tokenizer, positions)))
    projection = int(getattr(encoders[-1][1], "config").projection_dim)  # noqa: B009
    refiner = _is_refiner(unet_config, projection, p / "unet" / "config.json")
    h, w = image_hw
    ids: list[tuple[float, ...]] = [
        (h, w, 0, 0, AESTHETIC_SCORE) if refiner else (h, w, 0, 0, h, w)
    ]
    zeros = _force_zeros(p)

    def time_ids(null: bool) -> Tensor:
        values = list(ids[0])
        if refiner and null:
            values[-1] = NEGATIVE_AESTHETIC_SCORE
        return torch.tensor([values], dtype=torch.float32)

    def encode(prompt: str) -> Prompt:
        states, pooled = _encode(encoders, prompt)
        return {"states": states, "pooled": pooled, "time_ids": time_ids(False)}

    def encode_null() -> Prompt:
        if not zeros:
            states, pooled = _encode(encoders, "")
            return {"states": states, "pooled": pooled, "time_ids": time_ids(True)}
        states, pooled = _encode(encoders, "")
        return {
            "states": torch.zeros_like(states),
            "pooled": torch.zeros_like(pooled),
            "time_ids": time_ids(True),
        }

    tokenizer, _, length = encoders[-1]
    text = TextConditioning(
        encode, count_tokens=functools.partial(text_encoders.token_count, tokenizer),
        max_tokens=length, encode_null=encode_null,
    )  # fmt: skip

    def set_time_ids(given: object) -> None:
        ids[0] = time_ids_value(given, refiner)
        text._cache.clear()
        text.shown["time_ids"] = ",".join(f"{v:g}" for v in ids[0])

    text.set_time_ids = set_time_ids
    text.shown["time_ids"] = ",".join(f"{v:g}" for v in ids[0])
    return text


def _encode(encoders: list[tuple[Any, Any, int]], prompt: str) -> tuple[Tensor, Tensor]:
    """``(states [1, L, sum of widths], pooled [1, projection])`` of ``prompt``."""
    states = []
    pooled: Tensor | None = None
    for tokenizer, module, length in encoders:
        out = module(text_encoders.token_ids(tokenizer, prompt, length), output_hidden_states=True)
        if out[0].ndim == 2:  # the projected (pooled) embedding of CLIPTextModelWithProjection
            pooled = out[0]
        states.append(out.hidden_states[-2])
    if pooled is None:  # unreachable: the last encoder has a projection
        raise CheckpointError("an SDXL-style pipeline's second text encoder has no projection")
    return torch.cat(states, dim=-1), pooled


def _is_refiner(config: Mapping[str, Any], projection: int, where: Path) -> bool:
    """Whether the unet takes a refiner's 5 time ids (or the base's 6), from its added embedding
    width: ``addition_time_embed_dim x ids + projection``."""
    per_id = config.get("addition_time_embed_dim")
    width = config.get("projection_class_embeddings_input_dim")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (per_id, width)):
        raise CheckpointError(
            f"{where}: an SDXL-style unet needs addition_time_embed_dim and "
            "projection_class_embeddings_input_dim"
        )
    for count, refiner in ((6, False), (5, True)):
        if per_id * count + projection == width:  # type: ignore[operator]
            return refiner
    raise CheckpointError(
        f"{where}: projection_class_embeddings_input_dim {width} is neither 6 nor 5 time ids of "
        f"{per_id} plus the text encoder's projection {projection}"
    )


def _force_zeros(p: Path) -> bool:
    """The pipeline's ``force_zeros_for_empty_prompt`` (model_index.json; default True)."""
    index = p / "model_index.json"
    if not index.is_file():
        return True
    raw = limits.read_json(index, "pipeline index", error=CheckpointError)
    value = raw.get("force_zeros_for_empty_prompt", True) if isinstance(raw, dict) else True
    return value is not False
