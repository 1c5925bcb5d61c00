"""Text encoders and tokenizers of diffusers pipelines (CLIP, OpenCLIP bigG, T5), read offline.

Tokenizers come through ``transformers``' own loader from the local folder, in any layout it
saves or published folders hold: ``tokenizer.json`` (what ``save_pretrained`` writes today),
``vocab.json`` + ``merges.txt`` (CLIP's older layout), or T5's ``spiece.model``. The class is
chosen here from the encoder the tokenizer serves (``CLIPTokenizer`` or ``T5Tokenizer``), never
from the folder: no ``trust_remote_code``, no class named by a file, no file outside the folder.

Encoder configs are checked before anything is allocated (their parameter counts, in one place:
:func:`clip_parameters`, :func:`t5_parameters`); weights are safetensors, or a ``.bin`` through
the restricted unpickler, one file or shards named by an index.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ddpmcli import limits
from ddpmcli.checkpoints.loaded import Cast, build_loaded, read_safetensors, stored_dtype
from ddpmcli.checkpoints.sizes import count_on_meta
from ddpmcli.checkpoints.unpickler import one_line, safe_torch_load
from ddpmcli.errors import CheckpointError

TEXT_HINT = "pip install 'ddpmcli[sd]'"
T5_TOKENIZER_HINT = "pip install 'ddpmcli[t5]'"
MAX_WIDTH = 1 << 14
MAX_VOCAB = 1 << 20
MAX_TOKENIZER_BYTES = 64 * 1024**2
"""The largest tokenizer file read (T5-XXL's tokenizer.json is 2.4 MB, CLIP's 3.6 MB)."""
MAX_T5_TOKENS = 4096
"""The longest T5 prompt a pipeline may ask for (SD3 reads 256 tokens, Flux-dev 512)."""

_TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)
_FILE_KEYS = ("tokenizer_file", "vocab_file", "merges_file", "spiece_model_file")


def config_count(
    config: Mapping[str, Any], where: Path, name: str, default: int, maximum: int
) -> int:
    """``config[name]`` (``default`` when absent), checked to be an integer in 1..``maximum``."""
    value = config.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
        raise CheckpointError(f"{where}: {name} must be an integer in 1..{maximum}, got {value!r}")
    return value


def config_epsilon(config: Mapping[str, Any], where: Path, name: str, default: float) -> float:
    """``config[name]`` (``default`` when absent), a layer norm's epsilon: a finite number in
    (0, 1) (NaN loaded and stopped the first sample step with NaN)."""
    value = config.get(name, default)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not 0.0 < float(value) < 1.0:  # NaN fails the comparison too
        raise CheckpointError(f"{where}: {name} must be a number in (0, 1), got {value!r}")
    return float(value)


def import_transformers() -> Any:
    """``transformers``, or one line saying which extra installs it."""
    try:
        import transformers
    except ImportError:
        raise CheckpointError(
            f"a text-conditional pipeline needs transformers for its text encoder: {TEXT_HINT}"
        ) from None
    return transformers


def read_config(path: Path) -> dict[str, Any]:
    raw = limits.read_json(path, "text encoder config", error=CheckpointError)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: must hold a JSON object")
    return raw


# ---------------------------------------------------------------------------------------------
# tokenizers


def load_tokenizer(tok_dir: Path, family: str) -> Any:
    """The ``family`` (``clip`` or ``t5``) tokenizer saved in ``tok_dir``, through
    ``transformers``' own ``from_pretrained`` on the local folder (offline).

    Raises:
        CheckpointError: no tokenizer files, a file that is not a regular file or is too large,
            a config naming a file outside the folder, or the loader's own failure (one line).
    """
    transformers = import_transformers()
    present = _check_tokenizer_files(tok_dir)
    whole = {"tokenizer.json", "spiece.model"} & present or {"vocab.json", "merges.txt"} <= present
    if not whole:
        raise CheckpointError(
            f"{tok_dir}: no tokenizer (tokenizer.json, vocab.json + merges.txt, or spiece.model)"
        )
    if "tokenizer.json" not in present and "spiece.model" in present:
        missing = [m for m in ("sentencepiece", "google.protobuf") if not _has_module(m)]
        if missing:
            raise CheckpointError(
                f"{tok_dir / 'spiece.model'}: reading a SentencePiece tokenizer needs "
                f"{' and '.join(m.split('.')[-1] for m in missing)}: {T5_TOKENIZER_HINT}"
            )
    cls = transformers.CLIPTokenizer if family == "clip" else transformers.T5Tokenizer
    extra = {"extra_ids": 0} if family == "t5" and "tokenizer.json" not in present else {}
    try:
        tokenizer = cls.from_pretrained(
            str(tok_dir), local_files_only=True, trust_remote_code=False, **extra
        )
        tokenizer("a", verbose=False)  # a broken vocabulary fails here, not mid-run
        return tokenizer
    except Exception as exc:  # the loader's own error: a corrupt file, most likely
        raise CheckpointError(f"{tok_dir}: bad tokenizer ({one_line(exc)})") from None


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _check_tokenizer_files(tok_dir: Path) -> set[str]:
    """The tokenizer files ``tok_dir`` holds, each a regular file under the size limit, and its
    config naming no file outside the folder."""
    if not tok_dir.is_dir():
        raise CheckpointError(f"{tok_dir}: no such tokenizer folder")
    present = set()
    for name in _TOKENIZER_FILES:
        path = tok_dir / name
        if not (path.exists() or path.is_symlink()):
            continue
        limits.check_regular_file(path, "tokenizer file", error=CheckpointError)
        if path.stat().st_size > MAX_TOKENIZER_BYTES:
            raise CheckpointError(
                f"{path}: tokenizer file is larger than the {MAX_TOKENIZER_BYTES >> 20} MiB limit"
            )
        present.add(name)
    if "vocab.json" in present:
        _check_vocab(tok_dir / "vocab.json")
    if "tokenizer_config.json" in present:
        config = limits.read_json(
            tok_dir / "tokenizer_config.json", "tokenizer config", error=CheckpointError
        )
        if not isinstance(config, dict):
            raise CheckpointError(f"{tok_dir / 'tokenizer_config.json'}: must hold a JSON object")
        for key in _FILE_KEYS:
            value = config.get(key)
            if value is not None and (not isinstance(value, str) or Path(value).name != value):
                raise CheckpointError(
                    f"{tok_dir / 'tokenizer_config.json'}: {key} names {value!r}, not a file "
                    "in the tokenizer folder"
                )
    return present


def _check_vocab(path: Path) -> None:
    """``vocab.json``: an object of token -> whole-number id (string ids made the tokenizer fail
    only when a prompt was encoded, mid-run)."""
    vocab = limits.read_json(path, "tokenizer vocabulary", limit=MAX_TOKENIZER_BYTES,
                             error=CheckpointError)  # fmt: skip
    if not isinstance(vocab, dict) or not all(
        isinstance(i, int) and not isinstance(i, bool) and 0 <= i < MAX_VOCAB
        for i in vocab.values()
    ):
        raise CheckpointError(
            f"{path}: must map each token to a whole-number id in 0..{MAX_VOCAB - 1}"
        )


def token_ids(tokenizer: Any, prompt: str, length: int) -> Tensor:
    """``[1, length]`` ids of ``prompt``: padded to ``length`` and cut there, as diffusers'
    pipelines tokenize."""
    ids: Tensor = tokenizer(
        [prompt], padding="max_length", max_length=length, truncation=True, return_tensors="pt"
    ).input_ids
    return ids


def token_count(tokenizer: Any, prompt: str) -> int:
    """The prompt's token count before truncation."""
    return len(tokenizer(prompt, truncation=False, verbose=False).input_ids)


