"""diffusers pipeline or unet folders (``unet/``, ``scheduler/``), with the optional extra.

Files are read as a hostile source: every JSON with size and nesting limits, weight files must be
regular files inside the unet folder, and the config fields that decide an allocation
(``sample_size``, channels, blocks) are checked before the network is built. Weights are read with
safetensors or ``torch.load(weights_only=True)``, offline.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, cast

from torch import Tensor

from ddpmcli import core, limits, models
from ddpmcli.checkpoints import flow_pipelines, sdxl, text_encoders
from ddpmcli.checkpoints.conditioning import TextConditioning
from ddpmcli.checkpoints.latent import LATENT_BOUND, LatentSpace
from ddpmcli.checkpoints.loaded import (
    Cast,
    Denoiser,
    LoadedModel,
    build_loaded,
    loaded_model,
    read_safetensors,
)
from ddpmcli.checkpoints.meta import _finish, _merge, _Meta, check_data_shape
from ddpmcli.checkpoints.sizes import count_on_meta
from ddpmcli.checkpoints.text_encoders import config_count as _config_count
from ddpmcli.checkpoints.unpickler import one_line, safe_torch_load
from ddpmcli.errors import CheckpointError, DdpmError

DIFFUSERS_HINT = "pip install 'ddpmcli[diffusers]'"
MAX_CHANNELS = 1 << 14


_WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.fp16.bin",
)


def _diffusers_layout(p: Path) -> tuple[Path, Path | None]:
    """(denoiser folder, scheduler_config.json or None) of a pipeline (``unet/`` or DiT's
    ``transformer/``) or a bare unet folder."""
    if (p / "unet" / "config.json").is_file():
        unet_dir = p / "unet"
    elif (p / "transformer" / "config.json").is_file():
        unet_dir = p / "transformer"
    elif (p / "config.json").is_file():
        unet_dir = p
    else:
        raise CheckpointError(
            f"{p}: not a diffusers folder (no unet/config.json or config.json); a folder must be a "
            "diffusers pipeline or unet"
        )
    candidates = [
        p / "scheduler" / "scheduler_config.json",
        p / "scheduler_config.json",
        unet_dir.parent / "scheduler" / "scheduler_config.json",
    ]
    return unet_dir, next((c for c in candidates if c.is_file()), None)


@contextlib.contextmanager
def _offline_quiet() -> Iterator[None]:
    """No network, no log noise, no progress bars while diffusers is in use."""
    saved = {
        k: os.environ.get(k)
        for k in ("HF_HUB_OFFLINE", "DIFFUSERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS")
    }
    os.environ.update(
        HF_HUB_OFFLINE="1", DIFFUSERS_VERBOSITY="error", HF_HUB_DISABLE_PROGRESS_BARS="1"
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _import_diffusers() -> Any:
    try:
        with _offline_quiet():
            import diffusers
            from diffusers.utils import logging as dlogging
    except ImportError:
        raise CheckpointError(
            f"loading a diffusers folder needs the optional extra: {DIFFUSERS_HINT}"
        ) from None
    dlogging.set_verbosity_error()
    dlogging.disable_progress_bar()
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    return diffusers


def _read_json(path: Path) -> dict[str, Any]:
    raw = limits.read_json(path, "diffusers config", error=CheckpointError)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: must hold a JSON object")
    return raw


def _weight_file(unet_dir: Path, name: Any) -> Path:
    """A weight file named by an index: a plain name inside the unet folder, a regular file."""
    text = str(name)
    if not text or "/" in text or "\\" in text or "\x00" in text or text in (".", ".."):
        raise CheckpointError(f"{unet_dir}: weight index names {text!r}, not a file in the folder")
    return limits.check_regular_file(unet_dir / text, "weights file", error=CheckpointError)


def _read_diffusers_weights(unet_dir: Path, cast: Cast | None = None) -> dict[str, Tensor]:
    """The folder's weights: one file or the shards an index names; safetensors as views of the
    mapped file, or each cast as it is read (:func:`.loaded.read_safetensors`)."""
    index = [
        unet_dir / f"diffusion_pytorch_model.{ext}.index.json" for ext in ("safetensors", "bin")
    ]
    files: list[Path] = []
    for idx in index:
        if idx.is_file():
            weight_map = _read_json(idx).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{idx}: weight_map must be a JSON object")
            names = sorted({str(v) for v in weight_map.values()})
            files = [_weight_file(unet_dir, n) for n in names]
            break
    else:
        first = next((unet_dir / n for n in _WEIGHT_NAMES if (unet_dir / n).is_file()), None)
        if first is None:
            raise CheckpointError(
                f"{unet_dir}: no weights (diffusion_pytorch_model.safetensors or .bin) "
                "in the unet folder"
            )
        files = [first]
    state: dict[str, Tensor] = {}
    for f in files:
        if f.suffix == ".safetensors":
            try:
                import safetensors  # noqa: F401
            except ImportError:
                raise CheckpointError(
                    f"reading {f.name} needs safetensors: {DIFFUSERS_HINT}"
                ) from None
            try:
                state.update(read_safetensors(str(f), cast))
            except Exception as exc:  # safetensors raises its own SafetensorError
                raise CheckpointError(
                    f"{f}: truncated or corrupt safetensors file ({one_line(exc)})"
                ) from None
        else:
            loaded = safe_torch_load(f, str(f))
            if not isinstance(loaded, Mapping):
                raise CheckpointError(f"{f}: not a state dict")
            state.update(loaded)
    return state


def load_diffusers(p: Path, given: _Meta) -> LoadedModel:
    """A diffusers folder: its denoiser (``UNet2DModel``, class-conditional or not, a DiT
    ``DiTTransformer2DModel``, or a text-conditional ``UNet2DConditionModel``: Stable Diffusion
    1.x/2.x or SDXL-style), scheduler config and, in a latent pipeline, its ``vae/``."""
    where = str(p)
    net_dir, scheduler_file = _diffusers_layout(p)
    diffusers = _import_diffusers()
    config = _read_json(net_dir / "config.json")
    class_name = str(config.get("_class_name", "UNet2DModel"))
    if class_name == "UNet2DModel":
        _check_unet_sizes(config, net_dir / "config.json")
        classes = _unet_classes(config, net_dir / "config.json")
    elif class_name == "DiTTransformer2DModel":
        classes = _dit_classes(config, net_dir)
    elif class_name == "UNet2DConditionModel":
        _check_text_unet(p, config, net_dir / "config.json")
        classes = None
    elif class_name in flow_pipelines.FLOW_CLASSES:
        return _load_flow(p, diffusers, class_name, config, net_dir, scheduler_file, given)
    else:
        raise CheckpointError(f"{where}: {_unsupported(class_name)}")
    net = _build(diffusers, class_name, config, net_dir, where)
    latent = (
        _load_vae(p / "vae", diffusers, where) if (p / "vae" / "config.json").is_file() else None
    )
    file_meta = _diffusers_scheduler_meta(scheduler_file) if scheduler_file else _Meta()
    in_ch = int(net.config.in_channels)
    out_ch = int(net.config.out_channels or in_ch)
    size = net.config.sample_size
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    file_meta.data_shape = (in_ch, h, w)
    file_meta.learned_variance = out_ch == 2 * in_ch
    file_meta.data_range = (-1.0, 1.0)
    if latent is not None:
        file_meta.data_range = (-LATENT_BOUND, LATENT_BOUND)
    finished = _finish(_merge(file_meta, given), where, flags_hint=True)
    if latent is not None:
        latent.latent_shape = finished[3]
    info: dict[str, Any] = {
        "format": "diffusers",
        "architecture": class_name,
        **_described(net, diffusers, scheduler_file, file_meta),
    }
    if classes is not None:
        info["num_classes"], info["null_label"] = classes
    if latent is not None:
        info.update(latent.describe())
    text, wrapper = _text_conditioning(p, class_name, config, finished[3], latent, where)
    if text is not None and sdxl.is_sdxl(config):
        info["architecture"] = f"{class_name} (SDXL-style)"

    def move(d: Any, dt: Any) -> Denoiser:
        return wrapper(models.placed(net, d, dt))

    return loaded_model(
        wrapper(net), finished, info, mover=move, latent=latent, conditioning=text,
        dtype=next(iter(net.parameters())).dtype,
    )  # fmt: skip


def _load_flow(
    p: Path, diffusers: Any, class_name: str, config: dict[str, Any], net_dir: Path,
    scheduler_file: Path | None, given: _Meta,
) -> LoadedModel:  # fmt: skip
    """An SD3 or Flux pipeline (:mod:`.flow_pipelines`): transformer, VAE, text encoders and the
    flow schedule its scheduler config gives at the data shape's resolution."""
    where = str(p)
    flow_pipelines.check_transformer_sizes(class_name, config, net_dir / "config.json")
    if not (p / "vae" / "config.json").is_file() or scheduler_file is None:
        raise CheckpointError(f"{p}: a {class_name} pipeline needs vae/ and scheduler/ folders")
    latent = _load_vae(p / "vae", diffusers, where)
    shape = flow_pipelines.flow_data_shape(class_name, config, latent, given, net_dir)
    sd3 = class_name == "SD3Transformer2DModel"
    patch = int(config.get("patch_size", 2)) if sd3 else 2
    file_meta = flow_pipelines.flow_scheduler_meta(
        scheduler_file, (shape[1] // patch) * (shape[2] // patch)
    )
    file_meta.data_shape, file_meta.learned_variance = shape, False
    file_meta.data_range = (-LATENT_BOUND, LATENT_BOUND)
    finished = _finish(_merge(file_meta, given), where, flags_hint=True)
    latent.latent_shape = finished[3]
    scale = 2 ** (len(latent.vae.config.block_out_channels) - 1)  # images at the data's size
    latent.image_shape = (latent.image_shape[0], finished[3][-2] * scale, finished[3][-1] * scale)
    net = _build(diffusers, class_name, config, net_dir, where)
    with _offline_quiet():
        make_text = flow_pipelines.sd3_text if sd3 else flow_pipelines.flux_text
        text = make_text(p, config, where)
    info: dict[str, Any] = {
        "format": "diffusers", "architecture": class_name,
        **_described(net, diffusers, scheduler_file, file_meta), **latent.describe(),
    }  # fmt: skip
    wrapper = functools.partial(
        flow_pipelines.SD3Denoiser if sd3 else flow_pipelines.FluxDenoiser, where=where
    )

    def move(d: Any, dt: Any) -> Denoiser:
        return cast(Denoiser, wrapper(models.placed(net, d, dt)))

    return loaded_model(
        cast(Denoiser, wrapper(net)), finished, info, mover=move, latent=latent,
        conditioning=text, dtype=next(iter(net.parameters())).dtype,
    )  # fmt: skip


def _described(
    net: Any, diffusers: Any, scheduler_file: Path | None, meta: _Meta
) -> dict[str, Any]:
    """The ``info`` fields every diffusers folder shows: size, dtype, versions, scheduler."""
    return {
        "parameters": models.count_parameters(net),
        "weights_dtype": str(next(iter(net.parameters())).dtype).removeprefix("torch."),
        "diffusers_version": getattr(diffusers, "__version__", "?"),
        "scheduler_config": None if scheduler_file is None else str(scheduler_file),
        **{f"scheduler_{k}": v for k, v in meta.extra.items()},
    }


def _text_conditioning(
    p: Path, class_name: str, config: Mapping[str, Any], shape: tuple[int, ...],
    latent: LatentSpace | None, where: str,
) -> tuple[TextConditioning | None, Callable[[Any], Denoiser]]:  # fmt: skip
    """A text-conditional unet's conditioning and the wrapper that calls its network."""
    if class_name != "UNet2DConditionModel":
        return None, lambda net: _DiffusersDenoiser(net, "class_labels")
    if not sdxl.is_sdxl(config):
        return _load_text(p, where), lambda net: _DiffusersDenoiser(net, "encoder_hidden_states")
    scale = 1
    if latent is not None:
        scale = 2 ** (len(latent.vae.config.block_out_channels) - 1)
    image_hw = (int(shape[-2]) * scale, int(shape[-1]) * scale)
    with _offline_quiet():
        text = sdxl.load_sdxl_text(p, config, where, image_hw)
    return text, lambda net: cast(Denoiser, sdxl.SDXLDenoiser(net, where))


def _unsupported(class_name: str) -> str:
    return (
        f"diffusers model {class_name} is not supported (UNet2DModel, class-conditional or not, "
        "DiTTransformer2DModel, Stable Diffusion 1.x/2.x- or SDXL-style "
        "UNet2DConditionModel, SD3Transformer2DModel and FluxTransformer2DModel)"
    )


def _check_text_unet(p: Path, config: Mapping[str, Any], where: Path) -> None:
    """A Stable Diffusion 1.x/2.x-style unet (one text encoder, no added conditioning) or an
    SDXL-style one (added text and time embedding: :mod:`.sdxl`)."""
    kind = config.get("addition_embed_type")
    if kind is not None and not sdxl.is_sdxl(config):
        raise CheckpointError(
            f"{where}: addition_embed_type {kind!r} is not supported (SDXL-style 'text_time' is)"
        )
    if config.get("class_embed_type") or config.get("num_class_embeds"):
        raise CheckpointError(f"{where}: a class-conditional UNet2DConditionModel is not supported")
    if config.get("time_cond_proj_dim") is not None:
        raise CheckpointError(
            f"{where}: time_cond_proj_dim (a distilled model's guidance embedding) is not supported"
        )
    _check_unet_sizes(config, where)
    if sdxl.is_sdxl(config):
        return
    if not (p / "text_encoder" / "config.json").is_file() or not (p / "tokenizer").is_dir():
        raise CheckpointError(
            f"{p}: a UNet2DConditionModel pipeline needs text_encoder/ and tokenizer/ folders"
        )


def _build(
    diffusers: Any, class_name: str, config: dict[str, Any], net_dir: Path, where: str
) -> Any:
    """The network of ``class_name`` from its config, its weights loaded as stored (their dtype
    kept: an fp16 file gives an fp16 module)."""
    with _offline_quiet():
        # the lazy top-level name: diffusers then imports this class's model family (and what
        # it eagerly pulls in), no pipeline; a precise submodule path imports exactly as much
        # (tests/test_diffusers_imports.py measures that floor)
        cls = getattr(diffusers, class_name)
        what = f"{net_dir / 'config.json'}: the {class_name} it describes"
        count_on_meta(lambda: cls.from_config(config), what)  # before anything is allocated
        # built without random initial weights, then given the file's tensors: one copy of
        # the weights at the peak of the load, not two
        net = build_loaded(
            lambda: cls.from_config(config),
            lambda _, cast: _read_diffusers_weights(net_dir, cast), where,
            bad_config=f"{net_dir / 'config.json'}: bad {class_name} config",
        )  # fmt: skip
    net.eval().requires_grad_(False)  # inference only: no autograd graph, no grad memory
    return net


def _dit_classes(config: Mapping[str, Any], net_dir: Path) -> tuple[int, int | None]:
    """``(num_classes, null_label)`` of a DiT: ``num_embeds_ada_norm`` classes, and its label
    table's extra row (present when trained with label dropout) as the null label."""
    where = net_dir / "config.json"
    _check_dit_sizes(config, where)
    num = config.get("num_embeds_ada_norm", 1000)
    if isinstance(num, bool) or not isinstance(num, int) or not 1 <= num <= 1 << 20:
        raise CheckpointError(f"{where}: num_embeds_ada_norm must be an integer in 1..{1 << 20}")
    return num, num  # the table's row num; diffusers builds it (class_dropout_prob 0.1)


def _check_dit_sizes(config: Mapping[str, Any], where: Path) -> None:
    """A DiT config's sizes, checked before the network is built."""

    count = functools.partial(_config_count, config, where)

    in_ch = count("in_channels", 4, MAX_CHANNELS)
    size = count("sample_size", 32, 1 << 14)
    check_data_shape((in_ch, size, size), f"{where}: sample_size", CheckpointError)
    width = count("num_attention_heads", 16, 1024) * count("attention_head_dim", 72, 4096)
    if width > MAX_CHANNELS:
        raise CheckpointError(f"{where}: heads x head dim {width} is more than {MAX_CHANNELS}")
    layers = count("num_layers", 28, 256)
    count("patch_size", 2, size)
    # about 18 d^2 weights per block (attention 4, feed-forward 8, adaLN-zero 6), and the label
    # table: num_embeds_ada_norm + 1 rows of the width
    labels = config.get("num_embeds_ada_norm", 1000)
    rows = labels + 1 if isinstance(labels, int) and 1 <= labels <= 1 << 20 else 0
    limits.check_allocation(
        (18 * width * width * layers + rows * width) * 4,
        f"{where}: the DiT it describes",
        error=CheckpointError,
    )


def _load_vae(vae_dir: Path, diffusers: Any, where: str) -> LatentSpace:
    """The pipeline's ``AutoencoderKL`` and its scaling, as a :class:`LatentSpace`."""
    config = _read_json(vae_dir / "config.json")
    name = str(config.get("_class_name", "AutoencoderKL"))
    if name != "AutoencoderKL":
        raise CheckpointError(f"{vae_dir}: VAE {name} is not supported (only AutoencoderKL)")
    _check_unet_sizes(config, vae_dir / "config.json")
    vae = _build(diffusers, name, config, vae_dir, where).float()
    scale, shift = config.get("scaling_factor", 0.18215), config.get("shift_factor") or 0.0
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (scale, shift)):
        raise CheckpointError(f"{vae_dir / 'config.json'}: scaling_factor must be a number")
    size = config.get("sample_size", 32)
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[-1]))
    image = (int(config.get("in_channels", 3)), h, w)
    return LatentSpace(vae, float(scale), float(shift), image, ())


