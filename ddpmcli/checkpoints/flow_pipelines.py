"""Flow-matching pipelines: Stable Diffusion 3/3.5 (``SD3Transformer2DModel``) and Flux
(``FluxTransformer2DModel``), with their VAE, text encoders and ``FlowMatchEulerDiscreteScheduler``.

What the network is called with follows diffusers' ``StableDiffusion3Pipeline`` and
``FluxPipeline`` step for step:

- **SD3**: CLIP-L and CLIP-G (``CLIPTextModelWithProjection``) give their penultimate hidden
  states, concatenated along the features and zero-padded to T5's width, then T5's last states
  along the sequence (zeros of ``max_sequence_length`` tokens when the folder has no T5, as
  diffusers allows); the pooled embedding is both encoders' projections side by side. The
  transformer takes ``timestep = 1000 s`` (the path's model timestep) as is.
- **Flux**: CLIP's pooled output and T5's last states; latents ``[C, H, W]`` are packed into
  2x2 patches (``[(H/2)(W/2), 4C]``) with image ids ``(0, row, column)`` and text ids zeros; the
  transformer takes ``timestep / 1000``. Flux-dev (``guidance_embeds``) takes the guidance scale
  as an input (embedded guidance, one call, default 3.5 as the pipeline's); Flux-schnell has
  none, and ``guidance_scale`` is then classifier-free guidance against the empty prompt (the
  pipeline's ``true_cfg_scale``).

The model's prediction is the flow velocity ``v = eps - x0`` (prediction type ``flow``). The
schedule is the path the scheduler config gives: ``shift``, or with ``use_dynamic_shifting``
``mu`` from the image sequence length of the data shape (Flux's ``calculate_shift``), so the
resolution decides the grid as it does in the pipeline. The VAE's ``shift_factor`` and
``scaling_factor`` map images to latents (:mod:`.latent`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ddpmcli import limits
from ddpmcli.checkpoints import text_encoders
from ddpmcli.checkpoints.conditioning import Prompt, TextConditioning
from ddpmcli.checkpoints.first_call import CheckedOnFirstCall
from ddpmcli.checkpoints.meta import _Meta
from ddpmcli.errors import CheckpointError, DdpmError, ParameterError

FLOW_CLASSES = ("SD3Transformer2DModel", "FluxTransformer2DModel")
SD3_T5_TOKENS = 256
FLUX_T5_TOKENS = 512
"""T5 tokens the pipelines read by default (their ``max_sequence_length``: 256 in
``StableDiffusion3Pipeline``, 512 in ``FluxPipeline``, dev and schnell alike: diffusers 0.42.1's
pipeline has one default)."""
MAX_T5_SEQUENCE = 512
"""The longest ``max_sequence_length`` diffusers' SD3 and Flux pipelines accept."""
FLUX_GUIDANCE = 3.5
"""FluxPipeline's default ``guidance_scale`` (embedded guidance of Flux-dev)."""
MAX_WIDTH = 1 << 14