def clip_length(tokenizer: Any, positions: int) -> int:
    """The tokens a CLIP encoder reads: the tokenizer's ``model_max_length`` when the encoder
    has that many positions, else the encoder's positions."""
    wanted = getattr(tokenizer, "model_max_length", None)
    if isinstance(wanted, int) and not isinstance(wanted, bool) and 1 <= wanted <= positions:
        return wanted
    return positions


# ---------------------------------------------------------------------------------------------
# encoders


def clip_parameters(config: Mapping[str, Any], where: Path) -> tuple[int, int]:
    """``(parameter count bound, positions)`` of a CLIP text config, its fields checked."""
    count = functools.partial(config_count, config, where)
    width = count("hidden_size", 512, MAX_WIDTH)
    layers = count("num_hidden_layers", 12, 256)
    vocab = count("vocab_size", 49408, MAX_VOCAB)
    inner = count("intermediate_size", 2048, 4 * MAX_WIDTH)
    positions = count("max_position_embeddings", 77, 4096)
    projection = count("projection_dim", 512, MAX_WIDTH)
    config_epsilon(config, where, "layer_norm_eps", 1e-5)
    # per layer: attention 4 d^2, feed-forward 2 d x inner; the embedding tables; the projection
    weights = (vocab + positions) * width + layers * (4 * width * width + 2 * width * inner)
    return weights + width * projection, positions


def t5_parameters(config: Mapping[str, Any], where: Path) -> int:
    """A bound on the parameter count of a T5 encoder config, its fields checked."""
    count = functools.partial(config_count, config, where)
    width = count("d_model", 512, MAX_WIDTH)
    inner = count("num_heads", 8, 1024) * count("d_kv", 64, 4096)
    feed = count("d_ff", 2048, 16 * MAX_WIDTH)
    layers = count("num_layers", 6, 256)
    vocab = count("vocab_size", 32128, MAX_VOCAB)
    count("relative_attention_num_buckets", 32, 4096)
    # a distance of 0 or below failed inside the first call: "math domain error" (log of it)
    count("relative_attention_max_distance", 128, 1 << 20)
    config_epsilon(config, where, "layer_norm_epsilon", 1e-6)
    # per layer: attention 4 d x inner, gated feed-forward 3 d x d_ff; the embedding table
    return vocab * width + layers * (4 * width * inner + 3 * width * feed)