def _unet_classes(config: Mapping[str, Any], where: Path) -> tuple[int, int | None] | None:
    """``(num_classes, null_label)`` of a class-conditional UNet2DModel, None if unconditional.

    Its class embedding is a table of ``num_class_embeds`` rows (``class_embed_type`` null);
    diffusers declares no null label, so a config may name one as ``null_class_label``: the
    table's last row, which leaves ``num_class_embeds - 1`` classes.
    """
    kind = config.get("class_embed_type")
    num = config.get("num_class_embeds")
    if kind is None and num is None:
        return None
    if kind is not None:
        raise CheckpointError(
            f"{where}: class_embed_type {kind!r} is not supported (only a class embedding table: "
            "num_class_embeds with class_embed_type null)"
        )
    if isinstance(num, bool) or not isinstance(num, int) or not 1 <= num <= 1 << 20:
        raise CheckpointError(f"{where}: num_class_embeds must be an integer in 1..{1 << 20}")
    null = config.get("null_class_label")
    if null is None:
        return num, None
    if isinstance(null, bool) or null != num - 1 or num < 2:
        raise CheckpointError(
            f"{where}: null_class_label must be the last class embedding, {num - 1}, got {null!r}"
        )
    return num - 1, num - 1


class _DiffusersDenoiser:
    """``unet(x_t, t).sample`` as a plain callable; ``cond`` (class labels, or a text
    encoder's states) passed as ``keyword`` to a conditional one."""

    def __init__(self, unet: Any, keyword: str = "class_labels") -> None:
        self.unet = unet
        self.keyword = keyword

    def __call__(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        if cond is None:
            out: Tensor = self.unet(x, t, return_dict=False)[0]
        else:
            out = self.unet(x, t, return_dict=False, **{self.keyword: cond})[0]
        return out


def _diffusers_scheduler_meta(path: Path) -> _Meta:
    """Schedule and prediction type from a scheduler_config.json (read by ddpmcli.configs)."""
    from ddpmcli import configs  # lazily: only diffusers folders need it

    try:
        config = configs.load_scheduler_config(path)
    except DdpmError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    return _Meta(
        schedule=config.schedule,
        prediction_type=core.canonical_prediction_type(config.prediction_type),
        extra={
            "variance_type": config.variance_type,
            "clip_sample": config.clip_sample,
            "timestep_spacing": config.timestep_spacing,
            "steps_offset": config.steps_offset,
        },
    )


def _check_unet_sizes(config: Mapping[str, Any], where: Path) -> None:
    """The config fields that decide an allocation, checked before the network is built."""

    count = functools.partial(_config_count, config, where)

    in_ch = count("in_channels", 3, MAX_CHANNELS)
    count("out_channels", 3, MAX_CHANNELS)
    layers = count("layers_per_block", 2, 64)
    size = config.get("sample_size")
    sizes: list[Any] = list(size) if isinstance(size, (list, tuple)) else [size]
    if (
        size is None
        or len(sizes) not in (1, 2)
        or not all(isinstance(s, int) and not isinstance(s, bool) and 1 <= s for s in sizes)
    ):
        raise CheckpointError(f"{where}: sample_size must be a positive integer, got {size!r}")
    h, w = int(sizes[0]), int(sizes[-1])
    check_data_shape((in_ch, h, w), f"{where}: sample_size", CheckpointError)
    blocks = config.get("block_out_channels", (64,))
    if (
        not isinstance(blocks, (list, tuple))
        or not blocks
        or len(blocks) > 16
        or not all(
            isinstance(c, int) and not isinstance(c, bool) and 1 <= c <= MAX_CHANNELS
            for c in blocks
        )
    ):
        raise CheckpointError(
            f"{where}: block_out_channels must be 1 to 16 integers in 1..{MAX_CHANNELS}"
        )
    # about two 3x3 convolutions per layer, down and up: a bound on the weights it allocates
    weights = sum(2 * 9 * c * c * (2 * layers + 1) for c in blocks)
    embed = 4 * int(blocks[0])  # time_embedding_dim, which configs save as null by default
    if config.get("time_embedding_dim") is not None:
        embed = count("time_embedding_dim", embed, 4 * MAX_CHANNELS)
    weights += embed * embed  # the time embedding's second linear layer
    classes = config.get("num_class_embeds")  # its label table: one time-embedding row each
    if isinstance(classes, int) and not isinstance(classes, bool) and 1 <= classes <= 1 << 20:
        weights += classes * embed
    what = f"{where}: the UNet2DModel it describes"
    limits.check_allocation(weights * 4, what, error=CheckpointError)


def _load_text(p: Path, where: str) -> TextConditioning:
    """The CLIP text encoder (``text_encoder/``) and tokenizer (``tokenizer/``, any layout) of a
    Stable Diffusion 1.x/2.x-style folder, as a :class:`TextConditioning` whose ``encode`` runs
    them on the CPU (float32) once per prompt: the last hidden states."""
    with _offline_quiet():
        encoder, positions = text_encoders.clip_text_encoder(
            p / "text_encoder", where, projection=False
        )
        tokenizer = text_encoders.load_tokenizer(p / "tokenizer", "clip")
    length = text_encoders.clip_length(tokenizer, positions)

    def encode(prompt: str) -> Tensor:
        states: Tensor = encoder(text_encoders.token_ids(tokenizer, prompt, length))[0]
        return states

    return TextConditioning(
        encode, count_tokens=functools.partial(text_encoders.token_count, tokenizer),
        max_tokens=length,
    )  # fmt: skip