class SD3Denoiser(CheckedOnFirstCall):
    """``transformer(x_t, timestep=t, encoder_hidden_states, pooled_projections)``."""

    def forward(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        out: Tensor = self.net(
            hidden_states=x, timestep=t.to(x.dtype), encoder_hidden_states=cond["states"],
            pooled_projections=cond["pooled"], return_dict=False,
        )[0]  # fmt: skip
        return out


class FluxDenoiser(CheckedOnFirstCall):
    """Flux's transformer on 2x2-packed latents with image and text ids; ``t / 1000``."""

    def forward(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        b, c, h, w = x.shape
        packed = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
        packed = packed.reshape(b, (h // 2) * (w // 2), c * 4)
        states = cond["states"]
        out: Tensor = self.net(
            hidden_states=packed, timestep=t.to(x.dtype) / 1000, guidance=cond.get("guidance"),
            pooled_projections=cond["pooled"], encoder_hidden_states=states,
            txt_ids=torch.zeros(states.shape[1], 3, device=x.device, dtype=x.dtype),
            img_ids=image_ids(h // 2, w // 2).to(x.device, x.dtype), return_dict=False,
        )[0]  # fmt: skip
        out = out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(b, c, h, w)


def image_ids(rows: int, columns: int) -> Tensor:
    """Flux's image ids ``[rows x columns, 3]``: ``(0, row, column)`` of each packed patch."""
    ids = torch.zeros(rows, columns, 3)
    ids[..., 1] = torch.arange(rows, dtype=ids.dtype)[:, None]
    ids[..., 2] = torch.arange(columns, dtype=ids.dtype)[None, :]
    return ids.reshape(rows * columns, 3)


def check_transformer_sizes(class_name: str, config: Mapping[str, Any], where: Path) -> None:
    """The config fields of an SD3 or Flux transformer that decide an allocation, checked
    before it is built (its parameter count, :func:`transformer_parameters`)."""
    limits.check_allocation(
        transformer_parameters(class_name, config, where) * 4,
        f"{where}: the {class_name} it describes", error=CheckpointError,
    )  # fmt: skip


def transformer_parameters(class_name: str, config: Mapping[str, Any], where: Path) -> int:
    """A bound on the parameter count of an SD3 or Flux transformer config, its fields checked:
    per block about 36 d^2 (two streams of attention 4 d^2, feed-forward 8 d^2, adaLN 6 d^2),
    a Flux single block about 15 d^2, and the text and pooled projections."""
    sd3 = class_name == "SD3Transformer2DModel"
    count = functools.partial(text_encoders.config_count, config, where)
    heads = count("num_attention_heads", 18 if sd3 else 24, 1024)
    width = heads * count("attention_head_dim", 64 if sd3 else 128, 4096)
    if width > MAX_WIDTH:
        raise CheckpointError(f"{where}: heads x head dim {width} is more than {MAX_WIDTH}")
    layers = count("num_layers", 18 if sd3 else 19, 256)
    joint = count("joint_attention_dim", 4096, MAX_WIDTH)
    pooled = count("pooled_projection_dim", 2048 if sd3 else 768, MAX_WIDTH)
    channels = count("in_channels", 16 if sd3 else 64, MAX_WIDTH)
    total = 36 * width * width * layers + (joint + pooled + 2 * channels) * width
    if sd3:
        patch = count("patch_size", 2, 64)
        count("sample_size", 128, 1 << 14)
        positions = count("pos_embed_max_size", 96, 1 << 12)
        caption = count("caption_projection_dim", 1152, MAX_WIDTH)
        total += positions * positions * width + joint * caption + patch * patch * channels * width
    else:
        total += 15 * width * width * count("num_single_layers", 38, 256)
        _check_rope_axes(config, where, width // heads)
        guidance = config.get("guidance_embeds", False)
        if not isinstance(guidance, bool):  # "yes" and "false" alike would build the embedder
            raise CheckpointError(
                f"{where}: guidance_embeds must be true or false, got {guidance!r}"
            )
    return total


def _check_rope_axes(config: Mapping[str, Any], where: Path, head_dim: int) -> None:
    """Flux's rotary embedding splits each head over its three position axes: the axes' sizes
    must be even and add up to the head dimension (a wrong split failed inside the first call,
    reported as a wrong data shape)."""
    axes = config.get("axes_dims_rope", [16, 56, 56])
    ints = isinstance(axes, list) and all(
        isinstance(a, int) and not isinstance(a, bool) and a > 0 and a % 2 == 0 for a in axes
    )
    if not ints or len(axes) != 3 or sum(axes) != head_dim:
        raise CheckpointError(
            f"{where}: axes_dims_rope must be three positive even sizes adding up to "
            f"attention_head_dim {head_dim}, got {axes!r}"
        )


def flow_data_shape(
    class_name: str, config: Mapping[str, Any], latent: Any, given: _Meta, where: Path
) -> tuple[int, int, int]:
    """The latent shape ``[C, H, W]`` the transformer runs on: the caller's data shape, else the
    shape of its data (``shape_from_data``), as latents or as images of the VAE's channels
    (divided by its scale factor), else the pipeline's default size (SD3: the transformer's
    ``sample_size``; Flux: the VAE's ``sample_size`` over its scale factor)."""
    channels = int(config.get("in_channels", 16 if class_name == "SD3Transformer2DModel" else 64))
    if class_name == "FluxTransformer2DModel":
        channels //= 4  # packed 2x2
    scale = 2 ** (len(latent.vae.config.block_out_channels) - 1)
    if class_name == "SD3Transformer2DModel":
        size = int(config.get("sample_size", 128))
        h = w = size
    else:
        h, w = (d // scale for d in latent.image_shape[-2:])
    data = given.data_shape or given.shape_from_data
    if data is not None and len(data) == 3:
        if data[0] == latent.image_shape[0] and data[1] % scale == 0 and data[2] % scale == 0:
            h, w = data[1] // scale, data[2] // scale
        elif data[0] == channels:
            h, w = data[1], data[2]
    if class_name == "FluxTransformer2DModel" and (h % 2 or w % 2):
        raise CheckpointError(
            f"{where}: Flux packs latents in 2x2 patches; the latent size {h}x{w} is not even"
        )
    return channels, h, w


def flow_scheduler_meta(path: Path, seq_len: int) -> _Meta:
    """The flow schedule of a rectified-flow scheduler config (``FlowMatchEulerDiscreteScheduler``,
    read by :mod:`ddpmcli.configs`): its static ``shift``, or with ``use_dynamic_shifting`` the
    ``mu`` its family's pipeline computes from ``seq_len``, the image sequence length (packed or
    patched latent tokens) of the data shape."""
    from ddpmcli import configs, scheduler_classes

    try:
        config = configs.load_scheduler_config(path)
        flow = config.flow
        if flow is None:
            raise CheckpointError(
                f"{path}: a flow-matching transformer needs a flow scheduler config "
                f"(FlowMatchEulerDiscreteScheduler), got {config.class_name}"
            )
        mu = scheduler_classes.mu_of(flow, None, seq_len)
        schedule = scheduler_classes.training_schedule(flow, mu)
    except CheckpointError:
        raise
    except DdpmError as exc:
        text = str(exc)
        raise CheckpointError(text if text.startswith(str(path)) else f"{path}: {text}") from None
    extra: dict[str, Any] = {"flow_shift": flow.shift}
    if mu is not None:
        extra = {"flow_mu": mu, "flow_image_seq_len": seq_len}
    return _Meta(schedule=schedule, prediction_type="flow", extra=extra)


# ---------------------------------------------------------------------------------------------
# text encoders


def sd3_text(p: Path, net_config: Mapping[str, Any], where: str) -> TextConditioning:
    """The prompt encoding of an SD3 folder: CLIP-L, CLIP-G and (optional) T5."""
    clips = []
    for enc, tok in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        _need(p, enc, tok)
        module, positions = text_encoders.clip_text_encoder(p / enc, where, projection=True)
        tokenizer = text_encoders.load_tokenizer(p / tok, "clip")
        clips.append((tokenizer, module, text_encoders.clip_length(tokenizer, positions)))
    t5 = _t5(p, "text_encoder_3", "tokenizer_3", where)
    joint = int(net_config.get("joint_attention_dim", 4096))
    tokens = T5Tokens(SD3_T5_TOKENS, None if t5 is None else t5[0])

    def encode(prompt: str) -> Prompt:
        states, pooled = [], []
        for tokenizer, module, length in clips:
            out = module(
                text_encoders.token_ids(tokenizer, prompt, length), output_hidden_states=True
            )
            pooled.append(out[0])
            states.append(out.hidden_states[-2])
        clip = torch.cat(states, dim=-1).float()
        if t5 is None:
            long = torch.zeros(1, tokens.count, joint)
        else:
            long = t5[1](text_encoders.token_ids(t5[0], prompt, tokens.count))[0].float()
        clip = torch.nn.functional.pad(clip, (0, long.shape[-1] - clip.shape[-1]))
        return {"states": torch.cat([clip, long], dim=-2), "pooled": torch.cat(pooled, dim=-1)}

    text = TextConditioning(
        encode, count_tokens=functools.partial(text_encoders.token_count, clips[0][0]),
        max_tokens=clips[0][2], set_sequence_length=tokens.set,
    )  # fmt: skip
    text.shown["text_encoders"] = "CLIP-L, CLIP-G" + (", T5" if t5 is not None else " (no T5)")
    return text


def flux_text(p: Path, net_config: Mapping[str, Any], where: str) -> TextConditioning:
    """The prompt encoding of a Flux folder: CLIP's pooled output and T5's states; guidance
    embedded (Flux-dev) or classifier-free (Flux-schnell)."""
    _need(p, "text_encoder", "tokenizer")
    clip, positions = text_encoders.clip_text_encoder(p / "text_encoder", where, projection=False)
    tokenizer = text_encoders.load_tokenizer(p / "tokenizer", "clip")
    length = text_encoders.clip_length(tokenizer, positions)
    t5 = _t5(p, "text_encoder_2", "tokenizer_2", where)
    if t5 is None:
        raise CheckpointError(f"{p}: a Flux pipeline needs text_encoder_2/ and tokenizer_2/ (T5)")
    tokens = T5Tokens(FLUX_T5_TOKENS, t5[0])

    def encode(prompt: str) -> Prompt:
        pooled = clip(text_encoders.token_ids(tokenizer, prompt, length)).pooler_output
        states = t5[1](text_encoders.token_ids(t5[0], prompt, tokens.count))[0]
        return {"states": states.float(), "pooled": pooled.float()}

    embedded = bool(net_config.get("guidance_embeds", False))  # a bool: transformer_parameters
    text = TextConditioning(
        encode, count_tokens=functools.partial(text_encoders.token_count, tokenizer),
        max_tokens=length, guidance="embedded" if embedded else "classifier-free",
        default_guidance=FLUX_GUIDANCE if embedded else 1.0, set_sequence_length=tokens.set,
    )  # fmt: skip
    text.shown["text_encoders"] = "CLIP-L, T5"
    if not embedded:
        text.shown["guidance"] = "classifier-free (no guidance embedding: the pipeline's true CFG)"
    return text


class T5Tokens:
    """The T5 token count a pipeline's prompt encoding reads (diffusers' ``max_sequence_length``):
    the family's default until :meth:`set`, which checks a count against the limit before any
    encoder call allocates for it."""

    def __init__(self, default: int, tokenizer: Any) -> None:
        # the tokenizer's model_max_length is not a bound: the pipelines pass max_length
        # themselves and T5's relative positions read any length (a folder whose tokenizer said
        # 4 read the default 256 and refused 100, two answers to one question)
        self.count = default
        self.limit = MAX_T5_SEQUENCE

    def set(self, value: int) -> None:
        """Read ``value`` T5 tokens (1 .. 512, as diffusers' pipelines allow)."""
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= self.limit:
            raise ParameterError(
                f"{{max_sequence_length}} {value!r}: the T5 prompt encoding reads 1 to "
                f"{self.limit} tokens (diffusers' pipelines allow at most {MAX_T5_SEQUENCE})"
            )
        self.count = value


def _need(p: Path, enc: str, tok: str) -> None:
    if not (p / enc / "config.json").is_file() or not (p / tok).is_dir():
        raise CheckpointError(f"{p}: the pipeline needs {enc}/ and {tok}/ folders")


def _listed(p: Path, name: str) -> bool:
    """Whether the folder's ``model_index.json`` names a component ``name`` (not ``[null,
    null]``); a missing or unreadable index lists nothing (the loader reads it elsewhere)."""
    try:
        index = text_encoders.read_config(p / "model_index.json")
    except CheckpointError:
        return False
    entry = index.get(name)
    return isinstance(entry, list) and any(v is not None for v in entry)


def _t5(p: Path, enc: str, tok: str, where: str) -> tuple[Any, Any] | None:
    """``(tokenizer, encoder)`` of the folder's T5, or None when it has none (and its
    ``model_index.json`` does not list one: a listed encoder that is missing is an error, as in
    diffusers' ``from_pretrained``, not a quiet load without T5)."""
    if not (p / enc / "config.json").is_file():
        if _listed(p, enc):
            raise CheckpointError(
                f"{p}: model_index.json lists {enc}, but {enc}/config.json is missing (remove "
                f"the entry, or set it to [null, null], to load without T5)"
            )
        return None
    _need(p, enc, tok)
    return text_encoders.load_tokenizer(p / tok, "t5"), text_encoders.t5_text_encoder(
        p / enc, where
    )