def clip_text_encoder(enc_dir: Path, where: str, *, projection: bool) -> tuple[nn.Module, int]:
    """``(encoder, positions)``: the ``CLIPTextModel`` (``CLIPTextModelWithProjection`` when
    ``projection``) saved in ``enc_dir``, float32, inference only."""
    transformers = import_transformers()
    config = read_config(enc_dir / "config.json")
    weights, positions = clip_parameters(config, enc_dir / "config.json")
    limits.check_allocation(
        weights * 4, f"{enc_dir / 'config.json'}: the text encoder it describes",
        error=CheckpointError,
    )  # fmt: skip
    name = "CLIPTextModelWithProjection" if projection else "CLIPTextModel"
    count_on_meta(
        lambda: getattr(transformers, name)(transformers.CLIPTextConfig.from_dict(config)),
        f"{enc_dir / 'config.json'}: the text encoder it describes",
    )
    encoder = build_loaded(
        lambda: getattr(transformers, name)(transformers.CLIPTextConfig.from_dict(config)),
        functools.partial(_text_state, enc_dir=enc_dir), where,
        bad_config=f"{enc_dir}: bad {name} config", dtype=lambda state: torch.float32,
    )  # fmt: skip
    return encoder.float().eval().requires_grad_(False), positions


def t5_text_encoder(enc_dir: Path, where: str) -> nn.Module:
    """The ``T5EncoderModel`` saved in ``enc_dir``, inference only: float32, or bfloat16 when
    stored so (float16 is upcast: T5 overflows in it)."""
    transformers = import_transformers()
    config = read_config(enc_dir / "config.json")
    limits.check_allocation(
        t5_parameters(config, enc_dir / "config.json") * 4,
        f"{enc_dir / 'config.json'}: the text encoder it describes", error=CheckpointError,
    )  # fmt: skip
    count_on_meta(
        lambda: transformers.T5EncoderModel(transformers.T5Config.from_dict(config)),
        f"{enc_dir / 'config.json'}: the text encoder it describes",
    )

    def t5_dtype(state: Mapping[str, Tensor]) -> torch.dtype:
        return torch.bfloat16 if stored_dtype(state) == torch.bfloat16 else torch.float32

    encoder = build_loaded(
        lambda: transformers.T5EncoderModel(transformers.T5Config.from_dict(config)),
        functools.partial(_text_state, enc_dir=enc_dir), where,
        bad_config=f"{enc_dir}: bad T5EncoderModel config", dtype=t5_dtype,
    )  # fmt: skip
    return encoder.eval().requires_grad_(False)


def _text_state(encoder: nn.Module, cast: Cast | None, enc_dir: Path) -> dict[str, Tensor]:
    """The folder's weights for ``encoder`` (built by :func:`.loaded.build_loaded`, which
    casts and loads them): ``position_ids`` buffers that older files store and the class no
    longer has are skipped, and a T5 encoder's tied ``encoder.embed_tokens`` is its ``shared``
    table."""
    state = read_text_weights(enc_dir, cast=cast)
    own = set(encoder.state_dict())
    state = {k: v for k, v in state.items() if k in own or "position_ids" not in k}
    if "encoder.embed_tokens.weight" in own and "encoder.embed_tokens.weight" not in state:
        if "shared.weight" in state:
            state["encoder.embed_tokens.weight"] = state["shared.weight"]
    return state


def read_text_weights(enc_dir: Path, *, cast: Cast | None = None) -> dict[str, Tensor]:
    """``model.safetensors`` (or shards named by ``model.safetensors.index.json``), else
    ``pytorch_model.bin`` through the safe loader. Safetensors are views of the mapped file,
    or each cast as it is read (:func:`.loaded.read_safetensors`)."""
    index = enc_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_config(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: weight_map must be a JSON object")
        state: dict[str, Tensor] = {}
        for name in sorted({str(v) for v in weight_map.values()}):
            if not name or Path(name).name != name or name in (".", ".."):
                raise CheckpointError(f"{index}: names {name!r}, not a file in the folder")
            state.update(_safetensors(enc_dir / name, cast))
        return state
    safe = enc_dir / "model.safetensors"
    if safe.exists():
        return _safetensors(safe, cast)
    binary = enc_dir / "pytorch_model.bin"
    if not binary.is_file():
        raise CheckpointError(f"{enc_dir}: no weights (model.safetensors or pytorch_model.bin)")
    loaded = safe_torch_load(binary, str(binary))
    if not isinstance(loaded, Mapping):
        raise CheckpointError(f"{binary}: not a state dict")
    return dict(loaded)


def _safetensors(path: Path, cast: Cast | None) -> dict[str, Tensor]:
    limits.check_regular_file(path, "weights file", error=CheckpointError)
    try:
        return read_safetensors(str(path), cast)
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise CheckpointError(
            f"{path}: truncated or corrupt safetensors file ({one_line(exc)})"
        ) from None
